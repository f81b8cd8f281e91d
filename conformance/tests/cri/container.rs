//! Container lifecycle: Create, Start, Stop, Remove, Status, List.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use wasmlet_conformance::{
    Code, ContainerConfigBuilder, CriClient, Pod, Stream, assert_code, cri, now_ns, wait_for_log,
};

use crate::daemon::Wasmlet;
use crate::{
    ECHO_P1, EPOCH_NS_FLOOR, GUEST_TIMEOUT, RUNNING_TIMEOUT, SECOND_NS, SLEEPER_P1, SPIN_P1,
    UNKNOWN_ID,
};

async fn running_sleeper(cri: &mut CriClient, pod: &Pod, name: &str) -> String {
    let config = ContainerConfigBuilder::new(name, SLEEPER_P1).build();
    let id = cri.start(pod, config).await.unwrap();
    cri.wait_for_state(&id, cri::ContainerState::ContainerRunning, RUNNING_TIMEOUT)
        .await
        .unwrap();
    id
}

/// The image's first repo digest (`repo@sha256:…`), as ImageStatus lists it.
async fn repo_digest(cri: &mut CriClient, image: &str) -> String {
    let status = cri
        .image_status(image)
        .await
        .unwrap()
        .expect("the image is stored");
    let digest = status.repo_digests.first().expect("a repo digest").clone();
    assert!(digest.contains("@sha256:"), "{digest}");
    digest
}

#[tokio::test]
async fn the_status_names_the_image_as_the_pod_asked_for_and_by_its_repo_digest() {
    // As the kubelet creates containers: the image by the id its pull
    // returned, and the pod's own reference as the user-specified image.
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let id = cri.pull_image(ECHO_P1).await.unwrap();
    let mut config = ContainerConfigBuilder::new("echo", &id).build();
    config.image.as_mut().unwrap().user_specified_image = ECHO_P1.to_owned();
    let container = cri.create_container(&pod, config).await.unwrap();

    let status = cri.container_status(&container).await.unwrap();
    let image = status.image.clone().unwrap();
    assert_eq!(image.image, ECHO_P1, "{status:?}");
    assert_eq!(image.user_specified_image, ECHO_P1, "{status:?}");
    let digest = repo_digest(&mut cri, ECHO_P1).await;
    assert!(
        digest.starts_with("wasmlet.local/samples/echo@sha256:"),
        "{digest}"
    );
    assert_eq!(status.image_ref, digest);
    let listed = cri.list_containers(None).await.unwrap();
    assert_eq!(listed[0].image_ref, digest);
    assert_eq!(listed[0].image.as_ref().unwrap().image, ECHO_P1);
}

#[tokio::test]
async fn create_container_returns_a_created_container_echoing_its_config() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let config = ContainerConfigBuilder::new("echo", ECHO_P1)
        .label("app", "echo")
        .annotation("kept.verbatim/note", " {\"json\": true} ")
        .build();

    let before = now_ns();
    let id = cri.create_container(&pod, config.clone()).await.unwrap();
    let after = now_ns();

    let status = cri.container_status(&id).await.unwrap();
    assert_eq!(status.id, id);
    assert_eq!(status.state(), cri::ContainerState::ContainerCreated);
    assert_eq!(status.metadata, config.metadata);
    assert_eq!(
        status.image.as_ref().map(|i| i.image.as_str()),
        Some(ECHO_P1)
    );
    assert_eq!(status.image_ref, repo_digest(&mut cri, ECHO_P1).await);
    assert_eq!(status.labels, config.labels);
    assert_eq!(status.annotations, config.annotations);
    assert!(
        (before - SECOND_NS..=after + SECOND_NS).contains(&status.created_at),
        "created_at {} is not between {before} and {after}",
        status.created_at
    );
    assert_eq!(
        (status.started_at, status.finished_at),
        (0, 0),
        "{status:?}"
    );
}

#[tokio::test]
async fn create_container_in_an_unknown_sandbox_is_not_found() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = Pod {
        id: UNKNOWN_ID.to_owned(),
        config: wasmlet.pod().build(),
    };
    let config = ContainerConfigBuilder::new("echo", ECHO_P1).build();
    assert_code(cri.create_container(&pod, config).await, Code::NotFound);
}

