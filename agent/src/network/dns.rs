//! Name lookup for guests, done the way a pod's own stub resolver would do
//! it: with the DNS settings the kubelet gives the sandbox (name servers,
//! search domains, `ndots`, `timeout`, `attempts`), over UDP sockets
//! created inside the pod's network namespace, so that queries leave from
//! the pod's address and reach only what the pod can reach.
//!
//! wasmtime-wasi's own `ip-name-lookup` would ask the agent's resolver
//! (the host's `/etc/resolv.conf`, from the host's namespace); the engine
//! links [`Lookup`] in its place.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

use super::GuestNetwork;
use crate::model::network::DnsSettings;

/// The addresses `name` has in a hosts file's `text` (`IP NAME ALIAS...`
/// lines, `#` comments), in the file's order; names compare without case.
fn hosts_lookup(text: &str, name: &str) -> Vec<IpAddr> {
    let name = name.trim_end_matches('.');
    text.lines()
        .map(|line| line.split('#').next().unwrap_or(""))
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let ip = fields.next()?.parse::<IpAddr>().ok()?;
            fields
                .any(|n| n.trim_end_matches('.').eq_ignore_ascii_case(name))
                .then_some(ip)
        })
        .collect()
}

impl DnsSettings {
    fn option(&self, key: &str) -> Option<u64> {
        self.options.iter().find_map(|o| {
            o.strip_prefix(key)
                .and_then(|v| v.strip_prefix(':'))
                .and_then(|v| v.parse().ok())
        })
    }

    fn ndots(&self) -> usize {
        self.option("ndots").map_or(1, |n| n.min(15) as usize)
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.option("timeout").map_or(5, |t| t.clamp(1, 30)))
    }

    fn attempts(&self) -> u64 {
        self.option("attempts").map_or(2, |a| a.clamp(1, 5))
    }

    /// The names tried for `name`, in order, as glibc does: an absolute
    /// name (trailing dot) as is; one with at least `ndots` dots first as
    /// is, then with each search domain; others with each search domain
    /// first.
    pub fn candidates(&self, name: &str) -> Vec<String> {
        if let Some(absolute) = name.strip_suffix('.') {
            return vec![absolute.to_owned()];
        }
        let searched = self
            .searches
            .iter()
            .map(|s| format!("{name}.{}", s.trim_end_matches('.')));
        if name.matches('.').count() >= self.ndots() {
            std::iter::once(name.to_owned()).chain(searched).collect()
        } else {
            searched.chain(std::iter::once(name.to_owned())).collect()
        }
    }
}

/// Why a lookup failed, as `wasi:sockets` distinguishes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LookupError {
    /// Not a valid name.
    InvalidName,
    /// No such name, under any of the search domains.
    NotFound,
    /// The servers did not answer, or failed.
    Temporary,
    /// No network, or no name servers to ask.
    Permanent,
}

/// A guest's resolver: its pod's network and DNS settings.
#[derive(Clone, Debug, Default)]
pub struct Resolver {
    pub network: GuestNetwork,
    pub dns: Arc<DnsSettings>,
}

