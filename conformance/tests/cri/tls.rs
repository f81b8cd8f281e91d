//! Pulling over HTTPS: a registry serving TLS with a certificate from a CA of
//! its own is reached once that CA is named by `[registry] ca_file`, by the
//! daemon (PullImage) and by `wasmlet image push` reading the same config,
//! and refused without it, with nothing stored.
//!
//! The registry is a [`Registry::start_tls`] fixture on `127.0.0.1`. Its raw
//! HTTP client cannot speak TLS, so images are pushed with the real CLI. The
//! Wasm pushed is the echo sample with a custom section appended, so that its
//! blobs differ from the imported sample's and the pull really downloads
//! them over TLS.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use wasmlet_conformance::fixtures::registry::{Registry, RegistryOptions};
use wasmlet_conformance::{
    Code, ContainerConfigBuilder, Stream, assert_code, read_cri_log, stream_lines,
};

use crate::GUEST_TIMEOUT;
use crate::daemon::{Wasmlet, is_image_id};
use crate::registry_common::{bounded, unique_echo};

/// Bounds each test: certificates, registry and daemon start-up, a push, a
/// pull (a failing one retries for about 1.4 s), and a guest run to exit.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// How long one `wasmlet image push` may take.
const PUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// The repository and tag pushed to.
const REPO_TAG: &str = "tls/echo:v1";

/// The arguments the echo guest is run with; it prints `arg[i]=VALUE`.
const ECHO_ARGS: [&str; 2] = ["hello", "over tls"];

async fn tls_registry() -> Registry {
    Registry::start_tls(RegistryOptions::default())
        .await
        .expect("start TLS registry")
}

/// A config trusting `registry`'s CA besides the system roots (and naming
/// no insecure registry).
fn ca_config(registry: &Registry) -> String {
    let ca = registry.ca_pem_path().expect("a TLS registry has a CA");
    // A TOML literal string: the temp dir path holds no `'`.
    format!("[registry]\nca_file = '{}'\n", ca.display())
}

/// Runs `wasmlet --config CONFIG image push FILE REFERENCE`, where CONFIG
/// holds `toml`; returns its output, whatever it is.
fn push_with_config(dir: &Path, toml: &str, file: &Path, reference: &str) -> Output {
    let config = dir.join("push.toml");
    std::fs::write(&config, toml).expect("writing the push config");
    let args = [
        OsStr::new("--config"),
        config.as_os_str(),
        OsStr::new("image"),
        OsStr::new("push"),
        file.as_os_str(),
        OsStr::new(reference),
    ];
    Wasmlet::run(args, None, PUSH_TIMEOUT)
}

/// Pushes the unique echo module to `registry` as [`REPO_TAG`] trusting its
/// CA; returns the reference and the manifest digest.
fn push_echo(wasmlet: &Wasmlet, registry: &Registry) -> (String, String) {
    let scratch = wasmlet.scratch("tls");
    let file = unique_echo(&scratch, "echo-tls");
    let reference = format!("{}/{REPO_TAG}", registry.host());
    let output = push_with_config(&scratch, &ca_config(registry), &file, &reference);
    assert!(
        output.status.success(),
        "wasmlet image push {reference} with the CA failed ({}): {}\nregistry log:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        registry.log()
    );
    let digest = String::from_utf8(output.stdout)
        .expect("image push printed UTF-8")
        .trim()
        .to_owned();
    assert!(
        is_image_id(&digest),
        "image push printed {digest:?}, not sha256:<64 hex>"
    );
    (reference, digest)
}

#[tokio::test]
async fn with_the_registry_ca_configured_push_pull_and_run_succeed() {
    bounded(TEST_TIMEOUT, async {
        let registry = tls_registry().await;
        let wasmlet = Wasmlet::builder()
            .config(ca_config(&registry))
            .start()
            .await;
        let (reference, manifest_digest) = push_echo(&wasmlet, &registry);

        let mut cri = wasmlet.cri();
        let id = cri
            .pull_image(&reference)
            .await
            .unwrap_or_else(|e| panic!("PullImage {reference}: {e}\n{}", registry.log()));
        assert!(is_image_id(&id), "PullImage answered {id:?}");
        let image = cri
            .image_status(&reference)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("ImageStatus of the pulled {reference} is empty"));
        assert_eq!(image.id, id, "{image:?}");
        let repo_digest = format!("{}/tls/echo@{manifest_digest}", registry.host());
        assert!(image.repo_digests.contains(&repo_digest), "{image:?}");

        let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
        let config = ContainerConfigBuilder::new("echo", &reference)
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
    })
    .await;
}

#[tokio::test]
async fn without_the_registry_ca_push_and_pull_are_refused_and_nothing_is_stored() {
    bounded(TEST_TIMEOUT, async {
        let registry = tls_registry().await;
        // No `ca_file`: only the system roots, which never signed the
        // registry's certificate.
        let wasmlet = Wasmlet::start().await;
        let (reference, _) = push_echo(&wasmlet, &registry);

        let scratch = wasmlet.scratch("no-ca");
        let file = unique_echo(&scratch, "echo-tls");
        let output = push_with_config(&scratch, "", &file, &reference);
        assert!(
            !output.status.success(),
            "wasmlet image push {reference} without the CA succeeded"
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&registry.host()) && stderr.contains("not trusted"),
            "{stderr}"
        );

        let mut cri = wasmlet.cri();
        let before = cri.list_images(None).await.unwrap();
        let status = assert_code(cri.pull_image(&reference).await, Code::Unavailable);
        let message = status.message();
        assert!(
            message.contains(&registry.host())
                && message.contains("certificate")
                && message.contains("ca_file"),
            "{status:?}"
        );
        // An untrusted certificate is not retried: it will not change.
        assert!(!message.contains("gave up after"), "{status:?}");
        assert_eq!(cri.list_images(None).await.unwrap(), before);
        assert!(cri.image_status(&reference).await.unwrap().is_none());
    })
    .await;
}
