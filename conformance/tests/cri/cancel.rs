//! Calls their client gives up on. tonic drops a handler's future when the
//! client goes away, as the kubelet's client does after its
//! `runtime-request-timeout`, and the kubelet then retries with the same
//! name and attempt. Whatever point a call is cancelled at (its slow
//! points: a compile, a CNI plugin), the object converges: the retry
//! succeeds with the same object, nothing is duplicated, and the object can
//! then be started, stopped, removed and listed correctly.

use std::future::Future;
use std::time::Duration;

use wasmlet_conformance::{ContainerConfigBuilder, CriClient, Pod, cri};

use crate::daemon::Wasmlet;
use crate::networked::{pod_ip, test_network};
use crate::{RUNNING_TIMEOUT, SLEEPER_P1};

/// A module slow to compile, imported under this name.
const BIG: &str = "wasmlet.local/test/big:v1";

/// How long the big module's compile may take in these tests.
const COMPILE_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `call` for at most `after`; true when it was cancelled unfinished.
async fn cancel_after<T>(after: Duration, call: impl Future<Output = T>) -> bool {
    tokio::time::timeout(after, call).await.is_err()
}

/// The pod's containers, as ListContainers shows them.
async fn containers_of(cri: &mut CriClient, pod: &str) -> Vec<cri::Container> {
    cri.list_containers(Some(cri::ContainerFilter {
        pod_sandbox_id: pod.to_owned(),
        ..Default::default()
    }))
    .await
    .unwrap()
}

/// The sandboxes whose pod has `name`.
async fn pods_named(cri: &mut CriClient, name: &str) -> Vec<cri::PodSandbox> {
    cri.list_pod_sandbox(None)
        .await
        .unwrap()
        .into_iter()
        .filter(|p| p.metadata.as_ref().is_some_and(|m| m.name == name))
        .collect()
}

/// Waits until `check` holds, polling; fails the test after `timeout`.
async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_verb_cancelled_at_any_point_converges_when_retried() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    // From cancelled before the request leaves to cancelled as it answers.
    for (round, ms) in [0u64, 1, 2, 3, 5, 8, 13, 21].into_iter().enumerate() {
        let after = Duration::from_millis(ms);
        let name = format!("cancelled-{round}");
        let config = wasmlet.pod().name(name.clone()).build();

        cancel_after(after, cri.run_pod(config.clone())).await;
        let pod = cri
            .run_pod(config.clone())
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox retried after {ms} ms: {e}"));
        let pods = pods_named(&mut cri, &name).await;
        assert_eq!(pods.len(), 1, "one sandbox per pod: {pods:?}");
        assert_eq!(pods[0].id, pod.id);

        let container = ContainerConfigBuilder::new("sleeper", SLEEPER_P1).build();
        cancel_after(after, cri.create_container(&pod, container.clone())).await;
        let id = cri
            .create_container(&pod, container.clone())
            .await
            .unwrap_or_else(|e| panic!("CreateContainer retried after {ms} ms: {e}"));
        let listed = containers_of(&mut cri, &pod.id).await;
        assert_eq!(
            listed.len(),
            1,
            "one container per name and attempt: {listed:?}"
        );
        assert_eq!(listed[0].id, id);

        cancel_after(after, cri.start_container(&id)).await;
        cri.start_container(&id)
            .await
            .unwrap_or_else(|e| panic!("StartContainer retried after {ms} ms: {e}"));
        cri.wait_for_state(&id, cri::ContainerState::ContainerRunning, RUNNING_TIMEOUT)
            .await
            .unwrap();

        cancel_after(after, cri.stop_container(&id, 0)).await;
        cri.stop_container(&id, 0)
            .await
            .unwrap_or_else(|e| panic!("StopContainer retried after {ms} ms: {e}"));
        let status = cri.container_status(&id).await.unwrap();
        assert_eq!(status.state(), cri::ContainerState::ContainerExited);
        assert_eq!(status.exit_code, 137, "{status:?}");

        cancel_after(after, cri.remove_container(&id)).await;
        cri.remove_container(&id)
            .await
            .unwrap_or_else(|e| panic!("RemoveContainer retried after {ms} ms: {e}"));
        assert!(containers_of(&mut cri, &pod.id).await.is_empty());

        // A container of the same name and attempt may be made again once
        // the first is removed, and the pod's verbs converge as well.
        let again = cri.start(&pod, container).await.unwrap();
        assert_ne!(again, id);
        cancel_after(after, cri.stop_pod_sandbox(&pod.id)).await;
        cri.stop_pod_sandbox(&pod.id)
            .await
            .unwrap_or_else(|e| panic!("StopPodSandbox retried after {ms} ms: {e}"));
        let status = cri.container_status(&again).await.unwrap();
        assert_eq!(status.state(), cri::ContainerState::ContainerExited);
        cancel_after(after, cri.remove_pod_sandbox(&pod.id)).await;
        cri.remove_pod_sandbox(&pod.id)
            .await
            .unwrap_or_else(|e| panic!("RemovePodSandbox retried after {ms} ms: {e}"));
        assert!(pods_named(&mut cri, &name).await.is_empty());
        assert!(containers_of(&mut cri, &pod.id).await.is_empty());
    }
    // Nothing was left behind, and the stops of objects already gone
    // succeed (the CRI's stop is idempotent).
    assert!(cri.list_containers(None).await.unwrap().is_empty());
    assert!(cri.list_pod_sandbox(None).await.unwrap().is_empty());
    cri.stop_container(crate::UNKNOWN_ID, 0).await.unwrap();
    cri.stop_pod_sandbox(crate::UNKNOWN_ID).await.unwrap();
}

