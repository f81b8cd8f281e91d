//! Images: pull (deduplicated, compiled in the background), import,
//! status, list, removal, and what an image runs (inspect, precompile).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::guest_config::{program, read_program};
use super::{Agent, lock};
use crate::error::{Error, Result};
use crate::images::registry::Credentials;
use crate::model::container::ContainerSpec;
use crate::model::ids::Digest;
use crate::model::image::{FsUsage, ImageRecord, WasmKind};

/// What a stored image runs, as the admin API shows it.
#[derive(Clone, Debug)]
pub struct ImageInspection {
    pub image: ImageRecord,
    /// The program the image runs by default, and its size.
    pub wasm_digest: crate::model::ids::Digest,
    pub wasm_size: u64,
    pub description: crate::images::inspect::WasmDescription,
    /// The engine holds it compiled (memory or disk cache).
    pub compiled: bool,
}

/// What [`Agent::precompile_image`] did.
#[derive(Clone, Debug)]
pub struct Precompiled {
    pub wasm_digest: crate::model::ids::Digest,
    pub already_compiled: bool,
    pub took: Duration,
}

pub(super) type PullResult = std::result::Result<ImageRecord, Arc<Error>>;

impl Agent {
    /// The program `image` runs by default (its Wasm layer, or a compat
    /// image's entrypoint file): digest, kind and bytes.
    async fn default_program(
        &self,
        image: &ImageRecord,
    ) -> Result<(crate::model::ids::Digest, WasmKind, Vec<u8>)> {
        let inner = self.inner.clone();
        let image = image.clone();
        tokio::task::spawn_blocking(move || {
            program(
                &inner.images,
                &inner.programs,
                &image,
                &ContainerSpec::default(),
            )
            .and_then(|program| read_program(&inner.images, &image, &program))
            .map_err(|reason| Error::InvalidImage {
                reference: image.id.to_string(),
                reason: reason.to_string(),
            })
        })
        .await
        .map_err(|e| Error::Internal(format!("reading an image's program: {e}")))?
    }

    fn stored_image(&self, reference: &str) -> Result<ImageRecord> {
        self.inner
            .images
            .resolve(reference)
            .ok_or_else(|| Error::NotFound {
                kind: "image",
                id: reference.to_owned(),
            })
    }

    /// What stored image `reference` runs: its program's kind, imports and
    /// exports (see `images::inspect`) and whether it is compiled.
    pub async fn inspect_image(&self, reference: &str) -> Result<ImageInspection> {
        let image = self.stored_image(reference)?;
        let (wasm_digest, _, bytes) = self.default_program(&image).await?;
        let description =
            crate::images::inspect::describe(&bytes).map_err(|reason| Error::InvalidImage {
                reference: reference.to_owned(),
                reason: reason.to_string(),
            })?;
        let compiled = self
            .inner
            .engine
            .is_compiled(&wasm_digest, description.kind, &bytes);
        Ok(ImageInspection {
            image,
            wasm_size: bytes.len() as u64,
            wasm_digest,
            description,
            compiled,
        })
    }

    /// Compiles stored image `reference`'s program now, into memory and
    /// the disk cache, so that the first container of it starts without
    /// compiling.
    pub async fn precompile_image(&self, reference: &str) -> Result<Precompiled> {
        let image = self.stored_image(reference)?;
        let (wasm_digest, kind, bytes) = self.default_program(&image).await?;
        let engine = self.inner.engine.clone();
        if engine.is_compiled(&wasm_digest, kind, &bytes) {
            return Ok(Precompiled {
                wasm_digest,
                already_compiled: true,
                took: Duration::ZERO,
            });
        }
        let started = std::time::Instant::now();
        let digest = wasm_digest.clone();
        tokio::task::spawn_blocking(move || engine.prepare(&digest, kind, &bytes).map(drop))
            .await
            .map_err(|e| Error::Internal(format!("compiling: {e}")))?
            .map_err(|reason| Error::InvalidImage {
                reference: reference.to_owned(),
                reason: reason.to_string(),
            })?;
        Ok(Precompiled {
            wasm_digest,
            already_compiled: false,
            took: started.elapsed(),
        })
    }

