//! Pod sandbox lifecycle: RunPodSandbox, Stop, Remove, Status, List.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use wasmlet_conformance::{Code, ContainerConfigBuilder, assert_code, cri, now_ns};

use crate::daemon::Wasmlet;
use crate::{
    ECHO_P1, EPOCH_NS_FLOOR, GUEST_TIMEOUT, RUNNING_TIMEOUT, SECOND_NS, SLEEPER_P1, UNKNOWN_ID,
};

fn ids(items: &[cri::PodSandbox]) -> BTreeSet<&str> {
    items.iter().map(|item| item.id.as_str()).collect()
}

fn state_filter(state: cri::PodSandboxState) -> cri::PodSandboxFilter {
    cri::PodSandboxFilter {
        state: Some(cri::PodSandboxStateValue {
            state: state as i32,
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn run_pod_sandbox_returns_a_ready_sandbox_echoing_its_config() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let config = wasmlet
        .pod()
        .label("app", "web")
        .annotation("kept.verbatim/note", "  spaces, ünïcode and {json: 1}  ")
        .build();

    let before = now_ns();
    let pod = cri.run_pod(config.clone()).await.unwrap();
    let after = now_ns();

    let status = cri.pod_sandbox_status(&pod.id).await.unwrap();
    assert_eq!(status.id, pod.id);
    assert_eq!(status.state(), cri::PodSandboxState::SandboxReady);
    assert_eq!(status.metadata, config.metadata);
    assert_eq!(status.labels, config.labels);
    assert_eq!(status.annotations, config.annotations);
    assert_eq!(status.runtime_handler, "");
    assert!(status.created_at > EPOCH_NS_FLOOR, "{}", status.created_at);
    assert!(
        (before - SECOND_NS..=after + SECOND_NS).contains(&status.created_at),
        "created_at {} is not between {before} and {after}",
        status.created_at
    );
}

#[tokio::test]
async fn list_pod_sandbox_shows_the_sandbox_as_its_status_does() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let config = wasmlet
        .pod()
        .label("app", "web")
        .annotation("a", "b")
        .build();
    let pod = cri.run_pod(config.clone()).await.unwrap();
    let status = cri.pod_sandbox_status(&pod.id).await.unwrap();

    let items = cri.list_pod_sandbox(None).await.unwrap();
    let [item] = items.as_slice() else {
        panic!("expected exactly the one sandbox, got {items:?}");
    };
    assert_eq!(item.id, pod.id);
    assert_eq!(item.metadata, config.metadata);
    assert_eq!(item.state(), cri::PodSandboxState::SandboxReady);
    assert_eq!(item.created_at, status.created_at);
    assert_eq!(item.labels, config.labels);
    assert_eq!(item.annotations, config.annotations);
    assert_eq!(item.runtime_handler, "");
}

#[tokio::test]
async fn run_pod_sandbox_retried_gets_the_same_pod_and_a_stopped_pod_holds_its_name() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let config = wasmlet.pod().build();
    let first = cri.run_pod(config.clone()).await.unwrap();

    // The kubelet's retry of a run whose answer it missed.
    let retried = cri.run_pod_sandbox(config.clone(), "").await.unwrap();
    assert_eq!(retried, first.id);

    // A stopped sandbox still holds its name until it is removed.
    cri.stop_pod_sandbox(&first.id).await.unwrap();
    assert_code(cri.run_pod_sandbox(config, "").await, Code::AlreadyExists);
    assert_eq!(
        ids(&cri.list_pod_sandbox(None).await.unwrap()),
        [first.id.as_str()].into()
    );
}

#[tokio::test]
async fn run_pod_sandbox_with_the_next_attempt_is_accepted() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let config = wasmlet.pod().build();
    let first = cri.run_pod(config.clone()).await.unwrap();
    cri.stop_pod_sandbox(&first.id).await.unwrap();

    let mut next = config;
    next.metadata.as_mut().unwrap().attempt = 1;
    let second = cri.run_pod(next).await.unwrap();

    assert_ne!(first.id, second.id);
    let status = cri.pod_sandbox_status(&second.id).await.unwrap();
    assert_eq!(status.state(), cri::PodSandboxState::SandboxReady);
    assert_eq!(status.metadata.unwrap().attempt, 1);
}

#[tokio::test]
async fn run_pod_sandbox_with_the_metadata_of_a_removed_sandbox_is_accepted() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let config = wasmlet.pod().build();
    let first = cri.run_pod(config.clone()).await.unwrap();
    cri.stop_pod_sandbox(&first.id).await.unwrap();
    cri.remove_pod_sandbox(&first.id).await.unwrap();

    let second = cri.run_pod(config).await.unwrap();
    assert_ne!(first.id, second.id);
}

#[tokio::test]
async fn stop_pod_sandbox_makes_it_not_ready_and_is_idempotent() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();

    cri.stop_pod_sandbox(&pod.id).await.unwrap();
    let status = cri.pod_sandbox_status(&pod.id).await.unwrap();
    assert_eq!(status.state(), cri::PodSandboxState::SandboxNotready);

    cri.stop_pod_sandbox(&pod.id).await.unwrap();
    let status = cri.pod_sandbox_status(&pod.id).await.unwrap();
    assert_eq!(status.state(), cri::PodSandboxState::SandboxNotready);
}

