//! Why unpacking an image's layers or finding a program in its root
//! failed: a refusal naming the entry, or the node's own filesystem.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Compression;

/// Why unpacking an image or finding a program in it failed. `Clone`, so
/// I/O causes are kept behind an `Arc`.
#[derive(Clone, Debug, thiserror::Error)]
pub enum RootfsError {
    /// An entry of a layer was refused, or could not be written.
    #[error("layer {layer} ({compression:?}): layer entry {entry:?}: {source}")]
    Entry {
        /// The layer's blob (`sha256:<hex>`).
        layer: String,
        compression: Compression,
        entry: PathBuf,
        #[source]
        source: EntryError,
    },

    /// A layer is not a readable tar (or gzip) stream.
    #[error("layer {layer} ({compression:?}): reading the layer: {source}")]
    Layer {
        layer: String,
        compression: Compression,
        #[source]
        source: Arc<std::io::Error>,
    },

    /// The layers' tar streams (headers and skipped data included) are
    /// longer than the limits allow.
    #[error(
        "layer {layer} ({compression:?}): the layers hold more than {max} bytes of tar data \
         (the byte limit plus {} bytes of headers per allowed entry)",
        super::HEADER_BYTES_PER_ENTRY
    )]
    StreamTooLarge {
        layer: String,
        compression: Compression,
        max: u64,
    },

    /// The node's own filesystem failed (making the root, opening a blob,
    /// moving the root into place).
    #[error("{what} {path:?}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },

    /// A program name that cannot be inside the image.
    #[error("{program:?}: {source}")]
    ProgramPath {
        program: String,
        #[source]
        source: EntryError,
    },

    /// The program is not a file on any of the places looked at.
    #[error(
        "{program:?} is not in the image (looked at {})",
        looked_at.iter().map(|c| c.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    ProgramNotFound {
        program: String,
        looked_at: Vec<PathBuf>,
    },

    /// The program's symlinks loop or leave the image.
    #[error("cannot resolve {path:?} inside the image")]
    Unresolvable { path: PathBuf },
}

impl RootfsError {
    pub(super) fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_owned();
        move |e| RootfsError::Io {
            what,
            path,
            source: Arc::new(e),
        }
    }

    /// Whether the image itself is at fault (not the node).
    pub fn is_refusal(&self) -> bool {
        !matches!(self, RootfsError::Io { .. })
    }

    /// Whether the image is refused for its size (entries or bytes).
    pub fn is_too_large(&self) -> bool {
        matches!(
            self,
            RootfsError::Entry {
                source: EntryError::TooManyEntries { .. } | EntryError::TooLarge { .. },
                ..
            } | RootfsError::StreamTooLarge { .. }
        )
    }
}

/// What is wrong with one tar entry (or a program's path).
#[derive(Clone, Debug, thiserror::Error)]
pub enum EntryError {
    #[error("its path leaves the image root (`..`)")]
    LeavesRoot,
    #[error("its path has a prefix")]
    Prefix,
    #[error("the image has more than {max} entries")]
    TooManyEntries { max: u64 },
    #[error("the image unpacks to more than the {max} byte limit")]
    TooLarge { max: u64 },
    #[error("a {kind} without a target")]
    NoTarget { kind: &'static str },
    #[error("symlink target {target:?} is absolute or leaves the image root")]
    SymlinkEscapes { target: PathBuf },
    #[error("device nodes and FIFOs are not allowed in Wasm images")]
    DeviceNode,
    #[error("unsupported tar entry type {kind}")]
    Unsupported { kind: String },
    /// The entry could not be read or written.
    #[error("{0}")]
    Io(#[source] Arc<std::io::Error>),
}

impl From<std::io::Error> for EntryError {
    fn from(e: std::io::Error) -> Self {
        EntryError::Io(Arc::new(e))
    }
}
