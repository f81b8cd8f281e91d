//! The part of a Kubernetes Pod manifest that `play` runs, read with the
//! API server's defaults and checked before anything is started.
//!
//! Fields this module does not name are ignored, as `kubectl` ignores
//! fields a server does not know. What `play` cannot honour and would
//! silently get wrong (`valueFrom`, volume sources other than `hostPath` and
//! `emptyDir`) is an error naming the field.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;
use serde::de::IgnoredAny;

/// The namespace of a pod whose manifest names none, as `kubectl` does.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The API server's default `terminationGracePeriodSeconds`.
pub const DEFAULT_GRACE_PERIOD_SECONDS: i64 = 30;

/// A checked Pod manifest.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub spec: PodSpec,
}

/// Read first, so that another kind is reported as such rather than as
/// whatever in it does not fit a pod.
#[derive(Debug, Deserialize)]
struct Kind {
    kind: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    #[serde(default, deserialize_with = "null_is_default")]
    metadata: Metadata,
    spec: Option<PodSpec>,
}

/// A key written with no value (`labels:`) is YAML null: read it as empty,
/// as the API server does.
fn null_is_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Metadata {
    #[serde(default)]
    name: String,
    namespace: Option<String>,
    #[serde(default, deserialize_with = "null_is_default")]
    labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "null_is_default")]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default, deserialize_with = "null_is_default")]
    pub containers: Vec<Container>,
    #[serde(default, deserialize_with = "null_is_default")]
    pub volumes: Vec<Volume>,
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    pub runtime_class_name: Option<String>,
    pub termination_grace_period_seconds: Option<i64>,
}

impl PodSpec {
    /// The grace period given to StopContainer, in seconds.
    pub fn grace_period_seconds(&self) -> i64 {
        self.termination_grace_period_seconds
            .unwrap_or(DEFAULT_GRACE_PERIOD_SECONDS)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub image: String,
    #[serde(default, deserialize_with = "null_is_default")]
    pub command: Vec<String>,
    #[serde(default, deserialize_with = "null_is_default")]
    pub args: Vec<String>,
    #[serde(default, deserialize_with = "null_is_default")]
    pub env: Vec<EnvVar>,
    #[serde(default, deserialize_with = "null_is_default")]
    pub volume_mounts: Vec<VolumeMount>,
    pub working_dir: Option<String>,
    #[serde(default, deserialize_with = "null_is_default")]
    pub ports: Vec<ContainerPort>,
    pub readiness_probe: Option<Probe>,
    pub liveness_probe: Option<Probe>,
    #[serde(default)]
    pub resources: ResourceRequirements,
}

/// A container's `resources`: quantities by resource name (`cpu`,
/// `memory`), as strings or numbers.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ResourceRequirements {
    #[serde(default, deserialize_with = "null_is_default")]
    pub limits: std::collections::BTreeMap<String, serde_yaml_ng::Value>,
    #[serde(default, deserialize_with = "null_is_default")]
    pub requests: std::collections::BTreeMap<String, serde_yaml_ng::Value>,
}

