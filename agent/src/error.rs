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
