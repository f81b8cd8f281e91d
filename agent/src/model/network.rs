//! What the store keeps of a pod's network: the CNI configuration ADD ran
//! with and what it returned, its hostPort mappings, and its DNS settings.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How a pod is networked, kept in its sandbox record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PodNetwork {
    pub netns: PathBuf,
    /// The configuration ADD ran with (DEL runs with the same).
    pub list: NetworkList,
    /// The last plugin's ADD result.
    pub result: serde_json::Value,
    /// The pod's addresses, primary first.
    pub ips: Vec<String>,
    pub args: BTreeMap<String, String>,
    pub port_mappings: Vec<PortMapping>,
    /// Set once DEL succeeded and the namespace is gone.
    #[serde(default)]
    pub torn_down: bool,
}

/// A network configuration list (a `.conflist`, or a single `.conf` made
/// into a list of one), exactly as it was used for ADD, so that DEL runs
/// with the same one even if the file changed since.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NetworkList {
    pub name: String,
    pub cni_version: String,
    pub plugins: Vec<Value>,
    /// The file it came from.
    pub source: PathBuf,
}

/// A hostPort mapping, as the `portMappings` capability carries it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    #[serde(rename = "hostPort")]
    pub host_port: u16,
    #[serde(rename = "containerPort")]
    pub container_port: u16,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: String,
    #[serde(rename = "hostIP", default, skip_serializing_if = "String::is_empty")]
    pub host_ip: String,
}

/// The sandbox's DNS settings (CRI `DNSConfig`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsSettings {
    pub servers: Vec<String>,
    pub searches: Vec<String>,
    /// resolv.conf options: `ndots:N`, `timeout:N`, `attempts:N` are used.
    pub options: Vec<String>,
    /// The container's `/etc/hosts` (the kubelet's, with the pod's own
    /// name and its `hostAliases`), read before asking the servers. Set per
    /// container from its mounts, never stored with the sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts_file: Option<std::path::PathBuf>,
}
