//! Resource use of containers and pods, as the CRI stats calls report it.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Agent, ContainerEntry, lock, read};
use crate::error::Result;
use crate::metrics::{ContainerSample, HttpSample, PodLabels, PodSample, Snapshot};
use crate::model::container::{ContainerFilter, ContainerRecord, ContainerState};
use crate::model::ids::{ContainerId, SandboxId};
use crate::model::sandbox::{SandboxFilter, SandboxRecord, SandboxState};
use crate::model::time::Timestamp;
use crate::model::usage::Usage;
use crate::runtime::usage::INSTANCE_OVERHEAD_BYTES;

/// A container's record with its resource use.
#[derive(Clone, Debug)]
pub struct ContainerUsage {
    pub record: ContainerRecord,
    pub usage: Usage,
}

/// A pod's record with its resource use and its containers'.
#[derive(Clone, Debug)]
pub struct PodUsage {
    pub record: SandboxRecord,
    pub usage: Usage,
    pub containers: Vec<ContainerUsage>,
}

impl Agent {
    fn usage_of(&self, entry: &ContainerEntry) -> ContainerUsage {
        let record = entry.snapshot();
        let now = Timestamp::now();
        let guest = entry.usage();
        let cpu = guest.as_ref().map_or(0, |u| u.cpu_nanos());
        let running = record.state.is_running();
        let memory = guest.as_ref().map_or(0, |u| u.memory_bytes());
        let working_set = if running {
            memory + INSTANCE_OVERHEAD_BYTES
        } else {
            0
        };
        let nano_cores = lock(&entry.cpu_rate).observe(now, cpu);
        let available = record
            .spec
            .resources
            .memory_limit_bytes
            .map(|l| l.saturating_sub(working_set));
        ContainerUsage {
            record,
            usage: Usage {
                timestamp: now,
                cpu_nanos: cpu,
                nano_cores,
                working_set_bytes: working_set,
                available_bytes: available,
                running,
                throttled_periods: guest.as_ref().map_or(0, |u| u.throttled_periods()),
                http: guest.as_ref().map(|u| u.http()).unwrap_or_default(),
            },
        }
    }

    /// Resource use of one container.
    pub fn container_stats(&self, id: &ContainerId) -> Result<ContainerUsage> {
        let entry = self.container(id)?;
        Ok(self.usage_of(&entry))
    }

    /// Resource use of the containers matching `filter`.
    pub fn list_container_stats(&self, filter: &ContainerFilter) -> Vec<ContainerUsage> {
        let entries: Vec<Arc<ContainerEntry>> =
            read(&self.inner.containers).values().cloned().collect();
        let mut out: Vec<ContainerUsage> = entries
            .iter()
            .filter(|e| filter.matches(&lock(&e.record)))
            .map(|e| self.usage_of(e))
            .collect();
        out.sort_by_key(|c| c.record.created_at);
        out
    }

    fn pod_usage(&self, sandbox: SandboxRecord) -> PodUsage {
        let entries = self.containers_of(&sandbox.id);
        self.pod_usage_of(sandbox, &entries)
    }

    /// A pod's usage from its containers' entries.
    fn pod_usage_of(&self, sandbox: SandboxRecord, entries: &[Arc<ContainerEntry>]) -> PodUsage {
        let containers: Vec<ContainerUsage> = entries.iter().map(|e| self.usage_of(e)).collect();
        let now = Timestamp::now();
        let cpu: u64 = containers.iter().map(|c| c.usage.cpu_nanos).sum();
        let working_set: u64 = containers.iter().map(|c| c.usage.working_set_bytes).sum();
        let nano_cores = {
            let mut samples = lock(&self.inner.pod_samples);
            samples
                .entry(sandbox.id.clone())
                .or_default()
                .observe(now, cpu)
        };
        let limit = sandbox.spec.resources.memory_limit_bytes;
        PodUsage {
            usage: Usage {
                timestamp: now,
                cpu_nanos: cpu,
                nano_cores,
                working_set_bytes: working_set,
                available_bytes: limit.map(|l| l.saturating_sub(working_set)),
                running: containers.iter().any(|c| c.usage.running),
                throttled_periods: containers.iter().map(|c| c.usage.throttled_periods).sum(),
                http: containers.iter().map(|c| c.usage.http).sum(),
            },
            record: sandbox,
            containers,
        }
    }

    /// Resource use of a pod and its containers.
    pub fn pod_sandbox_stats(&self, id: &SandboxId) -> Result<PodUsage> {
        Ok(self.pod_usage(self.pod_sandbox_status(id)?))
    }

