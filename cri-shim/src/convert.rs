//! Every mapping between CRI wire messages and the agent's domain types.
//! Timestamps become nanoseconds here and nowhere else.

use std::collections::{BTreeMap, HashMap};

use wasmlet_agent::model::container::{
    ContainerFilter, ContainerMetadata, ContainerRecord, ContainerSpec, ContainerState, Mount,
};
use wasmlet_agent::model::ids::{ContainerId, SandboxId};
use wasmlet_agent::model::image::ImageRecord;
use wasmlet_agent::model::network::{DnsSettings, PortMapping};
use wasmlet_agent::model::resources::Resources;
use wasmlet_agent::model::sandbox::{
    PodMetadata, SandboxFilter, SandboxRecord, SandboxSpec, SandboxState,
};
use wasmlet_agent::model::usage::Usage;
use wasmlet_agent::{ContainerUsage, Credentials, PodUsage};
use wasmlet_agent::{Error, Result};
use wasmlet_proto::{admin, cri};

use crate::streaming::{CommandOptions, Pending};

fn btree(m: HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

fn hash(m: &BTreeMap<String, String>) -> HashMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

pub fn sandbox_id(s: &str) -> Result<SandboxId> {
    SandboxId::parse(s)
}

pub fn container_id(s: &str) -> Result<ContainerId> {
    ContainerId::parse(s)
}

pub fn sandbox_spec(
    config: Option<cri::PodSandboxConfig>,
    runtime_handler: String,
) -> Result<SandboxSpec> {
    let config =
        config.ok_or_else(|| Error::InvalidArgument("RunPodSandbox needs a config".into()))?;
    Ok(SandboxSpec {
        metadata: config.metadata.map(|m| PodMetadata {
            name: m.name,
            uid: m.uid,
            namespace: m.namespace,
            attempt: m.attempt,
        }),
        hostname: config.hostname,
        log_directory: config.log_directory,
        labels: btree(config.labels),
        annotations: btree(config.annotations),
        runtime_handler,
        host_network: config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|c| c.namespace_options.as_ref())
            .is_some_and(|n| n.network == cri::NamespaceMode::Node as i32),
        port_mappings: config
            .port_mappings
            .iter()
            .filter_map(port_mapping)
            .collect(),
        dns: config
            .dns_config
            .as_ref()
            .map(|d| DnsSettings {
                servers: d.servers.clone(),
                searches: d.searches.clone(),
                options: d.options.clone(),
                hosts_file: None,
            })
            .unwrap_or_default(),
        resources: config
            .linux
            .map(|l| pod_resources(l.overhead, l.resources))
            .unwrap_or_default(),
        joined: None,
    })
}

/// A port of the pod: with a hostPort, a mapping for the CNI `portmap`
/// plugin; without (0), only the container port (the port an HTTP function
/// of a pod created without the kubelet's ports annotation listens on).
fn port_mapping(p: &cri::PortMapping) -> Option<PortMapping> {
    let host_port = u16::try_from(p.host_port).unwrap_or(0);
    let container_port = u16::try_from(p.container_port).ok().filter(|p| *p > 0)?;
    let protocol = match cri::Protocol::try_from(p.protocol) {
        Ok(cri::Protocol::Udp) => "udp",
        Ok(cri::Protocol::Sctp) => "sctp",
        _ => "tcp",
    };
    Some(PortMapping {
        host_port,
        container_port,
        protocol: protocol.to_owned(),
        host_ip: p.host_ip.clone(),
    })
}

/// Linux resources as the kubelet sends them; 0 means unset.
pub fn resources(r: Option<cri::LinuxContainerResources>) -> Resources {
    let Some(r) = r else {
        return Resources::default();
    };
    let positive = |v: i64| u64::try_from(v).ok().filter(|v| *v > 0);
    Resources {
        memory_limit_bytes: positive(r.memory_limit_in_bytes),
        cpu_quota_us: positive(r.cpu_quota),
        cpu_period_us: positive(r.cpu_period),
        cpu_shares: positive(r.cpu_shares),
        oom_score_adj: r.oom_score_adj.clamp(-1000, 1000),
    }
}