#[tokio::test]
async fn create_container_in_a_stopped_sandbox_is_failed_precondition() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    cri.stop_pod_sandbox(&pod.id).await.unwrap();

    let config = ContainerConfigBuilder::new("echo", ECHO_P1).build();
    assert_code(
        cri.create_container(&pod, config).await,
        Code::FailedPrecondition,
    );
    assert!(cri.list_containers(None).await.unwrap().is_empty());
}

#[tokio::test]
async fn create_container_with_an_unknown_image_is_not_found() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let config = ContainerConfigBuilder::new("missing", "wasmlet.local/samples/missing:p1").build();
    assert_code(cri.create_container(&pod, config).await, Code::NotFound);
}

#[tokio::test]
async fn create_container_accepts_the_image_id_as_the_kubelet_sends_it() {
    // The kubelet pulls by tag, then creates the container with the image id
    // that PullImage answered.
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let image_ref = cri.pull_image(ECHO_P1).await.unwrap();

    let config = ContainerConfigBuilder::new("echo", image_ref.clone()).build();
    let status = cri.run_to_exit(&pod, config, GUEST_TIMEOUT).await.unwrap();

    assert_eq!(status.exit_code, 0, "{status:?}");
    assert_eq!(status.image_ref, repo_digest(&mut cri, ECHO_P1).await);
    // The harness, unlike the kubelet, names the id as the user-specified
    // image too: it is what the pod asked for.
    assert_eq!(status.image.map(|i| i.image), Some(image_ref));
}

#[tokio::test]
async fn create_container_retried_gets_the_same_container_until_it_is_started() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let config = ContainerConfigBuilder::new("sleeper", SLEEPER_P1).build();
    let first = cri.create_container(&pod, config.clone()).await.unwrap();

    // The kubelet's retry of a create whose answer it missed.
    let retried = cri.create_container(&pod, config.clone()).await.unwrap();
    assert_eq!(retried, first);
    let listed = cri.list_containers(None).await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].id, first);

    // Once started it is no longer what that create made: the name and
    // attempt are taken.
    cri.start_container(&first).await.unwrap();
    assert_code(
        cri.create_container(&pod, config).await,
        Code::AlreadyExists,
    );
    assert_eq!(cri.list_containers(None).await.unwrap().len(), 1);
}

#[tokio::test]
async fn container_names_are_unique_per_attempt_and_per_sandbox() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let other_pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();

    let first = ContainerConfigBuilder::new("echo", ECHO_P1).build();
    let next_attempt = ContainerConfigBuilder::new("echo", ECHO_P1)
        .attempt(1)
        .build();
    let a = cri.create_container(&pod, first.clone()).await.unwrap();
    let b = cri.create_container(&pod, next_attempt).await.unwrap();
    let c = cri.create_container(&other_pod, first).await.unwrap();

    assert_eq!(BTreeSet::from([&a, &b, &c]).len(), 3, "ids must differ");
}

#[tokio::test]
async fn start_container_makes_it_running() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let config = ContainerConfigBuilder::new("sleeper", SLEEPER_P1).build();
    let id = cri.create_container(&pod, config).await.unwrap();

    let before = now_ns();
    cri.start_container(&id).await.unwrap();
    let after = now_ns();

    let status = cri.container_status(&id).await.unwrap();
    assert_eq!(status.state(), cri::ContainerState::ContainerRunning);
    assert!(
        (before - SECOND_NS..=after + SECOND_NS).contains(&status.started_at),
        "started_at {} is not between {before} and {after}",
        status.started_at
    );
    assert!(status.started_at >= status.created_at, "{status:?}");
    assert_eq!(status.finished_at, 0, "{status:?}");
}

#[tokio::test]
async fn start_retried_while_running_succeeds_and_start_after_exit_is_failed_precondition() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let id = running_sleeper(&mut cri, &pod, "sleeper").await;
    let started = cri.container_status(&id).await.unwrap().started_at;

    // The kubelet's retry of a start whose answer it missed: the same run.
    cri.start_container(&id).await.unwrap();
    let status = cri.container_status(&id).await.unwrap();
    assert_eq!(status.state(), cri::ContainerState::ContainerRunning);
    assert_eq!(status.started_at, started, "not started again");

    cri.stop_container(&id, 0).await.unwrap();
    assert_code(cri.start_container(&id).await, Code::FailedPrecondition);
    let status = cri.container_status(&id).await.unwrap();
    assert_eq!(status.state(), cri::ContainerState::ContainerExited);
}

