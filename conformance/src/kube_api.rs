//! A stand-in for the Kubernetes API server and the kubelet's streaming
//! proxy on loopback, so conformance tests can drive a CRI streaming server
//! with the real `kubectl exec`, `kubectl attach` and `kubectl port-forward`.
//!
//! In a cluster those commands go: kubectl → API server → kubelet, which asks
//! the runtime for a streaming URL (the CRI calls `Exec`, `Attach`,
//! `PortForward`) and proxies the client's upgrade request to it. [`KubeApi`]
//! plays both middle parts:
//!
//! - it answers what kubectl asks before streaming: discovery (`/api`,
//!   `/apis`, `/api/v1`), `/version`, and the pods registered with
//!   [`KubeApi::add_pod`], as v1 `Pod` JSON built from a [`PodDescription`];
//!   anything else gets a 404 `Status`;
//! - for `/api/v1/namespaces/{ns}/pods/{name}/{exec,attach,portforward}` it
//!   parses the query into a [`StreamRequest`], validates it as the API
//!   server does, hands it to the test's resolver (which makes the CRI call
//!   and returns the streaming URL), then forwards the request head to that
//!   URL, with `Host` rewritten and every other header kept, and copies
//!   bytes both ways, unchanged, until both sides close. The runtime's `101
//!   Switching Protocols` and every frame after it pass through as they are.
//!
//! The fixture does not translate protocols: the streaming server sees what
//! kubectl sent. With [`KubectlTransport::WebSocket`] (kubectl 1.32's
//! default) exec and attach ask for a WebSocket with the one subprotocol
//! `v5.channel.k8s.io`, and port-forward for a WebSocket carrying SPDY
//! frames (`SPDY/3.1+portforward.k8s.io`), which a real API server would
//! unwrap before talking SPDY to the kubelet but this fixture passes on as
//! is; when the streaming server refuses or botches a WebSocket upgrade,
//! kubectl retries the same request over SPDY/3.1 (`POST`, `Upgrade:
//! SPDY/3.1`, `X-Stream-Protocol-Version` headers). With
//! [`KubectlTransport::Spdy`] it goes straight to SPDY/3.1, which is how a
//! kubelet always talks to a runtime. kubectl adds `timeout=` (its
//! `--request-timeout`) to every query, streaming ones included; like the
//! API server for these long-running requests, the fixture ignores it, and
//! kubectl does not end a session when it passes.
//!
//! Every request is recorded ([`KubeApi::requests`],
//! [`KubeApi::stream_requests`]) for assertion messages. The fixture listens
//! on `127.0.0.1` only and refuses to proxy to a non-loopback address; its
//! connections close when it is dropped. [`KubeApi::kubectl`] runs kubectl
//! against it with a configuration, cache and home of its own, so the user's
//! kubeconfig is never read.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::registry::{Framing, HTTP_TIMEOUT, Head, read_body, read_head};
use crate::token_server::percent_decode;

/// The kubectl binary run by [`KubeApi::kubectl`], looked up on `PATH`.
pub const KUBECTL_BINARY: &str = "kubectl";

/// The `--request-timeout` kubectl is given. It bounds kubectl's API
/// requests, not the streaming sessions that follow an upgrade.
pub const KUBECTL_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the resolver may take to return a streaming URL.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long connecting to the streaming server may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The environment variable that makes [`skip_without_kubectl`] fail instead
/// of skipping when kubectl is missing.
pub const REQUIRE_KUBECTL_ENV: &str = "WASMLET_REQUIRE_KUBECTL";

/// The Kubernetes version `/version` reports.
const SERVER_MINOR: &str = "32";

/// The creation and start time every pod reports.
const POD_TIMESTAMP: &str = "2025-01-01T00:00:00Z";

/// The node every pod reports being bound to.
const NODE_NAME: &str = "wasmlet-node";

/// What the resolver returns: the streaming URL, or a message the client is
/// shown as an internal error.
type ResolveFuture = Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;

type Resolver = Arc<dyn Fn(StreamRequest) -> ResolveFuture + Send + Sync>;

/// Which streaming subresource was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Exec,
    Attach,
    PortForward,
}

impl StreamKind {
    /// The subresource's name in a pod's path.
    pub fn subresource(self) -> &'static str {
        match self {
            StreamKind::Exec => "exec",
            StreamKind::Attach => "attach",
            StreamKind::PortForward => "portforward",
        }
    }

    fn from_subresource(name: &str) -> Option<StreamKind> {
        [
            StreamKind::Exec,
            StreamKind::Attach,
            StreamKind::PortForward,
        ]
        .into_iter()
        .find(|kind| kind.subresource() == name)
    }
}

/// A streaming request as the API server validated it, handed to the
/// resolver and recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRequest {
    pub kind: StreamKind,
    /// `GET` for WebSocket upgrades, `POST` for SPDY ones.
    pub method: String,
    pub namespace: String,
    pub pod: String,
    /// The container named by the query or, when it named none and the pod
    /// has one container, that one. Empty for port-forward.
    pub container: String,
    /// The `command` parameters, in order (exec only).
    pub command: Vec<String>,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
    /// The `ports` parameters (port-forward only); kubectl 1.32 names them
    /// in each stream's headers instead, so this is usually empty.
    pub ports: Vec<u16>,
    /// The request's headers as kubectl sent them.
    pub headers: Vec<(String, String)>,
}

impl StreamRequest {
    /// The first header called `name`, compared without case.
    pub fn header(&self, name: &str) -> Option<&str> {
        crate::registry::header(&self.headers, name)
    }
}

/// A pod the fixture serves, from which its v1 `Pod` JSON is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodDescription {
    pub namespace: String,
    pub name: String,
    /// `Running` unless set otherwise; kubectl refuses to exec into or
    /// attach to a `Succeeded` or `Failed` pod.
    pub phase: String,
    pub containers: Vec<ContainerDescription>,
}

impl PodDescription {
    /// A running pod without containers.
    pub fn new(namespace: &str, name: &str) -> PodDescription {
        PodDescription {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            phase: "Running".to_owned(),
            containers: Vec::new(),
        }
    }

    /// Adds a container.
    pub fn container(mut self, container: ContainerDescription) -> PodDescription {
        self.containers.push(container);
        self
    }

    /// Sets the pod's phase.
    pub fn phase(mut self, phase: &str) -> PodDescription {
        self.phase = phase.to_owned();
        self
    }

