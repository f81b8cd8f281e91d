//! PullImage from real registries on loopback: what is accepted (Wasm
//! artifacts under every layer media type in use, indexes with a Wasm
//! platform), what is refused and with which code, how credentials are
//! honoured, how faults on the wire end (retried, or failed with the store
//! left as it was), that concurrent pulls share one download, that a pulled
//! image is compiled once, and the `image` and `play` commands that pull.
//!
//! Every registry is a [`Registry`] fixture on `127.0.0.1`, possibly behind a
//! [`FaultProxy`]; the one registry that is not is `127.0.0.1:1`, which
//! refuses connections. The Wasm pushed is a sample with a custom section
//! naming the test appended, so that no two tests (and no imported sample)
//! share a blob and every pull really downloads.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use wasmlet_conformance::fixtures::fault_proxy::{Fault, FaultProxy, PathMatch};
use wasmlet_conformance::fixtures::registry::{
    Descriptor, OCI_CONFIG, OCI_MANIFEST, Registry, RegistryOptions, WASM_CONFIG, sha256_digest,
};
use wasmlet_conformance::{
    Code, ContainerConfigBuilder, CriClient, Stream, assert_code, cri, read_cri_log, stream_lines,
};

use crate::GUEST_TIMEOUT;
use crate::daemon::{Wasmlet, is_image_id};
use crate::registry_common::{bounded, tagged_wasm};

/// Bounds each test: registry and daemon start-up, pushes, pulls (a failing
/// pull retries for about 1.4 s), and guests run to exit.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// How long the background compile of a pulled image may take to be logged.
const COMPILE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long `wasmlet play` may take to start its agent, pull, run, tear down.
const PLAY_TIMEOUT: Duration = Duration::from_secs(60);

/// The repository every test pushes to.
const REPO: &str = "conformance/echo";

/// The credentials of the basic-auth registries.
const USER: &str = "puller";
const PASSWORD: &str = "s3cret-pass";

/// Layer media types other than `application/wasm` that pullers accept.
const WASM_CONTENT_LAYER: &str = "application/vnd.wasm.content.layer.v1+wasm";
const COMPONENT_LAYER: &str = "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm";

/// Layers of ordinary Linux container images.
const TAR_GZIP_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const TAR_ZSTD_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// A Helm chart stored in a registry.
const HELM_CONFIG: &str = "application/vnd.cncf.helm.config.v1+json";
const HELM_CHART_LAYER: &str = "application/vnd.cncf.helm.chart.content.v1.tar+gzip";

/// The arguments the echo guest is run with; it prints `arg[i]=VALUE`.
const ECHO_ARGS: [&str; 2] = ["hello", "from the registry"];

async fn anonymous_registry() -> Registry {
    Registry::start(RegistryOptions::default())
        .await
        .expect("start registry")
}

async fn auth_registry() -> Registry {
    Registry::start(RegistryOptions {
        basic_auth: Some((USER.into(), PASSWORD.into())),
    })
    .await
    .expect("start registry")
}

/// A `[registry]` section letting the daemon speak plain HTTP to `hosts`,
/// followed by `extra` keys of that section.
fn registry_config(hosts: &[&str], extra: &str) -> String {
    let hosts: Vec<String> = hosts.iter().map(|host| format!("\"{host}\"")).collect();
    format!("[registry]\ninsecure = [{}]\n{extra}", hosts.join(", "))
}

/// A daemon (every sample imported) that reaches `hosts` over plain HTTP.
async fn daemon_for(hosts: &[&str]) -> Wasmlet {
    Wasmlet::builder()
        .config(registry_config(hosts, ""))
        .start()
        .await
}

/// A sample made unique to `tag`, written into `dir`.
fn sample_file(dir: &Path, sample: &str, tag: &str) -> (PathBuf, Vec<u8>) {
    let bytes = std::fs::read(sample).unwrap_or_else(|e| panic!("reading {sample}: {e}"));
    let wasm = tagged_wasm(&bytes, tag);
    let path = dir.join(format!("{tag}.wasm"));
    std::fs::write(&path, &wasm).expect("writing a tagged sample");
    (path, wasm)
}

/// Pushes the echo module made unique to `tag` to `registry` as
/// `REPO:tag` with `wasmlet image push`; returns the reference and the
/// Wasm bytes.
fn push_echo(wasmlet: &Wasmlet, registry: &Registry, tag: &str) -> (String, Vec<u8>) {
    let (file, wasm) = sample_file(&wasmlet.scratch("wasm"), wasm_samples::ECHO_P1, tag);
    let reference = format!("{}/{REPO}:{tag}", registry.host());
    Wasmlet::push(&file, &reference, registry.basic_auth());
    (reference, wasm)
}

/// The manifest stored under `REPO:tag`, as JSON, and its descriptor.
async fn manifest(registry: &Registry, tag: &str) -> (serde_json::Value, Descriptor) {
    let response = registry.client().get_manifest(REPO, tag).await.unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    let json = serde_json::from_slice(&response.body).expect("the manifest is JSON");
    (json, Descriptor::of(OCI_MANIFEST, &response.body))
}

