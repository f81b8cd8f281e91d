//! A write the kernel refuses because a mount is read-only reaches the
//! guest as such, as it does a Linux process: `rofs` ("Read-only file
//! system") for a WASI preview1 module, `error-code.read-only` for a WASI
//! 0.2 component.
//!
//! wasmtime-wasi 48 has no mapping for `EROFS`: it answers such a refusal
//! with `io` ("I/O error"). So the calls that change the filesystem by path
//! are linked again here, each calling wasmtime-wasi's own and, when it
//! answers `io`, looking at the host directory the path lies in: on a
//! read-only mount, the answer is the read-only one. A component's
//! descriptor is a host directory the agent can name. A module's is not
//! reachable from outside wasmtime-wasi: its preopens are (descriptors 3,
//! 4... in the order they were given, which is what wasi-libc resolves
//! every path against); a path relative to a directory a module opened
//! itself keeps `io`.

use std::path::{Component, Path, PathBuf};

use wasmtime::component::{Linker as ComponentLinker, Resource, ResourceTable};
use wasmtime::{AsContextMut, Caller, Extern, Linker, StoreContextMut};
use wasmtime_wasi::filesystem::WasiFilesystemView as _;
use wasmtime_wasi::p1::types::Errno;
use wasmtime_wasi::p1::wasi_snapshot_preview1::{self as p1, WasiSnapshotPreview1 as _};
use wasmtime_wasi::p2::bindings::filesystem::types::{
    self as fs, Descriptor, DescriptorFlags, ErrorCode, HostDescriptor, NewTimestamp, OpenFlags,
    PathFlags,
};
use wiggle::GuestMemory;

use super::host::{P1State, P2State};

/// The descriptor of a guest's first preopen (after stdin, stdout and
/// stderr).
const FIRST_PREOPEN: i32 = 3;

/// Links a preview1 call again: `$name($arg: $ty, ...)`, whose `io` answer
/// becomes `rofs` when one of the `(fd, path pointer, path length)` in
/// `paths` lies on a read-only mount.
macro_rules! relink {
    ($linker:ident, $name:ident ( $($arg:ident : $ty:ty),* ), paths = [$(($fd:ident, $ptr:ident, $len:ident)),*]) => {
        $linker.func_wrap_async(
            "wasi_snapshot_preview1",
            stringify!($name),
            |mut caller: Caller<'_, P1State>, ($($arg,)*): ($($ty,)*)| {
                Box::new(async move {
                    let fuel = caller.as_context_mut().hostcall_fuel();
                    let export = caller.get_export("memory");
                    match &export {
                        Some(Extern::Memory(memory)) => {
                            let (bytes, state) = memory.data_and_store_mut(&mut caller);
                            state.wasi.set_hostcall_fuel(fuel);
                            let mut guest = GuestMemory::Unshared(bytes);
                            let errno = p1::$name(&mut state.wasi, &mut guest, $($arg),*).await?;
                            let GuestMemory::Unshared(bytes) = guest else {
                                return Ok(errno);
                            };
                            // Only a refusal is looked at: the hot path
                            // (every open that works) costs nothing more.
                            let refused = || [$(($fd, $ptr, $len)),*].into_iter().any(|(fd, ptr, len)| {
                                on_read_only_mount(&state.preopen_dirs, bytes, fd, ptr, len)
                            });
                            Ok(if errno == Errno::Io as i32 && refused() {
                                Errno::Rofs as i32
                            } else {
                                errno
                            })
                        }
                        Some(Extern::SharedMemory(memory)) => {
                            let state = caller.data_mut();
                            state.wasi.set_hostcall_fuel(fuel);
                            let mut guest = GuestMemory::Shared(memory.data());
                            Ok(p1::$name(&mut state.wasi, &mut guest, $($arg),*).await?)
                        }
                        _ => Err(wasmtime::format_err!("missing required memory export")),
                    }
                })
            },
        )?;
    };
}

