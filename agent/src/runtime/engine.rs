//! The node's one wasmtime [`Engine`]: compiles images into ready-to-link
//! templates (cached in memory by digest, their compiled artifacts kept on
//! disk by the `artifacts` module), and runs guests as async tasks.
//!
//! The engine sees bytes, argv, environment, preopened directories and log
//! streams — never a CRI request. Guests yield to the executor on every
//! epoch tick, so a guest in a tight loop neither holds a worker thread nor
//! escapes being stopped: dropping the future returned by [`Guest::run`]
//! ends it at its next yield.
//!
//! Building the engines, linking and instantiating are here; making an image
//! ready (the caches, compiling) is in `compile`; the Winch engine of the
//! fast first tier and its background Cranelift compiles in `fast_tier`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wasmtime::component::Linker as ComponentLinker;
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, InstancePre, Linker, PoolingAllocationConfig, Store,
};
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi_http::p2::bindings::ProxyPre;

use crate::model::ids::Digest;
use crate::model::image::WasmKind;
use crate::runtime::artifacts::{ArtifactStore, Compiled};
use crate::runtime::error::{EngineError, GuestError, LinkTarget};
use crate::runtime::fast_tier::FastTier;
use crate::runtime::guest::Guest;
use crate::runtime::host::{
    GuestConfig, P1State, P2State, make_p2_linker, wasi_builder, yield_by_shares,
};
use crate::runtime::http::HttpFunction;

/// How often the epoch advances; a running guest yields at least this often.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// A compiled and linked image, ready to instantiate cheaply.
#[derive(Clone)]
pub enum Prepared {
    Module(InstancePre<P1State>),
    Component(CommandPre<P2State>),
    /// A `wasi:http/proxy` component, instantiated per request (on the
    /// pooling engine).
    Http(ProxyPre<P2State>),
}

impl Prepared {
    /// The engine its code was compiled by: a guest's store must be made
    /// from it.
    pub(super) fn engine(&self) -> &Engine {
        match self {
            Prepared::Module(pre) => pre.module().engine(),
            Prepared::Component(pre) => pre.engine(),
            Prepared::Http(pre) => pre.engine(),
        }
    }
}

/// Which compiler made a program's code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// Cranelift, the optimising compiler: all code on disk is its.
    Cranelift,
    /// Winch, the baseline compiler of the fast first tier: several times
    /// faster to compile, slower code, never written to disk.
    Winch,
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

impl Tier {
    /// Its name in logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Tier::Cranelift => "cranelift",
            Tier::Winch => "winch",
        }
    }
}

/// The WASI linkers of one engine: preview1 modules and preview2 command
/// components.
pub(super) struct Linkers {
    p1: Linker<P1State>,
    p2: ComponentLinker<P2State>,
}

impl Linkers {
    pub(super) fn new(engine: &Engine) -> Result<Self, EngineError> {
        let mut p1 = Linker::new(engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut p1, |s: &mut P1State| &mut s.wasi).map_err(
            |e| EngineError::Link {
                what: "WASI preview1",
                detail: format!("{e:#}"),
            },
        )?;
        super::read_only::link_p1(&mut p1).map_err(|e| EngineError::Link {
            what: "WASI preview1 read-only errors",
            detail: format!("{e:#}"),
        })?;
        Ok(Self {
            p1,
            p2: make_p2_linker(engine)?,
        })
    }
}

/// How images were made ready (what `WasmEngine::stats` reads, in tests).
#[derive(Default)]
pub(super) struct Counters {
    pub(super) compiled: AtomicU64,
    pub(super) loaded_from_disk: AtomicU64,
    pub(super) memory_hits: AtomicU64,
    /// Winch compiles of the fast first tier.
    pub(super) fast_compiled: AtomicU64,
    /// Cranelift code swapped in for Winch code.
    pub(super) upgraded: AtomicU64,
}

