//! wasmlet in front of the node's own runtime (`[delegate]`): Debian's
//! containerd with runc, started on a private socket, with busybox images
//! made from Debian's busybox-static. Through wasmlet's one socket, as the
//! kubelet would: a Wasm pod and a runc pod side by side, images routed by
//! their manifests, a `compat-smart` pod whose Wasm container shares the
//! network of its busybox sidecar, and the downstream runtime going away.
//!
//! Pods get the test's own bridge and /24 (both runtimes use one CNI
//! configuration, as on a node); every pod address is route-checked before
//! anything is sent to it.

use std::time::Duration;

use wasmlet_conformance::fixtures::containerd::{
    BUSYBOX_IMAGE, Containerd, LinuxImage, OCI_CONFIG, OCI_LAYER, OCI_MANIFEST,
};
use wasmlet_conformance::fixtures::registry::{Registry, RegistryOptions};
use wasmlet_conformance::pod_network::TestNetwork;
use wasmlet_conformance::{
    Code, ContainerConfigBuilder, CriClient, Stream, assert_code, cri, stream_lines, wait_for_log,
};

use crate::daemon::Wasmlet;
use crate::networked::test_network;
use crate::{ECHO_P1, GUEST_TIMEOUT, PONG_P2};

/// The handler the Wasm pods use.
const WASM: &str = "wasm";
/// How long containerd may take to start a runc container and log.
const RUNC_TIMEOUT: Duration = Duration::from_secs(30);

struct Node {
    net: TestNetwork,
    containerd: Containerd,
    wasmlet: Wasmlet,
}

/// containerd and wasmlet in front of it, sharing one test network.
async fn node(extra_config: &str) -> Node {
    let net = test_network();
    let containerd = Containerd::start(&net.conf_dir())
        .await
        .unwrap_or_else(|e| panic!("the delegate tests need containerd and runc: {e}"));
    let wasmlet = Wasmlet::builder()
        .config(format!(
            "[delegate]\nsocket = {:?}\nconnect_timeout_seconds = 2\n{}\n{extra_config}",
            containerd.socket(),
            net.wasmlet_config()
        ))
        .start()
        .await;
    Node {
        net,
        containerd,
        wasmlet,
    }
}

impl Node {
    /// A pod config as the kubelet makes one (with a cgroup parent).
    fn pod(&self) -> wasmlet_conformance::PodSandboxConfigBuilder {
        self.wasmlet.pod().cgroup_parent(CGROUP_PARENT)
    }
}

/// Where the runc pods' cgroups go.
const CGROUP_PARENT: &str = "/wasmlet-conformance";

/// A busybox container running `script` with `sh -c`.
fn busybox(name: &str, script: &str) -> cri::ContainerConfig {
    ContainerConfigBuilder::new(name, BUSYBOX_IMAGE)
        .command(["/bin/sh", "-c", script])
        .build()
}

/// Waits for a stdout line satisfying `pred` in `log`.
async fn wait_line(log: &std::path::Path, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let records = wait_for_log(log, RUNC_TIMEOUT, what, |records| {
        stream_lines(records, Stream::Stdout)
            .iter()
            .any(|l| pred(l))
    })
    .await
    .unwrap();
    stream_lines(&records, Stream::Stdout)
        .into_iter()
        .find(|l| pred(l))
        .unwrap()
}

fn condition(status: &cri::StatusResponse, kind: &str) -> cri::RuntimeCondition {
    status
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.r#type == kind)
        .unwrap_or_else(|| panic!("no {kind} condition in {status:?}"))
        .clone()
}

