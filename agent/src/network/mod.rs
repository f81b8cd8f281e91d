//! Pod networking: a network namespace per pod, wired by the node's CNI
//! plugins, and the guard that puts a guest's sockets into it.
//!
//! A pod that does not use the host network gets a namespace pinned at
//! `<netns_dir>/wasmlet-<sandbox id>` and the plugins of the first CNI
//! configuration run with ADD; what ADD returned is kept in the sandbox's
//! record, so that DEL can run with it at stop, also after a restart.

pub mod cni;
pub mod dns;
mod error;
pub mod netns;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

pub use cni::CniPaths;
pub use dns::Resolver;
pub use error::{CniCommand, NetworkError, PluginError};
pub use netns::NetNs;

use crate::model::ids::SandboxId;
use crate::model::network::{NetworkList, PodNetwork, PortMapping};

/// Where CNI and the pinned namespaces live.
#[derive(Clone, Debug)]
pub struct NetworkConfig {
    pub cni: CniPaths,
    /// Where pods' namespaces are pinned (`ip netns` uses `/run/netns`).
    pub netns_dir: PathBuf,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            cni: CniPaths {
                conf_dir: PathBuf::from("/etc/cni/net.d"),
                bin_dirs: vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")],
            },
            netns_dir: PathBuf::from("/run/netns"),
        }
    }
}

/// What a pod asks of the network.
#[derive(Clone, Debug, Default)]
pub struct NetworkRequest {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub port_mappings: Vec<PortMapping>,
}

