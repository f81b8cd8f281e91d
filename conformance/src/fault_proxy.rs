//! A fault-injecting HTTP/1.1 proxy to put in front of a [`Registry`], so tests
//! can see how a puller copes with truncated, corrupted, refused, reset and slow
//! answers.
//!
//! The proxy reads each request from its client, sends it upstream on a fresh
//! connection with `Connection: close`, reads the whole answer and, unless an
//! armed [`Fault`] says otherwise, returns it unchanged but for its framing
//! (always `Content-Length`) and any `Location` naming the upstream, which is
//! made to name the proxy so uploads keep going through it. It listens on
//! `127.0.0.1` only, speaks plain TCP, and all its tasks end when it is dropped.
//!
//! [`Registry`]: crate::registry::Registry

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::registry::{Framing, Head, read_body, read_head};

/// How long the proxy waits for the upstream to answer one request.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);

/// What an armed fault does to a matching request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Announce the full `Content-Length` but send only the first half of the
    /// body, then close the connection.
    Truncate,
    /// Flip every bit of the byte in the middle of the body; the length is
    /// unchanged.
    CorruptBody,
    /// Answer this status with a distribution-style JSON error body, without
    /// asking the upstream. A 401 carries a basic-auth challenge.
    Status(u16),
    /// Close the client connection with a TCP reset, without answering.
    Reset,
    /// Wait this long, then forward the request as usual.
    Delay(Duration),
}

/// Which requests a fault applies to, or which requests to count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathMatch {
    /// Every request.
    Any,
    /// Blob fetches: paths containing `/blobs/sha256:` (not uploads).
    Blobs,
    /// Paths containing `/manifests/`.
    Manifests,
}

impl PathMatch {
    /// Whether a request for `target` (path and query) matches.
    pub fn matches(self, target: &str) -> bool {
        let path = target.split('?').next().unwrap_or_default();
        match self {
            PathMatch::Any => true,
            PathMatch::Blobs => path.contains("/blobs/sha256:"),
            PathMatch::Manifests => path.contains("/manifests/"),
        }
    }
}

/// A running proxy; its listener and connections close when it is dropped.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_loop: JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    addr: SocketAddr,
    faults: Mutex<Vec<Armed>>,
    /// Requests seen, indexed like [`count_slot`].
    counts: [AtomicUsize; 3],
    log: Mutex<Vec<String>>,
}

#[derive(Debug)]
struct Armed {
    fault: Fault,
    matching: PathMatch,
    /// `None`: forever.
    remaining: Option<u32>,
}

fn count_slot(matching: PathMatch) -> usize {
    match matching {
        PathMatch::Any => 0,
        PathMatch::Blobs => 1,
        PathMatch::Manifests => 2,
    }
}

impl FaultProxy {
    /// Listens on a free port of `127.0.0.1` and forwards to `upstream`, which
    /// must be a loopback address.
    pub async fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        if !upstream.ip().is_loopback() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("upstream {upstream} is not a loopback address"),
            ));
        }
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            addr,
            faults: Mutex::new(Vec::new()),
            counts: Default::default(),
            log: Mutex::new(Vec::new()),
        });
        let serving = Arc::clone(&shared);
        let accept_loop = tokio::spawn(crate::registry::accept_loop(listener, move |stream| {
            serve_connection(stream, Arc::clone(&serving))
        }));
        Ok(FaultProxy {
            addr,
            shared,
            accept_loop,
        })
    }

    /// `127.0.0.1:PORT`, the host an image reference through the proxy names.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The address the proxy listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Arms `fault` for requests `matching`, for the next `times` of them
    /// (`None`: until [`clear`](Self::clear)), in addition to faults already
    /// armed. A request gets the earliest armed fault that matches it, and only
    /// that one.
    pub fn set_fault(&self, fault: Fault, matching: PathMatch, times: Option<u32>) {
        if times == Some(0) {
            return;
        }
        self.shared.faults().push(Armed {
            fault,
            matching,
            remaining: times,
        });
    }

    /// Disarms every fault; requests are forwarded unchanged from now on.
    pub fn clear(&self) {
        self.shared.faults().clear();
    }

    /// How many requests of that kind the proxy has received, faulted or not.
    pub fn requests(&self, matching: PathMatch) -> usize {
        self.shared.counts[count_slot(matching)].load(Ordering::SeqCst)
    }

    /// One line per request received so far (`GET /v2/... -> 200`, with the
    /// fault applied if any), for assertion messages.
    pub fn log(&self) -> Vec<String> {
        self.shared.log_lines().clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The accept loop owns the connection tasks: aborting it drops its
        // JoinSet, which aborts them.
        self.accept_loop.abort();
    }
}