#[tokio::test]
async fn start_and_status_of_an_unknown_container_are_not_found_and_stop_succeeds() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    assert_code(cri.start_container(UNKNOWN_ID).await, Code::NotFound);
    assert_code(cri.container_status(UNKNOWN_ID).await, Code::NotFound);
    // Stop is idempotent in the CRI: a container already gone is stopped.
    cri.stop_container(UNKNOWN_ID, 0).await.unwrap();
    // critest stops a random UUID, which is no id wasmlet could hand out.
    cri.stop_container("c1f110b4-f863-45fa-8434-9538c6e05777", 0)
        .await
        .unwrap();
}

/// Starts `image`, waits for its first log line, stops it with `timeout_seconds`
/// and checks it was killed (137) within the timeout plus one second.
async fn assert_stop_kills_within_timeout(image: &str, first_line: &str, timeout_seconds: i64) {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let config = ContainerConfigBuilder::new("victim", image).build();
    let log = pod.container_log(&config);
    let id = cri.start(&pod, config).await.unwrap();
    wait_for_log(&log, RUNNING_TIMEOUT, first_line, |records| {
        records
            .iter()
            .any(|r| r.stream == Stream::Stdout && r.text == first_line)
    })
    .await
    .unwrap();

    let bound = Duration::from_secs(timeout_seconds.unsigned_abs() + 1);
    let stopping = Instant::now();
    cri.stop_container(&id, timeout_seconds).await.unwrap();
    let status = cri.wait_exited(&id, bound).await.unwrap();
    let took = stopping.elapsed();

    assert!(took <= bound, "stopping took {took:?}, more than {bound:?}");
    assert_eq!(status.exit_code, 137, "{status:?}");
    assert_eq!(status.reason, "Error", "{status:?}");
    assert!(status.finished_at >= status.started_at, "{status:?}");
}

#[tokio::test]
async fn stop_container_kills_a_guest_that_never_calls_the_host_within_the_timeout() {
    assert_stop_kills_within_timeout(SPIN_P1, "spinning", 1).await;
}

#[tokio::test]
async fn stop_container_kills_a_guest_blocked_in_the_host_within_the_timeout() {
    assert_stop_kills_within_timeout(SLEEPER_P1, "sleeping", 1).await;
}

#[tokio::test]
async fn stop_container_with_zero_timeout_kills_at_once() {
    assert_stop_kills_within_timeout(SLEEPER_P1, "sleeping", 0).await;
}

#[tokio::test]
async fn stop_container_of_an_exited_container_is_ok_and_keeps_its_exit_code() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let config = ContainerConfigBuilder::new("echo", ECHO_P1)
        .env("EXIT_CODE", "3")
        .build();
    let exited = cri.run_to_exit(&pod, config, GUEST_TIMEOUT).await.unwrap();

    cri.stop_container(&exited.id, 0).await.unwrap();
    cri.stop_container(&exited.id, 10).await.unwrap();

    let status = cri.container_status(&exited.id).await.unwrap();
    assert_eq!(status.state(), cri::ContainerState::ContainerExited);
    assert_eq!(status.exit_code, 3, "{status:?}");
    assert_eq!(status.finished_at, exited.finished_at);
}

#[tokio::test]
async fn remove_container_works_in_every_state() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let created = ContainerConfigBuilder::new("created", ECHO_P1).build();
    let created = cri.create_container(&pod, created).await.unwrap();
    let running = running_sleeper(&mut cri, &pod, "running").await;
    let exited = ContainerConfigBuilder::new("exited", ECHO_P1).build();
    let exited = cri
        .run_to_exit(&pod, exited, GUEST_TIMEOUT)
        .await
        .unwrap()
        .id;

    for id in [&created, &running, &exited] {
        cri.remove_container(id).await.unwrap();
        assert_code(cri.container_status(id).await, Code::NotFound);
    }
    assert!(cri.list_containers(None).await.unwrap().is_empty());
    // The sandbox itself is untouched.
    let status = cri.pod_sandbox_status(&pod.id).await.unwrap();
    assert_eq!(status.state(), cri::PodSandboxState::SandboxReady);
}

