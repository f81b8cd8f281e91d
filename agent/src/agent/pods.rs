//! Pod sandboxes: RunPodSandbox (with the pod's CNI network), joining
//! another runtime's pod, StopPodSandbox, RemovePodSandbox, status and
//! list, and each pod's memory and CPU accounts.
//!
//! A sandbox's verbs that change it (stop, remove, and the commit of a
//! container created in it) hold its `ops` lock, so a container cannot be
//! added to a pod while the pod is being stopped or removed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::ops::detached;
use super::{Agent, ContainerEntry, TRIM_EVERY, lock, read, write};
use crate::error::{Error, Result};
use crate::model::events::LifecycleKind;
use crate::model::ids::{ContainerId, SandboxId};
use crate::model::resources::Resources;
use crate::model::sandbox::{SandboxFilter, SandboxRecord, SandboxSpec};
use crate::model::time::Timestamp;
use crate::network::NetworkRequest;
use crate::runtime::limits::{PodCpu, PodMemory};
use crate::state::Change;

/// One sandbox: its record, and the lock its state-changing verbs hold.
pub(super) struct SandboxEntry {
    pub(super) record: Mutex<SandboxRecord>,
    pub(super) ops: tokio::sync::Mutex<()>,
}

impl SandboxEntry {
    pub(super) fn new(record: SandboxRecord) -> Arc<Self> {
        Arc::new(Self {
            record: Mutex::new(record),
            ops: tokio::sync::Mutex::new(()),
        })
    }

    pub(super) fn snapshot(&self) -> SandboxRecord {
        lock(&self.record).clone()
    }
}