    /// Packages the Wasm file at `path` as an OCI Wasm artifact named
    /// `reference` in the image store.
    pub fn import_image(&self, path: &Path, reference: &str) -> Result<ImageRecord> {
        let bytes = std::fs::read(path).map_err(Error::io("reading", path))?;
        let record = self.inner.images.import_wasm(&bytes, reference)?;
        tracing::info!(image = %record.id, reference, "image imported");
        Ok(record)
    }

    /// Imports `bytes` (a Wasm module or component) as `reference` into
    /// the running agent and compiles it, as a pull does before it
    /// answers. The work runs on a task of its own: a caller that goes
    /// away leaves it whole or not at all.
    pub async fn import_image_bytes(
        &self,
        bytes: Vec<u8>,
        reference: &str,
    ) -> Result<(ImageRecord, Precompiled)> {
        let agent = self.clone();
        let reference = reference.to_owned();
        super::ops::detached(async move {
            let record = agent.inner.images.import_wasm(&bytes, &reference)?;
            tracing::info!(image = %record.id, reference, "image imported into the running agent");
            let compiled = agent.precompile_image(record.id.as_str()).await?;
            Ok((record, compiled))
        })
        .await
    }

    /// Pulls `reference` from its registry into the store. An image that
    /// was imported (not pulled) has no registry and is served as stored.
    /// Concurrent pulls of one reference share one download.
    pub async fn pull_image(
        &self,
        reference: &str,
        credentials: &Credentials,
    ) -> Result<ImageRecord> {
        crate::model::image::ImageName::parse(reference)?;
        if let Some(local) = self.inner.images.resolve(reference)
            && local.imported
        {
            return Ok(local);
        }
        let key = format!(
            "{reference}\0{}\0{}{}{}",
            credentials.username,
            credentials.auth,
            credentials.identity_token,
            credentials.registry_token
        );
        let shared = {
            let mut pulls = lock(&self.inner.pulls);
            pulls
                .entry(key.clone())
                .or_insert_with(|| {
                    let agent = self.clone();
                    let reference = reference.to_owned();
                    let credentials = credentials.clone();
                    let fut: futures::future::BoxFuture<'static, PullResult> =
                        Box::pin(async move {
                            let started = std::time::Instant::now();
                            let result = agent
                                .inner
                                .registry
                                .pull(&agent.inner.images, &reference, &credentials)
                                .await
                                .map_err(Arc::new);
                            let result = result.and_then(|image| {
                                crate::failpoint::hit("pull.after_record").map_err(Arc::new)?;
                                Ok(image)
                            });
                            if let Ok(image) = &result {
                                // The kubelet gives PullImage no deadline
                                // but CreateContainer two minutes: a big
                                // module compiles here, not there.
                                agent.precompile_pulled(image.clone()).await;
                            }
                            crate::metrics::global().pulled(
                                started.elapsed(),
                                result.as_ref().map(drop).map_err(|e| &**e),
                            );
                            lock(&agent.inner.pulls).remove(&key);
                            result
                        });
                    futures::FutureExt::shared(fut)
                })
                .clone()
        };
        // Run the download on its own task so a kubelet that gives up on
        // the call does not cancel it for the others waiting.
        let handle = tokio::spawn(shared);
        match handle.await {
            Ok(Ok(image)) => Ok(image),
            Ok(Err(e)) => Err(e.duplicate()),
            Err(e) => Err(Error::Internal(format!("pull task failed: {e}"))),
        }
    }

    /// Compiles a freshly pulled image before its pull answers (at most
    /// `compile_parallelism` at once), so that its first container starts
    /// from the compiled artifact. A program that does not compile does not
    /// fail the pull: its containers report why when they start.
    async fn precompile_pulled(&self, image: ImageRecord) {
        let _permit = self.inner.compile_slots.acquire().await;
        let (digest, kind, bytes) = match self.default_program(&image).await {
            Ok(program) => program,
            Err(error) => {
                tracing::warn!(image = %image.id, %error, "reading the pulled image's program to precompile it");
                return;
            }
        };
        let engine = self.inner.engine.clone();
        let compiling = digest.clone();
        let done =
            tokio::task::spawn_blocking(move || engine.precompile(&compiling, kind, &bytes)).await;
        match done {
            Ok(Ok(())) => tracing::debug!(%digest, "precompiled"),
            Ok(Err(reason)) => {
                tracing::warn!(%digest, %reason, "precompiling the pulled image failed; containers will report why when they start")
            }
            Err(e) => tracing::warn!(%digest, error = %e, "precompile task failed"),
        }
    }

