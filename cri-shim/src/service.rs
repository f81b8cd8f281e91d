//! The CRI v1 RuntimeService and ImageService over the agent. Each RPC
//! converts the request, calls the facade, converts the answer.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use futures::Stream;
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status};
use wasmlet_agent::Agent;
use wasmlet_agent::model::container::ContainerFilter;
use wasmlet_agent::model::events::{LifecycleEvent, LifecycleKind};
use wasmlet_proto::cri;
use wasmlet_proto::cri::image_service_server::ImageService;
use wasmlet_proto::cri::runtime_service_server::RuntimeService;

use crate::convert;
use crate::status::to_status;
use crate::streaming::{Pending, Streaming};

type Reply<T> = Result<Response<T>, Status>;

/// The stream `GetContainerEvents` answers with.
pub type GetContainerEventsStream =
    Pin<Box<dyn Stream<Item = Result<cri::ContainerEventResponse, Status>> + Send>>;

/// Settings of the CRI layer itself.
#[derive(Clone, Debug)]
pub struct CriSettings {
    /// RuntimeClass handlers served; the empty (default) handler always is.
    pub runtime_handlers: Vec<String>,
    pub cgroup_driver: cri::CgroupDriver,
}

/// Both CRI services. Cheap to clone.
#[derive(Clone)]
pub struct Cri {
    agent: Agent,
    settings: CriSettings,
    pod_cidr: std::sync::Arc<Mutex<String>>,
    streaming: Option<std::sync::Arc<Streaming>>,
}

impl Cri {
    pub fn new(agent: Agent, settings: CriSettings) -> Self {
        Self {
            agent,
            settings,
            pod_cidr: Default::default(),
            streaming: None,
        }
    }

    /// Serves `Exec`, `Attach` and `PortForward` through `streaming`.
    pub fn with_streaming(mut self, streaming: std::sync::Arc<Streaming>) -> Self {
        self.streaming = Some(streaming);
        self
    }

    /// A streaming URL for `pending`, once its container runs (or its pod
    /// is ready).
    fn stream_url(&self, pending: Pending) -> Result<String, Status> {
        match &pending {
            Pending::Exec { container, .. } | Pending::Attach { container, .. } => {
                let record = self.agent.container_status(container).map_err(to_status)?;
                if !record.state.is_running() {
                    return Err(Status::failed_precondition(format!(
                        "container {container} is not running"
                    )));
                }
                if let Pending::Attach { options, .. } = &pending
                    && options.stdin
                    && !record.spec.stdin
                {
                    return Err(Status::invalid_argument(format!(
                        "container {container} was created without stdin: attach cannot write to it"
                    )));
                }
            }
            Pending::PortForward { sandbox, .. } => {
                let record = self.agent.pod_sandbox_status(sandbox).map_err(to_status)?;
                if record.state != wasmlet_agent::model::sandbox::SandboxState::Ready {
                    return Err(Status::failed_precondition(format!(
                        "pod sandbox {sandbox} is not ready"
                    )));
                }
            }
        }
        let Some(streaming) = &self.streaming else {
            return Err(Status::unavailable(
                "the streaming server is not running in this process",
            ));
        };
        streaming.url(pending).map_err(Status::resource_exhausted)
    }

    fn check_handler(&self, handler: &str) -> Result<(), Status> {
        if handler.is_empty() || self.settings.runtime_handlers.iter().any(|h| h == handler) {
            Ok(())
        } else {
            Err(Status::invalid_argument(format!(
                "runtime handler {handler:?} is not served by wasmlet; it serves {:?} (and the default handler \"\")",
                self.settings.runtime_handlers
            )))
        }
    }
}

fn unimplemented(what: &str, why: &str) -> Status {
    Status::unimplemented(format!("{what} is not supported by wasmlet: {why}"))
}

fn ok<T>(t: T) -> Reply<T> {
    Ok(Response::new(t))
}

