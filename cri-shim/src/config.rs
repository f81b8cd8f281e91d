//! The daemon's settings: embedded defaults, overridden by a TOML file
//! (`--config`), overridden by flags; and the file's reference ([`KEYS`]),
//! which `wasmlet config default` prints and which names the nearest known
//! key when a file has one it does not know.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;
use wasmlet_agent::{CniPaths, HttpOptions, NetworkConfig, RegistryConfig};
use wasmlet_proto::cri::CgroupDriver;

use crate::streaming::StreamingConfig;

/// The handlers served when the config names none: the names operators
/// give the Wasm RuntimeClass.
pub const DEFAULT_RUNTIME_HANDLERS: &[&str] = &["wasm", "wasmtime"];

/// The TOML config file. Every key is optional; what each means, its unit
/// and its default are in [`KEYS`] (which `wasmlet config default` prints),
/// not here, so the reference cannot drift from the types: a test checks
/// that [`KEYS`] names exactly the fields below.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub socket: Option<PathBuf>,
    pub root: Option<PathBuf>,
    pub runtime_handlers: Option<Vec<String>>,
    pub cgroup_driver: Option<String>,
    pub compile_parallelism: Option<usize>,
    #[serde(default)]
    pub engine: EngineSection,
    #[serde(default)]
    pub registry: RegistrySection,
    #[serde(default)]
    pub network: NetworkSection,
    #[serde(default)]
    pub http: HttpSection,
    pub delegate: Option<DelegateSection>,
    #[serde(default)]
    pub streaming: StreamingSection,
    #[serde(default)]
    pub memory: MemorySection,
    #[serde(default)]
    pub metrics: MetricsSection,
}

/// `[engine]`: how programs are compiled.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSection {
    pub fast_tier_min_bytes: Option<u64>,
}

/// The smallest program (bytes of Wasm) compiled with Winch first: 16 MiB.
/// Cranelift compiles a 28 MB module (yosys) in 14 s on an idle 2-core
/// machine (30 s loaded), Winch in 2.3 s (4.9 s), and its code runs about
/// 1.5 times slower; at 16 MiB Cranelift takes some 8 s, past what a
/// first pod should wait, while smaller programs compile in a few seconds
/// and gain little.
pub const DEFAULT_FAST_TIER_MIN_BYTES: u64 = 16 << 20;

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    pub address: Option<String>,
}

/// Where metrics are served unless the file says otherwise: loopback, for
/// a Prometheus agent on the node (or a kube-rbac-proxy in front of it).
pub const DEFAULT_METRICS_ADDRESS: &str = "127.0.0.1:10470";

/// `[memory]`: the node memory guard and the agent's own OOM score.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemorySection {
    pub node_budget_bytes: Option<u64>,
    pub node_share_percent: Option<u64>,
    pub node_reserve_bytes: Option<u64>,
    pub agent_oom_score_adj: Option<i64>,
}

/// The computed budget's share of the node's memory, in percent.
pub const DEFAULT_NODE_SHARE_PERCENT: u64 = 90;
/// What the computed budget leaves to everything but guests.
pub const DEFAULT_NODE_RESERVE_BYTES: u64 = 1 << 30;
/// The agent's own OOM score adjustment: the kernel ends any other process
/// first, but the agent before the kubelet's and containerd's -999.
pub const DEFAULT_AGENT_OOM_SCORE_ADJ: i64 = -998;
/// How long to wait for a connection to the downstream runtime.
pub const DEFAULT_DELEGATE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Background compiles of pulled images at once.
pub const DEFAULT_COMPILE_PARALLELISM: usize = 2;

/// `[streaming]`: the server behind Exec, Attach and PortForward.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamingSection {
    pub address: Option<std::net::SocketAddr>,
    pub token_ttl_seconds: Option<u64>,
    pub stream_creation_timeout_seconds: Option<u64>,
    pub idle_timeout_seconds: Option<u64>,
}

/// `[delegate]`: the downstream CRI runtime (containerd, CRI-O) that
/// runs every pod whose handler is not one of `runtime_handlers`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelegateSection {
    pub socket: PathBuf,
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
    pub default_port: Option<u16>,
    pub max_concurrency: Option<usize>,
    pub request_timeout_seconds: Option<u64>,
    pub pool_instances: Option<u32>,
    pub ca_file: Option<PathBuf>,
}

