//! The daemon's settings: embedded defaults, overridden by a TOML file
//! (`--config`), overridden by flags.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;
use wasmlet_agent::registry::RegistryConfig;
use wasmlet_proto::cri::CgroupDriver;

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
        std::fs::write(&path, "socket = \"/a.sock\"\nroot = \"/a\"\nruntime_handlers = [\"spin\"]\ncgroup_driver = \"cgroupfs\"\n[registry]\ninsecure = [\"127.0.0.1:5000\"]\n").unwrap();
        let s = Settings::resolve(Some(&path), Some("/b.sock".into()), None).unwrap();
        assert_eq!(s.socket, PathBuf::from("/b.sock"));
        assert_eq!(s.root, PathBuf::from("/a"));
        assert_eq!(s.runtime_handlers, vec!["spin"]);
        assert_eq!(s.cgroup_driver, CgroupDriver::Cgroupfs);
        assert_eq!(s.registry.insecure, vec!["127.0.0.1:5000"]);
        let s = Settings::resolve(None, None, None).unwrap();
        assert_eq!(s.runtime_handlers, vec!["wasm", "wasmtime"]);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "sockt = \"/typo\"\n").unwrap();
        assert!(Settings::resolve(Some(&path), None, None).is_err());
        std::fs::write(&path, "cgroup_driver = \"lxc\"\n").unwrap();
        assert!(Settings::resolve(Some(&path), None, None).is_err());
    }
}
