//! The node's one wasmtime [`Engine`]: compiles images into ready-to-link
//! templates (cached in memory by digest, their compiled artifacts kept on
//! disk by the `artifacts` module), and runs guests as async tasks.
//!
//! The engine sees bytes, argv, environment, preopened directories and log
//! streams — never a CRI request. Guests yield to the executor on every
//! epoch tick, so a guest in a tight loop neither holds a worker thread nor
//! escapes being stopped: dropping the future returned by [`Guest::run`]
//! ends it at its next yield.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use wasmtime::component::{Component, Linker as ComponentLinker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, InstancePre, Linker, Module,
    PoolingAllocationConfig, Store, UpdateDeadline,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::artifacts::{ArtifactStore, Compiled};
use crate::http::{HttpFunction, PodHooks};
use crate::ids::Digest;
use crate::image::WasmKind;
use crate::limits::{LiveLimits, MemoryLimiter};
use crate::logs::{ContainerLog, Stream};
use crate::network::dns::{Lookup, LookupError};
use crate::network::{DnsSettings, GuestNetwork, Resolver};

/// How often the epoch advances; a running guest yields at least this often.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The exit code given for a trap, as a shell reports SIGABRT (128 + 6).
pub const TRAP_EXIT_CODE: i32 = 134;

/// Store data of a core-module (WASI preview1) guest.
pub struct P1State {
    wasi: WasiP1Ctx,
    limiter: MemoryLimiter,
}

/// Store data of a component (WASI 0.2) guest: a command, or one request
/// of an HTTP function.
pub struct P2State {
    wasi: WasiCtx,
    table: ResourceTable,
    http: WasiHttpCtx,
    hooks: PodHooks,
    resolver: Resolver,
    limiter: MemoryLimiter,
}

impl WasiHttpView for P2State {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

impl WasiView for P2State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// A compiled and linked image, ready to instantiate cheaply.
#[derive(Clone)]
pub enum Prepared {
    Module(InstancePre<P1State>),
    Component(CommandPre<P2State>),
    /// A `wasi:http/proxy` component, instantiated per request (on the
    /// pooling engine).
    Http(ProxyPre<P2State>),
}

/// A directory of the host visible to the guest.
#[derive(Clone, Debug)]
pub struct Preopen {
    pub host_path: std::path::PathBuf,
    pub guest_path: String,
    pub readonly: bool,
}

/// Everything a guest runs with.
pub struct GuestConfig {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub preopens: Vec<Preopen>,
    pub working_dir: Option<String>,
    pub log: ContainerLog,
    /// Charges the guest's memories and tables to its limits.
    pub limiter: MemoryLimiter,
    /// Whether the guest may open sockets (WASI 0.2 `wasi:sockets`, TCP
    /// and UDP). The caller polls the guest inside its pod's namespace.
    pub network: GuestNetwork,
    /// The pod's DNS settings, for `wasi:sockets/ip-name-lookup`.
    pub dns: Arc<DnsSettings>,
    /// Streams a client is connected to, instead of the log.
    pub stdio: GuestStdio,
    /// How outgoing HTTPS verifies servers.
    pub egress_tls: crate::egress::TlsConfig,
}

/// A guest's standard streams when they are not (only) its log: an
/// attachable stdin, or an exec client's output. Unset, stdin is empty and
/// stdout and stderr go to the log.
#[derive(Clone, Default)]
pub struct GuestStdio {
    pub stdin: Option<Arc<wasmtime_wasi::cli::AsyncStdinStream>>,
    pub stdout: Option<crate::stdio::ChannelOutput>,
    pub stderr: Option<crate::stdio::ChannelOutput>,
}

/// How a guest ended by itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestExit {
    pub code: i32,
    /// Empty for a normal exit; the trap or error text otherwise.
    pub message: String,
}

/// How images were made ready since the engine was built; lets a caller
/// (or a test) tell whether a container start compiled anything.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Cranelift compilations ([`WasmEngine::prepare`] and
    /// [`WasmEngine::precompile`]).
    pub compiled: u64,
    /// Artifacts memory-mapped from the disk cache instead of compiling.
    pub loaded_from_disk: u64,
    /// [`WasmEngine::prepare`] calls answered from the in-memory cache.
    pub memory_hits: u64,
}

