//! Containers: their spec, their record and their state machine.
//!
//! A container's state changes only through the transition functions here,
//! each of which checks the current state and returns a typed
//! "invalid state transition: A => B" error otherwise.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::ids::{ContainerId, Digest, SandboxId};
use crate::model::resources::Resources;
use crate::model::sandbox::labels_match;
use crate::model::time::Timestamp;

/// A host path made visible to the guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    pub container_path: String,
    pub host_path: String,
    pub readonly: bool,
    /// Read-only all the way down: what the host mounts below `host_path`
    /// is read-only too. A read-only mount without it leaves those mounts
    /// as they are (a bind mount's read-only flag is not recursive).
    #[serde(default)]
    pub recursive_read_only: bool,
}

/// The name the kubelet gives a container; unique in its sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ContainerMetadata {
    pub name: String,
    pub attempt: u32,
}

/// What the kubelet asks for when it creates a container.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ContainerSpec {
    pub metadata: Option<ContainerMetadata>,
    /// The image as the kubelet named it (the kubelet passes the id its
    /// pull returned).
    pub image: String,
    /// The image as the pod asked for it (`user_specified_image`), when
    /// the kubelet says.
    #[serde(default)]
    pub user_specified_image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub working_dir: String,
    pub envs: Vec<(String, String)>,
    pub mounts: Vec<Mount>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Relative to the sandbox's log directory.
    pub log_path: String,
    #[serde(default)]
    pub resources: Resources,
    /// The image's root stays read-only (`readOnlyRootFilesystem`);
    /// otherwise a compat image's container writes to its own copy.
    #[serde(default)]
    pub readonly_rootfs: bool,
    /// Paths the guest sees that are read-only (`readonly_paths`), each
    /// the directory there, if there is one: what is mounted below stays
    /// as it is.
    #[serde(default)]
    pub readonly_paths: Vec<String>,
    /// The guest reads a stdin that `Attach` clients write to.
    #[serde(default)]
    pub stdin: bool,
    /// The stdin closes when the first attached client closes its own.
    #[serde(default)]
    pub stdin_once: bool,
    /// Attach clients get a terminal (see the runtime's `stdio`).
    #[serde(default)]
    pub tty: bool,
}

/// The states of a container, as CRI names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerState {
    Created,
    Running,
    Exited,
}

impl ContainerState {
    pub fn name(self) -> &'static str {
        match self {
            ContainerState::Created => "CONTAINER_CREATED",
            ContainerState::Running => "CONTAINER_RUNNING",
            ContainerState::Exited => "CONTAINER_EXITED",
        }
    }

    pub fn can_start(self) -> bool {
        self == ContainerState::Created
    }

    pub fn is_running(self) -> bool {
        self == ContainerState::Running
    }
}

/// Why a container stopped, as the kubelet reads it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    pub code: i32,
    pub reason: String,
    pub message: String,
}

impl ExitStatus {
    /// The guest ended by itself (returned, called exit, or trapped).
    pub fn guest(code: i32, message: String) -> Self {
        let reason = if code == 0 { "Completed" } else { "Error" };
        Self {
            code,
            reason: reason.to_owned(),
            message,
        }
    }

    /// The runtime ended the guest (StopContainer, removal, sandbox stop).
    pub fn killed(why: &str) -> Self {
        Self {
            code: 137,
            reason: "Error".to_owned(),
            message: why.to_owned(),
        }
    }

    /// The guest never ran: its module failed to load, link or instantiate.
    pub fn start_error(message: String) -> Self {
        Self {
            code: 128,
            reason: "StartError".to_owned(),
            message,
        }
    }

    /// The guest died after growing its memory past a limit was refused.
    pub fn oom_killed(message: String) -> Self {
        Self {
            code: 137,
            reason: "OOMKilled".to_owned(),
            message,
        }
    }

    /// The agent went away while the guest ran.
    pub fn lost(message: String) -> Self {
        Self {
            code: 255,
            reason: "Error".to_owned(),
            message,
        }
    }
}

