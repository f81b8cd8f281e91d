//! wasmlet's metrics as a real Prometheus (Debian's 2.42) sees them: every
//! family the README documents has data after a mixed workload. And the
//! Prometheus fixture they rely on, checked without any runtime: it scrapes
//! an OpenMetrics text body served as the `prometheus-client` crate's
//! encoder writes it, scrapes itself, and says why a scrape failed.
//!
//! Without `/usr/bin/prometheus` the tests print `SKIP` and pass, unless
//! `WASMLET_REQUIRE_PROMETHEUS=1` (which `.ci/run` sets).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use wasmlet_conformance::fixtures::prometheus::{Error, JOB, Prometheus, TargetHealth};
use wasmlet_conformance::fixtures::registry::{Registry, RegistryOptions, Request, send};
use wasmlet_conformance::{ContainerConfigBuilder, cri};

use crate::daemon::Wasmlet;
use crate::networked::{pod_ip, test_network};
use crate::{GUEST_TIMEOUT, HELLO_HTTP_P2, HOG_P1, SPIN_P1};

/// Bounds each test, Prometheus startup (and its first scrapes, about five
/// seconds after it starts) included.
const TEST_TIMEOUT: Duration = Duration::from_secs(90);

/// How long a series may take to appear once Prometheus is ready.
const DATA_TIMEOUT: Duration = Duration::from_secs(30);

/// The content type `prometheus-client`'s OpenMetrics encoder is served with.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The classic Prometheus text format's content type.
const TEXT_004: &str = "text/plain; version=0.0.4; charset=utf-8";