/// Runs the echo guest of `image` with [`ECHO_ARGS`] in a pod of its own,
/// asserts it exited 0 having printed them, and returns its status.
async fn run_echo(wasmlet: &Wasmlet, image: &str) -> cri::ContainerStatus {
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let config = ContainerConfigBuilder::new("echo", image)
        .args(ECHO_ARGS)
        .build();
    let log = pod.container_log(&config);
    let status = cri.run_to_exit(&pod, config, GUEST_TIMEOUT).await.unwrap();
    let stdout = stream_lines(&read_cri_log(&log).unwrap(), Stream::Stdout);
    assert_eq!(status.exit_code, 0, "{status:?}\n{stdout:#?}");
    for (i, arg) in ECHO_ARGS.iter().enumerate() {
        let line = format!("arg[{}]={arg}", i + 1);
        assert!(stdout.contains(&line), "no {line:?} in {stdout:#?}");
    }
    status
}

/// Asserts that a pull of `reference` answered `id` and that ImageStatus
/// lists it with its tag and `repository@manifest_digest`.
async fn assert_pulled(cri: &mut CriClient, reference: &str, id: &str, manifest_digest: &str) {
    assert!(is_image_id(id), "PullImage answered {id:?}");
    let image = cri
        .image_status(reference)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("ImageStatus of the pulled {reference} is empty"));
    assert_eq!(image.id, id, "{image:?}");
    assert!(image.size > 0, "{image:?}");
    assert!(
        image.repo_tags.iter().any(|tag| tag == reference),
        "{image:?}"
    );
    let repository = reference.rsplit_once(':').unwrap().0;
    let repo_digest = format!("{repository}@{manifest_digest}");
    assert!(
        image.repo_digests.contains(&repo_digest),
        "{repo_digest} is not among the repo digests: {image:?}"
    );
}

/// Pushes `sample` made unique with `wasmlet image push`, pulls it over CRI
/// and runs it.
async fn pushed_sample_is_pulled_and_runs(sample: &str, tag: &str) {
    let registry = anonymous_registry().await;
    let wasmlet = daemon_for(&[&registry.host()]).await;
    let (file, _) = sample_file(&wasmlet.scratch("wasm"), sample, tag);
    let reference = format!("{}/{REPO}:{tag}", registry.host());
    let pushed = Wasmlet::push(&file, &reference, None);

    let (manifest, descriptor) = manifest(&registry, tag).await;
    assert_eq!(pushed, descriptor.digest, "push printed another digest");
    assert_eq!(manifest["config"]["mediaType"], WASM_CONFIG, "{manifest}");

    let mut cri = wasmlet.cri();
    let id = cri.pull_image(&reference).await.unwrap();
    assert_eq!(
        id, manifest["config"]["digest"],
        "the id is the config digest"
    );
    assert_pulled(&mut cri, &reference, &id, &pushed).await;

    let status = run_echo(&wasmlet, &reference).await;
    // By repo digest, as containerd reports it (the kubelet's imageID).
    let repository = reference.rsplit_once(':').unwrap().0;
    assert_eq!(
        status.image_ref,
        format!("{repository}@{pushed}"),
        "{status:?}"
    );
}

/// Pushes the echo module with `layer_media_type` by hand and runs it.
async fn layer_media_type_is_pulled_and_runs(sample: &str, os: &str, layer_media_type: &str) {
    let registry = anonymous_registry().await;
    let wasmlet = daemon_for(&[&registry.host()]).await;
    let (_, wasm) = sample_file(&wasmlet.scratch("wasm"), sample, "layer");
    let config = format!(r#"{{"architecture":"wasm","os":"{os}"}}"#);
    let pushed = registry
        .push_image(
            REPO,
            "layer",
            WASM_CONFIG,
            config.as_bytes(),
            &[(layer_media_type, &wasm)],
            OCI_MANIFEST,
        )
        .await
        .unwrap_or_else(|e| panic!("push: {e}\n{}", registry.log()));

    let reference = format!("{}/{REPO}:layer", registry.host());
    let mut cri = wasmlet.cri();
    let id = cri.pull_image(&reference).await.unwrap();
    assert_eq!(id, sha256_digest(config.as_bytes()));
    assert_pulled(&mut cri, &reference, &id, &pushed.digest).await;
    run_echo(&wasmlet, &reference).await;
}

#[tokio::test]
async fn a_module_pushed_by_image_push_is_pulled_with_its_id_tag_and_digest_and_runs() {
    bounded(
        TEST_TIMEOUT,
        pushed_sample_is_pulled_and_runs(wasm_samples::ECHO_P1, "pushed-p1"),
    )
    .await;
}

#[tokio::test]
async fn a_component_pushed_by_image_push_is_pulled_with_its_id_tag_and_digest_and_runs() {
    bounded(
        TEST_TIMEOUT,
        pushed_sample_is_pulled_and_runs(wasm_samples::ECHO_P2, "pushed-p2"),
    )
    .await;
}

#[tokio::test]
async fn a_wasm_content_layer_is_pulled_and_runs() {
    bounded(
        TEST_TIMEOUT,
        layer_media_type_is_pulled_and_runs(wasm_samples::ECHO_P1, "wasip1", WASM_CONTENT_LAYER),
    )
    .await;
}

#[tokio::test]
async fn a_bytecodealliance_component_layer_is_pulled_and_runs() {
    bounded(
        TEST_TIMEOUT,
        layer_media_type_is_pulled_and_runs(wasm_samples::ECHO_P2, "wasip2", COMPONENT_LAYER),
    )
    .await;
}

// ---- credentials ----

/// CRI `AuthConfig` with a user and password.
fn user_password(password: &str) -> cri::AuthConfig {
    cri::AuthConfig {
        username: USER.to_owned(),
        password: password.to_owned(),
        ..Default::default()
    }
}

/// CRI `AuthConfig` with `auth`: base64 of `user:password`.
fn base64_auth(user: &str, password: &str) -> cri::AuthConfig {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = format!("{user}:{password}").into_bytes();
    let mut auth = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                auth.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                auth.push('=');
            }
        }
    }
    cri::AuthConfig {
        auth,
        ..Default::default()
    }
}

