//! Resource limits: memory limits of containers and pods hold, and a guest
//! that dies of one is reported OOMKilled.

use wasmlet_conformance::{ContainerConfigBuilder, Stream, cri, read_cri_log, stream_lines};

use crate::daemon::Wasmlet;
use crate::{GUEST_TIMEOUT, HOG_P1};

const MIB: i64 = 1024 * 1024;

fn memory_limit(bytes: i64) -> Option<cri::LinuxContainerResources> {
    Some(cri::LinuxContainerResources {
        memory_limit_in_bytes: bytes,
        ..Default::default()
    })
}

fn with_memory_limit(mut config: cri::ContainerConfig, bytes: i64) -> cri::ContainerConfig {
    config.linux = Some(cri::LinuxContainerConfig {
        resources: memory_limit(bytes),
        ..Default::default()
    });
    config
}

fn holding(records: &[wasmlet_conformance::LogRecord]) -> usize {
    stream_lines(records, Stream::Stdout)
        .iter()
        .filter(|l| l.starts_with("holding "))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_past_its_memory_limit_is_oom_killed_with_exit_code_137() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let config = with_memory_limit(ContainerConfigBuilder::new("hog", HOG_P1).build(), 16 * MIB);
    let log = pod.container_log(&config);
    let status = cri.run_to_exit(&pod, config, GUEST_TIMEOUT).await.unwrap();
    assert_eq!(status.exit_code, 137, "{status:?}");
    assert_eq!(status.reason, "OOMKilled", "{status:?}");
    assert!(status.message.contains("memory limit"), "{status:?}");
    let held = holding(&read_cri_log(&log).unwrap());
    assert!(
        (8..16).contains(&held),
        "held {held} MiB under a 16 MiB limit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_within_its_memory_limit_completes() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let config = with_memory_limit(
        ContainerConfigBuilder::new("hog", HOG_P1)
            .env("HOG_LIMIT_MIB", "4")
            .build(),
        32 * MIB,
    );
    let status = cri.run_to_exit(&pod, config, GUEST_TIMEOUT).await.unwrap();
    assert_eq!(
        (status.exit_code, status.reason.as_str()),
        (0, "Completed"),
        "{status:?}"
    );
}

/// The pod's own limit caps all its containers together: a second
/// container is killed when the pod's total would pass it, while the
/// first keeps running; a container in another pod is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pod_memory_limit_caps_its_containers_together() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let mut pod_config = wasmlet.pod().build();
    pod_config.linux = Some(cri::LinuxPodSandboxConfig {
        resources: memory_limit(40 * MIB),
        ..Default::default()
    });
    let pod = cri.run_pod(pod_config).await.unwrap();
    let holder = ContainerConfigBuilder::new("holder", HOG_P1)
        .env("HOG_LIMIT_MIB", "24")
        .env("HOG_HOLD", "1")
        .build();
    let holder_log = pod.container_log(&holder);
    let holder_id = cri.start(&pod, holder).await.unwrap();
    wasmlet_conformance::wait_for_log(
        &holder_log,
        GUEST_TIMEOUT,
        "the holder to hold 24 MiB",
        |records| {
            stream_lines(records, Stream::Stdout)
                .iter()
                .any(|l| l == "done holding 24 MiB")
        },
    )
    .await
    .unwrap();

    let hog = ContainerConfigBuilder::new("hog", HOG_P1).build();
    let status = cri.run_to_exit(&pod, hog, GUEST_TIMEOUT).await.unwrap();
    assert_eq!(
        (status.exit_code, status.reason.as_str()),
        (137, "OOMKilled"),
        "{status:?}"
    );

    let holder = cri.container_status(&holder_id).await.unwrap();
    assert_eq!(
        holder.state,
        cri::ContainerState::ContainerRunning as i32,
        "{holder:?}"
    );

    // Another pod, without a limit, is not held back by this one.
    let other = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let config = ContainerConfigBuilder::new("other", HOG_P1)
        .env("HOG_LIMIT_MIB", "32")
        .build();
    let status = cri
        .run_to_exit(&other, config, GUEST_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(status.exit_code, 0, "{status:?}");
}

/// UpdatePodSandboxResources (an in-place pod resize) moves the pod-level
/// limit of a running pod: a guest its old limit refused fits under the
/// new one, the running holder is untouched, the pod's overhead counts,
/// and an unknown pod is NotFound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_place_pod_resize_moves_the_pod_memory_limit() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let mut pod_config = wasmlet.pod().build();
    pod_config.linux = Some(cri::LinuxPodSandboxConfig {
        resources: memory_limit(16 * MIB),
        ..Default::default()
    });
    let pod = cri.run_pod(pod_config).await.unwrap();
    let holder = ContainerConfigBuilder::new("holder", HOG_P1)
        .env("HOG_LIMIT_MIB", "4")
        .env("HOG_HOLD", "1")
        .build();
    let holder_log = pod.container_log(&holder);
    let holder_id = cri.start(&pod, holder).await.unwrap();
    wasmlet_conformance::wait_for_log(&holder_log, GUEST_TIMEOUT, "4 MiB held", |records| {
        stream_lines(records, Stream::Stdout)
            .iter()
            .any(|l| l == "done holding 4 MiB")
    })
    .await
    .unwrap();
    let needs_30 = |attempt: u32| {
        ContainerConfigBuilder::new("thirty", HOG_P1)
            .attempt(attempt)
            .env("HOG_LIMIT_MIB", "30")
            .build()
    };
    let refused = cri
        .run_to_exit(&pod, needs_30(0), GUEST_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(
        (refused.exit_code, refused.reason.as_str()),
        (137, "OOMKilled"),
        "{refused:?}"
    );

    // 48 MiB for the containers and 16 MiB of overhead: 64 MiB in all.
    cri.runtime()
        .update_pod_sandbox_resources(cri::UpdatePodSandboxResourcesRequest {
            pod_sandbox_id: pod.id.clone(),
            overhead: memory_limit(16 * MIB),
            resources: memory_limit(48 * MIB),
        })
        .await
        .unwrap();
    let fits = cri
        .run_to_exit(&pod, needs_30(1), GUEST_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(
        (fits.exit_code, fits.reason.as_str()),
        (0, "Completed"),
        "{fits:?}"
    );
    let holder = cri.container_status(&holder_id).await.unwrap();
    assert_eq!(
        holder.state,
        cri::ContainerState::ContainerRunning as i32,
        "{holder:?}"
    );
    // 4 + 30 + 34 > 64: still a limit, the new one.
    let too_much = ContainerConfigBuilder::new("too-much", HOG_P1)
        .env("HOG_LIMIT_MIB", "64")
        .build();
    let status = cri
        .run_to_exit(&pod, too_much, GUEST_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(status.reason, "OOMKilled", "{status:?}");

    let unknown = cri
        .runtime()
        .update_pod_sandbox_resources(cri::UpdatePodSandboxResourcesRequest {
            pod_sandbox_id: "0".repeat(64),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
}
