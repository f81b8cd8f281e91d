//! What a guest's store holds and what it is linked against: the WASI
//! (and `wasi:http`) host state, the linkers with the pod's own name lookup,
//! and the WASI context built from a guest's configuration.

use std::sync::Arc;

use wasmtime::component::{Linker as ComponentLinker, ResourceTable};
use wasmtime::{Engine, Store, UpdateDeadline};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::model::network::DnsSettings;
use crate::network::dns::{Lookup, LookupError};
use crate::network::{GuestNetwork, Resolver};
use crate::runtime::egress::PodHooks;
use crate::runtime::error::{EngineError, GuestError};
use crate::runtime::limits::{LiveLimits, MemoryLimiter};
use crate::runtime::logs::{ContainerLog, Stream};

/// Store data of a core-module (WASI preview1) guest.
pub struct P1State {
    pub(super) wasi: WasiP1Ctx,
    pub(super) limiter: MemoryLimiter,
    /// The host directories of the guest's preopens, in the order they
    /// were given (the guest's descriptors 3, 4...): see `read_only`.
    pub(super) preopen_dirs: Vec<std::path::PathBuf>,
}

/// Store data of a component (WASI 0.2) guest: a command, or one request
/// of an HTTP function.
pub struct P2State {
    wasi: WasiCtx,
    pub(super) table: ResourceTable,
    http: WasiHttpCtx,
    hooks: PodHooks,
    resolver: Resolver,
    pub(super) limiter: MemoryLimiter,
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

/// A directory of the host visible to the guest.
#[derive(Clone, Debug)]
pub struct Preopen {
    pub host_path: std::path::PathBuf,
    pub guest_path: String,
    pub access: Access,
}

/// What a guest may do in a preopened directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Whatever the host's own permissions and mounts let it (a read-only
    /// bind mount answers a write with `EROFS`).
    ReadWrite,
    /// Read: WASI permissions refuse writes (`EPERM`). What the host mounts
    /// below it keeps its own permissions if it is preopened too.
    ReadOnly,
    /// Read, and read-only all the way down.
    RecursiveReadOnly,
}

impl Access {
    pub fn is_read_only(self) -> bool {
        self != Access::ReadWrite
    }
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
    pub egress_tls: crate::runtime::egress::TlsConfig,
}

/// A guest's standard streams when they are not (only) its log: an
/// attachable stdin, or an exec client's output. Unset, stdin is empty and
/// stdout and stderr go to the log.
#[derive(Clone, Default)]
pub struct GuestStdio {
    pub stdin: Option<Arc<wasmtime_wasi::cli::AsyncStdinStream>>,
    pub stdout: Option<crate::runtime::stdio::ChannelOutput>,
    pub stderr: Option<crate::runtime::stdio::ChannelOutput>,
}

pub(super) fn make_p2_linker(engine: &Engine) -> Result<ComponentLinker<P2State>, EngineError> {
    let failed = |what| {
        move |e: wasmtime::Error| EngineError::Link {
            what,
            detail: format!("{e:#}"),
        }
    };
    let mut linker = ComponentLinker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(failed("WASI 0.2"))?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
        .map_err(failed("wasi:http"))?;
    link_name_lookup(&mut linker).map_err(failed("name lookup"))?;
    super::read_only::link_p2(&mut linker).map_err(failed("read-only filesystem errors"))?;
    Ok(linker)
}

impl P2State {
    pub(crate) fn new(
        wasi: WasiCtx,
        limiter: MemoryLimiter,
        network: &GuestNetwork,
        dns: &Arc<DnsSettings>,
        egress_tls: &crate::runtime::egress::TlsConfig,
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
) -> Result<Store<P2State>, GuestError> {
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

/// The WASI context a guest gets: argv, environment, stdio to its log,
/// its mounts and, with a network, sockets.
pub(super) fn wasi_builder(config: &GuestConfig) -> Result<WasiCtxBuilder, GuestError> {
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
        let perms = if p.access.is_read_only() {
            FsPerms::ReadOnly
        } else {
            FsPerms::ReadWrite
        };
        builder
            .preopened_dir(&p.host_path, &p.guest_path, perms)
            .map_err(|e| GuestError::Preopen {
                host_path: p.host_path.clone(),
                guest_path: p.guest_path.clone(),
                detail: format!("{e:#}"),
            })?;
    }
    Ok(builder)
}

/// Makes the guest yield to the executor every `yield_ticks` epoch ticks,
/// read live, so `cpu_shares` weight busy guests against each other.
pub(super) fn yield_by_shares<T: 'static>(store: &mut Store<T>, live: Arc<LiveLimits>) {
    store.set_epoch_deadline(live.yield_ticks());
    store.epoch_deadline_callback(move |_| Ok(UpdateDeadline::Yield(live.yield_ticks())));
}
