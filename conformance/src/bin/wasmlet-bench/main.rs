//! `wasmlet-bench`: measures a CRI runtime the way operators would, through
//! its socket, with the conformance harness: pod start latency, density
//! (memory per idle pod, list latency at that density), churn, and the
//! `wasi:http` function's throughput (against `wasmtime serve` with
//! `--wasmtime`), and pod start and churn against Debian's containerd with
//! runc started on a private socket, as ratios. Writes a JSON file and a Markdown
//! table into the output directory (`bench/results/` by default), with the
//! machine's description and the exact command.
//!
//! Besides: what one pod does to the others (a function's latency beside
//! a spinning, memory-bombing or log-flooding neighbour; a CPU quota's
//! accuracy on idle and busy cores) and a soak of many pod cycles with the
//! agent's resources sampled (`isolation`). `--only a,b` runs some
//! scenarios: pod-start, density, churn, functions, neighbours, quota,
//! soak, baseline. `kube-ready` runs only when `--only` names it: what a
//! user of a real cluster sees — `kubectl create` to Ready through a
//! kubelet, on wasmlet and on containerd + runc (`kube_ready`); so does
//! `big-module`: a big program's pull and runs with the fast first tier
//! (Winch, then Cranelift in the background) off and on (`big_module`).
//!
//! By default it starts the `wasmlet` binary next to itself on a private
//! root (importing the sample guests); `--endpoint` measures a runtime that
//! already serves a socket instead (with `--pid` for its memory). Timings
//! are reported, never asserted: `--smoke` runs every scenario at a tiny
//! scale, for CI to check that the benchmark itself works.

mod big_module;
mod isolation;
mod kube_ready;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wasmlet_conformance::fixtures::containerd::{Containerd, LinuxImage};
use wasmlet_conformance::pod_network::TestNetwork;
use wasmlet_conformance::{ContainerConfigBuilder, CriClient, PodSandboxConfigBuilder, cri};

const SLEEPER: &str = "wasmlet.local/samples/sleeper:p1";
const HELLO_HTTP: &str = "wasmlet.local/samples/hello-http:p2";
const SPIN: &str = "wasmlet.local/samples/spin:p1";
const HOG: &str = "wasmlet.local/samples/hog:p1";
const TICKER: &str = "wasmlet.local/samples/ticker:p1";

/// The scenarios `--only` can name, in the order they run.
const SCENARIOS: &[&str] = &[
    "pod-start",
    "density",
    "churn",
    "soak",
    "functions",
    "neighbours",
    "quota",
    "baseline",
    "kube-ready",
    "big-module",
];

/// Scenarios that run only when `--only` names them (they need a whole
/// cluster and take minutes, or a program the bench does not carry).
const NAMED_ONLY: &[&str] = &["kube-ready", "big-module"];

#[derive(Debug, Clone)]
struct Options {
    smoke: bool,
    out: PathBuf,
    endpoint: Option<PathBuf>,
    pid: Option<u32>,
    wasmlet: Option<PathBuf>,
    start_pods: usize,
    density_pods: usize,
    churn_seconds: u64,
    churn_workers: usize,
    http_seconds: u64,
    http_concurrency: usize,
    wasmtime: Option<PathBuf>,
    soak_cycles: usize,
    soak_cni_cycles: usize,
    /// Pods per `kube-ready` run: a bare pod for 1, else a Deployment.
    kube_sizes: Vec<usize>,
    /// The same with the kubelet's `EventedPLEG` gate on.
    kube_evented_sizes: Vec<usize>,
    /// `big-module`: the program, its arguments and its mounts.
    big_module: Option<PathBuf>,
    big_module_args: Vec<String>,
    big_module_mounts: Vec<big_module::Mount>,
    only: Vec<String>,
    command: String,
}

impl Options {
    fn runs(&self, scenario: &str) -> bool {
        (self.only.is_empty() && !NAMED_ONLY.contains(&scenario))
            || self.only.iter().any(|s| s == scenario)
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: wasmlet-bench [--smoke] [--out DIR] [--endpoint SOCKET --pid PID | --wasmlet BIN]\n\
         \x20                    [--start-pods N] [--density-pods N] [--churn-seconds S] [--churn-workers N]\n\
         \x20                    [--http-seconds S] [--http-concurrency C] [--wasmtime BIN]\n\
         \x20                    [--soak-cycles N] [--soak-cni-cycles N] [--only SCENARIO,...]\n\
         \x20                    [--kube-sizes N,...] [--kube-evented-sizes N,...]\n\
         scenarios: {} ({} only when named)",
        SCENARIOS.join(", "),
        NAMED_ONLY.join(", ")
    );
    std::process::exit(2)
}