async fn remove_pod(cri: &mut CriClient, id: &str) {
    cri.stop_pod_sandbox(id).await.unwrap();
    cri.remove_pod_sandbox(id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wasm_pod_and_a_runc_pod_run_side_by_side_through_one_socket() {
    let node = node("").await;
    let mut cri = node.wasmlet.cri();

    let version = cri.version().await.unwrap();
    assert_eq!(version.runtime_name, "wasmlet");
    let status = cri.status(false).await.unwrap();
    let delegate = condition(&status, "DelegateRuntimeReady");
    assert!(delegate.status, "{delegate:?}");
    assert!(condition(&status, "RuntimeReady").status);
    let handlers: Vec<&str> = status
        .runtime_handlers
        .iter()
        .map(|h| h.name.as_str())
        .collect();
    for h in ["wasm", "wasmtime", ""] {
        assert!(handlers.contains(&h), "{h:?} not advertised: {handlers:?}");
    }

    // Both images are visible through wasmlet; each is held by its side.
    let images = cri.list_images(None).await.unwrap();
    let tags: Vec<&str> = images
        .iter()
        .flat_map(|i| i.repo_tags.iter().map(String::as_str))
        .collect();
    assert!(tags.contains(&ECHO_P1), "{tags:?}");
    assert!(tags.contains(&BUSYBOX_IMAGE), "{tags:?}");
    assert!(cri.image_status(BUSYBOX_IMAGE).await.unwrap().is_some());
    let fs = cri.image_fs_info().await.unwrap();
    assert!(fs.image_filesystems.len() >= 2, "{fs:?}");

    let wasm_pod = cri
        .run_pod_on(
            node.pod().name("wasm-pod").label("side", "wasm").build(),
            WASM,
        )
        .await
        .unwrap();
    let runc_pod = cri
        .run_pod(node.pod().name("runc-pod").label("side", "runc").build())
        .await
        .unwrap();
    assert_ne!(wasm_pod.id, runc_pod.id);

    let echo = ContainerConfigBuilder::new("echo", ECHO_P1)
        .args(["hello from wasm"])
        .build();
    let echo_log = wasm_pod.container_log(&echo);
    let echo_id = cri.start(&wasm_pod, echo).await.unwrap();
    let shell = busybox("shell", "echo hello from runc; sleep 3600");
    let shell_log = runc_pod.container_log(&shell);
    let shell_id = cri.start(&runc_pod, shell).await.unwrap();

    wait_line(&echo_log, "the Wasm container's line", |l| {
        l.contains("hello from wasm")
    })
    .await;
    wait_line(&shell_log, "the runc container's line", |l| {
        l == "hello from runc"
    })
    .await;
    let echo_status = cri.wait_exited(&echo_id, GUEST_TIMEOUT).await.unwrap();
    assert_eq!(echo_status.exit_code, 0);
    let shell_status = cri
        .wait_for_state(
            &shell_id,
            cri::ContainerState::ContainerRunning,
            RUNC_TIMEOUT,
        )
        .await
        .unwrap();
    assert_eq!(
        shell_status.image.as_ref().map(|i| i.image.as_str()),
        Some(BUSYBOX_IMAGE)
    );

    // Lists merge both sides, with filters applied on each.
    let pods = cri.list_pod_sandbox(None).await.unwrap();
    let ids: Vec<&str> = pods.iter().map(|p| p.id.as_str()).collect();
    assert!(ids.contains(&wasm_pod.id.as_str()) && ids.contains(&runc_pod.id.as_str()));
    let runc_only = cri
        .list_pod_sandbox(Some(cri::PodSandboxFilter {
            label_selector: [("side".to_owned(), "runc".to_owned())].into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(
        runc_only.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
        vec![runc_pod.id.as_str()]
    );
    let containers = cri.list_containers(None).await.unwrap();
    let ids: Vec<&str> = containers.iter().map(|c| c.id.as_str()).collect();
    assert!(ids.contains(&echo_id.as_str()) && ids.contains(&shell_id.as_str()));
    let in_wasm_pod = cri
        .list_containers(Some(cri::ContainerFilter {
            pod_sandbox_id: wasm_pod.id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(in_wasm_pod.len(), 1);
    assert_eq!(in_wasm_pod[0].id, echo_id);

    // Exec and streaming calls for delegated containers pass through: the
    // command runs in the runc container, and Exec's URL is containerd's
    // own streaming server.
    let exec = cri
        .runtime()
        .exec_sync(cri::ExecSyncRequest {
            container_id: shell_id.clone(),
            cmd: vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo exec in $(hostname)".into(),
            ],
            timeout: 10,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(exec.exit_code, 0, "{exec:?}");
    assert_eq!(
        String::from_utf8_lossy(&exec.stdout).trim(),
        "exec in runc-pod"
    );
    let url = cri
        .runtime()
        .exec(cri::ExecRequest {
            container_id: shell_id.clone(),
            cmd: vec!["/bin/sh".into()],
            stdout: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .url;
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    // wasmlet's own containers answer with wasmlet's rules (the echo has
    // exited: exec needs a running container).
    let wasm_exec = cri
        .runtime()
        .exec_sync(cri::ExecSyncRequest {
            container_id: echo_id.clone(),
            cmd: vec!["x".into()],
            timeout: 10,
        })
        .await;
    assert_eq!(wasm_exec.unwrap_err().code(), Code::FailedPrecondition);

    // containerd 1.6 publishes no events; a merged stream would silently
    // miss its side, so the call fails with containerd's answer.
    let events = cri
        .runtime()
        .get_container_events(cri::GetEventsRequest {})
        .await;
    assert_eq!(events.err().map(|s| s.code()), Some(Code::Unimplemented));

    // Each pod's status comes from its own runtime.
    let runc_status = cri.pod_sandbox_status(&runc_pod.id).await.unwrap();
    assert_eq!(runc_status.runtime_handler, "");
    let ip = runc_status.network.unwrap_or_default().ip;
    assert!(node.net.contains(&ip), "runc pod IP {ip:?}");
    let wasm_status = cri.pod_sandbox_status(&wasm_pod.id).await.unwrap();
    assert_eq!(wasm_status.runtime_handler, WASM);

    remove_pod(&mut cri, &runc_pod.id).await;
    remove_pod(&mut cri, &wasm_pod.id).await;
    assert!(cri.list_pod_sandbox(None).await.unwrap().is_empty());
    assert!(cri.list_containers(None).await.unwrap().is_empty());
    let gone = cri.container_status(&shell_id).await;
    assert_code(gone, Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_pulled_by_the_runtime_their_manifest_belongs_to() {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    let host = registry.host();
    let node = node(&format!("[registry]\ninsecure = [{host:?}]\n")).await;
    let mut cri = node.wasmlet.cri();

    // An ordinary Linux image: containerd pulls it.
    let image = LinuxImage::busybox(&[]).unwrap();
    registry
        .push_image(
            "linux/busybox",
            "1",
            OCI_CONFIG,
            &image.config,
            &[(OCI_LAYER, &image.layer)],
            OCI_MANIFEST,
        )
        .await
        .unwrap();
    let linux_ref = format!("{host}/linux/busybox:1");
    let linux_id = cri.pull_image(&linux_ref).await.unwrap();
    // A Wasm artifact: wasmlet pulls it.
    let wasm_ref = format!("{host}/wasm/echo:1");
    Wasmlet::push(std::path::Path::new(wasm_samples::ECHO_P1), &wasm_ref, None);
    let wasm_id = cri.pull_image(&wasm_ref).await.unwrap();

    let mut theirs = CriClient::connect(node.containerd.socket(), Duration::from_secs(5))
        .await
        .unwrap();
    let in_containerd = theirs.image_status(&linux_ref).await.unwrap();
    assert_eq!(in_containerd.map(|i| i.id), Some(linux_id.clone()));
    assert!(theirs.image_status(&wasm_ref).await.unwrap().is_none());

    // Through wasmlet both are there, and each is removed where it is.
    assert!(cri.image_status(&linux_ref).await.unwrap().is_some());
    assert_eq!(
        cri.image_status(&wasm_ref).await.unwrap().map(|i| i.id),
        Some(wasm_id)
    );
    cri.remove_image(&linux_ref).await.unwrap();
    cri.remove_image(&wasm_ref).await.unwrap();
    assert!(theirs.image_status(&linux_ref).await.unwrap().is_none());
    assert!(cri.image_status(&wasm_ref).await.unwrap().is_none());

    // An image the handler names goes to that handler's runtime.
    let pulled = cri
        .images()
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: wasm_ref.clone(),
                runtime_handler: WASM.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await;
    assert!(pulled.is_ok(), "{pulled:?}");
    assert!(theirs.image_status(&wasm_ref).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compat_smart_pod_runs_its_wasm_container_in_the_network_of_its_sidecar() {
    let mut node = node("").await;
    let mut cri = node.wasmlet.cri();

    // Without the annotation, a Wasm image in a runc pod is refused, and
    // the refusal says how to ask for it.
    let plain = cri.run_pod(node.pod().name("plain").build()).await.unwrap();
    let refused = cri
        .create_container(&plain, ContainerConfigBuilder::new("wasm", PONG_P2).build())
        .await;
    let status = assert_code(refused, Code::FailedPrecondition);
    assert!(
        status
            .message()
            .contains("module.wasm.image/variant=compat-smart"),
        "{status:?}"
    );
    remove_pod(&mut cri, &plain.id).await;

    let pod = cri
        .run_pod(
            node.pod()
                .name("mixed")
                .annotation("module.wasm.image/variant", "compat-smart")
                .build(),
        )
        .await
        .unwrap();
    let ip = cri
        .pod_sandbox_status(&pod.id)
        .await
        .unwrap()
        .network
        .unwrap_or_default()
        .ip;
    assert!(node.net.contains(&ip), "pod IP {ip:?}");

    let server = ContainerConfigBuilder::new("server", PONG_P2)
        .env("LISTEN_PORT", "7000")
        .env("PONG_NAME", "wasm-beside-runc")
        .build();
    let server_log = pod.container_log(&server);
    let server_id = cri.start(&pod, server).await.unwrap();
    wait_line(&server_log, "the Wasm server to listen", |l| {
        l.starts_with("listening on")
    })
    .await;
    // The sidecar reaches it on the pod's own loopback...
    let sidecar = busybox(
        "sidecar",
        "for i in $(seq 1 50); do nc 127.0.0.1 7000 && break; sleep 0.2; done; sleep 3600",
    );
    let sidecar_log = pod.container_log(&sidecar);
    let sidecar_id = cri.start(&pod, sidecar).await.unwrap();
    wait_line(
        &sidecar_log,
        "the sidecar's reply from the Wasm server",
        |l| l == "pong wasm-beside-runc",
    )
    .await;
    // ...and the node reaches it on the pod's address.
    let reply = node
        .net
        .read_all(&ip, 7000, Duration::from_secs(5))
        .unwrap();
    assert_eq!(reply.trim(), "pong wasm-beside-runc");

    // Both containers are the pod's, in lists and in its stats.
    let listed = cri
        .list_containers(Some(cri::ContainerFilter {
            pod_sandbox_id: pod.id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    let mut ids: Vec<&str> = listed.iter().map(|c| c.id.as_str()).collect();
    ids.sort();
    let mut want = vec![server_id.as_str(), sidecar_id.as_str()];
    want.sort();
    assert_eq!(ids, want);
    let pods = cri.list_pod_sandbox(None).await.unwrap();
    assert_eq!(pods.len(), 1, "the pod is listed once: {pods:?}");
    let stats = cri
        .runtime()
        .pod_sandbox_stats(cri::PodSandboxStatsRequest {
            pod_sandbox_id: pod.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    let names: Vec<String> = stats
        .linux
        .unwrap_or_default()
        .containers
        .iter()
        .filter_map(|c| c.attributes.as_ref().and_then(|a| a.metadata.as_ref()))
        .map(|m| m.name.clone())
        .collect();
    assert!(names.contains(&"server".to_owned()), "{names:?}");

    // After wasmlet dies and comes back, the pod's Wasm side is back in
    // the pod's network: its lost guest is reported exited, a new one
    // serves on the pod's address again.
    node.wasmlet.kill_9().await;
    let mut cri = node.wasmlet.restart().await;
    let lost = cri.container_status(&server_id).await.unwrap();
    assert_eq!(lost.state, cri::ContainerState::ContainerExited as i32);
    assert_eq!(cri.list_pod_sandbox(None).await.unwrap().len(), 1);
    let again = ContainerConfigBuilder::new("server", PONG_P2)
        .attempt(1)
        .env("LISTEN_PORT", "7001")
        .env("PONG_NAME", "wasm-after-restart")
        .build();
    let again_log = pod.container_log(&again);
    let again_id = cri.start(&pod, again).await.unwrap();
    wait_line(&again_log, "the restarted Wasm server to listen", |l| {
        l.starts_with("listening on")
    })
    .await;
    let reply = node
        .net
        .read_all(&ip, 7001, Duration::from_secs(5))
        .unwrap();
    assert_eq!(reply.trim(), "pong wasm-after-restart");

    // Stopping the pod stops its Wasm container too; removing it removes it.
    cri.stop_pod_sandbox(&pod.id).await.unwrap();
    let stopped = cri.container_status(&again_id).await.unwrap();
    assert_eq!(stopped.state, cri::ContainerState::ContainerExited as i32);
    cri.remove_pod_sandbox(&pod.id).await.unwrap();
    assert_code(cri.container_status(&again_id).await, Code::NotFound);
    assert!(cri.list_containers(None).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_downstream_runtime_is_down_wasm_pods_keep_working() {
    let mut node = node("").await;
    let mut cri = node.wasmlet.cri();
    let runc_pod = cri
        .run_pod(node.pod().name("before").build())
        .await
        .unwrap();

    node.containerd.kill();
    let socket = node.containerd.socket().display().to_string();

    // Wasm pods run as before.
    let wasm_pod = cri
        .run_pod_on(node.pod().name("during").build(), WASM)
        .await
        .unwrap();
    let echo = ContainerConfigBuilder::new("echo", ECHO_P1)
        .args(["still here"])
        .build();
    let status = cri
        .run_to_exit(&wasm_pod, echo, GUEST_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(status.exit_code, 0);
    // Lists answer with wasmlet's side.
    let pods = cri.list_pod_sandbox(None).await.unwrap();
    assert_eq!(
        pods.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
        vec![wasm_pod.id.as_str()]
    );
    // Delegated calls fail with Unavailable, naming the socket.
    let refused = cri.run_pod_sandbox(node.pod().name("x").build(), "").await;
    let status = assert_code(refused, Code::Unavailable);
    assert!(status.message().contains(&socket), "{status:?}");
    let refused = cri.pod_sandbox_status(&runc_pod.id).await;
    assert_code(refused, Code::Unavailable);
    // Status says so, and the node's runtime stays ready.
    let status = cri.status(false).await.unwrap();
    let delegate = condition(&status, "DelegateRuntimeReady");
    assert!(!delegate.status);
    assert!(delegate.message.contains(&socket), "{delegate:?}");
    assert!(condition(&status, "RuntimeReady").status);

    // Once it is back, so are its pods.
    node.containerd.restart().await.unwrap();
    let deadline = tokio::time::Instant::now() + RUNC_TIMEOUT;
    loop {
        let status = cri.status(false).await.unwrap();
        if condition(&status, "DelegateRuntimeReady").status {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{status:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pods = cri.list_pod_sandbox(None).await.unwrap();
    assert_eq!(pods.len(), 2, "{pods:?}");
    remove_pod(&mut cri, &runc_pod.id).await;
    remove_pod(&mut cri, &wasm_pod.id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasm_containers_of_a_pod_removed_while_wasmlet_was_down_are_cleaned_up() {
    let mut node = node("").await;
    let mut cri = node.wasmlet.cri();
    let pod = cri
        .run_pod(
            node.pod()
                .annotation("module.wasm.image/variant", "compat-smart")
                .build(),
        )
        .await
        .unwrap();
    let server = ContainerConfigBuilder::new("server", PONG_P2)
        .env("LISTEN_PORT", "7000")
        .build();
    let server_id = cri.start(&pod, server).await.unwrap();

    // The pod goes away behind wasmlet's back.
    node.wasmlet.kill_9().await;
    let mut theirs = CriClient::connect(node.containerd.socket(), Duration::from_secs(5))
        .await
        .unwrap();
    theirs.stop_pod_sandbox(&pod.id).await.unwrap();
    theirs.remove_pod_sandbox(&pod.id).await.unwrap();

    let mut cri = node.wasmlet.restart().await;
    // The first full relist finds the joined sandbox's pod gone.
    assert!(cri.list_pod_sandbox(None).await.unwrap().is_empty());
    assert_code(cri.container_status(&server_id).await, Code::NotFound);
    assert!(cri.list_containers(None).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_delegate_other_handlers_are_refused_naming_the_served_ones() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let refused = cri.run_pod_sandbox(wasmlet.pod().build(), "runc").await;
    let status = assert_code(refused, Code::InvalidArgument);
    for named in ["\"runc\"", "wasm", "wasmtime"] {
        assert!(status.message().contains(named), "{status:?}");
    }
    let status = cri.status(false).await.unwrap();
    assert!(
        !status
            .status
            .unwrap()
            .conditions
            .iter()
            .any(|c| c.r#type == "DelegateRuntimeReady")
    );
    // The Wasm handlers and the default one are served.
    for handler in ["", WASM] {
        let pod = cri
            .run_pod_on(wasmlet.pod().build(), handler)
            .await
            .unwrap();
        remove_pod(&mut cri, &pod.id).await;
    }
}