    /// Whether `reference` names a Wasm image, from its registry's
    /// manifest; nothing is downloaded into the store.
    pub async fn probe_image(
        &self,
        reference: &str,
        credentials: &Credentials,
    ) -> Result<crate::images::registry::ImageKind> {
        self.inner.registry.probe(reference, credentials).await
    }

    pub fn image_status(&self, reference: &str) -> Option<ImageRecord> {
        self.inner.images.resolve(reference)
    }

    /// The stored manifest of an image, for verbose status.
    pub fn image_manifest(&self, image: &ImageRecord) -> Result<Vec<u8>> {
        self.inner.images.read_blob(&image.manifest_digest)
    }

    pub fn list_images(&self) -> Vec<ImageRecord> {
        self.inner.images.list()
    }

    /// Removes an image; removing one that does not exist succeeds.
    ///
    /// Its compiled programs are forgotten only when no other stored image
    /// runs them (images share layers: the same module as a Wasm artifact
    /// and inside a compat image, or under two media types).
    pub fn remove_image(&self, reference: &str) -> Result<()> {
        if let Some(image) = self.inner.images.resolve(reference) {
            self.inner.images.remove(image.id.as_str())?;
            let mut programs = lock(&self.inner.programs);
            let mut removed = vec![image.wasm_digest.clone()];
            removed.extend(
                programs
                    .iter()
                    .filter(|((id, _), _)| *id == image.id)
                    .filter_map(|(_, p)| p.digest.clone()),
            );
            programs.retain(|(id, _), _| *id != image.id);
            let still_used: HashSet<Digest> = self
                .inner
                .images
                .list()
                .into_iter()
                .map(|i| i.wasm_digest)
                .chain(programs.values().filter_map(|p| p.digest.clone()))
                .collect();
            drop(programs);
            for digest in removed.iter().filter(|d| !still_used.contains(*d)) {
                self.inner.engine.forget(digest);
            }
            tracing::info!(image = %image.id, reference, "image removed");
        }
        Ok(())
    }

    /// Forgets the compiled programs no stored image runs, in memory and
    /// on disk: those of images removed while no agent ran, or while one
    /// died mid-removal. Every image's default program counts, and every
    /// `.wasm` file of a compat image (any may be run by a container's
    /// command). Run once after the agent opens; the hashing is off the
    /// async workers.
    pub async fn collect_compiled(&self) -> Result<usize> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut in_use = HashSet::new();
            for image in inner.images.list() {
                if image.compat.is_some() {
                    for file in wasm_files(&inner.images.rootfs_path(&image.id)) {
                        if let Ok(bytes) = std::fs::read(&file) {
                            in_use.insert(Digest::of(&bytes));
                        }
                    }
                }
                in_use.insert(image.wasm_digest);
            }
            let forgotten = inner.engine.collect(&in_use);
            if forgotten > 0 {
                tracing::info!(forgotten, "compiled programs no image runs were removed");
            }
            forgotten
        })
        .await
        .map_err(|e| Error::Internal(format!("collecting compiled programs: {e}")))
    }

    pub fn image_fs_usage(&self) -> Result<FsUsage> {
        self.inner.images.usage()
    }
}

/// The `.wasm` files under `dir` (symbolic links not followed).
fn wasm_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            match entry.file_type() {
                Ok(t) if t.is_dir() => pending.push(entry.path()),
                Ok(t) if t.is_file() && entry.path().extension().is_some_and(|e| e == "wasm") => {
                    out.push(entry.path())
                }
                _ => {}
            }
        }
    }
    out
}