/// A Kubernetes quantity (`64Mi`, `1G`, `500m`, `0.5`, `2`, `1e3`) times
/// `scale` (1000 to read CPUs as millicores), rounded up, as the kubelet
/// reads limits: in exact decimal arithmetic, never through floating
/// point (`157677226038m` CPUs is 157677226038 millicores, not one more).
/// Past `u64::MAX` it saturates. `None` if it is not a quantity.
pub fn quantity(value: &serde_yaml_ng::Value, scale: u64) -> Option<u64> {
    let text = match value {
        serde_yaml_ng::Value::String(s) => s.trim().to_owned(),
        serde_yaml_ng::Value::Number(n) => n.to_string(),
        _ => return None,
    };
    /// Suffixes: a power of 1024, or a power of ten.
    const SUFFIXES: &[(&str, u32, i32)] = &[
        ("Ki", 1, 0),
        ("Mi", 2, 0),
        ("Gi", 3, 0),
        ("Ti", 4, 0),
        ("Pi", 5, 0),
        ("Ei", 6, 0),
        ("k", 0, 3),
        ("M", 0, 6),
        ("G", 0, 9),
        ("T", 0, 12),
        ("P", 0, 15),
        ("E", 0, 18),
        ("m", 0, -3),
    ];
    let (number, kibis, tens) = SUFFIXES
        .iter()
        .find_map(|(suffix, kibis, tens)| text.strip_suffix(suffix).map(|n| (n, *kibis, *tens)))
        .unwrap_or((text.as_str(), 0, 0));
    let (mantissa, exponent) = decimal(number)?;
    let numerator = mantissa
        .checked_mul(1024u128.checked_pow(kibis)?)
        .and_then(|n| n.checked_mul(u128::from(scale)));
    let Some(numerator) = numerator else {
        return Some(u64::MAX);
    };
    let tens = exponent.checked_add(i64::from(tens))?;
    let value = if tens >= 0 {
        u32::try_from(tens)
            .ok()
            .and_then(|t| 10u128.checked_pow(t))
            .and_then(|p| numerator.checked_mul(p))
            .unwrap_or(if numerator == 0 { 0 } else { u128::MAX })
    } else {
        match u32::try_from(-tens)
            .ok()
            .and_then(|t| 10u128.checked_pow(t))
        {
            Some(divisor) => numerator.div_ceil(divisor),
            // Smaller than one unit: rounded up to one.
            None => u128::from(numerator > 0),
        }
    };
    Some(u64::try_from(value).unwrap_or(u64::MAX))
}

/// A non-negative decimal (`12`, `0.5`, `+3.`, `1e-3`) as its digits and
/// the power of ten they are scaled by.
fn decimal(text: &str) -> Option<(u128, i64)> {
    let text = text.strip_prefix('+').unwrap_or(text);
    let (digits, exponent) = match text.find(['e', 'E']) {
        Some(at) => (&text[..at], text[at + 1..].parse::<i64>().ok()?),
        None => (text, 0),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    if !whole
        .bytes()
        .chain(fraction.bytes())
        .all(|b| b.is_ascii_digit())
    {
        return None;
    }
    // Trailing zeros of the fraction change nothing and may not fit.
    let fraction = fraction.trim_end_matches('0');
    let mut mantissa: u128 = 0;
    for b in whole.bytes().chain(fraction.bytes()) {
        mantissa = mantissa
            .checked_mul(10)?
            .checked_add(u128::from(b - b'0'))?;
    }
    let fraction_len = i64::try_from(fraction.len()).ok()?;
    Some((mantissa, exponent.checked_sub(fraction_len)?))
}

/// A `ports` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(default)]
    pub name: String,
    pub container_port: u16,
    #[serde(default)]
    pub host_port: u16,
    #[serde(default = "tcp")]
    pub protocol: String,
}

fn tcp() -> String {
    "TCP".to_owned()
}

/// A port given by number or by the name of one of the container's ports.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

/// A readiness or liveness probe, with the API server's defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    pub http_get: Option<HttpGetAction>,
    pub tcp_socket: Option<TcpSocketAction>,
    pub exec: Option<ExecAction>,
    #[serde(default)]
    pub initial_delay_seconds: u64,
    #[serde(default = "ten")]
    pub period_seconds: u64,
    #[serde(default = "one")]
    pub timeout_seconds: u64,
    #[serde(default = "three")]
    pub failure_threshold: u32,
    #[serde(default = "one_u32")]
    pub success_threshold: u32,
}

fn ten() -> u64 {
    10
}
fn one() -> u64 {
    1
}
fn three() -> u32 {
    3
}
fn one_u32() -> u32 {
    1
}

