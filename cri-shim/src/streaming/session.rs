//! What a streaming connection does once its transport is up: exec and
//! attach over a remote command's streams, port forwarding over stream
//! pairs. Transport-neutral: SPDY and WebSocket both hand over
//! [`CommandStreams`] and [`Sink`]s.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use wasmlet_agent::model::ids::{ContainerId, SandboxId};
use wasmlet_agent::{
    Agent, ExecStdio, INPUT_BUFFER, LineDiscipline, OUTPUT_CHUNKS, Stream as LogStream,
    TerminalSize, onlcr,
};

use super::spdy::{self, header};
use super::{CommandOptions, Out, Outgoing, Pending, Sink, Streaming};

/// How long a terminal exec waits for the client's first size (kubectl
/// sends it right after the streams are up) before starting without.
const FIRST_SIZE_WAIT: Duration = Duration::from_secs(1);

/// How long output may take to drain after the instance ended.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the client may take to read the last bytes before the
/// connection is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The exit code of an instance interrupted with Ctrl-C, as a shell
/// reports SIGINT.
const INTERRUPTED: i32 = 130;

/// A remote command's streams, as the client opened them.
pub(super) struct CommandStreams {
    pub stdin: Option<mpsc::Receiver<Bytes>>,
    pub stdout: Option<Sink>,
    pub stderr: Option<Sink>,
    /// The terminal's sizes, as JSON objects one after another.
    pub resize: Option<mpsc::Receiver<Bytes>>,
    /// Where the final status goes.
    pub error: Sink,
    /// Fires when the client went away.
    pub gone: CancellationToken,
}

/// Serves a SPDY connection for `pending` until it is done.
pub(super) async fn run_spdy(
    server: Arc<Streaming>,
    agent: Agent,
    pending: Pending,
    mut streams: mpsc::Receiver<spdy::Stream>,
    out: Out,
    writer: tokio::task::JoinHandle<()>,
) {
    match pending {
        Pending::PortForward { sandbox, .. } => {
            port_forward_spdy(&agent, &sandbox, &mut streams, &out).await;
        }
        Pending::Exec { options, .. } | Pending::Attach { options, .. } => {
            let timeout = server.config.stream_creation_timeout;
            let Some(command) = command_streams(&mut streams, &out, options, timeout).await else {
                out.send(Outgoing::GoAway).await;
                return;
            };
            // Streams opened later are refused; the end of the stream
            // channel is the client leaving.
            let gone = command.gone.clone();
            let refuse = out.clone();
            tokio::spawn(async move {
                while let Some(extra) = streams.recv().await {
                    refuse.send(Outgoing::Reset(extra.id)).await;
                }
                gone.cancel();
            });
            run_command(agent, pending, command).await;
        }
    }
    out.send(Outgoing::GoAway).await;
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, writer).await;
}

/// Waits for the streams a remote command with `options` needs, named by
/// their `streamType` header.
async fn command_streams(
    streams: &mut mpsc::Receiver<spdy::Stream>,
    out: &Out,
    options: CommandOptions,
    timeout: Duration,
) -> Option<CommandStreams> {
    let expected = 1
        + usize::from(options.stdin)
        + usize::from(options.stdout)
        + usize::from(options.stderr && !options.tty)
        + usize::from(options.tty);
    let mut error = None;
    let mut stdin = None;
    let mut stdout = None;
    let mut stderr = None;
    let mut resize = None;
    let mut received = 0;
    let deadline = tokio::time::Instant::now() + timeout;
    while received < expected {
        let stream = match tokio::time::timeout_at(deadline, streams.recv()).await {
            Ok(Some(stream)) => stream,
            Ok(None) => return None,
            Err(_) => {
                tracing::info!(
                    received,
                    expected,
                    "streaming client did not open its streams in time"
                );
                return None;
            }
        };
        let sink = out.sink(stream.id);
        let slot = match header(&stream.headers, "streamtype").unwrap_or("") {
            "error" => error.replace(sink).is_none(),
            "stdin" => stdin.replace(stream.data).is_none(),
            "stdout" => stdout.replace(sink).is_none(),
            "stderr" => stderr.replace(sink).is_none(),
            "resize" => resize.replace(stream.data).is_none(),
            other => {
                tracing::debug!(stream_type = other, "refusing an unknown stream");
                out.send(Outgoing::Reset(stream.id)).await;
                false
            }
        };
        if slot {
            received += 1;
        }
    }
    Some(CommandStreams {
        stdin,
        stdout,
        stderr,
        resize,
        error: error?,
        gone: CancellationToken::new(),
    })
}

