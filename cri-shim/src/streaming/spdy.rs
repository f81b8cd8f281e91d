//! SPDY/3.1 as Kubernetes streams over it (Docker's spdystream, which the
//! kubelet and the API server use): framing, the zlib-compressed header
//! blocks, and a connection that hands out the streams the client opens.
//!
//! Only what a streaming server needs: the client opens every stream
//! (SYN_STREAM, answered with SYN_REPLY), both sides send DATA and
//! half-close with FIN, RST_STREAM drops a stream, PINGs are echoed. Like
//! spdystream, flow control (WINDOW_UPDATE) is read and ignored.

use std::collections::HashMap;
use std::sync::OnceLock;

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{Out, Outgoing};

const VERSION: u16 = 3;
const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const FLAG_FIN: u8 = 0x01;
/// RST_STREAM status CANCEL, for streams we stop early.
const CANCEL: u32 = 5;

/// The largest DATA frame sent; frames may carry up to 16 MiB, peers
/// buffer whole frames.
const MAX_DATA: usize = 32 * 1024;

/// The most a header block may inflate to: a zlib bomb is refused.
const MAX_HEADER_BLOCK: usize = 256 * 1024;

/// Chunks buffered per stream before the connection's reader waits.
const STREAM_BUFFER: usize = 64;

/// SPDY/3's zlib dictionary for header blocks (draft 3, section 2.6.10.1):
/// length-prefixed header names and values, then common fragments.
fn dictionary() -> &'static [u8] {
    static DICTIONARY: OnceLock<Vec<u8>> = OnceLock::new();
    DICTIONARY.get_or_init(|| {
        const WORDS: &[&str] = &[
            "options",
            "head",
            "post",
            "put",
            "delete",
            "trace",
            "accept",
            "accept-charset",
            "accept-encoding",
            "accept-language",
            "accept-ranges",
            "age",
            "allow",
            "authorization",
            "cache-control",
            "connection",
            "content-base",
            "content-encoding",
            "content-language",
            "content-length",
            "content-location",
            "content-md5",
            "content-range",
            "content-type",
            "date",
            "etag",
            "expect",
            "expires",
            "from",
            "host",
            "if-match",
            "if-modified-since",
            "if-none-match",
            "if-range",
            "if-unmodified-since",
            "last-modified",
            "location",
            "max-forwards",
            "pragma",
            "proxy-authenticate",
            "proxy-authorization",
            "range",
            "referer",
            "retry-after",
            "server",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "user-agent",
            "vary",
            "via",
            "warning",
            "www-authenticate",
            "method",
            "get",
            "status",
            "200 OK",
            "version",
            "HTTP/1.1",
            "url",
            "public",
            "set-cookie",
            "keep-alive",
            "origin",
        ];
        const TAIL: &[&str] = &[
            "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
            "203 Non-Authoritative Information",
            "204 No Content",
            "301 Moved Permanently",
            "400 Bad Request",
            "401 Unauthorized",
            "403 Forbidden",
            "404 Not Found",
            "500 Internal Server Error",
            "501 Not Implemented",
            "503 Service Unavailable",
            "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 ",
            "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT",
            "chunked,text/html,image/png,image/jpg,image/gif,application/xml,",
            "application/xhtml+xml,text/plain,text/javascript,public",
            "privatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
        ];
        let mut dict = Vec::with_capacity(1423);
        for word in WORDS {
            dict.extend_from_slice(&(word.len() as u32).to_be_bytes());
            dict.extend_from_slice(word.as_bytes());
        }
        for part in TAIL {
            dict.extend_from_slice(part.as_bytes());
        }
        dict
    })
}

/// Header names (lower case) and values of a SYN_STREAM.
pub type Headers = Vec<(String, String)>;

/// The first value of header `name`.
pub fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.split('\0').next().unwrap_or(""))
}

/// One frame, decoded.
#[derive(Debug, PartialEq)]
enum Frame {
    SynStream {
        id: u32,
        fin: bool,
        headers: Headers,
    },
    RstStream {
        id: u32,
    },
    Ping(u32),
    GoAway,
    Data {
        id: u32,
        fin: bool,
        data: Bytes,
    },
    /// SYN_REPLY, SETTINGS, HEADERS, WINDOW_UPDATE and unknown types.
    Ignored,
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum SpdyError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// The header-block compressor of one direction of one connection.
struct Deflater(Compress);

impl Deflater {
    fn new() -> Self {
        let mut c = Compress::new(Compression::default(), true);
        c.set_dictionary(dictionary())
            .expect("a fresh zlib stream takes a dictionary");
        Self(c)
    }

