//! The ImageService router: an image goes where its handler says, else where
//! its manifest says (Wasm here, anything else downstream); lists merge both
//! sides.

use tonic::{Request, Response, Status};
use wasmlet_agent::ImageKind;
use wasmlet_proto::cri;
use wasmlet_proto::cri::image_service_server::ImageService;

use super::{Reply, Routed};
use crate::convert;
use crate::status::to_status;

#[tonic::async_trait]
impl ImageService for Routed {
    async fn list_images(
        &self,
        req: Request<cri::ListImagesRequest>,
    ) -> Reply<cri::ListImagesResponse> {
        let req = req.into_inner();
        let down = self.down.images().list_images(req.clone()).await;
        let down = self.partial("ListImages", down);
        let mut images = ImageService::list_images(&self.local, Request::new(req))
            .await?
            .into_inner()
            .images;
        images.extend(down.images);
        Ok(Response::new(cri::ListImagesResponse { images }))
    }

    async fn image_status(
        &self,
        req: Request<cri::ImageStatusRequest>,
    ) -> Reply<cri::ImageStatusResponse> {
        let req = req.into_inner();
        let reference = req.image.as_ref().map(|i| i.image.as_str()).unwrap_or("");
        if !reference.is_empty() && self.agent.image_status(reference).is_some() {
            return ImageService::image_status(&self.local, Request::new(req)).await;
        }
        self.down
            .images()
            .image_status(req)
            .await
            .map_err(|s| self.down.error(s))
    }

    async fn pull_image(
        &self,
        req: Request<cri::PullImageRequest>,
    ) -> Reply<cri::PullImageResponse> {
        let req = req.into_inner();
        let spec = req.image.clone().unwrap_or_default();
        if !spec.runtime_handler.is_empty() {
            if self.is_wasm_handler(&spec.runtime_handler) {
                return ImageService::pull_image(&self.local, Request::new(req)).await;
            }
            return self
                .down
                .images()
                .pull_image(req)
                .await
                .map_err(|s| self.down.error(s));
        }
        let reference = convert::image_reference(req.image.clone()).map_err(to_status)?;
        let credentials = convert::credentials(req.auth.clone());
        match self.agent.probe_image(&reference, &credentials).await {
            Ok(ImageKind::Wasm) => ImageService::pull_image(&self.local, Request::new(req)).await,
            Ok(ImageKind::Other(what)) => {
                tracing::debug!(reference, %what, "not a Wasm image: pulling through the downstream runtime");
                self.down
                    .images()
                    .pull_image(req)
                    .await
                    .map_err(|s| self.down.error(s))
            }
            Err(probe) => {
                // The downstream runtime may reach registries wasmlet
                // cannot (its own mirrors and credentials): let it try.
                tracing::debug!(reference, error = %probe, "could not read the manifest; trying the downstream runtime");
                match self.down.images().pull_image(req).await {
                    Ok(reply) => Ok(reply),
                    Err(status) => {
                        let status = self.down.error(status);
                        Err(Status::new(
                            status.code(),
                            format!(
                                "pulling {reference}: wasmlet could not read its manifest ({probe}); the downstream runtime: {}",
                                status.message()
                            ),
                        ))
                    }
                }
            }
        }
    }

    async fn remove_image(
        &self,
        req: Request<cri::RemoveImageRequest>,
    ) -> Reply<cri::RemoveImageResponse> {
        let req = req.into_inner();
        let reference = req.image.as_ref().map(|i| i.image.as_str()).unwrap_or("");
        if !reference.is_empty() && self.agent.image_status(reference).is_some() {
            return ImageService::remove_image(&self.local, Request::new(req)).await;
        }
        self.down
            .images()
            .remove_image(req)
            .await
            .map_err(|s| self.down.error(s))
    }

    async fn image_fs_info(
        &self,
        req: Request<cri::ImageFsInfoRequest>,
    ) -> Reply<cri::ImageFsInfoResponse> {
        let req = req.into_inner();
        let down = self.down.images().image_fs_info(req).await;
        let down = self.partial("ImageFsInfo", down);
        let mut reply = ImageService::image_fs_info(&self.local, Request::new(req))
            .await?
            .into_inner();
        reply.image_filesystems.extend(down.image_filesystems);
        reply
            .container_filesystems
            .extend(down.container_filesystems);
        Ok(Response::new(reply))
    }
}
