//! Lifecycle events of sandboxes and containers, as CRI
//! `GetContainerEvents` reports them.

use crate::model::ids::SandboxId;
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LifecycleEvent {
    pub id: String,
    pub sandbox_id: SandboxId,
    pub kind: LifecycleKind,
    pub at: Timestamp,
}
