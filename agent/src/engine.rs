//! The node's one wasmtime [`Engine`]: compiles images into ready-to-link
//! templates (cached by digest), and runs guests as async tasks.
//!
//! The engine sees bytes, argv, environment, preopened directories and log
//! streams — never a CRI request. Guests yield to the executor on every
//! epoch tick, so a guest in a tight loop neither holds a worker thread nor
//! escapes being stopped: dropping the future returned by [`Guest::run`]
//! ends it at its next yield.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wasmtime::component::{Component, Linker as ComponentLinker, ResourceTable};
use wasmtime::{Config, Engine, InstancePre, Linker, Module, Store};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::ids::Digest;
use crate::image::WasmKind;
use crate::logs::{ContainerLog, Stream};

/// How often the epoch advances; a running guest yields at least this often.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The exit code given for a trap, as a shell reports SIGABRT (128 + 6).
pub const TRAP_EXIT_CODE: i32 = 134;

/// Store data of a core-module (WASI preview1) guest.
pub struct P1State {
    wasi: WasiP1Ctx,
}

/// Store data of a component (WASI 0.2) guest.
pub struct P2State {
    wasi: WasiCtx,
    table: ResourceTable,
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
}

/// How a guest ended by itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestExit {
    pub code: i32,
    /// Empty for a normal exit; the trap or error text otherwise.
    pub message: String,
}

/// The engine, its linkers and the cache of prepared images.
pub struct WasmEngine {
    engine: Engine,
    p1_linker: Linker<P1State>,
    p2_linker: ComponentLinker<P2State>,
    prepared: Mutex<HashMap<Digest, Prepared>>,
}

impl WasmEngine {
    /// Builds the engine and starts the epoch ticker thread (which ends when
    /// the engine is dropped).
    pub fn new() -> Result<Arc<Self>, String> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.wasm_component_model(true);
        let engine =
            Engine::new(&config).map_err(|e| format!("creating wasmtime engine: {e:#}"))?;

        let mut p1_linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut p1_linker, |s: &mut P1State| &mut s.wasi)
            .map_err(|e| format!("linking WASI preview1: {e:#}"))?;
        let mut p2_linker = ComponentLinker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut p2_linker)
            .map_err(|e| format!("linking WASI 0.2: {e:#}"))?;

        let this = Arc::new(Self {
            engine,
            p1_linker,
            p2_linker,
            prepared: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&this);
        std::thread::Builder::new()
            .name("wasmlet-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(|e| format!("starting the epoch thread: {e}"))?;
        Ok(this)
    }

    /// Compiles `bytes` and links it against WASI, or returns the cached
    /// result for `digest`. Errors are written for the user: they end up in
    /// the container's status message and log.
    pub fn prepare(
        &self,
        digest: &Digest,
        kind: WasmKind,
        bytes: &[u8],
    ) -> Result<Prepared, String> {
        if let Some(p) = self
            .prepared
            .lock()
            .ok()
            .and_then(|m| m.get(digest).cloned())
        {
            return Ok(p);
        }
        let prepared = match kind {
            WasmKind::Module => {
                let module = Module::new(&self.engine, bytes)
                    .map_err(|e| format!("invalid Wasm module: {e:#}"))?;
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
                Prepared::Module(pre)
            }
            WasmKind::Component => {
                let component = Component::new(&self.engine, bytes)
                    .map_err(|e| format!("invalid Wasm component: {e:#}"))?;
                let pre = self.p2_linker.instantiate_pre(&component).map_err(|e| {
                    format!("the component cannot be linked against WASI 0.2: {e:#}")
                })?;
                let pre = CommandPre::new(pre).map_err(|e| {
                    format!(
                        "unsupported WASI world: the component does not export `wasi:cli/run` \
                         ({e:#})"
                    )
                })?;
                Prepared::Component(pre)
            }
        };
        if let Ok(mut m) = self.prepared.lock() {
            m.insert(digest.clone(), prepared.clone());
        }
        Ok(prepared)
    }

    /// Forgets the prepared template of an image that was removed.
    pub fn forget(&self, digest: &Digest) {
        if let Ok(mut m) = self.prepared.lock() {
            m.remove(digest);
        }
    }

    /// Instantiates a prepared image with `config`. Nothing of the guest
    /// runs yet; failures here are start errors.
    pub async fn instantiate(
        &self,
        prepared: &Prepared,
        config: GuestConfig,
    ) -> Result<Guest, String> {
        let mut builder = WasiCtxBuilder::new();
        builder
            .args(&config.argv)
            .envs(&config.env)
            .stdout(config.log.stream(Stream::Stdout))
            .stderr(config.log.stream(Stream::Stderr));
        if let Some(cwd) = &config.working_dir {
            builder.initial_cwd(cwd);
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
        match prepared {
            Prepared::Module(pre) => {
                let mut store = Store::new(
                    &self.engine,
                    P1State {
                        wasi: builder.build_p1(),
                    },
                );
                store.epoch_deadline_async_yield_and_update(1);
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
                let mut store = Store::new(
                    &self.engine,
                    P2State {
                        wasi: builder.build(),
                        table: ResourceTable::new(),
                    },
                );
                store.epoch_deadline_async_yield_and_update(1);
                let command = pre
                    .instantiate_async(&mut store)
                    .await
                    .map_err(|e| format!("instantiating the component: {e:#}"))?;
                Ok(Guest::Component { store, command })
            }
        }
    }
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
        }
    }

    const EXIT_7: &str = r#"(module
        (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
        (memory (export "memory") 1)
        (func (export "_start") (call $exit (i32.const 7))))"#;

    #[tokio::test]
    async fn proc_exit_gives_its_code() {
        let engine = WasmEngine::new().unwrap();
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
        let engine = WasmEngine::new().unwrap();
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
        let engine = WasmEngine::new().unwrap();
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
        let engine = WasmEngine::new().unwrap();
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
        let engine = WasmEngine::new().unwrap();
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
}
