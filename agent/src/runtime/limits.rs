//! Memory limits, enforced inside wasmtime: every linear memory and table a
//! guest allocates or grows is charged to its container and, when the pod
//! has a limit of its own, to its pod. Growth past a limit fails as the Wasm
//! spec allows (`memory.grow` returns -1); a guest that dies of it is
//! reported `OOMKilled`, as the kubelet expects.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use crate::model::resources::Resources;
use crate::runtime::node_memory::{GuestAccount, NodeMemory, Refused};
use crate::runtime::usage::GuestUsage;

/// The most instances one store may hold (a component instantiates a few
/// core instances; a module one).
pub const MAX_INSTANCES: usize = 1_000;
/// The most tables and memories one store may hold.
pub const MAX_TABLES: usize = 1_000;
pub const MAX_MEMORIES: usize = 100;
/// The most elements one table may have, whatever the memory limit.
pub const MAX_TABLE_ELEMENTS: usize = 10_000_000;
/// What a table element is charged (a pointer).
const TABLE_ELEMENT_BYTES: u64 = 8;

/// A pod's shared memory account. Its limit follows the pod's resources
/// (UpdatePodSandboxResources changes it while the pod runs).
#[derive(Debug, Default)]
pub struct PodMemory {
    /// Zero: no pod-level limit.
    limit: AtomicU64,
    used: AtomicU64,
}

impl PodMemory {
    pub fn new(limit: Option<u64>) -> Arc<Self> {
        Arc::new(Self {
            limit: AtomicU64::new(limit.unwrap_or(0)),
            used: AtomicU64::new(0),
        })
    }

    /// Changes the limit; growth from now on is held to it (what the pod
    /// already holds stays, as a cgroup's usage above a lowered limit).
    pub fn set_limit(&self, limit: Option<u64>) {
        self.limit.store(limit.unwrap_or(0), Ordering::Release);
    }

    /// Bytes charged to the pod now.
    #[cfg(test)]
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn try_charge(&self, bytes: u64) -> bool {
        let Some(limit) = Some(self.limit.load(Ordering::Acquire)).filter(|l| *l > 0) else {
            self.used.fetch_add(bytes, Ordering::Relaxed);
            return true;
        };
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= limit)
            })
            .is_ok()
    }

    fn release(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(bytes))
            });
    }
}

/// A container's limits that may change while it runs
/// (`UpdateContainerResources`). Zero means unlimited.
#[derive(Debug, Default)]
pub struct LiveLimits {
    memory_bytes: AtomicU64,
    cpu_quota_us: AtomicU64,
    cpu_period_us: AtomicU64,
    cpu_shares: AtomicU64,
    oom_score_adj: AtomicI64,
}

/// The longest a guest runs before yielding, in epoch ticks.
pub const MAX_YIELD_TICKS: u64 = 8;

/// The CFS default period.
pub const DEFAULT_CPU_PERIOD_US: u64 = 100_000;

impl LiveLimits {
    pub fn new(resources: &Resources) -> Arc<Self> {
        let live = Arc::new(Self::default());
        live.set(resources);
        live
    }

    pub fn set(&self, r: &Resources) {
        self.memory_bytes
            .store(r.memory_limit_bytes.unwrap_or(0), Ordering::Relaxed);
        self.cpu_quota_us
            .store(r.cpu_quota_us.unwrap_or(0), Ordering::Relaxed);
        self.cpu_period_us
            .store(r.cpu_period_us.unwrap_or(0), Ordering::Relaxed);
        self.cpu_shares
            .store(r.cpu_shares.unwrap_or(0), Ordering::Relaxed);
        self.oom_score_adj
            .store(r.oom_score_adj.clamp(-1000, 1000), Ordering::Relaxed);
    }

    /// The container's OOM score adjustment (its rank for the node guard).
    pub fn oom_score_adj(&self) -> i64 {
        self.oom_score_adj.load(Ordering::Relaxed)
    }

    /// How many epoch ticks the guest runs before it yields to others:
    /// `cpu_shares` weight busy guests against each other, 1024 shares (the
    /// kubelet's value for one CPU requested) being one tick, up to
    /// [`MAX_YIELD_TICKS`].
    pub fn yield_ticks(&self) -> u64 {
        (self.cpu_shares.load(Ordering::Relaxed) / 1024).clamp(1, MAX_YIELD_TICKS)
    }

    pub fn memory_limit(&self) -> Option<u64> {
        Some(self.memory_bytes.load(Ordering::Relaxed)).filter(|b| *b > 0)
    }