/// A WASI command that prints a line and then sleeps, with `functions`
/// functions besides that are never called but must all be compiled.
fn big_module(functions: usize) -> Vec<u8> {
    use std::fmt::Write as _;
    let mut wat = String::from(
        r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 256) "big guest started\n")
  (func (export "_start")
    ;; iovec at 0: the line at 256, 18 bytes
    (i32.store (i32.const 0) (i32.const 256))
    (i32.store (i32.const 4) (i32.const 18))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    ;; a relative clock subscription at 64 of one second, polled forever
    (i32.store8 (i32.const 72) (i32.const 0))
    (i32.store (i32.const 80) (i32.const 1))
    (i64.store (i32.const 88) (i64.const 1000000000))
    (loop $sleep
      (drop (call $poll (i32.const 64) (i32.const 128) (i32.const 1) (i32.const 16)))
      (br $sleep)))
"#,
    );
    for f in 0..functions {
        write!(
            wat,
            "  (func $f{f} (param i64 i64) (result i64) local.get 0"
        )
        .unwrap();
        for k in 0..64u64 {
            let c = (f as u64).wrapping_mul(2_654_435_761).wrapping_add(k) | 1;
            write!(
                wat,
                " i64.const {c} i64.mul local.get 1 i64.xor i64.const {k} i64.rotl"
            )
            .unwrap();
        }
        wat.push_str(")\n");
    }
    wat.push(')');
    wat::parse_str(&wat).expect("the big module is valid WAT")
}

