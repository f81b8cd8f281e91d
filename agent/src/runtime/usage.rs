//! The running totals of one guest (CPU time, committed memory, requests
//! served), shared by its future, its limiter and the stats readers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::model::usage::HttpUsage;

/// Estimated host memory per running instance beyond its linear memory
/// (store, WASI context, async stack in use), added to the working set.
pub const INSTANCE_OVERHEAD_BYTES: u64 = 256 * 1024;

/// One guest's running totals; shared by its future and the stats readers.
#[derive(Debug, Default)]
pub struct GuestUsage {
    cpu_nanos: AtomicU64,
    memory_bytes: AtomicU64,
    throttled_periods: AtomicU64,
    http_requests: AtomicU64,
    http_server_errors: AtomicU64,
    http_latency_micros: AtomicU64,
    throttled_nanos: AtomicU64,
    /// A wasi:http function's request latencies, made at its first request.
    http_latency: std::sync::OnceLock<prometheus_client::metrics::histogram::Histogram>,
}

impl GuestUsage {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// CPU time spent running the guest so far.
    pub fn cpu_nanos(&self) -> u64 {
        self.cpu_nanos.load(Ordering::Relaxed)
    }

    /// How many CPU periods the guest was throttled in.
    pub fn throttled_periods(&self) -> u64 {
        self.throttled_periods.load(Ordering::Relaxed)
    }

    /// How long the guest was held back by its CPU quotas.
    pub fn throttled_nanos(&self) -> u64 {
        self.throttled_nanos.load(Ordering::Relaxed)
    }

    /// The latencies of the requests a wasi:http function answered, if it
    /// answered any.
    pub fn http_latency(&self) -> Option<prometheus_client::metrics::histogram::Histogram> {
        self.http_latency.get().cloned()
    }

    /// Guest memory committed now (0 once the guest ended).
    pub fn memory_bytes(&self) -> u64 {
        self.memory_bytes.load(Ordering::Relaxed)
    }

    /// Counts a request answered with `status` after `latency`.
    pub fn record_request(&self, status: u16, latency: std::time::Duration) {
        self.http_requests.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.http_server_errors.fetch_add(1, Ordering::Relaxed);
        }
        self.http_latency_micros.fetch_add(
            u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.http_latency
            .get_or_init(crate::metrics::latency_buckets)
            .observe(latency.as_secs_f64());
    }

    pub fn http(&self) -> HttpUsage {
        HttpUsage {
            requests: self.http_requests.load(Ordering::Relaxed),
            server_errors: self.http_server_errors.load(Ordering::Relaxed),
            latency_micros: self.http_latency_micros.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn add_cpu(&self, nanos: u64) {
        self.cpu_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Counts a period the guest was throttled in, for `nanos`.
    pub(crate) fn add_throttled_period(&self, nanos: u64) {
        self.throttled_periods.fetch_add(1, Ordering::Relaxed);
        self.throttled_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub(crate) fn add_memory(&self, bytes: u64) {
        self.memory_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn sub_memory(&self, bytes: u64) {
        let _ = self
            .memory_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| {
                Some(m.saturating_sub(bytes))
            });
    }
}
