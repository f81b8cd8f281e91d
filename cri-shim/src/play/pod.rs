//! One pod's run through the CRI, as the kubelet drives it: the sandbox,
//! then per container PullImage, CreateContainer and StartContainer; the
//! restart policy with its back-off; the containers' output; and the
//! teardown.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio::time::Instant;
use tonic::transport::Channel;
use wasmlet_proto::cri::{
    self, image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient,
};

use super::kubelet::{self, PodIdentity};
use super::logs::{Line, LogFollower, Stream};
use super::manifest::{Container, Pod, Probe};

/// How often the containers' log files are read.
const LOG_POLL: Duration = Duration::from_millis(50);
/// How often running containers are asked for their status.
const STATUS_POLL: Duration = Duration::from_millis(100);
/// The first restart back-off; it doubles after each restart.
const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// The longest restart back-off (the kubelet's is 5 minutes; play is
/// for trying things out).
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// The exit code reported for a container that could not be started when
/// its runtime does not say which.
const START_ERROR_CODE: i32 = 128;

/// Turns a failed RPC into an error naming the call, the gRPC code and
/// the runtime's message.
pub fn rpc_error(rpc: &'static str) -> impl FnOnce(tonic::Status) -> anyhow::Error {
    move |status| anyhow::anyhow!("{rpc} failed: {:?}: {}", status.code(), status.message())
}

/// How a container run ended, as its status reports it.
#[derive(Debug, Clone)]
struct Exit {
    code: i32,
    reason: String,
    message: String,
}

#[derive(Debug)]
enum Phase {
    /// Not started yet.
    Pending,
    Running {
        id: String,
    },
    /// Exited; run again at `until`.
    BackingOff {
        until: Instant,
    },
    /// Exited, and the restart policy does not run it again.
    Done,
}

/// Where a container's probes stand in its current run.
#[derive(Debug, Default)]
struct Probes {
    next_readiness: Option<Instant>,
    next_liveness: Option<Instant>,
    ready: bool,
    readiness_successes: u32,
    readiness_failures: u32,
    liveness_failures: u32,
}

/// One container of the pod across its runs.
#[derive(Debug)]
struct Slot {
    name: String,
    /// What PullImage answered.
    image_ref: String,
    /// The run under way or last ended; 0 first.
    attempt: u32,
    phase: Phase,
    backoff: Duration,
    log: Option<LogFollower>,
    probes: Probes,
}

/// A pod being played against one CRI endpoint.
pub struct PodRun {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    pod: Pod,
    uid: String,
    sandbox_config: cri::PodSandboxConfig,
    /// Credentials for PullImage, if the user gave any.
    auth: Option<cri::AuthConfig>,
    sandbox_id: Option<String>,
    /// The pod's IP, once its sandbox runs (empty without a pod network).
    pod_ip: String,
    log_directory: PathBuf,
    volumes: BTreeMap<String, PathBuf>,
    slots: Vec<Slot>,
    /// Final exit codes, in the order the containers ended for good.
    finals: Vec<i32>,
    /// Holds the pod's log directory and emptyDir volumes.
    _dir: tempfile::TempDir,
}

impl PodRun {
    /// Prepares what the kubelet prepares before RunPodSandbox: a uid, the
    /// log directory, and the volumes.
    pub fn new(channel: Channel, pod: Pod, auth: Option<cri::AuthConfig>) -> anyhow::Result<Self> {
        let uid = kubelet::new_uid();
        let dir = tempfile::Builder::new()
            .prefix("wasmlet-play-")
            .tempdir()
            .context("creating the pod's temporary directory")?;
        let id = PodIdentity {
            pod: &pod,
            uid: &uid,
        };
        let log_directory = dir.path().join("logs").join(id.log_directory_name());
        std::fs::create_dir_all(&log_directory)
            .with_context(|| format!("creating {log_directory:?}"))?;
        let sandbox_config = id.sandbox_config(&log_directory);
        let volumes = pod.resolve_volumes(&dir.path().join("volumes"))?;
        let slots = pod
            .spec
            .containers
            .iter()
            .map(|c| Slot {
                name: c.name.clone(),
                image_ref: String::new(),
                attempt: 0,
                phase: Phase::Pending,
                backoff: INITIAL_BACKOFF,
                log: None,
                probes: Probes::default(),
            })
            .collect();
        Ok(Self {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            pod,
            uid,
            sandbox_config,
            auth,
            sandbox_id: None,
            pod_ip: String::new(),
            log_directory,
            volumes,
            slots,
            finals: Vec::new(),
            _dir: dir,
        })
    }