    /// The v1 `Pod` the API server would return.
    pub fn to_json(&self) -> serde_json::Value {
        let uid = format!("00000000-0000-4000-8000-{:012x}", fnv1a(&self.key()));
        let containers: Vec<serde_json::Value> = self
            .containers
            .iter()
            .map(|container| {
                let ports: Vec<serde_json::Value> = container
                    .ports
                    .iter()
                    .map(|port| {
                        let mut json = serde_json::json!({
                            "containerPort": port.container_port,
                            "protocol": "TCP",
                        });
                        if let Some(name) = &port.name {
                            json["name"] = name.as_str().into();
                        }
                        json
                    })
                    .collect();
                serde_json::json!({
                    "name": container.name,
                    "image": container.image,
                    "ports": ports,
                    "stdin": container.stdin,
                    "stdinOnce": container.stdin_once,
                    "tty": container.tty,
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                    "imagePullPolicy": "IfNotPresent",
                })
            })
            .collect();
        let running = self.phase == "Running";
        let statuses: Vec<serde_json::Value> = self
            .containers
            .iter()
            .map(|container| {
                let state = if running {
                    serde_json::json!({ "running": { "startedAt": POD_TIMESTAMP } })
                } else {
                    serde_json::json!({ "waiting": { "reason": "ContainerCreating" } })
                };
                serde_json::json!({
                    "name": container.name,
                    "image": container.image,
                    "imageID": "",
                    "ready": running,
                    "started": running,
                    "restartCount": 0,
                    "state": state,
                })
            })
            .collect();
        let ready = if running { "True" } else { "False" };
        serde_json::json!({
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "uid": uid,
                "resourceVersion": "1",
                "creationTimestamp": POD_TIMESTAMP,
            },
            "spec": {
                "containers": containers,
                "restartPolicy": "Always",
                "terminationGracePeriodSeconds": 30,
                "dnsPolicy": "ClusterFirst",
                "nodeName": NODE_NAME,
                "schedulerName": "default-scheduler",
                "enableServiceLinks": true,
            },
            "status": {
                "phase": self.phase,
                "conditions": [
                    { "type": "Initialized", "status": "True" },
                    { "type": "Ready", "status": ready },
                    { "type": "ContainersReady", "status": ready },
                    { "type": "PodScheduled", "status": "True" },
                ],
                "hostIP": "127.0.0.1",
                "podIP": "127.0.0.1",
                "startTime": POD_TIMESTAMP,
                "containerStatuses": statuses,
                "qosClass": "BestEffort",
            },
        })
    }

    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A container of a [`PodDescription`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerDescription {
    pub name: String,
    /// Only shown to kubectl; defaults to `wasmlet.test/NAME:latest`.
    pub image: String,
    /// Whether the container keeps its stdin open. Only reported:
    /// kubectl 1.32 sends `stdin=true` for `attach -i` either way.
    pub stdin: bool,
    pub stdin_once: bool,
    /// Whether the container has a TTY. Without one `kubectl attach -t`
    /// prints "Unable to use a TTY - container NAME did not allocate one"
    /// and attaches without a TTY.
    pub tty: bool,
    /// Declared ports, which `kubectl port-forward` resolves names against.
    pub ports: Vec<ContainerPort>,
}

impl ContainerDescription {
    /// A container without stdin, TTY or ports.
    pub fn new(name: &str) -> ContainerDescription {
        ContainerDescription {
            name: name.to_owned(),
            image: format!("wasmlet.test/{name}:latest"),
            stdin: false,
            stdin_once: false,
            tty: false,
            ports: Vec::new(),
        }
    }

    pub fn stdin(mut self, stdin: bool) -> ContainerDescription {
        self.stdin = stdin;
        self
    }

    pub fn stdin_once(mut self, stdin_once: bool) -> ContainerDescription {
        self.stdin_once = stdin_once;
        self
    }

    pub fn tty(mut self, tty: bool) -> ContainerDescription {
        self.tty = tty;
        self
    }

    /// Declares a TCP port, named or not.
    pub fn port(mut self, name: Option<&str>, container_port: u16) -> ContainerDescription {
        self.ports.push(ContainerPort {
            name: name.map(str::to_owned),
            container_port,
        });
        self
    }
}

/// A declared container port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub container_port: u16,
}

/// Which streaming transport kubectl is told to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KubectlTransport {
    /// kubectl 1.32's default: WebSocket (`v5.channel.k8s.io`) for exec
    /// and attach, SPDY inside a WebSocket for port-forward; each retried
    /// over plain SPDY/3.1 when the WebSocket upgrade fails.
    WebSocket,
    /// SPDY/3.1 for everything, as kubectl did before 1.31.
    Spdy,
}

impl KubectlTransport {
    /// The value of kubectl's `KUBECTL_*_WEBSOCKETS` feature gates.
    fn websockets(self) -> &'static str {
        match self {
            KubectlTransport::WebSocket => "true",
            KubectlTransport::Spdy => "false",
        }
    }
}

/// A running API server stand-in on `127.0.0.1`, stopped when dropped.
pub struct KubeApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_loop: JoinHandle<()>,
    // Holds kubectl's empty kubeconfig, its cache and its home.
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for KubeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeApi")
            .field("addr", &self.addr)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

struct Shared {
    addr: SocketAddr,
    resolver: Resolver,
    pods: Mutex<BTreeMap<String, PodDescription>>,
    requests: Mutex<Vec<String>>,
    stream_requests: Mutex<Vec<StreamRequest>>,
}