impl Shared {
    fn faults(&self) -> MutexGuard<'_, Vec<Armed>> {
        self.faults
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn log_lines(&self) -> MutexGuard<'_, Vec<String>> {
        self.log
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts a request for `target` and takes one use of the fault it gets.
    fn admit(&self, target: &str) -> Option<Fault> {
        for matching in [PathMatch::Any, PathMatch::Blobs, PathMatch::Manifests] {
            if matching.matches(target) {
                self.counts[count_slot(matching)].fetch_add(1, Ordering::SeqCst);
            }
        }
        let mut faults = self.faults();
        let index = faults
            .iter()
            .position(|armed| armed.matching.matches(target))?;
        let armed = &mut faults[index];
        let fault = armed.fault;
        if let Some(remaining) = &mut armed.remaining {
            *remaining -= 1;
            if *remaining == 0 {
                faults.remove(index);
            }
        }
        Some(fault)
    }
}

/// Serves one client connection, request after request, until either side
/// closes or a fault ends it. Errors just close the connection: the client
/// sees them as such.
async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    let mut client = BufReader::new(stream);
    loop {
        let Ok(Some(head)) = read_head(&mut client).await else {
            return;
        };
        let mut parts = head.start_line.split(' ');
        let (Some(method), Some(target), Some(version)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return;
        };
        let (method, target) = (method.to_owned(), target.to_owned());
        let keep_alive = version == "HTTP/1.1"
            && !head
                .header("Connection")
                .is_some_and(|value| value.eq_ignore_ascii_case("close"));

        if head
            .header("Expect")
            .is_some_and(|value| value.eq_ignore_ascii_case("100-continue"))
            && client
                .get_mut()
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .is_err()
        {
            return;
        }
        let Ok(framing) = head.request_framing() else {
            return;
        };
        let Ok(body) = read_body(&mut client, framing).await else {
            return;
        };
        if let Framing::Length(length) = framing
            && (body.len() as u64) < length
        {
            return;
        }

        let fault = shared.admit(&target);
        let mut log_line = format!("{method} {target}");
        let outcome = match fault {
            Some(Fault::Reset) => {
                log_line.push_str(" -> reset");
                shared.log_lines().push(log_line);
                let _ = client.get_ref().set_zero_linger();
                return;
            }
            Some(Fault::Status(status)) => {
                let _ = write!(log_line, " -> {status} (injected)");
                shared.log_lines().push(log_line);
                let response = injected_response(status, &method, &target);
                if client.get_mut().write_all(&response).await.is_err() {
                    return;
                }
                if !keep_alive {
                    return;
                }
                continue;
            }
            Some(Fault::Delay(delay)) => {
                tokio::time::sleep(delay).await;
                forward(&shared, &method, &target, &head, body).await
            }
            _ => forward(&shared, &method, &target, &head, body).await,
        };
        let upstream = match outcome {
            Ok(upstream) => upstream,
            Err(error) => {
                let _ = write!(log_line, " -> 502 ({error})");
                shared.log_lines().push(log_line);
                let body = format!("upstream {}: {error}\n", shared.upstream);
                let response = format!(
                    "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = client.get_mut().write_all(response.as_bytes()).await;
                return;
            }
        };
        let _ = write!(log_line, " -> {}", upstream.status);
        if let Some(fault) = fault {
            let _ = write!(log_line, " ({fault:?})");
        }
        shared.log_lines().push(log_line);

        let mut body = upstream.body;
        let mut send_len = body.len();
        let close = match fault {
            Some(Fault::Truncate) => {
                send_len = body.len() / 2;
                true
            }
            Some(Fault::CorruptBody) => {
                let middle = body.len() / 2;
                if let Some(byte) = body.get_mut(middle) {
                    *byte ^= 0xff;
                }
                !keep_alive
            }
            _ => !keep_alive,
        };
        let head = client_head(
            &shared,
            &upstream.head,
            upstream.has_body,
            body.len(),
            close,
        );
        let written = async {
            let stream = client.get_mut();
            stream.write_all(head.as_bytes()).await?;
            stream.write_all(&body[..send_len]).await?;
            stream.flush().await
        };
        if written.await.is_err() || close {
            let _ = client.get_mut().shutdown().await;
            return;
        }
    }
}

