//! The real `kubectl exec`, `attach` and `port-forward` against wasmlet's
//! streaming server, through the harness's stand-in for the API server
//! and the kubelet's proxy ([`KubeApi`]): the resolver makes the CRI call
//! the kubelet would make and the stand-in proxies kubectl's upgrade to
//! the URL wasmlet answered. Both of kubectl's transports are exercised
//! (WebSocket, its default, and SPDY/3.1, what a kubelet always speaks),
//! and each test checks which one actually served the session, since
//! kubectl silently falls back to SPDY when a WebSocket upgrade fails.
//!
//! These tests need kubectl on the PATH (it is on this project's CI
//! machines); without it they say so on stderr and pass, unless
//! `WASMLET_REQUIRE_KUBECTL=1`. The harness's own streaming client (the
//! `streaming` tests) covers the same ground without kubectl.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use wasmlet_conformance::fixtures::kube_api::{
    ContainerDescription, KubeApi, KubectlTransport, PodDescription, StreamKind, StreamRequest,
    skip_without_kubectl,
};
use wasmlet_conformance::{ContainerConfigBuilder, CriClient, Pod, cri};

use crate::daemon::Wasmlet;
use crate::networked::{networked, test_network};
use crate::{ECHO_P1, PONG_P2};

const KUBECTL_TIMEOUT: Duration = Duration::from_secs(30);
const NAMESPACE: &str = "default";
const POD: &str = "wasm";

/// The stand-in API server for one pod of `wasmlet`'s, its containers
/// known by name.
async fn api_for(
    cri: &CriClient,
    pod: &Pod,
    containers: &[(&str, &str)],
    description: PodDescription,
) -> KubeApi {
    let ids: Arc<Mutex<HashMap<String, String>>> = Arc::new(Mutex::new(
        containers
            .iter()
            .map(|(name, id)| (name.to_string(), id.to_string()))
            .collect(),
    ));
    let cri = cri.clone();
    let pod_id = pod.id.clone();
    let api = KubeApi::start(move |request: StreamRequest| {
        let mut cri = cri.clone();
        let id = ids.lock().unwrap().get(&request.container).cloned();
        let pod_id = pod_id.clone();
        async move {
            let runtime = cri.runtime();
            let url = match request.kind {
                StreamKind::Exec => runtime
                    .exec(cri::ExecRequest {
                        container_id: id.ok_or("no such container")?,
                        cmd: request.command,
                        tty: request.tty,
                        stdin: request.stdin,
                        stdout: request.stdout,
                        stderr: request.stderr,
                    })
                    .await
                    .map(|r| r.into_inner().url),
                StreamKind::Attach => runtime
                    .attach(cri::AttachRequest {
                        container_id: id.ok_or("no such container")?,
                        tty: request.tty,
                        stdin: request.stdin,
                        stdout: request.stdout,
                        stderr: request.stderr,
                    })
                    .await
                    .map(|r| r.into_inner().url),
                StreamKind::PortForward => runtime
                    .port_forward(cri::PortForwardRequest {
                        pod_sandbox_id: pod_id,
                        port: request.ports.iter().map(|p| i32::from(*p)).collect(),
                    })
                    .await
                    .map(|r| r.into_inner().url),
            };
            url.map_err(|status| status.message().to_owned())
        }
    })
    .await
    .unwrap();
    api.add_pod(description);
    api
}

/// Asserts that the one streaming session of `kind` went over
/// `transport` (a WebSocket upgrade is a GET, SPDY's a POST).
fn assert_transport(api: &KubeApi, kind: StreamKind, transport: KubectlTransport) {
    let method = match transport {
        KubectlTransport::WebSocket => "GET",
        KubectlTransport::Spdy => "POST",
    };
    let sessions: Vec<_> = api
        .stream_requests()
        .into_iter()
        .filter(|r| r.kind == kind)
        .map(|r| r.method)
        .collect();
    assert!(
        !sessions.is_empty() && sessions.iter().all(|m| m == method),
        "expected {kind:?} over {transport:?} only, got {sessions:?}: {:#?}",
        api.requests()
    );
}

