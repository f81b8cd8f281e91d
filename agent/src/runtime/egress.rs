//! Outgoing requests of `wasi:http` functions: [`PodHooks`] sends them from
//! the pod's network namespace, names resolved with its DNS settings.
//!
//! HTTPS from `wasi:http` functions to host names. The name is resolved
//! with the pod's DNS settings and the connection made from the pod's
//! namespace (as for plain HTTP), so TLS cannot be left to wasmtime's
//! default client, which resolves on the host and verifies the address it
//! was given: here the certificate is checked against the name the guest
//! asked for (SNI), while the connection goes to the address wasmlet
//! resolved.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

use crate::network::{InNamespace, Resolver};

/// The trust a node's functions verify servers with.
pub type TlsConfig = Arc<rustls::ClientConfig>;

/// Why the trust for functions' HTTPS could not be built (the node's
/// `http_ca_file` setting).
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// The CA file cannot be read, or is not PEM.
    #[error("reading CA certificates {path:?}: {detail}")]
    Read { path: PathBuf, detail: String },
    /// A certificate in the CA file is not one rustls accepts.
    #[error("CA certificate in {path:?}: {detail}")]
    BadCertificate { path: PathBuf, detail: String },
    /// The CA file holds no certificate at all.
    #[error("{path:?} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    /// rustls refused its own settings.
    #[error("TLS settings: {0}")]
    Settings(#[source] rustls::Error),
}

/// The web PKI's roots (Mozilla's, as browsers), plus the PEM certificates
/// in `extra_ca` (a private CA of the cluster's).
pub fn tls_config(extra_ca: Option<&Path>) -> Result<TlsConfig, TlsConfigError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = extra_ca {
        let unreadable = |e: rustls::pki_types::pem::Error| TlsConfigError::Read {
            path: path.to_owned(),
            detail: e.to_string(),
        };
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(path).map_err(unreadable)?;
        let mut added = 0;
        for cert in certs {
            roots
                .add(cert.map_err(unreadable)?)
                .map_err(|e| TlsConfigError::BadCertificate {
                    path: path.to_owned(),
                    detail: e.to_string(),
                })?;
            added += 1;
        }
        if added == 0 {
            return Err(TlsConfigError::NoCertificate {
                path: path.to_owned(),
            });
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsConfigError::Settings)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// What is left of a sent request's connection: it ends once the response
/// body was read.
pub type Connection = Box<dyn Future<Output = Result<(), Error>> + Send>;

/// Sends `request` over TLS to `addr`, verifying the server as `name`.
/// The caller polls this in the pod's namespace.
pub async fn send(
    mut request: hyper::Request<WasiBody>,
    addr: SocketAddr,
    name: &str,
    tls: TlsConfig,
    options: Option<RequestOptions>,
) -> Result<(hyper::Response<WasiBody>, Connection), Error> {
    // wasmtime's default client's defaults.
    let limit = Duration::from_secs(600);
    let connect_timeout = options.and_then(|o| o.connect_timeout).unwrap_or(limit);
    let first_byte_timeout = options.and_then(|o| o.first_byte_timeout).unwrap_or(limit);
    let server_name =
        ServerName::try_from(name.to_owned()).map_err(|_| Error::HttpRequestUriInvalid)?;
    let handshake = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(Error::Connect)?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(server_name, tcp)
            .await
            .map_err(Error::Tls)?;
        Ok::<_, Error>(hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?)
    };
    let (mut sender, conn) = tokio::time::timeout(connect_timeout, handshake)
        .await
        .map_err(|_| Error::ConnectionTimeout)??;
    // On the wire, the path alone (the URI keeps scheme and authority).
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    *request.uri_mut() = path.parse().map_err(|_| Error::HttpRequestUriInvalid)?;
    let mut conn = Box::pin(async move { conn.await.map_err(Error::from) });
    let response = tokio::select! {
        response = tokio::time::timeout(first_byte_timeout, sender.send_request(request)) => {
            response.map_err(|_| Error::ConnectionReadTimeout)??
        }
        ended = &mut conn => {
            ended?;
            return Err(Error::ConnectionTerminated);
        }
    };
    let response = response.map(|body| body.map_err(Error::from).boxed_unsync());
    Ok((response, Box::new(conn)))
}

