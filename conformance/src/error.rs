//! The harness's error type, and the assertion tests use on gRPC status codes.

use std::fmt::Debug;
use std::path::PathBuf;
use std::time::Duration;

use tonic::{Code, Status};

/// Everything that can go wrong while driving a CRI endpoint.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The endpoint never answered `Version` before the deadline.
    #[error("CRI endpoint {} did not answer Version within {timeout:?}: {last_error}", socket.display())]
    ConnectTimeout {
        socket: PathBuf,
        timeout: Duration,
        /// What the last attempt failed with.
        last_error: String,
    },

    /// An RPC returned a non-OK status.
    #[error("{rpc} failed: {source}")]
    Rpc {
        rpc: &'static str,
        #[source]
        source: Status,
    },

    /// An RPC answered OK but left out a field the CRI says it must set.
    #[error("{rpc} answered OK without its `{field}` field")]
    MissingField {
        rpc: &'static str,
        field: &'static str,
    },

    /// A container did not reach the wanted state in time.
    #[error(
        "container {container_id} did not reach {wanted} within {timeout:?} (last seen: {last_seen})"
    )]
    StateTimeout {
        container_id: String,
        wanted: &'static str,
        timeout: Duration,
        last_seen: String,
    },

    /// A log file never showed what was waited for.
    #[error("log {} did not show {waited_for} within {timeout:?}", path.display())]
    LogTimeout {
        path: PathBuf,
        waited_for: String,
        timeout: Duration,
    },

    /// A host-side file or directory operation failed.
    #[error("{action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A real component the tests start (a downstream runtime) could not
    /// be set up; the message says what it printed.
    #[error("{0}")]
    Setup(String),

    /// A container log file is not in the CRI log format.
    #[error("{}:{line}: malformed CRI log record: {reason}", path.display())]
    MalformedLog {
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        reason: String,
    },
}

impl Error {
    /// The gRPC status, if this error is an RPC that answered with one.
    pub fn status(&self) -> Option<&Status> {
        match self {
            Error::Rpc { source, .. } => Some(source),
            _ => None,
        }
    }

    pub(crate) fn rpc(rpc: &'static str) -> impl FnOnce(Status) -> Error {
        move |source| Error::Rpc { rpc, source }
    }
}

/// Asserts that `result` is an RPC error with status `code`, and returns that status.
///
/// Panics (naming the caller's line) if the call succeeded, failed with another
/// code, or failed before reaching the endpoint.
#[track_caller]
pub fn assert_code<T: Debug>(result: Result<T, Error>, code: Code) -> Status {
    match result {
        Ok(value) => panic!("expected gRPC {code:?}, got OK: {value:?}"),
        Err(Error::Rpc { rpc, source }) => {
            assert_eq!(
                source.code(),
                code,
                "{rpc} failed with the wrong code: {source}"
            );
            source
        }
        Err(other) => panic!("expected gRPC {code:?}, got a harness error: {other}"),
    }
}
