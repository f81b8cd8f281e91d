//! Failpoints: named places in the steps that must survive a crash (pull,
//! compile, create, start, stop, remove, CNI ADD/DEL) where a test can make
//! the agent die or fail, to check that what a restart finds is consistent.
//!
//! They exist in debug builds only (the conformance tests run the debug
//! binary); in a release build [`hit`] is an empty inline function and the
//! names are compiled away. They are armed by the environment, read once:
//!
//! ```text
//! WASMLET_FAILPOINTS="create.after_commit=kill;compile.after_meta=error"
//! ```
//!
//! Actions: `kill` raises SIGKILL on the process (a real crash: no
//! destructors run, nothing is flushed), `error` makes the step fail with an
//! internal error, `sleep(MS)` pauses the calling thread, `off` does
//! nothing. A failpoint fires every time it is reached.
//!
//! The names, by step (the README lists them too):
//! `pull.before_record`, `pull.after_record`, `compile.after_meta`,
//! `compile.before_rename`, `compile.after_store`, `create.before_commit`,
//! `create.after_commit`, `start.before_commit`, `start.after_commit`,
//! `stop.before_record`, `remove.container.after_commit`,
//! `remove.pod.after_commit`, `cni.add.after`, `cni.add.after_commit`,
//! `cni.del.after`. Points named `after_*` are for `kill`: failing there
//! would answer an error for a step that is done.

/// Reaches failpoint `name`: kills the process, fails or pauses if the
/// environment armed it so; otherwise (and always in release builds) does
/// nothing.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub(crate) fn hit(_name: &'static str) -> crate::error::Result<()> {
    Ok(())
}

#[cfg(debug_assertions)]
pub(crate) use armed::hit;

#[cfg(debug_assertions)]
mod armed {
    use std::collections::HashMap;
    use std::sync::OnceLock;
    use std::time::Duration;

    use crate::error::{Error, Result};

    /// The environment variable failpoints are armed by.
    const ENV: &str = "WASMLET_FAILPOINTS";

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(super) enum Action {
        Off,
        Kill,
        Error,
        Sleep(Duration),
    }

    /// Reaches failpoint `name`; see the module's documentation.
    pub(crate) fn hit(name: &'static str) -> Result<()> {
        static ARMED: OnceLock<HashMap<String, Action>> = OnceLock::new();
        let armed = ARMED.get_or_init(|| {
            let spec = std::env::var(ENV).unwrap_or_default();
            let armed = parse(&spec).unwrap_or_else(|e| panic!("{ENV}={spec:?}: {e}"));
            if !armed.is_empty() {
                tracing::warn!(failpoints = %spec, "failpoints armed: this agent will fail on purpose");
            }
            armed
        });
        match armed.get(name).copied().unwrap_or(Action::Off) {
            Action::Off => Ok(()),
            Action::Kill => {
                eprintln!("wasmlet: failpoint {name}: killing the agent");
                let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
                // SIGKILL cannot be caught; this is never reached.
                std::process::abort()
            }
            Action::Error => {
                tracing::warn!(failpoint = name, "failpoint: failing the step");
                Err(Error::Internal(format!("failpoint {name} failed the step")))
            }
            Action::Sleep(pause) => {
                tracing::warn!(failpoint = name, ?pause, "failpoint: pausing");
                std::thread::sleep(pause);
                Ok(())
            }
        }
    }

    /// Parses `name=action;name=action` (empty parts ignored).
    pub(super) fn parse(spec: &str) -> Result<HashMap<String, Action>, String> {
        let mut armed = HashMap::new();
        for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, action) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not name=action"))?;
            let action = match action.trim() {
                "off" => Action::Off,
                "kill" => Action::Kill,
                "error" => Action::Error,
                other => {
                    let ms = other
                        .strip_prefix("sleep(")
                        .and_then(|s| s.strip_suffix(')'))
                        .and_then(|ms| ms.parse().ok())
                        .ok_or_else(|| format!("{other:?} is not kill, error, sleep(MS) or off"))?;
                    Action::Sleep(Duration::from_millis(ms))
                }
            };
            armed.insert(name.trim().to_owned(), action);
        }
        Ok(armed)
    }
}

#[cfg(all(test, debug_assertions))]
mod tests {
    use std::time::Duration;

    use super::armed::{Action, parse};

    #[test]
    fn specs_parse_into_actions() {
        let armed = parse(" pull.after_record=kill; create.before_commit=error;;x=sleep(25);y=off")
            .unwrap();
        assert_eq!(armed["pull.after_record"], Action::Kill);
        assert_eq!(armed["create.before_commit"], Action::Error);
        assert_eq!(armed["x"], Action::Sleep(Duration::from_millis(25)));
        assert_eq!(armed["y"], Action::Off);
        assert!(parse("").unwrap().is_empty());
        assert!(parse("nameonly").is_err());
        assert!(parse("a=explode").is_err());
        assert!(parse("a=sleep(x)").is_err());
    }

    #[test]
    fn an_unarmed_failpoint_does_nothing() {
        assert!(super::hit("no.such.failpoint").is_ok());
    }
}
