//! The registry fixture and the fault proxy the image tests rely on, checked
//! against the real `registry:2` without any runtime: what the registry accepts,
//! and that each fault is seen by a client as it claims.

use std::time::{Duration, Instant};

use wasmlet_conformance::fixtures::fault_proxy::{Fault, FaultProxy, PathMatch};
use wasmlet_conformance::fixtures::registry::{
    self, ACCEPT_MANIFESTS, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, Descriptor, OCI_CONFIG,
    OCI_INDEX, OCI_MANIFEST, Registry, RegistryClient, RegistryOptions, Request, WASM_CONFIG,
    WASM_LAYER, sha256_digest,
};

/// Bounds each test, registry startup included.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

const REPO: &str = "wasmlet/fixture";

/// A layer long enough that half of it is clearly not all of it.
fn layer_bytes() -> Vec<u8> {
    (0..4096u32).map(|i| (i * 7 % 251) as u8).collect()
}

async fn anonymous_registry() -> Registry {
    Registry::start(RegistryOptions::default())
        .await
        .expect("start registry")
}

/// An anonymous registry holding one OCI image, and a proxy in front of it.
async fn registry_with_image() -> (Registry, FaultProxy, Descriptor, Vec<u8>) {
    let registry = anonymous_registry().await;
    let layer = layer_bytes();
    let manifest = registry
        .push_image(
            REPO,
            "v1",
            OCI_CONFIG,
            br#"{"architecture":"wasm","os":"wasip1"}"#,
            &[(WASM_LAYER, &layer)],
            OCI_MANIFEST,
        )
        .await
        .unwrap_or_else(|e| panic!("push image: {e}\n{}", registry.log()));
    let proxy = FaultProxy::start(registry.addr())
        .await
        .expect("start proxy");
    (registry, proxy, manifest, layer)
}

fn blob_request(layer: &[u8]) -> Request {
    Request::get(&format!("/v2/{REPO}/blobs/{}", sha256_digest(layer)))
}

async fn bounded<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("test did not finish in time")
}

#[tokio::test]
async fn pushed_image_is_served_through_the_proxy() {
    bounded(async {
        let (registry, proxy, manifest, layer) = registry_with_image().await;
        assert!(
            registry.host().starts_with("127.0.0.1:"),
            "{}",
            registry.host()
        );

        let through = RegistryClient::new(proxy.addr(), None);
        let response = through.get_manifest(REPO, "v1").await.unwrap();
        assert_eq!(response.status, 200, "{}", response.text());
        assert_eq!(response.header("Content-Type"), Some(OCI_MANIFEST));
        assert_eq!(sha256_digest(&response.body), manifest.digest);
        assert_eq!(response.body.len() as u64, manifest.size);
        assert_eq!(
            response.header("Docker-Content-Digest"),
            Some(manifest.digest.as_str())
        );
        let json: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
        assert_eq!(json["layers"][0]["mediaType"], WASM_LAYER);

        let blob = through
            .get_blob(REPO, &sha256_digest(&layer))
            .await
            .unwrap();
        assert_eq!(blob.status, 200);
        assert_eq!(blob.body, layer);

        // Uploads go through the proxy too (its Location answers name it).
        let pushed = through
            .push_image(
                REPO,
                "via-proxy",
                OCI_CONFIG,
                b"{}",
                &[(WASM_LAYER, b"\0asm\x01\0\0\0")],
                OCI_MANIFEST,
            )
            .await
            .unwrap();
        let direct = registry
            .client()
            .get_manifest(REPO, "via-proxy")
            .await
            .unwrap();
        assert_eq!(sha256_digest(&direct.body), pushed.digest);

        assert_eq!(
            proxy.requests(PathMatch::Manifests),
            2,
            "{:#?}",
            proxy.log()
        );
        // One blob fetch; uploads are not blob fetches.
        assert_eq!(proxy.requests(PathMatch::Blobs), 1, "{:#?}", proxy.log());
        // 2 manifests, 1 blob fetch, 2 blobs x (POST + PUT).
        assert_eq!(proxy.requests(PathMatch::Any), 7, "{:#?}", proxy.log());
    })
    .await;
}

