//! What a container's guest is given, from its spec and its image: the
//! program and argv (Kubernetes' command/args over the image's entrypoint,
//! looked up in a compat image), the environment, preopened mounts (file
//! mounts gathered into directories), the working directory and how an HTTP
//! function is served.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Agent, lock};
use crate::images::store::ImageStore;
use crate::model::container::{ContainerSpec, Mount};
use crate::model::ids::ContainerId;
use crate::model::image::{ImageRecord, WasmKind};
use crate::model::sandbox::SandboxRecord;
use crate::network::GuestNetwork;
use crate::runtime::error::GuestError;
use crate::runtime::host::{Access, GuestConfig, GuestStdio, Preopen};
use crate::runtime::http::HttpOptions;
use crate::runtime::limits::MemoryLimiter;
use crate::runtime::logs::ContainerLog;

/// What one guest run gets besides its container's spec: where its
/// output goes, its memory account, its network and its stdio.
pub(super) struct GuestSetup {
    pub(super) log: ContainerLog,
    pub(super) limiter: MemoryLimiter,
    pub(super) network: GuestNetwork,
    pub(super) dns: crate::model::network::DnsSettings,
    pub(super) stdio: GuestStdio,
    /// The pod's hostname, for `HOSTNAME` (see [`pod_hostname`]).
    pub(super) hostname: Option<String>,
}

/// A writable file mount the guest writes to a copy of: its host file is
/// on another filesystem than the agent's root (the kubelet's pod
/// directory often is), so it could not be linked. The copy goes back to
/// the host file when the guest ends, before its exit is recorded, so the
/// kubelet reads what the guest wrote (`/dev/termination-log`).
pub(super) struct WriteBack {
    copy: PathBuf,
    host: PathBuf,
}

impl WriteBack {
    /// Writes the copy's contents into the host file (in place: whoever
    /// holds the host file open sees them).
    pub(super) fn write_back(&self) {
        if let Err(error) = std::fs::copy(&self.copy, &self.host) {
            tracing::warn!(copy = ?self.copy, host = ?self.host, %error, "a file mount's contents could not be written back to the host");
        }
    }
}

/// The hostname a pod's containers see, as containerd gives it: the
/// sandbox's, or the node's for a pod on the node's network without one.
pub(super) fn pod_hostname(sandbox: &SandboxRecord) -> Option<String> {
    if !sandbox.spec.hostname.is_empty() {
        return Some(sandbox.spec.hostname.clone());
    }
    // Read once: a host-network pod start is the hot path.
    static NODE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    sandbox
        .spec
        .host_network
        .then(|| {
            NODE.get_or_init(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_owned())
            })
            .clone()
        })
        .flatten()
}

/// What a compat image has at `parent` (a directory of its `root`), made
/// visible beside the file mounts gathered in `dir`, which hides it: each
/// regular file not mounted over is copied into `dir` (a copy: `dir` may be
/// writable, and the image's tree is shared by its containers), each
/// directory is returned as a read-only preopen at its place. Symlinks and
/// anything else are left out. Best effort: what cannot be carried over is
/// logged.
fn carry_over(id: &ContainerId, root: &Path, parent: &str, dir: &Path) -> Vec<Preopen> {
    let Ok(relative) = Path::new(parent).strip_prefix("/") else {
        return Vec::new();
    };
    let image_dir = root.join(relative);
    // Only inside the image root: no symlink on the way may lead out.
    let inside = match (root.canonicalize(), image_dir.canonicalize()) {
        (Ok(root), Ok(real)) => real.starts_with(root) && real.is_dir(),
        _ => false,
    };
    if !inside {
        return Vec::new();
    }
    let Ok(entries) = std::fs::read_dir(&image_dir) else {
        return Vec::new();
    };
    let mut preopens = Vec::new();
    for entry in entries.flatten() {
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let name = entry.file_name();
        let target = dir.join(&name);
        if kind.is_dir() {
            preopens.push(Preopen {
                host_path: entry.path(),
                guest_path: Path::new(parent).join(&name).to_string_lossy().into_owned(),
                access: Access::RecursiveReadOnly,
            });
        } else if kind.is_file()
            && std::fs::symlink_metadata(&target).is_err()
            && let Err(error) = std::fs::copy(entry.path(), &target)
        {
            tracing::debug!(container_id = %id, file = ?entry.path(), %error, "an image file hidden by a file mount's directory could not be carried over");
        }
    }
    preopens
}

/// Copies the tree at `from` to `to` (made): directories, regular files
/// (with their permissions) and symlinks as they are (an image root's
/// symlinks were checked to stay inside it when it was unpacked); anything
/// else is left out.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), &target)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path())?, &target)?;
        }
    }
    Ok(())
}

/// The mount points strictly below `dir` in this process's mount
/// namespace, each with its path relative to `dir`, read from
/// `/proc/self/mountinfo` (none if it cannot be read).
fn mounts_below(dir: &Path) -> Vec<(PathBuf, PathBuf)> {
    let Ok(dir) = dir.canonicalize() else {
        return Vec::new();
    };
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    mount_points(&table)
        .into_iter()
        .filter_map(|point| {
            let rest = point.strip_prefix(&dir).ok()?.to_owned();
            (!rest.as_os_str().is_empty()).then_some((point, rest))
        })
        .collect()
}