/// The engine, its linkers, the cache of prepared images and the on-disk
/// store of precompiled artifacts.
pub struct WasmEngine {
    pub(super) engine: Engine,
    linkers: Linkers,
    /// Winch for big modules and command components, when configured.
    pub(super) fast: Option<FastTier>,
    /// HTTP functions get an instance per request: this engine allocates
    /// them from a pool, which makes instantiation cheap.
    pub(super) http_engine: Engine,
    http_linker: ComponentLinker<P2State>,
    pub(super) prepared: Mutex<HashMap<Digest, Prepared>>,
    pub(super) artifacts: Option<ArtifactStore>,
    pub(super) http_artifacts: Option<ArtifactStore>,
    /// One lock per digest being made ready, so that an image is compiled
    /// once even when a container start and the puller's precompilation
    /// race.
    pub(super) building: Mutex<HashMap<Digest, Arc<Mutex<()>>>>,
    pub(super) counters: Counters,
}

impl WasmEngine {
    /// Builds the engine and starts the epoch ticker thread (which ends when
    /// the engine is dropped).
    ///
    /// With a `cache_dir`, compiled images are kept there (as
    /// `<cache_dir>/<engine fingerprint>/<wasm digest hex>.cwasm`) and later engines load them instead of
    /// compiling; artifacts of other wasmtime versions or settings found
    /// there are deleted. Without one, every engine compiles afresh.
    #[cfg(test)]
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Arc<Self>, EngineError> {
        Self::with_pool(cache_dir, HTTP_POOL_INSTANCES, 0)
    }

    /// As `new`, with room for `pool_instances` concurrent HTTP function
    /// instances, and the fast first tier for programs of at least
    /// `fast_tier_min_bytes` bytes of Wasm (0: none): they are compiled
    /// with Winch first, then with Cranelift in the background (see
    /// `fast_tier`). If this machine has no Winch engine the tier is off,
    /// and the agent says so.
    pub fn with_pool(
        cache_dir: Option<PathBuf>,
        pool_instances: u32,
        fast_tier_min_bytes: u64,
    ) -> Result<Arc<Self>, EngineError> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.wasm_component_model(true);
        let engine = Engine::new(&config).map_err(|e| EngineError::Create {
            what: "wasmtime engine",
            detail: format!("{e:#}"),
        })?;
        let mut pool = PoolingAllocationConfig::new();
        let n = pool_instances.max(1);
        pool.total_component_instances(n)
            // A Rust component is a few core instances (its code, the
            // adapter, shims), each with at most a memory and a table.
            .total_core_instances(n * 8)
            .total_memories(n * 2)
            .total_tables(n * 4)
            .total_stacks(n)
            .max_memories_per_module(1)
            .max_tables_per_module(4);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let http_engine = Engine::new(&config).map_err(|e| EngineError::Create {
            what: "pooling wasmtime engine",
            detail: format!("{e:#}"),
        })?;

        let linkers = Linkers::new(&engine)?;
        let (fast, upgrades) = match FastTier::new(fast_tier_min_bytes) {
            Some(Ok((fast, upgrades))) => (Some(fast), Some(upgrades)),
            Some(Err(error)) => {
                tracing::warn!(%error, "the fast first tier (Winch) is off: its engine cannot be built here");
                (None, None)
            }
            None => (None, None),
        };
        let http_linker = make_p2_linker(&http_engine)?;
        let open = |dir: &std::path::Path, engine: &Engine| {
            ArtifactStore::open(dir, engine).map_err(|e| EngineError::ArtifactCache(Box::new(e)))
        };
        let artifacts = cache_dir.as_deref().map(|d| open(d, &engine)).transpose()?;
        let http_artifacts = cache_dir
            .as_deref()
            .map(|d| open(&d.join("http"), &http_engine))
            .transpose()?;