#[tokio::test]
async fn remove_container_twice_or_of_an_unknown_id_is_ok() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let config = ContainerConfigBuilder::new("echo", ECHO_P1).build();
    let id = cri.create_container(&pod, config).await.unwrap();
    cri.remove_container(&id).await.unwrap();

    cri.remove_container(&id).await.unwrap();
    cri.remove_container(UNKNOWN_ID).await.unwrap();
}

#[tokio::test]
async fn container_status_reports_times_image_metadata_mounts_and_full_log_path() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let data = wasmlet.scratch("data");
    let config = ContainerConfigBuilder::new("echo", ECHO_P1)
        .mount(&data, "/data", true)
        .label("app", "echo")
        .annotation("note", "kept")
        .build();

    let before = now_ns();
    let status = cri
        .run_to_exit(&pod, config.clone(), GUEST_TIMEOUT)
        .await
        .unwrap();
    let after = now_ns();

    assert_eq!(status.state(), cri::ContainerState::ContainerExited);
    assert!(status.created_at > EPOCH_NS_FLOOR, "{status:?}");
    assert!(
        before - SECOND_NS <= status.created_at
            && status.created_at <= status.started_at
            && status.started_at <= status.finished_at
            && status.finished_at <= after + SECOND_NS,
        "want {before} <= created_at <= started_at <= finished_at <= {after}: {status:?}"
    );
    assert_eq!(status.metadata, config.metadata);
    assert_eq!(
        status.image.as_ref().map(|i| i.image.as_str()),
        Some(ECHO_P1)
    );
    assert_eq!(status.image_ref, repo_digest(&mut cri, ECHO_P1).await);
    assert_eq!(status.labels, config.labels);
    assert_eq!(status.annotations, config.annotations);
    let mounts: Vec<_> = status
        .mounts
        .iter()
        .map(|m| {
            (
                m.container_path.as_str(),
                Path::new(&m.host_path),
                m.readonly,
            )
        })
        .collect();
    assert_eq!(mounts, [("/data", data.as_path(), true)]);
    assert_eq!(Path::new(&status.log_path), pod.container_log(&config));
}

/// Pod A: `a-exited` (app=a, exited) and `a-running` (app=b, running);
/// pod B: `b-created` (app=a, created).
struct ThreeContainers {
    /// Keeps the daemon running.
    _wasmlet: Wasmlet,
    cri: CriClient,
    pod_a: Pod,
    a_exited: String,
    a_running: String,
    b_created: String,
}

impl ThreeContainers {
    async fn start() -> Self {
        let wasmlet = Wasmlet::start().await;
        let mut cri = wasmlet.cri();
        let pod_a = cri.run_pod(wasmlet.pod().build()).await.unwrap();
        let pod_b = cri.run_pod(wasmlet.pod().build()).await.unwrap();
        let config = |name: &str, image: &str, app: &str| {
            ContainerConfigBuilder::new(name, image)
                .label("app", app)
                .build()
        };
        let a_exited = cri
            .run_to_exit(&pod_a, config("a-exited", ECHO_P1, "a"), GUEST_TIMEOUT)
            .await
            .unwrap()
            .id;
        let a_running = cri
            .start(&pod_a, config("a-running", SLEEPER_P1, "b"))
            .await
            .unwrap();
        cri.wait_for_state(
            &a_running,
            cri::ContainerState::ContainerRunning,
            RUNNING_TIMEOUT,
        )
        .await
        .unwrap();
        let b_created = cri
            .create_container(&pod_b, config("b-created", ECHO_P1, "a"))
            .await
            .unwrap();
        ThreeContainers {
            _wasmlet: wasmlet,
            cri,
            pod_a,
            a_exited,
            a_running,
            b_created,
        }
    }

    async fn list(&mut self, filter: cri::ContainerFilter) -> BTreeSet<String> {
        let listed = self.cri.list_containers(Some(filter)).await.unwrap();
        listed.into_iter().map(|c| c.id).collect()
    }
}

fn set<const N: usize>(ids: [&String; N]) -> BTreeSet<String> {
    ids.into_iter().cloned().collect()
}

