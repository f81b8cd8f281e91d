//! The client end to end over loopback: against a small SPDY server built on
//! the codec, and against a tungstenite WebSocket server.

use std::collections::HashMap;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

use super::connection::{bounded, header};
use super::spdy_frame::{
    Frame, HeaderCompressor, HeaderDecompressor, Headers, decode_frame, encode_frame,
    frame_payload_len,
};
use super::*;

const TIMEOUT: Duration = Duration::from_secs(10);

// -- A small SPDY server built on the codec (`spdy_frame`), to drive the client
// -- end to end over loopback.

struct FakeSpdyServer {
    input: BufReader<tokio::net::tcp::OwnedReadHalf>,
    output: OwnedWriteHalf,
    compressor: HeaderCompressor,
    decompressor: HeaderDecompressor,
    /// PING frames with id 2 the client sent (echoes of ours).
    pings_echoed: usize,
}

impl FakeSpdyServer {
    /// Accepts one connection and answers its upgrade with `status`.
    async fn accept(
        listener: &TcpListener,
        status: &str,
        protocol: &str,
    ) -> (FakeSpdyServer, String) {
        let (tcp, _) = listener.accept().await.unwrap();
        let (read_half, mut output) = tcp.into_split();
        let mut input = BufReader::new(read_half);
        let mut request = String::new();
        while !request.ends_with("\r\n\r\n") {
            assert_ne!(
                tokio::io::AsyncBufReadExt::read_line(&mut input, &mut request)
                    .await
                    .unwrap(),
                0
            );
        }
        let answer = match status {
            "101" => format!(
                "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\
                 X-Stream-Protocol-Version: {protocol}\r\n\r\n"
            ),
            code => format!("HTTP/1.1 {code} Nope\r\nContent-Length: 13\r\n\r\ntoken unknown"),
        };
        output.write_all(answer.as_bytes()).await.unwrap();
        let server = FakeSpdyServer {
            input,
            output,
            compressor: HeaderCompressor::new(),
            decompressor: HeaderDecompressor::new(),
            pings_echoed: 0,
        };
        (server, request)
    }

    /// The next frame that is not an echo of the server's ping.
    async fn read(&mut self) -> Option<Frame> {
        loop {
            let mut head = [0u8; 8];
            self.input.read_exact(&mut head).await.ok()?;
            let mut payload = vec![0; frame_payload_len(&head)];
            self.input.read_exact(&mut payload).await.ok()?;
            match decode_frame(&head, &payload, &mut self.decompressor).unwrap() {
                Frame::Ping { id: 2 } => self.pings_echoed += 1,
                frame => return Some(frame),
            }
        }
    }

    async fn write(&mut self, frame: Frame) {
        let bytes = encode_frame(&frame, &mut self.compressor);
        self.output.write_all(&bytes).await.unwrap();
    }

    /// Reads a SYN_STREAM, answers it, returns its id and headers.
    async fn accept_stream(&mut self) -> (u32, Headers) {
        match self.read().await {
            Some(Frame::SynStream {
                stream_id, headers, ..
            }) => {
                self.write(Frame::SynReply {
                    stream_id,
                    fin: false,
                    headers: Vec::new(),
                })
                .await;
                (stream_id, headers)
            }
            other => panic!("expected SYN_STREAM, got {other:?}"),
        }
    }
}

fn data(stream_id: u32, fin: bool, data: &[u8]) -> Frame {
    Frame::Data {
        stream_id,
        fin,
        data: Bytes::copy_from_slice(data),
    }
}

