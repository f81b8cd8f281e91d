//! A container's run: StartContainer and the guest's end.
//!
//! A [`Run`] is one run of a command or HTTP guest, in the spirit of
//! runwasi's `Instance`: it owns the way to kill it, its exit (published
//! once), its usage and live limits, its log, its stdin and the memory
//! account exec'd instances share. It is made whole before anything is
//! recorded: the container becomes RUNNING in one step that commits the
//! state, puts the run in the container and spawns the guest, so no call
//! (nor a client going away) can leave a container running with no guest.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::{oneshot, watch};

use super::containers::{ContainerEntry, PreparedProgram, RunSlot};
use super::guest_config::{GuestSetup, WriteBack, pod_hostname};
use super::{Agent, lock};
use crate::error::{Error, Result};
use crate::model::container::{ContainerRecord, ExitStatus};
use crate::model::events::LifecycleKind;
use crate::model::ids::ContainerId;
use crate::model::sandbox::SandboxRecord;
use crate::model::time::Timestamp;
use crate::network::{GuestNetwork, InNamespace};
use crate::runtime::error::GuestError;
use crate::runtime::guest::{Guest, GuestExit, TRAP_EXIT_CODE};
use crate::runtime::host::GuestStdio;
use crate::runtime::http::{HttpExit, HttpFunction, HttpOptions, Metering, StopRequest};
use crate::runtime::limits::{LiveLimits, MemoryLimiter, PodCpu};
use crate::runtime::logs::{ContainerLog, Stream};
use crate::runtime::metering::Metered;
use crate::runtime::node_memory::GuestAccount;
use crate::runtime::usage::GuestUsage;
use crate::state::Change;

/// One run of a container's guest, from its start to its exit.
pub(super) struct Run {
    /// Taken by whoever ends the guest.
    kill: Mutex<Option<oneshot::Sender<StopRequest>>>,
    /// Set once, when the exit is recorded.
    exited: watch::Sender<bool>,
    /// What the guest uses (CPU, memory, requests).
    pub(super) usage: Arc<GuestUsage>,
    /// The limits the guest is held to, changed live.
    pub(super) limits: Arc<LiveLimits>,
    /// Where its output goes.
    pub(super) log: ContainerLog,
    /// Its memory account, which exec'd instances share.
    pub(super) exec_limiter: MemoryLimiter,
    /// Its memory on the node, for the node memory guard.
    node_memory: Arc<GuestAccount>,
    /// The write end of its stdin (a container created with `stdin`),
    /// shared by attached clients; taken to close it.
    pub(super) stdin: Arc<tokio::sync::Mutex<Option<tokio::io::DuplexStream>>>,
    /// Copied file mounts whose contents go back to the host at the end.
    write_back: Vec<WriteBack>,
}

impl Run {
    /// Asks the guest to end (once; later asks do nothing).
    pub(super) fn kill(&self, why: &'static str, grace: Duration) {
        if let Some(kill) = lock(&self.kill).take() {
            let _ = kill.send(StopRequest { why, grace });
        }
    }

    /// Resolves once the run's exit is recorded.
    pub(super) async fn exited(&self) {
        let mut exited = self.exited.subscribe();
        let _ = exited.wait_for(|e| *e).await;
    }
}

/// What a started guest does: run a command, or serve HTTP.
enum Body {
    Command {
        guest: Guest,
        network: GuestNetwork,
        pod_cpu: Option<Arc<PodCpu>>,
        /// Set when the guest's memory growth was refused.
        oom: Arc<std::sync::atomic::AtomicBool>,
    },
    Http {
        function: HttpFunction,
        listener: std::net::TcpListener,
        options: HttpOptions,
        metering: Metering,
    },
}

/// A run ready to go: everything made, nothing recorded.
struct Launch {
    run: Arc<Run>,
    kill_rx: oneshot::Receiver<StopRequest>,
    body: Body,
}

/// Why a guest could not start, and whether its memory limit (or the
/// node's budget) was why.
struct StartError {
    cause: GuestError,
    oom: bool,
    node_short: bool,
}

impl Agent {
    /// Starts a created container: its guest is instantiated, then the
    /// container is recorded RUNNING as the guest is spawned. If the guest
    /// cannot start (its program does not compile or link, a mount is
    /// missing), the container becomes EXITED with reason `StartError`, the
    /// reason is written to its log, and `StartFailed` is returned.
    ///
    /// The work runs on a task of its own; a call retried while it runs, or
    /// after it succeeded without its caller hearing of it, gets its answer.
    pub async fn start_container(&self, id: &ContainerId) -> Result<()> {
        let agent = self.clone();
        let id = id.clone();
        self.inner
            .container_starts
            .run(
                id.clone(),
                async move { agent.start_container_now(&id).await },
            )
            .await
    }

