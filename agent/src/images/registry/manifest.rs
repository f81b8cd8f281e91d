//! Manifests and indexes as registries serve them, and telling a Wasm
//! image from any other by its manifest alone.

use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use serde::Deserialize;

use super::{Credentials, Registry, anonymous_refusal, classify, failure};
use crate::error::{RegistryFailure, Result};
use crate::images::rootfs::Compression;
use crate::model::ids::Digest;
use crate::model::image::{ImageConfig, ImageName};

/// Wasm layer media types in use today.
pub const WASM_LAYER_MEDIA_TYPES: &[&str] = &[
    crate::images::store::WASM_LAYER_MEDIA_TYPE,
    "application/vnd.wasm.content.layer.v1+wasm",
    "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm",
];

pub(super) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(super) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const ACCEPTED: &[&str] = &[
    crate::images::store::OCI_MANIFEST_MEDIA_TYPE,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_LIST,
];

/// How much of an error answer to a manifest request is read (to show).
const ERROR_BODY_BYTES: u64 = 64 * 1024;

/// Why a manifest was not read.
enum ManifestGet {
    /// What the registry or the connection said, as oci-client says it.
    Refused(oci_client::errors::OciDistributionError),
    /// Its size, or how much arrived before the read stopped.
    TooLarge(String),
}

#[derive(Deserialize)]
pub(super) struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub(super) media_type: String,
    pub(super) digest: String,
    pub(super) size: u64,
    #[serde(default)]
    pub(super) platform: Option<Platform>,
}

#[derive(Deserialize)]
pub(super) struct Platform {
    #[serde(default)]
    pub(super) architecture: String,
    #[serde(default)]
    pub(super) os: String,
}

/// Config media types of ordinary (container) images.
pub(super) const IMAGE_CONFIG_MEDIA_TYPES: &[&str] = &[
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];

#[derive(Deserialize)]
pub(super) struct OciImageConfig {
    #[serde(default)]
    pub(super) config: Option<OciRuntimeConfig>,
}

#[derive(Default, Deserialize)]
pub(super) struct OciRuntimeConfig {
    #[serde(rename = "Entrypoint", default)]
    pub(super) entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    pub(super) cmd: Option<Vec<String>>,
    #[serde(rename = "Env", default)]
    pub(super) env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    pub(super) working_dir: Option<String>,
    #[serde(rename = "User", default)]
    pub(super) user: Option<String>,
}

#[derive(Deserialize)]
pub(super) struct Manifest {
    #[serde(rename = "mediaType", default)]
    pub(super) media_type: String,
    #[serde(default)]
    pub(super) annotations: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub(super) config: Option<Descriptor>,
    #[serde(default)]
    pub(super) layers: Vec<Descriptor>,
    #[serde(default)]
    pub(super) manifests: Vec<Descriptor>,
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

/// The largest image config a pull accepts. A config is read whole into
/// memory and what it lists (entrypoint, command, environment) is kept
/// with the image; real ones are a few KiB, a long history a few hundred.
pub(super) const MAX_IMAGE_CONFIG: u64 = 4 * 1024 * 1024;

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
pub(super) fn parse_manifest(reference: &str, bytes: &[u8]) -> Result<Manifest> {
    serde_json::from_slice(bytes).map_err(|e| {
        failure(
            reference,
            RegistryFailure::Invalid,
            format!("manifest is not valid JSON: {e}"),
        )
    })
}

/// A blob a pull will download: its descriptor, and its digest checked.
pub(super) struct Blob<'m> {
    pub(super) digest: Digest,
    pub(super) descriptor: &'m Descriptor,
}

/// What a pull downloads for an image manifest, every descriptor checked
/// before the first byte of content is.
pub(super) enum PullPlan<'m> {
    /// A Wasm image: its config and its one Wasm layer.
    Wasm { config: Blob<'m>, layer: Blob<'m> },
    /// A compat image: its (OCI or Docker) config and its tar layers,
    /// lowest first.
    Compat {
        config: Blob<'m>,
        layers: Vec<(Blob<'m>, Compression)>,
    },
}

/// `d` with its digest checked: sha256, as the store keeps blobs.
fn blob<'m>(reference: &str, d: &'m Descriptor) -> Result<Blob<'m>> {
    let digest = Digest::parse(&d.digest).map_err(|_| {
        failure(
            reference,
            RegistryFailure::Invalid,
            format!("descriptor digest {:?} is not sha256", d.digest),
        )
    })?;
    Ok(Blob {
        digest,
        descriptor: d,
    })
}

