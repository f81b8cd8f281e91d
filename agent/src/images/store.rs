//! The content-addressed image store: an OCI image layout under the state
//! root (`blobs/sha256/<hex>`), with image metadata in the state database.
//!
//! Blobs are verified and written atomically (temporary file, fsync,
//! rename) before any record refers to them; records are removed before the
//! blobs they alone referenced are collected. A crash at any point therefore
//! leaves at worst an unreferenced blob, collected at the next start.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};
use crate::model::ids::Digest;
use crate::model::image::{FsUsage, ImageConfig, ImageName, ImageRecord, WasmKind};
use crate::model::time::Timestamp;
use crate::state::{Change, StateStore};

/// Media types of the CNCF Wasm OCI artifact.
pub const WASM_CONFIG_MEDIA_TYPE: &str = "application/vnd.wasm.config.v0+json";
pub const WASM_LAYER_MEDIA_TYPE: &str = "application/wasm";
pub const OCI_MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// An image about to be recorded: every blob already stored.
pub struct NewImage<'a> {
    pub name: &'a ImageName,
    /// The digest the name resolved to (an index or a manifest).
    pub repo_digest: &'a Digest,
    pub manifest_digest: Digest,
    pub id: Digest,
    pub wasm_digest: Digest,
    pub wasm_kind: WasmKind,
    pub size: u64,
    pub blobs: Vec<Digest>,
    pub imported: bool,
    pub compat: Option<ImageConfig>,
}

/// The config and manifest of a CNCF Wasm OCI artifact around one binary.
pub struct WasmArtifact {
    pub kind: WasmKind,
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
}

impl WasmArtifact {
    /// Builds the artifact for `bytes`; fails if they are not Wasm.
    pub fn new(bytes: &[u8], reference: &str) -> Result<Self> {
        let kind = WasmKind::detect(bytes).ok_or_else(|| Error::InvalidImage {
            reference: reference.to_owned(),
            reason:
                "not a WebAssembly binary (no \\0asm preamble with a module or component version)"
                    .to_owned(),
        })?;
        let wasm_digest = Digest::of(bytes);
        let config = serde_json::json!({
            "architecture": "wasm",
            "os": kind.os(),
            "layerDigests": [wasm_digest.as_str()],
        });
        let config = serde_json::to_vec(&config).map_err(|e| Error::Internal(e.to_string()))?;
        let config_digest = Digest::of(&config);
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST_MEDIA_TYPE,
            "artifactType": WASM_CONFIG_MEDIA_TYPE,
            "config": Descriptor { media_type: WASM_CONFIG_MEDIA_TYPE, digest: config_digest.as_str(), size: config.len() as u64 },
            "layers": [Descriptor { media_type: WASM_LAYER_MEDIA_TYPE, digest: wasm_digest.as_str(), size: bytes.len() as u64 }],
        });
        let manifest = serde_json::to_vec(&manifest).map_err(|e| Error::Internal(e.to_string()))?;
        Ok(Self {
            kind,
            config,
            manifest,
        })
    }
}

#[derive(Serialize)]
struct Descriptor<'a> {
    #[serde(rename = "mediaType")]
    media_type: &'a str,
    digest: &'a str,
    size: u64,
}

/// The image store. Cheap to share behind an `Arc`.
pub struct ImageStore {
    dir: PathBuf,
    state: Arc<StateStore>,
    images: RwLock<BTreeMap<Digest, ImageRecord>>,
}