#[tokio::test]
async fn streaming_spdy_exec_echoes_stdin_and_reports_the_exit_code() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/exec/token", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let (mut spdy, request) = FakeSpdyServer::accept(&listener, "101", REMOTE_COMMAND_V4).await;
        assert!(request.starts_with("POST /exec/token HTTP/1.1\r\n"));
        assert!(request.contains("\r\nUpgrade: SPDY/3.1\r\n"));
        assert!(request.contains("\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n"));
        // A server ping comes first and must be echoed.
        spdy.write(Frame::Ping { id: 2 }).await;
        let mut kinds = Vec::new();
        let mut ids = HashMap::new();
        for _ in 0..4 {
            let (id, headers) = spdy.accept_stream().await;
            let kind = headers[0].1.clone();
            ids.insert(kind.clone(), id);
            kinds.push((id, kind));
        }
        let expected: Vec<(u32, String)> =
            [(1, "error"), (3, "stdin"), (5, "stdout"), (7, "stderr")]
                .map(|(i, k)| (i, k.to_owned()))
                .into();
        assert_eq!(kinds, expected);
        loop {
            match spdy.read().await.unwrap() {
                Frame::Data {
                    stream_id,
                    fin,
                    data: bytes,
                } if stream_id == ids["stdin"] => {
                    spdy.write(data(ids["stdout"], false, &bytes)).await;
                    if fin {
                        break;
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(spdy.pings_echoed, 1);
        spdy.write(data(ids["stderr"], true, b"warning\n")).await;
        let status = br#"{"metadata":{},"status":"Failure","message":"exit 3","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}"#;
        spdy.write(data(ids["error"], true, status)).await;
        spdy.write(Frame::RstStream {
            stream_id: ids["stdout"],
            status: 5,
        })
        .await;
        spdy.write(Frame::GoAway {
            last_stream_id: 0,
            status: 0,
        })
        .await;
    });

    let options = StreamOptions {
        stdin: true,
        stdout: true,
        stderr: true,
        tty: false,
    };
    let mut exec = RemoteCommand::connect(&url, Transport::Spdy, options)
        .await
        .unwrap();
    assert_eq!(exec.protocol(), REMOTE_COMMAND_V4);
    exec.write_stdin(b"hello ").await.unwrap();
    exec.wait_stdout_contains("hello", TIMEOUT).await.unwrap();
    exec.write_stdin(b"world\n").await.unwrap();
    exec.close_stdin().await.unwrap();
    assert!(matches!(
        exec.resize(80, 24).await,
        Err(StreamError::NotRequested { .. })
    ));
    let outcome = exec.finish(TIMEOUT).await.unwrap();
    assert_eq!(outcome.stdout_text(), "hello world\n");
    assert_eq!(outcome.stderr_text(), "warning\n");
    assert_eq!(outcome.exit_code, Some(3));
    assert_eq!(outcome.message, "exit 3");
    server.await.unwrap();
}

#[tokio::test]
async fn streaming_spdy_tty_sends_resize_and_refusal_carries_the_status() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/attach/token", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let (mut spdy, _) = FakeSpdyServer::accept(&listener, "101", REMOTE_COMMAND_V4).await;
        let mut kinds = Vec::new();
        for _ in 0..3 {
            kinds.push(spdy.accept_stream().await);
        }
        let kinds: Vec<&str> = kinds
            .iter()
            .map(|(_, headers)| headers[0].1.as_str())
            .collect();
        assert_eq!(kinds, ["error", "stdout", "resize"]);
        let mut sizes = Vec::new();
        while sizes.len() < br#"{"Height":24,"Width":80}"#.len() {
            match spdy.read().await.unwrap() {
                Frame::Data {
                    stream_id: 5, data, ..
                } => sizes.extend_from_slice(&data),
                other => panic!("unexpected {other:?}"),
            }
        }
        let size: Value = serde_json::from_slice(&sizes).unwrap();
        assert_eq!(size, serde_json::json!({"Width": 80, "Height": 24}));
        spdy.write(data(1, true, br#"{"metadata":{},"status":"Success"}"#))
            .await;
        drop(spdy);
        // The token is now used: a second upgrade is refused.
        FakeSpdyServer::accept(&listener, "404", "").await;
    });

    let options = StreamOptions {
        stdin: false,
        stdout: true,
        stderr: true,
        tty: true,
    };
    let mut attach = RemoteCommand::connect(&url, Transport::Spdy, options)
        .await
        .unwrap();
    attach.resize(80, 24).await.unwrap();
    let outcome = attach.finish(TIMEOUT).await.unwrap();
    assert_eq!(outcome.exit_code, Some(0));
    assert!(outcome.stdout.is_empty());

    let refused = RemoteCommand::connect(&url, Transport::Spdy, options)
        .await
        .unwrap_err();
    assert_eq!(refused.http_status(), Some(404));
    assert!(refused.to_string().contains("token unknown"), "{refused}");
    server.await.unwrap();
}

