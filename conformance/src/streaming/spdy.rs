//! The SPDY/3.1 connection: the HTTP upgrade, opening streams and the
//! reader and writer tasks that route frames to them.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{mpsc, oneshot, watch};

use super::connection::{Connection, HttpTarget, LinkState, Outbound, bounded, queue};
use super::spdy_frame::{
    Frame, HeaderCompressor, HeaderDecompressor, Headers, RST_REFUSED_STREAM, decode_frame,
    encode_frame, frame_payload_len,
};
use super::{CONNECT_TIMEOUT, ERROR_BODY_TIMEOUT, STREAM_REPLY_TIMEOUT, StreamError};

/// A SPDY/3.1 connection after the upgrade.
#[derive(Debug)]
pub(super) struct SpdyConn {
    pub(super) conn: Arc<Connection>,
    frames: mpsc::UnboundedSender<Frame>,
    streams: Arc<Mutex<SpdyStreams>>,
}

/// The client-opened streams, shared by the opener and the reader task.
#[derive(Debug)]
struct SpdyStreams {
    /// The next client stream id: odd, increasing from 1.
    next_id: u32,
    slots: HashMap<u32, StreamSlot>,
    closed: bool,
}

#[derive(Debug)]
struct StreamSlot {
    /// Answered on SYN_REPLY (`Ok`) or RST_STREAM (`Err(status)`).
    reply: Option<oneshot::Sender<Result<(), u32>>>,
    /// Where the server's DATA goes. The slot is dropped on FIN or
    /// RST_STREAM, which ends the input.
    input: Option<mpsc::UnboundedSender<Bytes>>,
}

impl SpdyConn {
    pub(super) async fn connect(url: &str, protocols: &[&str]) -> Result<SpdyConn, StreamError> {
        let waiting_for = format!("the SPDY upgrade of {url}");
        let (tcp, leftover, protocol) =
            bounded(CONNECT_TIMEOUT, waiting_for, spdy_upgrade(url, protocols)).await??;
        let (read_half, write_half) = tcp.into_split();
        let (frames, outgoing) = mpsc::unbounded_channel();
        let streams = Arc::new(Mutex::new(SpdyStreams {
            next_id: 1,
            slots: HashMap::new(),
            closed: false,
        }));
        let (state_tx, state) = watch::channel(LinkState::Open);
        // Bytes the server sent right after its 101 are the first frames.
        let input = AsyncReadExt::chain(io::Cursor::new(leftover), read_half);
        let reader = tokio::spawn(spdy_reader(
            input,
            streams.clone(),
            frames.clone(),
            state_tx,
        ));
        let writer = tokio::spawn(spdy_writer(write_half, outgoing));
        let conn = Arc::new(Connection {
            protocol,
            state,
            tasks: vec![reader, writer],
        });
        Ok(SpdyConn {
            conn,
            frames,
            streams,
        })
    }

    /// Sends SYN_STREAM with `headers` and waits for the server's SYN_REPLY.
    /// Returns the stream id and the stream's input.
    pub(super) async fn open_stream(
        &self,
        headers: Headers,
        label: &str,
    ) -> Result<(u32, mpsc::UnboundedReceiver<Bytes>), StreamError> {
        let (reply_tx, reply) = oneshot::channel();
        let (input_tx, input) = mpsc::unbounded_channel();
        let stream_id = {
            // Held while queueing so that ids reach the wire in order.
            let mut streams = self.streams.lock().expect("stream table poisoned");
            if streams.closed {
                return Err(StreamError::Closed {
                    during: "opening a stream",
                });
            }
            let stream_id = streams.next_id;
            streams.next_id += 2;
            let slot = StreamSlot {
                reply: Some(reply_tx),
                input: Some(input_tx),
            };
            streams.slots.insert(stream_id, slot);
            queue(
                &self.frames,
                Frame::SynStream {
                    stream_id,
                    fin: false,
                    headers,
                },
                "opening a stream",
            )?;
            stream_id
        };
        let waiting_for = format!("SYN_REPLY to the {label} stream");
        match bounded(STREAM_REPLY_TIMEOUT, waiting_for, reply).await? {
            Ok(Ok(())) => Ok((stream_id, input)),
            Ok(Err(status)) => Err(StreamError::StreamReset {
                stream: label.to_owned(),
                status,
            }),
            Err(_) => Err(StreamError::Closed {
                during: "waiting for SYN_REPLY",
            }),
        }
    }

    pub(super) fn outbound(&self, stream_id: u32) -> Outbound {
        Outbound::Spdy {
            frames: self.frames.clone(),
            stream_id,
        }
    }
}