/// An event with the statuses the evented PLEG reads: its pod's, and
/// every container's in that pod, as they are when it is sent.
fn event_response(agent: &Agent, event: LifecycleEvent) -> cri::ContainerEventResponse {
    let kind = match event.kind {
        LifecycleKind::Created => cri::ContainerEventType::ContainerCreatedEvent,
        LifecycleKind::Started => cri::ContainerEventType::ContainerStartedEvent,
        LifecycleKind::Stopped => cri::ContainerEventType::ContainerStoppedEvent,
        LifecycleKind::Deleted => cri::ContainerEventType::ContainerDeletedEvent,
    };
    let containers = agent.list_containers(&ContainerFilter {
        sandbox_id: Some(event.sandbox_id.to_string()),
        ..Default::default()
    });
    cri::ContainerEventResponse {
        container_id: event.id,
        container_event_type: kind as i32,
        created_at: event.at.as_nanos(),
        pod_sandbox_status: agent
            .pod_sandbox_status(&event.sandbox_id)
            .ok()
            .map(|s| convert::pod_sandbox_status(&s))
            .or_else(|| {
                event
                    .removed_sandbox
                    .as_deref()
                    .map(convert::pod_sandbox_status)
            }),
        containers_statuses: containers
            .iter()
            .map(|c| convert::container_status(c, agent.image_status(c.image_id.as_str()).as_ref()))
            .collect(),
    }
}

fn json_info(key: &str, value: &impl serde::Serialize) -> HashMap<String, String> {
    let mut info = HashMap::new();
    if let Ok(v) = serde_json::to_string(value) {
        info.insert(key.to_owned(), v);
    }
    info
}

#[tonic::async_trait]
impl RuntimeService for Cri {
    async fn version(&self, _: Request<cri::VersionRequest>) -> Reply<cri::VersionResponse> {
        let info = self.agent.runtime_info();
        ok(cri::VersionResponse {
            version: "0.1.0".into(),
            runtime_name: info.name.into(),
            runtime_version: info.version.into(),
            runtime_api_version: wasmlet_proto::CRI_API_VERSION.into(),
        })
    }

    async fn run_pod_sandbox(
        &self,
        req: Request<cri::RunPodSandboxRequest>,
    ) -> Reply<cri::RunPodSandboxResponse> {
        let req = req.into_inner();
        self.check_handler(&req.runtime_handler)?;
        let spec = convert::sandbox_spec(req.config, req.runtime_handler).map_err(to_status)?;
        let id = self.agent.run_pod_sandbox(spec).await.map_err(to_status)?;
        ok(cri::RunPodSandboxResponse {
            pod_sandbox_id: id.to_string(),
        })
    }

    async fn stop_pod_sandbox(
        &self,
        req: Request<cri::StopPodSandboxRequest>,
    ) -> Reply<cri::StopPodSandboxResponse> {
        // An id that cannot name a sandbox names none that exists, and
        // stopping what is gone succeeds.
        if let Ok(id) = convert::sandbox_id(&req.into_inner().pod_sandbox_id) {
            self.agent.stop_pod_sandbox(&id).await.map_err(to_status)?;
        }
        ok(cri::StopPodSandboxResponse {})
    }

    async fn remove_pod_sandbox(
        &self,
        req: Request<cri::RemovePodSandboxRequest>,
    ) -> Reply<cri::RemovePodSandboxResponse> {
        // An id that cannot name a sandbox names none that exists: success.
        if let Ok(id) = convert::sandbox_id(&req.into_inner().pod_sandbox_id) {
            self.agent
                .remove_pod_sandbox(&id)
                .await
                .map_err(to_status)?;
        }
        ok(cri::RemovePodSandboxResponse {})
    }

    async fn pod_sandbox_status(
        &self,
        req: Request<cri::PodSandboxStatusRequest>,
    ) -> Reply<cri::PodSandboxStatusResponse> {
        let req = req.into_inner();
        let id = convert::sandbox_id(&req.pod_sandbox_id).map_err(to_status)?;
        let record = self.agent.pod_sandbox_status(&id).map_err(to_status)?;
        let info = if req.verbose {
            json_info("info", &record)
        } else {
            HashMap::new()
        };
        ok(cri::PodSandboxStatusResponse {
            status: Some(convert::pod_sandbox_status(&record)),
            info,
            containers_statuses: Vec::new(),
            timestamp: 0,
        })
    }

