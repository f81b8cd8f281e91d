//! Wire types spoken by wasmlet.
//!
//! This crate owns the wire: the CRI v1 messages, clients and servers are
//! generated here from the vendored `proto/runtime/v1/api.proto`
//! (k8s.io/cri-api v0.35.7, which has `UpdatePodSandboxResources`), so that
//! every other crate (the shim, the conformance harness) names one version
//! of them; wasmlet's own admin API ([`admin`], what CRI has no words for) is
//! generated here from `proto/wasmlet/admin/v1/admin.proto`; and
//! [`connect_unix`] opens the client side of a CRI unix socket, so every
//! client dials the same way. It must not know anything about Wasm or about
//! the agent.

use std::path::Path;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Error, Uri};

/// CRI v1 (`runtime.v1`): messages, the runtime and image services'
/// clients and servers.
pub mod cri {
    #![allow(clippy::all)]
    tonic::include_proto!("runtime.v1");
}

/// wasmlet's admin API (`wasmlet.admin.v1`), served beside CRI on the same
/// socket: image inspection, precompiling, the Wasm side of running guests.
pub mod admin {
    #![allow(clippy::all)]
    tonic::include_proto!("wasmlet.admin.v1");
}

/// The CRI API version every wasmlet endpoint answers with.
pub const CRI_API_VERSION: &str = "v1";

/// The placeholder URI of a unix-socket channel. gRPC needs an `http` URI,
/// but it is ignored: every connection goes to the socket.
const UNIX_URI: &str = "http://[::]";

/// Connects a gRPC channel to the CRI endpoint listening on the unix socket
/// at `path`, with tonic's default settings.
///
/// The connection is made now: an error means nothing accepted a
/// connection on `path` (it does not say whether the endpoint speaks CRI;
/// ask it `Version` for that). The channel reconnects to the same path if
/// the connection drops.
pub async fn connect_unix(path: impl AsRef<Path>) -> Result<Channel, Error> {
    connect_unix_with(Endpoint::from_static(UNIX_URI), path).await
}

/// Like [`connect_unix`], with the timeouts and limits set on `endpoint`
/// (its URI is ignored).
pub async fn connect_unix_with(
    endpoint: Endpoint,
    path: impl AsRef<Path>,
) -> Result<Channel, Error> {
    let path = path.as_ref().to_owned();
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
}

/// An endpoint with the placeholder URI used for unix sockets, to set
/// timeouts on before [`connect_unix_with`].
pub fn unix_endpoint() -> Endpoint {
    Endpoint::from_static(UNIX_URI)
}

/// Like [`connect_unix_with`], but connects on first use instead of now,
/// and again on the next call after the endpoint went away: for a
/// downstream runtime that may be down when the channel is made.
pub fn connect_unix_lazy(endpoint: Endpoint, path: impl AsRef<Path>) -> Channel {
    let path = path.as_ref().to_owned();
    endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move {
            let stream = tokio::net::UnixStream::connect(path).await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    }))
}
