//! Containers: CreateContainer, StopContainer, RemoveContainer, status,
//! list, UpdateContainerResources and ReopenContainerLog (StartContainer
//! and a run's end are in `run`).
//!
//! ```text
//!  CreateContainer            StartContainer: the guest instantiated,
//!  (program compiled)         RUNNING committed as it is spawned
//! ──────────────────► CREATED ──────────────────────────────────► RUNNING
//!                        │ the guest cannot start (StartError)       │ it ends,
//!                        └────────────────────────────► EXITED ◄─────┘ or is killed
//!  RemoveContainer, in any state (a running guest is killed first): gone
//! ```
//!
//! A container's state changes only under its record's lock, in the same
//! step as the commit and the side effect it describes; its verbs hold its
//! `ops` lock, so a stop or removal waits for a start in progress rather
//! than seeing it half done.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::guest_config::{program, read_program};
use super::ops::detached;
use super::run::Run;
use super::{Agent, lock, read, write};
use crate::error::{Error, Result};
use crate::model::container::{
    ContainerFilter, ContainerMetadata, ContainerRecord, ContainerSpec, ContainerState,
};
use crate::model::events::LifecycleKind;
use crate::model::ids::{ContainerId, SandboxId};
use crate::model::image::ImageRecord;
use crate::model::resources::Resources;
use crate::model::time::Timestamp;
use crate::model::usage::CpuRate;
use crate::runtime::engine::Prepared;
use crate::runtime::error::GuestError;
use crate::runtime::usage::GuestUsage;
use crate::state::Change;

/// How long past the kubelet's timeout a stop may take before it is
/// reported as failed. Guests yield every epoch tick, so this is generous.
const STOP_MARGIN: Duration = Duration::from_secs(2);

/// One container: its record, the program compiled for it, and its run.
pub(super) struct ContainerEntry {
    pub(super) record: Mutex<ContainerRecord>,
    /// The program compiled at creation, or why it could not be (`None`
    /// for a container recovered from an earlier agent: compiled at start).
    pub(super) prepared: Mutex<Option<PreparedProgram>>,
    /// The guest's run; changed only with the record's lock held, in the
    /// step that changes the state.
    pub(super) run: Mutex<RunSlot>,
    /// CPU readings, for the rate over the interval.
    pub(super) cpu_rate: Mutex<CpuRate>,
    /// Held by the verbs that change the container (start, stop, remove).
    pub(super) ops: tokio::sync::Mutex<()>,
}

/// Where a container's guest is.
pub(super) enum RunSlot {
    /// Never started.
    Idle,
    /// Running (the container is RUNNING exactly while this is here).
    Running(Arc<Run>),
    /// Ended; what it used stays for stats.
    Ended(Arc<GuestUsage>),
}

impl ContainerEntry {
    pub(super) fn new(record: ContainerRecord, prepared: Option<PreparedProgram>) -> Arc<Self> {
        Arc::new(Self {
            record: Mutex::new(record),
            prepared: Mutex::new(prepared),
            run: Mutex::new(RunSlot::Idle),
            cpu_rate: Mutex::new(CpuRate::default()),
            ops: tokio::sync::Mutex::new(()),
        })
    }

    pub(super) fn snapshot(&self) -> ContainerRecord {
        lock(&self.record).clone()
    }

    /// The guest's run while the container runs.
    pub(super) fn running(&self) -> Option<Arc<Run>> {
        match &*lock(&self.run) {
            RunSlot::Running(run) => Some(run.clone()),
            _ => None,
        }
    }

    /// What the current or last run used.
    pub(super) fn usage(&self) -> Option<Arc<GuestUsage>> {
        match &*lock(&self.run) {
            RunSlot::Idle => None,
            RunSlot::Running(run) => Some(run.usage.clone()),
            RunSlot::Ended(usage) => Some(usage.clone()),
        }
    }
}

/// A compiled program, or why it could not be compiled.
pub(super) type PreparedProgram = std::result::Result<Prepared, GuestError>;

