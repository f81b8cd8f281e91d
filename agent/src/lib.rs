//! wasmlet's domain core.
//!
//! This crate owns the node's state: the image store, pod sandboxes and
//! containers (as explicit state machines), the wasmtime engine, container
//! logs and the persistent state database. Its one entry point is the
//! [`Agent`] facade, whose async methods mirror the CRI verbs in domain
//! terms, taking and returning the plain data in [`model`].
//!
//! It must not know about gRPC, protobuf or tonic: the `wasmlet-cri` crate
//! converts wire requests into the types here and errors into statuses.
//!
//! Below the facade (`agent`), by concern: `model` (plain data, a leaf),
//! `state` (the state database), `images` (store, registry, root
//! filesystems), `runtime` (the engine and everything a running guest
//! needs) and `network` (pod namespaces, CNI, DNS).

mod agent;
pub mod error;
mod failpoint;
mod images;
pub mod metrics;
pub mod model;
mod network;
mod runtime;
mod state;

pub use agent::{
    Agent, AgentConfig, AttachedStdin, Attachment, ContainerUsage, ExecOutput, ExecStdio,
    ImageInspection, NodeMemoryStatus, PodUsage, Precompiled, RuntimeInfo, TerminalSize,
};
pub use error::{Error, Result};

// What an `AgentConfig` is made of.
pub use images::registry::RegistryConfig;
pub use network::{CniPaths, NetworkConfig};
pub use runtime::engine::HTTP_POOL_INSTANCES;
pub use runtime::http::HttpOptions;
pub use runtime::node_memory::default_budget as default_node_memory_budget;

// Registry access: what a pull takes and a probe answers, and the client
// itself for `wasmlet image push`, which runs beside a serving agent.
pub use images::registry::{Credentials, ImageKind, Registry};

// What exec and attach sessions carry, and the terminal line discipline
// the streaming server applies to them.
pub use runtime::logs::{Output, Stream};
pub use runtime::stdio::{INPUT_BUFFER, LineDiscipline, OUTPUT_CHUNKS, onlcr};
