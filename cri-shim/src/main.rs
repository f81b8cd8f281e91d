//! `wasmlet`: the node agent binary. It parses flags and config, installs
//! logging and signal handling, and hands over to the CRI layer; no
//! business logic lives here.

mod admin;
mod admin_cli;
mod config;
mod convert;
mod delegate;
mod image_cli;
mod play;
mod server;
mod service;
mod status;
mod streaming;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::Settings;

/// A Kubernetes CRI runtime that runs WebAssembly pods in wasmtime.
#[derive(Debug, Parser)]
#[command(name = "wasmlet", version, about)]
struct Cli {
    /// TOML config file; flags override what it sets.
    #[arg(long, global = true, env = "WASMLET_CONFIG")]
    config: Option<PathBuf>,
    /// CRI socket path [default: /run/wasmlet/wasmlet.sock as root].
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// State root [default: /var/lib/wasmlet as root].
    #[arg(long, global = true)]
    root: Option<PathBuf>,
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
    /// precompile images, Wasm stats of running guests.
    #[command(subcommand)]
    Admin(admin_cli::AdminCommand),
    /// Run a Kubernetes Pod manifest through the CRI socket, as the kubelet
    /// would; starts an agent in-process when none is listening.
    Play(play::PlayArgs),
}

fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
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

async fn serve(settings: Settings) -> anyhow::Result<()> {
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
    server::serve(agent, &settings, listener, shutdown_signal()).await
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
    init_logging(if matches!(cli.command, Some(Command::Play(_))) {
        "warn"
    } else {
        "info"
    });
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // The chain of causes is what an operator needs, not a backtrace.
            eprintln!("wasmlet: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::resolve(cli.config.as_deref(), cli.socket, cli.root)?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(settings).await,
        Command::Image(command) => image_cli::run(settings, command).await,
        Command::Admin(command) => admin_cli::run(settings, command).await,
        Command::Play(args) => play::run(settings, args).await,
    }
}
