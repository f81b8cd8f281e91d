//! Lifecycle events of sandboxes and containers, for CRI
//! `GetContainerEvents` (the kubelet's evented PLEG).
//!
//! Events go out on a broadcast channel: sending never blocks the runtime,
//! and a subscriber that falls more than [`EVENT_BUFFER`] events behind is
//! told it lagged (it must relist) instead of slowing anyone down.

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::model::events::{LifecycleEvent, LifecycleKind};
use crate::model::ids::SandboxId;
use crate::model::sandbox::SandboxRecord;
use crate::model::time::Timestamp;

/// Events a subscriber may fall behind by before it is told it lagged.
pub const EVENT_BUFFER: usize = 4096;

/// The sending side, owned by the agent.
pub struct Events {
    tx: broadcast::Sender<LifecycleEvent>,
}

impl Default for Events {
    fn default() -> Self {
        Self {
            tx: broadcast::Sender::new(EVENT_BUFFER),
        }
    }
}

impl Events {
    /// Publishes an event; without subscribers it goes nowhere.
    pub fn emit(&self, id: impl Into<String>, sandbox_id: &SandboxId, kind: LifecycleKind) {
        let _ = self.tx.send(LifecycleEvent {
            id: id.into(),
            sandbox_id: sandbox_id.clone(),
            kind,
            at: Timestamp::now(),
            removed_sandbox: None,
        });
    }

    /// Publishes the deletion of `id` (a container of `sandbox`, or the
    /// sandbox itself) as RemovePodSandbox removes it, with the sandbox's
    /// last record.
    pub fn emit_removal(&self, id: impl Into<String>, sandbox: &Arc<SandboxRecord>) {
        let _ = self.tx.send(LifecycleEvent {
            id: id.into(),
            sandbox_id: sandbox.id.clone(),
            kind: LifecycleKind::Deleted,
            at: Timestamp::now(),
            removed_sandbox: Some(Arc::clone(sandbox)),
        });
    }

    /// A new subscriber, seeing every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<LifecycleEvent> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_subscriber_sees_every_event_and_a_slow_one_is_told_it_lagged() {
        let events = Events::default();
        let sandbox = SandboxId::generate();
        events.emit("before", &sandbox, LifecycleKind::Created);
        let mut a = events.subscribe();
        let mut b = events.subscribe();
        events.emit("c1", &sandbox, LifecycleKind::Created);
        events.emit("c1", &sandbox, LifecycleKind::Started);
        for rx in [&mut a, &mut b] {
            assert_eq!(rx.recv().await.unwrap().kind, LifecycleKind::Created);
            assert_eq!(rx.recv().await.unwrap().kind, LifecycleKind::Started);
        }
        // `b` reads nothing while far more than the buffer is sent and `a`
        // keeps up: the sender never waits, `a` sees every event, and `b`
        // learns it lagged, then resumes at the oldest event kept.
        for _ in 0..EVENT_BUFFER + 10 {
            events.emit("c2", &sandbox, LifecycleKind::Stopped);
            assert_eq!(a.recv().await.unwrap().id, "c2");
        }
        assert!(matches!(
            b.recv().await,
            Err(broadcast::error::RecvError::Lagged(10))
        ));
        assert_eq!(b.recv().await.unwrap().id, "c2");
    }
}
