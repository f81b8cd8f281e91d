//! `wasmlet play`: the real binary run on Pod manifests written by the
//! test, with its own in-process agent (nothing listens on the socket it is
//! given) or against a daemon that is already serving.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

use crate::daemon::Wasmlet;
use crate::{ECHO_P1, ECHO_P2, HELLO_HTTP_P2, HOG_P1, SLEEPER_P1, TICKER_P1};

/// How long one play may take: start an agent, compile, run, tear down.
const PLAY_TIMEOUT: Duration = Duration::from_secs(30);

/// `--image` flags importing these samples into play's in-process agent.
fn images(samples: &[(&str, &str)]) -> Vec<String> {
    samples
        .iter()
        .map(|(reference, file)| format!("--image={reference}={file}"))
        .collect()
}

/// A temp dir holding the manifest, the (unused) socket path and any host
/// directories the pod mounts.
struct Scene {
    dir: TempDir,
}

impl Scene {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("wasmlet-play-test-")
            .tempdir()
            .expect("creating the test's temp dir");
        Scene { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A socket path nothing listens on, so play starts its own agent.
    fn no_socket(&self) -> PathBuf {
        self.path("none.sock")
    }

    fn manifest(&self, yaml: &str) -> PathBuf {
        let path = self.path("pod.yaml");
        std::fs::write(&path, yaml).expect("writing the manifest");
        path
    }

    /// Plays `yaml` with `flags` and nothing listening on the socket.
    fn play(&self, yaml: &str, flags: &[String]) -> Played {
        let mut args = vec![
            "--socket".to_owned(),
            self.no_socket().display().to_string(),
        ];
        args.extend_from_slice(flags);
        Play::spawn(&args, &self.manifest(yaml)).finish(PLAY_TIMEOUT)
    }
}

/// A running `wasmlet play`, its output collected as it comes.
struct Play {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
}

/// How a play ended.
#[derive(Debug)]
struct Played {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Played {
    #[track_caller]
    fn assert_code(&self, code: i32) {
        assert_eq!(
            self.status.code(),
            Some(code),
            "wasmlet play ended with {}\n{self}",
            self.status
        );
    }

    #[track_caller]
    fn assert_stdout(&self, needle: &str) {
        assert!(
            self.stdout.lines().any(|l| l == needle),
            "no stdout line {needle:?}\n{self}"
        );
    }

    #[track_caller]
    fn assert_stderr(&self, needle: &str) {
        assert!(
            self.stderr.contains(needle),
            "stderr does not contain {needle:?}\n{self}"
        );
    }

    fn stderr_count(&self, needle: &str) -> usize {
        self.stderr.lines().filter(|l| l.contains(needle)).count()
    }
}

impl std::fmt::Display for Played {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "---- stdout ----\n{}---- stderr ----\n{}---- end ----",
            self.stdout, self.stderr
        )
    }
}

fn collect(mut pipe: impl Read + Send + 'static, into: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => into
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
    })
}

impl Play {
    fn spawn(args: &[String], manifest: &Path) -> Self {
        let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned());
        let mut child = Command::new(Wasmlet::bin())
            .arg("play")
            .args(args)
            .arg(manifest)
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning wasmlet play");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            collect(child.stdout.take().unwrap(), stdout.clone()),
            collect(child.stderr.take().unwrap(), stderr.clone()),
        ];
        Play {
            child,
            stdout,
            stderr,
            readers,
            started: Instant::now(),
        }
    }

    fn output(&self) -> String {
        format!(
            "---- stdout ----\n{}---- stderr ----\n{}---- end ----",
            self.stdout.lock().unwrap(),
            self.stderr.lock().unwrap()
        )
    }

    /// Waits (bounded) until a stdout line equals `needle`.
    fn wait_for_stdout(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.stdout.lock().unwrap().lines().any(|l| l == needle) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "wasmlet play ended ({status}) before printing {needle:?}\n{}",
                    self.output()
                );
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "wasmlet play did not print {needle:?} within {timeout:?}\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (bounded) until a stderr line starts with `prefix`; returns it.
    fn wait_for_stderr(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self
                .stderr
                .lock()
                .unwrap()
                .lines()
                .find(|l| l.starts_with(prefix))
            {
                return line.to_owned();
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "wasmlet play ended ({status}) before printing {prefix:?}\n{}",
                    self.output()
                );
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "wasmlet play did not print {prefix:?} within {timeout:?}\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        kill(pid, signal).expect("signalling wasmlet play");
    }

    /// Waits for the process to end, killing it (and failing) after `timeout`.
    fn finish(mut self, timeout: Duration) -> Played {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("polling wasmlet play") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "wasmlet play did not end within {timeout:?}\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for reader in self.readers.drain(..) {
            reader.join().expect("joining an output reader");
        }
        Played {
            status,
            stdout: std::mem::take(&mut *self.stdout.lock().unwrap()),
            stderr: std::mem::take(&mut *self.stderr.lock().unwrap()),
            took: self.started.elapsed(),
        }
    }
}

