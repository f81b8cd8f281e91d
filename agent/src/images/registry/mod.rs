//! Pulling images from, and pushing Wasm to, OCI registries.
//!
//! This is the one seam where something real varies (the network): it
//! fetches manifests and blobs with `oci-client`, verifies every blob's
//! digest and size before the image store sees it, retries transient
//! failures with backoff, and classifies the rest into errors an operator
//! can act on. The client and its errors are here; credentials and token
//! flows in `auth`, manifests and probing in `manifest`, pulls in `pull`,
//! pushes in `push`.

mod auth;
mod manifest;
mod pull;
mod push;

use std::path::PathBuf;
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::{Client, Reference};

use crate::error::{Error, RegistryFailure, Result};
use crate::model::image::ImageName;

pub use auth::Credentials;
pub use manifest::ImageKind;

/// How wasmlet talks to registries.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// Registries (`host[:port]`) spoken to over plain HTTP.
    pub insecure: Vec<String>,
    /// Extra CA certificate (PEM) trusted besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// Largest manifest or index accepted.
    pub max_manifest_bytes: u64,
    /// Largest config or layer accepted.
    pub max_blob_bytes: u64,
    /// Attempts for a transient failure (5xx, reset, truncation).
    pub attempts: u32,
    /// Limits on unpacking the layers of compat images.
    pub unpack: crate::images::rootfs::Limits,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            insecure: Vec::new(),
            ca_file: None,
            max_manifest_bytes: 4 * 1024 * 1024,
            max_blob_bytes: 512 * 1024 * 1024,
            attempts: 4,
            unpack: crate::images::rootfs::Limits {
                max_bytes: 1024 * 1024 * 1024,
                max_entries: 100_000,
            },
        }
    }
}

/// A registry client for the whole agent.
pub struct Registry {
    config: RegistryConfig,
    extra_roots: Vec<Vec<u8>>,
    /// [`Registry::http`]'s client, made at its first use.
    http: std::sync::OnceLock<reqwest::Client>,
}

fn failure(reference: &str, kind: RegistryFailure, reason: impl Into<String>) -> Error {
    Error::Registry {
        reference: reference.to_owned(),
        kind,
        reason: reason.into(),
    }
}

/// Sorts an oci-client error into what the operator can do about it.
/// `e` and all its causes, which is where reqwest keeps what happened
/// (connection refused, the certificate it did not trust).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let next = cause.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = cause.source();
    }
    text
}

/// A refusal of a call that sent no credentials says that, rather than
/// that the (absent) credentials were refused.
fn anonymous_refusal(e: Error, anonymous: bool, registry: &str) -> Error {
    match e {
        Error::Registry {
            reference,
            kind: RegistryFailure::Unauthorized,
            reason,
        } if anonymous => Error::Registry {
            reference,
            kind: RegistryFailure::Unauthorized,
            reason: format!(
                "registry {registry} refused anonymous access: the image needs credentials \
                 (an imagePullSecret){}",
                reason
                    .split_once(" (")
                    .map_or(String::new(), |(_, detail)| format!(" ({detail}"))
            ),
        },
        e => e,
    }
}

fn classify(reference: &str, registry: &str, e: OciDistributionError) -> Error {
    use OciDistributionError as E;
    let (kind, reason) = match &e {
        E::AuthenticationFailure(_) | E::UnauthorizedError { .. } => (
            RegistryFailure::Unauthorized,
            format!("registry {registry} refused the credentials ({e})"),
        ),
        E::ImageManifestNotFoundError(_) => (
            RegistryFailure::NotFound,
            format!("{reference} does not exist in {registry}"),
        ),
        E::ServerError { code, .. } if *code == 401 || *code == 403 => (
            RegistryFailure::Unauthorized,
            format!("registry {registry} refused the credentials ({e})"),
        ),
        E::ServerError { code, .. } if *code == 404 => (
            RegistryFailure::NotFound,
            format!("{reference} does not exist in {registry} ({e})"),
        ),
        E::ServerError { code, .. } if *code >= 500 || *code == 429 => {
            (RegistryFailure::Unavailable, e.to_string())
        }
        E::RegistryError { envelope, .. } => {
            use oci_client::errors::OciErrorCode as C;
            let codes: Vec<&C> = envelope.errors.iter().map(|x| &x.code).collect();
            if codes
                .iter()
                .any(|c| matches!(c, C::Unauthorized | C::Denied))
            {
                (
                    RegistryFailure::Unauthorized,
                    format!("registry {registry} refused the credentials ({e})"),
                )
            } else if codes.iter().any(|c| {
                matches!(
                    c,
                    C::ManifestUnknown | C::NameUnknown | C::NotFound | C::BlobUnknown
                )
            }) {
                (
                    RegistryFailure::NotFound,
                    format!("{reference} does not exist in {registry} ({e})"),
                )
            } else if codes.iter().any(|c| matches!(c, C::Toomanyrequests)) {
                (RegistryFailure::Unavailable, e.to_string())
            } else {
                (RegistryFailure::Invalid, e.to_string())
            }
        }
        E::RequestError(_) | E::IoError(_) => {
            let chain = error_chain(&e);
            if chain.contains("certificate") {
                (
                    RegistryFailure::Untrusted,
                    format!(
                        "the TLS certificate of {registry} is not trusted (configure [registry] ca_file, or list it as insecure for plain HTTP): {chain}"
                    ),
                )
            } else {
                (
                    RegistryFailure::Unavailable,
                    format!("talking to {registry}: {chain}"),
                )
            }
        }
        E::DigestError(_) => (RegistryFailure::Corrupt, e.to_string()),
        _ => (RegistryFailure::Invalid, e.to_string()),
    };
    failure(reference, kind, reason)
}