/// Sets up and tears down pod networks; knows the open namespaces.
pub struct Networks {
    config: NetworkConfig,
    cni: cni::Cni,
    open: Mutex<HashMap<SandboxId, Arc<NetNs>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

const NETNS_PREFIX: &str = "wasmlet-";

impl Networks {
    pub fn new(config: NetworkConfig) -> Self {
        Self {
            cni: cni::Cni::new(config.cni.clone()),
            config,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// The CNI configuration pods get now, or why the network is not
    /// ready (what CRI `Status` reports).
    pub fn status(&self) -> Result<NetworkList, NetworkError> {
        let dir = &self.config.cni.conf_dir;
        NetworkList::load_first(dir)?
            .ok_or_else(|| NetworkError::NotConfigured { dir: dir.clone() })
    }

    /// Whether pods get a network: there is a CNI configuration.
    pub fn configured(&self) -> Option<NetworkList> {
        self.status().ok()
    }

    /// Creates the pod's namespace and runs `list`'s plugins in it. Nothing
    /// is left behind on failure.
    pub async fn setup(
        &self,
        id: &SandboxId,
        list: NetworkList,
        request: &NetworkRequest,
    ) -> Result<PodNetwork, NetworkError> {
        let name = format!("{NETNS_PREFIX}{id}");
        let ns = NetNs::create(&self.config.netns_dir, &name).map_err(|e| {
            NetworkError::CreateNamespace {
                path: self.config.netns_dir.join(&name),
                source: Arc::new(e),
            }
        })?;
        let ns = Arc::new(ns);
        let mut args = BTreeMap::new();
        args.insert("IgnoreUnknown".to_owned(), "1".to_owned());
        args.insert("K8S_POD_NAMESPACE".to_owned(), request.namespace.clone());
        args.insert("K8S_POD_NAME".to_owned(), request.name.clone());
        args.insert("K8S_POD_INFRA_CONTAINER_ID".to_owned(), id.to_string());
        args.insert("K8S_POD_UID".to_owned(), request.uid.clone());
        let at = cni::Attachment {
            container_id: id.to_string(),
            netns: ns.path().to_owned(),
            ifname: "eth0".to_owned(),
            args: args.clone(),
            port_mappings: request.port_mappings.clone(),
        };
        let added = async {
            if self.cni.has_plugin("loopback") {
                self.cni.add(&NetworkList::loopback(), &at).await?;
            }
            self.cni.add(&list, &at).await
        }
        .await;
        let result = match added {
            Ok(result) => result,
            Err(e) => {
                drop(ns);
                if let Err(rm) = NetNs::remove(&at.netns) {
                    tracing::warn!(sandbox_id = %id, error = %rm, "removing a pod namespace after a failed setup");
                }
                return Err(e);
            }
        };
        let network = PodNetwork {
            netns: at.netns.clone(),
            ips: cni::result_ips(&result),
            list,
            result,
            args,
            port_mappings: request.port_mappings.clone(),
            torn_down: false,
        };
        lock(&self.open).insert(id.clone(), ns);
        Ok(network)
    }

    /// Runs DEL and removes the namespace. Safe to repeat.
    pub async fn teardown(&self, id: &SandboxId, network: &PodNetwork) -> Result<(), NetworkError> {
        let at = cni::Attachment {
            container_id: id.to_string(),
            netns: network.netns.clone(),
            ifname: "eth0".to_owned(),
            args: network.args.clone(),
            port_mappings: network.port_mappings.clone(),
        };
        if NetNs::open(&network.netns).is_ok_and(|ns| ns.is_host()) {
            return Err(NetworkError::DelInHostNamespace {
                path: network.netns.clone(),
            });
        }
        self.cni
            .del(&network.list, &at, Some(&network.result))
            .await?;
        lock(&self.open).remove(id);
        NetNs::remove(&network.netns).map_err(|e| NetworkError::RemoveNamespace {
            path: network.netns.clone(),
            source: Arc::new(e),
        })
    }

    /// Re-opens a pod's pinned namespace after a restart.
    pub fn adopt(&self, id: &SandboxId, network: &PodNetwork) -> Result<(), NetworkError> {
        let ns = NetNs::open(&network.netns).map_err(|e| NetworkError::NamespaceGone {
            path: network.netns.clone(),
            source: Arc::new(e),
        })?;
        lock(&self.open).insert(id.clone(), Arc::new(ns));
        Ok(())
    }

    /// Opens the namespace of a pod another runtime made, for a joined
    /// sandbox. Refuses the host's own namespace.
    pub fn join(&self, id: &SandboxId, path: &std::path::Path) -> Result<(), NetworkError> {
        let ns = NetNs::open(path).map_err(|e| NetworkError::OpenNamespace {
            path: path.to_owned(),
            source: Arc::new(e),
        })?;
        if ns.is_host() {
            return Err(NetworkError::JoinHostNamespace {
                path: path.to_owned(),
            });
        }
        lock(&self.open).insert(id.clone(), Arc::new(ns));
        Ok(())
    }

    /// Lets go of a joined namespace (which its own runtime removes).
    pub fn forget(&self, id: &SandboxId) {
        lock(&self.open).remove(id);
    }

    /// The pod's open namespace, if it has one.
    pub fn namespace(&self, id: &SandboxId) -> Option<Arc<NetNs>> {
        lock(&self.open).get(id).cloned()
    }

    /// Namespaces pinned by an earlier agent for sandboxes that no longer
    /// exist (it died between creating one and recording it): their
    /// plugins are run with DEL (with today's configuration, the best
    /// there is) and they are removed.
    pub async fn remove_orphans(&self, known: &[SandboxId]) {
        let Ok(entries) = std::fs::read_dir(&self.config.netns_dir) else {
            return;
        };
        let list = self.configured();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_prefix(NETNS_PREFIX) else {
                continue;
            };
            if known.iter().any(|k| k.as_str() == id) {
                continue;
            }
            let path = entry.path();
            match NetNs::open(&path) {
                Ok(ns) if ns.is_host() => {
                    // Never run plugins (DEL would remove eth0) against the
                    // host's namespace, whatever a file claims.
                    tracing::error!(netns = %path.display(), "a pinned pod namespace is the host's own: unpinning it without running CNI");
                    let _ = NetNs::remove(&path);
                    continue;
                }
                Ok(_) => {}
                Err(_) => {
                    // Nothing mounted there (any more): only the file.
                    let _ = NetNs::remove(&path);
                    continue;
                }
            }
            if let Some(list) = &list {
                let at = cni::Attachment {
                    container_id: id.to_owned(),
                    netns: path.clone(),
                    ifname: "eth0".to_owned(),
                    args: BTreeMap::new(),
                    port_mappings: vec![],
                };
                if let Err(error) = self.cni.del(list, &at, None).await {
                    tracing::warn!(netns = %path.display(), %error, "releasing an orphaned pod network");
                }
            }
            match NetNs::remove(&path) {
                Ok(()) => {
                    tracing::info!(netns = %path.display(), "removed an orphaned pod network namespace")
                }
                Err(error) => {
                    tracing::warn!(netns = %path.display(), %error, "removing an orphaned pod network namespace")
                }
            }
        }
    }
}

/// Where a guest's sockets live.
#[derive(Clone, Debug, Default)]
pub enum GuestNetwork {
    /// No network: the guest gets no sockets at all.
    #[default]
    None,
    /// The node's network (a `hostNetwork` pod).
    Host,
    /// Its pod's namespace.
    Pod(Arc<NetNs>),
}

impl GuestNetwork {
    pub fn allows_sockets(&self) -> bool {
        !matches!(self, GuestNetwork::None)
    }
}

/// A future polled inside a network namespace: every socket it creates
/// belongs there.
pub struct InNamespace<F> {
    inner: Pin<Box<F>>,
    ns: Option<Arc<NetNs>>,
}

impl<F> InNamespace<F> {
    pub fn new(inner: F, network: &GuestNetwork) -> Self {
        Self {
            inner: Box::pin(inner),
            ns: match network {
                GuestNetwork::Pod(ns) => Some(ns.clone()),
                _ => None,
            },
        }
    }
}

impl<F: Future> Future for InNamespace<F> {
    /// Fails, ending the guest, if the namespace cannot be entered: a
    /// guest never runs in the agent's namespace instead.
    type Output = Result<F::Output, NetworkError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let _entered = match &this.ns {
            Some(ns) => match ns.enter() {
                Ok(entered) => Some(entered),
                Err(error) => {
                    return Poll::Ready(Err(NetworkError::EnterNamespace {
                        path: ns.path().to_owned(),
                        source: Arc::new(error),
                    }));
                }
            },
            None => None,
        };
        this.inner.as_mut().poll(cx).map(Ok)
    }
}
