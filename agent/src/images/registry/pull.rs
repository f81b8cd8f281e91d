//! Pulling an image into the store: its manifest, config and Wasm layer,
//! or, for a compat image, every layer, unpacked.

use oci_client::{Client, Reference};
use tokio::io::AsyncWriteExt;

use super::manifest::{
    Blob, Manifest, PullPlan, index_entry, parse_image_config, parse_manifest, plan,
};
use super::{Credentials, Registry, classify, failure};
use crate::error::{Error, RegistryFailure, Result};
use crate::images::rootfs::{Compression, RootfsError};
use crate::images::store::{ImageStore, NewImage};
use crate::model::ids::Digest;
use crate::model::image::{ImageName, ImageRecord, WasmKind};

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

impl Registry {
    /// Downloads a blob into the store (unless already there), verified.
    async fn fetch_blob(
        &self,
        client: &Client,
        fresh: &Fresh,
        store: &ImageStore,
        reference: &Reference,
        blob: &Blob<'_>,
        shown: &str,
    ) -> Result<Digest> {
        let (digest, d) = (blob.digest.clone(), blob.descriptor);
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
            crate::metrics::global().downloaded(d.size);
            if d.size > 8 * 1024 * 1024 {
                tracing::info!(reference = shown, %digest, bytes = d.size, "blob downloaded");
            }
            Ok(digest.clone())
        })
        .await
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
        let (manifest_bytes, manifest_digest, manifest) =
            if let Some(entry) = index_entry(reference, &top)? {
                let by_digest: Reference =
                    format!("{}@{entry}", name.repository)
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

        let (config, wasm_layer) = match plan(reference, &manifest, self.config.max_blob_bytes)? {
            PullPlan::Wasm { config, layer } => (config, layer),
            PullPlan::Compat { config, layers } => {
                return self
                    .pull_compat(
                        client,
                        fresh,
                        store,
                        &oci_ref,
                        &name,
                        reference,
                        &top_digest,
                        (&manifest_bytes, manifest_digest),
                        (config, layers),
                        blobs,
                    )
                    .await;
            }
        };
        let config_digest = self
            .fetch_blob(client, fresh, store, &oci_ref, &config, reference)
            .await?;
        let wasm_digest = self
            .fetch_blob(client, fresh, store, &oci_ref, &wasm_layer, reference)
            .await?;
        let header = store.read_blob_prefix(&wasm_digest, 8)?;
        let wasm_kind = WasmKind::detect(&header).ok_or_else(|| {
            failure(
                reference,
                RegistryFailure::NotWasm,
                format!(
                    "layer {wasm_digest} ({}) is not a WebAssembly binary",
                    wasm_layer.descriptor.media_type
                ),
            )
        })?;
        blobs.push(fresh.write(store, &manifest_bytes)?);
        blobs.push(config_digest.clone());
        blobs.push(wasm_digest.clone());
        let size = (manifest_bytes.len() as u64)
            .saturating_add(config.descriptor.size)
            .saturating_add(wasm_layer.descriptor.size);
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
        (manifest_bytes, manifest_digest): (&[u8], Digest),
        (config_blob, layer_blobs): (Blob<'_>, Vec<(Blob<'_>, Compression)>),
        mut blobs: Vec<Digest>,
    ) -> Result<ImageRecord> {
        let size = layer_blobs.iter().fold(
            (manifest_bytes.len() as u64).saturating_add(config_blob.descriptor.size),
            |sum, (l, _)| sum.saturating_add(l.descriptor.size),
        );
        let config_digest = self
            .fetch_blob(client, fresh, store, oci_ref, &config_blob, reference)
            .await?;
        let config = parse_image_config(reference, &store.read_blob(&config_digest)?)?;
        let mut layers = Vec::new();
        for (layer, compression) in &layer_blobs {
            let digest = self
                .fetch_blob(client, fresh, store, oci_ref, layer, reference)
                .await?;
            layers.push((store.blob_path(&digest), *compression));
            blobs.push(digest);
        }
        let rootfs = store.rootfs_path(&config_digest);
        if !rootfs.exists() {
            let limits = self.config.unpack;
            let dest = rootfs.clone();
            tokio::task::spawn_blocking(move || {
                crate::images::rootfs::unpack(&layers, &dest, limits)
            })
            .await
            .map_err(|e| Error::Internal(format!("unpack task: {e}")))?
            .map_err(|why| refused(reference, why, RegistryFailure::Invalid))?;
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
        let path = crate::images::rootfs::resolve_program(&rootfs, program, config.path_env())
            .map_err(|why| refused(reference, why, RegistryFailure::NotWasm))?;
        let bytes = std::fs::read(&path).map_err(Error::io("reading the entrypoint", &path))?;
        let wasm_kind = WasmKind::detect(&bytes).ok_or_else(|| {
            failure(
                reference,
                RegistryFailure::NotWasm,
                format!("the image's entrypoint {program:?} is not a WebAssembly file"),
            )
        })?;
        blobs.push(fresh.write(store, manifest_bytes)?);
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
}

/// What a compat image's root filesystem failing means for its pull: the
/// image refused (`kind`, or `TooLarge` past the unpack limits), or the
/// node failing to unpack it.
fn refused(reference: &str, why: RootfsError, kind: RegistryFailure) -> Error {
    if !why.is_refusal() {
        return Error::Unpack {
            reference: reference.to_owned(),
            source: Box::new(why),
        };
    }
    let kind = if why.is_too_large() {
        RegistryFailure::TooLarge
    } else {
        kind
    };
    let reason = match kind {
        RegistryFailure::NotWasm => format!("the image's entrypoint: {why}"),
        _ => why.to_string(),
    };
    failure(reference, kind, reason)
}

/// Fails the write once more than `left` bytes arrive.
pub(super) struct LimitedWriter<W> {
    pub(super) inner: W,
    pub(super) left: u64,
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for LimitedWriter<W> {
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
