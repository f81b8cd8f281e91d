//! `wasmlet doctor`: checks a node for what the agent needs and says what
//! to fix. Each check ends `ok`, `warn` (works, but an operator should
//! know) or `FAIL` (the agent, or pods, will not work); the command exits
//! non-zero when anything fails. It changes nothing on the node.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use wasmlet_agent::model::network::NetworkList;

use crate::config::Settings;

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// The pods the node is to hold (the kubelet's maxPods), for the
    /// kernel limits that grow with them.
    #[arg(long, default_value_t = 110)]
    pods: u64,
    /// The kubelet's configuration file, to check its feature gates.
    #[arg(long, default_value = "/var/lib/kubelet/config.yaml")]
    kubelet_config: PathBuf,
}

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

/// One check's outcome: what was checked, and what to do about it.
#[derive(Debug)]
pub struct Finding {
    pub verdict: Verdict,
    pub check: &'static str,
    pub detail: String,
}

fn finding(verdict: Verdict, check: &'static str, detail: impl Into<String>) -> Finding {
    Finding {
        verdict,
        check,
        detail: detail.into(),
    }
}

/// Memory mappings one pod's guest adds to the agent (its linear memory's
/// reservation and guard, its stack, its tables): 7 measured for a running
/// command guest (`doctor::a_pod_takes_no_more_memory_mappings_than_doctor_assumes`
/// checks this figure covers it), doubled for room; and what the agent
/// itself takes.
const MAPS_PER_POD: u64 = 16;
const MAPS_FOR_THE_AGENT: u64 = 16_384;

/// Runs every check against `settings` and prints the findings; fails when
/// one fails.
pub async fn run(settings: &Settings, args: &DoctorArgs) -> anyhow::Result<()> {
    let findings = check(settings, args).await;
    let mut out = std::io::stdout().lock();
    for f in &findings {
        let tag = match f.verdict {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        };
        writeln!(out, "{tag}  {:<22} {}", f.check, f.detail)?;
    }
    let failed = findings
        .iter()
        .filter(|f| f.verdict == Verdict::Fail)
        .count();
    if failed > 0 {
        anyhow::bail!("{failed} check(s) failed: fix them before the agent runs pods here");
    }
    Ok(())
}

/// Every check, in the order an operator would fix them.
pub async fn check(settings: &Settings, args: &DoctorArgs) -> Vec<Finding> {
    let mut findings = vec![
        network_namespaces(),
        max_map_count(args.pods),
        state_dir(&settings.root),
        socket(&settings.socket),
    ];
    findings.extend(cni(settings));
    if let Some(delegate) = &settings.delegate {
        findings.push(downstream(&delegate.socket).await);
    }
    findings.push(read_only_mounts());
    findings.push(metrics(settings.metrics_address).await);
    findings.push(kubelet_stats_gate(&args.kubelet_config));
    findings.push(clock());
    findings.push(disk_latency(&settings.root));
    findings
}

fn network_namespaces() -> Finding {
    const CHECK: &str = "network namespaces";
    if !Path::new("/proc/self/ns/net").exists() {
        return finding(
            Verdict::Fail,
            CHECK,
            "the kernel has no network namespaces (CONFIG_NET_NS): pods cannot get networks",
        );
    }
    if !nix::unistd::geteuid().is_root() {
        return finding(
            Verdict::Fail,
            CHECK,
            "not root: the agent makes pods' network namespaces and runs CNI plugins, which needs root",
        );
    }
    finding(Verdict::Ok, CHECK, "supported; running as root")
}

fn max_map_count(pods: u64) -> Finding {
    const CHECK: &str = "vm.max_map_count";
    let needed = MAPS_FOR_THE_AGENT + pods * MAPS_PER_POD;
    match read_number("/proc/sys/vm/max_map_count") {
        Some(have) if have >= needed => finding(
            Verdict::Ok,
            CHECK,
            format!("{have}, room for {pods} pods (needs {needed})"),
        ),
        Some(have) => finding(
            Verdict::Fail,
            CHECK,
            format!(
                "{have}: too few for {pods} pods, whose guests all map memory in the agent's one process (needs {needed}); `sysctl -w vm.max_map_count={needed}` and persist it in /etc/sysctl.d"
            ),
        ),
        None => finding(
            Verdict::Warn,
            CHECK,
            "cannot read /proc/sys/vm/max_map_count",
        ),
    }
}

fn read_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn state_dir(root: &Path) -> Finding {
    const CHECK: &str = "state directory";
    // The nearest directory that exists: the agent creates the rest.
    let mut dir = root.to_owned();
    while !dir.exists() {
        match dir.parent() {
            Some(parent) => dir = parent.to_owned(),
            None => break,
        }
    }
    let probe = dir.join(format!(".wasmlet-doctor-{}", std::process::id()));
    if let Err(e) = std::fs::write(&probe, b"probe") {
        return finding(
            Verdict::Fail,
            CHECK,
            format!(
                "{} is not writable ({e}): the agent keeps its state, images and compiled code there",
                dir.display()
            ),
        );
    }
    let _ = std::fs::remove_file(&probe);
    if dir == root {
        let mode = std::fs::metadata(root).map(|m| m.permissions().mode() & 0o777);
        if let Ok(mode) = mode
            && mode & 0o007 != 0
        {
            return finding(
                Verdict::Warn,
                CHECK,
                format!(
                    "{} is open to other users (mode {mode:o}): it holds pods' files and registry data; `chmod o-rwx` it",
                    root.display()
                ),
            );
        }
    }
    finding(
        Verdict::Ok,
        CHECK,
        format!("{} is writable", root.display()),
    )
}

