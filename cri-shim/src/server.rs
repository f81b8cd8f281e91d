//! Serving the CRI services on a unix socket.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use wasmlet_agent::{Agent, AgentConfig};
use wasmlet_proto::admin::admin_server::AdminServer;
use wasmlet_proto::cri::image_service_server::{ImageService, ImageServiceServer};
use wasmlet_proto::cri::runtime_service_server::{RuntimeService, RuntimeServiceServer};

use crate::admin::AdminService;
use crate::config::Settings;
use crate::delegate::{Downstream, Routed};
use crate::logging::LogLevel;
use crate::service::{Cri, CriSettings};
use crate::streaming::Streaming;
use crate::traced::Traced;

/// The kubelet's default maximum gRPC message size.
const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// Binds `socket` (mode 0660), replacing a stale socket left by a crashed
/// run but refusing to steal one another agent still answers on.
pub fn bind(socket: &Path) -> anyhow::Result<UnixListener> {
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {parent:?}"))?;
    }
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            bail!("{socket:?} is in use: another runtime is listening on it");
        }
        tracing::warn!(?socket, "replacing a stale socket");
        std::fs::remove_file(socket)
            .with_context(|| format!("removing stale socket {socket:?}"))?;
    }
    let listener = UnixListener::bind(socket).with_context(|| format!("binding {socket:?}"))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("setting the mode of {socket:?}"))?;
    Ok(listener)
}

/// Sets the agent's own `oom_score_adj`, so the kernel's OOM killer ends
/// other processes before the one holding every pod's guests (lowering it
/// needs CAP_SYS_RESOURCE; without it the agent says so and goes on).
pub fn set_oom_score_adj(adj: i64) {
    match std::fs::write("/proc/self/oom_score_adj", adj.to_string()) {
        Ok(()) => tracing::info!(oom_score_adj = adj, "set the agent's OOM score adjustment"),
        Err(error) => tracing::warn!(
            oom_score_adj = adj,
            %error,
            "cannot set the agent's OOM score adjustment (lowering it needs CAP_SYS_RESOURCE); the kernel may choose the agent, and every pod with it, over other processes"
        ),
    }
}

/// Opens the agent for `settings`.
pub fn open_agent(settings: &Settings) -> anyhow::Result<Agent> {
    Agent::open(AgentConfig {
        root: settings.root.clone(),
        registry: settings.registry.clone(),
        compile_parallelism: settings.compile_parallelism,
        fast_tier_min_bytes: settings.fast_tier_min_bytes,
        network: settings.network.clone(),
        http: settings.http.clone(),
        http_pool_instances: settings.http_pool_instances,
        http_ca_file: settings.http_ca_file.clone(),
        node_memory_budget: settings.node_memory_budget,
    })
    .with_context(|| format!("opening the state under {:?}", settings.root))
}

/// Serves CRI for `agent` on `listener` until `shutdown` resolves, then
/// removes the socket file. `log` is the process's log filter, which the
/// admin API changes (none: it answers that it cannot).
pub async fn serve(
    agent: Agent,
    settings: &Settings,
    log: Option<LogLevel>,
    listener: UnixListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    agent.remove_orphaned_networks().await;
    // Compiled programs of images removed while no agent ran go, in the
    // background (compat images' programs are hashed for it).
    let collector = agent.clone();
    tokio::spawn(async move {
        if let Err(error) = collector.collect_compiled().await {
            tracing::warn!(%error, "collecting the compiled programs no image runs");
        }
    });
    let metrics = settings
        .metrics_address
        .map(|address| tokio::spawn(crate::metrics::serve(address, agent.clone())));
    let streaming = Streaming::start(settings.streaming.clone(), agent.clone())
        .await
        .with_context(|| {
            format!(
                "starting the streaming server on {}",
                settings.streaming.address
            )
        })?;
    let cri = Cri::new(
        agent.clone(),
        CriSettings {
            runtime_handlers: settings.runtime_handlers.clone(),
            cgroup_driver: settings.cgroup_driver,
        },
    )
    .with_streaming(streaming);
    let admin = AdminServer::new(
        AdminService::new(agent.clone())
            .with_log_level(log)
            .with_import_limit(settings.registry.max_blob_bytes),
    );
    let result = match &settings.delegate {
        None => {
            tracing::info!(socket = ?settings.socket, root = ?settings.root, "serving CRI v1");
            serve_services(cri, admin, listener, shutdown).await
        }
        Some(delegate) => {
            tracing::info!(socket = ?settings.socket, root = ?settings.root, downstream = ?delegate.socket, "serving CRI v1 in front of a downstream runtime");
            let routed = Routed::new(
                cri,
                agent.clone(),
                Downstream::new(delegate),
                settings.runtime_handlers.clone(),
            );
            serve_services(routed, admin, listener, shutdown).await
        }
    };
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    agent.close_mounts();
    let _ = std::fs::remove_file(&settings.socket);
    result.context("serving CRI")
}

/// CRI (`services`, each call in a span of its own) and wasmlet's admin
/// API on one socket.
async fn serve_services<S>(
    services: S,
    admin: AdminServer<AdminService>,
    listener: UnixListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error>
where
    S: RuntimeService + ImageService + Clone,
{
    let services = Traced(services);
    let runtime = RuntimeServiceServer::new(services.clone())
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let images = ImageServiceServer::new(services)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let (stopping, stopped) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        let _ = stopping.send(());
    };
    let server = tonic::transport::Server::builder()
        .layer(crate::deadline::DeadlineLayer)
        .add_service(runtime)
        .add_service(images)
        .add_service(admin)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown);
    // Calls in flight and connections get SHUTDOWN_GRACE to end once the
    // agent is told to stop: a client that never reads its GOAWAY (one
    // stalled, or blocked) must not keep the agent from stopping.
    let grace = async move {
        match stopped.await {
            Ok(()) => tokio::time::sleep(SHUTDOWN_GRACE).await,
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        served = server => served,
        () = grace => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "clients still connected after the grace period: stopping without them");
            Ok(())
        }
    }
}

/// How long a stopping agent waits for calls in flight and its clients'
/// connections to end.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// An agent served on a private socket inside this process, for `play`.
pub struct InProcess {
    pub socket: PathBuf,
    pub agent: Agent,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl InProcess {
    /// Starts an agent with `base`'s settings but a temporary root and
    /// socket.
    pub async fn start(base: &Settings) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("wasmlet-play-")
            .tempdir()
            .context("creating a temporary root")?;
        let settings = Settings {
            socket: dir.path().join("wasmlet.sock"),
            root: dir.path().join("root"),
            // A pod played beside a node's agent must not take its port.
            metrics_address: None,
            ..base.clone()
        };
        let agent = open_agent(&settings)?;
        let listener = bind(&settings.socket)?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = agent.clone();
        let task_settings = settings.clone();
        let task = tokio::spawn(async move {
            serve(served, &task_settings, None, listener, async {
                let _ = stopped.await;
            })
            .await
        });
        Ok(Self {
            socket: settings.socket,
            agent,
            stop: Some(stop),
            task: Some(task),
            _dir: dir,
        })
    }

    /// Stops serving and waits for the server to end.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.context("joining the in-process agent")??;
        }
        Ok(())
    }
}