    async fn list_pod_sandbox(
        &self,
        req: Request<cri::ListPodSandboxRequest>,
    ) -> Reply<cri::ListPodSandboxResponse> {
        let filter = convert::sandbox_filter(req.into_inner().filter);
        let items = self
            .agent
            .list_pod_sandboxes(&filter)
            .iter()
            .map(convert::pod_sandbox)
            .collect();
        ok(cri::ListPodSandboxResponse { items })
    }

    async fn create_container(
        &self,
        req: Request<cri::CreateContainerRequest>,
    ) -> Reply<cri::CreateContainerResponse> {
        let req = req.into_inner();
        let sandbox = convert::sandbox_id(&req.pod_sandbox_id).map_err(to_status)?;
        let spec = convert::container_spec(req.config).map_err(to_status)?;
        let id = self
            .agent
            .create_container(&sandbox, spec)
            .await
            .map_err(to_status)?;
        ok(cri::CreateContainerResponse {
            container_id: id.to_string(),
        })
    }

    async fn start_container(
        &self,
        req: Request<cri::StartContainerRequest>,
    ) -> Reply<cri::StartContainerResponse> {
        let id = convert::container_id(&req.into_inner().container_id).map_err(to_status)?;
        self.agent.start_container(&id).await.map_err(to_status)?;
        ok(cri::StartContainerResponse {})
    }

    async fn stop_container(
        &self,
        req: Request<cri::StopContainerRequest>,
    ) -> Reply<cri::StopContainerResponse> {
        let req = req.into_inner();
        // As for a sandbox: an id that cannot name a container is stopped.
        if let Ok(id) = convert::container_id(&req.container_id) {
            let timeout = Duration::from_secs(req.timeout.max(0).unsigned_abs());
            self.agent
                .stop_container(&id, timeout)
                .await
                .map_err(to_status)?;
        }
        ok(cri::StopContainerResponse {})
    }

    async fn remove_container(
        &self,
        req: Request<cri::RemoveContainerRequest>,
    ) -> Reply<cri::RemoveContainerResponse> {
        if let Ok(id) = convert::container_id(&req.into_inner().container_id) {
            self.agent.remove_container(&id).await.map_err(to_status)?;
        }
        ok(cri::RemoveContainerResponse {})
    }

    async fn list_containers(
        &self,
        req: Request<cri::ListContainersRequest>,
    ) -> Reply<cri::ListContainersResponse> {
        let filter = req.into_inner().filter;
        if convert::container_filter_is_unsatisfiable(&filter) {
            return ok(cri::ListContainersResponse {
                containers: Vec::new(),
            });
        }
        let filter = convert::container_filter(filter);
        // The kubelet lists every container of the node: each image once.
        let mut images = HashMap::new();
        let containers = self
            .agent
            .list_containers(&filter)
            .iter()
            .map(|c| {
                let image = images
                    .entry(c.image_id.clone())
                    .or_insert_with(|| self.agent.image_status(c.image_id.as_str()));
                convert::container(c, image.as_ref())
            })
            .collect();
        ok(cri::ListContainersResponse { containers })
    }

    async fn container_status(
        &self,
        req: Request<cri::ContainerStatusRequest>,
    ) -> Reply<cri::ContainerStatusResponse> {
        let req = req.into_inner();
        let id = convert::container_id(&req.container_id).map_err(to_status)?;
        let record = self.agent.container_status(&id).map_err(to_status)?;
        let info = if req.verbose {
            json_info("info", &record)
        } else {
            HashMap::new()
        };
        ok(cri::ContainerStatusResponse {
            status: Some(convert::container_status(
                &record,
                self.agent.image_status(record.image_id.as_str()).as_ref(),
            )),
            info,
        })
    }