impl Agent {
    /// Creates a ready sandbox. Fails with `AlreadyExists` while a sandbox
    /// with the same metadata (name, namespace, uid, attempt) exists, but a
    /// call retried while its first call runs, or after that call
    /// succeeded without its caller receiving it, gets that call's answer.
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
        let agent = self.clone();
        let key = meta.clone();
        self.inner
            .sandbox_runs
            .run(key, async move {
                let started = std::time::Instant::now();
                let id = agent.run_pod_sandbox_now(spec, meta).await?;
                crate::metrics::global().phase(crate::metrics::Phase::Sandbox, started.elapsed());
                Ok(id)
            })
            .await
    }

    /// RunPodSandbox's work, on a task of its own: a kubelet that gives up
    /// waiting does not interrupt the pod's CNI ADD, and its retry (same
    /// metadata) joins this call.
    async fn run_pod_sandbox_now(
        &self,
        spec: SandboxSpec,
        meta: crate::model::sandbox::PodMetadata,
    ) -> Result<SandboxId> {
        if let Some(existing) = read(&self.inner.sandboxes)
            .values()
            .find(|s| {
                let s = lock(&s.record);
                s.spec.joined.is_none() && s.spec.metadata.as_ref() == Some(&meta)
            })
            .map(|s| s.snapshot())
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
                    let network = self.inner.networks.setup(&id, list, &request).await?;
                    tracing::info!(sandbox_id = %id, ips = ?network.ips, "pod network ready");
                    record.network = Some(network);
                }
                // Status reports the node's network as not ready.
                None => {
                    tracing::debug!(sandbox_id = %id, "no CNI configuration: the pod has no network")
                }
            }
        }
        let recorded = crate::failpoint::hit("cni.add.after")
            .and_then(|()| self.inner.state.apply(&[Change::PutSandbox(&record)]));
        if let Err(e) = recorded {
            if let Some(network) = &record.network
                && let Err(error) = self.inner.networks.teardown(&id, network).await
            {
                tracing::warn!(sandbox_id = %id, %error, "undoing the pod network");
            }
            return Err(e);
        }
        crate::failpoint::hit("cni.add.after_commit")?;
        tracing::info!(sandbox_id = %id, pod = %meta.name, namespace = %meta.namespace, "pod sandbox ready");
        self.inner
            .events
            .emit(id.as_str(), &id, LifecycleKind::Created);
        self.inner
            .events
            .emit(id.as_str(), &id, LifecycleKind::Started);
        write(&self.inner.sandboxes).insert(id.clone(), SandboxEntry::new(record));
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
        let _guard = self.inner.joining.lock().await;
        if let Ok(existing) = self.sandbox(&id) {
            let existing = existing.snapshot();
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
        write(&self.inner.sandboxes).insert(id, SandboxEntry::new(record));
        Ok(())
    }

    /// Whether the agent holds sandbox `id`: `Some(false)` for one of its
    /// own pods, `Some(true)` for a sandbox joined to another runtime's pod.
    pub fn holds_pod_sandbox(&self, id: &SandboxId) -> Option<bool> {
        let sandbox = read(&self.inner.sandboxes).get(id).cloned()?;
        Some(lock(&sandbox.record).spec.joined.is_some())
    }

    /// The joined sandboxes (see [`SandboxSpec::joined`]), with the time
    /// each was joined.
    pub fn joined_pod_sandboxes(&self) -> Vec<(SandboxId, Timestamp)> {
        read(&self.inner.sandboxes)
            .values()
            .filter_map(|s| {
                let s = lock(&s.record);
                s.spec
                    .joined
                    .is_some()
                    .then(|| (s.id.clone(), s.created_at))
            })
            .collect()
    }

    pub(super) fn sandbox(&self, id: &SandboxId) -> Result<Arc<SandboxEntry>> {
        read(&self.inner.sandboxes)
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                kind: SandboxId::KIND,
                id: id.to_string(),
            })
    }

    pub(super) fn containers_of(&self, sandbox: &SandboxId) -> Vec<Arc<ContainerEntry>> {
        read(&self.inner.containers)
            .values()
            .filter(|c| lock(&c.record).sandbox_id == *sandbox)
            .cloned()
            .collect()
    }

    /// Stops every container of the sandbox, tears down its network and
    /// marks it not ready. Stopping a stopped sandbox, or one that does not
    /// exist, succeeds (the CRI's stop is idempotent).
    pub async fn stop_pod_sandbox(&self, id: &SandboxId) -> Result<()> {
        let agent = self.clone();
        let id = id.clone();
        detached(async move {
            let Ok(sandbox) = agent.sandbox(&id) else {
                return Ok(());
            };
            let _op = sandbox.ops.lock().await;
            agent.stop_pod_sandbox_locked(&id, &sandbox).await
        })
        .await
    }

    /// StopPodSandbox's work, with the sandbox's `ops` lock held.
    async fn stop_pod_sandbox_locked(&self, id: &SandboxId, sandbox: &SandboxEntry) -> Result<()> {
        if !self.holds_sandbox_entry(id, sandbox) {
            return Ok(());
        }
        // Each container's lock is held until the pod is recorded not
        // ready, so that no start slips in between its stop and that.
        let entries = self.containers_of(id);
        let mut held = Vec::with_capacity(entries.len());
        for entry in &entries {
            held.push(entry.ops.lock().await);
            self.kill_and_wait(entry, "its pod sandbox was stopped", Duration::ZERO)
                .await?;
        }
        if lock(&sandbox.record).spec.joined.is_some() {
            // The pod's own runtime owns its namespace.
            self.inner.networks.forget(id);
        }
        let network = lock(&sandbox.record)
            .network
            .clone()
            .filter(|n| !n.torn_down);
        if let Some(network) = &network {
            self.inner.networks.teardown(id, network).await?;
            crate::failpoint::hit("cni.del.after")?;
            tracing::info!(sandbox_id = %id, "pod network torn down");
        }
        let mut record = lock(&sandbox.record);
        // One commit records both the teardown and the stop.
        let changed = self.inner.state.update_sync(&mut record, |r| {
            let torn_down = match r.network.as_mut() {
                Some(n) if network.is_some() => {
                    n.torn_down = true;
                    true
                }
                _ => false,
            };
            Ok(r.stop() || torn_down)
        })?;
        if changed {
            tracing::info!(sandbox_id = %id, "pod sandbox stopped");
            // No longer the ready pod its RunPodSandbox made: a run retried
            // from now on is a new call (and finds the name taken).
            if let Some(meta) = &record.spec.metadata {
                self.inner.sandbox_runs.forget(meta);
            }
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
        let agent = self.clone();
        let id = id.clone();
        detached(async move {
            let Ok(sandbox) = agent.sandbox(&id) else {
                return Ok(());
            };
            let _op = sandbox.ops.lock().await;
            agent.remove_pod_sandbox_locked(&id, &sandbox).await
        })
        .await
    }

    /// RemovePodSandbox's work, with the sandbox's `ops` lock held.
    async fn remove_pod_sandbox_locked(
        &self,
        id: &SandboxId,
        sandbox: &SandboxEntry,
    ) -> Result<()> {
        if !self.holds_sandbox_entry(id, sandbox) {
            return Ok(());
        }
        let joined = lock(&sandbox.record).spec.joined.is_some();
        self.stop_pod_sandbox_locked(id, sandbox).await?;
        let last = Arc::new(sandbox.snapshot());
        let entries = self.containers_of(id);
        let records: Vec<_> = entries.iter().map(|e| e.snapshot()).collect();
        let ids: Vec<ContainerId> = records.iter().map(|r| r.id.clone()).collect();
        let mut changes: Vec<Change<'_>> = ids
            .iter()
            .map(|c| Change::DeleteContainer(c.as_str()))
            .collect();
        changes.push(Change::DeleteSandbox(id.as_str()));
        self.inner.state.apply(&changes)?;
        crate::failpoint::hit("remove.pod.after_commit")?;
        {
            let mut containers = write(&self.inner.containers);
            for c in &ids {
                containers.remove(c);
            }
        }
        for c in &ids {
            self.remove_container_files(c);
        }
        for record in &records {
            self.forget_calls(record);
        }
        if let Some(meta) = &lock(&sandbox.record).spec.metadata {
            self.inner.sandbox_runs.forget(meta);
        }
        write(&self.inner.sandboxes).remove(id);
        lock(&self.inner.pod_memory).remove(id);
        lock(&self.inner.pod_cpu).remove(id);
        lock(&self.inner.pod_samples).remove(id);
        tracing::info!(sandbox_id = %id, containers = ids.len(), "pod sandbox removed");
        for c in &ids {
            self.inner.events.emit_removal(c.as_str(), &last);
        }
        if !joined {
            self.inner.events.emit_removal(id.as_str(), &last);
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
            tokio::task::spawn_blocking(crate::runtime::limits::release_free_heap);
        }
    }

    pub fn pod_sandbox_status(&self, id: &SandboxId) -> Result<SandboxRecord> {
        Ok(self.sandbox(id)?.snapshot())
    }

    /// Whether `entry` is still sandbox `id` (not removed while its caller
    /// waited for its lock).
    fn holds_sandbox_entry(&self, id: &SandboxId, entry: &SandboxEntry) -> bool {
        read(&self.inner.sandboxes)
            .get(id)
            .is_some_and(|e| std::ptr::eq(Arc::as_ptr(e), entry))
    }

    /// The agent's own sandboxes matching `filter`, oldest first (joined
    /// sandboxes are their runtime's pods, not listed here).
    pub fn list_pod_sandboxes(&self, filter: &SandboxFilter) -> Vec<SandboxRecord> {
        let mut out: Vec<SandboxRecord> = read(&self.inner.sandboxes)
            .values()
            .filter_map(|s| {
                let record = lock(&s.record);
                (record.spec.joined.is_none() && filter.matches(&record)).then(|| record.clone())
            })
            .collect();
        out.sort_by_key(|s| s.created_at);
        out
    }

    /// The CPU account of a pod, made on first use; it follows the pod's
    /// quota (none while it has none).
    pub(super) fn pod_cpu(&self, sandbox: &SandboxRecord) -> Option<Arc<PodCpu>> {
        Some(
            lock(&self.inner.pod_cpu)
                .entry(sandbox.id.clone())
                .or_insert_with(|| PodCpu::for_pod(&sandbox.spec.resources))
                .clone(),
        )
    }

    /// UpdatePodSandboxResources: the pod-level limits (the sum of its
    /// containers' and the pod's overhead, as the kubelet resized the pod's
    /// cgroup) are stored with the pod and hold for its running guests at
    /// once: memory growth from now on, CPU time from the next period.
    pub fn update_pod_sandbox_resources(&self, id: &SandboxId, resources: Resources) -> Result<()> {
        let entry = self.sandbox(id)?;
        let mut record = lock(&entry.record);
        if record.spec.joined.is_some() {
            return Err(Error::InvalidArgument(format!(
                "pod sandbox {id} belongs to another runtime; update it there"
            )));
        }
        self.inner.state.update_sync(&mut record, |r| {
            r.spec.resources = resources.clone();
            Ok(true)
        })?;
        if let Some(memory) = lock(&self.inner.pod_memory).get(id) {
            memory.set_limit(resources.memory_limit_bytes);
        }
        if let Some(cpu) = lock(&self.inner.pod_cpu).get(id) {
            cpu.set(&resources);
        }
        tracing::info!(sandbox_id = %id, ?resources, "pod sandbox resources updated");
        Ok(())
    }

    /// The memory account of a pod, made on first use.
    pub(super) fn pod_memory(&self, sandbox: &SandboxRecord) -> Arc<PodMemory> {
        lock(&self.inner.pod_memory)
            .entry(sandbox.id.clone())
            .or_insert_with(|| PodMemory::new(sandbox.spec.resources.memory_limit_bytes))
            .clone()
    }
}