#[tokio::test]
async fn auth_registry_rejects_anonymous_and_accepts_basic() {
    bounded(async {
        let registry = Registry::start(RegistryOptions {
            basic_auth: Some(("puller".into(), "s3cret".into())),
        })
        .await
        .expect("start registry");
        assert_eq!(registry.basic_auth(), Some(("puller", "s3cret")));

        let anonymous = registry::send(registry.addr(), &Request::get("/v2/"))
            .await
            .unwrap();
        assert_eq!(anonymous.status, 401);
        let challenge = anonymous.header("WWW-Authenticate").unwrap_or_default();
        assert!(challenge.starts_with("Basic "), "{challenge}");
        assert!(challenge.contains(registry::AUTH_REALM), "{challenge}");

        let wrong = Request::get("/v2/").basic_auth("puller", "wrong");
        let wrong = registry::send(registry.addr(), &wrong).await.unwrap();
        assert_eq!(wrong.status, 401);

        let right = Request::get("/v2/").basic_auth("puller", "s3cret");
        let right = registry::send(registry.addr(), &right).await.unwrap();
        assert_eq!(right.status, 200, "{}", right.text());

        // The push helpers carry the registry's credentials.
        let manifest = registry
            .push_image(
                REPO,
                "v1",
                OCI_CONFIG,
                b"{}",
                &[(WASM_LAYER, b"x")],
                OCI_MANIFEST,
            )
            .await
            .unwrap();
        let anonymous = RegistryClient::new(registry.addr(), None)
            .get_manifest(REPO, "v1")
            .await
            .unwrap();
        assert_eq!(anonymous.status, 401);
        let fetched = registry.client().get_manifest(REPO, "v1").await.unwrap();
        assert_eq!(sha256_digest(&fetched.body), manifest.digest);
    })
    .await;
}

#[tokio::test]
async fn truncate_sends_half_the_body_once() {
    bounded(async {
        let (_registry, proxy, _, layer) = registry_with_image().await;
        proxy.set_fault(Fault::Truncate, PathMatch::Blobs, Some(1));

        let error = registry::send(proxy.addr(), &blob_request(&layer))
            .await
            .expect_err("a truncated body is an error");
        match error {
            registry::Error::TruncatedBody {
                expected, received, ..
            } => {
                assert_eq!(expected, layer.len() as u64);
                assert_eq!(received, layer.len() as u64 / 2);
            }
            other => panic!("expected a truncated body, got {other}"),
        }

        // Used up: the next fetch is whole.
        let whole = registry::send(proxy.addr(), &blob_request(&layer))
            .await
            .unwrap();
        assert_eq!(whole.body, layer);
        assert_eq!(proxy.requests(PathMatch::Blobs), 2);
    })
    .await;
}

#[tokio::test]
async fn corrupt_body_changes_the_digest_until_cleared() {
    bounded(async {
        let (_registry, proxy, _, layer) = registry_with_image().await;
        proxy.set_fault(Fault::CorruptBody, PathMatch::Blobs, None);

        for _ in 0..2 {
            let corrupt = registry::send(proxy.addr(), &blob_request(&layer))
                .await
                .unwrap();
            assert_eq!(corrupt.status, 200);
            assert_eq!(corrupt.body.len(), layer.len());
            assert_ne!(sha256_digest(&corrupt.body), sha256_digest(&layer));
        }

        proxy.clear();
        let whole = registry::send(proxy.addr(), &blob_request(&layer))
            .await
            .unwrap();
        assert_eq!(whole.body, layer);
    })
    .await;
}

