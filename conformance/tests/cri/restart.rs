//! Recovery: a daemon killed with SIGKILL and served again on the same root
//! finds its sandboxes, containers and images, and settles what was running.

use std::collections::BTreeSet;

use wasmlet_conformance::{ContainerConfigBuilder, CriClient, cri};

use crate::daemon::Wasmlet;
use crate::{ECHO_P1, GUEST_TIMEOUT, RUNNING_TIMEOUT, SLEEPER_P1};

async fn sandbox_ids(cri: &mut CriClient) -> BTreeSet<String> {
    let items = cri.list_pod_sandbox(None).await.unwrap();
    items.into_iter().map(|item| item.id).collect()
}

async fn container_ids(cri: &mut CriClient) -> BTreeSet<String> {
    let containers = cri.list_containers(None).await.unwrap();
    containers.into_iter().map(|c| c.id).collect()
}

#[tokio::test]
async fn sandboxes_and_containers_keep_their_ids_across_a_kill_9() {
    let mut wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let ready = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let stopped = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let exited = ContainerConfigBuilder::new("exited", ECHO_P1).build();
    cri.run_to_exit(&ready, exited, GUEST_TIMEOUT)
        .await
        .unwrap();
    let running = ContainerConfigBuilder::new("running", SLEEPER_P1).build();
    let running = cri.start(&ready, running).await.unwrap();
    cri.wait_for_state(
        &running,
        cri::ContainerState::ContainerRunning,
        RUNNING_TIMEOUT,
    )
    .await
    .unwrap();
    let created = ContainerConfigBuilder::new("created", ECHO_P1).build();
    cri.create_container(&ready, created).await.unwrap();
    cri.stop_pod_sandbox(&stopped.id).await.unwrap();
    let sandboxes = sandbox_ids(&mut cri).await;
    let containers = container_ids(&mut cri).await;
    assert_eq!((sandboxes.len(), containers.len()), (2, 3));

    wasmlet.kill_9().await;
    let mut cri = wasmlet.restart().await;

    assert_eq!(sandbox_ids(&mut cri).await, sandboxes);
    assert_eq!(container_ids(&mut cri).await, containers);
    let status = cri.pod_sandbox_status(&stopped.id).await.unwrap();
    assert_eq!(status.state(), cri::PodSandboxState::SandboxNotready);
}

#[tokio::test]
async fn a_container_running_at_kill_9_is_exited_255_after_the_restart() {
    let mut wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let config = ContainerConfigBuilder::new("sleeper", SLEEPER_P1).build();
    let id = cri.start(&pod, config).await.unwrap();
    cri.wait_for_state(&id, cri::ContainerState::ContainerRunning, RUNNING_TIMEOUT)
        .await
        .unwrap();

    wasmlet.kill_9().await;
    let mut cri = wasmlet.restart().await;

    let status = cri.container_status(&id).await.unwrap();
    assert_eq!(
        status.state(),
        cri::ContainerState::ContainerExited,
        "{status:?}"
    );
    assert_eq!(status.exit_code, 255, "{status:?}");
    assert_eq!(status.reason, "Error", "{status:?}");
    assert!(
        status.message.to_lowercase().contains("restart"),
        "the message does not mention the restart: {status:?}"
    );
    assert!(status.finished_at >= status.started_at, "{status:?}");
}

#[tokio::test]
async fn exited_containers_keep_their_exit_status_across_a_kill_9() {
    let mut wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let ok = ContainerConfigBuilder::new("ok", ECHO_P1).build();
    let ok = cri.run_to_exit(&pod, ok, GUEST_TIMEOUT).await.unwrap();
    let failed = ContainerConfigBuilder::new("failed", ECHO_P1)
        .env("EXIT_CODE", "7")
        .build();
    let failed = cri.run_to_exit(&pod, failed, GUEST_TIMEOUT).await.unwrap();

    wasmlet.kill_9().await;
    let mut cri = wasmlet.restart().await;

    for before in [ok, failed] {
        let after = cri.container_status(&before.id).await.unwrap();
        assert_eq!(
            after.state(),
            cri::ContainerState::ContainerExited,
            "{after:?}"
        );
        assert_eq!(
            (
                after.exit_code,
                &after.reason,
                after.started_at,
                after.finished_at
            ),
            (
                before.exit_code,
                &before.reason,
                before.started_at,
                before.finished_at
            ),
            "before: {before:?}\nafter: {after:?}"
        );
    }
}

#[tokio::test]
async fn images_are_still_served_after_a_kill_9() {
    let mut wasmlet = Wasmlet::start().await;
    let images_before = wasmlet.cri().list_images(None).await.unwrap();

    wasmlet.kill_9().await;
    let mut cri = wasmlet.restart().await;

    let images_after = cri.list_images(None).await.unwrap();
    let ids = |images: &[cri::Image]| images.iter().map(|i| i.id.clone()).collect::<BTreeSet<_>>();
    assert_eq!(ids(&images_after), ids(&images_before));
    let image = cri.image_status(ECHO_P1).await.unwrap();
    assert_eq!(
        image.map(|i| i.id).as_deref(),
        Some(wasmlet.image_id(ECHO_P1))
    );
}

#[tokio::test]
async fn new_pods_run_after_a_kill_9() {
    let mut wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let old_pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();

    wasmlet.kill_9().await;
    let mut cri = wasmlet.restart().await;

    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    assert_ne!(pod.id, old_pod.id);
    let config = ContainerConfigBuilder::new("echo", ECHO_P1).build();
    let status = cri.run_to_exit(&pod, config, GUEST_TIMEOUT).await.unwrap();
    assert_eq!(status.exit_code, 0, "{status:?}");
    assert_eq!(status.reason, "Completed", "{status:?}");
}
