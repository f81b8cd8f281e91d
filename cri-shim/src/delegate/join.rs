//! crun's `compat-smart` convention: Wasm containers of a downstream pod run
//! here in a sandbox joined to the pod's network namespace.

use std::collections::HashMap;
use std::path::PathBuf;

use tonic::{Request, Status};
use wasmlet_agent::model::ids::SandboxId;
use wasmlet_agent::model::sandbox::JoinedPod;
use wasmlet_proto::cri;
use wasmlet_proto::cri::runtime_service_server::RuntimeService;

use super::{PodSide, Reply, Routed};
use crate::convert;
use crate::status::to_status;

/// The pod annotation (and value) asking for Wasm containers to run beside
/// a downstream pod's Linux containers.
pub const VARIANT_ANNOTATION: &str = "module.wasm.image/variant";
pub const COMPAT_SMART: &str = "compat-smart";

impl Routed {
    /// The network namespace of downstream pod `id`, from its verbose
    /// status: the runtime spec's network namespace path (containerd,
    /// CRI-O), else its sandbox process's namespace. `None` for a pod on
    /// the node's network.
    async fn downstream_netns(&self, id: &str) -> Result<Option<PathBuf>, Status> {
        let reply = self
            .down
            .runtime()
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: id.to_owned(),
                verbose: true,
            })
            .await
            .map_err(|s| self.down.error(s))?
            .into_inner();
        let status = reply.status.unwrap_or_default();
        if status.state != cri::PodSandboxState::SandboxReady as i32 {
            return Err(Status::failed_precondition(format!(
                "pod sandbox {id} is not ready in the downstream runtime"
            )));
        }
        let host_network = status
            .linux
            .and_then(|l| l.namespaces)
            .and_then(|n| n.options)
            .is_some_and(|o| o.network == cri::NamespaceMode::Node as i32);
        if host_network {
            return Ok(None);
        }
        let info = reply
            .info
            .get("info")
            .and_then(|i| serde_json::from_str::<serde_json::Value>(i).ok())
            .unwrap_or_default();
        netns_of(&info).map(Some).ok_or_else(|| {
            Status::failed_precondition(format!(
                "compat-smart: the downstream runtime's verbose PodSandboxStatus for {id} names no network namespace (neither runtimeSpec.linux.namespaces nor a pid), so Wasm containers cannot join the pod's network"
            ))
        })
    }

    /// Creates a Wasm container in downstream pod `req.pod_sandbox_id`,
    /// joining the pod first when needed.
    pub(super) async fn create_in_mixed_pod(
        &self,
        req: cri::CreateContainerRequest,
        side: PodSide,
    ) -> Reply<cri::CreateContainerResponse> {
        let id = SandboxId::parse(&req.pod_sandbox_id).map_err(to_status)?;
        if side == PodSide::Downstream {
            let netns = self.downstream_netns(&req.pod_sandbox_id).await?;
            let mut spec = convert::sandbox_spec(req.sandbox_config.clone(), String::new())
                .map_err(to_status)?;
            spec.joined = Some(JoinedPod {
                runtime: self.down.socket().display().to_string(),
                netns,
            });
            self.agent
                .join_pod_sandbox(id, spec)
                .await
                .map_err(to_status)?;
        }
        RuntimeService::create_container(&self.local, Request::new(req)).await
    }
}

/// Where a runtime's verbose sandbox info says the pod's network
/// namespace is.
fn netns_of(info: &serde_json::Value) -> Option<PathBuf> {
    let from_spec = info
        .pointer("/runtimeSpec/linux/namespaces")
        .and_then(|n| n.as_array())
        .and_then(|namespaces| {
            namespaces.iter().find_map(|n| {
                (n.get("type")?.as_str()? == "network")
                    .then(|| n.get("path")?.as_str().filter(|p| !p.is_empty()))
                    .flatten()
                    .map(PathBuf::from)
            })
        });
    from_spec.or_else(|| {
        let pid = info.get("pid")?.as_u64().filter(|p| *p > 0)?;
        Some(PathBuf::from(format!("/proc/{pid}/ns/net")))
    })
}

pub(super) fn is_compat_smart(config: Option<&cri::PodSandboxConfig>) -> bool {
    config
        .and_then(|c| c.annotations.get(VARIANT_ANNOTATION))
        .is_some_and(|v| v == COMPAT_SMART)
}

impl Routed {
    /// Stats of the Wasm containers of mixed pods, by pod id.
    pub(super) async fn joined_container_stats(
        &self,
    ) -> Result<HashMap<String, Vec<cri::ContainerStats>>, Status> {
        let mut by_pod: HashMap<String, Vec<cri::ContainerStats>> = HashMap::new();
        for (id, _) in self.agent.joined_pod_sandboxes() {
            let stats = RuntimeService::list_container_stats(
                &self.local,
                Request::new(cri::ListContainerStatsRequest {
                    filter: Some(cri::ContainerStatsFilter {
                        pod_sandbox_id: id.to_string(),
                        ..Default::default()
                    }),
                }),
            )
            .await?
            .into_inner()
            .stats;
            by_pod.insert(id.to_string(), stats);
        }
        Ok(by_pod)
    }
}

/// Adds a mixed pod's Wasm containers to the downstream's stats of it.
pub(super) fn add_containers(pod: &mut cri::PodSandboxStats, containers: Vec<cri::ContainerStats>) {
    if containers.is_empty() {
        return;
    }
    pod.linux
        .get_or_insert_with(Default::default)
        .containers
        .extend(containers);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_network_namespace_comes_from_the_runtime_spec_else_the_pid() {
        let containerd = serde_json::json!({
            "pid": 4242,
            "runtimeSpec": {"linux": {"namespaces": [
                {"type": "pid"},
                {"type": "network", "path": "/var/run/netns/cni-1234"},
            ]}},
        });
        assert_eq!(
            netns_of(&containerd),
            Some(PathBuf::from("/var/run/netns/cni-1234"))
        );
        let pid_only = serde_json::json!({"pid": 4242});
        assert_eq!(
            netns_of(&pid_only),
            Some(PathBuf::from("/proc/4242/ns/net"))
        );
        assert_eq!(netns_of(&serde_json::json!({"pid": 0})), None);
        assert_eq!(netns_of(&serde_json::json!({})), None);
    }

    #[test]
    fn compat_smart_is_read_from_the_pod_annotations() {
        let mut config = cri::PodSandboxConfig::default();
        assert!(!is_compat_smart(Some(&config)));
        config
            .annotations
            .insert(VARIANT_ANNOTATION.into(), COMPAT_SMART.into());
        assert!(is_compat_smart(Some(&config)));
        config
            .annotations
            .insert(VARIANT_ANNOTATION.into(), "compat".into());
        assert!(!is_compat_smart(Some(&config)));
        assert!(!is_compat_smart(None));
    }
}
