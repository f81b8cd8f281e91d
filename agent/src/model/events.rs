//! Lifecycle events of sandboxes and containers, as CRI
//! `GetContainerEvents` reports them.

use std::sync::Arc;

use crate::model::ids::SandboxId;
use crate::model::sandbox::SandboxRecord;
use crate::model::time::Timestamp;

/// What happened, in CRI's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LifecycleKind {
    Created,
    Started,
    Stopped,
    Deleted,
}

/// One transition of a container, or of a sandbox (then `id` is the
/// sandbox's own id, as containerd reports sandboxes).
#[derive(Clone, Debug)]
pub struct LifecycleEvent {
    pub id: String,
    pub sandbox_id: SandboxId,
    pub kind: LifecycleKind,
    pub at: Timestamp,
    /// For the deletions RemovePodSandbox sends (its containers' and its
    /// own): the sandbox as it was just before it went. A subscriber reads
    /// an event after it was sent, when the sandbox is no longer there to
    /// ask, and the kubelet drops an event that carries no sandbox status
    /// (its cache would keep the removed pod).
    pub removed_sandbox: Option<Arc<SandboxRecord>>,
}
