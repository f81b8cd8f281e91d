//! The streaming server behind `Exec`, `Attach` and `PortForward`.
//!
//! Those CRI calls only return a URL with a one-time token; the kubelet
//! (or the API server through it) then connects there and upgrades the
//! HTTP connection to SPDY/3.1 or WebSocket, the two transports Kubernetes
//! streams over:
//!
//! - remote commands (exec, attach): subprotocols `v4.channel.k8s.io` and
//!   `v5.channel.k8s.io`, with stdin, stdout, stderr, a terminal's resize
//!   stream and an error stream carrying the final `metav1.Status`;
//! - port forwarding: `portforward.k8s.io` on SPDY, `v4.channel.k8s.io` on
//!   WebSocket, and SPDY tunnelled in WebSocket
//!   (`SPDY/3.1+portforward.k8s.io`, as kubectl ≥ 1.30 sends it).
//!
//! What runs is the agent's: a fresh Wasm instance (exec), the running
//! guest's stdio (attach), a TCP connection inside the pod's network
//! (port forward). This module only speaks the protocols.

mod session;
mod spdy;
mod websocket;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONNECTION, HeaderValue, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use wasmlet_agent::Agent;
use wasmlet_agent::model::ids::{ContainerId, SandboxId};

/// How long a URL handed out stays valid (the kubelet's default).
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(60);

/// How long a client may take to open the streams it asked for.
pub const DEFAULT_STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a connection may carry nothing either way before it is closed
/// (the kubelet's `--streaming-connection-idle-timeout` default).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(4 * 60 * 60);

/// URLs handed out but not used yet, at most; more requests are refused
/// until some are used or expire.
const MAX_PENDING: usize = 10_000;

const SPDY: &str = "SPDY/3.1";
const PROTOCOL_HEADER: &str = "X-Stream-Protocol-Version";
/// Remote-command subprotocols, most preferred first.
const COMMAND_PROTOCOLS: &[&str] = &["v5.channel.k8s.io", "v4.channel.k8s.io"];
const PORT_FORWARD_SPDY: &str = "portforward.k8s.io";
const PORT_FORWARD_TUNNEL: &str = "SPDY/3.1+portforward.k8s.io";
const PORT_FORWARD_CHANNELS: &str = "v4.channel.k8s.io";

