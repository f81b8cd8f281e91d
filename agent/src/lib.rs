//! wasmlet's domain core.
//!
//! This crate owns the node's state: the image store, pod sandboxes and
//! containers (as explicit state machines), the wasmtime engine, container
//! logs and the persistent state database. Its one entry point is the
//! [`Agent`] facade, whose async methods mirror the CRI verbs in domain
//! terms.
//!
//! It must not know about gRPC, protobuf or tonic: the `wasmlet-cri` crate
//! converts wire requests into the types here and errors into statuses.

mod agent;
mod artifacts;
pub mod container;
pub mod egress;
pub mod engine;
pub mod error;
pub mod events;
pub mod http;
pub mod ids;
pub mod image;
pub mod inspect;
pub mod limits;
pub mod logs;
pub mod network;
pub mod registry;
pub mod rootfs;
pub mod sandbox;
pub mod stats;
pub mod stdio;
pub mod store;
pub mod time;

pub use agent::{
    Agent, AgentConfig, AttachedStdin, Attachment, ContainerUsage, ExecOutput, ExecStdio,
    ImageInspection, PodUsage, Precompiled, RuntimeInfo, TerminalSize,
};
pub use error::{Error, Result};
