//! `wasmlet admin ...`: the admin API of a running agent, from the shell.

use anyhow::Context;
use clap::Subcommand;
use wasmlet_proto::admin;
use wasmlet_proto::admin::admin_client::AdminClient;

use crate::config::Settings;

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// What a stored image runs: kind, imports, exports, compiled or not.
    Inspect { image: String },
    /// Compile a stored image's program now, before any pod needs it.
    Precompile { image: String },
    /// Guest memory, CPU and requests of every container (or one pod's).
    Stats {
        #[arg(long)]
        pod: Option<String>,
    },
    /// Show the daemon's log filter, or replace it until the daemon stops
    /// (`debug`, `info,wasmlet_agent=debug`: RUST_LOG's syntax).
    LogLevel {
        /// The new filter; without it, the one in force is printed.
        filter: Option<String>,
    },
}

pub async fn run(settings: Settings, command: AdminCommand) -> anyhow::Result<()> {
    let channel = wasmlet_proto::connect_unix(&settings.socket)
        .await
        .with_context(|| format!("connecting to the agent at {:?}", settings.socket))?;
    let mut client = AdminClient::new(channel);
    match command {
        AdminCommand::Inspect { image } => {
            let i = client
                .inspect_image(admin::InspectImageRequest { image })
                .await?
                .into_inner();
            println!("image       {} {:?}", i.image_id, i.repo_tags);
            println!(
                "program     {} ({} bytes)",
                i.wasm_digest, i.wasm_size_bytes
            );
            println!(
                "kind        {}{}",
                i.kind().as_str_name(),
                if i.http_function {
                    " (wasi:http function)"
                } else {
                    ""
                }
            );
            if i.compat {
                println!("entrypoint  {:?} cmd {:?}", i.entrypoint, i.cmd);
            }
            println!("compiled    {}", i.compiled);
            for import in &i.imports {
                let module = if import.module.is_empty() {
                    String::new()
                } else {
                    format!("{} ", import.module)
                };
                println!("import      {module}{} ({})", import.name, import.kind);
            }
            for export in &i.exports {
                println!("export      {export}");
            }
        }
        AdminCommand::Precompile { image } => {
            let p = client
                .precompile(admin::PrecompileRequest { image })
                .await?
                .into_inner();
            if p.already_compiled {
                println!("{}: already compiled", p.wasm_digest);
            } else {
                println!(
                    "{}: compiled in {} ms",
                    p.wasm_digest,
                    p.compile_micros / 1000
                );
            }
        }
        AdminCommand::Stats { pod } => {
            let stats = client
                .list_instance_stats(admin::ListInstanceStatsRequest {
                    pod_sandbox_id: pod.unwrap_or_default(),
                })
                .await?
                .into_inner();
            println!(
                "CONTAINER      POD            STATE              MEMORY      LIMIT       CPU(ms)  HTTP  OOM"
            );
            for s in stats.instances {
                println!(
                    "{:<14} {:<14} {:<18} {:<11} {:<11} {:<8} {:<5} {}",
                    &s.container_id[..s.container_id.len().min(13)],
                    &s.pod_sandbox_id[..s.pod_sandbox_id.len().min(13)],
                    s.state,
                    s.memory_bytes,
                    s.memory_limit_bytes,
                    s.cpu_nanos / 1_000_000,
                    s.http_requests,
                    s.oom_killed
                );
            }
        }
        AdminCommand::LogLevel { filter: None } => {
            let level = client
                .get_log_level(admin::GetLogLevelRequest {})
                .await?
                .into_inner();
            println!("{}", level.filter);
        }
        AdminCommand::LogLevel {
            filter: Some(filter),
        } => {
            let level = client
                .set_log_level(admin::SetLogLevelRequest { filter })
                .await?
                .into_inner();
            println!("{} (was {})", level.filter, level.previous);
        }
    }
    Ok(())
}