/// `[network]`: CNI and pod network namespaces.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSection {
    pub cni_conf_dir: Option<PathBuf>,
    pub cni_bin_dirs: Option<Vec<PathBuf>>,
    pub netns_dir: Option<PathBuf>,
}

/// `[registry]`: how registries are reached.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrySection {
    #[serde(default)]
    pub insecure: Vec<String>,
    pub ca_file: Option<PathBuf>,
    pub max_manifest_bytes: Option<u64>,
    pub max_blob_bytes: Option<u64>,
}

/// A section of the file (`[name]`).
#[derive(Debug)]
pub struct Section {
    pub name: &'static str,
    /// What it is about.
    pub doc: &'static str,
    /// Absent unless given (`[delegate]`): the reference shows it commented
    /// out.
    pub optional: bool,
}

/// What applies when a key is left out.
pub enum KeyDefault {
    /// A fixed value, taken from the settings resolved without a file (or
    /// the constant `Settings::resolve` uses).
    Value(fn(&Settings) -> toml::Value),
    /// None fixed: computed at start, or the feature is off; the key's doc
    /// says which. The reference shows the key commented out, with this
    /// example value.
    Example(&'static str),
}

/// One key of the file: the one source of the reference and of the
/// suggestions for misspelt keys.
pub struct Key {
    /// Its section's name; `""` for the top level.
    pub section: &'static str,
    pub name: &'static str,
    /// What it sets, with its unit.
    pub doc: &'static str,
    pub default: KeyDefault,
}

/// The file's sections, in the reference's order.
pub const SECTIONS: &[Section] = &[
    Section {
        name: "engine",
        doc: "How programs are compiled to machine code.",
        optional: false,
    },
    Section {
        name: "registry",
        doc: "How images are pulled from registries.",
        optional: false,
    },
    Section {
        name: "network",
        doc: "CNI and the pods' network namespaces.",
        optional: false,
    },
    Section {
        name: "delegate",
        doc: "Optional: the node's own CRI runtime (containerd, CRI-O), which runs every pod whose RuntimeClass handler is not one of runtime_handlers, the default handler included. Without this section wasmlet runs Wasm pods only.",
        optional: true,
    },
    Section {
        name: "streaming",
        doc: "The server behind Exec, Attach and PortForward: the kubelet connects to the URLs it hands out.",
        optional: false,
    },
    Section {
        name: "http",
        doc: "wasi:http functions: containers whose program exports wasi:http/incoming-handler, served on their pod's IP.",
        optional: false,
    },
    Section {
        name: "metrics",
        doc: "Prometheus metrics (OpenMetrics text at /metrics); the README lists every family.",
        optional: false,
    },
    Section {
        name: "memory",
        doc: "The node memory guard, which keeps all guests' committed memory under a budget and ends guests by QoS class when the node is short, and the agent's own standing with the kernel's OOM killer.",
        optional: false,
    },
];

fn int(n: impl TryInto<i64>) -> toml::Value {
    toml::Value::Integer(n.try_into().unwrap_or(i64::MAX))
}

fn text(s: impl std::fmt::Display) -> toml::Value {
    toml::Value::String(s.to_string())
}

fn paths(paths: &[PathBuf]) -> toml::Value {
    toml::Value::Array(paths.iter().map(|p| text(p.display())).collect())
}

/// Every key of the file, by section in [`SECTIONS`]' order (the top level
/// first).
pub const KEYS: &[Key] = &[
    Key {
        section: "",
        name: "socket",
        doc: "The CRI unix socket the kubelet connects to (its containerRuntimeEndpoint) and the admin API is served on; created mode 0660, a stale one replaced. Default: /run/wasmlet/wasmlet.sock as root, else $XDG_RUNTIME_DIR/wasmlet/wasmlet.sock. --socket overrides it.",
        default: KeyDefault::Example("\"/run/wasmlet/wasmlet.sock\""),
    },
    Key {
        section: "",
        name: "root",
        doc: "The state directory: the state database, the image store, compiled programs, per-container files. Default: /var/lib/wasmlet as root, else $XDG_DATA_HOME/wasmlet (~/.local/share/wasmlet). --root overrides it.",
        default: KeyDefault::Example("\"/var/lib/wasmlet\""),
    },
    Key {
        section: "",
        name: "runtime_handlers",
        doc: "The RuntimeClass handlers wasmlet runs (the default handler \"\" too, unless [delegate] is set).",
        default: KeyDefault::Value(|s| {
            toml::Value::Array(s.runtime_handlers.iter().map(text).collect())
        }),
    },
    Key {
        section: "",
        name: "cgroup_driver",
        doc: "\"systemd\" or \"cgroupfs\": what RuntimeConfig tells the kubelet, which must use the same cgroupDriver.",
        default: KeyDefault::Value(|s| {
            text(match s.cgroup_driver {
                CgroupDriver::Systemd => "systemd",
                CgroupDriver::Cgroupfs => "cgroupfs",
            })
        }),
    },
    Key {
        section: "",
        name: "compile_parallelism",
        doc: "How many pulled images are compiled at once, in the background.",
        default: KeyDefault::Value(|s| int(s.compile_parallelism)),
    },
    Key {
        section: "engine",
        name: "fast_tier_min_bytes",
        doc: "Modules and command components of at least this many bytes of Wasm are compiled with Winch, wasmtime's baseline compiler, several times faster than Cranelift: the pull answers and the first containers start sooner, on code about 1.5 times slower, while Cranelift compiles them in the background (one at a time, at nice 10) for the containers created after it. Programs Winch cannot compile (exception handling, tail calls, GC...) and wasi:http functions are compiled by Cranelift alone. 0 turns the tier off.",
        default: KeyDefault::Value(|s| int(s.fast_tier_min_bytes)),
    },
    Key {
        section: "registry",
        name: "insecure",
        doc: "Registries (host or host:port) spoken to over plain HTTP.",
        default: KeyDefault::Value(|s| {
            toml::Value::Array(s.registry.insecure.iter().map(text).collect())
        }),
    },
    Key {
        section: "registry",
        name: "ca_file",
        doc: "A PEM CA bundle trusted besides the system roots. Default: none.",
        default: KeyDefault::Example("\"/etc/wasmlet/ca.pem\""),
    },
    Key {
        section: "registry",
        name: "max_manifest_bytes",
        doc: "The largest manifest or index accepted, in bytes. No more than this is read: a longer answer (or a Content-Length over it) ends the request.",
        default: KeyDefault::Value(|s| int(s.registry.max_manifest_bytes)),
    },
    Key {
        section: "registry",
        name: "max_blob_bytes",
        doc: "The largest layer or config blob accepted, in bytes.",
        default: KeyDefault::Value(|s| int(s.registry.max_blob_bytes)),
    },
    Key {
        section: "network",
        name: "cni_conf_dir",
        doc: "Where the CNI network configuration is: the first *.conflist, *.conf or *.json by name is used.",
        default: KeyDefault::Value(|s| text(s.network.cni.conf_dir.display())),
    },
    Key {
        section: "network",
        name: "cni_bin_dirs",
        doc: "Where CNI plugins are looked for, in order.",
        default: KeyDefault::Value(|s| paths(&s.network.cni.bin_dirs)),
    },
    Key {
        section: "network",
        name: "netns_dir",
        doc: "Where pods' network namespaces are pinned, as wasmlet-<sandbox id>.",
        default: KeyDefault::Value(|s| text(s.network.netns_dir.display())),
    },
    Key {
        section: "delegate",
        name: "socket",
        doc: "The downstream runtime's CRI socket (required in this section).",
        default: KeyDefault::Example("\"/run/containerd/containerd.sock\""),
    },
    Key {
        section: "delegate",
        name: "connect_timeout_seconds",
        doc: "How long to wait for a connection to it, in seconds.",
        default: KeyDefault::Value(|_| int(DEFAULT_DELEGATE_CONNECT_TIMEOUT.as_secs())),
    },
    Key {
        section: "streaming",
        name: "address",
        doc: "Where it listens, IP:port. Loopback on any free port suits a kubelet on the same node, the only client.",
        default: KeyDefault::Value(|s| text(s.streaming.address)),
    },
    Key {
        section: "streaming",
        name: "token_ttl_seconds",
        doc: "How long a URL handed out stays valid, in seconds; it works once.",
        default: KeyDefault::Value(|s| int(s.streaming.token_ttl.as_secs())),
    },
    Key {
        section: "streaming",
        name: "stream_creation_timeout_seconds",
        doc: "How long a client may take to open its streams, in seconds.",
        default: KeyDefault::Value(|s| int(s.streaming.stream_creation_timeout.as_secs())),
    },
    Key {
        section: "streaming",
        name: "idle_timeout_seconds",
        doc: "How long a connection may carry nothing either way before it is closed, in seconds.",
        default: KeyDefault::Value(|s| int(s.streaming.idle_timeout.as_secs())),
    },
    Key {
        section: "http",
        name: "default_port",
        doc: "The port a function is served on when nothing names one (the program's WASMTIME_HTTP_PROXY_SOCKET_ADDR, the container's ports, the pod's port mappings; see \"The CRI validation suite\").",
        default: KeyDefault::Value(|s| int(s.http.port)),
    },
    Key {
        section: "http",
        name: "max_concurrency",
        doc: "Requests one container handles at once; more wait.",
        default: KeyDefault::Value(|s| int(s.http.max_concurrency)),
    },
    Key {
        section: "http",
        name: "request_timeout_seconds",
        doc: "How long one request may take, in seconds.",
        default: KeyDefault::Value(|s| int(s.http.request_timeout.as_secs())),
    },
    Key {
        section: "http",
        name: "pool_instances",
        doc: "Function instances the node's pool holds at once.",
        default: KeyDefault::Value(|s| int(s.http_pool_instances)),
    },
    Key {
        section: "http",
        name: "ca_file",
        doc: "PEM CA certificates functions trust for outgoing HTTPS, besides the web PKI's roots. Default: none.",
        default: KeyDefault::Example("\"/etc/wasmlet/egress-ca.pem\""),
    },
    Key {
        section: "metrics",
        name: "address",
        doc: "Where GET /metrics is served, IP:port; \"\" turns metrics off. Anyone who can reach it reads every pod's name and usage: keep it on loopback or a node-internal address. If the port is taken the agent logs why and tries again every 5 seconds.",
        default: KeyDefault::Value(|s| {
            text(s.metrics_address.map(|a| a.to_string()).unwrap_or_default())
        }),
    },
    Key {
        section: "memory",
        name: "node_budget_bytes",
        doc: "All guests' committed memory, in bytes; 0 turns the guard off. Default: computed at start as node_share_percent of MemTotal (or of the agent's own cgroup memory limit when lower) less node_reserve_bytes.",
        default: KeyDefault::Example("17179869184"),
    },
    Key {
        section: "memory",
        name: "node_share_percent",
        doc: "The computed budget's share of the node's memory, in percent.",
        default: KeyDefault::Value(|_| int(DEFAULT_NODE_SHARE_PERCENT)),
    },
    Key {
        section: "memory",
        name: "node_reserve_bytes",
        doc: "What the computed budget leaves to the agent itself, the kubelet and the system, in bytes.",
        default: KeyDefault::Value(|_| int(DEFAULT_NODE_RESERVE_BYTES)),
    },
    Key {
        section: "memory",
        name: "agent_oom_score_adj",
        doc: "The agent's own oom_score_adj, -1000 to 1000. The default has the kernel's OOM killer end any other process first, but the agent before the kubelet and containerd (-999). Lowering it needs CAP_SYS_RESOURCE.",
        default: KeyDefault::Value(|s| int(s.agent_oom_score_adj)),
    },
];

/// What the reference says first.
const REFERENCE_HEADER: &str = "wasmlet's configuration file (TOML), as `wasmlet config default` prints it: every key with its meaning, unit and default. The daemon reads the file that --config or WASMLET_CONFIG names; --socket and --root override it. A key left out takes its default; an unknown key is refused. Lines such as #socket = ... are keys with no fixed default (the comment above one says what applies without it; the value is an example) or keys of an optional section.";

/// Appends `doc` as `# ` comment lines of at most 79 columns.
fn comment(out: &mut String, doc: &str) {
    let mut line = String::from("#");
    for word in doc.split_whitespace() {
        if line.len() > 1 && line.len() + 1 + word.len() > 79 {
            out.push_str(&line);
            out.push('\n');
            line = String::from("#");
        }
        line.push(' ');
        line.push_str(word);
    }
    out.push_str(&line);
    out.push('\n');
}

/// Appends the keys of `section` (`""`: the top level).
fn keys(out: &mut String, section: &str, commented: bool, defaults: &Settings) {
    for key in KEYS.iter().filter(|k| k.section == section) {
        out.push('\n');
        comment(out, key.doc);
        let (hash, value) = match &key.default {
            KeyDefault::Value(value) => (
                if commented { "#" } else { "" },
                value(defaults).to_string(),
            ),
            KeyDefault::Example(example) => ("#", (*example).to_owned()),
        };
        out.push_str(&format!("{hash}{} = {value}\n", key.name));
    }
}

/// The complete, commented configuration file `wasmlet config default`
/// prints: every key of [`KEYS`] with its default. Read back, it gives the
/// same settings as no file.
pub fn reference() -> String {
    let defaults = Settings::defaults();
    let mut out = String::new();
    comment(&mut out, REFERENCE_HEADER);
    keys(&mut out, "", false, &defaults);
    for section in SECTIONS {
        out.push('\n');
        comment(&mut out, section.doc);
        let hash = if section.optional { "#" } else { "" };
        out.push_str(&format!("{hash}[{}]\n", section.name));
        keys(&mut out, section.name, section.optional, &defaults);
    }
    out
}

/// How far `name` is from `known`: the edit distance (insertions,
/// deletions, substitutions) per mille of the longer name's length, so that
/// a key missing its unit suffix (`token_ttl`) is nearer to its own
/// (`token_ttl_seconds`) than to a short unrelated one (`socket`).
fn distance(name: &str, known: &str) -> usize {
    let b: Vec<char> = known.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in name.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(diagonal + 1);
        }
    }
    let longer = name.chars().count().max(b.len()).max(1);
    row[b.len()] * 1000 / longer
}