/// Runs an exec or attach over `streams`, then writes its status and
/// closes the output streams.
pub(super) async fn run_command(agent: Agent, pending: Pending, mut streams: CommandStreams) {
    let status = match &pending {
        Pending::Exec {
            container,
            cmd,
            options,
        } => exec(&agent, container, cmd, *options, &mut streams).await,
        Pending::Attach { container, options } => {
            attach(&agent, container, *options, &mut streams).await
        }
        Pending::PortForward { .. } => return,
    };
    let Some(status) = status else {
        return; // The client left: nobody to tell.
    };
    streams.error.write(Bytes::from(status.to_string())).await;
    streams.error.close().await;
    for sink in [&streams.stdout, &streams.stderr].into_iter().flatten() {
        sink.close().await;
    }
}

/// The `metav1.Status` a remote command ends with, as the v4 protocol
/// has it: success, a non-zero exit code, or a failure to run at all.
pub(super) fn status(result: Result<i32, String>) -> serde_json::Value {
    match result {
        Ok(0) => serde_json::json!({"metadata": {}, "status": "Success"}),
        Ok(code) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": format!("command terminated with non-zero exit code: exit status {code}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        }),
        Err(message) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": "InternalError",
            "code": 500,
        }),
    }
}

/// Copies a channel of output into `sink` (or drops it when the client
/// did not ask for that stream).
fn pump_out(mut rx: mpsc::Receiver<Bytes>, sink: Option<Sink>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(chunk) = rx.recv().await {
            if let Some(sink) = &sink
                && !sink.write(chunk).await
            {
                return;
            }
        }
    })
}

/// Terminal sizes from a resize stream's JSON objects.
fn sizes(mut raw: mpsc::Receiver<Bytes>) -> mpsc::Receiver<TerminalSize> {
    #[derive(serde::Deserialize)]
    struct Size {
        #[serde(rename = "Width")]
        width: u16,
        #[serde(rename = "Height")]
        height: u16,
    }
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        let mut buffer = Vec::new();
        while let Some(chunk) = raw.recv().await {
            buffer.extend_from_slice(&chunk);
            let mut parsed = serde_json::Deserializer::from_slice(&buffer).into_iter::<Size>();
            let mut used = 0;
            loop {
                match parsed.next() {
                    Some(Ok(size)) => {
                        used = parsed.byte_offset();
                        let size = TerminalSize {
                            width: size.width,
                            height: size.height,
                        };
                        if tx.send(size).await.is_err() {
                            return;
                        }
                    }
                    Some(Err(e)) if e.is_eof() => break,
                    Some(Err(error)) => {
                        tracing::debug!(%error, "dropping a malformed resize stream");
                        return;
                    }
                    None => break,
                }
            }
            buffer.drain(..used);
            if buffer.len() > 4096 {
                return;
            }
        }
    });
    rx
}