/// A basic-auth registry holding the echo module as `REPO:tag`, and a
/// daemon that reaches it.
async fn auth_registry_with_echo(tag: &str) -> (Registry, Wasmlet, String) {
    let registry = auth_registry().await;
    let wasmlet = daemon_for(&[&registry.host()]).await;
    let (reference, _) = push_echo(&wasmlet, &registry, tag);
    (registry, wasmlet, reference)
}

#[tokio::test]
async fn image_push_to_a_basic_auth_registry_needs_credentials() {
    bounded(TEST_TIMEOUT, async {
        let registry = auth_registry().await;
        let dir = tempfile::tempdir().unwrap();
        let (file, _) = sample_file(dir.path(), wasm_samples::ECHO_P1, "push-auth");
        let reference = format!("{}/{REPO}:push-auth", registry.host());

        let anonymous = Wasmlet::push_output(&file, &reference, None);
        assert!(
            !anonymous.status.success(),
            "an anonymous push was accepted: {}",
            String::from_utf8_lossy(&anonymous.stdout)
        );
        let wrong = Wasmlet::push_output(&file, &reference, Some((USER, "wrong")));
        assert!(!wrong.status.success(), "a wrong password was accepted");

        let pushed = Wasmlet::push(&file, &reference, Some((USER, PASSWORD)));
        let (_, descriptor) = manifest(&registry, "push-auth").await;
        assert_eq!(pushed, descriptor.digest);
    })
    .await;
}

#[tokio::test]
async fn pull_without_credentials_from_a_basic_auth_registry_is_permission_denied_naming_it() {
    bounded(TEST_TIMEOUT, async {
        let (registry, wasmlet, reference) = auth_registry_with_echo("anonymous").await;
        let before = wasmlet.cri().list_images(None).await.unwrap();
        let status = assert_code(
            wasmlet.cri().pull_image(&reference).await,
            Code::PermissionDenied,
        );
        assert!(
            status.message().contains(&registry.host()),
            "the message does not name the registry: {status:?}"
        );
        assert_eq!(wasmlet.cri().list_images(None).await.unwrap(), before);
    })
    .await;
}

#[tokio::test]
async fn pull_with_username_and_password_from_a_basic_auth_registry_succeeds() {
    bounded(TEST_TIMEOUT, async {
        let (registry, wasmlet, reference) = auth_registry_with_echo("user-password").await;
        let mut cri = wasmlet.cri();
        let id = cri
            .pull_image_with_auth(&reference, user_password(PASSWORD))
            .await
            .unwrap();
        let (manifest, descriptor) = manifest(&registry, "user-password").await;
        assert_eq!(id, manifest["config"]["digest"]);
        assert_pulled(&mut cri, &reference, &id, &descriptor.digest).await;
        run_echo(&wasmlet, &reference).await;
    })
    .await;
}

#[tokio::test]
async fn pull_with_base64_auth_from_a_basic_auth_registry_succeeds() {
    bounded(TEST_TIMEOUT, async {
        let (registry, wasmlet, reference) = auth_registry_with_echo("base64-auth").await;
        let mut cri = wasmlet.cri();
        let id = cri
            .pull_image_with_auth(&reference, base64_auth(USER, PASSWORD))
            .await
            .unwrap();
        let (manifest, descriptor) = manifest(&registry, "base64-auth").await;
        assert_eq!(id, manifest["config"]["digest"]);
        assert_pulled(&mut cri, &reference, &id, &descriptor.digest).await;
    })
    .await;
}

#[tokio::test]
async fn pull_with_a_wrong_password_is_permission_denied() {
    bounded(TEST_TIMEOUT, async {
        let (registry, wasmlet, reference) = auth_registry_with_echo("wrong-password").await;
        let status = assert_code(
            wasmlet
                .cri()
                .pull_image_with_auth(&reference, user_password("wrong"))
                .await,
            Code::PermissionDenied,
        );
        assert!(status.message().contains(&registry.host()), "{status:?}");
    })
    .await;
}

/// The kubelet sends each pod's pull secret with its pull: one daemon must
/// authorize each pull with the credentials it came with, not with those of
/// an earlier pull from the same registry.
#[tokio::test]
async fn a_pull_with_credentials_after_an_anonymous_one_is_authorized() {
    bounded(TEST_TIMEOUT, async {
        let (registry, wasmlet, reference) = auth_registry_with_echo("anonymous-first").await;
        let mut cri = wasmlet.cri();
        assert_code(cri.pull_image(&reference).await, Code::PermissionDenied);
        let id = cri
            .pull_image_with_auth(&reference, user_password(PASSWORD))
            .await
            .expect("a pull with the right password after an anonymous one");
        let (manifest, _) = manifest(&registry, "anonymous-first").await;
        assert_eq!(id, manifest["config"]["digest"]);
    })
    .await;
}

/// A pod without the pull secret must not get the image because another
/// pod's pull had it.
#[tokio::test]
async fn a_pull_without_credentials_after_an_authorized_one_is_permission_denied() {
    bounded(TEST_TIMEOUT, async {
        let (_registry, wasmlet, reference) = auth_registry_with_echo("authorized-first").await;
        let mut cri = wasmlet.cri();
        cri.pull_image_with_auth(&reference, user_password(PASSWORD))
            .await
            .unwrap();
        assert_code(
            cri.pull_image_with_auth(&reference, user_password("wrong"))
                .await,
            Code::PermissionDenied,
        );
        assert_code(cri.pull_image(&reference).await, Code::PermissionDenied);
    })
    .await;
}