#[tokio::test]
async fn status_fault_answers_only_matching_requests() {
    bounded(async {
        let (_registry, proxy, manifest, layer) = registry_with_image().await;
        proxy.set_fault(Fault::Status(503), PathMatch::Manifests, Some(1));
        let through = RegistryClient::new(proxy.addr(), None);

        // Not a manifest: untouched, and the fault is not used up.
        let blob = through
            .get_blob(REPO, &sha256_digest(&layer))
            .await
            .unwrap();
        assert_eq!(blob.status, 200);

        let refused = through.get_manifest(REPO, "v1").await.unwrap();
        assert_eq!(refused.status, 503);
        let json: serde_json::Value = serde_json::from_slice(&refused.body).unwrap();
        assert!(json["errors"][0]["code"].is_string(), "{json}");

        let served = through.get_manifest(REPO, "v1").await.unwrap();
        assert_eq!(served.status, 200);
        assert_eq!(sha256_digest(&served.body), manifest.digest);

        proxy.set_fault(Fault::Status(401), PathMatch::Any, None);
        let unauthorized = registry::send(proxy.addr(), &Request::get("/v2/"))
            .await
            .unwrap();
        assert_eq!(unauthorized.status, 401);
        assert!(unauthorized.header("WWW-Authenticate").is_some());

        assert_eq!(
            proxy.requests(PathMatch::Manifests),
            2,
            "{:#?}",
            proxy.log()
        );
        assert_eq!(proxy.requests(PathMatch::Any), 4, "{:#?}", proxy.log());
    })
    .await;
}

#[tokio::test]
async fn reset_fails_the_connection_once() {
    bounded(async {
        let (_registry, proxy, _, layer) = registry_with_image().await;
        proxy.set_fault(Fault::Reset, PathMatch::Any, Some(1));

        match registry::send(proxy.addr(), &blob_request(&layer)).await {
            Err(registry::Error::Transport { .. }) => {}
            other => panic!("expected a connection error, got {other:?}"),
        }
        let whole = registry::send(proxy.addr(), &blob_request(&layer))
            .await
            .unwrap();
        assert_eq!(whole.body, layer);
    })
    .await;
}

#[tokio::test]
async fn delay_holds_the_answer() {
    bounded(async {
        let (_registry, proxy, _, layer) = registry_with_image().await;
        let delay = Duration::from_millis(500);
        proxy.set_fault(Fault::Delay(delay), PathMatch::Blobs, None);

        let request = blob_request(&layer);
        let started = Instant::now();
        let (first, second) = tokio::join!(
            registry::send(proxy.addr(), &request),
            registry::send(proxy.addr(), &request),
        );
        let elapsed = started.elapsed();
        assert_eq!(first.unwrap().body, layer);
        assert_eq!(second.unwrap().body, layer);
        assert!(elapsed >= delay, "{elapsed:?}");
        // Connections are served concurrently, not one after the other.
        assert!(elapsed < delay * 2, "{elapsed:?}");
        assert_eq!(proxy.requests(PathMatch::Blobs), 2);
    })
    .await;
}

