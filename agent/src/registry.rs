//! Pulling images from, and pushing Wasm to, OCI registries.
//!
//! This is the one seam where something real varies (the network): it
//! fetches manifests and blobs with `oci-client`, verifies every blob's
//! digest and size before the image store sees it, retries transient
//! failures with backoff, and classifies the rest into errors an operator
//! can act on.

use std::path::PathBuf;
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use crate::error::{Error, RegistryFailure, Result};
use crate::ids::Digest;
use crate::image::{
    ImageConfig, ImageName, ImageRecord, ImageStore, NewImage, WasmArtifact, WasmKind,
};
use crate::rootfs::Compression;

/// Blobs a pull added to the store (not there before it).
#[derive(Default)]
struct Fresh(std::sync::Mutex<Vec<Digest>>);

impl Fresh {
    fn note(&self, digest: &Digest) {
        if let Ok(mut v) = self.0.lock() {
            v.push(digest.clone());
        }
    }

    fn write(&self, store: &ImageStore, bytes: &[u8]) -> Result<Digest> {
        let digest = Digest::of(bytes);
        if !store.has_blob(&digest) {
            self.note(&digest);
        }
        store.write_blob(bytes)
    }
}

/// Wasm layer media types in use today.
pub const WASM_LAYER_MEDIA_TYPES: &[&str] = &[
    crate::image::WASM_LAYER_MEDIA_TYPE,
    "application/vnd.wasm.content.layer.v1+wasm",
    "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm",
];

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const ACCEPTED: &[&str] = &[
    crate::image::OCI_MANIFEST_MEDIA_TYPE,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_LIST,
];

/// How wasmlet talks to registries.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// Registries (`host[:port]`) spoken to over plain HTTP.
    pub insecure: Vec<String>,
    /// Extra CA certificate (PEM) trusted besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// Largest manifest or index accepted.
    pub max_manifest_bytes: u64,
    /// Largest config or layer accepted.
    pub max_blob_bytes: u64,
    /// Attempts for a transient failure (5xx, reset, truncation).
    pub attempts: u32,
    /// Limits on unpacking the layers of compat images.
    pub unpack: crate::rootfs::Limits,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            insecure: Vec::new(),
            ca_file: None,
            max_manifest_bytes: 4 * 1024 * 1024,
            max_blob_bytes: 512 * 1024 * 1024,
            attempts: 4,
            unpack: crate::rootfs::Limits {
                max_bytes: 1024 * 1024 * 1024,
                max_entries: 100_000,
            },
        }
    }
}

/// Credentials for one pull or push, as CRI's `AuthConfig` carries them.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    /// base64 of `username:password`.
    pub auth: String,
    pub identity_token: String,
    pub registry_token: String,
}

impl Credentials {
    fn to_auth(&self) -> Result<RegistryAuth> {
        if !self.registry_token.is_empty() {
            return Ok(RegistryAuth::Bearer(self.registry_token.clone()));
        }
        if !self.username.is_empty() {
            return Ok(RegistryAuth::Basic(
                self.username.clone(),
                self.password.clone(),
            ));
        }
        if !self.auth.is_empty() {
            let decoded = decode_base64(&self.auth)
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    Error::InvalidArgument("auth is not base64 of username:password".into())
                })?;
            let (user, pass) = decoded.split_once(':').ok_or_else(|| {
                Error::InvalidArgument("auth is not base64 of username:password".into())
            })?;
            return Ok(RegistryAuth::Basic(user.to_owned(), pass.to_owned()));
        }
        Ok(RegistryAuth::Anonymous)
    }
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.trim().bytes().filter(|c| *c != b'=') {
        let v = ALPHABET.iter().position(|a| *a == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

/// Config media types of ordinary (container) images.
const IMAGE_CONFIG_MEDIA_TYPES: &[&str] = &[
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];

#[derive(Deserialize)]
struct OciImageConfig {
    #[serde(default)]
    config: Option<OciRuntimeConfig>,
}

#[derive(Default, Deserialize)]
struct OciRuntimeConfig {
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
}

#[derive(Deserialize)]
struct Manifest {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

/// What an image in a registry is, judged from its manifest (and, for an
/// ordinary image manifest, its config's platform) without downloading
/// any layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageKind {
    /// Wasm: a Wasm layer or config media type, an index entry for a Wasm
    /// platform, a config whose os/architecture is Wasm, or the
    /// `module.wasm.image/variant` annotation.
    Wasm,
    /// Anything else (an ordinary Linux image, say), with what was seen.
    Other(String),
}

/// The manifest annotation crun and runwasi use to mark Wasm images
/// packaged as ordinary images.
const VARIANT_ANNOTATION: &str = "module.wasm.image/variant";

/// The largest image config read to learn an image's platform.
const MAX_PROBED_CONFIG: u64 = 1024 * 1024;

#[derive(Deserialize)]
struct ConfigPlatform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

fn is_wasm_platform(os: &str, architecture: &str) -> bool {
    matches!(os, "wasip1" | "wasip2" | "wasi") || matches!(architecture, "wasm" | "wasm32")
}

/// A manifest or index as JSON, or why it is not one.
fn parse_manifest(reference: &str, bytes: &[u8]) -> Result<Manifest> {
    serde_json::from_slice(bytes).map_err(|e| {
        failure(
            reference,
            RegistryFailure::Invalid,
            format!("manifest is not valid JSON: {e}"),
        )
    })
}

/// A registry client for the whole agent.
pub struct Registry {
    config: RegistryConfig,
    extra_roots: Vec<Vec<u8>>,
}

fn failure(reference: &str, kind: RegistryFailure, reason: impl Into<String>) -> Error {
    Error::Registry {
        reference: reference.to_owned(),
        kind,
        reason: reason.into(),
    }
}

/// Sorts an oci-client error into what the operator can do about it.
/// `e` and all its causes, which is where reqwest keeps what happened
/// (connection refused, the certificate it did not trust).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let next = cause.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = cause.source();
    }
    text
}