    async fn update_container_resources(
        &self,
        req: Request<cri::UpdateContainerResourcesRequest>,
    ) -> Reply<cri::UpdateContainerResourcesResponse> {
        let req = req.into_inner();
        let id = convert::container_id(&req.container_id).map_err(to_status)?;
        let resources = convert::resources(req.linux);
        self.agent
            .update_container_resources(&id, resources)
            .map_err(to_status)?;
        ok(cri::UpdateContainerResourcesResponse {})
    }

    async fn update_pod_sandbox_resources(
        &self,
        req: Request<cri::UpdatePodSandboxResourcesRequest>,
    ) -> Reply<cri::UpdatePodSandboxResourcesResponse> {
        let req = req.into_inner();
        let id = convert::sandbox_id(&req.pod_sandbox_id).map_err(to_status)?;
        let resources = convert::pod_resources(req.overhead, req.resources);
        self.agent
            .update_pod_sandbox_resources(&id, resources)
            .map_err(to_status)?;
        ok(cri::UpdatePodSandboxResourcesResponse {})
    }

    async fn reopen_container_log(
        &self,
        req: Request<cri::ReopenContainerLogRequest>,
    ) -> Reply<cri::ReopenContainerLogResponse> {
        let id = convert::container_id(&req.into_inner().container_id).map_err(to_status)?;
        self.agent.reopen_container_log(&id).map_err(to_status)?;
        ok(cri::ReopenContainerLogResponse {})
    }

    async fn exec_sync(&self, req: Request<cri::ExecSyncRequest>) -> Reply<cri::ExecSyncResponse> {
        let req = req.into_inner();
        let id = convert::container_id(&req.container_id).map_err(to_status)?;
        let timeout = (req.timeout > 0).then(|| Duration::from_secs(req.timeout.unsigned_abs()));
        let out = self
            .agent
            .exec_sync(&id, &req.cmd, timeout)
            .await
            .map_err(to_status)?;
        ok(cri::ExecSyncResponse {
            stdout: out.stdout,
            stderr: out.stderr,
            exit_code: out.exit_code,
        })
    }

    async fn exec(&self, req: Request<cri::ExecRequest>) -> Reply<cri::ExecResponse> {
        let pending = convert::exec_request(req.into_inner()).map_err(to_status)?;
        ok(cri::ExecResponse {
            url: self.stream_url(pending)?,
        })
    }

    async fn attach(&self, req: Request<cri::AttachRequest>) -> Reply<cri::AttachResponse> {
        let pending = convert::attach_request(req.into_inner()).map_err(to_status)?;
        ok(cri::AttachResponse {
            url: self.stream_url(pending)?,
        })
    }

    async fn port_forward(
        &self,
        req: Request<cri::PortForwardRequest>,
    ) -> Reply<cri::PortForwardResponse> {
        let pending = convert::port_forward_request(req.into_inner()).map_err(to_status)?;
        ok(cri::PortForwardResponse {
            url: self.stream_url(pending)?,
        })
    }

    async fn container_stats(
        &self,
        req: Request<cri::ContainerStatsRequest>,
    ) -> Reply<cri::ContainerStatsResponse> {
        let id = convert::container_id(&req.into_inner().container_id).map_err(to_status)?;
        let usage = self.agent.container_stats(&id).map_err(to_status)?;
        ok(cri::ContainerStatsResponse {
            stats: Some(convert::container_stats(&usage)),
        })
    }

    async fn list_container_stats(
        &self,
        req: Request<cri::ListContainerStatsRequest>,
    ) -> Reply<cri::ListContainerStatsResponse> {
        let filter = convert::container_stats_filter(req.into_inner().filter);
        let stats = self
            .agent
            .list_container_stats(&filter)
            .iter()
            .map(convert::container_stats)
            .collect();
        ok(cri::ListContainerStatsResponse { stats })
    }