fn parse_options() -> Options {
    let args: Vec<String> = std::env::args().collect();
    let mut o = Options {
        smoke: false,
        out: PathBuf::from("bench/results"),
        endpoint: None,
        pid: None,
        wasmlet: None,
        start_pods: 1000,
        density_pods: 10_000,
        churn_seconds: 60,
        churn_workers: 8,
        http_seconds: 10,
        http_concurrency: 16,
        wasmtime: None,
        soak_cycles: 100_000,
        soak_cni_cycles: 2_000,
        kube_sizes: vec![1, 50, 200],
        kube_evented_sizes: vec![1, 50, 200],
        big_module: None,
        big_module_args: Vec::new(),
        big_module_mounts: Vec::new(),
        only: Vec::new(),
        command: args.join(" "),
    };
    let mut it = args.into_iter().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--smoke" => o.smoke = true,
            "--out" => o.out = PathBuf::from(value()),
            "--endpoint" => o.endpoint = Some(PathBuf::from(value())),
            "--pid" => o.pid = Some(value().parse().unwrap_or_else(|_| usage())),
            "--wasmlet" => o.wasmlet = Some(PathBuf::from(value())),
            "--start-pods" => o.start_pods = value().parse().unwrap_or_else(|_| usage()),
            "--density-pods" => o.density_pods = value().parse().unwrap_or_else(|_| usage()),
            "--churn-seconds" => o.churn_seconds = value().parse().unwrap_or_else(|_| usage()),
            "--churn-workers" => o.churn_workers = value().parse().unwrap_or_else(|_| usage()),
            "--http-seconds" => o.http_seconds = value().parse().unwrap_or_else(|_| usage()),
            "--http-concurrency" => {
                o.http_concurrency = value().parse().unwrap_or_else(|_| usage())
            }
            "--wasmtime" => o.wasmtime = Some(PathBuf::from(value())),
            "--soak-cycles" => o.soak_cycles = value().parse().unwrap_or_else(|_| usage()),
            "--soak-cni-cycles" => o.soak_cni_cycles = value().parse().unwrap_or_else(|_| usage()),
            "--kube-sizes" => o.kube_sizes = sizes(&value()),
            "--kube-evented-sizes" => o.kube_evented_sizes = sizes(&value()),
            "--big-module" => o.big_module = Some(PathBuf::from(value())),
            "--big-module-arg" => o.big_module_args.push(value()),
            "--big-module-mount" => o
                .big_module_mounts
                .push(big_module::Mount::parse(&value()).unwrap_or_else(|| usage())),
            "--only" => {
                o.only = value().split(',').map(str::to_owned).collect();
                if o.only.iter().any(|s| !SCENARIOS.contains(&s.as_str())) {
                    usage()
                }
            }
            _ => usage(),
        }
    }
    if o.smoke {
        o.start_pods = o.start_pods.min(5);
        o.density_pods = o.density_pods.min(10);
        o.churn_seconds = o.churn_seconds.min(2);
        o.churn_workers = o.churn_workers.min(2);
        o.http_seconds = o.http_seconds.min(1);
        o.http_concurrency = o.http_concurrency.min(2);
        o.soak_cycles = o.soak_cycles.min(20);
        o.soak_cni_cycles = o.soak_cni_cycles.min(4);
        for sizes in [&mut o.kube_sizes, &mut o.kube_evented_sizes] {
            sizes.iter_mut().for_each(|n| *n = (*n).min(2));
            sizes.dedup();
        }
    }
    o
}

/// `1,50,200`, or empty for `""` (no runs).
fn sizes(list: &str) -> Vec<usize> {
    list.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap_or_else(|_| usage()))
        .collect()
}

/// The runtime under test: a socket, the pid whose memory is measured, and
/// (when the bench started it) the daemon itself.
struct Runtime {
    socket: PathBuf,
    pid: Option<u32>,
    daemon: Option<Child>,
    _dir: tempfile::TempDir,
    log_root: PathBuf,
    description: String,
    /// Pods share the node's network (the baseline's pods: no CNI, as
    /// wasmlet's lifecycle scenarios).
    host_network: bool,
    /// The image pods run: it logs a line, then waits.
    idle_image: &'static str,
    /// The baseline runtime, when this is it.
    _containerd: Option<Containerd>,
    /// The state root of a wasmlet the bench started.
    root: Option<PathBuf>,
}

impl Runtime {
    /// What a daemon the bench started has logged so far.
    fn daemon_log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("daemon.log")).unwrap_or_default()
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            // SIGTERM first, as systemd stops it: the agent then undoes
            // its mounts (read-only binds) so that its root can go.
            let pid = nix::unistd::Pid::from_raw(d.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(d.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = d.kill();
            let _ = d.wait();
        }
    }
}

fn wasmlet_binary(o: &Options) -> PathBuf {
    o.wasmlet.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("wasmlet")))
            .unwrap_or_else(|| PathBuf::from("wasmlet"))
    })
}

/// `top_level` (keys) goes before the sections of the configuration,
/// `sections` after them.
async fn start_runtime(
    o: &Options,
    network: Option<&TestNetwork>,
    top_level: &str,
    sections: &str,
) -> Result<Runtime, String> {
    start_runtime_logging(o, network, top_level, sections, "warn").await
}

