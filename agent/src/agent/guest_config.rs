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
use crate::runtime::host::{GuestConfig, GuestStdio, Preopen};
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
    if !wd.is_absolute() || wd == Path::new("/") {
        return None;
    }
    let (mount, rest) = preopens
        .iter()
        .filter_map(|p| Some((p, wd.strip_prefix(&p.guest_path).ok()?)))
        .max_by_key(|(p, _)| p.guest_path.len())?;
    if rest
        .components()
        .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return None;
    }
    let host_path = mount.host_path.join(rest);
    host_path.is_dir().then(|| Preopen {
        host_path,
        guest_path: ".".to_owned(),
        readonly: mount.readonly,
    })
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

impl Agent {
    /// How a container's HTTP function is served: the first TCP port the
    /// kubelet lists for the container (its `ports`), the node's defaults
    /// for the rest, overridden by the pod annotations
    /// `wasmlet.dev/http-max-concurrency` and
    /// `wasmlet.dev/http-request-timeout-seconds`.
    pub(super) fn http_options(
        &self,
        sandbox: &SandboxRecord,
        spec: &ContainerSpec,
    ) -> HttpOptions {
        let mut options = self.inner.http.clone();
        if let Some(port) = spec
            .annotations
            .get(CONTAINER_PORTS_ANNOTATION)
            .and_then(|json| serde_json::from_str::<serde_json::Value>(json).ok())
            .as_ref()
            .and_then(serde_json::Value::as_array)
            .and_then(|ports| {
                ports.iter().find_map(|p| {
                    let tcp = p
                        .get("protocol")
                        .and_then(serde_json::Value::as_str)
                        .is_none_or(|proto| proto.eq_ignore_ascii_case("tcp"));
                    let port = p.get("containerPort").and_then(serde_json::Value::as_u64)?;
                    tcp.then(|| u16::try_from(port).ok()).flatten()
                })
            })
        {
            options.port = port;
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
            preopens.push(Preopen {
                host_path: root.clone(),
                guest_path: "/".to_owned(),
                readonly: true,
            });
        }
        let (mounted, write_back) = self.preopens(id, &spec.mounts)?;
        preopens.extend(mounted);
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

    /// Turns mounts into preopened directories. WASI preopens only
    /// directories, so file mounts (`/etc/hosts`, `/dev/termination-log`)
    /// are gathered by parent directory into a per-container directory of
    /// hard links (copies across filesystems) that is preopened instead.
    pub(super) fn preopens(
        &self,
        id: &ContainerId,
        mounts: &[Mount],
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
                    readonly: m.readonly,
                });
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
            preopens.push(Preopen {
                host_path: dir,
                guest_path: parent,
                readonly: files.iter().all(|m| m.readonly),
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
            readonly: false,
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
}
