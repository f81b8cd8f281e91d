//! The one mapping from agent errors to gRPC statuses.

use tonic::{Code, Status};
use wasmlet_agent::Error;
use wasmlet_agent::error::{GuestError, NetworkError, PluginError, RegistryFailure, RootfsError};

/// The gRPC code the kubelet should see for `e`.
pub fn code(e: &Error) -> Code {
    match e {
        Error::NotFound { .. } => Code::NotFound,
        Error::AlreadyExists { .. } => Code::AlreadyExists,
        Error::InvalidArgument(_) | Error::InvalidImage { .. } | Error::TlsConfig(_) => {
            Code::InvalidArgument
        }
        Error::InvalidTransition { .. } | Error::FailedPrecondition(_) => Code::FailedPrecondition,
        Error::StartFailed { source, .. } => guest(source),
        Error::Guest(e) => guest(e),
        Error::Network(e) => network(e),
        Error::Unpack { source, .. } => rootfs(source),
        Error::Registry { kind, .. } => match kind {
            RegistryFailure::Unauthorized => Code::PermissionDenied,
            RegistryFailure::NotFound => Code::NotFound,
            RegistryFailure::Unavailable | RegistryFailure::Untrusted => Code::Unavailable,
            RegistryFailure::Corrupt => Code::DataLoss,
            RegistryFailure::TooLarge => Code::ResourceExhausted,
            RegistryFailure::NotWasm | RegistryFailure::Invalid => Code::InvalidArgument,
        },
        Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
        Error::Io { .. } | Error::Store(_) | Error::Internal(_) | Error::Engine(_) => {
            Code::Internal
        }
    }
}

/// A guest that could not be made: what the container's program, image or
/// spec must change is a precondition; what failed on the node is
/// internal.
fn guest(e: &GuestError) -> Code {
    match e {
        GuestError::ReadImageWasm { .. }
        | GuestError::Compile { .. }
        | GuestError::ContainerDir { .. }
        | GuestError::Log { .. } => Code::Internal,
        GuestError::Program(e) if !e.is_refusal() => Code::Internal,
        GuestError::Network(e) => network(e),
        GuestError::NoProgram
        | GuestError::Program(_)
        | GuestError::ReadProgram { .. }
        | GuestError::NotWasm { .. }
        | GuestError::ImageRemoved { .. }
        | GuestError::InvalidWasm { .. }
        | GuestError::NotACommand
        | GuestError::Link { .. }
        | GuestError::NotAnHttpHandler { .. }
        | GuestError::UnsupportedWorld { .. }
        | GuestError::MountSource { .. }
        | GuestError::MountTarget { .. }
        | GuestError::MountFile { .. }
        | GuestError::Preopen { .. }
        | GuestError::Instantiate { .. }
        | GuestError::StartSignature { .. }
        | GuestError::NoPodNetwork
        | GuestError::Bind { .. } => Code::FailedPrecondition,
    }
}

/// The pod network: the node's CNI set-up missing or wrong, or a refusal,
/// is a precondition; a plugin or namespace failing is internal (as
/// containerd reports CNI failures); a connection in the pod refused is
/// unavailable.
fn network(e: &NetworkError) -> Code {
    match e {
        NetworkError::NotConfigured { .. }
        | NetworkError::ConfigDir { .. }
        | NetworkError::BadConfig { .. }
        | NetworkError::Plugin {
            source: PluginError::NotInstalled { .. },
            ..
        }
        | NetworkError::DelInHostNamespace { .. }
        | NetworkError::JoinHostNamespace { .. } => Code::FailedPrecondition,
        NetworkError::Plugin { .. }
        | NetworkError::CreateNamespace { .. }
        | NetworkError::RemoveNamespace { .. }
        | NetworkError::NamespaceGone { .. }
        | NetworkError::OpenNamespace { .. }
        | NetworkError::EnterNamespace { .. } => Code::Internal,
        NetworkError::Connect { .. } => Code::Unavailable,
    }
}