// ---- what is refused ----

#[tokio::test]
async fn pull_of_an_unknown_tag_is_not_found_naming_the_reference() {
    bounded(TEST_TIMEOUT, async {
        let registry = anonymous_registry().await;
        let wasmlet = daemon_for(&[&registry.host()]).await;
        push_echo(&wasmlet, &registry, "known");
        let reference = format!("{}/{REPO}:unknown", registry.host());
        let status = assert_code(wasmlet.cri().pull_image(&reference).await, Code::NotFound);
        assert!(status.message().contains(&reference), "{status:?}");
    })
    .await;
}

#[tokio::test]
async fn pull_from_a_registry_refusing_connections_is_unavailable() {
    bounded(TEST_TIMEOUT, async {
        let wasmlet = daemon_for(&["127.0.0.1:1"]).await;
        let reference = "127.0.0.1:1/conformance/echo:p1";
        let before = wasmlet.cri().list_images(None).await.unwrap();
        let status = assert_code(wasmlet.cri().pull_image(reference).await, Code::Unavailable);
        assert!(status.message().contains("127.0.0.1:1"), "{status:?}");
        assert_eq!(wasmlet.cri().list_images(None).await.unwrap(), before);
    })
    .await;
}

/// Pushes a Linux container image (OCI config, one tar+gzip layer of junk)
/// as `REPO:tag`.
async fn push_linux_image(registry: &Registry, tag: &str) -> Descriptor {
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let junk: Vec<u8> = (0..2048u32).map(|i| (i * 31 % 253) as u8).collect();
    registry
        .push_image(
            REPO,
            tag,
            OCI_CONFIG,
            config,
            &[(TAR_GZIP_LAYER, &junk)],
            OCI_MANIFEST,
        )
        .await
        .unwrap_or_else(|e| panic!("push: {e}\n{}", registry.log()))
}

/// Images that are neither Wasm artifacts nor images of tar layers (which
/// may carry `.wasm` programs): a Linux image with zstd layers, a Helm chart.
#[tokio::test]
async fn an_image_without_wasm_or_tar_layers_is_invalid_argument_naming_its_media_types() {
    bounded(TEST_TIMEOUT, async {
        let registry = anonymous_registry().await;
        let wasmlet = daemon_for(&[&registry.host()]).await;
        let junk: Vec<u8> = (0..2048u32).map(|i| (i * 31 % 253) as u8).collect();
        let images = [
            ("zstd", OCI_CONFIG, TAR_ZSTD_LAYER),
            ("chart", HELM_CONFIG, HELM_CHART_LAYER),
        ];
        for (tag, config_media_type, layer_media_type) in images {
            registry
                .push_image(
                    REPO,
                    tag,
                    config_media_type,
                    br#"{"architecture":"amd64","os":"linux"}"#,
                    &[(layer_media_type, &junk)],
                    OCI_MANIFEST,
                )
                .await
                .unwrap_or_else(|e| panic!("push: {e}\n{}", registry.log()));
        }
        let before = Store::snapshot(&wasmlet).await;

        for (tag, config_media_type, layer_media_type) in images {
            let reference = format!("{}/{REPO}:{tag}", registry.host());
            let status = assert_code(
                wasmlet.cri().pull_image(&reference).await,
                Code::InvalidArgument,
            );
            for media_type in [config_media_type, layer_media_type] {
                assert!(
                    status.message().contains(media_type),
                    "the message does not name {media_type}: {status:?}"
                );
            }
        }
        before.assert_unchanged(&wasmlet).await;
    })
    .await;
}

/// An OCI image whose tar+gzip layer is junk fails to unpack; nothing of it
/// is kept.
#[tokio::test]
async fn an_image_whose_tar_layer_is_not_an_archive_is_invalid_argument_and_stores_nothing() {
    bounded(TEST_TIMEOUT, async {
        let registry = anonymous_registry().await;
        let wasmlet = daemon_for(&[&registry.host()]).await;
        push_linux_image(&registry, "linux").await;
        let before = Store::snapshot(&wasmlet).await;

        let reference = format!("{}/{REPO}:linux", registry.host());
        assert_code(
            wasmlet.cri().pull_image(&reference).await,
            Code::InvalidArgument,
        );
        before.assert_unchanged(&wasmlet).await;
    })
    .await;
}

#[tokio::test]
async fn an_index_resolves_to_its_wasm_platform_entry() {
    bounded(TEST_TIMEOUT, async {
        let registry = anonymous_registry().await;
        let wasmlet = daemon_for(&[&registry.host()]).await;
        let linux = push_linux_image(&registry, "linux").await;
        push_echo(&wasmlet, &registry, "wasm");
        let (wasm_manifest, wasm) = manifest(&registry, "wasm").await;
        let index = registry
            .push_index(
                REPO,
                "multi",
                &[("linux", "amd64", &linux), ("wasip1", "wasm", &wasm)],
            )
            .await
            .unwrap_or_else(|e| panic!("push index: {e}\n{}", registry.log()));

        let reference = format!("{}/{REPO}:multi", registry.host());
        let mut cri = wasmlet.cri();
        let id = cri.pull_image(&reference).await.unwrap();
        assert_eq!(id, wasm_manifest["config"]["digest"]);
        // The repo digest is the one the reference resolved to: the index's.
        assert_pulled(&mut cri, &reference, &id, &index.digest).await;
        run_echo(&wasmlet, &reference).await;
    })
    .await;
}