/// [`start_runtime`] with the daemon's `RUST_LOG` (its log is
/// [`Runtime::daemon_log`]).
async fn start_runtime_logging(
    o: &Options,
    network: Option<&TestNetwork>,
    top_level: &str,
    sections: &str,
    rust_log: &str,
) -> Result<Runtime, String> {
    let dir = tempfile::Builder::new()
        .prefix("wasmlet-bench-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let log_root = dir.path().join("logs");
    std::fs::create_dir_all(&log_root).map_err(|e| e.to_string())?;
    if let Some(socket) = &o.endpoint {
        return Ok(Runtime {
            socket: socket.clone(),
            pid: o.pid,
            daemon: None,
            _dir: dir,
            log_root,
            description: format!("the runtime on {}", socket.display()),
            host_network: false,
            idle_image: SLEEPER,
            _containerd: None,
            root: None,
        });
    }
    let bin = wasmlet_binary(o);
    let root = dir.path().join("root");
    for (reference, file) in [
        (SLEEPER, wasm_samples::SLEEPER_P1),
        (HELLO_HTTP, wasm_samples::HELLO_HTTP_P2),
        (SPIN, wasm_samples::SPIN_P1),
        (HOG, wasm_samples::HOG_P1),
        (TICKER, wasm_samples::TICKER_P1),
    ] {
        let out = Command::new(&bin)
            .args(["image", "import", "--root"])
            .arg(&root)
            .arg(file)
            .arg(reference)
            .output()
            .map_err(|e| format!("running {}: {e}", bin.display()))?;
        if !out.status.success() {
            return Err(format!(
                "importing {reference}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    let config = dir.path().join("wasmlet.toml");
    let network_config = match network {
        Some(net) => net.wasmlet_config(),
        None => format!(
            "[network]\ncni_conf_dir = {:?}\n",
            dir.path().join("no-cni")
        ),
    };
    std::fs::write(
        &config,
        format!(
            "{top_level}{network_config}\n[http]\npool_instances = 1000\nmax_concurrency = 256\n{sections}"
        ),
    )
    .map_err(|e| e.to_string())?;
    let socket = dir.path().join("wasmlet.sock");
    let log = std::fs::File::create(dir.path().join("daemon.log")).map_err(|e| e.to_string())?;
    let daemon = Command::new(&bin)
        .arg("--config")
        .arg(&config)
        .arg("--root")
        .arg(&root)
        .arg("--socket")
        .arg(&socket)
        .env("RUST_LOG", rust_log)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    let pid = daemon.id();
    Ok(Runtime {
        socket,
        pid: Some(pid),
        daemon: Some(daemon),
        _dir: dir,
        log_root,
        description: format!("{} (started by the bench)", bin.display()),
        host_network: false,
        idle_image: SLEEPER,
        _containerd: None,
        root: Some(root),
    })
}

/// An image for the baseline: busybox logging a line, then sleeping.
const BUSYBOX_IDLE: &str = "wasmlet.test/idle:1";

/// Debian's containerd with runc on a private socket, its pods on the
/// node's network (as wasmlet's lifecycle scenarios run without CNI).
async fn start_containerd(net: &TestNetwork) -> Result<Runtime, String> {
    let dir = tempfile::Builder::new()
        .prefix("wasmlet-bench-containerd-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let log_root = dir.path().join("logs");
    std::fs::create_dir_all(&log_root).map_err(|e| e.to_string())?;
    let containerd = Containerd::start(&net.conf_dir())
        .await
        .map_err(|e| e.to_string())?;
    let idle = LinuxImage::busybox(&["/bin/sh", "-c", "echo ready; exec sleep 2147483647"])
        .map_err(|e| e.to_string())?;
    containerd
        .import(BUSYBOX_IDLE, &idle)
        .map_err(|e| e.to_string())?;
    let version = Command::new("containerd")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    Ok(Runtime {
        socket: containerd.socket(),
        pid: containerd.pid(),
        daemon: None,
        _dir: dir,
        log_root,
        description: format!("{version} with runc (started by the bench)"),
        host_network: true,
        idle_image: BUSYBOX_IDLE,
        _containerd: Some(containerd),
        root: None,
    })
}

async fn connect(socket: &Path) -> Result<CriClient, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match CriClient::connect(socket, Duration::from_millis(500)).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => return Err(e.to_string()),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Memory mappings of the process: each instance costs a few, and the
/// kernel caps them per process (`vm.max_map_count`).
fn maps(pid: Option<u32>) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{}/maps", pid?))
        .ok()
        .map(|m| m.lines().count() as u64)
}

fn max_map_count() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|v| v.trim().parse().ok())
}

fn open_fds(pid: Option<u32>) -> Option<u64> {
    std::fs::read_dir(format!("/proc/{}/fd", pid?))
        .ok()
        .map(|d| d.count() as u64)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

fn latency_summary(mut samples: Vec<Duration>) -> Value {
    samples.sort();
    json!({
        "count": samples.len(),
        "p50_ms": percentile(&samples, 0.50),
        "p99_ms": percentile(&samples, 0.99),
        "max_ms": samples.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
    })
}

/// How long each step of a pod start took.
#[derive(Debug, Default, Clone, Copy)]
struct Phases {
    run_pod_sandbox: Duration,
    create_container: Duration,
    start_container: Duration,
    first_log_line: Duration,
}

/// RunPodSandbox, CreateContainer, StartContainer of a sleeper, then
/// waits until its first log line is on disk. Returns the pod id.
async fn start_pod(
    cri: &mut CriClient,
    rt: &Runtime,
    n: usize,
) -> Result<(String, Phases), String> {
    start_pod_of(cri, &rt.pod_template(), n, true).await
}

/// What the pods of a runtime look like, for workers that outlive a borrow.
#[derive(Clone)]
struct PodTemplate {
    log_root: PathBuf,
    host_network: bool,
    image: &'static str,
}

impl Runtime {
    fn pod_template(&self) -> PodTemplate {
        PodTemplate {
            log_root: self.log_root.clone(),
            host_network: self.host_network,
            image: self.idle_image,
        }
    }
}

/// `wait_for_log`: whether the pod counts as started at its first log line
/// (pod start latency) or when StartContainer returns (churn: what the
/// kubelet waits for; polling for files would also eat the CPU the
/// runtime needs when many workers churn at once).
async fn start_pod_of(
    cri: &mut CriClient,
    rt: &PodTemplate,
    n: usize,
    wait_for_log: bool,
) -> Result<(String, Phases), String> {
    let mut config = PodSandboxConfigBuilder::new(&rt.log_root)
        .name(format!("bench-{n}"))
        .cgroup_parent("/wasmlet-bench")
        .build();
    if rt.host_network {
        // As the kubelet: a pod on the node's network has the node's name.
        config.hostname.clear();
        config
            .linux
            .get_or_insert_with(Default::default)
            .security_context
            .get_or_insert_with(Default::default)
            .namespace_options
            .get_or_insert_with(Default::default)
            .network = cri::NamespaceMode::Node as i32;
    }
    let image = rt.image;
    let t = Instant::now();
    let pod = cri.run_pod(config).await.map_err(|e| e.to_string())?;
    let run_pod_sandbox = t.elapsed();
    let container = ContainerConfigBuilder::new("idle", image).build();
    let log = pod.container_log(&container);
    let t = Instant::now();
    let id = cri
        .create_container(&pod, container)
        .await
        .map_err(|e| e.to_string())?;
    let create_container = t.elapsed();
    let t = Instant::now();
    cri.start_container(&id).await.map_err(|e| e.to_string())?;
    let start_container = t.elapsed();
    let t = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(30);
    while wait_for_log && std::fs::metadata(&log).map_or(true, |m| m.len() == 0) {
        if Instant::now() > deadline {
            return Err(format!("no log line from pod {n} within 30 s"));
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    Ok((
        pod.id,
        Phases {
            run_pod_sandbox,
            create_container,
            start_container,
            first_log_line: t.elapsed(),
        },
    ))
}

fn phases_summary(phases: &[Phases]) -> Value {
    let p50 = |f: fn(&Phases) -> Duration| {
        let mut v: Vec<Duration> = phases.iter().map(f).collect();
        v.sort();
        percentile(&v, 0.5)
    };
    json!({
        "run_pod_sandbox_p50_ms": p50(|p| p.run_pod_sandbox),
        "create_container_p50_ms": p50(|p| p.create_container),
        "start_container_p50_ms": p50(|p| p.start_container),
        "first_log_line_after_start_p50_ms": p50(|p| p.first_log_line),
    })
}

async fn remove_pod(cri: &mut CriClient, pod: &str) -> Result<(), String> {
    cri.stop_pod_sandbox(pod).await.map_err(|e| e.to_string())?;
    cri.remove_pod_sandbox(pod).await.map_err(|e| e.to_string())
}

async fn pod_start(o: &Options, rt: &Runtime, cri: &mut CriClient) -> Result<Value, String> {
    // Warm up: the image is compiled once before timing.
    let (warm, _) = start_pod(cri, rt, usize::MAX).await?;
    remove_pod(cri, &warm).await?;
    let mut samples = Vec::with_capacity(o.start_pods);
    let mut pods = Vec::with_capacity(o.start_pods);
    let mut phases = Vec::with_capacity(o.start_pods);
    for n in 0..o.start_pods {
        let started = Instant::now();
        let (pod, p) = start_pod(cri, rt, n).await?;
        samples.push(started.elapsed());
        pods.push(pod);
        phases.push(p);
    }
    for pod in &pods {
        remove_pod(cri, pod).await?;
    }
    Ok(json!({
        "pods": o.start_pods,
        "start_to_first_log_line": latency_summary(samples),
        "phases": phases_summary(&phases),
    }))
}

async fn density(o: &Options, rt: &Runtime, cri: &mut CriClient) -> Result<Value, String> {
    let before = rss_kib(rt.pid);
    let maps_before = maps(rt.pid);
    let mut pods = Vec::with_capacity(o.density_pods);
    let mut last_starts = Vec::new();
    for n in 0..o.density_pods {
        let started = Instant::now();
        let (pod, _) = start_pod(cri, rt, 1_000_000 + n).await?;
        if n + 100 >= o.density_pods {
            last_starts.push(started.elapsed());
        }
        pods.push(pod);
    }
    let at_density = rss_kib(rt.pid);
    let maps_at_density = maps(rt.pid);
    let mut list_containers = Vec::new();
    let mut list_stats = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        cri.list_containers(None).await.map_err(|e| e.to_string())?;
        list_containers.push(t.elapsed());
        let t = Instant::now();
        cri.runtime()
            .list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest { filter: None })
            .await
            .map_err(|e| e.to_string())?;
        list_stats.push(t.elapsed());
    }
    for pod in &pods {
        remove_pod(cri, pod).await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(rt.pid);
    let per_pod = match (before, at_density) {
        (Some(b), Some(d)) if !pods.is_empty() => {
            Some((d.saturating_sub(b)) as f64 / pods.len() as f64)
        }
        _ => None,
    };
    Ok(json!({
        "pods": pods.len(),
        "rss_kib_before": before,
        "rss_kib_at_density": at_density,
        "rss_kib_after_removal": after,
        "rss_kib_per_idle_pod": per_pod,
        "memory_maps_before": maps_before,
        "memory_maps_at_density": maps_at_density,
        "vm_max_map_count": max_map_count(),
        "start_at_density": latency_summary(last_starts),
        "list_containers": latency_summary(list_containers),
        "list_pod_sandbox_stats": latency_summary(list_stats),
    }))
}

/// One churn worker's measurements.
#[derive(Default)]
struct ChurnStats {
    cycles: usize,
    phases: Vec<Phases>,
    stops: Vec<Duration>,
    removes: Vec<Duration>,
}

/// `workers` clients (on one connection, as the kubelet's pod workers)
/// each creating, starting, stopping and removing pods for the scenario's
/// time, with the runtime's RSS and descriptors sampled every second. A
/// pod counts as started when StartContainer returns.
async fn churn(
    o: &Options,
    rt: &Runtime,
    cri: &mut CriClient,
    workers: usize,
) -> Result<Value, String> {
    let samples = |label: &str| json!({"at": label, "rss_kib": rss_kib(rt.pid), "open_fds": open_fds(rt.pid)});
    let mut trace = vec![samples("start")];
    let started = Instant::now();
    let end = started + Duration::from_secs(o.churn_seconds);
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let mut cri = cri.clone();
            let template = rt.pod_template();
            tokio::spawn(async move {
                let mut stats = ChurnStats::default();
                while Instant::now() < end {
                    let n = 2_000_000 + w * 1_000_000 + stats.cycles;
                    let (pod, p) = start_pod_of(&mut cri, &template, n, false).await?;
                    stats.phases.push(p);
                    let t = Instant::now();
                    cri.stop_pod_sandbox(&pod)
                        .await
                        .map_err(|e| e.to_string())?;
                    stats.stops.push(t.elapsed());
                    let t = Instant::now();
                    cri.remove_pod_sandbox(&pod)
                        .await
                        .map_err(|e| e.to_string())?;
                    stats.removes.push(t.elapsed());
                    stats.cycles += 1;
                }
                Ok::<_, String>(stats)
            })
        })
        .collect();
    let mut next_sample = started + Duration::from_secs(1);
    while next_sample < end {
        tokio::time::sleep_until(next_sample.into()).await;
        trace.push(samples(&format!("{:.0}s", started.elapsed().as_secs_f64())));
        next_sample += Duration::from_secs(1);
    }
    let mut all = ChurnStats::default();
    for task in tasks {
        let stats = task.await.map_err(|e| e.to_string())??;
        all.cycles += stats.cycles;
        all.phases.extend(stats.phases);
        all.stops.extend(stats.stops);
        all.removes.extend(stats.removes);
    }
    let elapsed = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    trace.push(samples("end"));
    Ok(json!({
        "workers": workers,
        "seconds": elapsed,
        "pods": all.cycles,
        "pods_per_second": all.cycles as f64 / elapsed,
        "phases": phases_summary(&all.phases),
        "stop_pod_sandbox": latency_summary(all.stops),
        "remove_pod_sandbox": latency_summary(all.removes),
        "samples": trace,
    }))
}

/// Keeps `concurrency` HTTP/1.1 keep-alive connections busy with `GET /`
/// for `seconds`; requests per second and latency percentiles.
async fn load(
    addr: std::net::SocketAddr,
    concurrency: usize,
    seconds: u64,
) -> Result<Value, String> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0usize;
            let stream = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| e.to_string())?;
            stream.set_nodelay(true).ok();
            let mut stream = BufReader::new(stream);
            while Instant::now() < end {
                let t = Instant::now();
                stream
                    .get_mut()
                    .write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
                    .await
                    .map_err(|e| e.to_string())?;
                let mut status = String::new();
                stream
                    .read_line(&mut status)
                    .await
                    .map_err(|e| e.to_string())?;
                let mut length = 0usize;
                let mut chunked = false;
                loop {
                    let mut line = String::new();
                    stream
                        .read_line(&mut line)
                        .await
                        .map_err(|e| e.to_string())?;
                    let l = line.trim_end().to_ascii_lowercase();
                    if l.is_empty() {
                        break;
                    }
                    if let Some(v) = l.strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                    if l.starts_with("transfer-encoding:") && l.contains("chunked") {
                        chunked = true;
                    }
                }
                if chunked {
                    loop {
                        let mut size = String::new();
                        stream
                            .read_line(&mut size)
                            .await
                            .map_err(|e| e.to_string())?;
                        let n =
                            usize::from_str_radix(size.trim(), 16).map_err(|e| e.to_string())?;
                        let mut chunk = vec![0u8; n + 2];
                        stream
                            .read_exact(&mut chunk)
                            .await
                            .map_err(|e| e.to_string())?;
                        if n == 0 {
                            break;
                        }
                    }
                } else {
                    let mut body = vec![0u8; length];
                    stream
                        .read_exact(&mut body)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                if !status.contains(" 200 ") {
                    errors += 1;
                }
                latencies.push(t.elapsed());
            }
            Ok::<_, String>((latencies, errors))
        }));
    }
    let started = Instant::now();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.map_err(|e| e.to_string())??;
        all.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64().max(seconds as f64);
    let requests = all.len();
    Ok(json!({
        "concurrency": concurrency,
        "requests": requests,
        "non_200": errors,
        "requests_per_second": requests as f64 / elapsed,
        "latency": latency_summary(all),
    }))
}

