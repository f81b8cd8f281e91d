//! wasmlet's admin API (`wasmlet.admin.v1`), served beside CRI on the same
//! socket, and the `wasmlet admin` commands over it.

use wasmlet_conformance::{Code, ContainerConfigBuilder, Stream, stream_lines, wait_for_log};
use wasmlet_proto::admin::admin_client::AdminClient;
use wasmlet_proto::admin::{
    InspectImageRequest, ListInstanceStatsRequest, PrecompileRequest, WasmKind,
};

use crate::daemon::Wasmlet;
use crate::{ECHO_P1, ECHO_P2, GUEST_TIMEOUT, HELLO_HTTP_P2, HOG_P1, TICKER_P1};

const MIB: i64 = 1024 * 1024;

async fn admin(wasmlet: &Wasmlet) -> AdminClient<tonic::transport::Channel> {
    AdminClient::new(wasmlet_proto::connect_unix(wasmlet.socket()).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_tells_modules_components_and_functions_apart() {
    let wasmlet = Wasmlet::start().await;
    let mut admin = admin(&wasmlet).await;
    let inspect = |image: &str| InspectImageRequest {
        image: image.to_owned(),
    };
    let module = admin
        .inspect_image(inspect(ECHO_P1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(module.kind(), WasmKind::Module);
    assert_eq!(module.image_id, wasmlet.image_id(ECHO_P1));
    assert!(module.repo_tags.contains(&ECHO_P1.to_owned()));
    assert!(module.wasm_digest.starts_with("sha256:") && module.wasm_size_bytes > 0);
    assert!(
        module
            .imports
            .iter()
            .any(|i| i.module == "wasi_snapshot_preview1"
                && i.name == "fd_write"
                && i.kind == "func"),
        "{:?}",
        module.imports
    );
    assert!(module.exports.contains(&"_start".to_owned()));
    assert!(!module.http_function && !module.compat);

    let component = admin
        .inspect_image(inspect(ECHO_P2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(component.kind(), WasmKind::Component);
    assert!(
        component
            .imports
            .iter()
            .any(|i| i.name.starts_with("wasi:cli/") && i.kind == "instance"),
        "{:?}",
        component.imports
    );
    assert!(
        component
            .exports
            .iter()
            .any(|e| e.starts_with("wasi:cli/run@")),
        "{:?}",
        component.exports
    );
    assert!(!component.http_function);

    let function = admin
        .inspect_image(inspect(HELLO_HTTP_P2))
        .await
        .unwrap()
        .into_inner();
    assert!(function.http_function, "{function:?}");

    let missing = admin.inspect_image(inspect("nowhere/none:1")).await;
    assert_eq!(missing.unwrap_err().code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precompile_compiles_once_and_inspect_then_says_so() {
    let wasmlet = Wasmlet::start().await;
    let mut admin = admin(&wasmlet).await;
    let first = admin
        .precompile(PrecompileRequest {
            image: TICKER_P1.to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    let again = admin
        .precompile(PrecompileRequest {
            image: TICKER_P1.to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.already_compiled, "{again:?}");
    assert_eq!(again.compile_micros, 0);
    assert_eq!(first.wasm_digest, again.wasm_digest);
    let inspected = admin
        .inspect_image(InspectImageRequest {
            image: TICKER_P1.to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(inspected.compiled);
    assert_eq!(inspected.wasm_digest, first.wasm_digest);
    let missing = admin
        .precompile(PrecompileRequest {
            image: "nowhere/none:1".to_owned(),
        })
        .await;
    assert_eq!(missing.unwrap_err().code(), Code::NotFound);
    // The command line says the same.
    let out = wasmlet.cli(&["admin", "precompile", TICKER_P1], None);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("already compiled"), "{stdout}");
    let out = wasmlet.cli(&["admin", "inspect", ECHO_P1], None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && stdout.contains("import      wasi_snapshot_preview1 fd_write (func)"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_stats_show_guest_memory_against_its_limit_and_oom() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let holder = ContainerConfigBuilder::new("holder", HOG_P1)
        .env("HOG_LIMIT_MIB", "12")
        .env("HOG_HOLD", "1")
        .memory_limit(64 * MIB)
        .build();
    let log = pod.container_log(&holder);
    let holder_id = cri.start(&pod, holder).await.unwrap();
    wait_for_log(&log, GUEST_TIMEOUT, "the hog to hold 12 MiB", |records| {
        stream_lines(records, Stream::Stdout)
            .iter()
            .any(|l| l == "done holding 12 MiB")
    })
    .await
    .unwrap();
    let other = cri
        .run_pod(wasmlet.pod().name("other").build())
        .await
        .unwrap();
    let hog = ContainerConfigBuilder::new("hog", HOG_P1)
        .memory_limit(8 * MIB)
        .build();
    let hog_id = cri.start(&other, hog).await.unwrap();
    cri.wait_exited(&hog_id, GUEST_TIMEOUT).await.unwrap();

    let mut admin = admin(&wasmlet).await;
    let all = admin
        .list_instance_stats(ListInstanceStatsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .instances;
    assert_eq!(all.len(), 2, "{all:?}");
    let held = all.iter().find(|s| s.container_id == holder_id).unwrap();
    assert_eq!(held.state, "CONTAINER_RUNNING");
    assert_eq!(held.pod_sandbox_id, pod.id);
    assert_eq!(held.memory_limit_bytes, 64 * MIB as u64);
    assert!(
        held.memory_bytes >= 12 * MIB as u64 && held.memory_bytes < 64 * MIB as u64,
        "{held:?}"
    );
    assert!(held.cpu_nanos > 0 && !held.oom_killed, "{held:?}");
    let killed = all.iter().find(|s| s.container_id == hog_id).unwrap();
    assert!(killed.oom_killed, "{killed:?}");
    assert_eq!(killed.state, "CONTAINER_EXITED");
    let only = admin
        .list_instance_stats(ListInstanceStatsRequest {
            pod_sandbox_id: other.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .instances;
    assert_eq!(only.len(), 1);
    assert_eq!(only[0].container_id, hog_id);
    // `wasmlet admin stats --pod` prints the same rows.
    let out = wasmlet.cli(&["admin", "stats", "--pod", &other.id], None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let rows: Vec<&str> = stdout.lines().skip(1).collect();
    assert_eq!(rows.len(), 1, "{stdout}");
    assert!(
        rows[0].starts_with(&hog_id[..13])
            && rows[0].contains("CONTAINER_EXITED")
            && rows[0].ends_with("true"),
        "{stdout}"
    );
}

/// `wasmlet image import` while the agent runs goes through the admin API
/// (streamed, validated and compiled before it answers, as a pull is):
/// the image runs at once, without a compile at create; what is not Wasm
/// is refused and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_is_imported_into_the_running_agent() {
    let wasmlet = Wasmlet::start().await;
    let name = "example.com/imported/echo:live";
    let out = wasmlet.cli(&["image", "import", wasm_samples::ECHO_P1, name], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(crate::daemon::is_image_id(&id), "{id:?}");
    let mut admin = admin(&wasmlet).await;
    let inspected = admin
        .inspect_image(InspectImageRequest {
            image: name.to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(inspected.image_id, id);
    assert!(
        inspected.compiled,
        "imported but not compiled: {inspected:?}"
    );
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let config = ContainerConfigBuilder::new("imported", name)
        .args(["from", "the", "admin", "api"])
        .build();
    let log = pod.container_log(&config);
    let status = cri.run_to_exit(&pod, config, GUEST_TIMEOUT).await.unwrap();
    assert_eq!(status.exit_code, 0, "{status:?}");
    let records = wasmlet_conformance::read_cri_log(&log).unwrap();
    assert!(
        stream_lines(&records, Stream::Stdout)
            .iter()
            .any(|l| l == "arg[4]=api"),
        "{records:#?}"
    );

    // Not Wasm: refused, nothing stored under the name.
    let junk = wasmlet.scratch("junk").join("junk.wasm");
    std::fs::write(&junk, b"#!/bin/sh\necho not wasm\n").unwrap();
    let bad = "example.com/imported/junk:v1";
    let out = wasmlet.cli(&["image", "import", junk.to_str().unwrap(), bad], None);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("junk"), "{stderr}");
    let status = cri
        .images()
        .image_status(wasmlet_conformance::cri::ImageStatusRequest {
            image: Some(wasmlet_conformance::cri::ImageSpec {
                image: bad.to_owned(),
                ..Default::default()
            }),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(status.image.is_none(), "{status:?}");
}