impl KubeApi {
    /// Listens on a free port of `127.0.0.1`. `resolver` is called for each
    /// valid streaming request with what was asked; it returns the
    /// `http://` URL to proxy the request to (what the runtime's CRI
    /// `Exec`, `Attach` or `PortForward` answered), or an error message,
    /// which kubectl is shown as a 500. It is ready when this returns.
    pub async fn start<F, Fut>(resolver: F) -> io::Result<KubeApi>
    where
        F: Fn(StreamRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, String>> + Send + 'static,
    {
        let dir = tempfile::Builder::new().prefix("wasmlet-kube-").tempdir()?;
        std::fs::write(dir.path().join("kubeconfig"), b"")?;
        std::fs::create_dir(dir.path().join("cache"))?;
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let resolver: Resolver = Arc::new(move |request| Box::pin(resolver(request)));
        let shared = Arc::new(Shared {
            addr,
            resolver,
            pods: Mutex::new(BTreeMap::new()),
            requests: Mutex::new(Vec::new()),
            stream_requests: Mutex::new(Vec::new()),
        });
        let serving = Arc::clone(&shared);
        let accept_loop = tokio::spawn(crate::registry::accept_loop(listener, move |stream| {
            serve_connection(stream, Arc::clone(&serving))
        }));
        Ok(KubeApi {
            addr,
            shared,
            accept_loop,
            dir,
        })
    }

    /// `http://127.0.0.1:PORT`, for `kubectl --server`.
    pub fn server(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address the fixture listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `pod`, replacing any pod of the same namespace and name.
    pub fn add_pod(&self, pod: PodDescription) {
        self.shared.pods().insert(pod.key(), pod);
    }

    /// Stops serving a pod; it is then answered 404.
    pub fn remove_pod(&self, namespace: &str, name: &str) {
        self.shared.pods().remove(&format!("{namespace}/{name}"));
    }

    /// One line per request received so far, oldest first:
    /// `METHOD TARGET -> OUTCOME`. The outcome is the status answered (with
    /// the `Status` message for a refused streaming request), `resolving`
    /// or `proxying to URL` while a streaming request is in progress, and
    /// `proxied to URL (N bytes up, M down)` once both sides closed.
    pub fn requests(&self) -> Vec<String> {
        self.shared.requests().clone()
    }

    /// The streaming requests that reached the resolver, oldest first.
    pub fn stream_requests(&self) -> Vec<StreamRequest> {
        self.shared.stream_requests().clone()
    }

    /// kubectl, pointed at this fixture and told to use `transport`; add
    /// the subcommand and its arguments. It reads no kubeconfig, cache or
    /// home of the user's, uses no proxy, and is killed when the command's
    /// child is dropped.
    ///
    /// Its stdin is null unless the caller pipes it. kubectl only asks for
    /// a TTY (`-t`) when its stdin is a terminal: otherwise it prints
    /// "Unable to use a TTY - input is not a terminal" and sends
    /// `tty=false`, so a TTY session needs a pseudo-terminal as stdin.
    pub fn kubectl(&self, transport: KubectlTransport) -> tokio::process::Command {
        let dir = self.dir.path();
        let mut command = tokio::process::Command::new(KUBECTL_BINARY);
        command
            .arg(format!("--server={}", self.server()))
            .arg("--insecure-skip-tls-verify")
            .arg(format!(
                "--request-timeout={}s",
                KUBECTL_REQUEST_TIMEOUT.as_secs()
            ))
            .arg(format!("--cache-dir={}", dir.join("cache").display()))
            .env("KUBECONFIG", dir.join("kubeconfig"))
            .env("HOME", dir)
            .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", transport.websockets())
            .env("KUBECTL_PORT_FORWARD_WEBSOCKETS", transport.websockets())
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// `kubectl port-forward pod/POD PORTS...` in `namespace`, listening on
    /// `127.0.0.1` only (kubectl's default also listens on `::1`). Each of
    /// `ports` is `LOCAL:REMOTE`, `:REMOTE` for a free local port, or `PORT`.
    pub fn port_forward(
        &self,
        transport: KubectlTransport,
        namespace: &str,
        pod: &str,
        ports: &[&str],
    ) -> tokio::process::Command {
        let mut command = self.kubectl(transport);
        command
            .args(["port-forward", "--address=127.0.0.1", "-n", namespace])
            .arg(format!("pod/{pod}"))
            .args(ports);
        command
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        // The accept loop owns the connection tasks: aborting it drops its
        // JoinSet, which aborts them and closes their sockets.
        self.accept_loop.abort();
    }
}

/// Whether `kubectl version --client` runs.
pub fn kubectl_available() -> bool {
    std::process::Command::new(KUBECTL_BINARY)
        .args(["version", "--client"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// For tests that need kubectl: `true` (and a line on stderr) when it is
/// missing and the test should return. Panics instead when
/// [`REQUIRE_KUBECTL_ENV`] is `1`.
pub fn skip_without_kubectl(test: &str) -> bool {
    if kubectl_available() {
        return false;
    }
    if std::env::var(REQUIRE_KUBECTL_ENV).is_ok_and(|value| value == "1") {
        panic!("{test}: {KUBECTL_BINARY} is not installed but {REQUIRE_KUBECTL_ENV}=1");
    }
    eprintln!(
        "SKIP {test}: {KUBECTL_BINARY} is not installed (set {REQUIRE_KUBECTL_ENV}=1 to fail)"
    );
    true
}

impl Shared {
    fn pods(&self) -> MutexGuard<'_, BTreeMap<String, PodDescription>> {
        self.pods
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn requests(&self) -> MutexGuard<'_, Vec<String>> {
        self.requests
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn stream_requests(&self) -> MutexGuard<'_, Vec<StreamRequest>> {
        self.stream_requests
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends a line to the request log and returns its index.
    fn record(&self, line: String) -> usize {
        let mut requests = self.requests();
        requests.push(line);
        requests.len() - 1
    }

    fn pod(&self, namespace: &str, name: &str) -> Option<PodDescription> {
        self.pods().get(&format!("{namespace}/{name}")).cloned()
    }

    /// Answers a request that is not a streaming one.
    fn answer(&self, method: &str, path: &str) -> Answer {
        if method != "GET" {
            return Answer::status(
                405,
                "MethodNotAllowed",
                &format!(
                    "the server does not allow this method on the requested resource: {method} {path}"
                ),
            );
        }
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match segments.as_slice() {
            ["api"] => Answer::json(serde_json::json!({
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    { "clientCIDR": "0.0.0.0/0", "serverAddress": self.addr.to_string() },
                ],
            })),
            ["apis"] => Answer::json(serde_json::json!({
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [],
            })),
            ["api", "v1"] => Answer::json(api_resources()),
            ["version"] => Answer::json(serde_json::json!({
                "major": "1",
                "minor": SERVER_MINOR,
                "gitVersion": format!("v1.{SERVER_MINOR}.0-wasmlet"),
                "gitCommit": "0000000000000000000000000000000000000000",
                "gitTreeState": "clean",
                "buildDate": POD_TIMESTAMP,
                "goVersion": "go1.23.0",
                "compiler": "gc",
                "platform": "linux/amd64",
            })),
            ["api", "v1", "namespaces", namespace, "pods"] => {
                let items: Vec<serde_json::Value> = self
                    .pods()
                    .values()
                    .filter(|pod| pod.namespace == *namespace)
                    .map(PodDescription::to_json)
                    .collect();
                Answer::json(serde_json::json!({
                    "kind": "PodList",
                    "apiVersion": "v1",
                    "metadata": { "resourceVersion": "1" },
                    "items": items,
                }))
            }
            ["api", "v1", "namespaces", namespace, "pods", name] => {
                match self.pod(namespace, name) {
                    Some(pod) => Answer::json(pod.to_json()),
                    None => pod_not_found(name),
                }
            }
            _ => Answer::status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        }
    }

    /// Checks a streaming request as the API server does: the pod exists,
    /// the container is known (or implied), the query makes sense.
    fn stream_request(
        &self,
        target: &StreamTarget<'_>,
        head: &Head,
    ) -> Result<StreamRequest, Answer> {
        let StreamTarget {
            kind,
            method,
            namespace,
            pod: name,
            query,
        } = *target;
        let pod = self
            .pod(namespace, name)
            .ok_or_else(|| pod_not_found(name))?;
        let mut request = StreamRequest {
            kind,
            method: method.to_owned(),
            namespace: namespace.to_owned(),
            pod: name.to_owned(),
            container: String::new(),
            command: Vec::new(),
            stdin: false,
            stdout: false,
            stderr: false,
            tty: false,
            ports: Vec::new(),
            headers: head.headers.clone(),
        };
        let bad_request = |message: String| Answer::status(400, "BadRequest", &message);
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let (Some(key), Some(value)) = (percent_decode(key), percent_decode(value)) else {
                return Err(bad_request(format!("malformed query parameter {pair:?}")));
            };
            let flag = || {
                parse_bool(&value)
                    .ok_or_else(|| bad_request(format!("{key}={value:?} is not a boolean")))
            };
            match key.as_str() {
                "container" => request.container = value,
                "command" => request.command.push(value),
                "stdin" => request.stdin = flag()?,
                "stdout" => request.stdout = flag()?,
                "stderr" => request.stderr = flag()?,
                "tty" => request.tty = flag()?,
                "ports" => {
                    for port in value.split(',').filter(|port| !port.trim().is_empty()) {
                        let port = port
                            .trim()
                            .parse::<u16>()
                            .ok()
                            .filter(|port| *port != 0)
                            .ok_or_else(|| bad_request(format!("invalid port {port:?}")))?;
                        request.ports.push(port);
                    }
                }
                // Unknown parameters are ignored, as the API server does.
                _ => {}
            }
        }
        if kind == StreamKind::PortForward {
            return Ok(request);
        }
        if request.container.is_empty() {
            match pod.containers.as_slice() {
                [only] => request.container = only.name.clone(),
                containers => {
                    let names: Vec<&str> = containers.iter().map(|c| c.name.as_str()).collect();
                    return Err(bad_request(format!(
                        "a container name must be specified for pod {name}, choose one of: {names:?}"
                    )));
                }
            }
        } else if !pod.containers.iter().any(|c| c.name == request.container) {
            return Err(bad_request(format!(
                "container {} is not valid for pod {name}",
                request.container
            )));
        }
        if kind == StreamKind::Exec && request.command.is_empty() {
            return Err(bad_request(
                "you must specify at least one command for the container".to_owned(),
            ));
        }
        if !(request.stdin || request.stdout || request.stderr) {
            return Err(bad_request(
                "you must specify at least 1 of stdin, stdout, stderr".to_owned(),
            ));
        }
        Ok(request)
    }
}

/// `/api/v1`: pods and their streaming and log subresources.
fn api_resources() -> serde_json::Value {
    let resource = |name: &str, kind: &str, verbs: &[&str]| {
        serde_json::json!({
            "name": name,
            "singularName": "",
            "namespaced": true,
            "kind": kind,
            "verbs": verbs,
        })
    };
    let mut pods = resource(
        "pods",
        "Pod",
        &[
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ],
    );
    pods["singularName"] = "pod".into();
    pods["shortNames"] = serde_json::json!(["po"]);
    pods["categories"] = serde_json::json!(["all"]);
    serde_json::json!({
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [
            pods,
            resource("pods/attach", "PodAttachOptions", &["create", "get"]),
            resource("pods/exec", "PodExecOptions", &["create", "get"]),
            resource("pods/log", "Pod", &["get"]),
            resource("pods/portforward", "PodPortForwardOptions", &["create", "get"]),
            resource("pods/status", "Pod", &["get", "patch", "update"]),
        ],
    })
}

fn pod_not_found(name: &str) -> Answer {
    let mut answer = Answer::status(404, "NotFound", &format!("pods \"{name}\" not found"));
    answer.body["details"] = serde_json::json!({ "name": name, "kind": "pods" });
    answer
}

/// A JSON response to write.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: serde_json::Value,
}

impl Answer {
    fn json(body: serde_json::Value) -> Answer {
        Answer { status: 200, body }
    }

    /// A failed metav1 `Status`.
    fn status(status: u16, reason: &str, message: &str) -> Answer {
        Answer {
            status,
            body: serde_json::json!({
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": message,
                "reason": reason,
                "details": {},
                "code": status,
            }),
        }
    }

    /// The `Status` message, for the request log.
    fn message(&self) -> &str {
        self.body["message"].as_str().unwrap_or_default()
    }

    fn to_bytes(&self, close: bool) -> Vec<u8> {
        let body = self.body.to_string();
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            502 => "Bad Gateway",
            _ => "Internal Server Error",
        };
        let mut head = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: application/json\r\n\
             Cache-Control: no-cache, private\r\nContent-Length: {}\r\n",
            self.status,
            body.len()
        );
        if close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body.as_bytes());
        bytes
    }
}

