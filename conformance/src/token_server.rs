//! A Docker/OCI token server on loopback, for registries that authorize with
//! bearer tokens as Docker Hub, GHCR and Harbor do.
//!
//! The flow it serves: a client's `GET /v2/...` is answered 401 with
//! `WWW-Authenticate: Bearer realm="<realm>",service="<service>",scope="..."`;
//! the client asks `GET <realm>?service=...&scope=...` (with basic auth when
//! it has credentials) and gets `{"token": "<JWT>"}`; it retries with
//! `Authorization: Bearer <JWT>`, and the registry checks the token's
//! signature, issuer, audience, lifetime and granted access.
//!
//! [`TokenServer`] issues the JWTs distribution's `registry:2` accepts: RS256,
//! signed with a throwaway RSA key through the `openssl` CLI, the key's
//! self-signed certificate in the `x5c` header, which the registry verifies
//! against `auth.token.rootcertbundle`
//! ([`Registry::start_token`](crate::registry::Registry::start_token) writes
//! that config). What is granted follows [`TokenOptions`], and every request
//! is recorded ([`TokenServer::requests`]) so tests can see the flow happen.
//!
//! It listens on `127.0.0.1` only and bounds every connection.

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::registry::{
    self, HTTP_TIMEOUT, Head, OPENSSL_BINARY, OPENSSL_TIMEOUT, base64, openssl, read_body,
    read_head, write_file,
};

/// The service registries name in their challenges, and the audience of the
/// tokens issued.
pub const SERVICE: &str = "wasmlet-test-registry";

/// The issuer of the tokens, which registries are configured to trust.
pub const ISSUER: &str = "wasmlet-test-issuer";

/// The path tokens are asked for at.
pub const TOKEN_PATH: &str = "/token";

/// How long an issued token is valid.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(300);

/// How far back a token's `nbf` is set, for clocks a little apart.
const NOT_BEFORE_SLACK: Duration = Duration::from_secs(10);

/// The `openssl` config the signing certificate is made with. Passed
/// explicitly so that the system's `openssl.cnf` adds nothing.
const OPENSSL_CONFIG: &str = "\
[req]
distinguished_name = subject
prompt = no

[subject]
CN = wasmlet-test-issuer

[signer]
basicConstraints = critical, CA:TRUE
keyUsage = critical, digitalSignature, keyCertSign
subjectKeyIdentifier = hash
";

/// How the signing files are made, one `openssl` command line per step, in
/// the server's directory: an RSA key with its self-signed certificate
/// (valid two days), and the certificate in DER for the `x5c` header.
const OPENSSL_STEPS: [(&str, &str); 2] = [
    (
        "make the token signing key and certificate",
        "req -x509 -config openssl.cnf -extensions signer -days 2 \
         -newkey rsa:2048 -nodes -keyout signer.key -out signer.pem",
    ),
    (
        "convert the signing certificate to DER",
        "x509 -in signer.pem -outform DER -out signer.der",
    ),
];

/// What can go wrong while starting a [`TokenServer`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The signing key or certificate could not be made or read.
    #[error(transparent)]
    Files(#[from] registry::Error),

    /// No loopback port could be listened on.
    #[error("could not listen on 127.0.0.1")]
    Listen(#[source] io::Error),
}

/// Who gets which access.
#[derive(Debug, Clone, Default)]
pub struct TokenOptions {
    /// Grant `pull` on every repository to requests without credentials.
    /// Otherwise they get a token granting nothing, as Docker Hub answers
    /// for a private repository.
    pub anonymous_pull: bool,
    /// The users and passwords accepted as basic auth on a token request;
    /// they get `pull` and `push` on every repository. Any other
    /// credentials are answered 401.
    pub users: Vec<(String, String)>,
    /// Refresh tokens (Docker's "identity tokens") and the user each
    /// stands for, accepted by `POST <realm>` with
    /// `grant_type=refresh_token` (the OAuth2 flow).
    pub refresh_tokens: Vec<(String, String)>,
}

/// One token request as the server saw and answered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// The user named by the request's basic auth; `None` when it had none.
    pub user: Option<String>,
    /// The `service` parameter, if any.
    pub service: Option<String>,
    /// The `scope` parameters, e.g. `repository:a/b:pull,push`.
    pub scopes: Vec<String>,
    /// The status answered: 200 with a token, 401 for wrong credentials,
    /// 400 for a bad request, 500 if signing failed.
    pub status: u16,
    /// What the token granted, as `repository:NAME:ACTIONS` (`ACTIONS` may
    /// be empty); empty when no token was issued.
    pub granted: Vec<String>,
}

/// A running token server on `127.0.0.1`, stopped when dropped.
#[derive(Debug)]
pub struct TokenServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
    // Dropped last: holds the signing key and certificate.
    dir: tempfile::TempDir,
}

