//! Pod semantics through the real kubelet, beyond the basics in the
//! parent module: what a pod's guest sees and leaves behind (termination
//! message, environment, volumes), how it ends (OOMKilled, traps), what
//! goes through the kubelet's streaming server and probes, static pods,
//! log rotation, pulls with an imagePullSecret, and a kubelet restart.

use std::time::Duration;

use serde_json::{Value, json};
use wasmlet_conformance::cri;
use wasmlet_conformance::fixtures::cluster::{Cluster, RUNTIME_CLASS};

use super::{
    Node, Outcome, POD_TIMEOUT, PULL_PASSWORD, PULL_USER, container_status, create, ended, phase,
    private_image, wasm_pod,
};
use crate::{ECHO_P1, HOG_P1, PONG_P2, SLEEPER_P1, TICKER_P1, TRAP_P1};

/// Waits until `done` holds for pod `ns/name` (`what` names it in the
/// error); the pod as it then was.
async fn wait(
    cluster: &Cluster,
    ns: &str,
    name: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Result<Value, String> {
    cluster
        .wait_pod(ns, name, what, POD_TIMEOUT, done)
        .await
        .map_err(|e| e.to_string())
}

/// A guest's last words reach the pod's status through its termination log
/// (a file the kubelet mounts from its pod directory, on another mount than
/// wasmlet's root), and the guest sees its pod's name as `HOSTNAME`, as in
/// a Linux container.
pub(super) async fn termination_message(node: &Node) -> Outcome {
    let cluster = &node.cluster;
    let (ns, name) = ("termination-message", "last-words");
    let manifest = wasm_pod(
        ns,
        name,
        ECHO_P1,
        "Never",
        json!({"env": [
            {"name": "WRITE_FILE", "value": "/dev/termination-log"},
            {"name": "EXIT_CODE", "value": "5"},
        ]}),
    );
    create(cluster, ns, &manifest).await?;
    let pod = wait(cluster, ns, name, "Failed", ended).await?;
    let terminated = &container_status(&pod)["state"]["terminated"];
    let message = terminated["message"].as_str().unwrap_or_default();
    if terminated["exitCode"] != 5 || !message.contains("written") {
        return Err(format!(
            "expected exit code 5 and the termination log's \"written\" as the message: {terminated}"
        ));
    }
    let logs = kubectl_logs(cluster, ns, name, None).await?;
    let hostname = format!("env HOSTNAME={name}");
    if !logs.lines().any(|l| l == hostname) {
        return Err(format!(
            "the guest's environment lacks {hostname:?}:\n{logs}"
        ));
    }
    Ok(())
}

/// `kubectl logs` of a pod's container (its only one when `None`).
async fn kubectl_logs(
    cluster: &Cluster,
    ns: &str,
    pod: &str,
    container: Option<&str>,
) -> Result<String, String> {
    let mut args = vec!["logs", "-n", ns, pod];
    if let Some(c) = container {
        args.extend(["-c", c]);
    }
    cluster
        .kubectl(&args, None)
        .await
        .map_err(|e| e.to_string())
}

/// A guest past its memory limit ends `OOMKilled` with 137; a trapping
/// guest ends with 134 and the trap in its message: the guest's own Wasm
/// backtrace, never wasmlet's, though this node's wasmlet runs with
/// `RUST_BACKTRACE=1`.
pub(super) async fn oom_and_trap(node: &Node) -> Outcome {
    let cluster = &node.cluster;
    let ns = "oom-and-trap";
    let hog = wasm_pod(
        ns,
        "hog",
        HOG_P1,
        "Never",
        json!({"resources": {"limits": {"memory": "16Mi"}}}),
    );
    create(cluster, ns, &hog).await?;
    let trap = wasm_pod(ns, "trap", TRAP_P1, "Never", json!({}));
    cluster.apply(&trap).await.map_err(|e| e.to_string())?;
    let pod = wait(cluster, ns, "hog", "Failed", ended).await?;
    let terminated = &container_status(&pod)["state"]["terminated"];
    if terminated["reason"] != "OOMKilled" || terminated["exitCode"] != 137 {
        return Err(format!(
            "the hog over 16Mi ended {terminated}, not OOMKilled with 137"
        ));
    }
    let pod = wait(cluster, ns, "trap", "Failed", ended).await?;
    let terminated = &container_status(&pod)["state"]["terminated"];
    let message = terminated["message"].as_str().unwrap_or_default();
    if terminated["exitCode"] != 134 || !message.contains("unreachable") {
        return Err(format!(
            "the trap ended {terminated}, not 134 with the trap in its message"
        ));
    }
    let logs = kubectl_logs(cluster, ns, "trap", None).await?;
    for (what, text) in [("message", message), ("log", logs.as_str())] {
        for host in ["Stack backtrace", ".cargo/registry", "/rustc/"] {
            if text.contains(host) {
                return Err(format!(
                    "the trap's {what} shows wasmlet's own backtrace ({host:?}):\n{text}"
                ));
            }
        }
    }
    Ok(())
}

/// ConfigMap, Secret, downward API, projected and emptyDir volumes reach
/// the guests, and an init container runs before the others and leaves
/// its file in the emptyDir they share.
pub(super) async fn volumes(node: &Node) -> Outcome {
    let cluster = &node.cluster;
    let (ns, name) = ("volumes", "reader");
    let reader = |container: &str, path: &str, volume: &str, mount: &str| {
        json!({
            "name": container,
            "image": ECHO_P1,
            "imagePullPolicy": "Never",
            "env": [{"name": "READ_FILE", "value": path}],
            "volumeMounts": [{"name": volume, "mountPath": mount}],
        })
    };
    let expected = [
        (
            "configmap",
            "/config/greeting",
            "config",
            "/config",
            "from a configmap",
        ),
        (
            "secret",
            "/secret/token",
            "secret",
            "/secret",
            "from a secret",
        ),
        (
            "downward",
            "/pod/tier",
            "downward",
            "/pod",
            "from-the-downward-api",
        ),
        (
            "projected",
            "/all/token",
            "projected",
            "/all",
            "from a secret",
        ),
        (
            "emptydir",
            "/scratch/from-init",
            "scratch",
            "/scratch",
            "written",
        ),
    ];
    let containers: Vec<Value> = expected
        .iter()
        .map(|(c, path, volume, mount, _)| reader(c, path, volume, mount))
        .collect();
    let manifest = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": "settings", "namespace": ns},
         "data": {"greeting": "from a configmap"}},
        {"apiVersion": "v1", "kind": "Secret",
         "metadata": {"name": "token", "namespace": ns},
         "stringData": {"token": "from a secret"}},
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": name, "namespace": ns, "labels": {"tier": "from-the-downward-api"}},
         "spec": {
            "runtimeClassName": RUNTIME_CLASS,
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 2,
            "initContainers": [{
                "name": "init",
                "image": ECHO_P1,
                "imagePullPolicy": "Never",
                "env": [{"name": "WRITE_FILE", "value": "/scratch/from-init"}],
                "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
            }],
            "containers": containers,
            "volumes": [
                {"name": "config", "configMap": {"name": "settings"}},
                {"name": "secret", "secret": {"secretName": "token"}},
                {"name": "downward", "downwardAPI": {"items": [
                    {"path": "tier", "fieldRef": {"fieldPath": "metadata.labels['tier']"}},
                ]}},
                {"name": "projected", "projected": {"sources": [
                    {"configMap": {"name": "settings"}},
                    {"secret": {"name": "token"}},
                ]}},
                {"name": "scratch", "emptyDir": {}},
            ],
         }},
    ]});
    cluster
        .create_namespace(ns)
        .await
        .map_err(|e| e.to_string())?;
    cluster
        .apply(&manifest.to_string())
        .await
        .map_err(|e| e.to_string())?;
    let pod = wait(cluster, ns, name, "Succeeded or Failed", ended).await?;
    let mut wrong = Vec::new();
    for (container, path, _, _, content) in expected {
        let logs = kubectl_logs(cluster, ns, name, Some(container)).await?;
        let line = format!("file {path}: {content}");
        if !logs.lines().any(|l| l == line) {
            wrong.push(format!("{container} did not print {line:?}:\n{logs}"));
        }
    }
    if phase(&pod) != "Succeeded" || !wrong.is_empty() {
        return Err(format!(
            "phase {}; {}\nstatuses: {}",
            phase(&pod),
            wrong.join("\n"),
            pod["status"]["containerStatuses"]
        ));
    }
    Ok(())
}