#[derive(Default)]
struct Counters {
    compiled: AtomicU64,
    loaded_from_disk: AtomicU64,
    memory_hits: AtomicU64,
}

/// The engine, its linkers, the cache of prepared images and the on-disk
/// store of precompiled artifacts.
pub struct WasmEngine {
    engine: Engine,
    p1_linker: Linker<P1State>,
    p2_linker: ComponentLinker<P2State>,
    /// HTTP functions get an instance per request: this engine allocates
    /// them from a pool, which makes instantiation cheap.
    http_engine: Engine,
    http_linker: ComponentLinker<P2State>,
    prepared: Mutex<HashMap<Digest, Prepared>>,
    artifacts: Option<ArtifactStore>,
    http_artifacts: Option<ArtifactStore>,
    /// One lock per digest being made ready, so that an image is compiled
    /// once even when a container start and the puller's precompilation
    /// race.
    building: Mutex<HashMap<Digest, Arc<Mutex<()>>>>,
    counters: Counters,
}

impl WasmEngine {
    /// Builds the engine and starts the epoch ticker thread (which ends when
    /// the engine is dropped).
    ///
    /// With a `cache_dir`, compiled images are kept there (as
    /// `<cache_dir>/<engine fingerprint>/<wasm digest hex>.cwasm`) and later engines load them instead of
    /// compiling; artifacts of other wasmtime versions or settings found
    /// there are deleted. Without one, every engine compiles afresh.
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Arc<Self>, String> {
        Self::with_pool(cache_dir, HTTP_POOL_INSTANCES)
    }

    /// As [`new`](Self::new), with room for `pool_instances` concurrent
    /// HTTP function instances.
    pub fn with_pool(cache_dir: Option<PathBuf>, pool_instances: u32) -> Result<Arc<Self>, String> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.wasm_component_model(true);
        let engine =
            Engine::new(&config).map_err(|e| format!("creating wasmtime engine: {e:#}"))?;
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
        let http_engine = Engine::new(&config)
            .map_err(|e| format!("creating the pooling wasmtime engine: {e:#}"))?;

