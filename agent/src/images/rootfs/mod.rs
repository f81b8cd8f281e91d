//! Root filesystems of "compat" images: ordinary OCI images whose layers
//! (tar, tar+gzip) carry `.wasm` programs.
//!
//! Layers are unpacked through a cap-std directory handle, so no entry can
//! write outside the root whatever symlinks earlier entries made, and
//! entries that would escape it anyway (`..` paths, absolute or escaping
//! symlink targets, hard links out of the root), device nodes, FIFOs and
//! anything past the size limit are refused with an error naming the
//! entry. Unpacking happens in a temporary directory that is renamed into
//! place only when every layer succeeded: nothing partial is ever visible.
//!
//! The limits bound what a layer can cost however its headers lie: a file
//! counts for the size its PAX record gives (the size the tar reader
//! copies), directories made for an entry's missing parents count as
//! entries, and the tar stream as a whole (headers, long names, PAX
//! records, data of entries that are skipped) may not exceed the byte limit
//! plus [`HEADER_BYTES_PER_ENTRY`] per allowed entry, so a gzip bomb ends in
//! an error, not a full disk or memory.

use std::cell::Cell;
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use cap_std::ambient_authority;
use cap_std::fs::Dir;

mod error;
#[cfg(test)]
mod fuzz;
pub use error::{EntryError, RootfsError};

/// How a layer blob is compressed, from its media type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
}

impl Compression {
    /// The compression of a tar layer media type, or `None` if the media
    /// type is not a tar layer.
    pub fn of_media_type(media_type: &str) -> Option<Self> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Some(Compression::Gzip),
            _ => None,
        }
    }
}

/// Limits on what unpacking may produce. The layers' decompressed tar
/// streams may hold `max_bytes` plus [`HEADER_BYTES_PER_ENTRY`] per allowed
/// entry, whatever their entries claim.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Total bytes of regular files across all layers.
    pub max_bytes: u64,
    /// Total entries across all layers.
    pub max_entries: u64,
}

/// What the tar stream may carry per allowed entry besides file data: its
/// header, padding, and a long name or PAX record.
pub const HEADER_BYTES_PER_ENTRY: u64 = 4096;

impl Limits {
    /// The most bytes all layers' (decompressed) tar streams may hold.
    fn stream_bytes(&self) -> u64 {
        self.max_bytes
            .saturating_add(self.max_entries.saturating_mul(HEADER_BYTES_PER_ENTRY))
    }
}

/// A reader that fails once more than `left` bytes have been read
/// through it, and says so in `exceeded`.
struct Budgeted<'a, R> {
    inner: R,
    left: &'a Cell<u64>,
    exceeded: &'a Cell<bool>,
}

impl<R: Read> Read for Budgeted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.left.get();
        // One byte past the budget tells a stream that ends exactly on it
        // from one that goes on.
        let want = buf
            .len()
            .min(usize::try_from(left.saturating_add(1)).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n as u64 > left {
            self.exceeded.set(true);
            return Err(std::io::Error::other("the layers exceed their byte limit"));
        }
        self.left.set(left - n as u64);
        Ok(n)
    }
}

/// Normalises a tar entry path to a relative path inside the root.
fn inside(path: &Path) -> Result<PathBuf, EntryError> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir => return Err(EntryError::LeavesRoot),
            Component::Prefix(_) => return Err(EntryError::Prefix),
        }
    }
    Ok(out)
}

/// Whether `target`, read relative to the directory of `link`, stays in
/// the root (lexically).
fn symlink_stays_inside(link: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut depth: i64 = link.parent().map_or(0, |p| p.components().count() as i64);
    for c in target.components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            _ => return false,
        }
        if depth < 0 {
            return false;
        }
    }
    true
}

struct Unpacker {
    root: Dir,
    limits: Limits,
    bytes: u64,
    entries: u64,
    /// What is left of [`Limits::stream_bytes`].
    stream_left: u64,
}

impl Unpacker {
    /// Unpacks one layer; `layer` and `compression` name it in errors.
    fn layer(
        &mut self,
        reader: impl Read,
        layer: &str,
        compression: Compression,
    ) -> Result<(), RootfsError> {
        let left = Cell::new(self.stream_left);
        let exceeded = Cell::new(false);
        let result = self.entries_of(
            Budgeted {
                inner: reader,
                left: &left,
                exceeded: &exceeded,
            },
            layer,
            compression,
        );
        self.stream_left = left.get();
        if exceeded.get() {
            return Err(RootfsError::StreamTooLarge {
                layer: layer.to_owned(),
                compression,
                max: self.limits.stream_bytes(),
            });
        }
        result
    }