/// Whether `pod`'s Ready condition is true.
fn ready(pod: &Value) -> bool {
    pod["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

/// What goes through the kubelet's streaming server and its probes:
/// `kubectl exec` runs a fresh instance with stdin beside a container whose
/// readiness is an exec probe, and with a terminal (`-it`),
/// `kubectl debug` adds an ephemeral container
/// to it, `kubectl attach` feeds the container's stdin, `kubectl logs -f`
/// follows a ticking guest to its end, and `kubectl port-forward` reaches a
/// pod whose readiness is a TCP probe.
pub(super) async fn streaming(node: &Node) -> Outcome {
    let cluster = &node.cluster;
    let ns = "streaming";
    let waiting = wasm_pod(
        ns,
        "waiting",
        ECHO_P1,
        "Never",
        json!({
            "env": [{"name": "STDIN_LINES", "value": "1"}],
            "stdin": true,
            "stdinOnce": true,
            "readinessProbe": {
                "exec": {"command": ["/proc/self/exe", "probing"]},
                "periodSeconds": 1,
            },
        }),
    );
    create(cluster, ns, &waiting).await?;
    let pong = wasm_pod(
        ns,
        "pong",
        PONG_P2,
        "Always",
        json!({
            "env": [
                {"name": "LISTEN_PORT", "value": "7000"},
                {"name": "PONG_NAME", "value": "forwarded"},
            ],
            "ports": [{"containerPort": 7000}],
            "readinessProbe": {"tcpSocket": {"port": 7000}, "periodSeconds": 1},
        }),
    );
    cluster.apply(&pong).await.map_err(|e| e.to_string())?;
    let ticker = wasm_pod(
        ns,
        "ticker",
        TICKER_P1,
        "Never",
        json!({"env": [
            {"name": "TICK_MS", "value": "200"},
            {"name": "TICKS", "value": "25"},
        ]}),
    );
    cluster.apply(&ticker).await.map_err(|e| e.to_string())?;

    // logs -f from while the ticker runs until it ends.
    wait(cluster, ns, "ticker", "Running", |p| phase(p) != "Pending").await?;
    let followed = cluster
        .kubectl(&["logs", "-f", "-n", ns, "ticker"], None)
        .await
        .map_err(|e| e.to_string())?;
    let ticks: Vec<String> = (1..=25).map(|i| format!("tick {i}")).collect();
    if followed.lines().collect::<Vec<_>>() != ticks {
        return Err(format!("kubectl logs -f followed:\n{followed}"));
    }

    wait(cluster, ns, "waiting", "Ready (exec probe)", ready).await?;
    let exec = cluster
        .kubectl(
            &[
                "exec",
                "-i",
                "-n",
                ns,
                "waiting",
                "--",
                "/proc/self/exe",
                "from-kubectl",
            ],
            Some("hello\n"),
        )
        .await
        .map_err(|e| e.to_string())?;
    if !exec.contains("arg[1]=from-kubectl\n") || !exec.contains("stdin: hello\nstdin closed\n") {
        return Err(format!("kubectl exec printed:\n{exec}"));
    }
    cluster
        .kubectl(
            &[
                "debug",
                "-n",
                ns,
                "waiting",
                "-c",
                "debugger",
                &format!("--image={ECHO_P1}"),
                "--image-pull-policy=Never",
            ],
            None,
        )
        .await
        .map_err(|e| e.to_string())?;
    let pod = wait(
        cluster,
        ns,
        "waiting",
        "the ephemeral container's end",
        |p| !p["status"]["ephemeralContainerStatuses"][0]["state"]["terminated"].is_null(),
    )
    .await?;
    let debugger = &pod["status"]["ephemeralContainerStatuses"][0]["state"]["terminated"];
    let debug_logs = kubectl_logs(cluster, ns, "waiting", Some("debugger")).await?;
    if debugger["exitCode"] != 0 || !debug_logs.contains("echo done") {
        return Err(format!(
            "kubectl debug's container ended {debugger}, logging:\n{debug_logs}"
        ));
    }
    exec_with_a_terminal(cluster, ns).await?;
    let attached = cluster
        .kubectl(
            &["attach", "-i", "-n", ns, "waiting", "-c", "waiting"],
            Some("one\ntwo\n"),
        )
        .await
        .map_err(|e| e.to_string())?;
    if !attached.contains("stdin: one\nstdin: two\nstdin closed\n") {
        return Err(format!("kubectl attach printed:\n{attached}"));
    }
    // stdinOnce: the end of kubectl's input was the end of the guest's.
    let pod = wait(cluster, ns, "waiting", "Succeeded", ended).await?;
    if phase(&pod) != "Succeeded" {
        return Err(format!("after attach: {}", pod["status"]));
    }

    wait(cluster, ns, "pong", "Ready (TCP probe)", ready).await?;
    port_forward(cluster, ns, "pong", 7000, "pong forwarded\n").await
}

/// `kubectl exec -it` in a terminal (`script` gives kubectl one): the
/// runtime plays the guest's terminal, echoing what is typed, handing it
/// over a line at a time, and ending its input at Ctrl-D.
async fn exec_with_a_terminal(cluster: &Cluster, ns: &str) -> Outcome {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let argv = cluster.kubectl_argv(&[
        "exec",
        "-it",
        "-n",
        ns,
        "waiting",
        "--",
        "/proc/self/exe",
        "in-a-tty",
    ]);
    let line: Vec<String> = argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut script = tokio::process::Command::new("script");
    script
        .args(["-qec", &line.join(" "), "/dev/null"])
        .env("HOME", std::env::temp_dir())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let mut child = script.spawn().map_err(|e| format!("running script: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("script's stdin")?;
    let mut stdout = child.stdout.take().ok_or("script's stdout")?;
    let typing = async {
        // Give kubectl time to connect before typing.
        tokio::time::sleep(Duration::from_secs(2)).await;
        stdin.write_all(b"typed\r").await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        stdin.write_all(b"\x04").await?;
        // Held open until the session ends: script stops at its end of input.
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok::<_, std::io::Error>(())
    };
    let mut out = Vec::new();
    let reading = stdout.read_to_end(&mut out);
    let finished = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::select! {
            read = reading => read.map(|_| ()),
            typed = typing => typed,
        }
    })
    .await;
    let out = String::from_utf8_lossy(&out).into_owned();
    match finished {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("kubectl exec -it: {e}; it printed:\n{out}")),
        Err(_) => {
            return Err(format!(
                "kubectl exec -it did not end at Ctrl-D; it printed:\n{out}"
            ));
        }
    }
    // Output in a terminal: lines end \r\n.
    for wanted in [
        "arg[1]=in-a-tty\r\n",
        "stdin: typed\r\n",
        "stdin closed\r\n",
    ] {
        if !out.contains(wanted) {
            return Err(format!("kubectl exec -it printed no {wanted:?}:\n{out:?}"));
        }
    }
    Ok(())
}

/// `kubectl port-forward` to `pod`'s `port`: two connections each read
/// `answer`.
async fn port_forward(cluster: &Cluster, ns: &str, pod: &str, port: u16, answer: &str) -> Outcome {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let target = format!(":{port}");
    let mut kubectl = cluster.kubectl_command(&["port-forward", "-n", ns, pod, &target]);
    kubectl
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut child = kubectl.spawn().map_err(|e| e.to_string())?;
    let stdout = child.stdout.take().ok_or("kubectl's stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    // "Forwarding from 127.0.0.1:PORT -> 7000"
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .map_err(|_| "kubectl port-forward did not start".to_owned())?
        .map_err(|e| e.to_string())?
        .unwrap_or_default();
    let local: u16 = line
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("kubectl port-forward said {line:?}"))?;
    for _ in 0..2 {
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", local))
            .await
            .map_err(|e| e.to_string())?;
        let mut got = String::new();
        tokio::time::timeout(Duration::from_secs(30), conn.read_to_string(&mut got))
            .await
            .map_err(|_| "no answer through the forward".to_owned())?
            .map_err(|e| e.to_string())?;
        if got != answer {
            return Err(format!(
                "through kubectl port-forward: {got:?}, not {answer:?}"
            ));
        }
    }
    Ok(())
}

/// A static pod (a manifest in the kubelet's `staticPodPath`) runs on
/// wasmlet, the API shows its mirror pod, and removing the file stops it.
pub(super) async fn static_pod(node: &Node) -> Outcome {
    let cluster = &node.cluster;
    let name = "static-sleeper";
    let file = node.static_pods.path().join(format!("{name}.json"));
    let manifest = wasm_pod("default", name, SLEEPER_P1, "Always", json!({}));
    std::fs::write(&file, manifest).map_err(|e| e.to_string())?;
    let mirror = format!("{name}-{}", cluster.node_name());
    let pod = wait(cluster, "default", &mirror, "Running and Ready", |p| {
        phase(p) == "Running" && ready(p)
    })
    .await?;
    if pod["metadata"]["annotations"]["kubernetes.io/config.mirror"].is_null() {
        return Err(format!("{mirror} is not a mirror pod: {}", pod["metadata"]));
    }
    std::fs::remove_file(&file).map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + POD_TIMEOUT;
    loop {
        let running = node
            .wasmlet
            .cri()
            .runtime()
            .list_containers(cri::ListContainersRequest::default())
            .await
            .map_err(|e| e.to_string())?
            .into_inner()
            .containers
            .into_iter()
            .any(|c| {
                c.labels.get("io.kubernetes.pod.name").map(String::as_str) == Some(mirror.as_str())
                    && c.state == cri::ContainerState::ContainerRunning as i32
            });
        let listed = cluster
            .kubectl(&["get", "pods", "-n", "default", "-o", "name"], None)
            .await
            .map_err(|e| e.to_string())?;
        if !running && !listed.lines().any(|l| l == format!("pod/{mirror}")) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "{mirror} still running ({running}) or listed after its manifest was removed:\n{listed}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The kubelet rotates a chatty container's log past `containerLogMaxSize`
/// (it renames the file and calls ReopenContainerLog), and wasmlet goes on
/// writing to the new file, which `kubectl logs` reads.
pub(super) async fn log_rotation(node: &Node) -> Outcome {
    let cluster = &node.cluster;
    let (ns, name) = ("log-rotation", "chatty");
    // Tens of KB of log a second: past LOG_MAX_SIZE within seconds.
    let manifest = wasm_pod(
        ns,
        name,
        TICKER_P1,
        "Never",
        json!({"env": [
            {"name": "TICK_MS", "value": "2"},
            {"name": "TICKS", "value": "30000"},
        ]}),
    );
    create(cluster, ns, &manifest).await?;
    wait(cluster, ns, name, "Running", |p| phase(p) == "Running").await?;
    let prefix = format!("{ns}_{name}_");
    let deadline = tokio::time::Instant::now() + POD_TIMEOUT;
    let (dir, rotated) = loop {
        let dir = std::fs::read_dir(cluster.pod_logs_dir())
            .map_err(|e| e.to_string())?
            .filter_map(Result::ok)
            .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path().join(name));
        let rotated: Vec<String> = dir
            .as_ref()
            .and_then(|d| std::fs::read_dir(d).ok())
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|f| f.starts_with("0.log."))
            .collect();
        if let (Some(dir), false) = (dir, rotated.is_empty()) {
            break (dir, rotated);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err("the kubelet never rotated the container's log".to_owned());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // wasmlet writes to the reopened 0.log, and kubectl logs reads it.
    let current = dir.join("0.log");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let outcome = loop {
        if std::fs::metadata(&current).is_ok_and(|m| m.len() > 0) {
            let tail = cluster
                .kubectl(&["logs", "-n", ns, name, "--tail=1"], None)
                .await
                .map_err(|e| e.to_string())?;
            break if tail.starts_with("tick ") {
                Ok(())
            } else {
                Err(format!("kubectl logs --tail=1 after rotation: {tail:?}"))
            };
        }
        if tokio::time::Instant::now() >= deadline {
            break Err(format!(
                "after the rotation ({rotated:?}) wasmlet wrote nothing to a new 0.log"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    cluster
        .kubectl(&["delete", "pod", "-n", ns, name, "--wait=false"], None)
        .await
        .map_err(|e| e.to_string())?;
    outcome
}

/// A pod whose image needs credentials: without an `imagePullSecrets` its
/// pull fails and the pod's events say the image needs credentials (none
/// were sent); with a docker-registry Secret the kubelet passes them in
/// PullImage and the pod runs.
pub(super) async fn pull_secret(node: &Node) -> Outcome {
    let cluster = &node.cluster;
    let ns = "pull-secret";
    let image = private_image(&node.registry);
    let pod = |name: &str, secret: Option<&str>| {
        let mut pod: Value = serde_json::from_str(&wasm_pod(
            ns,
            name,
            &image,
            "Never",
            json!({"imagePullPolicy": "Always"}),
        ))
        .expect("wasm_pod is JSON");
        if let Some(secret) = secret {
            pod["spec"]["imagePullSecrets"] = json!([{"name": secret}]);
        }
        pod.to_string()
    };
    create(cluster, ns, &pod("anonymous", None)).await?;
    let deadline = tokio::time::Instant::now() + POD_TIMEOUT;
    loop {
        let events = cluster
            .get_json(&[
                "get",
                "events",
                "-n",
                ns,
                "--field-selector",
                "involvedObject.name=anonymous",
            ])
            .await
            .map_err(|e| e.to_string())?;
        let said = events["items"].as_array().is_some_and(|items| {
            items.iter().any(|e| {
                e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("needs credentials"))
            })
        });
        if said {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "no event says the image needs credentials: {}",
                events["items"]
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let server = format!("--docker-server={}", node.registry.host());
    let user = format!("--docker-username={PULL_USER}");
    let password = format!("--docker-password={PULL_PASSWORD}");
    cluster
        .kubectl(
            &[
                "create",
                "secret",
                "docker-registry",
                "creds",
                "-n",
                ns,
                &server,
                &user,
                &password,
            ],
            None,
        )
        .await
        .map_err(|e| e.to_string())?;
    cluster
        .apply(&pod("with-secret", Some("creds")))
        .await
        .map_err(|e| e.to_string())?;
    let pod = wait(cluster, ns, "with-secret", "Succeeded", ended).await?;
    if phase(&pod) != "Succeeded" {
        return Err(format!("with the secret: {}", pod["status"]));
    }
    Ok(())
}

/// The kubelet stopped and started again (as a service manager restarting
/// it would) finds its pod running in wasmlet and keeps it: the same
/// container, not restarted, still Ready; and it starts new pods.
pub(super) async fn kubelet_restart(node: &mut Node) -> Outcome {
    let ns = "kubelet-restart";
    let manifest = wasm_pod(ns, "before", SLEEPER_P1, "Always", json!({}));
    create(&node.cluster, ns, &manifest).await?;
    let running = |p: &Value| phase(p) == "Running" && ready(p);
    let before = wait(&node.cluster, ns, "before", "Running and Ready", running).await?;
    node.cluster.restart_kubelet(0).map_err(|e| e.to_string())?;
    let cluster = &node.cluster;
    let after = wasm_pod(ns, "after", SLEEPER_P1, "Always", json!({}));
    cluster.apply(&after).await.map_err(|e| e.to_string())?;
    wait(cluster, ns, "after", "Running and Ready", running).await?;
    let now = wait(cluster, ns, "before", "Running and Ready", running).await?;
    let (was, is) = (container_status(&before), container_status(&now));
    if was["containerID"] != is["containerID"] || is["restartCount"] != 0 {
        return Err(format!(
            "across the kubelet's restart the container went from {was} to {is}"
        ));
    }
    Ok(())
}
