//! Running programs beside a container's guest and reaching into its pod:
//! ExecSync and Exec (a fresh Wasm instance sharing the container's
//! mounts, environment, memory account and network), Attach (the running
//! guest's output and stdin) and PortForward.

use std::sync::Arc;
use std::time::Duration;

use super::Agent;
use super::guest_config::{GuestSetup, artifact_program_names, pod_hostname, program};
use crate::error::{Error, Result};
use crate::model::ids::{ContainerId, SandboxId};
use crate::network::{GuestNetwork, InNamespace};
use crate::runtime::host::GuestStdio;
use crate::runtime::logs::{ContainerLog, Stream};

/// The most output an exec keeps per stream (the rest is dropped).
pub const EXEC_OUTPUT_LIMIT: usize = 16 * 1024 * 1024;

/// What an exec'd instance did.
#[derive(Clone, Debug, Default)]
pub struct ExecOutput {
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// The streams of an exec'd instance (see [`Agent::exec`]).
pub struct ExecStdio {
    /// What the instance reads; `None`: end-of-file at once.
    pub stdin: Option<tokio::io::DuplexStream>,
    pub stdout: tokio::sync::mpsc::Sender<bytes::Bytes>,
    /// `None`: stderr joins stdout.
    pub stderr: Option<tokio::sync::mpsc::Sender<bytes::Bytes>>,
    /// The client asked for a terminal, of this size (0 × 0: not known).
    pub terminal: Option<TerminalSize>,
}

/// A client terminal's size, in characters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TerminalSize {
    pub width: u16,
    pub height: u16,
}

/// A client attached to a running container (see [`Agent::attach`]).
pub struct Attachment {
    /// The container's output from the attach on; closed when it exits.
    pub output: tokio::sync::broadcast::Receiver<crate::runtime::logs::Output>,
    pub stdin: Option<AttachedStdin>,
    /// The container was created with `tty`.
    pub terminal: bool,
}

/// An attached client's hold on a container's stdin.
pub struct AttachedStdin {
    writer: Arc<tokio::sync::Mutex<Option<tokio::io::DuplexStream>>>,
    once: bool,
}

impl AttachedStdin {
    /// Writes to the container's stdin; fails once it is closed.
    pub async fn write(&self, data: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        match self.writer.lock().await.as_mut() {
            Some(w) => w.write_all(data).await,
            None => Err(std::io::ErrorKind::BrokenPipe.into()),
        }
    }

    /// The client closed its input: with `stdin_once` the container's
    /// stdin closes for good (the guest reads end-of-file).
    pub async fn close(self) {
        if self.once {
            self.writer.lock().await.take();
        }
    }
}

/// An exec'd instance running; dropping it ends the instance.
struct ExecRun(
    tokio::task::JoinHandle<
        std::result::Result<crate::runtime::guest::GuestExit, crate::network::NetworkError>,
    >,
);

impl ExecRun {
    async fn wait(mut self) -> Result<crate::runtime::guest::GuestExit> {
        match (&mut self.0).await {
            Ok(Ok(exit)) => Ok(exit),
            Ok(Err(error)) => Ok(crate::runtime::guest::GuestExit {
                code: crate::runtime::guest::TRAP_EXIT_CODE,
                message: error.to_string(),
            }),
            Err(e) => Err(Error::Internal(format!("exec task failed: {e}"))),
        }
    }
}

impl Drop for ExecRun {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Agent {
    /// Runs `cmd` in running container `id` as a fresh Wasm instance, as
    /// `ExecSync` (and exec probes) ask: `cmd[0]` names a Wasm program of
    /// the container's image (for a compat image, a file on its `PATH` or
    /// a path in it; for a Wasm artifact, its one program, by the
    /// container's command, the image's name or `/proc/self/exe`). The
    /// instance shares the container's mounts, environment, working
    /// directory, memory account and network; its output is captured
    /// (at most [`EXEC_OUTPUT_LIMIT`] bytes per stream). An unknown program
    /// exits 127 and one that is not Wasm 126, with the reason on stderr,
    /// as a shell would. Past `timeout` the instance is ended and the call
    /// fails with `DeadlineExceeded`.
    pub async fn exec_sync(
        &self,
        id: &ContainerId,
        cmd: &[String],
        timeout: Option<Duration>,
    ) -> Result<ExecOutput> {
        let log = ContainerLog::capture(EXEC_OUTPUT_LIMIT);
        let failed = |code: i32, message: String| ExecOutput {
            exit_code: code,
            stdout: Vec::new(),
            stderr: format!("wasmlet: exec: {message}\n").into_bytes(),
        };
        let (guest, network) = match self
            .exec_instance(id, cmd, log.clone(), GuestStdio::default(), Vec::new())
            .await?
        {
            Ok(ready) => ready,
            Err((code, message)) => return Ok(failed(code, message)),
        };
        let run = self.spawn_exec(guest, network);
        let joined = match timeout {
            Some(limit) => match tokio::time::timeout(limit, run.wait()).await {
                Ok(joined) => joined,
                Err(_) => {
                    return Err(Error::DeadlineExceeded(format!(
                        "exec {} in container {id} did not finish within {limit:?}",
                        cmd[0]
                    )));
                }
            },
            None => run.wait().await,
        };
        let exit = joined?;
        if !exit.message.is_empty() {
            log.write_line(Stream::Stderr, &exit.message);
        }
        let (stdout, stderr) = log.captured();
        Ok(ExecOutput {
            exit_code: exit.code,
            stdout,
            stderr,
        })
    }