/// Links the calls that change the filesystem by path again, over
/// wasmtime-wasi's (added to `linker` before).
pub(super) fn link_p1(linker: &mut Linker<P1State>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    relink!(
        linker,
        path_open(
            fd: i32,
            dirflags: i32,
            ptr: i32,
            len: i32,
            oflags: i32,
            rights: i64,
            inheriting: i64,
            fdflags: i32,
            opened: i32
        ),
        paths = [(fd, ptr, len)]
    );
    relink!(linker, path_create_directory(fd: i32, ptr: i32, len: i32), paths = [(fd, ptr, len)]);
    relink!(linker, path_remove_directory(fd: i32, ptr: i32, len: i32), paths = [(fd, ptr, len)]);
    relink!(linker, path_unlink_file(fd: i32, ptr: i32, len: i32), paths = [(fd, ptr, len)]);
    relink!(
        linker,
        path_filestat_set_times(
            fd: i32,
            flags: i32,
            ptr: i32,
            len: i32,
            atim: i64,
            mtim: i64,
            fst_flags: i32
        ),
        paths = [(fd, ptr, len)]
    );
    relink!(
        linker,
        path_rename(fd: i32, ptr: i32, len: i32, new_fd: i32, new_ptr: i32, new_len: i32),
        paths = [(fd, ptr, len), (new_fd, new_ptr, new_len)]
    );
    relink!(
        linker,
        path_link(
            fd: i32,
            flags: i32,
            ptr: i32,
            len: i32,
            new_fd: i32,
            new_ptr: i32,
            new_len: i32
        ),
        paths = [(new_fd, new_ptr, new_len)]
    );
    relink!(
        linker,
        path_symlink(ptr: i32, len: i32, fd: i32, new_ptr: i32, new_len: i32),
        paths = [(fd, new_ptr, new_len)]
    );
    linker.allow_shadowing(false);
    Ok(())
}

/// Links a WASI 0.2 descriptor method again: `$method($arg: $ty, ...)`
/// (its WIT name `$wit`), whose `io` error becomes `read-only` when one of
/// the `(descriptor, path)` in `paths` lies on a read-only mount.
macro_rules! relink_p2 {
    ($instance:ident, $wit:literal, $method:ident ( $($arg:ident : $ty:ty),* ), paths = [$(($fd:ident, $path:ident)),*]) => {
        $instance.func_wrap_async(
            $wit,
            |mut store: StoreContextMut<'_, P2State>, ($($arg,)*): ($($ty,)*)| {
                Box::new(async move {
                    let state = store.data_mut();
                    let at = [$((descriptor_dir(&state.table, &$fd), $path.clone())),*];
                    let mut view = state.filesystem();
                    let result = HostDescriptor::$method(&mut view, $($arg),*).await;
                    Ok((match result {
                        Ok(value) => Ok(value),
                        Err(error) => {
                            let code = fs::Host::convert_error_code(&mut view, error)?;
                            let refused = at.iter().any(|(dir, path)| {
                                dir.as_deref()
                                    .is_some_and(|dir| lies_on_read_only_mount(dir, Path::new(path)))
                            });
                            Err(if code == ErrorCode::Io && refused {
                                ErrorCode::ReadOnly
                            } else {
                                code
                            })
                        }
                    },))
                })
            },
        )?;
    };
}

/// The WIT interface whose descriptor methods [`link_p2`] links again: the
/// version wasmtime-wasi 48 defines (a guest's older 0.2 import resolves
/// to it).
const FILESYSTEM_TYPES: &str = "wasi:filesystem/types@0.2.12";

/// Links the descriptor methods that change the filesystem by path again,
/// over wasmtime-wasi's (added to `linker` before).
pub(super) fn link_p2(linker: &mut ComponentLinker<P2State>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut types = linker.instance(FILESYSTEM_TYPES)?;
    relink_p2!(
        types,
        "[method]descriptor.open-at",
        open_at(
            fd: Resource<Descriptor>,
            path_flags: PathFlags,
            path: String,
            open_flags: OpenFlags,
            flags: DescriptorFlags
        ),
        paths = [(fd, path)]
    );
    relink_p2!(
        types,
        "[method]descriptor.create-directory-at",
        create_directory_at(fd: Resource<Descriptor>, path: String),
        paths = [(fd, path)]
    );
    relink_p2!(
        types,
        "[method]descriptor.remove-directory-at",
        remove_directory_at(fd: Resource<Descriptor>, path: String),
        paths = [(fd, path)]
    );
    relink_p2!(
        types,
        "[method]descriptor.unlink-file-at",
        unlink_file_at(fd: Resource<Descriptor>, path: String),
        paths = [(fd, path)]
    );
    relink_p2!(
        types,
        "[method]descriptor.set-times-at",
        set_times_at(
            fd: Resource<Descriptor>,
            path_flags: PathFlags,
            path: String,
            atim: NewTimestamp,
            mtim: NewTimestamp
        ),
        paths = [(fd, path)]
    );
    relink_p2!(
        types,
        "[method]descriptor.rename-at",
        rename_at(
            fd: Resource<Descriptor>,
            path: String,
            new_fd: Resource<Descriptor>,
            new_path: String
        ),
        paths = [(fd, path), (new_fd, new_path)]
    );
    relink_p2!(
        types,
        "[method]descriptor.link-at",
        link_at(
            fd: Resource<Descriptor>,
            path_flags: PathFlags,
            path: String,
            new_fd: Resource<Descriptor>,
            new_path: String
        ),
        paths = [(new_fd, new_path)]
    );
    relink_p2!(
        types,
        "[method]descriptor.symlink-at",
        symlink_at(fd: Resource<Descriptor>, path: String, new_path: String),
        paths = [(fd, new_path)]
    );
    linker.allow_shadowing(false);
    Ok(())
}