    /// CPU time allowed per period, and the period, in nanoseconds; `None`
    /// when the CPU is not limited.
    pub fn cpu_quota(&self) -> Option<(u64, u64)> {
        let quota = self.cpu_quota_us.load(Ordering::Relaxed);
        if quota == 0 {
            return None;
        }
        let period = match self.cpu_period_us.load(Ordering::Relaxed) {
            0 => DEFAULT_CPU_PERIOD_US,
            p => p,
        };
        Some(cfs_nanos(quota, period))
    }
}

/// CPU time charged against a quota per period, what went over carried
/// into the next periods, as CFS carries a runtime overrun: however late
/// the epoch tick stops a guest past its quota, its share over time stays
/// at the quota (without the carry a 10% quota measured 13–15%).
#[derive(Debug)]
pub struct CpuBudget {
    period_start: tokio::time::Instant,
    used: u64,
}

impl Default for CpuBudget {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuBudget {
    pub fn new() -> Self {
        Self {
            period_start: tokio::time::Instant::now(),
            used: 0,
        }
    }

    /// Charges `spent` nanoseconds against `quota` nanoseconds per
    /// `period` nanoseconds; returns when the guest may run again when it
    /// has used its quota (every period begun since pays a quota's worth).
    pub fn charge(&mut self, spent: u64, quota: u64, period: u64) -> Option<tokio::time::Instant> {
        self.charge_at(tokio::time::Instant::now(), spent, quota, period)
    }

    fn charge_at(
        &mut self,
        now: tokio::time::Instant,
        spent: u64,
        quota: u64,
        period: u64,
    ) -> Option<tokio::time::Instant> {
        let (quota, period) = (quota.max(1), period.max(1));
        let elapsed = u64::try_from(now.saturating_duration_since(self.period_start).as_nanos())
            .unwrap_or(u64::MAX);
        if elapsed >= period {
            let periods = elapsed / period;
            self.used = self.used.saturating_sub(periods.saturating_mul(quota));
            self.period_start += std::time::Duration::from_nanos(periods * period);
        }
        self.used = self.used.saturating_add(spent);
        if self.used < quota {
            return None;
        }
        // Until enough periods have paid for what was used.
        let owed = (self.used / quota).min(1_000);
        Some(self.period_start + std::time::Duration::from_nanos(owed.saturating_mul(period)))
    }
}

/// A CFS quota and period in microseconds as nanoseconds, held to the
/// ranges the kernel accepts (a period of 1 ms to 1 s, a quota of at least
/// 1 ms), whatever a request said.
fn cfs_nanos(quota_us: u64, period_us: u64) -> (u64, u64) {
    (
        quota_us.max(1_000).saturating_mul(1_000),
        period_us.clamp(1_000, 1_000_000) * 1_000,
    )
}

/// A shared CPU account: a pod-level quota (`linux.resources` of the
/// sandbox), whose containers' CPU time is summed per period, or an HTTP
/// function's own quota, summed over its concurrent instances. The quota
/// is read live: a container's follows UpdateContainerResources, a pod's
/// UpdatePodSandboxResources.
#[derive(Debug)]
pub struct PodCpu {
    live: Arc<LiveLimits>,
    budget: std::sync::Mutex<CpuBudget>,
}

impl PodCpu {
    /// A pod's account, following its quota (none while it has none).
    pub fn for_pod(r: &Resources) -> Arc<Self> {
        Self::following(LiveLimits::new(r))
    }

    /// Changes a pod's quota.
    pub fn set(&self, r: &Resources) {
        self.live.set(r);
    }

    /// An account following a container's live quota (none while it has
    /// none).
    pub fn following(live: Arc<LiveLimits>) -> Arc<Self> {
        Arc::new(Self {
            live,
            budget: std::sync::Mutex::new(CpuBudget::new()),
        })
    }

    /// Charges `spent` nanoseconds; returns when the pod may run again if
    /// it has used its quota for this period.
    pub fn charge(&self, spent: u64) -> Option<tokio::time::Instant> {
        let (quota_ns, period_ns) = self.live.cpu_quota()?;
        self.budget
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .charge(spent, quota_ns, period_ns)
    }
}

/// One guest's limiter, kept in its store. An HTTP function's instances
/// (one per request) have one each, made with [`MemoryLimiter::sibling`]:
/// the container's limit then caps their sum.
pub struct MemoryLimiter {
    live: Arc<LiveLimits>,
    pod: Arc<PodMemory>,
    /// This store's charged bytes.
    used: u64,
    /// The container's run on the node: the sum over its siblings.
    account: Arc<GuestAccount>,
    oom: Arc<AtomicBool>,
    usage: Option<Arc<GuestUsage>>,
}

impl MemoryLimiter {
    /// A limiter charging `limit` (if any) and `pod`.
    #[cfg(test)]
    pub fn new(limit: Option<u64>, pod: Arc<PodMemory>) -> Self {
        let resources = Resources {
            memory_limit_bytes: limit,
            ..Default::default()
        };
        Self::live(LiveLimits::new(&resources), pod, &NodeMemory::unlimited())
    }

