//! SPDY/3 framing: encoding and decoding frames, header blocks and their
//! zlib compression with the SPDY/3 dictionary.

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};

const SPDY_VERSION: u16 = 3;
const FLAG_FIN: u8 = 0x01;
const STREAM_ID_MASK: u32 = 0x7fff_ffff;
const TYPE_SYN_STREAM: u16 = 1;
const TYPE_SYN_REPLY: u16 = 2;
const TYPE_RST_STREAM: u16 = 3;
const TYPE_SETTINGS: u16 = 4;
const TYPE_PING: u16 = 6;
const TYPE_GOAWAY: u16 = 7;
const TYPE_HEADERS: u16 = 8;
const TYPE_WINDOW_UPDATE: u16 = 9;
pub(super) const RST_REFUSED_STREAM: u32 = 3;

/// Header name/value pairs; a name appears once per value.
pub(super) type Headers = Vec<(String, String)>;

/// A SPDY/3 frame, with header blocks uncompressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Frame {
    /// Sent with associated stream 0, priority 0 and slot 0.
    SynStream {
        stream_id: u32,
        fin: bool,
        headers: Headers,
    },
    SynReply {
        stream_id: u32,
        fin: bool,
        headers: Headers,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    /// Its settings are ignored; sent with none.
    Settings,
    Ping {
        id: u32,
    },
    GoAway {
        last_stream_id: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        fin: bool,
        headers: Headers,
    },
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
    Data {
        stream_id: u32,
        fin: bool,
        data: Bytes,
    },
    /// A control frame type this client does not know; skipped.
    Unknown {
        frame_type: u16,
    },
}

fn fin_flag(fin: bool) -> u8 {
    if fin { FLAG_FIN } else { 0 }
}

fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_be_bytes());
}

fn take_u32(input: &mut &[u8]) -> Result<u32, String> {
    let (word, rest) = input
        .split_first_chunk::<4>()
        .ok_or("frame shorter than its fields")?;
    *input = rest;
    Ok(u32::from_be_bytes(*word))
}

fn take_bytes<'a>(input: &mut &'a [u8], length: usize) -> Result<&'a [u8], String> {
    if input.len() < length {
        return Err("frame shorter than its fields".into());
    }
    let (taken, rest) = input.split_at(length);
    *input = rest;
    Ok(taken)
}

/// Encodes one frame; header blocks go through `compressor`, so frames must
/// be written in the order they are encoded.
pub(super) fn encode_frame(frame: &Frame, compressor: &mut HeaderCompressor) -> Vec<u8> {
    let mut payload = Vec::new();
    let (frame_type, flags) = match frame {
        Frame::Data {
            stream_id,
            fin,
            data,
        } => {
            let mut out = Vec::with_capacity(8 + data.len());
            put_u32(&mut out, stream_id & STREAM_ID_MASK);
            put_u32(
                &mut out,
                u32::from(fin_flag(*fin)) << 24 | data.len() as u32,
            );
            out.extend_from_slice(data);
            return out;
        }
        Frame::SynStream {
            stream_id,
            fin,
            headers,
        } => {
            put_u32(&mut payload, stream_id & STREAM_ID_MASK);
            put_u32(&mut payload, 0); // associated-to stream
            payload.extend_from_slice(&[0, 0]); // priority << 5, slot
            payload.extend(compressor.compress(&encode_header_block(headers)));
            (TYPE_SYN_STREAM, fin_flag(*fin))
        }
        Frame::SynReply {
            stream_id,
            fin,
            headers,
        }
        | Frame::Headers {
            stream_id,
            fin,
            headers,
        } => {
            put_u32(&mut payload, stream_id & STREAM_ID_MASK);
            payload.extend(compressor.compress(&encode_header_block(headers)));
            let frame_type = if matches!(frame, Frame::SynReply { .. }) {
                TYPE_SYN_REPLY
            } else {
                TYPE_HEADERS
            };
            (frame_type, fin_flag(*fin))
        }
        Frame::RstStream { stream_id, status } => {
            put_u32(&mut payload, stream_id & STREAM_ID_MASK);
            put_u32(&mut payload, *status);
            (TYPE_RST_STREAM, 0)
        }
        Frame::Settings => {
            put_u32(&mut payload, 0);
            (TYPE_SETTINGS, 0)
        }
        Frame::Ping { id } => {
            put_u32(&mut payload, *id);
            (TYPE_PING, 0)
        }
        Frame::GoAway {
            last_stream_id,
            status,
        } => {
            put_u32(&mut payload, last_stream_id & STREAM_ID_MASK);
            put_u32(&mut payload, *status);
            (TYPE_GOAWAY, 0)
        }
        Frame::WindowUpdate { stream_id, delta } => {
            put_u32(&mut payload, stream_id & STREAM_ID_MASK);
            put_u32(&mut payload, delta & STREAM_ID_MASK);
            (TYPE_WINDOW_UPDATE, 0)
        }
        Frame::Unknown { frame_type } => (*frame_type, 0),
    };
    let mut out = Vec::with_capacity(8 + payload.len());
    out.extend_from_slice(&(0x8000 | SPDY_VERSION).to_be_bytes());
    out.extend_from_slice(&frame_type.to_be_bytes());
    put_u32(&mut out, u32::from(flags) << 24 | payload.len() as u32);
    out.extend(payload);
    out
}

