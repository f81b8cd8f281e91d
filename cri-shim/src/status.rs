//! The one mapping from agent errors to gRPC statuses.

use tonic::{Code, Status};
use wasmlet_agent::Error;
use wasmlet_agent::error::RegistryFailure;

/// The gRPC code the kubelet should see for `e`.
pub fn code(e: &Error) -> Code {
    match e {
        Error::NotFound { .. } => Code::NotFound,
        Error::AlreadyExists { .. } => Code::AlreadyExists,
        Error::InvalidArgument(_) | Error::InvalidImage { .. } => Code::InvalidArgument,
        Error::InvalidTransition { .. }
        | Error::FailedPrecondition(_)
        | Error::StartFailed { .. } => Code::FailedPrecondition,
        Error::Registry { kind, .. } => match kind {
            RegistryFailure::Unauthorized => Code::PermissionDenied,
            RegistryFailure::NotFound => Code::NotFound,
            RegistryFailure::Unavailable | RegistryFailure::Untrusted => Code::Unavailable,
            RegistryFailure::Corrupt => Code::DataLoss,
            RegistryFailure::TooLarge => Code::ResourceExhausted,
            RegistryFailure::NotWasm | RegistryFailure::Invalid => Code::InvalidArgument,
        },
        Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
        Error::Io { .. } | Error::Store(_) | Error::Internal(_) | Error::Network(_) => {
            Code::Internal
        }
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
                Error::StartFailed {
                    id: "x".into(),
                    reason: "y".into(),
                },
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
