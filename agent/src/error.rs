//! The agent's error type. Each variant names what went wrong and carries the
//! id or path it concerns; the CRI layer maps variants to gRPC codes in one
//! place.
//!
//! Below the facade each concern has its own error (the pod network, an
//! image's root filesystem, a guest, the engine); they fold into [`Error`]
//! whole, so the mapping reads the cause, not a message.

use std::path::PathBuf;

pub use crate::images::inspect::InvalidWasm;
pub use crate::images::rootfs::{Compression, EntryError, RootfsError};
pub use crate::network::{CniCommand, NetworkError, PluginError};
pub use crate::runtime::egress::TlsConfigError;
pub use crate::runtime::error::{EngineError, GuestError, LinkTarget};

/// Everything a facade call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{kind} {id:?} not found")]
    NotFound { kind: &'static str, id: String },

    #[error("{kind} {id:?} already exists: {detail}")]
    AlreadyExists {
        kind: &'static str,
        id: String,
        detail: String,
    },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("{kind} {id}: invalid state transition: {from} => {to}")]
    InvalidTransition {
        kind: &'static str,
        id: String,
        from: &'static str,
        to: &'static str,
    },

    #[error("{0}")]
    FailedPrecondition(String),

    #[error("image {reference:?}: {reason}")]
    InvalidImage { reference: String, reason: String },

    /// A container's guest could not be made or started; the container
    /// is EXITED with reason `StartError`.
    #[error("container {id} failed to start: {source}")]
    StartFailed {
        id: String,
        #[source]
        source: Box<GuestError>,
    },

    /// A guest (an exec'd instance) could not be made.
    #[error("{0}")]
    Guest(#[source] Box<GuestError>),

    #[error("image {reference}: {reason}")]
    Registry {
        reference: String,
        kind: RegistryFailure,
        reason: String,
    },

    #[error("{what} {path:?}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("state database: {0}")]
    Store(String),

    #[error("internal error: {0}")]
    Internal(String),

    /// The pod network could not be set up, joined or torn down (CNI,
    /// namespaces), or a connection inside it failed.
    #[error("{0}")]
    Network(#[source] Box<NetworkError>),

    /// An image's root filesystem could not be made on this node (its
    /// refusals are `Registry` failures).
    #[error("image {reference}: {source}")]
    Unpack {
        reference: String,
        #[source]
        source: Box<RootfsError>,
    },

    /// The Wasm engine could not be built (at start-up).
    #[error("{0}")]
    Engine(#[from] EngineError),

    /// The node's CA file for functions' HTTPS is unusable (at start-up).
    #[error("{0}")]
    TlsConfig(#[from] TlsConfigError),

    /// An operation with a deadline (ExecSync's timeout) ran out of time.
    #[error("{0}")]
    DeadlineExceeded(String),
}

impl From<GuestError> for Error {
    fn from(e: GuestError) -> Self {
        Error::Guest(Box::new(e))
    }
}

impl From<NetworkError> for Error {
    fn from(e: NetworkError) -> Self {
        Error::Network(Box::new(e))
    }
}

impl Error {
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { what, path, source }
    }
}

/// What kind of registry failure happened, which decides whether to retry
/// and what the kubelet is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegistryFailure {
    /// The registry refused the credentials (401/403).
    Unauthorized,
    /// The reference does not exist (404).
    NotFound,
    /// 5xx, 429, connection refused or reset, timeouts.
    Unavailable,
    /// The registry's TLS certificate is not trusted.
    Untrusted,
    /// Content did not match its digest or size (e.g. truncated).
    Corrupt,
    /// Over a configured size limit.
    TooLarge,
    /// The image is not Wasm.
    NotWasm,
    /// Anything else the registry sent that makes no sense.
    Invalid,
}

impl RegistryFailure {
    /// Whether trying again may help.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            RegistryFailure::Unavailable | RegistryFailure::Corrupt
        )
    }
}

impl Error {
    /// A copy for a second caller of a shared operation (a deduplicated
    /// pull). I/O sources cannot be cloned, so they are kept as text.
    pub fn duplicate(&self) -> Error {
        match self {
            Error::NotFound { kind, id } => Error::NotFound {
                kind,
                id: id.clone(),
            },
            Error::AlreadyExists { kind, id, detail } => Error::AlreadyExists {
                kind,
                id: id.clone(),
                detail: detail.clone(),
            },
            Error::InvalidArgument(m) => Error::InvalidArgument(m.clone()),
            Error::InvalidTransition { kind, id, from, to } => Error::InvalidTransition {
                kind,
                id: id.clone(),
                from,
                to,
            },
            Error::FailedPrecondition(m) => Error::FailedPrecondition(m.clone()),
            Error::Network(e) => Error::Network(e.clone()),
            Error::Guest(e) => Error::Guest(e.clone()),
            Error::Unpack { reference, source } => Error::Unpack {
                reference: reference.clone(),
                source: source.clone(),
            },
            Error::DeadlineExceeded(m) => Error::DeadlineExceeded(m.clone()),
            Error::InvalidImage { reference, reason } => Error::InvalidImage {
                reference: reference.clone(),
                reason: reason.clone(),
            },
            Error::StartFailed { id, source } => Error::StartFailed {
                id: id.clone(),
                source: source.clone(),
            },
            Error::Registry {
                reference,
                kind,
                reason,
            } => Error::Registry {
                reference: reference.clone(),
                kind: *kind,
                reason: reason.clone(),
            },
            Error::Store(m) => Error::Store(m.clone()),
            Error::Io { .. } | Error::Internal(_) | Error::Engine(_) => {
                Error::Internal(self.to_string())
            }
            Error::TlsConfig(_) => Error::InvalidArgument(self.to_string()),
        }
    }
}

macro_rules! store_error {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Store(e.to_string())
            }
        }
    )*};
}

store_error!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

pub type Result<T, E = Error> = std::result::Result<T, E>;
