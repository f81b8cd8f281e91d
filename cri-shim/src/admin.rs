//! wasmlet's admin API (`wasmlet.admin.v1`, from `wasmlet-proto`) over the
//! agent: convert, call, convert, like the CRI services beside it.

use tonic::{Request, Response, Status};
use wasmlet_agent::Agent;
use wasmlet_agent::model::container::ContainerFilter;
use wasmlet_proto::admin;
use wasmlet_proto::admin::admin_server::Admin;

use crate::convert;
use crate::status::to_status;

#[derive(Clone)]
pub struct AdminService {
    agent: Agent,
}

impl AdminService {
    pub fn new(agent: Agent) -> Self {
        Self { agent }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
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
}