/// A pod's limits as the kubelet sizes its cgroup: the sum of its
/// containers' resources plus the pod's overhead (RuntimeClass
/// `overhead`). No pod-level limit where the containers' sum has none.
pub fn pod_resources(
    overhead: Option<cri::LinuxContainerResources>,
    sum: Option<cri::LinuxContainerResources>,
) -> Resources {
    let sum = resources(sum);
    let overhead = resources(overhead);
    let plus = |a: Option<u64>, b: Option<u64>| a.map(|a| a.saturating_add(b.unwrap_or(0)));
    Resources {
        memory_limit_bytes: plus(sum.memory_limit_bytes, overhead.memory_limit_bytes),
        // Overhead's quota counts in the pod's period (the kubelet uses
        // the same 100 ms for both).
        cpu_quota_us: plus(sum.cpu_quota_us, overhead.cpu_quota_us),
        cpu_shares: plus(sum.cpu_shares, overhead.cpu_shares),
        ..sum
    }
}

fn linux_resources(r: &Resources) -> cri::LinuxContainerResources {
    let signed = |v: Option<u64>| v.map_or(0, |v| i64::try_from(v).unwrap_or(i64::MAX));
    cri::LinuxContainerResources {
        memory_limit_in_bytes: signed(r.memory_limit_bytes),
        cpu_quota: signed(r.cpu_quota_us),
        cpu_period: signed(r.cpu_period_us),
        cpu_shares: signed(r.cpu_shares),
        oom_score_adj: r.oom_score_adj,
        ..Default::default()
    }
}