    fn block(&mut self, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut raw = Vec::new();
        raw.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        for (name, value) in headers {
            raw.extend_from_slice(&(name.len() as u32).to_be_bytes());
            raw.extend_from_slice(name.to_ascii_lowercase().as_bytes());
            raw.extend_from_slice(&(value.len() as u32).to_be_bytes());
            raw.extend_from_slice(value.as_bytes());
        }
        let mut out = Vec::with_capacity(raw.len() + 64);
        let mut input = &raw[..];
        loop {
            out.reserve(256);
            let before = self.0.total_in();
            // Only a programming error (a finished stream) fails here.
            let _ = self
                .0
                .compress_vec(input, &mut out, FlushCompress::Sync)
                .map_err(|e| tracing::error!(error = %e, "compressing SPDY headers"));
            input = &input[(self.0.total_in() - before) as usize..];
            if input.is_empty() && out.len() < out.capacity() {
                return out;
            }
        }
    }
}

/// The header-block decompressor of one direction of one connection.
struct Inflater(Decompress);

impl Inflater {
    fn new() -> Self {
        Self(Decompress::new(true))
    }

    fn block(&mut self, mut input: &[u8]) -> Result<Headers, SpdyError> {
        let bad = |what: &str| SpdyError::Protocol(format!("header block: {what}"));
        let mut raw = Vec::with_capacity(input.len() * 4);
        loop {
            if raw.len() == raw.capacity() {
                if raw.len() >= MAX_HEADER_BLOCK {
                    return Err(bad("larger than 256 KiB"));
                }
                raw.reserve(1024);
            }
            let before = self.0.total_in();
            let status = match self
                .0
                .decompress_vec(input, &mut raw, FlushDecompress::Sync)
            {
                Ok(status) => status,
                Err(e) if e.needs_dictionary().is_some() => {
                    self.0
                        .set_dictionary(dictionary())
                        .map_err(|e| bad(&format!("dictionary: {e}")))?;
                    Status::Ok
                }
                Err(e) => return Err(bad(&e.to_string())),
            };
            input = &input[(self.0.total_in() - before) as usize..];
            if status == Status::StreamEnd {
                return Err(bad("the compression stream ended"));
            }
            if input.is_empty() && raw.len() < raw.capacity() {
                break;
            }
        }
        parse_block(&raw).ok_or_else(|| bad("truncated"))
    }
}

fn parse_block(raw: &[u8]) -> Option<Headers> {
    fn take<'a>(raw: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (raw.get(..n)?, raw.get(n..)?);
        *raw = rest;
        Some(head)
    }
    fn u32_at(raw: &mut &[u8]) -> Option<usize> {
        Some(u32::from_be_bytes(take(raw, 4)?.try_into().ok()?) as usize)
    }
    let mut raw = raw;
    let count = u32_at(&mut raw)?;
    let mut headers = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let n = u32_at(&mut raw)?;
        let name = String::from_utf8_lossy(take(&mut raw, n)?).to_ascii_lowercase();
        let n = u32_at(&mut raw)?;
        let value = String::from_utf8_lossy(take(&mut raw, n)?).into_owned();
        headers.push((name, value));
    }
    Some(headers)
}

fn control(kind: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(8 + payload.len());
    frame.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
    frame.extend_from_slice(&kind.to_be_bytes());
    frame.push(flags);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    frame.extend_from_slice(payload);
    frame
}

fn data(id: u32, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(8 + payload.len());
    frame.extend_from_slice(&(id & 0x7fff_ffff).to_be_bytes());
    frame.push(if fin { FLAG_FIN } else { 0 });
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    frame.extend_from_slice(payload);
    frame
}