impl ImageStore {
    /// Opens the store under `dir` with the records loaded from the state
    /// database, clears half-written ingests and collects unreferenced blobs.
    pub fn open(dir: &Path, state: Arc<StateStore>, records: Vec<ImageRecord>) -> Result<Self> {
        let store = Self {
            dir: dir.to_owned(),
            state,
            images: RwLock::new(records.into_iter().map(|r| (r.id.clone(), r)).collect()),
        };
        fs::create_dir_all(store.blobs_dir()).map_err(Error::io("creating", store.blobs_dir()))?;
        let layout = dir.join("oci-layout");
        if !layout.exists() {
            atomic_write(
                &layout,
                br#"{"imageLayoutVersion":"1.0.0"}"#,
                &store.ingest_dir(),
            )?;
        }
        let ingest = store.ingest_dir();
        if ingest.exists() {
            fs::remove_dir_all(&ingest).map_err(Error::io("clearing", &ingest))?;
        }
        fs::create_dir_all(&ingest).map_err(Error::io("creating", &ingest))?;
        store.collect_garbage()?;
        Ok(store)
    }

    fn blobs_dir(&self) -> PathBuf {
        self.dir.join("blobs").join("sha256")
    }

    fn ingest_dir(&self) -> PathBuf {
        self.dir.join("ingest")
    }