/// A container as stored and reported.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: ContainerId,
    pub sandbox_id: SandboxId,
    pub spec: ContainerSpec,
    /// The id of the image the container runs.
    pub image_id: Digest,
    /// The full path of the log file, or `None` when the kubelet asked for none.
    pub log_file: Option<PathBuf>,
    pub state: ContainerState,
    pub created_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    pub exit: Option<ExitStatus>,
}

impl ContainerRecord {
    fn invalid(&self, to: ContainerState) -> Error {
        Error::InvalidTransition {
            kind: ContainerId::KIND,
            id: self.id.to_string(),
            from: self.state.name(),
            to: to.name(),
        }
    }

    /// Created => Running.
    pub fn start(&mut self, now: Timestamp) -> Result<()> {
        if !self.state.can_start() {
            return Err(self.invalid(ContainerState::Running));
        }
        self.state = ContainerState::Running;
        self.started_at = Some(now);
        Ok(())
    }

    /// Running => Exited, or Created => Exited when the guest could not start.
    pub fn exit(&mut self, now: Timestamp, status: ExitStatus) -> Result<()> {
        if self.state == ContainerState::Exited {
            return Err(self.invalid(ContainerState::Exited));
        }
        self.state = ContainerState::Exited;
        self.started_at.get_or_insert(now);
        self.finished_at = Some(now);
        self.exit = Some(status);
        Ok(())
    }
}

/// Which containers a list call wants; empty fields match everything.
#[derive(Clone, Debug, Default)]
pub struct ContainerFilter {
    pub id: Option<String>,
    pub state: Option<ContainerState>,
    pub sandbox_id: Option<String>,
    pub labels: BTreeMap<String, String>,
}

impl ContainerFilter {
    pub fn matches(&self, r: &ContainerRecord) -> bool {
        self.id.as_deref().is_none_or(|id| r.id.as_str() == id)
            && self.state.is_none_or(|s| r.state == s)
            && self
                .sandbox_id
                .as_deref()
                .is_none_or(|id| r.sandbox_id.as_str() == id)
            && labels_match(&self.labels, &r.spec.labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> ContainerRecord {
        ContainerRecord {
            id: ContainerId::generate(),
            sandbox_id: SandboxId::generate(),
            spec: ContainerSpec::default(),
            image_id: Digest::of(b"x"),
            log_file: None,
            state: ContainerState::Created,
            created_at: Timestamp::now(),
            started_at: None,
            finished_at: None,
            exit: None,
        }
    }

    #[test]
    fn lifecycle_created_running_exited() {
        let mut r = record();
        r.start(Timestamp::now()).unwrap();
        assert_eq!(r.state, ContainerState::Running);
        let err = r.start(Timestamp::now()).unwrap_err();
        assert!(
            err.to_string()
                .contains("invalid state transition: CONTAINER_RUNNING => CONTAINER_RUNNING"),
            "{err}"
        );
        r.exit(Timestamp::now(), ExitStatus::guest(3, String::new()))
            .unwrap();
        assert_eq!(r.state, ContainerState::Exited);
        assert_eq!(r.exit.as_ref().unwrap().reason, "Error");
        assert!(
            r.exit(Timestamp::now(), ExitStatus::guest(0, String::new()))
                .is_err()
        );
        assert!(r.start(Timestamp::now()).is_err());
    }

    #[test]
    fn start_error_exits_a_created_container() {
        let mut r = record();
        r.exit(Timestamp::now(), ExitStatus::start_error("bad".into()))
            .unwrap();
        assert_eq!(r.exit.as_ref().unwrap().code, 128);
        assert!(r.started_at.is_some() && r.finished_at.is_some());
    }

    #[test]
    fn exit_reasons() {
        assert_eq!(ExitStatus::guest(0, String::new()).reason, "Completed");
        assert_eq!(ExitStatus::guest(1, String::new()).reason, "Error");
        assert_eq!(ExitStatus::killed("x").code, 137);
    }

    #[test]
    fn filter_matches_sandbox_and_state() {
        let r = record();
        let f = ContainerFilter {
            sandbox_id: Some(r.sandbox_id.to_string()),
            state: Some(ContainerState::Created),
            ..Default::default()
        };
        assert!(f.matches(&r));
        let f = ContainerFilter {
            state: Some(ContainerState::Running),
            ..Default::default()
        };
        assert!(!f.matches(&r));
    }
}
