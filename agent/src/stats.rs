//! Resource usage of guests, as the kubelet's CRI stats read it.
//!
//! Guests share the agent's threads, so a guest's CPU time is measured
//! where it is spent: the thread CPU clock is read around every poll of its
//! future. Memory is what its limiter has charged: committed linear
//! memories and tables.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use crate::time::Timestamp;

/// Estimated host memory per running instance beyond its linear memory
/// (store, WASI context, async stack in use), added to the working set.
pub const INSTANCE_OVERHEAD_BYTES: u64 = 256 * 1024;

/// One guest's running totals; shared by its future and the stats readers.
#[derive(Debug, Default)]
pub struct GuestUsage {
    cpu_nanos: AtomicU64,
    memory_bytes: AtomicU64,
}

impl GuestUsage {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// CPU time spent running the guest so far.
    pub fn cpu_nanos(&self) -> u64 {
        self.cpu_nanos.load(Ordering::Relaxed)
    }

    /// Guest memory committed now (0 once the guest ended).
    pub fn memory_bytes(&self) -> u64 {
        self.memory_bytes.load(Ordering::Relaxed)
    }

    pub(crate) fn set_memory(&self, bytes: u64) {
        self.memory_bytes.store(bytes, Ordering::Relaxed);
    }
}

fn thread_cpu_nanos() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// A future whose polls are charged to `usage`.
pub struct Metered<F> {
    inner: Pin<Box<F>>,
    usage: Arc<GuestUsage>,
}

impl<F> Metered<F> {
    pub fn new(inner: F, usage: Arc<GuestUsage>) -> Self {
        Self {
            inner: Box::pin(inner),
            usage,
        }
    }
}

impl<F: Future> Future for Metered<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let start = thread_cpu_nanos();
        let result = self.inner.as_mut().poll(cx);
        let spent = thread_cpu_nanos().saturating_sub(start);
        self.usage.cpu_nanos.fetch_add(spent, Ordering::Relaxed);
        result
    }
}

/// A point-in-time reading of a container or pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub timestamp: Timestamp,
    pub cpu_nanos: u64,
    /// CPU use over the interval since the previous reading, in
    /// nanocores (1e9 = one core busy).
    pub nano_cores: u64,
    pub working_set_bytes: u64,
    /// The memory limit minus the working set, when there is a limit.
    pub available_bytes: Option<u64>,
    pub running: bool,
}

/// Computes a rate against the previous reading kept in `last`.
pub(crate) fn nano_cores(last: &mut Option<(Timestamp, u64)>, now: Timestamp, cpu: u64) -> u64 {
    let rate = match *last {
        Some((then, then_cpu)) if now.as_nanos() > then.as_nanos() => {
            let wall = (now.as_nanos() - then.as_nanos()) as u128;
            (cpu.saturating_sub(then_cpu) as u128 * 1_000_000_000 / wall) as u64
        }
        _ => 0,
    };
    *last = Some((now, cpu));
    rate
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn busy_polls_are_charged() {
        let usage = GuestUsage::new();
        let busy = async {
            let start = std::time::Instant::now();
            let mut x = 0u64;
            while start.elapsed() < std::time::Duration::from_millis(50) {
                x = std::hint::black_box(x.wrapping_add(1));
            }
            x
        };
        Metered::new(busy, usage.clone()).await;
        assert!(usage.cpu_nanos() >= 30_000_000, "{}", usage.cpu_nanos());
        let idle = GuestUsage::new();
        Metered::new(
            tokio::time::sleep(std::time::Duration::from_millis(50)),
            idle.clone(),
        )
        .await;
        assert!(idle.cpu_nanos() < 20_000_000, "{}", idle.cpu_nanos());
    }

    #[test]
    fn rate_over_the_interval() {
        let mut last = None;
        assert_eq!(
            nano_cores(&mut last, Timestamp::from_nanos(1_000_000_000), 0),
            0
        );
        // Half a core over two seconds.
        assert_eq!(
            nano_cores(
                &mut last,
                Timestamp::from_nanos(3_000_000_000),
                1_000_000_000
            ),
            500_000_000
        );
    }
}