    /// Runs `cmd` in running container `id` as [`Agent::exec_sync`] does,
    /// with the client's streams instead of captured output (`Exec`): the
    /// instance reads `stdio.stdin` (end-of-file when absent or closed) and
    /// writes into `stdio.stdout` and `stdio.stderr` (stderr joins stdout
    /// for a terminal, which also gets `\r\n` line ends). Returns the exit
    /// code once the instance ended and all its output was handed over.
    /// Dropping the future ends the instance.
    pub async fn exec(&self, id: &ContainerId, cmd: &[String], stdio: ExecStdio) -> Result<i32> {
        let stdout =
            crate::runtime::stdio::ChannelOutput::new(stdio.stdout, stdio.terminal.is_some());
        let stderr = match stdio.stderr {
            Some(tx) if stdio.terminal.is_none() => {
                crate::runtime::stdio::ChannelOutput::new(tx, false)
            }
            _ => stdout.clone(),
        };
        let guest_stdio = GuestStdio {
            stdin: stdio
                .stdin
                .map(|r| Arc::new(wasmtime_wasi::cli::AsyncStdinStream::new(r))),
            stdout: Some(stdout),
            stderr: Some(stderr.clone()),
        };
        let log = ContainerLog::capture(0);
        let mut extra_env = Vec::new();
        if let Some(size) = stdio.terminal {
            extra_env.push(("TERM".to_owned(), "xterm".to_owned()));
            if size.width > 0 && size.height > 0 {
                extra_env.push(("COLUMNS".to_owned(), size.width.to_string()));
                extra_env.push(("LINES".to_owned(), size.height.to_string()));
            }
        }
        let (guest, network) = match self
            .exec_instance(id, cmd, log, guest_stdio, extra_env)
            .await?
        {
            Ok(ready) => ready,
            Err((code, message)) => {
                stderr.send(&format!("wasmlet: exec: {message}\n")).await;
                return Ok(code);
            }
        };
        let exit = self.spawn_exec(guest, network).wait().await?;
        if !exit.message.is_empty() {
            stderr
                .send(&format!("wasmlet: exec: {}\n", exit.message))
                .await;
        }
        Ok(exit.code)
    }

