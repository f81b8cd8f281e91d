//! Pod networking through real CNI plugins (Debian's
//! containernetworking-plugins), in namespaces and on a bridge each test
//! makes for itself: pod IPs, pod-to-pod and host-to-pod traffic, hostPort
//! mappings, teardown and recovery, and guests without a network.
//!
//! Every address used is in the test's own /24 and checked to route
//! through its bridge before anything is sent (`TestNetwork::connect`).

use std::time::Duration;

use wasmlet_conformance::pod_network::TestNetwork;
use wasmlet_conformance::{ContainerConfigBuilder, Stream, cri, stream_lines, wait_for_log};

use crate::daemon::Wasmlet;
use crate::networked::{networked, pod_ip, test_network};
use crate::{GUEST_TIMEOUT, PONG_P2};

const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A pong server on `port`, answering `pong <name>`.
fn pong_server(name: &str, port: u16) -> cri::ContainerConfig {
    ContainerConfigBuilder::new(name, PONG_P2)
        .env("LISTEN_PORT", port.to_string())
        .env("PONG_NAME", name)
        .build()
}

/// Starts a pong server on `port` in `pod` and waits until it listens.
async fn serve_pong(
    cri: &mut wasmlet_conformance::CriClient,
    pod: &wasmlet_conformance::Pod,
    name: &str,
    port: u16,
) {
    let server = pong_server(name, port);
    let log = pod.container_log(&server);
    cri.start(pod, server).await.unwrap();
    wait_stdout(&log, "the server to listen", |l| {
        l.starts_with("listening on")
    })
    .await;
}

/// Waits for `what` in the container's stdout.
async fn wait_stdout(
    log: &std::path::Path,
    what: &str,
    pred: impl Fn(&str) -> bool,
) -> Vec<String> {
    let records = wait_for_log(log, GUEST_TIMEOUT, what, |records| {
        stream_lines(records, Stream::Stdout)
            .iter()
            .any(|l| pred(l))
    })
    .await
    .unwrap();
    stream_lines(&records, Stream::Stdout)
}

