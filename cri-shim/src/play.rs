//! `wasmlet play POD.yaml`: runs a Kubernetes Pod manifest through the CRI
//! socket, making the calls the kubelet makes, so that a Wasm pod can be
//! tried without a cluster.
//!
//! Play is a CRI client: it talks to whatever runtime answers on the
//! socket, or, when none does, to an agent it serves in-process on a
//! temporary root. Containers' output is shown as `[container] line`
//! (stdout on stdout, stderr on stderr); play's own messages go to stderr.
//! It exits with the first non-zero exit code of the containers, 124 when
//! `--timeout` ran out, and 130 when interrupted.

mod kubelet;
mod logs;
mod manifest;
mod pod;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use tonic::transport::Channel;
use wasmlet_proto::cri::{self, runtime_service_client::RuntimeServiceClient};

use self::manifest::Pod;
use self::pod::{PodRun, rpc_error};
use crate::config::Settings;
use crate::server::InProcess;

/// How long the runtime on the socket may take to answer Version.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one CRI call may take (CreateContainer compiles the module).
const RPC_TIMEOUT: Duration = Duration::from_secs(120);
/// How long removing the pod may take once play has been told to stop.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(60);
/// The API version the kubelet states in its Version request.
const KUBELET_API_VERSION: &str = "0.1.0";

/// Exit status when `--timeout` ran out (as `timeout(1)`).
const EXIT_TIMED_OUT: i32 = 124;
/// Exit status when stopped by SIGINT or SIGTERM.
const EXIT_INTERRUPTED: i32 = 130;

#[derive(Debug, clap::Args)]
pub struct PlayArgs {
    /// The Pod manifest (YAML, `kind: Pod`).
    pub manifest: PathBuf,
    /// Import FILE.wasm as image REF before running (repeatable). Only
    /// possible with the in-process agent; a runtime already listening on
    /// the socket is asked to PullImage instead.
    #[arg(long = "image", value_name = "REF=FILE.wasm", value_parser = parse_image)]
    pub images: Vec<ImageFile>,
    /// Stop the pod and fail after this many seconds.
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    pub timeout: Option<Duration>,
    /// Registry credentials for the pod's images (what an imagePullSecret
    /// gives the kubelet), passed in PullImage's AuthConfig.
    #[command(flatten)]
    pub login: crate::image_cli::RegistryLogin,
}

/// A `--image REF=FILE.wasm`.
#[derive(Debug, Clone)]
pub struct ImageFile {
    pub reference: String,
    pub file: PathBuf,
}

fn parse_image(s: &str) -> Result<ImageFile, String> {
    match s.split_once('=') {
        Some((reference, file)) if !reference.is_empty() && !file.is_empty() => Ok(ImageFile {
            reference: reference.to_owned(),
            file: PathBuf::from(file),
        }),
        _ => Err(format!("{s:?}: expected REF=FILE.wasm")),
    }
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let seconds: f64 = s
        .parse()
        .map_err(|_| format!("{s:?}: expected a number of seconds"))?;
    Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{s:?}: expected a positive number of seconds"))
}

/// The runtime play talks to.
enum Runtime {
    /// One that was already answering on the socket.
    External,
    /// One served by this process, for this run only.
    InProcess(InProcess),
}

impl Runtime {
    /// Uses the runtime on `settings.socket` if it answers Version, else
    /// starts one in-process and imports `images` into it.
    async fn connect(settings: &Settings, images: &[ImageFile]) -> anyhow::Result<(Self, Channel)> {
        match probe(&settings.socket).await {
            Ok((channel, version)) => {
                eprintln!(
                    "wasmlet play: using the CRI runtime on {} ({} {})",
                    settings.socket.display(),
                    version.runtime_name,
                    version.runtime_version
                );
                for image in images {
                    eprintln!(
                        "wasmlet play: --image {}={}: not possible with a runtime that is already running (play can import only into its own in-process agent); PullImage will be used for {}",
                        image.reference,
                        image.file.display(),
                        image.reference
                    );
                }
                return Ok((Runtime::External, channel));
            }
            Err(why) => eprintln!(
                "wasmlet play: no CRI runtime answers on {} ({why:#}); starting an in-process agent on a temporary root",
                settings.socket.display()
            ),
        }
        let local = InProcess::start(settings).await?;
        let prepared = async {
            for image in images {
                let record = local
                    .agent
                    .import_image(&image.file, &image.reference)
                    .with_context(|| {
                        format!("--image: importing {:?} as {}", image.file, image.reference)
                    })?;
                eprintln!(
                    "wasmlet play: imported {} as {} ({})",
                    image.file.display(),
                    image.reference,
                    record.id
                );
            }
            connect(&local.socket).await
        }
        .await;
        match prepared {
            Ok(channel) => Ok((Runtime::InProcess(local), channel)),
            Err(e) => {
                if let Err(stop) = local.shutdown().await {
                    eprintln!("wasmlet play: stopping the in-process agent: {stop:#}");
                }
                Err(e)
            }
        }
    }

    async fn shutdown(self) -> anyhow::Result<()> {
        match self {
            Runtime::External => Ok(()),
            Runtime::InProcess(local) => local.shutdown().await,
        }
    }
}

