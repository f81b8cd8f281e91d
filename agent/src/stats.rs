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

use crate::limits::{LiveLimits, PodCpu};
use crate::time::Timestamp;

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
}

/// Requests an HTTP function answered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HttpUsage {
    pub requests: u64,
    /// Answered with a 5xx status (the function failed, timed out, or was
    /// busy or stopping).
    pub server_errors: u64,
    /// The sum of the requests' latencies (arrival to response headers).
    pub latency_micros: u64,
}

impl std::iter::Sum for HttpUsage {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::default(), |a, b| Self {
            requests: a.requests + b.requests,
            server_errors: a.server_errors + b.server_errors,
            latency_micros: a.latency_micros + b.latency_micros,
        })
    }
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
    }

    pub fn http(&self) -> HttpUsage {
        HttpUsage {
            requests: self.http_requests.load(Ordering::Relaxed),
            server_errors: self.http_server_errors.load(Ordering::Relaxed),
            latency_micros: self.http_latency_micros.load(Ordering::Relaxed),
        }
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
    period_start: tokio::time::Instant,
    used_in_period: u64,
    throttled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<F> Metered<F> {
    pub fn new(inner: F, usage: Arc<GuestUsage>) -> Self {
        Self {
            inner: Box::pin(inner),
            usage,
            limits: None,
            pod_cpu: Vec::new(),
            period_start: tokio::time::Instant::now(),
            used_in_period: 0,
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
            this.period_start = tokio::time::Instant::now();
            this.used_in_period = 0;
        }
        let start = thread_cpu_nanos();
        let result = this.inner.as_mut().poll(cx);
        let spent = thread_cpu_nanos().saturating_sub(start);
        this.usage.cpu_nanos.fetch_add(spent, Ordering::Relaxed);
        if result.is_pending() {
            let mut resume_at = None;
            if let Some((quota, period)) = this.limits.as_ref().and_then(|l| l.cpu_quota()) {
                let period = std::time::Duration::from_nanos(period);
                if this.period_start.elapsed() >= period {
                    this.period_start = tokio::time::Instant::now();
                    this.used_in_period = 0;
                }
                this.used_in_period += spent;
                if this.used_in_period >= quota {
                    resume_at = Some(this.period_start + period);
                }
            }
            for account in &this.pod_cpu {
                if let Some(until) = account.charge(spent) {
                    resume_at =
                        Some(resume_at.map_or(until, |t: tokio::time::Instant| t.max(until)));
                }
            }
            if let Some(until) = resume_at {
                this.usage.throttled_periods.fetch_add(1, Ordering::Relaxed);
                let mut sleep = Box::pin(tokio::time::sleep_until(until));
                // Register the wake-up now; the guest's own wake is ignored
                // until the period ends.
                if sleep.as_mut().poll(cx).is_ready() {
                    this.period_start = tokio::time::Instant::now();
                    this.used_in_period = 0;
                } else {
                    this.throttled = Some(sleep);
                }
            }
        }
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
    /// CPU periods in which the guest used up its quota.
    pub throttled_periods: u64,
    /// Requests served, for HTTP functions.
    pub http: HttpUsage,
}

/// The shortest interval a CPU rate is measured over. Readers calling more
/// often than this (the kubelet's summary, metrics-server, a `crictl stats`
/// by hand) see the same rate instead of shortening each other's interval,
/// as with cAdvisor's housekeeping samples.
pub const MIN_RATE_INTERVAL_NANOS: i64 = 1_000_000_000;

/// CPU samples of one container or pod, from which `usage_nano_cores` is
/// computed: the rate between the last two samples at least
/// [`MIN_RATE_INTERVAL_NANOS`] apart.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuRate {
    /// The sample before `current`, at least the minimum interval older.
    previous: Option<(Timestamp, u64)>,
    current: Option<(Timestamp, u64)>,
}

fn rate(from: (Timestamp, u64), to: (Timestamp, u64)) -> u64 {
    let (then, now) = (from.0.as_nanos(), to.0.as_nanos());
    if now <= then {
        return 0;
    }
    let wall = now.abs_diff(then) as u128;
    (to.1.saturating_sub(from.1) as u128 * 1_000_000_000 / wall) as u64
}

impl CpuRate {
    /// Takes a reading of `cpu` nanoseconds at `now` and returns the rate
    /// in nanocores (1e9 = one core busy); 0 on the first reading.
    pub fn observe(&mut self, now: Timestamp, cpu: u64) -> u64 {
        let Some(current) = self.current else {
            self.current = Some((now, cpu));
            return 0;
        };
        let since = now.as_nanos().saturating_sub(current.0.as_nanos());
        if since >= MIN_RATE_INTERVAL_NANOS {
            self.previous = Some(current);
            self.current = Some((now, cpu));
            return rate(current, (now, cpu));
        }
        match self.previous {
            Some(previous) => rate(previous, current),
            // Within the first interval: the rate so far, sample kept.
            None => rate(current, (now, cpu)),
        }
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
        // again, like a guest yielding at epoch ticks.
        struct Busy(std::time::Instant);
        impl Future for Busy {
            type Output = ();
            fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
                if self.0.elapsed() > std::time::Duration::from_millis(600) {
                    return Poll::Ready(());
                }
                let t = thread_cpu_nanos();
                while thread_cpu_nanos() - t < 2_000_000 {
                    std::hint::black_box(0);
                }
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
        let usage = GuestUsage::new();
        // 10 ms per 50 ms: 20% of a core.
        let limits = LiveLimits::new(&crate::container::Resources {
            cpu_quota_us: Some(10_000),
            cpu_period_us: Some(50_000),
            ..Default::default()
        });
        Metered::new(Busy(std::time::Instant::now()), usage.clone())
            .with_limits(limits)
            .await;
        let cpu = usage.cpu_nanos();
        assert!(
            cpu < 300_000_000,
            "throttled future used {cpu} ns in 600 ms"
        );
        assert!(usage.throttled_periods() > 3);
    }

    #[test]
    fn rate_over_the_interval_is_not_shortened_by_frequent_readers() {
        let at = |ms: i64| Timestamp::from_nanos(ms * 1_000_000);
        let mut r = CpuRate::default();
        assert_eq!(r.observe(at(1_000), 0), 0);
        // Half a core over the first 500 ms: a rate so far.
        assert_eq!(r.observe(at(1_500), 250_000_000), 500_000_000);
        // Half a core over two seconds: a full interval.
        assert_eq!(r.observe(at(3_000), 1_000_000_000), 500_000_000);
        // A reader 10 ms later sees that interval's rate, not its own
        // 10 ms window (which would read a full core).
        assert_eq!(r.observe(at(3_010), 1_010_000_000), 500_000_000);
        // A second later a new interval: a whole core busy.
        assert_eq!(r.observe(at(4_000), 2_000_000_000), 1_000_000_000);
    }
}
