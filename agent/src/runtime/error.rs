//! Why a guest could not be made ready or started, and why the engine
//! could not be built.
//!
//! A [`GuestError`]'s text is shown to users (the container's status
//! message and its log), so each reads as a sentence about their program.
//! It is `Clone` (a container keeps why its program did not compile, and
//! retried calls share a start), so wasmtime's errors are kept as their
//! text and I/O causes behind an `Arc`.

use std::path::PathBuf;
use std::sync::Arc;

use crate::images::rootfs::RootfsError;
use crate::model::image::WasmKind;
use crate::network::NetworkError;

/// "module" or "component".
fn noun(kind: &WasmKind) -> &'static str {
    match kind {
        WasmKind::Module => "module",
        WasmKind::Component => "component",
    }
}

/// What a prepared image is linked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkTarget {
    /// A core module against WASI preview1.
    Preview1,
    /// A command component against WASI 0.2.
    Wasi,
    /// An HTTP function against WASI 0.2 and `wasi:http`.
    WasiHttp,
}

impl std::fmt::Display for LinkTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LinkTarget::Preview1 => "the module cannot be linked against WASI preview1",
            LinkTarget::Wasi => "the component cannot be linked against WASI 0.2",
            LinkTarget::WasiHttp => "the component cannot be linked against WASI 0.2 and wasi:http",
        })
    }
}

/// Why a container's guest could not be made: its program (found, read,
/// compiled, linked), its mounts, its instantiation, its socket.
#[derive(Clone, Debug, thiserror::Error)]
pub enum GuestError {
    // --- the program ---
    /// Neither the container's command nor the image's entrypoint.
    #[error("neither the container nor the image names a program to run")]
    NoProgram,

    /// The program is not (safely) in a compat image's root.
    #[error(transparent)]
    Program(#[from] RootfsError),

    /// The image's Wasm layer could not be read from the store.
    #[error("reading the image's Wasm: {detail}")]
    ReadImageWasm { detail: String },

    /// A compat image's program file could not be read.
    #[error("reading {program:?}: {source}")]
    ReadProgram {
        program: String,
        #[source]
        source: Arc<std::io::Error>,
    },

    /// A compat image's program file is not Wasm.
    #[error("{program:?} is not a WebAssembly program")]
    NotWasm { program: String },

    /// The image was removed before its container started.
    #[error("image {image} was removed")]
    ImageRemoved { image: String },

    // --- compiling and linking ---
    /// Cranelift refused the bytes.
    #[error("invalid Wasm {}: {detail}", noun(kind))]
    InvalidWasm { kind: WasmKind, detail: String },

    /// The compile task itself failed (a panic in the compiler).
    #[error("compiling the image: {detail}")]
    Compile { detail: String },

    /// A core module without `_start`.
    #[error(
        "the module exports no `_start` function: it is not a WASI command \
         (a library or reactor module cannot run as a container)"
    )]
    NotACommand,

    /// An import the host does not provide, or of the wrong type.
    #[error("{target}: {detail}")]
    Link { target: LinkTarget, detail: String },

    /// A component exporting `wasi:http/incoming-handler` unusably.
    #[error("the component does not export a usable `wasi:http/incoming-handler` ({detail})")]
    NotAnHttpHandler { detail: String },

    /// A component that is neither a command nor an HTTP function.
    #[error(
        "unsupported WASI world: the component exports neither `wasi:cli/run` \
         (a command) nor `wasi:http/incoming-handler` (an HTTP function) ({detail})"
    )]
    UnsupportedWorld { detail: String },

    // --- mounts ---
    /// A mount's source is missing or unreadable.
    #[error("mount source {host_path:?} for {container_path:?}: {source}")]
    MountSource {
        host_path: String,
        container_path: String,
        #[source]
        source: Arc<std::io::Error>,
    },

    /// A file mount whose target names no file.
    #[error("mount target {container_path:?} has no file name")]
    MountTarget { container_path: String },

    /// A file mount could be neither linked nor copied into place.
    #[error("mounting file {host_path:?} at {container_path:?}: {source}")]
    MountFile {
        host_path: String,
        container_path: String,
        #[source]
        source: Arc<std::io::Error>,
    },

    /// The container's own directory (for file mounts) cannot be made.
    #[error("creating {path:?}: {source}")]
    ContainerDir {
        path: PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },

    /// A directory cannot be preopened for the guest.
    #[error("mounting {host_path:?} at {guest_path:?}: {detail}")]
    Preopen {
        host_path: PathBuf,
        guest_path: String,
        detail: String,
    },

    /// The container's log cannot be opened.
    #[error("{detail}")]
    Log { detail: String },

    // --- instantiating and serving ---
    /// Instantiation failed (a start function trapped, resources ran out).
    #[error("instantiating the {}: {detail}", noun(kind))]
    Instantiate { kind: WasmKind, detail: String },

    /// `_start` is not `() -> ()`.
    #[error("the module's `_start` has the wrong type: {detail}")]
    StartSignature { detail: String },

    /// An HTTP function in a pod without a network.
    #[error(
        "an HTTP function needs a pod network, and this pod has none \
         (no CNI configuration on the node)"
    )]
    NoPodNetwork,

    /// An HTTP function's port cannot be listened on (in use).
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: Arc<std::io::Error>,
    },

    /// The pod's network namespace cannot be entered.
    #[error(transparent)]
    Network(#[from] NetworkError),
}

/// Why the engine could not be built (at start-up).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// wasmtime refused its configuration.
    #[error("creating the {what}: {detail}")]
    Create { what: &'static str, detail: String },

    /// WASI could not be added to a linker.
    #[error("linking {what}: {detail}")]
    Link { what: &'static str, detail: String },

    /// The directory of compiled artifacts cannot be used.
    #[error("opening the precompiled artifact cache: {0}")]
    ArtifactCache(#[source] Box<crate::Error>),

    /// The thread that advances epochs did not start.
    #[error("starting the epoch thread: {0}")]
    EpochThread(#[source] std::io::Error),

    /// The thread of the fast tier's background compiles did not start.
    #[error("starting the background compile thread: {0}")]
    UpgradeThread(#[source] std::io::Error),
}