fn socket(path: &Path) -> Finding {
    const CHECK: &str = "CRI socket";
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return finding(
                Verdict::Warn,
                CHECK,
                format!(
                    "{} answers: an agent (or another runtime) already serves it",
                    path.display()
                ),
            );
        }
        return finding(
            Verdict::Ok,
            CHECK,
            format!("{} is stale; the agent replaces it", path.display()),
        );
    }
    let parent = path.parent().unwrap_or(Path::new("/"));
    let mut dir = parent.to_owned();
    while !dir.exists() {
        match dir.parent() {
            Some(p) => dir = p.to_owned(),
            None => break,
        }
    }
    let writable = nix::unistd::access(&dir, nix::unistd::AccessFlags::W_OK).is_ok();
    if !writable {
        return finding(
            Verdict::Fail,
            CHECK,
            format!(
                "cannot create {}: {} is not writable",
                path.display(),
                dir.display()
            ),
        );
    }
    finding(
        Verdict::Ok,
        CHECK,
        format!("{} can be created", path.display()),
    )
}

fn cni(settings: &Settings) -> Vec<Finding> {
    const CHECK: &str = "CNI configuration";
    let dir = &settings.network.cni.conf_dir;
    let list = match NetworkList::load_first(dir) {
        Ok(Some(list)) => list,
        Ok(None) => {
            return vec![finding(
                Verdict::Fail,
                CHECK,
                format!(
                    "no valid *.conflist, *.conf or *.json in {}: pods would get no network and the node would not be Ready",
                    dir.display()
                ),
            )];
        }
        Err(e) => return vec![finding(Verdict::Fail, CHECK, e.to_string())],
    };
    let mut findings = vec![finding(
        Verdict::Ok,
        CHECK,
        format!("network {:?} from {}", list.name, list.source.display()),
    )];
    let mut missing = Vec::new();
    for plugin in &list.plugins {
        let Some(kind) = plugin.get("type").and_then(|t| t.as_str()) else {
            continue;
        };
        let found = settings
            .network
            .cni
            .bin_dirs
            .iter()
            .map(|d| d.join(kind))
            .any(|p| p.is_file());
        if !found {
            missing.push(kind.to_owned());
        }
    }
    let dirs: Vec<String> = settings
        .network
        .cni
        .bin_dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    findings.push(if missing.is_empty() {
        finding(
            Verdict::Ok,
            "CNI plugins",
            format!("every plugin the network uses is in {}", dirs.join(" or ")),
        )
    } else {
        finding(
            Verdict::Fail,
            "CNI plugins",
            format!(
                "{} not in {}: install them (e.g. containernetworking-plugins) or set [network] cni_bin_dirs",
                missing.join(", "),
                dirs.join(" or ")
            ),
        )
    });
    findings
}

async fn downstream(socket: &Path) -> Finding {
    const CHECK: &str = "downstream runtime";
    let version = async {
        let channel = wasmlet_proto::connect_unix(socket)
            .await
            .map_err(|e| e.to_string())?;
        let mut client =
            wasmlet_proto::cri::runtime_service_client::RuntimeServiceClient::new(channel);
        client
            .version(wasmlet_proto::cri::VersionRequest::default())
            .await
            .map(|r| r.into_inner())
            .map_err(|s| s.message().to_owned())
    };
    match tokio::time::timeout(Duration::from_secs(5), version).await {
        Ok(Ok(v)) => finding(
            Verdict::Ok,
            CHECK,
            format!(
                "{} {} on {}",
                v.runtime_name,
                v.runtime_version,
                socket.display()
            ),
        ),
        Ok(Err(e)) => finding(
            Verdict::Fail,
            CHECK,
            format!(
                "[delegate] names {}, which does not answer CRI ({e}): every non-Wasm pod would fail",
                socket.display()
            ),
        ),
        Err(_) => finding(
            Verdict::Fail,
            CHECK,
            format!("{} did not answer within 5 s", socket.display()),
        ),
    }
}

fn kubelet_stats_gate(config: &Path) -> Finding {
    const CHECK: &str = "kubelet stats";
    let Ok(text) = std::fs::read_to_string(config) else {
        return finding(
            Verdict::Ok,
            CHECK,
            format!(
                "no kubelet config at {} to check (--kubelet-config)",
                config.display()
            ),
        );
    };
    let gate_on = text.lines().any(|l| {
        let l = l.trim().replace(['"', '\''], "");
        l.starts_with("PodAndContainerStatsFromCRI:") && l.ends_with("true")
    });
    if gate_on {
        return finding(
            Verdict::Warn,
            CHECK,
            format!(
                "{} turns PodAndContainerStatsFromCRI on: the kubelet then publishes no container_* series for `kubectl top` and the HPA; leave it off",
                config.display()
            ),
        );
    }
    finding(
        Verdict::Ok,
        CHECK,
        "PodAndContainerStatsFromCRI is off: `kubectl top` reads wasmlet's CRI stats",
    )
}

