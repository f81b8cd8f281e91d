//! The node memory guard. Every guest's memory lives in the agent's one
//! process, so the kernel's OOM killer cannot tell one tenant from another:
//! left to it, one pod without a limit would take every pod on the node
//! with it. The guard keeps the sum of committed guest memory (linear
//! memories and tables, as the limits charge them) under a node budget,
//! and when growth would cross it chooses the guest to end as the kernel
//! and the kubelet would choose the process: the highest `oom_score_adj`
//! the kubelet gave (BestEffort 1000, Burstable 2–999, Guaranteed -997),
//! the largest of those first. That guest ends `OOMKilled`; the one that
//! asked grows. When the one that asked is itself the one to end, its
//! growth fails as at a limit.
//!
//! A guest chosen to end still holds its memory for the moment it takes to
//! stop (at its next epoch tick); growth of others is let through against
//! what it will give back, so the budget is exceeded for that moment only
//! by memory already on its way out.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use crate::runtime::limits::LiveLimits;

/// How a guest chosen to end is ended (its run's kill, as OOMKilled).
pub type Ender = Box<dyn Fn() + Send + Sync>;

/// The node's account of committed guest memory.
pub struct NodeMemory {
    /// `None`: no budget (only the per-container and per-pod limits hold).
    budget: Option<u64>,
    used: AtomicU64,
    guests: Mutex<Vec<Weak<GuestAccount>>>,
    /// Guests ended for the node so far.
    kills: AtomicU64,
}

impl std::fmt::Debug for NodeMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeMemory")
            .field("budget", &self.budget)
            .field("used", &self.used())
            .finish()
    }
}

impl NodeMemory {
    pub fn new(budget: Option<u64>) -> Arc<Self> {
        Arc::new(Self {
            budget,
            used: AtomicU64::new(0),
            guests: Mutex::new(Vec::new()),
            kills: AtomicU64::new(0),
        })
    }

    /// A node without a budget.
    #[cfg(test)]
    pub fn unlimited() -> Arc<Self> {
        Self::new(None)
    }

    pub fn budget(&self) -> Option<u64> {
        self.budget
    }

    /// Committed guest memory on the node now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Guests ended because the node was short of memory.
    pub fn kills(&self) -> u64 {
        self.kills.load(Ordering::Relaxed)
    }

    /// Opens the account of one container's run (shared by its instances).
    pub fn account(self: &Arc<Self>, live: Arc<LiveLimits>) -> Arc<GuestAccount> {
        let account = Arc::new(GuestAccount {
            node: self.clone(),
            live,
            used: AtomicU64::new(0),
            doomed: AtomicBool::new(false),
            node_short: AtomicBool::new(false),
            ender: OnceLock::new(),
        });
        let mut guests = self.guests();
        guests.retain(|g| g.strong_count() > 0);
        guests.push(Arc::downgrade(&account));
        account
    }

    fn guests(&self) -> std::sync::MutexGuard<'_, Vec<Weak<GuestAccount>>> {
        self.guests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Charges `bytes` for `asking`; ends others to make room if they rank
    /// before it. `false`: the growth must fail.
    fn charge(&self, asking: &Arc<GuestAccount>, bytes: u64) -> bool {
        let Some(budget) = self.budget else {
            self.used.fetch_add(bytes, Ordering::AcqRel);
            return true;
        };
        let fits = |limit: u64| {
            self.used
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                    used.checked_add(bytes).filter(|total| *total <= limit)
                })
                .is_ok()
        };
        if fits(budget) {
            return true;
        }
        let guests = self.guests();
        loop {
            let live: Vec<Arc<GuestAccount>> = guests.iter().filter_map(Weak::upgrade).collect();
            // What guests already ending still hold, and will give back.
            let leaving: u64 = live
                .iter()
                .filter(|g| g.doomed.load(Ordering::Acquire))
                .map(|g| g.used())
                .sum();
            if fits(budget.saturating_add(leaving)) {
                return true;
            }
            let victim = live
                .iter()
                .filter(|g| {
                    Arc::ptr_eq(g, asking)
                        || (!g.doomed.load(Ordering::Acquire) && g.ender.get().is_some())
                })
                .max_by_key(|g| (g.live.oom_score_adj(), g.used(), Arc::ptr_eq(g, asking)));
            match victim {
                Some(victim) if !Arc::ptr_eq(victim, asking) => {
                    victim.doomed.store(true, Ordering::Release);
                    victim.note_node_short();
                    self.kills.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        budget,
                        used = self.used(),
                        victim_bytes = victim.used(),
                        oom_score_adj = victim.live.oom_score_adj(),
                        "node memory budget reached: ending a guest"
                    );
                    if let Some(end) = victim.ender.get() {
                        end();
                    }
                }
                // The one asking ranks first (or none can be ended).
                _ => return false,
            }
        }
    }

    fn release(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(bytes))
            });
    }
}