/// The mount points a `/proc/self/mountinfo` lists (its fifth field, with
/// the kernel's octal escapes undone), each once.
pub(super) fn mount_points(table: &str) -> Vec<PathBuf> {
    let unescape = |field: &str| {
        let bytes = field.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let octal = bytes.get(i + 1..i + 4).and_then(|d| {
                let d = std::str::from_utf8(d).ok()?;
                u8::from_str_radix(d, 8).ok()
            });
            match (bytes[i], octal) {
                (b'\\', Some(byte)) => {
                    out.push(byte);
                    i += 4;
                }
                (byte, _) => {
                    out.push(byte);
                    i += 1;
                }
            }
        }
        PathBuf::from(std::ffi::OsString::from(
            <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&out),
        ))
    };
    let mut points: Vec<PathBuf> = table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape)
        .collect();
    points.sort();
    points.dedup();
    points
}

/// The pod's DNS config as a `resolv.conf`, as containerd writes it;
/// `None` when the pod gives none (the node's is used).
pub(super) fn resolv_conf(dns: &crate::model::network::DnsSettings) -> Option<String> {
    if dns.servers.is_empty() && dns.searches.is_empty() && dns.options.is_empty() {
        return None;
    }
    let mut out = String::new();
    if !dns.searches.is_empty() {
        out.push_str(&format!("search {}\n", dns.searches.join(" ")));
    }
    for server in &dns.servers {
        out.push_str(&format!("nameserver {server}\n"));
    }
    if !dns.options.is_empty() {
        out.push_str(&format!("options {}\n", dns.options.join(" ")));
    }
    Some(out)
}

/// A guest's environment: `HOSTNAME`, then the image's (`KEY=VALUE`
/// entries), then the container's; a later definition of a name replaces
/// an earlier one, in place.
pub(super) fn guest_env(
    hostname: Option<&str>,
    image: &[String],
    container: &[(String, String)],
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    let defined = hostname
        .map(|h| ("HOSTNAME", h))
        .into_iter()
        .chain(image.iter().filter_map(|e| e.split_once('=')))
        .chain(container.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    for (key, value) in defined {
        match env.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value.to_owned(),
            None => env.push((key.to_owned(), value.to_owned())),
        }
    }
    env
}

/// WASI preview1 has no current directory: wasi-libc resolves relative
/// paths against a preopen named `.`. So the directory backing the
/// container's working directory (inside one of its mounts) is preopened
/// again as `.`; WASI 0.2 guests also get it as their initial cwd.
pub(super) fn working_dir_preopen(working_dir: &str, preopens: &[Preopen]) -> Option<Preopen> {
    let wd = Path::new(working_dir);
    if wd == Path::new("/") {
        return None;
    }
    let (mount, rest) = containing(wd, preopens)?;
    let host_path = preopens[mount].host_path.join(rest);
    host_path.is_dir().then(|| Preopen {
        host_path,
        guest_path: ".".to_owned(),
        access: preopens[mount].access,
    })
}

/// The deepest of `preopens` holding the absolute guest path `path` (its
/// index), and the rest of `path` below it, which has plain names only.
fn containing(path: &Path, preopens: &[Preopen]) -> Option<(usize, PathBuf)> {
    if !path.is_absolute() {
        return None;
    }
    let (index, rest) = preopens
        .iter()
        .enumerate()
        .filter(|(_, p)| p.guest_path != ".")
        .filter_map(|(i, p)| Some((i, path.strip_prefix(&p.guest_path).ok()?)))
        .max_by_key(|(i, _)| preopens[*i].guest_path.len())?;
    rest.components()
        .all(|c| matches!(c, std::path::Component::Normal(_)))
        .then(|| (index, rest.to_owned()))
}

/// `root/rest` as the directory it resolves to, if that is a directory
/// inside `root` (a symlink on the way may not lead out).
fn resolved_inside(root: &Path, rest: &Path) -> Option<PathBuf> {
    let root = root.canonicalize().ok()?;
    let real = root.join(rest).canonicalize().ok()?;
    (real.starts_with(&root) && real.is_dir()).then_some(real)
}

/// What a container runs: its argv and, for compat images, the program's
/// file inside the unpacked root.
pub(super) struct Program {
    pub(super) argv: Vec<String>,
    /// `None` for a Wasm artifact (the program is the image's Wasm layer).
    pub(super) file: Option<PathBuf>,
    /// The program's digest when known without reading it (an artifact's
    /// layer, or a compat program read before).
    pub(super) digest: Option<crate::model::ids::Digest>,
    pub(super) rootfs: Option<PathBuf>,
}