impl Drop for Play {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn echo_pod(restart_policy: &str, env: &str) -> String {
    format!(
        "
apiVersion: v1
kind: Pod
metadata:
  name: echo
spec:
  restartPolicy: {restart_policy}
  containers:
    - name: echo
      image: {ECHO_P1}
      args: [hello, from play]
      env:
{env}"
    )
}

#[test]
fn an_echo_pod_runs_with_its_args_env_and_volumes() {
    let scene = Scene::new();
    let data = scene.path("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("hello.txt"), "hello from the host\n").unwrap();
    let created = scene.path("made/by/play");
    let yaml = format!(
        "
apiVersion: v1
kind: Pod
metadata:
  name: echo
  labels: {{app: play-test}}
spec:
  restartPolicy: Never
  runtimeClassName: wasm
  containers:
    - name: echo
      image: {ECHO_P1}
      imagePullPolicy: IfNotPresent
      args: [hello, '$(GREETING) world']
      env:
        - {{name: GREETING, value: hi}}
        - {{name: READ_FILE, value: /data/hello.txt}}
        - {{name: WRITE_FILE, value: /scratch/out.txt}}
        - {{name: EXIT_CODE, value: '0'}}
      volumeMounts:
        - {{name: data, mountPath: /data, readOnly: true}}
        - {{name: scratch, mountPath: /scratch}}
        - {{name: created, mountPath: /created}}
  volumes:
    - name: data
      hostPath: {{path: {}, type: Directory}}
    - name: scratch
      emptyDir: {{}}
    - name: created
      hostPath: {{path: {}, type: DirectoryOrCreate}}
",
        data.display(),
        created.display()
    );
    let played = scene.play(&yaml, &images(&[(ECHO_P1, wasm_samples::ECHO_P1)]));
    played.assert_code(0);
    played.assert_stderr("starting an in-process agent on a temporary root");
    played.assert_stdout("[echo] argc=3");
    played.assert_stdout("[echo] arg[1]=hello");
    played.assert_stdout("[echo] arg[2]=hi world");
    played.assert_stdout("[echo] env GREETING=hi");
    played.assert_stdout("[echo] env EXIT_CODE=0");
    played.assert_stdout("[echo] file /data/hello.txt: hello from the host");
    played.assert_stdout("[echo] wrote /scratch/out.txt");
    // stderr records go to stderr, still prefixed.
    played.assert_stderr("[echo] echo done");
    assert!(!played.stdout.contains("echo done"), "{played}");
    played.assert_stderr("[echo] exited with code 0 (Completed)");
    assert!(
        created.is_dir(),
        "DirectoryOrCreate did not create {created:?}"
    );
}

#[test]
fn the_exit_code_of_a_failed_container_is_plays() {
    let scene = Scene::new();
    let yaml = echo_pod("Never", "        - {name: EXIT_CODE, value: '3'}\n");
    let played = scene.play(&yaml, &images(&[(ECHO_P1, wasm_samples::ECHO_P1)]));
    played.assert_code(3);
    played.assert_stdout("[echo] arg[2]=from play");
    played.assert_stderr("[echo] exited with code 3 (Error)");
    assert_eq!(played.stderr_count("restarting"), 0, "{played}");
}

#[test]
fn on_failure_does_not_restart_a_container_that_succeeded() {
    let scene = Scene::new();
    let yaml = format!(
        "
kind: Pod
metadata: {{name: ticker}}
spec:
  restartPolicy: OnFailure
  containers:
    - name: ticker
      image: {TICKER_P1}
      env: [{{name: TICKS, value: '2'}}, {{name: TICK_MS, value: '50'}}]
"
    );
    let played = scene.play(&yaml, &images(&[(TICKER_P1, wasm_samples::TICKER_P1)]));
    played.assert_code(0);
    played.assert_stdout("[ticker] tick 1");
    played.assert_stdout("[ticker] tick 2");
    assert_eq!(
        played.stderr_count("[ticker] exited with code 0"),
        1,
        "{played}"
    );
    assert_eq!(played.stderr_count("restarting"), 0, "{played}");
}

#[test]
fn on_failure_restarts_a_failing_container_until_the_timeout() {
    let scene = Scene::new();
    let yaml = echo_pod("OnFailure", "        - {name: EXIT_CODE, value: '1'}\n");
    let mut flags = images(&[(ECHO_P1, wasm_samples::ECHO_P1)]);
    flags.extend(["--timeout".to_owned(), "6".to_owned()]);
    let played = scene.play(&yaml, &flags);
    assert!(
        played.stderr_count("[echo] exited with code 1 (Error)") >= 2,
        "fewer than two runs in 6s\n{played}"
    );
    played.assert_stderr("[echo] restarting in 1s (restartPolicy OnFailure)");
    played.assert_stderr("--timeout of 6s reached");
    assert!(!played.status.success(), "{played}");
    played.assert_code(124);
    assert!(
        played.took >= Duration::from_secs(6),
        "ended after {:?}",
        played.took
    );
}

#[test]
fn a_component_pod_runs() {
    let scene = Scene::new();
    let yaml = format!(
        "
kind: Pod
metadata: {{name: echo-p2}}
spec:
  restartPolicy: Never
  containers:
    - name: echo
      image: {ECHO_P2}
      args: [hello, component]
      env: [{{name: GREETING, value: hi}}]
"
    );
    let played = scene.play(&yaml, &images(&[(ECHO_P2, wasm_samples::ECHO_P2)]));
    played.assert_code(0);
    played.assert_stdout("[echo] arg[1]=hello");
    played.assert_stdout("[echo] arg[2]=component");
    played.assert_stdout("[echo] env GREETING=hi");
}

#[test]
fn cri_errors_show_the_grpc_code() {
    let scene = Scene::new();
    // A registry on loopback that refuses connections: nothing leaves the
    // machine, and the pull fails as unavailable after its retries.
    let missing = "127.0.0.1:1/samples/missing:v1";
    let yaml =
        echo_pod("Never", "        - {name: EXIT_CODE, value: '0'}\n").replace(ECHO_P1, missing);
    let played = scene.play(&yaml, &[]);
    assert!(!played.status.success(), "{played}");
    played.assert_stderr("PullImage failed: Unavailable");
    played.assert_stderr(missing);
}

#[test]
fn other_kinds_are_refused() {
    let scene = Scene::new();
    let yaml = echo_pod("Never", "        - {name: EXIT_CODE, value: '0'}\n")
        .replace("kind: Pod", "kind: Deployment");
    let played = scene.play(&yaml, &[]);
    assert!(!played.status.success(), "{played}");
    played.assert_stderr("play runs only `kind: Pod`");
    assert!(
        !played.stderr.contains("starting an in-process agent"),
        "connected before checking the manifest\n{played}"
    );
}

/// Plays a pod of one sleeping container with `flags`, nothing listening
/// on the socket; returns once the guest has said it sleeps.
fn play_sleeper(scene: &Scene, flags: &[String]) -> Play {
    let yaml = format!(
        "
kind: Pod
metadata: {{name: sleeper}}
spec:
  containers:
    - name: sleeper
      image: {SLEEPER_P1}
"
    );
    let mut args = vec![
        "--socket".to_owned(),
        scene.no_socket().display().to_string(),
    ];
    args.extend_from_slice(flags);
    args.extend(images(&[(SLEEPER_P1, wasm_samples::SLEEPER_P1)]));
    let mut play = Play::spawn(&args, &scene.manifest(&yaml));
    play.wait_for_stdout("[sleeper] sleeping", PLAY_TIMEOUT);
    play
}

#[test]
fn sigint_stops_the_pod_and_exits_130() {
    let scene = Scene::new();
    let play = play_sleeper(&scene, &[]);
    play.signal(Signal::SIGINT);
    let played = play.finish(PLAY_TIMEOUT);
    played.assert_code(130);
    played.assert_stderr("SIGINT: stopping pod default/sleeper");
}

/// play's in-process agent serves no metrics, even with a `[metrics]`
/// address in its configuration: that port is the node agent's.
#[test]
fn play_serves_no_metrics_even_when_configured() {
    let scene = Scene::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port");
    let config = scene.path("wasmlet.toml");
    std::fs::write(
        &config,
        format!("[metrics]\naddress = \"127.0.0.1:{port}\"\n"),
    )
    .unwrap();
    let play = play_sleeper(
        &scene,
        &["--config".to_owned(), config.display().to_string()],
    );
    // Time for a metrics server to bind, were one started.
    std::thread::sleep(Duration::from_millis(500));
    let served = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
    play.signal(Signal::SIGINT);
    let played = play.finish(PLAY_TIMEOUT);
    played.assert_code(130);
    assert!(
        !served,
        "something answered at play's configured metrics address 127.0.0.1:{port}\n{played}"
    );
}

#[tokio::test]
async fn a_running_agent_is_used_and_left_clean() {
    let wasmlet = Wasmlet::start().await;
    let scene = Scene::new();
    let yaml = echo_pod("Never", "        - {name: EXIT_CODE, value: '0'}\n");
    let mut args = vec![
        "--socket".to_owned(),
        wasmlet.socket().display().to_string(),
    ];
    args.extend(images(&[(ECHO_P1, wasm_samples::ECHO_P1)]));
    let manifest = scene.manifest(&yaml);
    let played =
        tokio::task::spawn_blocking(move || Play::spawn(&args, &manifest).finish(PLAY_TIMEOUT))
            .await
            .expect("joining the play");
    played.assert_code(0);
    played.assert_stderr(&format!(
        "using the CRI runtime on {}",
        wasmlet.socket().display()
    ));
    played.assert_stderr("PullImage will be used");
    assert!(
        !played.stderr.contains("starting an in-process agent"),
        "{played}"
    );
    played.assert_stdout("[echo] arg[1]=hello");
    played.assert_stderr("[echo] exited with code 0 (Completed)");

    let mut cri = wasmlet.cri();
    let sandboxes = cri.list_pod_sandbox(None).await.unwrap();
    assert!(
        sandboxes.is_empty(),
        "play left sandboxes behind: {sandboxes:?}"
    );
    let containers = cri.list_containers(None).await.unwrap();
    assert!(
        containers.is_empty(),
        "play left containers behind: {containers:?}"
    );
}

/// The repository's HTTP sample manifest, played with a pod network: play
/// prints the URL it answers at, its readiness probe passes, it serves
/// there, and Ctrl-C leaves no namespace or address behind.
#[test]
fn the_http_sample_serves_at_its_pod_ip_and_its_probes_pass() {
    let net = wasmlet_conformance::pod_network::TestNetwork::create()
        .unwrap_or_else(|e| panic!("this test needs: {e}"));
    let scene = Scene::new();
    let config = scene.path("wasmlet.toml");
    std::fs::write(&config, net.wasmlet_config()).unwrap();
    let manifest =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../wasm-samples/pods/hello-http.yaml");
    let mut args = vec![
        "--config".to_owned(),
        config.display().to_string(),
        "--socket".to_owned(),
        scene.no_socket().display().to_string(),
    ];
    args.extend(images(&[(HELLO_HTTP_P2, wasm_samples::HELLO_HTTP_P2)]));
    let mut play = Play::spawn(&args, &manifest);
    let line = play.wait_for_stderr("[hello] reachable at http://", PLAY_TIMEOUT);
    let url = line.trim_start_matches("[hello] reachable at http://");
    let (ip, port) = url.trim_end_matches('/').split_once(':').unwrap();
    assert!(net.contains(ip), "{line}");
    assert_eq!(port, "8080");
    play.wait_for_stderr("[hello] ready: readiness probe passed", PLAY_TIMEOUT);
    let (status, body) = net
        .http_get(ip, 8080, "/from-the-host", Duration::from_secs(10))
        .unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "hello from hello-http path=/from-the-host\n")
    );
    play.wait_for_stdout("[hello] request GET /from-the-host", PLAY_TIMEOUT);
    play.signal(Signal::SIGINT);
    let played = play.finish(PLAY_TIMEOUT);
    played.assert_code(130);
    assert!(!played.stderr.contains("liveness probe failed"), "{played}");
    assert!(net.namespaces().is_empty(), "{:?}", net.namespaces());
    assert!(net.allocated_ips().is_empty(), "{:?}", net.allocated_ips());
}

