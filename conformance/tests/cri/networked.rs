//! What the network and HTTP function tests share: a test network, a
//! daemon wired to it, and a pod's IP.

use wasmlet_conformance::pod_network::TestNetwork;

use crate::daemon::Wasmlet;

/// A CNI network of the test's own; fails the test where it cannot exist.
pub fn test_network() -> TestNetwork {
    TestNetwork::create().unwrap_or_else(|e| panic!("the network tests need: {e}"))
}

/// A daemon whose pods are networked by `net`.
pub async fn networked(net: &TestNetwork) -> Wasmlet {
    Wasmlet::builder()
        .config(net.wasmlet_config())
        .start()
        .await
}

/// The pod's IP as PodSandboxStatus reports it ("" without one).
pub async fn pod_ip(wasmlet: &Wasmlet, pod: &str) -> String {
    wasmlet
        .cri()
        .pod_sandbox_status(pod)
        .await
        .unwrap()
        .network
        .unwrap_or_default()
        .ip
}