fn classify(reference: &str, registry: &str, e: OciDistributionError) -> Error {
    use OciDistributionError as E;
    let (kind, reason) = match &e {
        E::AuthenticationFailure(_) | E::UnauthorizedError { .. } => (
            RegistryFailure::Unauthorized,
            format!("registry {registry} refused the credentials ({e})"),
        ),
        E::ImageManifestNotFoundError(_) => (
            RegistryFailure::NotFound,
            format!("{reference} does not exist in {registry}"),
        ),
        E::ServerError { code, .. } if *code == 401 || *code == 403 => (
            RegistryFailure::Unauthorized,
            format!("registry {registry} refused the credentials ({e})"),
        ),
        E::ServerError { code, .. } if *code == 404 => (
            RegistryFailure::NotFound,
            format!("{reference} does not exist in {registry} ({e})"),
        ),
        E::ServerError { code, .. } if *code >= 500 || *code == 429 => {
            (RegistryFailure::Unavailable, e.to_string())
        }
        E::RegistryError { envelope, .. } => {
            use oci_client::errors::OciErrorCode as C;
            let codes: Vec<&C> = envelope.errors.iter().map(|x| &x.code).collect();
            if codes
                .iter()
                .any(|c| matches!(c, C::Unauthorized | C::Denied))
            {
                (
                    RegistryFailure::Unauthorized,
                    format!("registry {registry} refused the credentials ({e})"),
                )
            } else if codes.iter().any(|c| {
                matches!(
                    c,
                    C::ManifestUnknown | C::NameUnknown | C::NotFound | C::BlobUnknown
                )
            }) {
                (
                    RegistryFailure::NotFound,
                    format!("{reference} does not exist in {registry} ({e})"),
                )
            } else if codes.iter().any(|c| matches!(c, C::Toomanyrequests)) {
                (RegistryFailure::Unavailable, e.to_string())
            } else {
                (RegistryFailure::Invalid, e.to_string())
            }
        }
        E::RequestError(_) | E::IoError(_) => {
            let chain = error_chain(&e);
            if chain.contains("certificate") {
                (
                    RegistryFailure::Untrusted,
                    format!(
                        "the TLS certificate of {registry} is not trusted (configure [registry] ca_file, or list it as insecure for plain HTTP): {chain}"
                    ),
                )
            } else {
                (
                    RegistryFailure::Unavailable,
                    format!("talking to {registry}: {chain}"),
                )
            }
        }
        E::DigestError(_) => (RegistryFailure::Corrupt, e.to_string()),
        _ => (RegistryFailure::Invalid, e.to_string()),
    };
    failure(reference, kind, reason)
}

impl Registry {
    pub fn new(config: RegistryConfig) -> Result<Self> {
        let mut extra_roots = Vec::new();
        if let Some(path) = &config.ca_file {
            extra_roots.push(std::fs::read(path).map_err(Error::io("reading CA file", path))?);
        }
        Ok(Self {
            config,
            extra_roots,
        })
    }