/// Runs kubectl with `input` on its stdin; returns its exit code, stdout
/// and stderr.
async fn run(mut kubectl: tokio::process::Command, input: &[u8]) -> (i32, String, String) {
    kubectl
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = kubectl.spawn().expect("starting kubectl");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).await.unwrap();
    drop(stdin);
    let output = tokio::time::timeout(KUBECTL_TIMEOUT, child.wait_with_output())
        .await
        .expect("kubectl did not finish")
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A pod with one `echo` container that reads stdin line by line and
/// exits 3 at its end: it waits on its stdin (kept open for attach).
async fn echo_pod(wasmlet: &Wasmlet, once: bool) -> (CriClient, Pod, String) {
    let mut cri = wasmlet.cri();
    let pod = cri
        .run_pod(wasmlet.pod().name(POD).namespace(NAMESPACE).build())
        .await
        .unwrap();
    let config = ContainerConfigBuilder::new("echo", ECHO_P1)
        .env("STDIN_LINES", "1")
        .env("EXIT_CODE", "3")
        .stdin(once)
        .build();
    let id = cri.start(&pod, config).await.unwrap();
    (cri, pod, id)
}

fn echo_description() -> PodDescription {
    PodDescription::new(NAMESPACE, POD).container(
        ContainerDescription::new("echo")
            .stdin(true)
            .stdin_once(true),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_exec_runs_a_fresh_instance_with_stdin_and_its_exit_code() {
    if skip_without_kubectl("kubectl_exec") {
        return;
    }
    let wasmlet = Wasmlet::start().await;
    let (cri, pod, id) = echo_pod(&wasmlet, true).await;
    for transport in [KubectlTransport::WebSocket, KubectlTransport::Spdy] {
        let api = api_for(&cri, &pod, &[("echo", &id)], echo_description()).await;
        let mut kubectl = api.kubectl(transport);
        kubectl.args(["exec", "-i", "-n", NAMESPACE, POD, "-c", "echo", "--"]);
        kubectl.args(["/proc/self/exe", "from-kubectl"]);
        let (code, stdout, stderr) = run(kubectl, b"hello\nworld\n").await;
        assert_eq!(code, 3, "{transport:?}: {stdout}\n{stderr}");
        assert!(
            stdout.contains("arg[1]=from-kubectl\n")
                && stdout.contains("stdin: hello\nstdin: world\nstdin closed\n"),
            "{transport:?}: {stdout}"
        );
        assert!(stderr.contains("echo done"), "{transport:?}: {stderr}");
        assert_transport(&api, StreamKind::Exec, transport);
    }
    // Much more input than SPDY's initial flow-control window (64 KiB),
    // as `kubectl cp` sends through exec.
    let input: String = (0..40_000).map(|i| format!("line {i:06}\n")).collect();
    for transport in [KubectlTransport::WebSocket, KubectlTransport::Spdy] {
        let api = api_for(&cri, &pod, &[("echo", &id)], echo_description()).await;
        let mut kubectl = api.kubectl(transport);
        kubectl.args(["exec", "-i", "-n", NAMESPACE, POD, "-c", "echo", "--"]);
        kubectl.arg("/proc/self/exe");
        let (code, stdout, stderr) = run(kubectl, input.as_bytes()).await;
        assert_eq!(code, 3, "{transport:?}: {stderr}");
        let echoed = stdout
            .lines()
            .filter(|l| l.starts_with("stdin: line "))
            .count();
        assert_eq!(echoed, 40_000, "{transport:?}");
        assert!(
            stdout.ends_with("stdin: line 039999\nstdin closed\n"),
            "{transport:?}"
        );
    }
    // A program the image does not hold: 127, like a shell.
    let api = api_for(&cri, &pod, &[("echo", &id)], echo_description()).await;
    let mut kubectl = api.kubectl(KubectlTransport::Spdy);
    kubectl.args(["exec", "-n", NAMESPACE, POD, "-c", "echo", "--", "sh"]);
    let (code, _, stderr) = run(kubectl, b"").await;
    assert_eq!(code, 127, "{stderr}");
    assert!(stderr.contains("sh: not found"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_attach_feeds_the_containers_stdin_and_shows_its_output() {
    if skip_without_kubectl("kubectl_attach") {
        return;
    }
    let wasmlet = Wasmlet::start().await;
    for transport in [KubectlTransport::WebSocket, KubectlTransport::Spdy] {
        let (mut cri, pod, id) = echo_pod(&wasmlet, true).await;
        let api = api_for(&cri, &pod, &[("echo", &id)], echo_description()).await;
        let mut kubectl = api.kubectl(transport);
        kubectl.args(["attach", "-i", "-n", NAMESPACE, POD, "-c", "echo"]);
        let (code, stdout, stderr) = run(kubectl, b"one\ntwo\n").await;
        assert_eq!(code, 0, "{transport:?}: {stdout}\n{stderr}");
        assert!(
            stdout.contains("stdin: one\nstdin: two\nstdin closed\n"),
            "{transport:?}: {stdout}\n{stderr}"
        );
        assert_transport(&api, StreamKind::Attach, transport);
        // stdinOnce: kubectl's end of input closed the container's stdin,
        // so it finished.
        let status = cri.wait_exited(&id, crate::GUEST_TIMEOUT).await.unwrap();
        assert_eq!(status.exit_code, 3, "{status:?}");
        cri.stop_pod_sandbox(&pod.id).await.unwrap();
        cri.remove_pod_sandbox(&pod.id).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_port_forward_reaches_a_port_inside_the_pods_network() {
    if skip_without_kubectl("kubectl_port_forward") {
        return;
    }
    let net = test_network();
    let wasmlet = networked(&net).await;
    let mut cri = wasmlet.cri();
    let pod = cri
        .run_pod(wasmlet.pod().name(POD).namespace(NAMESPACE).build())
        .await
        .unwrap();
    let config = ContainerConfigBuilder::new("pong", PONG_P2)
        .env("LISTEN_PORT", "7000")
        .env("PONG_NAME", "inside")
        .build();
    let id = cri.start(&pod, config).await.unwrap();
    let description = PodDescription::new(NAMESPACE, POD)
        .container(ContainerDescription::new("pong").port(Some("pong"), 7000));
    for transport in [KubectlTransport::WebSocket, KubectlTransport::Spdy] {
        let api = api_for(&cri, &pod, &[("pong", &id)], description.clone()).await;
        let mut kubectl = api.port_forward(transport, NAMESPACE, POD, &[":7000"]);
        kubectl
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = kubectl.spawn().unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        // "Forwarding from 127.0.0.1:PORT -> 7000"
        let line = tokio::time::timeout(KUBECTL_TIMEOUT, lines.next_line())
            .await
            .expect("kubectl port-forward did not start")
            .unwrap()
            .unwrap_or_default();
        let local: u16 = line
            .split("127.0.0.1:")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected kubectl output {line:?}"));
        // Twice: each connection is a stream pair of its own.
        for _ in 0..2 {
            let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", local))
                .await
                .unwrap();
            let mut answer = String::new();
            tokio::time::timeout(KUBECTL_TIMEOUT, conn.read_to_string(&mut answer))
                .await
                .expect("no answer through the forward")
                .unwrap();
            assert_eq!(answer, "pong inside\n", "{transport:?}");
        }
        assert_transport(&api, StreamKind::PortForward, transport);
        child.kill().await.unwrap();
    }
    cri.stop_pod_sandbox(&pod.id).await.unwrap();
}
