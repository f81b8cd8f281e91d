//! wasmlet's admin API (`wasmlet.admin.v1`, from `wasmlet-proto`) over the
//! agent: convert, call, convert, like the CRI services beside it.

use tonic::{Request, Response, Status};
use wasmlet_agent::Agent;
use wasmlet_agent::model::container::ContainerFilter;
use wasmlet_proto::admin;
use wasmlet_proto::admin::admin_server::Admin;

use crate::convert;
use crate::logging::{LogLevel, LogLevelError};
use crate::status::to_status;

#[derive(Clone)]
pub struct AdminService {
    agent: Agent,
    log_level: Option<LogLevel>,
    /// The most bytes ImportImage takes (the registry's blob limit).
    import_limit: u64,
}

impl AdminService {
    pub fn new(agent: Agent) -> Self {
        Self {
            agent,
            log_level: None,
            import_limit: wasmlet_agent::RegistryConfig::default().max_blob_bytes,
        }
    }

    /// Holds ImportImage to `bytes`, as pulls are held to it.
    pub fn with_import_limit(mut self, bytes: u64) -> Self {
        self.import_limit = bytes;
        self
    }

    /// Lets `SetLogLevel` change the process's log filter through `level`
    /// (none: it answers FAILED_PRECONDITION).
    pub fn with_log_level(mut self, level: Option<LogLevel>) -> Self {
        self.log_level = level;
        self
    }

    fn log_level(&self) -> Result<&LogLevel, Status> {
        self.log_level.as_ref().ok_or_else(|| {
            Status::failed_precondition("this agent's log filter cannot be changed while it runs")
        })
    }
}

fn log_level_status(error: LogLevelError) -> Status {
    match error {
        LogLevelError::Invalid { .. } | LogLevelError::Empty => {
            Status::invalid_argument(error.to_string())
        }
        LogLevelError::Reload(_) => Status::internal(error.to_string()),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn import_image(
        &self,
        req: Request<tonic::Streaming<admin::ImportImageRequest>>,
    ) -> Result<Response<admin::ImportImageResponse>, Status> {
        let mut stream = req.into_inner();
        let mut reference = None;
        let mut bytes = Vec::new();
        // Received whole before anything is stored: a client that goes
        // away mid-file leaves nothing.
        while let Some(message) = stream.message().await? {
            if reference.is_none() {
                reference = Some(message.reference);
            }
            if (bytes.len() + message.data.len()) as u64 > self.import_limit {
                return Err(Status::resource_exhausted(format!(
                    "the image is larger than the {} bytes an import (or a pull) may be",
                    self.import_limit
                )));
            }
            bytes.extend_from_slice(&message.data);
        }
        let reference = reference
            .filter(|r| !r.is_empty())
            .ok_or_else(|| Status::invalid_argument("ImportImage needs a reference"))?;
        let (image, compiled) = self
            .agent
            .import_image_bytes(bytes, &reference)
            .await
            .map_err(to_status)?;
        tracing::info!(image = %image.id, %reference, took = ?compiled.took, "image imported and compiled");
        Ok(Response::new(admin::ImportImageResponse {
            image_id: image.id.to_string(),
            compiled: true,
        }))
    }

    async fn inspect_image(
        &self,
        req: Request<admin::InspectImageRequest>,
    ) -> Result<Response<admin::InspectImageResponse>, Status> {
        let inspection = self
            .agent
            .inspect_image(&req.into_inner().image)
            .await
            .map_err(to_status)?;
        Ok(Response::new(convert::image_inspection(inspection)))
    }

    async fn precompile(
        &self,
        req: Request<admin::PrecompileRequest>,
    ) -> Result<Response<admin::PrecompileResponse>, Status> {
        let done = self
            .agent
            .precompile_image(&req.into_inner().image)
            .await
            .map_err(to_status)?;
        Ok(Response::new(convert::precompiled(done)))
    }

    async fn list_instance_stats(
        &self,
        req: Request<admin::ListInstanceStatsRequest>,
    ) -> Result<Response<admin::ListInstanceStatsResponse>, Status> {
        let pod = req.into_inner().pod_sandbox_id;
        let filter = ContainerFilter {
            sandbox_id: (!pod.is_empty()).then_some(pod),
            ..Default::default()
        };
        let instances = self
            .agent
            .list_container_stats(&filter)
            .iter()
            .map(convert::instance_stats)
            .collect();
        Ok(Response::new(admin::ListInstanceStatsResponse {
            instances,
        }))
    }

    async fn get_log_level(
        &self,
        _: Request<admin::GetLogLevelRequest>,
    ) -> Result<Response<admin::LogLevelResponse>, Status> {
        Ok(Response::new(admin::LogLevelResponse {
            filter: self.log_level()?.current(),
            previous: String::new(),
        }))
    }

    async fn set_log_level(
        &self,
        req: Request<admin::SetLogLevelRequest>,
    ) -> Result<Response<admin::LogLevelResponse>, Status> {
        let level = self.log_level()?;
        let previous = level
            .set(&req.into_inner().filter)
            .map_err(log_level_status)?;
        let filter = level.current();
        tracing::info!(%filter, %previous, "log filter changed through the admin API");
        Ok(Response::new(admin::LogLevelResponse { filter, previous }))
    }
}
