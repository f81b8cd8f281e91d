//! `wasi:http` functions: a component exporting
//! `wasi:http/incoming-handler` runs as an HTTP/1.1 server on its
//! container's port, inside its pod's network namespace. Every request gets
//! a fresh instance from the pooling engine (pre-linked, so instantiation is
//! cheap), charged to the container's limits; requests beyond the
//! container's concurrency wait for a slot, and each has a deadline.
//!
//! A stop drains: the listener closes at once, requests in flight get the
//! grace period to finish, and only then are the remaining instances
//! interrupted.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::sync::{Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

use crate::network::{GuestNetwork, InNamespace, NetworkError};
use crate::runtime::error::GuestError;
use crate::runtime::host::{GuestConfig, P2State, http_store};
use crate::runtime::limits::PodCpu;
use crate::runtime::logs::Stream;
use crate::runtime::metering::Metered;
use crate::runtime::usage::GuestUsage;

/// How an HTTP function is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpOptions {
    pub port: u16,
    /// The address listened on in the pod: all of them unless the program
    /// names one (runwasi's `WASMTIME_HTTP_PROXY_SOCKET_ADDR`).
    pub address: std::net::IpAddr,
    /// Requests handled at once; more wait for a slot.
    pub max_concurrency: usize,
    /// From the request's arrival to its response headers, and for the
    /// instance to finish the body.
    pub request_timeout: Duration,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            port: 8080,
            address: std::net::Ipv4Addr::UNSPECIFIED.into(),
            max_concurrency: 64,
            request_timeout: Duration::from_secs(60),
        }
    }
}

/// Why a container is being stopped, and how long it may take.
#[derive(Clone, Copy, Debug)]
pub struct StopRequest {
    pub why: &'static str,
    /// The time in-flight work may take to finish (HTTP functions drain;
    /// commands cannot handle a signal and end at once).
    pub grace: Duration,
}

/// How an HTTP function's server ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpExit {
    /// Stopped, and every request in flight finished.
    Drained,
    /// Stopped, and requests still in flight after the grace period were
    /// interrupted.
    Interrupted { why: &'static str, requests: usize },
    /// The listener failed.
    Failed(String),
}

/// How the CPU of a function's instances is accounted and capped.
#[derive(Clone)]
pub struct Metering {
    pub usage: Arc<GuestUsage>,
    /// The container's quota over all its instances together, and the
    /// pod's.
    pub shared: Vec<Arc<PodCpu>>,
}

/// A prepared HTTP function with what its instances run with.
pub struct HttpFunction {
    pre: ProxyPre<P2State>,
    config: GuestConfig,
}

impl HttpFunction {
    pub(crate) fn new(pre: ProxyPre<P2State>, config: GuestConfig) -> Self {
        Self { pre, config }
    }

    /// Opens the listening socket on `addr` in the guest's network
    /// namespace, so that a busy port is a start error.
    pub fn bind(&self, addr: SocketAddr) -> Result<std::net::TcpListener, GuestError> {
        let failed = |e| GuestError::Bind {
            addr,
            source: std::sync::Arc::new(e),
        };
        let listener = match &self.config.network {
            GuestNetwork::None => return Err(GuestError::NoPodNetwork),
            GuestNetwork::Host => std::net::TcpListener::bind(addr),
            GuestNetwork::Pod(ns) => {
                let _inside = ns.enter().map_err(|e| NetworkError::EnterNamespace {
                    path: ns.path().to_owned(),
                    source: std::sync::Arc::new(e),
                })?;
                std::net::TcpListener::bind(addr)
            }
        }
        .map_err(failed)?;
        listener.set_nonblocking(true).map_err(failed)?;
        Ok(listener)
    }

    /// Serves requests on `listener` until `stop`; must run inside a tokio
    /// runtime (the guest runtime).
    pub async fn serve(
        self,
        listener: std::net::TcpListener,
        options: HttpOptions,
        metering: Metering,
        stop: oneshot::Receiver<StopRequest>,
    ) -> HttpExit {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => return HttpExit::Failed(format!("serving the listener: {e}")),
        };
        let max = options.max_concurrency.max(1);
        let server = Arc::new(Server {
            function: self,
            permits: Arc::new(Semaphore::new(max)),
            max,
            options,
            metering,
            cancel: CancellationToken::new(),
            drain: CancellationToken::new(),
            connections: TaskTracker::new(),
            draining: AtomicBool::new(false),
        });
        let mut stop = std::pin::pin!(stop);
        let request = loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let conn = server.clone();
                        server.connections.spawn(async move { conn.connection(stream).await });
                    }
                    Err(error) => {
                        // Out of descriptors and the like: back off.
                        tracing::warn!(%error, "accepting an HTTP connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                request = &mut stop => {
                    break request.unwrap_or(StopRequest { why: "the runtime stopped it", grace: Duration::ZERO });
                }
            }
        };
        drop(listener);
        server.draining.store(true, Ordering::Release);
        server.drain.cancel();
        server.connections.close();
        let max = u32::try_from(server.max).unwrap_or(u32::MAX);
        // Every instance ends, then every connection has written its last
        // response and closed.
        let drained = tokio::time::timeout(request.grace, async {
            let all = server.permits.acquire_many(max).await;
            server.connections.wait().await;
            all
        })
        .await
        .is_ok();
        let in_flight = server.max - server.permits.available_permits();
        server.cancel.cancel();
        if drained {
            HttpExit::Drained
        } else {
            HttpExit::Interrupted {
                why: request.why,
                requests: in_flight,
            }
        }
    }
}

