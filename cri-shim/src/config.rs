//! The daemon's settings: embedded defaults, overridden by a TOML file
//! (`--config`), overridden by flags.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;
use wasmlet_agent::{CniPaths, HttpOptions, NetworkConfig, RegistryConfig};
use wasmlet_proto::cri::CgroupDriver;

use crate::streaming::StreamingConfig;

/// The handlers served when the config names none: the names operators
/// give the Wasm RuntimeClass.
pub const DEFAULT_RUNTIME_HANDLERS: &[&str] = &["wasm", "wasmtime"];

/// The TOML config file. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Path of the CRI unix socket.
    pub socket: Option<PathBuf>,
    /// State root: database, images, per-container files.
    pub root: Option<PathBuf>,
    /// RuntimeClass handlers served by wasmlet.
    pub runtime_handlers: Option<Vec<String>>,
    /// `systemd` or `cgroupfs`, reported to the kubelet by RuntimeConfig.
    pub cgroup_driver: Option<String>,
    /// How many pulled images compile at once in the background.
    pub compile_parallelism: Option<usize>,
    #[serde(default)]
    pub registry: RegistrySection,
    #[serde(default)]
    pub network: NetworkSection,
    #[serde(default)]
    pub http: HttpSection,
    /// The node's other CRI runtime, which gets every non-Wasm pod.
    pub delegate: Option<DelegateSection>,
    #[serde(default)]
    pub streaming: StreamingSection,
    #[serde(default)]
    pub memory: MemorySection,
}

/// `[memory]`: the node memory guard, which keeps all guests' committed
/// memory under a budget and ends guests by QoS class when the node is
/// short, and the agent's own standing with the kernel's OOM killer.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemorySection {
    /// The budget, in bytes; 0 turns the guard off. Unset: computed as
    /// `node_share_percent` of MemTotal (or of the agent's own cgroup
    /// memory limit when lower) less `node_reserve_bytes`.
    pub node_budget_bytes: Option<u64>,
    /// Percent of the node's memory the computed budget takes (90).
    pub node_share_percent: Option<u64>,
    /// Bytes the computed budget leaves to the agent itself, the kubelet
    /// and the system (1 GiB).
    pub node_reserve_bytes: Option<u64>,
    /// The agent's own `oom_score_adj` (-998: the kernel ends any other
    /// process first, but the agent before the kubelet's and containerd's
    /// -999). Unset in the file means -998; the kernel's range is
    /// -1000..=1000.
    pub agent_oom_score_adj: Option<i64>,
}

/// The computed budget's share of the node's memory, in percent.
pub const DEFAULT_NODE_SHARE_PERCENT: u64 = 90;
/// What the computed budget leaves to everything but guests.
pub const DEFAULT_NODE_RESERVE_BYTES: u64 = 1 << 30;
/// The agent's own OOM score adjustment.
pub const DEFAULT_AGENT_OOM_SCORE_ADJ: i64 = -998;

/// `[streaming]`: the server behind Exec, Attach and PortForward.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamingSection {
    /// Where it listens ("127.0.0.1:0": loopback, any free port).
    pub address: Option<std::net::SocketAddr>,
    /// Seconds a URL handed out stays valid (60).
    pub token_ttl_seconds: Option<u64>,
    /// Seconds a client may take to open its streams (30).
    pub stream_creation_timeout_seconds: Option<u64>,
    /// Seconds a connection may carry nothing before it is closed (4 h).
    pub idle_timeout_seconds: Option<u64>,
}

/// `[delegate]`: the downstream CRI runtime (containerd, CRI-O) that
/// runs every pod whose handler is not one of `runtime_handlers`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelegateSection {
    /// Its CRI socket, e.g. `/run/containerd/containerd.sock`.
    pub socket: PathBuf,
    /// Seconds to wait for a connection to it (5).
    pub connect_timeout_seconds: Option<u64>,
}

/// The downstream runtime in force.
#[derive(Debug, Clone)]
pub struct DelegateSettings {
    pub socket: PathBuf,
    pub connect_timeout: std::time::Duration,
}

/// `[http]`: how `wasi:http` functions are served.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    /// The port served when a container lists none (8080).
    pub default_port: Option<u16>,
    /// Requests one container handles at once (64); more wait.
    pub max_concurrency: Option<usize>,
    /// Seconds a request may take (60).
    pub request_timeout_seconds: Option<u64>,
    /// Function instances the node's pool has room for at once (256).
    pub pool_instances: Option<u32>,
    /// PEM CA certificates functions trust for outgoing HTTPS, besides the
    /// web PKI's roots.
    pub ca_file: Option<PathBuf>,
}

/// `[network]`: CNI and pod network namespaces.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSection {
    /// Where the CNI network configuration is (`/etc/cni/net.d`).
    pub cni_conf_dir: Option<PathBuf>,
    /// Where CNI plugins are (`/opt/cni/bin`, then Debian's `/usr/lib/cni`).
    pub cni_bin_dirs: Option<Vec<PathBuf>>,
    /// Where pod network namespaces are pinned (`/run/netns`).
    pub netns_dir: Option<PathBuf>,
}