    async fn pod_sandbox_stats(
        &self,
        req: Request<cri::PodSandboxStatsRequest>,
    ) -> Reply<cri::PodSandboxStatsResponse> {
        let id = convert::sandbox_id(&req.into_inner().pod_sandbox_id).map_err(to_status)?;
        let usage = self.agent.pod_sandbox_stats(&id).map_err(to_status)?;
        ok(cri::PodSandboxStatsResponse {
            stats: Some(convert::pod_stats(&usage)),
        })
    }

    async fn list_pod_sandbox_stats(
        &self,
        req: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Reply<cri::ListPodSandboxStatsResponse> {
        let filter = convert::pod_stats_filter(req.into_inner().filter);
        let stats = self
            .agent
            .list_pod_sandbox_stats(&filter)
            .iter()
            .map(convert::pod_stats)
            .collect();
        ok(cri::ListPodSandboxStatsResponse { stats })
    }

    async fn update_runtime_config(
        &self,
        req: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> Reply<cri::UpdateRuntimeConfigResponse> {
        let cidr = req
            .into_inner()
            .runtime_config
            .and_then(|c| c.network_config)
            .map(|n| n.pod_cidr)
            .unwrap_or_default();
        tracing::info!(pod_cidr = %cidr, "runtime config updated");
        *self.pod_cidr.lock().unwrap_or_else(|p| p.into_inner()) = cidr;
        ok(cri::UpdateRuntimeConfigResponse {})
    }

    async fn status(&self, req: Request<cri::StatusRequest>) -> Reply<cri::StatusResponse> {
        let conditions = vec![
            cri::RuntimeCondition {
                r#type: "RuntimeReady".into(),
                status: true,
                reason: String::new(),
                message: String::new(),
            },
            match self.agent.network_status() {
                Ok(network) => cri::RuntimeCondition {
                    r#type: "NetworkReady".into(),
                    status: true,
                    reason: String::new(),
                    message: format!("CNI network {network:?}"),
                },
                Err(why) => cri::RuntimeCondition {
                    r#type: "NetworkReady".into(),
                    status: false,
                    reason: "NetworkPluginNotReady".into(),
                    message: why.to_string(),
                },
            },
        ];
        let mut info = HashMap::new();
        if req.into_inner().verbose {
            let runtime = self.agent.runtime_info();
            info.insert(
                "config".to_owned(),
                serde_json::json!({
                    "root": self.agent.root(),
                    "runtimeHandlers": self.settings.runtime_handlers,
                    "wasmtime": runtime.wasmtime_version,
                    "podCIDR": *self.pod_cidr.lock().unwrap_or_else(|p| p.into_inner()),
                })
                .to_string(),
            );
        }
        let runtime_handlers = std::iter::once(String::new())
            .chain(self.settings.runtime_handlers.iter().cloned())
            .map(|name| cri::RuntimeHandler {
                name,
                features: Some(cri::RuntimeHandlerFeatures {
                    recursive_read_only_mounts: true,
                    user_namespaces: false,
                }),
            })
            .collect();
        ok(cri::StatusResponse {
            status: Some(cri::RuntimeStatus { conditions }),
            info,
            runtime_handlers,
            features: None,
        })
    }

    async fn checkpoint_container(
        &self,
        _: Request<cri::CheckpointContainerRequest>,
    ) -> Reply<cri::CheckpointContainerResponse> {
        Err(unimplemented(
            "CheckpointContainer",
            "checkpointing Wasm guests is not supported",
        ))
    }

    type GetContainerEventsStream = GetContainerEventsStream;

    async fn get_container_events(
        &self,
        _: Request<cri::GetEventsRequest>,
    ) -> Reply<Self::GetContainerEventsStream> {
        let rx = self.agent.subscribe_events();
        let agent = self.agent.clone();
        // Ends after telling a subscriber that fell behind to relist.
        let stream = futures::stream::unfold(Some(rx), move |rx| {
            let agent = agent.clone();
            async move {
                let mut rx = rx?;
                match rx.recv().await {
                    Ok(event) => Some((Ok(event_response(&agent, event)), Some(rx))),
                    Err(RecvError::Lagged(missed)) => Some((
                        Err(Status::aborted(format!(
                            "this subscriber fell {missed} events behind and missed them; subscribe again and relist"
                        ))),
                        None,
                    )),
                    Err(RecvError::Closed) => None,
                }
            }
        });
        ok(Box::pin(stream) as Self::GetContainerEventsStream)
    }

    async fn list_metric_descriptors(
        &self,
        _: Request<cri::ListMetricDescriptorsRequest>,
    ) -> Reply<cri::ListMetricDescriptorsResponse> {
        ok(cri::ListMetricDescriptorsResponse {
            descriptors: convert::metric_descriptors(),
        })
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> Reply<cri::ListPodSandboxMetricsResponse> {
        let pods = self.agent.list_pod_sandbox_stats(&Default::default());
        ok(cri::ListPodSandboxMetricsResponse {
            pod_metrics: pods.iter().map(convert::pod_metrics).collect(),
        })
    }

    async fn runtime_config(
        &self,
        _: Request<cri::RuntimeConfigRequest>,
    ) -> Reply<cri::RuntimeConfigResponse> {
        ok(cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration {
                cgroup_driver: self.settings.cgroup_driver as i32,
            }),
        })
    }
}

#[tonic::async_trait]
impl ImageService for Cri {
    async fn list_images(
        &self,
        _: Request<cri::ListImagesRequest>,
    ) -> Reply<cri::ListImagesResponse> {
        let images = self
            .agent
            .list_images()
            .iter()
            .map(convert::image)
            .collect();
        ok(cri::ListImagesResponse { images })
    }