#[tokio::test]
async fn stop_pod_sandbox_of_an_unknown_id_succeeds() {
    // Stop is idempotent in the CRI: a pod already gone is stopped.
    let wasmlet = Wasmlet::start().await;
    wasmlet.cri().stop_pod_sandbox(UNKNOWN_ID).await.unwrap();
    // critest stops a random UUID, which is no id wasmlet could hand out.
    wasmlet
        .cri()
        .stop_pod_sandbox("c1f110b4-f863-45fa-8434-9538c6e05777")
        .await
        .unwrap();
}

#[tokio::test]
async fn stop_pod_sandbox_stops_its_running_containers() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let config = ContainerConfigBuilder::new("sleeper", SLEEPER_P1).build();
    let id = cri.start(&pod, config).await.unwrap();
    cri.wait_for_state(&id, cri::ContainerState::ContainerRunning, RUNNING_TIMEOUT)
        .await
        .unwrap();

    cri.stop_pod_sandbox(&pod.id).await.unwrap();

    let status = cri.wait_exited(&id, Duration::from_secs(2)).await.unwrap();
    assert!(status.finished_at >= status.started_at, "{status:?}");
}

#[tokio::test]
async fn remove_pod_sandbox_removes_it_and_its_containers() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let exited = ContainerConfigBuilder::new("exited", ECHO_P1).build();
    let exited = cri
        .run_to_exit(&pod, exited, GUEST_TIMEOUT)
        .await
        .unwrap()
        .id;
    let created = ContainerConfigBuilder::new("created", ECHO_P1).build();
    let created = cri.create_container(&pod, created).await.unwrap();

    // The kubelet's order: stop, then remove.
    cri.stop_pod_sandbox(&pod.id).await.unwrap();
    cri.remove_pod_sandbox(&pod.id).await.unwrap();

    assert_code(cri.pod_sandbox_status(&pod.id).await, Code::NotFound);
    assert!(cri.list_pod_sandbox(None).await.unwrap().is_empty());
    assert_code(cri.container_status(&exited).await, Code::NotFound);
    assert_code(cri.container_status(&created).await, Code::NotFound);
    assert!(cri.list_containers(None).await.unwrap().is_empty());
}

#[tokio::test]
async fn remove_pod_sandbox_twice_or_of_an_unknown_id_is_ok() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    cri.stop_pod_sandbox(&pod.id).await.unwrap();
    cri.remove_pod_sandbox(&pod.id).await.unwrap();

    cri.remove_pod_sandbox(&pod.id).await.unwrap();
    cri.remove_pod_sandbox(UNKNOWN_ID).await.unwrap();
}

#[tokio::test]
async fn pod_sandbox_status_of_an_unknown_id_is_not_found() {
    let wasmlet = Wasmlet::start().await;
    assert_code(
        wasmlet.cri().pod_sandbox_status(UNKNOWN_ID).await,
        Code::NotFound,
    );
}

#[tokio::test]
async fn list_pod_sandbox_filters_by_id() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let a = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let b = cri.run_pod(wasmlet.pod().build()).await.unwrap();

    let filter = |id: &str| cri::PodSandboxFilter {
        id: id.to_owned(),
        ..Default::default()
    };
    let only_a = cri.list_pod_sandbox(Some(filter(&a.id))).await.unwrap();
    assert_eq!(ids(&only_a), [a.id.as_str()].into());
    let only_b = cri.list_pod_sandbox(Some(filter(&b.id))).await.unwrap();
    assert_eq!(ids(&only_b), [b.id.as_str()].into());
    let none = cri
        .list_pod_sandbox(Some(filter(UNKNOWN_ID)))
        .await
        .unwrap();
    assert!(none.is_empty(), "{none:?}");
}

#[tokio::test]
async fn list_pod_sandbox_filters_by_state() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let ready = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let stopped = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    cri.stop_pod_sandbox(&stopped.id).await.unwrap();

    let filter = state_filter(cri::PodSandboxState::SandboxReady);
    let items = cri.list_pod_sandbox(Some(filter)).await.unwrap();
    assert_eq!(ids(&items), [ready.id.as_str()].into());

    let filter = state_filter(cri::PodSandboxState::SandboxNotready);
    let items = cri.list_pod_sandbox(Some(filter)).await.unwrap();
    assert_eq!(ids(&items), [stopped.id.as_str()].into());
}

#[tokio::test]
async fn list_pod_sandbox_label_selector_requires_every_pair_to_match() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = |app: &str, tier: &str| wasmlet.pod().label("app", app).label("tier", tier).build();
    let web_front = cri.run_pod(pod("web", "front")).await.unwrap();
    let web_back = cri.run_pod(pod("web", "back")).await.unwrap();
    let db_back = cri.run_pod(pod("db", "back")).await.unwrap();

    let mut select = async |pairs: &[(&str, &str)]| {
        let label_selector: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let filter = cri::PodSandboxFilter {
            label_selector,
            ..Default::default()
        };
        let items = cri.list_pod_sandbox(Some(filter)).await.unwrap();
        items
            .into_iter()
            .map(|item| item.id)
            .collect::<BTreeSet<_>>()
    };

    assert_eq!(
        select(&[("app", "web")]).await,
        [web_front.id.clone(), web_back.id.clone()].into()
    );
    assert_eq!(
        select(&[("app", "web"), ("tier", "back")]).await,
        [web_back.id.clone()].into()
    );
    assert_eq!(
        select(&[("tier", "back")]).await,
        [web_back.id, db_back.id].into()
    );
    assert_eq!(
        select(&[("app", "web"), ("tier", "middle")]).await,
        BTreeSet::new()
    );
    assert_eq!(select(&[("app", "cache")]).await, BTreeSet::new());
}
