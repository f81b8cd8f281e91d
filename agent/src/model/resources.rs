//! The resource limits the kubelet sets on a container or a pod (Linux
//! container resources), as stored with their spec.

use serde::{Deserialize, Serialize};

/// Resource limits, as the kubelet gives them (Linux container resources).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// Caps the sum of the guest's linear memories and tables.
    pub memory_limit_bytes: Option<u64>,
    /// CPU time allowed per period (CFS quota), in microseconds.
    #[serde(default)]
    pub cpu_quota_us: Option<u64>,
    /// The CFS period, in microseconds (default 100 ms).
    #[serde(default)]
    pub cpu_period_us: Option<u64>,
    /// Relative CPU weight of busy guests (see `LiveLimits::yield_ticks`).
    #[serde(default)]
    pub cpu_shares: Option<u64>,
    /// The OOM score the kubelet gives the container by its QoS class
    /// (BestEffort 1000, Burstable 2–999, Guaranteed -997): the node
    /// memory guard ends the highest first.
    #[serde(default)]
    pub oom_score_adj: i64,
}