    async fn image_status(
        &self,
        req: Request<cri::ImageStatusRequest>,
    ) -> Reply<cri::ImageStatusResponse> {
        let req = req.into_inner();
        let reference = convert::image_reference(req.image).map_err(to_status)?;
        let Some(record) = self.agent.image_status(&reference) else {
            return ok(cri::ImageStatusResponse::default());
        };
        let mut info = HashMap::new();
        if req.verbose {
            let manifest = self.agent.image_manifest(&record).map_err(to_status)?;
            info.insert(
                "manifest".to_owned(),
                String::from_utf8_lossy(&manifest).into_owned(),
            );
            info.extend(json_info("info", &record));
        }
        ok(cri::ImageStatusResponse {
            image: Some(convert::image(&record)),
            info,
        })
    }

    async fn pull_image(
        &self,
        req: Request<cri::PullImageRequest>,
    ) -> Reply<cri::PullImageResponse> {
        let req = req.into_inner();
        let reference = convert::image_reference(req.image).map_err(to_status)?;
        let credentials = convert::credentials(req.auth);
        let record = self
            .agent
            .pull_image(&reference, &credentials)
            .await
            .map_err(to_status)?;
        ok(cri::PullImageResponse {
            image_ref: record.id.to_string(),
        })
    }

    async fn remove_image(
        &self,
        req: Request<cri::RemoveImageRequest>,
    ) -> Reply<cri::RemoveImageResponse> {
        let reference = convert::image_reference(req.into_inner().image).map_err(to_status)?;
        self.agent.remove_image(&reference).map_err(to_status)?;
        ok(cri::RemoveImageResponse {})
    }

    async fn image_fs_info(
        &self,
        _: Request<cri::ImageFsInfoRequest>,
    ) -> Reply<cri::ImageFsInfoResponse> {
        let usage = self.agent.image_fs_usage().map_err(to_status)?;
        let fs = cri::FilesystemUsage {
            timestamp: usage.timestamp.as_nanos(),
            fs_id: Some(cri::FilesystemIdentifier {
                mountpoint: usage.mountpoint.to_string_lossy().into_owned(),
            }),
            used_bytes: Some(cri::UInt64Value {
                value: usage.used_bytes,
            }),
            inodes_used: Some(cri::UInt64Value {
                value: usage.inodes_used,
            }),
        };
        ok(cri::ImageFsInfoResponse {
            image_filesystems: vec![fs],
            container_filesystems: Vec::new(),
        })
    }
}
