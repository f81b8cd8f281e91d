//! The Prometheus endpoint: the CRI calls' families, counted by
//! [`crate::traced`], beside the agent's own (`wasmlet_agent::metrics`),
//! served as OpenMetrics text at `GET /metrics` on the `[metrics]` address.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::LazyLock;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tonic::Code;
use wasmlet_agent::Agent;

/// How long to wait before trying a taken port again.
const REBIND_DELAY: Duration = Duration::from_secs(5);

/// What OpenMetrics text is served as.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

struct CriMetrics {
    requests: Family<CallLabels, Counter>,
    seconds: Family<MethodLabels, Histogram>,
}

static CRI: LazyLock<CriMetrics> = LazyLock::new(|| CriMetrics {
    requests: Family::default(),
    seconds: Family::new_with_constructor(|| {
        // 0.1 ms to about 200 s: a status call to a pull.
        Histogram::new(exponential_buckets(0.0001, 2.0, 22))
    }),
});

/// Counts one CRI call of `method` that ended with `code` after `elapsed`
/// (`Cancelled` when its client went away first).
pub fn cri_call(method: &'static str, code: Code, elapsed: Duration) {
    CRI.requests
        .get_or_create(&CallLabels {
            method,
            code: code_name(code),
        })
        .inc();
    CRI.seconds
        .get_or_create(&MethodLabels { method })
        .observe(elapsed.as_secs_f64());
}

/// A gRPC status code as gRPC's own servers label it (`OK`, `NotFound`,
/// ...: the names of Go's `codes.Code`).
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// Every family, the CRI's and the agent's, as one scrape's text.
pub fn render(agent: &Agent) -> String {
    let mut registry = Registry::with_prefix("wasmlet");
    registry.register(
        "cri_requests",
        "CRI calls answered, by method and gRPC code (Canceled: the client went away first)",
        CRI.requests.clone(),
    );
    registry.register(
        "cri_request_duration_seconds",
        "Time from a CRI call's arrival to its answer, by method",
        CRI.seconds.clone(),
    );
    let agent = agent.clone();
    wasmlet_agent::metrics::register(&mut registry, move || agent.metrics_snapshot());
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    text
}

/// Serves `GET /metrics` on `address` until the process ends. A taken
/// address is logged and tried again every few seconds, as the kubelet
/// does with its own ports: metrics are never worth failing pods for.
pub async fn serve(address: SocketAddr, agent: Agent) {
    let listener = loop {
        match tokio::net::TcpListener::bind(address).await {
            Ok(listener) => break listener,
            Err(error) => {
                tracing::error!(%address, %error, "cannot serve metrics; trying again in 5 seconds");
                tokio::time::sleep(REBIND_DELAY).await;
            }
        }
    };
    tracing::info!(address = %listener.local_addr().unwrap_or(address), "serving metrics at /metrics");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accepting a metrics connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let agent = agent.clone();
                async move { Ok::<_, Infallible>(answer(&request, &agent)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(request: &Request<Incoming>, agent: &Agent) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header(hyper::header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => reply(StatusCode::OK, CONTENT_TYPE, render(agent)),
        (&Method::GET, _) => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "wasmlet serves its metrics at /metrics\n".into(),
        ),
        _ => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_named_as_grpc_servers_name_them() {
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::Cancelled), "Canceled");
        assert_eq!(code_name(Code::DeadlineExceeded), "DeadlineExceeded");
    }
}
