//! A throwaway pod network for the network tests, made of the node's real
//! CNI plugins (Debian's `containernetworking-plugins`): a configuration
//! list of `bridge` (with `host-local` IPAM) and `portmap`, with its own
//! bridge name, its own /24 in 10.0.0.0/8 that nothing on the machine
//! routes yet, and its own IPAM state directory.
//!
//! Traffic to pods must never leave the machine: [`TestNetwork::check_route`]
//! asks the kernel (`ip route get`) how an address would be reached and
//! refuses anything that does not go out through this network's bridge;
//! [`TestNetwork::connect`] checks before every connection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

/// Where Debian (`/usr/lib/cni`) or the upstream tarball (`/opt/cni/bin`)
/// put the plugins.
pub const PLUGIN_DIRS: &[&str] = &["/usr/lib/cni", "/opt/cni/bin"];

/// The plugin directory holding `bridge`, if any.
pub fn plugin_dir() -> Option<PathBuf> {
    PLUGIN_DIRS
        .iter()
        .map(PathBuf::from)
        .find(|d| d.join("bridge").is_file() && d.join("host-local").is_file())
}

fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn random_u32() -> u32 {
    // Process id and clock: enough to keep parallel tests apart.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut x = nanos ^ std::process::id().rotate_left(16) ^ 0x9e37_79b9;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    x
}

/// Six hex digits to tell one test's interfaces apart from another's.
pub fn random_tag() -> String {
    format!("{:06x}", random_u32() & 0xff_ffff)
}

/// The first three octets of a /24 in 10.200.0.0–10.249.255.0 that nothing
/// on the machine routes or holds an address in, e.g. `10.213.7`. A
/// process-wide sequence from a random start: callers in one test run never
/// get the same /24, whatever runs in parallel.
pub fn free_prefix() -> Result<String, String> {
    let routes = ip(&["-4", "route", "show", "table", "all"])?;
    let addrs = ip(&["-4", "-o", "addr", "show"])?;
    static NEXT: std::sync::OnceLock<std::sync::atomic::AtomicU32> = std::sync::OnceLock::new();
    let next = NEXT.get_or_init(|| std::sync::atomic::AtomicU32::new(random_u32() % 12_800));
    (0..64)
        .map(|_| {
            let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 12_800;
            format!("10.{}.{}", 200 + n / 256, n % 256)
        })
        .find(|p| {
            let dotted = format!("{p}.");
            !routes.contains(&dotted) && !addrs.contains(&dotted)
        })
        .ok_or_else(|| "no free 10.x.y.0/24 found for a test network".to_owned())
}

/// A CNI configuration directory and the network it describes.
pub struct TestNetwork {
    dir: TempDir,
    /// The bridge's name (at most 15 characters).
    pub bridge: String,
    /// The CNI network's name.
    pub name: String,
    /// The first three octets of the /24, e.g. `10.213.7`.
    pub prefix: String,
    /// A plugin directory searched before the real ones (see
    /// [`TestNetwork::slow_down`]).
    slow_bin: Option<PathBuf>,
}