/// The payload length announced by a frame's 8-byte head.
pub(super) fn frame_payload_len(head: &[u8; 8]) -> usize {
    (u32::from_be_bytes([head[4], head[5], head[6], head[7]]) & 0x00ff_ffff) as usize
}

/// Decodes one frame from its head and payload; header blocks go through
/// `decompressor`, so frames must be decoded in the order they arrived.
pub(super) fn decode_frame(
    head: &[u8; 8],
    payload: &[u8],
    decompressor: &mut HeaderDecompressor,
) -> Result<Frame, String> {
    let first = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let fin = head[4] & FLAG_FIN != 0;
    if first & 0x8000_0000 == 0 {
        let data = Bytes::copy_from_slice(payload);
        return Ok(Frame::Data {
            stream_id: first & STREAM_ID_MASK,
            fin,
            data,
        });
    }
    let version = (first >> 16) as u16 & 0x7fff;
    if version != SPDY_VERSION {
        return Err(format!("control frame of SPDY version {version}"));
    }
    let mut input = payload;
    let mut headers = |input: &[u8]| decode_header_block(&decompressor.decompress(input)?);
    let frame = match first as u16 {
        TYPE_SYN_STREAM => {
            let stream_id = take_u32(&mut input)? & STREAM_ID_MASK;
            take_bytes(&mut input, 6)?; // associated-to stream, priority, slot
            Frame::SynStream {
                stream_id,
                fin,
                headers: headers(input)?,
            }
        }
        TYPE_SYN_REPLY => {
            let stream_id = take_u32(&mut input)? & STREAM_ID_MASK;
            Frame::SynReply {
                stream_id,
                fin,
                headers: headers(input)?,
            }
        }
        TYPE_HEADERS => {
            let stream_id = take_u32(&mut input)? & STREAM_ID_MASK;
            Frame::Headers {
                stream_id,
                fin,
                headers: headers(input)?,
            }
        }
        TYPE_RST_STREAM => Frame::RstStream {
            stream_id: take_u32(&mut input)? & STREAM_ID_MASK,
            status: take_u32(&mut input)?,
        },
        TYPE_SETTINGS => Frame::Settings,
        TYPE_PING => Frame::Ping {
            id: take_u32(&mut input)?,
        },
        TYPE_GOAWAY => Frame::GoAway {
            last_stream_id: take_u32(&mut input)? & STREAM_ID_MASK,
            status: take_u32(&mut input)?,
        },
        TYPE_WINDOW_UPDATE => Frame::WindowUpdate {
            stream_id: take_u32(&mut input)? & STREAM_ID_MASK,
            delta: take_u32(&mut input)? & STREAM_ID_MASK,
        },
        frame_type => Frame::Unknown { frame_type },
    };
    Ok(frame)
}

/// An uncompressed header block: the pair count, then each lower-cased name
/// and its values joined with NUL, all length-prefixed with 32 bits.
fn encode_header_block(headers: &[(String, String)]) -> Vec<u8> {
    let mut grouped: Vec<(String, Vec<&str>)> = Vec::new();
    for (name, value) in headers {
        let name = name.to_ascii_lowercase();
        match grouped.iter_mut().find(|(seen, _)| *seen == name) {
            Some((_, values)) => values.push(value),
            None => grouped.push((name, vec![value])),
        }
    }
    let mut out = Vec::new();
    put_u32(&mut out, grouped.len() as u32);
    for (name, values) in grouped {
        let value = values.join("\0");
        put_u32(&mut out, name.len() as u32);
        out.extend_from_slice(name.as_bytes());
        put_u32(&mut out, value.len() as u32);
        out.extend_from_slice(value.as_bytes());
    }
    out
}

fn decode_header_block(mut block: &[u8]) -> Result<Headers, String> {
    let input = &mut block;
    let mut headers = Vec::new();
    for _ in 0..take_u32(input)? {
        let length = take_u32(input)? as usize;
        let name = String::from_utf8_lossy(take_bytes(input, length)?).to_ascii_lowercase();
        let length = take_u32(input)? as usize;
        let value = take_bytes(input, length)?;
        for part in value.split(|&byte| byte == 0) {
            headers.push((name.clone(), String::from_utf8_lossy(part).into_owned()));
        }
    }
    match input.is_empty() {
        true => Ok(headers),
        false => Err("bytes after the last header pair".into()),
    }
}

