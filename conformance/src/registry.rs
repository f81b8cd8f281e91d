//! A real OCI registry on loopback for image tests, and a small HTTP/1.1 client
//! to publish hand-made images to it.
//!
//! [`Registry`] runs distribution's `registry:2` (Debian's `docker-registry`
//! package, installed by `scripts/setup`) on `127.0.0.1` with its storage, config
//! and log in a private temporary directory, optionally behind HTTP basic auth,
//! and either over plain HTTP ([`Registry::start`]) or over HTTPS with a
//! throwaway CA made by the `openssl` CLI ([`Registry::start_tls`]). It can
//! also authorize with bearer tokens from a
//! [`TokenServer`](crate::token_server::TokenServer), as Docker Hub, GHCR and
//! Harbor do ([`Registry::start_token`]).
//! [`RegistryClient`] pushes blobs, manifests and indexes through the
//! distribution API exactly as bytes are given, so tests control every digest
//! and media type. [`send`] is the raw client underneath, also used to observe
//! what a [`FaultProxy`](crate::fault_proxy::FaultProxy) does to an answer.
//!
//! Nothing here talks to an address outside loopback, and every wait is bounded.
//!
//! What registry 2.8 accepts (checked by the `registry_fixture` conformance
//! tests): OCI image manifests and indexes, Docker schema 2 manifests and
//! manifest lists, with any config and layer media type (including
//! `application/vnd.wasm.config.v0+json` and `application/wasm`) and with the
//! OCI 1.1 `artifactType` and `subject` fields stored verbatim. The `Content-Type`
//! of a manifest `PUT` must be the manifest's media type. A `GET` of an OCI
//! manifest or index answers 404 `MANIFEST_UNKNOWN` unless `Accept` names its
//! media type, and there is no referrers API.

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::token_server::TokenServer;

/// Where `scripts/setup` installs the registry.
pub const REGISTRY_BINARY: &str = "/usr/bin/docker-registry";

/// The tool that makes the bcrypt password file basic auth needs.
pub const HTPASSWD_BINARY: &str = "htpasswd";

/// How long a started registry may take to answer `GET /v2/` (or, over
/// TLS, to accept a connection).
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The tool that makes a TLS registry's throwaway CA and server certificate.
pub const OPENSSL_BINARY: &str = "openssl";

/// How long one `openssl` command may take.
pub const OPENSSL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one request made by [`send`] may take, connection included.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// The realm the registry names in its basic-auth challenge.
pub const AUTH_REALM: &str = "wasmlet-conformance";

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config media type.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker schema 2 manifest media type.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker schema 2 manifest list media type.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// The config media type of the Wasm OCI artifact layout.
pub const WASM_CONFIG: &str = "application/vnd.wasm.config.v0+json";
/// The layer media type of the Wasm OCI artifact layout.
pub const WASM_LAYER: &str = "application/wasm";

/// An `Accept` header value naming every manifest type above, as pulling
/// clients send it.
pub const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// What can go wrong while running a registry or talking HTTP to it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A program the fixture runs is not installed.
    #[error("{program} is not installed; run scripts/setup")]
    NotInstalled { program: &'static str },

    /// A file in the fixture's directory could not be written or read.
    #[error("could not {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A program the fixture runs could not be started.
    #[error("could not start {program}")]
    Spawn {
        program: &'static str,
        #[source]
        source: io::Error,
    },

    /// `htpasswd` refused to make the password file.
    #[error("htpasswd failed ({status}): {stderr}")]
    Htpasswd { status: ExitStatus, stderr: String },

    /// An `openssl` command making the TLS files failed.
    #[error("openssl could not {step} ({status}): {stderr}")]
    Openssl {
        step: &'static str,
        status: ExitStatus,
        stderr: String,
    },

    /// An `openssl` command making the TLS files did not finish in time.
    #[error("openssl did not {step} within {timeout:?}")]
    OpensslTimeout {
        step: &'static str,
        timeout: Duration,
    },

    /// The registry exited before it answered.
    #[error("registry exited ({status}) before it was ready; its log:\n{log}")]
    Exited { status: ExitStatus, log: String },

    /// The registry did not answer `GET /v2/` (over TLS: accept a
    /// connection) in time.
    #[error("registry was not ready within {timeout:?} ({last_error}); its log:\n{log}")]
    NotReady {
        timeout: Duration,
        last_error: String,
        log: String,
    },

    /// A request could not be sent or its answer not read.
    #[error("{method} http://{addr}{target}")]
    Transport {
        method: String,
        addr: SocketAddr,
        target: String,
        #[source]
        source: io::Error,
    },

    /// A request got no complete answer in time.
    #[error("{method} http://{addr}{target} got no answer within {timeout:?}")]
    Timeout {
        method: String,
        addr: SocketAddr,
        target: String,
        timeout: Duration,
    },

    /// The answer ended before the body its `Content-Length` announced.
    #[error("{method} http://{addr}{target}: body ended after {received} of {expected} bytes")]
    TruncatedBody {
        method: String,
        addr: SocketAddr,
        target: String,
        expected: u64,
        received: u64,
    },

    /// The registry answered a push with a status other than the one the
    /// distribution spec prescribes.
    #[error("{method} {target} answered {status}, expected {expected}: {body}")]
    UnexpectedStatus {
        method: String,
        target: String,
        status: u16,
        expected: u16,
        body: String,
    },

    /// The registry answered a push without a header the spec requires.
    #[error("{method} {target} answered without a {header} header")]
    MissingHeader {
        method: String,
        target: String,
        header: &'static str,
    },
}