/// An exec probe: the command runs in the container (ExecSync) and
/// passes when it exits 0.
#[derive(Debug, Clone, Deserialize)]
pub struct ExecAction {
    #[serde(default)]
    pub command: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpGetAction {
    #[serde(default = "root_path")]
    pub path: String,
    pub port: PortRef,
    /// Only HTTP (play has no TLS client for probes).
    pub scheme: Option<String>,
}

fn root_path() -> String {
    "/".to_owned()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpSocketAction {
    pub port: PortRef,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvVar {
    pub name: String,
    pub value: Option<String>,
    value_from: Option<IgnoredAny>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMount {
    pub name: String,
    pub mount_path: String,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Volume {
    pub name: String,
    pub host_path: Option<HostPath>,
    pub empty_dir: Option<IgnoredAny>,
    /// Every other source (`configMap`, `secret`...), to name it in errors.
    #[serde(flatten)]
    other: BTreeMap<String, IgnoredAny>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HostPath {
    pub path: String,
    #[serde(rename = "type", default)]
    pub kind: HostPathType,
}

/// `hostPath.type`: what must be at the path, and whether to create it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum HostPathType {
    /// No check (`type` unset or `""`).
    #[default]
    #[serde(rename = "")]
    Unchecked,
    DirectoryOrCreate,
    Directory,
    FileOrCreate,
    File,
    Socket,
    CharDevice,
    BlockDevice,
}

/// `spec.restartPolicy`, applied to every container of the pod.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum RestartPolicy {
    #[default]
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    /// Whether a container that exited with `exit_code` is started again.
    pub fn restarts(self, exit_code: i32) -> bool {
        match self {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => exit_code != 0,
            RestartPolicy::Never => false,
        }
    }
}

impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl Pod {
    /// Reads and checks the manifest at `path`.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {path:?}"))?;
        Self::parse(&text).with_context(|| format!("manifest {path:?}"))
    }

    /// Parses and checks a manifest.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let kind: Kind = serde_yaml_ng::from_str(text)?;
        match kind.kind.as_deref() {
            Some("Pod") => {}
            Some(kind) => bail!("kind is {kind:?}: play runs only `kind: Pod`"),
            None => bail!("no `kind`: play runs only `kind: Pod`"),
        }
        let doc: Document = serde_yaml_ng::from_str(text)?;
        let Some(spec) = doc.spec else {
            bail!("the pod has no `spec`");
        };
        let Metadata {
            name,
            namespace,
            labels,
            annotations,
        } = doc.metadata;
        if name.is_empty() {
            bail!("metadata.name is missing (play does not support generateName)");
        }
        let pod = Pod {
            name,
            namespace: namespace
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
            labels,
            annotations,
            spec,
        };
        pod.check()?;
        Ok(pod)
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.spec.containers.is_empty() {
            bail!("spec.containers is empty");
        }
        let volumes: BTreeMap<&str, &Volume> = self
            .spec
            .volumes
            .iter()
            .map(|v| (v.name.as_str(), v))
            .collect();
        let mut names = BTreeSet::new();
        for c in &self.spec.containers {
            if c.name.is_empty() {
                bail!("a container has no name");
            }
            if !names.insert(c.name.as_str()) {
                bail!("two containers are named {:?}", c.name);
            }
            if c.image.is_empty() {
                bail!("container {:?} has no image", c.name);
            }
            for var in &c.env {
                if var.value_from.is_some() {
                    bail!(
                        "container {:?}: env {}: valueFrom is not supported by play (there is no API server to read it from); give a literal value",
                        c.name,
                        var.name
                    );
                }
            }
            for (kind, probe) in [
                ("readinessProbe", &c.readiness_probe),
                ("livenessProbe", &c.liveness_probe),
            ] {
                if let Some(probe) = probe {
                    c.check_probe(kind, probe)?;
                }
            }
            for m in &c.volume_mounts {
                if !m.mount_path.starts_with('/') {
                    bail!(
                        "container {:?}: mountPath {:?} is not absolute",
                        c.name,
                        m.mount_path
                    );
                }
                let Some(volume) = volumes.get(m.name.as_str()) else {
                    bail!(
                        "container {:?} mounts volume {:?}, which spec.volumes does not declare",
                        c.name,
                        m.name
                    );
                };
                volume.check()?;
            }
        }
        Ok(())
    }

    /// The host directory or file behind every volume a container mounts:
    /// `hostPath` volumes are their path (checked, or created, as their
    /// `type` says); `emptyDir` volumes are new directories under
    /// `empty_dirs`, which lives as long as the pod.
    pub fn resolve_volumes(&self, empty_dirs: &Path) -> anyhow::Result<BTreeMap<String, PathBuf>> {
        let mounted: BTreeSet<&str> = self
            .spec
            .containers
            .iter()
            .flat_map(|c| c.volume_mounts.iter().map(|m| m.name.as_str()))
            .collect();
        let mut out = BTreeMap::new();
        for volume in self
            .spec
            .volumes
            .iter()
            .filter(|v| mounted.contains(v.name.as_str()))
        {
            volume.check()?;
            let path = match &volume.host_path {
                Some(host) => {
                    let path = PathBuf::from(&host.path);
                    host.kind
                        .prepare(&path)
                        .with_context(|| format!("volume {:?}: hostPath {path:?}", volume.name))?;
                    path
                }
                None => {
                    let path = empty_dirs.join(&volume.name);
                    std::fs::create_dir_all(&path).with_context(|| {
                        format!("volume {:?}: creating the emptyDir {path:?}", volume.name)
                    })?;
                    path
                }
            };
            out.insert(volume.name.clone(), path);
        }
        Ok(out)
    }
}

impl Container {
    /// The environment as the kubelet passes it: in manifest order, each
    /// value with `$(VAR)` references to the variables before it expanded.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::with_capacity(self.env.len());
        for var in &self.env {
            let value = expand(var.value.as_deref().unwrap_or(""), &out);
            out.push((var.name.clone(), value));
        }
        out
    }

    /// `command` and `args` with `$(VAR)` references to the container's
    /// environment expanded, as the kubelet does.
    pub fn command_and_args(&self) -> (Vec<String>, Vec<String>) {
        let env = self.env();
        let expand_all = |words: &[String]| words.iter().map(|w| expand(w, &env)).collect();
        (expand_all(&self.command), expand_all(&self.args))
    }
}

impl Container {
    /// The port number `port` names for this container.
    pub fn port_number(&self, port: &PortRef) -> Option<u16> {
        match port {
            PortRef::Number(n) => Some(*n),
            PortRef::Name(name) => self
                .ports
                .iter()
                .find(|p| p.name == *name)
                .map(|p| p.container_port),
        }
    }

