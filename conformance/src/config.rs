//! Builders for the configs the kubelet sends, with the same defaults.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use wasmlet_proto::cri;

/// Label keys the kubelet puts on every sandbox.
pub const POD_NAME_LABEL: &str = "io.kubernetes.pod.name";
pub const POD_NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
pub const POD_UID_LABEL: &str = "io.kubernetes.pod.uid";

/// The namespace sandboxes get unless told otherwise.
pub const DEFAULT_NAMESPACE: &str = "cri-conformance";

/// A sandbox the harness started: its id and the config it was started with,
/// which the kubelet passes again with every `CreateContainer`.
#[derive(Debug, Clone)]
pub struct Pod {
    pub id: String,
    pub config: cri::PodSandboxConfig,
}

impl Pod {
    /// The sandbox's log directory on the host.
    pub fn log_directory(&self) -> &Path {
        Path::new(&self.config.log_directory)
    }

    /// Where the runtime must write the log of a container created from `config`.
    pub fn container_log(&self, config: &cri::ContainerConfig) -> PathBuf {
        self.log_directory().join(&config.log_path)
    }
}

/// Builds a `PodSandboxConfig` as the kubelet does: a pod name and uid unique to
/// this call, the kubelet's pod labels, and a log directory
/// `<log_root>/<namespace>_<name>_<uid>`.
#[derive(Debug, Clone)]
pub struct PodSandboxConfigBuilder {
    log_root: PathBuf,
    metadata: cri::PodSandboxMetadata,
    labels: HashMap<String, String>,
    annotations: HashMap<String, String>,
    cgroup_parent: String,
}

impl PodSandboxConfigBuilder {
    /// A pod whose log directory will be created under `log_root`.
    pub fn new(log_root: impl Into<PathBuf>) -> Self {
        let n = unique();
        PodSandboxConfigBuilder {
            log_root: log_root.into(),
            metadata: cri::PodSandboxMetadata {
                name: format!("pod-{n}"),
                uid: unique_uid(n),
                namespace: DEFAULT_NAMESPACE.to_owned(),
                attempt: 0,
            },
            labels: HashMap::new(),
            annotations: HashMap::new(),
            cgroup_parent: String::new(),
        }
    }

    /// The pod's cgroup parent, as the kubelet sets it (containerd needs
    /// one for pod stats).
    pub fn cgroup_parent(mut self, parent: impl Into<String>) -> Self {
        self.cgroup_parent = parent.into();
        self
    }

    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.metadata.name = name.into();
        self
    }

    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.metadata.namespace = namespace.into();
        self
    }

    pub fn uid(mut self, uid: impl Into<String>) -> Self {
        self.metadata.uid = uid.into();
        self
    }

    pub fn attempt(mut self, attempt: u32) -> Self {
        self.metadata.attempt = attempt;
        self
    }

    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    pub fn annotation(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }

    pub fn build(self) -> cri::PodSandboxConfig {
        let cri::PodSandboxMetadata {
            name,
            uid,
            namespace,
            ..
        } = &self.metadata;
        let log_directory = self.log_root.join(format!("{namespace}_{name}_{uid}"));
        let mut labels = HashMap::from([
            (POD_NAME_LABEL.to_owned(), name.clone()),
            (POD_NAMESPACE_LABEL.to_owned(), namespace.clone()),
            (POD_UID_LABEL.to_owned(), uid.clone()),
        ]);
        labels.extend(self.labels);
        cri::PodSandboxConfig {
            hostname: name.clone(),
            log_directory: log_directory.to_string_lossy().into_owned(),
            labels,
            annotations: self.annotations,
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_parent,
                ..Default::default()
            }),
            metadata: Some(self.metadata),
            ..Default::default()
        }
    }
}

/// Builds a `ContainerConfig` as the kubelet does; the log path is
/// `<name>/<attempt>.log`, relative to the sandbox's log directory.
#[derive(Debug, Clone)]
pub struct ContainerConfigBuilder {
    config: cri::ContainerConfig,
    explicit_log_path: bool,
}