/// How to run a [`Registry`]. Whether it speaks TLS is chosen by the
/// constructor ([`Registry::start`] or [`Registry::start_tls`]), so that the
/// struct literals tests already write keep compiling.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Require HTTP basic auth with this user and password; `None` serves
    /// anonymous pulls and pushes.
    pub basic_auth: Option<(String, String)>,
}

/// A running `registry:2` on `127.0.0.1`, killed when dropped.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    addr: SocketAddr,
    basic_auth: Option<(String, String)>,
    /// The CA that signed the server certificate, when serving TLS.
    ca_pem: Option<PathBuf>,
    log_path: PathBuf,
    // Dropped after the child is killed: holds storage, config and log.
    dir: tempfile::TempDir,
}

/// A throwaway CA and a server certificate it signed, all in one
/// directory (see [`throwaway_tls`]).
#[derive(Debug)]
pub struct TlsFiles {
    /// The throwaway CA's certificate, which clients must trust.
    pub ca_pem: PathBuf,
    /// The server certificate.
    pub certificate: PathBuf,
    /// The server certificate's private key.
    pub key: PathBuf,
}

impl Registry {
    /// Starts a plain-HTTP registry on a free loopback port and waits until
    /// it answers `GET /v2/` (200 when anonymous, 401 with basic auth), at
    /// most [`READY_TIMEOUT`].
    ///
    /// The registry listens on `127.0.0.1:0` and the port it picked is read
    /// from its log, so no port is ever raced for.
    pub async fn start(options: RegistryOptions) -> Result<Registry, Error> {
        Registry::launch(options, false, None).await
    }

    /// Starts a plain-HTTP registry that authorizes every request with a
    /// bearer token issued by `tokens`, and waits until it answers
    /// `GET /v2/` (401), at most [`READY_TIMEOUT`].
    ///
    /// Its challenges send clients to [`TokenServer::realm`] for service
    /// [`SERVICE`](crate::token_server::SERVICE), and it accepts tokens
    /// signed by the certificate [`TokenServer::certificate_path`] names
    /// and issued by [`ISSUER`](crate::token_server::ISSUER). What a client
    /// may do is decided by the token server's policy alone.
    ///
    /// [`Registry::client`] and the pushes built on it send no token, so
    /// they are refused; push with `wasmlet image push` instead.
    pub async fn start_token(tokens: &TokenServer) -> Result<Registry, Error> {
        Registry::launch(RegistryOptions::default(), false, Some(tokens)).await
    }

    /// Starts a registry serving HTTPS only, on a free loopback port, with a
    /// server certificate for `127.0.0.1` (and `localhost`) signed by a CA
    /// made for it alone; clients must trust [`Registry::ca_pem_path`].
    ///
    /// The CA and the certificate are made with the `openssl` CLI in the
    /// registry's directory and checked with `openssl verify` before the
    /// registry starts. It is ready when it has logged
    /// `listening on 127.0.0.1:PORT, tls` and a TCP connection to that port
    /// succeeds, at most [`READY_TIMEOUT`]: the raw client here speaks only
    /// plain HTTP, so `GET /v2/` is not tried, and the registry binds its
    /// listener before logging and serves it right after.
    ///
    /// [`Registry::client`], [`Registry::push_image`] and
    /// [`Registry::push_index`] speak plain HTTP and cannot be used with it;
    /// push with `wasmlet image push` and a config naming the CA instead.
    pub async fn start_tls(options: RegistryOptions) -> Result<Registry, Error> {
        Registry::launch(options, true, None).await
    }