    fn check_probe(&self, kind: &str, probe: &Probe) -> anyhow::Result<()> {
        if let Some(exec) = &probe.exec {
            if probe.http_get.is_some() || probe.tcp_socket.is_some() {
                bail!("container {:?}: {kind}: a probe has one action", self.name);
            }
            if exec.command.is_empty() {
                bail!(
                    "container {:?}: {kind}: an exec probe needs a command",
                    self.name
                );
            }
            return Ok(());
        }
        let port = match (&probe.http_get, &probe.tcp_socket) {
            (Some(get), None) => {
                if get
                    .scheme
                    .as_deref()
                    .is_some_and(|s| !s.eq_ignore_ascii_case("http"))
                {
                    bail!(
                        "container {:?}: {kind}: play probes only over HTTP, not {:?}",
                        self.name,
                        get.scheme
                    );
                }
                &get.port
            }
            (None, Some(tcp)) => &tcp.port,
            _ => bail!(
                "container {:?}: {kind}: play runs exec, httpGet and tcpSocket probes",
                self.name
            ),
        };
        if self.port_number(port).is_none() {
            bail!(
                "container {:?}: {kind}: port {port:?} is not one of the container's ports",
                self.name
            );
        }
        Ok(())
    }
}

impl Volume {
    fn check(&self) -> anyhow::Result<()> {
        if self.host_path.is_some() || self.empty_dir.is_some() {
            if let Some(host) = &self.host_path
                && !host.path.starts_with('/')
            {
                bail!(
                    "volume {:?}: hostPath path {:?} is not absolute",
                    self.name,
                    host.path
                );
            }
            return Ok(());
        }
        match self.other.keys().next() {
            Some(source) => bail!(
                "volume {:?} is a {source} volume: play supports only hostPath and emptyDir volumes",
                self.name
            ),
            None => bail!(
                "volume {:?} has no source (hostPath or emptyDir)",
                self.name
            ),
        }
    }
}

impl HostPathType {
    /// Checks what is at `path` and creates it for the `...OrCreate` types,
    /// as the kubelet does before starting the pod.
    fn prepare(self, path: &Path) -> anyhow::Result<()> {
        match self {
            HostPathType::Unchecked => return Ok(()),
            HostPathType::DirectoryOrCreate => {
                return std::fs::create_dir_all(path)
                    .context("creating it (type DirectoryOrCreate)");
            }
            HostPathType::FileOrCreate if !path.exists() => {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)
                        .with_context(|| format!("creating {parent:?}"))?;
                }
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .context("creating it (type FileOrCreate)")?;
                return Ok(());
            }
            _ => {}
        }
        let meta = std::fs::metadata(path)
            .with_context(|| format!("type {self:?}: nothing usable there"))?;
        let t = meta.file_type();
        let ok = match self {
            HostPathType::Directory => t.is_dir(),
            HostPathType::File | HostPathType::FileOrCreate => t.is_file(),
            HostPathType::Socket => t.is_socket(),
            HostPathType::CharDevice => t.is_char_device(),
            HostPathType::BlockDevice => t.is_block_device(),
            HostPathType::Unchecked | HostPathType::DirectoryOrCreate => true,
        };
        if !ok {
            bail!("type {self:?}: something else is there");
        }
        Ok(())
    }
}