/// A liveness probe that keeps failing stops the container, as the kubelet
/// does, and the restart policy decides what follows.
#[test]
fn a_failing_liveness_probe_stops_the_container() {
    let net = wasmlet_conformance::pod_network::TestNetwork::create()
        .unwrap_or_else(|e| panic!("this test needs: {e}"));
    let scene = Scene::new();
    let config = scene.path("wasmlet.toml");
    std::fs::write(&config, net.wasmlet_config()).unwrap();
    let yaml = format!(
        "
kind: Pod
metadata: {{name: unhealthy}}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 5
  containers:
    - name: web
      image: {HELLO_HTTP_P2}
      ports: [{{containerPort: 8080}}, {{name: nothing, containerPort: 9}}]
      livenessProbe:
        tcpSocket: {{port: nothing}}
        periodSeconds: 1
        failureThreshold: 2
"
    );
    let mut args = vec![
        "--config".to_owned(),
        config.display().to_string(),
        "--socket".to_owned(),
        scene.no_socket().display().to_string(),
    ];
    args.extend(images(&[(HELLO_HTTP_P2, wasm_samples::HELLO_HTTP_P2)]));
    let played = Play::spawn(&args, &scene.manifest(&yaml)).finish(PLAY_TIMEOUT);
    played.assert_stderr("[web] liveness probe failed 2 times");
    played.assert_stderr("[web] exited with code 0 (Completed)");
    played.assert_code(0);
}

