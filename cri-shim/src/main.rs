//! `wasmlet`: the node agent binary. It parses flags and config, installs
//! logging and signal handling, and hands over to the CRI layer; no
//! business logic lives here.

mod admin;
mod admin_cli;
mod config;
mod convert;
mod deadline;
mod delegate;
mod doctor;
mod image_cli;
mod logging;
mod metrics;
mod play;
mod server;
mod service;
mod status;
mod streaming;
mod traced;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::Settings;
use crate::logging::{LogFormat, LogLevel};

/// What `wasmlet --help` says before the commands: what the program is and
/// where its settings come from.
const LONG_ABOUT: &str = "\
wasmlet is a Kubernetes node agent that runs WebAssembly pods. It is a CRI
runtime: the kubelet talks to it over a unix socket as it would to
containerd, and it runs each container of a pod whose RuntimeClass handler
is one of its runtime_handlers (\"wasm\", \"wasmtime\") as a Wasm guest in
wasmtime. With a [delegate] section it sits in front of the node's own
containerd or CRI-O, which then runs every other pod.

`wasmlet serve` (the default command) runs the agent, as root under systemd:
it serves CRI v1 and wasmlet's admin API on /run/wasmlet/wasmlet.sock and
keeps its state under /var/lib/wasmlet. The other commands are tools for the
same node: the image store, the admin API of the running agent, running a
pod manifest without a kubelet, the configuration reference, and `wasmlet
doctor`, which checks the node and says what to fix.

Settings: built-in defaults, overridden by a TOML file named by --config or
WASMLET_CONFIG (there is none unless given), overridden by --socket and
--root. `wasmlet config default` prints a file with every key, its default
and its meaning; `wasmlet --config FILE config check` checks one.";

/// What `wasmlet --help` says after the options: how to put the agent to
/// work on a node.
const AFTER_LONG_HELP: &str = "\
Pointing the node's kubelet at it:
  KubeletConfiguration  containerRuntimeEndpoint: unix:///run/wasmlet/wasmlet.sock
                        cgroupDriver: the same as wasmlet's cgroup_driver
  (or the kubelet flag  --container-runtime-endpoint=unix:///run/wasmlet/wasmlet.sock)
  then a RuntimeClass   apiVersion: node.k8s.io/v1
                        kind: RuntimeClass
                        metadata: {name: wasm}
                        handler: wasm
  and pods with         spec.runtimeClassName: wasm

Logs go to stderr: RUST_LOG sets the filter (default \"info\"), --log-format
json writes one JSON object a line; every CRI call runs in a span carrying
its method, pod sandbox id and container id. `wasmlet admin log-level debug`
changes the filter of the running agent until it stops.

Metrics: Prometheus (OpenMetrics text) at http://127.0.0.1:10470/metrics,
set by [metrics] address (\"\" turns them off).";

#[derive(Debug, Parser)]
#[command(
    name = "wasmlet",
    version,
    about = "A Kubernetes node agent (a CRI runtime) that runs WebAssembly pods in wasmtime.",
    long_about = LONG_ABOUT,
    after_long_help = AFTER_LONG_HELP
)]
struct Cli {
    /// TOML config file (`wasmlet config default` prints one with every
    /// key); flags override what it sets.
    #[arg(long, global = true, env = "WASMLET_CONFIG")]
    config: Option<PathBuf>,
    /// CRI socket path [default: /run/wasmlet/wasmlet.sock as root].
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// State root [default: /var/lib/wasmlet as root].
    #[arg(long, global = true)]
    root: Option<PathBuf>,
    /// How log lines on stderr are written: `text` for people, `json` (one
    /// object a line) for log shippers.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t,
        env = "WASMLET_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve CRI v1 on the socket (the default).
    Serve,
    /// Manage the local image store.
    #[command(subcommand)]
    Image(image_cli::ImageCommand),
    /// wasmlet's admin API of the agent on the socket: inspect and
    /// precompile images, Wasm stats of running guests, the log filter.
    #[command(subcommand)]
    Admin(admin_cli::AdminCommand),
    /// Run a Kubernetes Pod manifest through the CRI socket, as the kubelet
    /// would; starts an agent in-process when none is listening.
    Play(play::PlayArgs),
    /// The configuration file: its reference, and checking one.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Check this node for what the agent needs (kernel, CNI, the
    /// downstream runtime, permissions, the kubelet's stats gate, clock,
    /// disk) and say what to fix; exits non-zero when something blocks.
    Doctor(doctor::DoctorArgs),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print a complete configuration file: every key with its meaning,
    /// unit and default (keys without a fixed default commented out).
    Default,
    /// Check the file named by --config (or WASMLET_CONFIG): unknown keys,
    /// wrong types, values out of range.
    Check,
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

async fn serve(settings: Settings, log: LogLevel) -> anyhow::Result<()> {
    server::set_oom_score_adj(settings.agent_oom_score_adj);
    let agent = server::open_agent(&settings)?;
    match settings.node_memory_budget {
        Some(budget) => {
            tracing::info!(
                budget_bytes = budget,
                "node memory guard: guests' committed memory is held under the budget"
            )
        }
        None => tracing::warn!(
            "node memory guard off: only per-container and per-pod limits hold guests' memory"
        ),
    }
    let listener = server::bind(&settings.socket)?;
    server::serve(agent, &settings, Some(log), listener, shutdown_signal()).await
}

/// Worker threads of the daemon's runtime: one per core (measured: more
/// threads make each call slower and batch no better), or
/// `WASMLET_WORKER_THREADS`.
fn worker_threads() -> usize {
    std::env::var("WASMLET_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
}

fn main() -> std::process::ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads())
        .enable_all()
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(async_main()),
        Err(error) => {
            eprintln!("wasmlet: starting the async runtime: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn async_main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // `play` shows the pod's output; its in-process agent only warns.
    let log = logging::init(
        cli.log_format,
        if matches!(cli.command, Some(Command::Play(_))) {
            "warn"
        } else {
            "info"
        },
    );
    match run(cli, log).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // The chain of causes is what an operator needs, not a backtrace.
            eprintln!("wasmlet: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, log: LogLevel) -> anyhow::Result<()> {
    let config = cli.config;
    let settings = move || Settings::resolve(config.as_deref(), cli.socket, cli.root);
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(settings()?, log).await,
        Command::Image(command) => image_cli::run(settings()?, command).await,
        Command::Admin(command) => admin_cli::run(settings()?, command).await,
        Command::Play(args) => play::run(settings()?, args).await,
        Command::Doctor(args) => doctor::run(&settings()?, &args).await,
        // The reference needs no settings: a broken file must not hide it.
        Command::Config(ConfigCommand::Default) => {
            print!("{}", config::reference());
            Ok(())
        }
        Command::Config(ConfigCommand::Check) => {
            settings()?;
            println!("the configuration is valid");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_help_tells_an_operator_what_this_is_and_how_to_use_it() {
        let help = Cli::command().render_long_help().to_string();
        for needle in [
            "node agent",
            "WebAssembly",
            "serve",
            "config default",
            "WASMLET_CONFIG",
            "containerRuntimeEndpoint: unix:///run/wasmlet/wasmlet.sock",
            "RuntimeClass",
            "--log-format",
            "admin log-level",
        ] {
            assert!(help.contains(needle), "--help lacks {needle:?}:\n{help}");
        }
        assert!(!help.contains(env!("CARGO_PKG_DESCRIPTION")), "{help}");
    }

    #[test]
    fn the_cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