async fn read_frame(
    r: &mut (impl AsyncRead + Unpin),
    inflater: &mut Inflater,
) -> Result<Option<Frame>, SpdyError> {
    let mut head = [0u8; 8];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let flags = head[4];
    let len = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    let word = |i: usize| {
        payload
            .get(i..i + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff)
            .ok_or_else(|| SpdyError::Protocol("short control frame".into()))
    };
    if head[0] & 0x80 == 0 {
        let id = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        return Ok(Some(Frame::Data {
            id,
            fin: flags & FLAG_FIN != 0,
            data: Bytes::from(payload),
        }));
    }
    let version = u16::from_be_bytes([head[0], head[1]]) & 0x7fff;
    if version != VERSION {
        return Err(SpdyError::Protocol(format!(
            "SPDY version {version}, expected {VERSION}"
        )));
    }
    Ok(Some(match u16::from_be_bytes([head[2], head[3]]) {
        SYN_STREAM => {
            let id = word(0)?;
            let block = payload
                .get(10..)
                .ok_or_else(|| SpdyError::Protocol("short SYN_STREAM".into()))?;
            Frame::SynStream {
                id,
                fin: flags & FLAG_FIN != 0,
                headers: inflater.block(block)?,
            }
        }
        SYN_REPLY => {
            // Keeps the shared zlib stream in step.
            if let Some(block) = payload.get(4..) {
                inflater.block(block)?;
            }
            Frame::Ignored
        }
        8 => {
            // HEADERS: likewise.
            if let Some(block) = payload.get(4..) {
                inflater.block(block)?;
            }
            Frame::Ignored
        }
        RST_STREAM => Frame::RstStream { id: word(0)? },
        PING => Frame::Ping(word(0)?),
        GOAWAY => Frame::GoAway,
        _ => Frame::Ignored,
    }))
}

/// A stream the client opened.
pub struct Stream {
    pub id: u32,
    pub headers: Headers,
    /// Its data; ends at the client's FIN or RST_STREAM.
    pub data: mpsc::Receiver<Bytes>,
}

/// Serves one SPDY connection: returns the streams the client opens (the
/// channel ends with the connection) and the sender for everything the
/// server writes. The connection's tasks end when the client goes away
/// or an [`Outgoing::GoAway`] was written.
pub fn serve(
    io: impl AsyncRead + AsyncWrite + Send + 'static,
) -> (mpsc::Receiver<Stream>, Out, tokio::task::JoinHandle<()>) {
    let (read, write) = tokio::io::split(io);
    let (out_tx, out_rx) = mpsc::channel(STREAM_BUFFER);
    let (streams_tx, streams_rx) = mpsc::channel(16);
    let out = Out::new(out_tx);
    let reader_out = out.clone();
    tokio::spawn(async move {
        if let Err(error) = read_loop(read, streams_tx, &reader_out).await {
            tracing::debug!(%error, "SPDY connection ended");
        }
        reader_out.send(Outgoing::ClientGone).await;
    });
    let writer = tokio::spawn(async move {
        if let Err(error) = write_loop(write, out_rx).await {
            tracing::debug!(%error, "SPDY connection: writing failed");
        }
    });
    (streams_rx, out, writer)
}

async fn read_loop(
    mut read: impl AsyncRead + Unpin,
    streams: mpsc::Sender<Stream>,
    out: &Out,
) -> Result<(), SpdyError> {
    let mut inflater = Inflater::new();
    let mut open: HashMap<u32, mpsc::Sender<Bytes>> = HashMap::new();
    while let Some(frame) = read_frame(&mut read, &mut inflater).await? {
        match frame {
            Frame::SynStream { id, fin, headers } => {
                let (tx, rx) = mpsc::channel(STREAM_BUFFER);
                if !fin {
                    open.insert(id, tx);
                }
                out.send(Outgoing::Reply(id)).await;
                let stream = Stream {
                    id,
                    headers,
                    data: rx,
                };
                if streams.send(stream).await.is_err() {
                    // Nobody takes new streams any more.
                    out.send(Outgoing::Reset(id)).await;
                }
            }
            Frame::Data { id, fin, data } => {
                if let Some(tx) = open.get(&id)
                    && !data.is_empty()
                    && tx.send(data).await.is_err()
                {
                    open.remove(&id);
                }
                if fin {
                    open.remove(&id);
                }
            }
            Frame::RstStream { id } => {
                open.remove(&id);
                out.send(Outgoing::Close(id)).await;
            }
            Frame::Ping(id) => out.send(Outgoing::Ping(id)).await,
            Frame::GoAway => break,
            Frame::Ignored => {}
        }
    }
    Ok(())
}

