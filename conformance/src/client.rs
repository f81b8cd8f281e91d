//! `CriClient`: the RuntimeService and ImageService of one endpoint, with the
//! sequences of calls the kubelet makes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::Channel;
use wasmlet_proto::cri::{
    self, image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient,
};

use crate::Error;
use crate::config::Pod;

/// How long a single RPC may take before the harness gives up on it. Every
/// call is bounded so that a hung runtime fails a test instead of stalling it.
pub const DEFAULT_RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// The API version the kubelet states in its `Version` request.
pub const KUBELET_API_VERSION: &str = "0.1.0";

/// How often the wait helpers poll.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// The largest message the kubelet's CRI client accepts (16 MiB): list
/// answers on a dense node are larger than gRPC's 4 MiB default.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// A client of one CRI endpoint on a unix socket. Cloning is cheap and shares
/// the connection.
#[derive(Debug, Clone)]
pub struct CriClient {
    socket: PathBuf,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

impl CriClient {
    /// Connects to the CRI endpoint at `socket`, retrying until it answers
    /// `Version` or `timeout` has passed (the socket may not exist yet).
    pub async fn connect(socket: impl AsRef<Path>, timeout: Duration) -> Result<Self, Error> {
        let socket = socket.as_ref().to_owned();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let attempt = tokio::time::timeout(remaining, Self::try_connect(&socket)).await;
            let last_error = match attempt {
                Ok(Ok(client)) => return Ok(client),
                Ok(Err(e)) => e,
                Err(_) => "the attempt itself timed out".to_owned(),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::ConnectTimeout {
                    socket,
                    timeout,
                    last_error,
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    async fn try_connect(socket: &Path) -> Result<Self, String> {
        let endpoint = wasmlet_proto::unix_endpoint()
            .timeout(DEFAULT_RPC_TIMEOUT)
            .connect_timeout(Duration::from_secs(5));
        let channel = wasmlet_proto::connect_unix_with(endpoint, socket)
            .await
            .map_err(|e| format!("connecting: {e:?}"))?;
        let mut client = CriClient {
            socket: socket.to_owned(),
            runtime: RuntimeServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            images: ImageServiceClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        };
        client
            .version()
            .await
            .map_err(|e| format!("Version: {e}"))?;
        Ok(client)
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The raw RuntimeService client, for requests the helpers do not cover.
    pub fn runtime(&mut self) -> &mut RuntimeServiceClient<Channel> {
        &mut self.runtime
    }

    /// The raw ImageService client, for requests the helpers do not cover.
    pub fn images(&mut self) -> &mut ImageServiceClient<Channel> {
        &mut self.images
    }

    // ---- RuntimeService: runtime information ----

    /// `Version`, asked as the kubelet asks it.
    pub async fn version(&mut self) -> Result<cri::VersionResponse, Error> {
        let request = cri::VersionRequest {
            version: KUBELET_API_VERSION.to_owned(),
        };
        let response = self.runtime.version(request).await;
        Ok(response.map_err(Error::rpc("Version"))?.into_inner())
    }

    pub async fn status(&mut self, verbose: bool) -> Result<cri::StatusResponse, Error> {
        let response = self.runtime.status(cri::StatusRequest { verbose }).await;
        Ok(response.map_err(Error::rpc("Status"))?.into_inner())
    }

    pub async fn runtime_config(&mut self) -> Result<cri::RuntimeConfigResponse, Error> {
        let response = self
            .runtime
            .runtime_config(cri::RuntimeConfigRequest {})
            .await;
        Ok(response.map_err(Error::rpc("RuntimeConfig"))?.into_inner())
    }

    /// Sends the pod CIDR, as the kubelet does once it knows it.
    pub async fn update_runtime_config(&mut self, pod_cidr: &str) -> Result<(), Error> {
        let request = cri::UpdateRuntimeConfigRequest {
            runtime_config: Some(cri::RuntimeConfig {
                network_config: Some(cri::NetworkConfig {
                    pod_cidr: pod_cidr.to_owned(),
                }),
            }),
        };
        let response = self.runtime.update_runtime_config(request).await;
        response.map_err(Error::rpc("UpdateRuntimeConfig"))?;
        Ok(())
    }

    // ---- RuntimeService: sandboxes ----

    /// `RunPodSandbox`; returns the sandbox id.
    pub async fn run_pod_sandbox(
        &mut self,
        config: cri::PodSandboxConfig,
        runtime_handler: &str,
    ) -> Result<String, Error> {
        let request = cri::RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: runtime_handler.to_owned(),
        };
        let response = self.runtime.run_pod_sandbox(request).await;
        let id = response
            .map_err(Error::rpc("RunPodSandbox"))?
            .into_inner()
            .pod_sandbox_id;
        if id.is_empty() {
            return Err(Error::MissingField {
                rpc: "RunPodSandbox",
                field: "pod_sandbox_id",
            });
        }
        Ok(id)
    }

    pub async fn stop_pod_sandbox(&mut self, pod_sandbox_id: &str) -> Result<(), Error> {
        let request = cri::StopPodSandboxRequest {
            pod_sandbox_id: pod_sandbox_id.to_owned(),
        };
        let response = self.runtime.stop_pod_sandbox(request).await;
        response.map_err(Error::rpc("StopPodSandbox"))?;
        Ok(())
    }

    pub async fn remove_pod_sandbox(&mut self, pod_sandbox_id: &str) -> Result<(), Error> {
        let request = cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod_sandbox_id.to_owned(),
        };
        let response = self.runtime.remove_pod_sandbox(request).await;
        response.map_err(Error::rpc("RemovePodSandbox"))?;
        Ok(())
    }

    /// `PodSandboxStatus`, non-verbose; the status is required to be present.
    pub async fn pod_sandbox_status(
        &mut self,
        pod_sandbox_id: &str,
    ) -> Result<cri::PodSandboxStatus, Error> {
        let request = cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod_sandbox_id.to_owned(),
            verbose: false,
        };
        let response = self.runtime.pod_sandbox_status(request).await;
        response
            .map_err(Error::rpc("PodSandboxStatus"))?
            .into_inner()
            .status
            .ok_or(Error::MissingField {
                rpc: "PodSandboxStatus",
                field: "status",
            })
    }

    pub async fn list_pod_sandbox(
        &mut self,
        filter: Option<cri::PodSandboxFilter>,
    ) -> Result<Vec<cri::PodSandbox>, Error> {
        let response = self
            .runtime
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter })
            .await;
        Ok(response
            .map_err(Error::rpc("ListPodSandbox"))?
            .into_inner()
            .items)
    }