/// Serves one client connection, request after request, until the client
/// closes it, stays idle for [`HTTP_TIMEOUT`], or upgrades it (which hands
/// it to the streaming server for good). Errors just close the connection.
async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    let mut client = BufReader::new(stream);
    loop {
        let Ok(Ok(Some(head))) = tokio::time::timeout(HTTP_TIMEOUT, read_head(&mut client)).await
        else {
            return;
        };
        let mut parts = head.start_line.split(' ');
        let (Some(method), Some(target), Some(version)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return;
        };
        let (method, target) = (method.to_owned(), target.to_owned());
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));

        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        if let [
            "api",
            "v1",
            "namespaces",
            namespace,
            "pods",
            name,
            subresource,
        ] = segments.as_slice()
            && let Some(kind) = StreamKind::from_subresource(subresource)
            && (method == "GET" || method == "POST")
        {
            let line = format!("{method} {target}");
            let index = shared.record(format!("{line} -> resolving"));
            let target = StreamTarget {
                kind,
                method: &method,
                namespace,
                pod: name,
                query,
            };
            let progress = |progress: String| {
                shared.requests()[index] = format!("{line} -> {progress}");
            };
            let outcome = serve_stream(&shared, client, target, &head, &progress).await;
            shared.requests()[index] = format!("{line} -> {outcome}");
            return;
        }

        let close = version != "HTTP/1.1"
            || head
                .header("Connection")
                .is_some_and(|value| value.eq_ignore_ascii_case("close"));
        let Ok(framing) = head.request_framing() else {
            return;
        };
        let Ok(Ok(body)) =
            tokio::time::timeout(HTTP_TIMEOUT, read_body(&mut client, framing)).await
        else {
            return;
        };
        if let Framing::Length(length) = framing
            && (body.len() as u64) < length
        {
            return;
        }
        let answer = shared.answer(&method, path);
        shared.record(format!("{method} {target} -> {}", answer.status));
        if client
            .get_mut()
            .write_all(&answer.to_bytes(close))
            .await
            .is_err()
            || close
        {
            return;
        }
    }
}

/// Does what the kubelet does with a streaming request: validates it, asks
/// the resolver where to go, forwards the request head there and copies
/// bytes both ways until both sides are done. Answers the client itself if
/// any step before the copy fails. `progress` is told when the copy starts;
/// the outcome is returned, both for the request log.
async fn serve_stream(
    shared: &Shared,
    mut client: BufReader<TcpStream>,
    target: StreamTarget<'_>,
    head: &Head,
    progress: &(dyn Fn(String) + Sync),
) -> String {
    let opened = match shared.stream_request(&target, head) {
        Ok(request) => open_upstream(shared, &mut client, &target, head, request).await,
        Err(answer) => Err(answer),
    };
    let (url, mut server, early) = match opened {
        Ok(opened) => opened,
        Err(answer) => {
            let _ = client.get_mut().write_all(&answer.to_bytes(true)).await;
            return format!("{} ({})", answer.status, answer.message());
        }
    };
    progress(format!("proxying to {url}"));
    let mut client = client.into_inner();
    match tokio::io::copy_bidirectional(&mut client, &mut server).await {
        Ok((up, down)) => format!(
            "proxied to {url} ({} bytes up, {down} down)",
            early as u64 + up
        ),
        Err(error) => format!("proxied to {url}, ended by {error}"),
    }
}

/// A request for a streaming subresource, as its start line names it.
#[derive(Debug, Clone, Copy)]
struct StreamTarget<'a> {
    kind: StreamKind,
    method: &'a str,
    namespace: &'a str,
    pod: &'a str,
    query: &'a str,
}

