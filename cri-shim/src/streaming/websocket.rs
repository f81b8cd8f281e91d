//! Kubernetes' WebSocket channel protocols: every binary message starts
//! with its channel's number (remote commands: 0 stdin, 1 stdout, 2
//! stderr, 3 error, 4 resize; port forwarding: a data and an error channel
//! per port, each opened by the port number, little-endian). In
//! `v5.channel.k8s.io` the message `[255, n]` closes channel `n`, which is
//! how a client closes stdin. `SPDY/3.1+portforward.k8s.io` carries a SPDY
//! connection in binary messages instead.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_util::sync::CancellationToken;
use wasmlet_agent::Agent;

use super::session::{self, CommandStreams};
use super::{Out, Outgoing, PORT_FORWARD_TUNNEL, Pending, Streaming, spdy};

/// `v5.channel.k8s.io`'s close-channel marker (from the client: client-go
/// discards it from a server, so the server's channels end with the
/// connection).
const CLOSE_CHANNEL: u8 = 255;

/// The largest message payload sent.
const MAX_MESSAGE: usize = 32 * 1024;

const STDIN: u8 = 0;
const STDOUT: u32 = 1;
const STDERR: u32 = 2;
const ERROR: u32 = 3;
const RESIZE: u8 = 4;

/// Serves one upgraded WebSocket connection for `pending`.
pub(super) async fn serve(
    server: Arc<Streaming>,
    agent: Agent,
    pending: Pending,
    protocol: &str,
    query: &str,
    io: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
) {
    let ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
    if protocol == PORT_FORWARD_TUNNEL {
        let (inner, outer) = tokio::io::duplex(64 * 1024);
        tokio::spawn(tunnel(ws, outer));
        let (streams, out, writer) = spdy::serve(inner);
        session::run_spdy(server, agent, pending, streams, out, writer).await;
        return;
    }
    let v5 = protocol.starts_with("v5.");
    let (sink, stream) = ws.split();
    let (out_tx, out_rx) = mpsc::channel(64);
    let out = Out::new(out_tx);
    let writer = tokio::spawn(write_loop(sink, out_rx));
    let gone = CancellationToken::new();
    match pending {
        Pending::PortForward { sandbox, ports } => {
            let ports = ports_from(query).unwrap_or(ports);
            let mut inputs = HashMap::new();
            let mut pairs = Vec::new();
            for (i, port) in ports.iter().enumerate() {
                let (data, error) = (2 * i as u32, 2 * i as u32 + 1);
                let (tx, rx) = mpsc::channel(64);
                inputs.insert(data as u8, tx);
                for channel in [data, error] {
                    out.send(Outgoing::Data(
                        channel,
                        Bytes::copy_from_slice(&port.to_le_bytes()),
                    ))
                    .await;
                }
                pairs.push((*port, rx, out.sink(data), out.sink(error)));
            }
            tokio::spawn(read_loop(stream, inputs, v5, gone.clone()));
            let forwards = pairs.into_iter().map(|(port, rx, data, error)| {
                let agent = agent.clone();
                let sandbox = sandbox.clone();
                async move { session::forward(&agent, &sandbox, port, rx, data, &error).await }
            });
            tokio::select! {
                _ = futures::future::join_all(forwards) => {}
                _ = gone.cancelled() => {}
            }
        }
        Pending::Exec { options, .. } | Pending::Attach { options, .. } => {
            let mut inputs = HashMap::new();
            let stdin = options.stdin.then(|| {
                let (tx, rx) = mpsc::channel(64);
                inputs.insert(STDIN, tx);
                rx
            });
            let resize = options.tty.then(|| {
                let (tx, rx) = mpsc::channel(8);
                inputs.insert(RESIZE, tx);
                rx
            });
            tokio::spawn(read_loop(stream, inputs, v5, gone.clone()));
            let streams = CommandStreams {
                stdin,
                stdout: options.stdout.then(|| out.sink(STDOUT)),
                stderr: (options.stderr && !options.tty).then(|| out.sink(STDERR)),
                resize,
                error: out.sink(ERROR),
                gone,
            };
            session::run_command(agent, pending, streams).await;
        }
    }
    out.send(Outgoing::GoAway).await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), writer).await;
}