struct Server {
    function: HttpFunction,
    options: HttpOptions,
    metering: Metering,
    permits: Arc<Semaphore>,
    max: usize,
    /// Interrupts connections and instances at the end of a stop.
    cancel: CancellationToken,
    /// Asks connections to finish their request and close, at a stop.
    drain: CancellationToken,
    connections: TaskTracker,
    draining: AtomicBool,
}

fn text(status: u16, body: impl Into<String>) -> hyper::Response<HyperOutgoingBody> {
    let body: String = body.into();
    let mut response = hyper::Response::new(
        http_body_util::Full::new(Bytes::from(body))
            .map_err(|never: Infallible| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    response
}

impl Server {
    async fn connection(self: Arc<Self>, stream: tokio::net::TcpStream) {
        let server = self.clone();
        let service = hyper::service::service_fn(move |request| {
            let server = server.clone();
            async move { Ok::<_, Infallible>(server.handle(request).await) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service);
        let mut connection = std::pin::pin!(connection);
        let mut draining = false;
        loop {
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "HTTP connection ended");
                    }
                    break;
                }
                () = self.drain.cancelled(), if !draining => {
                    draining = true;
                    connection.as_mut().graceful_shutdown();
                }
                () = self.cancel.cancelled() => break,
            }
        }
    }

    async fn handle(
        self: &Arc<Self>,
        request: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<HyperOutgoingBody> {
        let started = Instant::now();
        let response = self.respond(request).await;
        self.metering
            .usage
            .record_request(response.status().as_u16(), started.elapsed());
        response
    }

    async fn respond(
        self: &Arc<Self>,
        request: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<HyperOutgoingBody> {
        let closing = || {
            let mut response = text(503, "the function is shutting down\n");
            response.headers_mut().insert(
                hyper::header::CONNECTION,
                hyper::header::HeaderValue::from_static("close"),
            );
            response
        };
        if self.draining.load(Ordering::Acquire) {
            return closing();
        }
        let timeout = self.options.request_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let permit =
            match tokio::time::timeout_at(deadline, self.permits.clone().acquire_owned()).await {
                Ok(Ok(permit)) => permit,
                Ok(Err(_)) => return closing(),
                Err(_) => {
                    return text(
                        503,
                        format!(
                            "all {} request slots stayed busy for {timeout:?}\n",
                            self.max
                        ),
                    );
                }
            };
        if self.draining.load(Ordering::Acquire) {
            return closing();
        }
        let log = self.function.config.log.clone();
        let mut store = match http_store(&self.function.pre, &self.function.config) {
            Ok(store) => store,
            Err(e) => {
                self.function
                    .config
                    .log
                    .write_line(Stream::Stderr, &format!("wasmlet: request failed: {e}"));
                return text(500, "the function failed\n".to_owned());
            }
        };
        let (sender, receiver) = oneshot::channel();
        let prepared = store
            .data_mut()
            .http()
            .new_incoming_request(Scheme::Http, request)
            .and_then(|req| {
                let out = store.data_mut().http().new_response_outparam(sender)?;
                Ok((req, out))
            });
        let (req, out) = match prepared {
            Ok(p) => p,
            Err(e) => return text(400, format!("bad request: {e:#}\n")),
        };
        let pre = self.function.pre.clone();
        let guest = async move {
            let proxy = pre.instantiate_async(&mut store).await?;
            proxy
                .wasi_http_incoming_handler()
                .call_handle(&mut store, req, out)
                .await
        };
        let mut metered = Metered::new(
            InNamespace::new(guest, &self.function.config.network),
            self.metering.usage.clone(),
        );
        for account in &self.metering.shared {
            metered = metered.with_pod_cpu(Some(account.clone()));
        }
        let cancel = self.cancel.clone();
        let task = tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                result = metered => match result {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(trap)) => Err(crate::runtime::guest::trap_message(&trap)),
                    Err(netns) => Err(netns.to_string()),
                },
                () = cancel.cancelled() => Err("interrupted: the function was stopped".to_owned()),
                () = tokio::time::sleep_until(deadline) => Err(format!("interrupted: the request took longer than {timeout:?}")),
            }
        });
        match tokio::time::timeout_at(deadline, receiver).await {
            Ok(Ok(Ok(response))) => response,
            Ok(Ok(Err(code))) => text(500, format!("the function failed: {code:?}\n")),
            Ok(Err(_)) => {
                let why = match task.await {
                    Ok(Ok(())) => "the function returned without setting a response".to_owned(),
                    Ok(Err(why)) => why,
                    Err(e) => format!("the instance panicked: {e}"),
                };
                // The details (a trap, the guest's backtrace) go to the
                // container log; whoever sent the request learns only that
                // it failed.
                log.write_line(Stream::Stderr, &format!("wasmlet: request failed: {why}"));
                text(500, "the function failed\n".to_owned())
            }
            Err(_) => {
                log.write_line(
                    Stream::Stderr,
                    &format!("wasmlet: request timed out after {timeout:?}"),
                );
                text(
                    504,
                    format!("the function did not answer within {timeout:?}\n"),
                )
            }
        }
    }
}
