//! The RuntimeService router: pods and their containers go to the side that
//! holds them, lists merge both sides, `Status` reports both runtimes.

use std::collections::HashSet;

use tonic::{Request, Response, Status};
use wasmlet_agent::model::time::Timestamp;
use wasmlet_proto::cri;
use wasmlet_proto::cri::runtime_service_server::RuntimeService;

use super::join::{COMPAT_SMART, VARIANT_ANNOTATION, add_containers, is_compat_smart};
use super::{PodSide, Reply, Routed};
use crate::service::GetContainerEventsStream;

/// The condition `Status` adds for the downstream runtime.
pub const DELEGATE_CONDITION: &str = "DelegateRuntimeReady";

/// Runs `$method` here when the agent holds the container, else downstream.
macro_rules! by_container {
    ($self:ident, $req:ident, $method:ident) => {{
        let req = $req.into_inner();
        if $self.holds_container(&req.container_id) {
            RuntimeService::$method(&$self.local, Request::new(req)).await
        } else {
            $self
                .down
                .runtime()
                .$method(req)
                .await
                .map_err(|s| $self.down.error(s))
        }
    }};
}

fn merge_condition(
    local: Option<cri::RuntimeCondition>,
    down: Option<cri::RuntimeCondition>,
    kind: &str,
) -> cri::RuntimeCondition {
    match (local, down) {
        (Some(l), Some(d)) => {
            let status = l.status && d.status;
            let (reason, message) = match (l.status, d.status) {
                (true, true) => (String::new(), l.message),
                (false, true) => (l.reason, format!("wasmlet: {}", l.message)),
                (true, false) => (d.reason, format!("downstream runtime: {}", d.message)),
                (false, false) => (
                    l.reason,
                    format!("wasmlet: {}; downstream runtime: {}", l.message, d.message),
                ),
            };
            cri::RuntimeCondition {
                r#type: kind.to_owned(),
                status,
                reason,
                message,
            }
        }
        (Some(c), None) | (None, Some(c)) => c,
        (None, None) => cri::RuntimeCondition {
            r#type: kind.to_owned(),
            status: false,
            reason: "Unknown".into(),
            message: String::new(),
        },
    }
}