    // ---- RuntimeService: containers ----

    /// `CreateContainer` in `pod`, passing the pod's config along as the kubelet
    /// does. Creates the log file's parent directory first, as the kubelet does.
    pub async fn create_container(
        &mut self,
        pod: &Pod,
        config: cri::ContainerConfig,
    ) -> Result<String, Error> {
        if let Some(parent) = pod.container_log(&config).parent() {
            create_dir_all(parent)?;
        }
        let request = cri::CreateContainerRequest {
            pod_sandbox_id: pod.id.clone(),
            config: Some(config),
            sandbox_config: Some(pod.config.clone()),
        };
        let response = self.runtime.create_container(request).await;
        let id = response
            .map_err(Error::rpc("CreateContainer"))?
            .into_inner()
            .container_id;
        if id.is_empty() {
            return Err(Error::MissingField {
                rpc: "CreateContainer",
                field: "container_id",
            });
        }
        Ok(id)
    }

    pub async fn start_container(&mut self, container_id: &str) -> Result<(), Error> {
        let request = cri::StartContainerRequest {
            container_id: container_id.to_owned(),
        };
        let response = self.runtime.start_container(request).await;
        response.map_err(Error::rpc("StartContainer"))?;
        Ok(())
    }

    /// `StopContainer` with a grace period of `timeout_seconds`.
    pub async fn stop_container(
        &mut self,
        container_id: &str,
        timeout_seconds: i64,
    ) -> Result<(), Error> {
        let request = cri::StopContainerRequest {
            container_id: container_id.to_owned(),
            timeout: timeout_seconds,
        };
        let response = self.runtime.stop_container(request).await;
        response.map_err(Error::rpc("StopContainer"))?;
        Ok(())
    }

    pub async fn remove_container(&mut self, container_id: &str) -> Result<(), Error> {
        let request = cri::RemoveContainerRequest {
            container_id: container_id.to_owned(),
        };
        let response = self.runtime.remove_container(request).await;
        response.map_err(Error::rpc("RemoveContainer"))?;
        Ok(())
    }

    /// `ContainerStatus`, non-verbose; the status is required to be present.
    pub async fn container_status(
        &mut self,
        container_id: &str,
    ) -> Result<cri::ContainerStatus, Error> {
        let request = cri::ContainerStatusRequest {
            container_id: container_id.to_owned(),
            verbose: false,
        };
        let response = self.runtime.container_status(request).await;
        response
            .map_err(Error::rpc("ContainerStatus"))?
            .into_inner()
            .status
            .ok_or(Error::MissingField {
                rpc: "ContainerStatus",
                field: "status",
            })
    }

    pub async fn list_containers(
        &mut self,
        filter: Option<cri::ContainerFilter>,
    ) -> Result<Vec<cri::Container>, Error> {
        let response = self
            .runtime
            .list_containers(cri::ListContainersRequest { filter })
            .await;
        Ok(response
            .map_err(Error::rpc("ListContainers"))?
            .into_inner()
            .containers)
    }

    // ---- ImageService ----