    async fn launch(
        options: RegistryOptions,
        tls: bool,
        tokens: Option<&TokenServer>,
    ) -> Result<Registry, Error> {
        let dir = tempfile::Builder::new()
            .prefix("wasmlet-registry-")
            .tempdir()
            .map_err(|source| Error::Io {
                action: "create a temporary directory in",
                path: std::env::temp_dir(),
                source,
            })?;
        let root = dir.path();

        let htpasswd = match &options.basic_auth {
            Some((user, password)) => Some(write_htpasswd(root, user, password).await?),
            None => None,
        };
        let tls = if tls {
            Some(throwaway_tls(root, "IP:127.0.0.1, DNS:localhost").await?)
        } else {
            None
        };
        let config_path = root.join("config.yml");
        let config = registry_config(root, htpasswd.as_deref(), tls.as_ref(), tokens);
        write_file(&config_path, config.as_bytes())?;

        let log_path = root.join("registry.log");
        let log = std::fs::File::create(&log_path).map_err(|source| Error::Io {
            action: "create",
            path: log_path.clone(),
            source,
        })?;
        let log_for_stdout = log.try_clone().map_err(|source| Error::Io {
            action: "duplicate the handle of",
            path: log_path.clone(),
            source,
        })?;

        let mut command = Command::new(REGISTRY_BINARY);
        command
            .arg("serve")
            .arg(&config_path)
            .current_dir(root)
            .stdin(Stdio::null())
            .stdout(log_for_stdout)
            .stderr(log);
        // REGISTRY_* variables override the config file.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("REGISTRY_") {
                command.env_remove(name);
            }
        }
        let child = command.spawn().map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => Error::NotInstalled {
                program: REGISTRY_BINARY,
            },
            _ => Error::Spawn {
                program: REGISTRY_BINARY,
                source,
            },
        })?;

        let mut registry = Registry {
            child,
            // Replaced once the log names the port.
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            basic_auth: options.basic_auth,
            ca_pem: tls.map(|files| files.ca_pem),
            log_path,
            dir,
        };
        registry.wait_ready().await?;
        Ok(registry)
    }

    /// Waits for the "listening on" log line, then for `GET /v2/` to answer
    /// (over TLS: for a TCP connection to be accepted).
    async fn wait_ready(&mut self) -> Result<(), Error> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last_error = String::from("it has not logged its address yet");
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(Error::Exited {
                    status,
                    log: self.log(),
                });
            }
            if self.addr.port() == 0
                && let Some(addr) = listening_addr(&self.log())
            {
                self.addr = addr;
            }
            if self.addr.port() != 0 && self.ca_pem.is_some() {
                let connect = tokio::time::timeout(HTTP_TIMEOUT, TcpStream::connect(self.addr));
                match connect.await {
                    Ok(Ok(_)) => return Ok(()),
                    Ok(Err(error)) => last_error = format!("connecting: {error}"),
                    Err(_) => last_error = format!("connecting took over {HTTP_TIMEOUT:?}"),
                }
            } else if self.addr.port() != 0 {
                match send(self.addr, &Request::get("/v2/")).await {
                    Ok(response) if matches!(response.status, 200 | 401) => return Ok(()),
                    Ok(response) => last_error = format!("GET /v2/ answered {}", response.status),
                    Err(error) => last_error = error_chain(&error),
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::NotReady {
                    timeout: READY_TIMEOUT,
                    last_error,
                    log: self.log(),
                });
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// `127.0.0.1:PORT`, the registry host as an image reference names it.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The address the registry listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The user and password the registry requires, if any.
    pub fn basic_auth(&self) -> Option<(&str, &str)> {
        self.basic_auth
            .as_ref()
            .map(|(user, password)| (user.as_str(), password.as_str()))
    }

    /// The PEM certificate of the CA clients must trust, when the registry
    /// serves TLS ([`Registry::start_tls`]); `None` for plain HTTP.
    pub fn ca_pem_path(&self) -> Option<&Path> {
        self.ca_pem.as_deref()
    }

    /// The registry's log so far (startup and access log), for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_else(|error| {
            format!("(could not read {}: {error})", self.log_path.display())
        })
    }

    /// The directory holding the registry's config, storage and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A client that talks to this registry directly, with its credentials.
    ///
    /// # Panics
    ///
    /// If the registry serves TLS: the client speaks plain HTTP only.
    pub fn client(&self) -> RegistryClient {
        assert!(
            self.ca_pem.is_none(),
            "the registry on {} serves TLS; the fixture's raw client speaks plain HTTP \
             (push with `wasmlet image push` and a config naming the CA)",
            self.addr
        );
        RegistryClient::new(self.addr, self.basic_auth.clone())
    }

    /// Pushes an image directly over plain HTTP; see
    /// [`RegistryClient::push_image`].
    pub async fn push_image(
        &self,
        repo: &str,
        tag: &str,
        config_media_type: &str,
        config: &[u8],
        layers: &[(&str, &[u8])],
        manifest_media_type: &str,
    ) -> Result<Descriptor, Error> {
        self.client()
            .push_image(
                repo,
                tag,
                config_media_type,
                config,
                layers,
                manifest_media_type,
            )
            .await
    }

    /// Pushes an OCI image index directly over plain HTTP; see
    /// [`RegistryClient::push_index`].
    pub async fn push_index(
        &self,
        repo: &str,
        tag: &str,
        entries: &[(&str, &str, &Descriptor)],
    ) -> Result<Descriptor, Error> {
        self.client().push_index(repo, tag, entries).await
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        // SIGKILL: nothing in the registry's storage needs to survive.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The registry's configuration. Written as JSON, which YAML parsers accept,
/// so that paths need no YAML quoting.
fn registry_config(
    root: &Path,
    htpasswd: Option<&Path>,
    tls: Option<&TlsFiles>,
    tokens: Option<&TokenServer>,
) -> String {
    let mut config = serde_json::json!({
        "version": "0.1",
        "log": {
            "level": "info",
            "formatter": "text",
        },
        "storage": {
            "filesystem": { "rootdirectory": root.join("storage") },
            "delete": { "enabled": true },
            "maintenance": { "uploadpurging": { "enabled": false } },
        },
        "http": {
            "addr": "127.0.0.1:0",
            "secret": format!("wasmlet-{}", std::process::id()),
        },
    });
    if let Some(files) = tls {
        config["http"]["tls"] = serde_json::json!({
            "certificate": files.certificate,
            "key": files.key,
        });
    }
    if let Some(path) = htpasswd {
        config["auth"] = serde_json::json!({
            "htpasswd": { "realm": AUTH_REALM, "path": path },
        });
    }
    if let Some(tokens) = tokens {
        config["auth"] = serde_json::json!({
            "token": {
                "realm": tokens.realm(),
                "service": crate::token_server::SERVICE,
                "issuer": crate::token_server::ISSUER,
                "rootcertbundle": tokens.certificate_path(),
            },
        });
    }
    config.to_string()
}

/// Makes a bcrypt password file with `htpasswd -Bbn`, the only hash registry
/// 2.8 accepts.
async fn write_htpasswd(root: &Path, user: &str, password: &str) -> Result<PathBuf, Error> {
    let output = tokio::process::Command::new(HTPASSWD_BINARY)
        .args(["-Bbn", user, password])
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => Error::NotInstalled {
                program: HTPASSWD_BINARY,
            },
            _ => Error::Spawn {
                program: HTPASSWD_BINARY,
                source,
            },
        })?;
    if !output.status.success() {
        return Err(Error::Htpasswd {
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    let path = root.join("htpasswd");
    write_file(&path, &output.stdout)?;
    Ok(path)
}

/// The `openssl` config the TLS files are made with: the names of the
/// certificates and the extensions of each. Passed explicitly so that the
/// system's `openssl.cnf` adds nothing.
const OPENSSL_CONFIG: &str = "\
[req]
distinguished_name = subject
prompt = no

[subject]
CN = wasmlet-conformance throwaway CA

[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = {names}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

/// How the TLS files are made, one `openssl` command line per step, every
/// file named relative to the registry's directory where they run: a CA, a
/// key and certificate request for the server, the certificate the CA signs
/// (P-256 keys, valid two days), and a check that the CA accepts it for a
/// TLS server.
const OPENSSL_STEPS: [(&str, &str); 4] = [
    (
        "make the CA",
        "req -x509 -config openssl.cnf -extensions ca -days 2 \
         -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
         -keyout ca.key -out ca.pem",
    ),
    (
        "make the server's certificate request",
        "req -new -config openssl.cnf -subj /CN=127.0.0.1 \
         -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
         -keyout server.key -out server.csr",
    ),
    (
        "sign the server certificate",
        "x509 -req -in server.csr -CA ca.pem -CAkey ca.key \
         -CAserial ca.srl -CAcreateserial -days 2 \
         -extfile openssl.cnf -extensions server -out server.pem",
    ),
    (
        "verify the server certificate",
        "verify -CAfile ca.pem -purpose sslserver server.pem",
    ),
];

/// Makes a throwaway CA and a server certificate for `names` (an X.509
/// `subjectAltName` value, such as `IP:127.0.0.1, DNS:localhost`) in `root`
/// with [`OPENSSL_STEPS`] and the `openssl` CLI.
pub async fn throwaway_tls(root: &Path, names: &str) -> Result<TlsFiles, Error> {
    let config = OPENSSL_CONFIG.replace("{names}", names);
    write_file(&root.join("openssl.cnf"), config.as_bytes())?;
    for (step, command_line) in OPENSSL_STEPS {
        let args: Vec<&str> = command_line.split_whitespace().collect();
        openssl(root, step, &args).await?;
    }
    Ok(TlsFiles {
        ca_pem: root.join("ca.pem"),
        certificate: root.join("server.pem"),
        key: root.join("server.key"),
    })
}

/// Runs `openssl ARGS` in `root`, at most [`OPENSSL_TIMEOUT`].
pub(crate) async fn openssl(root: &Path, step: &'static str, args: &[&str]) -> Result<(), Error> {
    let output = tokio::process::Command::new(OPENSSL_BINARY)
        .args(args)
        .current_dir(root)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(OPENSSL_TIMEOUT, output)
        .await
        .map_err(|_| Error::OpensslTimeout {
            step,
            timeout: OPENSSL_TIMEOUT,
        })?
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => Error::NotInstalled {
                program: OPENSSL_BINARY,
            },
            _ => Error::Spawn {
                program: OPENSSL_BINARY,
                source,
            },
        })?;
    if !output.status.success() {
        return Err(Error::Openssl {
            step,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(())
}

pub(crate) fn write_file(path: &Path, contents: &[u8]) -> Result<(), Error> {
    std::fs::write(path, contents).map_err(|source| Error::Io {
        action: "write",
        path: path.to_owned(),
        source,
    })
}

/// The address in the registry's `listening on 127.0.0.1:PORT` log line
/// (`listening on 127.0.0.1:PORT, tls` when it serves TLS).
fn listening_addr(log: &str) -> Option<SocketAddr> {
    let (_, rest) = log.split_once("listening on ")?;
    let end = rest
        .find(|c: char| c == '"' || c == ',' || c.is_whitespace())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// An error and its sources on one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(line, ": {cause}");
        source = cause.source();
    }
    line
}

/// What a manifest says about a blob or another manifest it refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    pub size: u64,
}

impl Descriptor {
    /// The descriptor of `bytes` published with `media_type`.
    pub fn of(media_type: &str, bytes: &[u8]) -> Descriptor {
        Descriptor {
            media_type: media_type.to_owned(),
            digest: sha256_digest(bytes),
            size: bytes.len() as u64,
        }
    }

    /// The descriptor as JSON, for hand-written manifests.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        })
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Pushes content through the distribution API to one address (a registry,
/// or a proxy in front of one), with optional basic-auth credentials.
#[derive(Debug, Clone)]
pub struct RegistryClient {
    addr: SocketAddr,
    basic_auth: Option<(String, String)>,
}

impl RegistryClient {
    pub fn new(addr: SocketAddr, basic_auth: Option<(String, String)>) -> RegistryClient {
        RegistryClient { addr, basic_auth }
    }

    /// Sends `request` with this client's credentials.
    pub async fn send(&self, mut request: Request) -> Result<Response, Error> {
        if let Some((user, password)) = &self.basic_auth {
            request = request.basic_auth(user, password);
        }
        send(self.addr, &request).await
    }

    /// `GET /v2/<repo>/manifests/<reference>` accepting every manifest type.
    pub async fn get_manifest(&self, repo: &str, reference: &str) -> Result<Response, Error> {
        let target = format!("/v2/{repo}/manifests/{reference}");
        self.send(Request::get(&target).header("Accept", ACCEPT_MANIFESTS))
            .await
    }

    /// `GET /v2/<repo>/blobs/<digest>`.
    pub async fn get_blob(&self, repo: &str, digest: &str) -> Result<Response, Error> {
        self.send(Request::get(&format!("/v2/{repo}/blobs/{digest}")))
            .await
    }

    /// Uploads `bytes` as one blob (a monolithic upload: `POST` to open the
    /// upload, `PUT` to its `Location` with the digest) and returns its digest.
    pub async fn push_blob(&self, repo: &str, bytes: &[u8]) -> Result<String, Error> {
        let digest = sha256_digest(bytes);
        let open = format!("/v2/{repo}/blobs/uploads/");
        let response = self.send(Request::new("POST", &open)).await?;
        let location = expect_status("POST", &open, &response, 202)?
            .header("Location")
            .ok_or_else(|| Error::MissingHeader {
                method: "POST".into(),
                target: open.clone(),
                header: "Location",
            })?;
        let mut target = location_target(location);
        target.push(if target.contains('?') { '&' } else { '?' });
        target.push_str("digest=");
        target.push_str(&digest);
        let request = Request::new("PUT", &target)
            .header("Content-Type", "application/octet-stream")
            .body(bytes.to_vec());
        let response = self.send(request).await?;
        expect_status("PUT", &target, &response, 201)?;
        Ok(digest)
    }

    /// Publishes `manifest` under `reference` (a tag or its digest) with
    /// `media_type` as its `Content-Type`, and returns its descriptor.
    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        manifest: &[u8],
    ) -> Result<Descriptor, Error> {
        let target = format!("/v2/{repo}/manifests/{reference}");
        let request = Request::new("PUT", &target)
            .header("Content-Type", media_type)
            .body(manifest.to_vec());
        let response = self.send(request).await?;
        expect_status("PUT", &target, &response, 201)?;
        Ok(Descriptor::of(media_type, manifest))
    }

    /// Pushes the config and layer blobs, then a manifest of type
    /// `manifest_media_type` (OCI or Docker schema 2) naming them, tagged `tag`.
    /// Returns the manifest's descriptor.
    pub async fn push_image(
        &self,
        repo: &str,
        tag: &str,
        config_media_type: &str,
        config: &[u8],
        layers: &[(&str, &[u8])],
        manifest_media_type: &str,
    ) -> Result<Descriptor, Error> {
        self.push_blob(repo, config).await?;
        let mut layer_descriptors = Vec::with_capacity(layers.len());
        for (media_type, bytes) in layers {
            self.push_blob(repo, bytes).await?;
            layer_descriptors.push(Descriptor::of(media_type, bytes).to_json());
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": manifest_media_type,
            "config": Descriptor::of(config_media_type, config).to_json(),
            "layers": layer_descriptors,
        });
        self.push_manifest(
            repo,
            tag,
            manifest_media_type,
            manifest.to_string().as_bytes(),
        )
        .await
    }

    /// Publishes an OCI image index tagged `tag` whose entries are
    /// `(os, architecture, manifest)`, and returns its descriptor. The
    /// manifests must be in `repo` already.
    pub async fn push_index(
        &self,
        repo: &str,
        tag: &str,
        entries: &[(&str, &str, &Descriptor)],
    ) -> Result<Descriptor, Error> {
        let manifests: Vec<_> = entries
            .iter()
            .map(|(os, architecture, manifest)| {
                let mut entry = manifest.to_json();
                entry["platform"] = serde_json::json!({ "os": os, "architecture": architecture });
                entry
            })
            .collect();
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": manifests,
        });
        self.push_manifest(repo, tag, OCI_INDEX, index.to_string().as_bytes())
            .await
    }
}

