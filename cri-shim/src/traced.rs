//! A span per CRI call: [`Traced`] wraps the CRI services (wasmlet's own or
//! the routed ones in front of a downstream runtime) and runs each call in a
//! `cri` span carrying the method and the ids the request names
//! (`pod_sandbox_id`, `container_id`, the pod's `namespace/name`, the
//! `image`), plus the ids the answer hands out (a new sandbox's or
//! container's id, a pulled image's `image_ref`). Everything logged while the
//! call runs, in the agent too, carries them.
//!
//! Each call ends with one event: calls that change something (RunPodSandbox,
//! CreateContainer, PullImage...) at INFO when they succeed and WARN when
//! they fail, as containerd logs them; the calls a kubelet polls with (the
//! List, Status and Stats calls, ExecSync probes) at DEBUG, unless they fail
//! on the runtime's side.

use std::time::Instant;

use tonic::{Code, Request, Response, Status};
use tracing::field::{Empty, display};
use tracing::{Instrument, Level, Span};
use wasmlet_proto::cri;
use wasmlet_proto::cri::image_service_server::ImageService;
use wasmlet_proto::cri::runtime_service_server::RuntimeService;

type Reply<T> = Result<Response<T>, Status>;

/// CRI services whose every call runs in a span of its own.
#[derive(Clone)]
pub struct Traced<S>(pub S);

/// Whether a call changes something (logged when it succeeds) or only
/// reads (logged at DEBUG).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Change,
    Read,
}

/// The level a call's closing event is logged at.
fn level(kind: Kind, code: Code) -> Level {
    match (kind, code) {
        (Kind::Change, Code::Ok) => Level::INFO,
        (Kind::Change, _) => Level::WARN,
        (
            Kind::Read,
            Code::Internal
            | Code::Unknown
            | Code::DataLoss
            | Code::Unavailable
            | Code::ResourceExhausted
            | Code::DeadlineExceeded,
        ) => Level::WARN,
        (Kind::Read, _) => Level::DEBUG,
    }
}

/// Emits an event at a level chosen at run time.
macro_rules! event_at {
    ($level:expr, $($arg:tt)+) => {
        match $level {
            Level::WARN => tracing::warn!($($arg)+),
            Level::INFO => tracing::info!($($arg)+),
            _ => tracing::debug!($($arg)+),
        }
    };
}

/// One call in flight: its span, and its closing event when it ends or is
/// dropped (the client went away).
struct Call {
    span: Span,
    method: &'static str,
    kind: Kind,
    started: Instant,
    finished: bool,
}

impl Call {
    fn start(method: &'static str, kind: Kind, request: &impl Names) -> Self {
        // At ERROR so that the span is enabled under any filter but `off`:
        // a WARN line under `RUST_LOG=warn` still carries the call's ids.
        // (A span's level says when it exists, not how much its events
        // matter; each event has its own.)
        let span = tracing::error_span!(
            "cri",
            method = %method,
            pod_sandbox_id = Empty,
            container_id = Empty,
            pod = Empty,
            container = Empty,
            image = Empty,
            image_ref = Empty,
        );
        if !span.is_disabled() {
            request.record(&span);
        }
        Self {
            span,
            method,
            kind,
            started: Instant::now(),
            finished: false,
        }
    }

    fn elapsed_ms(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1000.0
    }

