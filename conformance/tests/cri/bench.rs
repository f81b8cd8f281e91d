//! The benchmark binary in smoke mode: every scenario at a tiny scale,
//! against the binary under test. Times are not asserted (they are
//! measurements, not tests); that it completes and writes its report is.

use crate::daemon::Wasmlet;

#[test]
fn the_benchmark_runs_every_scenario_and_writes_its_report() {
    let out = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_wasmlet-bench"))
        .arg("--smoke")
        .arg("--out")
        .arg(out.path())
        .arg("--wasmlet")
        .arg(Wasmlet::bin())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let json_path = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
    assert_eq!(report["smoke"], true);
    assert_eq!(report["pod_start"]["pods"], 5);
    assert_eq!(report["pod_start"]["start_to_first_log_line"]["count"], 5);
    assert_eq!(report["density"]["pods"], 10);
    assert!(report["churn"]["pods"].as_u64().unwrap() > 0, "{report}");
    assert!(
        report["functions"]["wasmlet"]["requests"].as_u64().unwrap() > 0,
        "{report}"
    );
    let baseline = &report["baseline_runtime"];
    assert_eq!(baseline["pod_start"]["pods"], 5, "{baseline}");
    assert!(
        baseline["churn"]["pods"].as_u64().unwrap() > 0,
        "{baseline}"
    );
    assert!(
        baseline["pod_start_p50_speedup"].as_f64().unwrap() > 0.0,
        "{baseline}"
    );
    assert_eq!(report["soak"]["cycles"], 20, "{report}");
    assert_eq!(report["soak_with_cni"]["cycles"], 4, "{report}");
    assert!(
        report["soak"]["samples"][0]["threads"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert!(
        report["cpu_quota"]["both_cores_busy_share"]
            .as_f64()
            .unwrap()
            > 0.0,
        "{report}"
    );
    for neighbour in ["spinning", "memory_bomb", "log_flood"] {
        assert!(
            report["neighbours"][neighbour]["run"]["requests"]
                .as_u64()
                .unwrap()
                > 0,
            "{report}"
        );
    }
    assert!(report["command"].as_str().unwrap().contains("--smoke"));
    let markdown = std::fs::read_to_string(json_path.replace(".json", ".md")).unwrap();
    assert!(
        markdown.contains("| pod start | p50 ms (to first log line) |")
            && markdown.contains("| baseline: containerd + runc | pod start p50 ms")
            && markdown.contains("| noisy neighbours | p99 ratio, neighbour spinning |"),
        "{markdown}"
    );
}
