//! Faults injected, not assumed: the debug build's failpoints
//! (`WASMLET_FAILPOINTS`, see `agent/src/failpoint.rs`) kill the agent
//! (SIGKILL: no destructor, no flush) or fail the step at each step of pull,
//! compile, create, start, stop, remove and CNI ADD/DEL. The root is then
//! served again without failpoints, and what that agent finds must be
//! consistent:
//!
//! - the state lists whole objects only: every container in a listed pod, in
//!   a legal state, none running (what ran is EXITED 255);
//! - the image store holds an image whole or not at all: ImageStatus and
//!   ListImages agree, a listed image runs, an unlisted one left no blob;
//! - the compiled cache holds no temporary file and no artifact without its
//!   metadata (nor metadata without its artifact); the root holds no files
//!   of a container that is not listed;
//! - the netns directory pins no namespace of a pod that is not recorded,
//!   and host-local holds no address for one;
//!
//! and the kubelet's next calls succeed: the call retried, then everything
//! stopped and removed.
//!
//! Each case is one armed start and one clean restart of the daemon; the
//! cases of an area run one after another on one root.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use wasmlet_conformance::fixtures::registry::{Registry, RegistryOptions, sha256_digest};
use wasmlet_conformance::pod_network::TestNetwork;
use wasmlet_conformance::{Code, ContainerConfigBuilder, CriClient, Error, Pod, assert_code, cri};

use crate::daemon::Wasmlet;
use crate::networked::test_network;
use crate::registry_common::{bounded, tagged_wasm};
use crate::{ECHO_P1, GUEST_TIMEOUT, RUNNING_TIMEOUT, SLEEPER_P1};

/// What arms the daemon's failpoints.
const FAILPOINTS: &str = "WASMLET_FAILPOINTS";

/// Bounds each area's cases (a daemon start is about a second).
const AREA_TIMEOUT: Duration = Duration::from_secs(120);

/// How long the agent's network teardown of an orphan may lag its start.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the root with `failpoints` (`name=action;...`) armed.
async fn arm(wasmlet: &mut Wasmlet, failpoints: &str) -> CriClient {
    wasmlet.set_env(FAILPOINTS, Some(failpoints));
    wasmlet.restart().await
}

/// Serves the root again without failpoints.
async fn recover(wasmlet: &mut Wasmlet) -> CriClient {
    wasmlet.set_env(FAILPOINTS, None);
    wasmlet.restart().await
}

/// Asserts that `call` failed because the agent died at `failpoint`.
async fn assert_killed<T: Debug>(wasmlet: &mut Wasmlet, failpoint: &str, call: Result<T, Error>) {
    assert!(call.is_err(), "{failpoint}: the call answered {call:?}");
    let status = wasmlet.wait_exit().await;
    assert_eq!(
        status.signal(),
        Some(nix::sys::signal::Signal::SIGKILL as i32),
        "{failpoint}: the agent ended with {status}"
    );
    assert!(
        wasmlet
            .daemon_log()
            .contains(&format!("failpoint {failpoint}: killing the agent")),
        "{failpoint} did not fire"
    );
}

/// Asserts that `call` failed with `failpoint`'s error, the agent alive.
fn assert_failed<T: Debug>(failpoint: &str, call: Result<T, Error>) {
    let status = assert_code(call, Code::Internal);
    assert!(
        status.message().contains(failpoint),
        "{failpoint}: {status:?}"
    );
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(entry.path());
            } else {
                out.push(entry.path());
            }
        }
    }
    out
}

fn names_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The compiled artifacts (`<wasm digest hex>.cwasm`) under the root.
fn artifacts(wasmlet: &Wasmlet) -> BTreeSet<String> {
    files_under(&wasmlet.root().join("compiled"))
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .filter_map(|p| Some(p.file_stem()?.to_string_lossy().into_owned()))
        .collect()
}

