//! "Compat" images: ordinary OCI images whose tar layers carry `.wasm`
//! programs, pulled from a real registry, unpacked safely and run by
//! entrypoint or by `command`.

use std::path::Path;

use tonic::Code;
use wasmlet_conformance::fixtures::registry::{
    OCI_CONFIG, OCI_MANIFEST, Registry, RegistryOptions,
};
use wasmlet_conformance::{
    ContainerConfigBuilder, Stream, assert_code, read_cri_log, stream_lines,
};

use crate::GUEST_TIMEOUT;
use crate::daemon::Wasmlet;

const TAR_GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const TAR: &str = "application/vnd.oci.image.layer.v1.tar";

fn regular(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o755);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, path, data).unwrap();
}

fn symlink(b: &mut tar::Builder<Vec<u8>>, path: &str, target: &str) {
    let mut h = tar::Header::new_gnu();
    h.set_size(0);
    h.set_entry_type(tar::EntryType::Symlink);
    b.append_link(&mut h, path, target).unwrap();
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, bytes).unwrap();
    gz.finish().unwrap()
}

fn image_config(entrypoint: &[&str], env: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": "wasm",
        "os": "wasip1",
        "config": { "Entrypoint": entrypoint, "Env": env, "WorkingDir": "/data" },
        "rootfs": { "type": "layers", "diff_ids": [] },
    }))
    .unwrap()
}

async fn daemon_for(registry: &Registry) -> Wasmlet {
    Wasmlet::builder()
        .config(format!(
            "[registry]\ninsecure = [\"{}\"]\n",
            registry.host()
        ))
        .start()
        .await
}