    fn finish<T: Names>(mut self, reply: Result<&T, &Status>) {
        self.finished = true;
        let elapsed_ms = self.elapsed_ms();
        crate::metrics::cri_call(
            self.method,
            reply.as_ref().map_or_else(|s| s.code(), |_| Code::Ok),
            self.started.elapsed(),
        );
        let _entered = self.span.enter();
        match reply {
            Ok(response) => {
                if !self.span.is_disabled() {
                    response.record(&self.span);
                }
                event_at!(level(self.kind, Code::Ok), elapsed_ms, "answered");
            }
            Err(status) => event_at!(
                level(self.kind, status.code()),
                code = ?status.code(),
                error = %status.message(),
                elapsed_ms,
                "failed"
            ),
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.finished {
            let elapsed_ms = self.elapsed_ms();
            crate::metrics::cri_call(self.method, Code::Cancelled, self.started.elapsed());
            let _entered = self.span.enter();
            event_at!(
                match self.kind {
                    Kind::Change => Level::INFO,
                    Kind::Read => Level::DEBUG,
                },
                elapsed_ms,
                "cancelled: the client went away before the answer"
            );
        }
    }
}

/// What a CRI message names of the objects its call concerns.
trait Names {
    /// Records those names on `span`, the call's.
    fn record(&self, _span: &Span) {}
}

/// A stream's answer: its items are not the call's.
impl Names for () {}

/// Records `value` as `field` unless it is empty (unset in proto3).
fn put(span: &Span, field: &str, value: &str) {
    if !value.is_empty() {
        span.record(field, display(value));
    }
}

fn put_pod(span: &Span, config: Option<&cri::PodSandboxConfig>) {
    if let Some(meta) = config.and_then(|c| c.metadata.as_ref()) {
        span.record(
            "pod",
            display(format_args!("{}/{}", meta.namespace, meta.name)),
        );
    }
}

fn put_image(span: &Span, image: Option<&cri::ImageSpec>) {
    if let Some(image) = image {
        put(span, "image", &image.image);
    }
}

/// `Names` for messages naming one id in a field of the same name.
macro_rules! names {
    ($field:ident: $($message:ident),+ $(,)?) => {
        $(impl Names for cri::$message {
            fn record(&self, span: &Span) {
                put(span, stringify!($field), &self.$field);
            }
        })+
    };
}

names!(
    pod_sandbox_id: StopPodSandboxRequest,
    RemovePodSandboxRequest,
    PodSandboxStatusRequest,
    PortForwardRequest,
    PodSandboxStatsRequest,
    RunPodSandboxResponse,
    UpdatePodSandboxResourcesRequest,
);
names!(
    container_id: StartContainerRequest,
    StopContainerRequest,
    RemoveContainerRequest,
    ContainerStatusRequest,
    UpdateContainerResourcesRequest,
    ReopenContainerLogRequest,
    ExecSyncRequest,
    ExecRequest,
    AttachRequest,
    ContainerStatsRequest,
    CheckpointContainerRequest,
    CreateContainerResponse,
);
names!(image_ref: PullImageResponse);

/// `Names` for messages naming nothing worth a field.
macro_rules! no_names {
    ($($message:ident),+ $(,)?) => {
        $(impl Names for cri::$message {})+
    };
}

no_names!(
    VersionRequest,
    VersionResponse,
    StopPodSandboxResponse,
    RemovePodSandboxResponse,
    PodSandboxStatusResponse,
    ListPodSandboxResponse,
    StartContainerResponse,
    StopContainerResponse,
    RemoveContainerResponse,
    ListContainersResponse,
    ContainerStatusResponse,
    UpdateContainerResourcesResponse,
    ReopenContainerLogResponse,
    ExecSyncResponse,
    ExecResponse,
    AttachResponse,
    PortForwardResponse,
    ContainerStatsResponse,
    ListContainerStatsResponse,
    PodSandboxStatsResponse,
    ListPodSandboxStatsResponse,
    UpdateRuntimeConfigRequest,
    UpdateRuntimeConfigResponse,
    StatusRequest,
    StatusResponse,
    CheckpointContainerResponse,
    GetEventsRequest,
    ListMetricDescriptorsRequest,
    ListMetricDescriptorsResponse,
    ListPodSandboxMetricsRequest,
    ListPodSandboxMetricsResponse,
    RuntimeConfigRequest,
    RuntimeConfigResponse,
    UpdatePodSandboxResourcesResponse,
    ListImagesRequest,
    ListImagesResponse,
    ImageStatusResponse,
    RemoveImageResponse,
    ImageFsInfoRequest,
    ImageFsInfoResponse,
);

impl Names for cri::RunPodSandboxRequest {
    fn record(&self, span: &Span) {
        put_pod(span, self.config.as_ref());
    }
}

impl Names for cri::CreateContainerRequest {
    fn record(&self, span: &Span) {
        put(span, "pod_sandbox_id", &self.pod_sandbox_id);
        put_pod(span, self.sandbox_config.as_ref());
        if let Some(config) = &self.config {
            if let Some(meta) = &config.metadata {
                put(span, "container", &meta.name);
            }
            put_image(span, config.image.as_ref());
        }
    }
}

impl Names for cri::ListPodSandboxRequest {
    fn record(&self, span: &Span) {
        if let Some(filter) = &self.filter {
            put(span, "pod_sandbox_id", &filter.id);
        }
    }
}

impl Names for cri::ListContainersRequest {
    fn record(&self, span: &Span) {
        if let Some(filter) = &self.filter {
            put(span, "pod_sandbox_id", &filter.pod_sandbox_id);
            put(span, "container_id", &filter.id);
        }
    }
}

impl Names for cri::ListContainerStatsRequest {
    fn record(&self, span: &Span) {
        if let Some(filter) = &self.filter {
            put(span, "pod_sandbox_id", &filter.pod_sandbox_id);
            put(span, "container_id", &filter.id);
        }
    }
}

impl Names for cri::ListPodSandboxStatsRequest {
    fn record(&self, span: &Span) {
        if let Some(filter) = &self.filter {
            put(span, "pod_sandbox_id", &filter.id);
        }
    }
}

impl Names for cri::PullImageRequest {
    fn record(&self, span: &Span) {
        put_image(span, self.image.as_ref());
        put_pod(span, self.sandbox_config.as_ref());
    }
}

impl Names for cri::ImageStatusRequest {
    fn record(&self, span: &Span) {
        put_image(span, self.image.as_ref());
    }
}

impl Names for cri::RemoveImageRequest {
    fn record(&self, span: &Span) {
        put_image(span, self.image.as_ref());
    }
}

/// Implements `$service` for `Traced<S>`: each listed method runs the inner
/// one in its call's span. `{ ... }` holds items written out by hand.
macro_rules! traced {
    ($service:ident { $($own:tt)* } $($kind:ident $method:ident $name:literal ($req:ident) -> $resp:ident;)*) => {
        #[tonic::async_trait]
        impl<S: $service> $service for Traced<S> {
            $($own)*
            $(
                async fn $method(&self, req: Request<cri::$req>) -> Reply<cri::$resp> {
                    let call = Call::start($name, Kind::$kind, req.get_ref());
                    let reply = self.0.$method(req).instrument(call.span.clone()).await;
                    call.finish(reply.as_ref().map(Response::get_ref));
                    reply
                }
            )*
        }
    };
}

traced! {
    RuntimeService {
        type GetContainerEventsStream = S::GetContainerEventsStream;

        /// The stream outlives the call: the span covers opening it.
        async fn get_container_events(
            &self,
            req: Request<cri::GetEventsRequest>,
        ) -> Reply<Self::GetContainerEventsStream> {
            let call = Call::start("GetContainerEvents", Kind::Read, req.get_ref());
            let reply = self.0.get_container_events(req).instrument(call.span.clone()).await;
            call.finish(reply.as_ref().map(|_| &()));
            reply
        }
    }
    Read version "Version" (VersionRequest) -> VersionResponse;
    Change run_pod_sandbox "RunPodSandbox" (RunPodSandboxRequest) -> RunPodSandboxResponse;
    Change stop_pod_sandbox "StopPodSandbox" (StopPodSandboxRequest) -> StopPodSandboxResponse;
    Change remove_pod_sandbox "RemovePodSandbox" (RemovePodSandboxRequest) -> RemovePodSandboxResponse;
    Read pod_sandbox_status "PodSandboxStatus" (PodSandboxStatusRequest) -> PodSandboxStatusResponse;
    Read list_pod_sandbox "ListPodSandbox" (ListPodSandboxRequest) -> ListPodSandboxResponse;
    Change create_container "CreateContainer" (CreateContainerRequest) -> CreateContainerResponse;
    Change start_container "StartContainer" (StartContainerRequest) -> StartContainerResponse;
    Change stop_container "StopContainer" (StopContainerRequest) -> StopContainerResponse;
    Change remove_container "RemoveContainer" (RemoveContainerRequest) -> RemoveContainerResponse;
    Read list_containers "ListContainers" (ListContainersRequest) -> ListContainersResponse;
    Read container_status "ContainerStatus" (ContainerStatusRequest) -> ContainerStatusResponse;
    Change update_container_resources "UpdateContainerResources" (UpdateContainerResourcesRequest) -> UpdateContainerResourcesResponse;
    Change reopen_container_log "ReopenContainerLog" (ReopenContainerLogRequest) -> ReopenContainerLogResponse;
    // Probes: a kubelet runs them every few seconds.
    Read exec_sync "ExecSync" (ExecSyncRequest) -> ExecSyncResponse;
    Change exec "Exec" (ExecRequest) -> ExecResponse;
    Change attach "Attach" (AttachRequest) -> AttachResponse;
    Change port_forward "PortForward" (PortForwardRequest) -> PortForwardResponse;
    Read container_stats "ContainerStats" (ContainerStatsRequest) -> ContainerStatsResponse;
    Read list_container_stats "ListContainerStats" (ListContainerStatsRequest) -> ListContainerStatsResponse;
    Read pod_sandbox_stats "PodSandboxStats" (PodSandboxStatsRequest) -> PodSandboxStatsResponse;
    Read list_pod_sandbox_stats "ListPodSandboxStats" (ListPodSandboxStatsRequest) -> ListPodSandboxStatsResponse;
    Change update_runtime_config "UpdateRuntimeConfig" (UpdateRuntimeConfigRequest) -> UpdateRuntimeConfigResponse;
    Read status "Status" (StatusRequest) -> StatusResponse;
    Change checkpoint_container "CheckpointContainer" (CheckpointContainerRequest) -> CheckpointContainerResponse;
    Read list_metric_descriptors "ListMetricDescriptors" (ListMetricDescriptorsRequest) -> ListMetricDescriptorsResponse;
    Read list_pod_sandbox_metrics "ListPodSandboxMetrics" (ListPodSandboxMetricsRequest) -> ListPodSandboxMetricsResponse;
    Read runtime_config "RuntimeConfig" (RuntimeConfigRequest) -> RuntimeConfigResponse;
    Change update_pod_sandbox_resources "UpdatePodSandboxResources" (UpdatePodSandboxResourcesRequest) -> UpdatePodSandboxResourcesResponse;
}

traced! {
    ImageService {}
    Read list_images "ListImages" (ListImagesRequest) -> ListImagesResponse;
    Read image_status "ImageStatus" (ImageStatusRequest) -> ImageStatusResponse;
    Change pull_image "PullImage" (PullImageRequest) -> PullImageResponse;
    Change remove_image "RemoveImage" (RemoveImageRequest) -> RemoveImageResponse;
    Read image_fs_info "ImageFsInfo" (ImageFsInfoRequest) -> ImageFsInfoResponse;
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[test]
    fn changes_are_logged_when_they_succeed_and_reads_only_when_the_runtime_fails() {
        assert_eq!(level(Kind::Change, Code::Ok), Level::INFO);
        assert_eq!(level(Kind::Change, Code::NotFound), Level::WARN);
        assert_eq!(level(Kind::Read, Code::Ok), Level::DEBUG);
        assert_eq!(level(Kind::Read, Code::NotFound), Level::DEBUG);
        assert_eq!(level(Kind::Read, Code::Internal), Level::WARN);
    }

    /// An image service answering PullImage with a fixed ref, after
    /// logging something of its own.
    struct Images;

    #[tonic::async_trait]
    impl ImageService for Images {
        async fn list_images(
            &self,
            _: Request<cri::ListImagesRequest>,
        ) -> Reply<cri::ListImagesResponse> {
            Err(Status::internal("broken store"))
        }
        async fn image_status(
            &self,
            _: Request<cri::ImageStatusRequest>,
        ) -> Reply<cri::ImageStatusResponse> {
            Err(Status::not_found("no such image"))
        }
        async fn pull_image(
            &self,
            _: Request<cri::PullImageRequest>,
        ) -> Reply<cri::PullImageResponse> {
            tracing::info!("pulling");
            Ok(Response::new(cri::PullImageResponse {
                image_ref: "sha256:abc".into(),
            }))
        }
        async fn remove_image(
            &self,
            _: Request<cri::RemoveImageRequest>,
        ) -> Reply<cri::RemoveImageResponse> {
            Ok(Response::new(cri::RemoveImageResponse {}))
        }
        async fn image_fs_info(
            &self,
            _: Request<cri::ImageFsInfoRequest>,
        ) -> Reply<cri::ImageFsInfoResponse> {
            Ok(Response::new(cri::ImageFsInfoResponse::default()))
        }
    }

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Runs `call` on a current-thread runtime under a JSON logger with
    /// `filter`; returns the lines it logged, parsed.
    fn logged<F: std::future::Future>(filter: &str, call: F) -> Vec<serde_json::Value> {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_subscriber::EnvFilter::new(filter))
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(move || writer.clone()),
            );
        tracing::subscriber::with_default(subscriber, || {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
                .block_on(call);
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    #[test]
    fn a_call_logs_in_a_span_with_its_ids_and_ends_with_one_event() {
        let lines = logged("info", async {
            Traced(Images)
                .pull_image(Request::new(cri::PullImageRequest {
                    image: Some(cri::ImageSpec {
                        image: "registry.example/hello:1".into(),
                        ..Default::default()
                    }),
                    sandbox_config: Some(cri::PodSandboxConfig {
                        metadata: Some(cri::PodSandboxMetadata {
                            name: "web".into(),
                            namespace: "shop".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    auth: None,
                }))
                .await
                .unwrap();
        });
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0]["fields"]["message"], "pulling");
        assert_eq!(lines[0]["span"]["method"], "PullImage");
        assert_eq!(lines[0]["span"]["image"], "registry.example/hello:1");
        assert_eq!(lines[0]["span"]["pod"], "shop/web");
        assert_eq!(lines[1]["level"], "INFO");
        assert_eq!(lines[1]["fields"]["message"], "answered");
        assert_eq!(lines[1]["span"]["image_ref"], "sha256:abc");
    }

    #[test]
    fn reads_are_quiet_unless_the_runtime_fails() {
        let lines = logged("info", async {
            let images = Traced(Images);
            let status = images
                .image_status(Request::new(cri::ImageStatusRequest::default()))
                .await;
            assert_eq!(status.unwrap_err().code(), Code::NotFound);
            let list = images
                .list_images(Request::new(cri::ListImagesRequest::default()))
                .await;
            assert_eq!(list.unwrap_err().code(), Code::Internal);
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["level"], "WARN");
        assert_eq!(lines[0]["span"]["method"], "ListImages");
        assert_eq!(lines[0]["fields"]["code"], "Internal");
        assert_eq!(lines[0]["fields"]["error"], "broken store");
    }

    #[test]
    fn a_failure_carries_the_calls_ids_whatever_the_filter() {
        let lines = logged("warn", async {
            let images = Traced(Images);
            images
                .remove_image(Request::new(cri::RemoveImageRequest {
                    image: Some(cri::ImageSpec {
                        image: "gone:1".into(),
                        ..Default::default()
                    }),
                }))
                .await
                .unwrap();
            let list = images
                .list_images(Request::new(cri::ListImagesRequest::default()))
                .await;
            assert!(list.is_err());
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["span"]["method"], "ListImages", "{lines:?}");
    }
}
