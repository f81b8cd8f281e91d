//! The runtime side of CNI (the Container Network Interface, spec 1.0 and
//! the 0.3/0.4 versions plugins still speak): finding the network
//! configuration, and running its plugins with ADD and DEL for a pod.
//!
//! There is no maintained Rust crate for this side of CNI (the crates on
//! crates.io write plugins), so this follows the spec directly: each plugin
//! of a configuration list is executed in order with the `CNI_*`
//! environment and its configuration on stdin, the previous plugin's result
//! injected as `prevResult`, and capability arguments (`portMappings`)
//! under `runtimeConfig`; DEL runs them in reverse with the ADD result.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use super::error::{CniCommand, NetworkError, PluginError};
use crate::model::network::{NetworkList, PortMapping};

/// How long one plugin may run before it is killed.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the network configuration and the plugins are.
#[derive(Clone, Debug)]
pub struct CniPaths {
    pub conf_dir: PathBuf,
    pub bin_dirs: Vec<PathBuf>,
}

impl NetworkList {
    /// The first valid configuration in `dir`, by file name, as libcni
    /// chooses it: `*.conflist`, `*.conf` and `*.json`. `Ok(None)` when there
    /// is none; files that do not parse are skipped with a warning.
    pub fn load_first(dir: &Path) -> Result<Option<Self>, NetworkError> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(NetworkError::ConfigDir {
                    dir: dir.to_owned(),
                    source: Arc::new(e),
                });
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conflist" | "conf" | "json")
                )
            })
            .collect();
        files.sort();
        for file in files {
            match Self::parse_file(&file) {
                Ok(list) => return Ok(Some(list)),
                Err(error) => tracing::warn!(file = %file.display(), %error, "skipping CNI config"),
            }
        }
        Ok(None)
    }

    fn parse_file(path: &Path) -> Result<Self, NetworkError> {
        let bad = |reason: String| NetworkError::BadConfig {
            path: path.to_owned(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| bad(format!("reading: {e}")))?;
        let value: Value =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
        Self::parse(value, path)
    }

    fn parse(value: Value, source: &Path) -> Result<Self, NetworkError> {
        let bad = |reason: &str| NetworkError::BadConfig {
            path: source.to_owned(),
            reason: reason.to_owned(),
        };
        let text = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
        let name = text(&value, "name").ok_or_else(|| bad("no \"name\""))?;
        let cni_version = text(&value, "cniVersion").unwrap_or_else(|| "0.4.0".to_owned());
        let plugins = match value.get("plugins") {
            Some(Value::Array(plugins)) => plugins.clone(),
            Some(_) => return Err(bad("\"plugins\" is not a list")),
            // A single network configuration (.conf).
            None => vec![value.clone()],
        };
        if plugins.is_empty() {
            return Err(bad("no plugins"));
        }
        for p in &plugins {
            if text(p, "type").is_none() {
                return Err(bad("a plugin has no \"type\""));
            }
        }
        Ok(Self {
            name,
            cni_version,
            plugins,
            source: source.to_owned(),
        })
    }

    /// The loopback network, brought up in every pod namespace first (as
    /// containerd does) when the `loopback` plugin is installed.
    pub fn loopback() -> Self {
        Self {
            name: "cni-loopback".to_owned(),
            cni_version: "0.3.1".to_owned(),
            plugins: vec![json!({"type": "loopback"})],
            source: PathBuf::new(),
        }
    }
}

/// Who a CNI call is for.
#[derive(Clone, Debug)]
pub struct Attachment {
    /// The sandbox id (`CNI_CONTAINERID`).
    pub container_id: String,
    pub netns: PathBuf,
    pub ifname: String,
    /// `CNI_ARGS` (the Kubernetes `K8S_POD_*` keys).
    pub args: BTreeMap<String, String>,
    pub port_mappings: Vec<PortMapping>,
}

/// Runs plugins.
#[derive(Clone, Debug)]
pub struct Cni {
    paths: CniPaths,
}

impl Cni {
    pub fn new(paths: CniPaths) -> Self {
        Self { paths }
    }

    /// Whether a plugin binary of this type is installed.
    pub fn has_plugin(&self, kind: &str) -> bool {
        self.find(kind).is_some()
    }

    fn find(&self, kind: &str) -> Option<PathBuf> {
        if kind.contains('/') {
            return None;
        }
        self.paths
            .bin_dirs
            .iter()
            .map(|d| d.join(kind))
            .find(|p| p.is_file())
    }