    async fn start_container_now(&self, id: &ContainerId) -> Result<()> {
        let started = std::time::Instant::now();
        let entry = self.container(id)?;
        let _op = entry.ops.lock().await;
        // It may have been removed while this waited.
        let entry = self.container(id)?;
        let record = entry.snapshot();
        record.clone().start(Timestamp::now())?;
        let sandbox = self.pod_sandbox_status(&record.sandbox_id)?;
        sandbox.check_accepts_containers()?;
        let log = ContainerLog::open(record.log_file.as_deref());
        let launched = match log {
            Ok(log) => self
                .launch(&entry, &record, &sandbox, log.clone())
                .await
                .map_err(|e| (e, Some(log))),
            Err(e) => Err((
                StartError {
                    cause: GuestError::Log {
                        detail: e.to_string(),
                    },
                    oom: false,
                    node_short: false,
                },
                None,
            )),
        };
        match launched {
            Ok(launch) => {
                self.commit_running(&entry, launch)?;
                crate::metrics::global()
                    .phase(crate::metrics::Phase::Instantiate, started.elapsed());
                Ok(())
            }
            Err((error, log)) => {
                let reason = error.cause.to_string();
                if let Some(log) = log {
                    log.write_line(Stream::Stderr, &format!("wasmlet: {reason}"));
                    log.close();
                }
                let status = if error.oom {
                    oom_killed(
                        error.node_short,
                        memory_note(&record, error.node_short, &reason),
                    )
                } else {
                    ExitStatus::start_error(reason)
                };
                self.finish(&entry, None, status);
                Err(Error::StartFailed {
                    id: id.to_string(),
                    source: Box::new(error.cause),
                })
            }
        }
    }

    /// Makes everything a run of `record`'s guest needs and instantiates
    /// it; nothing of the guest runs yet and nothing is recorded.
    async fn launch(
        &self,
        entry: &ContainerEntry,
        record: &ContainerRecord,
        sandbox: &SandboxRecord,
        log: ContainerLog,
    ) -> std::result::Result<Launch, StartError> {
        let usage = GuestUsage::new();
        let pod_cpu = self.pod_cpu(sandbox);
        let limits = LiveLimits::new(&record.spec.resources);
        let limiter = MemoryLimiter::live(
            limits.clone(),
            self.pod_memory(sandbox),
            &self.inner.node_memory,
        )
        .with_usage(usage.clone());
        let node_memory = limiter.account();
        let oom = limiter.oom_flag();
        let exec_limiter = limiter.sibling_with_own_oom();
        let network = self.guest_network(sandbox);
        let mut stdio = GuestStdio::default();
        let mut stdin = None;
        if record.spec.stdin {
            let (writer, reader) = crate::runtime::stdio::stdin_pipe();
            stdin = Some(writer);
            stdio.stdin = Some(reader);
        }
        let setup = GuestSetup {
            log: log.clone(),
            limiter,
            network: network.clone(),
            dns: sandbox.spec.dns.clone(),
            stdio,
            hostname: pod_hostname(sandbox),
        };
        let failed = |cause: GuestError| StartError {
            cause,
            oom: oom.load(std::sync::atomic::Ordering::Relaxed),
            node_short: node_memory.node_short(),
        };
        let (guest, write_back) = self
            .instantiate(entry, record, setup)
            .await
            .map_err(failed)?;
        let (kill_tx, kill_rx) = oneshot::channel();
        let run = Arc::new(Run {
            kill: Mutex::new(Some(kill_tx)),
            exited: watch::Sender::new(false),
            usage: usage.clone(),
            limits: limits.clone(),
            log,
            exec_limiter,
            node_memory: node_memory.clone(),
            stdin: Arc::new(tokio::sync::Mutex::new(stdin)),
            write_back,
        });
        let body = match guest {
            Guest::Http(function) => {
                let options = self.http_options(sandbox, &record.spec);
                let listener = function
                    .bind(std::net::SocketAddr::new(options.address, options.port))
                    .map_err(failed)?;
                let metering = Metering {
                    usage,
                    // Its own quota follows UpdateContainerResources.
                    shared: std::iter::once(PodCpu::following(limits))
                        .chain(pod_cpu)
                        .collect(),
                };
                Body::Http {
                    function,
                    listener,
                    options,
                    metering,
                }
            }
            guest => Body::Command {
                guest,
                network,
                pod_cpu,
                oom,
            },
        };
        Ok(Launch { run, kill_rx, body })
    }

