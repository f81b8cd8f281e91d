//! `big-module`: what the fast first tier (`[engine] fast_tier_min_bytes`)
//! does for a big program, measured through CRI on the real daemon.
//!
//! The program (`--big-module FILE.wasm`) is pushed once to a private
//! `registry:2`; then, for the tier off (threshold 0) and on (the default
//! 16 MiB threshold, or the program's own size when it is smaller), a fresh
//! wasmlet on a root of its own: `PullImage` (which answers once the
//! program is compiled: Cranelift, or Winch with the tier), a first
//! container run to exit (`--big-module-arg`s, `--big-module-mount`s), with
//! the tier the wait for the background Cranelift compile (read off the
//! daemon's log, bounded), and a second container run to exit. The
//! compile times the daemon logged are reported beside the times seen over
//! CRI, and the ratios of the two runs.
//!
//! Nothing here is asserted but that the runs exit 0; every wait is
//! bounded.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wasmlet_conformance::fixtures::registry::{Registry, RegistryOptions};
use wasmlet_conformance::{ContainerConfigBuilder, CriClient, PodSandboxConfigBuilder};

use super::{Options, Runtime, connect, start_runtime_logging, wasmlet_binary};

/// The daemon's log filter: the engine's compile lines.
const RUST_LOG: &str = "warn,wasmlet_agent::runtime=info";

/// The tier's default threshold (`cri-shim`'s `DEFAULT_FAST_TIER_MIN_BYTES`).
const DEFAULT_THRESHOLD: u64 = 16 << 20;

/// How long one pull, one run, or the background compile may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(600);

const WINCH_COMPILE: &str = "compiled Wasm with Winch";
const BACKGROUND_COMPILE: &str = "compiled Wasm with Cranelift in the background";

/// A host directory the program's containers get: `HOST:GUEST`, read-only
/// unless suffixed `:rw`.
#[derive(Debug, Clone)]
pub struct Mount {
    host: PathBuf,
    guest: String,
    writable: bool,
}