/// One container run's memory on the node: the sum over its instances
/// (an HTTP function's per-request instances, exec'd ones), its rank, and
/// how to end it.
pub struct GuestAccount {
    node: Arc<NodeMemory>,
    live: Arc<LiveLimits>,
    used: AtomicU64,
    /// Chosen to end for the node; it may not grow any more.
    doomed: AtomicBool,
    /// The node refused it growth, or chose it to end.
    node_short: AtomicBool,
    /// Set once the guest runs (a guest still instantiating cannot be
    /// chosen for others, only refused).
    ender: OnceLock<Ender>,
}

impl std::fmt::Debug for GuestAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestAccount")
            .field("used", &self.used())
            .field("doomed", &self.doomed())
            .finish()
    }
}

impl GuestAccount {
    /// The run's committed memory (all its instances).
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Whether the node chose this guest to end.
    pub fn doomed(&self) -> bool {
        self.doomed.load(Ordering::Acquire)
    }

    /// Whether the guest was refused growth or ended for the node's
    /// budget (rather than its own or its pod's limit).
    pub fn node_short(&self) -> bool {
        self.node_short.load(Ordering::Acquire)
    }

    pub(crate) fn note_node_short(&self) {
        self.node_short.store(true, Ordering::Release);
    }

    /// How to end this guest when the node chooses it (once).
    pub fn set_ender(&self, end: Ender) {
        let _ = self.ender.set(end);
    }

    /// Charges `bytes` to the run, held to `limit`, then to the node.
    /// Refused for the limit or for the node (this guest ranked first).
    pub fn charge(self: &Arc<Self>, bytes: u64, limit: Option<u64>) -> Result<(), Refused> {
        if self.doomed() {
            return Err(Refused::Node);
        }
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                let total = used.saturating_add(bytes);
                limit.is_none_or(|l| total <= l).then_some(total)
            })
            .map_err(|_| Refused::Limit)?;
        if !self.node.charge(self, bytes) {
            self.used.fetch_sub(bytes, Ordering::AcqRel);
            return Err(Refused::Node);
        }
        Ok(())
    }

    /// Gives back `bytes` charged by [`GuestAccount::charge`].
    pub fn release(&self, bytes: u64) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
        self.node.release(bytes);
    }
}

/// Why growth was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The container's own limit.
    Limit,
    /// The node's budget (this guest ranked first to end).
    Node,
}

/// The budget when the configuration names none: `share_percent` of what
/// the agent may have (the node's MemTotal, or its own cgroup's memory
/// limit when lower, e.g. systemd's `MemoryMax`), less `reserve` for the
/// agent itself, the kubelet and the system.
pub fn default_budget(share_percent: u64, reserve: u64) -> Option<u64> {
    let total = mem_total()?;
    let available = cgroup_limit().map_or(total, |limit| limit.min(total));
    let share = u64::try_from(u128::from(available) * u128::from(share_percent.min(100)) / 100)
        .unwrap_or(u64::MAX);
    Some(share.saturating_sub(reserve))
}

/// MemTotal from /proc/meminfo, in bytes.
fn mem_total() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_total(&meminfo)
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line
        .trim_start_matches("MemTotal:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

/// The memory limit of the agent's own cgroup (v2 `memory.max`, v1
/// `memory.limit_in_bytes`); `None` when it has none.
fn cgroup_limit() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_start_matches('/');
        let file = if controllers.is_empty() {
            std::path::Path::new("/sys/fs/cgroup")
                .join(path)
                .join("memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            std::path::Path::new("/sys/fs/cgroup/memory")
                .join(path)
                .join("memory.limit_in_bytes")
        } else {
            continue;
        };
        if let Some(limit) = std::fs::read_to_string(&file)
            .ok()
            .and_then(|v| parse_cgroup_limit(&v))
        {
            return Some(limit);
        }
    }
    None
}