async fn functions(
    o: &Options,
    rt: &Runtime,
    cri: &mut CriClient,
    net: &TestNetwork,
) -> Result<Value, String> {
    let config = PodSandboxConfigBuilder::new(&rt.log_root)
        .name("bench-http")
        .annotation("wasmlet.dev/http-max-concurrency", "256")
        .build();
    let pod = cri.run_pod(config).await.map_err(|e| e.to_string())?;
    let container = ContainerConfigBuilder::new("hello", HELLO_HTTP).build();
    cri.start(&pod, container)
        .await
        .map_err(|e| e.to_string())?;
    let addr = function_address(cri, net, &pod.id).await?;
    let wasmlet = load(addr, o.http_concurrency, o.http_seconds).await?;
    remove_pod(cri, &pod.id).await?;
    let baseline = match &o.wasmtime {
        Some(wasmtime) => Some(wasmtime_serve(wasmtime, o).await?),
        None => None,
    };
    let ratio = baseline.as_ref().and_then(|b| {
        let ours = wasmlet["requests_per_second"].as_f64()?;
        let theirs = b["requests_per_second"].as_f64()?;
        (theirs > 0.0).then(|| ours / theirs)
    });
    Ok(json!({
        "wasmlet": wasmlet,
        "wasmtime_serve": baseline.unwrap_or(Value::String(
            "not measured: pass --wasmtime BIN (wasmtime-cli 48, `cargo install wasmtime-cli@48`)".into()
        )),
        "throughput_ratio_to_wasmtime_serve": ratio,
    }))
}

