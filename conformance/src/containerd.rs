//! A real downstream CRI runtime for the tests: Debian's `containerd` with
//! `runc`, on a private socket, root and state directory, and ordinary
//! Linux images made from Debian's static busybox.
//!
//! [`Containerd::start`] writes a config (CRI plugin on, the sandbox image
//! [`PAUSE_IMAGE`], CNI from a given directory, streaming on loopback),
//! starts the daemon, waits until it answers CRI `Version`, and imports the
//! pause and busybox images with `ctr`. Dropping it kills the daemon and
//! every shim it started, and unmounts what they left.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::CriClient;
use crate::error::Error;
use crate::registry::sha256_digest;

/// The sandbox ("pause") image: busybox sleeping forever.
pub const PAUSE_IMAGE: &str = "wasmlet.test/pause:1";
/// A busybox image whose default command is `sh`.
pub const BUSYBOX_IMAGE: &str = "wasmlet.test/busybox:1";
/// Where Debian's `busybox-static` puts its binary.
pub const BUSYBOX: &str = "/bin/busybox";

const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The applets linked into the images' `/bin`.
const APPLETS: &[&str] = &[
    "sh", "sleep", "echo", "cat", "nc", "seq", "ls", "true", "false", "hostname", "env", "wget",
    "ip", "ifconfig",
];

/// An ordinary single-layer Linux image: its config and its uncompressed
/// tar layer.
#[derive(Clone, Debug)]
pub struct LinuxImage {
    pub config: Vec<u8>,
    pub layer: Vec<u8>,
}

pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

impl LinuxImage {
    /// busybox (static, from [`BUSYBOX`]) with its applets in `/bin`,
    /// running `entrypoint` (or `sh`).
    pub fn busybox(entrypoint: &[&str]) -> Result<LinuxImage, Error> {
        let binary = std::fs::read(BUSYBOX).map_err(|source| Error::Io {
            action: "reading (install busybox-static)",
            path: PathBuf::from(BUSYBOX),
            source,
        })?;
        let mut layer = tar::Builder::new(Vec::new());
        let mut dir = tar::Header::new_gnu();
        dir.set_entry_type(tar::EntryType::Directory);
        dir.set_mode(0o755);
        dir.set_size(0);
        for d in ["bin/", "tmp/", "etc/", "proc/", "sys/", "dev/"] {
            layer
                .append_data(&mut dir.clone(), d, std::io::empty())
                .map_err(tar_error)?;
        }
        let mut file = tar::Header::new_gnu();
        file.set_mode(0o755);
        file.set_size(binary.len() as u64);
        layer
            .append_data(&mut file, "bin/busybox", binary.as_slice())
            .map_err(tar_error)?;
        for applet in APPLETS {
            let mut link = tar::Header::new_gnu();
            link.set_entry_type(tar::EntryType::Symlink);
            link.set_mode(0o777);
            link.set_size(0);
            layer
                .append_link(&mut link, format!("bin/{applet}"), "busybox")
                .map_err(tar_error)?;
        }
        let layer = layer.into_inner().map_err(tar_error)?;
        let entrypoint = if entrypoint.is_empty() {
            vec!["/bin/sh"]
        } else {
            entrypoint.to_vec()
        };
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/bin"], "Entrypoint": entrypoint},
            "rootfs": {"type": "layers", "diff_ids": [sha256_digest(&layer)]},
        });
        Ok(LinuxImage {
            config: config.to_string().into_bytes(),
            layer,
        })
    }

    /// The image as an OCI image-layout tar naming it `name`, for
    /// `ctr images import`.
    pub fn oci_archive(&self, name: &str) -> Result<Vec<u8>, Error> {
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(&self.config), "size": self.config.len()},
            "layers": [{"mediaType": OCI_LAYER, "digest": sha256_digest(&self.layer), "size": self.layer.len()}],
        })
        .to_string()
        .into_bytes();
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": OCI_MANIFEST,
                "digest": sha256_digest(&manifest),
                "size": manifest.len(),
                "annotations": {"io.containerd.image.name": name},
            }],
        })
        .to_string();
        let mut archive = tar::Builder::new(Vec::new());
        let mut add = |path: String, bytes: &[u8]| {
            let mut header = tar::Header::new_gnu();
            header.set_mode(0o644);
            header.set_size(bytes.len() as u64);
            archive.append_data(&mut header, path, bytes)
        };
        add("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(tar_error)?;
        add("index.json".into(), index.as_bytes()).map_err(tar_error)?;
        for blob in [&manifest, &self.config, &self.layer] {
            let digest = sha256_digest(blob);
            let hex = digest.trim_start_matches("sha256:");
            add(format!("blobs/sha256/{hex}"), blob).map_err(tar_error)?;
        }
        archive.into_inner().map_err(tar_error)
    }
}

fn tar_error(source: std::io::Error) -> Error {
    Error::Io {
        action: "building an image tar",
        path: PathBuf::new(),
        source,
    }
}

