//! ImageService: ListImages, ImageStatus, PullImage, RemoveImage, ImageFsInfo.

use std::path::Path;
use std::time::Duration;

use wasmlet_conformance::now_ns;

use crate::daemon::{Wasmlet, is_image_id};
use crate::{ECHO_P1, ECHO_P2, EPOCH_NS_FLOOR};

/// `name@sha256:<64 hex>`.
fn is_repo_digest_of(digest: &str, name: &str) -> bool {
    digest
        .strip_prefix(name)
        .and_then(|rest| rest.strip_prefix('@'))
        .is_some_and(is_image_id)
}

#[tokio::test]
async fn list_images_includes_every_imported_sample() {
    let wasmlet = Wasmlet::start().await;
    let images = wasmlet.cri().list_images(None).await.unwrap();
    for &(reference, _) in wasm_samples::ALL {
        let image = images
            .iter()
            .find(|image| image.repo_tags.iter().any(|tag| tag == reference))
            .unwrap_or_else(|| panic!("{reference} is not listed: {images:#?}"));
        assert_eq!(image.id, wasmlet.image_id(reference));
        assert!(image.size > 0, "{image:?}");
    }
}

#[tokio::test]
async fn image_status_reports_id_size_tags_and_digests() {
    let wasmlet = Wasmlet::start().await;
    let image = wasmlet
        .cri()
        .image_status(ECHO_P1)
        .await
        .unwrap()
        .expect("ImageStatus of an imported image is empty");

    assert_eq!(image.id, wasmlet.image_id(ECHO_P1));
    assert!(is_image_id(&image.id), "{image:?}");
    assert!(image.size > 0, "{image:?}");
    assert!(
        image.repo_tags.iter().any(|tag| tag == ECHO_P1),
        "{image:?}"
    );
    assert!(
        image
            .repo_digests
            .iter()
            .any(|digest| is_repo_digest_of(digest, "wasmlet.local/samples/echo")),
        "{image:?}"
    );
}

#[tokio::test]
async fn image_status_of_an_unknown_image_is_ok_and_empty() {
    let wasmlet = Wasmlet::start().await;
    let image = wasmlet
        .cri()
        .image_status("wasmlet.local/samples/missing:p1")
        .await
        .unwrap();
    assert_eq!(image, None);
}

#[tokio::test]
async fn pull_image_of_an_imported_reference_answers_its_id() {
    let wasmlet = Wasmlet::start().await;
    let image_ref = wasmlet.cri().pull_image(ECHO_P2).await.unwrap();
    assert_eq!(image_ref, wasmlet.image_id(ECHO_P2));
}

#[tokio::test]
async fn pull_image_of_an_unknown_reference_fails() {
    let wasmlet = Wasmlet::start().await;
    // Port 1 on loopback: should the runtime try a registry, it is refused at once.
    let pulled = tokio::time::timeout(
        Duration::from_secs(15),
        wasmlet
            .cri()
            .pull_image("127.0.0.1:1/conformance/missing:latest"),
    )
    .await
    .expect("PullImage of an unknown reference did not answer");
    let error = pulled.expect_err("PullImage of an unknown reference succeeded");
    assert!(error.status().is_some(), "not an RPC error: {error}");
}

#[tokio::test]
async fn remove_image_by_tag_removes_it_and_is_idempotent() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let id = wasmlet.image_id(ECHO_P2);

    cri.remove_image(ECHO_P2).await.unwrap();

    let images = cri.list_images(None).await.unwrap();
    assert!(
        !images
            .iter()
            .any(|image| image.id == id || image.repo_tags.iter().any(|tag| tag == ECHO_P2)),
        "{ECHO_P2} is still listed: {images:#?}"
    );
    assert_eq!(cri.image_status(ECHO_P2).await.unwrap(), None);
    // Other images are untouched.
    assert!(cri.image_status(ECHO_P1).await.unwrap().is_some());

    cri.remove_image(ECHO_P2).await.unwrap();
}

#[tokio::test]
async fn image_fs_info_reports_usage_of_a_filesystem_under_the_root() {
    let wasmlet = Wasmlet::start().await;
    let before = now_ns();
    let info = wasmlet.cri().image_fs_info().await.unwrap();

    let [usage] = info.image_filesystems.as_slice() else {
        panic!("expected one image filesystem: {info:?}");
    };
    let used_bytes = usage.used_bytes.as_ref().map_or(0, |v| v.value);
    let inodes_used = usage.inodes_used.as_ref().map_or(0, |v| v.value);
    assert!(used_bytes > 0, "{usage:?}");
    assert!(inodes_used > 0, "{usage:?}");
    assert!(
        usage.timestamp > EPOCH_NS_FLOOR && usage.timestamp >= before - 1_000_000_000,
        "{usage:?}"
    );
    let mountpoint = Path::new(&usage.fs_id.as_ref().expect("no fs_id").mountpoint);
    let root = wasmlet.root();
    let canonical_root = root.canonicalize().unwrap();
    assert!(
        mountpoint.starts_with(&root) || mountpoint.starts_with(&canonical_root),
        "mountpoint {} is not under {}",
        mountpoint.display(),
        root.display()
    );
}