/// Where and how the streaming server listens.
#[derive(Clone, Debug)]
pub struct StreamingConfig {
    /// Loopback by default: the kubelet on this node is the only client.
    pub address: SocketAddr,
    pub token_ttl: Duration,
    pub stream_creation_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Default for StreamingConfig {
    fn default() -> Self {
        Self {
            address: SocketAddr::from(([127, 0, 0, 1], 0)),
            token_ttl: DEFAULT_TOKEN_TTL,
            stream_creation_timeout: DEFAULT_STREAM_CREATION_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// A streaming request the CRI accepted, waiting for its client.
#[derive(Clone, Debug)]
pub enum Pending {
    Exec {
        container: ContainerId,
        cmd: Vec<String>,
        options: CommandOptions,
    },
    Attach {
        container: ContainerId,
        options: CommandOptions,
    },
    PortForward {
        sandbox: SandboxId,
        ports: Vec<u16>,
    },
}

impl Pending {
    fn path(&self) -> &'static str {
        match self {
            Pending::Exec { .. } => "exec",
            Pending::Attach { .. } => "attach",
            Pending::PortForward { .. } => "portforward",
        }
    }
}

/// Which standard streams a remote command connects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommandOptions {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

/// The running streaming server: mints URLs for the CRI service.
pub struct Streaming {
    base: String,
    tokens: Mutex<HashMap<String, (Instant, Pending)>>,
    config: StreamingConfig,
}

impl Streaming {
    /// Binds the server and serves it in the background, for `agent`.
    pub async fn start(config: StreamingConfig, agent: Agent) -> std::io::Result<Arc<Self>> {
        let listener = tokio::net::TcpListener::bind(config.address).await?;
        let local = listener.local_addr()?;
        // The kubelet on this node connects; an unspecified address is
        // reached on loopback.
        let host = if local.ip().is_unspecified() {
            match local {
                SocketAddr::V4(_) => "127.0.0.1".to_owned(),
                SocketAddr::V6(_) => "[::1]".to_owned(),
            }
        } else {
            match local {
                SocketAddr::V4(a) => a.ip().to_string(),
                SocketAddr::V6(a) => format!("[{}]", a.ip()),
            }
        };
        let server = Arc::new(Self {
            base: format!("http://{host}:{}", local.port()),
            tokens: Mutex::new(HashMap::new()),
            config,
        });
        tracing::info!(address = %local, "streaming server listening");
        let serving = server.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "streaming server: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let server = serving.clone();
                let agent = agent.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let server = server.clone();
                        let agent = agent.clone();
                        async move { Ok::<_, std::convert::Infallible>(server.handle(req, agent)) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .with_upgrades();
                    if let Err(error) = conn.await {
                        tracing::debug!(%peer, %error, "streaming connection ended");
                    }
                });
            }
        });
        Ok(server)
    }

    /// The URL the client of `request` connects to: valid once, until the
    /// token expires.
    pub fn url(&self, request: Pending) -> Result<String, String> {
        let now = Instant::now();
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        tokens.retain(|_, (expires, _)| *expires > now);
        if tokens.len() >= MAX_PENDING {
            return Err(format!(
                "{MAX_PENDING} streaming requests are waiting for their clients; try again later"
            ));
        }
        let token = hex::encode(rand::random::<[u8; 16]>());
        let url = format!("{}/{}/{token}", self.base, request.path());
        tokens.insert(token, (now + self.config.token_ttl, request));
        Ok(url)
    }

    /// Takes the request behind `token` (once).
    fn redeem(&self, kind: &str, token: &str) -> Option<Pending> {
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        match tokens.remove(token) {
            Some((expires, pending)) if expires > Instant::now() && pending.path() == kind => {
                Some(pending)
            }
            Some((expires, pending)) if expires > Instant::now() => {
                // Asked on the wrong path: the token stays for its own.
                tokens.insert(token.to_owned(), (expires, pending));
                None
            }
            _ => None,
        }
    }

    fn handle(self: Arc<Self>, mut req: Request<Incoming>, agent: Agent) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        let mut parts = path.trim_start_matches('/').splitn(2, '/');
        let (kind, token) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let Some(pending) = self.redeem(kind, token) else {
            return plain(
                StatusCode::NOT_FOUND,
                "unknown or expired streaming token (each URL works once, for a minute)",
            );
        };
        let query = req.uri().query().unwrap_or("").to_owned();
        let upgrade = header_text(&req, UPGRADE.as_str()).to_ascii_lowercase();
        let port_forward = matches!(pending, Pending::PortForward { .. });
        if upgrade.split(',').any(|u| u.trim() == "websocket") {
            let offered = header_list(&req, "Sec-WebSocket-Protocol");
            let ours: &[&str] = if port_forward {
                &[PORT_FORWARD_TUNNEL, PORT_FORWARD_CHANNELS]
            } else {
                COMMAND_PROTOCOLS
            };
            let Some(protocol) = ours.iter().find(|p| offered.iter().any(|o| o == *p)) else {
                return plain(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "no supported WebSocket subprotocol in {offered:?}; wasmlet speaks {ours:?}"
                    ),
                );
            };
            let Some(key) = req.headers().get("Sec-WebSocket-Key").cloned() else {
                return plain(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key");
            };
            let protocol = (*protocol).to_owned();
            let accept =
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            let on_upgrade = hyper::upgrade::on(&mut req);
            let server = self.clone();
            let response_protocol = protocol.clone();
            tokio::spawn(async move {
                match on_upgrade.await {
                    Ok(upgraded) => {
                        let io =
                            IdleLimited::new(TokioIo::new(upgraded), server.config.idle_timeout);
                        websocket::serve(server, agent, pending, &protocol, &query, io).await;
                    }
                    Err(error) => tracing::debug!(%error, "WebSocket upgrade failed"),
                }
            });
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let h = response.headers_mut();
            h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
            h.insert(UPGRADE, HeaderValue::from_static("websocket"));
            if let Ok(v) = HeaderValue::from_str(&accept) {
                h.insert("Sec-WebSocket-Accept", v);
            }
            if let Ok(v) = HeaderValue::from_str(&response_protocol) {
                h.insert("Sec-WebSocket-Protocol", v);
            }
            return response;
        }
        if upgrade
            .split(',')
            .any(|u| u.trim() == SPDY.to_ascii_lowercase())
        {
            let offered = header_list(&req, PROTOCOL_HEADER);
            let ours: &[&str] = if port_forward {
                &[PORT_FORWARD_SPDY]
            } else {
                COMMAND_PROTOCOLS
            };
            let Some(protocol) = offered.iter().find(|o| ours.contains(&o.as_str())).cloned()
            else {
                return plain(
                    StatusCode::FORBIDDEN,
                    &format!(
                        "no supported stream protocol in {offered:?}; wasmlet speaks {ours:?} over {SPDY}"
                    ),
                );
            };
            let on_upgrade = hyper::upgrade::on(&mut req);
            let server = self.clone();
            tokio::spawn(async move {
                match on_upgrade.await {
                    Ok(upgraded) => {
                        let io =
                            IdleLimited::new(TokioIo::new(upgraded), server.config.idle_timeout);
                        let (streams, out, writer) = spdy::serve(io);
                        session::run_spdy(server, agent, pending, streams, out, writer).await;
                    }
                    Err(error) => tracing::debug!(%error, "SPDY upgrade failed"),
                }
            });
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let h = response.headers_mut();
            h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
            h.insert(UPGRADE, HeaderValue::from_static(SPDY));
            if let Ok(v) = HeaderValue::from_str(&protocol) {
                h.insert(PROTOCOL_HEADER, v);
            }
            return response;
        }
        plain(
            StatusCode::BAD_REQUEST,
            "a streaming request must upgrade to SPDY/3.1 or websocket",
        )
    }
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{text}\n"))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn header_text(req: &Request<Incoming>, name: &str) -> String {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",")
}