/// The client-to-server header compression context: zlib seeded with the
/// SPDY/3 dictionary, one sync-flushed block per frame.
pub(super) struct HeaderCompressor(Compress);

impl HeaderCompressor {
    pub(super) fn new() -> Self {
        let mut compress = Compress::new(Compression::default(), true);
        compress
            .set_dictionary(&spdy3_dictionary())
            .expect("a fresh compressor takes a dictionary");
        HeaderCompressor(compress)
    }

    fn compress(&mut self, block: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(block.len() + 64);
        let start = self.0.total_in();
        loop {
            let consumed = (self.0.total_in() - start) as usize;
            self.0
                .compress_vec(&block[consumed..], &mut out, FlushCompress::Sync)
                .expect("compressing into memory cannot fail");
            let consumed = (self.0.total_in() - start) as usize;
            // Spare output room left means the sync flush is complete.
            if consumed == block.len() && out.len() < out.capacity() {
                return out;
            }
            out.reserve(out.capacity().max(64));
        }
    }
}

/// The server-to-client header decompression context.
pub(super) struct HeaderDecompressor(Decompress);

impl HeaderDecompressor {
    pub(super) fn new() -> Self {
        HeaderDecompressor(Decompress::new(true))
    }

    fn decompress(&mut self, input: &[u8]) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(input.len() * 4 + 256);
        let start = self.0.total_in();
        loop {
            let consumed = (self.0.total_in() - start) as usize;
            let produced = out.len();
            match self
                .0
                .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync)
            {
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.0
                        .set_dictionary(&spdy3_dictionary())
                        .map_err(|e| format!("header block wants another dictionary: {e}"))?;
                    continue;
                }
                Err(e) => return Err(format!("corrupt compressed header block: {e}")),
            }
            let now_consumed = (self.0.total_in() - start) as usize;
            if now_consumed == input.len() && out.len() < out.capacity() {
                return Ok(out);
            }
            if out.len() == out.capacity() {
                out.reserve(out.capacity());
            } else if now_consumed == consumed && out.len() == produced {
                return Err("truncated compressed header block".into());
            }
        }
    }
}

/// The header names and values the SPDY/3 dictionary starts with,
/// separated by `|`; each is put in as a 32-bit length and the bytes.
const DICTIONARY_WORDS: &str = concat!(
    "options|head|post|put|delete|trace|accept|accept-charset|accept-encoding|",
    "accept-language|accept-ranges|age|allow|authorization|cache-control|connection|",
    "content-base|content-encoding|content-language|content-length|content-location|",
    "content-md5|content-range|content-type|date|etag|expect|expires|from|host|if-match|",
    "if-modified-since|if-none-match|if-range|if-unmodified-since|last-modified|location|",
    "max-forwards|pragma|proxy-authenticate|proxy-authorization|range|referer|",
    "retry-after|server|te|trailer|transfer-encoding|upgrade|user-agent|vary|via|warning|",
    "www-authenticate|method|get|status|200 OK|version|HTTP/1.1|url|public|set-cookie|",
    "keep-alive|origin",
);

/// The plain text the SPDY/3 dictionary ends with: status codes and
/// reasons, dates, and common values.
const DICTIONARY_TAIL: &str = concat!(
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
    "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,",
    "text/plain,text/javascript,publicprivatemax-age=gzip,deflate,sdch",
    "charset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
);