    /// A client for one pull or push. oci-client remembers the first
    /// credentials it sees per registry, so sharing one client would let a
    /// pull ride on another pull's credentials (or be refused for them).
    fn client(&self) -> Client {
        Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(self.config.insecure.clone()),
            extra_root_certificates: self
                .extra_roots
                .iter()
                .map(|pem| oci_client::client::Certificate {
                    encoding: oci_client::client::CertificateEncoding::Pem,
                    data: pem.clone(),
                })
                .collect(),
            platform_resolver: None,
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(60)),
            user_agent: concat!("wasmlet/", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        })
    }

    /// The registry auth for `credentials`. An identity token (Docker's
    /// name for an OAuth2 refresh token) is exchanged at the registry's
    /// token service for an access token first.
    async fn auth_for(
        &self,
        reference: &Reference,
        credentials: &Credentials,
        actions: &str,
    ) -> Result<RegistryAuth> {
        if credentials.identity_token.is_empty() || !credentials.registry_token.is_empty() {
            return credentials.to_auth();
        }
        let registry = reference.resolve_registry().to_owned();
        let shown = reference.whole();
        let unavailable = |e: reqwest::Error| {
            failure(
                &shown,
                RegistryFailure::Unavailable,
                format!("talking to {registry}: {}", error_chain(&e)),
            )
        };
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60));
        for pem in &self.extra_roots {
            let cert = reqwest::Certificate::from_pem(pem)
                .map_err(|e| Error::InvalidArgument(format!("[registry] ca_file: {e}")))?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder
            .build()
            .map_err(|e| Error::Internal(format!("HTTP client: {e}")))?;
        let scheme = if self.config.insecure.contains(&registry) {
            "http"
        } else {
            "https"
        };
        let probe = http
            .get(format!("{scheme}://{registry}/v2/"))
            .send()
            .await
            .map_err(unavailable)?;
        let challenge = probe
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_challenge)
            .ok_or_else(|| {
                failure(
                    &shown,
                    RegistryFailure::Unauthorized,
                    format!("registry {registry} has no token service, so an identity token cannot be used"),
                )
            })?;
        let scope = format!("repository:{}:{actions}", reference.repository());
        let form = [
            ("grant_type", "refresh_token"),
            ("refresh_token", credentials.identity_token.as_str()),
            ("service", challenge.service.as_str()),
            ("scope", scope.as_str()),
            ("client_id", "wasmlet"),
        ]
        .iter()
        .map(|(k, v)| format!("{k}={}", form_encode(v)))
        .collect::<Vec<_>>()
        .join("&");
        let answer = http
            .post(&challenge.realm)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(form)
            .send()
            .await
            .map_err(unavailable)?;
        let status = answer.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(failure(
                &shown,
                RegistryFailure::Unauthorized,
                format!(
                    "the token service of registry {registry} refused the identity token ({status})"
                ),
            ));
        }
        let body = answer.bytes().await.map_err(unavailable)?;
        if !status.is_success() {
            return Err(failure(
                &shown,
                RegistryFailure::Unavailable,
                format!("the token service of registry {registry} answered {status}"),
            ));
        }
        #[derive(Deserialize)]
        struct Tokens {
            access_token: Option<String>,
            token: Option<String>,
        }
        let tokens: Tokens = serde_json::from_slice(&body).map_err(|e| {
            failure(
                &shown,
                RegistryFailure::Invalid,
                format!("token service answer is not JSON: {e}"),
            )
        })?;
        let token = tokens.access_token.or(tokens.token).ok_or_else(|| {
            failure(
                &shown,
                RegistryFailure::Invalid,
                "the token service answered without an access token",
            )
        })?;
        Ok(RegistryAuth::Bearer(token))
    }

    fn reference(name: &ImageName, original: &str) -> Result<Reference> {
        let text = match (&name.digest, &name.tag) {
            (Some(d), _) => format!("{}@{d}", name.repository),
            (None, Some(t)) => format!("{}:{t}", name.repository),
            (None, None) => name.repository.clone(),
        };
        text.parse::<Reference>()
            .map_err(|e| Error::InvalidArgument(format!("image reference {original:?}: {e}")))
    }

    /// Runs `op` until it succeeds, fails for good, or attempts run out.
    async fn retry<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut delay = Duration::from_millis(200);
        let mut attempt = 1;
        loop {
            match op().await {
                Err(Error::Registry {
                    kind,
                    reason,
                    reference,
                }) if kind.is_transient() && attempt < self.config.attempts => {
                    tracing::warn!(%reference, attempt, %reason, "{what} failed; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
                Err(Error::Registry {
                    kind,
                    reason,
                    reference,
                }) if kind.is_transient() => {
                    return Err(Error::Registry {
                        reference,
                        kind,
                        reason: format!("{reason} (gave up after {attempt} attempts)"),
                    });
                }
                other => return other,
            }
        }
    }

    async fn fetch_manifest(
        &self,
        client: &Client,
        reference: &Reference,
        auth: &RegistryAuth,
        shown: &str,
    ) -> Result<(Vec<u8>, Digest)> {
        let registry = reference.resolve_registry().to_owned();
        self.retry("fetching the manifest", || async {
            let (bytes, _) = client
                .pull_manifest_raw(reference, auth, ACCEPTED)
                .await
                .map_err(|e| classify(shown, &registry, e))?;
            if bytes.len() as u64 > self.config.max_manifest_bytes {
                return Err(failure(
                    shown,
                    RegistryFailure::TooLarge,
                    format!(
                        "manifest is {} bytes, over the {} byte limit",
                        bytes.len(),
                        self.config.max_manifest_bytes
                    ),
                ));
            }
            let digest = Digest::of(&bytes);
            if let Some(expected) = reference.digest()
                && expected != digest.as_str()
            {
                return Err(failure(
                    shown,
                    RegistryFailure::Corrupt,
                    format!("manifest has digest {digest}, not the requested {expected}"),
                ));
            }
            Ok((bytes.to_vec(), digest))
        })
        .await
    }

    /// Downloads a blob into the store (unless already there), verified.
    async fn fetch_blob(
        &self,
        client: &Client,
        fresh: &Fresh,
        store: &ImageStore,
        reference: &Reference,
        d: &Descriptor,
        shown: &str,
    ) -> Result<Digest> {
        let digest = Digest::parse(&d.digest).map_err(|_| {
            failure(
                shown,
                RegistryFailure::Invalid,
                format!("descriptor digest {:?} is not sha256", d.digest),
            )
        })?;
        if d.size > self.config.max_blob_bytes {
            return Err(failure(
                shown,
                RegistryFailure::TooLarge,
                format!(
                    "blob {digest} is {} bytes, over the {} byte limit",
                    d.size, self.config.max_blob_bytes
                ),
            ));
        }
        if store.has_blob(&digest) {
            return Ok(digest);
        }
        fresh.note(&digest);
        let registry = reference.resolve_registry().to_owned();
        let layer = oci_client::manifest::OciDescriptor {
            media_type: d.media_type.clone(),
            digest: d.digest.clone(),
            size: d.size as i64,
            ..Default::default()
        };
        self.retry("fetching a blob", || async {
            let tmp = store.ingest_path();
            let result = async {
                let file = tokio::fs::File::create(&tmp)
                    .await
                    .map_err(Error::io("creating download", &tmp))?;
                let mut out = LimitedWriter {
                    inner: file,
                    left: d.size,
                };
                let pulled = client.pull_blob(reference, &layer, &mut out).await;
                pulled.map_err(|e| classify(shown, &registry, e))?;
                out.inner
                    .flush()
                    .await
                    .map_err(Error::io("writing download", &tmp))?;
                drop(out);
                store
                    .commit_blob(&tmp, &digest, d.size)
                    .map_err(|e| match e {
                        Error::InvalidImage { reason, .. } => {
                            failure(shown, RegistryFailure::Corrupt, reason)
                        }
                        other => other,
                    })
            }
            .await;
            let _ = std::fs::remove_file(&tmp);
            result?;
            if d.size > 8 * 1024 * 1024 {
                tracing::info!(reference = shown, %digest, bytes = d.size, "blob downloaded");
            }
            Ok(digest.clone())
        })
        .await
    }

    /// Tells whether `reference` is a Wasm image by reading its manifest
    /// (and at most a small config blob). Nothing is stored.
    pub async fn probe(&self, reference: &str, credentials: &Credentials) -> Result<ImageKind> {
        let client = &self.client();
        let name = ImageName::parse(reference)?;
        let oci_ref = Self::reference(&name, reference)?;
        let auth = self.auth_for(&oci_ref, credentials, "pull").await?;
        let (bytes, _) = self
            .fetch_manifest(client, &oci_ref, &auth, reference)
            .await?;
        let manifest: Manifest = parse_manifest(reference, &bytes)?;
        if manifest.annotations.contains_key(VARIANT_ANNOTATION) {
            return Ok(ImageKind::Wasm);
        }
        if !manifest.manifests.is_empty() && manifest.config.is_none() {
            if choose_wasm_platform(&manifest.manifests).is_some() {
                return Ok(ImageKind::Wasm);
            }
            let platforms: Vec<String> = manifest
                .manifests
                .iter()
                .filter_map(|m| m.platform.as_ref())
                .map(|p| format!("{}/{}", p.os, p.architecture))
                .collect();
            return Ok(ImageKind::Other(format!(
                "an index for {}",
                platforms.join(", ")
            )));
        }
        let Some(config) = &manifest.config else {
            return Ok(ImageKind::Other("a manifest without a config".into()));
        };
        if config.media_type == crate::image::WASM_CONFIG_MEDIA_TYPE
            || manifest
                .layers
                .iter()
                .any(|l| WASM_LAYER_MEDIA_TYPES.contains(&l.media_type.as_str()))
        {
            return Ok(ImageKind::Wasm);
        }
        if !IMAGE_CONFIG_MEDIA_TYPES.contains(&config.media_type.as_str())
            || config.size > MAX_PROBED_CONFIG
        {
            return Ok(ImageKind::Other(format!("config {}", config.media_type)));
        }
        let descriptor = oci_client::manifest::OciDescriptor {
            media_type: config.media_type.clone(),
            digest: config.digest.clone(),
            size: config.size as i64,
            ..Default::default()
        };
        let registry = oci_ref.resolve_registry().to_owned();
        let mut bytes = Vec::with_capacity(config.size as usize);
        client
            .pull_blob(&oci_ref, &descriptor, &mut bytes)
            .await
            .map_err(|e| classify(reference, &registry, e))?;
        if Digest::of(&bytes).as_str() != config.digest {
            return Err(failure(
                reference,
                RegistryFailure::Corrupt,
                format!("config blob does not match its digest {}", config.digest),
            ));
        }
        let platform: ConfigPlatform = serde_json::from_slice(&bytes).map_err(|e| {
            failure(
                reference,
                RegistryFailure::Invalid,
                format!("image config is not valid JSON: {e}"),
            )
        })?;
        Ok(if is_wasm_platform(&platform.os, &platform.architecture) {
            ImageKind::Wasm
        } else {
            ImageKind::Other(format!(
                "an image for {}/{}",
                platform.os, platform.architecture
            ))
        })
    }

    /// Pulls `reference` into `store` and records it. Nothing is recorded
    /// unless every blob arrived whole.
    pub async fn pull(
        &self,
        store: &ImageStore,
        reference: &str,
        credentials: &Credentials,
    ) -> Result<ImageRecord> {
        let fresh = Fresh::default();
        let result = self
            .pull_tracked(&fresh, store, reference, credentials)
            .await;
        if result.is_err() {
            // Take back what this pull added and no image references, so
            // the store holds exactly what it held before.
            let added = fresh.0.lock().map(|v| v.clone()).unwrap_or_default();
            store.discard_unreferenced(&added);
        }
        result
    }

    async fn pull_tracked(
        &self,
        fresh: &Fresh,
        store: &ImageStore,
        reference: &str,
        credentials: &Credentials,
    ) -> Result<ImageRecord> {
        let client = &self.client();
        let name = ImageName::parse(reference)?;
        let oci_ref = Self::reference(&name, reference)?;
        let auth = self.auth_for(&oci_ref, credentials, "pull").await?;
        tracing::info!(
            reference,
            registry = oci_ref.resolve_registry(),
            "pulling image"
        );
        let (top_bytes, top_digest) = self
            .fetch_manifest(client, &oci_ref, &auth, reference)
            .await?;
        let top: Manifest = parse_manifest(reference, &top_bytes)?;
        let mut blobs = Vec::new();
        let (manifest_bytes, manifest_digest, manifest) = if top.media_type == OCI_INDEX
            || top.media_type == DOCKER_LIST
            || (!top.manifests.is_empty() && top.config.is_none())
        {
            let entry = choose_wasm_platform(&top.manifests).ok_or_else(|| {
                let found: Vec<String> = top
                    .manifests
                    .iter()
                    .map(|m| m.platform.as_ref().map_or("(no platform)".to_owned(), |p| format!("{}/{}", p.os, p.architecture)))
                    .collect();
                failure(
                    reference,
                    RegistryFailure::NotWasm,
                    format!("the image index has no Wasm platform (os wasip1/wasip2/wasi or architecture wasm); it has {}", found.join(", ")),
                )
            })?;
            let by_digest: Reference = format!("{}@{}", name.repository, entry.digest)
                .parse()
                .map_err(|e| {
                    failure(
                        reference,
                        RegistryFailure::Invalid,
                        format!("index entry digest: {e}"),
                    )
                })?;
            let (bytes, digest) = self
                .fetch_manifest(client, &by_digest, &auth, reference)
                .await?;
            let manifest: Manifest = parse_manifest(reference, &bytes)?;
            blobs.push(fresh.write(store, &top_bytes)?);
            (bytes, digest, manifest)
        } else {
            (top_bytes, top_digest.clone(), top)
        };

        let config = manifest.config.as_ref().ok_or_else(|| {
            failure(
                reference,
                RegistryFailure::Invalid,
                "the manifest has no config",
            )
        })?;
        // Refuse oversized content before downloading any of it.
        for d in std::iter::once(config).chain(&manifest.layers) {
            if d.size > self.config.max_blob_bytes {
                return Err(failure(
                    reference,
                    RegistryFailure::TooLarge,
                    format!(
                        "blob {} is {} bytes, over the {} byte limit",
                        d.digest, d.size, self.config.max_blob_bytes
                    ),
                ));
            }
        }
        let wasm_layers: Vec<&Descriptor> = manifest
            .layers
            .iter()
            .filter(|l| WASM_LAYER_MEDIA_TYPES.contains(&l.media_type.as_str()))
            .collect();
        let wasm_layer = match wasm_layers.as_slice() {
            [one] => *one,
            [] => {
                let tar_layers = !manifest.layers.is_empty()
                    && manifest
                        .layers
                        .iter()
                        .all(|l| Compression::of_media_type(&l.media_type).is_some());
                if IMAGE_CONFIG_MEDIA_TYPES.contains(&config.media_type.as_str()) && tar_layers {
                    return self
                        .pull_compat(
                            client,
                            fresh,
                            store,
                            &oci_ref,
                            &name,
                            reference,
                            &top_digest,
                            (manifest_bytes, manifest_digest, &manifest),
                            blobs,
                        )
                        .await;
                }
                let mut seen = vec![format!("config {}", config.media_type)];
                seen.extend(
                    manifest
                        .layers
                        .iter()
                        .map(|l| format!("layer {}", l.media_type)),
                );
                return Err(failure(
                    reference,
                    RegistryFailure::NotWasm,
                    format!(
                        "the image is not Wasm: media types seen: {}",
                        seen.join(", ")
                    ),
                ));
            }
            _ => {
                return Err(failure(
                    reference,
                    RegistryFailure::Invalid,
                    format!(
                        "the image has {} Wasm layers; exactly one is supported",
                        wasm_layers.len()
                    ),
                ));
            }
        };
        let config_digest = self
            .fetch_blob(client, fresh, store, &oci_ref, config, reference)
            .await?;
        let wasm_digest = self
            .fetch_blob(client, fresh, store, &oci_ref, wasm_layer, reference)
            .await?;
        let header = store.read_blob_prefix(&wasm_digest, 8)?;
        let wasm_kind = WasmKind::detect(&header).ok_or_else(|| {
            failure(
                reference,
                RegistryFailure::NotWasm,
                format!(
                    "layer {wasm_digest} ({}) is not a WebAssembly binary",
                    wasm_layer.media_type
                ),
            )
        })?;
        blobs.push(fresh.write(store, &manifest_bytes)?);
        blobs.push(config_digest.clone());
        blobs.push(wasm_digest.clone());
        let size = manifest_bytes.len() as u64 + config.size + wasm_layer.size;
        let record = store.add_image(NewImage {
            name: &name,
            repo_digest: &top_digest,
            manifest_digest,
            id: config_digest,
            wasm_digest,
            wasm_kind,
            size,
            blobs,
            imported: false,
            compat: None,
        })?;
        tracing::info!(reference, image = %record.id, "image pulled");
        Ok(record)
    }

    /// Pulls an ordinary OCI image whose tar layers carry `.wasm` programs:
    /// unpacks its root filesystem and checks that its entrypoint is Wasm.
    #[allow(clippy::too_many_arguments)]
    async fn pull_compat(
        &self,
        client: &Client,
        fresh: &Fresh,
        store: &ImageStore,
        oci_ref: &Reference,
        name: &ImageName,
        reference: &str,
        top_digest: &Digest,
        (manifest_bytes, manifest_digest, manifest): (Vec<u8>, Digest, &Manifest),
        mut blobs: Vec<Digest>,
    ) -> Result<ImageRecord> {
        let config_desc = manifest.config.as_ref().ok_or_else(|| {
            failure(
                reference,
                RegistryFailure::Invalid,
                "the manifest has no config",
            )
        })?;
        let config_digest = self
            .fetch_blob(client, fresh, store, oci_ref, config_desc, reference)
            .await?;
        let config_bytes = store.read_blob(&config_digest)?;
        let parsed: OciImageConfig = serde_json::from_slice(&config_bytes).map_err(|e| {
            failure(
                reference,
                RegistryFailure::Invalid,
                format!("image config is not valid JSON: {e}"),
            )
        })?;
        let runtime = parsed.config.unwrap_or_default();
        let config = ImageConfig {
            entrypoint: runtime.entrypoint.unwrap_or_default(),
            cmd: runtime.cmd.unwrap_or_default(),
            env: runtime.env.unwrap_or_default(),
            working_dir: runtime.working_dir.unwrap_or_default(),
        };
        let mut layers = Vec::new();
        let mut size = manifest_bytes.len() as u64 + config_desc.size;
        for layer in &manifest.layers {
            let digest = self
                .fetch_blob(client, fresh, store, oci_ref, layer, reference)
                .await?;
            let compression =
                Compression::of_media_type(&layer.media_type).unwrap_or(Compression::None);
            layers.push((store.blob_path(&digest), compression));
            size += layer.size;
            blobs.push(digest);
        }
        let rootfs = store.rootfs_path(&config_digest);
        if !rootfs.exists() {
            let limits = self.config.unpack;
            let dest = rootfs.clone();
            tokio::task::spawn_blocking(move || crate::rootfs::unpack(&layers, &dest, limits))
                .await
                .map_err(|e| Error::Internal(format!("unpack task: {e}")))?
                .map_err(|why| failure(reference, RegistryFailure::Invalid, why))?;
        }
        let program = config
            .entrypoint
            .first()
            .or(config.cmd.first())
            .ok_or_else(|| {
                failure(
                    reference,
                    RegistryFailure::NotWasm,
                    "the image has no entrypoint or command naming a Wasm program",
                )
            })?;
        let path =
            crate::rootfs::resolve_program(&rootfs, program, config.path_env()).map_err(|why| {
                failure(
                    reference,
                    RegistryFailure::NotWasm,
                    format!("the image's entrypoint: {why}"),
                )
            })?;
        let bytes = std::fs::read(&path).map_err(Error::io("reading the entrypoint", &path))?;
        let wasm_kind = WasmKind::detect(&bytes).ok_or_else(|| {
            failure(
                reference,
                RegistryFailure::NotWasm,
                format!("the image's entrypoint {program:?} is not a WebAssembly file"),
            )
        })?;
        blobs.push(fresh.write(store, &manifest_bytes)?);
        blobs.push(config_digest.clone());
        let record = store.add_image(NewImage {
            name,
            repo_digest: top_digest,
            manifest_digest,
            id: config_digest,
            wasm_digest: Digest::of(&bytes),
            wasm_kind,
            size,
            blobs,
            imported: false,
            compat: Some(config),
        })?;
        tracing::info!(reference, image = %record.id, "compat image pulled and unpacked");
        Ok(record)
    }

    /// Pushes `bytes` (a module or component) to `reference` as a CNCF Wasm
    /// OCI artifact. Returns the manifest digest.
    pub async fn push_wasm(
        &self,
        bytes: &[u8],
        reference: &str,
        credentials: &Credentials,
    ) -> Result<Digest> {
        let name = ImageName::parse(reference)?;
        let oci_ref = Self::reference(&name, reference)?;
        let auth = self.auth_for(&oci_ref, credentials, "pull,push").await?;
        let registry = oci_ref.resolve_registry().to_owned();
        let artifact = WasmArtifact::new(bytes, reference)?;
        let client = self.client();
        client
            .auth(&oci_ref, &auth, oci_client::RegistryOperation::Push)
            .await
            .map_err(|e| classify(reference, &registry, e))?;
        for blob in [bytes, &artifact.config[..]] {
            let digest = Digest::of(blob);
            client
                .push_blob(&oci_ref, blob.to_vec(), digest.as_str())
                .await
                .map_err(|e| classify(reference, &registry, e))?;
        }
        let content_type = crate::image::OCI_MANIFEST_MEDIA_TYPE
            .parse()
            .map_err(|_| Error::Internal("manifest media type header".into()))?;
        client
            .push_manifest_raw(&oci_ref, artifact.manifest.clone(), content_type)
            .await
            .map_err(|e| classify(reference, &registry, e))?;
        Ok(Digest::of(&artifact.manifest))
    }
}