    /// Where the blob with `digest` lives.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs_dir().join(digest.hex())
    }

    /// Writes `bytes` as a blob (verified, atomically) and returns its digest.
    pub fn write_blob(&self, bytes: &[u8]) -> Result<Digest> {
        let digest = Digest::of(bytes);
        let path = self.blob_path(&digest);
        if !path.exists() {
            atomic_write(&path, bytes, &self.ingest_dir())?;
        }
        Ok(digest)
    }

    /// Reads a blob and checks it still has its digest.
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>> {
        let path = self.blob_path(digest);
        let bytes = fs::read(&path).map_err(Error::io("reading blob", &path))?;
        if Digest::of(&bytes) != *digest {
            return Err(Error::InvalidImage {
                reference: digest.to_string(),
                reason: format!(
                    "blob {path:?} is corrupt: its content no longer matches its digest"
                ),
            });
        }
        Ok(bytes)
    }

    /// The first `n` bytes of a blob (for format detection).
    pub fn read_blob_prefix(&self, digest: &Digest, n: usize) -> Result<Vec<u8>> {
        use std::io::Read;
        let path = self.blob_path(digest);
        let mut buf = Vec::with_capacity(n);
        fs::File::open(&path)
            .and_then(|f| f.take(n as u64).read_to_end(&mut buf))
            .map_err(Error::io("reading blob", &path))?;
        Ok(buf)
    }

    /// Packages a Wasm binary as a CNCF Wasm OCI artifact named `reference`.
    /// A tag held by another image moves to the new one.
    pub fn import_wasm(&self, bytes: &[u8], reference: &str) -> Result<ImageRecord> {
        let name = ImageName::parse(reference)?;
        if name.tagged().is_none() {
            return Err(Error::InvalidArgument(format!(
                "image reference {reference:?}: importing needs a tag, not a digest"
            )));
        }
        let artifact = WasmArtifact::new(bytes, reference)?;
        let wasm_digest = self.write_blob(bytes)?;
        let config_digest = self.write_blob(&artifact.config)?;
        let manifest_digest = self.write_blob(&artifact.manifest)?;
        self.add_image(NewImage {
            name: &name,
            repo_digest: &manifest_digest,
            manifest_digest: manifest_digest.clone(),
            id: config_digest.clone(),
            wasm_digest: wasm_digest.clone(),
            wasm_kind: artifact.kind,
            size: (bytes.len() + artifact.config.len() + artifact.manifest.len()) as u64,
            blobs: vec![manifest_digest.clone(), config_digest, wasm_digest],
            imported: true,
            compat: None,
        })
    }

    /// Records an image whose blobs are all stored, tagging it with `name`
    /// (the tag moves from whichever image held it) and remembering the
    /// digest it was reached by.
    pub fn add_image(&self, new: NewImage<'_>) -> Result<ImageRecord> {
        crate::failpoint::hit("pull.before_record")?;
        for blob in &new.blobs {
            if !self.blob_path(blob).exists() {
                return Err(Error::Internal(format!("image blob {blob} is not stored")));
            }
        }
        let mut images = self.images.write().map_err(poisoned)?;
        let mut record = images.get(&new.id).cloned().unwrap_or_else(|| ImageRecord {
            id: new.id.clone(),
            manifest_digest: new.manifest_digest.clone(),
            repo_tags: Vec::new(),
            repo_digests: Vec::new(),
            size: new.size,
            wasm_digest: new.wasm_digest.clone(),
            wasm_kind: new.wasm_kind,
            blobs: Vec::new(),
            created_at: Timestamp::now(),
            imported: new.imported,
            compat: new.compat.clone(),
        });
        record.imported = new.imported;
        for blob in new.blobs {
            if !record.blobs.contains(&blob) {
                record.blobs.push(blob);
            }
        }
        let tagged = new.name.tagged();
        if let Some(tagged) = &tagged
            && !record.repo_tags.contains(tagged)
        {
            record.repo_tags.push(tagged.clone());
        }
        let digested = format!("{}@{}", new.name.repository, new.repo_digest);
        if !record.repo_digests.contains(&digested) {
            record.repo_digests.push(digested);
        }
        // The tag moves: take it from whichever other image held it.
        let mut others: Vec<ImageRecord> = images
            .values()
            .filter(|r| {
                r.id != record.id && tagged.as_ref().is_some_and(|t| r.repo_tags.contains(t))
            })
            .cloned()
            .collect();
        for other in &mut others {
            other.repo_tags.retain(|t| Some(t) != tagged.as_ref());
        }
        let mut changes = vec![Change::PutImage(&record)];
        changes.extend(others.iter().map(Change::PutImage));
        self.state.apply(&changes)?;
        for other in others {
            images.insert(other.id.clone(), other);
        }
        images.insert(record.id.clone(), record.clone());
        Ok(record)
    }

    /// Where the root filesystem of compat image `id` is unpacked.
    pub fn rootfs_path(&self, id: &Digest) -> PathBuf {
        self.dir.join("rootfs").join(id.hex())
    }

    /// A fresh path in the ingest directory for a download in progress.
    pub fn ingest_path(&self) -> PathBuf {
        self.ingest_dir().join(format!(
            "{}.partial",
            hex::encode(rand::random::<[u8; 8]>())
        ))
    }

    /// Whether the blob is stored.
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).exists()
    }

    /// Moves a downloaded file into the store after checking its size and
    /// digest. The file is removed whatever happens.
    pub fn commit_blob(&self, tmp: &Path, expected: &Digest, expected_size: u64) -> Result<()> {
        let check = || -> Result<()> {
            let meta = fs::metadata(tmp).map_err(Error::io("reading download", tmp))?;
            if meta.len() != expected_size {
                return Err(Error::InvalidImage {
                    reference: expected.to_string(),
                    reason: format!(
                        "blob is {} bytes, its descriptor says {expected_size}",
                        meta.len()
                    ),
                });
            }
            let mut hasher = Sha256::new();
            let mut file = fs::File::open(tmp).map_err(Error::io("reading download", tmp))?;
            std::io::copy(&mut file, &mut hasher).map_err(Error::io("reading download", tmp))?;
            let actual = Digest::from_hasher(hasher);
            if actual != *expected {
                return Err(Error::InvalidImage {
                    reference: expected.to_string(),
                    reason: format!(
                        "blob content has digest {actual}, not the expected {expected}"
                    ),
                });
            }
            file.sync_all()
                .map_err(Error::io("syncing download", tmp))?;
            let path = self.blob_path(expected);
            fs::rename(tmp, &path).map_err(Error::io("storing blob", &path))
        };
        let result = check();
        if result.is_err() {
            let _ = fs::remove_file(tmp);
        }
        result
    }

    /// Finds an image by tag (normalised), by `name@digest`, by manifest
    /// digest, or by id (with or without `sha256:`).
    pub fn resolve(&self, reference: &str) -> Option<ImageRecord> {
        let images = self.images.read().ok()?;
        let by_id = Digest::parse(reference)
            .ok()
            .or_else(|| Digest::parse(&format!("sha256:{reference}")).ok());
        if let Some(id) = by_id {
            if let Some(r) = images.get(&id) {
                return Some(r.clone());
            }
            if let Some(r) = images.values().find(|r| r.manifest_digest == id) {
                return Some(r.clone());
            }
        }
        let name = ImageName::parse(reference).ok()?;
        let found = match (&name.digest, name.tagged()) {
            (Some(d), _) => {
                let digested = format!("{}@{d}", name.repository);
                images.values().find(|r| r.repo_digests.contains(&digested))
            }
            (None, Some(tagged)) => images.values().find(|r| r.repo_tags.contains(&tagged)),
            (None, None) => None,
        };
        found.cloned()
    }

    /// Every image, oldest first.
    pub fn list(&self) -> Vec<ImageRecord> {
        let mut all: Vec<ImageRecord> = self
            .images
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        all.sort_by_key(|r| r.created_at);
        all
    }

    /// Removes the image `reference` names, with all its tags, and collects
    /// the blobs no other image references. Returns whether one was found.
    pub fn remove(&self, reference: &str) -> Result<bool> {
        let Some(record) = self.resolve(reference) else {
            return Ok(false);
        };
        {
            let mut images = self.images.write().map_err(poisoned)?;
            self.state
                .apply(&[Change::DeleteImage(record.id.as_str())])?;
            images.remove(&record.id);
        }
        self.collect_garbage()?;
        Ok(true)
    }

    /// Deletes every blob no image references, and unpacked roots (or
    /// half-unpacked ones) of images that are gone.
    fn collect_garbage(&self) -> Result<()> {
        let images = self.images.read().map_err(poisoned)?;
        let roots = self.dir.join("rootfs");
        if roots.exists() {
            for entry in fs::read_dir(&roots).map_err(Error::io("listing", &roots))? {
                let entry = entry.map_err(Error::io("listing", &roots))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let live = images
                    .values()
                    .any(|r| r.compat.is_some() && r.id.hex() == name);
                if !live {
                    let path = entry.path();
                    tracing::debug!(?path, "collecting an unreferenced image root");
                    fs::remove_dir_all(&path).map_err(Error::io("removing image root", &path))?;
                }
            }
        }
        let live: BTreeSet<&str> = images
            .values()
            .flat_map(|r| r.blobs.iter().map(Digest::hex))
            .collect();
        let dir = self.blobs_dir();
        for entry in fs::read_dir(&dir).map_err(Error::io("listing", &dir))? {
            let entry = entry.map_err(Error::io("listing", &dir))?;
            let name = entry.file_name();
            if !live.contains(name.to_string_lossy().as_ref()) {
                let path = entry.path();
                tracing::debug!(?path, "collecting unreferenced blob");
                fs::remove_file(&path).map_err(Error::io("removing blob", &path))?;
            }
        }
        Ok(())
    }

    /// Deletes those of `digests` that no image references (what a failed
    /// pull downloaded).
    pub fn discard_unreferenced(&self, digests: &[Digest]) {
        let Ok(images) = self.images.read() else {
            return;
        };
        for digest in digests {
            if !images.values().any(|r| r.blobs.contains(digest)) {
                let path = self.blob_path(digest);
                if let Err(error) = fs::remove_file(&path)
                    && error.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(?path, %error, "could not remove a blob of a failed pull");
                }
            }
        }
    }

    /// Bytes and inodes used under the store.
    pub fn usage(&self) -> Result<FsUsage> {
        let (mut bytes, mut inodes) = (0u64, 0u64);
        let mut stack = vec![self.dir.clone()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).map_err(Error::io("listing", &dir))? {
                let entry = entry.map_err(Error::io("listing", &dir))?;
                let meta = entry
                    .metadata()
                    .map_err(Error::io("reading", entry.path()))?;
                inodes += 1;
                if meta.is_dir() {
                    stack.push(entry.path());
                } else {
                    bytes += meta.len();
                }
            }
        }
        Ok(FsUsage {
            mountpoint: self.dir.clone(),
            used_bytes: bytes,
            inodes_used: inodes + 1,
            timestamp: Timestamp::now(),
        })
    }
}

