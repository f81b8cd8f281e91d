//! wasmlet's Prometheus metrics. Two kinds:
//!
//! - what the agent counts as it works: pulls, compiles and the compiled
//!   cache, the phases of a pod's start, OOM kills, the state store's
//!   commits. These are process-wide ([`global`]): one agent runs per
//!   process on a node.
//! - what is read off the agent's state at each scrape ([`Snapshot`], built
//!   by [`crate::Agent::metrics_snapshot`]): sandboxes and containers by
//!   state, committed guest memory against the node budget and the pods'
//!   limits, CPU time and throttling, and each wasi:http function's
//!   requests, errors and latency.
//!
//! [`register`] puts both into a `prometheus_client` registry; the CRI
//! layer adds its own families and serves the text. Names follow
//! Prometheus' rules (base units, `_total` counters, `_seconds`, `_bytes`)
//! and cAdvisor's labels (`namespace`, `pod`, `container`) for per-pod
//! series. The README lists every family.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::{Error, RegistryFailure};
use crate::runtime::engine::Tier;

/// The phases of a pod's start, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// RunPodSandbox: the sandbox recorded, its network namespace made and
    /// CNI ADD run.
    Sandbox,
    /// CreateContainer without its compile: the image resolved, its
    /// program read and the container recorded.
    ImagePrepare,
    /// Making a container's program ready to instantiate when it was not
    /// in memory: loading its compiled artifact, or compiling it.
    Compile,
    /// StartContainer: the guest instantiated (its WASI context, mounts,
    /// limits) until it is recorded RUNNING.
    Instantiate,
    /// From RUNNING to the guest's first byte of output.
    FirstOutput,
}

impl Phase {
    pub fn label(self) -> &'static str {
        match self {
            Phase::Sandbox => "sandbox",
            Phase::ImagePrepare => "image_prepare",
            Phase::Compile => "compile",
            Phase::Instantiate => "instantiate",
            Phase::FirstOutput => "first_output",
        }
    }
}

/// How a program was made ready to instantiate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheResult {
    /// Prepared in memory already.
    Memory,
    /// Its compiled artifact was on disk.
    Disk,
    /// Compiled now.
    Miss,
}

/// Why a guest was ended for memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OomReason {
    /// It reached its own, or its pod's, memory limit.
    Limit,
    /// The node memory guard chose it while the node was short.
    NodeMemory,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabels {
    tier: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Buckets for calls and phases: 0.5 ms to about 33 s.
pub(crate) fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 17))
}

/// Buckets for compiles and pulls: 10 ms to about 11 min.
fn slow_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 17))
}

/// The process-wide counters and histograms.
pub struct Metrics {
    pull_seconds: Histogram,
    pull_bytes: Counter,
    pull_errors: Family<KindLabels, Counter>,
    compile_seconds: Family<TierLabels, Histogram>,
    compile_cache: Family<ResultLabels, Counter>,
    compiled_bytes: Counter,
    start_phases: Family<PhaseLabels, Histogram>,
    oom_kills: Family<ReasonLabels, Counter>,
    commit_seconds: Histogram,
    commit_group_size: Histogram,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    pull_seconds: slow_buckets(),
    pull_bytes: Counter::default(),
    pull_errors: Family::default(),
    compile_seconds: Family::new_with_constructor(slow_buckets),
    compile_cache: Family::default(),
    compiled_bytes: Counter::default(),
    start_phases: Family::new_with_constructor(latency_buckets),
    oom_kills: Family::default(),
    commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
    commit_group_size: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
});