    fn entries_of(
        &mut self,
        reader: impl Read,
        layer: &str,
        compression: Compression,
    ) -> Result<(), RootfsError> {
        let unreadable = |e: std::io::Error| RootfsError::Layer {
            layer: layer.to_owned(),
            compression,
            source: Arc::new(e),
        };
        let mut archive = tar::Archive::new(reader);
        for entry in archive.entries().map_err(unreadable)? {
            let mut entry = entry.map_err(unreadable)?;
            let raw = entry.path().map_err(unreadable)?.into_owned();
            self.entry(&mut entry, &raw)
                .map_err(|source| RootfsError::Entry {
                    layer: layer.to_owned(),
                    compression,
                    entry: raw,
                    source,
                })?;
        }
        Ok(())
    }

    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        raw: &Path,
    ) -> Result<(), EntryError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(EntryError::TooManyEntries {
                max: self.limits.max_entries,
            });
        }
        let kind = entry.header().entry_type();
        if kind == tar::EntryType::XGlobalHeader {
            // Metadata for the archive as a whole; containerd ignores it too.
            return Ok(());
        }
        let path = inside(raw)?;
        let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            return Ok(()); // the root itself
        };
        let parent = path.parent().unwrap_or(Path::new(""));
        if !parent.as_os_str().is_empty() && self.root.symlink_metadata(parent).is_err() {
            // Every directory this may make counts as an entry.
            self.entries = self
                .entries
                .saturating_add(parent.components().count() as u64);
            if self.entries > self.limits.max_entries {
                return Err(EntryError::TooManyEntries {
                    max: self.limits.max_entries,
                });
            }
            self.root.create_dir_all(parent)?;
        }
        // Whiteouts: remove what lower layers put there.
        if name == ".wh..wh..opq" {
            let dir = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            for child in self.root.read_dir(dir)? {
                let child = child?;
                self.remove(&parent.join(child.file_name()))?;
            }
            return Ok(());
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            return self.remove(&parent.join(hidden));
        }
        if !kind.is_dir() {
            self.remove(&path)?;
        }
        match kind {
            tar::EntryType::Directory => Ok(self.root.create_dir_all(&path)?),
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                // The size the reader copies: a PAX record's, if any, not
                // the header's.
                self.bytes = self.bytes.saturating_add(entry.size());
                if self.bytes > self.limits.max_bytes {
                    return Err(EntryError::TooLarge {
                        max: self.limits.max_bytes,
                    });
                }
                let mut file = self.root.create(&path)?;
                std::io::copy(entry, &mut file)?;
                Ok(())
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()?
                    .ok_or(EntryError::NoTarget { kind: "symlink" })?
                    .into_owned();
                self.check_symlink(parent, &target)?;
                Ok(self.root.symlink(&target, &path)?)
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()?
                    .ok_or(EntryError::NoTarget { kind: "hard link" })?
                    .into_owned();
                let target = inside(&target)?;
                // A hard link to a symlink is that symlink in another
                // directory, where its target may lead elsewhere.
                if let Ok(contents) = self.root.read_link_contents(&target) {
                    self.check_symlink(parent, &contents)?;
                }
                Ok(self.root.hard_link(&target, &self.root, &path)?)
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                Err(EntryError::DeviceNode)
            }
            // PAX and GNU metadata records are consumed by the tar reader.
            other => Err(EntryError::Unsupported {
                kind: format!("{other:?}"),
            }),
        }
    }

    /// Refuses a symlink `target` that leaves the root when read from the
    /// directory `parent` really is (which symlinks among its components
    /// may put elsewhere than its name says).
    fn check_symlink(&self, parent: &Path, target: &Path) -> Result<(), EntryError> {
        let escapes = || EntryError::SymlinkEscapes {
            target: target.to_owned(),
        };
        let parent = canonical_inside(&self.root, parent).map_err(|_| escapes())?;
        if symlink_stays_inside(&parent.join("link"), target) {
            Ok(())
        } else {
            Err(escapes())
        }
    }

    fn remove(&self, path: &Path) -> Result<(), EntryError> {
        match self.root.symlink_metadata(path) {
            Ok(meta) if meta.is_dir() => Ok(self.root.remove_dir_all(path)?),
            Ok(_) => Ok(self.root.remove_file(path)?),
            Err(_) => Ok(()),
        }
    }
}