#[tokio::test]
async fn streaming_spdy_port_forward_pairs_error_and_data_streams() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/portforward/token",
        listener.local_addr().unwrap()
    );
    let server = tokio::spawn(async move {
        let (mut spdy, _) = FakeSpdyServer::accept(&listener, "101", PORT_FORWARD_SPDY).await;
        for request_id in ["0", "1"] {
            let (error_id, error_headers) = spdy.accept_stream().await;
            let expected = vec![
                header("streamtype", "error"),
                header("port", "8080"),
                header("requestid", request_id),
            ];
            assert_eq!(error_headers, expected);
            // kubectl half-closes the error stream at once.
            assert_eq!(spdy.read().await.unwrap(), data(error_id, true, b""));
            let (data_id, data_headers) = spdy.accept_stream().await;
            assert_eq!(data_headers[0], header("streamtype", "data"));
            assert_eq!(data_headers[2], header("requestid", request_id));
            if request_id == "1" {
                spdy.write(data(error_id, true, b"connection refused"))
                    .await;
                spdy.write(data(data_id, true, b"")).await;
                break;
            }
            let mut received = Vec::new();
            loop {
                match spdy.read().await.unwrap() {
                    Frame::Data {
                        stream_id,
                        fin,
                        data: bytes,
                    } if stream_id == data_id => {
                        received.extend_from_slice(&bytes);
                        if fin {
                            break;
                        }
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            spdy.write(data(data_id, true, &[b"echo:", &received[..]].concat()))
                .await;
            spdy.write(data(error_id, true, b"")).await;
        }
        // Keep the connection until the client is done.
        while spdy.read().await.is_some() {}
    });

    let mut forward = PortForward::connect(&url, Transport::Spdy, &[8080])
        .await
        .unwrap();
    let mut stream = forward.open(8080).await.unwrap();
    stream.write_all(b"ping").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = Vec::new();
    bounded(TIMEOUT, "answer".into(), stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, b"echo:ping");
    assert_eq!(stream.error(TIMEOUT).await.unwrap(), None);

    let mut refused = forward.open(8080).await.unwrap();
    assert_eq!(
        refused.error(TIMEOUT).await.unwrap().as_deref(),
        Some("connection refused")
    );
    let mut rest = Vec::new();
    refused.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    drop((forward, stream, refused));
    server.await.unwrap();
}

// -- WebSocket, against a tungstenite server.

// The handshake callback's error type is tungstenite's, not ours.
#[allow(clippy::result_large_err)]
async fn accept_websocket(
    listener: &TcpListener,
    protocol: &'static str,
) -> (tokio_tungstenite::WebSocketStream<TcpStream>, String) {
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    let (tcp, _) = listener.accept().await.unwrap();
    let mut seen = String::new();
    let callback = |request: &Request, mut response: Response| {
        let offered = request.headers()["sec-websocket-protocol"]
            .to_str()
            .unwrap();
        seen = format!("{}|{offered}", request.uri());
        response
            .headers_mut()
            .insert("sec-websocket-protocol", protocol.parse().unwrap());
        Ok(response)
    };
    let websocket = tokio_tungstenite::accept_hdr_async(tcp, callback)
        .await
        .unwrap();
    (websocket, seen)
}

fn binary(bytes: &[u8]) -> Message {
    Message::Binary(Bytes::copy_from_slice(bytes))
}

#[tokio::test]
async fn streaming_websocket_exec_closes_stdin_with_v5() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/exec/token", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let (mut ws, seen) = accept_websocket(&listener, REMOTE_COMMAND_V5).await;
        assert_eq!(seen, "/exec/token|v5.channel.k8s.io, v4.channel.k8s.io");
        for channel in 0..4u8 {
            ws.send(binary(&[channel])).await.unwrap();
        }
        let mut stdin = Vec::new();
        loop {
            let message = ws.next().await.unwrap().unwrap().into_data();
            match (message[0], &message[1..]) {
                (0, bytes) => stdin.extend_from_slice(bytes),
                (255, [0]) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        ws.send(binary(&[&[1][..], &stdin].concat())).await.unwrap();
        ws.send(binary(b"\x02oops")).await.unwrap();
        let status = [&[3][..], br#"{"metadata":{},"status":"Success"}"#].concat();
        ws.send(binary(&status)).await.unwrap();
        ws.close(None).await.unwrap();
    });

    let options = StreamOptions {
        stdin: true,
        stdout: true,
        stderr: true,
        tty: false,
    };
    let mut exec = RemoteCommand::connect(&url, Transport::WebSocket, options)
        .await
        .unwrap();
    assert_eq!(exec.protocol(), REMOTE_COMMAND_V5);
    exec.write_stdin(b"abc").await.unwrap();
    exec.close_stdin().await.unwrap();
    let outcome = exec.finish(TIMEOUT).await.unwrap();
    assert_eq!(outcome.stdout, b"abc");
    assert_eq!(outcome.stderr, b"oops");
    assert_eq!(outcome.exit_code, Some(0));
    server.await.unwrap();
}

#[tokio::test]
async fn streaming_websocket_port_forward_checks_port_prefixes() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/portforward/token",
        listener.local_addr().unwrap()
    );
    let server = tokio::spawn(async move {
        let (mut ws, seen) = accept_websocket(&listener, REMOTE_COMMAND_V4).await;
        assert_eq!(
            seen,
            "/portforward/token?port=80&port=8080|v4.channel.k8s.io"
        );
        for (channel, port) in [(0u8, 80u16), (1, 80), (2, 8080), (3, 8080)] {
            let [low, high] = port.to_le_bytes();
            ws.send(binary(&[channel, low, high])).await.unwrap();
        }
        let message = ws.next().await.unwrap().unwrap().into_data();
        assert_eq!(&message[..], b"\x02GET");
        ws.send(binary(b"\x02200 OK")).await.unwrap();
        ws.send(binary(b"\x01no such port")).await.unwrap();
        ws.close(None).await.unwrap();
    });

    let mut forward = PortForward::connect(&url, Transport::WebSocket, &[80, 8080])
        .await
        .unwrap();
    assert!(matches!(
        forward.open(9).await,
        Err(StreamError::UnknownPort { port: 9 })
    ));
    let mut web = forward.open(8080).await.unwrap();
    assert!(matches!(
        forward.open(8080).await,
        Err(StreamError::PortAlreadyOpen { port: 8080 })
    ));
    let mut first = forward.open(80).await.unwrap();
    web.write_all(b"GET").await.unwrap();
    let mut answer = Vec::new();
    web.read_to_end(&mut answer).await.unwrap();
    assert_eq!(answer, b"200 OK");
    assert_eq!(
        first.error(TIMEOUT).await.unwrap().as_deref(),
        Some("no such port")
    );
    server.await.unwrap();
}

#[tokio::test]
async fn streaming_websocket_refusal_carries_the_status() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/exec/used", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut buffer = [0u8; 1024];
        let _ = tcp.read(&mut buffer).await.unwrap();
        tcp.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found")
            .await
            .unwrap();
    });
    let error = RemoteCommand::connect(&url, Transport::WebSocket, StreamOptions::default())
        .await
        .unwrap_err();
    assert_eq!(error.http_status(), Some(404), "{error}");
    server.await.unwrap();
}
