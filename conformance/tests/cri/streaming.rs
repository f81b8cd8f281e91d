//! `Exec`, `Attach` and `PortForward` through the streaming server, with
//! the harness's own (Go-free) client doing what `kubectl exec -it`,
//! `attach` and `port-forward` do, over SPDY/3.1 and WebSocket.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wasmlet_conformance::streaming::{PortForward, RemoteCommand, StreamOptions, Transport};
use wasmlet_conformance::{Code, ContainerConfigBuilder, CriClient, Error, Pod, assert_code, cri};

use crate::daemon::Wasmlet;
use crate::networked::{networked, test_network};
use crate::{ECHO_P1, GUEST_TIMEOUT, HOG_P1, PONG_P2, TICKER_P1, UNKNOWN_ID};

const IO_TIMEOUT: Duration = Duration::from_secs(10);
const TRANSPORTS: [Transport; 2] = [Transport::Spdy, Transport::WebSocket];

const ALL: StreamOptions = StreamOptions {
    stdin: true,
    stdout: true,
    stderr: true,
    tty: false,
};

const TERMINAL: StreamOptions = StreamOptions {
    stdin: true,
    stdout: true,
    stderr: false,
    tty: true,
};

/// An `echo` container that prints each line of its stdin and exits 3
/// when it ends; with `stdin`, it waits for attached clients.
fn echo(name: &str) -> ContainerConfigBuilder {
    ContainerConfigBuilder::new(name, ECHO_P1)
        .env("STDIN_LINES", "1")
        .env("EXIT_CODE", "3")
}

async fn running(wasmlet: &Wasmlet, config: cri::ContainerConfig) -> (CriClient, Pod, String) {
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let id = cri.start(&pod, config).await.unwrap();
    (cri, pod, id)
}