#[tokio::test]
async fn an_index_without_a_wasm_platform_is_invalid_argument_naming_its_platforms() {
    bounded(TEST_TIMEOUT, async {
        let registry = anonymous_registry().await;
        let wasmlet = daemon_for(&[&registry.host()]).await;
        let linux = push_linux_image(&registry, "linux").await;
        registry
            .push_index(REPO, "linux-only", &[("linux", "amd64", &linux)])
            .await
            .unwrap_or_else(|e| panic!("push index: {e}\n{}", registry.log()));
        let before = Store::snapshot(&wasmlet).await;

        let reference = format!("{}/{REPO}:linux-only", registry.host());
        let status = assert_code(
            wasmlet.cri().pull_image(&reference).await,
            Code::InvalidArgument,
        );
        assert!(status.message().contains("linux/amd64"), "{status:?}");
        before.assert_unchanged(&wasmlet).await;
    })
    .await;
}

// ---- faults on the wire ----

/// What a failed pull must leave as it was: the images listed and the blob
/// files; and no download may be left behind in `images/ingest`.
struct Store {
    images: Vec<cri::Image>,
    blobs: BTreeSet<String>,
}

impl Store {
    async fn snapshot(wasmlet: &Wasmlet) -> Store {
        let mut images = wasmlet.cri().list_images(None).await.unwrap();
        images.sort_by(|a, b| a.id.cmp(&b.id));
        Store {
            images,
            blobs: file_names(&wasmlet.root().join("images/blobs/sha256")),
        }
    }

    async fn assert_unchanged(&self, wasmlet: &Wasmlet) {
        let now = Store::snapshot(wasmlet).await;
        assert_eq!(now.images, self.images, "ListImages changed");
        let new_blobs: Vec<_> = now.blobs.difference(&self.blobs).collect();
        assert!(new_blobs.is_empty(), "new blob files: {new_blobs:?}");
        let ingest = file_names(&wasmlet.root().join("images/ingest"));
        assert!(ingest.is_empty(), "downloads left in ingest: {ingest:?}");
    }
}

/// The names of the files in `dir` (none if it does not exist).
fn file_names(dir: &Path) -> BTreeSet<String> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
        Err(e) => panic!("reading {}: {e}", dir.display()),
    }
}

/// A registry holding the echo module as `REPO:tag`, a fault proxy in front
/// of it, and a daemon that reaches the proxy (only) over plain HTTP with
/// `extra` registry settings. The reference names the proxy.
struct Faulty {
    registry: Registry,
    proxy: FaultProxy,
    wasmlet: Wasmlet,
    reference: String,
    wasm: Vec<u8>,
}

impl Faulty {
    async fn start(tag: &str, extra: &str) -> Faulty {
        let registry = anonymous_registry().await;
        let proxy = FaultProxy::start(registry.addr())
            .await
            .expect("start proxy");
        let wasmlet = Wasmlet::builder()
            .config(registry_config(&[&proxy.host()], extra))
            .start()
            .await;
        let (_, wasm) = push_echo(&wasmlet, &registry, tag);
        let reference = format!("{}/{REPO}:{tag}", proxy.host());
        Faulty {
            registry,
            proxy,
            wasmlet,
            reference,
            wasm,
        }
    }

    /// `GET` requests the proxy received whose path `matching` matches.
    fn gets(&self, matching: PathMatch) -> usize {
        self.proxy
            .log()
            .iter()
            .filter(|line| {
                let mut parts = line.split(' ');
                parts.next() == Some("GET") && parts.next().is_some_and(|t| matching.matches(t))
            })
            .count()
    }

    fn log(&self) -> String {
        format!("proxy log: {:#?}", self.proxy.log())
    }
}

#[tokio::test]
async fn corrupt_blobs_fail_the_pull_with_data_loss_and_leave_the_store_as_it_was() {
    bounded(TEST_TIMEOUT, async {
        let faulty = Faulty::start("corrupt", "").await;
        let before = Store::snapshot(&faulty.wasmlet).await;
        faulty
            .proxy
            .set_fault(Fault::CorruptBody, PathMatch::Blobs, None);

        let status = assert_code(
            faulty.wasmlet.cri().pull_image(&faulty.reference).await,
            Code::DataLoss,
        );
        assert!(
            faulty.gets(PathMatch::Blobs) > 1,
            "a corrupt blob was not retried: {status:?}\n{}",
            faulty.log()
        );
        before.assert_unchanged(&faulty.wasmlet).await;
    })
    .await;
}

/// As above, through an index: the index is fetched and resolved before
/// the blobs fail, and must not be kept either.
#[tokio::test]
async fn corrupt_blobs_under_an_index_fail_the_pull_and_leave_the_store_as_it_was() {
    bounded(TEST_TIMEOUT, async {
        let faulty = Faulty::start("corrupt-under-index", "").await;
        let (_, wasm) = manifest(&faulty.registry, "corrupt-under-index").await;
        faulty
            .registry
            .push_index(REPO, "index", &[("wasip1", "wasm", &wasm)])
            .await
            .unwrap_or_else(|e| panic!("push index: {e}\n{}", faulty.registry.log()));
        let before = Store::snapshot(&faulty.wasmlet).await;
        faulty
            .proxy
            .set_fault(Fault::CorruptBody, PathMatch::Blobs, None);

        let reference = format!("{}/{REPO}:index", faulty.proxy.host());
        assert_code(
            faulty.wasmlet.cri().pull_image(&reference).await,
            Code::DataLoss,
        );
        before.assert_unchanged(&faulty.wasmlet).await;
    })
    .await;
}