/// An image's root filesystem: refused for its size, refused for what it
/// holds, or the node failing to write it.
fn rootfs(e: &RootfsError) -> Code {
    if !e.is_refusal() {
        Code::Internal
    } else if e.is_too_large() {
        Code::ResourceExhausted
    } else {
        Code::InvalidArgument
    }
}

/// `e` as a status carrying its message.
pub fn to_status(e: Error) -> Status {
    let code = code(&e);
    if code == Code::Internal {
        tracing::error!(error = %e, "request failed");
    } else {
        tracing::debug!(error = %e, "request rejected");
    }
    Status::new(code, e.to_string())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use wasmlet_agent::error::{CniCommand, Compression, EngineError, EntryError, TlsConfigError};
    use wasmlet_agent::model::image::WasmKind;

    use super::*;

    fn io() -> Error {
        Error::Io {
            what: "reading",
            path: "/x".into(),
            source: std::io::Error::other("boom"),
        }
    }

    fn registry(kind: RegistryFailure) -> Error {
        Error::Registry {
            reference: "x.io/a:1".into(),
            kind,
            reason: "because".into(),
        }
    }

    fn start_failed(cause: GuestError) -> Error {
        Error::StartFailed {
            id: "x".into(),
            source: Box::new(cause),
        }
    }

    fn io_error() -> Arc<std::io::Error> {
        Arc::new(std::io::Error::other("boom"))
    }

    fn plugin(source: PluginError) -> Error {
        NetworkError::Plugin {
            network: "pods".into(),
            source,
        }
        .into()
    }

    fn unpack(source: EntryError) -> Error {
        Error::Unpack {
            reference: "x.io/a:1".into(),
            source: Box::new(RootfsError::Entry {
                layer: "sha256:ab".into(),
                compression: Compression::Gzip,
                entry: "etc/passwd".into(),
                source,
            }),
        }
    }

    #[test]
    fn every_cause_has_its_code() {
        let node_io = RootfsError::Io {
            what: "creating",
            path: "/x".into(),
            source: io_error(),
        };
        let cases = [
            // A guest that cannot be made: the user's to fix, or the node's.
            (
                start_failed(GuestError::Program(RootfsError::ProgramNotFound {
                    program: "nope".into(),
                    looked_at: vec!["/bin/nope".into()],
                })),
                Code::FailedPrecondition,
            ),
            (
                start_failed(GuestError::InvalidWasm {
                    kind: WasmKind::Module,
                    detail: "junk".into(),
                }),
                Code::FailedPrecondition,
            ),
            (
                start_failed(GuestError::Bind {
                    addr: "0.0.0.0:8080".parse().unwrap(),
                    source: io_error(),
                }),
                Code::FailedPrecondition,
            ),
            (
                GuestError::MountSource {
                    host_path: "/gone".into(),
                    container_path: "/data".into(),
                    source: io_error(),
                }
                .into(),
                Code::FailedPrecondition,
            ),
            (
                start_failed(GuestError::Log {
                    detail: "disk full".into(),
                }),
                Code::Internal,
            ),
            (
                start_failed(GuestError::Program(node_io.clone())),
                Code::Internal,
            ),
            (
                start_failed(GuestError::Network(NetworkError::EnterNamespace {
                    path: "/run/netns/x".into(),
                    source: io_error(),
                })),
                Code::Internal,
            ),
            // The pod network.
            (
                NetworkError::NotConfigured {
                    dir: "/etc/cni/net.d".into(),
                }
                .into(),
                Code::FailedPrecondition,
            ),
            (
                NetworkError::BadConfig {
                    path: "/etc/cni/net.d/10-pods.conflist".into(),
                    reason: "no plugins".into(),
                }
                .into(),
                Code::FailedPrecondition,
            ),
            (
                plugin(PluginError::NotInstalled {
                    plugin: "bridge".into(),
                    bin_dirs: "/opt/cni/bin".into(),
                }),
                Code::FailedPrecondition,
            ),
            (
                NetworkError::DelInHostNamespace {
                    path: "/proc/1/ns/net".into(),
                }
                .into(),
                Code::FailedPrecondition,
            ),
            (
                plugin(PluginError::Failed {
                    plugin: "bridge".into(),
                    command: CniCommand::Add,
                    code: 7,
                    msg: "failed to allocate".into(),
                    details: String::new(),
                }),
                Code::Internal,
            ),
            (
                plugin(PluginError::TimedOut {
                    plugin: "bridge".into(),
                    command: CniCommand::Del,
                    timeout: std::time::Duration::from_secs(60),
                }),
                Code::Internal,
            ),
            (
                NetworkError::CreateNamespace {
                    path: "/run/netns/x".into(),
                    source: io_error(),
                }
                .into(),
                Code::Internal,
            ),
            (
                NetworkError::Connect {
                    sandbox: "x".into(),
                    port: 80,
                    source: io_error(),
                }
                .into(),
                Code::Unavailable,
            ),
            // An image's root filesystem.
            (
                unpack(EntryError::SymlinkEscapes {
                    target: "/etc/passwd".into(),
                }),
                Code::InvalidArgument,
            ),
            (
                unpack(EntryError::TooLarge { max: 1 << 20 }),
                Code::ResourceExhausted,
            ),
            (
                Error::Unpack {
                    reference: "x.io/a:1".into(),
                    source: Box::new(node_io),
                },
                Code::Internal,
            ),
            // Start-up.
            (
                TlsConfigError::NoCertificate {
                    path: "/etc/ca.pem".into(),
                }
                .into(),
                Code::InvalidArgument,
            ),
            (
                EngineError::EpochThread(std::io::Error::other("no threads")).into(),
                Code::Internal,
            ),
        ];
        for (e, want) in cases {
            let copy = e.duplicate();
            let s = to_status(e);
            assert_eq!(s.code(), want, "{}", s.message());
            assert!(!s.message().is_empty());
            if want != Code::Internal {
                assert_eq!(code(&copy), want, "a duplicate keeps its cause: {copy:?}");
            }
        }
    }

    #[test]
    fn every_variant_has_its_code() {
        let cases = [
            (
                Error::NotFound {
                    kind: "container",
                    id: "x".into(),
                },
                Code::NotFound,
            ),
            (
                Error::AlreadyExists {
                    kind: "pod sandbox",
                    id: "x".into(),
                    detail: String::new(),
                },
                Code::AlreadyExists,
            ),
            (Error::InvalidArgument("x".into()), Code::InvalidArgument),
            (
                Error::InvalidImage {
                    reference: "x".into(),
                    reason: "y".into(),
                },
                Code::InvalidArgument,
            ),
            (
                Error::InvalidTransition {
                    kind: "container",
                    id: "x".into(),
                    from: "A",
                    to: "B",
                },
                Code::FailedPrecondition,
            ),
            (
                Error::FailedPrecondition("x".into()),
                Code::FailedPrecondition,
            ),
            (
                start_failed(GuestError::NoPodNetwork),
                Code::FailedPrecondition,
            ),
            (
                registry(RegistryFailure::Unauthorized),
                Code::PermissionDenied,
            ),
            (registry(RegistryFailure::NotFound), Code::NotFound),
            (registry(RegistryFailure::Unavailable), Code::Unavailable),
            (registry(RegistryFailure::Untrusted), Code::Unavailable),
            (registry(RegistryFailure::Corrupt), Code::DataLoss),
            (registry(RegistryFailure::TooLarge), Code::ResourceExhausted),
            (registry(RegistryFailure::NotWasm), Code::InvalidArgument),
            (registry(RegistryFailure::Invalid), Code::InvalidArgument),
            (io(), Code::Internal),
            (Error::Store("x".into()), Code::Internal),
            (Error::Internal("x".into()), Code::Internal),
        ];
        for (e, want) in cases {
            let s = to_status(e);
            assert_eq!(s.code(), want, "{}", s.message());
            assert!(!s.message().is_empty());
        }
    }
}