impl TestNetwork {
    /// Writes the configuration; the bridge itself appears with the first
    /// pod. Fails (with the reason) where this machine cannot run it: not
    /// root, or no plugins installed.
    pub fn create() -> Result<Self, String> {
        plugin_dir().ok_or_else(|| {
            format!(
                "no CNI plugins in {}: install containernetworking-plugins",
                PLUGIN_DIRS.join(" or ")
            )
        })?;
        let prefix = free_prefix()?;
        let tag = random_tag();
        let dir = tempfile::Builder::new()
            .prefix("wasmlet-cni-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let bridge = format!("wlt{tag}");
        let name = format!("wasmlet-test-{tag}");
        let conf = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": name,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": bridge,
                    "isGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": dir.path().join("ipam"),
                        "ranges": [[{"subnet": format!("{prefix}.0/24")}]],
                        "routes": [{"dst": format!("{prefix}.0/24")}]
                    }
                },
                {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}
            ]
        });
        let conf_dir = dir.path().join("net.d");
        std::fs::create_dir_all(&conf_dir).map_err(|e| e.to_string())?;
        std::fs::write(
            conf_dir.join("10-wasmlet-test.conflist"),
            serde_json::to_vec_pretty(&conf).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
        std::fs::create_dir_all(dir.path().join("netns")).map_err(|e| e.to_string())?;
        Ok(Self {
            dir,
            bridge,
            name,
            prefix,
            slow_bin: None,
        })
    }

    /// Makes every call of the `bridge` plugin (ADD, DEL, CHECK...) take
    /// `delay` longer, as a loaded node's plugins do: a `bridge` that
    /// sleeps, then runs the real one, first on the runtime's plugin path.
    pub fn slow_down(&mut self, delay: Duration) -> Result<(), String> {
        let real = plugin_dir()
            .ok_or("no CNI plugins installed")?
            .join("bridge");
        let bin = self.dir.path().join("slow-bin");
        std::fs::create_dir_all(&bin).map_err(|e| e.to_string())?;
        let script = format!(
            "#!/bin/sh\nsleep {:.3}\nexec {:?} \"$@\"\n",
            delay.as_secs_f64(),
            real
        );
        let path = bin.join("bridge");
        std::fs::write(&path, script).map_err(|e| e.to_string())?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| e.to_string())?;
        self.slow_bin = Some(bin);
        Ok(())
    }

    pub fn conf_dir(&self) -> PathBuf {
        self.dir.path().join("net.d")
    }

    /// Where the runtime under test should pin pod namespaces.
    pub fn netns_dir(&self) -> PathBuf {
        self.dir.path().join("netns")
    }

    /// The `[network]` section of a wasmlet config using this network.
    pub fn wasmlet_config(&self) -> String {
        let bins = self
            .slow_bin
            .iter()
            .map(|d| format!("{d:?}"))
            .chain(PLUGIN_DIRS.iter().map(|d| format!("{d:?}")))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "[network]\ncni_conf_dir = {:?}\ncni_bin_dirs = [{bins}]\nnetns_dir = {:?}\n",
            self.conf_dir(),
            self.netns_dir()
        )
    }

    /// The bridge's own address (the pods' gateway, local to the host).
    pub fn gateway(&self) -> String {
        format!("{}.1", self.prefix)
    }

    /// Whether `addr` is in this network's /24.
    pub fn contains(&self, addr: &str) -> bool {
        addr.strip_prefix(&format!("{}.", self.prefix))
            .and_then(|last| last.parse::<u8>().ok())
            .is_some()
    }

    /// Fails unless the kernel would send traffic for `addr` through this
    /// network's bridge (or it is the bridge's own, local address).
    pub fn check_route(&self, addr: &str) -> Result<(), String> {
        if !self.contains(addr) {
            return Err(format!(
                "{addr} is outside the test network {}.0/24",
                self.prefix
            ));
        }
        let route = ip(&["route", "get", addr])?;
        let via_bridge = route.contains(&format!(" dev {} ", self.bridge))
            || route.contains(&format!(" dev {}\n", self.bridge));
        let local = route.starts_with("local ");
        if via_bridge || local {
            Ok(())
        } else {
            Err(format!(
                "refusing to send to {addr}: the route does not use the test bridge {}: {}",
                self.bridge,
                route.trim()
            ))
        }
    }

    /// Connects to `addr:port` after [`check_route`](Self::check_route).
    pub fn connect(&self, addr: &str, port: u16, timeout: Duration) -> Result<TcpStream, String> {
        self.check_route(addr)?;
        let target: SocketAddr = format!("{addr}:{port}")
            .parse()
            .map_err(|e| format!("{addr}:{port}: {e}"))?;
        let stream = TcpStream::connect_timeout(&target, timeout)
            .map_err(|e| format!("connecting to {target}: {e}"))?;
        stream.set_read_timeout(Some(timeout)).ok();
        stream.set_write_timeout(Some(timeout)).ok();
        Ok(stream)
    }

    /// Reads what `addr:port` sends until it closes.
    pub fn read_all(&self, addr: &str, port: u16, timeout: Duration) -> Result<String, String> {
        let mut stream = self.connect(addr, port, timeout)?;
        let mut text = String::new();
        stream
            .read_to_string(&mut text)
            .map_err(|e| format!("reading from {addr}:{port}: {e}"))?;
        Ok(text)
    }

    /// Gives pods made from now on a route to `cidr` through the bridge
    /// (their gateway): for a range the host itself routes locally, such
    /// as a test cluster's Service addresses. The CNI configuration is read
    /// at every RunPodSandbox, as containerd reads it.
    pub fn add_route(&self, cidr: &str) -> Result<(), String> {
        let path = self.dir.path().join("net.d/10-wasmlet-test.conflist");
        let text = std::fs::read(&path).map_err(|e| e.to_string())?;
        let mut conf: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| e.to_string())?;
        let routes = conf["plugins"][0]["ipam"]["routes"]
            .as_array_mut()
            .ok_or("the test network's configuration has no routes")?;
        routes.push(serde_json::json!({"dst": cidr}));
        std::fs::write(
            &path,
            serde_json::to_vec_pretty(&conf).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())
    }

    /// `GET path` over HTTP/1.1 (one request, then close); the status and
    /// the body.
    pub fn http_get(
        &self,
        addr: &str,
        port: u16,
        path: &str,
        timeout: Duration,
    ) -> Result<(u16, String), String> {
        let mut stream = self.connect(addr, port, timeout)?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}:{port}\r\nConnection: close\r\n\r\n"
        )
        .map_err(|e| format!("sending to {addr}:{port}: {e}"))?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .map_err(|e| format!("reading from {addr}:{port}: {e}"))?;
        parse_response(&raw)
    }

    /// The addresses host-local holds for pods now.
    pub fn allocated_ips(&self) -> Vec<String> {
        let dir = self.dir.path().join("ipam").join(&self.name);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut ips: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| self.contains(n))
            .collect();
        ips.sort();
        ips
    }

    /// The interfaces attached to the bridge (one veth per pod).
    pub fn bridge_ports(&self) -> Vec<String> {
        ip(&["-o", "link", "show", "master", &self.bridge])
            .map(|out| {
                out.lines()
                    .filter_map(|l| l.split(':').nth(1))
                    .map(|n| n.trim().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The files pinned in the namespace directory.
    pub fn namespaces(&self) -> Vec<String> {
        list_dir(&self.netns_dir())
    }
}

fn list_dir(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A tiny authoritative DNS server for the tests' pods, on a UDP address of
/// the test's own (the bridge's): it answers A queries for the names it is
/// given, NXDOMAIN for everything else, and records who asked what.
pub struct DnsServer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    queries: std::sync::Arc<std::sync::Mutex<Vec<(SocketAddr, String)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DnsServer {
    /// Serves `records` (fully qualified names without the trailing dot)
    /// on `addr` port 53.
    pub fn start(
        addr: &str,
        records: std::collections::HashMap<String, std::net::Ipv4Addr>,
    ) -> Result<Self, String> {
        use hickory_proto::op::{Message, MessageType, ResponseCode};
        use hickory_proto::rr::{RData, Record, RecordType, rdata::A};

        let socket = std::net::UdpSocket::bind((addr, 53))
            .map_err(|e| format!("binding a DNS server on {addr}:53: {e}"))?;
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(|e| e.to_string())?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let queries = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (stop2, queries2) = (stop.clone(), queries.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let Some(q) = query.queries.first().cloned() else {
                    continue;
                };
                let name = q.name().to_ascii().trim_end_matches('.').to_owned();
                queries2.lock().unwrap().push((from, name.clone()));
                let mut reply = Message::new(
                    query.metadata.id,
                    MessageType::Response,
                    query.metadata.op_code,
                );
                reply.metadata.recursion_desired = query.metadata.recursion_desired;
                reply.add_query(q.clone());
                match records.get(&name) {
                    Some(ip) => {
                        if q.query_type() == RecordType::A {
                            reply.add_answer(Record::from_rdata(
                                q.name().clone(),
                                30,
                                RData::A(A(*ip)),
                            ));
                        }
                    }
                    None => reply.metadata.response_code = ResponseCode::NXDomain,
                }
                if let Ok(bytes) = reply.to_vec() {
                    let _ = socket.send_to(&bytes, from);
                }
            }
        });
        Ok(Self {
            stop,
            queries,
            thread: Some(thread),
        })
    }

    /// (who asked, the name asked), in order.
    pub fn queries(&self) -> Vec<(SocketAddr, String)> {
        self.queries.lock().unwrap().clone()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Status and body of an HTTP/1.1 response (plain or chunked body).
pub fn parse_response(raw: &[u8]) -> Result<(u16, String), String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not an HTTP response: {text:?}"))?;
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line in {head:?}"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Ok((status, body.to_owned()));
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16)
            .map_err(|e| format!("bad chunk size {size:?}: {e}"))?;
        if size == 0 {
            break;
        }
        let chunk = after
            .get(..size)
            .ok_or_else(|| format!("truncated chunk in {body:?}"))?;
        out.push_str(chunk);
        rest = after.get(size + 2..).unwrap_or("");
    }
    Ok((status, out))
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        // A runtime that was killed leaves its pods' namespaces pinned
        // here; unpinning ends them, and with them the pods' veths.
        if let Ok(entries) = std::fs::read_dir(self.netns_dir()) {
            for entry in entries.flatten() {
                let _ = nix::mount::umount2(&entry.path(), nix::mount::MntFlags::MNT_DETACH);
                let _ = std::fs::remove_file(entry.path());
            }
        }
        // The bridge is the test's.
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_plain_and_chunked() {
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").unwrap(),
            (200, "ok".to_owned())
        );
        assert_eq!(
            parse_response(
                b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
            )
            .unwrap(),
            (503, "abcde".to_owned())
        );
        assert!(parse_response(b"garbage").is_err());
    }
}