async fn exec(
    agent: &Agent,
    container: &ContainerId,
    cmd: &[String],
    options: CommandOptions,
    streams: &mut CommandStreams,
) -> Option<serde_json::Value> {
    let (out_tx, out_rx) = mpsc::channel(OUTPUT_CHUNKS);
    let mut pumps = vec![pump_out(out_rx, streams.stdout.clone())];
    let err_tx = if options.tty {
        None
    } else {
        let (tx, rx) = mpsc::channel(OUTPUT_CHUNKS);
        pumps.push(pump_out(rx, streams.stderr.clone()));
        Some(tx)
    };
    let interrupted = CancellationToken::new();
    let mut stdin = None;
    let mut stdin_pump = None;
    if let Some(mut input) = streams.stdin.take() {
        let (mut writer, reader) = tokio::io::duplex(INPUT_BUFFER);
        stdin = Some(reader);
        let echo = out_tx.clone();
        let interrupt = interrupted.clone();
        let tty = options.tty;
        stdin_pump = Some(tokio::spawn(async move {
            let mut discipline = LineDiscipline::default();
            while let Some(keys) = input.recv().await {
                let data = if tty {
                    let edited = discipline.feed(&keys);
                    if !edited.echo.is_empty() {
                        let _ = echo.send(Bytes::from(edited.echo)).await;
                    }
                    if edited.interrupt {
                        // The instance is ended; its stdin must not read
                        // end-of-file first.
                        interrupt.cancel();
                        std::future::pending::<()>().await;
                    }
                    if edited.end_of_input {
                        let _ = writer.write_all(&edited.input).await;
                        return;
                    }
                    edited.input
                } else {
                    keys.to_vec()
                };
                if writer.write_all(&data).await.is_err() {
                    return;
                }
            }
        }));
    }
    let mut terminal = None;
    if options.tty {
        let mut size = TerminalSize::default();
        if let Some(raw) = streams.resize.take() {
            let mut resizes = sizes(raw);
            if let Ok(Some(first)) = tokio::time::timeout(FIRST_SIZE_WAIT, resizes.recv()).await {
                size = first;
            }
            // A Wasm guest has no way to learn of later sizes.
            tokio::spawn(async move { while resizes.recv().await.is_some() {} });
        }
        terminal = Some(size);
    }
    let stdio = ExecStdio {
        stdin,
        stdout: out_tx,
        stderr: err_tx,
        terminal,
    };
    let result = tokio::select! {
        result = agent.exec(container, cmd, stdio) => result.map_err(|e| e.to_string()),
        _ = interrupted.cancelled() => Ok(INTERRUPTED),
        _ = streams.gone.cancelled() => {
            tracing::debug!(container_id = %container, "exec client left; the instance is ended");
            return None;
        }
    };
    if let Some(pump) = stdin_pump {
        pump.abort();
    }
    let drained = async {
        for pump in pumps {
            let _ = pump.await;
        }
    };
    if tokio::time::timeout(DRAIN_TIMEOUT, drained).await.is_err() {
        tracing::warn!(container_id = %container, "exec output did not drain in time");
    }
    Some(status(result))
}

async fn attach(
    agent: &Agent,
    container: &ContainerId,
    options: CommandOptions,
    streams: &mut CommandStreams,
) -> Option<serde_json::Value> {
    let mut attachment = match agent.attach(container, options.stdin).await {
        Ok(a) => a,
        Err(e) => return Some(status(Err(e.to_string()))),
    };
    let terminal = attachment.terminal;
    let stdin_pump = match (attachment.stdin.take(), streams.stdin.take()) {
        (Some(stdin), Some(mut input)) => {
            let echo = streams.stdout.clone().filter(|_| terminal);
            Some(tokio::spawn(async move {
                let mut discipline = LineDiscipline::default();
                while let Some(keys) = input.recv().await {
                    let data = if terminal {
                        let edited = discipline.feed(&keys);
                        if let Some(echo) = &echo
                            && !edited.echo.is_empty()
                        {
                            echo.write(Bytes::from(edited.echo)).await;
                        }
                        if edited.end_of_input {
                            break;
                        }
                        edited.input
                    } else {
                        keys.to_vec()
                    };
                    if stdin.write(&data).await.is_err() {
                        break;
                    }
                }
                stdin.close().await;
            }))
        }
        _ => None,
    };
    if let Some(mut resizes) = streams.resize.take() {
        tokio::spawn(async move { while resizes.recv().await.is_some() {} });
    }
    loop {
        let chunk = tokio::select! {
            chunk = attachment.output.recv() => chunk,
            // The stdin pump ends by itself as the connection's input
            // does, closing a stdinOnce container's stdin on the way.
            _ = streams.gone.cancelled() => return None,
        };
        let output = match chunk {
            Ok(output) => output,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                tracing::debug!(container_id = %container, missed, "attached client fell behind; output skipped");
                continue;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
        };
        let (sink, data) = match (terminal, output.stream) {
            (true, _) => (&streams.stdout, Bytes::from(onlcr(&output.data))),
            (false, LogStream::Stdout) => (&streams.stdout, output.data),
            (false, LogStream::Stderr) => (&streams.stderr, output.data),
        };
        if let Some(sink) = sink
            && !sink.write(data).await
        {
            return None;
        }
    }
    if let Some(pump) = stdin_pump {
        pump.abort();
    }
    Some(status(Ok(0)))
}