        let this = Arc::new(Self {
            engine,
            linkers,
            fast,
            http_engine,
            http_linker,
            prepared: Mutex::new(HashMap::new()),
            artifacts,
            http_artifacts,
            building: Mutex::new(HashMap::new()),
            counters: Counters::default(),
        });
        if let Some(upgrades) = upgrades {
            FastTier::start_upgrades(Arc::downgrade(&this), upgrades)?;
        }
        let weak = Arc::downgrade(&this);
        std::thread::Builder::new()
            .name("wasmlet-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.engine.increment_epoch();
                    engine.http_engine.increment_epoch();
                    if let Some(fast) = &engine.fast {
                        fast.engine.increment_epoch();
                    }
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(EngineError::EpochThread)?;
        Ok(this)
    }

    /// Links a compiled image against WASI, with the linkers of the engine
    /// of `tier` (which compiled it). HTTP functions are Cranelift's only.
    pub(super) fn link(
        &self,
        compiled: Compiled,
        http: bool,
        tier: Tier,
    ) -> Result<Prepared, GuestError> {
        let linkers = match (tier, &self.fast) {
            (Tier::Winch, Some(fast)) => &fast.linkers,
            _ => &self.linkers,
        };
        let link = |target| {
            move |e: wasmtime::Error| GuestError::Link {
                target,
                detail: format!("{e:#}"),
            }
        };
        match compiled {
            Compiled::Module(module) => {
                if module.get_export("_start").is_none() {
                    return Err(GuestError::NotACommand);
                }
                let pre = linkers
                    .p1
                    .instantiate_pre(&module)
                    .map_err(link(LinkTarget::Preview1))?;
                Ok(Prepared::Module(pre))
            }
            Compiled::Component(component) if http => {
                let pre = self
                    .http_linker
                    .instantiate_pre(&component)
                    .map_err(link(LinkTarget::WasiHttp))?;
                let pre = ProxyPre::new(pre).map_err(|e| GuestError::NotAnHttpHandler {
                    detail: format!("{e:#}"),
                })?;
                Ok(Prepared::Http(pre))
            }
            Compiled::Component(component) => {
                let pre = linkers
                    .p2
                    .instantiate_pre(&component)
                    .map_err(link(LinkTarget::Wasi))?;
                let pre = CommandPre::new(pre).map_err(|e| GuestError::UnsupportedWorld {
                    detail: format!("{e:#}"),
                })?;
                Ok(Prepared::Component(pre))
            }
        }
    }

    /// Which compiler made `prepared`'s code.
    pub(super) fn tier_of(&self, prepared: &Prepared) -> Tier {
        match &self.fast {
            Some(fast) if Engine::same(prepared.engine(), &fast.engine) => Tier::Winch,
            _ => Tier::Cranelift,
        }
    }

    /// Instantiates a prepared image with `config`. Nothing of the guest
    /// runs yet; failures here are start errors.
    pub async fn instantiate(
        &self,
        prepared: &Prepared,
        config: GuestConfig,
    ) -> Result<Guest, GuestError> {
        let live = config.limiter.live_limits();
        tracing::debug!(tier = %self.tier_of(prepared), "instantiating the guest");
        match prepared {
            Prepared::Http(pre) => {
                // Checked now so that a bad mount is a start error; each
                // request builds its own context.
                wasi_builder(&config)?;
                Ok(Guest::Http(HttpFunction::new(pre.clone(), config)))
            }
            Prepared::Module(pre) => {
                let mut builder = wasi_builder(&config)?;
                // The engine that compiled the code: Winch's or Cranelift's.
                let mut store = Store::new(
                    prepared.engine(),
                    P1State {
                        wasi: builder.build_p1(),
                        limiter: config.limiter,
                        preopen_dirs: config
                            .preopens
                            .iter()
                            .map(|p| p.host_path.clone())
                            .collect(),
                    },
                );
                store.limiter(|s| &mut s.limiter);
                yield_by_shares(&mut store, live.clone());
                let instance = pre.instantiate_async(&mut store).await.map_err(|e| {
                    GuestError::Instantiate {
                        kind: WasmKind::Module,
                        detail: format!("{e:#}"),
                    }
                })?;
                let start = instance
                    .get_typed_func::<(), ()>(&mut store, "_start")
                    .map_err(|e| GuestError::StartSignature {
                        detail: format!("{e:#}"),
                    })?;
                Ok(Guest::Module { store, start })
            }
            Prepared::Component(pre) => {
                let mut builder = wasi_builder(&config)?;
                let mut store = Store::new(
                    prepared.engine(),
                    P2State::new(
                        builder.build(),
                        config.limiter,
                        &config.network,
                        &config.dns,
                        &config.egress_tls,
                    ),
                );
                store.limiter(|s| &mut s.limiter);
                yield_by_shares(&mut store, live.clone());
                let command = pre.instantiate_async(&mut store).await.map_err(|e| {
                    GuestError::Instantiate {
                        kind: WasmKind::Component,
                        detail: format!("{e:#}"),
                    }
                })?;
                Ok(Guest::Component { store, command })
            }
        }
    }
}