impl Resolver {
    /// The addresses of `name`: IPv4 first, then IPv6.
    pub async fn resolve(&self, name: &str) -> Result<Vec<IpAddr>, LookupError> {
        if !self.network.allows_sockets() {
            return Err(LookupError::Permanent);
        }
        let name = name.trim();
        if let Ok(ip) = name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            return Ok(vec![ip]);
        }
        if name.is_empty() || name.len() > 253 {
            return Err(LookupError::InvalidName);
        }
        if let Some(path) = &self.dns.hosts_file {
            // Unreadable: as if empty (the servers still answer).
            let text = tokio::fs::read_to_string(path).await.unwrap_or_default();
            let mut found = hosts_lookup(&text, name);
            if !found.is_empty() {
                found.sort_by_key(|ip| ip.is_ipv6());
                found.dedup();
                return Ok(found);
            }
        }
        if name.eq_ignore_ascii_case("localhost") {
            return Ok(vec![
                IpAddr::from([127, 0, 0, 1]),
                IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
            ]);
        }
        let servers: Vec<SocketAddr> = self
            .dns
            .servers
            .iter()
            .filter_map(|s| s.parse::<IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, 53))
            .collect();
        if servers.is_empty() {
            return Err(LookupError::Permanent);
        }
        let mut temporary = false;
        for candidate in self.dns.candidates(name) {
            let Ok(mut fqdn) = Name::from_ascii(&candidate) else {
                return Err(LookupError::InvalidName);
            };
            fqdn.set_fqdn(true);
            let mut found = Vec::new();
            let mut exists = false;
            for rtype in [RecordType::A, RecordType::AAAA] {
                match self.ask(&servers, &fqdn, rtype).await {
                    Ok(Answer::Addresses(ips)) => {
                        exists = true;
                        found.extend(ips);
                    }
                    Ok(Answer::NoSuchName) => {}
                    Err(()) => temporary = true,
                }
            }
            if !found.is_empty() {
                return Ok(found);
            }
            if exists {
                // The name exists without addresses of these types.
                return Err(LookupError::NotFound);
            }
        }
        Err(if temporary {
            LookupError::Temporary
        } else {
            LookupError::NotFound
        })
    }

    /// Asks the servers in turn, `attempts` rounds.
    async fn ask(
        &self,
        servers: &[SocketAddr],
        name: &Name,
        rtype: RecordType,
    ) -> Result<Answer, ()> {
        for _ in 0..self.dns.attempts() {
            for server in servers {
                match self.query(*server, name, rtype).await {
                    Ok(answer) => return Ok(answer),
                    Err(error) => {
                        tracing::debug!(%server, %name, %error, "DNS query failed");
                    }
                }
            }
        }
        Err(())
    }

    async fn query(
        &self,
        server: SocketAddr,
        name: &Name,
        rtype: RecordType,
    ) -> Result<Answer, QueryError> {
        let socket = self.socket(server)?;
        let mut message = Message::query();
        message.add_query(Query::query(name.clone(), rtype));
        message.metadata.recursion_desired = true;
        let id = message.metadata.id;
        let bytes = message
            .to_vec()
            .map_err(|e| QueryError::Encode(e.to_string()))?;
        socket.send(&bytes).await?;
        let mut buf = vec![0u8; 4096];
        let deadline = tokio::time::Instant::now() + self.dns.timeout();
        loop {
            let n = tokio::time::timeout_at(deadline, socket.recv(&mut buf))
                .await
                .map_err(|_| QueryError::TimedOut)??;
            let Ok(reply) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            if reply.metadata.id != id {
                continue;
            }
            return match reply.metadata.response_code {
                ResponseCode::NoError => Ok(Answer::Addresses(
                    reply
                        .answers
                        .iter()
                        .filter_map(|r| match &r.data {
                            RData::A(a) => Some(IpAddr::V4(a.0)),
                            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                            _ => None,
                        })
                        .collect(),
                )),
                ResponseCode::NXDomain => Ok(Answer::NoSuchName),
                code => Err(QueryError::Refused(code)),
            };
        }
    }

    /// A UDP socket to `server`, created in the pod's namespace.
    fn socket(&self, server: SocketAddr) -> Result<tokio::net::UdpSocket, QueryError> {
        let any: SocketAddr = if server.is_ipv4() {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
        };
        let socket = match &self.network {
            GuestNetwork::Pod(ns) => {
                let _inside = ns.enter()?;
                std::net::UdpSocket::bind(any)
            }
            GuestNetwork::Host => std::net::UdpSocket::bind(any),
            GuestNetwork::None => return Err(QueryError::NoNetwork),
        }?;
        socket.connect(server)?;
        socket.set_nonblocking(true)?;
        Ok(tokio::net::UdpSocket::from_std(socket)?)
    }
}

/// Why one query to one server got no answer (logged; the next server or
/// round is tried).
#[derive(Debug, thiserror::Error)]
enum QueryError {
    #[error("no network")]
    NoNetwork,
    #[error("encoding the query: {0}")]
    Encode(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("timed out")]
    TimedOut,
    #[error("server answered {0}")]
    Refused(ResponseCode),
}

enum Answer {
    Addresses(Vec<IpAddr>),
    NoSuchName,
}

/// A lookup in progress, as the guest's `resolve-address-stream`.
pub struct Lookup {
    state: LookupState,
}