/// `[registry]`: how registries are reached.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrySection {
    /// Registries (`host[:port]`) spoken to over plain HTTP.
    #[serde(default)]
    pub insecure: Vec<String>,
    /// A PEM CA bundle trusted besides the system roots.
    pub ca_file: Option<PathBuf>,
    pub max_manifest_bytes: Option<u64>,
    pub max_blob_bytes: Option<u64>,
}

impl FileConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading config {path:?}"))?;
        toml::from_str(&text).with_context(|| format!("parsing config {path:?}"))
    }
}

/// The settings in force.
#[derive(Debug, Clone)]
pub struct Settings {
    pub socket: PathBuf,
    pub root: PathBuf,
    pub runtime_handlers: Vec<String>,
    pub cgroup_driver: CgroupDriver,
    pub registry: RegistryConfig,
    pub compile_parallelism: usize,
    pub network: NetworkConfig,
    pub http: HttpOptions,
    pub http_pool_instances: u32,
    pub http_ca_file: Option<PathBuf>,
    pub delegate: Option<DelegateSettings>,
    pub streaming: StreamingConfig,
    /// The node memory guard's budget (`None`: off).
    pub node_memory_budget: Option<u64>,
    /// What the agent sets its own `oom_score_adj` to.
    pub agent_oom_score_adj: i64,
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `/run/wasmlet/wasmlet.sock` for root, else under the user's runtime dir.
pub fn default_socket() -> PathBuf {
    if is_root() {
        PathBuf::from("/run/wasmlet/wasmlet.sock")
    } else {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                std::env::temp_dir().join(format!("wasmlet-{}", nix::unistd::geteuid()))
            });
        base.join("wasmlet").join("wasmlet.sock")
    }
}

