//! The fast first tier (`[engine] fast_tier_min_bytes`): a program at
//! least that big is compiled with Winch before its pull answers, runs on
//! that code, and once Cranelift has compiled it in the background the
//! containers created after run Cranelift's code, which a restarted agent
//! loads from disk. A program Winch refuses, and every program when the
//! tier is off, is compiled by Cranelift alone.
//!
//! What compiled the code a guest runs is read off the daemon's log: the
//! engine logs the tier of each instance it makes (at debug).

use std::time::{Duration, Instant};

use wasmlet_conformance::ContainerConfigBuilder;
use wasmlet_conformance::fixtures::registry::{Registry, RegistryOptions};

use crate::daemon::Wasmlet;
use crate::{ECHO_P1, GUEST_TIMEOUT};

/// The daemon's filter: the engine's lines, the tier of each instance.
const RUST_LOG: &str = "info,wasmlet_agent::runtime=debug";

const WINCH_COMPILE: &str = "compiled Wasm with Winch";
const BACKGROUND_COMPILE: &str = "compiled Wasm with Cranelift in the background";
const WINCH_INSTANCE: &str = "tier=winch";
const CRANELIFT_INSTANCE: &str = "tier=cranelift";

/// How long the background Cranelift compile of a sample may take.
const BACKGROUND_TIMEOUT: Duration = Duration::from_secs(60);

/// The daemon's log lines about instances being made, in order.
fn instances(log: &str) -> Vec<&'static str> {
    log.lines()
        .filter(|line| line.contains("instantiating the guest"))
        .map(|line| {
            if line.contains(WINCH_INSTANCE) {
                "winch"
            } else if line.contains(CRANELIFT_INSTANCE) {
                "cranelift"
            } else {
                panic!("an instance without its tier: {line}")
            }
        })
        .collect()
}

async fn background_compiled(wasmlet: &Wasmlet) {
    let deadline = Instant::now() + BACKGROUND_TIMEOUT;
    while !wasmlet.daemon_log().contains(BACKGROUND_COMPILE) {
        assert!(
            Instant::now() < deadline,
            "no background compile within {BACKGROUND_TIMEOUT:?}: {}",
            wasmlet.daemon_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs a container of `image` to exit 0.
async fn run(wasmlet: &Wasmlet, image: &str, name: &str) {
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().name(name).build()).await.unwrap();
    let config = ContainerConfigBuilder::new(name, image).build();
    let status = cri.run_to_exit(&pod, config, GUEST_TIMEOUT).await.unwrap();
    assert_eq!(status.exit_code, 0, "{status:?}\n{}", wasmlet.daemon_log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_program_runs_on_winch_code_then_on_cranelift_code_also_after_a_restart() {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    let reference = format!("{}/tier/echo:p2", registry.host());
    Wasmlet::push(
        std::path::Path::new(wasm_samples::ECHO_P2),
        &reference,
        None,
    );
    let mut wasmlet = Wasmlet::builder()
        .config(format!(
            "[engine]\nfast_tier_min_bytes = 1\n[registry]\ninsecure = [\"{}\"]\n",
            registry.host()
        ))
        .rust_log(RUST_LOG)
        .start()
        .await;
    // The pull answers once Winch has compiled it.
    wasmlet.cri().pull_image(&reference).await.unwrap();
    let log = wasmlet.daemon_log();
    assert_eq!(log.matches(WINCH_COMPILE).count(), 1, "{log}");
    // Its first container runs the Winch code unless the background
    // compile was quicker than this container (a sample is small).
    run(&wasmlet, &reference, "first").await;

    background_compiled(&wasmlet).await;
    let before = instances(&wasmlet.daemon_log()).len();
    run(&wasmlet, &reference, "second").await;
    assert_eq!(
        instances(&wasmlet.daemon_log())[before..],
        ["cranelift"],
        "{}",
        wasmlet.daemon_log()
    );

    // After a restart the Cranelift artifact is loaded: nothing compiles.
    wasmlet.terminate().await;
    let at_restart = wasmlet.daemon_log().len();
    wasmlet.restart().await;
    run(&wasmlet, &reference, "third").await;
    let log = wasmlet.daemon_log();
    let since = &log[at_restart..];
    assert!(!since.contains("compiled Wasm"), "{since}");
    assert_eq!(instances(since), ["cranelift"], "{since}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_container_of_a_program_compiled_at_create_runs_winch_code() {
    // Imported, not pulled: CreateContainer compiles it (with Winch).
    let wasmlet = Wasmlet::builder()
        .config("[engine]\nfast_tier_min_bytes = 1\n")
        .rust_log(RUST_LOG)
        .start()
        .await;
    run(&wasmlet, ECHO_P1, "first").await;
    let log = wasmlet.daemon_log();
    assert_eq!(log.matches(WINCH_COMPILE).count(), 1, "{log}");
    assert_eq!(instances(&log), ["winch"], "{log}");
    background_compiled(&wasmlet).await;
    run(&wasmlet, ECHO_P1, "second").await;
    assert_eq!(
        instances(&wasmlet.daemon_log()),
        ["winch", "cranelift"],
        "{}",
        wasmlet.daemon_log()
    );
}

/// A command that exits 0 through a tail call (`return_call`), which
/// Cranelift compiles and Winch does not.
const TAIL_CALL: &str = r#"(module
    (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
    (memory (export "memory") 1)
    (func $done (call $exit (i32.const 0)))
    (func (export "_start") (return_call $done)))"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_winch_refuses_runs_on_cranelift_code() {
    let mut wasmlet = Wasmlet::builder()
        .config("[engine]\nfast_tier_min_bytes = 1\n")
        .rust_log(RUST_LOG)
        .build();
    let file = wasmlet.scratch("tail-call").join("tail-call.wasm");
    std::fs::write(&file, wat::parse_str(TAIL_CALL).unwrap()).unwrap();
    let image = "wasmlet.test/tail-call:1";
    wasmlet.import(&file, image);
    wasmlet.serve().await;
    run(&wasmlet, image, "tail").await;
    let log = wasmlet.daemon_log();
    assert!(log.contains("Winch cannot compile this program"), "{log}");
    assert!(!log.contains(WINCH_COMPILE), "{log}");
    assert_eq!(log.matches("compiled Wasm").count(), 1, "{log}");
    assert_eq!(instances(&log), ["cranelift"], "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threshold_0_turns_the_tier_off() {
    let wasmlet = Wasmlet::builder()
        .config("[engine]\nfast_tier_min_bytes = 0\n")
        .rust_log(RUST_LOG)
        .start()
        .await;
    run(&wasmlet, ECHO_P1, "first").await;
    let log = wasmlet.daemon_log();
    assert!(!log.contains("Winch"), "{log}");
    assert_eq!(log.matches("compiled Wasm").count(), 1, "{log}");
    assert_eq!(instances(&log), ["cranelift"], "{log}");
}