async fn connect(socket: &std::path::Path) -> anyhow::Result<Channel> {
    let endpoint = wasmlet_proto::unix_endpoint()
        .connect_timeout(PROBE_TIMEOUT)
        .timeout(RPC_TIMEOUT);
    wasmlet_proto::connect_unix_with(endpoint, socket)
        .await
        .with_context(|| format!("connecting to {}", socket.display()))
}

/// Connects to `socket` and asks Version, as the kubelet does first.
async fn probe(socket: &std::path::Path) -> anyhow::Result<(Channel, cri::VersionResponse)> {
    if !socket.exists() {
        bail!("there is no socket");
    }
    let asked = async {
        let channel = connect(socket).await?;
        let request = cri::VersionRequest {
            version: KUBELET_API_VERSION.to_owned(),
        };
        let response = RuntimeServiceClient::new(channel.clone())
            .version(request)
            .await;
        let version = response.map_err(rpc_error("Version"))?.into_inner();
        anyhow::Ok((channel, version))
    };
    tokio::time::timeout(PROBE_TIMEOUT, asked)
        .await
        .with_context(|| format!("no answer within {PROBE_TIMEOUT:?}"))?
}

/// SIGINT and SIGTERM.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }

    /// Waits for either; returns its name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}

/// Why the pod stopped.
enum End {
    /// Every container is done: 0, or the first non-zero exit code.
    Exited(i32),
    Interrupted(&'static str),
    TimedOut(Duration),
    Failed(anyhow::Error),
}

pub async fn run(settings: Settings, args: PlayArgs) -> anyhow::Result<()> {
    let status = play(settings, args).await?;
    if status != 0 {
        // Everything play created is gone by now; nothing is left to drop.
        std::process::exit(status);
    }
    Ok(())
}

/// Plays the pod and cleans up after it; returns the process exit status.
async fn play(settings: Settings, args: PlayArgs) -> anyhow::Result<i32> {
    let started = tokio::time::Instant::now();
    let manifest = Pod::load(&args.manifest)?;
    let mut signals = Signals::install()?;
    let auth = args.login.auth_config()?;
    let (runtime, channel) = Runtime::connect(&settings, &args.images).await?;
    let mut pod = match PodRun::new(channel, manifest, auth) {
        Ok(pod) => pod,
        Err(e) => {
            shutdown(runtime).await;
            return Err(e);
        }
    };
    let deadline = async {
        match args.timeout {
            Some(limit) => {
                tokio::time::sleep_until(started + limit).await;
                limit
            }
            None => std::future::pending().await,
        }
    };
    let end = tokio::select! {
        played = pod.play() => match played {
            Ok(code) => End::Exited(code),
            Err(e) => End::Failed(e),
        },
        signal = signals.recv() => End::Interrupted(signal),
        limit = deadline => End::TimedOut(limit),
    };
    let stop_containers = match &end {
        End::Exited(_) => false,
        End::Interrupted(signal) => {
            eprintln!("wasmlet play: {signal}: stopping pod {}", pod.name());
            true
        }
        End::TimedOut(limit) => {
            eprintln!(
                "wasmlet play: --timeout of {limit:?} reached: stopping pod {}",
                pod.name()
            );
            true
        }
        End::Failed(_) => true,
    };
    let torn_down = tokio::select! {
        result = tokio::time::timeout(TEARDOWN_TIMEOUT, pod.teardown(stop_containers)) => {
            result.unwrap_or_else(|_| Err(anyhow::anyhow!("removing the pod took longer than {TEARDOWN_TIMEOUT:?}")))
        }
        signal = signals.recv() => Err(anyhow::anyhow!("{signal} again: leaving pod {} behind", pod.name())),
    };
    drop(pod);
    shutdown(runtime).await;
    match (end, torn_down) {
        (End::Failed(e), _) => Err(e),
        (End::Exited(0), Err(e)) => Err(e.context("removing the pod")),
        (End::Exited(code), _) => Ok(exit_status(code)),
        (End::Interrupted(_), _) => Ok(EXIT_INTERRUPTED),
        (End::TimedOut(_), _) => Ok(EXIT_TIMED_OUT),
    }
}

async fn shutdown(runtime: Runtime) {
    if let Err(e) = runtime.shutdown().await {
        eprintln!("wasmlet play: stopping the in-process agent: {e:#}");
    }
}

/// A container exit code as a process exit status (0..=255), keeping a
/// failure a failure: codes that are multiples of 256 become 1.
fn exit_status(code: i32) -> i32 {
    match code & 0xff {
        0 if code != 0 => 1,
        low => low,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_flags() {
        let image = parse_image("example.com/a:v1=/tmp/a=b.wasm").unwrap();
        assert_eq!(image.reference, "example.com/a:v1");
        assert_eq!(image.file, PathBuf::from("/tmp/a=b.wasm"));
        for bad in ["a.wasm", "=a.wasm", "ref="] {
            assert!(parse_image(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn timeout_flags() {
        assert_eq!(parse_timeout("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_timeout("0.5").unwrap(), Duration::from_millis(500));
        for bad in ["0", "-1", "soon", "inf", "NaN"] {
            assert!(parse_timeout(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn exit_statuses_keep_failures() {
        assert_eq!(exit_status(0), 0);
        assert_eq!(exit_status(3), 3);
        assert_eq!(exit_status(134), 134);
        assert_eq!(exit_status(256), 1);
        assert_eq!(exit_status(-1), 255);
    }
}
