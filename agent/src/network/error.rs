//! Why a pod network could not be found, set up, joined or torn down.
//!
//! Errors are `Clone` (a sandbox run is shared by retried calls), so I/O
//! causes are kept behind an `Arc`.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A CNI verb, as `CNI_COMMAND` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CniCommand {
    Add,
    Del,
}

impl CniCommand {
    pub fn as_str(self) -> &'static str {
        match self {
            CniCommand::Add => "ADD",
            CniCommand::Del => "DEL",
        }
    }
}

impl std::fmt::Display for CniCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the pod network failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum NetworkError {
    /// The node has no CNI configuration: pods get no network, and the
    /// node's network is reported not ready.
    #[error("no CNI network configuration in {}", dir.display())]
    NotConfigured { dir: PathBuf },

    /// The CNI configuration directory cannot be read.
    #[error("reading CNI config directory {dir:?}: {source}")]
    ConfigDir {
        dir: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },

    /// A CNI configuration file that cannot be used.
    #[error("CNI configuration {}: {reason}", path.display())]
    BadConfig { path: PathBuf, reason: String },

    /// A plugin of network `network` failed.
    #[error("network {network:?}: {source}")]
    Plugin {
        network: String,
        #[source]
        source: PluginError,
    },

    /// The pod's namespace could not be created (nothing is left behind).
    #[error("setting up the pod's network namespace: {source}")]
    CreateNamespace {
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },

    /// The pod's namespace could not be unpinned.
    #[error("tearing down the pod's network namespace: {source}")]
    RemoveNamespace {
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },

    /// A pod's recorded namespace is the host's: CNI DEL is not run there.
    #[error(
        "{} is the host's network namespace: refusing to run CNI DEL in it",
        path.display()
    )]
    DelInHostNamespace { path: PathBuf },

    /// A joined sandbox names the host's namespace as its pod's.
    #[error("{} is the host's network namespace, not a pod's", path.display())]
    JoinHostNamespace { path: PathBuf },

    /// A pod's namespace pinned by an earlier agent is no longer there.
    #[error("the pod's network namespace {} is gone: {source}", path.display())]
    NamespaceGone {
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },

    /// The namespace of another runtime's pod cannot be opened.
    #[error("cannot open the pod's network namespace {}: {source}", path.display())]
    OpenNamespace {
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },

    /// The calling thread could not switch into the pod's namespace.
    #[error("cannot enter the pod's network namespace {}: {source}", path.display())]
    EnterNamespace {
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },

    /// A port-forward connection inside the pod's network failed.
    #[error("connecting to port {port} in pod sandbox {sandbox}: {source}")]
    Connect {
        sandbox: String,
        port: u16,
        #[source]
        source: Arc<io::Error>,
    },
}

/// How one CNI plugin run failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum PluginError {
    /// No binary of the plugin's type in the CNI bin directories.
    #[error("CNI plugin {plugin:?} is not installed in {bin_dirs}")]
    NotInstalled { plugin: String, bin_dirs: String },

    /// The plugin reported a CNI error (`{"code", "msg", "details"}`).
    #[error(
        "CNI plugin {plugin} {command} failed (code {code}): {msg}{}",
        if details.is_empty() { String::new() } else { format!(" ({details})") }
    )]
    Failed {
        plugin: String,
        command: CniCommand,
        code: u64,
        msg: String,
        details: String,
    },

    /// The plugin failed without a CNI error: what it wrote.
    #[error("CNI plugin {plugin} {command} failed: {output}")]
    FailedWithOutput {
        plugin: String,
        command: CniCommand,
        output: String,
    },

    /// The plugin ran past its time and was killed.
    #[error("CNI plugin {plugin} {command} timed out after {timeout:?}")]
    TimedOut {
        plugin: String,
        command: CniCommand,
        timeout: Duration,
    },

    /// The plugin could not be started, fed or waited for.
    #[error("{action} CNI plugin {plugin} ({command}): {source}")]
    Exec {
        plugin: String,
        command: CniCommand,
        action: &'static str,
        #[source]
        source: Arc<io::Error>,
    },

    /// ADD succeeded without printing a result.
    #[error("CNI plugin {plugin} ADD printed no JSON result ({detail}): {output}")]
    NoResult {
        plugin: String,
        detail: String,
        output: String,
    },
}
