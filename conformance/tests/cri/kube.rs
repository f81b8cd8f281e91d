//! wasmlet under a real kubelet: one cluster ([`Cluster`]: etcd, API
//! server, controller manager, scheduler, kubelet) in front of one wasmlet
//! daemon whose pods are networked by a throwaway CNI bridge, driven only
//! through the API with the real `kubectl` and asserted on its `-o json`.
//!
//! Starting a cluster takes seconds, so one test starts one and runs the
//! scenarios on it, each in a namespace of its own and concurrently where
//! they can be; every scenario runs even when another fails, and the test
//! fails naming each scenario that did. The cluster is then torn down and
//! the test fails if anything of it is left on the host. A second cluster
//! then runs a few scenarios with the kubelet's other configuration: the
//! evented PLEG, and stats read only from CRI. The scenarios of what a
//! pod's guest sees, how it ends and what goes through the kubelet's
//! streaming server are [`pods`]'; two nodes under one API server are
//! [`nodes`]'s.
//!
//! Without the Kubernetes binaries (`../shared/kube`, or `KUBE_BIN_DIR`)
//! the test prints `SKIP` and passes, unless `WASMLET_REQUIRE_KUBE=1`
//! (which `scripts/test`, and so CI, sets).

mod nodes;
mod pods;

use std::future::Future;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wasmlet_conformance::fixtures::cluster::{
    Cluster, ClusterOptions, KubeBinaries, NodeOptions, RUNTIME_CLASS, kube_or_skip,
};
use wasmlet_conformance::fixtures::registry::{Registry, RegistryOptions};
use wasmlet_conformance::pod_network::TestNetwork;
use wasmlet_conformance::{POD_UID_LABEL, cri};

use crate::daemon::{Wasmlet, WasmletBuilder};
use crate::networked::test_network;
use crate::{ECHO_P1, HELLO_HTTP_P2, PONG_P2, SLEEPER_P1};

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
/// How long 200 replicas may take to be Ready, and to leave wasmlet once
/// deleted (the kubelet removes sandboxes in its garbage collection).
const SCALE_TIMEOUT: Duration = Duration::from_secs(150);

/// A node's runtime: a wasmlet daemon (root, socket and streaming port of
/// its own) whose pods are networked by a CNI bridge and /24 of their own.
/// Fields drop in order: the runtime before its network.
struct Runtime {
    wasmlet: Wasmlet,
    net: TestNetwork,
}

impl Runtime {
    /// A runtime logging with `rust_log`, its wasmlet built from what
    /// `builder` makes of the fixture's.
    async fn start(
        rust_log: &str,
        extra_config: &str,
        builder: impl FnOnce(WasmletBuilder) -> WasmletBuilder,
    ) -> Runtime {
        let net = test_network();
        let mut wasmlet = builder(Wasmlet::builder())
            .config(format!(
                "cgroup_driver = \"cgroupfs\"\n{extra_config}\n{}",
                net.wasmlet_config()
            ))
            .rust_log(rust_log)
            .build();
        // As an operator debugging a node might: tenants must still never
        // see wasmlet's own backtraces (scenario "OOMKilled and trap").
        wasmlet.set_env("RUST_BACKTRACE", Some("1"));
        wasmlet.serve().await;
        Runtime { wasmlet, net }
    }
}

/// A kubelet and its runtime. Fields drop in order: the cluster (kubelet
/// first) before the runtime it talks to, the runtime before its network.
struct Node {
    cluster: Cluster,
    wasmlet: Wasmlet,
    net: TestNetwork,
    /// The kubelet's `staticPodPath`.
    static_pods: tempfile::TempDir,
    /// A registry that serves only with credentials ([`PULL_USER`]),
    /// holding the echo sample as [`Node::private_image`].
    registry: Registry,
}

/// The user and password [`Node::registry`] asks for.
const PULL_USER: &str = "kube-puller";
const PULL_PASSWORD: &str = "pull-s3cret";

/// The kubelet rotates a container's log past this size (its default is
/// 10Mi), checking every [`LOG_MONITOR_INTERVAL`].
const LOG_MAX_SIZE: &str = "64Ki";
const LOG_MONITOR_INTERVAL: &str = "3s";

impl Node {
    async fn start(binaries: &KubeBinaries) -> Node {
        Self::start_with(binaries, |o| o, "info").await
    }

