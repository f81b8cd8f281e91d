//! Metering of guests: their CPU time, as the kubelet's CRI stats read it,
//! and CFS-like throttling to their CPU quotas.
//!
//! Guests share the agent's threads, so a guest's CPU time is measured
//! where it is spent: the thread CPU clock is read around every poll of its
//! future. Memory is what its limiter has charged: committed linear
//! memories and tables.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::runtime::limits::{CpuBudget, LiveLimits, PodCpu};
use crate::runtime::usage::GuestUsage;

fn thread_cpu_nanos() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// A future whose polls are charged to `usage`, and, with CPU limits,
/// throttled like CFS: once it has used its quota in the current period it
/// is not polled again until the period ends. Guests yield at every epoch
/// tick, so the granularity is one tick.
pub struct Metered<F> {
    inner: Pin<Box<F>>,
    usage: Arc<GuestUsage>,
    limits: Option<Arc<LiveLimits>>,
    /// Shared quotas (the pod's; an HTTP function's over its instances).
    pod_cpu: Vec<Arc<PodCpu>>,
    /// The guest's own quota's account.
    budget: CpuBudget,
    throttled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<F> Metered<F> {
    pub fn new(inner: F, usage: Arc<GuestUsage>) -> Self {
        Self {
            inner: Box::pin(inner),
            usage,
            limits: None,
            pod_cpu: Vec::new(),
            budget: CpuBudget::new(),
            throttled: None,
        }
    }

    /// Also throttles the future to a shared CPU quota (its pod's).
    pub fn with_pod_cpu(mut self, pod: Option<Arc<PodCpu>>) -> Self {
        self.pod_cpu.extend(pod);
        self
    }

    /// Throttles the future to the CPU quota in `limits` (read live).
    pub fn with_limits(mut self, limits: Arc<LiveLimits>) -> Self {
        self.limits = Some(limits);
        self
    }
}

impl<F: Future> Future for Metered<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        if let Some(sleep) = this.throttled.as_mut() {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.throttled = None;
        }
        let start = thread_cpu_nanos();
        let result = this.inner.as_mut().poll(cx);
        let spent = thread_cpu_nanos().saturating_sub(start);
        this.usage.add_cpu(spent);
        if result.is_pending() {
            let mut resume_at = None;
            if let Some((quota, period)) = this.limits.as_ref().and_then(|l| l.cpu_quota()) {
                resume_at = this.budget.charge(spent, quota, period);
            }
            for account in &this.pod_cpu {
                if let Some(until) = account.charge(spent) {
                    resume_at =
                        Some(resume_at.map_or(until, |t: tokio::time::Instant| t.max(until)));
                }
            }
            if let Some(until) = resume_at {
                let held = until.saturating_duration_since(tokio::time::Instant::now());
                this.usage
                    .add_throttled_period(u64::try_from(held.as_nanos()).unwrap_or(u64::MAX));
                let mut sleep = Box::pin(tokio::time::sleep_until(until));
                // Register the wake-up now; the guest's own wake is ignored
                // until the period ends.
                if sleep.as_mut().poll(cx).is_pending() {
                    this.throttled = Some(sleep);
                }
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn busy_polls_are_charged() {
        let usage = GuestUsage::new();
        // Burns 40 ms of this thread's CPU time (not wall time: the machine
        // may be busy with other tests).
        let busy = async {
            let start = thread_cpu_nanos();
            let mut x = 0u64;
            while thread_cpu_nanos() - start < 40_000_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
            x
        };
        Metered::new(busy, usage.clone()).await;
        assert!(usage.cpu_nanos() >= 40_000_000, "{}", usage.cpu_nanos());
        let idle = GuestUsage::new();
        Metered::new(
            tokio::time::sleep(std::time::Duration::from_millis(50)),
            idle.clone(),
        )
        .await;
        assert!(idle.cpu_nanos() < 20_000_000, "{}", idle.cpu_nanos());
    }

    #[tokio::test]
    async fn a_cpu_quota_throttles_a_busy_future() {
        // A future that burns 2 ms per poll and always asks to be polled
        // again, like a guest yielding at epoch ticks, until it has had
        // 60 ms of CPU (counted in CPU, not wall, time: the machine may be
        // busy with other tests).
        struct Busy(u64);
        impl Future for Busy {
            type Output = ();
            fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
                if self.0 >= 60_000_000 {
                    return Poll::Ready(());
                }
                let t = thread_cpu_nanos();
                while thread_cpu_nanos() - t < 2_000_000 {
                    std::hint::black_box(0);
                }
                self.0 += thread_cpu_nanos() - t;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
        let usage = GuestUsage::new();
        // 10 ms per 50 ms: 20% of a core.
        let limits = LiveLimits::new(&crate::model::resources::Resources {
            cpu_quota_us: Some(10_000),
            cpu_period_us: Some(50_000),
            ..Default::default()
        });
        let started = std::time::Instant::now();
        Metered::new(Busy(0), usage.clone())
            .with_limits(limits)
            .await;
        // 60 ms at 10 ms per 50 ms: five periods waited at the least.
        let took = started.elapsed();
        assert!(
            took >= std::time::Duration::from_millis(240),
            "60 ms of CPU under a 20% quota took only {took:?}"
        );
        // It got no more than its share (less when other tests hold the
        // cores: then it may never have needed throttling).
        let share = usage.cpu_nanos() as f64 / took.as_nanos() as f64;
        assert!(
            share <= 0.26,
            "a 20% quota let it use {:.0}% ({} throttles)",
            share * 100.0,
            usage.throttled_periods()
        );
    }
}
