//! Read-only bind mounts, so that the kernel refuses a guest's writes
//! where a container is read-only, with `EROFS` ("Read-only file system"),
//! as it does in containerd's containers.
//!
//! Without them a read-only directory is preopened with read-only WASI
//! permissions and wasmtime-wasi refuses writes itself, with `EPERM`
//! ("Operation not permitted"). When the agent may mount (it runs as root),
//! each read-only directory a guest gets (a read-only mount, a read-only
//! root, a `readonly_paths` entry) is bind-mounted read-only at
//! `ROOT/containers/<id>/mounts/<key>` and that mount is preopened with full
//! permissions: the kernel answers. A recursive one is read-only all the
//! way down (`mount_setattr` with `AT_RECURSIVE`); a non-recursive one
//! only at its top, so what the host mounts below it stays as writable as
//! it is (a bind mount's read-only flag is not recursive).
//!
//! `ROOT/containers` is made a mount of its own with private propagation,
//! so that the binds below it are never copied into other mount
//! namespaces (a shared `/` would otherwise carry them into every peer,
//! where unmounting here would not remove them); each bind is private too,
//! so what the host mounts below its source later does not appear in it.
//! The binds are detached (`MNT_DETACH`: guests holding them open keep
//! them) when the container's guest ends and when its files are removed,
//! and at start, where an agent that was killed left them.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

use super::lock;

/// `mount_setattr(2)`'s attribute making a mount read-only.
const MOUNT_ATTR_RDONLY: u64 = 0x1;

/// `struct mount_attr` of `mount_setattr(2)`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// The agent's read-only binds: whether it can make them, and one maker
/// at a time (a container's start and an exec into it may ask at once).
pub(super) struct ReadOnlyBinds {
    available: AtomicBool,
    making: Mutex<()>,
}

impl ReadOnlyBinds {
    /// Detaches every mount below `containers` (what an agent that was
    /// killed left: no guest runs yet) and makes `containers` a private
    /// mount of its own. Without the right to mount, binds are off: the
    /// guests' read-only directories answer `EPERM` instead.
    pub(super) fn open(containers: &Path) -> Self {
        let released = release_below(containers);
        if released > 0 {
            tracing::info!(
                count = released,
                dir = ?containers,
                "detached read-only binds an earlier agent left"
            );
        }
        let root = nix::unistd::geteuid().is_root();
        if !root {
            tracing::info!(
                "not running as root: a write under a read-only directory fails with EPERM, not EROFS"
            );
        }
        let binds = Self {
            available: AtomicBool::new(root),
            making: Mutex::new(()),
        };
        if root && let Err(errno) = make_private_mount(containers) {
            binds.unavailable(errno);
        }
        binds
    }

    /// Detaches every bind below `containers` and `containers`' own mount:
    /// the agent is stopping, its guests with it (the next agent makes
    /// them again). A temporary root (`play`) can then be removed.
    pub(super) fn close(&self, containers: &Path) {
        if !self.available.load(Ordering::Relaxed) {
            return;
        }
        release_below(containers);
        if is_mount_point(containers)
            && let Err(error) = nix::mount::umount2(containers, MntFlags::MNT_DETACH)
        {
            tracing::warn!(dir = ?containers, %error, "the containers directory's own mount could not be detached");
        }
    }

    fn unavailable(&self, errno: Errno) {
        if self.available.swap(false, Ordering::Relaxed) {
            tracing::warn!(error = %errno, "read-only bind mounts cannot be made: a write under a read-only directory fails with EPERM, not EROFS");
        }
    }

    /// A read-only bind in `dir` (the container's `mounts`) of the
    /// directory `root`, or of `rest` beneath it (opened so that no
    /// symlink on the way leads out: `root` may be one the guest writes),
    /// recursive or not; made once per directory and kind. `None` when
    /// binds are off or this one could not be made: the caller keeps a
    /// read-only preopen.
    pub(super) fn bind(
        &self,
        dir: &Path,
        root: &Path,
        rest: Option<&Path>,
        recursive: bool,
    ) -> Option<PathBuf> {
        if !self.available.load(Ordering::Relaxed) {
            return None;
        }
        let source = rest.map_or_else(|| root.to_owned(), |rest| root.join(rest));
        let key = crate::model::ids::Digest::of(
            format!("{}\0{recursive}", source.to_string_lossy()).as_bytes(),
        );
        let target = dir.join(&key.hex()[..16]);
        let _making = lock(&self.making);
        if is_mount_point(&target) {
            return Some(target);
        }
        let made = std::fs::create_dir_all(&target)
            .map_err(errno)
            .and_then(|()| bind_read_only(root, rest, &target, recursive));
        match made {
            Ok(()) => Some(target),
            Err(Errno::EPERM) => {
                self.unavailable(Errno::EPERM);
                None
            }
            Err(error) => {
                tracing::warn!(?source, ?target, %error, "a read-only bind mount could not be made: writes there fail with EPERM, not EROFS");
                None
            }
        }
    }
}

