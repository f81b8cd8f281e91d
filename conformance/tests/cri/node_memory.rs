//! The node memory guard: all guests share the agent's process, so the
//! agent keeps their committed memory under a node budget and, when the
//! node is short, ends guests as the kernel and the kubelet would choose
//! them (BestEffort, then Burstable, then Guaranteed, largest first),
//! never the agent and the pods that are within their requests.

use std::time::Duration;

use wasmlet_conformance::{ContainerConfigBuilder, cri};

use crate::daemon::Wasmlet;
use crate::networked::{pod_ip, test_network};
use crate::{GUEST_TIMEOUT, HELLO_HTTP_P2, HOG_P1};

const MIB: i64 = 1024 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// The kubelet's `oom_score_adj` for BestEffort and Guaranteed pods.
const BEST_EFFORT: i64 = 1000;
const GUARANTEED: i64 = -997;
const BUDGET: i64 = 160 * MIB;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn best_effort_bombs_past_the_node_budget_end_and_a_guaranteed_neighbour_serves() {
    let net = test_network();
    let wasmlet = Wasmlet::builder()
        .config(format!(
            "{}\n[memory]\nnode_budget_bytes = {BUDGET}\n",
            net.wasmlet_config()
        ))
        .start()
        .await;
    // The agent stands behind every other process with the kernel, when
    // it may lower its score (CAP_SYS_RESOURCE); else it says so.
    let adj = std::fs::read_to_string(format!("/proc/{}/oom_score_adj", wasmlet.pid())).unwrap();
    if may_lower_oom_score() {
        assert_eq!(adj.trim(), "-998");
    } else {
        assert!(
            wasmlet
                .daemon_log()
                .contains("cannot set the agent's OOM score adjustment"),
            "{}",
            wasmlet.daemon_log()
        );
    }
    let mut cri = wasmlet.cri();

    // Guaranteed: a function serving requests and a guest holding 48 MiB.
    let guaranteed = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let ip = pod_ip(&wasmlet, &guaranteed.id).await;
    let function = ContainerConfigBuilder::new("function", HELLO_HTTP_P2)
        .annotation(
            "io.kubernetes.container.ports",
            r#"[{"name":"http","containerPort":8080,"protocol":"TCP"}]"#,
        )
        .memory_limit(64 * MIB)
        .oom_score_adj(GUARANTEED)
        .build();
    let function = cri.start(&guaranteed, function).await.unwrap();
    let holder = ContainerConfigBuilder::new("holder", HOG_P1)
        .env("HOG_LIMIT_MIB", "48")
        .env("HOG_HOLD", "1")
        .memory_limit(64 * MIB)
        .oom_score_adj(GUARANTEED)
        .build();
    let holder_log = guaranteed.container_log(&holder);
    let holder = cri.start(&guaranteed, holder).await.unwrap();
    wait_for_line(&holder_log, "done holding 48 MiB").await;
    let get = |path: &str| net.http_get(&ip, 8080, path, IO_TIMEOUT);
    let deadline = tokio::time::Instant::now() + GUEST_TIMEOUT;
    while get("/").is_err() {
        assert!(tokio::time::Instant::now() < deadline, "never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A BestEffort guest holds what is left; the Guaranteed function's
    // growth ends it, as the kernel would end it for a Guaranteed pod.
    let best_effort = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let squatter = ContainerConfigBuilder::new("squatter", HOG_P1)
        .env("HOG_LIMIT_MIB", "100")
        .env("HOG_HOLD", "1")
        .oom_score_adj(BEST_EFFORT)
        .build();
    let squatter_log = best_effort.container_log(&squatter);
    let squatter = cri.start(&best_effort, squatter).await.unwrap();
    wait_for_line(&squatter_log, "done holding 100 MiB").await;
    let (code, body) = get("/alloc?mib=24").unwrap();
    assert_eq!((code, body.as_str()), (200, "allocated 24\n"));
    let ended = cri.wait_exited(&squatter, GUEST_TIMEOUT).await.unwrap();
    assert_eq!(
        (ended.exit_code, ended.reason.as_str()),
        (137, "OOMKilled"),
        "{ended:?}"
    );
    assert!(
        ended.message.contains("node ran short of memory"),
        "{ended:?}"
    );

    // Bombs without limits, three pods of them, past the budget: each
    // ends OOMKilled while the function answers throughout.
    let mut bombs = Vec::new();
    for n in 0..3 {
        let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
        let bomb = ContainerConfigBuilder::new(format!("bomb-{n}"), HOG_P1)
            .oom_score_adj(BEST_EFFORT)
            .build();
        bombs.push(cri.start(&pod, bomb).await.unwrap());
    }
    let deadline = tokio::time::Instant::now() + GUEST_TIMEOUT;
    let mut answered = 0;
    loop {
        let (code, body) = get("/alloc?mib=8").expect("the neighbour stopped answering");
        assert_eq!((code, body.as_str()), (200, "allocated 8\n"));
        answered += 1;
        let mut running = 0;
        for bomb in &bombs {
            let status = cri.container_status(bomb).await.unwrap();
            if status.state == cri::ContainerState::ContainerExited as i32 {
                assert_eq!(
                    (status.exit_code, status.reason.as_str()),
                    (137, "OOMKilled"),
                    "{status:?}"
                );
            } else {
                running += 1;
            }
        }
        if running == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{running} bomb(s) still running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(answered > 0);

    // The Guaranteed pod's guests and the agent live on.
    for id in [&function, &holder] {
        let status = cri.container_status(id).await.unwrap();
        assert_eq!(
            status.state,
            cri::ContainerState::ContainerRunning as i32,
            "{status:?}"
        );
    }
    assert_eq!(get("/alloc?mib=32").unwrap().0, 200);
    let log = wasmlet.daemon_log();
    assert!(
        log.contains("node memory budget reached"),
        "the guard never acted:\n{log}"
    );
}

/// Whether this process (and so the agent it starts) has CAP_SYS_RESOURCE,
/// which lowering an OOM score needs.
fn may_lower_oom_score() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let caps = status.lines().find(|l| l.starts_with("CapEff:"))?;
            u64::from_str_radix(caps.trim_start_matches("CapEff:").trim(), 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_sets_its_own_oom_score_adjustment() {
    // Raising needs no privilege, so this holds on any machine.
    let wasmlet = Wasmlet::builder()
        .config("[memory]\nagent_oom_score_adj = 10\n")
        .start()
        .await;
    let adj = std::fs::read_to_string(format!("/proc/{}/oom_score_adj", wasmlet.pid())).unwrap();
    assert_eq!(adj.trim(), "10");
}

/// Waits until the container's log has a line containing `text`.
async fn wait_for_line(log: &std::path::Path, text: &str) {
    wasmlet_conformance::wait_for_log(log, GUEST_TIMEOUT, text, |records| {
        records.iter().any(|r| r.text.contains(text))
    })
    .await
    .unwrap();
}