/// The `port` query parameters of a WebSocket port-forward request.
fn ports_from(query: &str) -> Option<Vec<u16>> {
    let ports: Vec<u16> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k == "port" || *k == "ports")
        .flat_map(|(_, v)| v.split(',').map(str::to_owned).collect::<Vec<_>>())
        .filter_map(|v| v.parse().ok())
        .collect();
    (!ports.is_empty()).then_some(ports)
}

async fn read_loop<S>(
    mut stream: S,
    mut inputs: HashMap<u8, mpsc::Sender<Bytes>>,
    v5: bool,
    gone: CancellationToken,
) where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    while let Some(Ok(message)) = stream.next().await {
        let data = match message {
            Message::Binary(data) => data,
            Message::Close(_) => break,
            _ => continue,
        };
        let Some((&channel, payload)) = data.split_first() else {
            continue;
        };
        if v5 && channel == CLOSE_CHANNEL {
            if let Some(closed) = payload.first() {
                inputs.remove(closed);
            }
            continue;
        }
        if payload.is_empty() {
            continue;
        }
        if let Some(tx) = inputs.get(&channel)
            && tx.send(data.slice(1..)).await.is_err()
        {
            inputs.remove(&channel);
        }
    }
    drop(inputs);
    gone.cancel();
}

async fn write_loop<S>(mut sink: S, mut out: mpsc::Receiver<Outgoing>)
where
    S: futures::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    while let Some(item) = out.recv().await {
        let sent = match item {
            Outgoing::Data(channel, data) => {
                let mut result = Ok(());
                for chunk in data.chunks(MAX_MESSAGE) {
                    let mut message = BytesMut::with_capacity(chunk.len() + 1);
                    message.put_u8(channel as u8);
                    message.put_slice(chunk);
                    result = sink.feed(Message::Binary(message.freeze())).await;
                    if result.is_err() {
                        break;
                    }
                }
                match result {
                    Ok(()) => sink.flush().await,
                    Err(e) => Err(e),
                }
            }
            Outgoing::GoAway => {
                // A normal closure is end-of-stream to client-go; any other
                // close is an error reading the error stream.
                let _ = sink.send(Message::Close(Some(normal_closure()))).await;
                let _ = sink.close().await;
                return;
            }
            Outgoing::ClientGone => return,
            Outgoing::Close(_) | Outgoing::Reply(_) | Outgoing::Reset(_) | Outgoing::Ping(_) => {
                Ok(())
            }
        };
        if sent.is_err() {
            return;
        }
    }
}

fn normal_closure() -> CloseFrame {
    CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }
}

/// Carries a byte stream (a SPDY connection) in binary messages, both
/// ways, until either side ends.
async fn tunnel<S>(ws: WebSocketStream<S>, mut bytes: tokio::io::DuplexStream)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    let (mut read, mut write) = tokio::io::split(&mut bytes);
    let inbound = async {
        while let Some(Ok(message)) = stream.next().await {
            match message {
                Message::Binary(data) if write.write_all(&data).await.is_err() => break,
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = write.shutdown().await;
    };
    let outbound = async {
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let message = Message::Binary(Bytes::copy_from_slice(&buf[..n]));
                    if sink.send(message).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = sink.send(Message::Close(Some(normal_closure()))).await;
    };
    tokio::join!(inbound, outbound);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_come_from_the_query() {
        assert_eq!(ports_from("port=80&port=8080"), Some(vec![80, 8080]));
        assert_eq!(ports_from("ports=80,81"), Some(vec![80, 81]));
        assert_eq!(ports_from(""), None);
    }
}