#[test]
fn exec_probes_run_in_the_container_through_exec_sync() {
    let scene = Scene::new();
    // The ticker's own program never ends, so the liveness exec times out;
    // `cat` is no program of the image, so readiness never passes.
    let yaml = format!(
        "
kind: Pod
metadata: {{name: probed}}
spec:
  restartPolicy: Never
  containers:
    - name: ticker
      image: {TICKER_P1}
      env: [{{name: TICK_MS, value: '100'}}]
      readinessProbe:
        exec: {{command: [cat, /tmp/ready]}}
        periodSeconds: 1
      livenessProbe:
        exec: {{command: [/proc/self/exe]}}
        periodSeconds: 1
        timeoutSeconds: 1
        failureThreshold: 2
"
    );
    let played = scene.play(&yaml, &images(&[(TICKER_P1, wasm_samples::TICKER_P1)]));
    played.assert_stderr("[ticker] liveness probe failed 2 times (exec [\"/proc/self/exe\"]");
    played.assert_stderr("did not finish within 1s");
    assert_eq!(
        played.stderr_count("ready: readiness probe passed"),
        0,
        "{played}"
    );
}

#[test]
fn resources_limits_become_the_containers_limits() {
    let scene = Scene::new();
    let yaml = format!(
        "
kind: Pod
metadata: {{name: limited}}
spec:
  restartPolicy: Never
  containers:
    - name: hog
      image: {HOG_P1}
      resources: {{limits: {{memory: 8Mi, cpu: 200m}}}}
"
    );
    let played = scene.play(&yaml, &images(&[(HOG_P1, wasm_samples::HOG_P1)]));
    played.assert_stdout("[hog] holding 1 MiB");
    played.assert_stderr("[hog] exited with code 137 (OOMKilled)");
}