/// Resolves `request` to a streaming URL, connects there and sends the
/// request head as kubectl sent it but for the target and `Host`, followed
/// by whatever kubectl sent after the head that `client` already buffered.
/// Returns the URL, the connection and how many bytes after the head were
/// sent with it, or the error to answer.
async fn open_upstream(
    shared: &Shared,
    client: &mut BufReader<TcpStream>,
    target: &StreamTarget<'_>,
    head: &Head,
    request: StreamRequest,
) -> Result<(String, TcpStream, usize), Answer> {
    shared.stream_requests().push(request.clone());
    let url = match tokio::time::timeout(RESOLVE_TIMEOUT, (shared.resolver)(request)).await {
        Ok(Ok(url)) => url,
        Ok(Err(message)) => return Err(Answer::status(500, "InternalError", &message)),
        Err(_) => {
            return Err(Answer::status(
                500,
                "InternalError",
                &format!("no streaming URL within {RESOLVE_TIMEOUT:?}"),
            ));
        }
    };
    let upstream = StreamingUrl::parse(&url)
        .map_err(|message| Answer::status(500, "InternalError", &message))?;
    let unavailable = |why: String| {
        Answer::status(
            502,
            "ServiceUnavailable",
            &format!("connect to {url}: {why}"),
        )
    };
    let mut server =
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(upstream.addr)).await {
            Ok(Ok(server)) => server,
            Ok(Err(error)) => return Err(unavailable(error.to_string())),
            Err(_) => return Err(unavailable(format!("no answer within {CONNECT_TIMEOUT:?}"))),
        };
    let mut forwarded = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\n",
        target.method, upstream.target, upstream.authority
    );
    for (name, value) in &head.headers {
        if !name.eq_ignore_ascii_case("Host") {
            let _ = write!(forwarded, "{name}: {value}\r\n");
        }
    }
    forwarded.push_str("\r\n");
    let mut forwarded = forwarded.into_bytes();
    forwarded.extend_from_slice(client.buffer());
    server
        .write_all(&forwarded)
        .await
        .map_err(|error| unavailable(format!("sending the request: {error}")))?;
    Ok((url, server, client.buffer().len()))
}

/// Where a resolver's `http://HOST:PORT/PATH?QUERY` URL leads.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StreamingUrl {
    addr: SocketAddr,
    /// `HOST:PORT` as the URL spells it, for the `Host` header.
    authority: String,
    /// The path and query, `/` when the URL has no path.
    target: String,
}

impl StreamingUrl {
    /// Parses an `http` URL whose host is a loopback IP or `localhost`.
    fn parse(url: &str) -> Result<StreamingUrl, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("streaming URL {url:?} is not http://"))?;
        let (authority, target) = match rest.find(['/', '?']) {
            Some(at) => (&rest[..at], rest[at..].to_owned()),
            None => (rest, "/".to_owned()),
        };
        let target = if target.starts_with('?') {
            format!("/{target}")
        } else {
            target
        };
        let with_port = if authority.ends_with(']') || !authority.contains(':') {
            format!("{authority}:80")
        } else {
            authority.to_owned()
        };
        let with_port = with_port.replace("localhost:", "127.0.0.1:");
        let addr: SocketAddr = with_port
            .parse()
            .map_err(|_| format!("streaming URL {url:?} has no IP:PORT host"))?;
        if !addr.ip().is_loopback() {
            return Err(format!(
                "streaming URL {url:?} is not on loopback; the fixture only proxies there"
            ));
        }
        Ok(StreamingUrl {
            addr,
            authority: authority.to_owned(),
            target,
        })
    }
}

/// A boolean query value as Go's `strconv.ParseBool` reads it.
fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// FNV-1a, to give each pod a stable UID.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    }) & 0xffff_ffff_ffff
}

#[cfg(test)]
mod tests {
    use std::process::ExitStatus;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::registry::{Request, send};

    /// The bound on each kubectl run and on each wait for the fake server.
    const TEST_TIMEOUT: Duration = Duration::from_secs(30);

    /// A streaming server on loopback that records each request head and
    /// answers `101 Switching Protocols`. A WebSocket upgrade gets a real
    /// handshake (first subprotocol offered) followed by `messages` as
    /// binary messages and a close, if `messages` is set; anything else
    /// (SPDY) gets the first `X-Stream-Protocol-Version` offered, then the
    /// bytes it sends are echoed.
    struct FakeStreamingServer {
        addr: SocketAddr,
        heads: Arc<Mutex<Vec<Head>>>,
        task: JoinHandle<()>,
    }

    impl FakeStreamingServer {
        async fn start(messages: Option<Vec<Vec<u8>>>) -> FakeStreamingServer {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let heads = Arc::new(Mutex::new(Vec::new()));
            let recorded = Arc::clone(&heads);
            let task = tokio::spawn(async move {
                let mut sessions = tokio::task::JoinSet::new();
                while let Ok((stream, _)) = listener.accept().await {
                    let session = fake_session(stream, Arc::clone(&recorded), messages.clone());
                    sessions.spawn(tokio::time::timeout(TEST_TIMEOUT, session));
                }
            });
            FakeStreamingServer { addr, heads, task }
        }

        fn url(&self, target: &str) -> String {
            format!("http://{}{target}", self.addr)
        }

        fn heads(&self) -> Vec<Head> {
            self.heads.lock().unwrap().clone()
        }
    }

