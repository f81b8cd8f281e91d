//! Images as the store records them: the kind of Wasm they carry, their
//! normalised names, their records and the runtime config of compat images.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::ids::Digest;
use crate::model::time::Timestamp;

const WASM_MAGIC: [u8; 4] = *b"\0asm";
const CORE_MODULE_VERSION: [u8; 4] = [0x01, 0x00, 0x00, 0x00];
const COMPONENT_VERSION: [u8; 4] = [0x0d, 0x00, 0x01, 0x00];

/// What kind of Wasm binary an image carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WasmKind {
    /// A core module (WASI preview1).
    Module,
    /// A component (WASI 0.2, `wasi:cli/run`).
    Component,
}

impl WasmKind {
    /// Reads the kind from a binary's preamble; `None` if it is not Wasm.
    pub fn detect(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < 8 || bytes[..4] != WASM_MAGIC {
            return None;
        }
        match bytes[4..8].try_into().ok()? {
            CORE_MODULE_VERSION => Some(WasmKind::Module),
            COMPONENT_VERSION => Some(WasmKind::Component),
            _ => None,
        }
    }

    /// The `os` an OCI config gives for this kind, as the ecosystem uses it.
    pub fn os(self) -> &'static str {
        match self {
            WasmKind::Module => "wasip1",
            WasmKind::Component => "wasip2",
        }
    }
}

/// A normalised image reference: `registry/repository` plus a tag and/or
/// digest, as containerd and the kubelet spell them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageName {
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl ImageName {
    /// Parses a reference the way Docker normalises it: a first component
    /// without `.` or `:` (and not `localhost`) is not a registry, so
    /// `busybox` is `docker.io/library/busybox:latest`.
    pub fn parse(reference: &str) -> Result<Self> {
        let invalid =
            |why: &str| Error::InvalidArgument(format!("image reference {reference:?}: {why}"));
        if reference.is_empty() {
            return Err(invalid("empty"));
        }
        let (rest, digest) = match reference.split_once('@') {
            Some((rest, d)) => (rest, Some(Digest::parse(d)?)),
            None => (reference, None),
        };
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(tag) = tag {
            let ok = !tag.is_empty()
                && tag.len() <= 128
                && tag
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                && !tag.starts_with(['.', '-']);
            if !ok {
                return Err(invalid("invalid tag"));
            }
        }
        let (domain, path) = match name.split_once('/') {
            Some((first, path)) if first.contains(['.', ':']) || first == "localhost" => {
                (first.to_owned(), path.to_owned())
            }
            _ => ("docker.io".to_owned(), name.to_owned()),
        };
        let (host, port) = domain.split_once(':').unwrap_or((&domain, "0"));
        let domain_ok = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-".contains(&b))
            && !port.is_empty()
            && port.bytes().all(|b| b.is_ascii_digit());
        if !domain_ok {
            return Err(invalid("invalid registry host"));
        }
        let path = if domain == "docker.io" && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        let path_ok = !path.is_empty()
            && path.split('/').all(|c| {
                !c.is_empty()
                    && c.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
                    && c.as_bytes()[0].is_ascii_alphanumeric()
            });
        if !path_ok {
            return Err(invalid(
                "repository must be lowercase letters, digits and . _ - separated by /",
            ));
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_owned()),
            (None, None) => Some("latest".to_owned()),
            (None, Some(_)) => None,
        };
        Ok(Self {
            repository: format!("{domain}/{path}"),
            tag,
            digest,
        })
    }

    /// `repository:tag`, if a tag was given or implied.
    pub fn tagged(&self) -> Option<String> {
        self.tag
            .as_ref()
            .map(|t| format!("{}:{t}", self.repository))
    }

    /// The last path component, used as argv\[0\] when no command is given.
    pub fn basename(&self) -> &str {
        self.repository
            .rsplit('/')
            .next()
            .unwrap_or(&self.repository)
    }
}

/// An image as stored and reported.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The config digest, which is the image id.
    pub id: Digest,
    pub manifest_digest: Digest,
    pub repo_tags: Vec<String>,
    pub repo_digests: Vec<String>,
    /// Total bytes of manifest, config and layers.
    pub size: u64,
    /// The layer holding the Wasm binary.
    pub wasm_digest: Digest,
    pub wasm_kind: WasmKind,
    /// Every blob the image references, for garbage collection.
    pub blobs: Vec<Digest>,
    pub created_at: Timestamp,
    /// Imported from a file (`wasmlet image import`): no registry holds
    /// it, so pulls are answered from the store.
    #[serde(default)]
    pub imported: bool,
    /// For a "compat" image (an ordinary OCI image whose layers carry
    /// `.wasm` programs): its runtime config. Its root filesystem is
    /// unpacked at the image store's `rootfs_path`; `wasm_digest` is then the
    /// digest of the default program's file.
    #[serde(default)]
    pub compat: Option<ImageConfig>,
}

/// The parts of an OCI image config that decide how a program runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `KEY=VALUE` entries.
    pub env: Vec<String>,
    pub working_dir: String,
    /// The image's `User` (`uid`, `name`, `uid:gid` or `name:group`): only
    /// reported (`ImageStatus`), a guest has no credentials.
    #[serde(default)]
    pub user: String,
}

impl ImageConfig {
    /// The image's `PATH`, or the conventional default.
    pub fn path_env(&self) -> &str {
        self.env
            .iter()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    }
}

impl ImageRecord {
    /// The repository part of the first tag, if any.
    pub fn first_name(&self) -> Option<ImageName> {
        self.repo_tags
            .iter()
            .chain(&self.repo_digests)
            .find_map(|r| ImageName::parse(r).ok())
    }
}

/// Usage of the filesystem the store lives on, for `ImageFsInfo`.
#[derive(Clone, Debug)]
pub struct FsUsage {
    pub mountpoint: PathBuf,
    pub used_bytes: u64,
    pub inodes_used: u64,
    pub timestamp: Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> (String, Option<String>) {
        let n = ImageName::parse(s).unwrap();
        (n.repository, n.tag)
    }

    #[test]
    fn references_normalise_like_docker() {
        assert_eq!(
            name("busybox"),
            ("docker.io/library/busybox".into(), Some("latest".into()))
        );
        assert_eq!(
            name("me/app:v1"),
            ("docker.io/me/app".into(), Some("v1".into()))
        );
        assert_eq!(
            name("localhost:5000/app"),
            ("localhost:5000/app".into(), Some("latest".into()))
        );
        assert_eq!(
            name("wasmlet.local/samples/echo:p1"),
            ("wasmlet.local/samples/echo".into(), Some("p1".into()))
        );
        let d = format!("ghcr.io/a/b@sha256:{}", "a".repeat(64));
        let n = ImageName::parse(&d).unwrap();
        assert_eq!(n.tag, None);
        assert!(n.digest.is_some());
        for bad in ["", "UPPER/case", "a:", "a:b:c/d", "a//b", "a:-x"] {
            assert!(ImageName::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn detects_modules_and_components() {
        assert_eq!(WasmKind::detect(b"\0asm\x01\0\0\0"), Some(WasmKind::Module));
        assert_eq!(
            WasmKind::detect(b"\0asm\x0d\0\x01\0"),
            Some(WasmKind::Component)
        );
        assert_eq!(WasmKind::detect(b"#!/bin/sh\n"), None);
        assert_eq!(WasmKind::detect(b"\0asm"), None);
    }
}