/// A cgroup memory limit file's value; `max` and v1's "unlimited" (a
/// page-rounded i64::MAX) are no limit.
fn parse_cgroup_limit(value: &str) -> Option<u64> {
    let limit: u64 = value.trim().parse().ok()?;
    (limit < (1 << 62)).then_some(limit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::resources::Resources;
    use std::sync::atomic::AtomicUsize;

    fn guest(node: &Arc<NodeMemory>, adj: i64) -> (Arc<GuestAccount>, Arc<AtomicUsize>) {
        let live = LiveLimits::new(&Resources {
            oom_score_adj: adj,
            ..Default::default()
        });
        let account = node.account(live);
        let ended = Arc::new(AtomicUsize::new(0));
        let count = ended.clone();
        account.set_ender(Box::new(move || {
            count.fetch_add(1, Ordering::Relaxed);
        }));
        (account, ended)
    }

    #[test]
    fn best_effort_ends_before_burstable_before_guaranteed_largest_first() {
        let node = NodeMemory::new(Some(100));
        let (guaranteed, g_ended) = guest(&node, -997);
        let (burstable, b_ended) = guest(&node, 500);
        let (small_bomb, s_ended) = guest(&node, 1000);
        let (big_bomb, bb_ended) = guest(&node, 1000);
        guaranteed.charge(20, Some(50)).unwrap();
        burstable.charge(20, None).unwrap();
        small_bomb.charge(10, None).unwrap();
        big_bomb.charge(50, None).unwrap();
        assert_eq!(node.used(), 100);
        // The Guaranteed guest grows: the largest BestEffort guest ends.
        guaranteed.charge(10, Some(50)).unwrap();
        assert_eq!(bb_ended.load(Ordering::Relaxed), 1);
        assert!(big_bomb.doomed());
        assert_eq!(node.used(), 110, "over only by what is leaving");
        // A doomed guest may not grow.
        assert_eq!(big_bomb.charge(1, None), Err(Refused::Node));
        // It gives its memory back; the next growth ends the small bomb,
        // then the Burstable guest, never the Guaranteed one.
        big_bomb.release(50);
        assert_eq!(node.used(), 60);
        guaranteed.charge(20, None).unwrap();
        burstable.charge(20, None).unwrap();
        assert_eq!(node.used(), 100);
        guaranteed.charge(5, None).unwrap();
        assert_eq!(s_ended.load(Ordering::Relaxed), 1);
        small_bomb.release(10);
        burstable.charge(5, None).unwrap();
        assert_eq!(node.used(), 100);
        guaranteed.charge(1, None).unwrap();
        assert_eq!(b_ended.load(Ordering::Relaxed), 1, "the Burstable one ends");
        assert_eq!(g_ended.load(Ordering::Relaxed), 0);
        assert_eq!(node.kills(), 3);
    }

    #[test]
    fn the_guest_that_ranks_first_is_refused_itself() {
        let node = NodeMemory::new(Some(100));
        let (guaranteed, g_ended) = guest(&node, -997);
        let (bomb, bomb_ended) = guest(&node, 1000);
        guaranteed.charge(30, None).unwrap();
        bomb.charge(70, None).unwrap();
        assert_eq!(bomb.charge(1, None), Err(Refused::Node));
        assert_eq!(bomb_ended.load(Ordering::Relaxed), 0);
        assert_eq!(g_ended.load(Ordering::Relaxed), 0);
        assert!(!bomb.doomed(), "refused, not ended: it may handle it");
        // Its own limit is told apart from the node's budget.
        assert_eq!(guaranteed.charge(21, Some(50)), Err(Refused::Limit));
        assert_eq!(node.used(), 100);
    }

    #[test]
    fn a_guest_not_yet_running_is_never_chosen_for_another() {
        let node = NodeMemory::new(Some(100));
        let starting = node.account(LiveLimits::new(&Resources {
            oom_score_adj: 1000,
            ..Default::default()
        }));
        let (guaranteed, _) = guest(&node, -997);
        starting.charge(90, None).unwrap();
        guaranteed.charge(10, None).unwrap();
        assert_eq!(guaranteed.charge(1, None), Err(Refused::Node));
        assert!(!starting.doomed());
        drop(starting);
        assert_eq!(node.used(), 100, "released by its limiter, not by drop");
    }

    #[test]
    fn no_budget_counts_without_refusing() {
        let node = NodeMemory::unlimited();
        let (a, _) = guest(&node, 1000);
        a.charge(u64::MAX / 2, None).unwrap();
        assert_eq!(node.used(), u64::MAX / 2);
        a.release(u64::MAX / 2);
        assert_eq!(node.used(), 0);
    }

    #[test]
    fn meminfo_and_cgroup_limits_parse() {
        assert_eq!(
            parse_mem_total("MemTotal:       24576000 kB\nMemFree: 1 kB\n"),
            Some(24_576_000 * 1024)
        );
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_cgroup_limit("8589934592\n"), Some(8 << 30));
        assert_eq!(parse_cgroup_limit("max\n"), None);
        assert_eq!(parse_cgroup_limit("9223372036854771712\n"), None);
        let budget = default_budget(90, 1 << 30).unwrap();
        assert!(budget > 0 && budget < mem_total().unwrap());
    }
}
