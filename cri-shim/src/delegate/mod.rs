//! One CRI socket for Wasm and ordinary containers: wasmlet in front of
//! the node's own runtime (`[delegate]`).
//!
//! Pods whose RuntimeClass handler is one of wasmlet's run in wasmlet;
//! every other pod, and everything in it, goes to the downstream runtime
//! unchanged. Containers and pod-scoped calls follow the object: what the
//! agent holds is answered here, the rest is forwarded. Lists merge both
//! sides. Images go where their handler says, else where their manifest
//! says (Wasm here, anything else downstream).
//!
//! Mixed pods follow crun's `compat-smart` convention: in a downstream pod
//! annotated `module.wasm.image/variant=compat-smart`, a container whose
//! image is one of wasmlet's runs here, in a sandbox joined to the pod's
//! network namespace (the agent's joined sandboxes), next to the pod's
//! Linux containers.
//!
//! While the downstream runtime is unreachable, Wasm calls keep working,
//! list calls answer with wasmlet's side (the kubelet's relist must not
//! fail, or it would take the node and its Wasm pods down), calls for
//! delegated objects fail with `Unavailable` naming the socket, and
//! `Status` reports `DelegateRuntimeReady=false`.

mod downstream;
mod image;
mod join;
mod runtime;

use tonic::{Response, Status};
use wasmlet_agent::Agent;
use wasmlet_agent::model::ids::{ContainerId, SandboxId};

use crate::service::Cri;

pub use downstream::Downstream;

type Reply<T> = Result<Response<T>, Status>;

/// wasmlet's own services in front of a downstream runtime.
#[derive(Clone)]
pub struct Routed {
    local: Cri,
    agent: Agent,
    down: Downstream,
    handlers: Vec<String>,
}

/// Which side holds a pod sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PodSide {
    /// One of wasmlet's own pods.
    Wasm,
    /// A downstream pod with Wasm containers in a joined sandbox here.
    Mixed,
    /// A downstream pod (or none at all).
    Downstream,
}

impl Routed {
    pub fn new(local: Cri, agent: Agent, down: Downstream, handlers: Vec<String>) -> Self {
        Self {
            local,
            agent,
            down,
            handlers,
        }
    }

    fn is_wasm_handler(&self, handler: &str) -> bool {
        !handler.is_empty() && self.handlers.iter().any(|h| h == handler)
    }

    fn pod_side(&self, id: &str) -> PodSide {
        match SandboxId::parse(id)
            .ok()
            .and_then(|id| self.agent.holds_pod_sandbox(&id))
        {
            Some(false) => PodSide::Wasm,
            Some(true) => PodSide::Mixed,
            None => PodSide::Downstream,
        }
    }

    fn holds_container(&self, id: &str) -> bool {
        ContainerId::parse(id).is_ok_and(|id| self.agent.holds_container(&id))
    }

    /// The downstream's answer to a list call, or nothing (logged) while
    /// it is unreachable.
    fn partial<T: Default>(&self, what: &str, reply: Reply<T>) -> T {
        match reply {
            Ok(r) => r.into_inner(),
            Err(status) => {
                let status = self.down.error(status);
                tracing::warn!(call = what, error = %status.message(), "the downstream runtime did not answer; listing wasmlet's side only");
                T::default()
            }
        }
    }
}