    /// `namespace/name`, for messages.
    pub fn name(&self) -> String {
        format!("{}/{}", self.pod.namespace, self.pod.name)
    }

    /// Runs the pod until no container runs or will run again; returns 0 if
    /// every container's last exit code was 0, else the first non-zero one.
    ///
    /// Cancelling the future leaves the pod as far as it got;
    /// [`PodRun::teardown`] removes it in any case.
    pub async fn play(&mut self) -> anyhow::Result<i32> {
        self.run_sandbox().await?;
        for i in 0..self.slots.len() {
            self.pull(i).await?;
            self.start(i).await?;
        }
        let mut ticks = tokio::time::interval(LOG_POLL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_status = Instant::now();
        loop {
            ticks.tick().await;
            self.show_logs();
            if last_status.elapsed() >= STATUS_POLL {
                last_status = Instant::now();
                self.poll_exits().await?;
            }
            self.restart_due().await?;
            self.run_probes().await;
            if self.slots.iter().all(|s| matches!(s.phase, Phase::Done)) {
                return Ok(self.finals.iter().copied().find(|&c| c != 0).unwrap_or(0));
            }
        }
    }

    async fn run_sandbox(&mut self) -> anyhow::Result<()> {
        let request = cri::RunPodSandboxRequest {
            config: Some(self.sandbox_config.clone()),
            runtime_handler: self.pod.spec.runtime_class_name.clone().unwrap_or_default(),
        };
        let response = self.runtime.run_pod_sandbox(request).await;
        let id = response
            .map_err(rpc_error("RunPodSandbox"))?
            .into_inner()
            .pod_sandbox_id;
        let request = cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.clone(),
            verbose: false,
        };
        let response = self.runtime.pod_sandbox_status(request).await;
        self.pod_ip = response
            .map_err(rpc_error("PodSandboxStatus"))?
            .into_inner()
            .status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .unwrap_or_default();
        self.sandbox_id = Some(id);
        if self.pod_ip.is_empty() {
            eprintln!("wasmlet play: the pod has no IP (the runtime has no pod network)");
        } else {
            eprintln!("wasmlet play: pod IP {}", self.pod_ip);
        }
        Ok(())
    }