/// Removes the directories under `dir` (the root's `containers`) of
/// containers that are not recorded: an earlier agent died between a
/// removal's commit and the removal of its files. Run at start-up, before
/// any container starts.
pub(super) fn remove_unrecorded_files(
    dir: &Path,
    recorded: &std::collections::HashMap<ContainerId, Arc<ContainerEntry>>,
) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name();
        let known =
            ContainerId::parse(&name.to_string_lossy()).is_ok_and(|id| recorded.contains_key(&id));
        if known {
            continue;
        }
        let path = entry.path();
        // Never through a mount: what is below it is not the container's.
        if !super::ro_binds::mounts_below(&path).is_empty() {
            tracing::warn!(
                ?path,
                "the files of a container that no longer exists are left: a mount below them could not be detached"
            );
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => tracing::info!(
                ?path,
                "removed the files of a container that no longer exists"
            ),
            Err(error) => {
                tracing::warn!(?path, %error, "could not remove the files of a container that no longer exists")
            }
        }
    }
}

impl Agent {
    /// Whether the agent holds container `id`.
    pub fn holds_container(&self, id: &ContainerId) -> bool {
        read(&self.inner.containers).contains_key(id)
    }

    pub(super) fn container(&self, id: &ContainerId) -> Result<Arc<ContainerEntry>> {
        read(&self.inner.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                kind: ContainerId::KIND,
                id: id.to_string(),
            })
    }

    /// Whether `entry` is still container `id` (not removed while its
    /// caller waited for its lock).
    fn holds_container_entry(&self, id: &ContainerId, entry: &ContainerEntry) -> bool {
        read(&self.inner.containers)
            .get(id)
            .is_some_and(|e| std::ptr::eq(Arc::as_ptr(e), entry))
    }

    /// Creates a container in a ready sandbox and compiles its program
    /// first, so that starting it is only an instantiation; the container
    /// exists (is listed) once compiled. A compile failure does not fail
    /// creation: it is reported when the container is started, in its
    /// status and its log, where the user looks.
    ///
    /// The work runs on a task of its own; a call retried with the same
    /// name and attempt while it compiles, or after it succeeded without
    /// its caller receiving the id, gets that container's id.
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
        let key = (sandbox_id.clone(), meta.name.clone(), meta.attempt);
        let agent = self.clone();
        let sandbox_id = sandbox_id.clone();
        self.inner
            .container_creates
            .run(key, async move {
                agent.create_container_now(&sandbox_id, spec, meta).await
            })
            .await
    }

    async fn create_container_now(
        &self,
        sandbox_id: &SandboxId,
        spec: ContainerSpec,
        meta: ContainerMetadata,
    ) -> Result<ContainerId> {
        let started = std::time::Instant::now();
        let sandbox = self.pod_sandbox_status(sandbox_id)?;
        sandbox.check_accepts_containers()?;
        self.check_unique(sandbox_id, &meta)?;
        let image = self
            .inner
            .images
            .resolve(&spec.image)
            .ok_or_else(|| Error::NotFound {
                kind: "image",
                id: spec.image.clone(),
            })?;
        // Relative to the pod's log directory even when written absolute,
        // as containerd joins them.
        let log_file =
            (!sandbox.spec.log_directory.is_empty() && !spec.log_path.is_empty()).then(|| {
                Path::new(&sandbox.spec.log_directory).join(spec.log_path.trim_start_matches('/'))
            });
        let (prepared, compiling) = self.prepare_timed(&image, &spec).await;

        // The pod may have been stopped or removed while this compiled.
        let sandbox = self.sandbox(sandbox_id)?;
        let _op = sandbox.ops.lock().await;
        self.sandbox(sandbox_id)?
            .snapshot()
            .check_accepts_containers()?;
        self.check_unique(sandbox_id, &meta)?;
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
        crate::failpoint::hit("create.before_commit")?;
        self.inner.state.apply(&[Change::PutContainer(&record)])?;
        crate::failpoint::hit("create.after_commit")?;
        let id = record.id.clone();
        write(&self.inner.containers)
            .insert(id.clone(), ContainerEntry::new(record, Some(prepared)));
        tracing::info!(container_id = %id, sandbox_id = %sandbox_id, image = %image.id, "container created");
        crate::metrics::global().phase(
            crate::metrics::Phase::ImagePrepare,
            started.elapsed().saturating_sub(compiling),
        );
        self.inner
            .events
            .emit(id.as_str(), sandbox_id, LifecycleKind::Created);
        Ok(id)
    }

    /// Fails with `AlreadyExists` when pod `sandbox_id` has a container
    /// with metadata `meta` (name and attempt).
    fn check_unique(&self, sandbox_id: &SandboxId, meta: &ContainerMetadata) -> Result<()> {
        match self
            .containers_of(sandbox_id)
            .iter()
            .find(|c| lock(&c.record).spec.metadata.as_ref() == Some(meta))
        {
            Some(existing) => Err(Error::AlreadyExists {
                kind: ContainerId::KIND,
                id: format!(
                    "{} (attempt {}) in pod sandbox {sandbox_id}",
                    meta.name, meta.attempt
                ),
                detail: format!(
                    "it is container {}; remove it first",
                    lock(&existing.record).id
                ),
            }),
            None => Ok(()),
        }
    }

    /// Compiles (or finds compiled) the program a container of `image`
    /// runs, off the async workers.
    pub(super) async fn prepare(
        &self,
        image: &ImageRecord,
        spec: &ContainerSpec,
    ) -> PreparedProgram {
        self.prepare_timed(image, spec).await.0
    }

    /// [`Self::prepare`], also saying how long the engine took to make the
    /// program ready when it was not in memory (the `compile` phase).
    async fn prepare_timed(
        &self,
        image: &ImageRecord,
        spec: &ContainerSpec,
    ) -> (PreparedProgram, Duration) {
        let program = match program(&self.inner.images, &self.inner.programs, image, spec) {
            Ok(program) => program,
            Err(error) => return (Err(error), Duration::ZERO),
        };
        // The hot path: an image compiled before needs no I/O.
        if let Some(prepared) = program
            .digest
            .as_ref()
            .and_then(|d| self.inner.engine.cached(d))
        {
            return (Ok(prepared), Duration::ZERO);
        }
        let inner = self.inner.clone();
        let image = image.clone();
        tokio::task::spawn_blocking(move || {
            let (digest, kind, bytes) = match read_program(&inner.images, &image, &program) {
                Ok(read) => read,
                Err(error) => return (Err(error), Duration::ZERO),
            };
            let started = std::time::Instant::now();
            let prepared = inner.engine.prepare(&digest, kind, &bytes);
            let elapsed = started.elapsed();
            crate::metrics::global().phase(crate::metrics::Phase::Compile, elapsed);
            if prepared.is_ok()
                && program.file.is_some()
                && let Some(p) =
                    lock(&inner.programs).get_mut(&(image.id.clone(), program.argv[0].clone()))
            {
                p.digest = Some(digest);
            }
            (prepared, elapsed)
        })
        .await
        .unwrap_or_else(|e| {
            let failed = GuestError::Compile {
                detail: e.to_string(),
            };
            (Err(failed), Duration::ZERO)
        })
    }

    pub(super) fn container_dir(&self, id: &ContainerId) -> PathBuf {
        self.inner.root.join("containers").join(id.as_str())
    }

    /// Where the read-only binds of container `id` are (see `ro_binds`).
    pub(super) fn mounts_dir(&self, id: &ContainerId) -> PathBuf {
        self.container_dir(id).join("mounts")
    }

    /// Detaches the read-only binds of container `id`: its guest ended
    /// (an exec'd instance still running keeps the directories it has
    /// open), or the container goes.
    pub(super) fn release_read_only_binds(&self, id: &ContainerId) {
        let released = super::ro_binds::release_binds(&self.mounts_dir(id));
        if released > 0 {
            tracing::debug!(container_id = %id, count = released, "read-only binds detached");
        }
    }

    pub(super) fn remove_container_files(&self, id: &ContainerId) {
        let dir = self.container_dir(id);
        self.release_read_only_binds(id);
        // Never through a mount: what is below it is not the container's.
        if super::ro_binds::binds_left(&self.mounts_dir(id)) {
            tracing::warn!(container_id = %id, ?dir, "container files are left: a mount below them could not be detached");
            return;
        }
        if dir.exists()
            && let Err(error) = std::fs::remove_dir_all(&dir)
        {
            tracing::warn!(container_id = %id, ?dir, %error, "could not remove container files");
        }
    }

    /// Reopens a running container's log file after the kubelet rotated
    /// it (renamed the file); see `ContainerLog::reopen`.
    pub fn reopen_container_log(&self, id: &ContainerId) -> Result<()> {
        match self.container(id)?.running() {
            Some(run) => run.log.reopen(),
            None => Err(Error::FailedPrecondition(format!(
                "container {id} is not running: only a running container's log can be reopened"
            ))),
        }
    }

    /// Ends the guest if it runs and waits until its exit is recorded,
    /// after any start in progress. Wasm guests cannot handle SIGTERM, so
    /// the end is immediate.
    pub(super) async fn stop_guest(
        &self,
        entry: &ContainerEntry,
        why: &'static str,
        timeout: Duration,
    ) -> Result<()> {
        let _op = entry.ops.lock().await;
        self.kill_and_wait(entry, why, timeout).await
    }

    /// [`stop_guest`](Self::stop_guest) with the container's `ops` lock held.
    pub(super) async fn kill_and_wait(
        &self,
        entry: &ContainerEntry,
        why: &'static str,
        timeout: Duration,
    ) -> Result<()> {
        let Some(run) = entry.running() else {
            return Ok(());
        };
        run.kill(why, timeout);
        match tokio::time::timeout(timeout + STOP_MARGIN, run.exited()).await {
            Ok(()) => Ok(()),
            Err(_) => Err(Error::Internal(format!(
                "container {} did not stop within {:?}",
                lock(&entry.record).id,
                timeout + STOP_MARGIN
            ))),
        }
    }

    /// Stops a running container within `timeout`. Stopping a container
    /// that is not running, or that does not exist, succeeds (the CRI's
    /// stop is idempotent).
    pub async fn stop_container(&self, id: &ContainerId, timeout: Duration) -> Result<()> {
        let Ok(entry) = self.container(id) else {
            return Ok(());
        };
        let agent = self.clone();
        detached(async move {
            agent
                .stop_guest(
                    &entry,
                    "stopped by StopContainer (a Wasm guest cannot handle SIGTERM, so it is ended at once)",
                    timeout,
                )
                .await
        })
        .await
    }

    /// Removes a container in any state (a running one is stopped first).
    /// Removing a container that does not exist succeeds.
    pub async fn remove_container(&self, id: &ContainerId) -> Result<()> {
        let Ok(entry) = self.container(id) else {
            return Ok(());
        };
        let agent = self.clone();
        let id = id.clone();
        detached(async move {
            let _op = entry.ops.lock().await;
            if !agent.holds_container_entry(&id, &entry) {
                return Ok(());
            }
            agent
                .kill_and_wait(&entry, "the container was removed", Duration::ZERO)
                .await?;
            agent
                .inner
                .state
                .apply(&[Change::DeleteContainer(id.as_str())])?;
            crate::failpoint::hit("remove.container.after_commit")?;
            let record = entry.snapshot();
            write(&agent.inner.containers).remove(&id);
            agent.forget_calls(&record);
            agent.remove_container_files(&id);
            tracing::info!(container_id = %id, "container removed");
            agent
                .inner
                .events
                .emit(id.as_str(), &record.sandbox_id, LifecycleKind::Deleted);
            Ok(())
        })
        .await
    }

    /// Forgets the calls that made a container that is now removed, so that
    /// a new container of the same name and attempt can be made.
    pub(super) fn forget_calls(&self, record: &ContainerRecord) {
        self.forget_create(record);
        self.inner.container_starts.forget(&record.id);
    }

    /// Forgets the call that created a container.
    pub(super) fn forget_create(&self, record: &ContainerRecord) {
        if let Some(meta) = &record.spec.metadata {
            self.inner.container_creates.forget(&(
                record.sandbox_id.clone(),
                meta.name.clone(),
                meta.attempt,
            ));
        }
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
        self.inner.state.update_sync(&mut record, |r| {
            r.spec.resources = resources.clone();
            Ok(true)
        })?;
        if let Some(run) = entry.running() {
            run.limits.set(&resources);
        }
        tracing::info!(container_id = %id, ?resources, "container resources updated");
        Ok(())
    }
}