/// `wasi:http` hooks for a pod's instances: outgoing requests leave from
/// the pod's network namespace (names resolved with the pod's DNS
/// settings), or not at all without a network.
pub struct PodHooks {
    resolver: Resolver,
    tls: TlsConfig,
}

impl PodHooks {
    pub(crate) fn new(resolver: Resolver, tls: TlsConfig) -> Self {
        Self { resolver, tls }
    }
}

fn dns_error(message: String) -> wasmtime_wasi_http::Error {
    wasmtime_wasi_http::Error::DnsError {
        rcode: Some(message),
        info_code: None,
    }
}

impl WasiHttpHooks for PodHooks {
    fn send_request(
        &mut self,
        mut request: hyper::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> Box<
        dyn Future<
                Output = wasmtime_wasi_http::Result<(
                    hyper::Response<WasiBody>,
                    Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
                )>,
            > + Send,
    > {
        drop(fut);
        let resolver = self.resolver.clone();
        let tls = self.tls.clone();
        Box::new(async move {
            if !resolver.network.allows_sockets() {
                return Err(wasmtime_wasi_http::Error::HttpRequestDenied);
            }
            let uri = request.uri().clone();
            let host = uri
                .host()
                .unwrap_or("")
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            if host.parse::<IpAddr>().is_err() {
                // Connect to the address the pod's resolver gives; the URI
                // keeps the name for the Host header, which is already set.
                let https = uri.scheme() == Some(&hyper::http::uri::Scheme::HTTPS);
                let ips = resolver
                    .resolve(&host)
                    .await
                    .map_err(|e| dns_error(format!("looking up {host}: {e:?}")))?;
                let ip = ips
                    .first()
                    .ok_or_else(|| dns_error(format!("{host} has no address")))?;
                let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
                if https {
                    // TLS verifies the name; the connection goes to the
                    // address.
                    let addr = SocketAddr::new(*ip, port);
                    let sent = InNamespace::new(
                        send(request, addr, &host, tls, options),
                        &resolver.network,
                    )
                    .await
                    .map_err(|e| wasmtime_wasi_http::Error::InternalError(Some(e.to_string())))?;
                    let (response, io) = sent?;
                    return Ok((response, io));
                }
                let authority = SocketAddr::new(*ip, port).to_string();
                let mut parts = uri.into_parts();
                parts.authority = Some(
                    authority
                        .parse()
                        .map_err(|_| wasmtime_wasi_http::Error::HttpRequestUriInvalid)?,
                );
                *request.uri_mut() = hyper::Uri::from_parts(parts)
                    .map_err(|_| wasmtime_wasi_http::Error::HttpRequestUriInvalid)?;
            }
            let sent = InNamespace::new(
                wasmtime_wasi_http::default_send_request(request, options),
                &resolver.network,
            )
            .await
            .map_err(|e| wasmtime_wasi_http::Error::InternalError(Some(e.to_string())))?;
            let (response, io) = sent?;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = _> + Send>,
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_must_hold_certificates() {
        assert!(tls_config(None).is_ok());
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let error = tls_config(Some(&empty)).unwrap_err();
        assert!(
            matches!(error, TlsConfigError::NoCertificate { .. }),
            "{error:?}"
        );
        assert!(error.to_string().contains("no PEM certificate"), "{error}");
        let missing = tls_config(Some(&dir.path().join("missing.pem"))).unwrap_err();
        assert!(
            matches!(missing, TlsConfigError::Read { .. }),
            "{missing:?}"
        );
        assert!(missing.to_string().contains("missing.pem"), "{missing}");
    }
}