#[tokio::test]
async fn list_containers_reports_sandbox_image_state_and_metadata() {
    let mut three = ThreeContainers::start().await;
    let listed = three.cri.list_containers(None).await.unwrap();
    let ids: BTreeSet<_> = listed.iter().map(|c| c.id.clone()).collect();
    assert_eq!(
        ids,
        set([&three.a_exited, &three.a_running, &three.b_created])
    );

    let running = listed.iter().find(|c| c.id == three.a_running).unwrap();
    assert_eq!(running.pod_sandbox_id, three.pod_a.id);
    assert_eq!(running.state(), cri::ContainerState::ContainerRunning);
    assert_eq!(
        running.metadata.as_ref().map(|m| m.name.as_str()),
        Some("a-running")
    );
    assert_eq!(
        running.image.as_ref().map(|i| i.image.as_str()),
        Some(SLEEPER_P1)
    );
    assert_eq!(
        running.image_ref,
        repo_digest(&mut three.cri, SLEEPER_P1).await
    );
    assert_eq!(running.labels, HashMap::from([("app".into(), "b".into())]));
    assert!(running.created_at > EPOCH_NS_FLOOR, "{running:?}");
}

#[tokio::test]
async fn list_containers_filters_by_id() {
    let mut three = ThreeContainers::start().await;
    let id = three.a_running.clone();
    let filter = cri::ContainerFilter {
        id: id.clone(),
        ..Default::default()
    };
    assert_eq!(three.list(filter).await, set([&id]));
    let filter = cri::ContainerFilter {
        id: UNKNOWN_ID.to_owned(),
        ..Default::default()
    };
    assert_eq!(three.list(filter).await, BTreeSet::new());
}

#[tokio::test]
async fn list_containers_filters_by_state() {
    let mut three = ThreeContainers::start().await;
    let filter = |state: cri::ContainerState| cri::ContainerFilter {
        state: Some(cri::ContainerStateValue {
            state: state as i32,
        }),
        ..Default::default()
    };
    let (exited, running, created) = (
        three.a_exited.clone(),
        three.a_running.clone(),
        three.b_created.clone(),
    );
    let by_state = three
        .list(filter(cri::ContainerState::ContainerExited))
        .await;
    assert_eq!(by_state, set([&exited]));
    let by_state = three
        .list(filter(cri::ContainerState::ContainerRunning))
        .await;
    assert_eq!(by_state, set([&running]));
    let by_state = three
        .list(filter(cri::ContainerState::ContainerCreated))
        .await;
    assert_eq!(by_state, set([&created]));
}

#[tokio::test]
async fn list_containers_filters_by_sandbox() {
    let mut three = ThreeContainers::start().await;
    let filter = cri::ContainerFilter {
        pod_sandbox_id: three.pod_a.id.clone(),
        ..Default::default()
    };
    let (exited, running) = (three.a_exited.clone(), three.a_running.clone());
    assert_eq!(three.list(filter).await, set([&exited, &running]));
    let filter = cri::ContainerFilter {
        pod_sandbox_id: UNKNOWN_ID.to_owned(),
        ..Default::default()
    };
    assert_eq!(three.list(filter).await, BTreeSet::new());
}

#[tokio::test]
async fn list_containers_label_selector_and_other_filters_all_apply() {
    let mut three = ThreeContainers::start().await;
    let app_a = HashMap::from([("app".to_owned(), "a".to_owned())]);
    let (exited, created) = (three.a_exited.clone(), three.b_created.clone());

    let filter = cri::ContainerFilter {
        label_selector: app_a.clone(),
        ..Default::default()
    };
    assert_eq!(three.list(filter).await, set([&exited, &created]));

    let filter = cri::ContainerFilter {
        label_selector: app_a.clone(),
        pod_sandbox_id: three.pod_a.id.clone(),
        ..Default::default()
    };
    assert_eq!(three.list(filter).await, set([&exited]));

    let mut two_pairs = app_a;
    two_pairs.insert("tier".to_owned(), "front".to_owned());
    let filter = cri::ContainerFilter {
        label_selector: two_pairs,
        ..Default::default()
    };
    assert_eq!(three.list(filter).await, BTreeSet::new());
}