/// Where a key is, for a message: `at the top level`, `in [registry]`.
fn place(section: &str) -> String {
    if section.is_empty() {
        "at the top level".to_owned()
    } else {
        format!("in [{section}]")
    }
}

/// The known key (or, at the top level, section) nearest to `name` found
/// in `section`, as a message names it; of keys as near, one of `section`.
fn nearest_key(section: &str, name: &str) -> String {
    let nearest = KEYS
        .iter()
        .min_by_key(|k| (distance(name, k.name), k.section != section))
        .map(|k| (k.section, k.name));
    let nearest_section = SECTIONS
        .iter()
        .filter(|_| section.is_empty())
        .map(|s| (distance(name, s.name), s.name))
        .min();
    match (nearest, nearest_section) {
        (Some((_, key)), Some((to_section, section_name))) if to_section < distance(name, key) => {
            format!("the section [{section_name}]")
        }
        (Some((key_section, key)), _) if key_section == section => format!("`{key}`"),
        (Some((key_section, key)), _) => format!("`{key}` {}", place(key_section)),
        (None, _) => "nothing".to_owned(),
    }
}

/// Refuses keys and sections [`KEYS`] and [`SECTIONS`] do not know, each
/// named with its line, its section and the nearest known key. A file that
/// is not TOML passes: parsing it says where it breaks.
fn check_keys(text: &str) -> anyhow::Result<()> {
    let Ok(document) = toml::de::DeTable::parse(text) else {
        return Ok(());
    };
    let line =
        |span: std::ops::Range<usize>| text[..span.start.min(text.len())].matches('\n').count() + 1;
    let mut unknown = Vec::new();
    for (key, value) in document.get_ref() {
        let name: &str = key.get_ref();
        if let Some(section) = SECTIONS.iter().find(|s| s.name == name) {
            for (key, _) in value.get_ref().as_table().into_iter().flatten() {
                let inner: &str = key.get_ref();
                if !KEYS
                    .iter()
                    .any(|k| k.section == section.name && k.name == inner)
                {
                    unknown.push((
                        line(key.span()),
                        format!(
                            "unknown key `{inner}` {} (did you mean {}?)",
                            place(section.name),
                            nearest_key(section.name, inner)
                        ),
                    ));
                }
            }
        } else if value.get_ref().is_table() {
            let nearest = SECTIONS
                .iter()
                .min_by_key(|s| distance(name, s.name))
                .map_or("", |s| s.name);
            unknown.push((
                line(key.span()),
                format!("unknown section [{name}] (did you mean [{nearest}]?)"),
            ));
        } else if !KEYS.iter().any(|k| k.section.is_empty() && k.name == name) {
            unknown.push((
                line(key.span()),
                format!(
                    "unknown key `{name}` at the top level (did you mean {}?)",
                    nearest_key("", name)
                ),
            ));
        }
    }
    if unknown.is_empty() {
        return Ok(());
    }
    unknown.sort();
    let unknown: Vec<String> = unknown
        .iter()
        .map(|(line, what)| format!("line {line}: {what}"))
        .collect();
    bail!("{}", unknown.join("; "))
}