/// Whether `top` is an index (or Docker manifest list), and if so the
/// digest of the manifest to pull in its stead: its Wasm entry's.
pub(super) fn index_entry(reference: &str, top: &Manifest) -> Result<Option<Digest>> {
    if !(top.media_type == OCI_INDEX
        || top.media_type == DOCKER_LIST
        || (!top.manifests.is_empty() && top.config.is_none()))
    {
        return Ok(None);
    }
    let entry = choose_wasm_platform(&top.manifests).ok_or_else(|| {
        let found: Vec<String> = top
            .manifests
            .iter()
            .map(|m| {
                m.platform.as_ref().map_or("(no platform)".to_owned(), |p| {
                    format!("{}/{}", p.os, p.architecture)
                })
            })
            .collect();
        failure(
            reference,
            RegistryFailure::NotWasm,
            format!(
                "the image index has no Wasm platform (os wasip1/wasip2/wasi or architecture wasm); it has {}",
                found.join(", ")
            ),
        )
    })?;
    let digest = Digest::parse(&entry.digest).map_err(|_| {
        failure(
            reference,
            RegistryFailure::Invalid,
            format!("index entry digest {:?} is not sha256", entry.digest),
        )
    })?;
    Ok(Some(digest))
}

/// What pulling the image `manifest` describes takes, or why it is
/// refused: no config, a blob over `max_blob_bytes` (or a config over
/// [`MAX_IMAGE_CONFIG`]), a digest that is not sha256, not Wasm, or more
/// than one Wasm layer.
pub(super) fn plan<'m>(
    reference: &str,
    manifest: &'m Manifest,
    max_blob_bytes: u64,
) -> Result<PullPlan<'m>> {
    let config = manifest.config.as_ref().ok_or_else(|| {
        failure(
            reference,
            RegistryFailure::Invalid,
            "the manifest has no config",
        )
    })?;
    // Refuse oversized content before downloading any of it.
    for d in std::iter::once(config).chain(&manifest.layers) {
        if d.size > max_blob_bytes {
            return Err(failure(
                reference,
                RegistryFailure::TooLarge,
                format!(
                    "blob {} is {} bytes, over the {} byte limit",
                    d.digest, d.size, max_blob_bytes
                ),
            ));
        }
    }
    if config.size > MAX_IMAGE_CONFIG {
        return Err(failure(
            reference,
            RegistryFailure::TooLarge,
            format!(
                "image config {} is {} bytes, over the {MAX_IMAGE_CONFIG} byte limit",
                config.digest, config.size
            ),
        ));
    }
    let wasm_layers: Vec<&Descriptor> = manifest
        .layers
        .iter()
        .filter(|l| WASM_LAYER_MEDIA_TYPES.contains(&l.media_type.as_str()))
        .collect();
    match wasm_layers.as_slice() {
        [one] => Ok(PullPlan::Wasm {
            config: blob(reference, config)?,
            layer: blob(reference, one)?,
        }),
        [] => {
            let tar_layers: Option<Vec<Compression>> = manifest
                .layers
                .iter()
                .map(|l| Compression::of_media_type(&l.media_type))
                .collect();
            match tar_layers {
                Some(compressions)
                    if !compressions.is_empty()
                        && IMAGE_CONFIG_MEDIA_TYPES.contains(&config.media_type.as_str()) =>
                {
                    let layers = manifest
                        .layers
                        .iter()
                        .zip(compressions)
                        .map(|(l, c)| Ok((blob(reference, l)?, c)))
                        .collect::<Result<_>>()?;
                    Ok(PullPlan::Compat {
                        config: blob(reference, config)?,
                        layers,
                    })
                }
                _ => {
                    let mut seen = vec![format!("config {}", config.media_type)];
                    seen.extend(
                        manifest
                            .layers
                            .iter()
                            .map(|l| format!("layer {}", l.media_type)),
                    );
                    Err(failure(
                        reference,
                        RegistryFailure::NotWasm,
                        format!(
                            "the image is not Wasm: media types seen: {}",
                            seen.join(", ")
                        ),
                    ))
                }
            }
        }
        _ => Err(failure(
            reference,
            RegistryFailure::Invalid,
            format!(
                "the image has {} Wasm layers; exactly one is supported",
                wasm_layers.len()
            ),
        )),
    }
}

/// The parts of an OCI or Docker image config that decide how a compat
/// image's program runs; absent and `null` fields are empty.
pub(super) fn parse_image_config(reference: &str, bytes: &[u8]) -> Result<ImageConfig> {
    let parsed: OciImageConfig = serde_json::from_slice(bytes).map_err(|e| {
        failure(
            reference,
            RegistryFailure::Invalid,
            format!("image config is not valid JSON: {e}"),
        )
    })?;
    let runtime = parsed.config.unwrap_or_default();
    Ok(ImageConfig {
        entrypoint: runtime.entrypoint.unwrap_or_default(),
        cmd: runtime.cmd.unwrap_or_default(),
        env: runtime.env.unwrap_or_default(),
        working_dir: runtime.working_dir.unwrap_or_default(),
        user: runtime.user.unwrap_or_default(),
    })
}

