//! CRI requests as untrusted input: property tests that send pods and
//! containers with arbitrary and extreme strings, sizes and counts
//! (names, labels, annotations, commands, environments, log paths, limits)
//! and check that every call is answered with a status, that the daemon
//! stays up and consistent, and that what it stored survives a restart
//! unchanged.

use std::collections::HashMap;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use wasmlet_conformance::{ContainerConfigBuilder, CriClient, Pod, cri};

use crate::SLEEPER_P1;
use crate::daemon::Wasmlet;

/// Strings a careless or hostile client could send.
fn nasty() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9-]{1,12}",
        ".{0,64}",
        Just(String::new()),
        Just("../../../../etc/passwd".to_owned()),
        Just("/".to_owned()),
        Just("a\0b".to_owned()),
        Just("\u{202e}\u{fffd}\u{1F980}".to_owned()),
        (1usize..300_000).prop_map(|n| "x".repeat(n)),
    ]
}

fn map(entries: std::ops::Range<usize>) -> impl Strategy<Value = HashMap<String, String>> {
    proptest::collection::hash_map(nasty(), nasty(), entries)
}

/// One hostile pod with one hostile container.
#[derive(Debug, Clone)]
struct Case {
    pod_name: String,
    namespace: String,
    labels: HashMap<String, String>,
    annotations: HashMap<String, String>,
    container_name: String,
    command: Vec<String>,
    envs: Vec<(String, String)>,
    log_path: String,
    memory_limit: i64,
    cpu_quota: i64,
    attempt: u32,
}

fn case() -> impl Strategy<Value = Case> {
    (
        (nasty(), nasty(), map(0..6), map(0..6)),
        (
            nasty(),
            proptest::collection::vec(nasty(), 0..4),
            proptest::collection::vec((nasty(), nasty()), 0..6),
            nasty(),
        ),
        (any::<i64>(), any::<i64>(), any::<u32>()),
    )
        .prop_map(
            |(
                (pod_name, namespace, labels, annotations),
                (container_name, command, envs, log_path),
                (memory_limit, cpu_quota, attempt),
            )| Case {
                pod_name,
                namespace,
                labels,
                annotations,
                container_name,
                command,
                envs,
                log_path,
                memory_limit,
                cpu_quota,
                attempt,
            },
        )
}

/// Sends `case` as RunPodSandbox, CreateContainer and StartContainer,
/// then removes what was made; any status is an answer, but the daemon
/// must answer the next call.
async fn send(wasmlet: &Wasmlet, cri: &mut CriClient, case: Case) -> Result<(), TestCaseError> {
    let mut config = wasmlet.pod().build();
    if let Some(meta) = config.metadata.as_mut() {
        meta.name = case.pod_name;
        meta.namespace = case.namespace;
        meta.attempt = case.attempt;
    }
    config.labels.extend(case.labels);
    config.annotations.extend(case.annotations.clone());
    let pod = cri.run_pod_sandbox(config.clone(), "").await;
    if let Ok(id) = pod {
        let pod = Pod { id, config };
        let mut container = ContainerConfigBuilder::new(case.container_name, SLEEPER_P1)
            .attempt(case.attempt)
            .command(case.command)
            .log_path(case.log_path)
            .build();
        container.envs = case
            .envs
            .into_iter()
            .map(|(key, value)| cri::KeyValue {
                key,
                value: value.into_bytes(),
            })
            .collect();
        container.annotations = case.annotations;
        let linux = container.linux.get_or_insert_default();
        let resources = linux.resources.get_or_insert_default();
        resources.memory_limit_in_bytes = case.memory_limit;
        resources.cpu_quota = case.cpu_quota;
        resources.cpu_period = 100_000;
        // The log directory the client would have made; the log path may
        // lie (`..`, absolute): the runtime must refuse to leave it.
        let _ = std::fs::create_dir_all(&pod.config.log_directory);
        let request = cri::CreateContainerRequest {
            pod_sandbox_id: pod.id.clone(),
            config: Some(container),
            sandbox_config: Some(pod.config.clone()),
        };
        if let Ok(created) = cri.runtime().create_container(request).await {
            let id = created.into_inner().container_id;
            let _ = cri.start_container(&id).await;
            let _ = cri.container_status(&id).await;
            cri.remove_container(&id)
                .await
                .map_err(|e| TestCaseError::fail(format!("RemoveContainer: {e}")))?;
        }
        cri.remove_pod_sandbox(&pod.id)
            .await
            .map_err(|e| TestCaseError::fail(format!("RemovePodSandbox: {e}")))?;
    }
    cri.version()
        .await
        .map_err(|e| TestCaseError::fail(format!("the daemon stopped answering: {e}")))?;
    Ok(())
}

#[test]
fn hostile_pods_and_containers_are_answered_and_leave_the_daemon_consistent() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut wasmlet = rt.block_on(Wasmlet::start());
    let mut cri = wasmlet.cri();
    // A pod that must come through every case and the restart unchanged.
    let keeper = rt.block_on(async {
        let pod = cri
            .run_pod(wasmlet.pod().name("keeper").build())
            .await
            .unwrap();
        let id = cri
            .start(
                &pod,
                ContainerConfigBuilder::new("sleeper", SLEEPER_P1).build(),
            )
            .await
            .unwrap();
        (pod.id, id)
    });

    let mut runner = TestRunner::new(Config {
        cases: 48,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&case(), |case| {
            rt.block_on(send(&wasmlet, &mut cri.clone(), case))
        })
        .unwrap();

    rt.block_on(async {
        let pods = cri.list_pod_sandbox(None).await.unwrap();
        assert_eq!(pods.len(), 1, "only the keeper is left: {pods:?}");
        assert_eq!(pods[0].id, keeper.0);
        let containers = cri.list_containers(None).await.unwrap();
        assert_eq!(containers.len(), 1, "{containers:?}");
        wasmlet.terminate().await;
        let mut cri = wasmlet.restart().await;
        let pods = cri.list_pod_sandbox(None).await.unwrap();
        assert_eq!(pods.iter().map(|p| &p.id).collect::<Vec<_>>(), [&keeper.0]);
        let status = cri.container_status(&keeper.1).await.unwrap();
        assert_eq!(status.metadata.unwrap().name, "sleeper");

        // An absolute log path stays inside the pod's log directory, as
        // containerd joins it.
        let outside =
            std::env::temp_dir().join(format!("wasmlet-hostile-{}.log", std::process::id()));
        let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
        let config = ContainerConfigBuilder::new("abs", SLEEPER_P1)
            .log_path(outside.to_string_lossy())
            .build();
        let id = cri.start(&pod, config).await.unwrap();
        let status = cri.container_status(&id).await.unwrap();
        assert!(!outside.exists(), "the log went to {outside:?}");
        assert!(
            status.log_path.starts_with(&pod.config.log_directory),
            "{} is outside {}",
            status.log_path,
            pod.config.log_directory
        );
    });
}