pub fn container_spec(config: Option<cri::ContainerConfig>) -> Result<ContainerSpec> {
    let config =
        config.ok_or_else(|| Error::InvalidArgument("CreateContainer needs a config".into()))?;
    // A group without a user names nothing to run as: containerd refuses it.
    if let Some(sc) = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        && sc.run_as_group.is_some()
        && sc.run_as_user.is_none()
        && sc.run_as_username.is_empty()
    {
        return Err(Error::InvalidArgument(
            "run_as_group is set without run_as_user or run_as_username".into(),
        ));
    }
    let security = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref());
    let readonly_rootfs = security.is_some_and(|sc| sc.readonly_rootfs);
    let readonly_paths = security.map_or_else(Vec::new, |sc| sc.readonly_paths.clone());
    let (image, user_specified_image) = config
        .image
        .map(|i| (i.image, i.user_specified_image))
        .filter(|(i, _)| !i.is_empty())
        .ok_or_else(|| Error::InvalidArgument("container config names no image".into()))?;
    let mounts = config
        .mounts
        .into_iter()
        .map(|m| {
            if m.image.as_ref().is_some_and(|i| !i.image.is_empty()) {
                return Err(Error::InvalidArgument(format!(
                    "mount {:?}: image volumes are not supported by wasmlet",
                    m.container_path
                )));
            }
            if !m.container_path.starts_with('/') {
                return Err(Error::InvalidArgument(format!(
                    "mount {:?}: the container path must be absolute",
                    m.container_path
                )));
            }
            // What containerd refuses of a recursive read-only mount.
            if m.recursive_read_only && !m.readonly {
                return Err(Error::InvalidArgument(format!(
                    "mount {:?}: a recursive read-only mount must be read-only",
                    m.container_path
                )));
            }
            if m.recursive_read_only
                && m.propagation != cri::MountPropagation::PropagationPrivate as i32
            {
                return Err(Error::InvalidArgument(format!(
                    "mount {:?}: a recursive read-only mount needs private propagation",
                    m.container_path
                )));
            }
            Ok(Mount {
                container_path: m.container_path,
                host_path: m.host_path,
                readonly: m.readonly || m.recursive_read_only,
                recursive_read_only: m.recursive_read_only,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ContainerSpec {
        metadata: config.metadata.map(|m| ContainerMetadata {
            name: m.name,
            attempt: m.attempt,
        }),
        image,
        user_specified_image,
        command: config.command,
        args: config.args,
        working_dir: config.working_dir,
        envs: config
            .envs
            .into_iter()
            .map(|kv| match String::from_utf8(kv.value) {
                Ok(value) => Ok((kv.key, value)),
                Err(_) => Err(Error::InvalidArgument(format!(
                    "the value of environment variable {:?} is not UTF-8, which a Wasm guest's environment must be",
                    kv.key
                ))),
            })
            .collect::<Result<_>>()?,
        mounts,
        labels: btree(config.labels),
        annotations: btree(config.annotations),
        log_path: config.log_path,
        resources: resources(config.linux.and_then(|l| l.resources)),
        readonly_rootfs,
        readonly_paths,
        stdin: config.stdin,
        stdin_once: config.stdin_once,
        tty: config.tty,
    })
}

/// A remote command's streams, checked as the kubelet's streaming server
/// checks them.
fn command_options(stdin: bool, stdout: bool, stderr: bool, tty: bool) -> Result<CommandOptions> {
    if !(stdin || stdout || stderr) {
        return Err(Error::InvalidArgument(
            "one of stdin, stdout or stderr must be set".into(),
        ));
    }
    if tty && stderr {
        return Err(Error::InvalidArgument(
            "tty and stderr cannot both be set: a terminal has one output".into(),
        ));
    }
    Ok(CommandOptions {
        stdin,
        stdout,
        stderr,
        tty,
    })
}

pub fn exec_request(req: cri::ExecRequest) -> Result<Pending> {
    if req.cmd.is_empty() {
        return Err(Error::InvalidArgument("exec needs a command".into()));
    }
    Ok(Pending::Exec {
        container: container_id(&req.container_id)?,
        options: command_options(req.stdin, req.stdout, req.stderr, req.tty)?,
        cmd: req.cmd,
    })
}

pub fn attach_request(req: cri::AttachRequest) -> Result<Pending> {
    Ok(Pending::Attach {
        container: container_id(&req.container_id)?,
        options: command_options(req.stdin, req.stdout, req.stderr, req.tty)?,
    })
}

pub fn port_forward_request(req: cri::PortForwardRequest) -> Result<Pending> {
    let ports = req
        .port
        .iter()
        .map(|p| {
            u16::try_from(*p)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| Error::InvalidArgument(format!("port {p} is not a TCP port")))
        })
        .collect::<Result<Vec<u16>>>()?;
    Ok(Pending::PortForward {
        sandbox: sandbox_id(&req.pod_sandbox_id)?,
        ports,
    })
}

fn sandbox_state(s: SandboxState) -> cri::PodSandboxState {
    match s {
        SandboxState::Ready => cri::PodSandboxState::SandboxReady,
        SandboxState::NotReady => cri::PodSandboxState::SandboxNotready,
    }
}

fn pod_metadata(r: &SandboxRecord) -> Option<cri::PodSandboxMetadata> {
    r.spec.metadata.as_ref().map(|m| cri::PodSandboxMetadata {
        name: m.name.clone(),
        uid: m.uid.clone(),
        namespace: m.namespace.clone(),
        attempt: m.attempt,
    })
}

pub fn pod_sandbox(r: &SandboxRecord) -> cri::PodSandbox {
    cri::PodSandbox {
        id: r.id.to_string(),
        metadata: pod_metadata(r),
        state: sandbox_state(r.state) as i32,
        created_at: r.created_at.as_nanos(),
        labels: hash(&r.spec.labels),
        annotations: hash(&r.spec.annotations),
        runtime_handler: r.spec.runtime_handler.clone(),
    }
}

pub fn pod_sandbox_status(r: &SandboxRecord) -> cri::PodSandboxStatus {
    cri::PodSandboxStatus {
        id: r.id.to_string(),
        metadata: pod_metadata(r),
        state: sandbox_state(r.state) as i32,
        created_at: r.created_at.as_nanos(),
        network: Some(sandbox_network(r)),
        linux: None,
        labels: hash(&r.spec.labels),
        annotations: hash(&r.spec.annotations),
        runtime_handler: r.spec.runtime_handler.clone(),
    }
}

/// The pod's IPs while its network is up; none for a pod without one (or
/// on the host network, where the kubelet uses the node's IP).
fn sandbox_network(r: &SandboxRecord) -> cri::PodSandboxNetworkStatus {
    let ips: &[String] = r
        .network
        .as_ref()
        .filter(|n| !n.torn_down)
        .map_or(&[], |n| &n.ips);
    cri::PodSandboxNetworkStatus {
        ip: ips.first().cloned().unwrap_or_default(),
        additional_ips: ips
            .iter()
            .skip(1)
            .map(|ip| cri::PodIp { ip: ip.clone() })
            .collect(),
    }
}

pub fn sandbox_filter(f: Option<cri::PodSandboxFilter>) -> SandboxFilter {
    let Some(f) = f else {
        return SandboxFilter::default();
    };
    SandboxFilter {
        id: (!f.id.is_empty()).then_some(f.id),
        state: f.state.map(|s| {
            if s.state == cri::PodSandboxState::SandboxReady as i32 {
                SandboxState::Ready
            } else {
                SandboxState::NotReady
            }
        }),
        labels: btree(f.label_selector),
    }
}

fn container_state(s: ContainerState) -> cri::ContainerState {
    match s {
        ContainerState::Created => cri::ContainerState::ContainerCreated,
        ContainerState::Running => cri::ContainerState::ContainerRunning,
        ContainerState::Exited => cri::ContainerState::ContainerExited,
    }
}

pub fn container_filter(f: Option<cri::ContainerFilter>) -> ContainerFilter {
    let Some(f) = f else {
        return ContainerFilter::default();
    };
    ContainerFilter {
        id: (!f.id.is_empty()).then_some(f.id),
        state: f
            .state
            .and_then(|s| match cri::ContainerState::try_from(s.state) {
                Ok(cri::ContainerState::ContainerCreated) => Some(ContainerState::Created),
                Ok(cri::ContainerState::ContainerRunning) => Some(ContainerState::Running),
                Ok(cri::ContainerState::ContainerExited) => Some(ContainerState::Exited),
                // No container is ever in UNKNOWN: match an impossible state.
                _ => None,
            }),
        sandbox_id: (!f.pod_sandbox_id.is_empty()).then_some(f.pod_sandbox_id),
        labels: btree(f.label_selector),
    }
}

/// Whether a filter asks for a state no container can be in (UNKNOWN).
pub fn container_filter_is_unsatisfiable(f: &Option<cri::ContainerFilter>) -> bool {
    f.as_ref().and_then(|f| f.state.as_ref()).is_some_and(|s| {
        s.state == cri::ContainerState::ContainerUnknown as i32
            || cri::ContainerState::try_from(s.state).is_err()
    })
}

fn container_metadata(r: &ContainerRecord) -> Option<cri::ContainerMetadata> {
    r.spec.metadata.as_ref().map(|m| cri::ContainerMetadata {
        name: m.name.clone(),
        attempt: m.attempt,
    })
}

/// A container's image as containerd reports it: by the name the pod
/// asked for (else the image's first tag, else as created), and by its
/// first repo digest (else its id), so the pod's status shows
/// `repo:tag` and `repo@sha256:…` rather than bare digests.
fn image_spec_and_ref(
    r: &ContainerRecord,
    image: Option<&ImageRecord>,
) -> (cri::ImageSpec, String) {
    let name = if !r.spec.user_specified_image.is_empty() {
        r.spec.user_specified_image.clone()
    } else {
        image
            .and_then(|i| i.repo_tags.first().cloned())
            .unwrap_or_else(|| r.spec.image.clone())
    };
    let image_ref = image
        .and_then(|i| i.repo_digests.first().cloned())
        .unwrap_or_else(|| r.image_id.to_string());
    let spec = cri::ImageSpec {
        image: name,
        user_specified_image: r.spec.user_specified_image.clone(),
        ..Default::default()
    };
    (spec, image_ref)
}

/// `r` as ListContainers shows it; `image` is its image, if still stored.
pub fn container(r: &ContainerRecord, image: Option<&ImageRecord>) -> cri::Container {
    let (image, image_ref) = image_spec_and_ref(r, image);
    cri::Container {
        id: r.id.to_string(),
        pod_sandbox_id: r.sandbox_id.to_string(),
        metadata: container_metadata(r),
        image: Some(image),
        image_ref,
        state: container_state(r.state) as i32,
        created_at: r.created_at.as_nanos(),
        labels: hash(&r.spec.labels),
        annotations: hash(&r.spec.annotations),
        image_id: r.image_id.to_string(),
    }
}

/// `r` as ContainerStatus shows it; `image` is its image, if still stored.
pub fn container_status(r: &ContainerRecord, image: Option<&ImageRecord>) -> cri::ContainerStatus {
    let (image, image_ref) = image_spec_and_ref(r, image);
    let exit = r
        .exit
        .clone()
        .unwrap_or_else(|| wasmlet_agent::model::container::ExitStatus {
            code: 0,
            reason: String::new(),
            message: String::new(),
        });
    cri::ContainerStatus {
        id: r.id.to_string(),
        metadata: container_metadata(r),
        state: container_state(r.state) as i32,
        created_at: r.created_at.as_nanos(),
        started_at: r.started_at.map_or(0, |t| t.as_nanos()),
        finished_at: r.finished_at.map_or(0, |t| t.as_nanos()),
        exit_code: exit.code,
        image: Some(image),
        image_ref,
        reason: exit.reason,
        message: exit.message,
        labels: hash(&r.spec.labels),
        annotations: hash(&r.spec.annotations),
        mounts: r
            .spec
            .mounts
            .iter()
            .map(|m| cri::Mount {
                container_path: m.container_path.clone(),
                host_path: m.host_path.clone(),
                readonly: m.readonly,
                recursive_read_only: m.recursive_read_only,
                ..Default::default()
            })
            .collect(),
        log_path: r
            .log_file
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default(),
        resources: Some(cri::ContainerResources {
            linux: Some(linux_resources(&r.spec.resources)),
            windows: None,
        }),
        image_id: r.image_id.to_string(),
        user: None,
        // A Wasm guest takes no signals: the runtime's default stop.
        stop_signal: cri::Signal::RuntimeDefault as i32,
    }
}

fn u64_value(value: u64) -> Option<cri::UInt64Value> {
    Some(cri::UInt64Value { value })
}

fn cpu(u: &Usage) -> cri::CpuUsage {
    cri::CpuUsage {
        timestamp: u.timestamp.as_nanos(),
        usage_core_nano_seconds: u64_value(u.cpu_nanos),
        usage_nano_cores: u64_value(u.nano_cores),
        psi: None,
    }
}

fn memory(u: &Usage) -> cri::MemoryUsage {
    cri::MemoryUsage {
        timestamp: u.timestamp.as_nanos(),
        working_set_bytes: u64_value(u.working_set_bytes),
        available_bytes: u.available_bytes.and_then(u64_value),
        usage_bytes: u64_value(u.working_set_bytes),
        rss_bytes: u64_value(u.working_set_bytes),
        page_faults: u64_value(0),
        major_page_faults: u64_value(0),
        psi: None,
    }
}

pub fn container_stats(c: &ContainerUsage) -> cri::ContainerStats {
    cri::ContainerStats {
        attributes: Some(cri::ContainerAttributes {
            id: c.record.id.to_string(),
            metadata: container_metadata(&c.record),
            labels: hash(&c.record.spec.labels),
            annotations: hash(&c.record.spec.annotations),
        }),
        cpu: Some(cpu(&c.usage)),
        memory: Some(memory(&c.usage)),
        writable_layer: None,
        swap: None,
        io: None,
    }
}

pub fn pod_stats(p: &PodUsage) -> cri::PodSandboxStats {
    cri::PodSandboxStats {
        attributes: Some(cri::PodSandboxAttributes {
            id: p.record.id.to_string(),
            metadata: pod_metadata(&p.record),
            labels: hash(&p.record.spec.labels),
            annotations: hash(&p.record.spec.annotations),
        }),
        linux: Some(cri::LinuxPodSandboxStats {
            cpu: Some(cpu(&p.usage)),
            memory: Some(memory(&p.usage)),
            network: None,
            process: Some(cri::ProcessUsage {
                timestamp: p.usage.timestamp.as_nanos(),
                // Guests are instances, not processes; count running ones.
                process_count: u64_value(
                    p.containers.iter().filter(|c| c.usage.running).count() as u64
                ),
            }),
            containers: p.containers.iter().map(container_stats).collect(),
            io: None,
        }),
        windows: None,
    }
}

/// The cAdvisor-named metrics published through ListPodSandboxMetrics,
/// with their help text and type. Every one carries [`METRIC_LABELS`].
pub const METRICS: &[(&str, &str, cri::MetricType)] = &[
    (
        "container_cpu_usage_seconds_total",
        "Cumulative CPU time consumed, in seconds (whole seconds).",
        cri::MetricType::Counter,
    ),
    (
        "container_memory_working_set_bytes",
        "Current working set, in bytes.",
        cri::MetricType::Gauge,
    ),
    (
        "container_memory_usage_bytes",
        "Current memory usage, in bytes.",
        cri::MetricType::Gauge,
    ),
    (
        "container_spec_memory_limit_bytes",
        "Memory limit of the container, in bytes (0: none).",
        cri::MetricType::Gauge,
    ),
    (
        "container_cpu_cfs_throttled_periods_total",
        "Periods in which the container used up its CPU quota.",
        cri::MetricType::Counter,
    ),
    (
        "container_start_time_seconds",
        "Start time of the container since the Unix epoch, in seconds.",
        cri::MetricType::Gauge,
    ),
    (
        "wasmlet_http_requests_total",
        "Requests a wasi:http function answered (0 for other containers).",
        cri::MetricType::Counter,
    ),
    (
        "wasmlet_http_server_errors_total",
        "Requests a wasi:http function answered with a 5xx status.",
        cri::MetricType::Counter,
    ),
    (
        "wasmlet_http_request_duration_microseconds_total",
        "Sum of the requests' latencies (arrival to response headers), in microseconds.",
        cri::MetricType::Counter,
    ),
];

/// The labels of every metric, as cAdvisor names them.
pub const METRIC_LABELS: &[&str] = &["container", "id", "image", "name", "namespace", "pod"];

pub fn metric_descriptors() -> Vec<cri::MetricDescriptor> {
    METRICS
        .iter()
        .map(|(name, help, _)| cri::MetricDescriptor {
            name: (*name).to_owned(),
            help: (*help).to_owned(),
            label_keys: METRIC_LABELS.iter().map(|l| (*l).to_owned()).collect(),
        })
        .collect()
}

pub fn pod_metrics(p: &PodUsage) -> cri::PodSandboxMetrics {
    let (pod, namespace) = p
        .record
        .spec
        .metadata
        .as_ref()
        .map_or((String::new(), String::new()), |m| {
            (m.name.clone(), m.namespace.clone())
        });
    let container_metrics = p
        .containers
        .iter()
        .map(|c| {
            let name = c
                .record
                .spec
                .metadata
                .as_ref()
                .map_or(String::new(), |m| m.name.clone());
            let labels = vec![
                name.clone(),
                c.record.id.to_string(),
                c.record.spec.image.clone(),
                name,
                namespace.clone(),
                pod.clone(),
            ];
            let u = &c.usage;
            let values = [
                u.cpu_nanos / 1_000_000_000,
                u.working_set_bytes,
                u.working_set_bytes,
                c.record.spec.resources.memory_limit_bytes.unwrap_or(0),
                u.throttled_periods,
                c.record
                    .started_at
                    .map_or(0, |t| (t.as_nanos() / 1_000_000_000) as u64),
                u.http.requests,
                u.http.server_errors,
                u.http.latency_micros,
            ];
            let metrics = METRICS
                .iter()
                .zip(values)
                .map(|((name, _, kind), value)| cri::Metric {
                    name: (*name).to_owned(),
                    timestamp: u.timestamp.as_nanos(),
                    metric_type: *kind as i32,
                    label_values: labels.clone(),
                    value: u64_value(value),
                })
                .collect();
            cri::ContainerMetrics {
                container_id: c.record.id.to_string(),
                metrics,
            }
        })
        .collect();
    cri::PodSandboxMetrics {
        pod_sandbox_id: p.record.id.to_string(),
        metrics: Vec::new(),
        container_metrics,
    }
}

pub fn container_stats_filter(f: Option<cri::ContainerStatsFilter>) -> ContainerFilter {
    let Some(f) = f else {
        return ContainerFilter::default();
    };
    ContainerFilter {
        id: (!f.id.is_empty()).then_some(f.id),
        state: None,
        sandbox_id: (!f.pod_sandbox_id.is_empty()).then_some(f.pod_sandbox_id),
        labels: btree(f.label_selector),
    }
}

pub fn pod_stats_filter(f: Option<cri::PodSandboxStatsFilter>) -> SandboxFilter {
    let Some(f) = f else {
        return SandboxFilter::default();
    };
    SandboxFilter {
        id: (!f.id.is_empty()).then_some(f.id),
        state: None,
        labels: btree(f.label_selector),
    }
}

/// An image config's `User` as the CRI reports it, as containerd does:
/// the user part (before any `:group`), a number as the uid, else as the
/// username.
fn image_user(user: &str) -> (Option<cri::Int64Value>, String) {
    let user = user.split(':').next().unwrap_or_default();
    match user.parse::<i64>() {
        _ if user.is_empty() => (None, String::new()),
        Ok(value) => (Some(cri::Int64Value { value }), String::new()),
        Err(_) => (None, user.to_owned()),
    }
}

pub fn image(r: &ImageRecord) -> cri::Image {
    let (uid, username) = image_user(r.compat.as_ref().map_or("", |c| c.user.as_str()));
    cri::Image {
        id: r.id.to_string(),
        repo_tags: r.repo_tags.clone(),
        repo_digests: r.repo_digests.clone(),
        size: r.size,
        uid,
        username,
        spec: Some(cri::ImageSpec {
            image: r.id.to_string(),
            ..Default::default()
        }),
        pinned: false,
    }
}

pub fn credentials(auth: Option<cri::AuthConfig>) -> Credentials {
    let Some(a) = auth else {
        return Credentials::default();
    };
    Credentials {
        username: a.username,
        password: a.password,
        auth: a.auth,
        identity_token: a.identity_token,
        registry_token: a.registry_token,
    }
}

pub fn image_reference(spec: Option<cri::ImageSpec>) -> Result<String> {
    spec.map(|s| s.image)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| Error::InvalidArgument("no image given".into()))
}