/// Two layers: programs (gzip) and a data file plus a PATH symlink (plain).
async fn push_programs(registry: &Registry) -> String {
    let mut programs = tar::Builder::new(Vec::new());
    regular(
        &mut programs,
        "bin/echo.wasm",
        &std::fs::read(wasm_samples::ECHO_P1).unwrap(),
    );
    regular(
        &mut programs,
        "bin/ticker.wasm",
        &std::fs::read(wasm_samples::TICKER_P1).unwrap(),
    );
    regular(&mut programs, "data/old.txt", b"from the lower layer");
    let programs = gzip(&programs.into_inner().unwrap());
    let mut extra = tar::Builder::new(Vec::new());
    symlink(&mut extra, "usr/bin/tick", "../../bin/ticker.wasm");
    regular(&mut extra, "data/.wh.old.txt", b"");
    regular(&mut extra, "data/hello.txt", b"hello from the image");
    let extra = extra.into_inner().unwrap();
    let config = image_config(
        &["/bin/echo.wasm"],
        &["PATH=/usr/bin:/bin", "FROM_IMAGE=yes", "OVERRIDDEN=image"],
    );
    registry
        .push_image(
            "compat/tools",
            "v1",
            OCI_CONFIG,
            &config,
            &[(TAR_GZ, &programs), (TAR, &extra)],
            OCI_MANIFEST,
        )
        .await
        .unwrap();
    format!("{}/compat/tools:v1", registry.host())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compat_image_runs_its_entrypoint_with_the_image_env_and_files() {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    let reference = push_programs(&registry).await;
    let wasmlet = daemon_for(&registry).await;
    let mut cri = wasmlet.cri();
    cri.pull_image(&reference).await.unwrap();

    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let config = ContainerConfigBuilder::new("tools", &reference)
        .env("OVERRIDDEN", "container")
        .env("READ_FILE", "hello.txt")
        .build();
    let log = pod.container_log(&config);
    let status = cri.run_to_exit(&pod, config, GUEST_TIMEOUT).await.unwrap();
    let out = stream_lines(&read_cri_log(&log).unwrap(), Stream::Stdout);
    assert_eq!(status.exit_code, 0, "{status:?}\n{out:#?}");
    assert!(
        out.contains(&"arg[0]=/bin/echo.wasm".to_owned()),
        "{out:#?}"
    );
    assert!(out.contains(&"env FROM_IMAGE=yes".to_owned()), "{out:#?}");
    assert!(
        out.contains(&"env OVERRIDDEN=container".to_owned()),
        "{out:#?}"
    );
    // WorkingDir /data: the relative path resolves inside the image.
    assert!(
        out.contains(&"file hello.txt: hello from the image".to_owned()),
        "{out:#?}"
    );
    // The admin API inspects the program the entrypoint names.
    let channel = wasmlet_proto::connect_unix(wasmlet.socket()).await.unwrap();
    let inspected = wasmlet_proto::admin::admin_client::AdminClient::new(channel)
        .inspect_image(wasmlet_proto::admin::InspectImageRequest {
            image: reference.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(inspected.compat, "{inspected:?}");
    assert_eq!(inspected.entrypoint, vec!["/bin/echo.wasm"]);
    assert_eq!(inspected.kind(), wasmlet_proto::admin::WasmKind::Module);
    let echo = std::fs::read(wasm_samples::ECHO_P1).unwrap();
    assert_eq!(inspected.wasm_size_bytes, echo.len() as u64);
}

/// How many times the daemon compiled a program so far (its log).
fn compiles(wasmlet: &Wasmlet) -> usize {
    wasmlet.daemon_log().matches("compiled Wasm").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_answers_compiled_and_a_program_two_images_share_outlives_either() {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    let reference = push_programs(&registry).await;
    // The fixture imported echo as a Wasm artifact; the compat image's
    // entrypoint is the same module: two images, one compiled program.
    let mut wasmlet = Wasmlet::builder()
        .config(format!(
            "[registry]\ninsecure = [\"{}\"]\n",
            registry.host()
        ))
        .rust_log("info")
        .start()
        .await;
    let mut cri = wasmlet.cri();
    cri.pull_image(&reference).await.unwrap();
    // PullImage answers once the program is compiled (the kubelet gives
    // the pull no deadline, CreateContainer two minutes).
    assert_eq!(compiles(&wasmlet), 1, "{}", wasmlet.daemon_log());
    let channel = wasmlet_proto::connect_unix(wasmlet.socket()).await.unwrap();
    let mut admin = wasmlet_proto::admin::admin_client::AdminClient::new(channel);
    for image in [reference.as_str(), crate::ECHO_P1] {
        let inspected = admin
            .inspect_image(wasmlet_proto::admin::InspectImageRequest {
                image: image.to_owned(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(inspected.compiled, "{image}: {inspected:?}");
    }

    // The kubelet's image GC removes one; the other's program stays
    // compiled, also across a restart (where unused programs are collected).
    cri.remove_image(crate::ECHO_P1).await.unwrap();
    wasmlet.terminate().await;
    let mut cri = wasmlet.restart().await;
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let config = ContainerConfigBuilder::new("tools", &reference).build();
    let status = cri.run_to_exit(&pod, config, GUEST_TIMEOUT).await.unwrap();
    assert_eq!(status.exit_code, 0, "{status:?}");
    assert_eq!(
        compiles(&wasmlet),
        1,
        "the shared program was compiled again: {}",
        wasmlet.daemon_log()
    );

    // Once no image runs it, it goes (at the next start at the latest).
    cri.remove_image(&reference).await.unwrap();
    let compiled = wasmlet.root().join("compiled");
    let artifacts = || {
        walk(&compiled)
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
            .count()
    };
    assert_eq!(artifacts(), 0, "artifacts left: {:?}", walk(&compiled));
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_picks_another_program_of_the_image_through_path_and_symlinks() {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    let reference = push_programs(&registry).await;
    let wasmlet = daemon_for(&registry).await;
    let mut cri = wasmlet.cri();
    cri.pull_image(&reference).await.unwrap();

    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let config = ContainerConfigBuilder::new("tick", &reference)
        .command(["tick"])
        .env("TICKS", "2")
        .env("TICK_MS", "10")
        .build();
    let log = pod.container_log(&config);
    let status = cri.run_to_exit(&pod, config, GUEST_TIMEOUT).await.unwrap();
    let out = stream_lines(&read_cri_log(&log).unwrap(), Stream::Stdout);
    assert_eq!(status.exit_code, 0, "{status:?}\n{out:#?}");
    assert_eq!(out, ["tick 1", "tick 2"]);

    // A program the image does not carry fails to start, saying so.
    let config = ContainerConfigBuilder::new("missing", &reference)
        .command(["nope"])
        .build();
    let created = cri.create_container(&pod, config).await.unwrap();
    let error = assert_code(
        cri.start_container(&created).await,
        Code::FailedPrecondition,
    );
    assert!(
        error.message().contains("\"nope\" is not in the image"),
        "{}",
        error.message()
    );
}

fn blob_files(root: &Path) -> usize {
    std::fs::read_dir(root.join("images/blobs/sha256")).map_or(0, |d| d.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_layers_are_refused_naming_the_entry_and_nothing_is_kept() {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    let wasmlet = daemon_for(&registry).await;
    let mut cri = wasmlet.cri();
    let images_before = cri.list_images(None).await.unwrap().len();
    let blobs_before = blob_files(&wasmlet.root());

    let mut layer = tar::Builder::new(Vec::new());
    regular(
        &mut layer,
        "bin/echo.wasm",
        &std::fs::read(wasm_samples::ECHO_P1).unwrap(),
    );
    symlink(&mut layer, "etc/passwd", "/etc/passwd");
    let layer = layer.into_inner().unwrap();
    let config = image_config(&["/bin/echo.wasm"], &[]);
    registry
        .push_image(
            "compat/hostile",
            "v1",
            OCI_CONFIG,
            &config,
            &[(TAR, &layer)],
            OCI_MANIFEST,
        )
        .await
        .unwrap();
    let reference = format!("{}/compat/hostile:v1", registry.host());
    let error = assert_code(cri.pull_image(&reference).await, Code::InvalidArgument);
    assert!(
        error.message().contains("etc/passwd") && error.message().contains("absolute"),
        "{}",
        error.message()
    );
    assert_eq!(cri.list_images(None).await.unwrap().len(), images_before);
    let rootfs = wasmlet.root().join("images/rootfs");
    let roots = std::fs::read_dir(&rootfs).map_or(0, |d| d.count());
    assert_eq!(roots, 0, "an unpacked or partial root was kept");
    let ingest = std::fs::read_dir(wasmlet.root().join("images/ingest")).map_or(0, |d| d.count());
    assert_eq!(ingest, 0);
    // What the failed pull downloaded is taken back.
    assert_eq!(blob_files(&wasmlet.root()), blobs_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compat_image_whose_entrypoint_is_not_wasm_is_refused() {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    let wasmlet = daemon_for(&registry).await;
    let mut layer = tar::Builder::new(Vec::new());
    regular(&mut layer, "bin/sh", b"#!/bin/sh\necho not wasm\n");
    let layer = gzip(&layer.into_inner().unwrap());
    let config = image_config(&["/bin/sh"], &[]);
    registry
        .push_image(
            "compat/shell",
            "v1",
            OCI_CONFIG,
            &config,
            &[(TAR_GZ, &layer)],
            OCI_MANIFEST,
        )
        .await
        .unwrap();
    let reference = format!("{}/compat/shell:v1", registry.host());
    let error = assert_code(
        wasmlet.cri().pull_image(&reference).await,
        Code::InvalidArgument,
    );
    assert!(
        error.message().contains("not a WebAssembly file"),
        "{}",
        error.message()
    );
}

async fn exec(
    cri: &mut wasmlet_conformance::CriClient,
    id: &str,
    cmd: &[&str],
    timeout: i64,
) -> Result<wasmlet_conformance::cri::ExecSyncResponse, tonic::Status> {
    cri.runtime()
        .exec_sync(wasmlet_conformance::cri::ExecSyncRequest {
            container_id: id.to_owned(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout,
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_sync_runs_a_program_of_the_image_beside_the_container() {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    let reference = push_programs(&registry).await;
    let wasmlet = daemon_for(&registry).await;
    let mut cri = wasmlet.cri();
    cri.pull_image(&reference).await.unwrap();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let ticker = ContainerConfigBuilder::new("tools", &reference)
        .command(["tick"])
        .env("READ_FILE", "hello.txt")
        .env("OVERRIDDEN", "container")
        .build();
    let log = pod.container_log(&ticker);
    let id = cri.start(&pod, ticker).await.unwrap();

    // A program on the image's PATH, with the container's environment,
    // working directory and files; its output comes back, not in the log.
    let out = exec(&mut cri, &id, &["echo.wasm", "from exec"], 10)
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.exit_code, 0, "{out:?}");
    assert!(
        stdout.contains("arg[0]=echo.wasm\narg[1]=from exec\n"),
        "{stdout}"
    );
    assert!(stdout.contains("env OVERRIDDEN=container\n"), "{stdout}");
    assert!(
        stdout.contains("file hello.txt: hello from the image\n"),
        "{stdout}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr), "echo done\n");
    let logged = read_cri_log(&log).unwrap();
    assert!(
        !stream_lines(&logged, Stream::Stdout)
            .iter()
            .any(|l| l.contains("from exec")),
        "exec output leaked into the container log"
    );

    // What is not a program of the image: 127, as a shell says it.
    // `/proc/self/exe` is the container's own program (the ticker, which
    // runs until its timeout).
    let own = exec(&mut cri, &id, &["/proc/self/exe"], 1)
        .await
        .unwrap_err();
    assert_eq!(own.code(), tonic::Code::DeadlineExceeded, "{own:?}");
    let missing = exec(&mut cri, &id, &["sh", "-c", "true"], 10)
        .await
        .unwrap();
    assert_eq!(missing.exit_code, 127);
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("sh"),
        "{missing:?}"
    );
    // Past its timeout an exec fails with DeadlineExceeded; the container
    // runs on.
    let slow = exec(&mut cri, &id, &["/usr/bin/tick"], 1)
        .await
        .unwrap_err();
    assert_eq!(slow.code(), Code::DeadlineExceeded, "{slow:?}");
    let status = cri.container_status(&id).await.unwrap();
    assert_eq!(
        status.state,
        wasmlet_conformance::cri::ContainerState::ContainerRunning as i32
    );

    cri.stop_container(&id, 0).await.unwrap();
    let stopped = exec(&mut cri, &id, &["echo.wasm"], 10).await.unwrap_err();
    assert_eq!(stopped.code(), Code::FailedPrecondition, "{stopped:?}");
    let empty = exec(&mut cri, &id, &[], 10).await.unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument, "{empty:?}");
}

/// A busybox-like image: `minibox` as `/bin/busybox` with the applets the
/// read-only test runs, and the directories a Linux image has.
async fn push_minibox(registry: &Registry) -> String {
    let mut layer = tar::Builder::new(Vec::new());
    for dir in ["tmp/", "data/"] {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_mode(0o755);
        h.set_entry_type(tar::EntryType::Directory);
        layer.append_data(&mut h, dir, &[][..]).unwrap();
    }
    regular(
        &mut layer,
        "bin/busybox",
        &std::fs::read(wasm_samples::MINIBOX_P1).unwrap(),
    );
    for applet in ["sh", "touch", "sleep", "cat"] {
        symlink(&mut layer, &format!("bin/{applet}"), "busybox");
    }
    let layer = gzip(&layer.into_inner().unwrap());
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "wasm",
        "os": "wasip1",
        "config": { "Cmd": ["sh"], "Env": ["PATH=/bin"] },
        "rootfs": { "type": "layers", "diff_ids": [] },
    }))
    .unwrap();
    registry
        .push_image(
            "compat/box",
            "v1",
            OCI_CONFIG,
            &config,
            &[(TAR_GZ, &layer)],
            OCI_MANIFEST,
        )
        .await
        .unwrap();
    format!("{}/compat/box:v1", registry.host())
}

/// A tmpfs the test mounts at `dir` (made), as a kubelet volume below a
/// host path; the fixture detaches it when dropped.
fn mount_tmpfs(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .expect("mounting a tmpfs (the test runs as root)");
}

/// The mounts strictly below the daemon's `ROOT/containers` (which is a
/// private mount of its own while binds are on).
fn container_mounts(wasmlet: &Wasmlet) -> Vec<std::path::PathBuf> {
    let containers = wasmlet.root().join("containers");
    crate::daemon::mounts_under(&containers)
        .into_iter()
        .filter(|m| m != &containers)
        .collect()
}

/// A security context with a read-only root.
fn config_linux_read_only_root() -> Option<wasmlet_conformance::cri::LinuxContainerConfig> {
    Some(wasmlet_conformance::cri::LinuxContainerConfig {
        security_context: Some(wasmlet_conformance::cri::LinuxContainerSecurityContext {
            readonly_rootfs: true,
            ..Default::default()
        }),
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_directories_refuse_writes_with_erofs_and_their_binds_go_with_the_container() {
    let registry = Registry::start(RegistryOptions::default()).await.unwrap();
    let reference = push_minibox(&registry).await;
    let mut wasmlet = daemon_for(&registry).await;
    let mut cri = wasmlet.cri();
    cri.pull_image(&reference).await.unwrap();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();

    // Host paths with a tmpfs mounted below each, as kubelet volumes are.
    let ro = wasmlet.scratch("ro");
    let rro = wasmlet.scratch("rro");
    mount_tmpfs(&ro.join("sub"));
    mount_tmpfs(&rro.join("sub"));
    let long_running = |attempt| {
        let mut config = ContainerConfigBuilder::new("box", &reference)
            .attempt(attempt)
            .command(["sleep", "3600"])
            .mount(&ro, "/ro", true)
            .build();
        config.mounts.push(wasmlet_conformance::cri::Mount {
            container_path: "/rro".into(),
            host_path: rro.to_string_lossy().into_owned(),
            readonly: true,
            recursive_read_only: true,
            ..Default::default()
        });
        config.linux = Some(wasmlet_conformance::cri::LinuxContainerConfig {
            security_context: Some(wasmlet_conformance::cri::LinuxContainerSecurityContext {
                readonly_paths: vec!["/tmp".into(), "/proc/sys".into()],
                ..Default::default()
            }),
            ..Default::default()
        });
        config
    };
    let id = cri.start(&pod, long_running(0)).await.unwrap();
    let touch = |path: &'static str| {
        let id = id.clone();
        let mut cri = cri.clone();
        async move {
            let out = exec(&mut cri, &id, &["touch", path], 10).await.unwrap();
            (
                out.exit_code,
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let refused = |path: &str| (1, format!("touch: {path}: Read-only file system\n"));
    // A read-only mount, recursive or not, and a read-only path: the
    // kernel refuses, as in containerd's containers.
    assert_eq!(touch("/ro/file").await, refused("/ro/file"));
    assert_eq!(touch("/rro/file").await, refused("/rro/file"));
    assert_eq!(touch("/rro/sub/file").await, refused("/rro/sub/file"));
    assert_eq!(touch("/tmp/file").await, refused("/tmp/file"));
    // Below a non-recursive read-only mount, the host's own mount stays
    // writable; the container's root (its copy of the image's) too.
    assert_eq!(touch("/ro/sub/file").await, (0, String::new()));
    assert!(ro.join("sub/file").exists());
    assert_eq!(touch("/file").await, (0, String::new()));
    // The pod's resolv.conf and hostname, as containerd mounts them:
    // writable unless the root is read-only.
    assert_eq!(touch("/etc/resolv.conf").await, (0, String::new()));
    assert_eq!(touch("/etc/hostname").await, (0, String::new()));
    assert!(!container_mounts(&wasmlet).is_empty());

    // A read-only root, a relative path in it: as critest's spec runs it.
    let mut config = ContainerConfigBuilder::new("rootfs", &reference)
        .command(["touch", "test.go"])
        .build();
    config.linux = config_linux_read_only_root();
    let log = pod.container_log(&config);
    let status = cri.run_to_exit(&pod, config, GUEST_TIMEOUT).await.unwrap();
    let records = read_cri_log(&log).unwrap();
    assert_eq!(status.exit_code, 1, "{status:?}\n{records:#?}");
    assert_eq!(
        stream_lines(&records, Stream::Stderr),
        ["touch: test.go: Read-only file system"]
    );
    // With a read-only root, the pod's files are read-only too.
    let mut etc = ContainerConfigBuilder::new("etc", &reference)
        .command(["touch", "/etc/resolv.conf"])
        .build();
    etc.linux = config_linux_read_only_root();
    let log = pod.container_log(&etc);
    let etc_status = cri.run_to_exit(&pod, etc, GUEST_TIMEOUT).await.unwrap();
    let records = read_cri_log(&log).unwrap();
    assert_eq!(etc_status.exit_code, 1, "{etc_status:?}\n{records:#?}");
    assert_eq!(
        stream_lines(&records, Stream::Stderr),
        ["touch: /etc/resolv.conf: Read-only file system"]
    );
    // Its binds went when its guest ended.
    let exited = wasmlet.root().join("containers").join(&status.id);
    assert!(
        container_mounts(&wasmlet)
            .iter()
            .all(|m| !m.starts_with(&exited)),
        "{:?}",
        container_mounts(&wasmlet)
    );

    // Killed, the agent leaves the binds of the running container; the
    // next one detaches them before anything else.
    wasmlet.kill_9().await;
    assert!(!container_mounts(&wasmlet).is_empty());
    let mut cri = wasmlet.restart().await;
    assert_eq!(container_mounts(&wasmlet), Vec::<std::path::PathBuf>::new());
    // The host's own mounts are untouched.
    assert!(ro.join("sub/file").exists());

    // Removed while it runs, a container leaves no mount and no files.
    let id = cri.start(&pod, long_running(1)).await.unwrap();
    assert_eq!(
        exec(&mut cri, &id, &["touch", "/ro/file"], 10)
            .await
            .unwrap()
            .exit_code,
        1
    );
    assert!(!container_mounts(&wasmlet).is_empty());
    cri.remove_container(&id).await.unwrap();
    assert_eq!(container_mounts(&wasmlet), Vec::<std::path::PathBuf>::new());
    assert!(!wasmlet.root().join("containers").join(&id).exists());
    assert!(ro.join("sub/file").exists() && rro.join("sub").is_dir());
}