/// Reads `program`'s Wasm: the image's layer, or a compat image's file
/// (whose kind and digest are read from its bytes).
pub(super) fn read_program(
    images: &ImageStore,
    image: &ImageRecord,
    program: &Program,
) -> std::result::Result<(crate::model::ids::Digest, WasmKind, Vec<u8>), GuestError> {
    match &program.file {
        None => {
            let bytes =
                images
                    .read_blob(&image.wasm_digest)
                    .map_err(|e| GuestError::ReadImageWasm {
                        detail: e.to_string(),
                    })?;
            Ok((image.wasm_digest.clone(), image.wasm_kind, bytes))
        }
        Some(path) => {
            let bytes = std::fs::read(path).map_err(|e| GuestError::ReadProgram {
                program: program.argv[0].clone(),
                source: Arc::new(e),
            })?;
            let kind = WasmKind::detect(&bytes).ok_or_else(|| GuestError::NotWasm {
                program: program.argv[0].clone(),
            })?;
            Ok((crate::model::ids::Digest::of(&bytes), kind, bytes))
        }
    }
}

/// Decides argv as Kubernetes does: `command` replaces the image's
/// entrypoint and `args` its cmd. For a compat image `argv[0]` is then
/// looked up inside the image root, so one image can carry several
/// programs.
pub(super) fn program(
    images: &ImageStore,
    cache: &ProgramCache,
    image: &ImageRecord,
    spec: &ContainerSpec,
) -> std::result::Result<Program, GuestError> {
    let Some(config) = &image.compat else {
        let argv0 = match spec.command.first() {
            Some(c) => c.clone(),
            None => image
                .first_name()
                .map_or_else(|| "main.wasm".to_owned(), |n| n.basename().to_owned()),
        };
        let rest = spec.command.iter().skip(1).chain(&spec.args).cloned();
        return Ok(Program {
            argv: std::iter::once(argv0).chain(rest).collect(),
            file: None,
            digest: Some(image.wasm_digest.clone()),
            rootfs: None,
        });
    };
    let argv: Vec<String> = if !spec.command.is_empty() {
        spec.command.iter().chain(&spec.args).cloned().collect()
    } else if !spec.args.is_empty() {
        config
            .entrypoint
            .iter()
            .chain(&spec.args)
            .cloned()
            .collect()
    } else {
        config
            .entrypoint
            .iter()
            .chain(&config.cmd)
            .cloned()
            .collect()
    };
    let argv0 = argv.first().ok_or(GuestError::NoProgram)?;
    let rootfs = images.rootfs_path(&image.id);
    let key = (image.id.clone(), argv0.clone());
    let cached = lock(cache)
        .get(&key)
        .map(|p| (p.file.clone(), p.digest.clone()));
    let (file, digest) = match cached {
        Some(hit) => hit,
        None => {
            let file = crate::images::rootfs::resolve_program(&rootfs, argv0, config.path_env())?;
            lock(cache).insert(
                key,
                ResolvedProgram {
                    file: file.clone(),
                    digest: None,
                },
            );
            (file, None)
        }
    };
    Ok(Program {
        argv,
        file: Some(file),
        digest,
        rootfs: Some(rootfs),
    })
}

/// A program resolved inside a compat image's root, and its digest once
/// read: image roots never change, so neither is looked up again.
pub(super) struct ResolvedProgram {
    pub(super) file: PathBuf,
    pub(super) digest: Option<crate::model::ids::Digest>,
}

/// Resolved programs by (image id, `argv[0]`).
pub(super) type ProgramCache = Mutex<HashMap<(crate::model::ids::Digest, String), ResolvedProgram>>;

/// The annotation in which the kubelet lists a container's ports (JSON).
pub(super) const CONTAINER_PORTS_ANNOTATION: &str = "io.kubernetes.container.ports";

/// The names under which a Wasm artifact's one program may be exec'd: the
/// container's own command, the name the image gives it, and
/// `/proc/self/exe`.
pub(super) fn artifact_program_names(image: &ImageRecord, spec: &ContainerSpec) -> Vec<String> {
    let mut names = vec!["/proc/self/exe".to_owned()];
    if let Some(c) = spec.command.first() {
        names.push(c.clone());
    }
    if let Some(n) = image.first_name() {
        names.push(n.basename().to_owned());
    }
    names.push("main.wasm".to_owned());
    names.dedup();
    names
}

/// The variable in which runwasi's wasmtime shim takes the address a
/// wasi:http component listens on (`ADDR:PORT`), so images built for it
/// set it; wasmlet listens there too.
pub(super) const HTTP_PROXY_ADDR_ENV: &str = "WASMTIME_HTTP_PROXY_SOCKET_ADDR";