/// A complete answer from the upstream.
struct Upstream {
    head: Head,
    status: u16,
    /// Whether the answer has a body (even an empty one) whose length the
    /// proxy sets; false for answers to `HEAD` and for 1xx, 204 and 304.
    has_body: bool,
    body: Vec<u8>,
}

/// Headers that describe one connection, not the message.
const HOP_BY_HOP: &[&str] = &[
    "Connection",
    "Keep-Alive",
    "Proxy-Connection",
    "Transfer-Encoding",
    "TE",
    "Upgrade",
    "Expect",
];

fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// Sends the request upstream on a fresh connection and reads the whole answer.
async fn forward(
    shared: &Shared,
    method: &str,
    target: &str,
    head: &Head,
    body: Vec<u8>,
) -> io::Result<Upstream> {
    let exchange = async {
        let mut upstream = TcpStream::connect(shared.upstream).await?;
        let mut request = format!("{method} {target} HTTP/1.1\r\n");
        for (name, value) in &head.headers {
            if !is_hop_by_hop(name) && !name.eq_ignore_ascii_case("Content-Length") {
                let _ = write!(request, "{name}: {value}\r\n");
            }
        }
        let _ = write!(request, "Connection: close\r\n");
        if !body.is_empty()
            || head.header("Content-Length").is_some()
            || head.header("Transfer-Encoding").is_some()
        {
            let _ = write!(request, "Content-Length: {}\r\n", body.len());
        }
        request.push_str("\r\n");
        upstream.write_all(request.as_bytes()).await?;
        upstream.write_all(&body).await?;
        upstream.flush().await?;

        let mut reader = BufReader::new(upstream);
        let head = read_head(&mut reader).await?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "upstream closed without answering",
            )
        })?;
        let status = head.status()?;
        let framing = head.response_framing(method, status)?;
        let body = read_body(&mut reader, framing).await?;
        if let Framing::Length(length) = framing
            && (body.len() as u64) < length
        {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("upstream body ended after {} of {length} bytes", body.len()),
            ));
        }
        Ok(Upstream {
            head,
            status,
            has_body: framing != Framing::None,
            body,
        })
    };
    tokio::time::timeout(UPSTREAM_TIMEOUT, exchange)
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {UPSTREAM_TIMEOUT:?}"),
            )
        })?
}

