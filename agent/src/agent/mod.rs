//! The [`Agent`] facade: one object owning the state store, the image
//! store, the engine and every sandbox and container, with one method per
//! CRI verb. The verbs live by family in the modules below: pods
//! (`pods`), containers (`containers`, their runs in `run`), what a guest
//! is given (`guest_config`), exec, attach and port-forward (`exec`),
//! resource use (`stats`) and images (`images`). State-changing verbs run
//! on tasks of their own (`ops`), so a client that goes away cannot leave
//! one half done.

mod containers;
mod exec;
mod guest_config;
mod images;
mod ops;
mod pods;
mod ro_binds;
mod run;
mod stats;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use crate::error::{Error, Result};
use crate::images::registry::{Registry, RegistryConfig};
use crate::images::store::ImageStore;
use crate::model::container::ExitStatus;
use crate::model::events::LifecycleEvent;
use crate::model::ids::{ContainerId, SandboxId};
use crate::model::sandbox::{PodMetadata, SandboxState};
use crate::model::time::Timestamp;
use crate::model::usage::CpuRate;
use crate::network::{NetworkConfig, Networks};
use crate::runtime::engine::WasmEngine;
use crate::runtime::guest_runtime::GuestRuntime;
use crate::runtime::http::HttpOptions;
use crate::runtime::limits::{PodCpu, PodMemory};
use crate::runtime::node_memory::NodeMemory;
use crate::state::{Change, StateStore};

pub use exec::{AttachedStdin, Attachment, ExecOutput, ExecStdio, TerminalSize};
pub use images::{ImageInspection, Precompiled};
pub use stats::{ContainerUsage, PodUsage};

use containers::ContainerEntry;
use guest_config::ProgramCache;
use images::PullResult;
use ops::InFlight;
use pods::SandboxEntry;

/// Pod removals between two hand-backs of free heap to the kernel.
const TRIM_EVERY: usize = 256;

/// Where and how the agent keeps its state.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The state root: database, image store, per-container files.
    pub root: PathBuf,
    /// How registries are reached.
    pub registry: RegistryConfig,
    /// How many pulled images may compile at once in the background.
    pub compile_parallelism: usize,
    /// Modules and command components of at least this many bytes of Wasm
    /// are compiled with Winch first, Cranelift following in the
    /// background; 0 turns this fast first tier off.
    pub fast_tier_min_bytes: u64,
    /// CNI and network namespaces.
    pub network: NetworkConfig,
    /// How HTTP functions are served unless a pod says otherwise (`port`
    /// is the default when the container lists none).
    pub http: HttpOptions,
    /// Concurrent HTTP function instances the node has room for.
    pub http_pool_instances: u32,
    /// PEM CA certificates functions trust for outgoing HTTPS, besides the
    /// web PKI's roots.
    pub http_ca_file: Option<PathBuf>,
    /// The node memory guard's budget for all guests' committed memory
    /// (`None`: only per-container and per-pod limits hold).
    pub node_memory_budget: Option<u64>,
}

/// The node memory guard's account.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeMemoryStatus {
    pub budget_bytes: Option<u64>,
    pub used_bytes: u64,
    /// Guests ended because the node was short of memory.
    pub kills: u64,
}

/// What the runtime reports about itself.
#[derive(Clone, Debug)]
pub struct RuntimeInfo {
    pub name: &'static str,
    pub version: &'static str,
    pub wasmtime_version: &'static str,
}

