//! Port forwarding: a [`PortForward`] connection and the [`ForwardedStream`]
//! each `open` gives, over either transport.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

use super::connection::{Connection, Outbound, bounded, header};
use super::remote_command::recv;
use super::spdy::SpdyConn;
use super::websocket::WsConn;
use super::{CONNECT_TIMEOUT, PORT_FORWARD_SPDY, REMOTE_COMMAND_V4, StreamError, Transport};

/// A port-forward connection, as `kubectl port-forward` holds it.
#[derive(Debug)]
pub struct PortForward {
    inner: PortForwardInner,
}

#[derive(Debug)]
enum PortForwardInner {
    Spdy {
        spdy: SpdyConn,
        next_request_id: u32,
    },
    WebSocket {
        ports: Vec<u16>,
        /// The stream pair of each port not yet opened.
        pairs: HashMap<u16, ForwardedStream>,
    },
}

impl PortForward {
    /// Upgrades `url`. On WebSocket `ports` become the URL's `port` query
    /// parameters and fix the channels; on SPDY they are not sent.
    pub async fn connect(
        url: &str,
        transport: Transport,
        ports: &[u16],
    ) -> Result<PortForward, StreamError> {
        let inner = match transport {
            Transport::Spdy => {
                let spdy = SpdyConn::connect(url, &[PORT_FORWARD_SPDY]).await?;
                PortForwardInner::Spdy {
                    spdy,
                    next_request_id: 0,
                }
            }
            Transport::WebSocket => {
                let query: Vec<String> = ports.iter().map(|port| format!("port={port}")).collect();
                let channels = 0..=(ports.len() * 2).saturating_sub(1) as u8;
                let mut ws =
                    WsConn::connect(url, &[REMOTE_COMMAND_V4], &query.join("&"), channels).await?;
                let mut pairs = HashMap::new();
                for (i, &port) in ports.iter().enumerate() {
                    let data = (i * 2) as u8;
                    let stream = ForwardedStream {
                        port,
                        data_in: ws.inbound.remove(&data).expect("channel was registered"),
                        unread: Bytes::new(),
                        data_out: ws.outbound(data),
                        error_in: ws.inbound.remove(&(data + 1)),
                        error_seen: Vec::new(),
                        protocol: ws.conn.protocol.clone(),
                        shut_down: false,
                        _conn: ws.conn.clone(),
                    };
                    pairs.insert(port, stream);
                }
                PortForwardInner::WebSocket {
                    ports: ports.to_vec(),
                    pairs,
                }
            }
        };
        Ok(PortForward { inner })
    }

    /// Opens a connection to `port` in the pod. On SPDY each call is a new
    /// request (error stream, then data stream); on WebSocket it is the one
    /// channel pair of `port`, whose port-number prefixes are checked here.
    pub async fn open(&mut self, port: u16) -> Result<ForwardedStream, StreamError> {
        match &mut self.inner {
            PortForwardInner::Spdy {
                spdy,
                next_request_id,
            } => {
                let request_id = next_request_id.to_string();
                *next_request_id += 1;
                let headers = |kind: &str| {
                    vec![
                        header("streamtype", kind),
                        header("port", &port.to_string()),
                        header("requestid", &request_id),
                    ]
                };
                let (error_id, error_in) = spdy.open_stream(headers("error"), "error").await?;
                // Like kubectl: nothing is ever written to the error stream.
                spdy.outbound(error_id).close(&spdy.conn.protocol)?;
                let (data_id, data_in) = spdy.open_stream(headers("data"), "data").await?;
                Ok(ForwardedStream {
                    port,
                    data_in,
                    unread: Bytes::new(),
                    data_out: spdy.outbound(data_id),
                    error_in: Some(error_in),
                    error_seen: Vec::new(),
                    protocol: spdy.conn.protocol.clone(),
                    shut_down: false,
                    _conn: spdy.conn.clone(),
                })
            }
            PortForwardInner::WebSocket { ports, pairs } => {
                let mut stream = pairs.remove(&port).ok_or(match ports.contains(&port) {
                    true => StreamError::PortAlreadyOpen { port },
                    false => StreamError::UnknownPort { port },
                })?;
                let waiting_for = format!("the port prefix of the channels of port {port}");
                let prefixes = async {
                    let (got, rest) = read_port_prefix(&mut stream.data_in).await?;
                    stream.unread = rest;
                    let (got_error, rest) = match stream.error_in.as_mut() {
                        Some(error_in) => read_port_prefix(error_in).await?,
                        None => (port, Bytes::new()),
                    };
                    stream.error_seen.extend_from_slice(&rest);
                    Ok::<_, StreamError>([got, got_error])
                };
                let got = bounded(CONNECT_TIMEOUT, waiting_for, prefixes).await??;
                match got.into_iter().find(|&got| got != port) {
                    Some(got) => Err(StreamError::PortPrefix { port, got }),
                    None => Ok(stream),
                }
            }
        }
    }
}

