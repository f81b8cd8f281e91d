//! Version, Status, RuntimeConfig and UpdateRuntimeConfig.

use wasmlet_conformance::cri;

use crate::daemon::Wasmlet;

#[tokio::test]
async fn version_names_wasmlet_and_cri_api_v1() {
    let wasmlet = Wasmlet::start().await;
    let version = wasmlet.cri().version().await.unwrap();
    assert_eq!(version.runtime_name, "wasmlet");
    assert_eq!(version.runtime_api_version, "v1");
    assert!(!version.runtime_version.is_empty(), "{version:?}");
}

#[tokio::test]
async fn status_reports_runtime_ready_and_network_ready_conditions() {
    let wasmlet = Wasmlet::start().await;
    let status = wasmlet.cri().status(false).await.unwrap();
    let conditions = status
        .status
        .expect("Status without a runtime status")
        .conditions;
    let condition = |kind: &str| {
        conditions
            .iter()
            .find(|c| c.r#type == kind)
            .unwrap_or_else(|| panic!("no {kind} condition in {conditions:?}"))
    };
    assert!(condition("RuntimeReady").status, "{conditions:?}");
    condition("NetworkReady");
}

#[tokio::test]
async fn verbose_status_returns_info() {
    let wasmlet = Wasmlet::start().await;
    let status = wasmlet.cri().status(true).await.unwrap();
    assert!(!status.info.is_empty(), "{status:?}");
}

#[tokio::test]
async fn runtime_config_names_a_cgroup_driver() {
    let wasmlet = Wasmlet::start().await;
    let config = wasmlet.cri().runtime_config().await.unwrap();
    let linux = config
        .linux
        .expect("RuntimeConfig without linux configuration");
    assert!(
        cri::CgroupDriver::try_from(linux.cgroup_driver).is_ok(),
        "unknown cgroup driver {}",
        linux.cgroup_driver
    );
}

#[tokio::test]
async fn update_runtime_config_accepts_the_pod_cidr() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    cri.update_runtime_config("10.88.0.0/16").await.unwrap();
    cri.version().await.unwrap();
}
