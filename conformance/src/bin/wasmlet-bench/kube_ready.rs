//! What a user of a real cluster sees: the time from `kubectl create` to
//! Ready as the API reports it, for one pod and Deployments of many, through
//! one kubelet in front of wasmlet and in front of Debian's containerd with
//! runc, with the kubelet's `EventedPLEG` gate off and on — and where that
//! time goes.
//!
//! Each combination gets a one-node cluster of its own (the conformance
//! fixture: etcd, API server, controller manager, scheduler, kubelet with
//! `maxPods: 250`) in front of a runtime on a CNI bridge of its own. Each
//! size runs in a namespace of its own: a `kubectl get pods --watch` is
//! started first, then the pod (or Deployment) is created; every pod's
//! first appearance, `PodScheduled` and `Ready` are timed as the watch
//! receives them (milliseconds), and once all are Ready the pods' own
//! condition times are read back (the API's timestamps, whole seconds).
//! The kubelet's metrics (through the API server's node proxy) and
//! wasmlet's are scraped before and after, and their differences give the
//! kubelet's pod start SLI, its CRI calls by operation, its wait in its
//! API client's rate limiter, and wasmlet's own handling time. The pods
//! are then deleted and the run waits until the API has none left.
//!
//! Nothing here is asserted; every wait is bounded.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use wasmlet_conformance::fixtures::cluster::{
    Cluster, ClusterOptions, KubeBinaries, NodeOptions, RUNTIME_CLASS,
};
use wasmlet_conformance::pod_network::TestNetwork;

use super::{BUSYBOX_IDLE, Options, Runtime, SLEEPER, latency_summary, start_containerd};

/// How long all pods of one run may take to be Ready.
const READY_TIMEOUT: Duration = Duration::from_secs(240);
/// How long the kubelet may take to record every pod's start SLI after
/// the pods are Ready.
const SLI_TIMEOUT: Duration = Duration::from_secs(10);
/// How long deleted pods may take to leave the API.
const GONE_TIMEOUT: Duration = Duration::from_secs(240);
/// How long the watch may take to report its (empty) first list.
const WATCH_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for a cluster of another process to be gone.
const OTHER_CLUSTER_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// The pods' grace period: busybox's `sleep` as PID 1 ignores SIGTERM, so
/// containerd's pods always use all of it.
const GRACE_SECONDS: u64 = 1;

#[derive(Debug, Clone, Copy, PartialEq)]
enum RuntimeKind {
    Wasmlet,
    Containerd,
}

impl RuntimeKind {
    fn name(self) -> &'static str {
        match self {
            RuntimeKind::Wasmlet => "wasmlet",
            RuntimeKind::Containerd => "containerd+runc",
        }
    }
}

/// Every combination, wasmlet and containerd alternating so that drift of
/// the shared machine falls on both.
pub async fn kube_ready(o: &Options) -> Result<Value, String> {
    let binaries = match KubeBinaries::find() {
        Ok(Some(binaries)) => binaries,
        Ok(None) => {
            return Ok(json!(
                "not measured: no Kubernetes binaries (../shared/kube or KUBE_BIN_DIR)"
            ));
        }
        Err(e) => return Ok(json!(format!("not measured: {e}"))),
    };
    if !nix::unistd::geteuid().is_root() {
        return Ok(json!("not measured: a kubelet must run as root"));
    }
    let started = Instant::now();
    let mut runs = Vec::new();
    for evented in [false, true] {
        for kind in [RuntimeKind::Wasmlet, RuntimeKind::Containerd] {
            let sizes = if evented {
                &o.kube_evented_sizes
            } else {
                &o.kube_sizes
            };
            if sizes.is_empty() {
                continue;
            }
            eprintln!(
                "wasmlet-bench: kube-ready on {} (EventedPLEG {}), sizes {sizes:?}",
                kind.name(),
                if evented { "on" } else { "off" }
            );
            let run = cluster_runs(o, &binaries, kind, evented, sizes)
                .await
                .unwrap_or_else(|e| {
                    eprintln!("wasmlet-bench: kube-ready on {}: {e}", kind.name());
                    json!({"runtime": kind.name(), "evented_pleg": evented, "error": e})
                });
            runs.push(run);
        }
    }
    let version = Command::new(binaries.path("kubelet"))
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let skipped_evented: Vec<usize> = o
        .kube_sizes
        .iter()
        .filter(|n| !o.kube_evented_sizes.contains(n))
        .copied()
        .collect();
    Ok(json!({
        "kubelet": version,
        "sizes": o.kube_sizes,
        "evented_pleg_sizes": o.kube_evented_sizes,
        "not_run_with_evented_pleg": skipped_evented,
        "grace_period_seconds": GRACE_SECONDS,
        "wall_seconds": started.elapsed().as_secs_f64(),
        "runs": runs,
    }))
}