fn errno(e: std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Binds `root` (or `rest`, opened beneath it) at `target` with private
/// propagation, then makes it read-only (all the way down if
/// `recursive`); undoes the bind if a step fails, so that no writable
/// bind is left.
fn bind_read_only(
    root: &Path,
    rest: Option<&Path>,
    target: &Path,
    recursive: bool,
) -> Result<(), Errno> {
    let opened = match rest {
        Some(rest) => {
            let root = std::fs::File::open(root).map_err(errno)?;
            let how = nix::fcntl::OpenHow::new()
                .flags(nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY)
                .resolve(
                    nix::fcntl::ResolveFlag::RESOLVE_BENEATH
                        | nix::fcntl::ResolveFlag::RESOLVE_NO_MAGICLINKS,
                );
            Some(nix::fcntl::openat2(&root, rest, how)?)
        }
        None => None,
    };
    let from = match &opened {
        Some(fd) => PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(fd)
        )),
        None => root.to_owned(),
    };
    nix::mount::mount(
        Some(&from),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )?;
    let sealed = mount_setattr(
        target,
        true,
        &MountAttr {
            attr_set: 0,
            attr_clr: 0,
            propagation: libc::MS_PRIVATE,
            userns_fd: 0,
        },
    )
    .and_then(|()| {
        mount_setattr(
            target,
            recursive,
            &MountAttr {
                attr_set: MOUNT_ATTR_RDONLY,
                attr_clr: 0,
                propagation: 0,
                userns_fd: 0,
            },
        )
    });
    if let Err(errno) = sealed {
        let _ = nix::mount::umount2(target, MntFlags::MNT_DETACH);
        return Err(errno);
    }
    Ok(())
}

/// `mount_setattr(2)` on the mount at `target`, and on every mount below
/// it if `recursive`.
#[allow(unsafe_code)]
fn mount_setattr(target: &Path, recursive: bool, attr: &MountAttr) -> Result<(), Errno> {
    let path = CString::new(target.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
    let flags = if recursive { libc::AT_RECURSIVE } else { 0 };
    // SAFETY: the kernel reads a NUL-terminated path and `size` bytes of
    // `attr`, both alive for the call, and writes nothing back.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            flags,
            std::ptr::from_ref(attr),
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc == 0 { Ok(()) } else { Err(Errno::last()) }
}

/// Makes `dir` a mount of its own (bound onto itself unless it is one)
/// with private propagation.
fn make_private_mount(dir: &Path) -> Result<(), Errno> {
    std::fs::create_dir_all(dir).map_err(errno)?;
    if !is_mount_point(dir) {
        nix::mount::mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)?;
    }
    nix::mount::mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_PRIVATE,
        None::<&str>,
    )
}

/// The mount points of the calling thread's mount namespace.
fn mount_table() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/thread-self/mountinfo")
        .map(|table| super::guest_config::mount_points(&table))
        .unwrap_or_default()
}

/// Whether `path` is the root of a mount, from `statx`'s
/// `STATX_ATTR_MOUNT_ROOT` (Linux 5.8): no mount table is read, whose
/// length grows with every pod on the node.
#[allow(unsafe_code)]
fn is_mount_point(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut buf = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: the kernel reads the NUL-terminated path and writes one
    // `struct statx` into `buf`, both alive for the call; `buf` is
    // zero-initialised, so it is a valid `statx` whatever it fills.
    let (rc, stx) = unsafe {
        let rc = libc::statx(
            libc::AT_FDCWD,
            c_path.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW | libc::AT_NO_AUTOMOUNT,
            0,
            buf.as_mut_ptr(),
        );
        (rc, buf.assume_init())
    };
    let mount_root = libc::STATX_ATTR_MOUNT_ROOT as u64;
    rc == 0 && stx.stx_attributes_mask & mount_root != 0 && stx.stx_attributes & mount_root != 0
}