fn expect_status<'r>(
    method: &str,
    target: &str,
    response: &'r Response,
    expected: u16,
) -> Result<&'r Response, Error> {
    if response.status == expected {
        return Ok(response);
    }
    Err(Error::UnexpectedStatus {
        method: method.to_owned(),
        target: target.to_owned(),
        status: response.status,
        expected,
        body: String::from_utf8_lossy(&response.body).into_owned(),
    })
}

/// The request target (path and query) of a `Location` header, which the
/// spec allows to be absolute (`http://host/v2/...`) or relative (`/v2/...`).
fn location_target(location: &str) -> String {
    let without_scheme = location
        .strip_prefix("http://")
        .or_else(|| location.strip_prefix("https://"));
    match without_scheme {
        Some(rest) => match rest.find('/') {
            Some(slash) => rest[slash..].to_owned(),
            None => "/".to_owned(),
        },
        None if location.starts_with('/') => location.to_owned(),
        None => format!("/{location}"),
    }
}

/// A request for [`send`]. `Host`, `Connection: close` and `Content-Length`
/// are added when it is sent.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path and query, e.g. `/v2/`.
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn new(method: &str, target: &str) -> Request {
        Request {
            method: method.to_owned(),
            target: target.to_owned(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn get(target: &str) -> Request {
        Request::new("GET", target)
    }

    pub fn header(mut self, name: &str, value: &str) -> Request {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Adds `Authorization: Basic`.
    pub fn basic_auth(self, user: &str, password: &str) -> Request {
        let credentials = base64(format!("{user}:{password}").as_bytes());
        self.header("Authorization", &format!("Basic {credentials}"))
    }

    pub fn body(mut self, body: Vec<u8>) -> Request {
        self.body = body;
        self
    }
}

/// A complete answer read by [`send`].
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// The body as text, for assertion messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one request on a fresh connection to `addr` and reads the whole
/// answer, at most [`HTTP_TIMEOUT`]. An answer shorter than its
/// `Content-Length` is [`Error::TruncatedBody`], never a short `Response`.
pub async fn send(addr: SocketAddr, request: &Request) -> Result<Response, Error> {
    let transport = |source| Error::Transport {
        method: request.method.clone(),
        addr,
        target: request.target.clone(),
        source,
    };
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let mut head = format!(
            "{} {} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n",
            request.method, request.target
        );
        for (name, value) in &request.headers {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        if !request.body.is_empty() || matches!(request.method.as_str(), "POST" | "PUT" | "PATCH") {
            let _ = write!(head, "Content-Length: {}\r\n", request.body.len());
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&request.body).await?;
        stream.flush().await?;

        let mut reader = BufReader::new(stream);
        let head = read_head(&mut reader).await?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before an answer",
            )
        })?;
        let status = head.status()?;
        let framing = head.response_framing(&request.method, status)?;
        let body = read_body(&mut reader, framing).await?;
        Ok::<_, io::Error>((status, head, framing, body))
    };
    let (status, head, framing, body) = tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .map_err(|_| Error::Timeout {
            method: request.method.clone(),
            addr,
            target: request.target.clone(),
            timeout: HTTP_TIMEOUT,
        })?
        .map_err(transport)?;
    if let Framing::Length(expected) = framing
        && (body.len() as u64) < expected
    {
        return Err(Error::TruncatedBody {
            method: request.method.clone(),
            addr,
            target: request.target.clone(),
            expected,
            received: body.len() as u64,
        });
    }
    Ok(Response {
        status,
        headers: head.headers,
        body,
    })
}