/// Reads the 2-byte little-endian port number that starts a WebSocket
/// port-forward channel; returns it and whatever followed it.
async fn read_port_prefix(
    input: &mut mpsc::UnboundedReceiver<Bytes>,
) -> Result<(u16, Bytes), StreamError> {
    let mut buffered = Vec::new();
    while buffered.len() < 2 {
        let chunk = input.recv().await.ok_or_else(|| StreamError::Ended {
            waiting_for: "a port-forward channel's port prefix".into(),
        })?;
        buffered.extend_from_slice(&chunk);
    }
    let port = u16::from_le_bytes([buffered[0], buffered[1]]);
    Ok((port, Bytes::from(buffered).slice(2..)))
}

/// One forwarded connection to a port in the pod. Reading gives what the pod
/// sends (EOF when the server ends the data stream); writing sends to it;
/// `shutdown` half-closes (SPDY FIN; WebSocket v4 cannot, so it does nothing).
/// Reads wait as long as the pod is silent: bound them with a timeout.
#[derive(Debug)]
pub struct ForwardedStream {
    port: u16,
    data_in: mpsc::UnboundedReceiver<Bytes>,
    unread: Bytes,
    data_out: Outbound,
    error_in: Option<mpsc::UnboundedReceiver<Bytes>>,
    error_seen: Vec<u8>,
    protocol: String,
    shut_down: bool,
    _conn: Arc<Connection>,
}

impl ForwardedStream {
    /// The pod port this stream reaches.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Reads the error stream until the server ends it and returns its text,
    /// `None` if it was empty. The server ends it when forwarding ends (on
    /// WebSocket: when it closes the connection).
    pub async fn error(&mut self, timeout: Duration) -> Result<Option<String>, StreamError> {
        let read = async {
            while let Some(chunk) = recv(&mut self.error_in).await {
                self.error_seen.extend_from_slice(&chunk);
            }
        };
        let waiting_for = format!("the error stream of port {} to end", self.port);
        bounded(timeout, waiting_for, read).await?;
        Ok((!self.error_seen.is_empty())
            .then(|| String::from_utf8_lossy(&self.error_seen).into_owned()))
    }
}

impl AsyncRead for ForwardedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.unread.is_empty() {
            match ready!(this.data_in.poll_recv(cx)) {
                Some(chunk) => this.unread = chunk,
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = buf.remaining().min(this.unread.len());
        buf.put_slice(&this.unread[..n]);
        this.unread.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ForwardedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.shut_down {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let sent = self
            .data_out
            .write(buf)
            .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e));
        Poll::Ready(sent.map(|()| buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if std::mem::replace(&mut self.shut_down, true) {
            return Poll::Ready(Ok(()));
        }
        let closed = match self.data_out.close(&self.protocol) {
            Err(StreamError::Unsupported { .. }) => Ok(()),
            other => other.map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e)),
        };
        Poll::Ready(closed)
    }
}
