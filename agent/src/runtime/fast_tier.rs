//! The fast first tier: big programs compiled with Winch, wasmtime's
//! baseline compiler, so that their pull answers (and their first
//! container starts) in a fraction of Cranelift's time; Cranelift code is
//! compiled in the background and swapped in for later instances.
//!
//! ```text
//! prepare / precompile (pull) of a module or command component >= min_bytes,
//! with no Cranelift artifact on disk:
//!   Winch compile ──ok──▶ prepared in memory (Winch) ──queue──▶ upgrader thread
//!        │                                                        │ Cranelift compile (nice 10)
//!        └─refused (exceptions, tail calls, GC...)                ▼
//!              ▶ Cranelift compile, as without the tier   artifact on disk, prepared swapped
//! ```
//!
//! - One background compile at a time, node-wide, on one thread at a lower
//!   CPU priority, so the tier never takes more of the node than one core
//!   at the priority of batch work.
//! - Winch code lives in memory only: after a restart the Cranelift
//!   artifact is loaded; when there is none yet, the tier applies again.
//! - Running instances keep the code they were instantiated from (a store
//!   holds its module); containers created after the swap get Cranelift's.
//! - A program forgotten (its image removed) while its Cranelift compile
//!   runs is not brought back: the compile's result is dropped, nothing is
//!   written (the swap and [`WasmEngine::forget`] take the same lock).
//! - `wasi:http` functions are not covered: they run on the pooling engine,
//!   Cranelift's only.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Mutex, PoisonError, Weak};
use std::time::Instant;

use wasmtime::component::Component;
use wasmtime::{Config, Engine, Module, Strategy};

use crate::model::ids::Digest;
use crate::model::image::WasmKind;
use crate::runtime::artifacts::Compiled;
use crate::runtime::engine::{Linkers, Prepared, Tier, WasmEngine};
use crate::runtime::error::{EngineError, GuestError};

/// The nice value of the background Cranelift compiles: below guests and
/// the agent's own work, as batch jobs run.
const UPGRADE_NICE: i32 = 10;

/// A program whose Winch code waits for Cranelift's.
pub(super) struct Upgrade {
    digest: Digest,
    kind: WasmKind,
    bytes: Vec<u8>,
}

/// Winch's engine, its linkers, and the queue of background compiles.
pub(super) struct FastTier {
    pub(super) engine: Engine,
    pub(super) linkers: Linkers,
    /// Programs of at least this many bytes of Wasm get the tier.
    min_bytes: u64,
    upgrades: Sender<Upgrade>,
    /// Digests queued or being compiled in the background (one job each).
    queued: Mutex<HashSet<Digest>>,
}

impl FastTier {
    /// The tier for programs of at least `min_bytes` (`None` for 0: off),
    /// and the receiving end of its queue, for
    /// [`start_upgrades`](Self::start_upgrades).
    pub(super) fn new(min_bytes: u64) -> Option<Result<(Self, Receiver<Upgrade>), EngineError>> {
        if min_bytes == 0 {
            return None;
        }
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.wasm_component_model(true);
        config.strategy(Strategy::Winch);
        let engine = match Engine::new(&config) {
            Ok(engine) => engine,
            Err(e) => {
                return Some(Err(EngineError::Create {
                    what: "Winch wasmtime engine",
                    detail: format!("{e:#}"),
                }));
            }
        };
        let linkers = match Linkers::new(&engine) {
            Ok(linkers) => linkers,
            Err(e) => return Some(Err(e)),
        };
        let (upgrades, receiver) = std::sync::mpsc::channel();
        Some(Ok((
            Self {
                engine,
                linkers,
                min_bytes,
                upgrades,
                queued: Mutex::new(HashSet::new()),
            },
            receiver,
        )))
    }

    /// Starts the thread that runs the background Cranelift compiles, one
    /// at a time. It ends when the engine is dropped.
    pub(super) fn start_upgrades(
        engine: Weak<WasmEngine>,
        upgrades: Receiver<Upgrade>,
    ) -> Result<(), EngineError> {
        std::thread::Builder::new()
            .name("wasmlet-cranelift".into())
            .spawn(move || {
                lower_priority();
                while let Ok(upgrade) = upgrades.recv() {
                    let Some(engine) = engine.upgrade() else {
                        return;
                    };
                    engine.upgrade(upgrade);
                }
            })
            .map(drop)
            .map_err(EngineError::UpgradeThread)
    }
}