/// Whether the agent can give guests read-only bind mounts (`EROFS` on a
/// write, as in containerd's containers): it needs root and
/// `mount_setattr` (Linux 5.12).
fn read_only_mounts() -> Finding {
    const CHECK: &str = "read-only mounts";
    const CONSEQUENCE: &str =
        "a guest's write under a read-only directory fails with EPERM, not EROFS as in a container";
    if !nix::unistd::geteuid().is_root() {
        return finding(Verdict::Warn, CHECK, format!("not root: {CONSEQUENCE}"));
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_owned())
        .unwrap_or_default();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u32>().ok());
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    if version < (5, 12) {
        return finding(
            Verdict::Warn,
            CHECK,
            format!("kernel {release} has no mount_setattr (5.12): {CONSEQUENCE}"),
        );
    }
    finding(
        Verdict::Ok,
        CHECK,
        format!("read-only bind mounts (kernel {release}, root): writes there fail with EROFS"),
    )
}

/// Whether `[metrics] address` can be served: free, or already served by
/// the agent; and whether it is kept off the network.
async fn metrics(address: Option<std::net::SocketAddr>) -> Finding {
    const CHECK: &str = "metrics";
    let Some(address) = address else {
        return finding(Verdict::Ok, CHECK, "off ([metrics] address = \"\")");
    };
    let exposed = if address.ip().is_loopback() {
        String::new()
    } else {
        "; it is beyond loopback: whoever reaches it reads every pod's name and usage (put an authenticating proxy in front)".to_owned()
    };
    let verdict = if exposed.is_empty() {
        Verdict::Ok
    } else {
        Verdict::Warn
    };
    match std::net::TcpListener::bind(address) {
        Ok(_) => finding(
            verdict,
            CHECK,
            format!("{address} is free for the agent's /metrics{exposed}"),
        ),
        Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => {
            if serves_wasmlet_metrics(address).await {
                finding(
                    verdict,
                    CHECK,
                    format!("the running agent serves /metrics on {address}{exposed}"),
                )
            } else {
                finding(
                    Verdict::Warn,
                    CHECK,
                    format!(
                        "{address} is taken by another program: the agent cannot serve metrics there and retries every 5 s; set [metrics] address"
                    ),
                )
            }
        }
        Err(error) => finding(
            Verdict::Warn,
            CHECK,
            format!("cannot listen on {address}: {error}"),
        ),
    }
}

/// Whether `address` answers `GET /metrics` with wasmlet's families.
async fn serves_wasmlet_metrics(address: std::net::SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
        stream
            .write_all(
                format!("GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .ok()?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.ok()?;
        Some(String::from_utf8_lossy(&answer).contains("# TYPE wasmlet_"))
    };
    tokio::time::timeout(std::time::Duration::from_secs(3), exchange)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

#[allow(unsafe_code)]
fn clock() -> Finding {
    const CHECK: &str = "clock";
    // SAFETY: adjtimex with modes 0 only reads the kernel's clock state
    // into the struct we own.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut tx) };
    if state == libc::TIME_ERROR {
        return finding(
            Verdict::Warn,
            CHECK,
            "the system clock is not synchronised (no NTP?): log timestamps, certificates and the kubelet's probes depend on it",
        );
    }
    finding(Verdict::Ok, CHECK, "synchronised")
}

/// The median time of a small write made durable in the state directory:
/// every state change the agent answers waits for one.
fn disk_latency(root: &Path) -> Finding {
    const CHECK: &str = "disk latency";
    let mut dir = root.to_owned();
    while !dir.exists() {
        match dir.parent() {
            Some(parent) => dir = parent.to_owned(),
            None => break,
        }
    }
    let Ok(file) = tempfile::tempfile_in(&dir) else {
        return finding(
            Verdict::Warn,
            CHECK,
            format!("cannot write in {}", dir.display()),
        );
    };
    let mut file = file;
    let mut times = Vec::new();
    for _ in 0..16 {
        let started = Instant::now();
        if file.write_all(&[0u8; 4096]).is_err() || file.sync_data().is_err() {
            return finding(Verdict::Warn, CHECK, "a durable write failed");
        }
        times.push(started.elapsed());
    }
    times.sort();
    let median = times[times.len() / 2];
    let verdict = if median > Duration::from_millis(20) {
        Verdict::Warn
    } else {
        Verdict::Ok
    };
    let advice = if verdict == Verdict::Warn {
        ": every pod and container change waits for one; put the state directory on faster storage"
    } else {
        ""
    };
    finding(
        verdict,
        CHECK,
        format!(
            "a durable 4 KiB write in {} takes {median:.1?} (median of 16){advice}",
            dir.display()
        ),
    )
}