/// The 1423-byte zlib dictionary of SPDY/3 header compression.
fn spdy3_dictionary() -> Vec<u8> {
    let mut dictionary = Vec::with_capacity(1423);
    for word in DICTIONARY_WORDS.split('|') {
        put_u32(&mut dictionary, word.len() as u32);
        dictionary.extend_from_slice(word.as_bytes());
    }
    dictionary.extend_from_slice(DICTIONARY_TAIL.as_bytes());
    dictionary
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::streaming::connection::header;

    fn split(frame: &[u8]) -> ([u8; 8], &[u8]) {
        let (head, payload) = frame.split_first_chunk::<8>().expect("a frame has a head");
        assert_eq!(frame_payload_len(head), payload.len());
        (*head, payload)
    }

    #[test]
    fn streaming_dictionary_is_the_spdy3_one() {
        let dictionary = spdy3_dictionary();
        assert_eq!(dictionary.len(), 1423);
        assert_eq!(&dictionary[..11], b"\0\0\0\x07options");
        assert_eq!(&dictionary[1224..1227], b"GMT");
        // Its Adler-32, which the zlib header of the first block carries.
        let mut compress = Compress::new(Compression::default(), true);
        assert_eq!(compress.set_dictionary(&dictionary).unwrap(), 0xe3c6_a7c2);
        assert!(dictionary.ends_with(b",*,enq=0."));
    }

    #[test]
    fn streaming_header_block_round_trips_and_joins_values() {
        let headers = vec![
            header("StreamType", "stdin"),
            header("port", "80"),
            header("port", "81"),
        ];
        let block = encode_header_block(&headers);
        let mut expected = Vec::new();
        put_u32(&mut expected, 2);
        put_u32(&mut expected, 10);
        expected.extend_from_slice(b"streamtype");
        put_u32(&mut expected, 5);
        expected.extend_from_slice(b"stdin");
        put_u32(&mut expected, 4);
        expected.extend_from_slice(b"port");
        put_u32(&mut expected, 5);
        expected.extend_from_slice(b"80\x0081");
        assert_eq!(block, expected);
        let decoded = decode_header_block(&block).unwrap();
        assert_eq!(
            decoded,
            vec![
                header("streamtype", "stdin"),
                header("port", "80"),
                header("port", "81")
            ]
        );
        assert!(decode_header_block(&block[..block.len() - 1]).is_err());
    }

    #[test]
    fn streaming_syn_stream_round_trips_through_one_compression_context() {
        let mut compressor = HeaderCompressor::new();
        let mut decompressor = HeaderDecompressor::new();
        for (stream_id, kind) in [(1, "error"), (3, "stdin"), (5, "stdout")] {
            let frame = Frame::SynStream {
                stream_id,
                fin: false,
                headers: vec![header("streamtype", kind)],
            };
            let bytes = encode_frame(&frame, &mut compressor);
            // Control bit, version 3, type 1, no flags.
            assert_eq!(&bytes[..5], &[0x80, 0x03, 0x00, 0x01, 0x00]);
            assert_eq!(&bytes[8..18], &[0, 0, 0, stream_id as u8, 0, 0, 0, 0, 0, 0]);
            if stream_id == 1 {
                // A zlib header that names the dictionary by its Adler-32.
                let block = &bytes[18..];
                assert_eq!(block[0] & 0x0f, 8, "deflate");
                assert_ne!(block[1] & 0x20, 0, "FDICT set");
                let mut dictionary_id = flate2::Compress::new(Compression::default(), true);
                let adler = dictionary_id.set_dictionary(&spdy3_dictionary()).unwrap();
                assert_eq!(&block[2..6], &adler.to_be_bytes());
            }
            // Each block ends with a sync flush marker.
            assert!(bytes.ends_with(&[0x00, 0x00, 0xff, 0xff]));
            let (head, payload) = split(&bytes);
            assert_eq!(
                decode_frame(&head, payload, &mut decompressor).unwrap(),
                frame
            );
        }
    }

    #[test]
    fn streaming_data_frames_encode_and_decode() {
        let mut compressor = HeaderCompressor::new();
        let mut decompressor = HeaderDecompressor::new();
        let frame = Frame::Data {
            stream_id: 7,
            fin: true,
            data: Bytes::from_static(b"hello"),
        };
        let bytes = encode_frame(&frame, &mut compressor);
        assert_eq!(bytes, b"\0\0\0\x07\x01\0\0\x05hello");
        let (head, payload) = split(&bytes);
        assert_eq!(
            decode_frame(&head, payload, &mut decompressor).unwrap(),
            frame
        );

        let empty_fin = encode_frame(
            &Frame::Data {
                stream_id: 3,
                fin: true,
                data: Bytes::new(),
            },
            &mut compressor,
        );
        assert_eq!(empty_fin, [0, 0, 0, 3, 1, 0, 0, 0]);
    }

    #[test]
    fn streaming_control_frames_round_trip() {
        let mut compressor = HeaderCompressor::new();
        let mut decompressor = HeaderDecompressor::new();
        for frame in [
            Frame::RstStream {
                stream_id: 5,
                status: 3,
            },
            Frame::Ping { id: 2 },
            Frame::GoAway {
                last_stream_id: 0,
                status: 0,
            },
            Frame::WindowUpdate {
                stream_id: 1,
                delta: 65536,
            },
            Frame::SynReply {
                stream_id: 1,
                fin: true,
                headers: Vec::new(),
            },
            Frame::Headers {
                stream_id: 1,
                fin: false,
                headers: vec![header("a", "b")],
            },
        ] {
            let bytes = encode_frame(&frame, &mut compressor);
            let (head, payload) = split(&bytes);
            assert_eq!(
                decode_frame(&head, payload, &mut decompressor).unwrap(),
                frame
            );
        }
        assert_eq!(
            encode_frame(&Frame::Ping { id: 2 }, &mut compressor),
            [0x80, 3, 0, 6, 0, 0, 0, 4, 0, 0, 0, 2]
        );
        let v2 = [0x80, 2, 0, 6, 0, 0, 0, 4];
        assert!(decode_frame(&v2, &[0, 0, 0, 2], &mut decompressor).is_err());
    }
}
