//! What both transports share: the upgraded [`Connection`] and its state,
//! where a stream's writes go, bounded waits and the streaming URL.

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use super::spdy_frame::Frame;
use super::{MAX_CHUNK, REMOTE_COMMAND_V5, StreamError};

/// One upgraded connection: the tasks serving it, aborted when the last
/// handle goes, and what became of it.
#[derive(Debug)]
pub(super) struct Connection {
    pub(super) protocol: String,
    pub(super) state: watch::Receiver<LinkState>,
    pub(super) tasks: Vec<JoinHandle<()>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum LinkState {
    Open,
    /// The server closed the connection (or it broke).
    Closed,
    /// The server sent something unreadable; the connection was dropped.
    Failed(String),
}

impl Connection {
    pub(super) fn state(&self) -> LinkState {
        self.state.borrow().clone()
    }

    /// Returns once the connection has ended.
    pub(super) async fn ended(&self) {
        let mut state = self.state.clone();
        // An error means the reader task is gone, which also means ended.
        let _ = state.wait_for(|state| *state != LinkState::Open).await;
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Where writes for one stream or channel go.
#[derive(Debug, Clone)]
pub(super) enum Outbound {
    Spdy {
        frames: mpsc::UnboundedSender<Frame>,
        stream_id: u32,
    },
    WebSocket {
        messages: mpsc::UnboundedSender<Message>,
        channel: u8,
    },
}

impl Outbound {
    /// Queues `data` for the writer task, in chunks.
    pub(super) fn write(&self, data: &[u8]) -> Result<(), StreamError> {
        for chunk in data.chunks(MAX_CHUNK) {
            match self {
                Outbound::Spdy { frames, stream_id } => {
                    let data = Bytes::copy_from_slice(chunk);
                    queue(
                        frames,
                        Frame::Data {
                            stream_id: *stream_id,
                            fin: false,
                            data,
                        },
                        "writing",
                    )?;
                }
                Outbound::WebSocket { messages, channel } => {
                    let message = [&[*channel], chunk].concat();
                    queue(messages, Message::Binary(message.into()), "writing")?;
                }
            }
        }
        Ok(())
    }

    /// Half-closes the stream: an empty DATA frame with FIN on SPDY, the
    /// `[255, channel]` close message on WebSocket v5.
    pub(super) fn close(&self, protocol: &str) -> Result<(), StreamError> {
        match self {
            Outbound::Spdy { frames, stream_id } => {
                let fin = Frame::Data {
                    stream_id: *stream_id,
                    fin: true,
                    data: Bytes::new(),
                };
                queue(frames, fin, "closing a stream")
            }
            Outbound::WebSocket { messages, channel } if protocol == REMOTE_COMMAND_V5 => queue(
                messages,
                Message::Binary(vec![255, *channel].into()),
                "closing a stream",
            ),
            Outbound::WebSocket { .. } => Err(StreamError::Unsupported {
                what: "closing one channel",
                protocol: protocol.to_owned(),
            }),
        }
    }
}

/// Hands `item` to a connection's writer task.
pub(super) fn queue<T>(
    writer: &mpsc::UnboundedSender<T>,
    item: T,
    during: &'static str,
) -> Result<(), StreamError> {
    writer
        .send(item)
        .map_err(|_| StreamError::Closed { during })
}

/// Runs `future` for at most `timeout`.
pub(super) async fn bounded<T>(
    timeout: Duration,
    waiting_for: String,
    future: impl Future<Output = T>,
) -> Result<T, StreamError> {
    tokio::time::timeout(timeout, future)
        .await
        .map_err(|_| StreamError::Timeout {
            waiting_for,
            timeout,
        })
}

/// The parts of an `http://` streaming URL.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct HttpTarget {
    /// `host:port` as written (the Host header).
    pub(super) host: String,
    /// What to connect to: `host` with port 80 added if it had none.
    pub(super) addr: String,
    /// Path and query, starting with `/`.
    pub(super) path: String,
}

impl HttpTarget {
    pub(super) fn parse(url: &str) -> Result<HttpTarget, StreamError> {
        let invalid = |reason| StreamError::InvalidUrl {
            url: url.to_owned(),
            reason,
        };
        let rest = url
            .strip_prefix("http://")
            .ok_or(invalid("only http:// URLs are supported"))?;
        let (host, path) = match rest.find(['/', '?']) {
            Some(at) => rest.split_at(at),
            None => (rest, "/"),
        };
        if host.is_empty() {
            return Err(invalid("it has no host"));
        }
        let has_port = match host.rfind(']') {
            Some(bracket) => host[bracket..].contains(':'),
            None => host.contains(':'),
        };
        let addr = if has_port {
            host.to_owned()
        } else {
            format!("{host}:80")
        };
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_owned()
        };
        Ok(HttpTarget {
            host: host.to_owned(),
            addr,
            path,
        })
    }
}

pub(super) fn header(name: &str, value: &str) -> (String, String) {
    (name.to_owned(), value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_urls_parse() {
        let target = HttpTarget::parse("http://127.0.0.1:41234/exec/AbC").unwrap();
        let expected = HttpTarget {
            host: "127.0.0.1:41234".into(),
            addr: "127.0.0.1:41234".into(),
            path: "/exec/AbC".into(),
        };
        assert_eq!(target, expected);
        let target = HttpTarget::parse("http://localhost?x=1").unwrap();
        assert_eq!(
            (target.addr.as_str(), target.path.as_str()),
            ("localhost:80", "/?x=1")
        );
        assert_eq!(
            HttpTarget::parse("http://[::1]/a").unwrap().addr,
            "[::1]:80"
        );
        assert_eq!(
            HttpTarget::parse("http://[::1]:9/a").unwrap().addr,
            "[::1]:9"
        );
        assert!(HttpTarget::parse("https://127.0.0.1/a").is_err());
    }
}