impl Mount {
    pub fn parse(spec: &str) -> Option<Mount> {
        let (spec, writable) = match spec.strip_suffix(":rw") {
            Some(spec) => (spec, true),
            None => (spec.strip_suffix(":ro").unwrap_or(spec), false),
        };
        let (host, guest) = spec.split_once(':')?;
        if host.is_empty() || !guest.starts_with('/') {
            return None;
        }
        Some(Mount {
            host: PathBuf::from(host),
            guest: guest.to_owned(),
            writable,
        })
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The `elapsed_ms` of the first log line containing `message`.
fn logged_ms(log: &str, message: &str) -> Option<u64> {
    let line = log.lines().find(|l| l.contains(message))?;
    let value = &line[line.find("elapsed_ms=")? + "elapsed_ms=".len()..];
    let digits: String = value.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Pushes the program to a private registry: its reference there.
fn push(o: &Options, file: &Path, registry: &Registry) -> Result<String, String> {
    let reference = format!("{}/bench/big-module:1", registry.host());
    let out = Command::new(wasmlet_binary(o))
        .args(["image", "push", "--insecure"])
        .arg(file)
        .arg(&reference)
        .output()
        .map_err(|e| format!("running wasmlet image push: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "pushing {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(reference)
}

/// What one run of the program took.
struct RunTimes {
    create: Duration,
    /// StartContainer's call to the exit seen through ContainerStatus.
    start_to_exit: Duration,
    /// The runtime's own record: started at to finished at.
    guest: Duration,
}

impl RunTimes {
    fn json(&self) -> Value {
        json!({
            "create_container_ms": ms(self.create),
            "start_to_exit_ms": ms(self.start_to_exit),
            "guest_run_ms": ms(self.guest),
        })
    }
}

/// Runs one container of `image` to exit in a pod of its own; an exit
/// other than 0 is an error, with the container's log.
async fn run_once(
    o: &Options,
    rt: &Runtime,
    cri: &mut CriClient,
    image: &str,
    name: &str,
) -> Result<RunTimes, String> {
    let config = PodSandboxConfigBuilder::new(&rt.log_root)
        .name(format!("big-module-{name}"))
        .build();
    let pod = cri.run_pod(config).await.map_err(|e| e.to_string())?;
    let mut container =
        ContainerConfigBuilder::new(name, image).args(o.big_module_args.iter().cloned());
    for m in &o.big_module_mounts {
        container = container.mount(&m.host, m.guest.clone(), !m.writable);
    }
    let container = container.build();
    let log = pod.container_log(&container);
    let t = Instant::now();
    let id = cri
        .create_container(&pod, container)
        .await
        .map_err(|e| e.to_string())?;
    let create = t.elapsed();
    let t = Instant::now();
    cri.start_container(&id).await.map_err(|e| e.to_string())?;
    let status = cri
        .wait_exited(&id, STEP_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    let start_to_exit = t.elapsed();
    if status.exit_code != 0 {
        let output = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: String = output.lines().rev().take(20).collect::<Vec<_>>().join("\n");
        return Err(format!(
            "{name} exited {}: {} (log, last lines first):\n{tail}",
            status.exit_code, status.message
        ));
    }
    let guest = Duration::from_nanos(status.finished_at.saturating_sub(status.started_at) as u64);
    cri.stop_pod_sandbox(&pod.id)
        .await
        .map_err(|e| e.to_string())?;
    cri.remove_pod_sandbox(&pod.id)
        .await
        .map_err(|e| e.to_string())?;
    Ok(RunTimes {
        create,
        start_to_exit,
        guest,
    })
}

/// One wasmlet with `threshold` (0: the tier off): pull, run, (wait for
/// the background compile,) run.
async fn measure(
    o: &Options,
    registry: &Registry,
    reference: &str,
    threshold: u64,
) -> Result<Value, String> {
    let rt = start_runtime_logging(
        o,
        None,
        "",
        &format!(
            "[engine]\nfast_tier_min_bytes = {threshold}\n[registry]\ninsecure = [\"{}\"]\n",
            registry.host()
        ),
        RUST_LOG,
    )
    .await?;
    let mut cri = connect(&rt.socket).await?;
    let load_before = load_average();
    let t = Instant::now();
    tokio::time::timeout(STEP_TIMEOUT, cri.pull_image(reference))
        .await
        .map_err(|_| format!("PullImage took over {STEP_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    let pull = t.elapsed();
    let pulled_at = Instant::now();
    let first = run_once(o, &rt, &mut cri, reference, "first").await?;
    let mut background = Value::Null;
    if threshold > 0 {
        let deadline = Instant::now() + STEP_TIMEOUT;
        while !rt.daemon_log().contains(BACKGROUND_COMPILE) {
            if Instant::now() > deadline {
                return Err(format!(
                    "no background compile within {STEP_TIMEOUT:?}:\n{}",
                    rt.daemon_log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        background = json!({
            "pull_answered_to_swapped_in_ms": ms(pulled_at.elapsed()),
            "cranelift_compile_logged_ms": logged_ms(&rt.daemon_log(), BACKGROUND_COMPILE),
        });
    }
    let second = run_once(o, &rt, &mut cri, reference, "second").await?;
    let log = rt.daemon_log();
    let (first_compile, tier) = match logged_ms(&log, WINCH_COMPILE) {
        Some(winch) => (Some(winch), "winch"),
        None => (logged_ms(&log, "compiled Wasm"), "cranelift"),
    };
    Ok(json!({
        "fast_tier_min_bytes": threshold,
        "first_compile_tier": tier,
        "first_compile_logged_ms": first_compile,
        "pull_image_ms": ms(pull),
        "first_run": first.json(),
        "pull_to_first_exit_ms": ms(pull + first.create + first.start_to_exit),
        "background_compile": background,
        "second_run": second.json(),
        "load_average_at_start": load_before,
        "load_average_at_end": load_average(),
    }))
}

/// `/proc/loadavg`'s three averages: others' builds may share the machine.
fn load_average() -> Value {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| json!(s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")))
        .unwrap_or(Value::Null)
}

pub async fn big_module(o: &Options) -> Result<Value, String> {
    let Some(file) = &o.big_module else {
        return Ok(json!(
            "not measured: --big-module FILE.wasm names no program"
        ));
    };
    if o.endpoint.is_some() {
        return Ok(json!(
            "not measured: needs wasmlets the bench starts (not --endpoint)"
        ));
    }
    let size = std::fs::metadata(file)
        .map_err(|e| format!("{}: {e}", file.display()))?
        .len();
    let registry = Registry::start(RegistryOptions::default())
        .await
        .map_err(|e| format!("starting a registry: {e}"))?;
    let reference = push(o, file, &registry)?;
    eprintln!("wasmlet-bench: big module ({size} bytes), fast tier off");
    let off = measure(o, &registry, &reference, 0).await?;
    eprintln!("wasmlet-bench: big module, fast tier on");
    let on = measure(o, &registry, &reference, DEFAULT_THRESHOLD.min(size)).await?;
    let ratio = |a: &Value, b: &Value| match (a.as_f64(), b.as_f64()) {
        (Some(a), Some(b)) if b > 0.0 => json!(a / b),
        _ => Value::Null,
    };
    Ok(json!({
        "program": file.display().to_string(),
        "wasm_bytes": size,
        "args": o.big_module_args,
        "off": off,
        "on": on,
        "pull_speedup": ratio(&off["pull_image_ms"], &on["pull_image_ms"]),
        "first_run_slowdown": ratio(&on["first_run"]["guest_run_ms"], &off["first_run"]["guest_run_ms"]),
        "pull_to_first_exit_speedup": ratio(&off["pull_to_first_exit_ms"], &on["pull_to_first_exit_ms"]),
        "second_run_ratio": ratio(&on["second_run"]["guest_run_ms"], &off["second_run"]["guest_run_ms"]),
    }))
}

pub fn markdown(section: &Value) -> String {
    if let Some(why) = section.as_str() {
        return format!("\nbig module: {why}\n");
    }
    if section.is_null() {
        return String::new();
    }
    let num = |v: &Value| match v.as_f64() {
        Some(f) if f >= 100.0 => format!("{f:.0}"),
        Some(f) => format!("{f:.2}"),
        None => "—".to_owned(),
    };
    let mut md = format!(
        "\n### Big module: the fast first tier ({}, {} bytes)\n\n\
         | tier | first compile | logged compile ms | PullImage ms | 1st run ms (guest) | pull → 1st exit ms | \
         background Cranelift ms (logged) | pull → swapped in ms | 2nd run ms (guest) | load at start / end |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        section["program"].as_str().unwrap_or(""),
        section["wasm_bytes"]
    );
    for (name, run) in [("off", &section["off"]), ("on", &section["on"])] {
        md.push_str(&format!(
            "| {name} (threshold {}) | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} |\n",
            run["fast_tier_min_bytes"],
            run["first_compile_tier"].as_str().unwrap_or("—"),
            num(&run["first_compile_logged_ms"]),
            num(&run["pull_image_ms"]),
            num(&run["first_run"]["guest_run_ms"]),
            num(&run["pull_to_first_exit_ms"]),
            num(&run["background_compile"]["cranelift_compile_logged_ms"]),
            num(&run["background_compile"]["pull_answered_to_swapped_in_ms"]),
            num(&run["second_run"]["guest_run_ms"]),
            run["load_average_at_start"].as_str().unwrap_or("—"),
            run["load_average_at_end"].as_str().unwrap_or("—"),
        ));
    }
    md.push_str(&format!(
        "\nPullImage speed-up with the tier {}×; first run on Winch code {}× the Cranelift run; \
         pull to first exit {}× sooner; second run (Cranelift code both) {}×.\n",
        num(&section["pull_speedup"]),
        num(&section["first_run_slowdown"]),
        num(&section["pull_to_first_exit_speedup"]),
        num(&section["second_run_ratio"]),
    ));
    md
}