    impl Drop for FakeStreamingServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn fake_session(
        stream: TcpStream,
        recorded: Arc<Mutex<Vec<Head>>>,
        messages: Option<Vec<Vec<u8>>>,
    ) -> io::Result<()> {
        let mut reader = BufReader::new(stream);
        let Some(head) = read_head(&mut reader).await? else {
            return Ok(());
        };
        let first = |name: &str| {
            head.header(name)
                .and_then(|value| value.split(',').next())
                .map(|value| value.trim().to_owned())
        };
        let websocket = head
            .header("Upgrade")
            .is_some_and(|value| value.eq_ignore_ascii_case("websocket"));
        let mut answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {}\r\n",
            head.header("Upgrade").unwrap_or_default()
        );
        if websocket {
            let key = head.header("Sec-WebSocket-Key").unwrap_or_default();
            let _ = write!(
                answer,
                "Sec-WebSocket-Accept: {}\r\n",
                websocket_accept(key)
            );
            if let Some(protocol) = first("Sec-WebSocket-Protocol") {
                let _ = write!(answer, "Sec-WebSocket-Protocol: {protocol}\r\n");
            }
        } else if let Some(protocol) = first("X-Stream-Protocol-Version") {
            let _ = write!(answer, "X-Stream-Protocol-Version: {protocol}\r\n");
        }
        answer.push_str("\r\n");
        recorded.lock().unwrap().push(head);
        // What the client sent after its head, already read with it.
        let early = reader.buffer().to_vec();
        let mut stream = reader.into_inner();
        stream.write_all(answer.as_bytes()).await?;
        match (websocket, messages) {
            (true, Some(messages)) => {
                for message in messages {
                    stream.write_all(&websocket_frame(0x2, &message)).await?;
                }
                // A normal closure (1000).
                stream
                    .write_all(&websocket_frame(0x8, &[0x03, 0xe8]))
                    .await?;
                tokio::io::copy(&mut stream, &mut tokio::io::sink()).await?;
            }
            (true, None) => {
                tokio::io::copy(&mut stream, &mut tokio::io::sink()).await?;
            }
            (false, _) => {
                stream.write_all(&early).await?;
                let (mut read, mut write) = stream.into_split();
                tokio::io::copy(&mut read, &mut write).await?;
            }
        }
        Ok(())
    }

    /// An unmasked, final server frame with opcode `opcode`.
    fn websocket_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0x80 | opcode];
        match u16::try_from(payload.len()) {
            Ok(length) if length < 126 => frame.push(length as u8),
            Ok(length) => {
                frame.push(126);
                frame.extend_from_slice(&length.to_be_bytes());
            }
            Err(_) => {
                frame.push(127);
                frame.extend_from_slice(&(payload.len() as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(payload);
        frame
    }

    /// `Sec-WebSocket-Accept` for a client's key (RFC 6455 section 4.2.2).
    fn websocket_accept(key: &str) -> String {
        tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes())
    }

    /// The v5 (and v4) channel messages of a command that printed `stdout`
    /// and exited 0: channel 1, then the `Success` status on channel 3.
    fn successful_command(stdout: &str) -> Vec<Vec<u8>> {
        let mut out = vec![1];
        out.extend_from_slice(stdout.as_bytes());
        let mut status = vec![3];
        status.extend_from_slice(br#"{"metadata":{},"status":"Success"}"#);
        vec![out, status]
    }

    /// A fixture serving pod `default/p` (one container `c` with stdin and a
    /// port named `http`) whose streams all go to `url`.
    async fn api_to(url: String) -> KubeApi {
        let api = KubeApi::start(move |_request| {
            let url = url.clone();
            async move { Ok(url) }
        })
        .await
        .unwrap();
        api.add_pod(
            PodDescription::new("default", "p").container(
                ContainerDescription::new("c")
                    .stdin(true)
                    .port(Some("http"), 8080),
            ),
        );
        api
    }

    /// What a kubectl run left.
    #[derive(Debug)]
    struct Run {
        /// `None` if it was killed.
        status: Option<ExitStatus>,
        stdout: String,
        stderr: String,
    }

    /// Runs `command` until it exits or `done` says enough (then kills it),
    /// at most [`TEST_TIMEOUT`].
    async fn run_kubectl(mut command: tokio::process::Command, done: impl Fn(&str) -> bool) -> Run {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kubectl");
        let collect = |pipe: Option<_>| {
            let text = Arc::new(Mutex::new(Vec::new()));
            let sink = Arc::clone(&text);
            tokio::spawn(async move {
                let mut pipe: Box<dyn tokio::io::AsyncRead + Unpin + Send> = pipe.unwrap();
                let mut buffer = [0; 4096];
                while let Ok(n @ 1..) = pipe.read(&mut buffer).await {
                    sink.lock().unwrap().extend_from_slice(&buffer[..n]);
                }
            });
            move || String::from_utf8_lossy(&text.lock().unwrap()).into_owned()
        };
        let stdout = collect(child.stdout.take().map(|p| Box::new(p) as _));
        let stderr = collect(child.stderr.take().map(|p| Box::new(p) as _));
        let deadline = tokio::time::Instant::now() + TEST_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("poll kubectl") {
                break Some(status);
            }
            if done(&stdout()) || tokio::time::Instant::now() > deadline {
                child.kill().await.expect("kill kubectl");
                break None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // Let the readers drain what is left in the pipes.
        tokio::time::sleep(Duration::from_millis(50)).await;
        Run {
            status,
            stdout: stdout(),
            stderr: stderr(),
        }
    }

    /// Waits until `condition` holds, at most [`TEST_TIMEOUT`]; `context`
    /// explains a failure.
    async fn eventually(what: &str, condition: impl Fn() -> bool, context: impl Fn() -> String) {
        let deadline = tokio::time::Instant::now() + TEST_TIMEOUT;
        while !condition() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what} did not happen within {TEST_TIMEOUT:?}: {}",
                context()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn explain(api: &KubeApi, fake: &FakeStreamingServer, run: &Run) -> String {
        let heads: Vec<String> = fake
            .heads()
            .iter()
            .map(|head| format!("{} {:?}", head.start_line, head.headers))
            .collect();
        format!(
            "kubectl: {:?}\nstdout: {}\nstderr: {}\nrequests: {:#?}\nstreaming server saw: {heads:#?}",
            run.status,
            run.stdout,
            run.stderr,
            api.requests()
        )
    }

    /// The discovery and pod requests kubectl makes before it streams.
    fn assert_discovered(api: &KubeApi, context: &str) {
        let requests = api.requests();
        for prefix in [
            "GET /api?",
            "GET /apis?",
            "GET /api/v1?",
            "GET /api/v1/namespaces/default/pods/p?",
        ] {
            assert!(
                requests
                    .iter()
                    .any(|line| line.starts_with(prefix) && line.ends_with(" -> 200")),
                "no {prefix}... answered 200\n{context}"
            );
        }
    }

    #[test]
    fn the_websocket_accept_matches_rfc_6455() {
        assert_eq!(
            websocket_accept("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn streaming_urls_must_be_loopback_http() {
        let url = StreamingUrl::parse("http://127.0.0.1:10250/exec/abc?x=1").unwrap();
        assert_eq!(url.addr, "127.0.0.1:10250".parse().unwrap());
        assert_eq!(url.authority, "127.0.0.1:10250");
        assert_eq!(url.target, "/exec/abc?x=1");
        assert_eq!(StreamingUrl::parse("http://[::1]:1").unwrap().target, "/");
        assert_eq!(
            StreamingUrl::parse("http://localhost:7?a").unwrap().target,
            "/?a"
        );
        assert_eq!(
            StreamingUrl::parse("http://localhost/x").unwrap().addr,
            "127.0.0.1:80".parse().unwrap()
        );
        for bad in [
            "https://127.0.0.1:1/exec",
            "http://10.0.0.1:1/exec",
            "http://example.invalid:1/",
            "127.0.0.1:1/exec",
        ] {
            assert!(StreamingUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn query_values_decode_as_the_api_server_reads_them() {
        assert_eq!(percent_decode("a%20b+c").as_deref(), Some("a b c"));
        assert_eq!(percent_decode("%2"), None);
        assert_eq!(parse_bool("1"), Some(true));
        assert_eq!(parse_bool("False"), Some(false));
        assert_eq!(parse_bool("yes"), None);
    }

    #[tokio::test]
    async fn discovery_and_pods_are_answered_and_other_paths_are_404() {
        let api = api_to("http://127.0.0.1:9/unused".to_owned()).await;
        let addr = api.addr();
        let get = |target: &str| {
            let request = Request::get(target);
            async move { send(addr, &request).await }
        };
        let json = |response: &crate::registry::Response| -> serde_json::Value {
            serde_json::from_slice(&response.body).unwrap()
        };

        let versions = json(&get("/api").await.unwrap());
        assert_eq!(versions["kind"], "APIVersions");
        assert_eq!(versions["versions"], serde_json::json!(["v1"]));
        assert_eq!(
            json(&get("/apis").await.unwrap())["groups"],
            serde_json::json!([])
        );
        let resources = json(&get("/api/v1").await.unwrap());
        let names: Vec<&str> = resources["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|resource| resource["name"].as_str().unwrap())
            .collect();
        for name in [
            "pods",
            "pods/exec",
            "pods/attach",
            "pods/portforward",
            "pods/log",
        ] {
            assert!(names.contains(&name), "{name} in {names:?}");
        }
        assert_eq!(json(&get("/version").await.unwrap())["major"], "1");

        let pod = json(&get("/api/v1/namespaces/default/pods/p").await.unwrap());
        assert_eq!(pod["kind"], "Pod");
        assert_eq!(pod["metadata"]["name"], "p");
        assert_eq!(pod["spec"]["containers"][0]["name"], "c");
        assert_eq!(pod["spec"]["containers"][0]["stdin"], true);
        assert_eq!(pod["spec"]["containers"][0]["tty"], false);
        assert_eq!(pod["spec"]["containers"][0]["ports"][0]["name"], "http");
        assert_eq!(pod["status"]["phase"], "Running");
        assert!(pod["status"]["containerStatuses"][0]["state"]["running"].is_object());
        let list = json(&get("/api/v1/namespaces/default/pods").await.unwrap());
        assert_eq!(list["items"].as_array().unwrap().len(), 1);
        let other = json(&get("/api/v1/namespaces/other/pods").await.unwrap());
        assert_eq!(other["items"], serde_json::json!([]));

        for target in [
            "/api/v1/namespaces/default/pods/q",
            "/apis/apps/v1",
            "/healthz",
        ] {
            let response = get(target).await.unwrap();
            assert_eq!(response.status, 404, "{target}");
            let status = json(&response);
            assert_eq!(status["kind"], "Status");
            assert_eq!(status["reason"], "NotFound");
            assert_eq!(status["code"], 404);
        }
        api.remove_pod("default", "p");
        assert_eq!(
            get("/api/v1/namespaces/default/pods/p")
                .await
                .unwrap()
                .status,
            404
        );
        let put = Request::new("PUT", "/api/v1/namespaces/default/pods/p");
        assert_eq!(send(api.addr(), &put).await.unwrap().status, 405);
        assert_eq!(api.requests().len(), 12, "{:#?}", api.requests());
    }

    #[tokio::test]
    async fn stream_requests_are_checked_before_the_resolver_is_asked() {
        let api = KubeApi::start(|request: StreamRequest| async move {
            match request.container.as_str() {
                "refused" => Err("no such container in the runtime".to_owned()),
                "remote" => Ok("http://192.0.2.1:10250/exec/x".to_owned()),
                // Nothing listens on the discard port of loopback.
                _ => Ok("http://127.0.0.1:9/exec/x".to_owned()),
            }
        })
        .await
        .unwrap();
        api.add_pod(
            PodDescription::new("default", "two")
                .container(ContainerDescription::new("refused"))
                .container(ContainerDescription::new("remote")),
        );
        api.add_pod(
            PodDescription::new("default", "one").container(ContainerDescription::new("c")),
        );
        let addr = api.addr();
        let post = |target: &str| {
            let request =
                Request::new("POST", &format!("/api/v1/namespaces/default/pods/{target}"));
            async move { send(addr, &request).await.unwrap() }
        };
        for (target, status, message) in [
            (
                "missing/exec?command=a&stdout=true",
                404,
                "pods \"missing\" not found",
            ),
            (
                "two/exec?command=a&stdout=true",
                400,
                "a container name must be specified",
            ),
            (
                "one/exec?container=d&command=a&stdout=true",
                400,
                "container d is not valid",
            ),
            ("one/exec?stdout=true", 400, "at least one command"),
            ("one/attach", 400, "at least 1 of stdin, stdout, stderr"),
            ("one/exec?command=a&stdout=maybe", 400, "is not a boolean"),
            ("one/portforward?ports=0", 400, "invalid port"),
            (
                "two/attach?container=refused&stdout=true",
                500,
                "no such container in the runtime",
            ),
            (
                "two/attach?container=remote&stdout=true",
                500,
                "not on loopback",
            ),
            (
                "one/exec?command=a&stdout=true",
                502,
                "connect to http://127.0.0.1:9/exec/x",
            ),
        ] {
            let response = post(target).await;
            assert_eq!(response.status, status, "{target}: {}", response.text());
            let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
            assert_eq!(body["code"], status, "{target}: {body}");
            let text = body["message"].as_str().unwrap_or_default();
            assert!(text.contains(message), "{target}: {body}");
        }
        let requests = api.stream_requests();
        assert_eq!(requests.len(), 3, "{requests:#?}");
        let exec = &requests[2];
        assert_eq!(exec.kind, StreamKind::Exec);
        assert_eq!(exec.container, "c", "the only container is implied");
        assert_eq!(exec.command, ["a"]);
        assert!(exec.stdout && !exec.stdin && !exec.stderr && !exec.tty);
        let log = api.requests();
        assert!(
            log[9].ends_with(
                "-> 502 (connect to http://127.0.0.1:9/exec/x: Connection refused (os error 111))"
            ),
            "{log:#?}"
        );
    }

    #[tokio::test]
    async fn upgrades_are_proxied_byte_for_byte() {
        let fake = FakeStreamingServer::start(None).await;
        let url = fake.url("/exec/abc?session=1");
        let resolved = url.clone();
        let api = KubeApi::start(move |request: StreamRequest| {
            let url = resolved.clone();
            async move {
                assert_eq!(request.command, ["sh", "-c", "echo a b"]);
                assert!(request.stdin && request.tty);
                Ok(url)
            }
        })
        .await
        .unwrap();
        api.add_pod(PodDescription::new("ns", "p").container(ContainerDescription::new("c")));

        let mut client = TcpStream::connect(api.addr()).await.unwrap();
        // The head and the first frame bytes in one write, as a client that
        // does not wait for the 101 would send them.
        let request = "POST /api/v1/namespaces/ns/pods/p/exec?command=sh&command=-c\
                       &command=echo+a%20b&stdin=true&tty=1 HTTP/1.1\r\n\
                       Host: 127.0.0.1\r\nContent-Length: 0\r\nConnection: Upgrade\r\n\
                       Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n\
                       X-Stream-Protocol-Version: channel.k8s.io\r\n\r\nEARLY";
        client.write_all(request.as_bytes()).await.unwrap();
        let exchange = async {
            let mut reader = BufReader::new(&mut client);
            let head = read_head(&mut reader).await.unwrap().unwrap();
            assert_eq!(head.status().unwrap(), 101);
            assert_eq!(
                head.header("X-Stream-Protocol-Version"),
                Some("v4.channel.k8s.io")
            );
            let mut echoed = [0; 5];
            reader.read_exact(&mut echoed).await.unwrap();
            assert_eq!(&echoed, b"EARLY");
            let client = reader.into_inner();
            client.write_all(&[0, 1, 2, 255]).await.unwrap();
            let mut echoed = [0; 4];
            client.read_exact(&mut echoed).await.unwrap();
            assert_eq!(echoed, [0, 1, 2, 255]);
            client.shutdown().await.unwrap();
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
        };
        tokio::time::timeout(TEST_TIMEOUT, exchange).await.unwrap();

        let heads = fake.heads();
        assert_eq!(heads.len(), 1);
        assert_eq!(heads[0].start_line, "POST /exec/abc?session=1 HTTP/1.1");
        let expected: Vec<(String, String)> = [
            ("Host", fake.addr.to_string().as_str()),
            ("Content-Length", "0"),
            ("Connection", "Upgrade"),
            ("Upgrade", "SPDY/3.1"),
            ("X-Stream-Protocol-Version", "v4.channel.k8s.io"),
            ("X-Stream-Protocol-Version", "channel.k8s.io"),
        ]
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
        assert_eq!(heads[0].headers, expected);
        eventually(
            "the proxy to end",
            || {
                api.requests()
                    .last()
                    .is_some_and(|line| line.contains(&format!("-> proxied to {url} (9 bytes up,")))
            },
            || format!("{:#?}", api.requests()),
        )
        .await;
    }

    #[tokio::test]
    async fn kubectl_exec_over_websocket_runs_through_the_proxy() {
        if skip_without_kubectl("kubectl_exec_over_websocket_runs_through_the_proxy") {
            return;
        }
        let fake =
            FakeStreamingServer::start(Some(successful_command("hello from the fake\n"))).await;
        let api = api_to(fake.url("/exec/token-1")).await;
        let mut command = api.kubectl(KubectlTransport::WebSocket);
        command.args(["exec", "p", "-c", "c", "--", "echo", "a b"]);
        let run = run_kubectl(command, |_| false).await;
        let context = explain(&api, &fake, &run);

        assert!(
            run.status.is_some_and(|status| status.success()),
            "{context}"
        );
        assert_eq!(run.stdout, "hello from the fake\n", "{context}");
        assert_discovered(&api, &context);
        let heads = fake.heads();
        assert_eq!(heads.len(), 1, "{context}");
        let head = &heads[0];
        assert_eq!(head.start_line, "GET /exec/token-1 HTTP/1.1", "{context}");
        assert_eq!(head.header("Upgrade"), Some("websocket"), "{context}");
        assert_eq!(head.header("Connection"), Some("Upgrade"), "{context}");
        assert_eq!(
            head.header("Sec-WebSocket-Protocol"),
            Some("v5.channel.k8s.io"),
            "{context}"
        );
        assert_eq!(head.header("Host"), Some(fake.addr.to_string().as_str()));
        let requests = api.stream_requests();
        assert_eq!(requests.len(), 1, "{context}");
        let request = &requests[0];
        assert_eq!(request.kind, StreamKind::Exec);
        assert_eq!(request.method, "GET");
        assert_eq!(request.container, "c");
        assert_eq!(request.command, ["echo", "a b"]);
        assert!(
            request.stdout && request.stderr && !request.stdin && !request.tty,
            "{request:?}"
        );
    }

    #[tokio::test]
    async fn kubectl_exec_over_spdy_reaches_the_streaming_server() {
        if skip_without_kubectl("kubectl_exec_over_spdy_reaches_the_streaming_server") {
            return;
        }
        let fake = FakeStreamingServer::start(None).await;
        let api = api_to(fake.url("/exec/token-2")).await;
        let mut command = api.kubectl(KubectlTransport::Spdy);
        command.args(["exec", "-i", "p", "--", "sh"]);
        let run = run_kubectl(command, |_| !fake.heads().is_empty()).await;
        let context = explain(&api, &fake, &run);

        assert_discovered(&api, &context);
        let heads = fake.heads();
        assert_eq!(heads.len(), 1, "{context}");
        let head = &heads[0];
        assert_eq!(head.start_line, "POST /exec/token-2 HTTP/1.1", "{context}");
        assert_eq!(head.header("Upgrade"), Some("SPDY/3.1"), "{context}");
        assert_eq!(head.header("Connection"), Some("Upgrade"), "{context}");
        let versions: Vec<&str> = head
            .headers
            .iter()
            .filter(|(name, _)| name.eq_ignore_ascii_case("X-Stream-Protocol-Version"))
            .map(|(_, value)| value.as_str())
            .collect();
        assert_eq!(
            versions,
            [
                "v5.channel.k8s.io",
                "v4.channel.k8s.io",
                "v3.channel.k8s.io",
                "v2.channel.k8s.io",
                "channel.k8s.io"
            ],
            "{context}"
        );
        let request = &api.stream_requests()[0];
        assert_eq!((request.method.as_str(), request.stdin), ("POST", true));
        assert_eq!(request.command, ["sh"]);
    }

    #[tokio::test]
    async fn kubectl_attach_over_websocket_runs_through_the_proxy() {
        if skip_without_kubectl("kubectl_attach_over_websocket_runs_through_the_proxy") {
            return;
        }
        let fake = FakeStreamingServer::start(Some(successful_command("attached\n"))).await;
        let api = api_to(fake.url("/attach/token-3")).await;
        let mut command = api.kubectl(KubectlTransport::WebSocket);
        command.args(["attach", "p", "-c", "c"]);
        let run = run_kubectl(command, |_| false).await;
        let context = explain(&api, &fake, &run);

        assert!(
            run.status.is_some_and(|status| status.success()),
            "{context}"
        );
        assert_eq!(run.stdout, "attached\n", "{context}");
        assert_discovered(&api, &context);
        let heads = fake.heads();
        assert_eq!(heads.len(), 1, "{context}");
        assert_eq!(
            heads[0].start_line, "GET /attach/token-3 HTTP/1.1",
            "{context}"
        );
        assert_eq!(
            heads[0].header("Sec-WebSocket-Protocol"),
            Some("v5.channel.k8s.io")
        );
        let request = &api.stream_requests()[0];
        assert_eq!(request.kind, StreamKind::Attach);
        assert!(request.command.is_empty());
        assert!(
            request.stdout && request.stderr && !request.stdin,
            "{request:?}"
        );
    }

    #[tokio::test]
    async fn kubectl_port_forward_reaches_the_streaming_server_over_both_transports() {
        if skip_without_kubectl(
            "kubectl_port_forward_reaches_the_streaming_server_over_both_transports",
        ) {
            return;
        }
        for (transport, method, upgrade, protocol) in [
            (
                KubectlTransport::WebSocket,
                "GET",
                "websocket",
                ("Sec-WebSocket-Protocol", "SPDY/3.1+portforward.k8s.io"),
            ),
            (
                KubectlTransport::Spdy,
                "POST",
                "SPDY/3.1",
                ("X-Stream-Protocol-Version", "portforward.k8s.io"),
            ),
        ] {
            let fake = FakeStreamingServer::start(None).await;
            let api = api_to(fake.url("/portforward/token-4")).await;
            let command = api.port_forward(transport, "default", "p", &[":http"]);
            let run = run_kubectl(command, |stdout| stdout.contains(" -> 8080")).await;
            let context = format!("{transport:?}: {}", explain(&api, &fake, &run));

            assert!(
                run.status.is_none(),
                "kubectl stopped forwarding\n{context}"
            );
            assert!(
                run.stdout.starts_with("Forwarding from 127.0.0.1:"),
                "{context}"
            );
            assert_discovered(&api, &context);
            let heads = fake.heads();
            assert_eq!(heads.len(), 1, "{context}");
            assert_eq!(
                heads[0].start_line,
                format!("{method} /portforward/token-4 HTTP/1.1"),
                "{context}"
            );
            assert_eq!(heads[0].header("Upgrade"), Some(upgrade), "{context}");
            assert_eq!(heads[0].header(protocol.0), Some(protocol.1), "{context}");
            let request = &api.stream_requests()[0];
            assert_eq!(request.kind, StreamKind::PortForward);
            assert!(
                request.ports.is_empty(),
                "kubectl names ports per stream: {request:?}"
            );
        }
    }

    #[tokio::test]
    async fn kubectl_sees_a_missing_pod_as_not_found() {
        if skip_without_kubectl("kubectl_sees_a_missing_pod_as_not_found") {
            return;
        }
        let fake = FakeStreamingServer::start(None).await;
        let api = api_to(fake.url("/exec/unused")).await;
        let mut command = api.kubectl(KubectlTransport::WebSocket);
        command.args(["exec", "gone", "--", "true"]);
        let run = run_kubectl(command, |_| false).await;
        let context = explain(&api, &fake, &run);

        assert_eq!(
            run.status.and_then(|status| status.code()),
            Some(1),
            "{context}"
        );
        assert!(
            run.stderr
                .contains("Error from server (NotFound): pods \"gone\" not found"),
            "{context}"
        );
        assert!(fake.heads().is_empty(), "{context}");
    }
}