struct Inner {
    root: PathBuf,
    guests: GuestRuntime,
    state: Arc<StateStore>,
    images: ImageStore,
    engine: Arc<WasmEngine>,
    registry: Registry,
    /// Pulls in flight, by reference and credentials: a second pull of the
    /// same reference waits for the first instead of downloading again.
    pulls: Mutex<
        HashMap<String, futures::future::Shared<futures::future::BoxFuture<'static, PullResult>>>,
    >,
    sandboxes: RwLock<HashMap<SandboxId, Arc<SandboxEntry>>>,
    containers: RwLock<HashMap<ContainerId, Arc<ContainerEntry>>>,
    /// RunPodSandbox calls by pod metadata: a retry joins its first call.
    sandbox_runs: InFlight<PodMetadata, SandboxId>,
    /// CreateContainer calls by pod, name and attempt.
    container_creates: InFlight<(SandboxId, String, u32), ContainerId>,
    /// StartContainer calls by container.
    container_starts: InFlight<ContainerId, ()>,
    /// Serialises joining other runtimes' pods.
    joining: tokio::sync::Mutex<()>,
    /// Lifecycle events, for GetContainerEvents.
    events: crate::state::events::Events,
    /// Pods removed since free heap was last handed back to the kernel.
    removed_since_trim: std::sync::atomic::AtomicUsize,
    /// Bounds background compiles of pulled images.
    compile_slots: tokio::sync::Semaphore,
    /// The previous CPU reading of each pod, for its rate.
    pod_samples: Mutex<HashMap<SandboxId, CpuRate>>,
    /// Each pod's memory account, shared by its containers' limiters.
    pod_memory: Mutex<HashMap<SandboxId, Arc<PodMemory>>>,
    /// All guests' committed memory against the node's budget.
    node_memory: Arc<NodeMemory>,
    /// Each pod's CPU account, when the pod has a CPU quota.
    pod_cpu: Mutex<HashMap<SandboxId, Arc<PodCpu>>>,
    /// Programs found in compat images.
    programs: ProgramCache,
    /// Read-only bind mounts of containers' read-only directories.
    binds: ro_binds::ReadOnlyBinds,
    networks: Networks,
    http: HttpOptions,
    /// How functions verify the servers they call over HTTPS.
    egress_tls: crate::runtime::egress::TlsConfig,
}

/// The agent. Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|p| p.into_inner())
}