/// Where the `hello-http` function of pod `pod` answers (port 8080 of the
/// pod's IP, route-checked), once it answers `/healthz`.
async fn function_address(
    cri: &mut CriClient,
    net: &TestNetwork,
    pod: &str,
) -> Result<std::net::SocketAddr, String> {
    let ip = cri
        .pod_sandbox_status(pod)
        .await
        .map_err(|e| e.to_string())?
        .network
        .map(|n| n.ip)
        .unwrap_or_default();
    net.check_route(&ip)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while net
        .http_get(&ip, 8080, "/healthz", Duration::from_secs(2))
        .is_err()
    {
        if Instant::now() > deadline {
            return Err("the function did not answer".to_owned());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    format!("{ip}:8080").parse().map_err(|e| format!("{e}"))
}

/// The same component under `wasmtime serve` on loopback.
async fn wasmtime_serve(bin: &Path, o: &Options) -> Result<Value, String> {
    let port = 18_000 + (std::process::id() % 1000) as u16;
    let mut child = Command::new(bin)
        .args(["serve", "-S", "cli", "--addr"])
        .arg(format!("127.0.0.1:{port}"))
        .arg(wasm_samples::HELLO_HTTP_P2)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err("wasmtime serve did not listen".to_owned());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let result = load(addr, o.http_concurrency, o.http_seconds).await;
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Pod start and churn against containerd + runc, and wasmlet's ratios to
/// it (from `report`, measured in the same run).
async fn baseline(
    o: &Options,
    net: &TestNetwork,
    report: &BTreeMap<&str, Value>,
) -> Result<Value, String> {
    let rt = match start_containerd(net).await {
        Ok(rt) => rt,
        Err(e) => return Ok(json!(format!("not measured: {e}"))),
    };
    let mut cri = connect(&rt.socket).await?;
    let pods = o.start_pods.min(100);
    eprintln!("wasmlet-bench: baseline pod start ({pods} pods, containerd + runc)");
    let start = pod_start(
        &Options {
            start_pods: pods,
            ..o.clone()
        },
        &rt,
        &mut cri,
    )
    .await?;
    let seconds = o.churn_seconds.min(20);
    eprintln!("wasmlet-bench: baseline churn ({seconds} s, containerd + runc)");
    let short = Options {
        churn_seconds: seconds,
        ..o.clone()
    };
    let churned = churn(&short, &rt, &mut cri, 1).await?;
    eprintln!(
        "wasmlet-bench: baseline churn ({seconds} s, {} workers, containerd + runc)",
        o.churn_workers
    );
    let churned_concurrent = churn(&short, &rt, &mut cri, o.churn_workers).await?;
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => json!(a / b),
        _ => Value::Null,
    };
    let wasmlet_p50 = report["pod_start"]["start_to_first_log_line"]["p50_ms"].as_f64();
    let wasmlet_p99 = report["pod_start"]["start_to_first_log_line"]["p99_ms"].as_f64();
    let wasmlet_churn = report["churn"]["pods_per_second"].as_f64();
    let wasmlet_churn_concurrent = report["churn_concurrent"]["pods_per_second"].as_f64();
    Ok(json!({
        "runtime": rt.description,
        "pod_start": start,
        "churn": churned,
        "pod_start_p50_speedup": ratio(start["start_to_first_log_line"]["p50_ms"].as_f64(), wasmlet_p50),
        "pod_start_p99_speedup": ratio(start["start_to_first_log_line"]["p99_ms"].as_f64(), wasmlet_p99),
        "churn_ratio": ratio(wasmlet_churn, churned["pods_per_second"].as_f64()),
        "churn_concurrent": churned_concurrent,
        "churn_concurrent_ratio": ratio(
            wasmlet_churn_concurrent,
            churned_concurrent["pods_per_second"].as_f64()
        ),
    }))
}

/// The disk's durable-write latency now: 4 KiB written and fdatasync'd,
/// median of 200, in the temp dir (where the runtimes' state goes). Every
/// state change of a runtime waits for one, so it bounds what a run can
/// show and explains run-to-run drift on a shared disk.
fn fsync_latency_ms() -> Option<f64> {
    use std::io::Write;
    let dir = tempfile::tempdir().ok()?;
    let mut file = std::fs::File::create(dir.path().join("probe")).ok()?;
    let block = [0u8; 4096];
    let mut samples = Vec::with_capacity(200);
    for _ in 0..200 {
        let t = Instant::now();
        file.write_all(&block).ok()?;
        file.sync_data().ok()?;
        samples.push(t.elapsed());
    }
    samples.sort();
    Some(percentile(&samples, 0.5))
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_owned())
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "cpu": model,
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "memory_kib": mem.parse::<u64>().ok(),
        "kernel": kernel.trim(),
        "fdatasync_4k_p50_ms": fsync_latency_ms(),
    })
}