/// Port forwarding over SPDY: the client opens an error and a data stream
/// per connection, paired by their `requestID` header.
async fn port_forward_spdy(
    agent: &Agent,
    sandbox: &SandboxId,
    streams: &mut mpsc::Receiver<spdy::Stream>,
    out: &Out,
) {
    let mut waiting: HashMap<String, spdy::Stream> = HashMap::new();
    while let Some(stream) = streams.recv().await {
        let port = header(&stream.headers, "port").and_then(|p| p.parse::<u16>().ok());
        let Some(port) = port.filter(|p| *p > 0) else {
            tracing::debug!("refusing a port-forward stream without a valid port");
            out.send(Outgoing::Reset(stream.id)).await;
            continue;
        };
        let request = header(&stream.headers, "requestid")
            .map(str::to_owned)
            .unwrap_or_else(|| port.to_string());
        let Some(other) = waiting.remove(&request) else {
            waiting.insert(request, stream);
            continue;
        };
        let (data, error) = match header(&stream.headers, "streamtype") {
            Some("data") => (stream, other),
            _ => (other, stream),
        };
        let agent = agent.clone();
        let sandbox = sandbox.clone();
        let error_sink = out.sink(error.id);
        let data_sink = out.sink(data.id);
        tokio::spawn(async move {
            forward(&agent, &sandbox, port, data.data, data_sink, &error_sink).await;
            error_sink.close().await;
        });
    }
}

/// Connects one forwarded connection to `port` in the pod and copies both
/// ways; a failure to connect is written to `error`.
pub(super) async fn forward(
    agent: &Agent,
    sandbox: &SandboxId,
    port: u16,
    mut from_client: mpsc::Receiver<Bytes>,
    to_client: Sink,
    error: &Sink,
) {
    let tcp = match agent.port_forward(sandbox, port).await {
        Ok(tcp) => tcp,
        Err(e) => {
            let message = format!("error forwarding port {port} to pod {sandbox}: {e}");
            tracing::info!(pod_sandbox_id = %sandbox, port, error = %e, "port forward failed");
            error.write(Bytes::from(message)).await;
            to_client.close().await;
            return;
        }
    };
    let (mut read, mut write) = tcp.into_split();
    let upstream = async move {
        while let Some(chunk) = from_client.recv().await {
            if write.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = write.shutdown().await;
    };
    let downstream = async {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if !to_client.write(Bytes::copy_from_slice(&buf[..n])).await {
                        return;
                    }
                }
            }
        }
        to_client.close().await;
    };
    // The pod closing its end ends the forward (a WebSocket client cannot
    // half-close); the client half-closing still lets the answer through.
    tokio::pin!(upstream, downstream);
    tokio::select! {
        _ = &mut upstream => downstream.await,
        _ = &mut downstream => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_what_client_go_decodes() {
        assert_eq!(status(Ok(0))["status"], "Success");
        let failed = status(Ok(3));
        assert_eq!(failed["reason"], "NonZeroExitCode");
        assert_eq!(failed["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(failed["details"]["causes"][0]["message"], "3");
        let error = status(Err("no such container".into()));
        assert_eq!(error["status"], "Failure");
        assert_eq!(error["message"], "no such container");
    }

    #[tokio::test]
    async fn resize_objects_are_read_across_chunk_boundaries() {
        let (tx, rx) = mpsc::channel(4);
        let mut sizes = sizes(rx);
        tx.send(Bytes::from_static(b"{\"Width\":80,\"Hei"))
            .await
            .unwrap();
        tx.send(Bytes::from_static(
            b"ght\":24}{\"Width\":100,\"Height\":40}",
        ))
        .await
        .unwrap();
        assert_eq!(
            sizes.recv().await,
            Some(TerminalSize {
                width: 80,
                height: 24
            })
        );
        assert_eq!(
            sizes.recv().await,
            Some(TerminalSize {
                width: 100,
                height: 40
            })
        );
    }
}