/// `/var/lib/wasmlet` for root, else under the user's data dir.
pub fn default_root() -> PathBuf {
    if is_root() {
        PathBuf::from("/var/lib/wasmlet")
    } else {
        let base = std::env::var_os("XDG_DATA_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
            .unwrap_or_else(std::env::temp_dir);
        base.join("wasmlet")
    }
}

impl Settings {
    /// Defaults, then the file, then the flags.
    pub fn resolve(
        file: Option<&Path>,
        socket: Option<PathBuf>,
        root: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        let file = match file {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let cgroup_driver = match file.cgroup_driver.as_deref().unwrap_or("systemd") {
            "systemd" => CgroupDriver::Systemd,
            "cgroupfs" => CgroupDriver::Cgroupfs,
            other => bail!("cgroup_driver {other:?}: expected \"systemd\" or \"cgroupfs\""),
        };
        Ok(Self {
            socket: socket.or(file.socket).unwrap_or_else(default_socket),
            root: root.or(file.root).unwrap_or_else(default_root),
            runtime_handlers: file.runtime_handlers.unwrap_or_else(|| {
                DEFAULT_RUNTIME_HANDLERS
                    .iter()
                    .map(|s| s.to_string())
                    .collect()
            }),
            cgroup_driver,
            registry: {
                let d = RegistryConfig::default();
                RegistryConfig {
                    insecure: file.registry.insecure,
                    ca_file: file.registry.ca_file,
                    max_manifest_bytes: file
                        .registry
                        .max_manifest_bytes
                        .unwrap_or(d.max_manifest_bytes),
                    max_blob_bytes: file.registry.max_blob_bytes.unwrap_or(d.max_blob_bytes),
                    ..d
                }
            },
            compile_parallelism: file.compile_parallelism.unwrap_or(2),
            network: {
                let d = NetworkConfig::default();
                NetworkConfig {
                    cni: CniPaths {
                        conf_dir: file.network.cni_conf_dir.unwrap_or(d.cni.conf_dir),
                        bin_dirs: file.network.cni_bin_dirs.unwrap_or(d.cni.bin_dirs),
                    },
                    netns_dir: file.network.netns_dir.unwrap_or(d.netns_dir),
                }
            },
            http: {
                let d = HttpOptions::default();
                HttpOptions {
                    port: file.http.default_port.unwrap_or(d.port),
                    max_concurrency: file
                        .http
                        .max_concurrency
                        .unwrap_or(d.max_concurrency)
                        .max(1),
                    request_timeout: file
                        .http
                        .request_timeout_seconds
                        .map_or(d.request_timeout, std::time::Duration::from_secs),
                }
            },
            http_pool_instances: file
                .http
                .pool_instances
                .unwrap_or(wasmlet_agent::HTTP_POOL_INSTANCES)
                .max(1),
            http_ca_file: file.http.ca_file,
            streaming: {
                let d = StreamingConfig::default();
                StreamingConfig {
                    address: file.streaming.address.unwrap_or(d.address),
                    token_ttl: file
                        .streaming
                        .token_ttl_seconds
                        .map_or(d.token_ttl, |s| std::time::Duration::from_secs(s.max(1))),
                    stream_creation_timeout: file
                        .streaming
                        .stream_creation_timeout_seconds
                        .map_or(d.stream_creation_timeout, |s| {
                            std::time::Duration::from_secs(s.max(1))
                        }),
                    idle_timeout: file
                        .streaming
                        .idle_timeout_seconds
                        .map_or(d.idle_timeout, |s| std::time::Duration::from_secs(s.max(1))),
                }
            },
            node_memory_budget: match file.memory.node_budget_bytes {
                Some(0) => None,
                Some(bytes) => Some(bytes),
                None => wasmlet_agent::default_node_memory_budget(
                    file.memory
                        .node_share_percent
                        .unwrap_or(DEFAULT_NODE_SHARE_PERCENT),
                    file.memory
                        .node_reserve_bytes
                        .unwrap_or(DEFAULT_NODE_RESERVE_BYTES),
                ),
            },
            agent_oom_score_adj: match file.memory.agent_oom_score_adj {
                Some(adj) if !(-1000..=1000).contains(&adj) => {
                    bail!("memory.agent_oom_score_adj {adj}: expected -1000 to 1000")
                }
                adj => adj.unwrap_or(DEFAULT_AGENT_OOM_SCORE_ADJ),
            },
            delegate: file.delegate.map(|d| DelegateSettings {
                socket: d.socket,
                connect_timeout: std::time::Duration::from_secs(
                    d.connect_timeout_seconds.unwrap_or(5).max(1),
                ),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_override_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wasmlet.toml");
        std::fs::write(&path, "socket = \"/a.sock\"\nroot = \"/a\"\nruntime_handlers = [\"spin\"]\ncgroup_driver = \"cgroupfs\"\n[registry]\ninsecure = [\"127.0.0.1:5000\"]\n[network]\ncni_conf_dir = \"/cni\"\n").unwrap();
        let s = Settings::resolve(Some(&path), Some("/b.sock".into()), None).unwrap();
        assert_eq!(s.socket, PathBuf::from("/b.sock"));
        assert_eq!(s.root, PathBuf::from("/a"));
        assert_eq!(s.runtime_handlers, vec!["spin"]);
        assert_eq!(s.cgroup_driver, CgroupDriver::Cgroupfs);
        assert_eq!(s.registry.insecure, vec!["127.0.0.1:5000"]);
        assert_eq!(s.network.cni.conf_dir, PathBuf::from("/cni"));
        assert!(s.delegate.is_none());
        assert!(s.streaming.address.ip().is_loopback());
        std::fs::write(
            &path,
            "[delegate]\nsocket = \"/run/containerd/containerd.sock\"\n",
        )
        .unwrap();
        let s = Settings::resolve(Some(&path), None, None).unwrap();
        let delegate = s.delegate.unwrap();
        assert_eq!(
            delegate.socket,
            PathBuf::from("/run/containerd/containerd.sock")
        );
        assert_eq!(delegate.connect_timeout, std::time::Duration::from_secs(5));
        let s = Settings::resolve(None, None, None).unwrap();
        assert_eq!(s.runtime_handlers, vec!["wasm", "wasmtime"]);
        assert_eq!(s.network.cni.conf_dir, PathBuf::from("/etc/cni/net.d"));
        assert_eq!(s.network.netns_dir, PathBuf::from("/run/netns"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "sockt = \"/typo\"\n").unwrap();
        assert!(Settings::resolve(Some(&path), None, None).is_err());
        std::fs::write(&path, "cgroup_driver = \"lxc\"\n").unwrap();
        assert!(Settings::resolve(Some(&path), None, None).is_err());
        std::fs::write(&path, "[memory]\nagent_oom_score_adj = -1001\n").unwrap();
        assert!(Settings::resolve(Some(&path), None, None).is_err());
    }

    #[test]
    fn the_node_memory_budget_is_computed_fixed_or_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let computed = Settings::resolve(None, None, None).unwrap();
        let budget = computed.node_memory_budget.expect("a computed budget");
        assert_eq!(computed.agent_oom_score_adj, DEFAULT_AGENT_OOM_SCORE_ADJ);
        std::fs::write(&path, "[memory]\nnode_reserve_bytes = 0\n").unwrap();
        let unreserved = Settings::resolve(Some(&path), None, None).unwrap();
        assert_eq!(
            unreserved.node_memory_budget,
            Some(budget + DEFAULT_NODE_RESERVE_BYTES)
        );
        std::fs::write(
            &path,
            "[memory]\nnode_budget_bytes = 268435456\nagent_oom_score_adj = -500\n",
        )
        .unwrap();
        let fixed = Settings::resolve(Some(&path), None, None).unwrap();
        assert_eq!(fixed.node_memory_budget, Some(256 << 20));
        assert_eq!(fixed.agent_oom_score_adj, -500);
        std::fs::write(&path, "[memory]\nnode_budget_bytes = 0\n").unwrap();
        let off = Settings::resolve(Some(&path), None, None).unwrap();
        assert_eq!(off.node_memory_budget, None);
    }
}