/// What the agent serving `wasmlet`'s root must hold after any fault: see
/// the module's documentation. `net` is the pods' network, if they have one.
async fn assert_consistent(
    wasmlet: &Wasmlet,
    cri: &mut CriClient,
    net: Option<&TestNetwork>,
    case: &str,
) {
    let pods = cri.list_pod_sandbox(None).await.unwrap();
    let pod_ids: BTreeSet<&str> = pods.iter().map(|p| p.id.as_str()).collect();
    let containers = cri.list_containers(None).await.unwrap();
    for container in &containers {
        assert!(
            pod_ids.contains(container.pod_sandbox_id.as_str()),
            "{case}: container of a pod that is not listed: {container:?}"
        );
        let status = cri.container_status(&container.id).await.unwrap();
        assert_eq!(status.state, container.state, "{case}: {status:?}");
        match status.state() {
            cri::ContainerState::ContainerCreated => {
                assert_eq!(status.started_at, 0, "{case}: {status:?}")
            }
            cri::ContainerState::ContainerExited => {
                assert!(status.finished_at > 0, "{case}: {status:?}")
            }
            other => panic!("{case}: {other:?} after a restart: {status:?}"),
        }
    }
    let container_ids: BTreeSet<String> = containers.iter().map(|c| c.id.clone()).collect();
    let dirs = names_in(&wasmlet.root().join("containers"));
    assert!(
        dirs.is_subset(&container_ids),
        "{case}: files of containers that do not exist: {:?}",
        dirs.difference(&container_ids).collect::<Vec<_>>()
    );

    // Images: whole or not at all.
    let images = cri.list_images(None).await.unwrap();
    for image in &images {
        let status = cri.image_status(&image.id).await.unwrap();
        assert_eq!(status.as_ref().map(|s| &s.id), Some(&image.id), "{case}");
    }
    let ingest = names_in(&wasmlet.root().join("images").join("ingest"));
    assert!(ingest.is_empty(), "{case}: half-written blobs {ingest:?}");

    // The compiled cache: whole pairs, nothing half-written.
    let compiled = files_under(&wasmlet.root().join("compiled"));
    for file in &compiled {
        let partner = match file.extension().and_then(|e| e.to_str()) {
            Some("cwasm") => file.with_extension("json"),
            Some("json") => file.with_extension("cwasm"),
            _ => panic!("{case}: a stray file in the compiled cache: {file:?}"),
        };
        assert!(
            partner.exists(),
            "{case}: {file:?} without {partner:?} in the compiled cache"
        );
    }

    if let Some(net) = net {
        for name in net.namespaces() {
            let id = name.strip_prefix("wasmlet-").unwrap_or(&name);
            assert!(
                pods.iter()
                    .any(|p| p.id == id && p.state() == cri::PodSandboxState::SandboxReady),
                "{case}: namespace {name} pinned for no ready pod: {pods:?}"
            );
        }
        let ready = pods
            .iter()
            .filter(|p| p.state() == cri::PodSandboxState::SandboxReady)
            .count();
        assert!(
            net.allocated_ips().len() <= ready,
            "{case}: addresses {:?} held for {ready} ready pods",
            net.allocated_ips()
        );
    }
}

/// The containers listed in `pod`.
async fn containers_of(cri: &mut CriClient, pod: &Pod) -> Vec<cri::Container> {
    let containers = cri.list_containers(None).await.unwrap();
    containers
        .into_iter()
        .filter(|c| c.pod_sandbox_id == pod.id)
        .collect()
}

/// Stops and removes `pod`, asserting it is gone, then ends the daemon.
async fn finish(wasmlet: &mut Wasmlet, cri: &mut CriClient, pod: &Pod) {
    cri.stop_pod_sandbox(&pod.id).await.unwrap();
    cri.remove_pod_sandbox(&pod.id).await.unwrap();
    assert!(containers_of(cri, pod).await.is_empty());
    assert!(cri.list_pod_sandbox(None).await.unwrap().is_empty());
    wasmlet.kill_9().await;
}

fn echo() -> cri::ContainerConfig {
    ContainerConfigBuilder::new("echo", ECHO_P1).build()
}

