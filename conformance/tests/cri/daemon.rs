//! `Wasmlet`: one `wasmlet` daemon on a private root and socket, owned by one test.
//!
//! The fixture imports every sample guest into a fresh root before the daemon
//! first starts (`image import` needs the root unlocked), runs `serve` with the
//! daemon's stdout and stderr appended to a file in the temp dir, and kills the
//! daemon when dropped. When the test is panicking, the daemon's log is printed
//! so the failure can be read next to the daemon's side of the story.
//! [`Wasmlet::builder`] adds a TOML config file (`--config`) and a fixed log
//! filter, and can put the root on a tmpfs of its own (a filesystem the
//! kubelet can size: its image filesystem); [`Wasmlet::push`] and
//! [`Wasmlet::cli`] run the binary's image commands.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;
use wasmlet_conformance::{CriClient, PodSandboxConfigBuilder};

/// How long the daemon may take to answer `Version` after being spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the daemon may take to exit after a signal.
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long one `wasmlet image import` may take.
const IMPORT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one `wasmlet image push|pull|ls|rm` may take (a pull retries a
/// failing registry for a few seconds before giving up).
const CLI_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Wasmlet {
    dir: TempDir,
    daemon: Option<Child>,
    /// Image reference → image id printed by `image import`.
    images: BTreeMap<String, String>,
    cri: Option<CriClient>,
    /// The `--config` file the daemon is started with, if any.
    config: Option<PathBuf>,
    /// `RUST_LOG` for the daemon, overriding the environment's.
    rust_log: Option<String>,
    /// What the daemon is started through (see [`Wasmlet::set_wrapper`]).
    wrapper: Vec<String>,
    /// Environment variables the daemon is started with (see
    /// [`Wasmlet::set_env`]).
    env: BTreeMap<String, String>,
    /// Whether the root is a tmpfs the fixture mounted (and unmounts when
    /// dropped).
    root_mounted: bool,
}

/// How to set up a [`Wasmlet`] beyond the defaults.
#[derive(Debug, Default)]
pub struct WasmletBuilder {
    config: Option<String>,
    rust_log: Option<String>,
    root_tmpfs_size: Option<String>,
}

impl WasmletBuilder {
    /// TOML written to a file the daemon gets as `--config` (the fixture's
    /// `--root` and `--socket` flags still win over it).
    pub fn config(mut self, toml: impl Into<String>) -> Self {
        self.config = Some(toml.into());
        self
    }

    /// The daemon's `RUST_LOG`, whatever the test's environment says: for
    /// tests that read the daemon's log lines.
    pub fn rust_log(mut self, filter: impl Into<String>) -> Self {
        self.rust_log = Some(filter.into());
        self
    }

    /// The root on a tmpfs of `size` (a `mount -o size=` value, e.g.
    /// `64m`), mounted before the samples are imported and unmounted when
    /// the fixture is dropped: the image store then lives on a filesystem
    /// of its own, which the kubelet's cAdvisor can size.
    pub fn root_on_tmpfs(mut self, size: &str) -> Self {
        self.root_tmpfs_size = Some(size.to_owned());
        self
    }

    /// A fresh root with every sample imported; no daemon running yet.
    pub fn build(self) -> Wasmlet {
        let mut wasmlet = Wasmlet::with_root(self.root_tmpfs_size.as_deref());
        if let Some(toml) = self.config {
            // Without a [network] of its own, the fixture's: no CNI.
            let toml = if toml.contains("[network]") {
                toml
            } else {
                format!("{toml}\n{}", wasmlet.no_network_config())
            };
            wasmlet.write_config(&toml);
        }
        wasmlet.rust_log = self.rust_log;
        wasmlet
    }

    /// A fresh root with every sample imported, served by a running daemon.
    pub async fn start(self) -> Wasmlet {
        let mut wasmlet = self.build();
        wasmlet.serve().await;
        wasmlet
    }
}

impl Wasmlet {
    /// The binary under test: `$WASMLET_BIN`, else `wasmlet` next to the
    /// directory holding this test executable (`target/<profile>/deps/..`).
    pub fn bin() -> PathBuf {
        let bin = match std::env::var_os("WASMLET_BIN") {
            Some(bin) => PathBuf::from(bin),
            None => {
                let exe = std::env::current_exe().expect("locating the test executable");
                let deps = exe.parent().expect("the test executable has a directory");
                deps.join("../wasmlet")
            }
        };
        assert!(
            bin.is_file(),
            "wasmlet binary not found at {}: build it (cargo build -p wasmlet-cri) or set WASMLET_BIN",
            bin.display()
        );
        bin
    }

    /// A fresh root with every sample imported; no daemon running yet.
    pub fn new() -> Self {
        Self::with_root(None)
    }

    /// A fresh root, on a tmpfs of `tmpfs_size` if given, with every sample
    /// imported.
    fn with_root(tmpfs_size: Option<&str>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("wasmlet-conformance-")
            .tempdir()
            .expect("creating the fixture's temp dir");
        let mut wasmlet = Wasmlet {
            dir,
            daemon: None,
            images: BTreeMap::new(),
            cri: None,
            config: None,
            rust_log: None,
            wrapper: Vec::new(),
            env: BTreeMap::new(),
            root_mounted: false,
        };
        std::fs::create_dir(wasmlet.log_root()).expect("creating the pod log root");
        if let Some(size) = tmpfs_size {
            let root = wasmlet.root();
            std::fs::create_dir(&root).expect("creating the root");
            nix::mount::mount(
                Some("tmpfs"),
                &root,
                Some("tmpfs"),
                nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
                Some(format!("size={size},mode=0700").as_str()),
            )
            .unwrap_or_else(|e| panic!("mounting a tmpfs on {}: {e}", root.display()));
            wasmlet.root_mounted = true;
        }
        // Whatever the machine's /etc/cni/net.d holds, pods get no network
        // unless a test configures one.
        let toml = wasmlet.no_network_config();
        wasmlet.write_config(&toml);
        for &(reference, path) in wasm_samples::ALL {
            wasmlet.import(Path::new(path), reference);
        }
        wasmlet
    }

    /// A fresh root with every sample imported, served by a running daemon.
    pub async fn start() -> Self {
        let mut wasmlet = Self::new();
        wasmlet.serve().await;
        wasmlet
    }

    /// A `[network]` section with an empty CNI directory.
    fn no_network_config(&self) -> String {
        format!(
            "[network]\ncni_conf_dir = {:?}\nnetns_dir = {:?}\n",
            self.dir.path().join("no-cni"),
            self.dir.path().join("netns")
        )
    }

    /// Writes the daemon's config: `toml`, with metrics off unless it has
    /// a `[metrics]` section (tests run many daemons at once; the default
    /// port is one).
    fn write_config(&mut self, toml: &str) {
        let path = self.dir.path().join("wasmlet.toml");
        let toml = if toml.contains("[metrics]") {
            toml.to_owned()
        } else {
            format!("{toml}\n[metrics]\naddress = \"\"\n")
        };
        std::fs::write(&path, toml).expect("writing the daemon's config");
        self.config = Some(path);
    }

    /// A command the daemon is started through from now on (`WRAPPER...
    /// wasmlet serve ...`), which must exec it so that its pid stays the
    /// daemon's: e.g. `unshare` to give it a mount namespace of its own.
    pub fn set_wrapper(&mut self, command: &[&str]) {
        self.wrapper = command.iter().map(|&a| a.to_owned()).collect();
    }

    /// Sets (`Some`) or unsets (`None`) an environment variable of the
    /// daemon from its next start on (e.g. `WASMLET_FAILPOINTS`, to arm
    /// failpoints and to restart without them); the image commands the
    /// fixture runs do not get it.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        match value {
            Some(value) => self.env.insert(key.to_owned(), value.to_owned()),
            None => self.env.remove(key),
        };
    }

    /// Extra config or a fixed log filter; see [`WasmletBuilder`].
    pub fn builder() -> WasmletBuilder {
        WasmletBuilder::default()
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("wasmlet.sock")
    }

    /// Where pod log directories go (the kubelet's `/var/log/pods`).
    pub fn log_root(&self) -> PathBuf {
        self.dir.path().join("pods")
    }

    /// A scratch directory for the test's own files (mount sources...).
    pub fn scratch(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join("scratch").join(name);
        std::fs::create_dir_all(&path).expect("creating a scratch directory");
        path
    }

    fn daemon_log_path(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    /// Everything the daemon has written to stdout and stderr so far.
    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.daemon_log_path()).unwrap_or_default()
    }

    /// The id `image import` printed for `reference`.
    pub fn image_id(&self, reference: &str) -> &str {
        self.images
            .get(reference)
            .unwrap_or_else(|| panic!("{reference} was not imported by the fixture"))
    }

    /// A pod config whose log directory is under this fixture's log root.
    pub fn pod(&self) -> PodSandboxConfigBuilder {
        PodSandboxConfigBuilder::new(self.log_root())
    }

    /// A client of the running daemon.
    pub fn cri(&self) -> CriClient {
        self.cri.clone().expect("the daemon is not serving")
    }

    /// Runs `wasmlet image import` and returns its output, whatever it is.
    pub fn import_output(&self, file: &Path, reference: &str) -> Output {
        assert!(
            self.daemon.is_none(),
            "image import must run while no daemon holds the root"
        );
        let mut command = Command::new(Self::bin());
        command
            .arg("image")
            .arg("import")
            .arg("--root")
            .arg(self.root())
            .arg(file)
            .arg(reference);
        run_bounded(command, None, IMPORT_TIMEOUT)
    }

    /// Imports `file` as `reference`, asserting success and the printed id's form.
    pub fn import(&mut self, file: &Path, reference: &str) -> String {
        let output = self.import_output(file, reference);
        assert!(
            output.status.success(),
            "wasmlet image import {} {reference} failed ({}): {}",
            file.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let id = String::from_utf8(output.stdout)
            .expect("image import printed UTF-8")
            .trim()
            .to_owned();
        assert!(
            is_image_id(&id),
            "image import printed {id:?}, not sha256:<64 hex>"
        );
        self.images.insert(reference.to_owned(), id.clone());
        id
    }

    /// Runs `wasmlet ARGS...` to completion, feeding `stdin` if given, and
    /// returns its output, whatever it is. Fails the test if it takes longer
    /// than `timeout`. `WASMLET_CONFIG` is not passed on: a config is only
    /// what `ARGS` name.
    pub fn run<S: AsRef<OsStr>>(
        args: impl IntoIterator<Item = S>,
        stdin: Option<&str>,
        timeout: Duration,
    ) -> Output {
        let mut command = Command::new(Self::bin());
        command.env_remove("WASMLET_CONFIG").args(args);
        run_bounded(command, stdin, timeout)
    }

    /// Runs `wasmlet image push --insecure FILE REFERENCE` (every test
    /// registry speaks plain HTTP on loopback), with `--username USER
    /// --password-stdin` when `login` is given; returns its output, whatever
    /// it is. No daemon is involved.
    pub fn push_output(file: &Path, reference: &str, login: Option<(&str, &str)>) -> Output {
        let mut args: Vec<&OsStr> = ["image", "push", "--insecure"]
            .into_iter()
            .map(OsStr::new)
            .collect();
        args.extend([file.as_os_str(), OsStr::new(reference)]);
        let password = login.map(|(user, password)| {
            args.extend(["--username", user, "--password-stdin"].map(OsStr::new));
            format!("{password}\n")
        });
        Self::run(args, password.as_deref(), CLI_TIMEOUT)
    }

    /// Pushes `file` as `reference`, asserting success; returns the manifest
    /// digest `image push` printed.
    pub fn push(file: &Path, reference: &str, login: Option<(&str, &str)>) -> String {
        let output = Self::push_output(file, reference, login);
        assert!(
            output.status.success(),
            "wasmlet image push {} {reference} failed ({}): {}",
            file.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let digest = String::from_utf8(output.stdout)
            .expect("image push printed UTF-8")
            .trim()
            .to_owned();
        assert!(
            is_image_id(&digest),
            "image push printed {digest:?}, not sha256:<64 hex>"
        );
        digest
    }

    /// Runs `wasmlet --socket SOCK ARGS...` (a client of the running daemon,
    /// e.g. `image pull REF`), feeding `stdin` if given; returns its output,
    /// whatever it is.
    pub fn cli(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let socket = self.socket();
        let mut all = vec![OsStr::new("--socket"), socket.as_os_str()];
        all.extend(args.iter().map(OsStr::new));
        Self::run(all, stdin, CLI_TIMEOUT)
    }

    /// Spawns `wasmlet serve --root ROOT --socket SOCK` and waits until it answers.
    pub async fn serve(&mut self) -> CriClient {
        self.spawn(&["serve"]);
        self.wait_ready().await
    }

    /// Spawns `wasmlet serve FLAGS... --root ROOT --socket SOCK` (e.g.
    /// `--log-format json`) and waits until it answers.
    pub async fn serve_with(&mut self, flags: &[&str]) -> CriClient {
        let mut args = vec!["serve"];
        args.extend_from_slice(flags);
        self.spawn(&args);
        self.wait_ready().await
    }

    /// Spawns `wasmlet --root ROOT --socket SOCK` (serve being the default
    /// subcommand) and waits until it answers.
    pub async fn serve_without_subcommand(&mut self) -> CriClient {
        self.spawn(&[]);
        self.wait_ready().await
    }

    /// Serves the same root again after the daemon was killed or terminated.
    pub async fn restart(&mut self) -> CriClient {
        self.serve().await
    }

    fn spawn(&mut self, subcommand: &[&str]) {
        assert!(self.daemon.is_none(), "a daemon is already running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.daemon_log_path())
            .expect("opening the daemon log");
        let stdout = log.try_clone().expect("duplicating the daemon log handle");
        let rust_log = match &self.rust_log {
            Some(filter) => filter.clone(),
            None => std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
        };
        let mut command = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(Self::bin());
                command
            }
            None => Command::new(Self::bin()),
        };
        command.args(subcommand).env_remove("WASMLET_CONFIG");
        if let Some(config) = &self.config {
            command.arg("--config").arg(config);
        }
        let child = command
            .arg("--root")
            .arg(self.root())
            .arg("--socket")
            .arg(self.socket())
            .env("RUST_LOG", rust_log)
            .envs(&self.env)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log)
            .spawn()
            .expect("spawning wasmlet");
        self.daemon = Some(child);
    }

    async fn wait_ready(&mut self) -> CriClient {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.daemon_mut().try_wait().expect("polling the daemon") {
                self.daemon = None;
                panic!("wasmlet exited ({status}) before serving");
            }
            match CriClient::connect(self.socket(), Duration::from_millis(250)).await {
                Ok(client) => {
                    self.cri = Some(client.clone());
                    return client;
                }
                Err(e) if Instant::now() >= deadline => {
                    panic!("wasmlet did not serve within {READY_TIMEOUT:?}: {e}")
                }
                Err(_) => {}
            }
        }
    }

    fn daemon_mut(&mut self) -> &mut Child {
        self.daemon.as_mut().expect("no daemon is running")
    }

    /// The daemon's process id.
    pub fn pid(&self) -> Pid {
        let child = self.daemon.as_ref().expect("no daemon is running");
        Pid::from_raw(i32::try_from(child.id()).expect("pid fits in i32"))
    }

    /// Sends `signal` to the daemon and waits (bounded) for it to exit.
    pub async fn stop_with(&mut self, signal: Signal) -> ExitStatus {
        kill(self.pid(), signal).expect("signalling the daemon");
        self.cri = None;
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Some(status) = self.daemon_mut().try_wait().expect("polling the daemon") {
                self.daemon = None;
                return status;
            }
            if Instant::now() >= deadline {
                panic!("wasmlet did not exit within {EXIT_TIMEOUT:?} of {signal}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (bounded) for the daemon to exit by itself, e.g. killed by a
    /// failpoint; returns how it exited.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        self.cri = None;
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Some(status) = self.daemon_mut().try_wait().expect("polling the daemon") {
                self.daemon = None;
                return status;
            }
            if Instant::now() >= deadline {
                panic!("wasmlet did not exit within {EXIT_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILLs the daemon, as a crash or an OOM kill would.
    pub async fn kill_9(&mut self) {
        self.stop_with(Signal::SIGKILL).await;
    }

    /// SIGTERMs the daemon, as systemd does; returns how it exited.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.stop_with(Signal::SIGTERM).await
    }
}

impl Drop for Wasmlet {
    fn drop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.root_mounted {
            let root = self.root();
            if let Err(e) = nix::mount::umount2(&root, nix::mount::MntFlags::MNT_DETACH) {
                eprintln!("unmounting the tmpfs on {}: {e}", root.display());
            }
        }
        // A daemon killed leaves its mounts (read-only binds, pinned
        // network namespaces) and a test its own (tmpfs under scratch
        // directories): detached before the temp dir is removed, which
        // would otherwise walk into them.
        for _ in 0..8 {
            let mut mounts = mounts_under(self.dir.path());
            if mounts.is_empty() {
                break;
            }
            mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
            for mount in mounts {
                let _ = nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        if std::thread::panicking() && self.daemon_log_path().exists() {
            eprintln!(
                "---- wasmlet daemon log ({}) ----\n{}---- end of daemon log ----",
                self.daemon_log_path().display(),
                self.daemon_log()
            );
        }
    }
}

/// The mount points at or below `dir` in the test's mount namespace (the
/// daemon's), from `/proc/self/mountinfo`.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|point| {
            // mountinfo writes space, tab, newline and backslash as octal.
            PathBuf::from(
                point
                    .replace("\\040", " ")
                    .replace("\\011", "\t")
                    .replace("\\012", "\n")
                    .replace("\\134", "\\"),
            )
        })
        .filter(|point| point.starts_with(&dir))
        .collect()
}

/// `sha256:` followed by 64 lowercase hex digits.
pub fn is_image_id(id: &str) -> bool {
    id.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// Runs `command` to completion with `stdin` (or nothing) as its standard
/// input, killing it if it takes longer than `timeout`. Output is read while
/// it runs, so a chatty child cannot block on a full pipe.
fn run_bounded(mut command: Command, stdin: Option<&str>, timeout: Duration) -> Output {
    let mut child = command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {command:?}: {e}"));
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // Small enough for the pipe buffer; dropping the pipe sends EOF.
        let _ = pipe.write_all(text.as_bytes());
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("polling a child") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: stdout.join().expect("joining an output reader"),
        stderr: stderr.join().expect("joining an output reader"),
    }
}

/// Reads a child's pipe to its end on a thread of its own.
fn drain(pipe: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        bytes
    })
}