    /// Records the container RUNNING, puts the run in it and spawns the
    /// guest, in one step under the record's lock. If the commit fails the
    /// guest never runs and the container stays CREATED.
    fn commit_running(&self, entry: &Arc<ContainerEntry>, launch: Launch) -> Result<()> {
        let Launch { run, kill_rx, body } = launch;
        let mut record = lock(&entry.record);
        let started = self.inner.state.update_sync(&mut record, |r| {
            crate::failpoint::hit("start.before_commit")?;
            r.start(Timestamp::now())?;
            Ok(true)
        });
        if let Err(e) = started {
            run.log.close();
            return Err(e);
        }
        crate::failpoint::hit("start.after_commit")?;
        // An update that came while the guest was made applies now.
        run.limits.set(&record.spec.resources);
        // The container left CREATED: a create retried from now on is not
        // a retry of the one that made it.
        self.forget_create(&record);
        *lock(&entry.run) = RunSlot::Running(run.clone());
        // From now on the node memory guard may choose it to end.
        let chosen = Arc::downgrade(&run);
        run.node_memory.set_ender(Box::new(move || {
            if let Some(run) = chosen.upgrade() {
                run.kill(NODE_SHORT_OF_MEMORY, Duration::ZERO);
            }
        }));
        let id = record.id.clone();
        let log = run.log.clone();
        log.time_first_output();
        let guest: BoxFuture<'static, ExitStatus> = match body {
            Body::Http {
                function,
                listener,
                options,
                metering,
            } => {
                tracing::info!(container_id = %id, address = %options.address, port = options.port, "HTTP function serving");
                let on = if options.address.is_unspecified() {
                    format!("port {}", options.port)
                } else {
                    std::net::SocketAddr::new(options.address, options.port).to_string()
                };
                log.write_line(
                    Stream::Stderr,
                    &format!("wasmlet: serving wasi:http on {on}"),
                );
                let log = log.clone();
                let node_memory = run.node_memory.clone();
                Box::pin(async move {
                    match function.serve(listener, options, metering, kill_rx).await {
                        HttpExit::Drained => ExitStatus::guest(0, String::new()),
                        HttpExit::Interrupted { .. } if node_memory.doomed() => {
                            oom_killed(true, node_short_note())
                        }
                        HttpExit::Interrupted { why, requests } => ExitStatus::killed(&format!(
                            "{why}; {requests} request(s) still in flight were interrupted"
                        )),
                        HttpExit::Failed(message) => {
                            log.write_line(Stream::Stderr, &format!("wasmlet: {message}"));
                            ExitStatus::guest(TRAP_EXIT_CODE, message)
                        }
                    }
                })
            }
            Body::Command {
                guest,
                network,
                pod_cpu,
                oom,
            } => {
                let memory = record.clone();
                let (usage, limits, log) = (run.usage.clone(), run.limits.clone(), log.clone());
                let node_memory = run.node_memory.clone();
                Box::pin(async move {
                    let running = InNamespace::new(guest.run(), &network);
                    tokio::select! {
                        exit = Metered::new(running, usage).with_limits(limits).with_pod_cpu(pod_cpu) => {
                            let exit = exit.unwrap_or_else(|error| GuestExit {
                                code: TRAP_EXIT_CODE,
                                message: error.to_string(),
                            });
                            if !exit.message.is_empty() {
                                log.write_line(Stream::Stderr, &exit.message);
                            }
                            if exit.code != 0 && oom.load(std::sync::atomic::Ordering::Relaxed) {
                                {
                                let node_short = node_memory.node_short();
                                oom_killed(node_short, memory_note(&memory, node_short, &exit.message))
                            }
                            } else {
                                ExitStatus::guest(exit.code, exit.message)
                            }
                        }
                        stop = kill_rx => if node_memory.doomed() {
                            oom_killed(true, node_short_note())
                        } else {
                            ExitStatus::killed(stop.map_or("the runtime stopped it", |s| s.why))
                        },
                    }
                })
            }
        };
        let agent = self.clone();
        let owner = entry.clone();
        let container_id = id.clone();
        self.inner.guests.handle().spawn(async move {
            // A fault of wasmlet's own while it runs this guest ends this
            // container, not the node, and never leaves it running with
            // no guest behind it.
            let status = match std::panic::AssertUnwindSafe(guest).catch_unwind().await {
                Ok(status) => status,
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    tracing::error!(%container_id, panic = %what, "wasmlet failed while running a guest; the container is ended");
                    let message = "internal error in wasmlet while running the guest (the node's wasmlet log has the details)";
                    log.write_line(Stream::Stderr, &format!("wasmlet: {message}"));
                    ExitStatus::lost(message.to_owned())
                }
            };
            for file in &run.write_back {
                file.write_back();
            }
            agent.release_read_only_binds(&container_id);
            log.close();
            agent.finish(&owner, Some(run.as_ref()), status);
        });
        tracing::info!(container_id = %id, "container started");
        self.inner
            .events
            .emit(id.as_str(), &record.sandbox_id, LifecycleKind::Started);
        Ok(())
    }

    /// Where a pod's guests open sockets.
    pub(super) fn guest_network(&self, sandbox: &SandboxRecord) -> GuestNetwork {
        if sandbox.spec.host_network {
            return GuestNetwork::Host;
        }
        match self.inner.networks.namespace(&sandbox.id) {
            Some(ns) => GuestNetwork::Pod(ns),
            None => GuestNetwork::None,
        }
    }

    /// Instantiates `record`'s program (compiled at creation, or now for a
    /// container recovered from an earlier agent).
    async fn instantiate(
        &self,
        entry: &ContainerEntry,
        record: &ContainerRecord,
        setup: GuestSetup,
    ) -> std::result::Result<(Guest, Vec<WriteBack>), GuestError> {
        let image = self
            .inner
            .images
            .resolve(record.image_id.as_str())
            .ok_or_else(|| GuestError::ImageRemoved {
                image: record.image_id.to_string(),
            })?;
        let cached: Option<PreparedProgram> = lock(&entry.prepared).clone();
        let prepared = match cached {
            Some(p) => p?,
            None => self.prepare(&image, &record.spec).await?,
        };
        let (config, write_back) = self.guest_config(&record.id, &image, &record.spec, setup)?;
        let guest = self.inner.engine.instantiate(&prepared, config).await?;
        Ok((guest, write_back))
    }

    /// Records the container's exit (once) in one step: the state, the
    /// commit and the end of `run` (its stdin closed, its usage kept), then
    /// wakes everyone waiting for it. `run` is `None` for a guest that
    /// never started.
    pub(super) fn finish(&self, entry: &ContainerEntry, run: Option<&Run>, status: ExitStatus) {
        let mut record = lock(&entry.record);
        if record.exit(Timestamp::now(), status).is_err() {
            return;
        }
        if let Err(error) = crate::failpoint::hit("stop.before_record")
            .and_then(|()| self.inner.state.apply(&[Change::PutContainer(&record)]))
        {
            tracing::error!(container_id = %record.id, %error, "could not persist container exit");
        }
        // A start retried from now on is a new call (and finds the exit).
        self.inner.container_starts.forget(&record.id);
        if let Some(run) = run {
            lock(&run.kill).take();
            if let Ok(mut stdin) = run.stdin.try_lock() {
                stdin.take();
            }
            *lock(&entry.run) = RunSlot::Ended(run.usage.clone());
        }
        let exit = record.exit.as_ref();
        tracing::info!(container_id = %record.id, exit_code = exit.map(|e| e.code), reason = exit.map(|e| e.reason.as_str()), "container exited");
        self.inner.events.emit(
            record.id.as_str(),
            &record.sandbox_id,
            LifecycleKind::Stopped,
        );
        drop(record);
        if let Some(run) = run {
            run.exited.send_replace(true);
        }
    }
}