/// An image's inspection, for the admin API.
pub fn image_inspection(i: wasmlet_agent::ImageInspection) -> admin::InspectImageResponse {
    let compat = i.image.compat.clone();
    admin::InspectImageResponse {
        image_id: i.image.id.to_string(),
        repo_tags: i.image.repo_tags.clone(),
        wasm_digest: i.wasm_digest.to_string(),
        wasm_size_bytes: i.wasm_size,
        kind: match i.description.kind {
            wasmlet_agent::model::image::WasmKind::Module => admin::WasmKind::Module,
            wasmlet_agent::model::image::WasmKind::Component => admin::WasmKind::Component,
        } as i32,
        http_function: i.description.http_function,
        imports: i
            .description
            .imports
            .into_iter()
            .map(|import| admin::Import {
                module: import.module,
                name: import.name,
                kind: import.kind.to_owned(),
            })
            .collect(),
        exports: i.description.exports,
        compiled: i.compiled,
        compat: compat.is_some(),
        entrypoint: compat
            .as_ref()
            .map(|c| c.entrypoint.clone())
            .unwrap_or_default(),
        cmd: compat.map(|c| c.cmd).unwrap_or_default(),
    }
}

pub fn precompiled(p: wasmlet_agent::Precompiled) -> admin::PrecompileResponse {
    admin::PrecompileResponse {
        wasm_digest: p.wasm_digest.to_string(),
        already_compiled: p.already_compiled,
        compile_micros: p.took.as_micros().try_into().unwrap_or(u64::MAX),
    }
}