/// A header's values, comma-separated or repeated, in order.
fn header_list(req: &Request<Incoming>, name: &str) -> Vec<String> {
    header_text(req, name)
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// What a session writes, whatever the transport: SPDY streams and
/// WebSocket channels are both numbered.
#[derive(Debug)]
enum Outgoing {
    /// SPDY: accept a stream the client opened.
    Reply(u32),
    Data(u32, Bytes),
    /// Half-close (SPDY FIN; WebSocket v5 close-channel).
    Close(u32),
    /// SPDY: refuse a stream.
    Reset(u32),
    /// SPDY: answer a ping.
    Ping(u32),
    /// End the connection after everything queued before.
    GoAway,
    /// The client's side ended: stop writing.
    ClientGone,
}

/// The queue into a connection's writer.
#[derive(Clone)]
struct Out(mpsc::Sender<Outgoing>);

impl Out {
    fn new(tx: mpsc::Sender<Outgoing>) -> Self {
        Self(tx)
    }

    async fn send(&self, item: Outgoing) {
        let _ = self.0.send(item).await;
    }

    fn sink(&self, id: u32) -> Sink {
        Sink {
            id,
            out: self.clone(),
        }
    }
}

/// One stream or channel the server writes.
#[derive(Clone)]
struct Sink {
    id: u32,
    out: Out,
}

impl Sink {
    /// False once the connection is gone.
    async fn write(&self, data: Bytes) -> bool {
        self.out.0.send(Outgoing::Data(self.id, data)).await.is_ok()
    }

    async fn close(&self) {
        self.out.send(Outgoing::Close(self.id)).await;
    }
}

/// An upgraded connection that ends once nothing crossed it, either way,
/// for `idle`: reads then see end-of-file (the client is gone, whatever
/// ran for it is ended) and writes fail.
struct IdleLimited<T> {
    io: T,
    idle: Duration,
    last: tokio::time::Instant,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    expired: bool,
}

impl<T> IdleLimited<T> {
    fn new(io: T, idle: Duration) -> Self {
        let now = tokio::time::Instant::now();
        Self {
            io,
            idle,
            last: now,
            timer: Box::pin(tokio::time::sleep_until(now + idle)),
            expired: false,
        }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for IdleLimited<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::future::Future;
        use std::task::Poll;
        let this = &mut *self;
        if this.expired {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        if let Poll::Ready(result) = std::pin::Pin::new(&mut this.io).poll_read(cx, buf) {
            if buf.filled().len() > before {
                this.last = tokio::time::Instant::now();
            }
            return Poll::Ready(result);
        }
        // Nothing to read: is the connection idle? (Writes move `last`.)
        loop {
            let deadline = this.last + this.idle;
            if this.timer.deadline() != deadline {
                this.timer.as_mut().reset(deadline);
            }
            match this.timer.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) if tokio::time::Instant::now() >= this.last + this.idle => {
                    tracing::info!(idle = ?this.idle, "streaming connection idle: closed");
                    this.expired = true;
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(()) => {}
            }
        }
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for IdleLimited<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.expired {
            return std::task::Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
        }
        let written = std::pin::Pin::new(&mut this.io).poll_write(cx, data);
        if let std::task::Poll::Ready(Ok(n)) = &written
            && *n > 0
        {
            this.last = tokio::time::Instant::now();
        }
        written
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn an_idle_connection_ends_and_traffic_either_way_keeps_it_open() {
        let idle = Duration::from_millis(300);
        let (client, server) = tokio::io::duplex(1024);
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let (mut read, mut write) = tokio::io::split(IdleLimited::new(server, idle));
        let started = tokio::time::Instant::now();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 16];
            loop {
                match read.read(&mut buf).await {
                    Ok(0) | Err(_) => return (got, started.elapsed()),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        client_write.write_all(b"in").await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        write.write_all(b"out").await.unwrap();
        let mut out = [0u8; 3];
        client_read.read_exact(&mut out).await.unwrap();
        let (got, ended) = reader.await.unwrap();
        assert_eq!(got, b"in");
        // Not before 300 ms after the last write (at 400 ms), whatever was
        // read before.
        assert!(ended >= Duration::from_millis(700), "{ended:?}");
        assert!(ended < Duration::from_secs(5), "{ended:?}");
        assert!(write.write_all(b"late").await.is_err());
    }
}
