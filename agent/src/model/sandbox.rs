//! Pod sandboxes: their spec, their record and their state machine.
//!
//! A Wasm pod sandbox holds no process of its own: it is the shared context
//! (metadata, log directory, later its network) its containers run in.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::ids::SandboxId;
use crate::model::time::Timestamp;

/// The identity the kubelet gives a pod; unique per node while it exists.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PodMetadata {
    pub name: String,
    pub uid: String,
    pub namespace: String,
    pub attempt: u32,
}

/// What the kubelet asks for when it runs a pod sandbox.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SandboxSpec {
    pub metadata: Option<PodMetadata>,
    pub hostname: String,
    /// Where the kubelet wants the pod's container logs.
    pub log_directory: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub runtime_handler: String,
    /// Pod-level limits (the kubelet's pod resources), over all containers.
    #[serde(default)]
    pub resources: crate::model::resources::Resources,
    /// The pod shares the node's network namespace (`hostNetwork`).
    #[serde(default)]
    pub host_network: bool,
    /// hostPort mappings, handed to the CNI plugins.
    #[serde(default)]
    pub port_mappings: Vec<crate::model::network::PortMapping>,
    /// How the pod's guests look names up.
    #[serde(default)]
    pub dns: crate::model::network::DnsSettings,
    /// Set when this sandbox stands in for a pod another runtime runs
    /// (the Wasm containers of a `compat-smart` pod): it joins that pod's
    /// network namespace instead of making one, and is not a pod of its own.
    #[serde(default)]
    pub joined: Option<JoinedPod>,
}

/// The pod of another runtime a joined sandbox stands in for.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JoinedPod {
    /// Which runtime runs the pod (for messages).
    pub runtime: String,
    /// The pod's network namespace; `None` for a `hostNetwork` pod.
    pub netns: Option<std::path::PathBuf>,
}

/// The states of a sandbox, as CRI names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SandboxState {
    Ready,
    NotReady,
}

impl SandboxState {
    pub fn name(self) -> &'static str {
        match self {
            SandboxState::Ready => "SANDBOX_READY",
            SandboxState::NotReady => "SANDBOX_NOTREADY",
        }
    }

    /// Whether containers may be created in a sandbox in this state.
    pub fn accepts_containers(self) -> bool {
        self == SandboxState::Ready
    }
}

/// A sandbox as stored and reported.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: SandboxId,
    pub spec: SandboxSpec,
    pub state: SandboxState,
    pub created_at: Timestamp,
    /// The pod's CNI network, when it has one.
    #[serde(default)]
    pub network: Option<crate::model::network::PodNetwork>,
}

impl SandboxRecord {
    pub fn new(spec: SandboxSpec) -> Self {
        Self::with_id(SandboxId::generate(), spec)
    }

    pub fn with_id(id: SandboxId, spec: SandboxSpec) -> Self {
        Self {
            id,
            spec,
            state: SandboxState::Ready,
            created_at: Timestamp::now(),
            network: None,
        }
    }

    /// Ready => NotReady. Stopping a stopped sandbox is allowed (the kubelet
    /// retries), so this returns whether anything changed.
    pub fn stop(&mut self) -> bool {
        let changed = self.state != SandboxState::NotReady;
        self.state = SandboxState::NotReady;
        changed
    }

    /// Fails unless containers may be created in this sandbox now.
    pub fn check_accepts_containers(&self) -> Result<()> {
        if self.state.accepts_containers() {
            Ok(())
        } else {
            Err(Error::FailedPrecondition(format!(
                "pod sandbox {} is {}: containers can only be created in a ready sandbox",
                self.id,
                self.state.name()
            )))
        }
    }
}

/// Which sandboxes a list call wants; empty fields match everything.
#[derive(Clone, Debug, Default)]
pub struct SandboxFilter {
    pub id: Option<String>,
    pub state: Option<SandboxState>,
    pub labels: BTreeMap<String, String>,
}

impl SandboxFilter {
    pub fn matches(&self, r: &SandboxRecord) -> bool {
        self.id.as_deref().is_none_or(|id| r.id.as_str() == id)
            && self.state.is_none_or(|s| r.state == s)
            && labels_match(&self.labels, &r.spec.labels)
    }
}

/// Every pair of `selector` is present in `labels`.
pub(crate) fn labels_match(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_is_idempotent_and_blocks_new_containers() {
        let mut r = SandboxRecord::new(SandboxSpec::default());
        assert!(r.check_accepts_containers().is_ok());
        assert!(r.stop());
        assert!(!r.stop());
        assert_eq!(r.state, SandboxState::NotReady);
        assert!(matches!(
            r.check_accepts_containers(),
            Err(Error::FailedPrecondition(_))
        ));
    }

    #[test]
    fn filter_by_state_id_and_labels() {
        let mut spec = SandboxSpec::default();
        spec.labels.insert("app".into(), "web".into());
        spec.labels.insert("tier".into(), "front".into());
        let r = SandboxRecord::new(spec);
        let mut f = SandboxFilter::default();
        assert!(f.matches(&r));
        f.labels.insert("app".into(), "web".into());
        assert!(f.matches(&r));
        f.labels.insert("tier".into(), "back".into());
        assert!(!f.matches(&r));
        let f = SandboxFilter {
            state: Some(SandboxState::NotReady),
            ..Default::default()
        };
        assert!(!f.matches(&r));
        let f = SandboxFilter {
            id: Some(r.id.to_string()),
            ..Default::default()
        };
        assert!(f.matches(&r));
    }
}
