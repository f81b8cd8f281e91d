//! Container and pod stats, as metrics-server and the kubelet read them
//! through CRI (`PodAndContainerStatsFromCRI`).

use std::time::Duration;

use wasmlet_conformance::{ContainerConfigBuilder, Stream, cri, stream_lines, wait_for_log};

use crate::daemon::Wasmlet;
use crate::{GUEST_TIMEOUT, HOG_P1, SLEEPER_P1, SPIN_P1};

const MIB: u64 = 1024 * 1024;

pub(crate) fn value(v: &Option<cri::UInt64Value>) -> u64 {
    v.as_ref().map_or(0, |v| v.value)
}

pub(crate) async fn container_stats(wasmlet: &Wasmlet, id: &str) -> cri::ContainerStats {
    wasmlet
        .cri()
        .runtime()
        .container_stats(cri::ContainerStatsRequest {
            container_id: id.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_guest_accumulates_cpu_time_and_an_idle_one_does_not() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let spin = cri
        .start(&pod, ContainerConfigBuilder::new("spin", SPIN_P1).build())
        .await
        .unwrap();
    let idle = cri
        .start(
            &pod,
            ContainerConfigBuilder::new("idle", SLEEPER_P1).build(),
        )
        .await
        .unwrap();
    let first = container_stats(&wasmlet, &spin).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = container_stats(&wasmlet, &spin).await;
    let (c1, c2) = (first.cpu.unwrap(), second.cpu.unwrap());
    let spent = value(&c2.usage_core_nano_seconds) - value(&c1.usage_core_nano_seconds);
    // A guest spinning on a 2-core machine gets a good part of a core.
    assert!(
        spent > 300_000_000,
        "spin used only {spent} ns of CPU in 1.5 s"
    );
    assert!(value(&c2.usage_nano_cores) > 200_000_000, "{c2:?}");
    assert!(c2.timestamp > c1.timestamp);
    assert_eq!(second.attributes.unwrap().id, spin);

    let idle_cpu = value(
        &container_stats(&wasmlet, &idle)
            .await
            .cpu
            .unwrap()
            .usage_core_nano_seconds,
    );
    assert!(
        idle_cpu < 100_000_000,
        "a sleeping guest used {idle_cpu} ns"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_working_set_follows_committed_guest_memory() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let config = ContainerConfigBuilder::new("hog", HOG_P1)
        .env("HOG_LIMIT_MIB", "20")
        .env("HOG_HOLD", "1")
        .memory_limit((64 * MIB) as i64)
        .build();
    let log = pod.container_log(&config);
    let id = cri.start(&pod, config).await.unwrap();
    wait_for_log(&log, GUEST_TIMEOUT, "the hog to hold 20 MiB", |records| {
        stream_lines(records, Stream::Stdout)
            .iter()
            .any(|l| l == "done holding 20 MiB")
    })
    .await
    .unwrap();
    let memory = container_stats(&wasmlet, &id).await.memory.unwrap();
    let working_set = value(&memory.working_set_bytes);
    assert!(
        (20 * MIB..40 * MIB).contains(&working_set),
        "working set {working_set}"
    );
    assert_eq!(value(&memory.available_bytes), 64 * MIB - working_set);

    // The pod's stats hold the container's and sum them.
    let pod_stats = cri
        .runtime()
        .pod_sandbox_stats(cri::PodSandboxStatsRequest {
            pod_sandbox_id: pod.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    let linux = pod_stats.linux.unwrap();
    assert_eq!(linux.containers.len(), 1);
    assert_eq!(value(&linux.memory.unwrap().working_set_bytes), working_set);
    assert_eq!(value(&linux.process.unwrap().process_count), 1);

    // After a stop the memory is returned.
    cri.stop_container(&id, 0).await.unwrap();
    let memory = container_stats(&wasmlet, &id).await.memory.unwrap();
    assert_eq!(value(&memory.working_set_bytes), 0);
}

/// A guest that frees what it allocated and allocates it again: the stats
/// follow its growth step by step, and its freed memory is reused (Wasm
/// linear memory never shrinks, but it must not grow by what was freed),
/// so the working set stays at the high-water mark instead of climbing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_track_a_guest_that_allocates_and_frees() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let config = ContainerConfigBuilder::new("breathe", HOG_P1)
        .env("HOG_LIMIT_MIB", "16")
        .env("HOG_CYCLES", "4")
        .env("HOG_HOLD", "1")
        .build();
    let log = pod.container_log(&config);
    let id = cri.start(&pod, config).await.unwrap();
    let records = wait_for_log(
        &log,
        GUEST_TIMEOUT,
        "four free/allocate cycles",
        |records| {
            stream_lines(records, Stream::Stdout)
                .iter()
                .any(|l| l == "done holding 16 MiB")
        },
    )
    .await
    .unwrap();
    let freed = stream_lines(&records, Stream::Stdout)
        .iter()
        .filter(|l| *l == "freed 16 MiB")
        .count();
    assert_eq!(freed, 4);
    let working_set = value(
        &container_stats(&wasmlet, &id)
            .await
            .memory
            .unwrap()
            .working_set_bytes,
    );
    // 16 MiB held; 5 × 16 MiB would have been committed had frees leaked.
    assert!(
        (16 * MIB..32 * MIB).contains(&working_set),
        "working set {working_set} after four free/allocate cycles of 16 MiB"
    );
    cri.stop_container(&id, 0).await.unwrap();
    let memory = container_stats(&wasmlet, &id).await.memory.unwrap();
    assert_eq!(value(&memory.working_set_bytes), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_stats_filter_by_pod_and_label() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let a = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let b = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    cri.start(
        &a,
        ContainerConfigBuilder::new("one", SLEEPER_P1)
            .label("tier", "web")
            .build(),
    )
    .await
    .unwrap();
    cri.start(&b, ContainerConfigBuilder::new("two", SLEEPER_P1).build())
        .await
        .unwrap();
    let list = |filter: cri::ContainerStatsFilter| {
        let mut cri = wasmlet.cri();
        async move {
            cri.runtime()
                .list_container_stats(cri::ListContainerStatsRequest {
                    filter: Some(filter),
                })
                .await
                .unwrap()
                .into_inner()
                .stats
        }
    };
    assert_eq!(list(cri::ContainerStatsFilter::default()).await.len(), 2);
    let only_a = list(cri::ContainerStatsFilter {
        pod_sandbox_id: a.id.clone(),
        ..Default::default()
    })
    .await;
    assert_eq!(only_a.len(), 1);
    let web = list(cri::ContainerStatsFilter {
        label_selector: [("tier".to_owned(), "web".to_owned())].into(),
        ..Default::default()
    })
    .await;
    assert_eq!(web.len(), 1);
    let pods = cri
        .runtime()
        .list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest {
            filter: Some(cri::PodSandboxStatsFilter {
                id: b.id.clone(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .stats;
    assert_eq!(pods.len(), 1);
    assert_eq!(pods[0].attributes.as_ref().unwrap().id, b.id);
}

async fn cpu_nanos(wasmlet: &Wasmlet, id: &str) -> u64 {
    value(
        &container_stats(wasmlet, id)
            .await
            .cpu
            .unwrap()
            .usage_core_nano_seconds,
    )
}

/// A 100m CPU limit holds a busy guest to about a tenth of a core, and
/// UpdateContainerResources lifts it on the running guest. (The precise
/// ratio is the benchmark's business; this checks the mechanism, with wide
/// margins.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_quota_throttles_a_busy_guest_and_updates_apply_live() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let mut config = ContainerConfigBuilder::new("spin", SPIN_P1).build();
    config.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            cpu_quota: 10_000,
            cpu_period: 100_000,
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = cri.start(&pod, config).await.unwrap();
    let start = cpu_nanos(&wasmlet, &id).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let throttled = cpu_nanos(&wasmlet, &id).await - start;
    assert!(
        throttled < 600_000_000,
        "a 100m guest used {throttled} ns in 2 s"
    );

    cri.runtime()
        .update_container_resources(cri::UpdateContainerResourcesRequest {
            container_id: id.clone(),
            linux: Some(cri::LinuxContainerResources::default()),
            ..Default::default()
        })
        .await
        .unwrap();
    let start = cpu_nanos(&wasmlet, &id).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let free = cpu_nanos(&wasmlet, &id).await - start;
    assert!(
        free > throttled * 2,
        "after lifting the limit: {free} ns vs {throttled} ns"
    );
    let status = cri.container_status(&id).await.unwrap();
    assert_eq!(status.state, cri::ContainerState::ContainerRunning as i32);
    // The status reports the limits now in force.
    let linux = status.resources.and_then(|r| r.linux).unwrap();
    assert_eq!(linux.cpu_quota, 0, "{linux:?}");
}

/// The cAdvisor-named metrics the kubelet forwards are described and
/// published per container with cAdvisor's labels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_carry_cadvisor_names_and_labels() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let descriptors = cri
        .runtime()
        .list_metric_descriptors(cri::ListMetricDescriptorsRequest {})
        .await
        .unwrap()
        .into_inner()
        .descriptors;
    let cpu = descriptors
        .iter()
        .find(|d| d.name == "container_cpu_usage_seconds_total")
        .expect("no container_cpu_usage_seconds_total descriptor");
    assert!(
        descriptors
            .iter()
            .any(|d| d.name == "container_memory_working_set_bytes")
    );
    let keys = cpu.label_keys.clone();
    for key in ["container", "namespace", "pod"] {
        assert!(keys.iter().any(|k| k == key), "{keys:?}");
    }

    let pod_config = wasmlet.pod().build();
    let meta = pod_config.metadata.clone().unwrap();
    let pod = cri.run_pod(pod_config).await.unwrap();
    let id = cri
        .start(
            &pod,
            ContainerConfigBuilder::new("idle", SLEEPER_P1).build(),
        )
        .await
        .unwrap();
    let metrics = cri
        .runtime()
        .list_pod_sandbox_metrics(cri::ListPodSandboxMetricsRequest {})
        .await
        .unwrap()
        .into_inner()
        .pod_metrics;
    let ours = metrics
        .iter()
        .find(|m| m.pod_sandbox_id == pod.id)
        .expect("no metrics for the pod");
    let container = ours
        .container_metrics
        .iter()
        .find(|c| c.container_id == id)
        .expect("no container metrics");
    let working_set = container
        .metrics
        .iter()
        .find(|m| m.name == "container_memory_working_set_bytes")
        .expect("no working set metric");
    assert!(value(&working_set.value) > 0);
    assert_eq!(working_set.metric_type, cri::MetricType::Gauge as i32);
    let label =
        |key: &str| working_set.label_values[keys.iter().position(|k| k == key).unwrap()].clone();
    assert_eq!(label("pod"), meta.name);
    assert_eq!(label("namespace"), meta.namespace);
    assert_eq!(label("container"), "idle");
    for metric in &container.metrics {
        assert_eq!(metric.label_values.len(), keys.len(), "{metric:?}");
    }
}

/// A pod-level CPU quota caps its containers together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_cpu_quota_caps_its_busy_containers_together() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let mut pod_config = wasmlet.pod().build();
    pod_config.linux = Some(cri::LinuxPodSandboxConfig {
        resources: Some(cri::LinuxContainerResources {
            cpu_quota: 10_000,
            cpu_period: 100_000,
            ..Default::default()
        }),
        ..Default::default()
    });
    let pod = cri.run_pod(pod_config).await.unwrap();
    let a = cri
        .start(&pod, ContainerConfigBuilder::new("a", SPIN_P1).build())
        .await
        .unwrap();
    let b = cri
        .start(&pod, ContainerConfigBuilder::new("b", SPIN_P1).build())
        .await
        .unwrap();
    let start = cpu_nanos(&wasmlet, &a).await + cpu_nanos(&wasmlet, &b).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spent = cpu_nanos(&wasmlet, &a).await + cpu_nanos(&wasmlet, &b).await - start;
    // Unlimited, two spinners would take most of both cores (~4 s of CPU).
    assert!(
        spent < 700_000_000,
        "a 100m pod's two spinners used {spent} ns in 2 s"
    );
}
