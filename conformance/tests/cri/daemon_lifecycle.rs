//! The daemon as a process: its socket, its signals, its command line.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};

use nix::sys::signal::Signal;

use crate::daemon::Wasmlet;

#[tokio::test]
async fn the_socket_is_created_with_mode_0660() {
    let wasmlet = Wasmlet::start().await;
    let metadata = std::fs::metadata(wasmlet.socket()).unwrap();
    assert!(metadata.file_type().is_socket(), "{metadata:?}");
    let mode = metadata.permissions().mode() & 0o7777;
    assert_eq!(mode, 0o660, "socket mode is {mode:o}");
}

#[tokio::test]
async fn a_stale_socket_file_is_replaced() {
    let mut wasmlet = Wasmlet::new();
    // A socket nobody listens on any more, as a crashed daemon leaves behind.
    drop(std::os::unix::net::UnixListener::bind(wasmlet.socket()).unwrap());
    assert!(wasmlet.socket().exists());

    let mut cri = wasmlet.serve().await;
    cri.version().await.unwrap();
}

async fn assert_signal_exits_cleanly(signal: Signal) {
    let mut wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    cri.run_pod(wasmlet.pod().build()).await.unwrap();

    let status = wasmlet.stop_with(signal).await;

    assert_eq!(
        status.code(),
        Some(0),
        "wasmlet exited with {status} on {signal}"
    );
    assert!(
        !wasmlet.socket().exists(),
        "the socket is left behind after {signal}"
    );
}

#[tokio::test]
async fn sigterm_exits_0_and_removes_the_socket() {
    assert_signal_exits_cleanly(Signal::SIGTERM).await;
}

#[tokio::test]
async fn sigint_exits_0_and_removes_the_socket() {
    assert_signal_exits_cleanly(Signal::SIGINT).await;
}

#[tokio::test]
async fn state_survives_a_sigterm_and_serve() {
    let mut wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();

    assert_eq!(wasmlet.terminate().await.code(), Some(0));
    let mut cri = wasmlet.restart().await;

    let items = cri.list_pod_sandbox(None).await.unwrap();
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0].id, pod.id);
}

#[tokio::test]
async fn serve_is_the_default_subcommand() {
    let mut wasmlet = Wasmlet::new();
    let mut cri = wasmlet.serve_without_subcommand().await;
    let version = cri.version().await.unwrap();
    assert_eq!(version.runtime_name, "wasmlet");
}

#[tokio::test]
async fn image_import_rejects_a_file_that_is_not_wasm() {
    let mut wasmlet = Wasmlet::new();
    let text = wasmlet.scratch("images").join("not-wasm.wasm");
    std::fs::write(&text, "this is not a WebAssembly module\n").unwrap();
    let reference = "wasmlet.local/conformance/not-wasm:1";

    let output = wasmlet.import_output(&text, reference);
    assert!(
        !output.status.success(),
        "image import accepted a text file: {}",
        String::from_utf8_lossy(&output.stdout)
    );

    let mut cri = wasmlet.serve().await;
    assert_eq!(cri.image_status(reference).await.unwrap(), None);
}

/// A client that opened an HTTP/2 connection and then never reads (a
/// stalled or blocked kubelet) does not keep a SIGTERM'd daemon from
/// exiting: it gets a grace period, then the daemon stops without it, and
/// undoes its mounts.
#[tokio::test]
async fn a_stalled_client_does_not_keep_sigterm_from_stopping_the_daemon() {
    use std::io::Write;
    let mut wasmlet = Wasmlet::start().await;
    let mut stalled = std::os::unix::net::UnixStream::connect(wasmlet.socket()).unwrap();
    // The client preface and an empty SETTINGS frame; nothing is read after.
    stalled
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let started = std::time::Instant::now();
    let status = wasmlet.stop_with(Signal::SIGTERM).await;
    assert_eq!(status.code(), Some(0), "wasmlet exited with {status}");
    eprintln!("stopped {:?} after SIGTERM", started.elapsed());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(12),
        "stopping took {:?}",
        started.elapsed()
    );
    let containers = wasmlet.root().join("containers");
    assert!(
        crate::daemon::mounts_under(&containers).is_empty(),
        "mounts left under {containers:?}"
    );
    drop(stalled);
}
