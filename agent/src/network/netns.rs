//! Named network namespaces, as `ip netns` makes them: a namespace created
//! by a short-lived thread and kept alive by a bind mount of its nsfs file
//! onto `<dir>/<name>`, so that CNI plugins can enter it by path and it
//! outlives an agent restart.
//!
//! Network namespaces belong to threads, not processes: [`NetNs::enter`]
//! switches only the calling thread, and the guard switches it back. The
//! agent polls a pod's guests inside that guard, so every socket a guest
//! creates belongs to the pod's namespace.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

/// The filesystem magic of nsfs, which namespace files live on.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// The agent's own network namespace, opened once by the first caller; the
/// namespace every guard returns to.
static HOST: OnceLock<io::Result<File>> = OnceLock::new();

fn host() -> io::Result<&'static File> {
    HOST.get_or_init(|| File::open("/proc/self/ns/net"))
        .as_ref()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("opening the agent's network namespace: {e}"),
            )
        })
}

/// Opens the agent's own network namespace now, from the calling thread
/// (which must be in it): call at start-up, before any guard exists.
pub fn remember_host_namespace() -> io::Result<()> {
    host().map(drop)
}

/// Moves the calling thread back to the agent's network namespace: for
/// threads that may have been spawned from inside a pod's namespace.
pub fn return_to_host_namespace() -> io::Result<()> {
    nix::sched::setns(host()?.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

/// A pod's network namespace: its path and an open handle.
#[derive(Debug)]
pub struct NetNs {
    path: PathBuf,
    file: File,
}

impl NetNs {
    /// Creates a new, empty network namespace pinned at `dir/name`.
    pub fn create(dir: &Path, name: &str) -> io::Result<Self> {
        host()?;
        std::fs::create_dir_all(dir)?;
        let path = dir.join(name);
        File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("creating {path:?}: {e}")))?;
        let target = path.clone();
        // unshare() moves the thread that calls it: use a thread of our own
        // that ends right after.
        let made = std::thread::Builder::new()
            .name("wasmlet-netns".into())
            .spawn(move || -> io::Result<()> {
                nix::sched::unshare(CloneFlags::CLONE_NEWNET)?;
                nix::mount::mount(
                    Some("/proc/thread-self/ns/net"),
                    &target,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )?;
                Ok(())
            })?
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")));
        if let Err(e) = made {
            let _ = std::fs::remove_file(&path);
            return Err(io::Error::new(
                e.kind(),
                format!("creating network namespace {path:?}: {e}"),
            ));
        }
        Self::open(&path)
    }

    /// Opens a namespace pinned at `path` (after an agent restart); fails
    /// if nothing is mounted there.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let fs = nix::sys::statfs::fstatfs(&file)?;
        if fs.filesystem_type().0 as i64 != NSFS_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{path:?} is not a network namespace"),
            ));
        }
        Ok(Self {
            path: path.to_owned(),
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this is the agent's own namespace (a pinned file can point
    /// anywhere; plugins must never be run against the host's).
    pub fn is_host(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let ino = |f: &File| f.metadata().map(|m| (m.dev(), m.ino())).ok();
        match host() {
            Ok(host) => ino(host) == ino(&self.file),
            Err(_) => true,
        }
    }

    /// Switches the calling thread into this namespace until the guard is
    /// dropped. Nothing in between may await: the guard must be dropped on
    /// the thread that made it.
    pub fn enter(&self) -> io::Result<Entered> {
        let host = host()?;
        nix::sched::setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET)?;
        Ok(Entered { host })
    }

    /// Unpins and deletes the namespace at `path`. The namespace itself
    /// ends when its last user (a socket, a handle) is gone. Removing one
    /// that does not exist succeeds.
    pub fn remove(path: &Path) -> io::Result<()> {
        match nix::mount::umount2(path, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => {
                return Err(io::Error::new(
                    io::Error::from(e).kind(),
                    format!("unmounting network namespace {path:?}: {e}"),
                ));
            }
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(io::Error::new(e.kind(), format!("removing {path:?}: {e}")))
            }
            _ => Ok(()),
        }
    }
}

/// The calling thread is inside a pod's namespace until this is dropped.
#[must_use = "the thread leaves the namespace when this is dropped"]
pub struct Entered {
    host: &'static File,
}

impl Drop for Entered {
    fn drop(&mut self) {
        if let Err(e) = nix::sched::setns(self.host.as_fd(), CloneFlags::CLONE_NEWNET) {
            // A thread stuck in a pod's namespace would put other pods'
            // sockets there: better to stop.
            panic!("cannot return to the agent's network namespace: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inode(path: &str) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().ino()
    }

    #[test]
    fn create_enter_and_remove() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: network namespaces need root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let host_ns = inode("/proc/thread-self/ns/net");
        let ns = NetNs::create(dir.path(), "pod").unwrap();
        {
            let _in = ns.enter().unwrap();
            assert_ne!(inode("/proc/thread-self/ns/net"), host_ns);
            // Only a loopback in a fresh namespace.
            let devices = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
            let names: Vec<&str> = devices
                .lines()
                .skip(2)
                .filter_map(|l| l.split(':').next())
                .map(str::trim)
                .collect();
            assert_eq!(names, ["lo"]);
        }
        assert_eq!(inode("/proc/thread-self/ns/net"), host_ns);
        // Pinned: it can be opened again by path, as after a restart.
        assert!(!NetNs::open(&dir.path().join("pod")).unwrap().is_host());
        assert!(
            NetNs::open(Path::new("/proc/self/ns/net"))
                .unwrap()
                .is_host()
        );
        NetNs::remove(&dir.path().join("pod")).unwrap();
        assert!(!dir.path().join("pod").exists());
        NetNs::remove(&dir.path().join("pod")).unwrap();
        assert!(NetNs::open(&dir.path().join("pod")).is_err());
        std::fs::write(dir.path().join("plain"), b"").unwrap();
        assert!(NetNs::open(&dir.path().join("plain")).is_err());
    }
}
