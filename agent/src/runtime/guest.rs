//! An instantiated guest and its one run: a command runs to its end (its
//! exit code, or a trap reported with its text); an HTTP function is served
//! instead.

use wasmtime::Store;
use wasmtime_wasi::I32Exit;

use crate::runtime::host::{P1State, P2State};
use crate::runtime::http::HttpFunction;

/// The exit code given for a trap, as a shell reports SIGABRT (128 + 6).
pub const TRAP_EXIT_CODE: i32 = 134;

/// How a guest ended by itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestExit {
    pub code: i32,
    /// Empty for a normal exit; the trap or error text otherwise.
    pub message: String,
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
/// A guest's trap as its tenant may see it (container status, log): the
/// trap and the guest's own Wasm backtrace, never wasmlet's Rust backtrace
/// (which `RUST_BACKTRACE` in the agent's environment would add, with host
/// source paths).
pub(crate) fn trap_message(e: &wasmtime::Error) -> String {
    let root = e.root_cause().to_string();
    let full = without_host_backtrace(&format!("{e:?}")).to_owned();
    if full.contains(&root) && full != root {
        format!("{root}\n{full}")
    } else {
        full
    }
}

/// `debug` (an error's `{:?}`) without the host stack backtrace anyhow
/// appends when backtraces are enabled.
fn without_host_backtrace(debug: &str) -> &str {
    debug
        .split_once("\n\nStack backtrace:")
        .map_or(debug, |(before, _)| before)
        .trim_end()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_backtrace_is_cut_and_the_guest_s_kept() {
        let debug = "error while executing at wasm backtrace:\n    0: 0x1f - trap!main\n\nCaused by:\n    wasm trap: unreachable\n\nStack backtrace:\n   0: wasmtime::runtime::vm\n             at /home/build/.cargo/registry/src/wasmtime/src/lib.rs:12";
        let kept = without_host_backtrace(debug);
        assert!(
            kept.contains("trap!main") && kept.contains("wasm trap: unreachable"),
            "{kept}"
        );
        assert!(
            !kept.contains("Stack backtrace") && !kept.contains("/home/build"),
            "{kept}"
        );
        assert_eq!(without_host_backtrace("plain"), "plain");
    }
}