impl Registry {
    pub fn new(config: RegistryConfig) -> Result<Self> {
        let mut extra_roots = Vec::new();
        if let Some(path) = &config.ca_file {
            extra_roots.push(std::fs::read(path).map_err(Error::io("reading CA file", path))?);
        }
        Ok(Self {
            config,
            extra_roots,
            http: std::sync::OnceLock::new(),
        })
    }

    /// A client for one pull or push. oci-client remembers the first
    /// credentials it sees per registry, so sharing one client would let a
    /// pull ride on another pull's credentials (or be refused for them).
    fn client(&self) -> Client {
        Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(self.config.insecure.clone()),
            extra_root_certificates: self
                .extra_roots
                .iter()
                .map(|pem| oci_client::client::Certificate {
                    encoding: oci_client::client::CertificateEncoding::Pem,
                    data: pem.clone(),
                })
                .collect(),
            platform_resolver: None,
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(60)),
            user_agent: concat!("wasmlet/", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        })
    }

    /// A plain HTTP client for the calls oci-client does not make the way
    /// wasmlet needs (a bounded manifest read, the identity-token flow),
    /// trusting what oci-client's does; made once (it holds a connection
    /// pool and the parsed roots), then shared.
    fn http(&self) -> Result<reqwest::Client> {
        if let Some(http) = self.http.get() {
            return Ok(http.clone());
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .user_agent(concat!("wasmlet/", env!("CARGO_PKG_VERSION")));
        for pem in &self.extra_roots {
            let cert = reqwest::Certificate::from_pem(pem)
                .map_err(|e| Error::InvalidArgument(format!("[registry] ca_file: {e}")))?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder
            .build()
            .map_err(|e| Error::Internal(format!("HTTP client: {e}")))?;
        Ok(self.http.get_or_init(|| http).clone())
    }

    /// `http` for the registries listed as insecure, else `https`.
    fn scheme(&self, registry: &str) -> &'static str {
        if self.config.insecure.iter().any(|r| r == registry) {
            "http"
        } else {
            "https"
        }
    }

    fn reference(name: &ImageName, original: &str) -> Result<Reference> {
        let text = match (&name.digest, &name.tag) {
            (Some(d), _) => format!("{}@{d}", name.repository),
            (None, Some(t)) => format!("{}:{t}", name.repository),
            (None, None) => name.repository.clone(),
        };
        text.parse::<Reference>()
            .map_err(|e| Error::InvalidArgument(format!("image reference {original:?}: {e}")))
    }

    /// Runs `op` until it succeeds, fails for good, or attempts run out.
    async fn retry<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut delay = Duration::from_millis(200);
        let mut attempt = 1;
        loop {
            match op().await {
                Err(Error::Registry {
                    kind,
                    reason,
                    reference,
                }) if kind.is_transient() && attempt < self.config.attempts => {
                    tracing::warn!(%reference, attempt, %reason, "{what} failed; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
                Err(Error::Registry {
                    kind,
                    reason,
                    reference,
                }) if kind.is_transient() => {
                    return Err(Error::Registry {
                        reference,
                        kind,
                        reason: format!("{reason} (gave up after {attempt} attempts)"),
                    });
                }
                other => return other,
            }
        }
    }
}