/// One cluster in front of one runtime: each size in turn.
async fn cluster_runs(
    o: &Options,
    binaries: &KubeBinaries,
    kind: RuntimeKind,
    evented: bool,
    sizes: &[usize],
) -> Result<Value, String> {
    wait_for_other_clusters().await?;
    let net = TestNetwork::create()?;
    let metrics_port = free_port()?;
    let rt: Runtime = match kind {
        RuntimeKind::Wasmlet => {
            super::start_runtime(
                o,
                Some(&net),
                "cgroup_driver = \"cgroupfs\"\n",
                &format!("[metrics]\naddress = \"127.0.0.1:{metrics_port}\"\n"),
            )
            .await?
        }
        RuntimeKind::Containerd => start_containerd(&net).await?,
    };
    super::connect(&rt.socket).await?;
    // The kubelet's default eviction thresholds are shares of the disk
    // (imagefs.available 15%): on a shared machine's fuller disk its
    // node is tainted with disk pressure and nothing schedules. Absolute
    // thresholds keep the measurement about starting pods.
    let node = NodeOptions::new(&rt.socket).kubelet_config(
        "evictionHard",
        json!({"memory.available": "100Mi", "nodefs.available": "1Gi", "imagefs.available": "1Gi"}),
    );
    let options =
        ClusterOptions::with_nodes(vec![node]).kubelet_feature_gate("EventedPLEG", evented);
    let t = Instant::now();
    let mut cluster = Cluster::start(binaries, options)
        .await
        .map_err(|e| format!("starting the cluster: {e}"))?;
    let cluster_start = t.elapsed();
    let home = tempfile::tempdir().map_err(|e| e.to_string())?;
    let ctx = RunContext {
        cluster: &cluster,
        kubectl: binaries.path("kubectl"),
        home: home.path(),
        kind,
        wasmlet_metrics: (kind == RuntimeKind::Wasmlet).then_some(metrics_port),
    };
    let mut results = Vec::new();
    let mut error = None;
    for &n in sizes {
        eprintln!("wasmlet-bench: kube-ready: {n} pod(s) on {}", kind.name());
        match ctx.run(n).await {
            Ok(r) => results.push(r),
            Err(e) => {
                error = Some(format!("{n} pods: {e}"));
                break;
            }
        }
    }
    // Whether the kubelet used the runtime's events: its connection
    // counters (after 5 failed connections it relists instead), the
    // runtime's answer when it failed, and events it dropped.
    let kubelet_metrics = ctx.kubelet_metrics().await.unwrap_or_default();
    let evented_counters: BTreeMap<String, f64> = kubelet_metrics
        .0
        .iter()
        .filter(|s| s.name.starts_with("kubelet_evented_pleg_connection"))
        .map(|s| (s.name.clone(), s.value))
        .collect();
    let kubelet_log = cluster
        .nodes()
        .first()
        .map(|n| n.kubelet_log())
        .unwrap_or_default();
    let stream_error = kubelet_log
        .lines()
        .find(|l| l.contains("failed to receive streaming container event"))
        .map(|l| l.chars().take(300).collect::<String>());
    let dropped_events = kubelet_log
        .lines()
        .filter(|l| l.contains("Evented PLEG: received ContainerEventResponse with nil"))
        .count();
    let leftovers = cluster.teardown();
    drop(cluster);
    drop(rt);
    drop(net);
    Ok(json!({
        "runtime": kind.name(),
        "evented_pleg": evented,
        "cluster_start_seconds": cluster_start.as_secs_f64(),
        "sizes": results,
        "error": error,
        "evented_pleg_counters": evented_counters,
        "evented_pleg_stream_error": stream_error,
        "evented_pleg_events_dropped_without_sandbox_status": dropped_events,
        "cluster_left_behind": leftovers,
    }))
}