async fn run_echo(cri: &mut CriClient, pod: &Pod, config: cri::ContainerConfig) -> String {
    let status = cri.run_to_exit(pod, config, GUEST_TIMEOUT).await.unwrap();
    assert_eq!(status.exit_code, 0, "{status:?}");
    status.id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_are_whole_after_the_agent_dies_creating_starting_stopping_or_removing() {
    bounded(AREA_TIMEOUT, async {
        let mut wasmlet = Wasmlet::new();

        // Killed before and after the create's commit: listed only if
        // recorded, and the kubelet's retry converges on one container.
        for (failpoint, recorded) in [("create.before_commit", 0), ("create.after_commit", 1)] {
            let mut cri = arm(&mut wasmlet, &format!("{failpoint}=kill")).await;
            let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
            let created = cri.create_container(&pod, echo()).await;
            assert_killed(&mut wasmlet, failpoint, created).await;
            let mut cri = recover(&mut wasmlet).await;
            assert_consistent(&wasmlet, &mut cri, None, failpoint).await;
            let listed = containers_of(&mut cri, &pod).await;
            assert_eq!(listed.len(), recorded, "{failpoint}: {listed:?}");
            let id = cri.create_container(&pod, echo()).await.unwrap();
            if let Some(before) = listed.first() {
                assert_eq!(
                    id, before.id,
                    "{failpoint}: the retry made another container"
                );
            }
            assert_eq!(containers_of(&mut cri, &pod).await.len(), 1);
            cri.start_container(&id).await.unwrap();
            let status = cri.wait_exited(&id, GUEST_TIMEOUT).await.unwrap();
            assert_eq!(status.exit_code, 0, "{failpoint}: {status:?}");
            finish(&mut wasmlet, &mut cri, &pod).await;
        }

        // Killed before the start's commit: still CREATED, and starts.
        let failpoint = "start.before_commit";
        let mut cri = arm(&mut wasmlet, &format!("{failpoint}=kill")).await;
        let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
        let id = cri.create_container(&pod, echo()).await.unwrap();
        let started = cri.start_container(&id).await;
        assert_killed(&mut wasmlet, failpoint, started).await;
        let mut cri = recover(&mut wasmlet).await;
        assert_consistent(&wasmlet, &mut cri, None, failpoint).await;
        let status = cri.container_status(&id).await.unwrap();
        assert_eq!(status.state(), cri::ContainerState::ContainerCreated);
        cri.start_container(&id).await.unwrap();
        assert_eq!(
            cri.wait_exited(&id, GUEST_TIMEOUT).await.unwrap().exit_code,
            0
        );
        finish(&mut wasmlet, &mut cri, &pod).await;

        // Killed after the start's commit, or with the guest killed by a
        // stop before its exit is recorded: EXITED 255, and the kubelet's
        // next calls (stop, remove, the next attempt) succeed.
        for failpoint in ["start.after_commit", "stop.before_record"] {
            let mut cri = arm(&mut wasmlet, &format!("{failpoint}=kill")).await;
            let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
            let sleeper = ContainerConfigBuilder::new("sleeper", SLEEPER_P1).build();
            let id = cri.create_container(&pod, sleeper).await.unwrap();
            let call = match failpoint {
                "start.after_commit" => cri.start_container(&id).await,
                _ => {
                    cri.start_container(&id).await.unwrap();
                    cri.wait_for_state(&id, cri::ContainerState::ContainerRunning, RUNNING_TIMEOUT)
                        .await
                        .unwrap();
                    cri.stop_container(&id, 0).await
                }
            };
            assert_killed(&mut wasmlet, failpoint, call).await;
            let mut cri = recover(&mut wasmlet).await;
            assert_consistent(&wasmlet, &mut cri, None, failpoint).await;
            let status = cri.container_status(&id).await.unwrap();
            assert_eq!(
                (status.state(), status.exit_code, status.reason.as_str()),
                (cri::ContainerState::ContainerExited, 255, "Error"),
                "{failpoint}: {status:?}"
            );
            assert_code(cri.start_container(&id).await, Code::FailedPrecondition);
            cri.stop_container(&id, 0).await.unwrap();
            cri.remove_container(&id).await.unwrap();
            let next = ContainerConfigBuilder::new("sleeper", SLEEPER_P1)
                .attempt(1)
                .build();
            let next = cri.start(&pod, next).await.unwrap();
            cri.wait_for_state(
                &next,
                cri::ContainerState::ContainerRunning,
                RUNNING_TIMEOUT,
            )
            .await
            .unwrap();
            cri.stop_container(&next, 0).await.unwrap();
            finish(&mut wasmlet, &mut cri, &pod).await;
        }

        // Killed between a removal's commit and the removal of its files
        // (a container's, a pod's): gone, files too; removing again works.
        for failpoint in ["remove.container.after_commit", "remove.pod.after_commit"] {
            let mut cri = arm(&mut wasmlet, &format!("{failpoint}=kill")).await;
            let config = wasmlet.pod().build();
            let pod = cri.run_pod(config.clone()).await.unwrap();
            let id = run_echo(&mut cri, &pod, echo()).await;
            let files = wasmlet.root().join("containers").join(&id);
            assert!(
                files.exists(),
                "{failpoint}: no files at {files:?} to leave behind"
            );
            let removed = match failpoint {
                "remove.container.after_commit" => cri.remove_container(&id).await,
                _ => cri.remove_pod_sandbox(&pod.id).await,
            };
            assert_killed(&mut wasmlet, failpoint, removed).await;
            let mut cri = recover(&mut wasmlet).await;
            assert_consistent(&wasmlet, &mut cri, None, failpoint).await;
            assert!(
                !files.exists(),
                "{failpoint}: {files:?} outlived its container"
            );
            assert!(containers_of(&mut cri, &pod).await.is_empty());
            cri.remove_container(&id).await.unwrap();
            cri.remove_pod_sandbox(&pod.id).await.unwrap();
            // The kubelet's next pod of that name runs.
            let pod = cri.run_pod(config).await.unwrap();
            run_echo(&mut cri, &pod, echo()).await;
            finish(&mut wasmlet, &mut cri, &pod).await;
        }

        // Steps that fail (the agent lives on): nothing half done, and the
        // retry after a restart succeeds.
        for failpoint in ["create.before_commit", "start.before_commit"] {
            let mut cri = arm(&mut wasmlet, &format!("{failpoint}=error")).await;
            let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
            let id = match failpoint {
                "create.before_commit" => {
                    assert_failed(failpoint, cri.create_container(&pod, echo()).await);
                    None
                }
                _ => {
                    let id = cri.create_container(&pod, echo()).await.unwrap();
                    assert_failed(failpoint, cri.start_container(&id).await);
                    let status = cri.container_status(&id).await.unwrap();
                    assert_eq!(status.state(), cri::ContainerState::ContainerCreated);
                    Some(id)
                }
            };
            assert_eq!(
                containers_of(&mut cri, &pod).await.len(),
                usize::from(id.is_some())
            );
            wasmlet.kill_9().await;
            let mut cri = recover(&mut wasmlet).await;
            assert_consistent(&wasmlet, &mut cri, None, failpoint).await;
            let id = match id {
                Some(id) => id,
                None => cri.create_container(&pod, echo()).await.unwrap(),
            };
            cri.start_container(&id).await.unwrap();
            assert_eq!(
                cri.wait_exited(&id, GUEST_TIMEOUT).await.unwrap().exit_code,
                0
            );
            finish(&mut wasmlet, &mut cri, &pod).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_and_compiled_programs_are_whole_after_the_agent_dies_pulling() {
    bounded(AREA_TIMEOUT, async {
        let registry = Registry::start(RegistryOptions::default())
            .await
            .expect("start registry");
        let mut wasmlet = Wasmlet::builder()
            .config(format!(
                "[registry]\ninsecure = [\"{}\"]\n",
                registry.host()
            ))
            .build();
        let echo = std::fs::read(wasm_samples::ECHO_P1).unwrap();
        // (failpoint, action, whether the image is listed after the restart)
        let cases = [
            ("pull.before_record", "kill", false),
            ("pull.after_record", "kill", true),
            ("compile.after_meta", "kill", true),
            ("compile.before_rename", "kill", true),
            ("compile.after_store", "kill", true),
            ("pull.before_record", "error", false),
            ("compile.before_rename", "error", true),
        ];
        for (n, (failpoint, action, listed)) in cases.into_iter().enumerate() {
            let case = format!("{failpoint}={action}");
            // A program of its own, so that the pull downloads and compiles.
            let wasm = tagged_wasm(&echo, &format!("fault-{n}"));
            let digest = sha256_digest(&wasm);
            let hex = &digest["sha256:".len()..];
            let file = wasmlet.scratch("wasm").join(format!("fault-{n}.wasm"));
            std::fs::write(&file, &wasm).unwrap();
            let reference = format!("{}/faults/echo:{n}", registry.host());
            Wasmlet::push(&file, &reference, None);
            let blob = wasmlet.root().join("images/blobs/sha256").join(hex);

            let mut cri = arm(&mut wasmlet, &case).await;
            let pulled = cri.pull_image(&reference).await;
            match (action, listed) {
                ("kill", _) => assert_killed(&mut wasmlet, failpoint, pulled).await,
                (_, false) => {
                    assert_failed(failpoint, pulled);
                    assert!(cri.image_status(&reference).await.unwrap().is_none());
                    assert!(!blob.exists(), "{case}: the failed pull left {blob:?}");
                    wasmlet.kill_9().await;
                }
                (_, true) => {
                    // A compile that fails does not fail the pull: its
                    // containers compile when created.
                    pulled.unwrap();
                    let left: Vec<PathBuf> = files_under(&wasmlet.root().join("compiled"))
                        .into_iter()
                        .filter(|f| f.to_string_lossy().contains(hex))
                        .collect();
                    assert!(left.is_empty(), "{case}: the failed compile left {left:?}");
                    wasmlet.kill_9().await;
                }
            }
            let mut cri = recover(&mut wasmlet).await;
            assert_consistent(&wasmlet, &mut cri, None, &case).await;
            let status = cri.image_status(&reference).await.unwrap();
            let in_list = cri
                .list_images(None)
                .await
                .unwrap()
                .iter()
                .any(|i| i.repo_tags.contains(&reference));
            assert_eq!((status.is_some(), in_list), (listed, listed), "{case}");
            let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
            let config = ContainerConfigBuilder::new("echo", &reference).build();
            if listed {
                run_echo(&mut cri, &pod, config.clone()).await;
            } else {
                assert!(!blob.exists(), "{case}: an unrecorded pull left {blob:?}");
            }

            // The kubelet pulls again: the image is stored, compiled, runs.
            let id = cri.pull_image(&reference).await.unwrap();
            assert_eq!(
                cri.image_status(&reference).await.unwrap().map(|i| i.id),
                Some(id),
                "{case}"
            );
            assert!(
                artifacts(&wasmlet).contains(hex),
                "{case}: the pull did not compile {digest}"
            );
            let config = ContainerConfigBuilder::new("echo", &reference)
                .attempt(1)
                .build();
            run_echo(&mut cri, &pod, config).await;
            assert_consistent(&wasmlet, &mut cri, None, &case).await;
            cri.stop_pod_sandbox(&pod.id).await.unwrap();
            cri.remove_pod_sandbox(&pod.id).await.unwrap();
            cri.remove_image(&reference).await.unwrap();
            assert!(cri.image_status(&reference).await.unwrap().is_none());
            assert!(!blob.exists(), "{case}: removing the image left {blob:?}");
            wasmlet.kill_9().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_networks_are_whole_after_the_agent_dies_in_cni_add_or_del() {
    bounded(AREA_TIMEOUT, async {
        let net = test_network();
        let mut wasmlet = Wasmlet::builder().config(net.wasmlet_config()).build();
        for action in ["kill", "error"] {
            // Between ADD and the sandbox's record: the namespace and the
            // address go, and the kubelet's retry of the pod runs.
            let failpoint = "cni.add.after";
            let case = format!("{failpoint}={action}");
            let mut cri = arm(&mut wasmlet, &case).await;
            let config = wasmlet.pod().build();
            let ran = cri.run_pod(config.clone()).await;
            if action == "kill" {
                assert_killed(&mut wasmlet, failpoint, ran).await;
            } else {
                assert_failed(failpoint, ran);
                assert_eq!(net.namespaces(), Vec::<String>::new(), "{case}");
                assert_eq!(net.allocated_ips(), Vec::<String>::new(), "{case}");
                wasmlet.kill_9().await;
            }
            let mut cri = recover(&mut wasmlet).await;
            assert_consistent(&wasmlet, &mut cri, Some(&net), &case).await;
            assert!(
                cri.list_pod_sandbox(None).await.unwrap().is_empty(),
                "{case}"
            );
            settled(&net, &case).await;
            let pod = cri.run_pod(config).await.unwrap();
            let ip = pod_ip(&mut cri, &pod).await;
            assert!(net.contains(&ip), "{case}: pod IP {ip:?}");
            assert_eq!(net.allocated_ips(), [ip], "{case}");
            finish(&mut wasmlet, &mut cri, &pod).await;
            settled(&net, &case).await;

            // Between DEL and the record of the teardown: the pod is not
            // ready, and stopping and removing it again succeed.
            let failpoint = "cni.del.after";
            let case = format!("{failpoint}={action}");
            let mut cri = arm(&mut wasmlet, &case).await;
            let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
            let stopped = cri.stop_pod_sandbox(&pod.id).await;
            if action == "kill" {
                assert_killed(&mut wasmlet, failpoint, stopped).await;
            } else {
                assert_failed(failpoint, stopped);
                wasmlet.kill_9().await;
            }
            let mut cri = recover(&mut wasmlet).await;
            assert_consistent(&wasmlet, &mut cri, Some(&net), &case).await;
            let status = cri.pod_sandbox_status(&pod.id).await.unwrap();
            assert_eq!(
                status.state(),
                cri::PodSandboxState::SandboxNotready,
                "{case}: {status:?}"
            );
            finish(&mut wasmlet, &mut cri, &pod).await;
            settled(&net, &case).await;
        }

        // After the sandbox's record, before the answer: the pod is ready
        // in its namespace, and the kubelet's retry gets it.
        let failpoint = "cni.add.after_commit";
        let mut cri = arm(&mut wasmlet, &format!("{failpoint}=kill")).await;
        let config = wasmlet.pod().build();
        let ran = cri.run_pod(config.clone()).await;
        assert_killed(&mut wasmlet, failpoint, ran).await;
        let mut cri = recover(&mut wasmlet).await;
        assert_consistent(&wasmlet, &mut cri, Some(&net), failpoint).await;
        let pods = cri.list_pod_sandbox(None).await.unwrap();
        assert_eq!(pods.len(), 1, "{pods:?}");
        assert_eq!(pods[0].state(), cri::PodSandboxState::SandboxReady);
        assert_eq!(net.namespaces(), [format!("wasmlet-{}", pods[0].id)]);
        let pod = cri.run_pod(config).await.unwrap();
        assert_eq!(pod.id, pods[0].id, "the retry made another pod");
        let ip = pod_ip(&mut cri, &pod).await;
        assert_eq!(net.allocated_ips(), [ip]);
        run_echo(&mut cri, &pod, echo()).await;
        finish(&mut wasmlet, &mut cri, &pod).await;
        settled(&net, failpoint).await;

        // The same DEL, reached by RemovePodSandbox of a ready pod: nothing
        // of the pod was removed, and removing it again succeeds.
        let failpoint = "cni.del.after";
        let case = "cni.del.after=kill, removing";
        let mut cri = arm(&mut wasmlet, "cni.del.after=kill").await;
        let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
        let id = run_echo(&mut cri, &pod, echo()).await;
        let removed = cri.remove_pod_sandbox(&pod.id).await;
        assert_killed(&mut wasmlet, failpoint, removed).await;
        let mut cri = recover(&mut wasmlet).await;
        assert_consistent(&wasmlet, &mut cri, Some(&net), case).await;
        let status = cri.pod_sandbox_status(&pod.id).await.unwrap();
        assert_eq!(status.state(), cri::PodSandboxState::SandboxNotready);
        let listed = containers_of(&mut cri, &pod).await;
        assert_eq!(listed.iter().map(|c| &c.id).collect::<Vec<_>>(), [&id]);
        cri.remove_pod_sandbox(&pod.id).await.unwrap();
        assert!(cri.list_pod_sandbox(None).await.unwrap().is_empty());
        assert!(containers_of(&mut cri, &pod).await.is_empty());
        settled(&net, case).await;
        wasmlet.kill_9().await;
    })
    .await;
}

/// The pod's IP as PodSandboxStatus reports it.
async fn pod_ip(cri: &mut CriClient, pod: &Pod) -> String {
    let status = cri.pod_sandbox_status(&pod.id).await.unwrap();
    status.network.unwrap_or_default().ip
}

/// Waits until the test network holds no namespace and no address.
async fn settled(net: &TestNetwork, case: &str) {
    let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
    while !(net.namespaces().is_empty() && net.allocated_ips().is_empty()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{case}: left behind: namespaces {:?}, addresses {:?}",
            net.namespaces(),
            net.allocated_ips()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