/// Unpacks `layers` (blob path and compression, lowest first) into `dest`,
/// which must not exist. On failure nothing is left at `dest`.
pub fn unpack(
    layers: &[(PathBuf, Compression)],
    dest: &Path,
    limits: Limits,
) -> Result<(), RootfsError> {
    let tmp = dest.with_extension(format!(
        "partial-{}",
        hex::encode(rand::random::<[u8; 4]>())
    ));
    let result = (|| {
        std::fs::create_dir_all(&tmp).map_err(RootfsError::io("creating", &tmp))?;
        let root = Dir::open_ambient_dir(&tmp, ambient_authority())
            .map_err(RootfsError::io("opening", &tmp))?;
        let mut unpacker = Unpacker {
            root,
            limits,
            bytes: 0,
            entries: 0,
            stream_left: limits.stream_bytes(),
        };
        for (blob, compression) in layers {
            let name = blob
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            let layer = format!("sha256:{name}");
            let file = std::fs::File::open(blob).map_err(RootfsError::io("opening layer", blob))?;
            let file = std::io::BufReader::new(file);
            match compression {
                Compression::None => unpacker.layer(file, &layer, *compression),
                Compression::Gzip => {
                    unpacker.layer(flate2::read::GzDecoder::new(file), &layer, *compression)
                }
            }?;
        }
        std::fs::rename(&tmp, dest).map_err(RootfsError::io("moving the root into place", dest))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Finds `program` in the root at `root`: an absolute path, or a name
/// looked up on `path_env` (colon-separated). Symlinks are followed only
/// within the root. Returns the file's path on the host.
pub fn resolve_program(root: &Path, program: &str, path_env: &str) -> Result<PathBuf, RootfsError> {
    let dir = Dir::open_ambient_dir(root, ambient_authority())
        .map_err(RootfsError::io("opening the image root", root))?;
    let candidates: Vec<PathBuf> = if program.contains('/') {
        vec![PathBuf::from(program)]
    } else {
        path_env
            .split(':')
            .filter(|d| !d.is_empty())
            .map(|d| Path::new(d).join(program))
            .collect()
    };
    for candidate in &candidates {
        let relative = inside(candidate).map_err(|source| RootfsError::ProgramPath {
            program: program.to_owned(),
            source,
        })?;
        // cap-std follows symlinks but never out of `dir`.
        if let Ok(meta) = dir.metadata(&relative)
            && meta.is_file()
        {
            let resolved = canonical_inside(&dir, &relative)?;
            return Ok(root.join(resolved));
        }
    }
    Err(RootfsError::ProgramNotFound {
        program: program.to_owned(),
        looked_at: candidates,
    })
}

/// Resolves symlinks of `path` inside `dir` to a path with none.
fn canonical_inside(dir: &Dir, path: &Path) -> Result<PathBuf, RootfsError> {
    let mut resolved = PathBuf::new();
    let mut pending: Vec<PathBuf> = path
        .components()
        .rev()
        .map(|c| PathBuf::from(c.as_os_str()))
        .collect();
    let mut hops = 0;
    while let Some(part) = pending.pop() {
        match part.to_str() {
            Some("..") => {
                resolved.pop();
                continue;
            }
            Some(".") => continue,
            _ => {}
        }
        let next = resolved.join(&part);
        match dir.read_link_contents(&next) {
            Ok(target) => {
                hops += 1;
                if hops > 40 || target.is_absolute() {
                    return Err(RootfsError::Unresolvable {
                        path: path.to_owned(),
                    });
                }
                for c in target.components().rev() {
                    pending.push(PathBuf::from(c.as_os_str()));
                }
            }
            Err(_) => resolved = next,
        }
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_bytes: 1 << 20,
        max_entries: 1000,
    };

    fn layer(dir: &Path, name: &str, build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> PathBuf {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        let path = dir.join(name);
        std::fs::write(&path, b.into_inner().unwrap()).unwrap();
        path
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, data).unwrap();
    }

    fn link(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, path: &str, target: &str) {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_entry_type(kind);
        b.append_link(&mut h, path, target).unwrap();
    }

    fn raw_path(b: &mut tar::Builder<Vec<u8>>, path: &[u8], data: &[u8]) {
        // tar::Builder refuses `..`; write the name bytes directly.
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..path.len()].copy_from_slice(path);
        h.set_size(data.len() as u64);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    #[test]
    fn layers_apply_in_order_with_whiteouts_and_programs_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let l1 = layer(dir.path(), "l1", |b| {
            file(b, "bin/app.wasm", b"\0asm\x01\0\0\0");
            file(b, "etc/old", b"old");
            file(b, "opaque/gone", b"x");
        });
        let l2 = layer(dir.path(), "l2", |b| {
            file(b, "etc/.wh.old", b"");
            file(b, "opaque/.wh..wh..opq", b"");
            file(b, "opaque/kept", b"y");
            link(
                b,
                tar::EntryType::Symlink,
                "usr/bin/app",
                "../../bin/app.wasm",
            );
        });
        let dest = dir.path().join("root");
        unpack(
            &[(l1, Compression::None), (l2, Compression::None)],
            &dest,
            LIMITS,
        )
        .unwrap();
        assert!(!dest.join("etc/old").exists());
        assert!(!dest.join("opaque/gone").exists());
        assert!(dest.join("opaque/kept").exists());
        let found = resolve_program(&dest, "app", "/usr/bin:/bin").unwrap();
        assert_eq!(found, dest.join("bin/app.wasm"));
        assert_eq!(
            resolve_program(&dest, "/bin/app.wasm", "").unwrap(),
            dest.join("bin/app.wasm")
        );
        let err = resolve_program(&dest, "nope", "/bin").unwrap_err();
        assert!(
            matches!(&err, RootfsError::ProgramNotFound { program, .. } if program == "nope"),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .contains("\"nope\" is not in the image (looked at /bin/nope)"),
            "{err}"
        );
        let err = resolve_program(&dest, "../x.wasm", "").unwrap_err();
        assert!(
            matches!(
                err,
                RootfsError::ProgramPath {
                    source: EntryError::LeavesRoot,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn hostile_entries_are_refused_and_nothing_is_left() {
        let dir = tempfile::tempdir().unwrap();
        type Build = Box<dyn Fn(&mut tar::Builder<Vec<u8>>)>;
        let cases: Vec<(&str, Build)> = vec![
            (
                "leaves the image root",
                Box::new(|b| raw_path(b, b"../escape", b"x")),
            ),
            (
                "absolute or leaves",
                Box::new(|b| link(b, tar::EntryType::Symlink, "abs", "/etc/passwd")),
            ),
            (
                "absolute or leaves",
                Box::new(|b| link(b, tar::EntryType::Symlink, "a/up", "../../x")),
            ),
            (
                "leaves the image root",
                Box::new(|b| link(b, tar::EntryType::Link, "hl", "../outside")),
            ),
            (
                "device nodes",
                Box::new(|b| {
                    let mut h = tar::Header::new_gnu();
                    h.set_size(0);
                    h.set_entry_type(tar::EntryType::Char);
                    b.append_data(&mut h, "dev/null", &b""[..]).unwrap();
                }),
            ),
            (
                "byte limit",
                Box::new(|b| file(b, "big", &vec![0u8; (LIMITS.max_bytes + 1) as usize])),
            ),
        ];
        for (i, (want, build)) in cases.iter().enumerate() {
            let l = layer(dir.path(), &format!("bad{i}"), |b| {
                file(b, "ok.txt", b"fine");
                build(b);
            });
            let dest = dir.path().join(format!("root{i}"));
            let err = unpack(&[(l, Compression::None)], &dest, LIMITS).unwrap_err();
            assert!(
                matches!(&err, RootfsError::Entry { entry, .. } if entry != Path::new("ok.txt")),
                "case {i}: {err:?}"
            );
            assert!(err.is_refusal() && err.is_too_large() == (*want == "byte limit"));
            let err = err.to_string();
            assert!(
                err.contains(want) && err.contains("layer entry"),
                "case {i}: {err}"
            );
            assert!(!dest.exists(), "case {i}: partial root left behind");
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("partial"))
            .collect();
        assert!(leftovers.is_empty());
        assert!(
            !dir.path().join("escape").exists()
                && !dir.path().parent().unwrap().join("escape").exists()
        );
    }

    #[test]
    fn gzip_layers_unpack() {
        let dir = tempfile::tempdir().unwrap();
        let plain = layer(dir.path(), "plain", |b| {
            file(b, "x.wasm", b"\0asm\x01\0\0\0")
        });
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &std::fs::read(&plain).unwrap()).unwrap();
        let gz_path = dir.path().join("gz");
        std::fs::write(&gz_path, gz.finish().unwrap()).unwrap();
        let dest = dir.path().join("root");
        unpack(&[(gz_path, Compression::Gzip)], &dest, LIMITS).unwrap();
        assert!(dest.join("x.wasm").is_file());
        assert_eq!(
            Compression::of_media_type("application/vnd.oci.image.layer.v1.tar+gzip"),
            Some(Compression::Gzip)
        );
        assert_eq!(Compression::of_media_type("application/wasm"), None);
    }
}