/// Waits while another process runs a cluster (a `kube-apiserver`): they
/// would share the host's iptables chains and sysctls.
async fn wait_for_other_clusters() -> Result<(), String> {
    let deadline = Instant::now() + OTHER_CLUSTER_TIMEOUT;
    let mut told = false;
    while let Some(pid) = running_api_server() {
        if !told {
            eprintln!("wasmlet-bench: waiting for another cluster (kube-apiserver pid {pid})");
            told = true;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "another cluster (kube-apiserver pid {pid}) still runs after {OTHER_CLUSTER_TIMEOUT:?}"
            ));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    Ok(())
}

fn running_api_server() -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                c.split(|b| *b == 0)
                    .next()
                    .and_then(|argv0| Path::new(std::str::from_utf8(argv0).ok()?).file_name())
                    .is_some_and(|name| name == "kube-apiserver")
            })
        })
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

struct RunContext<'a> {
    cluster: &'a Cluster,
    kubectl: std::path::PathBuf,
    home: &'a Path,
    kind: RuntimeKind,
    /// wasmlet's metrics port, when the runtime is wasmlet.
    wasmlet_metrics: Option<u16>,
}

/// When the watch first saw a pod, saw it scheduled, saw it Ready: since
/// `kubectl create` was started.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    created: Duration,
    scheduled: Option<Duration>,
    ready: Option<Duration>,
}