    /// The live limits this limiter follows.
    pub fn live_limits(&self) -> Arc<LiveLimits> {
        self.live.clone()
    }

    /// A limiter whose container limit follows `live` (updated while the
    /// guest runs), charging `pod` and `node`.
    pub fn live(live: Arc<LiveLimits>, pod: Arc<PodMemory>, node: &Arc<NodeMemory>) -> Self {
        Self {
            account: node.account(live.clone()),
            live,
            pod,
            used: 0,
            oom: Arc::new(AtomicBool::new(false)),
            usage: None,
        }
    }

    /// A limiter for another store of the same container, charging the
    /// same container and pod accounts (and reporting to the same usage).
    pub fn sibling(&self) -> Self {
        Self {
            live: self.live.clone(),
            pod: self.pod.clone(),
            used: 0,
            account: self.account.clone(),
            oom: self.oom.clone(),
            usage: self.usage.clone(),
        }
    }

    /// Like [`MemoryLimiter::sibling`], with an OOM flag of its own: an
    /// exec'd instance that hits the limit fails alone, and the container
    /// is not reported OOMKilled for it.
    pub fn sibling_with_own_oom(&self) -> Self {
        Self {
            live: self.live.clone(),
            pod: self.pod.clone(),
            used: 0,
            account: self.account.clone(),
            oom: Arc::new(AtomicBool::new(false)),
            usage: self.usage.clone(),
        }
    }

    /// Also report the guest's committed memory to `usage` (for stats).
    pub fn with_usage(mut self, usage: Arc<GuestUsage>) -> Self {
        self.usage = Some(usage);
        self
    }

    /// The container's own limit.
    pub fn limit(&self) -> Option<u64> {
        self.live.memory_limit()
    }

    /// Set once growth was refused for a limit; the guest's end is then
    /// reported as OOMKilled.
    pub fn oom_flag(&self) -> Arc<AtomicBool> {
        self.oom.clone()
    }

    /// The container run's account with the node (to end it when the
    /// node is short of memory).
    pub fn account(&self) -> Arc<GuestAccount> {
        self.account.clone()
    }