impl ContainerConfigBuilder {
    pub fn new(name: impl Into<String>, image: impl Into<String>) -> Self {
        let image = image.into();
        ContainerConfigBuilder {
            config: cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: name.into(),
                    attempt: 0,
                }),
                image: Some(cri::ImageSpec {
                    image: image.clone(),
                    user_specified_image: image,
                    ..Default::default()
                }),
                linux: Some(cri::LinuxContainerConfig::default()),
                ..Default::default()
            },
            explicit_log_path: false,
        }
    }

    pub fn attempt(mut self, attempt: u32) -> Self {
        if let Some(metadata) = &mut self.config.metadata {
            metadata.attempt = attempt;
        }
        self
    }

    /// The entrypoint (`command` in the pod spec).
    pub fn command<S: Into<String>>(mut self, command: impl IntoIterator<Item = S>) -> Self {
        self.config.command = command.into_iter().map(Into::into).collect();
        self
    }

    /// Arguments after the entrypoint (`args` in the pod spec).
    pub fn args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.config.args = args.into_iter().map(Into::into).collect();
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.envs.push(cri::KeyValue {
            key: key.into(),
            value: value.into().into_bytes(),
        });
        self
    }

    pub fn working_dir(mut self, dir: impl Into<String>) -> Self {
        self.config.working_dir = dir.into();
        self
    }

    /// A host directory mounted at `container_path`.
    pub fn mount(
        mut self,
        host_path: impl AsRef<Path>,
        container_path: impl Into<String>,
        readonly: bool,
    ) -> Self {
        self.config.mounts.push(cri::Mount {
            container_path: container_path.into(),
            host_path: host_path.as_ref().to_string_lossy().into_owned(),
            readonly,
            ..Default::default()
        });
        self
    }

    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.labels.insert(key.into(), value.into());
        self
    }

    pub fn annotation(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.annotations.insert(key.into(), value.into());
        self
    }

    /// Overrides the log path relative to the sandbox's log directory.
    pub fn log_path(mut self, path: impl Into<String>) -> Self {
        self.config.log_path = path.into();
        self.explicit_log_path = true;
        self
    }

    /// `resources.limits.memory`, as the kubelet passes it.
    pub fn memory_limit(mut self, bytes: i64) -> Self {
        let linux = self.config.linux.get_or_insert_with(Default::default);
        linux
            .resources
            .get_or_insert_with(Default::default)
            .memory_limit_in_bytes = bytes;
        self
    }

    /// The `oom_score_adj` the kubelet gives the container by its QoS
    /// class (BestEffort 1000, Burstable 2–999, Guaranteed -997).
    pub fn oom_score_adj(mut self, adj: i64) -> Self {
        let linux = self.config.linux.get_or_insert_with(Default::default);
        linux
            .resources
            .get_or_insert_with(Default::default)
            .oom_score_adj = adj;
        self
    }

    /// `stdin: true` (and `stdinOnce`): the container's stdin stays open
    /// for `Attach` clients (closed after the first one leaves, with
    /// `once`).
    pub fn stdin(mut self, once: bool) -> Self {
        self.config.stdin = true;
        self.config.stdin_once = once;
        self
    }

    /// `tty: true`: attach clients get a terminal.
    pub fn tty(mut self) -> Self {
        self.config.tty = true;
        self
    }

    pub fn build(mut self) -> cri::ContainerConfig {
        if !self.explicit_log_path {
            let metadata = self.config.metadata.clone().unwrap_or_default();
            self.config.log_path = format!("{}/{}.log", metadata.name, metadata.attempt);
        }
        self.config
    }
}

/// Nanoseconds since the Unix epoch now, the unit of every CRI timestamp.
pub fn now_ns() -> i64 {
    let since_epoch = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_nanos()).unwrap_or(i64::MAX)
}

/// A number unique within this process; names built from it also carry the
/// process id, so concurrent test processes do not collide either.
fn unique() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A UUID-shaped pod uid, as the API server would assign.
fn unique_uid(seed: String) -> String {
    // FNV-1a over the seed and the clock: only uniqueness matters here.
    let mut hash: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for byte in seed.bytes().chain(now_ns().to_le_bytes()) {
        hash ^= u128::from(byte);
        hash = hash.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
    }
    let hex = format!("{hash:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pod_config_gets_its_own_name_uid_and_log_directory() {
        let a = PodSandboxConfigBuilder::new("/logs").build();
        let b = PodSandboxConfigBuilder::new("/logs").build();
        let (ma, mb) = (a.metadata.clone().unwrap(), b.metadata.clone().unwrap());
        assert_ne!(ma.name, mb.name);
        assert_ne!(ma.uid, mb.uid);
        assert_ne!(a.log_directory, b.log_directory);
        assert_eq!(
            a.log_directory,
            format!("/logs/{DEFAULT_NAMESPACE}_{}_{}", ma.name, ma.uid)
        );
        assert_eq!(a.labels[POD_UID_LABEL], ma.uid);
    }

    #[test]
    fn container_log_path_is_name_and_attempt() {
        let config = ContainerConfigBuilder::new("web", "img").attempt(2).build();
        assert_eq!(config.log_path, "web/2.log");
        let pod = Pod {
            id: "p".into(),
            config: PodSandboxConfigBuilder::new("/logs").build(),
        };
        assert_eq!(
            pod.container_log(&config),
            Path::new(&pod.config.log_directory).join("web/2.log")
        );
    }
}