/// Where a container's HTTP function listens, first found of:
/// [`HTTP_PROXY_ADDR_ENV`] in the container's environment, then in the
/// image's (the program says where it listens, address and port); the
/// first TCP port the kubelet lists for the container
/// ([`CONTAINER_PORTS_ANNOTATION`]); the first TCP container port of the
/// pod's port mappings (what a client other than the kubelet, such as
/// critest, gives), on every address; else `None` (the node's default).
pub(super) fn http_listen(
    container_env: &[(String, String)],
    image_env: &[String],
    annotations: &BTreeMap<String, String>,
    port_mappings: &[crate::model::network::PortMapping],
) -> Option<std::net::SocketAddr> {
    let any = |port: u16| std::net::SocketAddr::from(([0, 0, 0, 0], port));
    let from_addr = |addr: &str| addr.trim().parse::<std::net::SocketAddr>().ok();
    let from_env = container_env
        .iter()
        .rev()
        .find(|(k, _)| k == HTTP_PROXY_ADDR_ENV)
        .map(|(_, v)| v.as_str())
        .or_else(|| {
            image_env
                .iter()
                .rev()
                .filter_map(|e| e.split_once('='))
                .find(|(k, _)| *k == HTTP_PROXY_ADDR_ENV)
                .map(|(_, v)| v)
        })
        .and_then(from_addr);
    let is_tcp = |proto: &str| proto.is_empty() || proto.eq_ignore_ascii_case("tcp");
    let from_annotation = || {
        let json = annotations.get(CONTAINER_PORTS_ANNOTATION)?;
        let ports = serde_json::from_str::<serde_json::Value>(json).ok()?;
        ports.as_array()?.iter().find_map(|p| {
            let tcp = p
                .get("protocol")
                .and_then(serde_json::Value::as_str)
                .is_none_or(is_tcp);
            let port = p.get("containerPort").and_then(serde_json::Value::as_u64)?;
            tcp.then(|| u16::try_from(port).ok().map(any)).flatten()
        })
    };
    let from_mappings = || {
        port_mappings
            .iter()
            .find(|m| is_tcp(&m.protocol) && m.container_port != 0)
            .map(|m| any(m.container_port))
    };
    from_env.or_else(from_annotation).or_else(from_mappings)
}