/// Reads what a pod's server sends, retrying while it starts listening.
async fn read_from(net: &TestNetwork, ip: &str, port: u16) -> String {
    let deadline = tokio::time::Instant::now() + GUEST_TIMEOUT;
    loop {
        match net.read_all(ip, port, IO_TIMEOUT) {
            Ok(text) => return text,
            Err(e) if tokio::time::Instant::now() >= deadline => panic!("{e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cni_config_the_network_is_not_ready_and_guests_get_no_sockets() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let status = cri.status(false).await.unwrap().status.unwrap();
    let network = status
        .conditions
        .iter()
        .find(|c| c.r#type == "NetworkReady")
        .unwrap();
    assert!(!network.status, "{network:?}");
    assert_eq!(network.reason, "NetworkPluginNotReady");
    assert!(
        network.message.contains("no CNI network configuration"),
        "{network:?}"
    );

    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    assert_eq!(pod_ip(&wasmlet, &pod.id).await, "");
    let config = ContainerConfigBuilder::new("no-sockets", PONG_P2)
        .env("CONNECT_TO", "127.0.0.1:9")
        .env("LISTEN_PORT", "7000")
        .build();
    let log = pod.container_log(&config);
    let id = cri.start(&pod, config).await.unwrap();
    let status = cri.wait_exited(&id, GUEST_TIMEOUT).await.unwrap();
    assert_eq!(status.exit_code, 1);
    let lines = wait_stdout(&log, "both socket attempts to fail", |l| {
        l.starts_with("listen error")
    })
    .await;
    assert!(
        lines.iter().any(|l| l.starts_with("connect error")),
        "{lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_get_ips_reach_each_other_and_the_host_and_leave_nothing_behind() {
    let net = test_network();
    let wasmlet = networked(&net).await;
    let mut cri = wasmlet.cri();
    let status = cri.status(false).await.unwrap().status.unwrap();
    let ready = status
        .conditions
        .iter()
        .find(|c| c.r#type == "NetworkReady")
        .unwrap();
    assert!(ready.status, "{ready:?}");

    // A server pod, reached from the host through the bridge.
    let a = cri.run_pod(wasmlet.pod().name("a").build()).await.unwrap();
    let a_ip = pod_ip(&wasmlet, &a.id).await;
    assert!(
        net.contains(&a_ip),
        "pod IP {a_ip:?} outside {}",
        net.prefix
    );
    net.check_route(&a_ip).unwrap();
    serve_pong(&mut cri, &a, "a", 7000).await;
    assert_eq!(read_from(&net, &a_ip, 7000).await, "pong a\n");

    // A second pod reaches the first at its IP.
    let b = cri.run_pod(wasmlet.pod().name("b").build()).await.unwrap();
    let b_ip = pod_ip(&wasmlet, &b.id).await;
    assert!(net.contains(&b_ip) && b_ip != a_ip, "{a_ip} {b_ip}");
    let client = ContainerConfigBuilder::new("client", PONG_P2)
        .env("CONNECT_TO", format!("{a_ip}:7000"))
        .build();
    let b_log = b.container_log(&client);
    let id = cri.start(&b, client).await.unwrap();
    assert_eq!(
        cri.wait_exited(&id, GUEST_TIMEOUT).await.unwrap().exit_code,
        0
    );
    let lines = wait_stdout(&b_log, "the client's answer", |l| l.starts_with("got")).await;
    assert_eq!(lines, ["got pong a"]);

    assert_eq!(net.namespaces().len(), 2, "{:?}", net.namespaces());
    assert_eq!(net.allocated_ips(), {
        let mut ips = vec![a_ip.clone(), b_ip.clone()];
        ips.sort();
        ips
    });
    assert_eq!(net.bridge_ports().len(), 2, "{:?}", net.bridge_ports());

    // Stopping tears the network down; stopping again is fine.
    for pod in [&a, &b] {
        cri.stop_pod_sandbox(&pod.id).await.unwrap();
        cri.stop_pod_sandbox(&pod.id).await.unwrap();
    }
    assert_eq!(pod_ip(&wasmlet, &a.id).await, "");
    assert!(net.namespaces().is_empty(), "{:?}", net.namespaces());
    assert!(net.allocated_ips().is_empty(), "{:?}", net.allocated_ips());
    assert!(net.bridge_ports().is_empty(), "{:?}", net.bridge_ports());
    for pod in [&a, &b] {
        cri.remove_pod_sandbox(&pod.id).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_port_mapping_reaches_the_pod() {
    let net = test_network();
    let wasmlet = networked(&net).await;
    let mut cri = wasmlet.cri();
    let host_port = 20_000 + (std::process::id() % 20_000) as u16;
    let mut config = wasmlet.pod().build();
    config.port_mappings.push(cri::PortMapping {
        protocol: cri::Protocol::Tcp as i32,
        container_port: 7000,
        host_port: i32::from(host_port),
        host_ip: String::new(),
    });
    let pod = cri.run_pod(config).await.unwrap();
    serve_pong(&mut cri, &pod, "mapped", 7000).await;
    // The host's own address on the bridge, at the host port: portmap's
    // DNAT takes it to the pod.
    assert_eq!(
        read_from(&net, &net.gateway(), host_port).await,
        "pong mapped\n"
    );
    cri.stop_pod_sandbox(&pod.id).await.unwrap();
    assert!(
        net.read_all(&net.gateway(), host_port, IO_TIMEOUT).is_err(),
        "the mapping outlived its pod"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_readopts_pod_networks() {
    let net = test_network();
    let mut wasmlet = networked(&net).await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let ip = pod_ip(&wasmlet, &pod.id).await;
    serve_pong(&mut cri, &pod, "before", 7000).await;

    wasmlet.kill_9().await;
    let mut cri = wasmlet.restart().await;
    let status = cri.pod_sandbox_status(&pod.id).await.unwrap();
    assert_eq!(status.state, cri::PodSandboxState::SandboxReady as i32);
    assert_eq!(status.network.unwrap().ip, ip);
    // The pod's namespace is still there: a new container serves in it.
    let server = ContainerConfigBuilder::new("after", PONG_P2)
        .env("LISTEN_PORT", "7001")
        .env("PONG_NAME", "after")
        .build();
    cri.start(&pod, server).await.unwrap();
    assert_eq!(read_from(&net, &ip, 7001).await, "pong after\n");

    cri.stop_pod_sandbox(&pod.id).await.unwrap();
    assert!(net.namespaces().is_empty(), "{:?}", net.namespaces());
    assert!(net.allocated_ips().is_empty(), "{:?}", net.allocated_ips());
}

/// A guest looks a name up with its pod's DNS settings (search domains,
/// ndots), from inside its pod: the query reaches the pod's name server
/// from the pod's own address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_resolve_names_with_the_pods_dns_settings_from_the_pod() {
    use wasmlet_conformance::pod_network::DnsServer;
    let net = test_network();
    let wasmlet = networked(&net).await;
    let mut cri = wasmlet.cri();
    let a = cri.run_pod(wasmlet.pod().name("a").build()).await.unwrap();
    let a_ip = pod_ip(&wasmlet, &a.id).await;
    serve_pong(&mut cri, &a, "a", 7000).await;

    // The bridge exists now: a name server on its address.
    let dns = DnsServer::start(
        &net.gateway(),
        [("pong-a.svc.test".to_owned(), a_ip.parse().unwrap())].into(),
    )
    .unwrap();
    let mut config = wasmlet.pod().name("b").build();
    config.dns_config = Some(cri::DnsConfig {
        servers: vec![net.gateway()],
        searches: vec!["ns.svc.test".into(), "svc.test".into()],
        options: vec!["ndots:2".into(), "timeout:2".into()],
    });
    let b = cri.run_pod(config).await.unwrap();
    let b_ip = pod_ip(&wasmlet, &b.id).await;
    let client = ContainerConfigBuilder::new("client", PONG_P2)
        .env("CONNECT_TO", "pong-a:7000")
        .build();
    let b_log = b.container_log(&client);
    let id = cri.start(&b, client).await.unwrap();
    cri.wait_exited(&id, GUEST_TIMEOUT).await.unwrap();
    let lines = wait_stdout(&b_log, "the client's answer", |l| {
        l.starts_with("got") || l.starts_with("connect error")
    })
    .await;
    assert_eq!(lines, ["got pong a"]);
    let queries = dns.queries();
    let names: Vec<&str> = queries.iter().map(|(_, n)| n.as_str()).collect();
    // Search domains in order (ndots:2 > 0 dots), the first one missing.
    assert_eq!(names.first(), Some(&"pong-a.ns.svc.test"), "{queries:?}");
    assert!(names.contains(&"pong-a.svc.test"), "{queries:?}");
    for (from, _) in &queries {
        assert_eq!(
            from.ip().to_string(),
            b_ip,
            "a query left from outside pod b: {queries:?}"
        );
    }

    // An unknown name fails the connect.
    let client = ContainerConfigBuilder::new("lost", PONG_P2)
        .env("CONNECT_TO", "nowhere:7000")
        .build();
    let log = b.container_log(&client);
    let id = cri.start(&b, client).await.unwrap();
    cri.wait_exited(&id, GUEST_TIMEOUT).await.unwrap();
    let lines = wait_stdout(&log, "the failed lookup", |l| {
        l.starts_with("connect error")
    })
    .await;
    assert_eq!(lines.len(), 1, "{lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_serve_udp_in_their_pod() {
    let net = test_network();
    let wasmlet = networked(&net).await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let ip = pod_ip(&wasmlet, &pod.id).await;
    let server = ContainerConfigBuilder::new("udp", PONG_P2)
        .env("UDP_PORT", "7053")
        .env("PONG_NAME", "udp")
        .build();
    let log = pod.container_log(&server);
    cri.start(&pod, server).await.unwrap();
    wait_stdout(&log, "the UDP server", |l| l.starts_with("udp listening")).await;
    net.check_route(&ip).unwrap();
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    socket.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    socket.send_to(b"ping", (ip.as_str(), 7053)).unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = socket.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"pong udp ping");
    assert_eq!(from.ip().to_string(), ip);
}

/// A namespace pinned by an agent that died before recording its sandbox
/// is released and removed when the next agent starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphaned_pod_namespaces_are_removed_at_start() {
    let net = test_network();
    let mut wasmlet = networked(&net).await;
    wasmlet.kill_9().await;
    // A namespace of our own (never the host's), pinned where the agent
    // pins pods' namespaces, under a sandbox id it never recorded.
    let name = format!("wasmlet-orphan-test-{}", std::process::id());
    let run = |args: &[&str]| {
        let out = std::process::Command::new(args[0])
            .args(&args[1..])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["ip", "netns", "add", &name]);
    let orphan = net.netns_dir().join("wasmlet-0rphan");
    std::fs::write(&orphan, b"").unwrap();
    let source = format!("/run/netns/{name}");
    run(&["mount", "--bind", &source, orphan.to_str().unwrap()]);
    run(&["ip", "netns", "del", &name]);
    assert_eq!(net.namespaces(), ["wasmlet-0rphan"]);
    wasmlet.restart().await;
    assert!(net.namespaces().is_empty(), "{:?}", net.namespaces());
    assert!(
        wasmlet
            .daemon_log()
            .contains("removed an orphaned pod network namespace"),
        "{}",
        wasmlet.daemon_log()
    );
}

/// A hostNetwork pod's guests use the node's network: a server in one is
/// reached on the host's loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_network_pods_use_the_nodes_network() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let mut config = wasmlet.pod().build();
    config
        .linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
        .namespace_options = Some(cri::NamespaceOption {
        network: cri::NamespaceMode::Node as i32,
        ..Default::default()
    });
    let pod = cri.run_pod(config).await.unwrap();
    assert_eq!(pod_ip(&wasmlet, &pod.id).await, "");
    let port = 30_000 + (std::process::id() % 5_000) as u16;
    serve_pong(&mut cri, &pod, "host", port).await;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut stream, &mut text).unwrap();
    assert_eq!(text, "pong host\n");
}

/// A pod whose namespace disappeared while the agent was down is NOTREADY
/// after the restart (the kubelet then recreates it), and stopping it still
/// releases its address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_whose_namespace_is_gone_after_a_restart_is_not_ready() {
    let net = test_network();
    let mut wasmlet = networked(&net).await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    wasmlet.kill_9().await;
    let [name] = <[String; 1]>::try_from(net.namespaces()).unwrap();
    let pinned = net.netns_dir().join(name);
    let out = std::process::Command::new("umount")
        .arg(&pinned)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(&pinned).unwrap();
    let mut cri = wasmlet.restart().await;
    let status = cri.pod_sandbox_status(&pod.id).await.unwrap();
    assert_eq!(status.state, cri::PodSandboxState::SandboxNotready as i32);
    cri.stop_pod_sandbox(&pod.id).await.unwrap();
    assert!(net.allocated_ips().is_empty(), "{:?}", net.allocated_ips());
}