/// The process's metrics.
pub fn global() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    /// A pull that ended after `elapsed`, with the error it failed with.
    pub fn pulled(&self, elapsed: Duration, result: Result<(), &Error>) {
        match result {
            Ok(()) => self.pull_seconds.observe(elapsed.as_secs_f64()),
            Err(error) => {
                self.pull_errors
                    .get_or_create(&KindLabels {
                        kind: pull_error_kind(error),
                    })
                    .inc();
            }
        }
    }

    /// Bytes of a blob downloaded into the store.
    pub fn downloaded(&self, bytes: u64) {
        self.pull_bytes.inc_by(bytes);
    }

    /// A compile by `tier` that took `elapsed` and made `bytes` of machine
    /// code (an artifact's size; 0 for code that is not written).
    pub fn compiled(&self, tier: Tier, elapsed: Duration, bytes: usize) {
        self.compile_seconds
            .get_or_create(&TierLabels { tier: tier.label() })
            .observe(elapsed.as_secs_f64());
        self.compiled_bytes.inc_by(bytes as u64);
    }

    /// A program looked up to be instantiated.
    pub fn compile_lookup(&self, result: CacheResult) {
        let result = match result {
            CacheResult::Memory => "memory",
            CacheResult::Disk => "disk",
            CacheResult::Miss => "miss",
        };
        self.compile_cache
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// One phase of a pod's start took `elapsed`.
    pub fn phase(&self, phase: Phase, elapsed: Duration) {
        self.start_phases
            .get_or_create(&PhaseLabels {
                phase: phase.label(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// A guest ended for memory.
    pub fn oom_killed(&self, reason: OomReason) {
        let reason = match reason {
            OomReason::Limit => "limit",
            OomReason::NodeMemory => "node_memory",
        };
        self.oom_kills.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// A durable commit of `changes` changes (one group) that took
    /// `elapsed`.
    pub fn committed(&self, elapsed: Duration, changes: usize) {
        self.commit_seconds.observe(elapsed.as_secs_f64());
        self.commit_group_size.observe(changes as f64);
    }
}

/// The label a failed pull is counted under.
fn pull_error_kind(error: &Error) -> &'static str {
    match error {
        Error::Registry { kind, .. } => match kind {
            RegistryFailure::Unauthorized => "unauthorized",
            RegistryFailure::NotFound => "not_found",
            RegistryFailure::Unavailable => "unavailable",
            RegistryFailure::Untrusted => "untrusted",
            RegistryFailure::Corrupt => "corrupt",
            RegistryFailure::TooLarge => "too_large",
            RegistryFailure::NotWasm => "not_wasm",
            RegistryFailure::Invalid => "invalid",
        },
        Error::InvalidArgument(_) | Error::InvalidImage { .. } => "invalid",
        Error::DeadlineExceeded(_) => "timeout",
        Error::Io { .. } | Error::Store(_) | Error::Unpack { .. } => "store",
        _ => "other",
    }
}

/// One pod's labels, as cAdvisor names them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodLabels {
    pub namespace: String,
    pub pod: String,
}

/// What one container's series say at a scrape.
#[derive(Clone, Debug)]
pub struct ContainerSample {
    pub pod: PodLabels,
    pub container: String,
    pub cpu_seconds: f64,
    pub throttled_periods: u64,
    pub throttled_seconds: f64,
    pub memory_bytes: u64,
    /// The wasi:http function's latency histogram, if it is one.
    pub http: Option<HttpSample>,
}

/// A wasi:http function's requests.
#[derive(Clone, Debug)]
pub struct HttpSample {
    pub requests: u64,
    pub server_errors: u64,
    pub latency: Histogram,
}

/// What one pod's series say at a scrape.
#[derive(Clone, Debug)]
pub struct PodSample {
    pub pod: PodLabels,
    pub memory_bytes: u64,
    pub memory_limit_bytes: Option<u64>,
}

/// The agent's state as one scrape sees it.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Sandboxes by state label (`ready`, `notready`).
    pub sandboxes: Vec<(&'static str, u64)>,
    /// Containers by state label (`created`, `running`, `exited`).
    pub containers: Vec<(&'static str, u64)>,
    pub node_memory_budget_bytes: Option<u64>,
    pub node_memory_committed_bytes: u64,
    pub pods: Vec<PodSample>,
    pub guests: Vec<ContainerSample>,
}

/// The families read at scrape time: `snapshot` is called once per scrape.
struct StateCollector<F> {
    snapshot: F,
}

impl<F> std::fmt::Debug for StateCollector<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateCollector")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodLabelSet {
    namespace: String,
    pod: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ContainerLabelSet {
    namespace: String,
    pod: String,
    container: String,
}

impl ContainerLabelSet {
    fn of(sample: &ContainerSample) -> Self {
        Self {
            namespace: sample.pod.namespace.clone(),
            pod: sample.pod.pod.clone(),
            container: sample.container.clone(),
        }
    }
}

/// Encodes one family whose series are `values` (labels, metric).
fn family<L: EncodeLabelSet, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (L, M)>,
) -> std::fmt::Result {
    let mut values = values.into_iter().peekable();
    let Some((_, first)) = values.peek() else {
        return Ok(());
    };
    let mut family = encoder.encode_descriptor(name, help, None, first.metric_type())?;
    for (labels, metric) in values {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Encodes one family of a single series without labels.
fn single<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    metric: M,
) -> std::fmt::Result {
    let family = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
    metric.encode(family)
}

impl<F: Fn() -> Snapshot + Send + Sync + 'static> Collector for StateCollector<F> {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let s = (self.snapshot)();
        family(
            &mut encoder,
            "pod_sandboxes",
            "Pod sandboxes by state",
            s.sandboxes
                .iter()
                .map(|(state, n)| (StateLabels { state }, ConstGauge::new(*n as i64))),
        )?;
        family(
            &mut encoder,
            "containers",
            "Containers (guests) by state",
            s.containers
                .iter()
                .map(|(state, n)| (StateLabels { state }, ConstGauge::new(*n as i64))),
        )?;
        single(
            &mut encoder,
            "node_memory_committed_bytes",
            "Guest memory committed now on this node (linear memories and tables), what the node memory guard counts",
            ConstGauge::new(s.node_memory_committed_bytes as i64),
        )?;
        if let Some(budget) = s.node_memory_budget_bytes {
            single(
                &mut encoder,
                "node_memory_budget_bytes",
                "The node memory guard's budget for all guests' committed memory",
                ConstGauge::new(budget as i64),
            )?;
        }
        let pod = |p: &PodSample| PodLabelSet {
            namespace: p.pod.namespace.clone(),
            pod: p.pod.pod.clone(),
        };
        family(
            &mut encoder,
            "pod_memory_committed_bytes",
            "Guest memory committed now by a pod's containers",
            s.pods
                .iter()
                .map(|p| (pod(p), ConstGauge::new(p.memory_bytes as i64))),
        )?;
        family(
            &mut encoder,
            "pod_memory_limit_bytes",
            "A pod's memory limit (its containers' limits and overhead), for pods that have one",
            s.pods.iter().filter_map(|p| {
                p.memory_limit_bytes
                    .map(|l| (pod(p), ConstGauge::new(l as i64)))
            }),
        )?;
        family(
            &mut encoder,
            "container_memory_committed_bytes",
            "Guest memory committed now by a running container",
            s.guests.iter().map(|g| {
                (
                    ContainerLabelSet::of(g),
                    ConstGauge::new(g.memory_bytes as i64),
                )
            }),
        )?;
        family(
            &mut encoder,
            "container_cpu_usage_seconds",
            "CPU time a container's guest has run, as the CRI stats report it",
            s.guests
                .iter()
                .map(|g| (ContainerLabelSet::of(g), ConstCounter::new(g.cpu_seconds))),
        )?;
        family(
            &mut encoder,
            "container_cpu_cfs_throttled_periods",
            "CPU periods in which a container's guest was throttled to its CPU quota",
            s.guests.iter().map(|g| {
                (
                    ContainerLabelSet::of(g),
                    ConstCounter::new(g.throttled_periods),
                )
            }),
        )?;
        family(
            &mut encoder,
            "container_cpu_cfs_throttled_seconds",
            "Time a container's guest was held back by its CPU quota",
            s.guests.iter().map(|g| {
                (
                    ContainerLabelSet::of(g),
                    ConstCounter::new(g.throttled_seconds),
                )
            }),
        )?;
        let http = || {
            s.guests
                .iter()
                .filter_map(|g| g.http.as_ref().map(|h| (ContainerLabelSet::of(g), h)))
        };
        family(
            &mut encoder,
            "http_requests",
            "Requests a wasi:http function answered",
            http().map(|(l, h)| (l, ConstCounter::new(h.requests))),
        )?;
        family(
            &mut encoder,
            "http_server_errors",
            "Requests a wasi:http function answered with a 5xx status (its own, or 500 when it trapped or timed out)",
            http().map(|(l, h)| (l, ConstCounter::new(h.server_errors))),
        )?;
        family(
            &mut encoder,
            "http_request_duration_seconds",
            "Time from a request's arrival to its answer's head, per wasi:http function",
            http().map(|(l, h)| (l, h.latency.clone())),
        )?;
        Ok(())
    }
}

/// Registers every family of the agent in `registry` (give it the prefix
/// `wasmlet`): the process-wide ones and those `snapshot` reads at scrape
/// time.
pub fn register(registry: &mut Registry, snapshot: impl Fn() -> Snapshot + Send + Sync + 'static) {
    let m = global();
    registry.register(
        "image_pull_duration_seconds",
        "Time a successful pull took, compile included",
        m.pull_seconds.clone(),
    );
    registry.register(
        "image_pull_bytes",
        "Bytes of blobs downloaded from registries",
        m.pull_bytes.clone(),
    );
    registry.register(
        "image_pull_errors",
        "Failed pulls by kind of failure",
        m.pull_errors.clone(),
    );
    registry.register(
        "compile_duration_seconds",
        "Time to compile one program to machine code, by compiler (tier): cranelift, or winch (the fast first tier)",
        m.compile_seconds.clone(),
    );
    registry.register(
        "compile_cache_lookups",
        "Programs made ready to instantiate, by where they came from: memory, disk (the compiled cache) or miss (compiled)",
        m.compile_cache.clone(),
    );
    registry.register(
        "compiled_code_bytes",
        "Bytes of compiled code produced",
        m.compiled_bytes.clone(),
    );
    registry.register(
        "pod_start_phase_duration_seconds",
        "Time of each phase of a pod's start: sandbox (with CNI), image_prepare, compile, instantiate, first_output",
        m.start_phases.clone(),
    );
    registry.register(
        "oom_kills",
        "Guests ended for memory: at their own or their pod's limit, or chosen by the node memory guard",
        m.oom_kills.clone(),
    );
    registry.register(
        "state_commit_duration_seconds",
        "Time of a durable commit of the state store",
        m.commit_seconds.clone(),
    );
    registry.register(
        "state_commit_group_size",
        "Changes written by one commit of the state store",
        m.commit_group_size.clone(),
    );
    registry.register_collector(Box::new(StateCollector { snapshot }));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        out
    }

    #[test]
    fn scrape_time_families_carry_cadvisor_labels() {
        let latency = latency_buckets();
        latency.observe(0.002);
        let snapshot = Snapshot {
            sandboxes: vec![("ready", 2)],
            containers: vec![("running", 1), ("exited", 1)],
            node_memory_budget_bytes: Some(1 << 30),
            node_memory_committed_bytes: 65536,
            pods: vec![PodSample {
                pod: PodLabels {
                    namespace: "ns".into(),
                    pod: "web".into(),
                },
                memory_bytes: 65536,
                memory_limit_bytes: Some(1 << 24),
            }],
            guests: vec![ContainerSample {
                pod: PodLabels {
                    namespace: "ns".into(),
                    pod: "web".into(),
                },
                container: "fn".into(),
                cpu_seconds: 0.5,
                throttled_periods: 3,
                throttled_seconds: 0.25,
                memory_bytes: 65536,
                http: Some(HttpSample {
                    requests: 7,
                    server_errors: 1,
                    latency,
                }),
            }],
        };
        let mut registry = Registry::with_prefix("wasmlet");
        register(&mut registry, move || snapshot.clone());
        let out = text(&registry);
        for line in [
            "wasmlet_pod_sandboxes{state=\"ready\"} 2",
            "wasmlet_containers{state=\"exited\"} 1",
            "wasmlet_node_memory_budget_bytes 1073741824",
            "wasmlet_pod_memory_limit_bytes{namespace=\"ns\",pod=\"web\"} 16777216",
            "wasmlet_container_cpu_cfs_throttled_periods_total{namespace=\"ns\",pod=\"web\",container=\"fn\"} 3",
            "wasmlet_http_requests_total{namespace=\"ns\",pod=\"web\",container=\"fn\"} 7",
            "wasmlet_http_server_errors_total{namespace=\"ns\",pod=\"web\",container=\"fn\"} 1",
            "wasmlet_http_request_duration_seconds_count{namespace=\"ns\",pod=\"web\",container=\"fn\"} 1",
        ] {
            assert!(out.contains(line), "{line:?} missing from\n{out}");
        }
    }

    #[test]
    fn pull_errors_are_counted_by_kind() {
        let before = text_of_pull_errors();
        global().pulled(
            Duration::from_millis(3),
            Err(&Error::Registry {
                reference: "r".into(),
                kind: RegistryFailure::NotFound,
                reason: "no".into(),
            }),
        );
        let after = text_of_pull_errors();
        assert_eq!(after, before + 1);
    }

    fn text_of_pull_errors() -> u64 {
        let mut registry = Registry::with_prefix("wasmlet");
        register(&mut registry, Snapshot::default);
        let out = text(&registry);
        out.lines()
            .find_map(|l| l.strip_prefix("wasmlet_image_pull_errors_total{kind=\"not_found\"} "))
            .map_or(0, |v| v.parse().unwrap())
    }
}