/// A daemon with [`BIG`] imported, logging its compiles.
async fn with_big_module() -> Wasmlet {
    let mut wasmlet = Wasmlet::builder().rust_log("info").build();
    let path = wasmlet.scratch("big").join("big.wasm");
    std::fs::write(&path, big_module(12_000)).unwrap();
    wasmlet.import(&path, BIG);
    wasmlet.serve().await;
    wasmlet
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_cancelled_while_compiling_completes_and_its_retry_gets_the_container() {
    let wasmlet = with_big_module().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let config = ContainerConfigBuilder::new("big", BIG).build();

    assert!(
        cancel_after(
            Duration::from_millis(300),
            cri.create_container(&pod, config.clone())
        )
        .await,
        "the big module compiled in 300 ms: too fast to cancel a create during its compile"
    );
    // The container exists once compiled, in one step; meanwhile a retry
    // (cancelled again) and then the kubelet's next attempt join the one
    // compile instead of starting another.
    assert!(containers_of(&mut cri, &pod.id).await.is_empty());
    assert!(
        cancel_after(
            Duration::from_millis(300),
            cri.create_container(&pod, config.clone())
        )
        .await
    );
    let next = ContainerConfigBuilder::new("big", BIG).attempt(1).build();
    let mut other = cri.clone();
    let pod_again: Pod = pod.clone();
    let next_attempt = tokio::spawn(async move { other.create_container(&pod_again, next).await });
    let id = tokio::time::timeout(COMPILE_TIMEOUT, cri.create_container(&pod, config))
        .await
        .expect("the compile ended")
        .unwrap();
    let id_next = next_attempt.await.unwrap().unwrap();
    assert_ne!(id, id_next);
    let listed = containers_of(&mut cri, &pod.id).await;
    assert_eq!(
        listed.len(),
        2,
        "attempt 0 once, attempt 1 once: {listed:?}"
    );
    assert_eq!(
        wasmlet.daemon_log().matches("compiled Wasm").count(),
        1,
        "one compile for all three calls"
    );

    // The container runs a real guest, and stops and goes as any other.
    cancel_after(Duration::from_millis(1), cri.start_container(&id)).await;
    cri.start_container(&id).await.unwrap();
    let status = cri
        .wait_for_state(&id, cri::ContainerState::ContainerRunning, RUNNING_TIMEOUT)
        .await
        .unwrap();
    let log = std::path::Path::new(&status.log_path).to_owned();
    eventually("the guest logs its line", RUNNING_TIMEOUT, || {
        let log = log.clone();
        async move {
            std::fs::read_to_string(&log).is_ok_and(|text| text.contains("big guest started"))
        }
    })
    .await;
    cri.stop_container(&id, 0).await.unwrap();
    assert_eq!(
        cri.container_status(&id).await.unwrap().state(),
        cri::ContainerState::ContainerExited
    );
    cri.remove_container(&id).await.unwrap();
    cri.remove_container(&id_next).await.unwrap();
    cri.remove_pod_sandbox(&pod.id).await.unwrap();
    assert!(cri.list_containers(None).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_calls_cancelled_inside_a_slow_cni_plugin_converge() {
    let mut net = test_network();
    net.slow_down(Duration::from_millis(1500)).unwrap();
    let wasmlet = Wasmlet::builder()
        .config(net.wasmlet_config())
        .start()
        .await;
    let mut cri = wasmlet.cri();
    let config = wasmlet.pod().name("slow-cni").build();

    // Cancelled during CNI ADD: the pod appears only with its network.
    assert!(cancel_after(Duration::from_millis(300), cri.run_pod(config.clone())).await);
    assert!(pods_named(&mut cri, "slow-cni").await.is_empty());
    let pod = cri.run_pod(config).await.unwrap();
    assert_eq!(pods_named(&mut cri, "slow-cni").await.len(), 1);
    let ip = pod_ip(&wasmlet, &pod.id).await;
    assert!(net.contains(&ip), "{ip:?} is not in the test network");
    let id = cri
        .start(
            &pod,
            ContainerConfigBuilder::new("sleeper", SLEEPER_P1).build(),
        )
        .await
        .unwrap();

    // Cancelled during CNI DEL: the stop completes; its retry converges.
    assert!(cancel_after(Duration::from_millis(300), cri.stop_pod_sandbox(&pod.id)).await);
    cri.stop_pod_sandbox(&pod.id).await.unwrap();
    let status = cri.pod_sandbox_status(&pod.id).await.unwrap();
    assert_eq!(status.state(), cri::PodSandboxState::SandboxNotready);
    assert_eq!(
        cri.container_status(&id).await.unwrap().state(),
        cri::ContainerState::ContainerExited
    );
    cancel_after(Duration::from_millis(100), cri.remove_pod_sandbox(&pod.id)).await;
    cri.remove_pod_sandbox(&pod.id).await.unwrap();
    assert!(cri.list_pod_sandbox(None).await.unwrap().is_empty());
    let pinned: Vec<_> = std::fs::read_dir(net.netns_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .collect();
    assert!(pinned.is_empty(), "namespaces left pinned: {pinned:?}");
}