/// Standard base64 with padding, for `Authorization: Basic`.
pub(crate) fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

// HTTP/1.1 message reading, shared with the fault proxy.

/// Longest message head accepted, start line and headers together.
const MAX_HEAD: usize = 64 * 1024;

/// The start line and headers of an HTTP/1.1 message.
#[derive(Debug, Clone)]
pub(crate) struct Head {
    pub start_line: String,
    pub headers: Vec<(String, String)>,
}

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// The status code of a response's start line.
    pub fn status(&self) -> io::Result<u16> {
        let mut parts = self.start_line.split(' ');
        match (parts.next(), parts.next().map(str::parse::<u16>)) {
            (Some(version), Some(Ok(status))) if version.starts_with("HTTP/") => Ok(status),
            _ => Err(invalid(format!("bad status line {:?}", self.start_line))),
        }
    }

    /// How the body of a request with this head is delimited.
    pub fn request_framing(&self) -> io::Result<Framing> {
        Ok(self.body_framing()?.unwrap_or(Framing::None))
    }

    /// How the body of a response to `method` with this head is delimited.
    pub fn response_framing(&self, method: &str, status: u16) -> io::Result<Framing> {
        if method == "HEAD" || (100..200).contains(&status) || status == 204 || status == 304 {
            return Ok(Framing::None);
        }
        Ok(self.body_framing()?.unwrap_or(Framing::UntilClose))
    }

    fn body_framing(&self) -> io::Result<Option<Framing>> {
        if let Some(coding) = self.header("Transfer-Encoding") {
            if coding.to_ascii_lowercase().ends_with("chunked") {
                return Ok(Some(Framing::Chunked));
            }
            return Err(invalid(format!("unsupported Transfer-Encoding {coding:?}")));
        }
        match self.header("Content-Length") {
            Some(length) => length
                .trim()
                .parse()
                .map(|n| Some(Framing::Length(n)))
                .map_err(|_| invalid(format!("bad Content-Length {length:?}"))),
            None => Ok(None),
        }
    }
}