async fn exec_url(
    cri: &mut CriClient,
    id: &str,
    cmd: &[&str],
    options: StreamOptions,
) -> Result<String, Error> {
    cri.runtime()
        .exec(cri::ExecRequest {
            container_id: id.to_owned(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            tty: options.tty,
            stdin: options.stdin,
            stdout: options.stdout,
            stderr: options.stderr,
        })
        .await
        .map(|r| r.into_inner().url)
        .map_err(|source| Error::Rpc {
            rpc: "Exec",
            source,
        })
}

async fn attach_url(
    cri: &mut CriClient,
    id: &str,
    options: StreamOptions,
) -> Result<String, Error> {
    cri.runtime()
        .attach(cri::AttachRequest {
            container_id: id.to_owned(),
            tty: options.tty,
            stdin: options.stdin,
            stdout: options.stdout,
            stderr: options.stderr,
        })
        .await
        .map(|r| r.into_inner().url)
        .map_err(|source| Error::Rpc {
            rpc: "Attach",
            source,
        })
}

async fn port_forward_url(cri: &mut CriClient, pod: &str, ports: &[u16]) -> String {
    cri.runtime()
        .port_forward(cri::PortForwardRequest {
            pod_sandbox_id: pod.to_owned(),
            port: ports.iter().map(|p| i32::from(*p)).collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_streams_stdin_stdout_stderr_and_the_exit_code_over_both_transports() {
    let wasmlet = Wasmlet::start().await;
    let (mut cri, _pod, id) = running(&wasmlet, echo("echo").stdin(false).build()).await;
    for transport in TRANSPORTS {
        let url = exec_url(&mut cri, &id, &["/proc/self/exe", "x"], ALL)
            .await
            .unwrap();
        assert!(url.starts_with("http://127.0.0.1:"), "{url}");
        let mut exec = RemoteCommand::connect(&url, transport, ALL).await.unwrap();
        let protocol = exec.protocol().to_owned();
        assert!(protocol.ends_with(".channel.k8s.io"), "{protocol}");
        // Interactive: each line comes back before stdin ends.
        exec.write_stdin(b"hello\n").await.unwrap();
        exec.wait_stdout_contains("stdin: hello\n", IO_TIMEOUT)
            .await
            .unwrap();
        exec.write_stdin(b"world\n").await.unwrap();
        exec.wait_stdout_contains("stdin: world\n", IO_TIMEOUT)
            .await
            .unwrap();
        exec.close_stdin().await.unwrap();
        let outcome = exec.finish(IO_TIMEOUT).await.unwrap();
        let stdout = outcome.stdout_text();
        assert!(
            stdout.starts_with("argc=2\narg[0]=/proc/self/exe\narg[1]=x\n")
                && stdout.ends_with("stdin: hello\nstdin: world\nstdin closed\n"),
            "{transport:?}: {stdout}"
        );
        assert_eq!(outcome.stderr_text(), "echo done\n", "{transport:?}");
        assert_eq!(outcome.exit_code, Some(3), "{transport:?}: {outcome:?}");
        assert_eq!(outcome.status["reason"], "NonZeroExitCode");
    }
    // The container itself is untouched by its execs.
    let status = cri.container_status(&id).await.unwrap();
    assert_eq!(status.state(), cri::ContainerState::ContainerRunning);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_output_arrives_whole_however_large() {
    let wasmlet = Wasmlet::start().await;
    let config = echo("big").env("LONG_LINE", "3000000").stdin(false).build();
    let (mut cri, _pod, id) = running(&wasmlet, config).await;
    for transport in TRANSPORTS {
        let options = StreamOptions {
            stdin: false,
            ..ALL
        };
        let url = exec_url(&mut cri, &id, &["/proc/self/exe"], options)
            .await
            .unwrap();
        let outcome = RemoteCommand::connect(&url, transport, options)
            .await
            .unwrap()
            .finish(Duration::from_secs(30))
            .await
            .unwrap();
        let stdout = outcome.stdout_text();
        let line = stdout
            .lines()
            .find(|l| l.starts_with("xxx"))
            .unwrap_or_default();
        assert_eq!(line.len(), 3_000_000, "{transport:?}");
        assert!(line.bytes().all(|b| b == b'x'));
        assert!(stdout.ends_with("stdin closed\n"), "{transport:?}");
        assert_eq!(outcome.exit_code, Some(3));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_with_a_terminal_edits_and_echoes_lines_and_knows_its_size() {
    let wasmlet = Wasmlet::start().await;
    let (mut cri, _pod, id) = running(&wasmlet, echo("echo").stdin(false).build()).await;
    for transport in TRANSPORTS {
        let url = exec_url(&mut cri, &id, &["/proc/self/exe"], TERMINAL)
            .await
            .unwrap();
        let mut exec = RemoteCommand::connect(&url, transport, TERMINAL)
            .await
            .unwrap();
        exec.resize(100, 40).await.unwrap();
        // The size sent first is the instance's COLUMNS and LINES; a
        // terminal's lines end with CR LF.
        exec.wait_stdout_contains("env COLUMNS=100\r\n", IO_TIMEOUT)
            .await
            .unwrap();
        exec.wait_stdout_contains("env LINES=40\r\n", IO_TIMEOUT)
            .await
            .unwrap();
        exec.wait_stdout_contains("env TERM=xterm\r\n", IO_TIMEOUT)
            .await
            .unwrap();
        // A typo erased with backspace, then Enter (a raw terminal's CR).
        exec.write_stdin(b"helo\x7flo\r").await.unwrap();
        exec.wait_stdout_contains("stdin: hello\r\n", IO_TIMEOUT)
            .await
            .unwrap();
        // Ctrl-D on an empty line ends input.
        exec.write_stdin(b"\x04").await.unwrap();
        let outcome = exec.finish(IO_TIMEOUT).await.unwrap();
        let stdout = outcome.stdout_text();
        assert!(stdout.contains("helo\x08 \x08lo\r\n"), "echo: {stdout:?}");
        assert!(
            stdout.contains("stdin closed\r\necho done\r\n"),
            "stderr joins stdout: {stdout:?}"
        );
        assert_eq!(outcome.exit_code, Some(3), "{transport:?}");
    }
    // Ctrl-C interrupts the instance: 130, as a shell reports SIGINT.
    let url = exec_url(&mut cri, &id, &["/proc/self/exe"], TERMINAL)
        .await
        .unwrap();
    let mut exec = RemoteCommand::connect(&url, Transport::WebSocket, TERMINAL)
        .await
        .unwrap();
    // The last line before it reads stdin.
    exec.wait_stdout_contains("env TERM=xterm\r\n", IO_TIMEOUT)
        .await
        .unwrap();
    exec.write_stdin(b"abc\x03").await.unwrap();
    let outcome = exec.finish(IO_TIMEOUT).await.unwrap();
    assert_eq!(outcome.exit_code, Some(130), "{outcome:?}");
    assert!(outcome.stdout_text().ends_with("abc^C\r\n"), "{outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_of_a_program_the_image_lacks_exits_127_as_a_shell_would() {
    let wasmlet = Wasmlet::start().await;
    let (mut cri, _pod, id) = running(&wasmlet, echo("echo").stdin(false).build()).await;
    let options = StreamOptions {
        stdin: false,
        ..ALL
    };
    for transport in TRANSPORTS {
        let url = exec_url(&mut cri, &id, &["sh", "-c", "true"], options)
            .await
            .unwrap();
        let outcome = RemoteCommand::connect(&url, transport, options)
            .await
            .unwrap()
            .finish(IO_TIMEOUT)
            .await
            .unwrap();
        assert_eq!(outcome.exit_code, Some(127), "{transport:?}");
        assert!(
            outcome.stderr_text().contains("sh: not found"),
            "{outcome:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_url_works_once_and_expires() {
    let wasmlet = Wasmlet::builder()
        .config("[streaming]\ntoken_ttl_seconds = 2\n")
        .start()
        .await;
    let (mut cri, _pod, id) = running(&wasmlet, echo("echo").stdin(false).build()).await;
    let options = StreamOptions {
        stdin: false,
        ..ALL
    };
    let url = exec_url(&mut cri, &id, &["/proc/self/exe"], options)
        .await
        .unwrap();
    RemoteCommand::connect(&url, Transport::Spdy, options)
        .await
        .unwrap()
        .finish(IO_TIMEOUT)
        .await
        .unwrap();
    for transport in TRANSPORTS {
        let again = RemoteCommand::connect(&url, transport, options).await;
        assert_eq!(again.err().and_then(|e| e.http_status()), Some(404));
    }
    // A token is bound to its path and to the server that made it.
    let attach = attach_url(
        &mut cri,
        &id,
        StreamOptions {
            stdin: false,
            stderr: false,
            ..ALL
        },
    )
    .await
    .unwrap();
    let forged = attach.replace("/attach/", "/exec/");
    let refused = RemoteCommand::connect(&forged, Transport::Spdy, options).await;
    assert_eq!(refused.err().and_then(|e| e.http_status()), Some(404));
    // Unused, a URL expires.
    let url = exec_url(&mut cri, &id, &["/proc/self/exe"], options)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let expired = RemoteCommand::connect(&url, Transport::WebSocket, options).await;
    assert_eq!(expired.err().and_then(|e| e.http_status()), Some(404));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_calls_refuse_what_cannot_be_honoured() {
    let wasmlet = Wasmlet::start().await;
    let ticker = ContainerConfigBuilder::new("ticker", TICKER_P1).build();
    let (mut cri, pod, id) = running(&wasmlet, ticker).await;
    let none = StreamOptions::default();
    assert_code(
        exec_url(&mut cri, &id, &["/proc/self/exe"], none).await,
        Code::InvalidArgument,
    );
    let tty_and_stderr = StreamOptions { tty: true, ..ALL };
    assert_code(
        exec_url(&mut cri, &id, &["/proc/self/exe"], tty_and_stderr).await,
        Code::InvalidArgument,
    );
    assert_code(
        exec_url(&mut cri, &id, &[], ALL).await,
        Code::InvalidArgument,
    );
    assert_code(
        exec_url(&mut cri, UNKNOWN_ID, &["x"], ALL).await,
        Code::NotFound,
    );
    // Created without stdin: nothing to attach a writer to.
    let error = assert_code(attach_url(&mut cri, &id, ALL).await, Code::InvalidArgument);
    assert!(error.message().contains("without stdin"), "{error:?}");
    let port_forward = cri
        .runtime()
        .port_forward(cri::PortForwardRequest {
            pod_sandbox_id: UNKNOWN_ID.to_owned(),
            port: vec![80],
        })
        .await;
    let port_forward = port_forward.map_err(|source| Error::Rpc {
        rpc: "PortForward",
        source,
    });
    assert_code(port_forward, Code::NotFound);
    // A pod without a network has nothing to forward to: the error stream
    // says so.
    let url = port_forward_url(&mut cri, &pod.id, &[80]).await;
    let mut forward = PortForward::connect(&url, Transport::Spdy, &[80])
        .await
        .unwrap();
    let mut stream = forward.open(80).await.unwrap();
    let error = stream.error(IO_TIMEOUT).await.unwrap().unwrap_or_default();
    assert!(error.contains("no network"), "{error}");
    // Not running: no exec.
    cri.stop_container(&id, 0).await.unwrap();
    assert_code(
        exec_url(&mut cri, &id, &["/proc/self/exe"], ALL).await,
        Code::FailedPrecondition,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_writes_the_containers_stdin_and_reads_its_live_output() {
    let wasmlet = Wasmlet::start().await;
    // stdinOnce: the first client's end of input is the container's.
    let (mut cri, _pod, id) = running(&wasmlet, echo("once").stdin(true).build()).await;
    let url = attach_url(&mut cri, &id, ALL).await.unwrap();
    let mut attached = RemoteCommand::connect(&url, Transport::Spdy, ALL)
        .await
        .unwrap();
    attached.write_stdin(b"one\n").await.unwrap();
    attached
        .wait_stdout_contains("stdin: one\n", IO_TIMEOUT)
        .await
        .unwrap();
    attached.close_stdin().await.unwrap();
    let outcome = attached.finish(IO_TIMEOUT).await.unwrap();
    assert!(
        outcome
            .stdout_text()
            .ends_with("stdin: one\nstdin closed\n"),
        "{outcome:?}"
    );
    assert_eq!(outcome.stderr_text(), "echo done\n");
    assert_eq!(outcome.exit_code, Some(0), "attach reports success");
    let status = cri.wait_exited(&id, GUEST_TIMEOUT).await.unwrap();
    assert_eq!(status.exit_code, 3);

    // A first client that vanishes without closing its input detaches all
    // the same: with stdinOnce the container's stdin closes.
    let (mut cri, _pod, id) = running(&wasmlet, echo("vanishing").stdin(true).build()).await;
    let url = attach_url(&mut cri, &id, ALL).await.unwrap();
    let mut attached = RemoteCommand::connect(&url, Transport::WebSocket, ALL)
        .await
        .unwrap();
    attached.write_stdin(b"bye\n").await.unwrap();
    attached
        .wait_stdout_contains("stdin: bye\n", IO_TIMEOUT)
        .await
        .unwrap();
    drop(attached);
    let status = cri.wait_exited(&id, GUEST_TIMEOUT).await.unwrap();
    assert_eq!(status.exit_code, 3);

    // Without stdinOnce the stdin outlives each client.
    let (mut cri, _pod, id) = running(&wasmlet, echo("many").stdin(false).build()).await;
    for (i, transport) in TRANSPORTS.into_iter().enumerate() {
        let url = attach_url(&mut cri, &id, ALL).await.unwrap();
        let mut attached = RemoteCommand::connect(&url, transport, ALL).await.unwrap();
        let line = format!("line {i}\n");
        attached.write_stdin(line.as_bytes()).await.unwrap();
        attached
            .wait_stdout_contains(&format!("stdin: {line}"), IO_TIMEOUT)
            .await
            .unwrap();
        attached.close_stdin().await.unwrap();
        drop(attached);
    }
    let status = cri.container_status(&id).await.unwrap();
    assert_eq!(status.state(), cri::ContainerState::ContainerRunning);
    // An output-only client sees the container's output until it ends.
    let ticker = ContainerConfigBuilder::new("ticker", TICKER_P1)
        .env("TICK_MS", "50")
        .env("TICKS", "40")
        .build();
    let (mut cri, _pod, id) = running(&wasmlet, ticker).await;
    let options = StreamOptions {
        stdin: false,
        stderr: false,
        ..ALL
    };
    let url = attach_url(&mut cri, &id, options).await.unwrap();
    let outcome = RemoteCommand::connect(&url, Transport::WebSocket, options)
        .await
        .unwrap()
        .finish(GUEST_TIMEOUT)
        .await
        .unwrap();
    assert!(outcome.stdout_text().ends_with("tick 40\n"), "{outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_to_a_terminal_container_echoes_and_hands_over_lines() {
    let wasmlet = Wasmlet::start().await;
    let config = echo("tty").stdin(true).tty().build();
    let (mut cri, _pod, id) = running(&wasmlet, config).await;
    let url = attach_url(&mut cri, &id, TERMINAL).await.unwrap();
    let mut attached = RemoteCommand::connect(&url, Transport::WebSocket, TERMINAL)
        .await
        .unwrap();
    attached.resize(80, 24).await.unwrap();
    attached.write_stdin(b"hi\r").await.unwrap();
    attached
        .wait_stdout_contains("hi\r\nstdin: hi\r\n", IO_TIMEOUT)
        .await
        .unwrap();
    attached.write_stdin(b"\x04").await.unwrap();
    let outcome = attached.finish(IO_TIMEOUT).await.unwrap();
    assert!(
        outcome.stdout_text().contains("stdin closed\r\n"),
        "{outcome:?}"
    );
    assert_eq!(
        cri.wait_exited(&id, GUEST_TIMEOUT).await.unwrap().exit_code,
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_connects_to_a_port_inside_the_pods_network() {
    let net = test_network();
    let wasmlet = networked(&net).await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let pong = ContainerConfigBuilder::new("pong", PONG_P2)
        .env("LISTEN_PORT", "7000")
        .env("PONG_NAME", "inside")
        .build();
    cri.start(&pod, pong).await.unwrap();
    for transport in TRANSPORTS {
        let url = port_forward_url(&mut cri, &pod.id, &[7000]).await;
        let mut forward = PortForward::connect(&url, transport, &[7000])
            .await
            .unwrap();
        let mut stream = forward.open(7000).await.unwrap();
        let deadline = tokio::time::Instant::now() + GUEST_TIMEOUT;
        let mut answer = String::new();
        // The server may still be starting: a refused connection shows on
        // the error stream, and a fresh forward tries again.
        loop {
            stream.write_all(b"ping\n").await.unwrap();
            tokio::time::timeout(IO_TIMEOUT, stream.read_to_string(&mut answer))
                .await
                .expect("no answer through the forward")
                .unwrap();
            if !answer.is_empty() || tokio::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let url = port_forward_url(&mut cri, &pod.id, &[7000]).await;
            forward = PortForward::connect(&url, transport, &[7000])
                .await
                .unwrap();
            stream = forward.open(7000).await.unwrap();
        }
        assert_eq!(answer, "pong inside\n", "{transport:?}");
    }
    // Nothing listens on 7001: the error stream says so.
    let url = port_forward_url(&mut cri, &pod.id, &[7001]).await;
    let mut forward = PortForward::connect(&url, Transport::Spdy, &[7001])
        .await
        .unwrap();
    let mut stream = forward.open(7001).await.unwrap();
    let error = stream.error(IO_TIMEOUT).await.unwrap().unwrap_or_default();
    assert!(
        error.contains("error forwarding port 7001") && error.contains("refused"),
        "{error}"
    );
    // Several connections share one SPDY session, each a stream pair.
    let url = port_forward_url(&mut cri, &pod.id, &[]).await;
    let mut forward = PortForward::connect(&url, Transport::Spdy, &[7000])
        .await
        .unwrap();
    for _ in 0..3 {
        let mut stream = forward.open(7000).await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(IO_TIMEOUT, stream.read_to_string(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answer, "pong inside\n");
    }
    cri.stop_pod_sandbox(&pod.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_is_closed_and_garbage_only_ends_its_own_connection() {
    let wasmlet = Wasmlet::builder()
        .config("[streaming]\nidle_timeout_seconds = 1\n")
        .start()
        .await;
    let (mut cri, _pod, id) = running(&wasmlet, echo("echo").stdin(false).build()).await;
    // Nothing crosses the connection: after a second it is closed, without
    // a status (the exec'd instance, waiting on stdin, is ended).
    let url = exec_url(&mut cri, &id, &["/proc/self/exe"], ALL)
        .await
        .unwrap();
    let exec = RemoteCommand::connect(&url, Transport::Spdy, ALL)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let ended = exec.finish(IO_TIMEOUT).await;
    assert!(ended.is_err(), "{ended:?}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // An upgraded connection that then speaks no SPDY is dropped.
    let url = exec_url(&mut cri, &id, &["/proc/self/exe"], ALL)
        .await
        .unwrap();
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut tcp = tokio::net::TcpStream::connect(host).await.unwrap();
    let request = format!(
        "POST /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\
         X-Stream-Protocol-Version: v4.channel.k8s.io\r\nContent-Length: 0\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tcp.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // A control frame of SPDY version 2, then noise.
    tcp.write_all(b"\x80\x02\x00\x01\x00\x00\x00\x04garbage-garbage")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(IO_TIMEOUT, tcp.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(_)) | Ok(Err(_))),
        "the server kept the connection"
    );
    // The server goes on serving.
    let options = StreamOptions {
        stdin: false,
        ..ALL
    };
    let url = exec_url(&mut cri, &id, &["/proc/self/exe"], options)
        .await
        .unwrap();
    let outcome = RemoteCommand::connect(&url, Transport::WebSocket, options)
        .await
        .unwrap()
        .finish(IO_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(outcome.exit_code, Some(3));
}

/// The working set of container `id`, which counts its exec'd instances.
async fn working_set(wasmlet: &Wasmlet, id: &str) -> u64 {
    let stats = crate::stats::container_stats(wasmlet, id).await;
    crate::stats::value(&stats.memory.unwrap_or_default().working_set_bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_whose_client_leaves_is_ended() {
    const MIB: u64 = 1024 * 1024;
    let wasmlet = Wasmlet::start().await;
    let hog = ContainerConfigBuilder::new("hog", HOG_P1)
        .env("HOG_LIMIT_MIB", "8")
        .env("HOG_HOLD", "1")
        .build();
    let (mut cri, pod, id) = running(&wasmlet, hog.clone()).await;
    let log = pod.container_log(&hog);
    wasmlet_conformance::wait_for_log(&log, GUEST_TIMEOUT, "the hog to hold 8 MiB", |r| {
        wasmlet_conformance::stream_lines(r, wasmlet_conformance::Stream::Stdout)
            .iter()
            .any(|l| l == "done holding 8 MiB")
    })
    .await
    .unwrap();
    let alone = working_set(&wasmlet, &id).await;
    // The same program exec'd holds as much again, for as long as it runs.
    let options = StreamOptions {
        stdin: false,
        stderr: false,
        ..ALL
    };
    let url = exec_url(&mut cri, &id, &["/proc/self/exe"], options)
        .await
        .unwrap();
    let mut exec = RemoteCommand::connect(&url, Transport::Spdy, options)
        .await
        .unwrap();
    exec.wait_stdout_contains("done holding 8 MiB", IO_TIMEOUT)
        .await
        .unwrap();
    let both = working_set(&wasmlet, &id).await;
    assert!(both >= alone + 8 * MIB, "{alone} then {both}");
    // Its client hangs up: the instance is ended and its memory returned.
    drop(exec);
    let deadline = tokio::time::Instant::now() + GUEST_TIMEOUT;
    loop {
        let now = working_set(&wasmlet, &id).await;
        if now < alone + MIB {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the exec'd instance still holds memory: {alone} alone, {now} now"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
