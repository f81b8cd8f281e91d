//! The on-disk store of precompiled Wasm: what Cranelift made of an image,
//! kept so that a container start memory-maps it instead of compiling.
//!
//! Layout, under the cache directory the engine is given (the agent uses
//! `<state root>/compiled`):
//!
//! ```text
//! <cache dir>/<fingerprint>/<wasm digest hex>.cwasm  wasmtime's artifact (an ELF image)
//! <cache dir>/<fingerprint>/<wasm digest hex>.json   {"kind", "len", "sha256"} of that artifact
//! ```
//!
//! The fingerprint is the sha256 of the engine's
//! [`precompile_compatibility_hash`](Engine::precompile_compatibility_hash)
//! (wasmtime version, target, Cranelift flags, tunables, Wasm features) and
//! of this layout's version, so a wasmtime upgrade or a changed engine
//! setting lands in a fresh directory and recompiles; the directories of
//! other fingerprints are deleted when the store opens.
//!
//! Every file is written to a temporary file in the same directory, synced
//! and renamed into place; the metadata goes first, so an artifact never
//! appears without the digest that vouches for it. wasmtime checks an
//! artifact's header, not every byte: before loading, the store checks the
//! artifact's length and sha256 against its metadata. An artifact that fails
//! that check, has no readable metadata, or that wasmtime refuses, is logged,
//! deleted and reported missing, and the caller rebuilds it.
//!
//! No file is ever modified in place (replacement is a rename, removal an
//! unlink), so an artifact that is mapped stays intact while in use.
//!
//! One engine owns a cache directory at a time; the store does not lock
//! against another process writing the same directory.

use std::fs::{self, File, OpenOptions};
use std::hash::{Hash, Hasher};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use wasmtime::component::Component;
use wasmtime::{Engine, Module};

use crate::error::{Error, Result};
use crate::model::ids::Digest;
use crate::model::image::WasmKind;

/// Mixed into the fingerprint: bump it when the layout or metadata changes.
const LAYOUT_VERSION: &str = "wasmlet-artifacts-v1";
const ARTIFACT_EXT: &str = "cwasm";
const META_EXT: &str = "json";
const TMP_EXT: &str = "tmp";

/// A compiled module or component, not yet linked.
pub(crate) enum Compiled {
    Module(Module),
    Component(Component),
}

impl Compiled {
    /// The artifact bytes [`ArtifactStore::store`] takes.
    pub(crate) fn serialize(&self) -> wasmtime::Result<Vec<u8>> {
        match self {
            Compiled::Module(m) => m.serialize(),
            Compiled::Component(c) => c.serialize(),
        }
    }
}

/// The sidecar of an artifact: what it holds and the digest it must have.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Meta {
    kind: WasmKind,
    len: u64,
    sha256: String,
}

/// Why an artifact on disk cannot be used.
enum Unusable {
    Missing,
    Damaged(String),
}

/// The artifacts of one engine fingerprint.
pub(crate) struct ArtifactStore {
    dir: PathBuf,
}

/// The engine's compatibility fingerprint as 64 lowercase hex characters.
pub(crate) fn fingerprint(engine: &Engine) -> String {
    let mut hasher = Sha256Hasher(Sha256::new());
    LAYOUT_VERSION.hash(&mut hasher);
    engine.precompile_compatibility_hash().hash(&mut hasher);
    hex::encode(hasher.0.finalize())
}

/// Feeds a [`Hash`] implementation into sha256, which (unlike `DefaultHasher`)
/// is stable across processes and Rust versions.
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        let sum = self.0.clone().finalize();
        let mut first = [0; 8];
        first.copy_from_slice(&sum[..8]);
        u64::from_le_bytes(first)
    }
}