    pub async fn list_images(
        &mut self,
        filter: Option<cri::ImageFilter>,
    ) -> Result<Vec<cri::Image>, Error> {
        let response = self
            .images
            .list_images(cri::ListImagesRequest { filter })
            .await;
        Ok(response
            .map_err(Error::rpc("ListImages"))?
            .into_inner()
            .images)
    }

    /// `ImageStatus`; `None` when the runtime does not have the image.
    pub async fn image_status(&mut self, image: &str) -> Result<Option<cri::Image>, Error> {
        let request = cri::ImageStatusRequest {
            image: Some(image_spec(image)),
            verbose: false,
        };
        let response = self.images.image_status(request).await;
        Ok(response
            .map_err(Error::rpc("ImageStatus"))?
            .into_inner()
            .image)
    }

    /// `PullImage`; returns the image reference the runtime answers with.
    pub async fn pull_image(&mut self, image: &str) -> Result<String, Error> {
        let request = cri::PullImageRequest {
            image: Some(image_spec(image)),
            ..Default::default()
        };
        let response = self.images.pull_image(request).await;
        Ok(response
            .map_err(Error::rpc("PullImage"))?
            .into_inner()
            .image_ref)
    }

    /// `PullImage` with the credentials the kubelet takes from the pod's
    /// image pull secret; returns the image reference the runtime answers with.
    pub async fn pull_image_with_auth(
        &mut self,
        image: &str,
        auth: cri::AuthConfig,
    ) -> Result<String, Error> {
        let request = cri::PullImageRequest {
            image: Some(image_spec(image)),
            auth: Some(auth),
            ..Default::default()
        };
        let response = self.images.pull_image(request).await;
        Ok(response
            .map_err(Error::rpc("PullImage"))?
            .into_inner()
            .image_ref)
    }

    pub async fn remove_image(&mut self, image: &str) -> Result<(), Error> {
        let request = cri::RemoveImageRequest {
            image: Some(image_spec(image)),
        };
        let response = self.images.remove_image(request).await;
        response.map_err(Error::rpc("RemoveImage"))?;
        Ok(())
    }

    pub async fn image_fs_info(&mut self) -> Result<cri::ImageFsInfoResponse, Error> {
        let response = self.images.image_fs_info(cri::ImageFsInfoRequest {}).await;
        Ok(response.map_err(Error::rpc("ImageFsInfo"))?.into_inner())
    }

    // ---- What the kubelet does with those calls ----

    /// Starts a pod as the kubelet does: creates its log directory, then
    /// `RunPodSandbox` with the default runtime handler.
    pub async fn run_pod(&mut self, config: cri::PodSandboxConfig) -> Result<Pod, Error> {
        create_dir_all(Path::new(&config.log_directory))?;
        let id = self.run_pod_sandbox(config.clone(), "").await?;
        Ok(Pod { id, config })
    }

    /// Like [`CriClient::run_pod`], for the RuntimeClass handler `handler`.
    pub async fn run_pod_on(
        &mut self,
        config: cri::PodSandboxConfig,
        handler: &str,
    ) -> Result<Pod, Error> {
        create_dir_all(Path::new(&config.log_directory))?;
        let id = self.run_pod_sandbox(config.clone(), handler).await?;
        Ok(Pod { id, config })
    }

    /// Starts a container as the kubelet does: `CreateContainer`, then
    /// `StartContainer`. Returns the container id.
    pub async fn start(
        &mut self,
        pod: &Pod,
        config: cri::ContainerConfig,
    ) -> Result<String, Error> {
        let id = self.create_container(pod, config).await?;
        self.start_container(&id).await?;
        Ok(id)
    }

    /// Starts a container and waits until it has exited; returns its final status.
    pub async fn run_to_exit(
        &mut self,
        pod: &Pod,
        config: cri::ContainerConfig,
        timeout: Duration,
    ) -> Result<cri::ContainerStatus, Error> {
        let id = self.start(pod, config).await?;
        self.wait_exited(&id, timeout).await
    }

    /// Polls `ContainerStatus` until the container is in `state`; returns that status.
    pub async fn wait_for_state(
        &mut self,
        container_id: &str,
        state: cri::ContainerState,
        timeout: Duration,
    ) -> Result<cri::ContainerStatus, Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let status = self.container_status(container_id).await?;
            if status.state == state as i32 {
                return Ok(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::StateTimeout {
                    container_id: container_id.to_owned(),
                    wanted: state.as_str_name(),
                    timeout,
                    last_seen: format!("{status:?}"),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits until the container is `CONTAINER_EXITED`; returns its final status.
    pub async fn wait_exited(
        &mut self,
        container_id: &str,
        timeout: Duration,
    ) -> Result<cri::ContainerStatus, Error> {
        self.wait_for_state(container_id, cri::ContainerState::ContainerExited, timeout)
            .await
    }
}

fn image_spec(image: &str) -> cri::ImageSpec {
    cri::ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    }
}

fn create_dir_all(path: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(path).map_err(|source| Error::Io {
        action: "creating directory",
        path: path.to_owned(),
        source,
    })
}