enum LookupState {
    Running(tokio::task::JoinHandle<Result<Vec<IpAddr>, LookupError>>),
    Done(Result<VecDeque<IpAddr>, LookupError>),
}

impl Lookup {
    /// Starts looking `name` up on the current runtime.
    pub fn start(resolver: Resolver, name: String) -> Self {
        let task = tokio::spawn(async move { resolver.resolve(&name).await });
        Self {
            state: LookupState::Running(task),
        }
    }

    /// The next address; `None` when there are no more; `Err(None)` while
    /// the lookup is still running.
    pub fn next_address(&mut self) -> Result<Option<IpAddr>, Option<LookupError>> {
        if let LookupState::Running(task) = &mut self.state {
            use futures::FutureExt;
            match task.now_or_never() {
                Some(result) => self.finish(result),
                None => return Err(None),
            }
        }
        match &mut self.state {
            LookupState::Done(Ok(ips)) => Ok(ips.pop_front()),
            LookupState::Done(Err(e)) => Err(Some(e.clone())),
            LookupState::Running(_) => Err(None),
        }
    }

    fn finish(&mut self, result: Result<Result<Vec<IpAddr>, LookupError>, tokio::task::JoinError>) {
        self.state = LookupState::Done(match result {
            Ok(r) => r.map(VecDeque::from),
            Err(_) => Err(LookupError::Temporary),
        });
    }
}

impl Drop for Lookup {
    fn drop(&mut self) {
        if let LookupState::Running(task) = &self.state {
            task.abort();
        }
    }
}

#[async_trait::async_trait]
impl wasmtime_wasi::p2::Pollable for Lookup {
    async fn ready(&mut self) {
        if let LookupState::Running(task) = &mut self.state {
            let result = task.await;
            self.finish(result);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hosts_file_maps_names_and_aliases_without_case() {
        let text = "# kubelet-managed\n127.0.0.1 localhost\n10.0.0.5\tweb web.ns.svc  # the pod\n\nfe80::1 Web\n10.0.0.9 db.internal. db\nbogus line\n";
        assert_eq!(
            hosts_lookup(text, "WEB"),
            [
                "10.0.0.5".parse::<IpAddr>().unwrap(),
                "fe80::1".parse().unwrap()
            ]
        );
        assert_eq!(
            hosts_lookup(text, "db.internal"),
            ["10.0.0.9".parse::<IpAddr>().unwrap()]
        );
        assert!(hosts_lookup(text, "kubelet-managed").is_empty());
        assert!(hosts_lookup(text, "nowhere").is_empty());
    }

    #[test]
    fn search_order_follows_ndots() {
        let dns = DnsSettings {
            servers: vec!["10.96.0.10".into()],
            searches: vec!["ns.svc.cluster.local".into(), "svc.cluster.local".into()],
            options: vec!["ndots:2".into(), "timeout:1".into()],
            hosts_file: None,
        };
        assert_eq!(
            dns.candidates("web"),
            ["web.ns.svc.cluster.local", "web.svc.cluster.local", "web"]
        );
        assert_eq!(
            dns.candidates("api.example.com"),
            [
                "api.example.com",
                "api.example.com.ns.svc.cluster.local",
                "api.example.com.svc.cluster.local"
            ]
        );
        assert_eq!(dns.candidates("abs.example."), ["abs.example"]);
        assert_eq!(dns.timeout(), Duration::from_secs(1));
        assert_eq!(dns.attempts(), 2);
        assert_eq!(DnsSettings::default().ndots(), 1);
    }

    #[tokio::test]
    async fn literals_need_no_server_and_no_network_means_no_lookup() {
        let resolver = Resolver {
            network: GuestNetwork::Host,
            dns: Arc::new(DnsSettings::default()),
        };
        assert_eq!(
            resolver.resolve("10.1.2.3").await.unwrap(),
            [IpAddr::from([10, 1, 2, 3])]
        );
        assert_eq!(
            resolver.resolve("[::1]").await.unwrap(),
            [IpAddr::from(std::net::Ipv6Addr::LOCALHOST)]
        );
        assert_eq!(
            resolver.resolve("example.com").await,
            Err(LookupError::Permanent),
            "no servers"
        );
        let none = Resolver::default();
        assert_eq!(none.resolve("10.1.2.3").await, Err(LookupError::Permanent));
    }
}
