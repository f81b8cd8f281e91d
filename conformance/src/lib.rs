//! A CRI v1 client harness that drives any CRI endpoint the way the kubelet
//! does, for conformance tests.
//!
//! The harness owns: connecting to an endpoint on a unix socket
//! ([`CriClient::connect`]), the kubelet's call sequences ([`CriClient::run_pod`],
//! [`CriClient::start`], [`CriClient::wait_exited`]...), builders for the configs
//! the kubelet sends ([`PodSandboxConfigBuilder`], [`ContainerConfigBuilder`]),
//! and a strict reader of the CRI container log format ([`read_cri_log`]).
//!
//! It must not know which runtime is behind the socket: it speaks only the CRI
//! wire types, so the same tests can be pointed at containerd or CRI-O. Every
//! wait it offers is bounded by a timeout.

mod client;
mod config;
mod error;
pub mod fixtures;
mod log;
pub mod pod_network;
pub mod streaming;

pub use client::{CriClient, DEFAULT_RPC_TIMEOUT, KUBELET_API_VERSION};
pub use config::{
    ContainerConfigBuilder, DEFAULT_NAMESPACE, POD_NAME_LABEL, POD_NAMESPACE_LABEL, POD_UID_LABEL,
    Pod, PodSandboxConfigBuilder, now_ns,
};
pub use error::{Error, assert_code};
pub use log::{
    LogLine, LogRecord, ParseError, Stream, lines, parse_cri_log, read_cri_log, stream_lines,
    wait_for_log,
};
/// The gRPC status codes tests assert on.
pub use tonic::Code;
/// The CRI v1 wire types, re-exported so tests name one version of them.
pub use wasmlet_proto::cri;