    async fn pull(&mut self, i: usize) -> anyhow::Result<()> {
        let image = &self.pod.spec.containers[i].image;
        let request = cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: image.clone(),
                ..Default::default()
            }),
            auth: self.auth.clone(),
            sandbox_config: Some(self.sandbox_config.clone()),
        };
        let response = self.images.pull_image(request).await;
        let image_ref = response
            .map_err(rpc_error("PullImage"))
            .with_context(|| format!("container {:?}: image {image}", self.slots[i].name))?
            .into_inner()
            .image_ref;
        // A runtime that answers without a ref is asked for the image by name.
        self.slots[i].image_ref = if image_ref.is_empty() {
            image.clone()
        } else {
            image_ref
        };
        Ok(())
    }

    /// CreateContainer and StartContainer for the slot's current attempt.
    /// A start failure is an exit of that run, as the kubelet sees it.
    async fn start(&mut self, i: usize) -> anyhow::Result<()> {
        let slot = &self.slots[i];
        let id = PodIdentity {
            pod: &self.pod,
            uid: &self.uid,
        };
        let config = id.container_config(
            &self.pod.spec.containers[i],
            slot.attempt,
            &slot.image_ref,
            &self.volumes,
        )?;
        let log_path = self.log_directory.join(&config.log_path);
        if let Some(parent) = log_path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {parent:?}"))?;
        }
        let request = cri::CreateContainerRequest {
            pod_sandbox_id: self.sandbox_id.clone().unwrap_or_default(),
            config: Some(config),
            sandbox_config: Some(self.sandbox_config.clone()),
        };
        let response = self.runtime.create_container(request).await;
        let container_id = response
            .map_err(rpc_error("CreateContainer"))
            .with_context(|| format!("container {:?}", self.slots[i].name))?
            .into_inner()
            .container_id;
        let slot = &mut self.slots[i];
        slot.log = Some(LogFollower::new(log_path));
        slot.phase = Phase::Running {
            id: container_id.clone(),
        };
        let request = cri::StartContainerRequest {
            container_id: container_id.clone(),
        };
        let Err(status) = self.runtime.start_container(request).await else {
            let now = Instant::now();
            let container = &self.pod.spec.containers[i];
            let delay = |p: &Option<Probe>| {
                p.as_ref()
                    .map(|p| now + Duration::from_secs(p.initial_delay_seconds))
            };
            slot.probes = Probes {
                next_readiness: delay(&container.readiness_probe),
                next_liveness: delay(&container.liveness_probe),
                // Without a readiness probe a running container is ready.
                ready: container.readiness_probe.is_none(),
                ..Probes::default()
            };
            if !self.pod_ip.is_empty() {
                for port in container
                    .ports
                    .iter()
                    .filter(|p| p.protocol.eq_ignore_ascii_case("tcp"))
                {
                    say(
                        Stream::Stderr,
                        &slot.name,
                        &format!(
                            "reachable at http://{}:{}/",
                            self.pod_ip, port.container_port
                        ),
                    );
                }
            }
            return Ok(());
        };
        say(
            Stream::Stderr,
            &slot.name,
            &format!("{:#}", rpc_error("StartContainer")(status.clone())),
        );
        let exit = match self.container_exit(&container_id).await {
            Ok(Some(exit)) => exit,
            _ => Exit {
                code: START_ERROR_CODE,
                reason: "StartError".to_owned(),
                message: status.message().to_owned(),
            },
        };
        self.exited(i, exit);
        Ok(())
    }

    /// The container's exit, or `None` while it has not exited.
    async fn container_exit(&mut self, container_id: &str) -> anyhow::Result<Option<Exit>> {
        let request = cri::ContainerStatusRequest {
            container_id: container_id.to_owned(),
            verbose: false,
        };
        let response = self.runtime.container_status(request).await;
        let status = response
            .map_err(rpc_error("ContainerStatus"))?
            .into_inner()
            .status
            .context("ContainerStatus answered without a status")?;
        if status.state() != cri::ContainerState::ContainerExited {
            return Ok(None);
        }
        Ok(Some(Exit {
            code: status.exit_code,
            reason: status.reason,
            message: status.message,
        }))
    }

    async fn poll_exits(&mut self) -> anyhow::Result<()> {
        for i in 0..self.slots.len() {
            let Phase::Running { id } = &self.slots[i].phase else {
                continue;
            };
            let id = id.clone();
            let exit = self
                .container_exit(&id)
                .await
                .with_context(|| format!("container {:?}", self.slots[i].name))?;
            if let Some(exit) = exit {
                self.exited(i, exit);
            }
        }
        Ok(())
    }

    /// Shows the end of the run's output and its exit, and applies the
    /// restart policy.
    fn exited(&mut self, i: usize, exit: Exit) {
        let policy = self.pod.spec.restart_policy;
        let slot = &mut self.slots[i];
        if let Some(log) = slot.log.as_mut() {
            show(&slot.name, log.finish());
        }
        let mut line = format!("exited with code {}", exit.code);
        if !exit.reason.is_empty() {
            line.push_str(&format!(" ({})", exit.reason));
        }
        // The first line says what happened; the rest (a backtrace) went
        // to the log, shown above.
        if let Some(first) = exit.message.lines().find(|l| !l.trim().is_empty()) {
            line.push_str(&format!(": {}", first.trim_end()));
        }
        say(Stream::Stderr, &slot.name, &line);
        if policy.restarts(exit.code) {
            let delay = slot.backoff;
            slot.backoff = (delay * 2).min(MAX_BACKOFF);
            slot.phase = Phase::BackingOff {
                until: Instant::now() + delay,
            };
            say(
                Stream::Stderr,
                &slot.name,
                &format!(
                    "restarting in {}s (restartPolicy {policy})",
                    delay.as_secs_f32()
                ),
            );
        } else {
            slot.phase = Phase::Done;
            self.finals.push(exit.code);
        }
    }

    async fn restart_due(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        for i in 0..self.slots.len() {
            if let Phase::BackingOff { until } = self.slots[i].phase
                && until <= now
            {
                self.slots[i].attempt += 1;
                self.start(i).await?;
            }
        }
        Ok(())
    }

    /// Runs the probes that are due, as the kubelet's prober does: a
    /// readiness change is shown; a liveness probe failing
    /// `failureThreshold` times in a row stops the container, which the
    /// restart policy then restarts.
    async fn run_probes(&mut self) {
        let now = Instant::now();
        for i in 0..self.slots.len() {
            let Phase::Running { id } = &self.slots[i].phase else {
                continue;
            };
            let id = id.clone();
            let container = self.pod.spec.containers[i].clone();
            if let Some(probe) = &container.readiness_probe
                && self.slots[i]
                    .probes
                    .next_readiness
                    .is_some_and(|t| t <= now)
            {
                let result =
                    probe_once(&mut self.runtime, &id, &self.pod_ip, &container, probe).await;
                let slot = &mut self.slots[i];
                slot.probes.next_readiness =
                    Some(now + Duration::from_secs(probe.period_seconds.max(1)));
                match result {
                    Ok(what) => {
                        slot.probes.readiness_failures = 0;
                        slot.probes.readiness_successes += 1;
                        if !slot.probes.ready
                            && slot.probes.readiness_successes >= probe.success_threshold.max(1)
                        {
                            slot.probes.ready = true;
                            say(
                                Stream::Stderr,
                                &slot.name,
                                &format!("ready: readiness probe passed ({what})"),
                            );
                        }
                    }
                    Err(why) => {
                        slot.probes.readiness_successes = 0;
                        slot.probes.readiness_failures += 1;
                        if slot.probes.readiness_failures >= probe.failure_threshold.max(1) {
                            if slot.probes.ready {
                                say(
                                    Stream::Stderr,
                                    &slot.name,
                                    &format!("not ready: readiness probe failed ({why})"),
                                );
                            }
                            slot.probes.ready = false;
                        }
                    }
                }
            }
            if let Some(probe) = &container.liveness_probe
                && self.slots[i].probes.next_liveness.is_some_and(|t| t <= now)
            {
                let result =
                    probe_once(&mut self.runtime, &id, &self.pod_ip, &container, probe).await;
                let slot = &mut self.slots[i];
                slot.probes.next_liveness =
                    Some(now + Duration::from_secs(probe.period_seconds.max(1)));
                match result {
                    Ok(_) => slot.probes.liveness_failures = 0,
                    Err(why) => {
                        slot.probes.liveness_failures += 1;
                        let failures = slot.probes.liveness_failures;
                        if failures >= probe.failure_threshold.max(1) {
                            say(
                                Stream::Stderr,
                                &slot.name,
                                &format!(
                                    "liveness probe failed {failures} times ({why}): stopping the container"
                                ),
                            );
                            slot.probes.next_liveness = None;
                            let request = cri::StopContainerRequest {
                                container_id: id.clone(),
                                timeout: self.pod.spec.grace_period_seconds(),
                            };
                            if let Err(status) = self.runtime.stop_container(request).await {
                                say(
                                    Stream::Stderr,
                                    &self.slots[i].name,
                                    &format!("{:#}", rpc_error("StopContainer")(status)),
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    fn show_logs(&mut self) {
        for slot in &mut self.slots {
            if let (Phase::Running { .. }, Some(log)) = (&slot.phase, slot.log.as_mut()) {
                show(&slot.name, log.poll());
            }
        }
    }

    /// Removes the pod from the runtime: with `stop_containers`, first
    /// StopContainer with the pod's grace period for every running
    /// container (as the kubelet does when a pod is deleted); then
    /// StopPodSandbox and RemovePodSandbox. Every step is tried; the first
    /// failure is returned.
    pub async fn teardown(&mut self, stop_containers: bool) -> anyhow::Result<()> {
        let mut first_error = None;
        let mut keep = |result: anyhow::Result<()>| {
            if let Err(e) = result {
                eprintln!("wasmlet play: {e:#}");
                first_error.get_or_insert(e);
            }
        };
        if stop_containers {
            let grace = self.pod.spec.grace_period_seconds();
            for i in 0..self.slots.len() {
                let Phase::Running { id } = &self.slots[i].phase else {
                    continue;
                };
                let request = cri::StopContainerRequest {
                    container_id: id.clone(),
                    timeout: grace,
                };
                let response = self.runtime.stop_container(request).await;
                keep(response.map(drop).map_err(rpc_error("StopContainer")));
            }
        }
        let sandbox_id = match self.sandbox_id.clone() {
            Some(id) => Some(id),
            None => self.find_sandbox().await.unwrap_or_else(|e| {
                keep(Err(e));
                None
            }),
        };
        if let Some(id) = sandbox_id {
            let request = cri::StopPodSandboxRequest {
                pod_sandbox_id: id.clone(),
            };
            let response = self.runtime.stop_pod_sandbox(request).await;
            keep(response.map(drop).map_err(rpc_error("StopPodSandbox")));
            for slot in &mut self.slots {
                if let (Phase::Running { .. }, Some(log)) = (&slot.phase, slot.log.as_mut()) {
                    show(&slot.name, log.finish());
                }
            }
            let request = cri::RemovePodSandboxRequest { pod_sandbox_id: id };
            let response = self.runtime.remove_pod_sandbox(request).await;
            keep(response.map(drop).map_err(rpc_error("RemovePodSandbox")));
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The sandbox of this run when RunPodSandbox was cut short before it
    /// answered: found by the uid label the kubelet puts on it.
    async fn find_sandbox(&mut self) -> anyhow::Result<Option<String>> {
        let request = cri::ListPodSandboxRequest {
            filter: Some(cri::PodSandboxFilter {
                label_selector: HashMap::from([(
                    kubelet::POD_UID_LABEL.to_owned(),
                    self.uid.clone(),
                )]),
                ..Default::default()
            }),
        };
        let response = self.runtime.list_pod_sandbox(request).await;
        let items = response
            .map_err(rpc_error("ListPodSandbox"))?
            .into_inner()
            .items;
        Ok(items.into_iter().next().map(|s| s.id))
    }
}

/// One probe against the pod's IP: `Ok` with what it saw, or why it failed.
/// HTTP probes pass on a status from 200 to 399, as the kubelet's do.
async fn probe_once(
    runtime: &mut RuntimeServiceClient<Channel>,
    id: &str,
    pod_ip: &str,
    container: &Container,
    probe: &Probe,
) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if let Some(exec) = &probe.exec {
        let request = cri::ExecSyncRequest {
            container_id: id.to_owned(),
            cmd: exec.command.clone(),
            timeout: i64::try_from(probe.timeout_seconds.max(1)).unwrap_or(i64::MAX),
        };
        let reply = runtime
            .exec_sync(request)
            .await
            .map_err(|s| format!("exec {:?}: {}", exec.command, s.message()))?
            .into_inner();
        return if reply.exit_code == 0 {
            Ok(format!("exec {:?} exited 0", exec.command))
        } else {
            Err(format!(
                "exec {:?} exited {}: {}",
                exec.command,
                reply.exit_code,
                String::from_utf8_lossy(&reply.stderr).trim()
            ))
        };
    }
    if pod_ip.is_empty() {
        return Err("the pod has no IP".to_owned());
    }
    let timeout = Duration::from_secs(probe.timeout_seconds.max(1));
    let (port, path) = match (&probe.http_get, &probe.tcp_socket) {
        (Some(get), _) => (container.port_number(&get.port), Some(get.path.as_str())),
        (None, Some(tcp)) => (container.port_number(&tcp.port), None),
        (None, None) => return Err("no httpGet or tcpSocket action".to_owned()),
    };
    let port = port.ok_or("the probe's port is not one of the container's")?;
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect((pod_ip, port))
            .await
            .map_err(|e| format!("connecting to {pod_ip}:{port}: {e}"))?;
        let Some(path) = path else {
            return Ok(format!("connected to {pod_ip}:{port}"));
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {pod_ip}:{port}\r\nUser-Agent: kube-probe/wasmlet-play\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("GET http://{pod_ip}:{port}{path}: {e}"))?;
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 8192 {
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|e| format!("GET http://{pod_ip}:{port}{path}: {e}"))?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        let status: u16 = String::from_utf8_lossy(&head)
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("GET http://{pod_ip}:{port}{path}: no HTTP status"))?;
        let seen = format!("GET http://{pod_ip}:{port}{path}: {status}");
        if (200..400).contains(&status) {
            Ok(seen)
        } else {
            Err(seen)
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no answer from {pod_ip}:{port} within {timeout:?}")))
}

/// Prints `[container] text` on the stream the container wrote to.
/// Output that cannot be written (a closed pipe) is dropped.
fn say(stream: Stream, container: &str, text: &str) {
    let _ = match stream {
        Stream::Stdout => writeln!(std::io::stdout().lock(), "[{container}] {text}"),
        Stream::Stderr => writeln!(std::io::stderr().lock(), "[{container}] {text}"),
    };
}

fn show(container: &str, lines: Vec<Line>) {
    for line in lines {
        say(line.stream, container, &line.text);
    }
}