impl Agent {
    /// Opens the state under `config.root` (creating it), recovers from a
    /// previous run, and builds the engine.
    ///
    /// Containers that were running when the previous agent died are
    /// recorded as exited (code 255, reason `Error`), so the kubelet
    /// restarts them by their pod's policy.
    pub fn open(config: AgentConfig) -> Result<Self> {
        let root = config.root;
        std::fs::create_dir_all(&root).map_err(Error::io("creating state root", &root))?;
        let state = Arc::new(StateStore::open(&root.join("state.redb"))?);
        let snapshot = state.load()?;
        let images = ImageStore::open(&root.join("images"), state.clone(), snapshot.images)?;
        let engine = WasmEngine::with_pool(
            Some(root.join("compiled")),
            config.http_pool_instances,
            config.fast_tier_min_bytes,
        )?;
        let egress_tls = crate::runtime::egress::tls_config(config.http_ca_file.as_deref())?;

        let now = Timestamp::now();
        let mut recovered = Vec::new();
        let mut containers = HashMap::new();
        for mut record in snapshot.containers {
            if record.state.is_running() {
                record.exit(
                    now,
                    ExitStatus::lost(
                        "wasmlet restarted while the container was running; its guest was lost"
                            .to_owned(),
                    ),
                )?;
                recovered.push(record.clone());
            }
            containers.insert(record.id.clone(), ContainerEntry::new(record, None));
        }
        // No guest runs yet: the read-only binds an earlier agent left go.
        let binds = ro_binds::ReadOnlyBinds::open(&root.join("containers"));
        containers::remove_unrecorded_files(&root.join("containers"), &containers);
        if !recovered.is_empty() {
            tracing::warn!(
                count = recovered.len(),
                "containers that were running when the agent stopped are now exited"
            );
            let changes: Vec<Change<'_>> = recovered.iter().map(Change::PutContainer).collect();
            state.apply(&changes)?;
        }
        let networks = Networks::new(config.network);
        let mut sandbox_records = snapshot.sandboxes;
        for record in &mut sandbox_records {
            if record.state != SandboxState::Ready {
                continue;
            }
            let adopted = match (&record.spec.joined, &record.network) {
                (Some(joined), _) => match &joined.netns {
                    Some(path) => networks.join(&record.id, path),
                    None => Ok(()),
                },
                (None, Some(network)) if !network.torn_down => networks.adopt(&record.id, network),
                _ => Ok(()),
            };
            if let Err(error) = adopted {
                tracing::warn!(sandbox_id = %record.id, %error, "pod sandbox lost its network; it is now NOTREADY");
                record.stop();
                state.apply(&[Change::PutSandbox(record)])?;
            }
        }
        // A call that made an object the previous agent recorded but died
        // before answering is retried by the kubelet: it gets that object,
        // as it would have from the agent that made it.
        let sandbox_runs = InFlight::default();
        for record in &sandbox_records {
            if let Some(meta) = &record.spec.metadata
                && record.spec.joined.is_none()
                && record.state == SandboxState::Ready
            {
                sandbox_runs.settled(meta.clone(), record.id.clone());
            }
        }
        let container_creates = InFlight::default();
        for entry in containers.values() {
            let record = lock(&entry.record);
            if let Some(meta) = &record.spec.metadata
                && record.state.can_start()
            {
                let key = (record.sandbox_id.clone(), meta.name.clone(), meta.attempt);
                container_creates.settled(key, record.id.clone());
            }
        }
        let sandboxes = sandbox_records
            .into_iter()
            .map(|r| (r.id.clone(), SandboxEntry::new(r)))
            .collect();
        Ok(Self {
            inner: Arc::new(Inner {
                root,
                guests: GuestRuntime::new()?,
                state,
                images,
                engine,
                registry: Registry::new(config.registry)?,
                pulls: Mutex::new(HashMap::new()),
                compile_slots: tokio::sync::Semaphore::new(config.compile_parallelism.max(1)),
                pod_memory: Mutex::new(HashMap::new()),
                node_memory: NodeMemory::new(config.node_memory_budget),
                pod_cpu: Mutex::new(HashMap::new()),
                pod_samples: Mutex::new(HashMap::new()),
                programs: Mutex::new(HashMap::new()),
                binds,
                networks,
                http: config.http,
                egress_tls,
                sandboxes: RwLock::new(sandboxes),
                containers: RwLock::new(containers),
                sandbox_runs,
                container_creates,
                container_starts: InFlight::default(),
                joining: tokio::sync::Mutex::new(()),
                removed_since_trim: Default::default(),
                events: Default::default(),
            }),
        })
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    pub fn runtime_info(&self) -> RuntimeInfo {
        RuntimeInfo {
            name: "wasmlet",
            version: env!("CARGO_PKG_VERSION"),
            wasmtime_version: "48",
        }
    }

    /// The name of the CNI network pods get, or why pods get none (the
    /// node's network is then not ready).
    pub fn network_status(&self) -> std::result::Result<String, crate::error::NetworkError> {
        self.inner.networks.status().map(|list| list.name)
    }

    /// Removes pod network namespaces left by an earlier agent for
    /// sandboxes it never recorded (it died while setting them up).
    pub async fn remove_orphaned_networks(&self) {
        let known: Vec<SandboxId> = read(&self.inner.sandboxes).keys().cloned().collect();
        self.inner.networks.remove_orphans(&known).await;
    }

    /// The node memory guard's budget, the guests' committed memory now,
    /// and how many guests it has ended.
    pub fn node_memory(&self) -> NodeMemoryStatus {
        let node = &self.inner.node_memory;
        NodeMemoryStatus {
            budget_bytes: node.budget(),
            used_bytes: node.used(),
            kills: node.kills(),
        }
    }

    /// Undoes what the agent mounted on the host (the read-only binds and
    /// the containers directory's own mount): call it once the agent
    /// stops serving, as the process ends.
    pub fn close_mounts(&self) {
        self.inner.binds.close(&self.inner.root.join("containers"));
    }

    /// Subscribes to sandbox and container lifecycle events from now on.
    pub fn subscribe_events(&self) -> tokio::sync::broadcast::Receiver<LifecycleEvent> {
        self.inner.events.subscribe()
    }
}
