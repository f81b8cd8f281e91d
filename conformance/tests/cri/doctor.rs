//! `wasmlet doctor` on a good node and on a broken one, and the figure its
//! `vm.max_map_count` check rests on, measured.

use std::process::Output;

use wasmlet_conformance::ContainerConfigBuilder;

use crate::SLEEPER_P1;
use crate::daemon::Wasmlet;
use crate::networked::{networked, test_network};

/// `wasmlet --config FILE doctor ARGS` for `wasmlet`'s root and socket.
fn doctor(wasmlet: &Wasmlet, config: &str, args: &[&str]) -> Output {
    let file = wasmlet.scratch("doctor").join("wasmlet.toml");
    std::fs::write(&file, config).unwrap();
    let mut all = vec!["--config", file.to_str().unwrap(), "--root"];
    let root = wasmlet.root();
    all.push(root.to_str().unwrap());
    all.push("doctor");
    all.extend_from_slice(args);
    wasmlet.cli(&all, None)
}

fn lines(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_passes_a_good_node_and_names_what_a_broken_one_lacks() {
    let net = test_network();
    let wasmlet = networked(&net).await;
    let kubelet = wasmlet.scratch("kubelet").join("config.yaml");
    std::fs::write(
        &kubelet,
        "kind: KubeletConfiguration\nfeatureGates:\n  PodAndContainerStatsFromCRI: true\n",
    )
    .unwrap();
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = doctor(
        &wasmlet,
        &format!(
            "{}\n[metrics]\naddress = \"{free}\"\n",
            net.wasmlet_config()
        ),
        &[
            "--pods",
            "110",
            "--kubelet-config",
            kubelet.to_str().unwrap(),
        ],
    );
    let report = lines(&out);
    assert!(
        out.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "ok    network namespaces",
        "ok    vm.max_map_count",
        "ok    CNI configuration",
        "ok    CNI plugins",
        "ok    read-only mounts",
        "ok    metrics",
        "warn  kubelet stats",
    ] {
        assert!(
            report.lines().any(|l| l.starts_with(line)),
            "no {line:?} in:\n{report}"
        );
    }
    assert!(!report.contains("FAIL"), "{report}");
    // The running agent answers on the socket.
    assert!(report.contains("already serves it"), "{report}");
    assert!(report.contains(&format!("{free} is free")), "{report}");

    // No CNI configuration, a downstream runtime that is not there, and
    // more pods than the map count allows.
    let empty = wasmlet.scratch("no-cni");
    let broken = format!(
        "[network]\ncni_conf_dir = \"{}\"\n[delegate]\nsocket = \"{}\"\n",
        empty.display(),
        wasmlet
            .scratch("no-runtime")
            .join("containerd.sock")
            .display()
    );
    let out = doctor(&wasmlet, &broken, &["--pods", "100000000"]);
    let report = lines(&out);
    assert!(!out.status.success(), "{report}");
    for line in [
        "FAIL  vm.max_map_count",
        "FAIL  CNI configuration",
        "FAIL  downstream runtime",
    ] {
        assert!(
            report.lines().any(|l| l.starts_with(line)),
            "no {line:?} in:\n{report}"
        );
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("3 check(s) failed"), "{stderr}");

    // A metrics address another program holds.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let out = doctor(
        &wasmlet,
        &format!(
            "{}\n[metrics]\naddress = \"{}\"\n",
            net.wasmlet_config(),
            taken.local_addr().unwrap()
        ),
        &[],
    );
    let report = lines(&out);
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("warn  metrics") && l.contains("taken by another program")),
        "{report}"
    );

    // A configured network whose plugin is missing.
    let cni = wasmlet.scratch("cni-missing-plugin");
    std::fs::write(
        cni.join("10-x.conflist"),
        r#"{"cniVersion":"0.4.0","name":"x","plugins":[{"type":"no-such-plugin"}]}"#,
    )
    .unwrap();
    let out = doctor(
        &wasmlet,
        &format!("[network]\ncni_conf_dir = \"{}\"\n", cni.display()),
        &[],
    );
    let report = lines(&out);
    assert!(!out.status.success(), "{report}");
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("FAIL  CNI plugins") && l.contains("no-such-plugin")),
        "{report}"
    );
}

/// The memory mappings a running guest adds to the agent, measured: what
/// doctor's `vm.max_map_count` check assumes per pod must cover it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_takes_no_more_memory_mappings_than_doctor_assumes() {
    const PODS: usize = 20;
    let wasmlet = Wasmlet::start().await;
    let maps = || {
        std::fs::read_to_string(format!("/proc/{}/maps", wasmlet.pid()))
            .unwrap()
            .lines()
            .count()
    };
    let mut cri = wasmlet.cri();
    // One pod first, so the engine's one-time mappings are not counted.
    let first = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    cri.start(&first, ContainerConfigBuilder::new("s", SLEEPER_P1).build())
        .await
        .unwrap();
    let before = maps();
    for _ in 0..PODS {
        let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
        cri.start(&pod, ContainerConfigBuilder::new("s", SLEEPER_P1).build())
            .await
            .unwrap();
    }
    let per_pod = maps().saturating_sub(before).div_ceil(PODS);
    eprintln!("doctor: a running pod adds {per_pod} memory mappings to the agent");
    let assumed = doctor_maps_per_pod(&wasmlet);
    assert!(
        per_pod as u64 <= assumed,
        "a pod adds {per_pod} mappings; doctor assumes {assumed}"
    );
}

/// Doctor's figure per pod, as its output states what `--pods` needs.
fn doctor_maps_per_pod(wasmlet: &Wasmlet) -> u64 {
    let needs = |pods: &str| -> u64 {
        let out = doctor(wasmlet, "", &["--pods", pods]);
        let report = lines(&out);
        report
            .lines()
            .find(|l| l.contains("vm.max_map_count"))
            .and_then(|l| l.split_once("(needs "))
            .and_then(|(_, rest)| rest.split(')').next()?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no figure in:\n{report}"))
    };
    needs("2") - needs("1")
}