/// The index entry for Wasm, as the ecosystem labels it.
pub(super) fn choose_wasm_platform(entries: &[Descriptor]) -> Option<&Descriptor> {
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

impl Registry {
    pub(super) async fn fetch_manifest(
        &self,
        client: &Client,
        reference: &Reference,
        auth: &RegistryAuth,
        shown: &str,
    ) -> Result<(Vec<u8>, Digest)> {
        let registry = reference.resolve_registry().to_owned();
        let http = self.http()?;
        self.retry("fetching the manifest", || async {
            let bytes = self
                .get_manifest(&http, client, reference, auth)
                .await
                .map_err(|e| match e {
                    ManifestGet::Refused(e) => {
                        let anonymous = matches!(auth, RegistryAuth::Anonymous);
                        anonymous_refusal(classify(shown, &registry, e), anonymous, &registry)
                    }
                    ManifestGet::TooLarge(size) => failure(
                        shown,
                        RegistryFailure::TooLarge,
                        format!(
                            "manifest is {size} bytes, over the {} byte limit",
                            self.config.max_manifest_bytes
                        ),
                    ),
                })?;
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

    /// GETs `reference`'s manifest, reading no more of it than
    /// `max_manifest_bytes` (oci-client's own manifest calls read the whole
    /// body first, so a registry could make the agent, and every pod in it,
    /// buffer gigabytes). `client` does the authentication and keeps the
    /// token it gets for the blobs that follow.
    async fn get_manifest(
        &self,
        http: &reqwest::Client,
        client: &Client,
        reference: &Reference,
        auth: &RegistryAuth,
    ) -> std::result::Result<Vec<u8>, ManifestGet> {
        use oci_client::errors::{OciDistributionError as E, OciEnvelope};
        let max = self.config.max_manifest_bytes;
        let token = client
            .auth(reference, auth, RegistryOperation::Pull)
            .await
            .map_err(ManifestGet::Refused)?;
        let registry = reference.resolve_registry();
        let target = reference.digest().or(reference.tag()).unwrap_or("latest");
        let url = format!(
            "{}://{registry}/v2/{}/manifests/{target}",
            self.scheme(registry),
            reference.repository()
        );
        let request = http
            .get(&url)
            .header(reqwest::header::ACCEPT, ACCEPTED.join(", "));
        let request = match (token.as_ref(), auth) {
            (Some(token), _) | (None, RegistryAuth::Bearer(token)) => request.bearer_auth(token),
            (None, RegistryAuth::Basic(user, password)) => request.basic_auth(user, Some(password)),
            (None, RegistryAuth::Anonymous) => request,
        };
        let mut response = request
            .send()
            .await
            .map_err(|e| ManifestGet::Refused(E::RequestError(e)))?;
        let status = response.status();
        let ok = status == reqwest::StatusCode::OK;
        if let Some(size) = response.content_length().filter(|&n| ok && n > max) {
            return Err(ManifestGet::TooLarge(size.to_string()));
        }
        // An error's body is only shown: its first few KiB do.
        let limit = if ok { max } else { ERROR_BODY_BYTES };
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| ManifestGet::Refused(E::RequestError(e)))?
        {
            if (body.len() + chunk.len()) as u64 > limit {
                if ok {
                    return Err(ManifestGet::TooLarge(format!(
                        "over {}",
                        body.len() + chunk.len()
                    )));
                }
                break;
            }
            body.extend_from_slice(&chunk);
        }
        if ok {
            return Ok(body);
        }
        // What oci-client makes of the same answers, for `classify`.
        let message = String::from_utf8_lossy(&body).into_owned();
        Err(ManifestGet::Refused(match status {
            reqwest::StatusCode::UNAUTHORIZED => E::UnauthorizedError { url },
            s if s.is_client_error() => match serde_json::from_slice::<OciEnvelope>(&body) {
                Ok(envelope) => E::RegistryError { envelope, url },
                Err(_) => E::ServerError {
                    code: s.as_u16(),
                    url,
                    message,
                },
            },
            s => E::ServerError {
                code: s.as_u16(),
                url,
                message,
            },
        }))
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
        if config.media_type == crate::images::store::WASM_CONFIG_MEDIA_TYPE
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
        // A registry sending more than the descriptor says is cut off.
        let mut out = super::pull::LimitedWriter {
            inner: Vec::with_capacity(config.size as usize),
            left: config.size,
        };
        client
            .pull_blob(&oci_ref, &descriptor, &mut out)
            .await
            .map_err(|e| classify(reference, &registry, e))?;
        let bytes = out.inner;
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
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

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