    /// A node whose cluster options `options` adjusts, its wasmlet logging
    /// with `rust_log`.
    async fn start_with(
        binaries: &KubeBinaries,
        options: impl FnOnce(ClusterOptions) -> ClusterOptions,
        rust_log: &str,
    ) -> Node {
        let registry = Registry::start(RegistryOptions {
            basic_auth: Some((PULL_USER.into(), PULL_PASSWORD.into())),
        })
        .await
        .unwrap_or_else(|e| panic!("starting the registry: {e}"));
        let image = private_image(&registry);
        Wasmlet::push(
            std::path::Path::new(wasm_samples::ECHO_P1),
            &image,
            registry.basic_auth(),
        );
        let insecure = format!("[registry]\ninsecure = [\"{}\"]", registry.host());
        let Runtime { wasmlet, net } = Runtime::start(rust_log, &insecure, |b| b).await;
        let static_pods = tempfile::Builder::new()
            .prefix("wasmlet-static-pods-")
            .tempdir()
            .expect("creating the static pod directory");
        let kubelet = NodeOptions::new(wasmlet.socket())
            .kubelet_config("staticPodPath", json!(static_pods.path()))
            .kubelet_config("containerLogMaxSize", json!(LOG_MAX_SIZE))
            .kubelet_config("containerLogMaxFiles", json!(2))
            .kubelet_config("containerLogMonitorInterval", json!(LOG_MONITOR_INTERVAL));
        let cluster = Cluster::start(
            binaries,
            options(ClusterOptions::with_nodes(vec![kubelet]).kube_proxy()),
        )
        .await
        .unwrap_or_else(|e| panic!("starting the cluster: {e}"));
        // Pods reach Services through their gateway: the host routes the
        // Service range to the node's own interface, where kube-proxy's
        // rules send it on to pods (never off the machine).
        net.add_route(&cluster.service_cidr())
            .unwrap_or_else(|e| panic!("routing pods to Services: {e}"));
        Node {
            cluster,
            wasmlet,
            net,
            static_pods,
            registry,
        }
    }
}

