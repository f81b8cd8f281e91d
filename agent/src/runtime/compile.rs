//! Making images ready to instantiate: the in-memory cache of prepared
//! images, the disk cache of compiled artifacts, and Cranelift compiles
//! (Winch first for big programs: `fast_tier`).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use wasmtime::component::Component;
use wasmtime::{Engine, Module};

use crate::metrics::CacheResult;
use crate::model::ids::Digest;
use crate::model::image::WasmKind;
use crate::runtime::artifacts::{ArtifactStore, Compiled};
use crate::runtime::engine::{Prepared, Tier, WasmEngine};
use crate::runtime::error::GuestError;

impl WasmEngine {
    /// Makes `bytes` (the Wasm whose digest is `digest`) ready to
    /// instantiate and links it against WASI: from the in-memory cache, else
    /// by memory-mapping its artifact from the disk cache, else by compiling
    /// it (and writing the artifact); a big program is compiled with Winch
    /// first, Cranelift's code following in the background (`fast_tier`).
    /// Errors are written for the user: they end up in the container's
    /// status message and log.
    pub fn prepare(
        &self,
        digest: &Digest,
        kind: WasmKind,
        bytes: &[u8],
    ) -> Result<Prepared, GuestError> {
        if let Some(p) = self.cached(digest) {
            return Ok(p);
        }
        let slot = self.building_slot(digest);
        let _building = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = self.cached(digest) {
            return Ok(p);
        }
        let http = kind == WasmKind::Component && exports_http_handler(bytes);
        let (engine, artifacts) = self.engine_for(http);
        let loaded = artifacts.and_then(|store| store.load(engine, digest, kind));
        let compiled = match loaded {
            Some(compiled) => {
                self.counters
                    .loaded_from_disk
                    .fetch_add(1, Ordering::Relaxed);
                crate::metrics::global().compile_lookup(CacheResult::Disk);
                tracing::debug!(%digest, "loaded precompiled artifact");
                compiled
            }
            None => {
                crate::metrics::global().compile_lookup(CacheResult::Miss);
                if let Some(prepared) = self.first_tier(http, digest, kind, bytes)? {
                    return Ok(prepared);
                }
                self.compile(http, digest, kind, bytes)?
            }
        };
        let prepared = self.link(compiled, http, Tier::Cranelift)?;
        self.keep(digest, &prepared);
        Ok(prepared)
    }

    /// Keeps `prepared` in memory for the next instances of `digest`.
    pub(super) fn keep(&self, digest: &Digest, prepared: &Prepared) {
        if let Ok(mut m) = self.prepared.lock() {
            m.insert(digest.clone(), prepared.clone());
        }
    }

    /// Makes sure the disk cache holds a sound artifact of `bytes`,
    /// compiling it if not, and keeps nothing in memory — except a big
    /// program's Winch code (`fast_tier`), which is kept in memory only, its
    /// Cranelift artifact written by the background compile. The image
    /// puller calls this before a pull answers so that the first container
    /// start does not compile. Without a cache directory this does nothing.
    /// Errors (the bytes do not compile, the artifact cannot be written)
    /// are written for the user.
    pub fn precompile(&self, digest: &Digest, kind: WasmKind, bytes: &[u8]) -> crate::Result<()> {
        let http = kind == WasmKind::Component && exports_http_handler(bytes);
        let (engine, artifacts) = self.engine_for(http);
        let Some(store) = artifacts else {
            return Ok(());
        };
        let slot = self.building_slot(digest);
        let _building = slot.lock().unwrap_or_else(PoisonError::into_inner);
        // Winch code in memory: its artifact comes from the background
        // compile already queued.
        if store.verified(digest, kind).is_some() || self.runs_winch_code(digest) {
            return Ok(());
        }
        if self.first_tier(http, digest, kind, bytes)?.is_some() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let artifact = match kind {
            WasmKind::Module => engine.precompile_module(bytes),
            WasmKind::Component => engine.precompile_component(bytes),
        }
        .map_err(|e| invalid(kind, &e))?;
        let elapsed = started.elapsed();
        self.counters.compiled.fetch_add(1, Ordering::Relaxed);
        crate::metrics::global().compiled(Tier::Cranelift, elapsed, artifact.len());
        tracing::info!(%digest, tier = Tier::Cranelift.label(), elapsed_ms = elapsed.as_millis() as u64, "compiled Wasm");
        store.store(digest, kind, &artifact).map(drop)
    }

