//! Readings of a container's or a pod's resource use, as the kubelet's CRI
//! stats report them, and the CPU rate computed from successive readings.

use crate::model::time::Timestamp;

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
