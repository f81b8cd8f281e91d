//! A Kubernetes streaming client: what `kubectl exec -it`, `kubectl attach`
//! and `kubectl port-forward` do against the URL a CRI `Exec`, `Attach` or
//! `PortForward` call returns.
//!
//! Two transports are spoken, both written against the wire format of the
//! real peers (Go's spdystream and the kubelet's wsstream):
//!
//! - SPDY/3.1 ([`Transport::Spdy`]): an HTTP/1.1 `POST` upgraded with
//!   `Upgrade: SPDY/3.1`, then SPDY version 3 framing done here, one stream per
//!   Kubernetes stream type (`error`, `stdin`, `stdout`, `stderr`, `resize`;
//!   `error` and `data` per port-forward request).
//! - WebSocket ([`Transport::WebSocket`]): binary messages whose first byte is
//!   the channel (`v4.channel.k8s.io`, `v5.channel.k8s.io`).
//!
//! Each connection has one reader task that sorts incoming frames or messages
//! into per-stream channels and one writer task that serialises outgoing ones;
//! both end when the handle that owns the connection is dropped. Every wait is
//! bounded by a timeout. The module knows nothing of the runtime behind the
//! URL.

mod connection;
mod port_forward;
mod remote_command;
mod spdy;
mod spdy_frame;
#[cfg(test)]
mod tests;
mod websocket;

use std::io;
use std::time::Duration;

use serde_json::Value;
use tokio_tungstenite::tungstenite;

pub use port_forward::{ForwardedStream, PortForward};
pub use remote_command::RemoteCommand;

/// How long connecting and upgrading the HTTP connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server may take to answer a new SPDY stream with SYN_REPLY
/// (the Kubernetes client waits 30 s; tests want to fail sooner).
pub const STREAM_REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// The remote command protocol offered on SPDY and WebSocket.
pub const REMOTE_COMMAND_V4: &str = "v4.channel.k8s.io";
/// The WebSocket remote command protocol that can close single channels.
pub const REMOTE_COMMAND_V5: &str = "v5.channel.k8s.io";
/// The SPDY port-forward protocol.
pub const PORT_FORWARD_SPDY: &str = "portforward.k8s.io";

/// The largest payload put in one SPDY DATA frame or WebSocket message.
const MAX_CHUNK: usize = 32 * 1024;
/// How long the body of a refused upgrade is read for.
const ERROR_BODY_TIMEOUT: Duration = Duration::from_secs(2);

/// How to reach the streaming server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// SPDY/3.1, what the kubelet and the API server speak to each other.
    Spdy,
    /// WebSocket with Kubernetes channel framing.
    WebSocket,
}

/// Which streams an exec or attach session has; must match the CRI request
/// the URL was obtained with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamOptions {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

/// Everything that can go wrong while streaming.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The URL is not a plain `http://host:port/path` URL.
    #[error("streaming URL {url:?} is not usable: {reason}")]
    InvalidUrl { url: String, reason: &'static str },

    /// The TCP connection could not be made.
    #[error("could not connect to the streaming server at {addr}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },

    /// The server answered the upgrade request with a non-101 status.
    #[error("the streaming server answered HTTP {code} instead of switching protocols: {body}")]
    HttpStatus { code: u16, body: String },

    /// The server switched protocols but not as the Kubernetes client expects.
    #[error("bad protocol upgrade: {reason}")]
    Upgrade { reason: String },

    /// The WebSocket handshake or connection failed.
    #[error("WebSocket connection failed")]
    WebSocket(#[source] Box<tungstenite::Error>),

    /// Reading or writing the upgraded connection failed.
    #[error("{action} failed")]
    Io {
        action: &'static str,
        #[source]
        source: io::Error,
    },

    /// The server sent something that is not valid framing.
    #[error("protocol error from the streaming server: {0}")]
    Protocol(String),

    /// The server reset a stream instead of accepting it.
    #[error("the server reset the {stream} stream (RST_STREAM status {status})")]
    StreamReset { stream: String, status: u32 },

    /// The connection ended while something still needed it.
    #[error("the streaming connection is closed ({during})")]
    Closed { during: &'static str },

    /// A bounded wait ran out.
    #[error("timed out after {timeout:?} waiting for {waiting_for}")]
    Timeout {
        waiting_for: String,
        timeout: Duration,
    },

    /// A stream ended before what was waited for arrived.
    #[error("the stream ended while waiting for {waiting_for}")]
    Ended { waiting_for: String },

    /// The session was not opened with this stream.
    #[error("the session has no {stream} stream")]
    NotRequested { stream: &'static str },

    /// The negotiated protocol cannot do this.
    #[error("{what} is not possible with protocol {protocol}")]
    Unsupported {
        what: &'static str,
        protocol: String,
    },

    /// The connection ended without a status on the error stream.
    #[error(
        "the server ended the session without a status (stdout: {stdout:?}, stderr: {stderr:?})"
    )]
    MissingStatus { stdout: String, stderr: String },

    /// The error stream held something other than a `metav1.Status`.
    #[error("the error stream holds no valid status ({reason}): {text:?}")]
    BadStatus { text: String, reason: String },

    /// A port-forward `open` named a port the connection does not forward.
    #[error("port {port} is not forwarded by this connection")]
    UnknownPort { port: u16 },

    /// On WebSocket each port has one stream pair, and it was already taken.
    #[error("the WebSocket stream pair of port {port} is already open")]
    PortAlreadyOpen { port: u16 },

    /// A WebSocket port-forward channel did not start with its port number.
    #[error("channel of port {port} started with port {got}")]
    PortPrefix { port: u16, got: u16 },
}

impl StreamError {
    /// The HTTP status of a refused upgrade, if that is what this is.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            StreamError::HttpStatus { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// How an exec or attach session ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// 0 on `Success`, the `ExitCode` cause on `NonZeroExitCode`, otherwise
    /// `None`.
    pub exit_code: Option<i32>,
    /// The status message; empty on success.
    pub message: String,
    /// The `metav1.Status` as sent.
    pub status: Value,
}

impl Outcome {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}
