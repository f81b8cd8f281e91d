//! `wasi:http` functions served from pods: at the pod's IP on the
//! container's port, an instance per request, probes, limits per request,
//! draining on stop, and a neighbour that keeps serving while another pod
//! dies of its memory limit.

use std::time::Duration;

use wasmlet_conformance::pod_network::TestNetwork;
use wasmlet_conformance::{
    Code, ContainerConfigBuilder, Stream, assert_code, cri, stream_lines, wait_for_log,
};

use crate::daemon::Wasmlet;
use crate::networked::{networked, pod_ip, test_network};
use crate::{GUEST_TIMEOUT, HELLO_HTTP_P2, HOG_P1};

const IO_TIMEOUT: Duration = Duration::from_secs(10);
const MIB: i64 = 1024 * 1024;

fn function_builder(name: &str, port: u16) -> ContainerConfigBuilder {
    ContainerConfigBuilder::new(name, HELLO_HTTP_P2)
        .env("HELLO_NAME", name)
        // As the kubelet lists a container's ports.
        .annotation(
            "io.kubernetes.container.ports",
            format!(r#"[{{"name":"http","containerPort":{port},"protocol":"TCP"}}]"#),
        )
}

fn function(name: &str, port: u16) -> cri::ContainerConfig {
    function_builder(name, port).build()
}

/// `GET path`, retried while the function starts listening.
async fn get(net: &TestNetwork, ip: &str, port: u16, path: &str) -> (u16, String) {
    let deadline = tokio::time::Instant::now() + GUEST_TIMEOUT;
    loop {
        match net.http_get(ip, port, path, IO_TIMEOUT) {
            Ok(response) => return response,
            Err(e) if tokio::time::Instant::now() >= deadline => panic!("GET {path}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn http_metrics(wasmlet: &Wasmlet, container: &str) -> (u64, u64) {
    let metrics = wasmlet
        .cri()
        .runtime()
        .list_pod_sandbox_metrics(cri::ListPodSandboxMetricsRequest {})
        .await
        .unwrap()
        .into_inner()
        .pod_metrics;
    let values: Vec<(String, u64)> = metrics
        .iter()
        .flat_map(|p| &p.container_metrics)
        .filter(|c| c.container_id == container)
        .flat_map(|c| &c.metrics)
        .map(|m| (m.name.clone(), m.value.as_ref().map_or(0, |v| v.value)))
        .collect();
    let value = |name: &str| {
        values
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no {name} in {values:?}"))
            .1
    };
    (
        value("wasmlet_http_requests_total"),
        value("wasmlet_http_server_errors_total"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_answers_at_the_pod_ip_with_an_instance_per_request() {
    let net = test_network();
    let wasmlet = networked(&net).await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let ip = pod_ip(&wasmlet, &pod.id).await;
    let config = function("tenant-a", 8080);
    let log = pod.container_log(&config);
    let id = cri.start(&pod, config).await.unwrap();

    // What a kubelet HTTP probe does.
    assert_eq!(
        get(&net, &ip, 8080, "/healthz").await,
        (200, "ok\n".to_owned())
    );
    assert_eq!(
        get(&net, &ip, 8080, "/hello?x=1").await,
        (200, "hello from tenant-a path=/hello?x=1\n".to_owned())
    );
    // A guest's stdout goes to the container's log.
    let records = wait_for_log(&log, GUEST_TIMEOUT, "the request line", |records| {
        stream_lines(records, Stream::Stdout)
            .iter()
            .any(|l| l == "request GET /hello?x=1")
    })
    .await
    .unwrap();
    assert!(
        stream_lines(&records, Stream::Stderr)
            .iter()
            .any(|l| l == "wasmlet: serving wasi:http on port 8080"),
        "{records:?}"
    );
    let status = cri.container_status(&id).await.unwrap();
    assert_eq!(status.state, cri::ContainerState::ContainerRunning as i32);
    assert_eq!(http_metrics(&wasmlet, &id).await, (2, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_drains_requests_in_flight() {
    let net = test_network();
    let wasmlet = networked(&net).await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let ip = pod_ip(&wasmlet, &pod.id).await;
    let id = cri.start(&pod, function("drained", 8080)).await.unwrap();
    assert_eq!(get(&net, &ip, 8080, "/healthz").await.0, 200);

    // A request that takes 1.5 s of CPU is in flight when the stop comes.
    let (response, stopped) = std::thread::scope(|scope| {
        let request = scope.spawn(|| net.http_get(&ip, 8080, "/spin?ms=1500", IO_TIMEOUT));
        std::thread::sleep(Duration::from_millis(300));
        let stopped = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(cri.stop_container(&id, 10))
        });
        (request.join().unwrap(), stopped)
    });
    stopped.unwrap();
    assert_eq!(response.unwrap(), (200, "spun 1500\n".to_owned()));
    let status = cri.container_status(&id).await.unwrap();
    assert_eq!(status.exit_code, 0, "{status:?}");
    assert!(
        net.http_get(&ip, 8080, "/healthz", IO_TIMEOUT).is_err(),
        "the listener outlived its container"
    );
}

/// runwasi's `WASMTIME_HTTP_PROXY_SOCKET_ADDR` says where a function
/// listens, address included: on loopback it is reachable only inside its
/// pod, as under runwasi.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_listens_on_the_address_its_image_names() {
    let net = test_network();
    let wasmlet = networked(&net).await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let ip = pod_ip(&wasmlet, &pod.id).await;
    let everywhere = function_builder("everywhere", 8080)
        .env("WASMTIME_HTTP_PROXY_SOCKET_ADDR", "0.0.0.0:9001")
        .build();
    let inside = function_builder("inside", 8080)
        .env("WASMTIME_HTTP_PROXY_SOCKET_ADDR", "127.0.0.1:9000")
        .build();
    let log = pod.container_log(&inside);
    cri.start(&pod, everywhere).await.unwrap();
    cri.start(&pod, inside).await.unwrap();
    assert_eq!(
        get(&net, &ip, 9001, "/hello").await,
        (200, "hello from everywhere path=/hello\n".to_owned())
    );
    wait_for_log(&log, GUEST_TIMEOUT, "the serving line", |records| {
        stream_lines(records, Stream::Stderr)
            .iter()
            .any(|l| l == "wasmlet: serving wasi:http on 127.0.0.1:9000")
    })
    .await
    .unwrap();
    assert!(
        net.http_get(&ip, 9000, "/hello", IO_TIMEOUT).is_err(),
        "a function listening on the pod's loopback answered from outside"
    );
    // Inside the pod's network namespace it listens on loopback only.
    let netns = net.netns_dir().join(format!("wasmlet-{}", pod.id));
    let listening = std::process::Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["ss", "-Hltn"])
        .output()
        .expect("running nsenter ss");
    let listening = String::from_utf8_lossy(&listening.stdout);
    assert!(listening.contains("127.0.0.1:9000"), "{listening}");
    assert!(listening.contains("0.0.0.0:9001"), "{listening}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_without_a_pod_network_does_not_start() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let id = cri
        .create_container(&pod, function("nowhere", 8080))
        .await
        .unwrap();
    let status = assert_code(cri.start_container(&id).await, Code::FailedPrecondition);
    assert!(
        status.message().contains("needs a pod network"),
        "{status:?}"
    );
    let status = cri.container_status(&id).await.unwrap();
    assert_eq!(status.exit_code, 128);
    assert_eq!(status.reason, "StartError");
}

/// One tenant's runaway memory never disturbs another's: a request over its
/// container's limit fails alone, and a memory bomb in a neighbour pod ends
/// OOMKilled while the function keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limits_hold_per_request_and_a_neighbour_keeps_serving() {
    let net = test_network();
    let wasmlet = networked(&net).await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let ip = pod_ip(&wasmlet, &pod.id).await;
    let config = function_builder("limited", 8080)
        .memory_limit(32 * MIB)
        .build();
    let log = pod.container_log(&config);
    let id = cri.start(&pod, config).await.unwrap();
    assert_eq!(get(&net, &ip, 8080, "/alloc?mib=8").await.0, 200);
    let (status, body) = get(&net, &ip, 8080, "/alloc?mib=64").await;
    assert_eq!(status, 500, "{body}");
    // The client learns that it failed; the trap and the guest's backtrace
    // go to the container log, where its tenant looks.
    assert_eq!(body, "the function failed\n");
    wait_for_log(
        &log,
        GUEST_TIMEOUT,
        "the failed request's trap",
        |records| {
            stream_lines(records, Stream::Stderr)
                .iter()
                .any(|l| l.starts_with("wasmlet: request failed:") && l.contains("wasm"))
        },
    )
    .await
    .unwrap();
    assert_eq!(get(&net, &ip, 8080, "/healthz").await.0, 200);

    // The bomb, in another pod.
    let bomb_pod = cri
        .run_pod(wasmlet.pod().name("bomb").build())
        .await
        .unwrap();
    let bomb = ContainerConfigBuilder::new("bomb", HOG_P1)
        .memory_limit(48 * MIB)
        .build();
    let bomb_id = cri.start(&bomb_pod, bomb).await.unwrap();
    for _ in 0..5 {
        assert_eq!(get(&net, &ip, 8080, "/hello").await.0, 200);
    }
    let ended = cri.wait_exited(&bomb_id, GUEST_TIMEOUT).await.unwrap();
    assert_eq!((ended.exit_code, ended.reason.as_str()), (137, "OOMKilled"));
    assert_eq!(get(&net, &ip, 8080, "/hello").await.0, 200);
    let status = cri.container_status(&id).await.unwrap();
    assert_eq!(status.state, cri::ContainerState::ContainerRunning as i32);
    let (requests, errors) = http_metrics(&wasmlet, &id).await;
    assert!(requests >= 9, "{requests}");
    assert_eq!(errors, 1);
}

/// A function's outgoing request leaves from its pod: the name is looked up
/// with the pod's DNS settings, from the pod's address, and the request
/// reaches a function in another pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outgoing_requests_resolve_and_leave_from_the_pod() {
    use wasmlet_conformance::pod_network::DnsServer;
    let net = test_network();
    let wasmlet = networked(&net).await;
    let mut cri = wasmlet.cri();
    let a = cri.run_pod(wasmlet.pod().name("a").build()).await.unwrap();
    let a_ip = pod_ip(&wasmlet, &a.id).await;
    cri.start(&a, function("a", 8080)).await.unwrap();
    assert_eq!(get(&net, &a_ip, 8080, "/healthz").await.0, 200);
    let dns = DnsServer::start(
        &net.gateway(),
        [("svc-a.test".to_owned(), a_ip.parse().unwrap())].into(),
    )
    .unwrap();
    let mut config = wasmlet.pod().name("b").build();
    config.dns_config = Some(cri::DnsConfig {
        servers: vec![net.gateway()],
        searches: vec!["test".into()],
        options: vec![],
    });
    let b = cri.run_pod(config).await.unwrap();
    let b_ip = pod_ip(&wasmlet, &b.id).await;
    // The kubelet's /etc/hosts (hostAliases) is read before DNS.
    let hosts = wasmlet.scratch("b-etc").join("hosts");
    std::fs::write(
        &hosts,
        format!("127.0.0.1 localhost\n{a_ip} db.internal db\n"),
    )
    .unwrap();
    let b_function = function_builder("b", 8080)
        .mount(&hosts, "/etc/hosts", true)
        .build();
    cri.start(&b, b_function).await.unwrap();
    assert_eq!(
        get(&net, &b_ip, 8080, "/fetch?url=http://svc-a:8080/hi").await,
        (200, "fetched 200 hello from a path=/hi\n".to_owned())
    );
    let before = dns.queries().len();
    assert_eq!(
        get(&net, &b_ip, 8080, "/fetch?url=http://db:8080/hosts").await,
        (200, "fetched 200 hello from a path=/hosts\n".to_owned())
    );
    assert_eq!(dns.queries().len(), before, "a hosts-file name went to DNS");
    let queries = dns.queries();
    assert!(!queries.is_empty());
    for (from, _) in &queries {
        assert_eq!(from.ip().to_string(), b_ip, "{queries:?}");
    }
    let (status, body) = get(&net, &b_ip, 8080, "/fetch?url=http://nowhere:8080/").await;
    assert_eq!(status, 502, "{body}");
}

/// HTTPS to a host name: looked up with the pod's DNS settings, connected
/// to from the pod, and the server's certificate verified against the name
/// (SNI) with the CA of `[http] ca_file`; a certificate for another name
/// fails the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outgoing_https_to_a_host_name_is_verified_against_that_name() {
    use wasmlet_conformance::fixtures::registry::throwaway_tls;
    use wasmlet_conformance::pod_network::DnsServer;
    let net = test_network();
    let gateway = net.gateway();
    let dir = tempfile::tempdir().unwrap();
    let tls = throwaway_tls(dir.path(), "DNS:secure.test").await.unwrap();
    std::fs::write(dir.path().join("hi.txt"), "hello over tls").unwrap();
    let config = format!(
        "{}\n[http]\nca_file = {:?}\n",
        net.wasmlet_config(),
        tls.ca_pem
    );
    let wasmlet = Wasmlet::builder().config(config).start().await;
    let mut cri = wasmlet.cri();
    let mut pod = wasmlet.pod().name("client").build();
    pod.dns_config = Some(cri::DnsConfig {
        servers: vec![gateway.clone()],
        searches: vec!["test".into()],
        options: vec![],
    });
    // The bridge has its (gateway) address once it has a pod.
    let pod = cri.run_pod(pod).await.unwrap();
    let ip = pod_ip(&wasmlet, &pod.id).await;
    // An HTTPS server on the bridge's own address, and names for it.
    let port = 8443;
    let _server = tokio::process::Command::new("openssl")
        .args(["s_server", "-quiet", "-WWW", "-accept"])
        .arg(format!("{gateway}:{port}"))
        .arg("-cert")
        .arg(&tls.certificate)
        .arg("-key")
        .arg(&tls.key)
        .current_dir(dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + GUEST_TIMEOUT;
    while tokio::net::TcpStream::connect((gateway.as_str(), port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "s_server did not listen"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _dns = DnsServer::start(
        &gateway,
        [
            ("secure.test".to_owned(), gateway.parse().unwrap()),
            ("other.test".to_owned(), gateway.parse().unwrap()),
        ]
        .into(),
    )
    .unwrap();
    cri.start(&pod, function("client", 8080)).await.unwrap();
    assert_eq!(
        get(
            &net,
            &ip,
            8080,
            &format!("/fetch?url=https://secure.test:{port}/hi.txt")
        )
        .await,
        (200, "fetched 200 hello over tls".to_owned())
    );
    // The same server under a name its certificate does not hold.
    let (status, body) = get(
        &net,
        &ip,
        8080,
        &format!("/fetch?url=https://other.test:{port}/hi.txt"),
    )
    .await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("fetch failed"), "{body}");
}

/// The pod's annotations set a function's request timeout and concurrency:
/// a request over the deadline is answered 504 and its instance ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_its_deadline_gets_504() {
    let net = test_network();
    let wasmlet = networked(&net).await;
    let mut cri = wasmlet.cri();
    let config = wasmlet
        .pod()
        .annotation("wasmlet.dev/http-request-timeout-seconds", "1")
        .annotation("wasmlet.dev/http-max-concurrency", "1")
        .build();
    let pod = cri.run_pod(config).await.unwrap();
    let ip = pod_ip(&wasmlet, &pod.id).await;
    let id = cri.start(&pod, function("slow", 8080)).await.unwrap();
    assert_eq!(get(&net, &ip, 8080, "/healthz").await.0, 200);
    let (status, body) = get(&net, &ip, 8080, "/spin?ms=5000").await;
    assert_eq!(status, 504, "{body}");
    // The slot is free again: the next request is served.
    assert_eq!(get(&net, &ip, 8080, "/healthz").await.0, 200);
    assert_eq!(http_metrics(&wasmlet, &id).await, (3, 1));
}