    fn charge(&mut self, bytes: u64) -> bool {
        // The pod first: the node ends no one for growth its pod refuses.
        if !self.pod.try_charge(bytes) {
            self.oom.store(true, Ordering::Relaxed);
            return false;
        }
        if let Err(refused) = self.account.charge(bytes, self.limit()) {
            self.pod.release(bytes);
            if refused == Refused::Node {
                self.account.note_node_short();
            }
            self.oom.store(true, Ordering::Relaxed);
            return false;
        }
        self.used += bytes;
        if let Some(usage) = &self.usage {
            usage.add_memory(bytes);
        }
        true
    }
}

impl Drop for MemoryLimiter {
    fn drop(&mut self) {
        self.pod.release(self.used);
        self.account.release(self.used);
        if let Some(usage) = &self.usage {
            usage.sub_memory(self.used);
        }
    }
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(self.charge(desired.saturating_sub(current) as u64))
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > MAX_TABLE_ELEMENTS {
            return Ok(false);
        }
        Ok(self.charge(desired.saturating_sub(current) as u64 * TABLE_ELEMENT_BYTES))
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
}

/// Returns the heap's free pages to the kernel (glibc's `malloc_trim`):
/// after many guests end, their freed allocations would otherwise stay in
/// the allocator's arenas, counted in the agent's RSS.
#[allow(unsafe_code)]
pub fn release_free_heap() {
    // SAFETY: malloc_trim only walks glibc's own arenas under their locks
    // and madvises free pages away; it takes no pointers from us.
    let released = unsafe { libc::malloc_trim(0) };
    tracing::debug!(released = released != 0, "returned free heap to the kernel");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overruns_are_carried_so_the_share_holds_at_the_quota() {
        let ms = 1_000_000u64;
        let start = tokio::time::Instant::now();
        let at = |t: u64| start + std::time::Duration::from_nanos(t);
        let mut budget = CpuBudget {
            period_start: start,
            used: 0,
        };
        // 10 ms per 100 ms; the guest is stopped only at 12 ms (a late tick).
        assert_eq!(budget.charge_at(at(0), 6 * ms, 10 * ms, 100 * ms), None);
        assert_eq!(
            budget.charge_at(at(6 * ms), 6 * ms, 10 * ms, 100 * ms),
            Some(at(100 * ms))
        );
        // The next period starts 2 ms in debt: 8 ms, not 10, until throttled.
        assert_eq!(
            budget.charge_at(at(100 * ms), 7 * ms, 10 * ms, 100 * ms),
            None
        );
        assert_eq!(
            budget.charge_at(at(107 * ms), ms, 10 * ms, 100 * ms),
            Some(at(200 * ms))
        );
        // A long overrun waits for as many periods as it used.
        assert_eq!(
            budget.charge_at(at(200 * ms), 35 * ms, 10 * ms, 100 * ms),
            Some(at(500 * ms))
        );
        // Idle periods pay debt but never bank credit.
        assert_eq!(
            budget.charge_at(at(2_000 * ms), 9 * ms, 10 * ms, 100 * ms),
            None
        );
        assert_eq!(
            budget.charge_at(at(2_009 * ms), 2 * ms, 10 * ms, 100 * ms),
            Some(at(2_100 * ms))
        );
    }
    use wasmtime::ResourceLimiter;

    #[tokio::test]
    async fn a_live_cpu_account_follows_the_containers_current_quota() {
        let live = LiveLimits::new(&Resources::default());
        let account = PodCpu::following(live.clone());
        // No quota: never throttled.
        assert!(account.charge(10_000_000_000).is_none());
        live.set(&Resources {
            cpu_quota_us: Some(10_000),
            cpu_period_us: Some(1_000_000),
            ..Default::default()
        });
        assert!(account.charge(5_000_000).is_none());
        assert!(account.charge(5_000_000).is_some(), "10 ms of 10 ms used");
        live.set(&Resources::default());
        assert!(
            account.charge(1_000_000_000).is_none(),
            "the quota was lifted"
        );
    }

    #[test]
    fn container_and_pod_limits_both_hold_and_are_released() {
        let pod = PodMemory::new(Some(100));
        let mut a = MemoryLimiter::new(Some(60), pod.clone());
        let mut b = MemoryLimiter::new(None, pod.clone());
        assert!(a.memory_growing(0, 50, None).unwrap());
        assert!(!a.memory_growing(50, 70, None).unwrap(), "container limit");
        assert!(a.oom_flag().load(Ordering::Relaxed));
        assert!(b.memory_growing(0, 50, None).unwrap());
        assert!(!b.memory_growing(50, 51, None).unwrap(), "pod limit");
        assert_eq!(pod.used(), 100);
        drop(a);
        assert_eq!(pod.used(), 50);
        assert!(b.memory_growing(50, 90, None).unwrap());
        drop(b);
        assert_eq!(pod.used(), 0);
    }

    #[test]
    fn siblings_share_the_container_limit() {
        let pod = PodMemory::new(None);
        let usage = GuestUsage::new();
        let mut a = MemoryLimiter::new(Some(100), pod.clone()).with_usage(usage.clone());
        let mut b = a.sibling();
        assert!(a.memory_growing(0, 60, None).unwrap());
        assert!(!b.memory_growing(0, 50, None).unwrap(), "60 + 50 > 100");
        assert!(b.memory_growing(0, 40, None).unwrap());
        assert_eq!(usage.memory_bytes(), 100);
        drop(a);
        assert_eq!(usage.memory_bytes(), 40);
        assert!(b.memory_growing(40, 100, None).unwrap());
        drop(b);
        assert_eq!(usage.memory_bytes(), 0);
        assert_eq!(pod.used(), 0);
    }

    #[test]
    fn shares_become_yield_ticks() {
        let ticks = |shares| {
            LiveLimits::new(&Resources {
                cpu_shares: shares,
                ..Default::default()
            })
            .yield_ticks()
        };
        assert_eq!(ticks(None), 1);
        assert_eq!(ticks(Some(2)), 1);
        assert_eq!(ticks(Some(2048)), 2);
        assert_eq!(ticks(Some(1 << 20)), MAX_YIELD_TICKS);
    }

    #[test]
    fn tables_count_and_are_capped() {
        let pod = PodMemory::new(None);
        let mut l = MemoryLimiter::new(Some(80), pod);
        assert!(l.table_growing(0, 10, None).unwrap());
        assert!(!l.table_growing(10, 11, None).unwrap());
        let mut unlimited = MemoryLimiter::new(None, PodMemory::new(None));
        assert!(
            !unlimited
                .table_growing(0, MAX_TABLE_ELEMENTS + 1, None)
                .unwrap()
        );
    }
}
