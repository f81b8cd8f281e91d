//! The agent's error type. Each variant names what went wrong and carries the
//! id or path it concerns; the CRI layer maps variants to gRPC codes in one
//! place.

use std::path::PathBuf;

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

    #[error("container {id} failed to start: {reason}")]
    StartFailed { id: String, reason: String },

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

    /// The pod network could not be set up or torn down (CNI, namespaces).
    #[error("{0}")]
    Network(String),

    /// An operation with a deadline (ExecSync's timeout) ran out of time.
    #[error("{0}")]
    DeadlineExceeded(String),
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
            Error::Network(m) => Error::Network(m.clone()),
            Error::DeadlineExceeded(m) => Error::DeadlineExceeded(m.clone()),
            Error::InvalidImage { reference, reason } => Error::InvalidImage {
                reference: reference.clone(),
                reason: reason.clone(),
            },
            Error::StartFailed { id, reason } => Error::StartFailed {
                id: id.clone(),
                reason: reason.clone(),
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
            Error::Io { .. } | Error::Internal(_) => Error::Internal(self.to_string()),
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