fn is_fingerprint(name: &str) -> bool {
    name.len() == 64
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl ArtifactStore {
    /// Opens (creating it, mode 0700) the directory of `engine`'s
    /// fingerprint under `cache_dir`, deletes the directories of other
    /// fingerprints and what interrupted writes left: temporary files, and
    /// metadata without its artifact (or an artifact without its metadata).
    pub(crate) fn open(cache_dir: &Path, engine: &Engine) -> Result<Self> {
        let fingerprint = fingerprint(engine);
        let dir = cache_dir.join(&fingerprint);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(Error::io("creating the artifact cache", &dir))?;
        let entries =
            fs::read_dir(cache_dir).map_err(Error::io("listing the artifact cache", cache_dir))?;
        for entry in entries {
            let entry = entry.map_err(Error::io("listing the artifact cache", cache_dir))?;
            let name = entry.file_name();
            let stale = name
                .to_str()
                .is_some_and(|n| n != fingerprint && is_fingerprint(n))
                && entry.file_type().is_ok_and(|t| t.is_dir());
            if stale {
                let path = entry.path();
                match fs::remove_dir_all(&path) {
                    Ok(()) => tracing::info!(
                        path = ?path,
                        "removed the precompiled artifacts of another engine fingerprint"
                    ),
                    Err(e) => tracing::warn!(
                        path = ?path,
                        error = %e,
                        "cannot remove the precompiled artifacts of another engine fingerprint"
                    ),
                }
            }
        }
        let entries = fs::read_dir(&dir).map_err(Error::io("listing the artifact cache", &dir))?;
        for entry in entries {
            let path = entry
                .map_err(Error::io("listing the artifact cache", &dir))?
                .path();
            // A temporary file, or half of a pair whose write was
            // interrupted between the metadata and the artifact.
            let partner = |ext| path.with_extension(ext).exists();
            let stray = match path.extension().and_then(|e| e.to_str()) {
                Some(TMP_EXT) => true,
                Some(META_EXT) => !partner(ARTIFACT_EXT),
                Some(ARTIFACT_EXT) => !partner(META_EXT),
                _ => false,
            };
            if stray && let Err(e) = fs::remove_file(&path) {
                tracing::warn!(path = ?path, error = %e, "cannot remove an incomplete artifact");
            }
        }
        tracing::debug!(dir = ?dir, "precompiled artifact cache opened");
        Ok(Self { dir })
    }

    /// Where the artifact of `digest` lives (whether or not it exists).
    pub(crate) fn artifact_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(format!("{}.{ARTIFACT_EXT}", digest.hex()))
    }

    fn meta_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(format!("{}.{META_EXT}", digest.hex()))
    }

    /// Loads (memory-maps) the artifact of `digest` if it exists and is
    /// intact. A damaged one is logged and deleted, and `None` is returned
    /// as for a missing one: the caller compiles and [`store`](Self::store)s.
    pub(crate) fn load(
        &self,
        engine: &Engine,
        digest: &Digest,
        kind: WasmKind,
    ) -> Option<Compiled> {
        let path = self.verified(digest, kind)?;
        match deserialize(engine, kind, &path) {
            Ok(compiled) => Some(compiled),
            Err(e) => {
                self.discard(digest, &path, &format!("wasmtime refuses it: {e:#}"));
                None
            }
        }
    }

    /// The path of the artifact of `digest` if it exists and matches its
    /// metadata. A damaged one is logged and deleted, and `None` returned.
    pub(crate) fn verified(&self, digest: &Digest, kind: WasmKind) -> Option<PathBuf> {
        let path = self.artifact_path(digest);
        match self.check(&path, &self.meta_path(digest), kind) {
            Ok(()) => Some(path),
            Err(Unusable::Missing) => None,
            Err(Unusable::Damaged(reason)) => {
                self.discard(digest, &path, &reason);
                None
            }
        }
    }

    fn check(&self, path: &Path, meta_path: &Path, kind: WasmKind) -> Result<(), Unusable> {
        let mut artifact = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Unusable::Missing),
            Err(e) => return Err(Unusable::Damaged(format!("it cannot be opened: {e}"))),
        };
        let meta = fs::read(meta_path)
            .map_err(|e| Unusable::Damaged(format!("its metadata cannot be read: {e}")))?;
        let meta: Meta = serde_json::from_slice(&meta)
            .map_err(|e| Unusable::Damaged(format!("its metadata is malformed: {e}")))?;
        if meta.kind != kind {
            return Err(Unusable::Damaged(format!(
                "it holds a {:?}, not a {kind:?}",
                meta.kind
            )));
        }
        let len = artifact
            .metadata()
            .map_err(|e| Unusable::Damaged(format!("it cannot be read: {e}")))?
            .len();
        if len != meta.len {
            return Err(Unusable::Damaged(format!(
                "it is {len} bytes long instead of {}",
                meta.len
            )));
        }
        let mut hasher = Sha256::new();
        io::copy(&mut artifact, &mut hasher)
            .map_err(|e| Unusable::Damaged(format!("it cannot be read: {e}")))?;
        let sha256 = hex::encode(hasher.finalize());
        if sha256 != meta.sha256 {
            return Err(Unusable::Damaged(format!(
                "its sha256 is {sha256} instead of {}",
                meta.sha256
            )));
        }
        Ok(())
    }

    fn discard(&self, digest: &Digest, path: &Path, reason: &str) {
        tracing::warn!(
            path = ?path,
            %digest,
            reason,
            "discarding a damaged precompiled artifact; it will be rebuilt"
        );
        self.remove(digest);
    }

    /// Writes `bytes`, an artifact of `kind` produced by this engine
    /// (`Engine::precompile_*` or `serialize`), as the artifact of `digest`,
    /// replacing any previous one. Returns the artifact's path. A write
    /// that fails leaves neither file.
    pub(crate) fn store(&self, digest: &Digest, kind: WasmKind, bytes: &[u8]) -> Result<PathBuf> {
        let meta = Meta {
            kind,
            len: bytes.len() as u64,
            sha256: hex::encode(Sha256::digest(bytes)),
        };
        let meta = serde_json::to_vec(&meta)
            .map_err(|e| Error::Internal(format!("encoding artifact metadata: {e}")))?;
        self.write_atomically(&self.meta_path(digest), &meta)?;
        let path = self.artifact_path(digest);
        let stored = crate::failpoint::hit("compile.after_meta")
            .and_then(|()| self.write_atomically(&path, bytes))
            .and_then(|()| {
                File::open(&self.dir)
                    .and_then(|d| d.sync_all())
                    .map_err(Error::io("syncing the artifact cache", &self.dir))
            });
        if stored.is_err() {
            // No metadata without its artifact: the next store starts over.
            self.remove(digest);
        }
        stored?;
        crate::failpoint::hit("compile.after_store")?;
        Ok(path)
    }

    fn write_atomically(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let tmp = self
            .dir
            .join(format!("{name}.{:016x}.{TMP_EXT}", rand::random::<u64>()));
        let written = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| {
                f.write_all(bytes)?;
                f.sync_all()
            })
            .and_then(|()| {
                if path.extension().is_some_and(|e| e == ARTIFACT_EXT) {
                    crate::failpoint::hit("compile.before_rename").map_err(io::Error::other)?;
                }
                fs::rename(&tmp, path)
            });
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written.map_err(Error::io("writing a precompiled artifact", path))
    }

    /// Deletes the artifact of `digest` and its metadata; a missing one is
    /// not an error.
    /// The digests this store holds an artifact of.
    pub(crate) fn digests(&self) -> Vec<Digest> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name();
                let hex = name.to_str()?.strip_suffix(&format!(".{ARTIFACT_EXT}"))?;
                Digest::parse(&format!("sha256:{hex}")).ok()
            })
            .collect()
    }

    pub(crate) fn remove(&self, digest: &Digest) {
        for path in [self.artifact_path(digest), self.meta_path(digest)] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = ?path, error = %e, "cannot remove a precompiled artifact")
                }
            }
        }
    }
}