impl WasmEngine {
    /// The fast tier, if `bytes.len()` bytes of a program that is not an
    /// HTTP function get it.
    fn fast_tier_for(&self, http: bool, len: usize) -> Option<&FastTier> {
        self.fast
            .as_ref()
            .filter(|fast| !http && len as u64 >= fast.min_bytes)
    }

    /// Compiles `bytes` with Winch and links it, if the fast tier covers it
    /// and Winch accepts it, keeps it in memory and queues its Cranelift
    /// compile. `None`: the
    /// caller compiles with Cranelift (for a program Winch refuses, after
    /// logging why). Link errors are the program's, whatever compiled it.
    pub(super) fn first_tier(
        &self,
        http: bool,
        digest: &Digest,
        kind: WasmKind,
        bytes: &[u8],
    ) -> Result<Option<Prepared>, GuestError> {
        let Some(fast) = self.fast_tier_for(http, bytes.len()) else {
            return Ok(None);
        };
        let started = Instant::now();
        let compiled = match kind {
            WasmKind::Module => Module::new(&fast.engine, bytes).map(Compiled::Module),
            WasmKind::Component => Component::new(&fast.engine, bytes).map(Compiled::Component),
        };
        let compiled = match compiled {
            Ok(compiled) => compiled,
            Err(error) => {
                tracing::info!(
                    %digest,
                    error = format!("{error:#}"),
                    "Winch cannot compile this program (a Wasm feature it lacks, such as exception handling or tail calls?): compiling it with Cranelift"
                );
                return Ok(None);
            }
        };
        let elapsed = started.elapsed();
        self.counters.fast_compiled.fetch_add(1, Ordering::Relaxed);
        // Winch code is never serialized: no artifact bytes to count.
        crate::metrics::global().compiled(Tier::Winch, elapsed, 0);
        tracing::info!(
            %digest,
            tier = Tier::Winch.label(),
            elapsed_ms = elapsed.as_millis() as u64,
            wasm_bytes = bytes.len(),
            "compiled Wasm with Winch (the fast first tier); Cranelift code follows in the background"
        );
        let prepared = self.link(compiled, http, Tier::Winch)?;
        // In memory before it is queued: the background compile swaps in
        // only what runs on Winch code.
        self.keep(digest, &prepared);
        let mut queued = fast.queued.lock().unwrap_or_else(PoisonError::into_inner);
        if queued.insert(digest.clone()) {
            let upgrade = Upgrade {
                digest: digest.clone(),
                kind,
                bytes: bytes.to_vec(),
            };
            if fast.upgrades.send(upgrade).is_err() {
                queued.remove(digest);
            }
        }
        Ok(Some(prepared))
    }

    /// Whether the program in memory for `digest` is Winch code.
    pub(super) fn runs_winch_code(&self, digest: &Digest) -> bool {
        self.prepared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(digest)
            .is_some_and(|p| self.tier_of(p) == Tier::Winch)
    }