fn take_condition(
    conditions: &mut Vec<cri::RuntimeCondition>,
    kind: &str,
) -> Option<cri::RuntimeCondition> {
    let at = conditions.iter().position(|c| c.r#type == kind)?;
    Some(conditions.remove(at))
}

#[tonic::async_trait]
impl RuntimeService for Routed {
    async fn version(&self, req: Request<cri::VersionRequest>) -> Reply<cri::VersionResponse> {
        RuntimeService::version(&self.local, req).await
    }

    async fn run_pod_sandbox(
        &self,
        req: Request<cri::RunPodSandboxRequest>,
    ) -> Reply<cri::RunPodSandboxResponse> {
        let req = req.into_inner();
        if self.is_wasm_handler(&req.runtime_handler) {
            return RuntimeService::run_pod_sandbox(&self.local, Request::new(req)).await;
        }
        let reply = self
            .down
            .runtime()
            .run_pod_sandbox(req)
            .await
            .map_err(|s| self.down.error(s))?;
        if self.pod_side(&reply.get_ref().pod_sandbox_id) == PodSide::Wasm {
            // Both sides draw 256 random bits; this never happens.
            return Err(Status::internal(format!(
                "the downstream runtime returned sandbox id {}, which is one of wasmlet's",
                reply.get_ref().pod_sandbox_id
            )));
        }
        Ok(reply)
    }

    async fn stop_pod_sandbox(
        &self,
        req: Request<cri::StopPodSandboxRequest>,
    ) -> Reply<cri::StopPodSandboxResponse> {
        let req = req.into_inner();
        match self.pod_side(&req.pod_sandbox_id) {
            PodSide::Wasm => RuntimeService::stop_pod_sandbox(&self.local, Request::new(req)).await,
            side => {
                if side == PodSide::Mixed {
                    // Wasm containers first, while the namespace exists.
                    RuntimeService::stop_pod_sandbox(&self.local, Request::new(req.clone()))
                        .await?;
                }
                self.down
                    .runtime()
                    .stop_pod_sandbox(req)
                    .await
                    .map_err(|s| self.down.error(s))
            }
        }
    }

    async fn remove_pod_sandbox(
        &self,
        req: Request<cri::RemovePodSandboxRequest>,
    ) -> Reply<cri::RemovePodSandboxResponse> {
        let req = req.into_inner();
        match self.pod_side(&req.pod_sandbox_id) {
            PodSide::Wasm => {
                RuntimeService::remove_pod_sandbox(&self.local, Request::new(req)).await
            }
            side => {
                if side == PodSide::Mixed {
                    RuntimeService::remove_pod_sandbox(&self.local, Request::new(req.clone()))
                        .await?;
                }
                self.down
                    .runtime()
                    .remove_pod_sandbox(req)
                    .await
                    .map_err(|s| self.down.error(s))
            }
        }
    }

    async fn update_pod_sandbox_resources(
        &self,
        req: Request<cri::UpdatePodSandboxResourcesRequest>,
    ) -> Reply<cri::UpdatePodSandboxResourcesResponse> {
        let req = req.into_inner();
        // A pod with Wasm containers joined to it is the downstream
        // runtime's pod, with its cgroup: it takes the update.
        if self.pod_side(&req.pod_sandbox_id) == PodSide::Wasm {
            return RuntimeService::update_pod_sandbox_resources(&self.local, Request::new(req))
                .await;
        }
        self.down
            .runtime()
            .update_pod_sandbox_resources(req)
            .await
            .map_err(|s| self.down.error(s))
    }

    async fn pod_sandbox_status(
        &self,
        req: Request<cri::PodSandboxStatusRequest>,
    ) -> Reply<cri::PodSandboxStatusResponse> {
        let req = req.into_inner();
        if self.pod_side(&req.pod_sandbox_id) == PodSide::Wasm {
            return RuntimeService::pod_sandbox_status(&self.local, Request::new(req)).await;
        }
        self.down
            .runtime()
            .pod_sandbox_status(req)
            .await
            .map_err(|s| self.down.error(s))
    }

    async fn list_pod_sandbox(
        &self,
        req: Request<cri::ListPodSandboxRequest>,
    ) -> Reply<cri::ListPodSandboxResponse> {
        let req = req.into_inner();
        let unfiltered = req.filter.is_none();
        let asked = Timestamp::now();
        let down = self.down.runtime().list_pod_sandbox(req.clone()).await;
        let reachable = down.is_ok();
        let down = self.partial("ListPodSandbox", down);
        let mut items = RuntimeService::list_pod_sandbox(&self.local, Request::new(req))
            .await?
            .into_inner()
            .items;
        if unfiltered && reachable {
            // Joined sandboxes whose pod the downstream no longer has
            // (removed while wasmlet was down) are left-overs.
            let live: HashSet<&str> = down.items.iter().map(|p| p.id.as_str()).collect();
            for (id, joined_at) in self.agent.joined_pod_sandboxes() {
                if joined_at < asked && !live.contains(id.as_str()) {
                    tracing::info!(sandbox_id = %id, "the downstream pod of a joined sandbox is gone; removing it");
                    if let Err(e) = self.agent.remove_pod_sandbox(&id).await {
                        tracing::warn!(sandbox_id = %id, error = %e, "removing a left-over joined sandbox");
                    }
                }
            }
        }
        items.extend(down.items);
        Ok(Response::new(cri::ListPodSandboxResponse { items }))
    }

    async fn create_container(
        &self,
        req: Request<cri::CreateContainerRequest>,
    ) -> Reply<cri::CreateContainerResponse> {
        let req = req.into_inner();
        let side = self.pod_side(&req.pod_sandbox_id);
        if side == PodSide::Wasm {
            return RuntimeService::create_container(&self.local, Request::new(req)).await;
        }
        let image = req
            .config
            .as_ref()
            .and_then(|c| c.image.as_ref())
            .map(|i| i.image.clone())
            .unwrap_or_default();
        let wasm_image = !image.is_empty() && self.agent.image_status(&image).is_some();
        if !wasm_image {
            return self
                .down
                .runtime()
                .create_container(req)
                .await
                .map_err(|s| self.down.error(s));
        }
        if !is_compat_smart(req.sandbox_config.as_ref()) {
            return Err(Status::failed_precondition(format!(
                "image {image} is a Wasm image held by wasmlet, but pod sandbox {} runs in the downstream runtime at {}; \
                 run the pod with a Wasm RuntimeClass handler ({:?}), or annotate it {VARIANT_ANNOTATION}={COMPAT_SMART} \
                 to run its Wasm containers beside its Linux containers",
                req.pod_sandbox_id,
                self.down.socket().display(),
                self.handlers,
            )));
        }
        self.create_in_mixed_pod(req, side).await
    }

    async fn start_container(
        &self,
        req: Request<cri::StartContainerRequest>,
    ) -> Reply<cri::StartContainerResponse> {
        by_container!(self, req, start_container)
    }

    async fn stop_container(
        &self,
        req: Request<cri::StopContainerRequest>,
    ) -> Reply<cri::StopContainerResponse> {
        by_container!(self, req, stop_container)
    }

    async fn remove_container(
        &self,
        req: Request<cri::RemoveContainerRequest>,
    ) -> Reply<cri::RemoveContainerResponse> {
        by_container!(self, req, remove_container)
    }

    async fn list_containers(
        &self,
        req: Request<cri::ListContainersRequest>,
    ) -> Reply<cri::ListContainersResponse> {
        let req = req.into_inner();
        let down = self.down.runtime().list_containers(req.clone()).await;
        let down = self.partial("ListContainers", down);
        let mut containers = RuntimeService::list_containers(&self.local, Request::new(req))
            .await?
            .into_inner()
            .containers;
        containers.extend(down.containers);
        Ok(Response::new(cri::ListContainersResponse { containers }))
    }

    async fn container_status(
        &self,
        req: Request<cri::ContainerStatusRequest>,
    ) -> Reply<cri::ContainerStatusResponse> {
        by_container!(self, req, container_status)
    }

    async fn update_container_resources(
        &self,
        req: Request<cri::UpdateContainerResourcesRequest>,
    ) -> Reply<cri::UpdateContainerResourcesResponse> {
        by_container!(self, req, update_container_resources)
    }

    async fn reopen_container_log(
        &self,
        req: Request<cri::ReopenContainerLogRequest>,
    ) -> Reply<cri::ReopenContainerLogResponse> {
        by_container!(self, req, reopen_container_log)
    }

    async fn exec_sync(&self, req: Request<cri::ExecSyncRequest>) -> Reply<cri::ExecSyncResponse> {
        by_container!(self, req, exec_sync)
    }

    async fn exec(&self, req: Request<cri::ExecRequest>) -> Reply<cri::ExecResponse> {
        by_container!(self, req, exec)
    }

    async fn attach(&self, req: Request<cri::AttachRequest>) -> Reply<cri::AttachResponse> {
        by_container!(self, req, attach)
    }

    async fn port_forward(
        &self,
        req: Request<cri::PortForwardRequest>,
    ) -> Reply<cri::PortForwardResponse> {
        let req = req.into_inner();
        // A mixed pod's Wasm containers share its namespace: the
        // downstream runtime forwards into it.
        if self.pod_side(&req.pod_sandbox_id) == PodSide::Wasm {
            return RuntimeService::port_forward(&self.local, Request::new(req)).await;
        }
        self.down
            .runtime()
            .port_forward(req)
            .await
            .map_err(|s| self.down.error(s))
    }

    async fn container_stats(
        &self,
        req: Request<cri::ContainerStatsRequest>,
    ) -> Reply<cri::ContainerStatsResponse> {
        by_container!(self, req, container_stats)
    }

    async fn list_container_stats(
        &self,
        req: Request<cri::ListContainerStatsRequest>,
    ) -> Reply<cri::ListContainerStatsResponse> {
        let req = req.into_inner();
        let down = self.down.runtime().list_container_stats(req.clone()).await;
        let down = self.partial("ListContainerStats", down);
        let mut stats = RuntimeService::list_container_stats(&self.local, Request::new(req))
            .await?
            .into_inner()
            .stats;
        stats.extend(down.stats);
        Ok(Response::new(cri::ListContainerStatsResponse { stats }))
    }

    async fn pod_sandbox_stats(
        &self,
        req: Request<cri::PodSandboxStatsRequest>,
    ) -> Reply<cri::PodSandboxStatsResponse> {
        let req = req.into_inner();
        let side = self.pod_side(&req.pod_sandbox_id);
        if side == PodSide::Wasm {
            return RuntimeService::pod_sandbox_stats(&self.local, Request::new(req)).await;
        }
        let id = req.pod_sandbox_id.clone();
        let mut reply = self
            .down
            .runtime()
            .pod_sandbox_stats(req)
            .await
            .map_err(|s| self.down.error(s))?
            .into_inner();
        if side == PodSide::Mixed
            && let Some(stats) = reply.stats.as_mut()
        {
            let mut wasm = self.joined_container_stats().await?;
            add_containers(stats, wasm.remove(&id).unwrap_or_default());
        }
        Ok(Response::new(reply))
    }

    async fn list_pod_sandbox_stats(
        &self,
        req: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Reply<cri::ListPodSandboxStatsResponse> {
        let req = req.into_inner();
        let down = self
            .down
            .runtime()
            .list_pod_sandbox_stats(req.clone())
            .await;
        let mut down = self.partial("ListPodSandboxStats", down);
        let mut wasm = self.joined_container_stats().await?;
        for pod in &mut down.stats {
            let id = pod.attributes.as_ref().map(|a| a.id.clone());
            if let Some(containers) = id.and_then(|id| wasm.remove(&id)) {
                add_containers(pod, containers);
            }
        }
        let mut stats = RuntimeService::list_pod_sandbox_stats(&self.local, Request::new(req))
            .await?
            .into_inner()
            .stats;
        stats.extend(down.stats);
        Ok(Response::new(cri::ListPodSandboxStatsResponse { stats }))
    }

    async fn update_runtime_config(
        &self,
        req: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> Reply<cri::UpdateRuntimeConfigResponse> {
        let req = req.into_inner();
        if let Err(status) = self.down.runtime().update_runtime_config(req.clone()).await {
            // The node's configuration, not a Wasm pod's: wasmlet takes it
            // regardless, and the kubelet sends it again.
            tracing::warn!(error = %self.down.error(status).message(), "the downstream runtime did not take the runtime config");
        }
        RuntimeService::update_runtime_config(&self.local, Request::new(req)).await
    }

    async fn status(&self, req: Request<cri::StatusRequest>) -> Reply<cri::StatusResponse> {
        let req = req.into_inner();
        let mut local = RuntimeService::status(&self.local, Request::new(req))
            .await?
            .into_inner();
        let mut conditions = local.status.take().unwrap_or_default().conditions;
        let local_network = take_condition(&mut conditions, "NetworkReady");
        let mut handlers: Vec<cri::RuntimeHandler> = local
            .runtime_handlers
            .drain(..)
            .filter(|h| self.is_wasm_handler(&h.name))
            .collect();
        match self.down.runtime().status(req).await {
            Ok(down) => {
                let down = down.into_inner();
                let mut theirs = down.status.unwrap_or_default().conditions;
                let runtime = take_condition(&mut theirs, "RuntimeReady");
                let network = take_condition(&mut theirs, "NetworkReady");
                conditions.push(merge_condition(local_network, network, "NetworkReady"));
                let runtime = runtime.unwrap_or(cri::RuntimeCondition {
                    status: false,
                    reason: "NoRuntimeReady".into(),
                    message: "the downstream runtime reported no RuntimeReady condition".into(),
                    ..Default::default()
                });
                conditions.push(cri::RuntimeCondition {
                    r#type: DELEGATE_CONDITION.into(),
                    status: runtime.status,
                    reason: runtime.reason,
                    message: format!("{}: {}", self.down.socket().display(), runtime.message),
                });
                conditions.extend(theirs);
                let mut theirs = down.runtime_handlers;
                if theirs.is_empty() {
                    // An older runtime reports none: it serves the default.
                    theirs.push(cri::RuntimeHandler {
                        name: String::new(),
                        features: None,
                    });
                }
                handlers.extend(
                    theirs
                        .into_iter()
                        .filter(|h| !self.is_wasm_handler(&h.name)),
                );
                for (key, value) in down.info {
                    local.info.insert(format!("delegate.{key}"), value);
                }
            }
            Err(status) => {
                let status = self.down.error(status);
                conditions.extend(local_network);
                conditions.push(cri::RuntimeCondition {
                    r#type: DELEGATE_CONDITION.into(),
                    status: false,
                    reason: "DelegateUnreachable".into(),
                    message: status.message().to_owned(),
                });
            }
        }
        Ok(Response::new(cri::StatusResponse {
            status: Some(cri::RuntimeStatus { conditions }),
            info: local.info,
            runtime_handlers: handlers,
            features: local.features,
        }))
    }

    async fn checkpoint_container(
        &self,
        req: Request<cri::CheckpointContainerRequest>,
    ) -> Reply<cri::CheckpointContainerResponse> {
        let req = req.into_inner();
        if self.holds_container(&req.container_id) {
            return RuntimeService::checkpoint_container(&self.local, Request::new(req)).await;
        }
        self.down
            .runtime()
            .checkpoint_container(req)
            .await
            .map_err(|s| self.down.error(s))
    }

    type GetContainerEventsStream = GetContainerEventsStream;

    /// Both runtimes' events in one stream. A subscriber must not miss
    /// either side's, so a downstream that publishes none makes the call
    /// fail (the kubelet then relists), and the end of the downstream's
    /// stream ends this one.
    async fn get_container_events(
        &self,
        req: Request<cri::GetEventsRequest>,
    ) -> Reply<Self::GetContainerEventsStream> {
        use futures::StreamExt;
        let req = req.into_inner();
        let down = self
            .down
            .runtime()
            .get_container_events(req)
            .await
            .map_err(|s| self.down.error(s))?
            .into_inner();
        let local = RuntimeService::get_container_events(&self.local, Request::new(req))
            .await?
            .into_inner();
        let socket = self.down.socket().display().to_string();
        let down = down
            .map(|item| {
                item.map_err(|s| {
                    Status::unavailable(format!(
                        "the downstream runtime's event stream failed: {}",
                        s.message()
                    ))
                })
            })
            .chain(futures::stream::once(async move {
                Err(Status::unavailable(format!(
                    "the downstream runtime at {socket} ended its event stream; subscribe again"
                )))
            }));
        Ok(Response::new(Box::pin(futures::stream::select(
            local, down,
        ))))
    }

    async fn list_metric_descriptors(
        &self,
        req: Request<cri::ListMetricDescriptorsRequest>,
    ) -> Reply<cri::ListMetricDescriptorsResponse> {
        let req = req.into_inner();
        let down = self.down.runtime().list_metric_descriptors(req).await;
        let down = self.partial("ListMetricDescriptors", down);
        let mut descriptors =
            RuntimeService::list_metric_descriptors(&self.local, Request::new(req))
                .await?
                .into_inner()
                .descriptors;
        let known: HashSet<String> = descriptors.iter().map(|d| d.name.clone()).collect();
        descriptors.extend(
            down.descriptors
                .into_iter()
                .filter(|d| !known.contains(&d.name)),
        );
        Ok(Response::new(cri::ListMetricDescriptorsResponse {
            descriptors,
        }))
    }

    async fn list_pod_sandbox_metrics(
        &self,
        req: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> Reply<cri::ListPodSandboxMetricsResponse> {
        let req = req.into_inner();
        let down = self.down.runtime().list_pod_sandbox_metrics(req).await;
        let down = self.partial("ListPodSandboxMetrics", down);
        let mut pod_metrics =
            RuntimeService::list_pod_sandbox_metrics(&self.local, Request::new(req))
                .await?
                .into_inner()
                .pod_metrics;
        pod_metrics.extend(down.pod_metrics);
        Ok(Response::new(cri::ListPodSandboxMetricsResponse {
            pod_metrics,
        }))
    }

    async fn runtime_config(
        &self,
        req: Request<cri::RuntimeConfigRequest>,
    ) -> Reply<cri::RuntimeConfigResponse> {
        // The kubelet sizes pod cgroups with the cgroup driver of the
        // runtime that makes cgroups: the downstream one.
        let req = req.into_inner();
        match self.down.runtime().runtime_config(req).await {
            Ok(reply) => Ok(reply),
            Err(status) => {
                tracing::warn!(error = %self.down.error(status).message(), "the downstream runtime did not answer RuntimeConfig; answering with wasmlet's");
                RuntimeService::runtime_config(&self.local, Request::new(req)).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_merge_to_ready_only_when_both_are() {
        let c = |status: bool, message: &str| cri::RuntimeCondition {
            r#type: "NetworkReady".into(),
            status,
            reason: if status {
                String::new()
            } else {
                "NotReady".into()
            },
            message: message.into(),
        };
        let both = merge_condition(Some(c(true, "a")), Some(c(true, "b")), "NetworkReady");
        assert!(both.status);
        let theirs = merge_condition(Some(c(true, "a")), Some(c(false, "no cni")), "NetworkReady");
        assert!(!theirs.status);
        assert_eq!(theirs.message, "downstream runtime: no cni");
        let ours = merge_condition(Some(c(false, "none")), None, "NetworkReady");
        assert!(!ours.status);
        assert_eq!(ours.message, "none");
    }
}
