//! Black-box CRI v1 conformance tests against the real `wasmlet` binary.
//!
//! Each test starts its own daemon on a private root and socket (see
//! [`daemon::Wasmlet`]) and drives it only through the CRI, as the kubelet
//! would, with the harness in `wasmlet_conformance`. Areas follow the ones a
//! CRI validation suite uses; guest execution has its own area.

use std::time::Duration;

mod daemon;

mod admin;
mod bench;
mod cancel;
mod compat;
mod container;
mod critest;
mod daemon_lifecycle;
mod delegate;
mod doctor;
mod events;
mod exec_wasm;
mod fast_tier;
mod faults;
mod hostile;
mod http_functions;
mod image;
mod install;
mod isolation;
mod kube;
mod kubectl;
mod limits;
mod log_rotation;
mod metrics;
mod network;
mod networked;
mod node_memory;
mod operator;
mod play;
mod pull;
mod registry_common;
mod registry_fixture;
mod restart;
mod runtime_info;
mod sandbox;
mod stats;
mod streaming;
mod tls;
mod token_auth;

/// The sample guests, as imported by the fixture (see `wasm_samples::ALL`).
const ECHO_P1: &str = "wasmlet.local/samples/echo:p1";
const ECHO_P2: &str = "wasmlet.local/samples/echo:p2";
const TICKER_P1: &str = "wasmlet.local/samples/ticker:p1";
const TRAP_P1: &str = "wasmlet.local/samples/trap:p1";
const SPIN_P1: &str = "wasmlet.local/samples/spin:p1";
const SLEEPER_P1: &str = "wasmlet.local/samples/sleeper:p1";
const HOG_P1: &str = "wasmlet.local/samples/hog:p1";
const PONG_P2: &str = "wasmlet.local/samples/pong:p2";
const HELLO_HTTP_P2: &str = "wasmlet.local/samples/hello-http:p2";

/// An id in the shape runtimes use that no runtime has handed out.
const UNKNOWN_ID: &str = "0badc0de0badc0de0badc0de0badc0de0badc0de0badc0de0badc0de0badc0de";

/// How long a guest may take to be compiled, run and reported exited.
const GUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a started guest may take to be seen running or to log something.
const RUNNING_TIMEOUT: Duration = Duration::from_secs(10);

/// Nanoseconds in a second, for CRI timestamps.
const SECOND_NS: i64 = 1_000_000_000;

/// CRI timestamps are nanoseconds since the epoch: anything after 2020-09-13.
const EPOCH_NS_FLOOR: i64 = 1_600_000_000 * SECOND_NS;