#[tokio::test]
async fn truncated_blobs_fail_the_pull_and_leave_the_store_as_it_was() {
    bounded(TEST_TIMEOUT, async {
        let faulty = Faulty::start("truncated", "").await;
        let before = Store::snapshot(&faulty.wasmlet).await;
        faulty
            .proxy
            .set_fault(Fault::Truncate, PathMatch::Blobs, None);

        let error = faulty
            .wasmlet
            .cri()
            .pull_image(&faulty.reference)
            .await
            .expect_err("a pull of truncated blobs succeeded");
        let status = error.status().expect("not an RPC error");
        assert!(
            matches!(status.code(), Code::DataLoss | Code::Unavailable),
            "{status:?}"
        );
        before.assert_unchanged(&faulty.wasmlet).await;
    })
    .await;
}

#[tokio::test]
async fn a_503_once_is_retried_and_the_pull_succeeds() {
    bounded(TEST_TIMEOUT, async {
        let faulty = Faulty::start("retry-503", "").await;
        faulty
            .proxy
            .set_fault(Fault::Status(503), PathMatch::Manifests, Some(1));

        let id = faulty
            .wasmlet
            .cri()
            .pull_image(&faulty.reference)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", faulty.log()));
        assert!(is_image_id(&id), "{id}");
        assert_eq!(
            faulty.gets(PathMatch::Manifests),
            2,
            "the 503 was not retried once\n{}",
            faulty.log()
        );
        run_echo(&faulty.wasmlet, &faulty.reference).await;
    })
    .await;
}

#[tokio::test]
async fn a_registry_answering_503_always_is_unavailable() {
    bounded(TEST_TIMEOUT, async {
        let faulty = Faulty::start("always-503", "").await;
        let before = Store::snapshot(&faulty.wasmlet).await;
        faulty
            .proxy
            .set_fault(Fault::Status(503), PathMatch::Manifests, None);

        assert_code(
            faulty.wasmlet.cri().pull_image(&faulty.reference).await,
            Code::Unavailable,
        );
        assert_eq!(
            faulty.gets(PathMatch::Manifests),
            4,
            "expected 4 attempts\n{}",
            faulty.log()
        );
        before.assert_unchanged(&faulty.wasmlet).await;
    })
    .await;
}

#[tokio::test]
async fn a_connection_reset_once_is_retried_and_the_pull_succeeds() {
    bounded(TEST_TIMEOUT, async {
        let faulty = Faulty::start("reset", "").await;
        faulty
            .proxy
            .set_fault(Fault::Reset, PathMatch::Blobs, Some(1));

        faulty
            .wasmlet
            .cri()
            .pull_image(&faulty.reference)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", faulty.log()));
        // Config and Wasm layer, and the reset one again.
        assert!(
            faulty.gets(PathMatch::Blobs) >= 3,
            "the reset was not retried\n{}",
            faulty.log()
        );
        run_echo(&faulty.wasmlet, &faulty.reference).await;
    })
    .await;
}