    /// The background compile of one program: Cranelift code for what runs
    /// on Winch code, written to the disk cache and swapped into memory,
    /// unless the program was forgotten meanwhile.
    /// While it runs, the program stays queued: a second Winch compile of
    /// it (its image removed and pulled again) queues nothing more, this
    /// compile's result serving it.
    fn upgrade(&self, upgrade: Upgrade) {
        if let Some(compiled) = self.compile_upgrade(&upgrade) {
            self.swap_in(&upgrade.digest, upgrade.kind, compiled);
        }
        if let Some(fast) = &self.fast {
            fast.queued
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&upgrade.digest);
        }
    }

    /// Compiles and links an upgrade's program with Cranelift, serialized
    /// for the disk cache; `None` when it no longer runs on Winch code or
    /// Cranelift fails (then it keeps its Winch code, as logged).
    fn compile_upgrade(
        &self,
        Upgrade {
            digest,
            kind,
            bytes,
        }: &Upgrade,
    ) -> Option<CraneliftCode> {
        if !self.runs_winch_code(digest) {
            return None;
        }
        let started = Instant::now();
        let compiled = match kind {
            WasmKind::Module => Module::new(&self.engine, bytes).map(Compiled::Module),
            WasmKind::Component => Component::new(&self.engine, bytes).map(Compiled::Component),
        };
        let compiled = match compiled {
            Ok(compiled) => compiled,
            Err(error) => {
                tracing::warn!(%digest, error = format!("{error:#}"), "Cranelift cannot compile a program Winch compiled: it keeps running Winch code");
                return None;
            }
        };
        let elapsed = started.elapsed();
        self.counters.compiled.fetch_add(1, Ordering::Relaxed);
        let artifact = match self.artifacts.as_ref().map(|_| compiled.serialize()) {
            Some(Ok(artifact)) => Some(artifact),
            Some(Err(error)) => {
                tracing::warn!(%digest, error = format!("{error:#}"), "cannot serialize the compiled artifact");
                None
            }
            None => None,
        };
        crate::metrics::global().compiled(
            Tier::Cranelift,
            elapsed,
            artifact.as_ref().map_or(0, Vec::len),
        );
        match self.link(compiled, false, Tier::Cranelift) {
            Ok(prepared) => Some(CraneliftCode {
                prepared,
                artifact,
                elapsed,
            }),
            Err(error) => {
                tracing::warn!(%digest, %error, "linking the Cranelift code of a program failed: it keeps running Winch code");
                None
            }
        }
    }

    /// Writes the artifact and swaps the Cranelift code in for the Winch
    /// code of `digest`, in one step under its building lock — unless the
    /// program was forgotten (its image removed) since: then nothing is
    /// written or kept.
    fn swap_in(&self, digest: &Digest, kind: WasmKind, code: CraneliftCode) {
        let slot = self.building_slot(digest);
        let _building = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if !self.runs_winch_code(digest) {
            tracing::debug!(%digest, "forgotten during its background compile: its Cranelift code is dropped");
            return;
        }
        if let (Some(store), Some(artifact)) = (&self.artifacts, &code.artifact)
            && let Err(error) = store.store(digest, kind, artifact)
        {
            tracing::warn!(%digest, %error, "cannot keep the precompiled artifact");
        }
        self.prepared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(digest.clone(), code.prepared);
        self.counters.upgraded.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            %digest,
            tier = Tier::Cranelift.label(),
            elapsed_ms = code.elapsed.as_millis() as u64,
            "compiled Wasm with Cranelift in the background; containers created from now on run its code"
        );
    }
}

/// What a background compile made: the linked code and its artifact.
struct CraneliftCode {
    prepared: Prepared,
    artifact: Option<Vec<u8>>,
    elapsed: std::time::Duration,
}