/// A container's Wasm-side stats, for the admin API.
pub fn instance_stats(c: &ContainerUsage) -> admin::InstanceStats {
    let r = &c.record;
    admin::InstanceStats {
        container_id: r.id.to_string(),
        pod_sandbox_id: r.sandbox_id.to_string(),
        image_id: r.image_id.to_string(),
        state: container_state(r.state).as_str_name().to_owned(),
        memory_bytes: c.usage.working_set_bytes,
        memory_limit_bytes: r.spec.resources.memory_limit_bytes.unwrap_or(0),
        cpu_nanos: c.usage.cpu_nanos,
        throttled_periods: c.usage.throttled_periods,
        oom_killed: r.exit.as_ref().is_some_and(|e| e.reason == "OOMKilled"),
        http_requests: c.usage.http.requests,
        http_server_errors: c.usage.http.server_errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_state_filter_is_unsatisfiable() {
        let f = Some(cri::ContainerFilter {
            state: Some(cri::ContainerStateValue {
                state: cri::ContainerState::ContainerUnknown as i32,
            }),
            ..Default::default()
        });
        assert!(container_filter_is_unsatisfiable(&f));
        assert!(!container_filter_is_unsatisfiable(&None));
    }

    #[test]
    fn container_config_requires_an_image_and_absolute_mounts() {
        assert!(container_spec(Some(cri::ContainerConfig::default())).is_err());
        let mut c = cri::ContainerConfig {
            image: Some(cri::ImageSpec {
                image: "x.io/a:1".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(container_spec(Some(c.clone())).is_ok());
        c.mounts.push(cri::Mount {
            container_path: "relative".into(),
            host_path: "/tmp".into(),
            ..Default::default()
        });
        assert!(matches!(
            container_spec(Some(c)),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn recursive_read_only_mounts_must_be_read_only_and_private() {
        let config = |readonly, propagation: cri::MountPropagation| cri::ContainerConfig {
            image: Some(cri::ImageSpec {
                image: "x.io/a:1".into(),
                ..Default::default()
            }),
            mounts: vec![cri::Mount {
                container_path: "/mnt".into(),
                host_path: "/tmp".into(),
                readonly,
                recursive_read_only: true,
                propagation: propagation as i32,
                ..Default::default()
            }],
            ..Default::default()
        };
        use cri::MountPropagation::*;
        assert!(container_spec(Some(config(true, PropagationPrivate))).is_ok());
        for bad in [
            config(false, PropagationPrivate),
            config(true, PropagationHostToContainer),
            config(true, PropagationBidirectional),
        ] {
            assert!(matches!(
                container_spec(Some(bad)),
                Err(Error::InvalidArgument(_))
            ));
        }
    }

    #[test]
    fn an_image_user_is_a_uid_or_a_username_without_its_group() {
        let uid = |v| Some(cri::Int64Value { value: v });
        assert_eq!(image_user(""), (None, String::new()));
        assert_eq!(image_user("1002"), (uid(1002), String::new()));
        assert_eq!(image_user("1003:users"), (uid(1003), String::new()));
        assert_eq!(image_user("www-data"), (None, "www-data".to_owned()));
        assert_eq!(image_user("www-data:users"), (None, "www-data".to_owned()));
    }

    #[test]
    fn a_group_without_a_user_is_refused() {
        let config = |user: Option<i64>, username: &str| cri::ContainerConfig {
            image: Some(cri::ImageSpec {
                image: "x.io/a:1".into(),
                ..Default::default()
            }),
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    run_as_group: Some(cri::Int64Value { value: 1000 }),
                    run_as_user: user.map(|value| cri::Int64Value { value }),
                    run_as_username: username.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(matches!(
            container_spec(Some(config(None, ""))),
            Err(Error::InvalidArgument(_))
        ));
        assert!(container_spec(Some(config(Some(1000), ""))).is_ok());
        assert!(container_spec(Some(config(None, "www-data"))).is_ok());
    }

    #[test]
    fn the_read_only_root_and_paths_are_taken_from_the_security_context() {
        let mut config = cri::ContainerConfig {
            image: Some(cri::ImageSpec {
                image: "x.io/a:1".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let spec = container_spec(Some(config.clone())).unwrap();
        assert!(!spec.readonly_rootfs);
        assert!(spec.readonly_paths.is_empty());
        config.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                readonly_rootfs: true,
                readonly_paths: vec!["/tmp".into(), "/proc/sys".into()],
                ..Default::default()
            }),
            ..Default::default()
        });
        let spec = container_spec(Some(config)).unwrap();
        assert!(spec.readonly_rootfs);
        assert_eq!(spec.readonly_paths, ["/tmp", "/proc/sys"]);
    }

    #[test]
    fn resources_round_trip_through_the_wire() {
        let wire = cri::LinuxContainerResources {
            memory_limit_in_bytes: 64 << 20,
            cpu_quota: 10_000,
            cpu_period: 100_000,
            cpu_shares: 102,
            ..Default::default()
        };
        let domain = resources(Some(wire.clone()));
        assert_eq!(domain.memory_limit_bytes, Some(64 << 20));
        assert_eq!(linux_resources(&domain), wire);
        assert_eq!(
            resources(Some(cri::LinuxContainerResources::default())),
            Resources::default()
        );
    }

    #[test]
    fn sandbox_filter_maps_state() {
        let f = sandbox_filter(Some(cri::PodSandboxFilter {
            state: Some(cri::PodSandboxStateValue {
                state: cri::PodSandboxState::SandboxNotready as i32,
            }),
            ..Default::default()
        }));
        assert_eq!(f.state, Some(SandboxState::NotReady));
    }
}