impl RunContext<'_> {
    /// One size: create, wait for all Ready, read the times, delete.
    async fn run(&self, n: usize) -> Result<Value, String> {
        let ns = format!("ready-{n}");
        self.cluster
            .create_namespace(&ns)
            .await
            .map_err(|e| e.to_string())?;
        let (kind, name, manifest) = self.manifest(&ns, n);
        // The machine is shared: what else was running shows here.
        let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let kubelet_before = self.kubelet_metrics().await?;
        let wasmlet_before = self.wasmlet_metrics().await;
        let watch = PodWatch::start(
            &self.kubectl,
            self.cluster.admin_kubeconfig(),
            self.home,
            &ns,
        )
        .await?;
        let t0 = watch.origin;
        self.cluster
            .kubectl(&["create", "-f", "-"], Some(&manifest.to_string()))
            .await
            .map_err(|e| e.to_string())?;
        let create_returned = t0.elapsed();
        let deadline = Instant::now() + READY_TIMEOUT;
        let seen = loop {
            let seen = watch.seen();
            if seen.len() >= n && seen.values().filter(|s| s.ready.is_some()).count() >= n {
                break seen;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} of {n} pods Ready within {READY_TIMEOUT:?}",
                    seen.values().filter(|s| s.ready.is_some()).count()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        drop(watch);
        // The kubelet records a pod's start SLI once it sees the pod's
        // running status come back from the API: wait for all n (bounded).
        let sli = "kubelet_pod_start_sli_duration_seconds_count";
        let sli_deadline = Instant::now() + SLI_TIMEOUT;
        let kubelet_after = loop {
            let after = self.kubelet_metrics().await?;
            let recorded = after.by_label(sli, "").values().sum::<f64>()
                - kubelet_before.by_label(sli, "").values().sum::<f64>();
            if recorded >= n as f64 || Instant::now() >= sli_deadline {
                break after;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let wasmlet_after = self.wasmlet_metrics().await;
        let pods = self
            .cluster
            .get_json(&["get", "pods", "-n", &ns])
            .await
            .map_err(|e| e.to_string())?;

        let deleted = Instant::now();
        self.cluster
            .kubectl(&["delete", kind, &name, "-n", &ns, "--wait=false"], None)
            .await
            .map_err(|e| e.to_string())?;
        let gone_deadline = Instant::now() + GONE_TIMEOUT;
        loop {
            let left = self
                .cluster
                .get_json(&["get", "pods", "-n", &ns])
                .await
                .map_err(|e| e.to_string())?["items"]
                .as_array()
                .map_or(0, Vec::len);
            if left == 0 {
                break;
            }
            if Instant::now() >= gone_deadline {
                return Err(format!(
                    "{left} pods still in the API {GONE_TIMEOUT:?} after the delete"
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let gone = deleted.elapsed();

        let secs = |d: Duration| d.as_secs_f64();
        let last =
            |f: fn(&Seen) -> Option<Duration>| seen.values().filter_map(f).max().map_or(0.0, secs);
        let summary = |f: &dyn Fn(&Seen) -> Option<Duration>| {
            latency_summary(seen.values().filter_map(f).collect())
        };
        let cri = runtime_operations(&kubelet_before, &kubelet_after);
        let cri_seconds: f64 = cri
            .values()
            .map(|v| v["sum_seconds"].as_f64().unwrap_or(0.0))
            .sum();
        let wasmlet = match (&wasmlet_before, &wasmlet_after) {
            (Some(before), Some(after)) => wasmlet_share(before, after),
            _ => Value::Null,
        };
        Ok(json!({
            "pods": n,
            "object": kind,
            "loadavg_before": loadavg.trim(),
            "watch": {
                "create_returned_seconds": secs(create_returned),
                "all_ready_seconds": last(|s| s.ready),
                "last_pod_created_seconds": last(|s| Some(s.created)),
                "last_pod_scheduled_seconds": last(|s| s.scheduled),
                "created": summary(&|s| Some(s.created)),
                "scheduling": summary(&|s| Some(s.scheduled?.saturating_sub(s.created))),
                "kubelet": summary(&|s| Some(s.ready?.saturating_sub(s.scheduled?))),
                "ready": summary(&|s| s.ready),
            },
            "api_timestamps": api_timestamps(&pods),
            "kubelet": {
                "pod_start_sli": histogram_delta(&kubelet_before, &kubelet_after, "kubelet_pod_start_sli_duration_seconds"),
                "pod_start_total": histogram_delta(&kubelet_before, &kubelet_after, "kubelet_pod_start_total_duration_seconds"),
                "runtime_operations": cri,
                "runtime_operations_seconds": cri_seconds,
                "pod_worker": sum_count_by(&kubelet_before, &kubelet_after, "kubelet_pod_worker_duration_seconds", "operation_type"),
                "pleg_relist": sum_count_by(&kubelet_before, &kubelet_after, "kubelet_pleg_relist_duration_seconds", ""),
                "api_rate_limiter_wait": sum_count_by(&kubelet_before, &kubelet_after, "rest_client_rate_limiter_duration_seconds", "verb"),
                "api_requests": sum_count_by(&kubelet_before, &kubelet_after, "rest_client_request_duration_seconds", "verb"),
            },
            "wasmlet": wasmlet,
            "deleted_gone_seconds": secs(gone),
        }))
    }

    /// A bare pod for one, else a Deployment of `n`: (kind, name, manifest).
    fn manifest(&self, ns: &str, n: usize) -> (&'static str, String, Value) {
        let (image, class) = match self.kind {
            RuntimeKind::Wasmlet => (SLEEPER, Some(RUNTIME_CLASS)),
            RuntimeKind::Containerd => (BUSYBOX_IDLE, None),
        };
        let mut spec = json!({
            "terminationGracePeriodSeconds": GRACE_SECONDS,
            "containers": [{"name": "idle", "image": image, "imagePullPolicy": "Never"}],
        });
        if let Some(class) = class {
            spec["runtimeClassName"] = json!(class);
        }
        if n == 1 {
            let pod = json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "idle", "namespace": ns, "labels": {"app": "idle"}},
                "spec": spec,
            });
            return ("pod", "idle".to_owned(), pod);
        }
        let deployment = json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "idle", "namespace": ns},
            "spec": {
                "replicas": n,
                "selector": {"matchLabels": {"app": "idle"}},
                "template": {"metadata": {"labels": {"app": "idle"}}, "spec": spec},
            },
        });
        ("deployment", "idle".to_owned(), deployment)
    }

    /// The kubelet's `/metrics`, through the API server's node proxy.
    async fn kubelet_metrics(&self) -> Result<Scrape, String> {
        let path = format!("/api/v1/nodes/{}/proxy/metrics", self.cluster.node_name());
        self.cluster
            .kubectl(&["get", "--raw", &path], None)
            .await
            .map(|text| Scrape::parse(&text))
            .map_err(|e| format!("the kubelet's metrics: {e}"))
    }

    async fn wasmlet_metrics(&self) -> Option<Scrape> {
        let port = self.wasmlet_metrics?;
        let attempt = async {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            stream
                .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                .await?;
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await?;
            Ok::<_, std::io::Error>(response)
        };
        let response = tokio::time::timeout(Duration::from_secs(10), attempt)
            .await
            .ok()?
            .ok()?;
        let text = String::from_utf8_lossy(&response);
        let (_, body) = text.split_once("\r\n\r\n")?;
        Some(Scrape::parse(body))
    }
}