/// The echo sample in `registry`, which serves it only with credentials.
fn private_image(registry: &Registry) -> String {
    format!("{}/private/echo:v1", registry.host())
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

    let mut outcomes = vec![
        timed("node registers Ready", node_registers_ready(&node)).await,
        timed("deploy manifests", deploy_manifests(&node)).await,
    ];
    let (completes, exit_code, crash_loop, deleted, resized, metrics, services, scale) = tokio::join!(
        timed("run to completion", run_to_completion(&node)),
        timed("exit code", exit_code(&node)),
        timed("crash loop", crash_loop(&node)),
        timed("delete leaves nothing", delete_leaves_nothing(&node)),
        timed("in-place resize", in_place_resize(&node)),
        timed("resource metrics", resource_metrics(&node)),
        timed("services", services(&node)),
        timed("200 replicas", two_hundred_replicas(&node)),
    );
    outcomes.extend([
        completes, exit_code, crash_loop, deleted, resized, metrics, services, scale,
    ]);
    // Then the rest, once the 200 replicas are gone from the two cores.
    let (last_words, oom_and_trap, volumes, streaming, static_pod, rotation, secret) = tokio::join!(
        timed("termination message", pods::termination_message(&node)),
        timed("OOMKilled and trap", pods::oom_and_trap(&node)),
        timed("volumes", pods::volumes(&node)),
        timed("streaming", pods::streaming(&node)),
        timed("static pod", pods::static_pod(&node)),
        timed("log rotation", pods::log_rotation(&node)),
        timed("image pull secret", pods::pull_secret(&node)),
    );
    outcomes.extend([
        last_words,
        oom_and_trap,
        volumes,
        streaming,
        static_pod,
        rotation,
        secret,
    ]);
    // Last, as it takes the node's kubelet away for a moment.
    outcomes.push(timed("kubelet restart", pods::kubelet_restart(&mut node)).await);
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
    drop(node);

    // Again with the evented PLEG, which learns of containers' changes
    // from GetContainerEvents instead of relisting, and with the other
    // stats configuration (the kubelet reading stats only from CRI): one
    // cluster at a time, as both use the host's KUBE-* chains.
    let started = Instant::now();
    // The CRI calls' spans at DEBUG show what the kubelet called.
    let mut node = Node::start_with(
        &binaries,
        |o| {
            o.kubelet_feature_gate("EventedPLEG", true)
                .kubelet_feature_gate("PodAndContainerStatsFromCRI", true)
        },
        "info,wasmlet::traced=debug",
    )
    .await;
    let (completes, exit_code, crash_loop, stats) = tokio::join!(
        timed(
            "evented PLEG: run to completion",
            self::run_to_completion(&node)
        ),
        timed("evented PLEG: exit code", self::exit_code(&node)),
        timed("evented PLEG: crash loop", self::crash_loop(&node)),
        timed(
            "stats from CRI: resource metrics",
            resource_metrics_from_cri(&node)
        ),
    );
    let failures: Vec<String> = [completes, exit_code, crash_loop, stats]
        .into_iter()
        .filter_map(Result::err)
        .collect();
    assert!(
        failures.is_empty(),
        "{} scenario(s) failed with EventedPLEG and PodAndContainerStatsFromCRI:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    let log = node.wasmlet.daemon_log();
    for call in [
        "GetContainerEvents",
        "ListPodSandboxStats",
        "ListPodSandboxMetrics",
    ] {
        assert!(
            log.contains(call),
            "the kubelet with EventedPLEG and PodAndContainerStatsFromCRI never called {call}"
        );
    }
    let leftovers = node.cluster.teardown();
    assert!(
        leftovers.is_empty(),
        "the cluster left behind:\n  {}",
        leftovers.join("\n  ")
    );
    eprintln!("kube: evented PLEG run in {:?}", started.elapsed());
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

/// deploy/'s manifests (the RuntimeClasses, the installer's DaemonSet and
/// its RBAC) are valid for this API server: `kubectl apply
/// --dry-run=server` runs them through its validation and admission (the
/// namespace made for real first).
async fn deploy_manifests(node: &Node) -> Outcome {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    let dir = dir.to_string_lossy();
    // A dry run creates nothing, so the namespaced objects need their
    // namespace to exist.
    node.cluster
        .create_namespace("wasmlet-system")
        .await
        .map_err(|e| e.to_string())?;
    let out = node
        .cluster
        .kubectl(&["apply", "--dry-run=server", "-f", &dir], None)
        .await
        .map_err(|e| e.to_string())?;
    for object in [
        "runtimeclass.node.k8s.io/wasm",
        "runtimeclass.node.k8s.io/wasmtime",
        "namespace/wasmlet-system",
        "serviceaccount/wasmlet-installer",
        "clusterrole.rbac.authorization.k8s.io/wasmlet-installer",
        "clusterrolebinding.rbac.authorization.k8s.io/wasmlet-installer",
        "daemonset.apps/wasmlet-installer",
    ] {
        if !out
            .lines()
            .any(|l| l.starts_with(object) && l.contains("(server dry run)"))
        {
            return Err(format!(
                "kubectl apply --dry-run=server did not take {object}:\n{out}"
            ));
        }
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

/// Creates namespace `ns` with a sleeping Wasm pod `name` in it, and waits
/// until it runs.
async fn running_sleeper(cluster: &Cluster, ns: &str, name: &str) -> Outcome {
    let manifest = wasm_pod(ns, name, SLEEPER_P1, "Always", json!({}));
    create(cluster, ns, &manifest).await?;
    cluster
        .wait_pod(ns, name, "Running", POD_TIMEOUT, |pod| {
            phase(pod) == "Running"
        })
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// What metrics-server scrapes for `kubectl top` and the HPA — the
/// kubelet's `/metrics/resource` — carries a running Wasm container's CPU
/// and memory, with the kubelet configured as the README says (the
/// `PodAndContainerStatsFromCRI` gate off: the kubelet's CRI stats
/// provider reads ListPodSandboxStats and ListContainerStats).
async fn resource_metrics(node: &Node) -> Outcome {
    let cluster = &node.cluster;
    let (ns, name) = ("resource-metrics", "sleeper");
    running_sleeper(cluster, ns, name).await?;
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

/// The same pod with the kubelet's `PodAndContainerStatsFromCRI` gate on,
/// where the kubelet reads stats only from the runtime: its summary API
/// (what eviction and `kubectl get --raw .../stats/summary` read) has the
/// container's CPU and memory from ListPodSandboxStats, `/metrics/cadvisor`
/// has its `container_*` series from ListPodSandboxMetrics, and
/// `/metrics/resource` has the pod's series but, as the README says, no
/// `container_*` ones: this kubelet's CRI stats provider does not publish
/// them in that mode, which is why the README advises leaving the gate off.
async fn resource_metrics_from_cri(node: &Node) -> Outcome {
    let cluster = &node.cluster;
    let (ns, name) = ("stats-from-cri", "sleeper");
    running_sleeper(cluster, ns, name).await?;
    let proxy = format!("/api/v1/nodes/{}/proxy", cluster.node_name());
    let get = |path: String| async move {
        cluster
            .kubectl(&["get", "--raw", &path], None)
            .await
            .map_err(|e| e.to_string())
    };
    let labels = format!(r#"{{container="{name}","#);
    let deadline = tokio::time::Instant::now() + POD_TIMEOUT;
    loop {
        let summary = get(format!("{proxy}/stats/summary")).await?;
        let cadvisor = get(format!("{proxy}/metrics/cadvisor")).await?;
        let resource = get(format!("{proxy}/metrics/resource")).await?;
        let summary: Value = serde_json::from_str(&summary)
            .map_err(|e| format!("stats/summary is not JSON: {e}"))?;
        let pod = summary["pods"].as_array().and_then(|pods| {
            pods.iter().find(|p| {
                p["podRef"]["name"] == json!(name) && p["podRef"]["namespace"] == json!(ns)
            })
        });
        let container = pod
            .and_then(|p| p["containers"].as_array())
            .and_then(|cs| cs.iter().find(|c| c["name"] == json!(name)));
        let positive = |v: Option<&Value>, field: &str| {
            v.and_then(|v| v.pointer(field))
                .and_then(Value::as_u64)
                .unwrap_or(0)
                > 0
        };
        let mut missing = Vec::new();
        if !positive(container, "/memory/workingSetBytes") {
            missing.push("stats/summary: the container's memory.workingSetBytes".to_owned());
        }
        if container
            .and_then(|c| c.pointer("/cpu/usageCoreNanoSeconds"))
            .is_none()
        {
            missing.push("stats/summary: the container's cpu.usageCoreNanoSeconds".to_owned());
        }
        if !positive(pod, "/memory/workingSetBytes") {
            missing.push("stats/summary: the pod's memory.workingSetBytes".to_owned());
        }
        for family in [
            "container_cpu_usage_seconds_total",
            "container_memory_working_set_bytes",
        ] {
            let found = cadvisor.lines().any(|l| {
                l.starts_with(&format!("{family}{labels}"))
                    && l.contains(&format!(r#"namespace="{ns}""#))
            });
            if !found {
                missing.push(format!("metrics/cadvisor: {family} for the container"));
            }
        }
        let pod_labels = format!(r#"{{namespace="{ns}",pod="{name}"}}"#);
        for family in [
            "pod_cpu_usage_seconds_total",
            "pod_memory_working_set_bytes",
        ] {
            if !resource
                .lines()
                .any(|l| l.starts_with(&format!("{family}{pod_labels}")))
            {
                missing.push(format!("metrics/resource: {family}"));
            }
        }
        if missing.is_empty() {
            // What the README says this kubelet does with the gate on: if
            // it ever publishes them, the README's advice is out of date.
            let container_series = format!(
                r#"container_memory_working_set_bytes{{container="{name}",namespace="{ns}""#
            );
            if resource.lines().any(|l| l.starts_with(&container_series)) {
                return Err(format!(
                    "with PodAndContainerStatsFromCRI on, metrics/resource now has {container_series}: \
                     the README's advice to leave the gate off (section Stats) is out of date"
                ));
            }
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "with PodAndContainerStatsFromCRI on, missing: {missing:?}\n\
                 stats/summary pod: {pod:?}\nmetrics/cadvisor:\n{cadvisor}"
            ));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Whether `ip` routes through the interface `iface` (the node's own,
/// which holds every ClusterIP).
fn routes_via(iface: &str, ip: &str) -> Result<bool, String> {
    let route = std::process::Command::new("ip")
        .args(["route", "get", ip])
        .output()
        .map_err(|e| e.to_string())?;
    let route = String::from_utf8_lossy(&route.stdout);
    Ok(route.contains(&format!(" dev {iface} ")) || route.contains(&format!(" dev {iface}\n")))
}

/// `GET path` at `ip:port` from the host, once `ip` is checked to route
/// through the node's own interface (a ClusterIP, the node's address) or
/// the pods' bridge: never off the machine.
fn host_get(node: &Node, ip: &str, port: u16, path: &str) -> Result<(u16, String), String> {
    // The node's own address is local: it is the interface's.
    let local = ip == node.cluster.node_ip().to_string();
    if !local && !routes_via(node.cluster.node_interface(), ip)? {
        node.net.check_route(ip)?;
    }
    get_checked(ip, port, path)
}

/// `GET path` over plain HTTP/1.1; the caller has checked the route.
fn get_checked(ip: &str, port: u16, path: &str) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let timeout = Duration::from_secs(5);
    let addr: std::net::SocketAddr = format!("{ip}:{port}").parse().map_err(|e| format!("{e}"))?;
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("{addr}: {e}"))?;
    wasmlet_conformance::pod_network::parse_response(&raw)
}

/// The name of the replica that answered ("hello from NAME path=...").
fn replica(body: &str) -> Option<String> {
    body.strip_prefix("hello from ")?
        .split_whitespace()
        .next()
        .map(str::to_owned)
}

/// Services through kube-proxy (iptables mode) in front of a wasi:http
/// Deployment: the ClusterIP answers from the node and spreads over both
/// replicas; a NodePort answers on the node's address; another Wasm pod
/// reaches the Service through `wasi:http/outgoing-handler` by its
/// ClusterIP and by a name from its /etc/hosts, and a TCP server's Service
/// through `wasi:sockets`; and a rollout (readiness
/// gating the endpoints, the kubelet's preStop sleep draining them) serves
/// every request while the replicas are replaced.
async fn services(node: &Node) -> Outcome {
    let cluster = &node.cluster;
    let ns = "services";
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": ns},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "runtimeClassName": RUNTIME_CLASS,
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{
                        "name": "web",
                        "image": HELLO_HTTP_P2,
                        "imagePullPolicy": "Never",
                        "ports": [{"containerPort": 8080}],
                        "env": [{"name": "HELLO_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                        "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1},
                        "lifecycle": {"preStop": {"sleep": {"seconds": 2}}},
                    }],
                },
            },
        },
    });
    let service = |name: &str, kind: &str| {
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "type": kind,
                "selector": {"app": "web"},
                "ports": [{"port": 80, "targetPort": 8080}],
            },
        })
    };
    create(cluster, ns, &deployment.to_string()).await?;
    cluster
        .apply(&service("web", "ClusterIP").to_string())
        .await
        .map_err(|e| e.to_string())?;
    cluster
        .apply(&service("web-node", "NodePort").to_string())
        .await
        .map_err(|e| e.to_string())?;
    let available = |want: u64| async move {
        let deadline = tokio::time::Instant::now() + POD_TIMEOUT;
        loop {
            let d = cluster
                .get_json(&["get", "deployment", "web", "-n", ns])
                .await
                .map_err(|e| e.to_string())?;
            let status = &d["status"];
            if status["updatedReplicas"] == want
                && status["readyReplicas"] == want
                && status["replicas"] == want
                && d["metadata"]["generation"] == status["observedGeneration"]
            {
                return Ok::<(), String>(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "deployment web never had {want} ready replicas: {status}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    available(2).await?;
    let svc = cluster
        .get_json(&["get", "service", "web", "-n", ns])
        .await
        .map_err(|e| e.to_string())?;
    let cluster_ip = svc["spec"]["clusterIP"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    // kube-proxy syncs its rules a moment after the endpoints change.
    let deadline = tokio::time::Instant::now() + POD_TIMEOUT;
    let mut seen = std::collections::BTreeSet::new();
    let mut last: Option<String>;
    while seen.len() < 2 {
        match host_get(node, &cluster_ip, 80, "/") {
            Ok((200, body)) => {
                seen.extend(replica(&body));
                last = Some(body);
            }
            Ok(other) => return Err(format!("ClusterIP {cluster_ip} answered {other:?}")),
            Err(e) => last = Some(e),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "ClusterIP {cluster_ip} answered only from {seen:?} (last: {last:?})"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let node_port = cluster
        .get_json(&["get", "service", "web-node", "-n", ns])
        .await
        .map_err(|e| e.to_string())?["spec"]["ports"][0]["nodePort"]
        .as_u64()
        .unwrap_or_default() as u16;
    let node_ip = cluster.node_ip().to_string();
    match host_get(node, &node_ip, node_port, "/") {
        Ok((200, body)) if replica(&body).is_some() => {}
        other => return Err(format!("NodePort {node_ip}:{node_port} answered {other:?}")),
    }

    // From another Wasm pod: by ClusterIP, and by a name its /etc/hosts
    // holds (hostAliases), through wasi:http/outgoing-handler.
    let mut client = serde_json::from_str::<Value>(&wasm_pod(
        ns,
        "client",
        HELLO_HTTP_P2,
        "Always",
        json!({"ports": [{"containerPort": 8080}]}),
    ))
    .map_err(|e| e.to_string())?;
    client["spec"]["hostAliases"] = json!([{"ip": cluster_ip, "hostnames": ["web"]}]);
    cluster
        .apply(&client.to_string())
        .await
        .map_err(|e| e.to_string())?;
    let client = cluster
        .wait_pod(ns, "client", "Running", POD_TIMEOUT, |pod| {
            phase(pod) == "Running" && pod["status"]["podIP"].is_string()
        })
        .await
        .map_err(|e| e.to_string())?;
    let client_ip = client["status"]["podIP"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    for url in [format!("http://{cluster_ip}/"), "http://web/".to_owned()] {
        let deadline = tokio::time::Instant::now() + POD_TIMEOUT;
        loop {
            let answer = node.net.http_get(
                &client_ip,
                8080,
                &format!("/fetch?url={url}"),
                Duration::from_secs(10),
            );
            match answer {
                Ok((200, body)) if body.starts_with("fetched 200 hello from web-") => break,
                other if tokio::time::Instant::now() >= deadline => {
                    return Err(format!("the client pod fetching {url} got {other:?}"));
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    // Through wasi:sockets: a TCP client pod reaches a pong server behind
    // a Service by its ClusterIP.
    let mut server = serde_json::from_str::<Value>(&wasm_pod(
        ns,
        "pong",
        PONG_P2,
        "Always",
        json!({
            "ports": [{"containerPort": 7000}],
            "env": [{"name": "LISTEN_PORT", "value": "7000"}, {"name": "PONG_NAME", "value": "behind-a-service"}],
        }),
    ))
    .map_err(|e| e.to_string())?;
    server["metadata"]["labels"] = json!({"app": "pong"});
    cluster
        .apply(&server.to_string())
        .await
        .map_err(|e| e.to_string())?;
    let pong_service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "pong", "namespace": ns},
        "spec": {"selector": {"app": "pong"}, "ports": [{"port": 7000, "targetPort": 7000}]},
    });
    cluster
        .apply(&pong_service.to_string())
        .await
        .map_err(|e| e.to_string())?;
    cluster
        .wait_pod(ns, "pong", "Running", POD_TIMEOUT, |pod| {
            phase(pod) == "Running"
        })
        .await
        .map_err(|e| e.to_string())?;
    let pong_ip = cluster
        .get_json(&["get", "service", "pong", "-n", ns])
        .await
        .map_err(|e| e.to_string())?["spec"]["clusterIP"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let deadline = tokio::time::Instant::now() + POD_TIMEOUT;
    for attempt in 0.. {
        let name = format!("tcp-client-{attempt}");
        let manifest = wasm_pod(
            ns,
            &name,
            PONG_P2,
            "Never",
            json!({"env": [{"name": "CONNECT_TO", "value": format!("{pong_ip}:7000")}]}),
        );
        cluster.apply(&manifest).await.map_err(|e| e.to_string())?;
        cluster
            .wait_pod(ns, &name, "Succeeded or Failed", POD_TIMEOUT, ended)
            .await
            .map_err(|e| e.to_string())?;
        let logs = cluster
            .kubectl(&["logs", "-n", ns, &name], None)
            .await
            .map_err(|e| e.to_string())?;
        if logs.lines().any(|l| l == "got pong behind-a-service") {
            break;
        }
        // kube-proxy may not have synced the new Service yet.
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "the TCP client got, through {pong_ip}:7000:\n{logs}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // A rollout while a client keeps asking: no request fails.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let asking = {
        let stop = stop.clone();
        let ip = cluster_ip.clone();
        let iface = cluster.node_interface().to_owned();
        if !routes_via(&iface, &ip)? {
            return Err(format!("refusing {ip}: it does not route through {iface}"));
        }
        tokio::task::spawn_blocking(move || {
            let mut answered = std::collections::BTreeSet::new();
            let mut failures = Vec::new();
            let mut requests = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                requests += 1;
                match get_checked(&ip, 80, "/") {
                    Ok((200, body)) => answered.extend(replica(&body)),
                    other => failures.push(format!("{other:?}")),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (requests, answered, failures)
        })
    };
    cluster
        .kubectl(
            &["set", "env", "-n", ns, "deployment/web", "ROLLOUT=2"],
            None,
        )
        .await
        .map_err(|e| e.to_string())?;
    let rolled = available(2).await;
    // The old replicas' drain (preStop sleep, then stop) ends after the
    // Deployment counts the new ones ready.
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (requests, answered, failures) = asking.await.map_err(|e| e.to_string())?;
    rolled?;
    if !failures.is_empty() {
        return Err(format!(
            "{} of {requests} requests failed during the rollout: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        ));
    }
    eprintln!(
        "kube: services: {requests} requests during the rollout, none failed, answered by {answered:?}"
    );
    let new: Vec<&String> = answered.iter().filter(|n| !seen.contains(*n)).collect();
    if new.is_empty() {
        return Err(format!(
            "no new replica answered during the rollout ({requests} requests; {answered:?})"
        ));
    }
    Ok(())
}

/// A Deployment of 200 replicas on the one node: all Ready, then deleted
/// with nothing left in wasmlet — no sandbox, no container, no network
/// namespace, and no pod address still held for a pod that is gone. It is
/// created with 50 replicas, then scaled to 200: the time each takes to be
/// Ready is printed (a figure, not a test).
async fn two_hundred_replicas(node: &Node) -> Outcome {
    const FIRST: u64 = 50;
    const REPLICAS: u64 = 200;
    let cluster = &node.cluster;
    let ns = "scale";
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "many", "namespace": ns},
        "spec": {
            "replicas": FIRST,
            "selector": {"matchLabels": {"app": "many"}},
            "template": {
                "metadata": {"labels": {"app": "many"}},
                "spec": {
                    "runtimeClassName": RUNTIME_CLASS,
                    "terminationGracePeriodSeconds": 2,
                    "containers": [{
                        "name": "sleeper",
                        "image": SLEEPER_P1,
                        "imagePullPolicy": "Never",
                    }],
                },
            },
        },
    });
    let ready = |replicas: u64| async move {
        let deadline = tokio::time::Instant::now() + SCALE_TIMEOUT;
        loop {
            let d = cluster
                .get_json(&["get", "deployment", "many", "-n", ns])
                .await
                .map_err(|e| e.to_string())?;
            if d["status"]["readyReplicas"] == replicas {
                return Ok::<_, String>(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "{replicas} replicas not Ready within {SCALE_TIMEOUT:?}: {}",
                    d["status"]
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let created = Instant::now();
    create(cluster, ns, &deployment.to_string()).await?;
    ready(FIRST).await?;
    eprintln!(
        "kube: {FIRST} replicas Ready {:?} after kubectl create",
        created.elapsed()
    );
    let scaled = Instant::now();
    cluster
        .kubectl(
            &[
                "scale",
                "deployment",
                "many",
                "-n",
                ns,
                &format!("--replicas={REPLICAS}"),
            ],
            None,
        )
        .await
        .map_err(|e| e.to_string())?;
    ready(REPLICAS).await?;
    eprintln!(
        "kube: {REPLICAS} replicas Ready {:?} after kubectl scale from {FIRST} ({:?} after kubectl create)",
        scaled.elapsed(),
        created.elapsed()
    );
    runtime_latencies(node).await;
    let mut cri = node.wasmlet.cri();
    let labels = std::collections::HashMap::from([(
        "io.kubernetes.pod.namespace".to_owned(),
        ns.to_owned(),
    )]);
    let ours = |cri: &mut wasmlet_conformance::CriClient| {
        let labels = labels.clone();
        let mut cri = cri.clone();
        async move {
            cri.runtime()
                .list_pod_sandbox(cri::ListPodSandboxRequest {
                    filter: Some(cri::PodSandboxFilter {
                        label_selector: labels,
                        ..Default::default()
                    }),
                })
                .await
                .map(|r| r.into_inner().items)
                .map_err(|e| e.to_string())
        }
    };
    let sandboxes = ours(&mut cri).await?;
    let ready = cri::PodSandboxState::SandboxReady as i32;
    if sandboxes.iter().filter(|s| s.state == ready).count() != REPLICAS as usize {
        return Err(format!(
            "wasmlet has {} ready sandboxes in {ns}, not {REPLICAS}",
            sandboxes.iter().filter(|s| s.state == ready).count()
        ));
    }
    let ids: Vec<String> = sandboxes.iter().map(|s| s.id.clone()).collect();

    let deleted = Instant::now();
    cluster
        .kubectl(
            &["delete", "deployment", "many", "-n", ns, "--wait=true"],
            None,
        )
        .await
        .map_err(|e| e.to_string())?;
    loop {
        let left = ours(&mut cri).await?;
        if left.is_empty() {
            break;
        }
        if deleted.elapsed() >= SCALE_TIMEOUT {
            return Err(format!(
                "{SCALE_TIMEOUT:?} after the delete, wasmlet still holds {} sandboxes of {ns}",
                left.len()
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "kube: {REPLICAS} replicas left wasmlet {:?} after kubectl delete",
        deleted.elapsed()
    );
    let containers = cri
        .runtime()
        .list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                label_selector: labels.clone(),
                ..Default::default()
            }),
        })
        .await
        .map_err(|e| e.to_string())?
        .into_inner()
        .containers;
    if !containers.is_empty() {
        return Err(format!("{} containers of {ns} are left", containers.len()));
    }
    let pinned: Vec<String> = node
        .net
        .namespaces()
        .into_iter()
        .filter(|n| ids.iter().any(|id| n.contains(id.as_str())))
        .collect();
    if !pinned.is_empty() {
        return Err(format!("network namespaces left: {pinned:?}"));
    }
    // Every address still held belongs to a pod that is still there.
    let mut live = std::collections::BTreeSet::new();
    for sandbox in cri
        .runtime()
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await
        .map_err(|e| e.to_string())?
        .into_inner()
        .items
    {
        if let Ok(status) = cri.pod_sandbox_status(&sandbox.id).await {
            live.extend(status.network.map(|n| n.ip));
        }
    }
    let held: Vec<String> = node
        .net
        .allocated_ips()
        .into_iter()
        .filter(|ip| !live.contains(ip))
        .collect();
    if !held.is_empty() {
        return Err(format!("addresses held for no pod: {held:?}"));
    }
    Ok(())
}

/// Prints the kubelet's own measure of each CRI call (the mean of
/// `kubelet_runtime_operations_duration_seconds` by operation): the
/// latencies the kubelet sees under its concurrency (a figure, not a test).
async fn runtime_latencies(node: &Node) {
    let path = format!("/api/v1/nodes/{}/proxy/metrics", node.cluster.node_name());
    let Ok(text) = node.cluster.kubectl(&["get", "--raw", &path], None).await else {
        return;
    };
    let series = |suffix: &str| -> std::collections::BTreeMap<String, f64> {
        let prefix =
            format!("kubelet_runtime_operations_duration_seconds_{suffix}{{operation_type=\"");
        text.lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter_map(|l| {
                let (op, rest) = l.split_once('"')?;
                let value = rest.rsplit(' ').next()?.parse().ok()?;
                Some((op.to_owned(), value))
            })
            .collect()
    };
    let (sums, counts) = (series("sum"), series("count"));
    let means: Vec<String> = sums
        .iter()
        .filter_map(|(op, sum)| {
            let count = counts.get(op).copied().filter(|c| *c > 0.0)?;
            Some(format!("{op} {:.1} ms ×{count}", sum / count * 1000.0))
        })
        .collect();
    eprintln!(
        "kube: CRI calls as the kubelet measured them (mean): {}",
        means.join(", ")
    );
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