/// Why the node memory guard ends a guest.
const NODE_SHORT_OF_MEMORY: &str = "the node ran short of memory for its guests";

/// The message of a guest the node memory guard ended.
/// An `OOMKilled` exit, counted by why.
fn oom_killed(node_short: bool, note: String) -> ExitStatus {
    crate::metrics::global().oom_killed(if node_short {
        crate::metrics::OomReason::NodeMemory
    } else {
        crate::metrics::OomReason::Limit
    });
    ExitStatus::oom_killed(note)
}

fn node_short_note() -> String {
    format!(
        "{NODE_SHORT_OF_MEMORY}: wasmlet ended this guest, ranked first by its oom_score_adj (its QoS class) and size"
    )
}

/// The message of a guest that died at its memory limit, or refused
/// growth by the node's budget.
fn memory_note(record: &ContainerRecord, node_short: bool, message: &str) -> String {
    if node_short {
        return format!(
            "{NODE_SHORT_OF_MEMORY}: its growth was refused as it ranked first to end: {message}"
        );
    }
    match record.spec.resources.memory_limit_bytes {
        Some(limit) => {
            format!("the guest reached its memory limit ({limit} bytes, or its pod's): {message}")
        }
        None => format!("the guest reached its pod's memory limit: {message}"),
    }
}