/// Memory-maps and deserializes the artifact at `path`, which
/// [`ArtifactStore::verified`] has just checked.
#[allow(unsafe_code)]
fn deserialize(engine: &Engine, kind: WasmKind, path: &Path) -> wasmtime::Result<Compiled> {
    // SAFETY: `deserialize_file` runs the file's machine code without
    // validating it, so the file must be an artifact wasmtime produced for a
    // compatible engine, and it must not change while it is mapped. Both hold:
    // - only this store writes the cache directory, which is created 0700
    //   under the agent's root-owned state root, and it writes only what this
    //   process family's engine produced (`precompile_*` or `serialize`);
    // - the caller just checked the file's length and sha256 against the
    //   metadata written with it, so it is that output, byte for byte;
    // - the file sits in the directory of this engine's compatibility
    //   fingerprint (and wasmtime checks version and settings in its header
    //   again);
    // - the store never writes a file in place: a replacement is renamed over
    //   it and a removal unlinks it, both of which leave a mapping intact.
    unsafe {
        match kind {
            WasmKind::Module => Module::deserialize_file(engine, path).map(Compiled::Module),
            WasmKind::Component => {
                Component::deserialize_file(engine, path).map(Compiled::Component)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::Config;

    const MODULE: &str = r#"(module (func (export "_start")))"#;

    fn engine(epochs: bool) -> Engine {
        let mut config = Config::new();
        config.epoch_interruption(epochs);
        config.wasm_component_model(true);
        Engine::new(&config).unwrap()
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn fingerprint_follows_the_engine_settings() {
        let a = fingerprint(&engine(true));
        assert!(is_fingerprint(&a), "{a}");
        assert_eq!(a, fingerprint(&engine(true)));
        assert_ne!(a, fingerprint(&engine(false)));
    }

    #[test]
    fn modules_and_components_round_trip() {
        let cache = tempfile::tempdir().unwrap();
        let engine = engine(true);
        let store = ArtifactStore::open(cache.path(), &engine).unwrap();

        let wasm = wat::parse_str(MODULE).unwrap();
        let digest = Digest::of(&wasm);
        assert!(store.load(&engine, &digest, WasmKind::Module).is_none());
        let artifact = engine.precompile_module(&wasm).unwrap();
        let path = store.store(&digest, WasmKind::Module, &artifact).unwrap();
        assert_eq!(path, store.artifact_path(&digest));
        match store.load(&engine, &digest, WasmKind::Module) {
            Some(Compiled::Module(m)) => assert!(m.get_export("_start").is_some()),
            _ => panic!("the module artifact did not load"),
        }

        let wasm = wat::parse_str("(component)").unwrap();
        let digest = Digest::of(&wasm);
        let artifact = engine.precompile_component(&wasm).unwrap();
        store
            .store(&digest, WasmKind::Component, &artifact)
            .unwrap();
        assert!(matches!(
            store.load(&engine, &digest, WasmKind::Component),
            Some(Compiled::Component(_))
        ));

        let dir = cache.path().join(fingerprint(&engine));
        assert!(
            files(&dir).iter().all(|n| !n.ends_with(".tmp")),
            "{:?}",
            files(&dir)
        );
    }

    #[test]
    fn unusable_artifacts_are_deleted() {
        let cache = tempfile::tempdir().unwrap();
        let engine = engine(true);
        let store = ArtifactStore::open(cache.path(), &engine).unwrap();
        let wasm = wat::parse_str(MODULE).unwrap();
        let artifact = engine.precompile_module(&wasm).unwrap();
        let digest = Digest::of(&wasm);
        let gone = |store: &ArtifactStore| {
            !store.artifact_path(&digest).exists() && !store.meta_path(&digest).exists()
        };

        // The wrong kind.
        store.store(&digest, WasmKind::Module, &artifact).unwrap();
        assert!(store.load(&engine, &digest, WasmKind::Component).is_none());
        assert!(gone(&store));

        // Consistent with its metadata, but not something wasmtime loads.
        store
            .store(&digest, WasmKind::Module, b"not an artifact")
            .unwrap();
        assert!(store.load(&engine, &digest, WasmKind::Module).is_none());
        assert!(gone(&store));

        // Metadata missing or malformed.
        store.store(&digest, WasmKind::Module, &artifact).unwrap();
        fs::remove_file(store.meta_path(&digest)).unwrap();
        assert!(store.verified(&digest, WasmKind::Module).is_none());
        assert!(gone(&store));
        store.store(&digest, WasmKind::Module, &artifact).unwrap();
        fs::write(store.meta_path(&digest), b"{").unwrap();
        assert!(store.verified(&digest, WasmKind::Module).is_none());
        assert!(gone(&store));

        // Metadata without an artifact (a write interrupted in between) is
        // simply missing, and the next store replaces it.
        store.store(&digest, WasmKind::Module, &artifact).unwrap();
        fs::remove_file(store.artifact_path(&digest)).unwrap();
        assert!(store.verified(&digest, WasmKind::Module).is_none());
        store.store(&digest, WasmKind::Module, &artifact).unwrap();
        assert!(store.load(&engine, &digest, WasmKind::Module).is_some());

        store.remove(&digest);
        assert!(gone(&store));
        store.remove(&digest);
    }

    #[test]
    fn open_removes_other_fingerprints_and_temporary_files() {
        let cache = tempfile::tempdir().unwrap();
        let engine = engine(true);
        let other = cache.path().join("ab".repeat(32));
        fs::create_dir_all(&other).unwrap();
        fs::write(other.join("x.cwasm"), b"garbage").unwrap();
        let unrelated = cache.path().join("README");
        fs::write(&unrelated, b"not ours").unwrap();
        let ours = cache.path().join(fingerprint(&engine));
        fs::create_dir_all(&ours).unwrap();
        fs::write(ours.join("x.cwasm.0123.tmp"), b"half").unwrap();
        fs::write(ours.join("metaonly.json"), b"{}").unwrap();
        fs::write(ours.join("artifactonly.cwasm"), b"x").unwrap();
        fs::write(ours.join("whole.json"), b"{}").unwrap();
        fs::write(ours.join("whole.cwasm"), b"x").unwrap();

        ArtifactStore::open(cache.path(), &engine).unwrap();
        assert!(!other.exists());
        assert!(unrelated.exists());
        assert_eq!(files(&ours), ["whole.cwasm", "whole.json"]);
    }
}