/// The limits of the HTTP engine's pool, unless configured.
pub const HTTP_POOL_INSTANCES: u32 = 256;

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::model::image::WasmKind;
    use crate::network::GuestNetwork;
    use crate::runtime::guest::{GuestExit, TRAP_EXIT_CODE};
    use crate::runtime::host::GuestStdio;
    use crate::runtime::limits::MemoryLimiter;
    use crate::runtime::logs::ContainerLog;

    pub(crate) fn log() -> (tempfile::TempDir, ContainerLog, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let log = ContainerLog::open(Some(&path)).unwrap();
        (dir, log, path)
    }

    pub(crate) fn config(log: &ContainerLog) -> GuestConfig {
        GuestConfig {
            argv: vec!["x".into()],
            env: vec![],
            preopens: vec![],
            working_dir: None,
            log: log.clone(),
            limiter: MemoryLimiter::new(None, crate::runtime::limits::PodMemory::new(None)),
            network: GuestNetwork::None,
            dns: Arc::default(),
            stdio: GuestStdio::default(),
            egress_tls: crate::runtime::egress::tls_config(None).unwrap(),
        }
    }

    #[tokio::test]
    async fn memory_growth_past_the_limit_fails_and_is_flagged() {
        let engine = WasmEngine::new(None).unwrap();
        // Grows one page at a time until memory.grow fails, then traps.
        let bytes = wat::parse_str(
            r#"(module
            (memory (export "memory") 1)
            (func (export "_start")
                (loop $grow
                    (br_if $grow (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
                unreachable))"#,
        )
        .unwrap();
        let pre = engine
            .prepare(&Digest::of(&bytes), WasmKind::Module, &bytes)
            .unwrap();
        let (_d, log, _) = log();
        let pod = crate::runtime::limits::PodMemory::new(None);
        let mut config = config(&log);
        config.limiter = MemoryLimiter::new(Some(4 * 65536), pod.clone());
        let oom = config.limiter.oom_flag();
        let guest = engine.instantiate(&pre, config).await.unwrap();
        assert_eq!(pod.used(), 65536, "the initial page is charged");
        let exit = guest.run().await;
        assert_eq!(exit.code, TRAP_EXIT_CODE);
        assert!(oom.load(std::sync::atomic::Ordering::Relaxed));
        assert_eq!(pod.used(), 0, "the store's memory is released when it ends");
    }

    pub(crate) const EXIT_7: &str = r#"(module
        (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
        (memory (export "memory") 1)
        (func (export "_start") (call $exit (i32.const 7))))"#;

    #[tokio::test]
    async fn proc_exit_gives_its_code() {
        let engine = WasmEngine::new(None).unwrap();
        let bytes = wat::parse_str(EXIT_7).unwrap();
        let pre = engine
            .prepare(&Digest::of(&bytes), WasmKind::Module, &bytes)
            .unwrap();
        let (_d, log, _) = log();
        let guest = engine.instantiate(&pre, config(&log)).await.unwrap();
        assert_eq!(
            guest.run().await,
            GuestExit {
                code: 7,
                message: String::new()
            }
        );
    }

    #[tokio::test]
    async fn trap_gives_134_with_the_trap_text() {
        let engine = WasmEngine::new(None).unwrap();
        let bytes = wat::parse_str(
            r#"(module (memory (export "memory") 1) (func (export "_start") unreachable))"#,
        )
        .unwrap();
        let pre = engine
            .prepare(&Digest::of(&bytes), WasmKind::Module, &bytes)
            .unwrap();
        let (_d, log, _) = log();
        let exit = engine
            .instantiate(&pre, config(&log))
            .await
            .unwrap()
            .run()
            .await;
        assert_eq!(exit.code, TRAP_EXIT_CODE);
        assert!(exit.message.contains("unreachable"), "{}", exit.message);
    }

    #[tokio::test]
    async fn a_tight_loop_is_stopped_by_dropping_the_run() {
        let engine = WasmEngine::new(None).unwrap();
        let bytes = wat::parse_str(
            r#"(module (memory (export "memory") 1) (func (export "_start") (loop br 0)))"#,
        )
        .unwrap();
        let pre = engine
            .prepare(&Digest::of(&bytes), WasmKind::Module, &bytes)
            .unwrap();
        let (_d, log, _) = log();
        let guest = engine.instantiate(&pre, config(&log)).await.unwrap();
        let task = tokio::spawn(guest.run());
        tokio::time::sleep(Duration::from_millis(50)).await;
        task.abort();
        let err = tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("the guest did not stop")
            .unwrap_err();
        assert!(err.is_cancelled());
    }

    #[tokio::test]
    async fn stdout_goes_to_the_log() {
        let engine = WasmEngine::new(None).unwrap();
        let bytes = wat::parse_str(r#"(module
            (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (data (i32.const 16) "hi\n")
            (func (export "_start")
                (i32.store (i32.const 0) (i32.const 16))
                (i32.store (i32.const 4) (i32.const 3))
                (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#).unwrap();
        let pre = engine
            .prepare(&Digest::of(&bytes), WasmKind::Module, &bytes)
            .unwrap();
        let (_d, log, path) = log();
        let exit = engine
            .instantiate(&pre, config(&log))
            .await
            .unwrap()
            .run()
            .await;
        assert_eq!(exit.code, 0);
        log.close();
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.ends_with(" stdout F hi\n"), "{text}");
    }

    #[tokio::test]
    async fn missing_import_is_a_link_error() {
        let engine = WasmEngine::new(None).unwrap();
        let bytes =
            wat::parse_str(r#"(module (import "nope" "f" (func)) (func (export "_start")))"#)
                .unwrap();
        let err = engine
            .prepare(&Digest::of(&bytes), WasmKind::Module, &bytes)
            .err()
            .unwrap();
        assert!(
            matches!(
                err,
                GuestError::Link {
                    target: LinkTarget::Preview1,
                    ..
                }
            ),
            "{err:?}"
        );
        let err = err.to_string();
        assert!(
            err.contains("cannot be linked") && err.contains("nope"),
            "{err}"
        );
        let err = engine
            .prepare(
                &Digest::of(b"\0asm\x01\0\0\0garbage"),
                WasmKind::Module,
                b"\0asm\x01\0\0\0garbage",
            )
            .err()
            .unwrap();
        assert!(
            matches!(
                err,
                GuestError::InvalidWasm {
                    kind: WasmKind::Module,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("invalid Wasm module"), "{err}");
    }

    #[test]
    fn a_library_module_is_not_a_command() {
        let engine = WasmEngine::new(None).unwrap();
        let bytes = wat::parse_str(r#"(module (func (export "f")))"#).unwrap();
        let err = engine
            .prepare(&Digest::of(&bytes), WasmKind::Module, &bytes)
            .err()
            .unwrap();
        assert!(matches!(err, GuestError::NotACommand), "{err:?}");
        assert!(err.to_string().contains("not a WASI command"), "{err}");
    }
}