    /// Resource use of the pods matching `filter`.
    pub fn list_pod_sandbox_stats(&self, filter: &SandboxFilter) -> Vec<PodUsage> {
        // Containers grouped by pod in one pass: asking per pod would scan
        // every container once per pod.
        let mut by_pod: HashMap<SandboxId, Vec<Arc<ContainerEntry>>> = HashMap::new();
        for entry in read(&self.inner.containers).values() {
            let sandbox = lock(&entry.record).sandbox_id.clone();
            by_pod.entry(sandbox).or_default().push(entry.clone());
        }
        self.list_pod_sandboxes(filter)
            .into_iter()
            .map(|s| {
                let entries = by_pod.remove(&s.id).unwrap_or_default();
                self.pod_usage_of(s, &entries)
            })
            .collect()
    }
}

impl Agent {
    /// The agent's state for one metrics scrape: counts by state, memory
    /// against the budget and the pods' limits, each container's CPU,
    /// throttling, memory and wasi:http requests. Reads without disturbing
    /// the CPU rates the CRI stats calls compute.
    pub fn metrics_snapshot(&self) -> Snapshot {
        let sandboxes: Vec<SandboxRecord> = read(&self.inner.sandboxes)
            .values()
            .map(|e| lock(&e.record).clone())
            .collect();
        let entries: Vec<Arc<ContainerEntry>> =
            read(&self.inner.containers).values().cloned().collect();
        let pods: HashMap<&SandboxId, PodLabels> = sandboxes
            .iter()
            .map(|s| {
                let meta = s.spec.metadata.as_ref();
                let labels = PodLabels {
                    namespace: meta.map(|m| m.namespace.clone()).unwrap_or_default(),
                    pod: meta.map_or_else(|| s.id.to_string(), |m| m.name.clone()),
                };
                (&s.id, labels)
            })
            .collect();
        let mut containers = [
            (ContainerState::Created, 0),
            (ContainerState::Running, 0),
            (ContainerState::Exited, 0),
        ];
        let mut pod_memory: HashMap<&SandboxId, u64> = HashMap::new();
        let mut guests = Vec::new();
        let records: Vec<ContainerRecord> = entries.iter().map(|e| e.snapshot()).collect();
        for (entry, record) in entries.iter().zip(&records) {
            if let Some(n) = containers.iter_mut().find(|(s, _)| *s == record.state) {
                n.1 += 1;
            }
            let (Some(usage), Some(pod)) = (entry.usage(), pods.get(&record.sandbox_id)) else {
                continue;
            };
            let memory = if record.state.is_running() {
                usage.memory_bytes()
            } else {
                0
            };
            *pod_memory.entry(&record.sandbox_id).or_default() += memory;
            let http = usage.http_latency().map(|latency| {
                let counts = usage.http();
                HttpSample {
                    requests: counts.requests,
                    server_errors: counts.server_errors,
                    latency,
                }
            });
            guests.push(ContainerSample {
                pod: pod.clone(),
                container: record
                    .spec
                    .metadata
                    .as_ref()
                    .map_or_else(|| record.id.to_string(), |m| m.name.clone()),
                cpu_seconds: usage.cpu_nanos() as f64 / 1e9,
                throttled_periods: usage.throttled_periods(),
                throttled_seconds: usage.throttled_nanos() as f64 / 1e9,
                memory_bytes: memory,
                http,
            });
        }
        let ready = sandboxes
            .iter()
            .filter(|s| s.state == SandboxState::Ready)
            .count() as u64;
        let node = self.node_memory();
        Snapshot {
            sandboxes: vec![
                ("ready", ready),
                ("notready", sandboxes.len() as u64 - ready),
            ],
            containers: containers
                .iter()
                .map(|(state, n)| {
                    let label = match state {
                        ContainerState::Created => "created",
                        ContainerState::Running => "running",
                        ContainerState::Exited => "exited",
                    };
                    (label, *n)
                })
                .collect(),
            node_memory_budget_bytes: node.budget_bytes,
            node_memory_committed_bytes: node.used_bytes,
            pods: sandboxes
                .iter()
                .filter(|s| s.state == SandboxState::Ready)
                .filter_map(|s| {
                    Some(PodSample {
                        pod: pods.get(&s.id)?.clone(),
                        memory_bytes: pod_memory.get(&s.id).copied().unwrap_or(0),
                        memory_limit_bytes: s.spec.resources.memory_limit_bytes,
                    })
                })
                .collect(),
            guests,
        }
    }
}