    /// Forgets an image that was removed: its prepared template and its
    /// artifact on disk.
    pub fn forget(&self, digest: &Digest) {
        let slot = self.building_slot(digest);
        {
            let _building = slot.lock().unwrap_or_else(PoisonError::into_inner);
            if let Ok(mut m) = self.prepared.lock() {
                m.remove(digest);
            }
            for store in self.artifacts.iter().chain(&self.http_artifacts) {
                store.remove(digest);
            }
        }
        if let Ok(mut b) = self.building.lock() {
            b.remove(digest);
        }
    }

    /// Forgets every compiled program whose digest is not in `in_use`
    /// (memory and both disk stores): what no stored image runs any more.
    /// Returns how many were forgotten.
    pub fn collect(&self, in_use: &std::collections::HashSet<Digest>) -> usize {
        let mut unused: Vec<Digest> = self
            .artifacts
            .iter()
            .chain(&self.http_artifacts)
            .flat_map(|store| store.digests())
            .chain(
                self.prepared
                    .lock()
                    .map(|m| m.keys().cloned().collect::<Vec<_>>())
                    .unwrap_or_default(),
            )
            .filter(|d| !in_use.contains(d))
            .collect();
        unused.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        unused.dedup();
        for digest in &unused {
            self.forget(digest);
        }
        unused.len()
    }

    /// What the engine did to make images ready since it was built.
    #[cfg(test)]
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            compiled: self.counters.compiled.load(Ordering::Relaxed),
            loaded_from_disk: self.counters.loaded_from_disk.load(Ordering::Relaxed),
            memory_hits: self.counters.memory_hits.load(Ordering::Relaxed),
            fast_compiled: self.counters.fast_compiled.load(Ordering::Relaxed),
            upgraded: self.counters.upgraded.load(Ordering::Relaxed),
        }
    }

    /// Whether `bytes` (whose digest is `digest`) is compiled: prepared in
    /// memory, or a sound artifact in the disk cache.
    pub fn is_compiled(&self, digest: &Digest, kind: WasmKind, bytes: &[u8]) -> bool {
        if self.prepared.lock().is_ok_and(|m| m.contains_key(digest)) {
            return true;
        }
        let http = kind == WasmKind::Component && exports_http_handler(bytes);
        let (_, artifacts) = self.engine_for(http);
        artifacts.is_some_and(|store| store.verified(digest, kind).is_some())
    }

    /// The prepared image for `digest` if it is in memory: lets a caller
    /// skip reading and hashing the bytes on the hot path.
    pub fn cached(&self, digest: &Digest) -> Option<Prepared> {
        let hit = self
            .prepared
            .lock()
            .ok()
            .and_then(|m| m.get(digest).cloned());
        if hit.is_some() {
            self.counters.memory_hits.fetch_add(1, Ordering::Relaxed);
            crate::metrics::global().compile_lookup(CacheResult::Memory);
        }
        hit
    }

    pub(super) fn building_slot(&self, digest: &Digest) -> Arc<Mutex<()>> {
        self.building
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(digest.clone())
            .or_default()
            .clone()
    }

    /// Compiles with Cranelift and writes the artifact to the disk cache (a
    /// failure to write is logged: the compiled image is still used).
    fn compile(
        &self,
        http: bool,
        digest: &Digest,
        kind: WasmKind,
        bytes: &[u8],
    ) -> Result<Compiled, GuestError> {
        let (engine, artifacts) = self.engine_for(http);
        let started = std::time::Instant::now();
        let compiled = match kind {
            WasmKind::Module => Module::new(engine, bytes).map(Compiled::Module),
            WasmKind::Component => Component::new(engine, bytes).map(Compiled::Component),
        }
        .map_err(|e| invalid(kind, &e))?;
        let elapsed = started.elapsed();
        self.counters.compiled.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%digest, http, tier = Tier::Cranelift.label(), elapsed_ms = elapsed.as_millis() as u64, "compiled Wasm");
        let Some(store) = artifacts else {
            // No disk cache: the code's size is not measured.
            crate::metrics::global().compiled(Tier::Cranelift, elapsed, 0);
            return Ok(compiled);
        };
        match compiled.serialize() {
            Ok(artifact) => {
                crate::metrics::global().compiled(Tier::Cranelift, elapsed, artifact.len());
                if let Err(error) = store.store(digest, kind, &artifact) {
                    tracing::warn!(%digest, %error, "cannot keep the precompiled artifact");
                }
            }
            Err(error) => {
                crate::metrics::global().compiled(Tier::Cranelift, elapsed, 0);
                tracing::warn!(%digest, error = format!("{error:#}"), "cannot serialize the compiled artifact");
            }
        }
        Ok(compiled)
    }

    /// The engine (and its artifact store) for an HTTP function or for
    /// everything else.
    fn engine_for(&self, http: bool) -> (&Engine, Option<&ArtifactStore>) {
        if http {
            (&self.http_engine, self.http_artifacts.as_ref())
        } else {
            (&self.engine, self.artifacts.as_ref())
        }
    }
}

