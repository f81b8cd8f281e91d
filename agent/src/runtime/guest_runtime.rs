//! The tokio runtime guests run on, with threads of its own, apart from the
//! runtime serving CRI requests.

use crate::error::{Error, Result};

/// The runtime guests run on, apart from the one serving requests: the OS
/// schedules the server's threads fairly against busy guests, so a node full
/// of spinning guests still answers the kubelet promptly.
pub(crate) struct GuestRuntime {
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl GuestRuntime {
    pub(crate) fn new() -> Result<Self> {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        crate::network::netns::remember_host_namespace()
            .map_err(|e| Error::Internal(e.to_string()))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("wasmlet-guest")
            // A busy guest's poll lasts up to an epoch tick (10 ms). With
            // tokio's defaults a worker full of them looks at its timers and
            // I/O only every 61 polls and at wake-ups from other threads
            // every 31: a guest throttled to its CPU quota woke up to 0.6 s
            // late and got a quarter of its quota while neighbours spun.
            // Every 4th poll bounds that at about four ticks; every 2nd
            // (measured too) cost a quiet wasi:http function half again its
            // p99 latency (bench/results/issue-15-quota-ab/README.md).
            .event_interval(4)
            .global_queue_interval(4)
            // A blocking-pool thread spawned while a guest was polled inside
            // its pod's network namespace would start there: put it back.
            .on_thread_start(|| {
                if let Err(error) = crate::network::netns::return_to_host_namespace() {
                    tracing::error!(%error, "guest thread cannot leave a pod's network namespace");
                    std::process::abort();
                }
            })
            .enable_all()
            .build()
            .map_err(|e| Error::Internal(format!("starting the guest runtime: {e}")))?;
        Ok(Self {
            handle: rt.handle().clone(),
            runtime: Some(rt),
        })
    }

    pub(crate) fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }
}

impl Drop for GuestRuntime {
    fn drop(&mut self) {
        // Dropping a runtime may not block inside another runtime.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