/// The head sent to the client for an upstream answer: hop-by-hop headers
/// dropped, `Content-Length` set to the (unchanged) body length, `Location`
/// pointed at the proxy.
fn client_head(
    shared: &Shared,
    upstream: &Head,
    has_body: bool,
    body_len: usize,
    close: bool,
) -> String {
    let mut head = format!("{}\r\n", upstream.start_line);
    for (name, value) in &upstream.headers {
        if is_hop_by_hop(name) || (has_body && name.eq_ignore_ascii_case("Content-Length")) {
            continue;
        }
        if name.eq_ignore_ascii_case("Location") {
            let value = rewrite_location(value, shared.upstream, shared.addr);
            let _ = write!(head, "{name}: {value}\r\n");
        } else {
            let _ = write!(head, "{name}: {value}\r\n");
        }
    }
    if has_body {
        let _ = write!(head, "Content-Length: {body_len}\r\n");
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    head
}

/// `location` with an absolute URL naming `upstream` made to name `proxy`.
fn rewrite_location(location: &str, upstream: SocketAddr, proxy: SocketAddr) -> String {
    for scheme in ["http://", "https://"] {
        if let Some(rest) = location.strip_prefix(scheme) {
            let authority_end = rest.find('/').unwrap_or(rest.len());
            let (authority, path) = rest.split_at(authority_end);
            if authority == upstream.to_string()
                || authority == format!("localhost:{}", upstream.port())
            {
                return format!("http://{proxy}{path}");
            }
        }
    }
    location.to_owned()
}

/// A complete answer with `status` and a distribution-spec error body.
fn injected_response(status: u16, method: &str, target: &str) -> Vec<u8> {
    let path = target.split('?').next().unwrap_or_default();
    let code = match status {
        401 => "UNAUTHORIZED",
        403 => "DENIED",
        404 if path.contains("/manifests/") => "MANIFEST_UNKNOWN",
        404 if path.contains("/blobs/") => "BLOB_UNKNOWN",
        404 => "NAME_UNKNOWN",
        429 => "TOOMANYREQUESTS",
        _ => "UNKNOWN",
    };
    let body = serde_json::json!({
        "errors": [{ "code": code, "message": "injected by the conformance fault proxy" }],
    })
    .to_string();
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json; charset=utf-8\r\n\
         Docker-Distribution-Api-Version: registry/2.0\r\n",
        reason_phrase(status)
    );
    if status == 401 {
        head.push_str("WWW-Authenticate: Basic realm=\"fault-proxy\"\r\n");
    }
    let with_body = method != "HEAD" && status != 204 && status != 304;
    let _ = write!(head, "Content-Length: {}\r\n\r\n", body.len());
    let mut response = head.into_bytes();
    if with_body {
        response.extend_from_slice(body.as_bytes());
    }
    response
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Injected",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_match_tells_blob_fetches_from_uploads_and_manifests() {
        let blob = "/v2/a/b/blobs/sha256:0123";
        let upload = "/v2/a/b/blobs/uploads/u?digest=sha256:0123";
        let manifest = "/v2/a/b/manifests/v1";
        assert!(PathMatch::Blobs.matches(blob));
        assert!(!PathMatch::Blobs.matches(upload));
        assert!(!PathMatch::Blobs.matches(manifest));
        assert!(PathMatch::Manifests.matches(manifest));
        assert!(!PathMatch::Manifests.matches(blob));
        assert!(
            [blob, upload, manifest, "/v2/"]
                .iter()
                .all(|t| PathMatch::Any.matches(t))
        );
    }

    #[test]
    fn rewrite_location_points_upstream_urls_at_the_proxy() {
        let upstream: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let proxy: SocketAddr = "127.0.0.1:6000".parse().unwrap();
        assert_eq!(
            rewrite_location(
                "http://127.0.0.1:5000/v2/a/blobs/uploads/u?_state=x",
                upstream,
                proxy
            ),
            "http://127.0.0.1:6000/v2/a/blobs/uploads/u?_state=x"
        );
        assert_eq!(
            rewrite_location("/v2/a/blobs/uploads/u", upstream, proxy),
            "/v2/a/blobs/uploads/u"
        );
        assert_eq!(
            rewrite_location("http://127.0.0.1:6000/v2/", upstream, proxy),
            "http://127.0.0.1:6000/v2/"
        );
    }

    #[test]
    fn a_fault_armed_for_some_times_is_used_up() {
        let shared = Shared {
            upstream: "127.0.0.1:1".parse().unwrap(),
            addr: "127.0.0.1:2".parse().unwrap(),
            faults: Mutex::new(vec![Armed {
                fault: Fault::Status(503),
                matching: PathMatch::Manifests,
                remaining: Some(2),
            }]),
            counts: Default::default(),
            log: Mutex::new(Vec::new()),
        };
        assert_eq!(shared.admit("/v2/a/blobs/sha256:00"), None);
        assert_eq!(shared.admit("/v2/a/manifests/v1"), Some(Fault::Status(503)));
        assert_eq!(shared.admit("/v2/a/manifests/v1"), Some(Fault::Status(503)));
        assert_eq!(shared.admit("/v2/a/manifests/v1"), None);
        assert_eq!(
            shared.counts[count_slot(PathMatch::Any)].load(Ordering::SeqCst),
            4
        );
        assert_eq!(
            shared.counts[count_slot(PathMatch::Manifests)].load(Ordering::SeqCst),
            3
        );
        assert_eq!(
            shared.counts[count_slot(PathMatch::Blobs)].load(Ordering::SeqCst),
            1
        );
    }

    #[test]
    fn injected_errors_are_complete_json_answers() {
        let response =
            String::from_utf8(injected_response(401, "GET", "/v2/a/manifests/v1")).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{head}");
        assert!(head.contains("WWW-Authenticate: Basic"), "{head}");
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["errors"][0]["code"], "UNAUTHORIZED");
    }
}
