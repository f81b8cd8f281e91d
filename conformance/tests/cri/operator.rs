//! What an operator reads and sets: `--help`, the configuration reference
//! and its refusals, JSON logs with a span per CRI call, and the log filter
//! changed while the daemon runs.

use std::ffi::OsString;
use std::time::{Duration, Instant};

use wasmlet_conformance::ContainerConfigBuilder;

use crate::SLEEPER_P1;
use crate::daemon::Wasmlet;

/// How long one CLI command may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a logged line may take to reach the daemon's log file.
const LOG_TIMEOUT: Duration = Duration::from_secs(5);

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn help_describes_the_program_for_an_operator() {
    let output = Wasmlet::run(["--help"], None, CLI_TIMEOUT);
    assert!(output.status.success(), "{}", stderr(&output));
    let help = stdout(&output);
    for needle in [
        "Kubernetes node agent",
        "serve",
        "image",
        "admin",
        "play",
        "config",
        "WASMLET_CONFIG",
        "containerRuntimeEndpoint: unix:///run/wasmlet/wasmlet.sock",
        "kind: RuntimeClass",
        "--log-format",
    ] {
        assert!(help.contains(needle), "--help lacks {needle:?}:\n{help}");
    }
}

#[test]
fn config_default_prints_the_readme_reference() {
    let output = Wasmlet::run(["config", "default"], None, CLI_TIMEOUT);
    assert!(output.status.success(), "{}", stderr(&output));
    let readme = include_str!("../../../README.md");
    let marker = "<!-- the output of `wasmlet config default` -->\n```toml\n";
    let start = readme.find(marker).expect("the README marks the reference") + marker.len();
    let end = start + readme[start..].find("```\n").expect("the block ends");
    assert_eq!(
        stdout(&output),
        readme[start..end],
        "the README's reference is not `wasmlet config default`'s output"
    );
}

#[test]
fn the_reference_is_a_valid_config_and_an_unknown_key_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let reference = stdout(&Wasmlet::run(["config", "default"], None, CLI_TIMEOUT));
    let good = dir.path().join("good.toml");
    std::fs::write(&good, &reference).unwrap();
    let check = |config: &std::path::Path, args: &[&str]| {
        let mut all: Vec<OsString> = vec!["--config".into(), config.into()];
        all.extend(args.iter().map(OsString::from));
        all.extend(["--socket".into(), dir.path().join("s.sock").into()]);
        Wasmlet::run(all, None, CLI_TIMEOUT)
    };
    let output = check(&good, &["config", "check"]);
    assert!(output.status.success(), "{}", stderr(&output));

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[streaming]\naddress = \"127.0.0.1:0\"\ntoken_ttl = 5\n",
    )
    .unwrap();
    for args in [&["config", "check"][..], &["serve"][..]] {
        let output = check(&bad, args);
        assert!(!output.status.success(), "{args:?} accepted {bad:?}");
        let message = stderr(&output);
        assert!(
            message.contains(
                "line 3: unknown key `token_ttl` in [streaming] (did you mean `token_ttl_seconds`?)"
            ),
            "{args:?}: {message}"
        );
    }
}

/// The daemon's log lines so far, each parsed as JSON (a line that is not
/// fails the test).
fn json_lines(wasmlet: &Wasmlet) -> Vec<serde_json::Value> {
    wasmlet
        .daemon_log()
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect()
}