/// A running containerd, killed (with its shims) when dropped.
pub struct Containerd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    cni_conf_dir: PathBuf,
}

impl Containerd {
    /// Starts containerd with pods networked by the CNI configuration in
    /// `cni_conf_dir` (Debian's plugins), and imports [`PAUSE_IMAGE`] and
    /// [`BUSYBOX_IMAGE`].
    pub async fn start(cni_conf_dir: &Path) -> Result<Containerd, Error> {
        let dir = tempfile::Builder::new()
            .prefix("wasmlet-containerd-")
            .tempdir()
            .map_err(|source| Error::Io {
                action: "create a temporary directory in",
                path: std::env::temp_dir(),
                source,
            })?;
        let mut containerd = Containerd {
            child: None,
            dir,
            cni_conf_dir: cni_conf_dir.to_owned(),
        };
        containerd.launch().await?;
        containerd.import(
            PAUSE_IMAGE,
            &LinuxImage::busybox(&["/bin/sleep", "2147483647"])?,
        )?;
        containerd.import(BUSYBOX_IMAGE, &LinuxImage::busybox(&[])?)?;
        Ok(containerd)
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its CRI (and containerd API) socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("containerd.log")
    }

    /// Everything containerd has logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    async fn launch(&mut self) -> Result<(), Error> {
        let root = self.dir.path();
        let plugin_dir = crate::pod_network::plugin_dir().unwrap_or_else(|| "/usr/lib/cni".into());
        let config = format!(
            r#"version = 2
root = {root:?}
state = {state:?}
[grpc]
  address = {socket:?}
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # Sandboxes ask for oom_score_adj -998; where the tests run may not lower
  # it below its own, so hold it there.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = {plugin_dir:?}
    conf_dir = {conf:?}
"#,
            root = root.join("root"),
            state = root.join("state"),
            socket = self.socket(),
            conf = self.cni_conf_dir,
        );
        write(&self.config_path(), config.as_bytes())?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|source| Error::Io {
                action: "create",
                path: self.log_path(),
                source,
            })?;
        let err = log.try_clone().map_err(|source| Error::Io {
            action: "duplicate",
            path: self.log_path(),
            source,
        })?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|source| Error::Io {
                action: "start (install containerd and runc)",
                path: PathBuf::from("containerd"),
                source,
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(mut cri) = CriClient::connect(self.socket(), Duration::from_secs(2)).await
                && cri.version().await.is_ok()
            {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(Error::Setup(format!(
                    "containerd exited ({status}) before serving CRI:\n{}",
                    self.log()
                )));
            }
            if Instant::now() >= deadline {
                return Err(Error::Setup(format!(
                    "containerd did not serve CRI within {READY_TIMEOUT:?}:\n{}",
                    self.log()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Imports `image` as `name` into the CRI plugin's namespace.
    pub fn import(&self, name: &str, image: &LinuxImage) -> Result<(), Error> {
        let path = self.dir.path().join("import.tar");
        write(&path, &image.oci_archive(name)?)?;
        let out = Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args(["--namespace", "k8s.io", "images", "import"])
            .arg(&path)
            .output()
            .map_err(|source| Error::Io {
                action: "run",
                path: PathBuf::from("ctr"),
                source,
            })?;
        if !out.status.success() {
            return Err(Error::Setup(format!(
                "ctr images import {name}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(())
    }

    /// Kills the daemon (SIGKILL, as a crash would); its shims, and the
    /// containers they run, stay up, as on a real node.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the daemon again after [`Containerd::kill`], on the same
    /// socket and state.
    pub async fn restart(&mut self) -> Result<(), Error> {
        self.kill();
        self.launch().await
    }

    /// Processes started for this daemon (its shims), found by the socket
    /// path on their command line.
    fn shims(&self) -> Vec<i32> {
        let socket = self.socket().to_string_lossy().into_owned();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&socket))
            })
            .collect()
    }
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let mut file = std::fs::File::create(path).map_err(|source| Error::Io {
        action: "create",
        path: path.to_owned(),
        source,
    })?;
    file.write_all(bytes).map_err(|source| Error::Io {
        action: "write",
        path: path.to_owned(),
        source,
    })
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.kill();
        for pid in self.shims() {
            // The shim kills its containers' processes as it dies... not
            // with SIGKILL: kill its children first.
            if let Ok(children) =
                std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            {
                for child in children.split_whitespace() {
                    if let Ok(child) = child.parse::<i32>() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(child),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // Root filesystems and shm mounts the shims left, deepest first.
        let prefix = self.dir.path().to_string_lossy().into_owned();
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
            .filter(|m| m.starts_with(&prefix))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
        if std::thread::panicking() {
            eprintln!(
                "---- containerd log ({}) ----\n{}---- end of containerd log ----",
                self.log_path().display(),
                self.log()
            );
        }
    }
}