/// Sends the upgrade request; returns the connection, any bytes read past
/// the 101 response, and the chosen protocol.
async fn spdy_upgrade(
    url: &str,
    protocols: &[&str],
) -> Result<(TcpStream, Vec<u8>, String), StreamError> {
    let target = HttpTarget::parse(url)?;
    let mut tcp =
        TcpStream::connect(&target.addr)
            .await
            .map_err(|source| StreamError::Connect {
                addr: target.addr.clone(),
                source,
            })?;
    let mut request = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: wasmlet-conformance\r\nContent-Length: 0\r\n\
         Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n",
        target.path, target.host
    );
    for protocol in protocols {
        let _ = write!(request, "X-Stream-Protocol-Version: {protocol}\r\n");
    }
    request.push_str("\r\n");
    tcp.write_all(request.as_bytes())
        .await
        .map_err(|source| StreamError::Io {
            action: "sending the upgrade request",
            source,
        })?;

    let (head, mut leftover) = read_response_head(&mut tcp).await?;
    if head.code != 101 {
        let body = read_error_body(&mut tcp, &mut leftover, head.header("content-length")).await;
        return Err(StreamError::HttpStatus {
            code: head.code,
            body,
        });
    }
    let upgrade = |reason: String| StreamError::Upgrade { reason };
    let has = |name: &str, token: &str| {
        head.headers
            .iter()
            .filter(|(n, _)| n == name)
            .any(|(_, v)| {
                v.split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
    };
    if !has("connection", "upgrade") || !has("upgrade", "spdy/3.1") {
        return Err(upgrade(
            "the 101 response lacks Connection: Upgrade / Upgrade: SPDY/3.1".into(),
        ));
    }
    let chosen = head.header("x-stream-protocol-version").unwrap_or_default();
    if !protocols.contains(&chosen) {
        return Err(upgrade(format!(
            "the server chose protocol {chosen:?}, offered {protocols:?}"
        )));
    }
    Ok((tcp, leftover, chosen.to_owned()))
}

/// An HTTP response head: status code and lower-cased header names.
struct ResponseHead {
    code: u16,
    headers: Vec<(String, String)>,
}

impl ResponseHead {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

async fn read_response_head(tcp: &mut TcpStream) -> Result<(ResponseHead, Vec<u8>), StreamError> {
    let mut buffer = Vec::with_capacity(1024);
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        let parsed = response.parse(&buffer).map_err(|e| StreamError::Upgrade {
            reason: format!("unreadable HTTP response: {e}"),
        })?;
        if let httparse::Status::Complete(length) = parsed {
            let head = ResponseHead {
                code: response.code.unwrap_or_default(),
                headers: response
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect(),
            };
            return Ok((head, buffer.split_off(length)));
        }
        if buffer.len() > 64 * 1024 {
            return Err(StreamError::Upgrade {
                reason: "HTTP response head over 64 KiB".into(),
            });
        }
        let read = tcp
            .read_buf(&mut buffer)
            .await
            .map_err(|source| StreamError::Io {
                action: "reading the upgrade response",
                source,
            })?;
        if read == 0 {
            return Err(StreamError::Closed {
                during: "reading the upgrade response",
            });
        }
    }
}

/// The body of a refused upgrade, as far as it arrives in a short while.
async fn read_error_body(
    tcp: &mut TcpStream,
    body: &mut Vec<u8>,
    content_length: Option<&str>,
) -> String {
    let wanted = content_length.and_then(|length| length.trim().parse::<usize>().ok());
    let read = async {
        while wanted.is_none_or(|wanted| body.len() < wanted) {
            match tcp.read_buf(body).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    };
    let _ = tokio::time::timeout(ERROR_BODY_TIMEOUT, read).await;
    if let Some(wanted) = wanted {
        body.truncate(wanted);
    }
    String::from_utf8_lossy(body).trim_end().to_owned()
}

/// Serialises frames onto the connection, compressing header blocks with
/// the connection's one compression context.
async fn spdy_writer(mut sink: OwnedWriteHalf, mut frames: mpsc::UnboundedReceiver<Frame>) {
    let mut compressor = HeaderCompressor::new();
    while let Some(frame) = frames.recv().await {
        if sink
            .write_all(&encode_frame(&frame, &mut compressor))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Reads frames until the connection ends and routes them to the streams.
async fn spdy_reader(
    mut input: impl AsyncRead + Unpin,
    streams: Arc<Mutex<SpdyStreams>>,
    frames: mpsc::UnboundedSender<Frame>,
    state: watch::Sender<LinkState>,
) {
    let mut decompressor = HeaderDecompressor::new();
    let end = loop {
        let mut head = [0u8; 8];
        if input.read_exact(&mut head).await.is_err() {
            break LinkState::Closed;
        }
        let mut payload = vec![0; frame_payload_len(&head)];
        if input.read_exact(&mut payload).await.is_err() {
            break LinkState::Closed;
        }
        match decode_frame(&head, &payload, &mut decompressor) {
            Ok(frame) => dispatch_frame(frame, &streams, &frames),
            Err(reason) => break LinkState::Failed(reason),
        }
    };
    {
        let mut streams = streams.lock().expect("stream table poisoned");
        streams.closed = true;
        // Dropping the slots ends every stream's input and pending open.
        streams.slots.clear();
    }
    let _ = state.send(end);
}

/// What the reader does with one frame from the server.
fn dispatch_frame(
    frame: Frame,
    streams: &Mutex<SpdyStreams>,
    frames: &mpsc::UnboundedSender<Frame>,
) {
    let mut streams = streams.lock().expect("stream table poisoned");
    match frame {
        Frame::SynReply { stream_id, fin, .. } => {
            let reply = streams
                .slots
                .get_mut(&stream_id)
                .and_then(|slot| slot.reply.take());
            if let Some(reply) = reply {
                let _ = reply.send(Ok(()));
            }
            if fin {
                streams.slots.remove(&stream_id);
            }
        }
        Frame::Data {
            stream_id,
            fin,
            data,
        } => {
            let input = streams
                .slots
                .get(&stream_id)
                .and_then(|slot| slot.input.as_ref());
            if let (Some(input), false) = (input, data.is_empty()) {
                let _ = input.send(data);
            }
            // The server is done with the stream: dropping its slot ends the input.
            if fin {
                streams.slots.remove(&stream_id);
            }
        }
        Frame::Headers {
            stream_id,
            fin: true,
            ..
        } => {
            streams.slots.remove(&stream_id);
        }
        Frame::RstStream { stream_id, status } => {
            let reply = streams.slots.remove(&stream_id).and_then(|slot| slot.reply);
            if let Some(reply) = reply {
                let _ = reply.send(Err(status));
            }
        }
        // Pings the server starts have even ids; answer them by echoing.
        Frame::Ping { id } if id % 2 == 0 => {
            let _ = frames.send(Frame::Ping { id });
        }
        // The Kubernetes protocols never have the server open streams.
        Frame::SynStream { stream_id, .. } => {
            let _ = frames.send(Frame::RstStream {
                stream_id,
                status: RST_REFUSED_STREAM,
            });
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_server_pings_are_echoed_and_replies_routed() {
        let streams = Mutex::new(SpdyStreams {
            next_id: 3,
            slots: HashMap::new(),
            closed: false,
        });
        let (frames, mut sent) = mpsc::unbounded_channel();
        dispatch_frame(Frame::Ping { id: 2 }, &streams, &frames);
        assert_eq!(sent.try_recv().unwrap(), Frame::Ping { id: 2 });
        // An odd id would answer a ping of ours; it is not echoed back.
        dispatch_frame(Frame::Ping { id: 1 }, &streams, &frames);
        assert!(sent.try_recv().is_err());

        let (reply_tx, mut reply) = oneshot::channel();
        let (input_tx, mut input) = mpsc::unbounded_channel();
        let slot = StreamSlot {
            reply: Some(reply_tx),
            input: Some(input_tx),
        };
        streams.lock().unwrap().slots.insert(1, slot);
        dispatch_frame(
            Frame::SynReply {
                stream_id: 1,
                fin: false,
                headers: Vec::new(),
            },
            &streams,
            &frames,
        );
        assert_eq!(reply.try_recv().unwrap(), Ok(()));
        let data = |fin, data: &'static [u8]| Frame::Data {
            stream_id: 1,
            fin,
            data: Bytes::from_static(data),
        };
        dispatch_frame(data(false, b"out"), &streams, &frames);
        dispatch_frame(data(true, b""), &streams, &frames);
        assert_eq!(input.try_recv().unwrap(), Bytes::from_static(b"out"));
        assert_eq!(
            input.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        );

        let refused = Frame::SynStream {
            stream_id: 2,
            fin: false,
            headers: Vec::new(),
        };
        dispatch_frame(refused, &streams, &frames);
        assert_eq!(
            sent.try_recv().unwrap(),
            Frame::RstStream {
                stream_id: 2,
                status: RST_REFUSED_STREAM
            }
        );
    }
}