/// Expands `$(NAME)` references to variables of `env` (the last definition
/// wins) the way the kubelet does: `$$` is a literal `$`, and a reference
/// to an undefined variable or an unclosed `$(` is kept as written.
fn expand(input: &str, env: &[(String, String)]) -> String {
    let lookup = |name: &str| {
        env.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(reference) = after.strip_prefix('(')
            && let Some(close) = reference.find(')')
        {
            let name = &reference[..close];
            match lookup(name) {
                Some(value) => out.push_str(value),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &reference[close + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "
kind: Pod
metadata:
  name: p
spec:
  containers:
    - name: c
      image: example.com/c:v1
";

    fn parse_err(text: &str) -> String {
        format!("{:#}", Pod::parse(text).unwrap_err())
    }

    #[test]
    fn probes_need_an_http_or_tcp_action_on_a_declared_port() {
        let pod = |probe: &str| {
            format!(
                "kind: Pod\nmetadata: {{name: p}}\nspec:\n  containers:\n    - name: c\n      image: i\n      ports: [{{name: http, containerPort: 8080}}]\n      readinessProbe: {probe}\n"
            )
        };
        let ok = Pod::parse(&pod("{httpGet: {path: /healthz, port: http}}")).unwrap();
        let c = &ok.spec.containers[0];
        let probe = c.readiness_probe.as_ref().unwrap();
        assert_eq!(
            (
                probe.period_seconds,
                probe.timeout_seconds,
                probe.failure_threshold
            ),
            (10, 1, 3)
        );
        assert_eq!(
            c.port_number(&probe.http_get.as_ref().unwrap().port),
            Some(8080)
        );
        Pod::parse(&pod("{tcpSocket: {port: 8080}}")).unwrap();
        let exec = Pod::parse(&pod("{exec: {command: [probe.wasm, ok]}}")).unwrap();
        let exec = exec.spec.containers[0].readiness_probe.clone().unwrap();
        assert_eq!(exec.exec.unwrap().command, vec!["probe.wasm", "ok"]);
        assert!(parse_err(&pod("{exec: {command: []}}")).contains("needs a command"));
        assert!(
            parse_err(&pod("{httpGet: {port: admin}}"))
                .contains("not one of the container's ports")
        );
        assert!(parse_err(&pod("{httpGet: {port: 1, scheme: HTTPS}}")).contains("only over HTTP"));
    }

    #[test]
    fn defaults_are_the_api_servers() {
        let pod = Pod::parse(MINIMAL).unwrap();
        assert_eq!(pod.namespace, "default");
        assert_eq!(pod.spec.restart_policy, RestartPolicy::Always);
        assert_eq!(pod.spec.grace_period_seconds(), 30);
        assert_eq!(pod.spec.runtime_class_name, None);
        assert!(pod.labels.is_empty());
    }

    #[test]
    fn keys_without_a_value_are_empty() {
        let text = "kind: Pod\nmetadata:\n  name: p\n  labels:\nspec:\n  volumes:\n  containers:\n    - name: c\n      image: i\n      args:\n      env:\n";
        let pod = Pod::parse(text).unwrap();
        assert!(pod.labels.is_empty());
        assert!(pod.spec.volumes.is_empty());
        assert!(pod.spec.containers[0].args.is_empty());
    }

    #[test]
    fn reads_the_fields_play_uses_and_ignores_the_rest() {
        let pod = Pod::parse(
            "
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: team
  labels: {app: web}
  annotations: {note: hi}
  uid: ignored
spec:
  restartPolicy: OnFailure
  runtimeClassName: wasm
  terminationGracePeriodSeconds: 5
  nodeSelector: {x: y}
  containers:
    - name: main
      image: example.com/web:v1
      imagePullPolicy: IfNotPresent
      command: [/app.wasm]
      args: [--port, '8080']
      workingDir: /srv
      env:
        - {name: A, value: '1'}
        - {name: EMPTY}
      volumeMounts:
        - {name: data, mountPath: /data, readOnly: true}
  volumes:
    - name: data
      emptyDir: {}
",
        )
        .unwrap();
        assert_eq!((pod.name.as_str(), pod.namespace.as_str()), ("web", "team"));
        assert_eq!(pod.labels["app"], "web");
        assert_eq!(pod.annotations["note"], "hi");
        assert_eq!(pod.spec.restart_policy, RestartPolicy::OnFailure);
        assert_eq!(pod.spec.runtime_class_name.as_deref(), Some("wasm"));
        assert_eq!(pod.spec.grace_period_seconds(), 5);
        let c = &pod.spec.containers[0];
        assert_eq!(c.command, ["/app.wasm"]);
        assert_eq!(c.args, ["--port", "8080"]);
        assert_eq!(c.working_dir.as_deref(), Some("/srv"));
        assert_eq!(
            c.env(),
            [("A".into(), "1".into()), ("EMPTY".into(), String::new())]
        );
        assert!(c.volume_mounts[0].read_only);
    }

    #[test]
    fn restart_policies() {
        for (text, policy) in [
            ("Always", RestartPolicy::Always),
            ("OnFailure", RestartPolicy::OnFailure),
            ("Never", RestartPolicy::Never),
        ] {
            let pod = Pod::parse(&format!("{MINIMAL}  restartPolicy: {text}\n")).unwrap();
            assert_eq!(pod.spec.restart_policy, policy);
        }
        assert!(RestartPolicy::Always.restarts(0));
        assert!(RestartPolicy::OnFailure.restarts(1));
        assert!(!RestartPolicy::OnFailure.restarts(0));
        assert!(!RestartPolicy::Never.restarts(1));
        assert!(Pod::parse(&format!("{MINIMAL}  restartPolicy: Sometimes\n")).is_err());
    }

    #[test]
    fn only_pods_are_played() {
        let err = parse_err(&MINIMAL.replace("kind: Pod", "kind: Deployment"));
        assert!(
            err.contains("\"Deployment\"") && err.contains("only `kind: Pod`"),
            "{err}"
        );
        let err = parse_err(&MINIMAL.replace("kind: Pod", ""));
        assert!(err.contains("no `kind`"), "{err}");
        let deployment =
            "kind: Deployment\nspec: {replicas: 2, template: {spec: {containers: x}}}\n";
        assert!(parse_err(deployment).contains("\"Deployment\""));
    }

    #[test]
    fn value_from_is_rejected_by_name() {
        let err = parse_err(&format!(
            "{MINIMAL}      env:\n        - name: POD_IP\n          valueFrom:\n            fieldRef: {{fieldPath: status.podIP}}\n"
        ));
        assert!(
            err.contains("POD_IP") && err.contains("valueFrom is not supported by play"),
            "{err}"
        );
    }

    #[test]
    fn mounts_must_name_a_supported_volume() {
        let mount = "      volumeMounts:\n        - {name: cfg, mountPath: /etc/cfg}\n";
        let err = parse_err(&format!("{MINIMAL}{mount}"));
        assert!(err.contains("does not declare"), "{err}");
        let err = parse_err(&format!(
            "{MINIMAL}{mount}  volumes:\n    - name: cfg\n      configMap: {{name: cfg}}\n"
        ));
        assert!(
            err.contains("configMap volume") && err.contains("hostPath and emptyDir"),
            "{err}"
        );
        let err = parse_err(&format!(
            "{MINIMAL}{mount}  volumes:\n    - name: cfg\n      hostPath: {{path: relative}}\n"
        ));
        assert!(err.contains("not absolute"), "{err}");
        // A volume nobody mounts is not looked at.
        Pod::parse(&format!(
            "{MINIMAL}  volumes:\n    - name: cfg\n      secret: {{}}\n"
        ))
        .unwrap();
    }

    #[test]
    fn containers_need_unique_names_and_an_image() {
        let twice = format!("{MINIMAL}    - name: c\n      image: x\n");
        assert!(parse_err(&twice).contains("two containers"));
        let no_image = MINIMAL.replace("      image: example.com/c:v1\n", "");
        assert!(parse_err(&no_image).contains("has no image"));
        let none = "kind: Pod\nmetadata: {name: p}\nspec: {containers: []}\n";
        assert!(parse_err(none).contains("empty"));
    }

    #[test]
    fn volumes_resolve_to_host_paths() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("made/by/play");
        let file = dir.path().join("file.txt");
        let missing = dir.path().join("missing");
        let pod = |volumes: String| {
            let text = format!(
                "{MINIMAL}      volumeMounts:\n        - {{name: v, mountPath: /v}}\n  volumes:\n{volumes}"
            );
            Pod::parse(&text).unwrap()
        };
        let host_path = |path: &Path, kind: &str| {
            format!(
                "    - name: v\n      hostPath: {{path: {}, type: {kind}}}\n",
                path.display()
            )
        };
        let empty_dirs = dir.path().join("empty");

        let resolved = pod(host_path(&host, "DirectoryOrCreate"))
            .resolve_volumes(&empty_dirs)
            .unwrap();
        assert_eq!(resolved["v"], host);
        assert!(host.is_dir());

        let resolved = pod(host_path(&file, "FileOrCreate"))
            .resolve_volumes(&empty_dirs)
            .unwrap();
        assert_eq!(resolved["v"], file);
        assert!(file.is_file());

        pod(host_path(&host, "Directory"))
            .resolve_volumes(&empty_dirs)
            .unwrap();
        pod(host_path(&file, "File"))
            .resolve_volumes(&empty_dirs)
            .unwrap();
        pod(host_path(&missing, "\"\""))
            .resolve_volumes(&empty_dirs)
            .unwrap();
        for (path, kind) in [
            (&missing, "Directory"),
            (&file, "Directory"),
            (&host, "File"),
            (&file, "Socket"),
        ] {
            let err = pod(host_path(path, kind))
                .resolve_volumes(&empty_dirs)
                .unwrap_err();
            assert!(
                format!("{err:#}").contains(&format!("type {kind}")),
                "{kind} {path:?}: {err:#}"
            );
        }
        assert!(!missing.exists());

        let resolved = pod("    - name: v\n      emptyDir: {}\n".into())
            .resolve_volumes(&empty_dirs)
            .unwrap();
        assert_eq!(resolved["v"], empty_dirs.join("v"));
        assert!(empty_dirs.join("v").is_dir());
    }

    #[test]
    fn references_expand_like_the_kubelets() {
        let env = [
            ("A".to_owned(), "1".to_owned()),
            ("B".to_owned(), "x$(A)".to_owned()),
        ];
        assert_eq!(expand("$(A)-$(B)", &env), "1-x$(A)");
        assert_eq!(expand("$$(A) $$ $", &env), "$(A) $ $");
        assert_eq!(expand("$(NOPE) $(A", &env), "$(NOPE) $(A");
        assert_eq!(expand("a$b", &env), "a$b");
        let pod = Pod::parse(&format!(
            "{MINIMAL}      args: ['$(GREETING), $(WHO)']\n      env:\n        - {{name: WHO, value: world}}\n        - {{name: GREETING, value: 'hello $(WHO)'}}\n"
        ))
        .unwrap();
        let (_, args) = pod.spec.containers[0].command_and_args();
        assert_eq!(args, ["hello world, world"]);
    }
}

/// Property tests: a Pod manifest is untrusted input; whatever it holds,
/// parsing answers with a pod or an error, never a panic.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    /// A YAML scalar that may need quoting, and sometimes is not one.
    fn scalar() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9-]{0,12}",
            ".{0,40}",
            Just(String::new()),
            Just("~".to_owned()),
            Just("null".to_owned()),
            Just("[]".to_owned()),
            Just("{a: b}".to_owned()),
            Just("1e400".to_owned()),
            Just("-1".to_owned()),
            Just("99999999999999999999".to_owned()),
        ]
    }

    /// A manifest shaped like a pod, with arbitrary values where its
    /// fields go, some of them of the wrong type.
    fn pod_like() -> impl Strategy<Value = String> {
        (
            scalar(),
            scalar(),
            proptest::collection::vec((scalar(), scalar(), scalar(), scalar(), scalar()), 0..4),
            scalar(),
        )
            .prop_map(|(kind, name, containers, restart)| {
                let mut yaml = format!(
                    "kind: {}\nmetadata:\n  name: {}\nspec:\n  restartPolicy: {}\n  containers:\n",
                    quoted(&kind),
                    quoted(&name),
                    quoted(&restart)
                );
                for (cname, image, port, memory, mount) in containers {
                    yaml.push_str(&format!(
                        "    - name: {}\n      image: {}\n      ports: [{{containerPort: {}}}]\n      resources: {{limits: {{memory: {}, cpu: {}}}}}\n      volumeMounts: [{{name: v, mountPath: {}}}]\n",
                        quoted(&cname),
                        quoted(&image),
                        port,
                        quoted(&memory),
                        quoted(&memory),
                        quoted(&mount)
                    ));
                }
                yaml
            })
    }

    /// `s` as a double-quoted YAML string.
    fn quoted(s: &str) -> String {
        serde_json::to_string(s).expect("a string serializes")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_text_parses_or_fails_cleanly(text in ".{0,400}") {
            let _ = Pod::parse(&text);
        }

        #[test]
        fn any_pod_shaped_manifest_parses_or_fails_cleanly(yaml in pod_like()) {
            if let Ok(pod) = Pod::parse(&yaml) {
                // What parsed was checked: named, with named containers.
                prop_assert!(!pod.name.is_empty());
                prop_assert!(!pod.spec.containers.is_empty());
                prop_assert!(pod.spec.containers.iter().all(|c| !c.name.is_empty() && !c.image.is_empty()));
            }
        }

        #[test]
        fn quantities_never_panic_and_scale_as_the_kubelet_reads_them(
            n in 0u64..(1 << 40),
            text in ".{0,24}",
            scale in prop_oneof![Just(1u64), Just(1000)],
        ) {
            let _ = quantity(&serde_yaml_ng::Value::String(text), scale);
            prop_assert_eq!(
                quantity(&serde_yaml_ng::Value::String(format!("{n}Mi")), 1),
                Some(n * 1024 * 1024)
            );
            prop_assert_eq!(
                quantity(&serde_yaml_ng::Value::String(format!("{n}m")), 1000),
                Some(n)
            );
            prop_assert_eq!(
                quantity(&serde_yaml_ng::Value::String(format!("{}.{:03}", n / 1000, n % 1000)), 1000),
                Some(n)
            );
        }

        #[test]
        fn dollars_escaped_as_the_kubelet_escapes_them_come_back_verbatim(
            text in ".{0,60}",
            env in proptest::collection::vec(("[A-Z]{1,3}", ".{0,8}"), 0..4),
        ) {
            let escaped = text.replace('$', "$$");
            prop_assert_eq!(expand(&escaped, &env), text);
        }
    }
}