#[tokio::test]
async fn a_401_from_the_registry_is_permission_denied() {
    bounded(TEST_TIMEOUT, async {
        let faulty = Faulty::start("unauthorized", "").await;
        faulty
            .proxy
            .set_fault(Fault::Status(401), PathMatch::Any, None);
        let status = assert_code(
            faulty.wasmlet.cri().pull_image(&faulty.reference).await,
            Code::PermissionDenied,
        );
        assert!(
            status.message().contains(&faulty.proxy.host()),
            "{status:?}"
        );
        // No credentials were sent: the message says what is missing.
        assert!(
            status.message().contains("refused anonymous access")
                && status.message().contains("imagePullSecret"),
            "{status:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_layer_over_max_blob_bytes_is_resource_exhausted_without_downloading() {
    bounded(TEST_TIMEOUT, async {
        // The pushed layer is the echo module plus a custom section: over 70 KiB.
        let limit = 64 * 1024;
        let faulty = Faulty::start("too-large", &format!("max_blob_bytes = {limit}\n")).await;
        assert!(faulty.wasm.len() > limit, "the layer is not over the limit");
        let before = Store::snapshot(&faulty.wasmlet).await;

        let status = assert_code(
            faulty.wasmlet.cri().pull_image(&faulty.reference).await,
            Code::ResourceExhausted,
        );
        assert!(
            status.message().contains(&limit.to_string()),
            "the message does not name the limit: {status:?}"
        );
        before.assert_unchanged(&faulty.wasmlet).await;
        assert_eq!(
            faulty.proxy.requests(PathMatch::Blobs),
            0,
            "blobs were downloaded\n{}",
            faulty.log()
        );
    })
    .await;
}

#[tokio::test]
async fn a_manifest_over_max_manifest_bytes_is_resource_exhausted() {
    bounded(TEST_TIMEOUT, async {
        let faulty = Faulty::start("big-manifest", "max_manifest_bytes = 64\n").await;
        let before = Store::snapshot(&faulty.wasmlet).await;
        assert_code(
            faulty.wasmlet.cri().pull_image(&faulty.reference).await,
            Code::ResourceExhausted,
        );
        assert_eq!(
            faulty.proxy.requests(PathMatch::Blobs),
            0,
            "{}",
            faulty.log()
        );
        before.assert_unchanged(&faulty.wasmlet).await;
    })
    .await;
}

/// A registry answering with a manifest that never ends, with or without
/// a `Content-Length` saying so: the pull fails as too large once
/// `max_manifest_bytes` have been read (or at once, from the length), and
/// the agent hangs up instead of buffering what it is sent — one pod's
/// registry cannot fill the memory every pod shares.
#[tokio::test]
async fn an_endless_manifest_is_refused_without_being_read() {
    bounded(TEST_TIMEOUT, async {
        let faulty = Faulty::start("endless", "max_manifest_bytes = 65536\n").await;
        for announce in [true, false] {
            faulty
                .proxy
                .set_fault(Fault::Endless { announce }, PathMatch::Manifests, None);
            let status = assert_code(
                faulty.wasmlet.cri().pull_image(&faulty.reference).await,
                Code::ResourceExhausted,
            );
            assert!(
                status.message().contains("over the 65536 byte limit"),
                "{status:?}"
            );
        }
        // Loopback sockets buffer a few MiB; the 4 GiB were never read.
        let sent = faulty.proxy.endless_bytes_sent();
        assert!(
            sent < 64 << 20,
            "{sent} bytes were sent before the agent hung up"
        );
        assert_eq!(
            faulty.proxy.requests(PathMatch::Blobs),
            0,
            "{}",
            faulty.log()
        );
    })
    .await;
}

// ---- sharing and caching ----

#[tokio::test]
async fn concurrent_pulls_of_one_reference_share_one_download() {
    bounded(TEST_TIMEOUT, async {
        let faulty = Faulty::start("concurrent", "").await;
        faulty.proxy.set_fault(
            Fault::Delay(Duration::from_millis(500)),
            PathMatch::Manifests,
            None,
        );

        let mut pulls = tokio::task::JoinSet::new();
        for _ in 0..5 {
            let mut cri = faulty.wasmlet.cri();
            let reference = faulty.reference.clone();
            pulls.spawn(async move { cri.pull_image(&reference).await });
        }
        let ids: Vec<String> = pulls
            .join_all()
            .await
            .into_iter()
            .map(|pulled| pulled.unwrap_or_else(|e| panic!("{e}\n{}", faulty.log())))
            .collect();
        assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
        assert_eq!(
            faulty.gets(PathMatch::Manifests),
            1,
            "one manifest GET expected\n{}",
            faulty.log()
        );
        assert_eq!(
            faulty.gets(PathMatch::Blobs),
            2,
            "config and layer once each expected\n{}",
            faulty.log()
        );
    })
    .await;
}

/// `log` without ANSI colour sequences.
fn plain(log: &str) -> String {
    let mut plain = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte (a letter).
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

/// Lines of `log` containing `message` and `digest`.
fn log_lines(log: &str, message: &str, digest: &str) -> usize {
    log.lines()
        .filter(|line| line.contains(message) && line.contains(digest))
        .count()
}

#[tokio::test]
async fn a_pulled_image_is_compiled_once_in_the_background_and_reused_after_restart() {
    bounded(TEST_TIMEOUT, async {
        let registry = anonymous_registry().await;
        let mut wasmlet = Wasmlet::builder()
            .config(registry_config(&[&registry.host()], ""))
            .rust_log("info,wasmlet_agent=debug")
            .start()
            .await;
        let (reference, wasm) = push_echo(&wasmlet, &registry, "compiled");
        let digest = sha256_digest(&wasm);
        wasmlet.cri().pull_image(&reference).await.unwrap();

        // Compiled after the pull, before any container asks for it.
        let deadline = tokio::time::Instant::now() + COMPILE_TIMEOUT;
        while log_lines(&plain(&wasmlet.daemon_log()), "compiled Wasm", &digest) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no `compiled Wasm` line for {digest} within {COMPILE_TIMEOUT:?} of the pull"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        run_echo(&wasmlet, &reference).await;
        run_echo(&wasmlet, &reference).await;
        let log = plain(&wasmlet.daemon_log());
        assert_eq!(
            log_lines(&log, "compiled Wasm", &digest),
            1,
            "the image was compiled again for its containers"
        );

        wasmlet.terminate().await;
        let restarted_at = wasmlet.daemon_log().len();
        wasmlet.restart().await;
        run_echo(&wasmlet, &reference).await;
        let log = plain(&wasmlet.daemon_log());
        assert_eq!(
            log_lines(&log, "compiled Wasm", &digest),
            1,
            "the image was compiled again after the restart"
        );
        let after_restart = plain(&wasmlet.daemon_log()[restarted_at..]);
        assert!(
            after_restart
                .lines()
                .any(|line| line.contains("loaded precompiled artifact")
                    && line.contains(&digest["sha256:".len()..])),
            "the artifact was not loaded from disk after the restart"
        );
    })
    .await;
}

// ---- commands that pull ----

/// A command's stdout, asserting it succeeded.
#[track_caller]
fn stdout_of(output: std::process::Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

#[tokio::test]
async fn image_pull_ls_and_rm_drive_the_daemon_through_its_socket() {
    bounded(TEST_TIMEOUT, async {
        let registry = anonymous_registry().await;
        let wasmlet = daemon_for(&[&registry.host()]).await;
        let (reference, _) = push_echo(&wasmlet, &registry, "cli");

        let pulled = stdout_of(
            wasmlet.cli(&["image", "pull", &reference], None),
            "image pull",
        );
        let id = pulled.trim();
        let (manifest, _) = manifest(&registry, "cli").await;
        assert_eq!(
            id, manifest["config"]["digest"],
            "image pull printed {pulled:?}"
        );
        let status = wasmlet.cri().image_status(&reference).await.unwrap();
        assert_eq!(status.map(|image| image.id).as_deref(), Some(id));

        let listed = stdout_of(wasmlet.cli(&["image", "ls"], None), "image ls");
        let short = &id.trim_start_matches("sha256:")[..12];
        let line = listed
            .lines()
            .find(|line| line.split_whitespace().next() == Some(reference.as_str()))
            .unwrap_or_else(|| panic!("image ls does not list {reference}:\n{listed}"));
        assert!(line.contains(short), "{line:?} does not show {short}");
        // The imported samples are listed too.
        assert!(listed.contains(crate::ECHO_P1), "{listed}");

        stdout_of(wasmlet.cli(&["image", "rm", &reference], None), "image rm");
        assert_eq!(wasmlet.cri().image_status(&reference).await.unwrap(), None);
        let listed = stdout_of(wasmlet.cli(&["image", "ls"], None), "image ls");
        assert!(
            !listed.contains(&reference),
            "{reference} still listed:\n{listed}"
        );
    })
    .await;
}

#[tokio::test]
async fn image_pull_passes_the_credentials_read_from_stdin() {
    bounded(TEST_TIMEOUT, async {
        let (registry, wasmlet, reference) = auth_registry_with_echo("cli-auth").await;
        let pulled = stdout_of(
            wasmlet.cli(
                &[
                    "image",
                    "pull",
                    &reference,
                    "--username",
                    USER,
                    "--password-stdin",
                ],
                Some(&format!("{PASSWORD}\n")),
            ),
            "image pull --username --password-stdin",
        );
        let (manifest, _) = manifest(&registry, "cli-auth").await;
        assert_eq!(pulled.trim(), manifest["config"]["digest"], "{pulled:?}");
    })
    .await;
}

#[tokio::test]
async fn play_with_a_config_pulls_the_pod_image_from_its_registry() {
    bounded(TEST_TIMEOUT, async {
        let registry = anonymous_registry().await;
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let (file, _) = sample_file(dir, wasm_samples::ECHO_P1, "play");
        let reference = format!("{}/{REPO}:play", registry.host());
        Wasmlet::push(&file, &reference, None);
        let config = dir.join("wasmlet.toml");
        std::fs::write(&config, registry_config(&[&registry.host()], "")).unwrap();
        let manifest = dir.join("pod.yaml");
        std::fs::write(
            &manifest,
            format!(
                "
apiVersion: v1
kind: Pod
metadata:
  name: pulled
spec:
  restartPolicy: Never
  containers:
    - name: echo
      image: {reference}
      args: [hello, from the registry]
"
            ),
        )
        .unwrap();

        let output = Wasmlet::run(
            [
                OsStr::new("--config"),
                config.as_os_str(),
                OsStr::new("--socket"),
                dir.join("none.sock").as_os_str(),
                OsStr::new("play"),
                manifest.as_os_str(),
            ],
            None,
            PLAY_TIMEOUT,
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(0),
            "---- stdout ----\n{stdout}---- stderr ----\n{stderr}"
        );
        for line in ["[echo] arg[1]=hello", "[echo] arg[2]=from the registry"] {
            assert!(
                stdout.lines().any(|l| l == line),
                "no {line:?}\n---- stdout ----\n{stdout}---- stderr ----\n{stderr}"
            );
        }
    })
    .await;
}

/// `wasmlet play` passes the credentials it is given (what an
/// imagePullSecret is to the kubelet) in PullImage; without them the pull
/// from a registry that requires them is refused.
#[tokio::test]
async fn play_pulls_from_a_registry_with_credentials() {
    bounded(TEST_TIMEOUT, async {
        let registry = auth_registry().await;
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let (file, _) = sample_file(dir, wasm_samples::ECHO_P1, "play-auth");
        let reference = format!("{}/{REPO}:play-auth", registry.host());
        Wasmlet::push(&file, &reference, Some((USER, PASSWORD)));
        let config = dir.join("wasmlet.toml");
        std::fs::write(&config, registry_config(&[&registry.host()], "")).unwrap();
        let manifest = dir.join("pod.yaml");
        std::fs::write(
            &manifest,
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: pulled\nspec:\n  restartPolicy: Never\n  containers:\n    - name: echo\n      image: {reference}\n      args: [hello, from the registry]\n"
            ),
        )
        .unwrap();
        let socket = dir.join("none.sock");
        let play = |login: bool| {
            let mut args = vec![
                OsStr::new("--config"),
                config.as_os_str(),
                OsStr::new("--socket"),
                socket.as_os_str(),
                OsStr::new("play"),
            ];
            if login {
                args.extend([OsStr::new("--username"), OsStr::new(USER), OsStr::new("--password-stdin")]);
            }
            args.push(manifest.as_os_str());
            Wasmlet::run(args, login.then_some(PASSWORD), PLAY_TIMEOUT)
        };
        let refused = play(false);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert_ne!(refused.status.code(), Some(0), "{stderr}");
        assert!(stderr.contains("PermissionDenied"), "{stderr}");

        let output = play(true);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "---- stdout ----\n{stdout}---- stderr ----\n{stderr}");
        assert!(stdout.lines().any(|l| l == "[echo] arg[1]=hello"), "{stdout}");
    })
    .await;
}
