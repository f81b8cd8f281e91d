//! Isolation: a guest reaches nothing outside its mounts, and a guest that
//! crashes in any way disturbs neither its neighbours nor the agent.

use wasmlet_conformance::{ContainerConfigBuilder, Stream, cri, read_cri_log, stream_lines};

use crate::daemon::Wasmlet;
use crate::{ECHO_P1, GUEST_TIMEOUT, SLEEPER_P1};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escapes_through_a_mount_by_symlink_or_dotdot_are_refused() {
    let wasmlet = Wasmlet::start().await;
    let secret_dir = wasmlet.scratch("host-only");
    std::fs::write(secret_dir.join("secret.txt"), "host secret\n").unwrap();
    let data = wasmlet.scratch("data");
    std::os::unix::fs::symlink(&secret_dir, data.join("absolute-link")).unwrap();
    std::os::unix::fs::symlink("../host-only", data.join("relative-link")).unwrap();
    let mut cri = wasmlet.cri();
    for path in [
        "/data/absolute-link/secret.txt",
        "/data/relative-link/secret.txt",
        "/data/../host-only/secret.txt",
    ] {
        let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
        let config = ContainerConfigBuilder::new("echo", ECHO_P1)
            .mount(&data, "/data", false)
            .env("READ_FILE", path)
            .build();
        let log = pod.container_log(&config);
        let status = cri.run_to_exit(&pod, config, GUEST_TIMEOUT).await.unwrap();
        let records = read_cri_log(&log).unwrap();
        assert_eq!(status.exit_code, 2, "{path}: {status:?}\n{records:#?}");
        assert!(
            !stream_lines(&records, Stream::Stdout)
                .iter()
                .any(|l| l.contains("host secret")),
            "{path} leaked the secret"
        );
    }
}

const STACK_OVERFLOW: &str = r#"(module
    (memory (export "memory") 1)
    (func $deeper (call $deeper))
    (func (export "_start") (call $deeper)))"#;

const OUT_OF_BOUNDS: &str = r#"(module
    (memory (export "memory") 1)
    (func (export "_start") (drop (i32.load (i32.const 0x7ffffff0)))))"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_guest_leaves_its_neighbour_and_the_agent_running() {
    let mut wasmlet = Wasmlet::new();
    let images = wasmlet.scratch("images");
    for (name, wat) in [("overflow", STACK_OVERFLOW), ("oob", OUT_OF_BOUNDS)] {
        let file = images.join(format!("{name}.wasm"));
        std::fs::write(&file, wat::parse_str(wat).unwrap()).unwrap();
        wasmlet.import(&file, &format!("wasmlet.local/conformance/{name}:1"));
    }
    let mut cri = wasmlet.serve().await;
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let neighbour = cri
        .start(
            &pod,
            ContainerConfigBuilder::new("neighbour", SLEEPER_P1).build(),
        )
        .await
        .unwrap();
    for (name, expected) in [
        ("overflow", "call stack exhausted"),
        ("oob", "out of bounds"),
    ] {
        let config =
            ContainerConfigBuilder::new(name, format!("wasmlet.local/conformance/{name}:1"))
                .build();
        let status = cri.run_to_exit(&pod, config, GUEST_TIMEOUT).await.unwrap();
        assert_eq!(
            (status.exit_code, status.reason.as_str()),
            (134, "Error"),
            "{status:?}"
        );
        assert!(
            status.message.contains(expected),
            "{name}: {}",
            status.message
        );
    }
    let neighbour = cri.container_status(&neighbour).await.unwrap();
    assert_eq!(
        neighbour.state,
        cri::ContainerState::ContainerRunning as i32,
        "{neighbour:?}"
    );
    cri.version().await.unwrap();
}