    /// Checks and instantiates an exec of `cmd` in container `id`, with
    /// `extra_env` after the container's. The inner error is a shell's
    /// answer (127 not found, 126 cannot run) and its reason; the outer one
    /// a call that cannot be honoured.
    async fn exec_instance(
        &self,
        id: &ContainerId,
        cmd: &[String],
        log: ContainerLog,
        stdio: GuestStdio,
        extra_env: Vec<(String, String)>,
    ) -> Result<std::result::Result<(crate::runtime::guest::Guest, GuestNetwork), (i32, String)>>
    {
        let Some(first) = cmd.first() else {
            return Err(Error::InvalidArgument("exec needs a command".into()));
        };
        let entry = self.container(id)?;
        let record = entry.snapshot();
        let Some(limiter) = entry
            .running()
            .map(|run| run.exec_limiter.sibling_with_own_oom())
        else {
            return Err(Error::FailedPrecondition(format!(
                "container {id} is not running: exec runs only in a running container"
            )));
        };
        let sandbox = self.pod_sandbox_status(&record.sandbox_id)?;
        let image = self
            .inner
            .images
            .resolve(record.image_id.as_str())
            .ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "image {} of container {id} was removed",
                    record.image_id
                ))
            })?;
        let mut cmd = cmd.to_vec();
        // An empty argv[0] (and, in a compat image, `/proc/self/exe`) is
        // the container's own program.
        if first.is_empty() || (first == "/proc/self/exe" && image.compat.is_some()) {
            match program(
                &self.inner.images,
                &self.inner.programs,
                &image,
                &record.spec,
            ) {
                Ok(own) => cmd[0] = own.argv[0].clone(),
                Err(reason) => return Ok(Err((127, reason.to_string()))),
            }
        }
        let argv0 = &cmd[0];
        if image.compat.is_none() {
            let names = artifact_program_names(&image, &record.spec);
            if !names.iter().any(|n| n == argv0) {
                return Ok(Err((
                    127,
                    format!(
                        "{argv0}: not found (this Wasm image holds one program, run as one of {names:?})"
                    ),
                )));
            }
        }
        let mut spec = record.spec.clone();
        spec.command = cmd.clone();
        spec.args.clear();
        spec.envs.extend(extra_env);
        if let Err(reason) = program(&self.inner.images, &self.inner.programs, &image, &spec) {
            return Ok(Err((127, format!("{argv0}: {reason}"))));
        }
        let prepared = match self.prepare(&image, &spec).await {
            Ok(p) => p,
            Err(reason) => return Ok(Err((126, format!("{argv0}: cannot run: {reason}")))),
        };
        let network = self.guest_network(&sandbox);
        // An exec'd instance's writes to a copied file mount go back with
        // the container's own.
        let (config, _) = self.guest_config(
            &record.id,
            &image,
            &spec,
            GuestSetup {
                log,
                limiter,
                network: network.clone(),
                dns: sandbox.spec.dns.clone(),
                stdio,
                hostname: pod_hostname(&sandbox),
            },
        )?;
        match self.inner.engine.instantiate(&prepared, config).await {
            Ok(crate::runtime::guest::Guest::Http(_)) => Ok(Err((
                126,
                format!("{argv0}: is a wasi:http function, not a command"),
            ))),
            Ok(guest) => Ok(Ok((guest, network))),
            Err(reason) => Ok(Err((126, format!("{argv0}: {reason}")))),
        }
    }

    /// Runs an exec'd instance on the guest runtime, in its pod's network.
    fn spawn_exec(&self, guest: crate::runtime::guest::Guest, network: GuestNetwork) -> ExecRun {
        ExecRun(
            self.inner
                .guests
                .handle()
                .spawn(InNamespace::new(guest.run(), &network)),
        )
    }

    /// Connects a client to running container `id` (`Attach`): its output
    /// from now on and, with `stdin`, its standard input (the container
    /// must have been created with `stdin`).
    pub async fn attach(&self, id: &ContainerId, stdin: bool) -> Result<Attachment> {
        let entry = self.container(id)?;
        let record = entry.snapshot();
        let Some(run) = entry.running() else {
            return Err(Error::FailedPrecondition(format!(
                "container {id} is not running: attach needs a running container"
            )));
        };
        if stdin && !record.spec.stdin {
            return Err(Error::InvalidArgument(format!(
                "container {id} was created without stdin: attach cannot write to it"
            )));
        }
        Ok(Attachment {
            output: run.log.attach(),
            stdin: stdin.then(|| AttachedStdin {
                writer: run.stdin.clone(),
                once: record.spec.stdin_once,
            }),
            terminal: record.spec.tty,
        })
    }

    /// Opens a TCP connection to `port` on the loopback of pod sandbox
    /// `id`'s network (`PortForward`): inside its network namespace, or the
    /// node's for a host-network pod.
    pub async fn port_forward(&self, id: &SandboxId, port: u16) -> Result<tokio::net::TcpStream> {
        let sandbox = self.pod_sandbox_status(id)?;
        if sandbox.state != crate::model::sandbox::SandboxState::Ready {
            return Err(Error::FailedPrecondition(format!(
                "pod sandbox {id} is not ready: nothing to forward to"
            )));
        }
        let network = self.guest_network(&sandbox);
        if !network.allows_sockets() {
            return Err(Error::FailedPrecondition(format!(
                "pod sandbox {id} has no network (no CNI network was set up for it)"
            )));
        }
        let connect = tokio::net::TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, port));
        match InNamespace::new(connect, &network).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(crate::network::NetworkError::Connect {
                sandbox: id.to_string(),
                port,
                source: Arc::new(e),
            }
            .into()),
            Err(e) => Err(e.into()),
        }
    }
}