/// An exposition as `prometheus-client` writes one: a gauge with a label, a
/// counter (its series suffixed `_total`, with `_created`), an info metric
/// and a histogram with a unit, ended by `# EOF`.
const OPENMETRICS_BODY: &str = "\
# HELP fixture_pods Pods by state.
# TYPE fixture_pods gauge
fixture_pods{state=\"ready\"} 2
fixture_pods{state=\"notready\"} 0
# HELP fixture_requests Requests served.
# TYPE fixture_requests counter
fixture_requests_total 7
fixture_requests_created 1700000000.0
# HELP fixture_build Build information.
# TYPE fixture_build info
fixture_build_info{version=\"1.2.3\"} 1
# HELP fixture_request_duration_seconds Request latency.
# TYPE fixture_request_duration_seconds histogram
# UNIT fixture_request_duration_seconds seconds
fixture_request_duration_seconds_sum 0.3
fixture_request_duration_seconds_count 2
fixture_request_duration_seconds_bucket{le=\"0.1\"} 1
fixture_request_duration_seconds_bucket{le=\"+Inf\"} 2
# EOF
";

/// A tiny HTTP/1.1 server answering `GET /metrics` with one body and
/// content type, and remembering the `Accept` of each scrape. Stops when
/// dropped.
struct Exposition {
    addr: SocketAddr,
    accepts: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Exposition {
    async fn serve(content_type: Option<&'static str>, body: String) -> Exposition {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        let accepts = Arc::new(Mutex::new(Vec::new()));
        let seen = accepts.clone();
        let body = Arc::new(body);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(answer(stream, content_type, body.clone(), seen.clone()));
            }
        });
        Exposition {
            addr,
            accepts,
            task,
        }
    }

    fn accepts(&self) -> Vec<String> {
        self.accepts.lock().unwrap().clone()
    }
}

impl Drop for Exposition {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request and answers it, closing the connection.
async fn answer(
    stream: TcpStream,
    content_type: Option<&'static str>,
    body: Arc<String>,
    accepts: Arc<Mutex<Vec<String>>>,
) {
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).await.unwrap_or(0) == 0 {
        return;
    }
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("accept")
        {
            accepts.lock().unwrap().push(value.trim().to_owned());
        }
    }
    let (status, body) = if request_line.starts_with("GET /metrics ") {
        ("200 OK", body.as_str())
    } else {
        ("404 Not Found", "not found\n")
    };
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if let Some(content_type) = content_type {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    head.push_str("\r\n");
    let mut stream = reader.into_inner();
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

async fn bounded<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("test did not finish in time")
}

/// The one value `promql` returns, waiting for it.
async fn value_of(prometheus: &Prometheus, promql: &str) -> String {
    let samples = prometheus
        .wait_for(promql, DATA_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(samples.len(), 1, "{promql}: {samples:?}");
    samples[0].value.clone()
}

#[tokio::test]
async fn prometheus_fixture_scrapes_openmetrics_text() {
    bounded(async {
        let exposition = Exposition::serve(Some(OPENMETRICS), OPENMETRICS_BODY.to_owned()).await;
        let Some(prometheus) = Prometheus::start_or_skip(
            "metrics::prometheus_fixture_scrapes_openmetrics_text",
            &[exposition.addr],
        )
        .await
        else {
            return;
        };

        let up = format!("up{{job=\"{JOB}\",instance=\"{}\"}}", exposition.addr);
        assert_eq!(value_of(&prometheus, &format!("{up} == 1")).await, "1");

        // Each family, queried by the names its series get.
        for (promql, expected) in [
            ("fixture_pods{state=\"ready\"}", "2"),
            ("fixture_pods{state=\"notready\"}", "0"),
            ("fixture_requests_total", "7"),
            ("fixture_requests_created", "1700000000"),
            ("fixture_build_info{version=\"1.2.3\"}", "1"),
            ("fixture_request_duration_seconds_bucket{le=\"0.1\"}", "1"),
            ("fixture_request_duration_seconds_bucket{le=\"+Inf\"}", "2"),
            ("fixture_request_duration_seconds_sum", "0.3"),
            ("fixture_request_duration_seconds_count", "2"),
        ] {
            assert_eq!(value_of(&prometheus, promql).await, expected, "{promql}");
        }
        // Nothing under the family names themselves.
        for family in ["fixture_requests", "fixture_build"] {
            let samples = prometheus.query(family).await.expect("query");
            assert!(samples.is_empty(), "{family}: {samples:?}");
        }
        // The metadata is by family, with the OpenMetrics types and unit.
        let metadata = prometheus.metadata().await.expect("metadata");
        let kind_of = |family: &str| {
            metadata
                .iter()
                .find(|m| m.metric == family)
                .map(|m| (m.kind.as_str(), m.unit.as_str()))
                .unwrap_or_else(|| panic!("no metadata for {family}: {metadata:?}"))
        };
        assert_eq!(kind_of("fixture_pods"), ("gauge", ""));
        assert_eq!(kind_of("fixture_requests"), ("counter", ""));
        assert_eq!(kind_of("fixture_build"), ("info", ""));
        assert_eq!(
            kind_of("fixture_request_duration_seconds"),
            ("histogram", "seconds")
        );

        let targets = prometheus.target_health().await.expect("targets");
        assert_eq!(targets.len(), 1, "{targets:?}");
        assert!(
            targets[0].is_up() && targets[0].last_error.is_empty(),
            "{}",
            targets[0]
        );
        assert_eq!(
            targets[0].scrape_url,
            format!("http://{}/metrics", exposition.addr)
        );
        // Prometheus 2.42 asks for OpenMetrics 1.0.0 first.
        let accepts = exposition.accepts();
        assert!(!accepts.is_empty());
        for accept in &accepts {
            assert!(
                accept.starts_with("application/openmetrics-text;version=1.0.0,"),
                "{accept}"
            );
            assert!(accept.contains("text/plain;version=0.0.4"), "{accept}");
        }

        // Prometheus scraping itself (its own /metrics is text/plain 0.0.4).
        prometheus
            .set_targets(&[exposition.addr, prometheus.addr()])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let own = format!("instance=\"{}\"", prometheus.addr());
        assert_eq!(
            value_of(&prometheus, &format!("up{{job=\"{JOB}\",{own}}} == 1")).await,
            "1"
        );
        let build = prometheus
            .wait_for(&format!("prometheus_build_info{{{own}}}"), DATA_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            build[0]
                .label("version")
                .is_some_and(|v| v.starts_with("2.")),
            "{build:?}"
        );
        assert_eq!(prometheus.target_health().await.expect("targets").len(), 2);

        // A query Prometheus cannot parse fails at once.
        match prometheus.wait_for("up{", DATA_TIMEOUT).await {
            Err(Error::Query { error_type, .. }) => assert_eq!(error_type, "bad_data"),
            other => panic!("a bad query answered {other:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn prometheus_fixture_reports_scrape_failures() {
    bounded(async {
        // OpenMetrics without its `# EOF`.
        let no_eof =
            Exposition::serve(Some(OPENMETRICS), OPENMETRICS_BODY.replace("# EOF\n", "")).await;
        // OpenMetrics text served as the classic text format: that parser
        // knows no `info` type.
        let as_text = Exposition::serve(Some(TEXT_004), OPENMETRICS_BODY.to_owned()).await;
        // The same without its info family: the classic parser takes the
        // rest, `# EOF` and `# UNIT` being comments to it.
        let without_info = OPENMETRICS_BODY
            .split("# HELP ")
            .filter(|family| !family.starts_with("fixture_build "))
            .collect::<Vec<_>>()
            .join("# HELP ");
        assert!(!without_info.contains("_info"));
        let as_text_without_info = Exposition::serve(Some(TEXT_004), without_info).await;
        // Nothing listening.
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind")
            .local_addr()
            .expect("local address");

        let Some(prometheus) = Prometheus::start_or_skip(
            "metrics::prometheus_fixture_reports_scrape_failures",
            &[no_eof.addr, as_text.addr, as_text_without_info.addr, closed],
        )
        .await
        else {
            return;
        };

        let targets = prometheus
            .wait_for_scrapes(DATA_TIMEOUT)
            .await
            .expect("targets");
        let health = |addr: SocketAddr| -> TargetHealth {
            targets
                .iter()
                .find(|t| t.scrape_url == format!("http://{addr}/metrics"))
                .unwrap_or_else(|| panic!("no target {addr}: {targets:?}"))
                .clone()
        };
        for (addr, error) in [
            (no_eof.addr, "data does not end with # EOF"),
            (as_text.addr, "invalid metric type \"info\""),
            (closed, "connection refused"),
        ] {
            let target = health(addr);
            assert!(!target.is_up(), "{target}");
            assert!(target.last_error.contains(error), "{target}");
            assert!(target.to_string().contains("scrape failed: "), "{target}");
        }
        let target = health(as_text_without_info.addr);
        assert!(target.is_up(), "{target}");
        assert_eq!(
            value_of(
                &prometheus,
                &format!(
                    "fixture_requests_total{{instance=\"{}\"}}",
                    as_text_without_info.addr
                )
            )
            .await,
            "7"
        );

        // Waiting on a failing target's data says why it never came.
        let error = prometheus
            .wait_for(
                &format!("fixture_pods{{instance=\"{}\"}}", no_eof.addr),
                Duration::from_secs(2),
            )
            .await
            .expect_err("a target whose scrapes fail has no data");
        let message = error.to_string();
        assert!(
            message.contains("scrape failed: data does not end with # EOF"),
            "{message}"
        );
    })
    .await;
}

/// The port of a loopback address nobody listens on now.
fn free_loopback_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding a loopback port")
}

/// The families the README's "Metrics" table documents, with their types.
fn documented_families() -> Vec<(String, String)> {
    let readme = include_str!("../../../README.md");
    let families: Vec<(String, String)> = readme
        .lines()
        .filter_map(|line| {
            let mut cells = line.split('|').map(str::trim).skip(1);
            let name = cells.next()?.strip_prefix("`wasmlet_")?.strip_suffix('`')?;
            let kind = cells.next()?;
            Some((format!("wasmlet_{name}"), kind.to_owned()))
        })
        .collect();
    assert!(
        families.len() >= 20,
        "the README's metrics table lists only {families:?}"
    );
    families
}

/// What a scrape of a node running every kind of workload must show: the
/// agent serves every documented family and a real Prometheus, scraping it
/// on loopback, has data for a query of each.
const FAMILIES_TEST: &str = "metrics::every_documented_family_has_data_in_prometheus";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_family_has_data_in_prometheus() {
    if Prometheus::binary().is_none() {
        // start_or_skip says why (or fails, when CI requires it).
        let _ = Prometheus::start_or_skip(FAMILIES_TEST, &[]).await;
        return;
    }
    let net = test_network();
    let registry = Registry::start(RegistryOptions::default())
        .await
        .expect("start registry");
    let port = free_loopback_port();
    let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let wasmlet = Wasmlet::builder()
        .config(format!(
            "{}\n[registry]\ninsecure = [\"{}\"]\n[metrics]\naddress = \"{address}\"\n[memory]\nnode_budget_bytes = {}\n",
            net.wasmlet_config(),
            registry.host(),
            8u64 << 30
        ))
        .start()
        .await;
    let mut cri = wasmlet.cri();

    // A pull, and a pull of what is not there.
    let reference = format!("{}/metrics/echo:v1", registry.host());
    Wasmlet::push(
        std::path::Path::new(wasm_samples::ECHO_P1),
        &reference,
        None,
    );
    cri.pull_image(&reference).await.expect("pulling echo");
    let missing = format!("{}/metrics/missing:v1", registry.host());
    assert!(cri.pull_image(&missing).await.is_err());

    // A guest that prints, one that dies of its memory limit, one held to
    // a CPU quota, and a wasi:http function that answers.
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let echo = ContainerConfigBuilder::new("echo", &reference)
        .args(["hi"])
        .build();
    let status = cri.run_to_exit(&pod, echo, GUEST_TIMEOUT).await.unwrap();
    assert_eq!(status.exit_code, 0, "{status:?}");
    let mut hog = ContainerConfigBuilder::new("hog", HOG_P1).build();
    hog.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 16 << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    let status = cri.run_to_exit(&pod, hog, GUEST_TIMEOUT).await.unwrap();
    assert_eq!(status.reason, "OOMKilled", "{status:?}");
    let mut spin = ContainerConfigBuilder::new("spin", SPIN_P1).build();
    spin.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            cpu_quota: 10_000,
            cpu_period: 100_000,
            ..Default::default()
        }),
        ..Default::default()
    });
    cri.start(&pod, spin).await.unwrap();
    // The kubelet sizes a pod by its containers' limits.
    let mut web = wasmlet.pod().name("web").build();
    web.linux.get_or_insert_default().resources = Some(cri::LinuxContainerResources {
        memory_limit_in_bytes: 64 << 20,
        ..Default::default()
    });
    let web = cri.run_pod(web).await.unwrap();
    let ip = pod_ip(&wasmlet, &web.id).await;
    let function = ContainerConfigBuilder::new("fn", HELLO_HTTP_P2)
        .annotation(
            "io.kubernetes.container.ports",
            r#"[{"name":"http","containerPort":8080,"protocol":"TCP"}]"#,
        )
        .build();
    cri.start(&web, function).await.unwrap();
    let deadline = tokio::time::Instant::now() + GUEST_TIMEOUT;
    loop {
        match net.http_get(&ip, 8080, "/hello", Duration::from_secs(10)) {
            Ok((200, _)) => break,
            other if tokio::time::Instant::now() >= deadline => {
                panic!("the function never answered: {other:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }

    // The endpoint answers by itself, in the format Prometheus parses it
    // as (its content type picks the parser).
    let response = send(address, &Request::get("/metrics")).await.unwrap();
    let body = response.text();
    assert_eq!(response.status, 200, "{body}");
    assert_eq!(
        response.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(body.ends_with("# EOF\n"), "{body}");

    let prometheus = Prometheus::start_or_skip(FAMILIES_TEST, &[address])
        .await
        .expect("Prometheus is installed");
    let mut missing = Vec::new();
    for (family, kind) in documented_families() {
        let query = if kind == "histogram" {
            format!("{family}_count")
        } else {
            family.clone()
        };
        match prometheus.wait_for(&query, DATA_TIMEOUT).await {
            Ok(samples) if !samples.is_empty() => {}
            other => missing.push(format!("{query}: {other:?}")),
        }
    }
    assert!(
        missing.is_empty(),
        "Prometheus has no data for {missing:#?}\nthe agent served:\n{}",
        send(address, &Request::get("/metrics"))
            .await
            .unwrap()
            .text()
    );
    // Series carry what an operator filters by.
    let ok = prometheus
        .query("wasmlet_cri_requests_total{method=\"RunPodSandbox\",code=\"OK\"}")
        .await
        .unwrap();
    assert!(!ok.is_empty());
    let limit = prometheus
        .query("wasmlet_pod_memory_limit_bytes{pod=\"web\"}")
        .await
        .unwrap();
    assert_eq!(
        limit.iter().map(|s| s.number()).collect::<Vec<_>>(),
        [Some((64 << 20) as f64)]
    );
    let kills = prometheus
        .query("wasmlet_oom_kills_total{reason=\"limit\"}")
        .await
        .unwrap();
    assert!(
        kills.iter().any(|s| s.number().unwrap_or(0.0) >= 1.0),
        "{kills:?}"
    );
    let served = prometheus
        .query("wasmlet_http_requests_total{pod=\"web\",container=\"fn\"}")
        .await
        .unwrap();
    assert!(
        served.iter().any(|s| s.number().unwrap_or(0.0) >= 1.0),
        "{served:?}"
    );
    let errors = prometheus
        .query("wasmlet_image_pull_errors_total{kind=\"not_found\"}")
        .await
        .unwrap();
    assert!(!errors.is_empty());
}

/// `GET /metrics` on `address` over plain HTTP/1.0: the status line and
/// the body, or why not.
async fn get_metrics(address: SocketAddr) -> std::io::Result<(String, String)> {
    use tokio::io::AsyncReadExt;
    let mut stream = TcpStream::connect(address).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: wasmlet\r\n\r\n")
        .await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.lines().next().unwrap_or_default().to_owned();
    Ok((status, body.to_owned()))
}

/// A metrics address another program holds does not stop the agent: it
/// serves pods, says why it has no metrics, and serves them once the
/// address is free (it tries again every 5 seconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_metrics_address_is_tried_again_until_it_is_free() {
    bounded(async {
        let squatter = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a port");
        let address = squatter.local_addr().unwrap();
        let wasmlet = Wasmlet::builder()
            .config(format!("[metrics]\naddress = \"{address}\"\n"))
            .rust_log("info")
            .start()
            .await;
        // The agent is up and runs pods meanwhile.
        let mut cri = wasmlet.cri();
        let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
        assert!(wasmlet.daemon_log().contains("cannot serve metrics"));
        drop(squatter);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok((status, body)) = get_metrics(address).await
                && status.contains(" 200 ")
            {
                assert!(body.contains("wasmlet_cri_requests_total"), "{body}");
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no metrics at {address} 15 s after it was freed:\n{}",
                wasmlet.daemon_log()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        cri.stop_pod_sandbox(&pod.id).await.unwrap();
    })
    .await;
}