/// The realm and service of a `WWW-Authenticate: Bearer ...` challenge.
struct BearerChallenge {
    realm: String,
    service: String,
}

fn bearer_challenge(header: &str) -> Option<BearerChallenge> {
    let mut rest = header.strip_prefix("Bearer ")?.trim();
    let mut realm = None;
    let mut service = String::new();
    // key="quoted value" pairs separated by commas (values may hold commas).
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let (value, after) = match after.strip_prefix('"') {
            Some(quoted) => {
                let end = quoted.find('"')?;
                (&quoted[..end], &quoted[end + 1..])
            }
            None => after.split_once(',').map_or((after, ""), |(v, a)| (v, a)),
        };
        match key.trim() {
            "realm" => realm = Some(value.to_owned()),
            "service" => service = value.to_owned(),
            _ => {}
        }
        rest = after.trim_start_matches([',', ' ']);
    }
    Some(BearerChallenge {
        realm: realm?,
        service,
    })
}

/// `application/x-www-form-urlencoded` encoding of one value.
fn form_encode(value: &str) -> String {
    let mut out = String::new();
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The index entry for Wasm, as the ecosystem labels it.
fn choose_wasm_platform(entries: &[Descriptor]) -> Option<&Descriptor> {
    let score = |d: &Descriptor| {
        let p = d.platform.as_ref()?;
        match (p.os.as_str(), p.architecture.as_str()) {
            ("wasip2", _) => Some(0),
            ("wasip1", _) => Some(1),
            ("wasi", _) => Some(2),
            (_, "wasm" | "wasm32") => Some(3),
            _ => None,
        }
    };
    entries
        .iter()
        .filter_map(|d| Some((score(d)?, d)))
        .min_by_key(|(s, _)| *s)
        .map(|(_, d)| d)
}

/// Fails the write once more than `left` bytes arrive.
struct LimitedWriter {
    inner: tokio::fs::File,
    left: u64,
}

impl tokio::io::AsyncWrite for LimitedWriter {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if buf.len() as u64 > self.left {
            return std::task::Poll::Ready(Err(std::io::Error::other(
                "the blob is longer than its descriptor says",
            )));
        }
        let this = &mut *self;
        let n = std::task::ready!(std::pin::Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.left -= n as u64;
        std::task::Poll::Ready(Ok(n))
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_field_decodes_to_basic() {
        let c = Credentials {
            auth: "dXNlcjpwYXNz".into(),
            ..Default::default()
        };
        match c.to_auth().unwrap() {
            RegistryAuth::Basic(u, p) => assert_eq!((u.as_str(), p.as_str()), ("user", "pass")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Credentials::default().to_auth().unwrap(),
            RegistryAuth::Anonymous
        ));
        let bad = Credentials {
            auth: "!!!".into(),
            ..Default::default()
        };
        assert!(bad.to_auth().is_err());
    }

    #[test]
    fn bearer_challenges_and_forms() {
        let c = bearer_challenge(r#"Bearer realm="http://127.0.0.1:9/token",service="reg",scope="repository:a:pull,push""#).unwrap();
        assert_eq!(
            (c.realm.as_str(), c.service.as_str()),
            ("http://127.0.0.1:9/token", "reg")
        );
        assert!(bearer_challenge(r#"Basic realm="x""#).is_none());
        assert_eq!(
            form_encode("repository:a/b:pull,push"),
            "repository%3Aa%2Fb%3Apull%2Cpush"
        );
    }

    #[test]
    fn index_resolution_prefers_wasm_platforms() {
        let entry = |os: &str, arch: &str, d: char| Descriptor {
            media_type: String::new(),
            digest: format!("sha256:{}", d.to_string().repeat(64)),
            size: 1,
            platform: Some(Platform {
                architecture: arch.into(),
                os: os.into(),
            }),
        };
        let entries = vec![
            entry("linux", "amd64", 'a'),
            entry("wasip1", "wasm", 'b'),
            entry("wasip2", "wasm", 'c'),
        ];
        assert!(
            choose_wasm_platform(&entries)
                .unwrap()
                .digest
                .ends_with('c')
        );
        assert!(choose_wasm_platform(&entries[..1]).is_none());
        let entries = vec![entry("linux", "amd64", 'a'), entry("unknown", "wasm", 'd')];
        assert!(
            choose_wasm_platform(&entries)
                .unwrap()
                .digest
                .ends_with('d')
        );
    }
}
