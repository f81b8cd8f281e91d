//! Running guests: the wasmtime engine and the caches that make images
//! ready (`engine`, `compile`, `artifacts`, and Winch's fast first tier in
//! `fast_tier`), what a guest's store holds and
//! is linked against (`host`), one instantiated guest and its run
//! (`guest`), `wasi:http` functions and their outgoing requests (`http`,
//! `egress`), the threads guests run on (`guest_runtime`), their output
//! (`logs`, `stdio`), and their limits and metering (`limits`, `usage`,
//! `metering`).
//!
//! It sees bytes, argv, environment, mounts and limits — never a CRI
//! request or a stored record.

pub(crate) mod artifacts;
pub(crate) mod compile;
pub(crate) mod egress;
pub(crate) mod engine;
pub(crate) mod error;
mod fast_tier;
pub(crate) mod guest;
pub(crate) mod guest_runtime;
pub(crate) mod host;
pub(crate) mod http;
pub(crate) mod limits;
pub(crate) mod logs;
pub(crate) mod metering;
pub(crate) mod node_memory;
mod read_only;
pub(crate) mod stdio;
pub(crate) mod usage;