/// Cranelift's refusal of `kind` bytes, for the user.
fn invalid(kind: WasmKind, e: &wasmtime::Error) -> GuestError {
    GuestError::InvalidWasm {
        kind,
        detail: format!("{e:#}"),
    }
}

/// How images were made ready since the engine was built; lets a caller
/// (or a test) tell whether a container start compiled anything.
#[cfg(test)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Cranelift compilations ([`WasmEngine::prepare`] and
    /// [`WasmEngine::precompile`]).
    pub compiled: u64,
    /// Artifacts memory-mapped from the disk cache instead of compiling.
    pub loaded_from_disk: u64,
    /// [`WasmEngine::prepare`] calls answered from the in-memory cache.
    pub memory_hits: u64,
    /// Winch compiles of the fast first tier.
    pub fast_compiled: u64,
    /// Background Cranelift compiles swapped in for Winch code (also
    /// counted in `compiled`).
    pub upgraded: u64,
}

/// Whether a component exports `wasi:http/incoming-handler` (is an HTTP
/// function). Reads only the outer component's export sections.
pub fn exports_http_handler(bytes: &[u8]) -> bool {
    let mut depth = 0usize;
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        let Ok(payload) = payload else {
            return false;
        };
        match payload {
            wasmparser::Payload::ModuleSection { .. }
            | wasmparser::Payload::ComponentSection { .. } => depth += 1,
            wasmparser::Payload::End(_) => depth = depth.saturating_sub(1),
            wasmparser::Payload::ComponentExportSection(reader) if depth == 0 => {
                for export in reader.into_iter().flatten() {
                    if export.name.name.starts_with("wasi:http/incoming-handler@") {
                        return true;
                    }
                }
            }
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::engine::tests::{EXIT_7, config, log};

    /// Where `engine` keeps the artifact of `bytes`.
    fn artifact(engine: &WasmEngine, bytes: &[u8]) -> std::path::PathBuf {
        engine
            .artifacts
            .as_ref()
            .unwrap()
            .artifact_path(&Digest::of(bytes))
    }

    async fn exit_code(engine: &WasmEngine, pre: &Prepared) -> i32 {
        let (_d, log, _) = log();
        let guest = engine.instantiate(pre, config(&log)).await.unwrap();
        guest.run().await.code
    }

    /// Prepares `EXIT_7` on a fresh engine over `cache` and runs it.
    async fn prepare_exit_7(cache: &std::path::Path) -> (Arc<WasmEngine>, std::path::PathBuf) {
        let engine = WasmEngine::new(Some(cache.to_owned())).unwrap();
        let bytes = wat::parse_str(EXIT_7).unwrap();
        let pre = engine
            .prepare(&Digest::of(&bytes), WasmKind::Module, &bytes)
            .unwrap();
        assert_eq!(exit_code(&engine, &pre).await, 7);
        let path = artifact(&engine, &bytes);
        (engine, path)
    }

    #[tokio::test]
    async fn a_second_engine_loads_the_artifact_instead_of_compiling() {
        let cache = tempfile::tempdir().unwrap();
        let (first, path) = prepare_exit_7(cache.path()).await;
        assert!(path.exists(), "{path:?}");
        assert_eq!(
            first.stats(),
            EngineStats {
                compiled: 1,
                loaded_from_disk: 0,
                memory_hits: 0,
                ..EngineStats::default()
            }
        );
        drop(first);

        let (second, _) = prepare_exit_7(cache.path()).await;
        assert_eq!(
            second.stats(),
            EngineStats {
                compiled: 0,
                loaded_from_disk: 1,
                memory_hits: 0,
                ..EngineStats::default()
            }
        );
        let bytes = wat::parse_str(EXIT_7).unwrap();
        let pre = second
            .prepare(&Digest::of(&bytes), WasmKind::Module, &bytes)
            .unwrap();
        assert_eq!(exit_code(&second, &pre).await, 7);
        assert_eq!(second.stats().memory_hits, 1);
        assert_eq!(second.stats().compiled, 0);
    }

    async fn damaged_artifact_is_rebuilt(damage: impl FnOnce(&std::path::Path)) {
        let cache = tempfile::tempdir().unwrap();
        let (first, path) = prepare_exit_7(cache.path()).await;
        drop(first);
        let sound = std::fs::read(&path).unwrap();
        damage(&path);
        assert_ne!(std::fs::read(&path).unwrap(), sound);

        // Detected, discarded, recompiled (and the guest still runs)...
        let (second, _) = prepare_exit_7(cache.path()).await;
        assert_eq!(second.stats().compiled, 1);
        assert_eq!(second.stats().loaded_from_disk, 0);
        assert_eq!(std::fs::read(&path).unwrap().len(), sound.len());
        drop(second);
        // ...and rewritten, so the next engine loads it.
        let (third, _) = prepare_exit_7(cache.path()).await;
        assert_eq!(third.stats().compiled, 0);
        assert_eq!(third.stats().loaded_from_disk, 1);
    }

    #[tokio::test]
    async fn a_corrupt_artifact_is_discarded_and_rebuilt() {
        damaged_artifact_is_rebuilt(|path| {
            let mut bytes = std::fs::read(path).unwrap();
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0x01;
            std::fs::write(path, bytes).unwrap();
        })
        .await;
    }

    #[tokio::test]
    async fn a_truncated_artifact_is_discarded_and_rebuilt() {
        damaged_artifact_is_rebuilt(|path| {
            let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            let len = file.metadata().unwrap().len();
            file.set_len(len / 2).unwrap();
        })
        .await;
    }

    #[tokio::test]
    async fn artifacts_of_another_fingerprint_are_not_used() {
        let cache = tempfile::tempdir().unwrap();
        let bytes = wat::parse_str(EXIT_7).unwrap();
        let other = cache.path().join("0".repeat(64));
        std::fs::create_dir_all(&other).unwrap();
        let planted = other.join(format!("{}.cwasm", Digest::of(&bytes).hex()));
        std::fs::write(&planted, b"an artifact of another wasmtime").unwrap();

        let (engine, path) = prepare_exit_7(cache.path()).await;
        assert_eq!(engine.stats().compiled, 1);
        assert_eq!(engine.stats().loaded_from_disk, 0);
        assert!(!other.exists(), "{other:?} was not cleaned up");
        assert_ne!(path.parent(), Some(other.as_path()));
        assert!(path.exists());
    }

    #[tokio::test]
    async fn precompile_writes_the_artifact_and_keeps_nothing_in_memory() {
        let cache = tempfile::tempdir().unwrap();
        let engine = WasmEngine::new(Some(cache.path().to_owned())).unwrap();
        let bytes = wat::parse_str(EXIT_7).unwrap();
        let digest = Digest::of(&bytes);
        engine
            .precompile(&digest, WasmKind::Module, &bytes)
            .unwrap();
        assert!(artifact(&engine, &bytes).exists());
        assert!(engine.prepared.lock().unwrap().is_empty());
        engine
            .precompile(&digest, WasmKind::Module, &bytes)
            .unwrap();
        assert_eq!(engine.stats().compiled, 1);

        let pre = engine.prepare(&digest, WasmKind::Module, &bytes).unwrap();
        assert_eq!(exit_code(&engine, &pre).await, 7);
        assert_eq!(
            engine.stats(),
            EngineStats {
                compiled: 1,
                loaded_from_disk: 1,
                memory_hits: 0,
                ..EngineStats::default()
            }
        );

        let err = engine
            .precompile(&Digest::of(b"junk"), WasmKind::Module, b"junk")
            .unwrap_err();
        assert!(
            matches!(
                &err,
                crate::Error::Guest(e) if matches!(**e, GuestError::InvalidWasm {
                    kind: WasmKind::Module,
                    ..
                })
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("invalid Wasm module"), "{err}");
        // Without a cache directory there is nothing to do.
        let engine = WasmEngine::new(None).unwrap();
        engine
            .precompile(&digest, WasmKind::Module, &bytes)
            .unwrap();
        assert_eq!(engine.stats().compiled, 0);
    }

    #[tokio::test]
    async fn forget_deletes_the_artifact() {
        let cache = tempfile::tempdir().unwrap();
        let (engine, path) = prepare_exit_7(cache.path()).await;
        let bytes = wat::parse_str(EXIT_7).unwrap();
        let digest = Digest::of(&bytes);
        engine.forget(&digest);
        assert!(!path.exists());
        assert!(engine.prepared.lock().unwrap().is_empty());
        engine.prepare(&digest, WasmKind::Module, &bytes).unwrap();
        assert_eq!(engine.stats().compiled, 2);
        assert!(path.exists());
    }

    #[tokio::test]
    async fn a_component_is_compiled_once_then_loaded() {
        let cache = tempfile::tempdir().unwrap();
        let bytes = std::fs::read(wasm_samples::ECHO_P2).unwrap();
        let digest = Digest::of(&bytes);
        let first = WasmEngine::new(Some(cache.path().to_owned())).unwrap();
        first
            .precompile(&digest, WasmKind::Component, &bytes)
            .unwrap();
        assert_eq!(first.stats().compiled, 1);
        drop(first);

        let second = WasmEngine::new(Some(cache.path().to_owned())).unwrap();
        let pre = second
            .prepare(&digest, WasmKind::Component, &bytes)
            .unwrap();
        assert!(matches!(pre, Prepared::Component(_)));
        assert_eq!(
            second.stats(),
            EngineStats {
                compiled: 0,
                loaded_from_disk: 1,
                memory_hits: 0,
                ..EngineStats::default()
            }
        );
        let (_d, log, path) = log();
        let exit = second
            .instantiate(&pre, config(&log))
            .await
            .unwrap()
            .run()
            .await;
        assert_eq!(exit.code, 0, "{}", exit.message);
        log.close();
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.contains("argc=1"), "{text}");
    }
}