impl Agent {
    /// How a container's HTTP function is served: on the port
    /// [`http_listen`] finds, the node's defaults for the rest, overridden by
    /// the pod annotations `wasmlet.dev/http-max-concurrency` and
    /// `wasmlet.dev/http-request-timeout-seconds`.
    pub(super) fn http_options(
        &self,
        sandbox: &SandboxRecord,
        spec: &ContainerSpec,
    ) -> HttpOptions {
        let mut options = self.inner.http.clone();
        let image = self.inner.images.resolve(&spec.image);
        let image_env = image
            .as_ref()
            .and_then(|i| i.compat.as_ref())
            .map_or(&[][..], |c| &c.env[..]);
        if let Some(addr) = http_listen(
            &spec.envs,
            image_env,
            &spec.annotations,
            &sandbox.spec.port_mappings,
        ) {
            options.port = addr.port();
            options.address = addr.ip();
        }
        let annotation = |key: &str| {
            sandbox
                .spec
                .annotations
                .get(key)
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|v| *v > 0)
        };
        if let Some(n) = annotation("wasmlet.dev/http-max-concurrency") {
            options.max_concurrency = usize::try_from(n).unwrap_or(usize::MAX);
        }
        if let Some(secs) = annotation("wasmlet.dev/http-request-timeout-seconds") {
            options.request_timeout = Duration::from_secs(secs);
        }
        options
    }

    /// What a guest of container `id` running `spec` in `image` gets.
    pub(super) fn guest_config(
        &self,
        id: &ContainerId,
        image: &ImageRecord,
        spec: &ContainerSpec,
        setup: GuestSetup,
    ) -> std::result::Result<(GuestConfig, Vec<WriteBack>), GuestError> {
        let GuestSetup {
            log,
            limiter,
            network,
            dns,
            stdio,
            hostname,
        } = setup;
        let program = program(&self.inner.images, &self.inner.programs, image, spec)?;
        let mut preopens = Vec::new();
        if let Some(root) = &program.rootfs {
            let host_path = if spec.readonly_rootfs {
                root.clone()
            } else {
                self.writable_root(id, root)?
            };
            preopens.push(Preopen {
                host_path,
                guest_path: "/".to_owned(),
                access: if spec.readonly_rootfs {
                    Access::RecursiveReadOnly
                } else {
                    Access::ReadWrite
                },
            });
        }
        let mut mounts = spec.mounts.clone();
        mounts.extend(self.pod_files(
            id,
            &dns,
            hostname.as_deref(),
            &spec.mounts,
            spec.readonly_rootfs,
        )?);
        let (mounted, write_back) = self.preopens(id, &mounts, program.rootfs.as_deref())?;
        preopens.extend(mounted);
        self.apply_readonly_paths(id, &spec.readonly_paths, &mut preopens);
        self.bind_read_only(id, &mut preopens);
        let working_dir = if spec.working_dir.is_empty() {
            image
                .compat
                .as_ref()
                .map(|c| c.working_dir.clone())
                .unwrap_or_default()
        } else {
            spec.working_dir.clone()
        };
        if let Some(dir) = working_dir_preopen(&working_dir, &preopens) {
            preopens.push(dir);
        }
        let image_env = image.compat.as_ref().map_or(&[][..], |c| &c.env[..]);
        let env = guest_env(hostname.as_deref(), image_env, &spec.envs);
        let config = GuestConfig {
            argv: program.argv,
            env,
            preopens,
            working_dir: (!working_dir.is_empty()).then_some(working_dir),
            log,
            limiter,
            network,
            dns: Arc::new(crate::model::network::DnsSettings {
                hosts_file: spec
                    .mounts
                    .iter()
                    .find(|m| m.container_path == "/etc/hosts")
                    .map(|m| PathBuf::from(&m.host_path)),
                ..dns
            }),
            stdio,
            egress_tls: self.inner.egress_tls.clone(),
        };
        Ok((config, write_back))
    }

    /// Makes each of `paths` (`readonly_paths`) read-only where it is a
    /// directory the guest sees: a preopen there becomes read-only, a
    /// directory inside a writable one is preopened again, read-only, at
    /// its place (bound read-only when binds are on, opened beneath its
    /// preopen's directory: one the guest writes may hold symlinks). What
    /// is no directory the guest sees (the kubelet's `/proc/...` defaults)
    /// is left alone.
    fn apply_readonly_paths(
        &self,
        id: &ContainerId,
        paths: &[String],
        preopens: &mut Vec<Preopen>,
    ) {
        for path in paths {
            let Some((index, rest)) = containing(Path::new(path), preopens) else {
                tracing::debug!(container_id = %id, %path, "a read-only path outside every directory the guest sees is ignored");
                continue;
            };
            let parent = &preopens[index];
            if parent.access.is_read_only() {
                continue;
            }
            if rest.as_os_str().is_empty() {
                preopens[index].access = Access::ReadOnly;
                continue;
            }
            let Some(resolved) = resolved_inside(&parent.host_path, &rest) else {
                tracing::debug!(container_id = %id, %path, "a read-only path that is no directory is ignored");
                continue;
            };
            let bound =
                self.inner
                    .binds
                    .bind(&self.mounts_dir(id), &parent.host_path, Some(&rest), false);
            preopens.push(match bound {
                Some(host_path) => Preopen {
                    host_path,
                    guest_path: path.clone(),
                    access: Access::ReadWrite,
                },
                None => Preopen {
                    host_path: resolved,
                    guest_path: path.clone(),
                    access: Access::ReadOnly,
                },
            });
        }
    }

    /// Replaces each read-only preopen's directory with a read-only bind
    /// mount of it, given full WASI permissions, so that the kernel refuses
    /// writes there (`EROFS`); left as it is when binds are off.
    fn bind_read_only(&self, id: &ContainerId, preopens: &mut [Preopen]) {
        let dir = self.mounts_dir(id);
        for preopen in preopens.iter_mut().filter(|p| p.access.is_read_only()) {
            let recursive = preopen.access == Access::RecursiveReadOnly;
            if let Some(target) = self
                .inner
                .binds
                .bind(&dir, &preopen.host_path, None, recursive)
            {
                preopen.host_path = target;
                preopen.access = Access::ReadWrite;
            }
        }
    }

    /// The container's own copy of a compat image's root, which it may
    /// write (the image's tree is shared by its containers and stays as
    /// pulled): made at the container's first guest, in the container's
    /// directory (removed with it); an exec'd instance shares it.
    fn writable_root(
        &self,
        id: &ContainerId,
        image_root: &Path,
    ) -> std::result::Result<PathBuf, GuestError> {
        let dir = self.container_dir(id).join("rootfs");
        if dir.is_dir() {
            return Ok(dir);
        }
        // Copied aside, then renamed: a copy cut short is never used.
        let partial = self.container_dir(id).join("rootfs.partial");
        let failed = |path: &Path| {
            let path = path.to_owned();
            move |e| GuestError::ContainerDir {
                path,
                source: Arc::new(e),
            }
        };
        if partial.exists() {
            std::fs::remove_dir_all(&partial).map_err(failed(&partial))?;
        }
        copy_tree(image_root, &partial).map_err(failed(&partial))?;
        std::fs::rename(&partial, &dir).map_err(failed(&dir))?;
        Ok(dir)
    }

    /// `/etc/resolv.conf` (from the pod's DNS config, else the node's) and
    /// `/etc/hostname` (the pod's hostname), as mounts of files in the
    /// container's directory, as containerd gives every container of a
    /// pod: writable unless the container's root is `read_only`, as
    /// containerd mounts them; what the container mounts there itself is
    /// left alone. The files are written once, at the container's first
    /// guest (an exec'd instance reads the same).
    fn pod_files(
        &self,
        id: &ContainerId,
        dns: &crate::model::network::DnsSettings,
        hostname: Option<&str>,
        mounts: &[Mount],
        read_only: bool,
    ) -> std::result::Result<Vec<Mount>, GuestError> {
        let dir = self.container_dir(id).join("pod-etc");
        let resolv = resolv_conf(dns).or_else(|| std::fs::read_to_string("/etc/resolv.conf").ok());
        let files = [
            ("/etc/resolv.conf", "resolv.conf", resolv),
            (
                "/etc/hostname",
                "hostname",
                hostname.map(|h| format!("{h}\n")),
            ),
        ];
        let mut added = Vec::new();
        for (container_path, name, contents) in files {
            let Some(contents) = contents else { continue };
            if mounts.iter().any(|m| m.container_path == container_path) {
                continue;
            }
            let path = dir.join(name);
            if !path.exists() {
                std::fs::create_dir_all(&dir)
                    .and_then(|()| std::fs::write(&path, contents))
                    .map_err(|e| GuestError::ContainerDir {
                        path: path.clone(),
                        source: Arc::new(e),
                    })?;
            }
            added.push(Mount {
                container_path: container_path.to_owned(),
                host_path: path.to_string_lossy().into_owned(),
                readonly: read_only,
                recursive_read_only: read_only,
            });
        }
        Ok(added)
    }

    /// Turns mounts into preopened directories. WASI preopens only
    /// directories, so file mounts (`/etc/hosts`, `/dev/termination-log`)
    /// are gathered by parent directory into a per-container directory of
    /// hard links (copies across filesystems) that is preopened instead.
    /// That directory hides the image's own directory of the same path
    /// (`/etc` of a compat image's `rootfs`), so what the image has there
    /// is carried over: its files copied in, its directories preopened
    /// read-only at their place.
    pub(super) fn preopens(
        &self,
        id: &ContainerId,
        mounts: &[Mount],
        rootfs: Option<&Path>,
    ) -> std::result::Result<(Vec<Preopen>, Vec<WriteBack>), GuestError> {
        let mut preopens = Vec::new();
        let mut write_back = Vec::new();
        let mut file_groups: BTreeMap<String, Vec<&Mount>> = BTreeMap::new();
        for m in mounts {
            let meta = std::fs::metadata(&m.host_path).map_err(|e| GuestError::MountSource {
                host_path: m.host_path.clone(),
                container_path: m.container_path.clone(),
                source: Arc::new(e),
            })?;
            if meta.is_dir() {
                preopens.push(Preopen {
                    host_path: PathBuf::from(&m.host_path),
                    guest_path: m.container_path.clone(),
                    access: match (m.readonly, m.recursive_read_only) {
                        (false, _) => Access::ReadWrite,
                        (true, false) => Access::ReadOnly,
                        (true, true) => Access::RecursiveReadOnly,
                    },
                });
                // A read-only flag is not recursive unless asked: what the
                // host mounts below stays as it is (the kernel decides
                // whether it can be written).
                if m.readonly && !m.recursive_read_only {
                    preopens.extend(mounts_below(Path::new(&m.host_path)).into_iter().map(
                        |(host_path, rest)| {
                            Preopen {
                                host_path,
                                guest_path: Path::new(&m.container_path)
                                    .join(rest)
                                    .to_string_lossy()
                                    .into_owned(),
                                access: Access::ReadWrite,
                            }
                        },
                    ));
                }
            } else {
                let parent = Path::new(&m.container_path)
                    .parent()
                    .map_or_else(|| "/".to_owned(), |p| p.to_string_lossy().into_owned());
                file_groups.entry(parent).or_default().push(m);
            }
        }
        for (n, (parent, files)) in file_groups.into_iter().enumerate() {
            if preopens.iter().any(|p| p.guest_path == parent) {
                tracing::warn!(container_id = %id, %parent, "file mounts under a directory that is itself mounted are not visible");
                continue;
            }
            let dir = self
                .container_dir(id)
                .join("file-mounts")
                .join(n.to_string());
            std::fs::create_dir_all(&dir).map_err(|e| GuestError::ContainerDir {
                path: dir.clone(),
                source: Arc::new(e),
            })?;
            for m in &files {
                let name = Path::new(&m.container_path).file_name().ok_or_else(|| {
                    GuestError::MountTarget {
                        container_path: m.container_path.clone(),
                    }
                })?;
                let target = dir.join(name);
                // Made at the container's start; an exec'd instance shares
                // it (a copy must not be clobbered before it goes back).
                if std::fs::symlink_metadata(&target).is_ok() {
                    continue;
                }
                if std::fs::hard_link(&m.host_path, &target).is_err() {
                    std::fs::copy(&m.host_path, &target).map_err(|e| GuestError::MountFile {
                        host_path: m.host_path.clone(),
                        container_path: m.container_path.clone(),
                        source: Arc::new(e),
                    })?;
                    if !m.readonly {
                        tracing::debug!(container_id = %id, host_path = %m.host_path, "file mount copied across filesystems: written back when the guest ends");
                        write_back.push(WriteBack {
                            copy: target.clone(),
                            host: PathBuf::from(&m.host_path),
                        });
                    }
                }
            }
            if let Some(root) = rootfs {
                preopens.extend(carry_over(id, root, &parent, &dir));
            }
            preopens.push(Preopen {
                host_path: dir,
                guest_path: parent,
                access: if files.iter().all(|m| m.readonly) {
                    Access::RecursiveReadOnly
                } else {
                    Access::ReadWrite
                },
            });
        }
        Ok((preopens, write_back))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_environment_is_hostname_then_image_then_container_later_ones_winning() {
        let image = [
            "PATH=/bin".to_owned(),
            "MODE=image".to_owned(),
            "junk".to_owned(),
        ];
        let env = guest_env(
            Some("pod-a"),
            &image,
            &kv(&[("MODE", "container"), ("EXTRA", "1")]),
        );
        assert_eq!(
            env,
            kv(&[
                ("HOSTNAME", "pod-a"),
                ("PATH", "/bin"),
                ("MODE", "container"),
                ("EXTRA", "1")
            ])
        );
        // A container (or image) setting HOSTNAME itself wins.
        let env = guest_env(Some("pod-a"), &[], &kv(&[("HOSTNAME", "mine")]));
        assert_eq!(env, kv(&[("HOSTNAME", "mine")]));
        assert!(guest_env(None, &[], &[]).is_empty());
    }

    #[test]
    fn a_pod_without_a_hostname_on_the_node_network_gets_the_node_s() {
        let mut sandbox = SandboxRecord::new(crate::model::sandbox::SandboxSpec {
            hostname: "web-0".into(),
            ..Default::default()
        });
        assert_eq!(pod_hostname(&sandbox).as_deref(), Some("web-0"));
        sandbox.spec.hostname.clear();
        assert_eq!(pod_hostname(&sandbox), None);
        sandbox.spec.host_network = true;
        let node = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(pod_hostname(&sandbox).as_deref(), Some(node.trim()));
    }

    fn preopen(host: &Path, guest: &str) -> Preopen {
        Preopen {
            host_path: host.to_owned(),
            guest_path: guest.to_owned(),
            access: Access::ReadWrite,
        }
    }

    #[test]
    fn the_working_directory_is_found_in_the_deepest_mount_holding_it() {
        let dir = tempfile::tempdir().unwrap();
        let (outer, inner) = (dir.path().join("outer"), dir.path().join("inner"));
        std::fs::create_dir_all(outer.join("data/sub")).unwrap();
        std::fs::create_dir_all(inner.join("sub")).unwrap();
        let preopens = [preopen(&outer, "/srv"), preopen(&inner, "/srv/data")];
        let wd = working_dir_preopen("/srv/data/sub", &preopens).unwrap();
        assert_eq!(wd.host_path, inner.join("sub"));
        assert_eq!(wd.guest_path, ".");
        // Outside every mount, escaping one, missing, or the root: none.
        assert!(working_dir_preopen("/elsewhere", &preopens).is_none());
        assert!(working_dir_preopen("/srv/../etc", &preopens).is_none());
        assert!(working_dir_preopen("/srv/none", &preopens).is_none());
        assert!(working_dir_preopen("/", &preopens).is_none());
        assert!(working_dir_preopen("relative", &preopens).is_none());
    }

    #[test]
    fn a_read_only_path_is_found_in_the_deepest_preopen_and_no_symlink_leads_out() {
        let dir = tempfile::tempdir().unwrap();
        let (root, srv) = (dir.path().join("root"), dir.path().join("srv"));
        std::fs::create_dir_all(root.join("tmp")).unwrap();
        std::fs::create_dir_all(&srv).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("escape")).unwrap();
        std::os::unix::fs::symlink("tmp", root.join("inside")).unwrap();
        let preopens = [preopen(&root, "/"), preopen(&srv, "/srv")];
        let found = |path: &str| containing(Path::new(path), &preopens);
        assert_eq!(found("/tmp"), Some((0, PathBuf::from("tmp"))));
        assert_eq!(found("/srv/x"), Some((1, PathBuf::from("x"))));
        assert_eq!(found("/srv"), Some((1, PathBuf::new())));
        assert_eq!(found("/srv/../etc"), None);
        assert_eq!(found("tmp"), None);
        let real_tmp = root.join("tmp").canonicalize().unwrap();
        assert_eq!(
            resolved_inside(&root, Path::new("tmp")),
            Some(real_tmp.clone())
        );
        assert_eq!(resolved_inside(&root, Path::new("inside")), Some(real_tmp));
        assert_eq!(resolved_inside(&root, Path::new("escape")), None);
        assert_eq!(resolved_inside(&root, Path::new("missing")), None);
    }

    #[test]
    fn the_http_address_is_the_programs_then_the_kubelets_then_the_pods_mappings() {
        use crate::model::network::PortMapping;
        let mapping = |port: u16, protocol: &str| PortMapping {
            host_port: 0,
            container_port: port,
            protocol: protocol.to_owned(),
            host_ip: String::new(),
        };
        let annotated: BTreeMap<String, String> = [(
            CONTAINER_PORTS_ANNOTATION.to_owned(),
            r#"[{"containerPort":53,"protocol":"UDP"},{"containerPort":8081,"protocol":"TCP"}]"#
                .to_owned(),
        )]
        .into();
        let none = BTreeMap::new();
        let listen_port =
            |c: &[(String, String)],
             i: &[String],
             a: &BTreeMap<String, String>,
             m: &[PortMapping]| { http_listen(c, i, a, m).map(|addr| addr.port()) };
        let mappings = [mapping(53, "udp"), mapping(80, "tcp")];
        // Nothing: the node's default.
        assert_eq!(listen_port(&[], &[], &none, &[]), None);
        // critest: port mappings only.
        assert_eq!(listen_port(&[], &[], &none, &mappings), Some(80));
        // The kubelet's annotation wins over the mappings.
        assert_eq!(listen_port(&[], &[], &annotated, &mappings), Some(8081));
        // runwasi's variable, from the image, then from the container.
        let image = [
            "PATH=/bin".to_owned(),
            format!("{HTTP_PROXY_ADDR_ENV}=0.0.0.0:12003"),
        ];
        assert_eq!(listen_port(&[], &image, &annotated, &mappings), Some(12003));
        let container = [(HTTP_PROXY_ADDR_ENV.to_owned(), "127.0.0.1:9000".to_owned())];
        assert_eq!(
            listen_port(&container, &image, &annotated, &mappings),
            Some(9000)
        );
        // The program's address is kept; the others listen everywhere.
        assert_eq!(
            http_listen(&container, &image, &annotated, &mappings),
            Some("127.0.0.1:9000".parse().unwrap())
        );
        assert_eq!(
            http_listen(&[], &[], &annotated, &mappings),
            Some("0.0.0.0:8081".parse().unwrap())
        );
        // One that is no address is ignored.
        let bad = [(HTTP_PROXY_ADDR_ENV.to_owned(), "nine thousand".to_owned())];
        assert_eq!(listen_port(&bad, &[], &none, &mappings), Some(80));
    }

    #[test]
    fn resolv_conf_is_written_as_containerd_writes_it() {
        let dns = crate::model::network::DnsSettings {
            servers: vec!["10.10.10.10".into(), "10.10.10.11".into()],
            searches: vec!["google.com".into(), "example.com".into()],
            options: vec!["ndots:8".into()],
            ..Default::default()
        };
        assert_eq!(
            resolv_conf(&dns).unwrap(),
            "search google.com example.com\nnameserver 10.10.10.10\nnameserver 10.10.10.11\noptions ndots:8\n"
        );
        assert_eq!(resolv_conf(&Default::default()), None);
    }

    #[test]
    fn mount_points_are_read_from_mountinfo_unescaped() {
        let table = "\
22 1 0:21 / / rw,relatime - ext4 /dev/sda1 rw
40 22 0:35 / /tmp/host\\040path/tmpfs rw - tmpfs tmpfs rw
41 22 0:35 / /tmp/host\\040path/tmpfs rw - tmpfs tmpfs rw
";
        assert_eq!(
            mount_points(table),
            [PathBuf::from("/"), PathBuf::from("/tmp/host path/tmpfs")]
        );
    }

    #[test]
    fn an_image_directory_hidden_by_file_mounts_is_carried_over() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir_all(root.join("etc/ssl")).unwrap();
        std::fs::write(root.join("etc/passwd"), "root:x:0:0\n").unwrap();
        std::fs::write(root.join("etc/hosts"), "from the image\n").unwrap();
        std::os::unix::fs::symlink("/etc/shadow", root.join("etc/link")).unwrap();
        let dir = tmp.path().join("group");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("hosts"), "mounted\n").unwrap();
        let id = ContainerId::parse(&"a".repeat(64)).unwrap();

        let preopens = carry_over(&id, &root, "/etc", &dir);
        assert_eq!(preopens.len(), 1);
        assert_eq!(preopens[0].guest_path, "/etc/ssl");
        assert_eq!(preopens[0].host_path, root.join("etc/ssl"));
        assert_eq!(preopens[0].access, Access::RecursiveReadOnly);
        assert_eq!(
            std::fs::read_to_string(dir.join("passwd")).unwrap(),
            "root:x:0:0\n"
        );
        // What is mounted wins; symlinks are left out.
        assert_eq!(
            std::fs::read_to_string(dir.join("hosts")).unwrap(),
            "mounted\n"
        );
        assert!(std::fs::symlink_metadata(dir.join("link")).is_err());
        // A copy: writing it leaves the image alone.
        std::fs::write(dir.join("passwd"), "changed\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("etc/passwd")).unwrap(),
            "root:x:0:0\n"
        );
        // Nothing where the image has no such directory.
        assert!(carry_over(&id, &root, "/dev", &dir).is_empty());
    }

    #[test]
    fn a_tree_is_copied_with_its_files_directories_and_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let from = tmp.path().join("from");
        std::fs::create_dir_all(from.join("bin/sub")).unwrap();
        std::fs::write(from.join("bin/busybox"), "wasm").unwrap();
        std::fs::write(from.join("bin/sub/file"), "deep").unwrap();
        std::os::unix::fs::symlink("busybox", from.join("bin/sh")).unwrap();
        let to = tmp.path().join("to");
        copy_tree(&from, &to).unwrap();
        assert_eq!(
            std::fs::read_to_string(to.join("bin/busybox")).unwrap(),
            "wasm"
        );
        assert_eq!(
            std::fs::read_to_string(to.join("bin/sub/file")).unwrap(),
            "deep"
        );
        assert_eq!(
            std::fs::read_link(to.join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
        // Writing the copy leaves the original alone.
        std::fs::write(to.join("bin/busybox"), "changed").unwrap();
        assert_eq!(
            std::fs::read_to_string(from.join("bin/busybox")).unwrap(),
            "wasm"
        );
    }
}