async fn write_loop(
    mut write: impl AsyncWrite + Unpin,
    mut out: mpsc::Receiver<Outgoing>,
) -> Result<(), SpdyError> {
    let mut deflater = Deflater::new();
    let mut closed = std::collections::HashSet::new();
    let mut last_stream = 0;
    while let Some(item) = out.recv().await {
        match item {
            Outgoing::Reply(id) => {
                last_stream = last_stream.max(id);
                let mut payload = id.to_be_bytes().to_vec();
                payload.extend(deflater.block(&[]));
                write.write_all(&control(SYN_REPLY, 0, &payload)).await?;
            }
            Outgoing::Data(id, bytes) => {
                if closed.contains(&id) {
                    continue;
                }
                for chunk in bytes.chunks(MAX_DATA) {
                    write.write_all(&data(id, false, chunk)).await?;
                }
            }
            Outgoing::Close(id) => {
                if closed.insert(id) {
                    write.write_all(&data(id, true, &[])).await?;
                }
            }
            Outgoing::Reset(id) => {
                if closed.insert(id) {
                    let mut payload = id.to_be_bytes().to_vec();
                    payload.extend_from_slice(&CANCEL.to_be_bytes());
                    write.write_all(&control(RST_STREAM, 0, &payload)).await?;
                }
            }
            Outgoing::Ping(id) => {
                write
                    .write_all(&control(PING, 0, &id.to_be_bytes()))
                    .await?;
            }
            Outgoing::GoAway => {
                let mut payload = last_stream.to_be_bytes().to_vec();
                payload.extend_from_slice(&0u32.to_be_bytes());
                write.write_all(&control(GOAWAY, 0, &payload)).await?;
                write.flush().await?;
                let _ = write.shutdown().await;
                return Ok(());
            }
            Outgoing::ClientGone => {
                let _ = write.shutdown().await;
                return Ok(());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dictionary_is_spdy3s() {
        let dict = dictionary();
        assert_eq!(dict.len(), 1423);
        assert_eq!(&dict[..11], b"\0\0\0\x07options");
        assert!(dict.ends_with(b",*,enq=0."));
    }

    #[test]
    fn header_blocks_round_trip_through_one_zlib_stream_per_direction() {
        let mut deflater = Deflater::new();
        let mut inflater = Inflater::new();
        for i in 0..3 {
            let port = i.to_string();
            let block = deflater.block(&[("streamType", "data"), ("port", &port)]);
            let headers = inflater.block(&block).unwrap();
            assert_eq!(header(&headers, "streamtype"), Some("data"));
            assert_eq!(header(&headers, "port"), Some(port.as_str()));
        }
        let mut other = Inflater::new();
        assert!(other.block(b"\x78\xbbgarbage").is_err());
    }

    #[tokio::test]
    async fn frames_decode_as_they_were_encoded() {
        let mut deflater = Deflater::new();
        let mut wire = Vec::new();
        let mut syn = 1u32.to_be_bytes().to_vec();
        syn.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        syn.extend(deflater.block(&[("streamtype", "error")]));
        wire.extend(control(SYN_STREAM, 0, &syn));
        wire.extend(data(1, true, b"hello"));
        wire.extend(control(PING, 0, &7u32.to_be_bytes()));
        wire.extend(control(9, 0, &[0, 0, 0, 1, 0, 0, 1, 0]));
        let mut inflater = Inflater::new();
        let mut r = &wire[..];
        let Some(Frame::SynStream { id: 1, headers, .. }) =
            read_frame(&mut r, &mut inflater).await.unwrap()
        else {
            panic!("not a SYN_STREAM")
        };
        assert_eq!(header(&headers, "streamType"), Some("error"));
        assert_eq!(
            read_frame(&mut r, &mut inflater).await.unwrap(),
            Some(Frame::Data {
                id: 1,
                fin: true,
                data: Bytes::from_static(b"hello")
            })
        );
        assert_eq!(
            read_frame(&mut r, &mut inflater).await.unwrap(),
            Some(Frame::Ping(7))
        );
        assert_eq!(
            read_frame(&mut r, &mut inflater).await.unwrap(),
            Some(Frame::Ignored)
        );
        assert_eq!(read_frame(&mut r, &mut inflater).await.unwrap(), None);
    }
}