pub(crate) fn header<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn invalid(reason: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, reason)
}

/// Accepts connections on `listener` for as long as the returned task
/// lives, serving each with `serve` in a set of tasks owned by it:
/// aborting the task closes every connection.
pub(crate) async fn accept_loop<F, Fut>(listener: tokio::net::TcpListener, serve: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve(stream));
                }
                // Out of descriptors, most likely: let connections finish.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Reads a message head. `None` when the peer closed before sending a byte.
pub(crate) async fn read_head<R: AsyncBufRead + Unpin>(reader: &mut R) -> io::Result<Option<Head>> {
    let mut read = 0;
    let mut start_line = String::new();
    // Empty lines before a start line are allowed (RFC 9112 section 2.2).
    while start_line.is_empty() {
        let Some(line) = read_line(reader, &mut read).await? else {
            return if read == 0 {
                Ok(None)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "message head ended early",
                ))
            };
        };
        start_line = line;
    }
    let mut headers = Vec::new();
    loop {
        let line = read_line(reader, &mut read).await?.ok_or_else(|| {
            io::Error::new(io::ErrorKind::UnexpectedEof, "message head ended early")
        })?;
        if line.is_empty() {
            return Ok(Some(Head {
                start_line,
                headers,
            }));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| invalid(format!("bad header line {line:?}")))?;
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
}