/// Waits until a line `matches`; returns it.
async fn wait_for_line(
    wasmlet: &Wasmlet,
    what: &str,
    matches: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + LOG_TIMEOUT;
    loop {
        if let Some(line) = json_lines(wasmlet).into_iter().find(&matches) {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no log line {what} within {LOG_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn json_logs_carry_the_cri_method_and_ids_of_each_call() {
    let mut wasmlet = Wasmlet::builder().rust_log("info").build();
    let mut cri = wasmlet.serve_with(&["--log-format", "json"]).await;
    let pod = cri
        .run_pod(wasmlet.pod().namespace("shop").name("web-0").build())
        .await
        .unwrap();
    let config = ContainerConfigBuilder::new("app", SLEEPER_P1).build();
    let id = cri.create_container(&pod, config).await.unwrap();

    let created = wait_for_line(&wasmlet, "closing CreateContainer", |line| {
        line["span"]["method"] == "CreateContainer" && line["fields"]["message"] == "answered"
    })
    .await;
    assert_eq!(created["level"], "INFO", "{created}");
    assert_eq!(created["span"]["container_id"], id.as_str(), "{created}");
    assert_eq!(
        created["span"]["pod_sandbox_id"],
        pod.id.as_str(),
        "{created}"
    );
    assert_eq!(created["span"]["pod"], "shop/web-0", "{created}");
    assert_eq!(created["span"]["container"], "app", "{created}");
    assert_eq!(created["span"]["image"], SLEEPER_P1, "{created}");
    assert!(created["fields"]["elapsed_ms"].is_number(), "{created}");
    let ran = wait_for_line(&wasmlet, "closing RunPodSandbox", |line| {
        line["span"]["method"] == "RunPodSandbox"
    })
    .await;
    assert_eq!(ran["span"]["pod_sandbox_id"], pod.id.as_str(), "{ran}");

    let error = cri.start_container(crate::UNKNOWN_ID).await.unwrap_err();
    let failed = wait_for_line(&wasmlet, "closing a failed StartContainer", |line| {
        line["span"]["method"] == "StartContainer"
    })
    .await;
    assert_eq!(failed["level"], "WARN", "{failed}");
    assert_eq!(failed["fields"]["message"], "failed", "{failed}");
    assert_eq!(
        failed["span"]["container_id"],
        crate::UNKNOWN_ID,
        "{failed}"
    );
    assert!(failed["fields"]["code"].is_string(), "{failed} ({error})");
}

/// `wasmlet --socket SOCK admin log-level ARGS...`, asserting success;
/// returns what it printed.
fn log_level(wasmlet: &Wasmlet, args: &[&str]) -> String {
    let mut all = vec!["admin", "log-level"];
    all.extend_from_slice(args);
    let output = wasmlet.cli(&all, None);
    assert!(
        output.status.success(),
        "admin log-level {args:?}: {}",
        stderr(&output)
    );
    stdout(&output).trim().to_owned()
}

#[tokio::test]
async fn the_log_filter_changes_while_the_daemon_runs() {
    let mut wasmlet = Wasmlet::builder().rust_log("info").build();
    let mut cri = wasmlet.serve_with(&["--log-format", "json"]).await;
    let polled = |line: &serde_json::Value| line["span"]["method"] == "ListContainers";

    // Polling calls close at DEBUG: not logged under "info".
    cri.list_containers(None).await.unwrap();
    assert_eq!(log_level(&wasmlet, &[]), "info");
    assert!(!json_lines(&wasmlet).iter().any(polled));

    assert_eq!(log_level(&wasmlet, &["debug"]), "debug (was info)");
    cri.list_containers(None).await.unwrap();
    let line = wait_for_line(&wasmlet, "closing ListContainers", polled).await;
    assert_eq!(line["level"], "DEBUG", "{line}");

    // A filter that does not parse changes nothing.
    let output = wasmlet.cli(&["admin", "log-level", "wasmlet=loud"], None);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("does not parse"),
        "{}",
        stderr(&output)
    );
    assert_eq!(log_level(&wasmlet, &[]), "debug");

    assert_eq!(log_level(&wasmlet, &["warn"]), "warn (was debug)");
    let before = json_lines(&wasmlet).len();
    cri.run_pod(wasmlet.pod().build()).await.unwrap();
    cri.list_containers(None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = json_lines(&wasmlet);
    assert!(
        after[before..]
            .iter()
            .all(|line| line["level"] == "WARN" || line["level"] == "ERROR"),
        "lines below WARN after `log-level warn`: {:?}",
        &after[before..]
    );
}