/// `kubectl get pods --watch` printing one line per change of a pod:
/// name, `PodScheduled` status, `Ready` status. Killed when dropped.
struct PodWatch {
    origin: Instant,
    seen: Arc<Mutex<BTreeMap<String, Seen>>>,
    _child: tokio::process::Child,
    reader: tokio::task::JoinHandle<()>,
}

impl PodWatch {
    async fn start(
        kubectl: &Path,
        kubeconfig: &Path,
        home: &Path,
        ns: &str,
    ) -> Result<PodWatch, String> {
        let template = concat!(
            r#"{.metadata.name}{"|"}"#,
            r#"{.status.conditions[?(@.type=="PodScheduled")].status}{"|"}"#,
            r#"{.status.conditions[?(@.type=="Ready")].status}{"\n"}"#
        );
        let mut child = tokio::process::Command::new(kubectl)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["get", "pods", "-n", ns, "--watch", "-v=6", "-o"])
            .arg(format!("jsonpath={template}"))
            .env("HOME", home)
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("running kubectl: {e}"))?;
        // The watch is on once its request is answered: kubectl logs
        // each response at -v=6.
        let mut stderr = tokio::io::BufReader::new(child.stderr.take().expect("piped")).lines();
        let watching = tokio::time::timeout(WATCH_READY_TIMEOUT, async {
            while let Ok(Some(line)) = stderr.next_line().await {
                if line.contains("watch=true") {
                    return line.contains("200 OK");
                }
            }
            false
        })
        .await;
        if watching != Ok(true) {
            return Err(format!(
                "kubectl get pods --watch was not watching within {WATCH_READY_TIMEOUT:?}"
            ));
        }
        // Keeps its stderr drained.
        tokio::spawn(async move { while let Ok(Some(_)) = stderr.next_line().await {} });
        let origin = Instant::now();
        let seen: Arc<Mutex<BTreeMap<String, Seen>>> = Arc::default();
        let mut stdout = tokio::io::BufReader::new(child.stdout.take().expect("piped")).lines();
        let shared = seen.clone();
        let reader = tokio::spawn(async move {
            while let Ok(Some(line)) = stdout.next_line().await {
                let at = origin.elapsed();
                let mut fields = line.split('|');
                let (Some(name), scheduled, ready) = (fields.next(), fields.next(), fields.next())
                else {
                    continue;
                };
                if name.is_empty() {
                    continue;
                }
                let mut seen = shared.lock().expect("not poisoned");
                let pod = seen.entry(name.to_owned()).or_insert(Seen {
                    created: at,
                    ..Seen::default()
                });
                if scheduled == Some("True") && pod.scheduled.is_none() {
                    pod.scheduled = Some(at);
                }
                if ready == Some("True") && pod.ready.is_none() {
                    pod.ready = Some(at);
                }
            }
        });
        Ok(PodWatch {
            origin,
            seen,
            _child: child,
            reader,
        })
    }

    fn seen(&self) -> BTreeMap<String, Seen> {
        self.seen.lock().expect("not poisoned").clone()
    }
}

