//! ReopenContainerLog: the kubelet rotates a container's log by renaming
//! the file and asking the runtime to reopen it. Under steady output no
//! line may be lost or written twice across rotations.

use std::path::PathBuf;
use std::time::Duration;

use wasmlet_conformance::{Code, ContainerConfigBuilder, Stream, cri, read_cri_log, wait_for_log};

use crate::daemon::Wasmlet;
use crate::{ECHO_P1, GUEST_TIMEOUT, RUNNING_TIMEOUT, TICKER_P1, UNKNOWN_ID};

async fn reopen(cri: &mut wasmlet_conformance::CriClient, id: &str) -> Result<(), tonic::Status> {
    cri.runtime()
        .reopen_container_log(cri::ReopenContainerLogRequest {
            container_id: id.to_owned(),
        })
        .await
        .map(|_| ())
}

/// The `tick N` numbers in a log file's stdout records, in order.
fn ticks(path: &PathBuf) -> Vec<u64> {
    read_cri_log(path)
        .unwrap()
        .iter()
        .filter(|r| r.stream == Stream::Stdout)
        .map(|r| {
            assert!(!r.partial, "{r:?}");
            r.text
                .strip_prefix("tick ")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("not a tick: {r:?}"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_steady_output_loses_and_repeats_no_line() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let ticker = ContainerConfigBuilder::new("ticker", TICKER_P1)
        .env("TICK_MS", "1")
        .build();
    let log = pod.container_log(&ticker);
    let id = cri.start(&pod, ticker).await.unwrap();

    let mut rotated = Vec::new();
    for i in 0..8 {
        tokio::time::sleep(Duration::from_millis(40)).await;
        let to = log.with_extension(format!("log.{i}"));
        std::fs::rename(&log, &to).unwrap();
        reopen(&mut cri, &id).await.unwrap();
        rotated.push(to);
    }
    // The new file fills as the old ones did.
    wait_for_log(
        &log,
        RUNNING_TIMEOUT,
        "ticks after the last rotation",
        |r| r.len() >= 3,
    )
    .await
    .unwrap();
    cri.stop_container(&id, 0).await.unwrap();

    let mut all = Vec::new();
    for file in rotated.iter().chain(std::iter::once(&log)) {
        let part = ticks(file);
        assert!(!part.is_empty(), "{} got no line", file.display());
        all.extend(part);
    }
    let expected: Vec<u64> = (1..=all.len() as u64).collect();
    assert_eq!(all, expected, "lines lost or repeated across rotations");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_running_containers_log_can_be_reopened() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let echo = ContainerConfigBuilder::new("echo", ECHO_P1).build();
    let id = cri.create_container(&pod, echo).await.unwrap();
    let created = reopen(&mut cri, &id).await.unwrap_err();
    assert_eq!(created.code(), Code::FailedPrecondition, "{created:?}");
    cri.start_container(&id).await.unwrap();
    cri.wait_exited(&id, GUEST_TIMEOUT).await.unwrap();
    let exited = reopen(&mut cri, &id).await.unwrap_err();
    assert_eq!(exited.code(), Code::FailedPrecondition, "{exited:?}");
    assert!(exited.message().contains("not running"), "{exited:?}");
    let unknown = reopen(&mut cri, UNKNOWN_ID).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}
