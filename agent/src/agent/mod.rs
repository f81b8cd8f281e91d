//! The [`Agent`] facade: one object owning the state store, the image
//! store, the engine and every sandbox and container, with one method per
//! CRI verb.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use crate::container::Resources;
use crate::container::{
    ContainerFilter, ContainerRecord, ContainerSpec, ContainerState, ExitStatus, Mount,
};
use crate::engine::{GuestConfig, GuestStdio, Preopen, Prepared, WasmEngine};
use crate::error::{Error, Result};
use crate::events::{LifecycleEvent, LifecycleKind};
use crate::http::{HttpExit, HttpOptions, Metering, StopRequest};
use crate::ids::{ContainerId, SandboxId};
use crate::image::{FsUsage, ImageRecord, ImageStore, WasmKind};
use crate::limits::{LiveLimits, MemoryLimiter, PodCpu, PodMemory};
use crate::logs::{ContainerLog, Stream};
use crate::network::{GuestNetwork, InNamespace, NetworkConfig, NetworkRequest, Networks};
use crate::registry::{Credentials, Registry, RegistryConfig};
use crate::sandbox::{SandboxFilter, SandboxRecord, SandboxSpec};
use crate::stats::{CpuRate, GuestUsage, INSTANCE_OVERHEAD_BYTES, Metered, Usage};
use crate::store::{Change, StateStore};
use crate::time::Timestamp;

/// The most output an exec keeps per stream (the rest is dropped).
pub const EXEC_OUTPUT_LIMIT: usize = 16 * 1024 * 1024;

/// What an exec'd instance did.
#[derive(Clone, Debug, Default)]
pub struct ExecOutput {
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// The streams of an exec'd instance (see [`Agent::exec`]).
pub struct ExecStdio {
    /// What the instance reads; `None`: end-of-file at once.
    pub stdin: Option<tokio::io::DuplexStream>,
    pub stdout: tokio::sync::mpsc::Sender<bytes::Bytes>,
    /// `None`: stderr joins stdout.
    pub stderr: Option<tokio::sync::mpsc::Sender<bytes::Bytes>>,
    /// The client asked for a terminal, of this size (0 × 0: not known).
    pub terminal: Option<TerminalSize>,
}

/// A client terminal's size, in characters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TerminalSize {
    pub width: u16,
    pub height: u16,
}

/// A client attached to a running container (see [`Agent::attach`]).
pub struct Attachment {
    /// The container's output from the attach on; closed when it exits.
    pub output: tokio::sync::broadcast::Receiver<crate::logs::Output>,
    pub stdin: Option<AttachedStdin>,
    /// The container was created with `tty`.
    pub terminal: bool,
}

/// An attached client's hold on a container's stdin.
pub struct AttachedStdin {
    writer: Arc<tokio::sync::Mutex<Option<tokio::io::DuplexStream>>>,
    once: bool,
}

impl AttachedStdin {
    /// Writes to the container's stdin; fails once it is closed.
    pub async fn write(&self, data: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        match self.writer.lock().await.as_mut() {
            Some(w) => w.write_all(data).await,
            None => Err(std::io::ErrorKind::BrokenPipe.into()),
        }
    }

    /// The client closed its input: with `stdin_once` the container's
    /// stdin closes for good (the guest reads end-of-file).
    pub async fn close(self) {
        if self.once {
            self.writer.lock().await.take();
        }
    }
}

/// What one guest run gets besides its container's spec: where its
/// output goes, its memory account, its network and its stdio.
struct GuestSetup {
    log: ContainerLog,
    limiter: MemoryLimiter,
    network: GuestNetwork,
    dns: crate::network::DnsSettings,
    stdio: GuestStdio,
}

/// An exec'd instance running; dropping it ends the instance.
struct ExecRun(tokio::task::JoinHandle<std::result::Result<crate::engine::GuestExit, String>>);

impl ExecRun {
    async fn wait(mut self) -> Result<crate::engine::GuestExit> {
        match (&mut self.0).await {
            Ok(Ok(exit)) => Ok(exit),
            Ok(Err(message)) => Ok(crate::engine::GuestExit {
                code: crate::engine::TRAP_EXIT_CODE,
                message,
            }),
            Err(e) => Err(Error::Internal(format!("exec task failed: {e}"))),
        }
    }
}

impl Drop for ExecRun {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a stored image runs, as the admin API shows it.
#[derive(Clone, Debug)]
pub struct ImageInspection {
    pub image: ImageRecord,
    /// The program the image runs by default, and its size.
    pub wasm_digest: crate::ids::Digest,
    pub wasm_size: u64,
    pub description: crate::inspect::WasmDescription,
    /// The engine holds it compiled (memory or disk cache).
    pub compiled: bool,
}

/// What [`Agent::precompile_image`] did.
#[derive(Clone, Debug)]
pub struct Precompiled {
    pub wasm_digest: crate::ids::Digest,
    pub already_compiled: bool,
    pub took: Duration,
}

/// The names under which a Wasm artifact's one program may be exec'd: the
/// container's own command, the name the image gives it, and
/// `/proc/self/exe`.
fn artifact_program_names(image: &ImageRecord, spec: &ContainerSpec) -> Vec<String> {
    let mut names = vec!["/proc/self/exe".to_owned()];
    if let Some(c) = spec.command.first() {
        names.push(c.clone());
    }
    if let Some(n) = image.first_name() {
        names.push(n.basename().to_owned());
    }
    names.push("main.wasm".to_owned());
    names.dedup();
    names
}

/// Pod removals between two hand-backs of free heap to the kernel.
const TRIM_EVERY: usize = 256;

/// How long past the kubelet's timeout a stop may take before it is
/// reported as failed. Guests yield every epoch tick, so this is generous.
const STOP_MARGIN: Duration = Duration::from_secs(2);

/// Where and how the agent keeps its state.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The state root: database, image store, per-container files.
    pub root: PathBuf,
    /// How registries are reached.
    pub registry: RegistryConfig,
    /// How many pulled images may compile at once in the background.
    pub compile_parallelism: usize,
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
}

type PullResult = std::result::Result<ImageRecord, Arc<Error>>;

/// What the runtime reports about itself.
#[derive(Clone, Debug)]
pub struct RuntimeInfo {
    pub name: &'static str,
    pub version: &'static str,
    pub wasmtime_version: &'static str,
}

/// One container: its record, and while it runs, the way to stop it.
struct ContainerEntry {
    record: Mutex<ContainerRecord>,
    /// Taken by whoever stops the guest; present from start until stop.
    kill: Mutex<Option<oneshot::Sender<StopRequest>>>,
    /// Set once, when the container reaches EXITED.
    exited: watch::Sender<bool>,
    /// The image compiled at creation, or why it could not be.
    prepared: Mutex<Option<std::result::Result<Prepared, String>>>,
    /// Resource use of the current (or last) run.
    usage: Mutex<Option<Arc<GuestUsage>>>,
    /// The limits the running guest is held to (updated live).
    limits: Mutex<Option<Arc<LiveLimits>>>,
    /// CPU readings, for the rate over the interval.
    cpu_rate: Mutex<CpuRate>,
    /// The log of the running guest, for ReopenContainerLog.
    log: Mutex<Option<ContainerLog>>,
    /// The running guest's memory account, shared by exec'd instances.
    exec_limiter: Mutex<Option<MemoryLimiter>>,
    /// The write end of the running guest's stdin (a container created
    /// with `stdin`), shared by attached clients; taken to close it.
    stdin: Arc<tokio::sync::Mutex<Option<tokio::io::DuplexStream>>>,
}

impl ContainerEntry {
    fn new(record: ContainerRecord) -> Arc<Self> {
        let exited = record.state == ContainerState::Exited;
        Arc::new(Self {
            record: Mutex::new(record),
            kill: Mutex::new(None),
            exited: watch::Sender::new(exited),
            prepared: Mutex::new(None),
            usage: Mutex::new(None),
            limits: Mutex::new(None),
            cpu_rate: Mutex::new(CpuRate::default()),
            log: Mutex::new(None),
            exec_limiter: Mutex::new(None),
            stdin: Arc::default(),
        })
    }

    fn snapshot(&self) -> ContainerRecord {
        lock(&self.record).clone()
    }
}