/// Lowers the calling thread's CPU priority to [`UPGRADE_NICE`] (Linux
/// sets the nice value per thread). A failure is logged: the compiles run
/// at the agent's priority.
#[allow(unsafe_code)]
fn lower_priority() {
    let tid = nix::unistd::gettid().as_raw();
    // SAFETY: setpriority takes plain integers and changes only the nice
    // value of the thread `tid`, this one.
    let done = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, UPGRADE_NICE) };
    if done != 0 {
        let error = std::io::Error::last_os_error();
        tracing::warn!(%error, "cannot lower the priority of background Cranelift compiles");
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::runtime::compile::EngineStats;
    use crate::runtime::engine::HTTP_POOL_INSTANCES;
    use crate::runtime::engine::tests::{EXIT_7, config, log};

    /// An engine over `cache` whose tier covers every program of at least
    /// `min_bytes`.
    fn engine(cache: &Path, min_bytes: u64) -> Arc<WasmEngine> {
        WasmEngine::with_pool(Some(cache.to_owned()), HTTP_POOL_INSTANCES, min_bytes).unwrap()
    }

    fn tier_of(engine: &WasmEngine, prepared: &Prepared) -> Tier {
        let tier = engine.tier_of(prepared);
        if tier == Tier::Cranelift {
            assert!(Engine::same(prepared.engine(), &engine.engine));
        }
        tier
    }

    async fn exit_code(engine: &WasmEngine, prepared: &Prepared) -> i32 {
        let (_d, log, _) = log();
        let guest = engine.instantiate(prepared, config(&log)).await.unwrap();
        guest.run().await.code
    }

    /// Waits (bounded) until the background compiles have all ended.
    async fn background_done(engine: &WasmEngine) {
        let fast = engine.fast.as_ref().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !fast.queued.lock().unwrap().is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the background compile did not end"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn artifact(engine: &WasmEngine, digest: &Digest) -> std::path::PathBuf {
        engine.artifacts.as_ref().unwrap().artifact_path(digest)
    }

    #[tokio::test]
    async fn a_big_module_runs_on_winch_then_on_cranelift_code_swapped_in() {
        let cache = tempfile::tempdir().unwrap();
        let bytes = wat::parse_str(EXIT_7).unwrap();
        let digest = Digest::of(&bytes);
        let engine = engine(cache.path(), 1);
        let first = engine.prepare(&digest, WasmKind::Module, &bytes).unwrap();
        assert_eq!(tier_of(&engine, &first), Tier::Winch);
        assert_eq!(engine.stats().fast_compiled, 1);
        assert_eq!(exit_code(&engine, &first).await, 7);

        background_done(&engine).await;
        assert_eq!(
            engine.stats(),
            EngineStats {
                compiled: 1,
                fast_compiled: 1,
                upgraded: 1,
                ..EngineStats::default()
            }
        );
        assert!(artifact(&engine, &digest).exists());
        let later = engine.prepare(&digest, WasmKind::Module, &bytes).unwrap();
        assert_eq!(tier_of(&engine, &later), Tier::Cranelift);
        assert_eq!(exit_code(&engine, &later).await, 7);
        // What was prepared before the swap still instantiates and runs.
        assert_eq!(exit_code(&engine, &first).await, 7);
        drop(engine);

        // After a restart the Cranelift artifact is loaded: no compile.
        let restarted = self::engine(cache.path(), 1);
        let loaded = restarted
            .prepare(&digest, WasmKind::Module, &bytes)
            .unwrap();
        assert_eq!(tier_of(&restarted, &loaded), Tier::Cranelift);
        assert_eq!(
            restarted.stats(),
            EngineStats {
                loaded_from_disk: 1,
                ..EngineStats::default()
            }
        );
        assert_eq!(exit_code(&restarted, &loaded).await, 7);
    }

    #[tokio::test]
    async fn a_pull_keeps_the_winch_code_in_memory_and_the_artifact_follows() {
        let cache = tempfile::tempdir().unwrap();
        let bytes = std::fs::read(wasm_samples::ECHO_P2).unwrap();
        let digest = Digest::of(&bytes);
        let engine = engine(cache.path(), 1);
        engine
            .precompile(&digest, WasmKind::Component, &bytes)
            .unwrap();
        assert!(engine.is_compiled(&digest, WasmKind::Component, &bytes));
        assert_eq!(engine.stats().fast_compiled, 1);
        background_done(&engine).await;
        assert_eq!(engine.stats().upgraded, 1);
        assert!(artifact(&engine, &digest).exists());
        let prepared = engine
            .prepare(&digest, WasmKind::Component, &bytes)
            .unwrap();
        assert_eq!(tier_of(&engine, &prepared), Tier::Cranelift);
        assert_eq!(exit_code(&engine, &prepared).await, 0);
    }

    #[tokio::test]
    async fn a_component_runs_on_winch_code() {
        let cache = tempfile::tempdir().unwrap();
        let bytes = std::fs::read(wasm_samples::ECHO_P2).unwrap();
        let digest = Digest::of(&bytes);
        let engine = engine(cache.path(), 1);
        let prepared = engine
            .prepare(&digest, WasmKind::Component, &bytes)
            .unwrap();
        assert!(matches!(prepared, Prepared::Component(_)));
        assert_eq!(tier_of(&engine, &prepared), Tier::Winch);
        assert_eq!(exit_code(&engine, &prepared).await, 0);
        background_done(&engine).await;
    }

    /// Tail calls: Cranelift compiles them, Winch does not.
    const TAIL_CALL_EXIT_7: &str = r#"(module
        (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
        (memory (export "memory") 1)
        (func $seven (call $exit (i32.const 7)))
        (func (export "_start") (return_call $seven)))"#;

    #[tokio::test]
    async fn a_program_winch_refuses_is_compiled_by_cranelift() {
        let cache = tempfile::tempdir().unwrap();
        let bytes = wat::parse_str(TAIL_CALL_EXIT_7).unwrap();
        let digest = Digest::of(&bytes);
        let engine = engine(cache.path(), 1);
        let prepared = engine.prepare(&digest, WasmKind::Module, &bytes).unwrap();
        assert_eq!(tier_of(&engine, &prepared), Tier::Cranelift);
        assert_eq!(
            engine.stats(),
            EngineStats {
                compiled: 1,
                ..EngineStats::default()
            }
        );
        assert!(artifact(&engine, &digest).exists());
        assert_eq!(exit_code(&engine, &prepared).await, 7);
        // Pulled, it is precompiled to disk as without the tier.
        let other = tempfile::tempdir().unwrap();
        let engine = self::engine(other.path(), 1);
        engine
            .precompile(&digest, WasmKind::Module, &bytes)
            .unwrap();
        assert!(artifact(&engine, &digest).exists());
        assert_eq!(engine.stats().fast_compiled, 0);
    }

    #[tokio::test]
    async fn threshold_0_or_above_the_size_means_cranelift_only() {
        let bytes = wat::parse_str(EXIT_7).unwrap();
        let digest = Digest::of(&bytes);
        for min_bytes in [0, bytes.len() as u64 + 1] {
            let cache = tempfile::tempdir().unwrap();
            let engine = engine(cache.path(), min_bytes);
            assert_eq!(engine.fast.is_some(), min_bytes > 0);
            let prepared = engine.prepare(&digest, WasmKind::Module, &bytes).unwrap();
            assert_eq!(tier_of(&engine, &prepared), Tier::Cranelift);
            assert_eq!(
                engine.stats(),
                EngineStats {
                    compiled: 1,
                    ..EngineStats::default()
                }
            );
        }
        // At exactly the threshold the tier applies.
        let cache = tempfile::tempdir().unwrap();
        let engine = engine(cache.path(), bytes.len() as u64);
        let prepared = engine.prepare(&digest, WasmKind::Module, &bytes).unwrap();
        assert_eq!(tier_of(&engine, &prepared), Tier::Winch);
        background_done(&engine).await;
    }

    #[tokio::test]
    async fn a_program_forgotten_before_its_background_compile_ends_stays_forgotten() {
        let cache = tempfile::tempdir().unwrap();
        let bytes = wat::parse_str(EXIT_7).unwrap();
        let digest = Digest::of(&bytes);
        let engine = engine(cache.path(), 1);
        engine.prepare(&digest, WasmKind::Module, &bytes).unwrap();
        engine.forget(&digest);
        background_done(&engine).await;
        // Whether the compile ended before the removal or after it.
        assert!(!artifact(&engine, &digest).exists());
        assert!(engine.prepared.lock().unwrap().is_empty());

        // A compile that was under way when its program was forgotten
        // writes nothing and puts nothing back.
        let engine = self::engine(cache.path(), 1);
        engine.prepare(&digest, WasmKind::Module, &bytes).unwrap();
        let upgrade = Upgrade {
            digest: digest.clone(),
            kind: WasmKind::Module,
            bytes: bytes.clone(),
        };
        let compiled = engine.compile_upgrade(&upgrade);
        engine.forget(&digest);
        background_done(&engine).await;
        if let Some(compiled) = compiled {
            engine.swap_in(&digest, WasmKind::Module, compiled);
        }
        assert!(!artifact(&engine, &digest).exists());
        assert!(engine.prepared.lock().unwrap().is_empty());
        assert!(engine.artifacts.as_ref().unwrap().digests().is_empty());
    }
}
