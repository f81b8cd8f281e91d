//! The daemon's own log: `tracing` to stderr, as text or as one JSON object
//! a line, through a filter that can be replaced while the daemon runs
//! (the admin API's `SetLogLevel`, `wasmlet admin log-level`).

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event, with the spans it is in.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields`,
    /// `span` and `spans`), for log shippers.
    Json,
}

/// A filter that does not parse (`RUST_LOG`'s syntax).
#[derive(Debug, thiserror::Error)]
pub enum LogLevelError {
    #[error("log filter {filter:?} does not parse: {source}")]
    Invalid {
        filter: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("the log filter is empty: name a level (\"off\" turns logging off)")]
    Empty,
    #[error("the log filter could not be replaced: {0}")]
    Reload(#[from] reload::Error),
}

/// The filter in force, replaceable at run time. Cheap to clone.
#[derive(Clone, Debug)]
pub struct LogLevel {
    handle: reload::Handle<EnvFilter, Registry>,
}

impl LogLevel {
    /// The filter in force, in `RUST_LOG`'s syntax.
    pub fn current(&self) -> String {
        self.handle
            .with_current(|filter| filter.to_string())
            .unwrap_or_default()
    }

    /// Replaces the filter with `directives` (`RUST_LOG`'s syntax: `debug`,
    /// `info,wasmlet_agent=debug`); returns the one it replaced. A filter
    /// that does not parse changes nothing.
    pub fn set(&self, directives: &str) -> Result<String, LogLevelError> {
        let directives = directives.trim();
        if directives.is_empty() {
            return Err(LogLevelError::Empty);
        }
        let filter = EnvFilter::try_new(directives).map_err(|source| LogLevelError::Invalid {
            filter: directives.to_owned(),
            source,
        })?;
        let previous = self.current();
        self.handle.reload(filter)?;
        Ok(previous)
    }
}

/// Installs the process's subscriber: `RUST_LOG`, else `default_level`,
/// written to stderr in `format` (colours only on a terminal).
pub fn init(format: LogFormat, default_level: &str) -> LogLevel {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let ansi = std::io::stderr().is_terminal();
    let installed = match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    if let Err(error) = installed {
        eprintln!("wasmlet: installing the logger: {error}");
    }
    LogLevel { handle }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A level handle over a subscriber of its own (not the process's).
    fn level(initial: &str) -> (LogLevel, impl tracing::Subscriber) {
        let (filter, handle) = reload::Layer::new(EnvFilter::new(initial));
        let subscriber = tracing_subscriber::registry().with(filter);
        (LogLevel { handle }, subscriber)
    }

    #[test]
    fn a_new_filter_replaces_the_old_and_takes_effect() {
        let (level, subscriber) = level("info");
        tracing::subscriber::with_default(subscriber, || {
            assert!(!tracing::enabled!(tracing::Level::DEBUG));
            assert_eq!(level.set("debug").unwrap(), "info");
            assert_eq!(level.current(), "debug");
            assert!(tracing::enabled!(tracing::Level::DEBUG));
            assert_eq!(level.set(" warn,wasmlet_agent=trace ").unwrap(), "debug");
            assert!(!tracing::enabled!(tracing::Level::INFO));
        });
    }

    #[test]
    fn a_filter_that_does_not_parse_changes_nothing() {
        let (level, _subscriber) = level("info");
        assert!(matches!(
            level.set("wasmlet_agent=loud"),
            Err(LogLevelError::Invalid { .. })
        ));
        assert!(matches!(level.set("  "), Err(LogLevelError::Empty)));
        assert_eq!(level.current(), "info");
    }
}