/// Detaches the binds in a container's `mounts` directory (each its own
/// entry there; several stacked on one all of them): a directory listing
/// and a few syscalls per bind, however many pods the node runs. Returns
/// how many were detached.
pub(super) fn release_binds(mounts: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(mounts) else {
        return 0;
    };
    let mut released = 0;
    for point in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
        for _ in 0..8 {
            if !is_mount_point(&point) {
                break;
            }
            match nix::mount::umount2(&point, MntFlags::MNT_DETACH) {
                Ok(()) => released += 1,
                Err(error) => {
                    tracing::warn!(?point, %error, "a read-only bind mount could not be detached");
                    break;
                }
            }
        }
    }
    released
}

/// Whether a bind is still mounted in a container's `mounts` directory.
pub(super) fn binds_left(mounts: &Path) -> bool {
    std::fs::read_dir(mounts).is_ok_and(|entries| {
        entries
            .filter_map(|e| e.ok())
            .any(|e| is_mount_point(&e.path()))
    })
}

/// The mount points strictly below `dir`.
pub(super) fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let Ok(dir) = dir.canonicalize() else {
        return Vec::new();
    };
    mount_table()
        .into_iter()
        .filter(|p| p != &dir && p.starts_with(&dir))
        .collect()
}

/// Detaches every mount strictly below `dir`, the deepest first (a
/// stack of mounts on one point, all of them); returns how many were.
pub(super) fn release_below(dir: &Path) -> usize {
    let mut released = 0;
    // A mount detached takes those below it along; a stacked one shows
    // again: read the table until nothing below is left (bounded).
    for _ in 0..8 {
        let mut points = mounts_below(dir);
        if points.is_empty() {
            break;
        }
        points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        for point in points {
            match nix::mount::umount2(&point, MntFlags::MNT_DETACH) {
                Ok(()) => released += 1,
                Err(Errno::EINVAL | Errno::ENOENT) => {}
                Err(error) => {
                    tracing::warn!(?point, %error, "a read-only bind mount could not be detached");
                }
            }
        }
    }
    released
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` in a mount namespace of its own (on a thread that
    /// unshares it), so nothing it mounts is seen outside; `None` when
    /// this test cannot mount (not root).
    fn in_own_mount_namespace<T: Send + 'static>(
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).ok()?;
            nix::mount::mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_SLAVE,
                None::<&str>,
            )
            .ok()?;
            Some(f())
        })
        .join()
        .unwrap()
    }

    fn write(path: &Path) -> Result<(), i32> {
        std::fs::write(path, "x").map_err(|e| e.raw_os_error().unwrap_or(0))
    }

    #[test]
    fn binds_answer_erofs_recursively_or_only_at_their_top() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: mounting needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_owned();
        let done = in_own_mount_namespace(move || {
            let source = root.join("source");
            std::fs::create_dir_all(source.join("sub")).unwrap();
            nix::mount::mount(
                Some("tmpfs"),
                &source.join("sub"),
                Some("tmpfs"),
                MsFlags::empty(),
                None::<&str>,
            )
            .unwrap();
            let containers = root.join("containers");
            let binds = ReadOnlyBinds::open(&containers);
            assert!(binds.available.load(Ordering::Relaxed));
            let dir = containers.join("c").join("mounts");

            let top = binds.bind(&dir, &source, None, false).unwrap();
            assert_eq!(write(&top.join("file")), Err(libc::EROFS));
            // Below a non-recursive bind, the host's mount stays writable.
            write(&top.join("sub/file")).unwrap();
            // The same source and kind: the same bind.
            assert_eq!(binds.bind(&dir, &source, None, false).unwrap(), top);

            let all = binds.bind(&dir, &source, None, true).unwrap();
            assert_ne!(all, top);
            assert_eq!(write(&all.join("sub/other")), Err(libc::EROFS));
            // The source itself stays writable.
            write(&source.join("file")).unwrap();

            // Beneath a root: a symlink there cannot lead out.
            std::os::unix::fs::symlink("/etc", source.join("out")).unwrap();
            assert!(
                binds
                    .bind(&dir, &source, Some(Path::new("out")), false)
                    .is_none()
            );
            let inner = binds
                .bind(&dir, &source, Some(Path::new("sub")), false)
                .unwrap();
            assert_eq!(write(&inner.join("new")), Err(libc::EROFS));

            // Each bind, and the copies of the tmpfs in the first two.
            assert_eq!(mounts_below(&dir).len(), 5, "{:?}", mounts_below(&dir));
            assert_eq!(release_below(&dir), 5);
            assert!(mounts_below(&containers).is_empty());
            // What was mounted at the source is untouched.
            assert!(source.join("sub/file").exists());
        });
        if done.is_none() {
            eprintln!("SKIP: no mount namespace of its own");
        }
    }
}