/// The runtime guests run on, apart from the one serving requests: the OS
/// schedules the server's threads fairly against busy guests, so a node full
/// of spinning guests still answers the kubelet promptly.
struct GuestRuntime {
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl GuestRuntime {
    fn new() -> Result<Self> {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        crate::network::netns::remember_host_namespace()
            .map_err(|e| Error::Internal(e.to_string()))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("wasmlet-guest")
            // A blocking-pool thread spawned while a guest was polled inside
            // its pod's network namespace would start there: put it back.
            .on_thread_start(|| {
                if let Err(error) = crate::network::netns::return_to_host_namespace() {
                    tracing::error!(%error, "guest thread cannot leave a pod's network namespace");
                    std::process::abort();
                }
            })
            .enable_all()
            .build()
            .map_err(|e| Error::Internal(format!("starting the guest runtime: {e}")))?;
        Ok(Self {
            handle: rt.handle().clone(),
            runtime: Some(rt),
        })
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }
}

impl Drop for GuestRuntime {
    fn drop(&mut self) {
        // Dropping a runtime may not block inside another runtime.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
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
    sandboxes: RwLock<HashMap<SandboxId, Arc<Mutex<SandboxRecord>>>>,
    containers: RwLock<HashMap<ContainerId, Arc<ContainerEntry>>>,
    /// Serialises the uniqueness check and insert of new objects.
    creating: tokio::sync::Mutex<()>,
    /// Lifecycle events, for GetContainerEvents.
    events: crate::events::Events,
    /// Pods removed since free heap was last handed back to the kernel.
    removed_since_trim: std::sync::atomic::AtomicUsize,
    /// Bounds background compiles of pulled images.
    compile_slots: tokio::sync::Semaphore,
    /// The previous CPU reading of each pod, for its rate.
    pod_samples: Mutex<HashMap<SandboxId, CpuRate>>,
    /// Each pod's memory account, shared by its containers' limiters.
    pod_memory: Mutex<HashMap<SandboxId, Arc<PodMemory>>>,
    /// Each pod's CPU account, when the pod has a CPU quota.
    pod_cpu: Mutex<HashMap<SandboxId, Arc<PodCpu>>>,
    /// Programs found in compat images.
    programs: ProgramCache,
    networks: Networks,
    http: HttpOptions,
    /// How functions verify the servers they call over HTTPS.
    egress_tls: crate::egress::TlsConfig,
}

/// WASI preview1 has no current directory: wasi-libc resolves relative
/// paths against a preopen named `.`. So the directory backing the
/// container's working directory (inside one of its mounts) is preopened
/// again as `.`; WASI 0.2 guests also get it as their initial cwd.
fn working_dir_preopen(working_dir: &str, preopens: &[Preopen]) -> Option<Preopen> {
    let wd = Path::new(working_dir);
    if !wd.is_absolute() || wd == Path::new("/") {
        return None;
    }
    let (mount, rest) = preopens
        .iter()
        .filter_map(|p| Some((p, wd.strip_prefix(&p.guest_path).ok()?)))
        .max_by_key(|(p, _)| p.guest_path.len())?;
    if rest
        .components()
        .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return None;
    }
    let host_path = mount.host_path.join(rest);
    host_path.is_dir().then(|| Preopen {
        host_path,
        guest_path: ".".to_owned(),
        readonly: mount.readonly,
    })
}

/// A container's record with its resource use.
#[derive(Clone, Debug)]
pub struct ContainerUsage {
    pub record: ContainerRecord,
    pub usage: Usage,
}

/// A pod's record with its resource use and its containers'.
#[derive(Clone, Debug)]
pub struct PodUsage {
    pub record: SandboxRecord,
    pub usage: Usage,
    pub containers: Vec<ContainerUsage>,
}

/// What a container runs: its argv and, for compat images, the program's
/// file inside the unpacked root.
struct Program {
    argv: Vec<String>,
    /// `None` for a Wasm artifact (the program is the image's Wasm layer).
    file: Option<PathBuf>,
    /// The program's digest when known without reading it (an artifact's
    /// layer, or a compat program read before).
    digest: Option<crate::ids::Digest>,
    rootfs: Option<PathBuf>,
}

/// Reads `program`'s Wasm: the image's layer, or a compat image's file
/// (whose kind and digest are read from its bytes).
fn read_program(
    images: &ImageStore,
    image: &ImageRecord,
    program: &Program,
) -> std::result::Result<(crate::ids::Digest, WasmKind, Vec<u8>), String> {
    match &program.file {
        None => {
            let bytes = images
                .read_blob(&image.wasm_digest)
                .map_err(|e| format!("reading the image's Wasm: {e}"))?;
            Ok((image.wasm_digest.clone(), image.wasm_kind, bytes))
        }
        Some(path) => {
            let bytes =
                std::fs::read(path).map_err(|e| format!("reading {:?}: {e}", program.argv[0]))?;
            let kind = WasmKind::detect(&bytes)
                .ok_or_else(|| format!("{:?} is not a WebAssembly program", program.argv[0]))?;
            Ok((crate::ids::Digest::of(&bytes), kind, bytes))
        }
    }
}

/// Decides argv as Kubernetes does: `command` replaces the image's
/// entrypoint and `args` its cmd. For a compat image `argv[0]` is then
/// looked up inside the image root, so one image can carry several
/// programs.
fn program(
    images: &ImageStore,
    cache: &ProgramCache,
    image: &ImageRecord,
    spec: &ContainerSpec,
) -> std::result::Result<Program, String> {
    let Some(config) = &image.compat else {
        let argv0 = match spec.command.first() {
            Some(c) => c.clone(),
            None => image
                .first_name()
                .map_or_else(|| "main.wasm".to_owned(), |n| n.basename().to_owned()),
        };
        let rest = spec.command.iter().skip(1).chain(&spec.args).cloned();
        return Ok(Program {
            argv: std::iter::once(argv0).chain(rest).collect(),
            file: None,
            digest: Some(image.wasm_digest.clone()),
            rootfs: None,
        });
    };
    let argv: Vec<String> = if !spec.command.is_empty() {
        spec.command.iter().chain(&spec.args).cloned().collect()
    } else if !spec.args.is_empty() {
        config
            .entrypoint
            .iter()
            .chain(&spec.args)
            .cloned()
            .collect()
    } else {
        config
            .entrypoint
            .iter()
            .chain(&config.cmd)
            .cloned()
            .collect()
    };
    let argv0 = argv
        .first()
        .ok_or("neither the container nor the image names a program to run")?;
    let rootfs = images.rootfs_path(&image.id);
    let key = (image.id.clone(), argv0.clone());
    let cached = lock(cache)
        .get(&key)
        .map(|p| (p.file.clone(), p.digest.clone()));
    let (file, digest) = match cached {
        Some(hit) => hit,
        None => {
            let file = crate::rootfs::resolve_program(&rootfs, argv0, config.path_env())?;
            lock(cache).insert(
                key,
                ResolvedProgram {
                    file: file.clone(),
                    digest: None,
                },
            );
            (file, None)
        }
    };
    Ok(Program {
        argv,
        file: Some(file),
        digest,
        rootfs: Some(rootfs),
    })
}

/// A program resolved inside a compat image's root, and its digest once
/// read: image roots never change, so neither is looked up again.
struct ResolvedProgram {
    file: PathBuf,
    digest: Option<crate::ids::Digest>,
}

/// Resolved programs by (image id, `argv[0]`).
type ProgramCache = Mutex<HashMap<(crate::ids::Digest, String), ResolvedProgram>>;

/// The annotation in which the kubelet lists a container's ports (JSON).
const CONTAINER_PORTS_ANNOTATION: &str = "io.kubernetes.container.ports";

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
        let engine = WasmEngine::with_pool(Some(root.join("compiled")), config.http_pool_instances)
            .map_err(Error::Internal)?;
        let egress_tls = crate::egress::tls_config(config.http_ca_file.as_deref())
            .map_err(Error::InvalidArgument)?;

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
            containers.insert(record.id.clone(), ContainerEntry::new(record));
        }
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
            if record.state != crate::sandbox::SandboxState::Ready {
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
        let sandboxes = sandbox_records
            .into_iter()
            .map(|r| (r.id.clone(), Arc::new(Mutex::new(r))))
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
                pod_cpu: Mutex::new(HashMap::new()),
                pod_samples: Mutex::new(HashMap::new()),
                programs: Mutex::new(HashMap::new()),
                networks,
                http: config.http,
                egress_tls,
                sandboxes: RwLock::new(sandboxes),
                containers: RwLock::new(containers),
                creating: tokio::sync::Mutex::new(()),
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
    pub fn network_status(&self) -> std::result::Result<String, String> {
        self.inner.networks.status().map(|list| list.name)
    }

    /// Removes pod network namespaces left by an earlier agent for
    /// sandboxes it never recorded (it died while setting them up).
    pub async fn remove_orphaned_networks(&self) {
        let known: Vec<SandboxId> = read(&self.inner.sandboxes).keys().cloned().collect();
        self.inner.networks.remove_orphans(&known).await;
    }

    // ----- sandboxes -----

    /// Creates a ready sandbox. Fails with `AlreadyExists` while a sandbox
    /// with the same metadata (name, namespace, uid, attempt) exists.
    pub async fn run_pod_sandbox(&self, spec: SandboxSpec) -> Result<SandboxId> {
        let Some(meta) = spec.metadata.clone() else {
            return Err(Error::InvalidArgument(
                "pod sandbox config has no metadata".into(),
            ));
        };
        if meta.name.is_empty() || meta.namespace.is_empty() || meta.uid.is_empty() {
            return Err(Error::InvalidArgument(
                "pod sandbox metadata needs a name, a namespace and a uid".into(),
            ));
        }
        let _guard = self.inner.creating.lock().await;
        if let Some(existing) = read(&self.inner.sandboxes)
            .values()
            .find(|s| {
                let s = lock(s);
                s.spec.joined.is_none() && s.spec.metadata.as_ref() == Some(&meta)
            })
            .map(|s| lock(s).clone())
        {
            return Err(Error::AlreadyExists {
                kind: SandboxId::KIND,
                id: format!(
                    "{}/{} (uid {}, attempt {})",
                    meta.namespace, meta.name, meta.uid, meta.attempt
                ),
                detail: format!("it is sandbox {}; remove it first", existing.id),
            });
        }
        let mut record = SandboxRecord::new(spec);
        let id = record.id.clone();
        if !record.spec.host_network {
            match self.inner.networks.configured() {
                Some(list) => {
                    let request = NetworkRequest {
                        namespace: meta.namespace.clone(),
                        name: meta.name.clone(),
                        uid: meta.uid.clone(),
                        port_mappings: record.spec.port_mappings.clone(),
                    };
                    let network = self
                        .inner
                        .networks
                        .setup(&id, list, &request)
                        .await
                        .map_err(|e| Error::Network(format!("setting up the pod network: {e}")))?;
                    tracing::info!(sandbox_id = %id, ips = ?network.ips, "pod network ready");
                    record.network = Some(network);
                }
                // Status reports the node's network as not ready.
                None => {
                    tracing::debug!(sandbox_id = %id, "no CNI configuration: the pod has no network")
                }
            }
        }
        if let Err(e) = self.inner.state.apply(&[Change::PutSandbox(&record)]) {
            if let Some(network) = &record.network
                && let Err(error) = self.inner.networks.teardown(&id, network).await
            {
                tracing::warn!(sandbox_id = %id, %error, "undoing the pod network");
            }
            return Err(e);
        }
        tracing::info!(sandbox_id = %id, pod = %meta.name, namespace = %meta.namespace, "pod sandbox ready");
        self.inner
            .events
            .emit(id.as_str(), &id, LifecycleKind::Created);
        self.inner
            .events
            .emit(id.as_str(), &id, LifecycleKind::Started);
        write(&self.inner.sandboxes).insert(id.clone(), Arc::new(Mutex::new(record)));
        Ok(id)
    }

    /// Records a sandbox standing in for pod `id` of another runtime (see
    /// [`SandboxSpec::joined`]), so that Wasm containers can be created in
    /// it; its guests use that pod's network namespace. Joining a pod
    /// already joined succeeds.
    pub async fn join_pod_sandbox(&self, id: SandboxId, spec: SandboxSpec) -> Result<()> {
        let Some(joined) = spec.joined.clone() else {
            return Err(Error::InvalidArgument(
                "a joined sandbox needs the pod it joins".into(),
            ));
        };
        let _guard = self.inner.creating.lock().await;
        if let Ok(existing) = self.sandbox(&id) {
            let existing = lock(&existing);
            return match existing.spec.joined {
                Some(_) => Ok(()),
                None => Err(Error::AlreadyExists {
                    kind: SandboxId::KIND,
                    id: id.to_string(),
                    detail: "it is one of wasmlet's own pods".into(),
                }),
            };
        }
        if let Some(path) = &joined.netns {
            self.inner
                .networks
                .join(&id, path)
                .map_err(|e| Error::FailedPrecondition(format!("joining pod {id}: {e}")))?;
        }
        let record = SandboxRecord::with_id(id.clone(), spec);
        if let Err(e) = self.inner.state.apply(&[Change::PutSandbox(&record)]) {
            self.inner.networks.forget(&id);
            return Err(e);
        }
        tracing::info!(sandbox_id = %id, runtime = %joined.runtime, netns = ?joined.netns, "joined another runtime's pod");
        write(&self.inner.sandboxes).insert(id, Arc::new(Mutex::new(record)));
        Ok(())
    }

    /// Whether the agent holds sandbox `id`: `Some(false)` for one of its
    /// own pods, `Some(true)` for a sandbox joined to another runtime's pod.
    pub fn holds_pod_sandbox(&self, id: &SandboxId) -> Option<bool> {
        let sandbox = read(&self.inner.sandboxes).get(id).cloned()?;
        Some(lock(&sandbox).spec.joined.is_some())
    }

    /// The joined sandboxes (see [`SandboxSpec::joined`]), with the time
    /// each was joined.
    pub fn joined_pod_sandboxes(&self) -> Vec<(SandboxId, Timestamp)> {
        read(&self.inner.sandboxes)
            .values()
            .filter_map(|s| {
                let s = lock(s);
                s.spec
                    .joined
                    .is_some()
                    .then(|| (s.id.clone(), s.created_at))
            })
            .collect()
    }

    /// Subscribes to sandbox and container lifecycle events from now on.
    pub fn subscribe_events(&self) -> tokio::sync::broadcast::Receiver<LifecycleEvent> {
        self.inner.events.subscribe()
    }

    /// Whether the agent holds container `id`.
    pub fn holds_container(&self, id: &ContainerId) -> bool {
        read(&self.inner.containers).contains_key(id)
    }

    fn sandbox(&self, id: &SandboxId) -> Result<Arc<Mutex<SandboxRecord>>> {
        read(&self.inner.sandboxes)
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                kind: SandboxId::KIND,
                id: id.to_string(),
            })
    }

    fn containers_of(&self, sandbox: &SandboxId) -> Vec<Arc<ContainerEntry>> {
        read(&self.inner.containers)
            .values()
            .filter(|c| lock(&c.record).sandbox_id == *sandbox)
            .cloned()
            .collect()
    }

    /// Stops every container of the sandbox and marks it not ready.
    /// Stopping a stopped sandbox succeeds.
    pub async fn stop_pod_sandbox(&self, id: &SandboxId) -> Result<()> {
        let sandbox = self.sandbox(id)?;
        for entry in self.containers_of(id) {
            self.kill_and_wait(&entry, "its pod sandbox was stopped", Duration::ZERO)
                .await?;
        }
        if lock(&sandbox).spec.joined.is_some() {
            // The pod's own runtime owns its namespace.
            self.inner.networks.forget(id);
        }
        let network = lock(&sandbox).network.clone().filter(|n| !n.torn_down);
        if let Some(network) = &network {
            self.inner
                .networks
                .teardown(id, network)
                .await
                .map_err(|e| Error::Network(format!("tearing down the pod network: {e}")))?;
            tracing::info!(sandbox_id = %id, "pod network torn down");
        }
        let mut record = lock(&sandbox);
        let before = record.clone();
        // One commit records both the teardown and the stop.
        let torn_down = match record.network.as_mut() {
            Some(n) if network.is_some() => {
                n.torn_down = true;
                true
            }
            _ => false,
        };
        if record.stop() || torn_down {
            if let Err(e) = self.inner.state.apply(&[Change::PutSandbox(&record)]) {
                *record = before;
                return Err(e);
            }
            tracing::info!(sandbox_id = %id, "pod sandbox stopped");
            if record.spec.joined.is_none() {
                self.inner
                    .events
                    .emit(id.as_str(), id, LifecycleKind::Stopped);
            }
        }
        Ok(())
    }

    /// Stops the sandbox if needed and removes it with its containers.
    /// Removing a sandbox that no longer exists succeeds.
    pub async fn remove_pod_sandbox(&self, id: &SandboxId) -> Result<()> {
        let Ok(sandbox) = self.sandbox(id) else {
            return Ok(());
        };
        let joined = lock(&sandbox).spec.joined.is_some();
        self.stop_pod_sandbox(id).await?;
        let entries = self.containers_of(id);
        let ids: Vec<ContainerId> = entries.iter().map(|e| lock(&e.record).id.clone()).collect();
        let mut changes: Vec<Change<'_>> = ids
            .iter()
            .map(|c| Change::DeleteContainer(c.as_str()))
            .collect();
        changes.push(Change::DeleteSandbox(id.as_str()));
        self.inner.state.apply(&changes)?;
        {
            let mut containers = write(&self.inner.containers);
            for c in &ids {
                containers.remove(c);
            }
        }
        for c in &ids {
            self.remove_container_files(c);
        }
        write(&self.inner.sandboxes).remove(id);
        lock(&self.inner.pod_memory).remove(id);
        lock(&self.inner.pod_cpu).remove(id);
        lock(&self.inner.pod_samples).remove(id);
        tracing::info!(sandbox_id = %id, containers = ids.len(), "pod sandbox removed");
        for c in &ids {
            self.inner
                .events
                .emit(c.as_str(), id, LifecycleKind::Deleted);
        }
        if !joined {
            self.inner
                .events
                .emit(id.as_str(), id, LifecycleKind::Deleted);
        }
        self.note_pod_removed();
        Ok(())
    }

    /// Every [`TRIM_EVERY`] pod removals, hands the heap the removed pods
    /// freed back to the kernel (glibc keeps freed memory in its arenas,
    /// so after thousands of pods go the agent's RSS would stay at its
    /// peak).
    fn note_pod_removed(&self) {
        use std::sync::atomic::Ordering;
        let removed = self
            .inner
            .removed_since_trim
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        if removed >= TRIM_EVERY
            && self
                .inner
                .removed_since_trim
                .compare_exchange(removed, 0, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tokio::task::spawn_blocking(crate::limits::release_free_heap);
        }
    }

    pub fn pod_sandbox_status(&self, id: &SandboxId) -> Result<SandboxRecord> {
        let sandbox = self.sandbox(id)?;
        let record = lock(&sandbox).clone();
        Ok(record)
    }

    /// The agent's own sandboxes matching `filter`, oldest first (joined
    /// sandboxes are their runtime's pods, not listed here).
    pub fn list_pod_sandboxes(&self, filter: &SandboxFilter) -> Vec<SandboxRecord> {
        let mut out: Vec<SandboxRecord> = read(&self.inner.sandboxes)
            .values()
            .filter_map(|s| {
                let record = lock(s);
                (record.spec.joined.is_none() && filter.matches(&record)).then(|| record.clone())
            })
            .collect();
        out.sort_by_key(|s| s.created_at);
        out
    }

    // ----- containers -----

    fn container(&self, id: &ContainerId) -> Result<Arc<ContainerEntry>> {
        read(&self.inner.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                kind: ContainerId::KIND,
                id: id.to_string(),
            })
    }

    /// Creates a container in a ready sandbox and compiles its image, so
    /// that starting it is only an instantiation. A compile failure does not
    /// fail creation: it is reported when the container is started, in its
    /// status and its log, where the user looks.
    pub async fn create_container(
        &self,
        sandbox_id: &SandboxId,
        spec: ContainerSpec,
    ) -> Result<ContainerId> {
        let Some(meta) = spec.metadata.clone() else {
            return Err(Error::InvalidArgument(
                "container config has no metadata".into(),
            ));
        };
        if meta.name.is_empty() {
            return Err(Error::InvalidArgument(
                "container metadata has no name".into(),
            ));
        }
        if spec.log_path.split('/').any(|c| c == "..") {
            return Err(Error::InvalidArgument(format!(
                "container log path {:?} must stay inside the pod's log directory",
                spec.log_path
            )));
        }
        let sandbox = self.pod_sandbox_status(sandbox_id)?;
        sandbox.check_accepts_containers()?;
        let image = self
            .inner
            .images
            .resolve(&spec.image)
            .ok_or_else(|| Error::NotFound {
                kind: "image",
                id: spec.image.clone(),
            })?;
        let log_file = (!sandbox.spec.log_directory.is_empty() && !spec.log_path.is_empty())
            .then(|| Path::new(&sandbox.spec.log_directory).join(&spec.log_path));

        let _guard = self.inner.creating.lock().await;
        if let Some(existing) = self
            .containers_of(sandbox_id)
            .iter()
            .find(|c| lock(&c.record).spec.metadata.as_ref() == Some(&meta))
            .map(|c| c.snapshot())
        {
            return Err(Error::AlreadyExists {
                kind: ContainerId::KIND,
                id: format!(
                    "{} (attempt {}) in pod sandbox {sandbox_id}",
                    meta.name, meta.attempt
                ),
                detail: format!("it is container {}; remove it first", existing.id),
            });
        }
        let record = ContainerRecord {
            id: ContainerId::generate(),
            sandbox_id: sandbox_id.clone(),
            spec,
            image_id: image.id.clone(),
            log_file,
            state: ContainerState::Created,
            created_at: Timestamp::now(),
            started_at: None,
            finished_at: None,
            exit: None,
        };
        self.inner.state.apply(&[Change::PutContainer(&record)])?;
        let id = record.id.clone();
        let entry = ContainerEntry::new(record);
        write(&self.inner.containers).insert(id.clone(), entry.clone());
        drop(_guard);

        let spec = entry.snapshot().spec;
        let prepared = self.prepare(&image, &spec).await;
        *lock(&entry.prepared) = Some(prepared);
        tracing::info!(container_id = %id, sandbox_id = %sandbox_id, image = %image.id, "container created");
        self.inner
            .events
            .emit(id.as_str(), sandbox_id, LifecycleKind::Created);
        Ok(id)
    }

    /// Compiles (or finds compiled) the program a container of `image`
    /// runs, off the async workers.
    async fn prepare(
        &self,
        image: &ImageRecord,
        spec: &ContainerSpec,
    ) -> std::result::Result<Prepared, String> {
        let program = program(&self.inner.images, &self.inner.programs, image, spec)?;
        // The hot path: an image compiled before needs no I/O.
        if let Some(prepared) = program
            .digest
            .as_ref()
            .and_then(|d| self.inner.engine.cached(d))
        {
            return Ok(prepared);
        }
        let inner = self.inner.clone();
        let image = image.clone();
        tokio::task::spawn_blocking(move || {
            let (digest, kind, bytes) = read_program(&inner.images, &image, &program)?;
            let prepared = inner.engine.prepare(&digest, kind, &bytes)?;
            if program.file.is_some()
                && let Some(p) =
                    lock(&inner.programs).get_mut(&(image.id.clone(), program.argv[0].clone()))
            {
                p.digest = Some(digest);
            }
            Ok(prepared)
        })
        .await
        .map_err(|e| format!("compiling the image: {e}"))?
    }

    /// Starts a created container. If the guest cannot start (its image
    /// does not compile or link, a mount is missing), the container becomes
    /// EXITED with reason `StartError`, the reason is written to its log,
    /// and `StartFailed` is returned.
    pub async fn start_container(&self, id: &ContainerId) -> Result<()> {
        let entry = self.container(id)?;
        let sandbox = self.pod_sandbox_status(&entry.snapshot().sandbox_id)?;
        sandbox.check_accepts_containers()?;
        let (kill_tx, kill_rx) = oneshot::channel();
        let record = {
            let mut record = lock(&entry.record);
            let before = record.clone();
            record.start(Timestamp::now())?;
            if let Err(e) = self.inner.state.apply(&[Change::PutContainer(&record)]) {
                *record = before;
                return Err(e);
            }
            *lock(&entry.kill) = Some(kill_tx);
            record.clone()
        };
        let log = match ContainerLog::open(record.log_file.as_deref()) {
            Ok(log) => {
                *lock(&entry.log) = Some(log.clone());
                log
            }
            Err(e) => {
                let reason = e.to_string();
                self.finish(&entry, ExitStatus::start_error(reason.clone()));
                return Err(Error::StartFailed {
                    id: id.to_string(),
                    reason,
                });
            }
        };
        let usage = GuestUsage::new();
        *lock(&entry.usage) = Some(usage.clone());
        let pod_cpu = self.pod_cpu(&sandbox);
        let live = record.spec.resources.live();
        *lock(&entry.limits) = Some(live.clone());
        let limiter =
            MemoryLimiter::live(live.clone(), self.pod_memory(&sandbox)).with_usage(usage.clone());
        let oom = limiter.oom_flag();
        *lock(&entry.exec_limiter) = Some(limiter.sibling_with_own_oom());
        let network = self.guest_network(&sandbox);
        let mut stdio = GuestStdio::default();
        if record.spec.stdin {
            let (writer, reader) = crate::stdio::stdin_pipe();
            *entry.stdin.lock().await = Some(writer);
            stdio.stdin = Some(reader);
        }
        let memory_limit = record.spec.resources.memory_limit_bytes;
        let memory_note = move |message: &str| match memory_limit {
            Some(limit) => format!(
                "the guest reached its memory limit ({limit} bytes, or its pod's): {message}"
            ),
            None => format!("the guest reached its pod's memory limit: {message}"),
        };
        match self
            .instantiate(
                &entry,
                &record,
                GuestSetup {
                    log: log.clone(),
                    limiter,
                    network: network.clone(),
                    dns: sandbox.spec.dns.clone(),
                    stdio,
                },
            )
            .await
        {
            Ok(crate::engine::Guest::Http(function)) => {
                let options = self.http_options(&sandbox, &record.spec);
                let listener = match function.bind(options.port) {
                    Ok(listener) => listener,
                    Err(reason) => {
                        log.write_line(Stream::Stderr, &format!("wasmlet: {reason}"));
                        log.close();
                        self.finish(&entry, ExitStatus::start_error(reason.clone()));
                        return Err(Error::StartFailed {
                            id: id.to_string(),
                            reason,
                        });
                    }
                };
                let metering = Metering {
                    usage,
                    // Its own quota follows UpdateContainerResources.
                    shared: std::iter::once(PodCpu::following(live.clone()))
                        .chain(pod_cpu)
                        .collect(),
                };
                let agent = self.clone();
                let entry = entry.clone();
                tracing::info!(container_id = %id, port = options.port, "HTTP function serving");
                log.write_line(
                    Stream::Stderr,
                    &format!("wasmlet: serving wasi:http on port {}", options.port),
                );
                self.inner.guests.handle().spawn(async move {
                    let status = match function.serve(listener, options, metering, kill_rx).await {
                        HttpExit::Drained => ExitStatus::guest(0, String::new()),
                        HttpExit::Interrupted { why, requests } => ExitStatus::killed(&format!(
                            "{why}; {requests} request(s) still in flight were interrupted"
                        )),
                        HttpExit::Failed(message) => {
                            log.write_line(Stream::Stderr, &format!("wasmlet: {message}"));
                            ExitStatus::guest(crate::engine::TRAP_EXIT_CODE, message)
                        }
                    };
                    log.close();
                    agent.finish(&entry, status);
                });
                Ok(())
            }
            Ok(guest) => {
                let agent = self.clone();
                let entry = entry.clone();
                self.inner.guests.handle().spawn(async move {
                    let run = InNamespace::new(guest.run(), &network);
                    let status = tokio::select! {
                        exit = Metered::new(run, usage).with_limits(live).with_pod_cpu(pod_cpu) => {
                            let exit = exit.unwrap_or_else(|message| crate::engine::GuestExit {
                                code: crate::engine::TRAP_EXIT_CODE,
                                message,
                            });
                            if !exit.message.is_empty() {
                                log.write_line(Stream::Stderr, &exit.message);
                            }
                            if exit.code != 0 && oom.load(std::sync::atomic::Ordering::Relaxed) {
                                ExitStatus::oom_killed(memory_note(&exit.message))
                            } else {
                                ExitStatus::guest(exit.code, exit.message)
                            }
                        }
                        stop = kill_rx => ExitStatus::killed(stop.map_or("the runtime stopped it", |s| s.why)),
                    };
                    log.close();
                    agent.finish(&entry, status);
                });
                tracing::info!(container_id = %id, "container started");
                self.inner
                    .events
                    .emit(id.as_str(), &record.sandbox_id, LifecycleKind::Started);
                Ok(())
            }
            Err(reason) => {
                log.write_line(Stream::Stderr, &format!("wasmlet: {reason}"));
                log.close();
                let status = if oom.load(std::sync::atomic::Ordering::Relaxed) {
                    ExitStatus::oom_killed(memory_note(&reason))
                } else {
                    ExitStatus::start_error(reason.clone())
                };
                self.finish(&entry, status);
                Err(Error::StartFailed {
                    id: id.to_string(),
                    reason,
                })
            }
        }
    }

    /// How a container's HTTP function is served: the first TCP port the
    /// kubelet lists for the container (its `ports`), the node's defaults
    /// for the rest, overridden by the pod annotations
    /// `wasmlet.dev/http-max-concurrency` and
    /// `wasmlet.dev/http-request-timeout-seconds`.
    fn http_options(&self, sandbox: &SandboxRecord, spec: &ContainerSpec) -> HttpOptions {
        let mut options = self.inner.http.clone();
        if let Some(port) = spec
            .annotations
            .get(CONTAINER_PORTS_ANNOTATION)
            .and_then(|json| serde_json::from_str::<serde_json::Value>(json).ok())
            .as_ref()
            .and_then(serde_json::Value::as_array)
            .and_then(|ports| {
                ports.iter().find_map(|p| {
                    let tcp = p
                        .get("protocol")
                        .and_then(serde_json::Value::as_str)
                        .is_none_or(|proto| proto.eq_ignore_ascii_case("tcp"));
                    let port = p.get("containerPort").and_then(serde_json::Value::as_u64)?;
                    tcp.then(|| u16::try_from(port).ok()).flatten()
                })
            })
        {
            options.port = port;
        }
        let annotation = |key: &str| {
            sandbox
                .spec
                .annotations
                .get(key)
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|v| *v > 0)
        };
        if let Some(n) = annotation("wasmlet.dev/http-max-concurrency") {
            options.max_concurrency = usize::try_from(n).unwrap_or(usize::MAX);
        }
        if let Some(secs) = annotation("wasmlet.dev/http-request-timeout-seconds") {
            options.request_timeout = Duration::from_secs(secs);
        }
        options
    }

    /// Where a pod's guests open sockets.
    fn guest_network(&self, sandbox: &SandboxRecord) -> GuestNetwork {
        if sandbox.spec.host_network {
            return GuestNetwork::Host;
        }
        match self.inner.networks.namespace(&sandbox.id) {
            Some(ns) => GuestNetwork::Pod(ns),
            None => GuestNetwork::None,
        }
    }

    async fn instantiate(
        &self,
        entry: &ContainerEntry,
        record: &ContainerRecord,
        setup: GuestSetup,
    ) -> std::result::Result<crate::engine::Guest, String> {
        let image = self
            .inner
            .images
            .resolve(record.image_id.as_str())
            .ok_or_else(|| format!("image {} was removed", record.image_id))?;
        let cached = lock(&entry.prepared).clone();
        let prepared = match cached {
            Some(p) => p?,
            None => self.prepare(&image, &record.spec).await?,
        };
        let config = self.guest_config(&record.id, &image, &record.spec, setup)?;
        self.inner.engine.instantiate(&prepared, config).await
    }

    /// What a guest of container `id` running `spec` in `image` gets.
    fn guest_config(
        &self,
        id: &ContainerId,
        image: &ImageRecord,
        spec: &ContainerSpec,
        setup: GuestSetup,
    ) -> std::result::Result<GuestConfig, String> {
        let GuestSetup {
            log,
            limiter,
            network,
            dns,
            stdio,
        } = setup;
        let program = program(&self.inner.images, &self.inner.programs, image, spec)?;
        let mut preopens = Vec::new();
        if let Some(root) = &program.rootfs {
            preopens.push(Preopen {
                host_path: root.clone(),
                guest_path: "/".to_owned(),
                readonly: true,
            });
        }
        preopens.extend(self.preopens(id, &spec.mounts)?);
        let working_dir = if spec.working_dir.is_empty() {
            image
                .compat
                .as_ref()
                .map(|c| c.working_dir.clone())
                .unwrap_or_default()
        } else {
            spec.working_dir.clone()
        };
        if let Some(dir) = working_dir_preopen(&working_dir, &preopens) {
            preopens.push(dir);
        }
        // The image's environment first; the container's wins.
        let mut env: Vec<(String, String)> = image
            .compat
            .iter()
            .flat_map(|c| c.env.iter())
            .filter_map(|e| e.split_once('='))
            .filter(|(k, _)| !spec.envs.iter().any(|(ck, _)| ck == k))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        env.extend(spec.envs.iter().cloned());
        Ok(GuestConfig {
            argv: program.argv,
            env,
            preopens,
            working_dir: (!working_dir.is_empty()).then_some(working_dir),
            log,
            limiter,
            network,
            dns: Arc::new(crate::network::DnsSettings {
                hosts_file: spec
                    .mounts
                    .iter()
                    .find(|m| m.container_path == "/etc/hosts")
                    .map(|m| PathBuf::from(&m.host_path)),
                ..dns
            }),
            stdio,
            egress_tls: self.inner.egress_tls.clone(),
        })
    }

    /// Turns mounts into preopened directories. WASI preopens only
    /// directories, so file mounts (`/etc/hosts`, `/dev/termination-log`)
    /// are gathered by parent directory into a per-container directory of
    /// hard links (copies across filesystems) that is preopened instead.
    fn preopens(
        &self,
        id: &ContainerId,
        mounts: &[Mount],
    ) -> std::result::Result<Vec<Preopen>, String> {
        let mut preopens = Vec::new();
        let mut file_groups: BTreeMap<String, Vec<&Mount>> = BTreeMap::new();
        for m in mounts {
            let meta = std::fs::metadata(&m.host_path).map_err(|e| {
                format!(
                    "mount source {:?} for {:?}: {e}",
                    m.host_path, m.container_path
                )
            })?;
            if meta.is_dir() {
                preopens.push(Preopen {
                    host_path: PathBuf::from(&m.host_path),
                    guest_path: m.container_path.clone(),
                    readonly: m.readonly,
                });
            } else {
                let parent = Path::new(&m.container_path)
                    .parent()
                    .map_or_else(|| "/".to_owned(), |p| p.to_string_lossy().into_owned());
                file_groups.entry(parent).or_default().push(m);
            }
        }
        for (n, (parent, files)) in file_groups.into_iter().enumerate() {
            if preopens.iter().any(|p| p.guest_path == parent) {
                tracing::warn!(container_id = %id, %parent, "file mounts under a directory that is itself mounted are not visible");
                continue;
            }
            let dir = self
                .container_dir(id)
                .join("file-mounts")
                .join(n.to_string());
            std::fs::create_dir_all(&dir).map_err(|e| format!("creating {dir:?}: {e}"))?;
            for m in &files {
                let name = Path::new(&m.container_path).file_name().ok_or_else(|| {
                    format!("mount target {:?} has no file name", m.container_path)
                })?;
                let target = dir.join(name);
                let _ = std::fs::remove_file(&target);
                if std::fs::hard_link(&m.host_path, &target).is_err() {
                    std::fs::copy(&m.host_path, &target).map_err(|e| {
                        format!(
                            "mounting file {:?} at {:?}: {e}",
                            m.host_path, m.container_path
                        )
                    })?;
                    if !m.readonly {
                        tracing::warn!(container_id = %id, host_path = %m.host_path, "file mount copied across filesystems: the guest's writes will not reach the host");
                    }
                }
            }
            preopens.push(Preopen {
                host_path: dir,
                guest_path: parent,
                readonly: files.iter().all(|m| m.readonly),
            });
        }
        Ok(preopens)
    }

    /// The CPU account of a pod with a CPU quota, made on first use.
    fn pod_cpu(&self, sandbox: &SandboxRecord) -> Option<Arc<PodCpu>> {
        let mut accounts = lock(&self.inner.pod_cpu);
        if let Some(account) = accounts.get(&sandbox.id) {
            return Some(account.clone());
        }
        let account = PodCpu::new(&sandbox.spec.resources)?;
        accounts.insert(sandbox.id.clone(), account.clone());
        Some(account)
    }

    /// The memory account of a pod, made on first use.
    fn pod_memory(&self, sandbox: &SandboxRecord) -> Arc<PodMemory> {
        lock(&self.inner.pod_memory)
            .entry(sandbox.id.clone())
            .or_insert_with(|| PodMemory::new(sandbox.spec.resources.memory_limit_bytes))
            .clone()
    }

    fn container_dir(&self, id: &ContainerId) -> PathBuf {
        self.inner.root.join("containers").join(id.as_str())
    }

    fn remove_container_files(&self, id: &ContainerId) {
        let dir = self.container_dir(id);
        if dir.exists()
            && let Err(error) = std::fs::remove_dir_all(&dir)
        {
            tracing::warn!(container_id = %id, ?dir, %error, "could not remove container files");
        }
    }

    /// Records the container's exit (once) and wakes everyone waiting.
    fn finish(&self, entry: &ContainerEntry, status: ExitStatus) {
        lock(&entry.kill).take();
        lock(&entry.log).take();
        lock(&entry.exec_limiter).take();
        if let Ok(mut stdin) = entry.stdin.try_lock() {
            stdin.take();
        }
        let mut record = lock(&entry.record);
        if record.exit(Timestamp::now(), status).is_err() {
            return;
        }
        if let Err(error) = self.inner.state.apply(&[Change::PutContainer(&record)]) {
            tracing::error!(container_id = %record.id, %error, "could not persist container exit");
        }
        let exit = record.exit.as_ref();
        tracing::info!(container_id = %record.id, exit_code = exit.map(|e| e.code), reason = exit.map(|e| e.reason.as_str()), "container exited");
        self.inner.events.emit(
            record.id.as_str(),
            &record.sandbox_id,
            LifecycleKind::Stopped,
        );
        drop(record);
        entry.exited.send_replace(true);
    }

    /// Runs `cmd` in running container `id` as a fresh Wasm instance, as
    /// `ExecSync` (and exec probes) ask: `cmd[0]` names a Wasm program of
    /// the container's image (for a compat image, a file on its `PATH` or
    /// a path in it; for a Wasm artifact, its one program, by the
    /// container's command, the image's name or `/proc/self/exe`). The
    /// instance shares the container's mounts, environment, working
    /// directory, memory account and network; its output is captured
    /// (at most [`EXEC_OUTPUT_LIMIT`] bytes per stream). An unknown program
    /// exits 127 and one that is not Wasm 126, with the reason on stderr,
    /// as a shell would. Past `timeout` the instance is ended and the call
    /// fails with `DeadlineExceeded`.
    pub async fn exec_sync(
        &self,
        id: &ContainerId,
        cmd: &[String],
        timeout: Option<Duration>,
    ) -> Result<ExecOutput> {
        let log = ContainerLog::capture(EXEC_OUTPUT_LIMIT);
        let failed = |code: i32, message: String| ExecOutput {
            exit_code: code,
            stdout: Vec::new(),
            stderr: format!("wasmlet: exec: {message}\n").into_bytes(),
        };
        let (guest, network) = match self
            .exec_instance(id, cmd, log.clone(), GuestStdio::default(), Vec::new())
            .await?
        {
            Ok(ready) => ready,
            Err((code, message)) => return Ok(failed(code, message)),
        };
        let run = self.spawn_exec(guest, network);
        let joined = match timeout {
            Some(limit) => match tokio::time::timeout(limit, run.wait()).await {
                Ok(joined) => joined,
                Err(_) => {
                    return Err(Error::DeadlineExceeded(format!(
                        "exec {} in container {id} did not finish within {limit:?}",
                        cmd[0]
                    )));
                }
            },
            None => run.wait().await,
        };
        let exit = joined?;
        if !exit.message.is_empty() {
            log.write_line(Stream::Stderr, &exit.message);
        }
        let (stdout, stderr) = log.captured();
        Ok(ExecOutput {
            exit_code: exit.code,
            stdout,
            stderr,
        })
    }

    /// Runs `cmd` in running container `id` as [`Agent::exec_sync`] does,
    /// with the client's streams instead of captured output (`Exec`): the
    /// instance reads `stdio.stdin` (end-of-file when absent or closed) and
    /// writes into `stdio.stdout` and `stdio.stderr` (stderr joins stdout
    /// for a terminal, which also gets `\r\n` line ends). Returns the exit
    /// code once the instance ended and all its output was handed over.
    /// Dropping the future ends the instance.
    pub async fn exec(&self, id: &ContainerId, cmd: &[String], stdio: ExecStdio) -> Result<i32> {
        let stdout = crate::stdio::ChannelOutput::new(stdio.stdout, stdio.terminal.is_some());
        let stderr = match stdio.stderr {
            Some(tx) if stdio.terminal.is_none() => crate::stdio::ChannelOutput::new(tx, false),
            _ => stdout.clone(),
        };
        let guest_stdio = GuestStdio {
            stdin: stdio
                .stdin
                .map(|r| Arc::new(wasmtime_wasi::cli::AsyncStdinStream::new(r))),
            stdout: Some(stdout),
            stderr: Some(stderr.clone()),
        };
        let log = ContainerLog::capture(0);
        let mut extra_env = Vec::new();
        if let Some(size) = stdio.terminal {
            extra_env.push(("TERM".to_owned(), "xterm".to_owned()));
            if size.width > 0 && size.height > 0 {
                extra_env.push(("COLUMNS".to_owned(), size.width.to_string()));
                extra_env.push(("LINES".to_owned(), size.height.to_string()));
            }
        }
        let (guest, network) = match self
            .exec_instance(id, cmd, log, guest_stdio, extra_env)
            .await?
        {
            Ok(ready) => ready,
            Err((code, message)) => {
                stderr.send(&format!("wasmlet: exec: {message}\n")).await;
                return Ok(code);
            }
        };
        let exit = self.spawn_exec(guest, network).wait().await?;
        if !exit.message.is_empty() {
            stderr
                .send(&format!("wasmlet: exec: {}\n", exit.message))
                .await;
        }
        Ok(exit.code)
    }

    /// Checks and instantiates an exec of `cmd` in container `id`, with
    /// `extra_env` after the container's. The inner error is a shell's
    /// answer (127 not found, 126 cannot run) and its reason; the outer one
    /// a call that cannot be honoured.
    async fn exec_instance(
        &self,
        id: &ContainerId,
        cmd: &[String],
        log: ContainerLog,
        stdio: GuestStdio,
        extra_env: Vec<(String, String)>,
    ) -> Result<std::result::Result<(crate::engine::Guest, GuestNetwork), (i32, String)>> {
        let Some(first) = cmd.first() else {
            return Err(Error::InvalidArgument("exec needs a command".into()));
        };
        let entry = self.container(id)?;
        let record = entry.snapshot();
        let limiter = lock(&entry.exec_limiter)
            .as_ref()
            .map(MemoryLimiter::sibling_with_own_oom);
        let Some(limiter) = limiter.filter(|_| record.state.is_running()) else {
            return Err(Error::FailedPrecondition(format!(
                "container {id} is not running: exec runs only in a running container"
            )));
        };
        let sandbox = self.sandbox(&record.sandbox_id)?;
        let sandbox = lock(&sandbox).clone();
        let image = self
            .inner
            .images
            .resolve(record.image_id.as_str())
            .ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "image {} of container {id} was removed",
                    record.image_id
                ))
            })?;
        let mut cmd = cmd.to_vec();
        // An empty argv[0] (and, in a compat image, `/proc/self/exe`) is
        // the container's own program.
        if first.is_empty() || (first == "/proc/self/exe" && image.compat.is_some()) {
            match program(
                &self.inner.images,
                &self.inner.programs,
                &image,
                &record.spec,
            ) {
                Ok(own) => cmd[0] = own.argv[0].clone(),
                Err(reason) => return Ok(Err((127, reason))),
            }
        }
        let argv0 = &cmd[0];
        if image.compat.is_none() {
            let names = artifact_program_names(&image, &record.spec);
            if !names.iter().any(|n| n == argv0) {
                return Ok(Err((
                    127,
                    format!(
                        "{argv0}: not found (this Wasm image holds one program, run as one of {names:?})"
                    ),
                )));
            }
        }
        let mut spec = record.spec.clone();
        spec.command = cmd.clone();
        spec.args.clear();
        spec.envs.extend(extra_env);
        if let Err(reason) = program(&self.inner.images, &self.inner.programs, &image, &spec) {
            return Ok(Err((127, format!("{argv0}: {reason}"))));
        }
        let prepared = match self.prepare(&image, &spec).await {
            Ok(p) => p,
            Err(reason) => return Ok(Err((126, format!("{argv0}: cannot run: {reason}")))),
        };
        let network = self.guest_network(&sandbox);
        let config = self
            .guest_config(
                &record.id,
                &image,
                &spec,
                GuestSetup {
                    log,
                    limiter,
                    network: network.clone(),
                    dns: sandbox.spec.dns.clone(),
                    stdio,
                },
            )
            .map_err(Error::FailedPrecondition)?;
        match self.inner.engine.instantiate(&prepared, config).await {
            Ok(crate::engine::Guest::Http(_)) => Ok(Err((
                126,
                format!("{argv0}: is a wasi:http function, not a command"),
            ))),
            Ok(guest) => Ok(Ok((guest, network))),
            Err(reason) => Ok(Err((126, format!("{argv0}: {reason}")))),
        }
    }

    /// Runs an exec'd instance on the guest runtime, in its pod's network.
    fn spawn_exec(&self, guest: crate::engine::Guest, network: GuestNetwork) -> ExecRun {
        ExecRun(
            self.inner
                .guests
                .handle()
                .spawn(InNamespace::new(guest.run(), &network)),
        )
    }

    /// Connects a client to running container `id` (`Attach`): its output
    /// from now on and, with `stdin`, its standard input (the container
    /// must have been created with `stdin`).
    pub async fn attach(&self, id: &ContainerId, stdin: bool) -> Result<Attachment> {
        let entry = self.container(id)?;
        let record = entry.snapshot();
        let log = lock(&entry.log).clone();
        let Some(log) = log.filter(|_| record.state.is_running()) else {
            return Err(Error::FailedPrecondition(format!(
                "container {id} is not running: attach needs a running container"
            )));
        };
        if stdin && !record.spec.stdin {
            return Err(Error::InvalidArgument(format!(
                "container {id} was created without stdin: attach cannot write to it"
            )));
        }
        Ok(Attachment {
            output: log.attach(),
            stdin: stdin.then(|| AttachedStdin {
                writer: entry.stdin.clone(),
                once: record.spec.stdin_once,
            }),
            terminal: record.spec.tty,
        })
    }

    /// Opens a TCP connection to `port` on the loopback of pod sandbox
    /// `id`'s network (`PortForward`): inside its network namespace, or the
    /// node's for a host-network pod.
    pub async fn port_forward(&self, id: &SandboxId, port: u16) -> Result<tokio::net::TcpStream> {
        let sandbox = self.sandbox(id)?;
        let sandbox = lock(&sandbox).clone();
        if sandbox.state != crate::sandbox::SandboxState::Ready {
            return Err(Error::FailedPrecondition(format!(
                "pod sandbox {id} is not ready: nothing to forward to"
            )));
        }
        let network = self.guest_network(&sandbox);
        if !network.allows_sockets() {
            return Err(Error::FailedPrecondition(format!(
                "pod sandbox {id} has no network (no CNI network was set up for it)"
            )));
        }
        let connect = tokio::net::TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, port));
        match InNamespace::new(connect, &network).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(Error::Network(format!(
                "connecting to port {port} in pod sandbox {id}: {e}"
            ))),
            Err(reason) => Err(Error::Internal(reason)),
        }
    }

    /// The program `image` runs by default (its Wasm layer, or a compat
    /// image's entrypoint file): digest, kind and bytes.
    async fn default_program(
        &self,
        image: &ImageRecord,
    ) -> Result<(crate::ids::Digest, WasmKind, Vec<u8>)> {
        let inner = self.inner.clone();
        let image = image.clone();
        tokio::task::spawn_blocking(move || {
            program(
                &inner.images,
                &inner.programs,
                &image,
                &ContainerSpec::default(),
            )
            .and_then(|program| read_program(&inner.images, &image, &program))
            .map_err(|reason| Error::InvalidImage {
                reference: image.id.to_string(),
                reason,
            })
        })
        .await
        .map_err(|e| Error::Internal(format!("reading an image's program: {e}")))?
    }

    fn stored_image(&self, reference: &str) -> Result<ImageRecord> {
        self.inner
            .images
            .resolve(reference)
            .ok_or_else(|| Error::NotFound {
                kind: "image",
                id: reference.to_owned(),
            })
    }

    /// What stored image `reference` runs: its program's kind, imports and
    /// exports (see [`crate::inspect`]) and whether it is compiled.
    pub async fn inspect_image(&self, reference: &str) -> Result<ImageInspection> {
        let image = self.stored_image(reference)?;
        let (wasm_digest, _, bytes) = self.default_program(&image).await?;
        let description =
            crate::inspect::describe(&bytes).map_err(|reason| Error::InvalidImage {
                reference: reference.to_owned(),
                reason,
            })?;
        let compiled = self
            .inner
            .engine
            .is_compiled(&wasm_digest, description.kind, &bytes);
        Ok(ImageInspection {
            image,
            wasm_size: bytes.len() as u64,
            wasm_digest,
            description,
            compiled,
        })
    }

    /// Compiles stored image `reference`'s program now, into memory and
    /// the disk cache, so that the first container of it starts without
    /// compiling.
    pub async fn precompile_image(&self, reference: &str) -> Result<Precompiled> {
        let image = self.stored_image(reference)?;
        let (wasm_digest, kind, bytes) = self.default_program(&image).await?;
        let engine = self.inner.engine.clone();
        if engine.is_compiled(&wasm_digest, kind, &bytes) {
            return Ok(Precompiled {
                wasm_digest,
                already_compiled: true,
                took: Duration::ZERO,
            });
        }
        let started = std::time::Instant::now();
        let digest = wasm_digest.clone();
        tokio::task::spawn_blocking(move || engine.prepare(&digest, kind, &bytes).map(drop))
            .await
            .map_err(|e| Error::Internal(format!("compiling: {e}")))?
            .map_err(|reason| Error::InvalidImage {
                reference: reference.to_owned(),
                reason,
            })?;
        Ok(Precompiled {
            wasm_digest,
            already_compiled: false,
            took: started.elapsed(),
        })
    }

    /// Reopens a running container's log file after the kubelet rotated
    /// it (renamed the file); see [`ContainerLog::reopen`].
    pub fn reopen_container_log(&self, id: &ContainerId) -> Result<()> {
        let entry = self.container(id)?;
        let log = lock(&entry.log).clone();
        let running = lock(&entry.record).state.is_running();
        match log {
            Some(log) if running => log.reopen(),
            _ => Err(Error::FailedPrecondition(format!(
                "container {id} is not running: only a running container's log can be reopened"
            ))),
        }
    }

    /// Ends the guest if it runs and waits until its exit is recorded.
    /// Wasm guests cannot handle SIGTERM, so the end is immediate.
    async fn kill_and_wait(
        &self,
        entry: &ContainerEntry,
        why: &'static str,
        timeout: Duration,
    ) -> Result<()> {
        if let Some(kill) = lock(&entry.kill).take() {
            let _ = kill.send(StopRequest {
                why,
                grace: timeout,
            });
        }
        if !lock(&entry.record).state.is_running() {
            return Ok(());
        }
        let mut exited = entry.exited.subscribe();
        match tokio::time::timeout(timeout + STOP_MARGIN, exited.wait_for(|e| *e)).await {
            Ok(_) => Ok(()),
            Err(_) => Err(Error::Internal(format!(
                "container {} did not stop within {:?}",
                lock(&entry.record).id,
                timeout + STOP_MARGIN
            ))),
        }
    }

    /// Stops a running container within `timeout`; stopping a container
    /// that is not running succeeds.
    pub async fn stop_container(&self, id: &ContainerId, timeout: Duration) -> Result<()> {
        let entry = self.container(id)?;
        self.kill_and_wait(
            &entry,
            "stopped by StopContainer (a Wasm guest cannot handle SIGTERM, so it is ended at once)",
            timeout,
        )
        .await
    }

    /// Removes a container in any state (a running one is stopped first).
    /// Removing a container that does not exist succeeds.
    pub async fn remove_container(&self, id: &ContainerId) -> Result<()> {
        let Ok(entry) = self.container(id) else {
            return Ok(());
        };
        self.kill_and_wait(&entry, "the container was removed", Duration::ZERO)
            .await?;
        self.inner
            .state
            .apply(&[Change::DeleteContainer(id.as_str())])?;
        let sandbox_id = lock(&entry.record).sandbox_id.clone();
        write(&self.inner.containers).remove(id);
        self.remove_container_files(id);
        tracing::info!(container_id = %id, "container removed");
        self.inner
            .events
            .emit(id.as_str(), &sandbox_id, LifecycleKind::Deleted);
        Ok(())
    }

    pub fn container_status(&self, id: &ContainerId) -> Result<ContainerRecord> {
        Ok(self.container(id)?.snapshot())
    }

    /// Containers matching `filter`, oldest first.
    pub fn list_containers(&self, filter: &ContainerFilter) -> Vec<ContainerRecord> {
        let containers = read(&self.inner.containers);
        // The kubelet often asks for one id: no scan then.
        let by_id = filter.id.as_deref().map(|id| {
            ContainerId::parse(id)
                .ok()
                .and_then(|id| containers.get(&id))
        });
        let candidates: Box<dyn Iterator<Item = &Arc<ContainerEntry>>> = match by_id {
            Some(one) => Box::new(one.into_iter()),
            None => Box::new(containers.values()),
        };
        let mut out: Vec<ContainerRecord> = candidates
            .filter_map(|c| {
                let record = lock(&c.record);
                filter.matches(&record).then(|| record.clone())
            })
            .collect();
        out.sort_by_key(|c| c.created_at);
        out
    }

    /// Changes a container's limits; a running guest is held to the new
    /// ones at once, without a restart.
    pub fn update_container_resources(&self, id: &ContainerId, resources: Resources) -> Result<()> {
        let entry = self.container(id)?;
        let mut record = lock(&entry.record);
        let before = record.clone();
        record.spec.resources = resources.clone();
        if let Err(e) = self.inner.state.apply(&[Change::PutContainer(&record)]) {
            *record = before;
            return Err(e);
        }
        if let Some(live) = lock(&entry.limits).as_ref() {
            live.set(&resources);
        }
        tracing::info!(container_id = %id, ?resources, "container resources updated");
        Ok(())
    }

    // ----- stats -----

    fn usage_of(&self, entry: &ContainerEntry) -> ContainerUsage {
        let record = entry.snapshot();
        let now = Timestamp::now();
        let guest = lock(&entry.usage).clone();
        let cpu = guest.as_ref().map_or(0, |u| u.cpu_nanos());
        let running = record.state.is_running();
        let memory = guest.as_ref().map_or(0, |u| u.memory_bytes());
        let working_set = if running {
            memory + INSTANCE_OVERHEAD_BYTES
        } else {
            0
        };
        let nano_cores = lock(&entry.cpu_rate).observe(now, cpu);
        let available = record
            .spec
            .resources
            .memory_limit_bytes
            .map(|l| l.saturating_sub(working_set));
        ContainerUsage {
            record,
            usage: Usage {
                timestamp: now,
                cpu_nanos: cpu,
                nano_cores,
                working_set_bytes: working_set,
                available_bytes: available,
                running,
                throttled_periods: guest.as_ref().map_or(0, |u| u.throttled_periods()),
                http: guest.as_ref().map(|u| u.http()).unwrap_or_default(),
            },
        }
    }

    /// Resource use of one container.
    pub fn container_stats(&self, id: &ContainerId) -> Result<ContainerUsage> {
        let entry = self.container(id)?;
        Ok(self.usage_of(&entry))
    }

    /// Resource use of the containers matching `filter`.
    pub fn list_container_stats(&self, filter: &ContainerFilter) -> Vec<ContainerUsage> {
        let entries: Vec<Arc<ContainerEntry>> =
            read(&self.inner.containers).values().cloned().collect();
        let mut out: Vec<ContainerUsage> = entries
            .iter()
            .filter(|e| filter.matches(&lock(&e.record)))
            .map(|e| self.usage_of(e))
            .collect();
        out.sort_by_key(|c| c.record.created_at);
        out
    }

    fn pod_usage(&self, sandbox: SandboxRecord) -> PodUsage {
        let entries = self.containers_of(&sandbox.id);
        self.pod_usage_of(sandbox, &entries)
    }

    /// A pod's usage from its containers' entries.
    fn pod_usage_of(&self, sandbox: SandboxRecord, entries: &[Arc<ContainerEntry>]) -> PodUsage {
        let containers: Vec<ContainerUsage> = entries.iter().map(|e| self.usage_of(e)).collect();
        let now = Timestamp::now();
        let cpu: u64 = containers.iter().map(|c| c.usage.cpu_nanos).sum();
        let working_set: u64 = containers.iter().map(|c| c.usage.working_set_bytes).sum();
        let nano_cores = {
            let mut samples = lock(&self.inner.pod_samples);
            samples
                .entry(sandbox.id.clone())
                .or_default()
                .observe(now, cpu)
        };
        let limit = sandbox.spec.resources.memory_limit_bytes;
        PodUsage {
            usage: Usage {
                timestamp: now,
                cpu_nanos: cpu,
                nano_cores,
                working_set_bytes: working_set,
                available_bytes: limit.map(|l| l.saturating_sub(working_set)),
                running: containers.iter().any(|c| c.usage.running),
                throttled_periods: containers.iter().map(|c| c.usage.throttled_periods).sum(),
                http: containers.iter().map(|c| c.usage.http).sum(),
            },
            record: sandbox,
            containers,
        }
    }

    /// Resource use of a pod and its containers.
    pub fn pod_sandbox_stats(&self, id: &SandboxId) -> Result<PodUsage> {
        Ok(self.pod_usage(self.pod_sandbox_status(id)?))
    }

    /// Resource use of the pods matching `filter`.
    pub fn list_pod_sandbox_stats(&self, filter: &SandboxFilter) -> Vec<PodUsage> {
        // Containers grouped by pod in one pass: asking per pod would scan
        // every container once per pod.
        let mut by_pod: HashMap<SandboxId, Vec<Arc<ContainerEntry>>> = HashMap::new();
        for entry in read(&self.inner.containers).values() {
            let sandbox = lock(&entry.record).sandbox_id.clone();
            by_pod.entry(sandbox).or_default().push(entry.clone());
        }
        self.list_pod_sandboxes(filter)
            .into_iter()
            .map(|s| {
                let entries = by_pod.remove(&s.id).unwrap_or_default();
                self.pod_usage_of(s, &entries)
            })
            .collect()
    }

    // ----- images -----

    /// Packages the Wasm file at `path` as an OCI Wasm artifact named
    /// `reference` in the image store.
    pub fn import_image(&self, path: &Path, reference: &str) -> Result<ImageRecord> {
        let bytes = std::fs::read(path).map_err(Error::io("reading", path))?;
        let record = self.inner.images.import_wasm(&bytes, reference)?;
        tracing::info!(image = %record.id, reference, "image imported");
        Ok(record)
    }

    /// Pulls `reference` from its registry into the store. An image that
    /// was imported (not pulled) has no registry and is served as stored.
    /// Concurrent pulls of one reference share one download.
    pub async fn pull_image(
        &self,
        reference: &str,
        credentials: &Credentials,
    ) -> Result<ImageRecord> {
        crate::image::ImageName::parse(reference)?;
        if let Some(local) = self.inner.images.resolve(reference)
            && local.imported
        {
            return Ok(local);
        }
        let key = format!(
            "{reference}\0{}\0{}{}{}",
            credentials.username,
            credentials.auth,
            credentials.identity_token,
            credentials.registry_token
        );
        let shared = {
            let mut pulls = lock(&self.inner.pulls);
            pulls
                .entry(key.clone())
                .or_insert_with(|| {
                    let agent = self.clone();
                    let reference = reference.to_owned();
                    let credentials = credentials.clone();
                    let fut: futures::future::BoxFuture<'static, PullResult> =
                        Box::pin(async move {
                            let result = agent
                                .inner
                                .registry
                                .pull(&agent.inner.images, &reference, &credentials)
                                .await
                                .map_err(Arc::new);
                            lock(&agent.inner.pulls).remove(&key);
                            if let Ok(image) = &result {
                                agent.precompile_in_background(image.clone());
                            }
                            result
                        });
                    futures::FutureExt::shared(fut)
                })
                .clone()
        };
        // Run the download on its own task so a kubelet that gives up on
        // the call does not cancel it for the others waiting.
        let handle = tokio::spawn(shared);
        match handle.await {
            Ok(Ok(image)) => Ok(image),
            Ok(Err(e)) => Err(e.duplicate()),
            Err(e) => Err(Error::Internal(format!("pull task failed: {e}"))),
        }
    }

    /// Compiles a freshly pulled image off the request path, so that its
    /// first container starts from the compiled artifact.
    fn precompile_in_background(&self, image: ImageRecord) {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let _permit = inner.compile_slots.acquire().await;
            let digest = image.wasm_digest.clone();
            let worker = inner.clone();
            let done = tokio::task::spawn_blocking(move || {
                let inner = worker;
                let bytes = inner
                    .images
                    .read_blob(&image.wasm_digest)
                    .map_err(|e| e.to_string())?;
                inner
                    .engine
                    .precompile(&image.wasm_digest, image.wasm_kind, &bytes)
            })
            .await;
            match done {
                Ok(Ok(())) => tracing::debug!(%digest, "precompiled"),
                Ok(Err(reason)) => {
                    tracing::warn!(%digest, %reason, "precompiling the pulled image failed; containers will report why when they start")
                }
                Err(e) => tracing::warn!(%digest, error = %e, "precompile task failed"),
            }
        });
    }

    /// Whether `reference` names a Wasm image, from its registry's
    /// manifest; nothing is downloaded into the store.
    pub async fn probe_image(
        &self,
        reference: &str,
        credentials: &Credentials,
    ) -> Result<crate::registry::ImageKind> {
        self.inner.registry.probe(reference, credentials).await
    }

    pub fn image_status(&self, reference: &str) -> Option<ImageRecord> {
        self.inner.images.resolve(reference)
    }

    /// The stored manifest of an image, for verbose status.
    pub fn image_manifest(&self, image: &ImageRecord) -> Result<Vec<u8>> {
        self.inner.images.read_blob(&image.manifest_digest)
    }

    pub fn list_images(&self) -> Vec<ImageRecord> {
        self.inner.images.list()
    }

    /// Removes an image; removing one that does not exist succeeds.
    pub fn remove_image(&self, reference: &str) -> Result<()> {
        if let Some(image) = self.inner.images.resolve(reference) {
            self.inner.images.remove(image.id.as_str())?;
            self.inner.engine.forget(&image.wasm_digest);
            lock(&self.inner.programs).retain(|(id, _), _| *id != image.id);
            tracing::info!(image = %image.id, reference, "image removed");
        }
        Ok(())
    }

    pub fn image_fs_usage(&self) -> Result<FsUsage> {
        self.inner.images.usage()
    }
}