    /// Runs every plugin of `list` with ADD; the result is the last
    /// plugin's. On failure the plugins that ran are undone with DEL.
    pub async fn add(&self, list: &NetworkList, at: &Attachment) -> Result<Value, NetworkError> {
        let mut prev: Option<Value> = None;
        for (n, plugin) in list.plugins.iter().enumerate() {
            let config = self.plugin_config(list, plugin, prev.as_ref(), at);
            match self.exec(CniCommand::Add, plugin, &config, at).await {
                Ok(result) => prev = Some(result),
                Err(e) => {
                    let partial = NetworkList {
                        plugins: list.plugins[..=n].to_vec(),
                        ..list.clone()
                    };
                    if let Err(undo) = self.del(&partial, at, prev.as_ref()).await {
                        tracing::warn!(network = %list.name, error = %undo, "undoing a failed CNI ADD");
                    }
                    return Err(NetworkError::Plugin {
                        network: list.name.clone(),
                        source: e,
                    });
                }
            }
        }
        Ok(prev.unwrap_or(Value::Null))
    }

    /// Runs every plugin of `list` with DEL, in reverse order. Plugins
    /// must treat a DEL of what is already gone as success, so this may be
    /// repeated. Every plugin is run even if one fails; the first error is
    /// returned.
    pub async fn del(
        &self,
        list: &NetworkList,
        at: &Attachment,
        result: Option<&Value>,
    ) -> Result<(), NetworkError> {
        let mut first_error = None;
        for plugin in list.plugins.iter().rev() {
            let config = self.plugin_config(list, plugin, result, at);
            if let Err(e) = self.exec(CniCommand::Del, plugin, &config, at).await {
                first_error.get_or_insert(NetworkError::Plugin {
                    network: list.name.clone(),
                    source: e,
                });
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn plugin_config(
        &self,
        list: &NetworkList,
        plugin: &Value,
        prev: Option<&Value>,
        at: &Attachment,
    ) -> Value {
        let mut config = plugin.clone();
        let Some(obj) = config.as_object_mut() else {
            return config;
        };
        obj.insert("name".into(), json!(list.name));
        obj.insert("cniVersion".into(), json!(list.cni_version));
        if let Some(prev) = prev.filter(|p| !p.is_null()) {
            obj.insert("prevResult".into(), prev.clone());
        }
        let wants_ports = plugin
            .get("capabilities")
            .and_then(|c| c.get("portMappings"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        // A port without a host port needs no mapping.
        let mapped: Vec<_> = at
            .port_mappings
            .iter()
            .filter(|m| m.host_port != 0)
            .collect();
        if wants_ports && !mapped.is_empty() {
            obj.insert("runtimeConfig".into(), json!({ "portMappings": mapped }));
        }
        config
    }

    async fn exec(
        &self,
        command: CniCommand,
        plugin: &Value,
        config: &Value,
        at: &Attachment,
    ) -> Result<Value, PluginError> {
        let kind = plugin.get("type").and_then(Value::as_str).unwrap_or("");
        let binary = self.find(kind).ok_or_else(|| PluginError::NotInstalled {
            plugin: kind.to_owned(),
            bin_dirs: join_paths(&self.paths.bin_dirs),
        })?;
        let failed = |action: &'static str| {
            move |e: std::io::Error| PluginError::Exec {
                plugin: kind.to_owned(),
                command,
                action,
                source: Arc::new(e),
            }
        };
        let args: Vec<String> = at.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut child = tokio::process::Command::new(&binary)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CNI_COMMAND", command.as_str())
            .env("CNI_CONTAINERID", &at.container_id)
            .env("CNI_NETNS", &at.netns)
            .env("CNI_IFNAME", &at.ifname)
            .env("CNI_ARGS", args.join(";"))
            .env("CNI_PATH", join_paths(&self.paths.bin_dirs))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(failed("starting"))?;
        // A `Value` always serializes.
        let input = serde_json::to_vec(config).unwrap_or_default();
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(&input)
                .await
                .map_err(failed("writing to"))?;
        }
        let output = tokio::time::timeout(PLUGIN_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| PluginError::TimedOut {
                plugin: kind.to_owned(),
                command,
                timeout: PLUGIN_TIMEOUT,
            })?
            .map_err(failed("running"))?;
        if !output.status.success() {
            return Err(plugin_error(kind, command, &output.stdout, &output.stderr));
        }
        if command != CniCommand::Add {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&output.stdout).map_err(|e| PluginError::NoResult {
            plugin: kind.to_owned(),
            detail: e.to_string(),
            output: String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        })
    }
}

fn join_paths(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| d.to_string_lossy())
        .collect::<Vec<_>>()
        .join(":")
}

/// The plugin's own error (`{"code", "msg", "details"}` on stdout), else
/// whatever it wrote.
fn plugin_error(kind: &str, command: CniCommand, stdout: &[u8], stderr: &[u8]) -> PluginError {
    if let Ok(e) = serde_json::from_slice::<Value>(stdout) {
        let msg = e.get("msg").and_then(Value::as_str).unwrap_or("");
        let details = e.get("details").and_then(Value::as_str).unwrap_or("");
        let code = e.get("code").and_then(Value::as_u64).unwrap_or(0);
        if !msg.is_empty() {
            return PluginError::Failed {
                plugin: kind.to_owned(),
                command,
                code,
                msg: msg.to_owned(),
                details: details.to_owned(),
            };
        }
    }
    let output = [stdout, stderr]
        .iter()
        .map(|b| String::from_utf8_lossy(b).trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    PluginError::FailedWithOutput {
        plugin: kind.to_owned(),
        command,
        output,
    }
}

/// The pod's addresses in a CNI result (without prefix lengths), IPv4
/// first, as the kubelet wants the primary IP.
pub fn result_ips(result: &Value) -> Vec<String> {
    let mut ips: Vec<String> = result
        .get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.get("address").and_then(Value::as_str))
        .filter_map(|a| a.split('/').next())
        .map(str::to_owned)
        .collect();
    ips.sort_by_key(|ip| ip.contains(':'));
    ips
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_valid_config_by_name_wins() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(NetworkList::load_first(dir.path()).unwrap(), None);
        std::fs::write(dir.path().join("05-broken.conflist"), "{not json").unwrap();
        std::fs::write(dir.path().join("00-readme.txt"), "ignored").unwrap();
        std::fs::write(
            dir.path().join("20-single.conf"),
            r#"{"cniVersion":"1.0.0","name":"single","type":"bridge"}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("10-list.conflist"),
            r#"{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"bridge"},{"type":"portmap","capabilities":{"portMappings":true}}]}"#,
        )
        .unwrap();
        let list = NetworkList::load_first(dir.path()).unwrap().unwrap();
        assert_eq!(list.name, "pods");
        assert_eq!(list.plugins.len(), 2);
        std::fs::remove_file(dir.path().join("10-list.conflist")).unwrap();
        let single = NetworkList::load_first(dir.path()).unwrap().unwrap();
        assert_eq!(single.name, "single");
        assert_eq!(single.plugins[0]["type"], "bridge");
    }

    #[test]
    fn plugin_configs_carry_name_version_prev_result_and_port_mappings() {
        let cni = Cni::new(CniPaths {
            conf_dir: PathBuf::new(),
            bin_dirs: vec![],
        });
        let list = NetworkList::parse(
            json!({"cniVersion":"1.0.0","name":"pods","plugins":[
                {"type":"bridge"},
                {"type":"portmap","capabilities":{"portMappings":true}}]}),
            Path::new("x"),
        )
        .unwrap();
        let at = Attachment {
            container_id: "abc".into(),
            netns: "/run/netns/x".into(),
            ifname: "eth0".into(),
            args: BTreeMap::new(),
            port_mappings: vec![
                PortMapping {
                    host_port: 8080,
                    container_port: 80,
                    protocol: "tcp".into(),
                    host_ip: String::new(),
                },
                // No host port: nothing for portmap to map.
                PortMapping {
                    host_port: 0,
                    container_port: 81,
                    protocol: "tcp".into(),
                    host_ip: String::new(),
                },
            ],
        };
        let prev = json!({"ips":[{"address":"10.1.0.5/24"}]});
        let bridge = cni.plugin_config(&list, &list.plugins[0], None, &at);
        assert_eq!(bridge["name"], "pods");
        assert_eq!(bridge["cniVersion"], "1.0.0");
        assert!(bridge.get("runtimeConfig").is_none());
        assert!(bridge.get("prevResult").is_none());
        let portmap = cni.plugin_config(&list, &list.plugins[1], Some(&prev), &at);
        assert_eq!(portmap["prevResult"], prev);
        assert_eq!(
            portmap["runtimeConfig"]["portMappings"],
            json!([{"hostPort":8080,"containerPort":80,"protocol":"tcp"}])
        );
    }

    #[test]
    fn ips_come_without_prefix_ipv4_first() {
        let result = json!({"ips":[
            {"address":"fd00::5/64"},
            {"address":"10.1.0.5/24","gateway":"10.1.0.1"}]});
        assert_eq!(result_ips(&result), ["10.1.0.5", "fd00::5"]);
        assert!(result_ips(&Value::Null).is_empty());
    }

    #[test]
    fn plugin_errors_are_quoted() {
        let e = plugin_error(
            "bridge",
            CniCommand::Add,
            br#"{"code":7,"msg":"failed to allocate","details":"range full"}"#,
            b"",
        );
        assert!(matches!(e, PluginError::Failed { code: 7, .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "CNI plugin bridge ADD failed (code 7): failed to allocate (range full)"
        );
        assert_eq!(
            plugin_error("x", CniCommand::Del, b"", b"boom\n").to_string(),
            "CNI plugin x DEL failed: boom"
        );
    }
}
