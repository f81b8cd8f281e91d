//! What one pod does to the others: a wasi:http function's latency while
//! a neighbour spins, bombs memory up to its limit, or floods its log (as
//! ratios to the quiet run); how close a CPU quota holds with the cores
//! idle and busy; and a soak of many pod cycles with the agent's memory,
//! descriptors, threads, disk use and network namespaces sampled.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wasmlet_conformance::pod_network::TestNetwork;
use wasmlet_conformance::{ContainerConfigBuilder, CriClient, Pod, PodSandboxConfigBuilder, cri};

use super::{
    HELLO_HTTP, HOG, Options, Runtime, SPIN, TICKER, function_address, latency_summary, load,
    open_fds, remove_pod, rss_kib, start_pod_of,
};

/// The memory limit of the memory-bombing neighbour.
const BOMB_LIMIT_MIB: i64 = 256;

/// Starts a pod of one container `config`, waiting for its first log line.
async fn run_one(
    cri: &mut CriClient,
    rt: &Runtime,
    name: &str,
    config: cri::ContainerConfig,
) -> Result<(Pod, String), String> {
    let pod_config = PodSandboxConfigBuilder::new(&rt.log_root)
        .name(name)
        .annotation("wasmlet.dev/http-max-concurrency", "256")
        .build();
    let pod = cri.run_pod(pod_config).await.map_err(|e| e.to_string())?;
    let log = pod.container_log(&config);
    let id = cri.start(&pod, config).await.map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&log).map_or(true, |m| m.len() == 0) {
        if Instant::now() > deadline {
            return Err(format!("{name} logged nothing within 30 s"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok((pod, id))
}

/// The function's throughput and latency at the bench's concurrency, with
/// whatever else runs on the node meanwhile.
async fn measure(o: &Options, addr: std::net::SocketAddr) -> Result<Value, String> {
    load(addr, o.http_concurrency, o.http_seconds).await
}

fn ratio(run: &Value, quiet: &Value, path: &[&str]) -> Option<f64> {
    let get = |v: &Value| path.iter().try_fold(v, |v, k| v.get(k))?.as_f64();
    let (a, b) = (get(run)?, get(quiet)?);
    (b > 0.0).then(|| a / b)
}

/// A wasi:http function under load, quiet and then beside each kind of
/// noisy neighbour in another pod.
pub async fn neighbours(
    o: &Options,
    rt: &Runtime,
    cri: &mut CriClient,
    net: &TestNetwork,
) -> Result<Value, String> {
    let (pod, _) = run_one(
        cri,
        rt,
        "bench-victim",
        ContainerConfigBuilder::new("hello", HELLO_HTTP).build(),
    )
    .await?;
    let addr = function_address(cri, net, &pod.id).await?;
    let quiet = measure(o, addr).await?;
    let noisy: [(&str, cri::ContainerConfig); 3] = [
        (
            "spinning",
            ContainerConfigBuilder::new("spin", SPIN).build(),
        ),
        (
            "memory_bomb",
            ContainerConfigBuilder::new("hog", HOG)
                .env("HOG_LIMIT_MIB", BOMB_LIMIT_MIB.to_string())
                .env("HOG_CYCLES", "1000000000")
                .memory_limit(BOMB_LIMIT_MIB * 1024 * 1024)
                .build(),
        ),
        (
            "log_flood",
            ContainerConfigBuilder::new("ticker", TICKER)
                .env("TICK_MS", "0")
                .build(),
        ),
    ];
    let mut out = serde_json::Map::new();
    out.insert("quiet".into(), quiet.clone());
    for (kind, config) in noisy {
        let (neighbour, _) = run_one(cri, rt, &format!("bench-{kind}"), config).await?;
        let run = measure(o, addr).await?;
        remove_pod(cri, &neighbour.id).await?;
        out.insert(
            kind.into(),
            json!({
                "run": run,
                "p99_ratio_to_quiet": ratio(&run, &quiet, &["latency", "p99_ms"]),
                "throughput_ratio_to_quiet": ratio(&run, &quiet, &["requests_per_second"]),
            }),
        );
    }
    remove_pod(cri, &pod.id).await?;
    Ok(Value::Object(out))
}

/// A container's CPU time so far, in nanoseconds, from ContainerStats.
async fn cpu_nanos(cri: &mut CriClient, id: &str) -> Result<u64, String> {
    let stats = cri
        .runtime()
        .container_stats(cri::ContainerStatsRequest {
            container_id: id.to_owned(),
        })
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    Ok(stats
        .stats
        .and_then(|s| s.cpu)
        .and_then(|c| c.usage_core_nano_seconds)
        .map_or(0, |v| v.value))
}

/// The share of a core a spinning guest with a 10% CFS quota gets over
/// `seconds`, alone and with two unlimited spinners keeping both cores
/// busy (target: within ±25% of 10%).
pub async fn quota(o: &Options, rt: &Runtime, cri: &mut CriClient) -> Result<Value, String> {
    let seconds = if o.smoke { 1 } else { 10 };
    let mut limited = ContainerConfigBuilder::new("spin", SPIN).build();
    let resources = limited
        .linux
        .get_or_insert_default()
        .resources
        .get_or_insert_default();
    resources.cpu_quota = 10_000;
    resources.cpu_period = 100_000;
    let (pod, id) = run_one(cri, rt, "bench-quota", limited).await?;
    let share = async |cri: &mut CriClient| -> Result<f64, String> {
        let (t0, c0) = (Instant::now(), cpu_nanos(cri, &id).await?);
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let (t1, c1) = (Instant::now(), cpu_nanos(cri, &id).await?);
        Ok((c1 - c0) as f64 / (t1 - t0).as_nanos() as f64)
    };
    let quiet = share(cri).await?;
    let mut busy = Vec::new();
    for n in 0..2 {
        let (p, _) = run_one(
            cri,
            rt,
            &format!("bench-busy-{n}"),
            ContainerConfigBuilder::new("spin", SPIN).build(),
        )
        .await?;
        busy.push(p);
    }
    let loaded = share(cri).await?;
    for p in busy {
        remove_pod(cri, &p.id).await?;
    }
    remove_pod(cri, &pod.id).await?;
    let error = |s: f64| (s - 0.10) / 0.10;
    Ok(json!({
        "quota": "10% of a core (cpu_quota 10000 / cpu_period 100000)",
        "seconds": seconds,
        "quiet_share": quiet,
        "quiet_error": error(quiet),
        "both_cores_busy_share": loaded,
        "both_cores_busy_error": error(loaded),
    }))
}

fn threads(pid: Option<u32>) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Bytes in files under `dir`.
fn disk_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => disk_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

fn entries(dir: Option<&Path>) -> Option<u64> {
    Some(std::fs::read_dir(dir?).ok()?.count() as u64)
}

/// `cycles` pod cycles (run, create, start, stop, remove) by the bench's
/// churn workers, with the agent sampled every few seconds: nothing may
/// grow with the cycles.
pub async fn soak(
    o: &Options,
    rt: &Runtime,
    cri: &mut CriClient,
    netns_dir: Option<&Path>,
) -> Result<Value, String> {
    let cycles = o.soak_cycles;
    let root = rt.root.clone();
    let sample = |at: String| {
        json!({
            "at": at,
            "rss_kib": rss_kib(rt.pid),
            "open_fds": open_fds(rt.pid),
            "threads": threads(rt.pid),
            "disk_bytes": root.as_deref().map(disk_bytes),
            "netns": entries(netns_dir),
        })
    };
    let mut trace = vec![sample("start".into())];
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..o.churn_workers.max(1))
        .map(|w| {
            let mut cri = cri.clone();
            let template = rt.pod_template();
            let done = done.clone();
            tokio::spawn(async move {
                let mut times = Vec::new();
                let mut n = 0;
                while done.fetch_add(1, Ordering::Relaxed) < cycles {
                    let t = Instant::now();
                    let (pod, _) =
                        start_pod_of(&mut cri, &template, 10_000_000 + w * 1_000_000 + n, false)
                            .await?;
                    remove_pod(&mut cri, &pod).await?;
                    times.push(t.elapsed());
                    n += 1;
                }
                Ok::<_, String>(times)
            })
        })
        .collect();
    let every = Duration::from_secs(if o.smoke { 1 } else { 10 });
    while tasks.iter().any(|t| !t.is_finished()) {
        tokio::time::sleep(every.min(Duration::from_millis(200))).await;
        if started.elapsed().as_secs() / every.as_secs().max(1) >= trace.len() as u64 {
            trace.push(sample(format!(
                "{} cycles",
                done.load(Ordering::Relaxed).min(cycles)
            )));
        }
    }
    let mut times = Vec::new();
    for task in tasks {
        times.extend(task.await.map_err(|e| e.to_string())??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    trace.push(sample("end".into()));
    Ok(json!({
        "cycles": times.len(),
        "workers": o.churn_workers.max(1),
        "seconds": elapsed,
        "cycles_per_second": times.len() as f64 / elapsed,
        "cycle": latency_summary(times),
        "samples": trace,
    }))
}