fn markdown(report: &Value) -> String {
    let mut md = String::new();
    let get = |path: &[&str]| {
        let mut v = report;
        for p in path {
            v = &v[*p];
        }
        match v {
            Value::Number(n) => {
                let f = n.as_f64().unwrap_or(0.0);
                if f.fract() == 0.0 {
                    format!("{f:.0}")
                } else {
                    format!("{f:.2}")
                }
            }
            Value::Null => "—".to_owned(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    };
    md.push_str(&format!(
        "# wasmlet benchmark{}\n\nCommand: `{}`  \nRuntime: {}  \nMachine: {} × {}, {} KiB, Linux {}, 4 KiB write + fdatasync p50 {} ms  \nWhen: {}\n\n",
        if report["smoke"].as_bool() == Some(true) { " (smoke run: tiny scale, not a measurement)" } else { "" },
        get(&["command"]),
        get(&["runtime"]),
        get(&["machine", "cpus"]),
        get(&["machine", "cpu"]),
        get(&["machine", "memory_kib"]),
        get(&["machine", "kernel"]),
        get(&["machine", "fdatasync_4k_p50_ms"]),
        get(&["unix_time"]),
    ));
    md.push_str("| scenario | measure | value |\n|---|---|---|\n");
    let rows: &[(&str, &str, &[&str])] = &[
        ("pod start", "pods", &["pod_start", "pods"]),
        (
            "pod start",
            "p50 ms (to first log line)",
            &["pod_start", "start_to_first_log_line", "p50_ms"],
        ),
        (
            "pod start",
            "p99 ms",
            &["pod_start", "start_to_first_log_line", "p99_ms"],
        ),
        (
            "pod start",
            "max ms",
            &["pod_start", "start_to_first_log_line", "max_ms"],
        ),
        (
            "pod start",
            "RunPodSandbox p50 ms",
            &["pod_start", "phases", "run_pod_sandbox_p50_ms"],
        ),
        (
            "pod start",
            "CreateContainer p50 ms",
            &["pod_start", "phases", "create_container_p50_ms"],
        ),
        (
            "pod start",
            "StartContainer p50 ms",
            &["pod_start", "phases", "start_container_p50_ms"],
        ),
        (
            "pod start",
            "StartContainer to first log line p50 ms",
            &["pod_start", "phases", "first_log_line_after_start_p50_ms"],
        ),
        (
            "pod start with CNI (bridge, host-local, portmap)",
            "pods",
            &["pod_start_with_cni", "pods"],
        ),
        (
            "pod start with CNI (bridge, host-local, portmap)",
            "p50 ms",
            &["pod_start_with_cni", "start_to_first_log_line", "p50_ms"],
        ),
        (
            "pod start with CNI (bridge, host-local, portmap)",
            "RunPodSandbox p50 ms",
            &["pod_start_with_cni", "phases", "run_pod_sandbox_p50_ms"],
        ),
        ("density", "idle pods", &["density", "pods"]),
        (
            "density",
            "agent RSS KiB before",
            &["density", "rss_kib_before"],
        ),
        (
            "density",
            "agent RSS KiB at density",
            &["density", "rss_kib_at_density"],
        ),
        (
            "density",
            "agent RSS KiB per idle pod",
            &["density", "rss_kib_per_idle_pod"],
        ),
        (
            "density",
            "memory maps at density (vm.max_map_count)",
            &["density", "memory_maps_at_density"],
        ),
        (
            "density",
            "vm.max_map_count",
            &["density", "vm_max_map_count"],
        ),
        (
            "density",
            "agent RSS KiB after removal",
            &["density", "rss_kib_after_removal"],
        ),
        (
            "density",
            "pod start p50 ms at density",
            &["density", "start_at_density", "p50_ms"],
        ),
        (
            "density",
            "ListContainers p50 ms",
            &["density", "list_containers", "p50_ms"],
        ),
        (
            "density",
            "ListPodSandboxStats p50 ms",
            &["density", "list_pod_sandbox_stats", "p50_ms"],
        ),
        (
            "churn, one client",
            "pods created+started+stopped+removed per s",
            &["churn", "pods_per_second"],
        ),
        (
            "churn, one client",
            "StopPodSandbox p50 ms",
            &["churn", "stop_pod_sandbox", "p50_ms"],
        ),
        (
            "churn, one client",
            "RemovePodSandbox p50 ms",
            &["churn", "remove_pod_sandbox", "p50_ms"],
        ),
        (
            "churn, concurrent clients",
            "workers",
            &["churn_concurrent", "workers"],
        ),
        (
            "churn, concurrent clients",
            "pods created+started+stopped+removed per s",
            &["churn_concurrent", "pods_per_second"],
        ),
        (
            "functions",
            "wasmlet requests/s",
            &["functions", "wasmlet", "requests_per_second"],
        ),
        (
            "functions",
            "wasmlet p99 ms",
            &["functions", "wasmlet", "latency", "p99_ms"],
        ),
        (
            "functions",
            "wasmtime serve requests/s",
            &["functions", "wasmtime_serve", "requests_per_second"],
        ),
        (
            "functions",
            "ratio to wasmtime serve",
            &["functions", "throughput_ratio_to_wasmtime_serve"],
        ),
        (
            "noisy neighbours",
            "function p99 ms, quiet",
            &["neighbours", "quiet", "latency", "p99_ms"],
        ),
        (
            "noisy neighbours",
            "p99 ratio, neighbour spinning",
            &["neighbours", "spinning", "p99_ratio_to_quiet"],
        ),
        (
            "noisy neighbours",
            "p99 ratio, neighbour bombing memory to its limit",
            &["neighbours", "memory_bomb", "p99_ratio_to_quiet"],
        ),
        (
            "noisy neighbours",
            "p99 ratio, neighbour flooding its log",
            &["neighbours", "log_flood", "p99_ratio_to_quiet"],
        ),
        (
            "noisy neighbours",
            "throughput ratio, neighbour spinning",
            &["neighbours", "spinning", "throughput_ratio_to_quiet"],
        ),
        (
            "CPU quota 10%",
            "share of a core, idle cores",
            &["cpu_quota", "quiet_share"],
        ),
        (
            "CPU quota 10%",
            "share of a core, both cores busy",
            &["cpu_quota", "both_cores_busy_share"],
        ),
        ("soak", "pod cycles", &["soak", "cycles"]),
        ("soak", "cycles per s", &["soak", "cycles_per_second"]),
        ("soak with CNI", "pod cycles", &["soak_with_cni", "cycles"]),
        (
            "baseline: containerd + runc",
            "pods",
            &["baseline_runtime", "pod_start", "pods"],
        ),
        (
            "baseline: containerd + runc",
            "pod start p50 ms (to first log line)",
            &[
                "baseline_runtime",
                "pod_start",
                "start_to_first_log_line",
                "p50_ms",
            ],
        ),
        (
            "baseline: containerd + runc",
            "pod start p99 ms",
            &[
                "baseline_runtime",
                "pod_start",
                "start_to_first_log_line",
                "p99_ms",
            ],
        ),
        (
            "baseline: containerd + runc",
            "churn pods per s",
            &["baseline_runtime", "churn", "pods_per_second"],
        ),
        (
            "baseline: containerd + runc",
            "wasmlet pod start p50 speed-up (×)",
            &["baseline_runtime", "pod_start_p50_speedup"],
        ),
        (
            "baseline: containerd + runc",
            "wasmlet pod start p99 speed-up (×)",
            &["baseline_runtime", "pod_start_p99_speedup"],
        ),
        (
            "baseline: containerd + runc",
            "wasmlet churn ratio, one client (×)",
            &["baseline_runtime", "churn_ratio"],
        ),
        (
            "baseline: containerd + runc",
            "concurrent churn pods per s",
            &["baseline_runtime", "churn_concurrent", "pods_per_second"],
        ),
        (
            "baseline: containerd + runc",
            "wasmlet churn ratio, concurrent clients (×)",
            &["baseline_runtime", "churn_concurrent_ratio"],
        ),
    ];
    for (scenario, measure, path) in rows {
        md.push_str(&format!("| {scenario} | {measure} | {} |\n", get(path)));
    }
    if let Some(samples) = report["churn"]["samples"].as_array() {
        md.push_str("\nChurn samples (agent RSS KiB / open descriptors): ");
        let parts: Vec<String> = samples
            .iter()
            .map(|s| {
                format!(
                    "{} {}/{}",
                    s["at"].as_str().unwrap_or(""),
                    s["rss_kib"],
                    s["open_fds"]
                )
            })
            .collect();
        md.push_str(&parts.join(", "));
        md.push('\n');
    }
    md.push_str(&kube_ready::markdown(&report["kube_ready"]));
    md.push_str(&big_module::markdown(&report["big_module"]));
    for key in ["soak", "soak_with_cni"] {
        if let Some(samples) = report[key]["samples"].as_array() {
            md.push_str(&format!(
                "\n{key} samples (RSS KiB / descriptors / threads / state bytes / network namespaces): "
            ));
            let parts: Vec<String> = samples
                .iter()
                .map(|s| {
                    format!(
                        "{} {}/{}/{}/{}/{}",
                        s["at"].as_str().unwrap_or(""),
                        s["rss_kib"],
                        s["open_fds"],
                        s["threads"],
                        s["disk_bytes"],
                        s["netns"]
                    )
                })
                .collect();
            md.push_str(&parts.join(", "));
            md.push('\n');
        }
    }
    md
}

async fn run(o: Options) -> Result<PathBuf, String> {
    // Pod lifecycle scenarios run without a pod network (CNI plugins are
    // processes the runtime execs, milliseconds per pod whatever the
    // runtime); pod start with CNI and the functions run on a second
    // runtime with a network of the bench's own.
    let net = TestNetwork::create().ok();
    let rt = start_runtime(&o, None, "", "").await?;
    let mut cri = connect(&rt.socket).await?;
    let mut report = BTreeMap::new();
    report.insert("command", json!(o.command));
    report.insert("smoke", json!(o.smoke));
    report.insert("runtime", json!(rt.description));
    report.insert("machine", machine());
    report.insert(
        "unix_time",
        json!(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        ),
    );
    if o.runs("pod-start") {
        eprintln!("wasmlet-bench: pod start ({} pods)", o.start_pods);
        report.insert("pod_start", pod_start(&o, &rt, &mut cri).await?);
    }
    if o.runs("density") {
        eprintln!("wasmlet-bench: density ({} idle pods)", o.density_pods);
        report.insert("density", density(&o, &rt, &mut cri).await?);
    }
    if o.runs("churn") {
        eprintln!("wasmlet-bench: churn ({} s)", o.churn_seconds);
        report.insert("churn", churn(&o, &rt, &mut cri, 1).await?);
        eprintln!(
            "wasmlet-bench: churn ({} s, {} workers)",
            o.churn_seconds, o.churn_workers
        );
        report.insert(
            "churn_concurrent",
            churn(&o, &rt, &mut cri, o.churn_workers).await?,
        );
    }
    if o.runs("soak") {
        eprintln!("wasmlet-bench: soak ({} pod cycles)", o.soak_cycles);
        report.insert("soak", isolation::soak(&o, &rt, &mut cri, None).await?);
    }
    if o.runs("quota") {
        eprintln!("wasmlet-bench: CPU quota accuracy");
        report.insert("cpu_quota", isolation::quota(&o, &rt, &mut cri).await?);
    }
    drop(cri);
    drop(rt);
    let networked = ["functions", "neighbours", "soak"]
        .iter()
        .any(|s| o.runs(s));
    match &net {
        Some(net) if o.endpoint.is_none() && networked => {
            let rt = start_runtime(&o, Some(net), "", "").await?;
            let mut cri = connect(&rt.socket).await?;
            if o.runs("functions") {
                let pods = o.start_pods.min(100);
                eprintln!("wasmlet-bench: pod start with a CNI network ({pods} pods)");
                let cni_start = pod_start(
                    &Options {
                        start_pods: pods,
                        ..o.clone()
                    },
                    &rt,
                    &mut cri,
                )
                .await?;
                report.insert("pod_start_with_cni", cni_start);
                eprintln!("wasmlet-bench: functions ({} s)", o.http_seconds);
                report.insert("functions", functions(&o, &rt, &mut cri, net).await?);
            }
            if o.runs("neighbours") {
                eprintln!(
                    "wasmlet-bench: noisy neighbours ({} s each)",
                    o.http_seconds
                );
                report.insert(
                    "neighbours",
                    isolation::neighbours(&o, &rt, &mut cri, net).await?,
                );
            }
            if o.runs("soak") {
                eprintln!(
                    "wasmlet-bench: soak with a CNI network ({} pod cycles)",
                    o.soak_cni_cycles
                );
                let cni = Options {
                    soak_cycles: o.soak_cni_cycles,
                    ..o.clone()
                };
                report.insert(
                    "soak_with_cni",
                    isolation::soak(&cni, &rt, &mut cri, Some(&net.netns_dir())).await?,
                );
            }
        }
        _ if networked => {
            let why =
                json!("not measured: needs root and the CNI plugins (containernetworking-plugins)");
            for key in [
                "pod_start_with_cni",
                "functions",
                "neighbours",
                "soak_with_cni",
            ] {
                report.insert(key, why.clone());
            }
        }
        _ => {}
    }
    if o.runs("baseline") {
        let baseline = match &net {
            Some(net) if o.endpoint.is_none() => baseline(&o, net, &report).await?,
            _ => json!("not measured: needs root, the CNI plugins, containerd and runc"),
        };
        report.insert("baseline_runtime", baseline);
    }
    if o.runs("kube-ready") {
        report.insert("kube_ready", kube_ready::kube_ready(&o).await?);
    }
    if o.runs("big-module") {
        report.insert("big_module", big_module::big_module(&o).await?);
    }
    let report = serde_json::to_value(&report).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&o.out).map_err(|e| format!("creating {}: {e}", o.out.display()))?;
    let stem = format!(
        "{}{}",
        report["unix_time"],
        if o.smoke { "-smoke" } else { "" }
    );
    let json_path = o.out.join(format!("{stem}.json"));
    std::fs::write(
        &json_path,
        serde_json::to_vec_pretty(&report).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(o.out.join(format!("{stem}.md")), markdown(&report))
        .map_err(|e| e.to_string())?;
    Ok(json_path)
}

// One thread, as a kubelet's client side is light: churn workers are tasks
// on it (they do not block: only pod start polls for the log line).
#[tokio::main(flavor = "current_thread")]
async fn main() {
    let o = parse_options();
    match run(o).await {
        Ok(path) => println!("{}", path.display()),
        Err(e) => {
            eprintln!("wasmlet-bench: {e}");
            std::process::exit(1);
        }
    }
}