impl Drop for PodWatch {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// The pods' own times (whole seconds): `creationTimestamp` and the
/// `PodScheduled`, `PodReadyToStartContainers` (sandbox up) and `Ready`
/// conditions' `lastTransitionTime`.
fn api_timestamps(pods: &Value) -> Value {
    let time = |s: &Value| s.as_str().and_then(unix_seconds);
    let condition = |pod: &Value, kind: &str| {
        pod["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == kind && c["status"] == "True")
            .and_then(|c| time(&c["lastTransitionTime"]))
    };
    let mut ready_minus_created = Vec::new();
    let mut scheduled_minus_created = Vec::new();
    let mut sandbox_minus_scheduled = Vec::new();
    let mut ready_minus_scheduled = Vec::new();
    let (mut first_created, mut last_ready) = (i64::MAX, i64::MIN);
    for pod in pods["items"].as_array().into_iter().flatten() {
        let Some(created) = time(&pod["metadata"]["creationTimestamp"]) else {
            continue;
        };
        let scheduled = condition(pod, "PodScheduled");
        let sandbox = condition(pod, "PodReadyToStartContainers");
        let ready = condition(pod, "Ready");
        let d = |a: i64, b: i64| Duration::from_secs((a - b).max(0) as u64);
        first_created = first_created.min(created);
        if let Some(ready) = ready {
            last_ready = last_ready.max(ready);
            ready_minus_created.push(d(ready, created));
        }
        if let Some(scheduled) = scheduled {
            scheduled_minus_created.push(d(scheduled, created));
            if let Some(sandbox) = sandbox {
                sandbox_minus_scheduled.push(d(sandbox, scheduled));
            }
            if let Some(ready) = ready {
                ready_minus_scheduled.push(d(ready, scheduled));
            }
        }
    }
    json!({
        "resolution_seconds": 1,
        "first_created_to_last_ready_seconds": (last_ready >= first_created).then_some(last_ready - first_created),
        "ready_minus_created": latency_summary(ready_minus_created),
        "scheduled_minus_created": latency_summary(scheduled_minus_created),
        "sandbox_ready_minus_scheduled": latency_summary(sandbox_minus_scheduled),
        "ready_minus_scheduled": latency_summary(ready_minus_scheduled),
    })
}

/// `2025-01-02T03:04:05Z` as seconds since the epoch (the API's
/// timestamps are always UTC, whole seconds).
fn unix_seconds(s: &str) -> Option<i64> {
    let (date, time) = s.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':').map(|p| p.parse::<i64>());
    let (h, min, sec) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + min * 60 + sec)
}

/// One sample of a Prometheus text scrape.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A whole scrape (Prometheus text or OpenMetrics).
#[derive(Debug, Default)]
struct Scrape(Vec<Sample>);

impl Scrape {
    fn parse(text: &str) -> Scrape {
        Scrape(text.lines().filter_map(parse_sample).collect())
    }