        let mut p1_linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut p1_linker, |s: &mut P1State| &mut s.wasi)
            .map_err(|e| format!("linking WASI preview1: {e:#}"))?;
        let p2_linker = make_p2_linker(&engine)?;
        let http_linker = make_p2_linker(&http_engine)?;
        let open = |dir: &std::path::Path, engine: &Engine| {
            ArtifactStore::open(dir, engine)
                .map_err(|e| format!("opening the precompiled artifact cache: {e}"))
        };
        let artifacts = cache_dir.as_deref().map(|d| open(d, &engine)).transpose()?;
        let http_artifacts = cache_dir
            .as_deref()
            .map(|d| open(&d.join("http"), &http_engine))
            .transpose()?;

        let this = Arc::new(Self {
            engine,
            p1_linker,
            p2_linker,
            http_engine,
            http_linker,
            prepared: Mutex::new(HashMap::new()),
            artifacts,
            http_artifacts,
            building: Mutex::new(HashMap::new()),
            counters: Counters::default(),
        });
        let weak = Arc::downgrade(&this);
        std::thread::Builder::new()
            .name("wasmlet-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.engine.increment_epoch();
                    engine.http_engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(|e| format!("starting the epoch thread: {e}"))?;
        Ok(this)
    }

    /// Makes `bytes` (the Wasm whose digest is `digest`) ready to
    /// instantiate and links it against WASI: from the in-memory cache, else
    /// by memory-mapping its artifact from the disk cache, else by compiling
    /// it (and writing the artifact). Errors are written for the user: they
    /// end up in the container's status message and log.
    pub fn prepare(
        &self,
        digest: &Digest,
        kind: WasmKind,
        bytes: &[u8],
    ) -> Result<Prepared, String> {
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
                tracing::debug!(%digest, "loaded precompiled artifact");
                compiled
            }
            None => self.compile(http, digest, kind, bytes)?,
        };
        let prepared = self.link(compiled, http)?;
        if let Ok(mut m) = self.prepared.lock() {
            m.insert(digest.clone(), prepared.clone());
        }
        Ok(prepared)
    }

    /// Makes sure the disk cache holds a sound artifact of `bytes`,
    /// compiling it if not, and keeps nothing in memory. The image puller
    /// calls this in the background after a pull so that the first
    /// container start does not compile. Without a cache directory this does
    /// nothing. Errors (the bytes do not compile, the artifact cannot be
    /// written) are written for the user.
    pub fn precompile(&self, digest: &Digest, kind: WasmKind, bytes: &[u8]) -> Result<(), String> {
        let http = kind == WasmKind::Component && exports_http_handler(bytes);
        let (engine, artifacts) = self.engine_for(http);
        let Some(store) = artifacts else {
            return Ok(());
        };
        let slot = self.building_slot(digest);
        let _building = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if store.verified(digest, kind).is_some() {
            return Ok(());
        }
        let artifact = match kind {
            WasmKind::Module => engine
                .precompile_module(bytes)
                .map_err(|e| format!("invalid Wasm module: {e:#}"))?,
            WasmKind::Component => engine
                .precompile_component(bytes)
                .map_err(|e| format!("invalid Wasm component: {e:#}"))?,
        };
        self.counters.compiled.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%digest, "compiled Wasm");
        store
            .store(digest, kind, &artifact)
            .map(drop)
            .map_err(|e| e.to_string())
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

    /// What the engine did to make images ready since it was built.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            compiled: self.counters.compiled.load(Ordering::Relaxed),
            loaded_from_disk: self.counters.loaded_from_disk.load(Ordering::Relaxed),
            memory_hits: self.counters.memory_hits.load(Ordering::Relaxed),
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
        }
        hit
    }

    fn building_slot(&self, digest: &Digest) -> Arc<Mutex<()>> {
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
    ) -> Result<Compiled, String> {
        let (engine, artifacts) = self.engine_for(http);
        let compiled = match kind {
            WasmKind::Module => Compiled::Module(
                Module::new(engine, bytes).map_err(|e| format!("invalid Wasm module: {e:#}"))?,
            ),
            WasmKind::Component => Compiled::Component(
                Component::new(engine, bytes)
                    .map_err(|e| format!("invalid Wasm component: {e:#}"))?,
            ),
        };
        self.counters.compiled.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%digest, http, "compiled Wasm");
        if let Some(store) = artifacts {
            let written = compiled
                .serialize()
                .map_err(|e| format!("serializing: {e:#}"))
                .and_then(|artifact| {
                    store
                        .store(digest, kind, &artifact)
                        .map_err(|e| e.to_string())
                });
            if let Err(error) = written {
                tracing::warn!(%digest, %error, "cannot keep the precompiled artifact");
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

    /// Links a compiled image against WASI.
    fn link(&self, compiled: Compiled, http: bool) -> Result<Prepared, String> {
        match compiled {
            Compiled::Module(module) => {
                if module.get_export("_start").is_none() {
                    return Err(
                        "the module exports no `_start` function: it is not a WASI command \
                         (a library or reactor module cannot run as a container)"
                            .to_owned(),
                    );
                }
                let pre = self.p1_linker.instantiate_pre(&module).map_err(|e| {
                    format!("the module cannot be linked against WASI preview1: {e:#}")
                })?;
                Ok(Prepared::Module(pre))
            }
            Compiled::Component(component) if http => {
                let pre = self.http_linker.instantiate_pre(&component).map_err(|e| {
                    format!("the component cannot be linked against WASI 0.2 and wasi:http: {e:#}")
                })?;
                let pre = ProxyPre::new(pre).map_err(|e| {
                    format!("the component does not export a usable `wasi:http/incoming-handler` ({e:#})")
                })?;
                Ok(Prepared::Http(pre))
            }
            Compiled::Component(component) => {
                let pre = self.p2_linker.instantiate_pre(&component).map_err(|e| {
                    format!("the component cannot be linked against WASI 0.2: {e:#}")
                })?;
                let pre = CommandPre::new(pre).map_err(|e| {
                    format!(
                        "unsupported WASI world: the component exports neither `wasi:cli/run` \
                         (a command) nor `wasi:http/incoming-handler` (an HTTP function) ({e:#})"
                    )
                })?;
                Ok(Prepared::Component(pre))
            }
        }
    }

    /// Instantiates a prepared image with `config`. Nothing of the guest
    /// runs yet; failures here are start errors.
    pub async fn instantiate(
        &self,
        prepared: &Prepared,
        config: GuestConfig,
    ) -> Result<Guest, String> {
        let live = config.limiter.live_limits();
        match prepared {
            Prepared::Http(pre) => {
                // Checked now so that a bad mount is a start error; each
                // request builds its own context.
                wasi_builder(&config)?;
                Ok(Guest::Http(HttpFunction::new(pre.clone(), config)))
            }
            Prepared::Module(pre) => {
                let mut builder = wasi_builder(&config)?;
                let mut store = Store::new(
                    &self.engine,
                    P1State {
                        wasi: builder.build_p1(),
                        limiter: config.limiter,
                    },
                );
                store.limiter(|s| &mut s.limiter);
                yield_by_shares(&mut store, live.clone());
                let instance = pre
                    .instantiate_async(&mut store)
                    .await
                    .map_err(|e| format!("instantiating the module: {e:#}"))?;
                let start = instance
                    .get_typed_func::<(), ()>(&mut store, "_start")
                    .map_err(|e| format!("the module's `_start` has the wrong type: {e:#}"))?;
                Ok(Guest::Module { store, start })
            }
            Prepared::Component(pre) => {
                let mut builder = wasi_builder(&config)?;
                let mut store = Store::new(
                    &self.engine,
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
                let command = pre
                    .instantiate_async(&mut store)
                    .await
                    .map_err(|e| format!("instantiating the component: {e:#}"))?;
                Ok(Guest::Component { store, command })
            }
        }
    }
}

/// The limits of the HTTP engine's pool, unless configured.
pub const HTTP_POOL_INSTANCES: u32 = 256;

fn make_p2_linker(engine: &Engine) -> Result<ComponentLinker<P2State>, String> {
    let mut linker = ComponentLinker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)
        .map_err(|e| format!("linking WASI 0.2: {e:#}"))?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
        .map_err(|e| format!("linking wasi:http: {e:#}"))?;
    link_name_lookup(&mut linker).map_err(|e| format!("linking name lookup: {e:#}"))?;
    Ok(linker)
}

impl P2State {
    pub(crate) fn new(
        wasi: WasiCtx,
        limiter: MemoryLimiter,
        network: &GuestNetwork,
        dns: &Arc<DnsSettings>,
        egress_tls: &crate::egress::TlsConfig,
    ) -> Self {
        let resolver = Resolver {
            network: network.clone(),
            dns: dns.clone(),
        };
        Self {
            wasi,
            table: ResourceTable::new(),
            http: WasiHttpCtx::new(),
            hooks: PodHooks::new(resolver.clone(), egress_tls.clone()),
            resolver,
            limiter,
        }
    }
}

/// Replaces wasmtime-wasi's `wasi:sockets/ip-name-lookup` (which asks the
/// host's resolver, from the host's namespace) with lookups through the
/// pod's own DNS settings and namespace.
fn link_name_lookup(linker: &mut ComponentLinker<P2State>) -> wasmtime::Result<()> {
    use wasmtime::component::{Resource, ResourceType};
    use wasmtime_wasi::p2::bindings::sockets::network::{ErrorCode, IpAddress};
    use wasmtime_wasi::p2::{DynPollable, Network};

    fn code(e: &LookupError) -> ErrorCode {
        match e {
            LookupError::InvalidName => ErrorCode::InvalidArgument,
            LookupError::NotFound => ErrorCode::NameUnresolvable,
            LookupError::Temporary => ErrorCode::TemporaryResolverFailure,
            LookupError::Permanent => ErrorCode::PermanentResolverFailure,
        }
    }
    fn ip(addr: std::net::IpAddr) -> IpAddress {
        match addr {
            std::net::IpAddr::V4(a) => {
                let [a, b, c, d] = a.octets();
                IpAddress::Ipv4((a, b, c, d))
            }
            std::net::IpAddr::V6(a) => {
                let [a, b, c, d, e, f, g, h] = a.segments();
                IpAddress::Ipv6((a, b, c, d, e, f, g, h))
            }
        }
    }

    linker.allow_shadowing(true);
    let mut lookup = linker.instance("wasi:sockets/ip-name-lookup@0.2.12")?;
    lookup.resource(
        "resolve-address-stream",
        ResourceType::host::<Lookup>(),
        |mut store, rep| {
            store
                .data_mut()
                .table
                .delete(Resource::<Lookup>::new_own(rep))?;
            Ok(())
        },
    )?;
    lookup.func_wrap(
        "resolve-addresses",
        |mut store, (network, name): (Resource<Network>, String)| {
            let state = store.data_mut();
            state.table.get(&network)?;
            if !state.resolver.network.allows_sockets() {
                return Ok((Err(ErrorCode::PermanentResolverFailure),));
            }
            let started = Lookup::start(state.resolver.clone(), name);
            Ok((Ok(state.table.push(started)?),))
        },
    )?;
    lookup.func_wrap(
        "[method]resolve-address-stream.resolve-next-address",
        |mut store, (this,): (Resource<Lookup>,)| {
            let lookup = store.data_mut().table.get_mut(&this)?;
            Ok((match lookup.next_address() {
                Ok(addr) => Ok(addr.map(ip)),
                Err(None) => Err(ErrorCode::WouldBlock),
                Err(Some(e)) => Err(code(&e)),
            },))
        },
    )?;
    lookup.func_wrap(
        "[method]resolve-address-stream.subscribe",
        |mut store, (this,): (Resource<Lookup>,)| -> wasmtime::Result<(Resource<DynPollable>,)> {
            Ok((wasmtime_wasi::p2::subscribe(
                &mut store.data_mut().table,
                this,
            )?,))
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// A new store for one request of an HTTP function.
pub(crate) fn http_store(
    pre: &ProxyPre<P2State>,
    config: &GuestConfig,
) -> Result<Store<P2State>, String> {
    let live = config.limiter.live_limits();
    let mut builder = wasi_builder(config)?;
    let mut store = Store::new(
        pre.engine(),
        P2State::new(
            builder.build(),
            config.limiter.sibling(),
            &config.network,
            &config.dns,
            &config.egress_tls,
        ),
    );
    store.limiter(|s| &mut s.limiter);
    yield_by_shares(&mut store, live);
    Ok(store)
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

/// The WASI context a guest gets: argv, environment, stdio to its log,
/// its mounts and, with a network, sockets.
fn wasi_builder(config: &GuestConfig) -> Result<WasiCtxBuilder, String> {
    let mut builder = WasiCtxBuilder::new();
    builder.args(&config.argv).envs(&config.env);
    match &config.stdio.stdout {
        Some(out) => builder.stdout(out.clone()),
        None => builder.stdout(config.log.stream(Stream::Stdout)),
    };
    match &config.stdio.stderr {
        Some(out) => builder.stderr(out.clone()),
        None => builder.stderr(config.log.stream(Stream::Stderr)),
    };
    if let Some(stdin) = &config.stdio.stdin {
        builder.stdin(stdin.clone());
    }
    if let Some(cwd) = &config.working_dir {
        builder.initial_cwd(cwd);
    }
    if config.network.allows_sockets() {
        // Any address: the namespace is the boundary. Name lookup stays
        // off: it would run on the host's resolver threads, outside the
        // pod's namespace.
        builder.allow_tcp(true).allow_udp(true).inherit_network();
    }
    for p in &config.preopens {
        let perms = if p.readonly {
            FsPerms::ReadOnly
        } else {
            FsPerms::ReadWrite
        };
        builder
            .preopened_dir(&p.host_path, &p.guest_path, perms)
            .map_err(|e| format!("mounting {:?} at {:?}: {e:#}", p.host_path, p.guest_path))?;
    }
    Ok(builder)
}

/// Makes the guest yield to the executor every `yield_ticks` epoch ticks,
/// read live, so `cpu_shares` weight busy guests against each other.
fn yield_by_shares<T: 'static>(store: &mut Store<T>, live: Arc<LiveLimits>) {
    store.set_epoch_deadline(live.yield_ticks());
    store.epoch_deadline_callback(move |_| Ok(UpdateDeadline::Yield(live.yield_ticks())));
}

/// An instantiated guest, not yet running.
pub enum Guest {
    Module {
        store: Store<P1State>,
        start: wasmtime::TypedFunc<(), ()>,
    },
    Component {
        store: Store<P2State>,
        command: wasmtime_wasi::p2::bindings::Command,
    },
    /// An HTTP function: run by the agent's HTTP server, not by
    /// [`Guest::run`].
    Http(HttpFunction),
}

impl Guest {
    /// Runs the guest to its end. Dropping the future stops the guest at its
    /// next yield point and frees its store.
    pub async fn run(self) -> GuestExit {
        let result = match self {
            Guest::Module { mut store, start } => start.call_async(&mut store, ()).await,
            Guest::Component { mut store, command } => {
                match command.wasi_cli_run().call_run(&mut store).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(())) => {
                        return GuestExit {
                            code: 1,
                            message: "wasi:cli/run returned an error".to_owned(),
                        };
                    }
                    Err(e) => Err(e),
                }
            }
            Guest::Http(_) => {
                return GuestExit {
                    code: TRAP_EXIT_CODE,
                    message: "an HTTP function is served, not run".to_owned(),
                };
            }
        };
        match result {
            Ok(()) => GuestExit {
                code: 0,
                message: String::new(),
            },
            Err(e) => match e.downcast_ref::<I32Exit>() {
                Some(I32Exit(code)) => GuestExit {
                    code: *code,
                    message: String::new(),
                },
                None => GuestExit {
                    code: TRAP_EXIT_CODE,
                    message: trap_message(&e),
                },
            },
        }
    }
}

/// The trap's own text first (what the user needs), then the backtrace.
fn trap_message(e: &wasmtime::Error) -> String {
    let root = e.root_cause().to_string();
    let full = format!("{e:?}");
    if full.contains(&root) && full != root {
        format!("{root}\n{full}")
    } else {
        full
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> (tempfile::TempDir, ContainerLog, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let log = ContainerLog::open(Some(&path)).unwrap();
        (dir, log, path)
    }

    fn config(log: &ContainerLog) -> GuestConfig {
        GuestConfig {
            argv: vec!["x".into()],
            env: vec![],
            preopens: vec![],
            working_dir: None,
            log: log.clone(),
            limiter: MemoryLimiter::new(None, crate::limits::PodMemory::new(None)),
            network: GuestNetwork::None,
            dns: Arc::default(),
            stdio: GuestStdio::default(),
            egress_tls: crate::egress::tls_config(None).unwrap(),
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
        let pod = crate::limits::PodMemory::new(None);
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

    const EXIT_7: &str = r#"(module
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
        assert!(err.contains("invalid Wasm module"), "{err}");
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
                memory_hits: 0
            }
        );
        drop(first);

        let (second, _) = prepare_exit_7(cache.path()).await;
        assert_eq!(
            second.stats(),
            EngineStats {
                compiled: 0,
                loaded_from_disk: 1,
                memory_hits: 0
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
                memory_hits: 0
            }
        );

        let err = engine
            .precompile(&Digest::of(b"junk"), WasmKind::Module, b"junk")
            .unwrap_err();
        assert!(err.contains("invalid Wasm module"), "{err}");
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
                memory_hits: 0
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