/// One CRLF- (or LF-) terminated line without its terminator; `None` at EOF.
async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    read: &mut usize,
) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    let limit = (MAX_HEAD.saturating_sub(*read) + 1) as u64;
    let n = (&mut *reader)
        .take(limit)
        .read_until(b'\n', &mut line)
        .await?;
    *read += n;
    if n == 0 {
        return Ok(None);
    }
    if *read > MAX_HEAD {
        return Err(invalid(format!(
            "message head longer than {MAX_HEAD} bytes"
        )));
    }
    if line.pop() != Some(b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "line ended early",
        ));
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| invalid("message head is not UTF-8".to_owned()))
}

/// Reads a body, de-chunked. With [`Framing::Length`] it returns what arrived
/// before EOF, which the caller compares with the announced length.
pub(crate) async fn read_body<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    framing: Framing,
) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    match framing {
        Framing::None => {}
        Framing::Length(length) => {
            (&mut *reader).take(length).read_to_end(&mut body).await?;
        }
        Framing::UntilClose => {
            reader.read_to_end(&mut body).await?;
        }
        Framing::Chunked => {
            loop {
                // Each chunk line and the trailers get the head's size limit.
                let mut read = 0;
                let line = read_line(reader, &mut read).await?.ok_or_else(|| {
                    io::Error::new(io::ErrorKind::UnexpectedEof, "chunk size missing")
                })?;
                let size = line.split(';').next().unwrap_or_default().trim();
                let size = usize::from_str_radix(size, 16)
                    .map_err(|_| invalid(format!("bad chunk size {line:?}")))?;
                if size == 0 {
                    // Trailers, up to the empty line.
                    while !read_line(reader, &mut read)
                        .await?
                        .ok_or_else(|| {
                            io::Error::new(io::ErrorKind::UnexpectedEof, "trailers ended early")
                        })?
                        .is_empty()
                    {}
                    break;
                }
                let start = body.len();
                body.resize(start + size, 0);
                reader.read_exact(&mut body[start..]).await?;
                let mut crlf = [0; 2];
                reader.read_exact(&mut crlf).await?;
                if crlf != *b"\r\n" {
                    return Err(invalid("chunk not followed by CRLF".to_owned()));
                }
            }
        }
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected, "{input:?}");
        }
    }

    #[test]
    fn location_target_accepts_absolute_and_relative() {
        assert_eq!(
            location_target("http://127.0.0.1:5000/v2/a/blobs/uploads/u?_state=x"),
            "/v2/a/blobs/uploads/u?_state=x"
        );
        assert_eq!(
            location_target("/v2/a/blobs/uploads/u"),
            "/v2/a/blobs/uploads/u"
        );
        assert_eq!(location_target("https://h"), "/");
    }

    #[test]
    fn listening_addr_reads_the_registry_log_line() {
        let log = "time=\"t\" level=info msg=\"redis not configured\"\n\
                   time=\"t\" level=info msg=\"listening on 127.0.0.1:42463\" go.version=go1.19.8\n";
        assert_eq!(
            listening_addr(log),
            Some("127.0.0.1:42463".parse().unwrap())
        );
        let tls =
            "time=\"t\" level=info msg=\"listening on 127.0.0.1:41499, tls\" go.version=go1.19.8\n";
        assert_eq!(
            listening_addr(tls),
            Some("127.0.0.1:41499".parse().unwrap())
        );
        assert_eq!(listening_addr("msg=\"starting\""), None);
    }

    #[tokio::test]
    async fn reads_chunked_and_length_bodies() {
        let mut input: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                                 3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nTrailer: x\r\n\r\n";
        let head = read_head(&mut input).await.unwrap().unwrap();
        assert_eq!(head.status().unwrap(), 200);
        let framing = head.response_framing("GET", 200).unwrap();
        assert_eq!(framing, Framing::Chunked);
        assert_eq!(read_body(&mut input, framing).await.unwrap(), b"abcde");

        let mut input: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc";
        let head = read_head(&mut input).await.unwrap().unwrap();
        let framing = head.response_framing("GET", 200).unwrap();
        assert_eq!(framing, Framing::Length(10));
        assert_eq!(read_body(&mut input, framing).await.unwrap(), b"abc");
        assert_eq!(head.response_framing("HEAD", 200).unwrap(), Framing::None);

        let mut empty: &[u8] = b"";
        assert!(read_head(&mut empty).await.unwrap().is_none());
    }
}
