//! wasmlet under a real kubelet: one cluster ([`Cluster`]: etcd, API
//! server, controller manager, scheduler, kubelet) in front of one wasmlet
//! daemon whose pods are networked by a throwaway CNI bridge, driven only
//! through the API with the real `kubectl` and asserted on its `-o json`.
//!
//! Starting a cluster takes seconds, so one test starts one and runs the
//! scenarios on it, each in a namespace of its own and concurrently where
//! they can be; every scenario runs even when another fails, and the test
//! fails naming each scenario that did. The cluster is then torn down and
//! the test fails if anything of it is left on the host.
//!
//! Without the Kubernetes binaries (`../shared/kube`, or `KUBE_BIN_DIR`)
//! the test prints `SKIP` and passes, unless `WASMLET_REQUIRE_KUBE=1`
//! (which `scripts/test`, and so CI, sets).

use std::future::Future;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wasmlet_conformance::fixtures::cluster::{
    Cluster, ClusterOptions, KubeBinaries, RUNTIME_CLASS, kube_or_skip,
};
use wasmlet_conformance::pod_network::TestNetwork;
use wasmlet_conformance::{POD_UID_LABEL, cri};

use crate::daemon::Wasmlet;
use crate::networked::test_network;
use crate::{ECHO_P1, HELLO_HTTP_P2, SLEEPER_P1};