/// What registry 2.8 accepts and serves, as the image tests will rely on it.
#[tokio::test]
async fn registry_accepts_wasm_artifacts_docker_manifests_and_indexes() {
    bounded(async {
        let registry = anonymous_registry().await;
        let client = registry.client();
        let config = br#"{"architecture":"wasm","os":"wasip1"}"#;
        let module = b"\0asm\x01\0\0\0";
        let config_digest = client.push_blob(REPO, config).await.unwrap();
        let module_digest = client.push_blob(REPO, module).await.unwrap();
        let wasm_config = Descriptor::of(WASM_CONFIG, config);
        let wasm_layer = Descriptor::of(WASM_LAYER, module);
        assert_eq!(wasm_config.digest, config_digest);
        assert_eq!(wasm_layer.digest, module_digest);

        let push = |tag: &'static str, media_type: &'static str, manifest: serde_json::Value| {
            let client = client.clone();
            async move {
                let bytes = manifest.to_string().into_bytes();
                client
                    .push_manifest(REPO, tag, media_type, &bytes)
                    .await
                    .map(|descriptor| (descriptor, bytes))
            }
        };
        let log = || registry.log();

        // The Wasm OCI artifact layout, with and without OCI 1.1 artifactType.
        let mut accepted = Vec::new();
        for (tag, artifact_type) in [("wasm", None), ("wasm-artifact-type", Some(WASM_CONFIG))] {
            let mut manifest = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": wasm_config.to_json(),
                "layers": [wasm_layer.to_json()],
            });
            if let Some(artifact_type) = artifact_type {
                manifest["artifactType"] = artifact_type.into();
            }
            let pushed = push(tag, OCI_MANIFEST, manifest)
                .await
                .unwrap_or_else(|e| panic!("{tag}: {e}\n{}", log()));
            accepted.push((tag, pushed));
        }

        // An artifact with the OCI 1.1 empty config and a subject.
        let empty = client.push_blob(REPO, b"{}").await.unwrap();
        let subject = accepted[0].1.0.clone();
        let pushed = push(
            "empty-config",
            OCI_MANIFEST,
            serde_json::json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": "application/vnd.example.wasm.v1",
                "config": {
                    "mediaType": "application/vnd.oci.empty.v1+json",
                    "digest": empty,
                    "size": 2,
                },
                "layers": [wasm_layer.to_json()],
                "subject": subject.to_json(),
            }),
        )
        .await
        .unwrap_or_else(|e| panic!("empty-config: {e}\n{}", log()));
        accepted.push(("empty-config", pushed));

        // Docker schema 2 with a Wasm config and layer, and a list of it.
        let docker = push(
            "docker",
            DOCKER_MANIFEST,
            serde_json::json!({
                "schemaVersion": 2,
                "mediaType": DOCKER_MANIFEST,
                "config": wasm_config.to_json(),
                "layers": [wasm_layer.to_json()],
            }),
        )
        .await
        .unwrap_or_else(|e| panic!("docker: {e}\n{}", log()));
        let mut docker_entry = docker.0.to_json();
        docker_entry["platform"] = serde_json::json!({ "os": "wasip1", "architecture": "wasm" });
        let docker_list = push(
            "docker-list",
            DOCKER_MANIFEST_LIST,
            serde_json::json!({
                "schemaVersion": 2,
                "mediaType": DOCKER_MANIFEST_LIST,
                "manifests": [docker_entry],
            }),
        )
        .await
        .unwrap_or_else(|e| panic!("docker-list: {e}\n{}", log()));
        accepted.push(("docker", docker));
        accepted.push(("docker-list", docker_list));

        // An OCI index over two platform manifests.
        let index = registry
            .push_index(
                REPO,
                "index",
                &[
                    ("wasip1", "wasm", &accepted[0].1.0),
                    ("wasip2", "wasm", &accepted[1].1.0),
                ],
            )
            .await
            .unwrap_or_else(|e| panic!("index: {e}\n{}", log()));
        assert_eq!(index.media_type, OCI_INDEX);
        let index_bytes = client.get_manifest(REPO, "index").await.unwrap().body;
        accepted.push(("index", (index, index_bytes)));

        // Each is served back byte for byte, under its tag and its digest,
        // with its media type.
        for (tag, (descriptor, bytes)) in &accepted {
            for reference in [*tag, descriptor.digest.as_str()] {
                let got = client.get_manifest(REPO, reference).await.unwrap();
                assert_eq!(got.status, 200, "{reference}: {}", got.text());
                assert_eq!(&got.body, bytes, "{reference}");
                assert_eq!(
                    got.header("Content-Type"),
                    Some(descriptor.media_type.as_str()),
                    "{reference}"
                );
            }
        }

        // Caveats a puller must live with.
        let no_accept = client
            .send(Request::get(&format!("/v2/{REPO}/manifests/wasm")))
            .await
            .unwrap();
        assert_eq!(
            no_accept.status,
            404,
            "OCI manifest without Accept: {}",
            no_accept.text()
        );
        let wrong_type = client
            .push_manifest(REPO, "wrong-type", "application/json", &accepted[0].1.1)
            .await;
        assert!(
            matches!(
                wrong_type,
                Err(registry::Error::UnexpectedStatus { status: 400, .. })
            ),
            "{wrong_type:?}"
        );
        let missing_layer = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": wasm_config.to_json(),
            "layers": [Descriptor::of(WASM_LAYER, b"never pushed").to_json()],
        });
        let missing = push("missing-layer", OCI_MANIFEST, missing_layer).await;
        assert!(
            matches!(
                missing,
                Err(registry::Error::UnexpectedStatus { status: 400, .. })
            ),
            "{missing:?}"
        );
        let referrers = client
            .send(
                Request::get(&format!("/v2/{REPO}/referrers/{}", subject.digest))
                    .header("Accept", ACCEPT_MANIFESTS),
            )
            .await
            .unwrap();
        assert_eq!(
            referrers.status,
            404,
            "no referrers API: {}",
            referrers.text()
        );
    })
    .await;
}