fn poisoned<T>(_: T) -> Error {
    Error::Internal("image store lock poisoned".to_owned())
}

/// Writes `bytes` to `path` so that `path` either does not exist or holds
/// all of them: a temporary file in `tmp_dir`, fsync, rename.
pub(crate) fn atomic_write(path: &Path, bytes: &[u8], tmp_dir: &Path) -> Result<()> {
    fs::create_dir_all(tmp_dir).map_err(Error::io("creating", tmp_dir))?;
    let tmp = tmp_dir.join(format!("{}.tmp", hex::encode(rand::random::<[u8; 8]>())));
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::Io {
            what: "writing",
            path: path.to_owned(),
            source: e,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path) -> ImageStore {
        let state = Arc::new(StateStore::open(&dir.join("state.redb")).unwrap());
        let records = state.load().unwrap().images;
        ImageStore::open(&dir.join("images"), state, records).unwrap()
    }

    #[test]
    fn import_resolve_retag_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let images = store(dir.path());
        let module = b"\0asm\x01\0\0\0";
        let a = images.import_wasm(module, "example.com/a:v1").unwrap();
        assert_eq!(a.repo_tags, vec!["example.com/a:v1"]);
        assert!(images.resolve("example.com/a:v1").is_some());
        assert!(images.resolve(a.id.as_str()).is_some());
        assert!(images.resolve(a.id.hex()).is_some());
        assert!(images.resolve(&a.repo_digests[0]).is_some());
        assert!(images.resolve("example.com/a:v2").is_none());

        // Same content under a second tag stores nothing twice.
        let blobs_before = fs::read_dir(images.blobs_dir()).unwrap().count();
        let again = images.import_wasm(module, "example.com/a:v2").unwrap();
        assert_eq!(again.id, a.id);
        assert_eq!(
            fs::read_dir(images.blobs_dir()).unwrap().count(),
            blobs_before
        );
        assert_eq!(images.list().len(), 1);

        // The tag moves to new content.
        let other = images
            .import_wasm(b"\0asm\x0d\0\x01\0", "example.com/a:v1")
            .unwrap();
        assert_eq!(other.wasm_kind, WasmKind::Component);
        assert_eq!(images.resolve("example.com/a:v1").unwrap().id, other.id);
        assert_eq!(
            images.resolve("example.com/a:v2").unwrap().repo_tags,
            vec!["example.com/a:v2"]
        );

        // Records survive a reopen; removal collects blobs.
        drop(images);
        let images = store(dir.path());
        assert_eq!(images.list().len(), 2);
        assert!(images.remove("example.com/a:v2").unwrap());
        assert!(!images.remove("example.com/a:v2").unwrap());
        assert!(images.read_blob(&a.wasm_digest).is_err());
        assert!(images.read_blob(&other.wasm_digest).is_ok());
        assert!(images.usage().unwrap().used_bytes > 0);
    }

    #[test]
    fn rejects_non_wasm_and_keeps_store_intact() {
        let dir = tempfile::tempdir().unwrap();
        let images = store(dir.path());
        images.import_wasm(b"\0asm\x01\0\0\0", "x.io/ok:1").unwrap();
        let err = images.import_wasm(b"#!/bin/sh", "x.io/bad:1").unwrap_err();
        assert!(
            err.to_string().contains("not a WebAssembly binary"),
            "{err}"
        );
        assert_eq!(images.list().len(), 1);
    }

    #[test]
    fn corrupt_blob_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let images = store(dir.path());
        let r = images.import_wasm(b"\0asm\x01\0\0\0", "x.io/ok:1").unwrap();
        fs::write(images.blob_path(&r.wasm_digest), b"tampered").unwrap();
        assert!(images.read_blob(&r.wasm_digest).is_err());
    }
}
