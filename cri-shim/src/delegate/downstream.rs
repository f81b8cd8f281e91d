//! The downstream runtime's CRI clients: a lazy connection to its socket,
//! made again when it comes back, and its errors as the kubelet is shown them.

use std::path::{Path, PathBuf};

use tonic::transport::Channel;
use tonic::{Code, Status};
use wasmlet_proto::cri::image_service_client::ImageServiceClient;
use wasmlet_proto::cri::runtime_service_client::RuntimeServiceClient;

use crate::config::DelegateSettings;

/// The largest message exchanged with the downstream runtime (the
/// kubelet's limit).
const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// The downstream runtime's CRI clients, connected lazily (and again after
/// it comes back).
#[derive(Clone)]
pub struct Downstream {
    socket: PathBuf,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

impl Downstream {
    pub fn new(settings: &DelegateSettings) -> Self {
        let channel = wasmlet_proto::connect_unix_lazy(
            wasmlet_proto::unix_endpoint().connect_timeout(settings.connect_timeout),
            &settings.socket,
        );
        Self {
            socket: settings.socket.clone(),
            runtime: RuntimeServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            images: ImageServiceClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub(super) fn runtime(&self) -> RuntimeServiceClient<Channel> {
        self.runtime.clone()
    }

    pub(super) fn images(&self) -> ImageServiceClient<Channel> {
        self.images.clone()
    }

    /// The downstream's answer, with a transport failure turned into
    /// `Unavailable` naming the socket; its own statuses pass unchanged.
    pub(super) fn error(&self, status: Status) -> Status {
        let transport = status.code() == Code::Unavailable
            || (status.code() == Code::Unknown && status.message().contains("transport"));
        if transport {
            Status::unavailable(format!(
                "the downstream CRI runtime at {} is unavailable: {}",
                self.socket.display(),
                status.message()
            ))
        } else {
            status
        }
    }
}