/// What the serving tasks share with the [`TokenServer`].
#[derive(Debug)]
struct Shared {
    options: TokenOptions,
    /// The RSA private key (PEM) tokens are signed with.
    key: PathBuf,
    /// Standard base64 of the signing certificate's DER, the `x5c` entry.
    x5c: String,
    requests: Mutex<Vec<TokenRequest>>,
    next_id: AtomicU64,
}

impl TokenServer {
    /// Makes a signing key and certificate with the `openssl` CLI, then
    /// serves tokens on a free loopback port. It is ready when this returns.
    pub async fn start(options: TokenOptions) -> Result<TokenServer, Error> {
        let dir = tempfile::Builder::new()
            .prefix("wasmlet-tokens-")
            .tempdir()
            .map_err(|source| registry::Error::Io {
                action: "create a temporary directory in",
                path: std::env::temp_dir(),
                source,
            })?;
        let root = dir.path();
        write_file(&root.join("openssl.cnf"), OPENSSL_CONFIG.as_bytes())?;
        for (step, command_line) in OPENSSL_STEPS {
            let args: Vec<&str> = command_line.split_whitespace().collect();
            openssl(root, step, &args).await?;
        }
        let der_path = root.join("signer.der");
        let der = std::fs::read(&der_path).map_err(|source| registry::Error::Io {
            action: "read",
            path: der_path,
            source,
        })?;

        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .map_err(Error::Listen)?;
        let addr = listener.local_addr().map_err(Error::Listen)?;
        let shared = Arc::new(Shared {
            options,
            key: root.join("signer.key"),
            x5c: base64(&der),
            requests: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
        });
        let task = tokio::spawn(serve(listener, Arc::clone(&shared)));
        Ok(TokenServer {
            addr,
            shared,
            task,
            dir,
        })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/token`, the realm registries send clients to.
    pub fn realm(&self) -> String {
        format!("http://{}{TOKEN_PATH}", self.addr)
    }

    /// The PEM certificate whose key signs the tokens: the root registries
    /// must trust.
    pub fn certificate_path(&self) -> PathBuf {
        self.dir.path().join("signer.pem")
    }

    /// The directory holding the signing key and certificate.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Every token request so far, oldest first.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.shared.requests().clone()
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Shared {
    fn requests(&self) -> std::sync::MutexGuard<'_, Vec<TokenRequest>> {
        // A panicking test thread cannot leave the log half-written.
        self.requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Answers one request: the status, extra headers and a JSON body.
    async fn answer(&self, head: &Head, body: &[u8]) -> Answer {
        let mut parts = head.start_line.split(' ');
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        if path != TOKEN_PATH {
            return Answer::error(404, "NOT_FOUND", &format!("no {path} here"));
        }
        // OAuth2: the parameters come as a form body.
        let form = match method {
            "GET" => query.to_owned(),
            "POST" => String::from_utf8_lossy(body).into_owned(),
            _ => return Answer::error(405, "UNSUPPORTED", &format!("{method} {path}")),
        };
        let mut service = None;
        let mut scopes = Vec::new();
        let mut grant_type = None;
        let mut refresh_token = None;
        for pair in form.split('&').filter(|pair| !pair.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match (percent_decode(name).as_deref(), percent_decode(value)) {
                (Some("service"), Some(value)) => service = Some(value),
                (Some("grant_type"), Some(value)) => grant_type = Some(value),
                (Some("refresh_token"), Some(value)) => refresh_token = Some(value),
                // One parameter may carry several scopes, space-separated.
                (Some("scope"), Some(value)) => {
                    scopes.extend(
                        value
                            .split(' ')
                            .filter(|s| !s.is_empty())
                            .map(str::to_owned),
                    );
                }
                _ => {}
            }
        }
        let mut request = TokenRequest {
            user: None,
            service: service.clone(),
            scopes: scopes.clone(),
            status: 200,
            granted: Vec::new(),
        };
        let answer = if method == "POST" {
            match (grant_type.as_deref(), refresh_token) {
                (Some("refresh_token"), Some(token)) => {
                    match self
                        .options
                        .refresh_tokens
                        .iter()
                        .find(|(t, _)| *t == token)
                    {
                        Some((_, user)) => {
                            request.user = Some(user.clone());
                            self.grant_to(Some(user.clone()), &mut request).await
                        }
                        None => Answer::unauthorized("invalid refresh token"),
                    }
                }
                _ => Answer::error(
                    400,
                    "UNSUPPORTED",
                    "only grant_type=refresh_token is served",
                ),
            }
        } else {
            self.grant(head, &mut request).await
        };
        request.status = answer.status;
        self.requests().push(request);
        answer
    }

    /// Checks the request's credentials and service, then issues a token
    /// for what the policy allows of its scopes, noting it in `request`.
    async fn grant(&self, head: &Head, request: &mut TokenRequest) -> Answer {
        let credentials = match head.header("Authorization") {
            None => None,
            Some(value) => match basic_credentials(value) {
                Some(credentials) => Some(credentials),
                None => {
                    return Answer::unauthorized("only basic auth is accepted here");
                }
            },
        };
        if let Some((user, password)) = &credentials {
            request.user = Some(user.clone());
            let known = self
                .options
                .users
                .iter()
                .any(|(u, p)| u == user && p == password);
            if !known {
                return Answer::unauthorized("incorrect username or password");
            }
        }
        self.grant_to(credentials.map(|(user, _)| user), request)
            .await
    }

    /// Issues a token for what the policy allows `user` (or anonymous) of
    /// the request's scopes.
    async fn grant_to(&self, user: Option<String>, request: &mut TokenRequest) -> Answer {
        match request.service.as_deref() {
            Some(SERVICE) => {}
            other => {
                return Answer::error(
                    400,
                    "INVALID_REQUEST",
                    &format!("service {other:?} is not {SERVICE:?}"),
                );
            }
        }
        let allowed: &[&str] = match (&user, self.options.anonymous_pull) {
            (Some(_), _) => &["pull", "push"],
            (None, true) => &["pull"],
            (None, false) => &[],
        };
        let mut access = Vec::new();
        for scope in &request.scopes {
            let Some((kind, name, actions)) = parse_scope(scope) else {
                return Answer::error(400, "INVALID_REQUEST", &format!("bad scope {scope:?}"));
            };
            let granted: Vec<&str> = actions
                .split(',')
                .filter(|action| kind == "repository" && allowed.contains(action))
                .collect();
            request
                .granted
                .push(format!("{kind}:{name}:{}", granted.join(",")));
            access.push(serde_json::json!({ "type": kind, "name": name, "actions": granted }));
        }
        match self.token(request.user.as_deref(), access).await {
            Ok(token) => {
                let body = serde_json::json!({
                    "token": token,
                    "access_token": token,
                    "expires_in": TOKEN_LIFETIME.as_secs(),
                });
                Answer::json(200, body)
            }
            Err(error) => {
                request.granted.clear();
                Answer::error(500, "UNKNOWN", &error_chain(&error))
            }
        }
    }

    /// A signed JWT for `user` granting `access`.
    async fn token(
        &self,
        user: Option<&str>,
        access: Vec<serde_json::Value>,
    ) -> Result<String, registry::Error> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let header = serde_json::json!({ "typ": "JWT", "alg": "RS256", "x5c": [self.x5c] });
        let claims = serde_json::json!({
            "iss": ISSUER,
            "sub": user.unwrap_or(""),
            "aud": SERVICE,
            "exp": (now + TOKEN_LIFETIME).as_secs(),
            "nbf": now.saturating_sub(NOT_BEFORE_SLACK).as_secs(),
            "iat": now.as_secs(),
            "jti": format!("{}-{id}-{}", std::process::id(), now.as_nanos()),
            "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            base64url(header.to_string().as_bytes()),
            base64url(claims.to_string().as_bytes())
        );
        let signature = sign(&self.key, signing_input.as_bytes()).await?;
        Ok(format!("{signing_input}.{}", base64url(&signature)))
    }
}

/// A response to write.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: serde_json::Value,
}

impl Answer {
    fn json(status: u16, body: serde_json::Value) -> Answer {
        Answer {
            status,
            headers: Vec::new(),
            body,
        }
    }

    /// A distribution-style error envelope.
    fn error(status: u16, code: &str, message: &str) -> Answer {
        Answer::json(
            status,
            serde_json::json!({ "errors": [{ "code": code, "message": message }] }),
        )
    }

    /// 401 asking for basic auth.
    fn unauthorized(message: &str) -> Answer {
        let mut answer = Answer::error(401, "UNAUTHORIZED", message);
        answer
            .headers
            .push(("WWW-Authenticate", format!("Basic realm=\"{ISSUER}\"")));
        answer
    }

    fn to_bytes(&self) -> Vec<u8> {
        let body = self.body.to_string();
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            404 => "Not Found",
            405 => "Method Not Allowed",
            _ => "Internal Server Error",
        };
        let mut head = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n",
            self.status,
            body.len()
        );
        for (name, value) in &self.headers {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body.as_bytes());
        bytes
    }
}

/// Accepts connections until the server is dropped, each served on a task
/// of its own.
async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    // A client that stalls or goes away only loses its answer.
                    let _ = tokio::time::timeout(HTTP_TIMEOUT, serve_one(stream, &shared)).await;
                });
            }
            // Out of descriptors, say: let some close before trying again.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Reads one request, answers it and closes the connection.
async fn serve_one(stream: TcpStream, shared: &Shared) -> io::Result<()> {
    let mut reader = BufReader::new(stream);
    let Some(head) = read_head(&mut reader).await? else {
        return Ok(());
    };
    let body = read_body(&mut reader, head.request_framing()?).await?;
    let answer = shared.answer(&head, &body).await;
    let mut stream = reader.into_inner();
    stream.write_all(&answer.to_bytes()).await?;
    stream.shutdown().await
}

/// Signs `input` with RS256 (RSASSA-PKCS1-v1_5 over SHA-256):
/// `openssl dgst -sha256 -sign KEY`, at most [`OPENSSL_TIMEOUT`].
async fn sign(key: &Path, input: &[u8]) -> Result<Vec<u8>, registry::Error> {
    const STEP: &str = "sign a token";
    let spawn_error = |source: io::Error| match source.kind() {
        io::ErrorKind::NotFound => registry::Error::NotInstalled {
            program: OPENSSL_BINARY,
        },
        _ => registry::Error::Spawn {
            program: OPENSSL_BINARY,
            source,
        },
    };
    let mut child = tokio::process::Command::new(OPENSSL_BINARY)
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(spawn_error)?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let exchange = async {
        // The input is far smaller than a pipe's buffer, so writing all of it
        // before reading the output cannot deadlock.
        stdin.write_all(input).await?;
        drop(stdin);
        child.wait_with_output().await
    };
    let output = tokio::time::timeout(OPENSSL_TIMEOUT, exchange)
        .await
        .map_err(|_| registry::Error::OpensslTimeout {
            step: STEP,
            timeout: OPENSSL_TIMEOUT,
        })?
        .map_err(spawn_error)?;
    if !output.status.success() || output.stdout.is_empty() {
        return Err(registry::Error::Openssl {
            step: STEP,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(output.stdout)
}

/// Unpadded base64url, as JWTs use.
fn base64url(bytes: &[u8]) -> String {
    base64(bytes)
        .trim_end_matches('=')
        .chars()
        .map(|c| match c {
            '+' => '-',
            '/' => '_',
            c => c,
        })
        .collect()
}

/// The user and password of an `Authorization: Basic` value.
fn basic_credentials(value: &str) -> Option<(String, String)> {
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(decode_base64(encoded.trim())?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// Decodes standard base64, padded or not; `None` if it is not base64.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut buffer, mut bits) = (0u32, 0);
    for c in text.trim_end_matches('=').bytes() {
        let value = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        buffer = (buffer << 6) | u32::from(value);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
        }
    }
    Some(out)
}

/// Decodes a query component (`%XX` and `+` for a space); `None` if it is
/// malformed or not UTF-8.
pub(crate) fn percent_decode(text: &str) -> Option<String> {
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

/// `TYPE:NAME:ACTIONS` split in three. A name may hold a `:` (a registry
/// host with a port), so the actions are what follows the last one.
fn parse_scope(scope: &str) -> Option<(&str, &str, &str)> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    (!kind.is_empty() && !name.is_empty()).then_some((kind, name, actions))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_url_form_has_no_padding() {
        for input in ["", "f", "fo", "foo", "user:p@ss:word", "\u{fb}\u{ff}"] {
            assert_eq!(
                decode_base64(&base64(input.as_bytes())).as_deref(),
                Some(input.as_bytes())
            );
        }
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
        assert_eq!(decode_base64("a b"), None);
    }

    #[test]
    fn basic_credentials_split_at_the_first_colon() {
        let value = format!("Basic {}", base64(b"user:pa:ss"));
        assert_eq!(
            basic_credentials(&value),
            Some(("user".to_owned(), "pa:ss".to_owned()))
        );
        assert_eq!(basic_credentials("Bearer abc"), None);
    }

    #[test]
    fn query_components_are_percent_decoded() {
        assert_eq!(
            percent_decode("repository%3Aconformance%2Fecho%3Apull%2Cpush").as_deref(),
            Some("repository:conformance/echo:pull,push")
        );
        assert_eq!(percent_decode("a+b").as_deref(), Some("a b"));
        assert_eq!(percent_decode("%4"), None);
    }

    #[test]
    fn scopes_keep_colons_in_names() {
        assert_eq!(
            parse_scope("repository:a/b:pull,push"),
            Some(("repository", "a/b", "pull,push"))
        );
        assert_eq!(
            parse_scope("repository:127.0.0.1:5000/a:pull"),
            Some(("repository", "127.0.0.1:5000/a", "pull"))
        );
        assert_eq!(parse_scope("registry:catalog:*").unwrap().2, "*");
        assert_eq!(parse_scope("pull"), None);
    }
}