/// The host directory a component's descriptor is open on, if it is a
/// directory.
fn descriptor_dir(table: &ResourceTable, fd: &Resource<Descriptor>) -> Option<PathBuf> {
    use std::os::fd::AsRawFd;
    match table.get(fd).ok()? {
        wasmtime_wasi::filesystem::Descriptor::Dir(dir) => {
            std::fs::read_link(format!("/proc/self/fd/{}", dir.dir.as_raw_fd())).ok()
        }
        wasmtime_wasi::filesystem::Descriptor::File(_) => None,
    }
}

/// Whether the path at `ptr..ptr+len` of the guest's memory, relative to
/// descriptor `fd`, lies on a read-only mount: its deepest directory that
/// exists, inside the preopen `fd` is. `false` when `fd` is no preopen or
/// the path cannot be read.
fn on_read_only_mount(preopens: &[PathBuf], memory: &[u8], fd: i32, ptr: i32, len: i32) -> bool {
    let Some(dir) = fd
        .checked_sub(FIRST_PREOPEN)
        .and_then(|i| usize::try_from(i).ok())
        .and_then(|i| preopens.get(i))
    else {
        return false;
    };
    let (Ok(ptr), Ok(len)) = (usize::try_from(ptr), usize::try_from(len)) else {
        return false;
    };
    let Some(path) = memory
        .get(ptr..ptr.saturating_add(len))
        .and_then(|b| std::str::from_utf8(b).ok())
    else {
        return false;
    };
    lies_on_read_only_mount(dir, Path::new(path))
}

/// Whether `dir/path` lies on a read-only mount: its deepest directory that
/// exists does.
fn lies_on_read_only_mount(dir: &Path, path: &Path) -> bool {
    let existing = deepest_existing(dir, path);
    nix::sys::statvfs::statvfs(&existing)
        .is_ok_and(|s| s.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
}

/// The deepest directory that exists on the way from `dir` to `dir/path`,
/// going no further than `path`'s plain names (`..` stops the walk).
fn deepest_existing(dir: &Path, path: &Path) -> PathBuf {
    let mut at = dir.to_owned();
    for component in path.components() {
        let Component::Normal(name) = component else {
            if matches!(component, Component::ParentDir) {
                break;
            }
            continue;
        };
        let next = at.join(name);
        if !next.is_dir() {
            break;
        }
        at = next;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_walk_stops_at_the_deepest_existing_directory_inside_the_preopen() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        std::fs::write(dir.join("a/file"), "").unwrap();
        assert_eq!(deepest_existing(dir, Path::new("a/b/new")), dir.join("a/b"));
        assert_eq!(deepest_existing(dir, Path::new("./a/file")), dir.join("a"));
        assert_eq!(
            deepest_existing(dir, Path::new("a/../../etc")),
            dir.join("a")
        );
        assert_eq!(deepest_existing(dir, Path::new("")), dir);
    }

    #[test]
    fn only_a_path_on_a_read_only_mount_is_read_only() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("ro/sub")).unwrap();
        let memory = b"xxsub/new-file";
        let preopens = [tmp.path().to_owned(), tmp.path().join("ro")];
        // A writable directory, any path in it.
        assert!(!on_read_only_mount(&preopens, memory, 3, 2, 12));
        assert!(!on_read_only_mount(&preopens, memory, 4, 2, 12));
        // Not a preopen, or a path outside the memory: never.
        assert!(!on_read_only_mount(&preopens, memory, 5, 2, 12));
        assert!(!on_read_only_mount(&preopens, memory, 2, 2, 12));
        assert!(!on_read_only_mount(&preopens, memory, 3, 2, 80));
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: a read-only mount needs root");
            return;
        }
        // `ro` made a read-only mount, in a mount namespace of a thread's own.
        let ro = preopens[1].clone();
        let answers = std::thread::spawn(move || {
            use nix::mount::{MsFlags, mount};
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_SLAVE,
                None::<&str>,
            )
            .unwrap();
            mount(Some(&ro), &ro, None::<&str>, MsFlags::MS_BIND, None::<&str>).unwrap();
            let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
            mount(None::<&str>, &ro, None::<&str>, flags, None::<&str>).unwrap();
            (
                on_read_only_mount(&preopens, memory, 4, 2, 12),
                on_read_only_mount(&preopens, memory, 3, 2, 12),
            )
        })
        .join()
        .unwrap();
        assert_eq!(answers, (true, false));
    }
}