impl FileConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading config {path:?}"))?;
        Self::parse(&text).with_context(|| format!("parsing config {path:?}"))
    }

    /// Parses a file's text, refusing unknown keys by name.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        check_keys(text)?;
        Ok(toml::from_str(text)?)
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
    /// The fast first tier's threshold, in bytes of Wasm (0: off).
    pub fast_tier_min_bytes: u64,
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
    /// Where metrics are served (`None`: off).
    pub metrics_address: Option<std::net::SocketAddr>,
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
        Self::from_file(file, socket, root)
    }

    /// The settings without a file or flags.
    pub fn defaults() -> Self {
        // Nothing in an empty file can be out of range.
        Self::from_file(FileConfig::default(), None, None)
            .unwrap_or_else(|error| unreachable!("the defaults do not resolve: {error:#}"))
    }

    /// `file`'s settings, then the flags, over the defaults.
    fn from_file(
        file: FileConfig,
        socket: Option<PathBuf>,
        root: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
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
            compile_parallelism: file
                .compile_parallelism
                .unwrap_or(DEFAULT_COMPILE_PARALLELISM),
            fast_tier_min_bytes: file
                .engine
                .fast_tier_min_bytes
                .unwrap_or(DEFAULT_FAST_TIER_MIN_BYTES),
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
                    ..d
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
            metrics_address: match file.metrics.address.as_deref() {
                Some("") => None,
                Some(address) => Some(address.parse().map_err(|e| {
                    anyhow::anyhow!("metrics.address {address:?}: expected IP:port ({e})")
                })?),
                None => Some(
                    DEFAULT_METRICS_ADDRESS
                        .parse()
                        .expect("the default metrics address parses"),
                ),
            },
            delegate: file.delegate.map(|d| DelegateSettings {
                socket: d.socket,
                connect_timeout: d
                    .connect_timeout_seconds
                    .map_or(DEFAULT_DELEGATE_CONNECT_TIMEOUT, |s| {
                        Duration::from_secs(s.max(1))
                    }),
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
        std::fs::write(&path, "[engine]\nfast_tier_min_bytes = -1\n").unwrap();
        assert!(Settings::resolve(Some(&path), None, None).is_err());
    }

    #[test]
    fn the_fast_tier_defaults_to_16_mib_and_0_turns_it_off() {
        assert_eq!(Settings::defaults().fast_tier_min_bytes, 16 << 20);
        assert_eq!(
            settings("[engine]\nfast_tier_min_bytes = 0\n").fast_tier_min_bytes,
            0
        );
        assert_eq!(
            settings("[engine]\nfast_tier_min_bytes = 1048576\n").fast_tier_min_bytes,
            1 << 20
        );
    }

    fn settings(text: &str) -> Settings {
        Settings::from_file(FileConfig::parse(text).unwrap(), None, None).unwrap()
    }

    #[test]
    fn the_reference_reads_back_as_no_file() {
        let reference = reference();
        assert_eq!(
            format!("{:?}", settings(&reference)),
            format!("{:?}", Settings::defaults()),
            "{reference}"
        );
    }

    #[test]
    fn the_references_commented_examples_are_valid() {
        let uncommented: String = reference()
            .lines()
            .map(|line| match line.strip_prefix('#') {
                Some(code) if !code.starts_with(' ') => format!("{code}\n"),
                _ => format!("{line}\n"),
            })
            .collect();
        let s = settings(&uncommented);
        assert_eq!(s.socket, PathBuf::from("/run/wasmlet/wasmlet.sock"));
        assert_eq!(s.node_memory_budget, Some(16 << 30));
        let delegate = s.delegate.expect("[delegate] uncommented");
        assert_eq!(delegate.connect_timeout, DEFAULT_DELEGATE_CONNECT_TIMEOUT);
        assert!(s.http_ca_file.is_some() && s.registry.ca_file.is_some());
    }

    #[test]
    fn every_key_is_in_the_reference_in_order() {
        let reference = reference();
        let mut rest = reference.as_str();
        for section in std::iter::once("").chain(SECTIONS.iter().map(|s| s.name)) {
            if !section.is_empty() {
                let header = format!("[{section}]\n");
                let at = rest.find(&header).unwrap_or_else(|| panic!("no {header}"));
                rest = &rest[at..];
            }
            for key in KEYS.iter().filter(|k| k.section == section) {
                let at = rest
                    .find(&format!("{} = ", key.name))
                    .unwrap_or_else(|| panic!("no {section}.{}", key.name));
                rest = &rest[at..];
            }
        }
        assert!(
            reference.lines().all(|line| line.len() <= 79),
            "{reference}"
        );
    }

    /// The field names serde's derive gave `T`: what `deny_unknown_fields`
    /// accepts.
    fn serde_fields<T: serde::de::DeserializeOwned>() -> &'static [&'static str] {
        struct Probe<'a>(&'a mut &'static [&'static str]);
        impl<'de> serde::Deserializer<'de> for Probe<'_> {
            type Error = serde::de::value::Error;
            fn deserialize_any<V: serde::de::Visitor<'de>>(
                self,
                _: V,
            ) -> Result<V::Value, Self::Error> {
                Err(serde::de::Error::custom("not a struct"))
            }
            fn deserialize_struct<V: serde::de::Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Self::Error> {
                *self.0 = fields;
                Err(serde::de::Error::custom("probed"))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str
                string bytes byte_buf option unit unit_struct newtype_struct seq
                tuple tuple_struct map enum identifier ignored_any
            }
        }
        let mut fields: &'static [&'static str] = &[];
        let _ = T::deserialize(Probe(&mut fields));
        fields
    }

    #[test]
    fn the_keys_are_exactly_the_fields_of_the_config_types() {
        let described = |section: &str| -> Vec<&str> {
            let mut keys: Vec<&str> = KEYS
                .iter()
                .filter(|k| k.section == section)
                .map(|k| k.name)
                .collect();
            keys.sort();
            keys
        };
        let sorted = |fields: &[&'static str]| {
            let mut fields = fields.to_vec();
            fields.sort();
            fields
        };
        let mut top = described("");
        top.extend(SECTIONS.iter().map(|s| s.name));
        top.sort();
        assert_eq!(sorted(serde_fields::<FileConfig>()), top);
        for (section, fields) in [
            ("engine", serde_fields::<EngineSection>()),
            ("registry", serde_fields::<RegistrySection>()),
            ("network", serde_fields::<NetworkSection>()),
            ("delegate", serde_fields::<DelegateSection>()),
            ("streaming", serde_fields::<StreamingSection>()),
            ("http", serde_fields::<HttpSection>()),
            ("memory", serde_fields::<MemorySection>()),
            ("metrics", serde_fields::<MetricsSection>()),
        ] {
            assert_eq!(sorted(fields), described(section), "[{section}]");
        }
    }

    #[test]
    fn the_readme_shows_the_reference() {
        let readme = include_str!("../../README.md");
        let marker = "<!-- the output of `wasmlet config default` -->\n```toml\n";
        let start = readme.find(marker).expect("the README marks the reference") + marker.len();
        let end = start + readme[start..].find("```\n").expect("the block ends");
        assert!(
            readme[start..end] == reference(),
            "the README's configuration reference is stale: replace it with `wasmlet config default`'s output"
        );
    }

    fn refusal(text: &str) -> String {
        format!("{:#}", FileConfig::parse(text).unwrap_err())
    }

    #[test]
    fn unknown_keys_are_named_with_their_section_and_the_nearest_key() {
        let message = refusal("root = \"/r\"\nsockt = \"/typo\"\n");
        assert!(
            message
                .contains("line 2: unknown key `sockt` at the top level (did you mean `socket`?)"),
            "{message}"
        );
        let message = refusal("[registry]\nmax_blob_byte = 1\n");
        assert!(
            message.contains(
                "line 2: unknown key `max_blob_byte` in [registry] (did you mean `max_blob_bytes`?)"
            ),
            "{message}"
        );
        let message = refusal("node_reserve_bytes = 1\n");
        assert!(
            message.contains("(did you mean `node_reserve_bytes` in [memory]?)"),
            "{message}"
        );
        let message = refusal("[memory]\nnode_budget = 1\n[streaming]\ntoken_ttl = 5\n");
        assert!(
            message.contains("`node_budget` in [memory] (did you mean `node_budget_bytes`?)")
                && message.contains("line 4: unknown key `token_ttl` in [streaming] (did you mean `token_ttl_seconds`?)"),
            "{message}"
        );
        let message = refusal("[regsitry]\ninsecure = []\n");
        assert!(
            message.contains("line 1: unknown section [regsitry] (did you mean [registry]?)"),
            "{message}"
        );
        let message = refusal("stream = 1\n");
        assert!(
            message.contains("(did you mean the section [streaming]?)"),
            "{message}"
        );
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