/// How long a pod may take to be scheduled, started and run to its end.
const POD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a failing container may take to be restarted and put in
/// back-off (the kubelet's first back-off is 10 s).
const CRASH_LOOP_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a deleted pod may keep running in the runtime (its grace
/// period is 2 s).
const STOPPED_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a deleted pod's sandbox may stay in the runtime: the kubelet
/// removes it in its garbage collection, which runs once a minute.
const REMOVED_TIMEOUT: Duration = Duration::from_secs(100);

/// A kubelet and its runtime. Fields drop in order: the cluster (kubelet
/// first) before the runtime it talks to, the runtime before its network.
struct Node {
    cluster: Cluster,
    wasmlet: Wasmlet,
    net: TestNetwork,
}

impl Node {
    async fn start(binaries: &KubeBinaries) -> Node {
        let net = test_network();
        let wasmlet = Wasmlet::builder()
            .config(format!(
                "cgroup_driver = \"cgroupfs\"\n{}",
                net.wasmlet_config()
            ))
            .start()
            .await;
        let cluster = Cluster::start(binaries, ClusterOptions::new(wasmlet.socket()))
            .await
            .unwrap_or_else(|e| panic!("starting the cluster: {e}"));
        Node {
            cluster,
            wasmlet,
            net,
        }
    }
}

/// What a scenario found wrong, if anything.
type Outcome = Result<(), String>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_node_runs_wasm_pods() {
    let Some(binaries) = kube_or_skip("kube::kube_node_runs_wasm_pods") else {
        return;
    };
    let started = Instant::now();
    let mut node = Node::start(&binaries).await;
    eprintln!("kube: node Ready in {:?}", started.elapsed());

    let mut outcomes = vec![timed("node registers Ready", node_registers_ready(&node)).await];
    let (completes, exit_code, crash_loop, deleted, resized, metrics) = tokio::join!(
        timed("run to completion", run_to_completion(&node)),
        timed("exit code", exit_code(&node)),
        timed("crash loop", crash_loop(&node)),
        timed("delete leaves nothing", delete_leaves_nothing(&node)),
        timed("in-place resize", in_place_resize(&node)),
        timed("resource metrics", resource_metrics(&node)),
    );
    outcomes.extend([completes, exit_code, crash_loop, deleted, resized, metrics]);
    let failures: Vec<String> = outcomes.into_iter().filter_map(Result::err).collect();
    // Panicking while the node is up prints every component's log.
    assert!(
        failures.is_empty(),
        "{} scenario(s) failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );

    let teardown = Instant::now();
    let leftovers = node.cluster.teardown();
    assert!(
        leftovers.is_empty(),
        "the cluster left behind:\n  {}",
        leftovers.join("\n  ")
    );
    eprintln!(
        "kube: torn down in {:?}; {:?} in all",
        teardown.elapsed(),
        started.elapsed()
    );
}

/// Runs a scenario, prefixing its failure with its name and noting how
/// long it took.
async fn timed(name: &str, scenario: impl Future<Output = Outcome>) -> Outcome {
    let started = Instant::now();
    let outcome = scenario.await;
    eprintln!(
        "kube: {name}: {:?} in {:?}",
        outcome.is_ok(),
        started.elapsed()
    );
    outcome.map_err(|e| format!("[{name}] {e}"))
}

/// The node is Ready on its own address, not loopback, and says it runs
/// wasmlet, which tells the kubelet the cgroup driver it was configured
/// with; the RuntimeClass is there.
async fn node_registers_ready(node: &Node) -> Outcome {
    let cluster = &node.cluster;
    let config = node
        .wasmlet
        .cri()
        .runtime_config()
        .await
        .map_err(|e| e.to_string())?;
    let driver = config.linux.map(|l| l.cgroup_driver);
    if driver != Some(cri::CgroupDriver::Cgroupfs as i32) {
        return Err(format!(
            "wasmlet's RuntimeConfig reports cgroup driver {driver:?}, not cgroupfs"
        ));
    }
    let json = cluster
        .get_json(&["get", "node", cluster.node_name()])
        .await
        .map_err(|e| e.to_string())?;
    let runtime = json["status"]["nodeInfo"]["containerRuntimeVersion"]
        .as_str()
        .unwrap_or_default();
    if !runtime.starts_with("wasmlet://") {
        return Err(format!(
            "containerRuntimeVersion is {runtime:?}, not wasmlet://…"
        ));
    }
    let internal: Vec<&str> = json["status"]["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["type"] == "InternalIP")
        .filter_map(|a| a["address"].as_str())
        .collect();
    if internal != [cluster.node_ip().to_string()] {
        return Err(format!(
            "InternalIP {internal:?}, expected [{}]",
            cluster.node_ip()
        ));
    }
    let class = cluster
        .get_json(&["get", "runtimeclass", RUNTIME_CLASS])
        .await
        .map_err(|e| e.to_string())?;
    if class["handler"] != RUNTIME_CLASS {
        return Err(format!(
            "RuntimeClass {RUNTIME_CLASS} has handler {}",
            class["handler"]
        ));
    }
    Ok(())
}

/// A Wasm pod, as a user writes it: RuntimeClass `wasm`, one container
/// running an imported sample guest.
fn wasm_pod(namespace: &str, name: &str, image: &str, restart: &str, spec: Value) -> String {
    let mut container = json!({
        "name": name,
        "image": image,
        "imagePullPolicy": "Never",
    });
    if let (Some(container), Some(extra)) = (container.as_object_mut(), spec.as_object()) {
        container.extend(extra.clone());
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "runtimeClassName": RUNTIME_CLASS,
            "restartPolicy": restart,
            "terminationGracePeriodSeconds": 2,
            "containers": [container],
        },
    })
    .to_string()
}

fn phase(pod: &Value) -> &str {
    pod["status"]["phase"].as_str().unwrap_or_default()
}

fn container_status(pod: &Value) -> &Value {
    &pod["status"]["containerStatuses"][0]
}

fn ended(pod: &Value) -> bool {
    matches!(phase(pod), "Succeeded" | "Failed")
}

/// Creates `namespace` and applies `manifest` in it.
async fn create(cluster: &Cluster, namespace: &str, manifest: &str) -> Outcome {
    cluster
        .create_namespace(namespace)
        .await
        .map_err(|e| e.to_string())?;
    cluster.apply(manifest).await.map_err(|e| e.to_string())
}

/// A run-to-completion pod succeeds, and `kubectl logs` shows what the
/// guest printed.
async fn run_to_completion(node: &Node) -> Outcome {
    let cluster = &node.cluster;
    let (ns, name) = ("run-to-completion", "echo");
    let manifest = wasm_pod(
        ns,
        name,
        ECHO_P1,
        "Never",
        json!({
            "args": ["hello", "from a kubelet"],
            "env": [{"name": "GREETING", "value": "hi"}],
        }),
    );
    create(cluster, ns, &manifest).await?;
    let pod = cluster
        .wait_pod(ns, name, "Succeeded or Failed", POD_TIMEOUT, ended)
        .await
        .map_err(|e| e.to_string())?;
    let terminated = &container_status(&pod)["state"]["terminated"];
    if phase(&pod) != "Succeeded" || terminated["exitCode"] != 0 {
        return Err(format!(
            "phase {}, container state {}",
            phase(&pod),
            container_status(&pod)["state"]
        ));
    }
    if terminated["reason"] != "Completed" {
        return Err(format!(
            "terminated with reason {}, not Completed",
            terminated["reason"]
        ));
    }
    // The image as the pod named it and by its repo digest, as with
    // containerd; not bare digests.
    let status = container_status(&pod);
    let image_id = status["imageID"].as_str().unwrap_or_default();
    if status["image"] != ECHO_P1 || !image_id.starts_with("wasmlet.local/samples/echo@sha256:") {
        return Err(format!(
            "image {} and imageID {image_id:?}: expected {ECHO_P1} and wasmlet.local/samples/echo@sha256:…",
            status["image"]
        ));
    }
    let logs = cluster
        .kubectl(&["logs", "-n", ns, name], None)
        .await
        .map_err(|e| e.to_string())?;
    for line in [
        "arg[1]=hello",
        "arg[2]=from a kubelet",
        "env GREETING=hi",
        "echo done",
    ] {
        if !logs.lines().any(|l| l == line) {
            return Err(format!("kubectl logs has no line {line:?}:\n{logs}"));
        }
    }
    Ok(())
}

/// A container that exits 7 with `restartPolicy: Never` fails the pod, and
/// its status says 7.
async fn exit_code(node: &Node) -> Outcome {
    let cluster = &node.cluster;
    let (ns, name) = ("exit-code", "exits-7");
    let manifest = wasm_pod(
        ns,
        name,
        ECHO_P1,
        "Never",
        json!({"env": [{"name": "EXIT_CODE", "value": "7"}]}),
    );
    create(cluster, ns, &manifest).await?;
    let pod = cluster
        .wait_pod(ns, name, "Succeeded or Failed", POD_TIMEOUT, ended)
        .await
        .map_err(|e| e.to_string())?;
    let terminated = &container_status(&pod)["state"]["terminated"];
    if phase(&pod) != "Failed" || terminated["exitCode"] != 7 || terminated["reason"] != "Error" {
        return Err(format!(
            "phase {}, container state {}; expected Failed, terminated with exitCode 7 (reason Error)",
            phase(&pod),
            container_status(&pod)["state"]
        ));
    }
    Ok(())
}

/// A container that keeps exiting 7 under `restartPolicy: Always` is
/// restarted, then backed off: CrashLoopBackOff, the last exit code 7.
async fn crash_loop(node: &Node) -> Outcome {
    let cluster = &node.cluster;
    let (ns, name) = ("crash-loop", "crashes");
    let manifest = wasm_pod(
        ns,
        name,
        ECHO_P1,
        "Always",
        json!({"env": [{"name": "EXIT_CODE", "value": "7"}]}),
    );
    create(cluster, ns, &manifest).await?;
    let pod = cluster
        .wait_pod(
            ns,
            name,
            "in CrashLoopBackOff after a restart",
            CRASH_LOOP_TIMEOUT,
            |pod| {
                let status = container_status(pod);
                status["state"]["waiting"]["reason"] == "CrashLoopBackOff"
                    && status["restartCount"].as_u64().is_some_and(|n| n >= 1)
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    let last = &container_status(&pod)["lastState"]["terminated"];
    if last["exitCode"] != 7 {
        return Err(format!(
            "in CrashLoopBackOff, but the last termination is {last}, not exit code 7"
        ));
    }
    Ok(())
}

/// An in-place resize (`kubectl patch --subresource resize`) of a running
/// function's memory, 16Mi → 64Mi, reaches both its container's limit
/// (UpdateContainerResources) and its pod's (UpdatePodSandboxResources):
/// a 30 MiB request refused before is served after.
async fn in_place_resize(node: &Node) -> Outcome {
    let cluster = &node.cluster;
    let (ns, name) = ("resize", "function");
    let memory = |m: &str| json!({"requests": {"memory": m, "cpu": "100m"}, "limits": {"memory": m, "cpu": "100m"}});
    let manifest = wasm_pod(
        ns,
        name,
        HELLO_HTTP_P2,
        "Always",
        json!({
            "ports": [{"containerPort": 8080}],
            "resources": memory("16Mi"),
            "resizePolicy": [{"resourceName": "memory", "restartPolicy": "NotRequired"}],
        }),
    );
    create(cluster, ns, &manifest).await?;
    let pod = cluster
        .wait_pod(ns, name, "Running", POD_TIMEOUT, |pod| {
            phase(pod) == "Running" && pod["status"]["podIP"].is_string()
        })
        .await
        .map_err(|e| e.to_string())?;
    let ip = pod["status"]["podIP"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let alloc = |mib: u32| {
        let net = &node.net;
        let ip = ip.clone();
        async move {
            let deadline = tokio::time::Instant::now() + POD_TIMEOUT;
            loop {
                match net.http_get(
                    &ip,
                    8080,
                    &format!("/alloc?mib={mib}"),
                    Duration::from_secs(10),
                ) {
                    Ok((code, _)) => return Ok(code),
                    Err(e) if tokio::time::Instant::now() >= deadline => {
                        return Err(format!("GET /alloc?mib={mib} at {ip}: {e}"));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        }
    };
    let before = alloc(30).await?;
    if before != 500 {
        return Err(format!(
            "30 MiB under a 16Mi limit answered {before}, not 500"
        ));
    }
    let patch = json!({"spec": {"containers": [{"name": name, "resources": memory("64Mi")}]}});
    cluster
        .kubectl(
            &[
                "patch",
                "pod",
                name,
                "-n",
                ns,
                "--subresource",
                "resize",
                "--patch",
                &patch.to_string(),
            ],
            None,
        )
        .await
        .map_err(|e| e.to_string())?;
    cluster
        .wait_pod(ns, name, "resized to 64Mi", POD_TIMEOUT, |pod| {
            container_status(pod)["resources"]["limits"]["memory"] == "64Mi"
        })
        .await
        .map_err(|e| e.to_string())?;
    let after = alloc(30).await?;
    if after != 200 {
        return Err(format!(
            "30 MiB after the resize to 64Mi answered {after}, not 200 (the pod-level limit did not follow?)"
        ));
    }
    Ok(())
}

/// What metrics-server scrapes for `kubectl top` and the HPA — the
/// kubelet's `/metrics/resource` — carries a running Wasm container's CPU
/// and memory, with the kubelet configured as the README says (the
/// `PodAndContainerStatsFromCRI` gate off: the kubelet's CRI stats
/// provider reads ListPodSandboxStats and ListContainerStats).
async fn resource_metrics(node: &Node) -> Outcome {
    let cluster = &node.cluster;
    let (ns, name) = ("resource-metrics", "sleeper");
    let manifest = wasm_pod(ns, name, SLEEPER_P1, "Always", json!({}));
    create(cluster, ns, &manifest).await?;
    cluster
        .wait_pod(ns, name, "Running", POD_TIMEOUT, |pod| {
            phase(pod) == "Running"
        })
        .await
        .map_err(|e| e.to_string())?;
    let path = format!(
        "/api/v1/nodes/{}/proxy/metrics/resource",
        cluster.node_name()
    );
    let labels = format!(r#"{{container="{name}",namespace="{ns}",pod="{name}"}}"#);
    let pod_labels = format!(r#"{{namespace="{ns}",pod="{name}"}}"#);
    let wanted = [
        format!("container_cpu_usage_seconds_total{labels}"),
        format!("container_memory_working_set_bytes{labels}"),
        format!("pod_cpu_usage_seconds_total{pod_labels}"),
        format!("pod_memory_working_set_bytes{pod_labels}"),
    ];
    let deadline = tokio::time::Instant::now() + POD_TIMEOUT;
    loop {
        let text = cluster
            .kubectl(&["get", "--raw", &path], None)
            .await
            .map_err(|e| e.to_string())?;
        let value = |series: &str| {
            text.lines()
                .find(|l| l.starts_with(series))
                .and_then(|l| l[series.len()..].split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
        };
        let missing: Vec<&String> = wanted.iter().filter(|w| value(w).is_none()).collect();
        let memory = value(&wanted[1]).unwrap_or(0.0);
        if missing.is_empty() && memory > 0.0 {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "{path} lacks {missing:?} (or the working set is 0: {memory}):\n{text}"
            ));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The runtime's sandboxes and containers of the pod with `uid`.
async fn in_runtime(
    node: &Node,
    uid: &str,
) -> Result<(Vec<cri::PodSandbox>, Vec<cri::Container>), String> {
    let mut cri = node.wasmlet.cri();
    let labels = std::collections::HashMap::from([(POD_UID_LABEL.to_owned(), uid.to_owned())]);
    let sandboxes = cri
        .list_pod_sandbox(Some(cri::PodSandboxFilter {
            label_selector: labels.clone(),
            ..Default::default()
        }))
        .await
        .map_err(|e| e.to_string())?;
    let containers = cri
        .list_containers(Some(cri::ContainerFilter {
            label_selector: labels,
            ..Default::default()
        }))
        .await
        .map_err(|e| e.to_string())?;
    Ok((sandboxes, containers))
}

/// `kubectl delete pod` of a running pod: the API forgets it at once, and
/// within a garbage-collection period wasmlet holds nothing of it — no
/// sandbox, no container, no network namespace, no IP.
async fn delete_leaves_nothing(node: &Node) -> Outcome {
    let cluster = &node.cluster;
    let (ns, name) = ("delete", "sleeper");
    let manifest = wasm_pod(ns, name, SLEEPER_P1, "Always", json!({}));
    create(cluster, ns, &manifest).await?;
    let pod = cluster
        .wait_pod(ns, name, "Running and ready", POD_TIMEOUT, |pod| {
            phase(pod) == "Running" && container_status(pod)["ready"] == true
        })
        .await
        .map_err(|e| e.to_string())?;
    let uid = pod["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let ip = pod["status"]["podIP"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if !node.net.contains(&ip) || !node.net.allocated_ips().contains(&ip) {
        return Err(format!(
            "pod IP {ip:?} is not one the test network allocated ({:?})",
            node.net.allocated_ips()
        ));
    }
    let (sandboxes, containers) = in_runtime(node, &uid).await?;
    let ready = cri::PodSandboxState::SandboxReady as i32;
    let running = cri::ContainerState::ContainerRunning as i32;
    if sandboxes.len() != 1
        || sandboxes[0].state != ready
        || containers.len() != 1
        || containers[0].state != running
    {
        return Err(format!(
            "before the delete, wasmlet holds sandboxes {sandboxes:?} and containers {containers:?} \
             for pod {uid}: expected one ready sandbox and one running container"
        ));
    }
    let sandbox_id = sandboxes[0].id.clone();

    let deleted = Instant::now();
    cluster
        .kubectl(
            &[
                "delete",
                "pod",
                name,
                "-n",
                ns,
                "--wait=true",
                "--timeout=60s",
            ],
            None,
        )
        .await
        .map_err(|e| e.to_string())?;
    if cluster
        .kubectl(&["get", "pod", name, "-n", ns], None)
        .await
        .is_ok()
    {
        return Err("the API still has the pod after kubectl delete --wait".to_owned());
    }
    // The kubelet stops the pod at once (its network goes with the
    // sandbox's stop) and removes it at its next garbage collection.
    loop {
        let (sandboxes, containers) = in_runtime(node, &uid).await?;
        let stopped = sandboxes.iter().all(|s| s.state != ready)
            && containers.iter().all(|c| c.state != running)
            && !node.net.allocated_ips().contains(&ip);
        if stopped {
            eprintln!(
                "kube: the deleted pod was stopped {:?} after kubectl delete",
                deleted.elapsed()
            );
            break;
        }
        if deleted.elapsed() >= STOPPED_TIMEOUT {
            return Err(format!(
                "{STOPPED_TIMEOUT:?} after kubectl delete, the pod is not stopped: sandboxes \
                 {sandboxes:?}, containers {containers:?}, allocated IPs {:?} (the pod's: {ip})",
                node.net.allocated_ips()
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let gone = loop {
        let (sandboxes, containers) = in_runtime(node, &uid).await?;
        if sandboxes.is_empty() && containers.is_empty() {
            break deleted.elapsed();
        }
        if deleted.elapsed() >= REMOVED_TIMEOUT {
            return Err(format!(
                "{REMOVED_TIMEOUT:?} after kubectl delete, wasmlet still holds sandboxes {sandboxes:?} \
                 and containers {containers:?} of pod {uid}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("kube: the deleted pod left wasmlet {gone:?} after kubectl delete");
    if let Some(netns) = node
        .net
        .namespaces()
        .into_iter()
        .find(|n| n.contains(&sandbox_id))
    {
        return Err(format!(
            "the deleted pod's network namespace {netns} is still pinned"
        ));
    }
    Ok(())
}