    /// The sum of `name`'s series, grouped by `label` ("" for one group).
    fn by_label(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for s in self.0.iter().filter(|s| s.name == name) {
            let key = s.labels.get(label).cloned().unwrap_or_default();
            *out.entry(key).or_insert(0.0) += s.value;
        }
        out
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let end = line.find(['{', ' '])?;
    let name = line[..end].to_owned();
    let mut labels = BTreeMap::new();
    let mut rest = &line[end..];
    if let Some(inner) = rest.strip_prefix('{') {
        // key="value" pairs; values may hold escaped quotes and commas.
        let mut chars = inner.char_indices().peekable();
        let mut key = String::new();
        let close;
        loop {
            let (i, c) = chars.next()?;
            match c {
                '}' => {
                    close = i;
                    break;
                }
                ',' | ' ' => {}
                '=' => {
                    if chars.next()?.1 != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next()?.1 {
                            '\\' => value.push(chars.next()?.1),
                            '"' => break,
                            c => value.push(c),
                        }
                    }
                    labels.insert(std::mem::take(&mut key), value);
                }
                c => key.push(c),
            }
        }
        rest = &inner[close + 1..];
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// `after - before` of each group.
fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .collect()
}

/// A histogram's `_sum` and `_count` differences by `label`, with the mean.
fn sum_count_by(before: &Scrape, after: &Scrape, name: &str, label: &str) -> Value {
    let sums = delta(
        &before.by_label(&format!("{name}_sum"), label),
        &after.by_label(&format!("{name}_sum"), label),
    );
    let counts = delta(
        &before.by_label(&format!("{name}_count"), label),
        &after.by_label(&format!("{name}_count"), label),
    );
    let groups: BTreeMap<String, Value> =
        sums.iter()
            .filter_map(|(k, sum)| {
                let count = counts.get(k).copied().unwrap_or(0.0);
                (count > 0.0).then(|| {
                let key = if k.is_empty() { "all".to_owned() } else { k.clone() };
                (
                    key,
                    json!({"count": count, "sum_seconds": sum, "mean_ms": sum / count * 1000.0}),
                )
            })
            })
            .collect();
    json!(groups)
}

/// The kubelet's CRI calls by operation (`kubelet_runtime_operations_duration_seconds`).
fn runtime_operations(before: &Scrape, after: &Scrape) -> BTreeMap<String, Value> {
    let v = sum_count_by(
        before,
        after,
        "kubelet_runtime_operations_duration_seconds",
        "operation_type",
    );
    v.as_object()
        .map(|m| m.clone().into_iter().collect())
        .unwrap_or_default()
}

/// wasmlet's own time answering CRI calls, by method, and its pod start
/// phases.
fn wasmlet_share(before: &Scrape, after: &Scrape) -> Value {
    let methods = sum_count_by(
        before,
        after,
        "wasmlet_cri_request_duration_seconds",
        "method",
    );
    let total: f64 = methods
        .as_object()
        .into_iter()
        .flatten()
        .map(|(_, v)| v["sum_seconds"].as_f64().unwrap_or(0.0))
        .sum();
    json!({
        "cri_seconds": total,
        "cri_by_method": methods,
        "pod_start_phases": sum_count_by(before, after, "wasmlet_pod_start_phase_duration_seconds", "phase"),
        "state_commits": sum_count_by(before, after, "wasmlet_state_commit_duration_seconds", ""),
    })
}

/// A histogram's difference: count, mean, and p50/p99 interpolated in
/// its buckets.
fn histogram_delta(before: &Scrape, after: &Scrape, name: &str) -> Value {
    let buckets = delta(
        &before.by_label(&format!("{name}_bucket"), "le"),
        &after.by_label(&format!("{name}_bucket"), "le"),
    );
    let mut buckets: Vec<(f64, f64)> = buckets
        .into_iter()
        .filter_map(|(le, n)| {
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, n))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let count = buckets.last().map_or(0.0, |b| b.1);
    if count <= 0.0 {
        return Value::Null;
    }
    let sum = after
        .by_label(&format!("{name}_sum"), "")
        .values()
        .sum::<f64>()
        - before
            .by_label(&format!("{name}_sum"), "")
            .values()
            .sum::<f64>();
    let quantile = |q: f64| {
        let want = q * count;
        let (mut lower, mut below) = (0.0, 0.0);
        for &(le, n) in &buckets {
            if n >= want {
                if le.is_infinite() {
                    return lower;
                }
                let share = if n > below {
                    (want - below) / (n - below)
                } else {
                    1.0
                };
                return lower + (le - lower) * share;
            }
            (lower, below) = (le, n);
        }
        lower
    };
    json!({
        "count": count,
        "mean_seconds": sum / count,
        "p50_seconds": quantile(0.5),
        "p99_seconds": quantile(0.99),
    })
}

/// The section's table, for the report's Markdown.
pub fn markdown(section: &Value) -> String {
    let Some(runs) = section["runs"].as_array() else {
        return match section.as_str() {
            Some(why) => format!("\nkubectl create to Ready: {why}\n"),
            None => String::new(),
        };
    };
    let mut md = format!(
        "\n### kubectl create to Ready ({}; {:.0} s for the section)\n\n",
        section["kubelet"].as_str().unwrap_or("kubelet"),
        section["wall_seconds"].as_f64().unwrap_or(0.0)
    );
    if let Some(skipped) = section["not_run_with_evented_pleg"].as_array()
        && !skipped.is_empty()
    {
        md.push_str(&format!(
            "Not run with EventedPLEG (to bound the section's time): {:?} pods.\n\n",
            skipped.iter().filter_map(Value::as_u64).collect::<Vec<_>>()
        ));
    }
    md.push_str(
        "| runtime | EventedPLEG | pods | all Ready (watch) s | API: first created → last Ready s | \
         last pod created s | scheduling p50 / max ms | kubelet (scheduled → Ready) p50 / max ms | \
         pod start SLI mean / p99 s | kubelet's CRI time s | wasmlet's own CRI time s | \
         kubelet API rate-limit wait s | deleted → gone s |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let f = |v: &Value, digits: usize| match v.as_f64() {
        Some(x) => format!("{x:.digits$}"),
        None => "—".to_owned(),
    };
    for run in runs {
        let runtime = run["runtime"].as_str().unwrap_or("");
        let evented = if run["evented_pleg"] == true {
            "on"
        } else {
            "off"
        };
        if let Some(error) = run["error"].as_str()
            && run["sizes"].as_array().is_none_or(Vec::is_empty)
        {
            md.push_str(&format!("| {runtime} | {evented} | — | {error} |\n"));
            continue;
        }
        for size in run["sizes"].as_array().into_iter().flatten() {
            let w = &size["watch"];
            let k = &size["kubelet"];
            let wait: f64 = k["api_rate_limiter_wait"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(_, v)| v["sum_seconds"].as_f64())
                .sum();
            md.push_str(&format!(
                "| {runtime} | {evented} | {} | {} | {} | {} | {} / {} | {} / {} | {} / {} | {} | {} | {} | {} |\n",
                size["pods"],
                f(&w["all_ready_seconds"], 2),
                size["api_timestamps"]["first_created_to_last_ready_seconds"],
                f(&w["last_pod_created_seconds"], 2),
                f(&w["scheduling"]["p50_ms"], 0),
                f(&w["scheduling"]["max_ms"], 0),
                f(&w["kubelet"]["p50_ms"], 0),
                f(&w["kubelet"]["max_ms"], 0),
                f(&k["pod_start_sli"]["mean_seconds"], 2),
                f(&k["pod_start_sli"]["p99_seconds"], 2),
                f(&k["runtime_operations_seconds"], 2),
                f(&size["wasmlet"]["cri_seconds"], 2),
                f(&json!(wait), 2),
                f(&size["deleted_gone_seconds"], 1),
            ));
        }
        if let Some(error) = run["error"].as_str() {
            md.push_str(&format!(
                "| {runtime} | {evented} | — | stopped: {error} |\n"
            ));
        }
    }
    md.push_str("\nThe kubelet's CRI calls (mean ms × calls), by run:\n\n");
    for run in runs {
        for size in run["sizes"].as_array().into_iter().flatten() {
            let ops: Vec<String> = size["kubelet"]["runtime_operations"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(op, v)| {
                    format!(
                        "{op} {} × {}",
                        f(&v["mean_ms"], 1),
                        v["count"].as_f64().unwrap_or(0.0)
                    )
                })
                .collect();
            md.push_str(&format!(
                "- {} EventedPLEG {}, {} pods: {}\n",
                run["runtime"].as_str().unwrap_or(""),
                if run["evented_pleg"] == true {
                    "on"
                } else {
                    "off"
                },
                size["pods"],
                ops.join(", ")
            ));
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_parse_with_escaped_labels() {
        let s = parse_sample(r#"a_b{x="1",y="q\"u,o"} 2.5 123"#).unwrap();
        assert_eq!(s.name, "a_b");
        assert_eq!(s.labels["y"], "q\"u,o");
        assert_eq!(s.value, 2.5);
        assert_eq!(parse_sample("plain 7").unwrap().value, 7.0);
        assert!(parse_sample("# HELP x").is_none());
    }

    #[test]
    fn api_timestamps_parse() {
        assert_eq!(unix_seconds("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(unix_seconds("2000-03-01T00:00:01Z"), Some(951_868_801));
    }

    #[test]
    fn histogram_quantiles_interpolate() {
        let before = Scrape::default();
        let after = Scrape::parse(
            "h_bucket{le=\"1\"} 0\nh_bucket{le=\"2\"} 10\nh_bucket{le=\"+Inf\"} 10\nh_sum 15\nh_count 10\n",
        );
        let h = histogram_delta(&before, &after, "h");
        assert_eq!(h["count"], 10.0);
        assert_eq!(h["p50_seconds"], 1.5);
        assert_eq!(h["mean_seconds"], 1.5);
    }
}
