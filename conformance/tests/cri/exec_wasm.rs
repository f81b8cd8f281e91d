//! Guest execution: how a container config becomes a Wasm guest (argv, env,
//! preopened mounts), how its end is reported (exit codes, traps, start
//! errors), and how its output lands in the CRI log.

use std::path::Path;
use std::time::{Duration, SystemTime};

use wasmlet_conformance::{
    ContainerConfigBuilder, LogRecord, Stream, cri, lines, read_cri_log, stream_lines, wait_for_log,
};

use crate::daemon::Wasmlet;
use crate::{
    ECHO_P1, ECHO_P2, GUEST_TIMEOUT, RUNNING_TIMEOUT, SLEEPER_P1, SPIN_P1, TICKER_P1, TRAP_P1,
};

/// The CRI log's maximum record size: longer lines are split.
const MAX_RECORD_BYTES: usize = 16 * 1024;

/// Runs `config` to exit in a pod of its own; returns the final status and the
/// (strictly parsed) log.
async fn run(
    wasmlet: &Wasmlet,
    config: ContainerConfigBuilder,
) -> (cri::ContainerStatus, Vec<LogRecord>) {
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let config = config.build();
    let log = pod.container_log(&config);
    let status = cri.run_to_exit(&pod, config, GUEST_TIMEOUT).await.unwrap();
    (status, read_cri_log(log).unwrap())
}

fn stdout(records: &[LogRecord]) -> Vec<String> {
    stream_lines(records, Stream::Stdout)
}

fn stderr(records: &[LogRecord]) -> Vec<String> {
    stream_lines(records, Stream::Stderr)
}

/// `lines` without the `env HOSTNAME=` line, which every guest has (the
/// pod's hostname, as containerd sets it), after checking it is there.
fn without_hostname(lines: Vec<String>) -> Vec<String> {
    let (hostname, rest): (Vec<String>, Vec<String>) = lines
        .into_iter()
        .partition(|l| l.starts_with("env HOSTNAME="));
    assert!(
        hostname.len() == 1 && hostname[0].starts_with("env HOSTNAME=pod-"),
        "HOSTNAME is the pod's hostname: {hostname:?}"
    );
    rest
}

/// The `env KEY=VALUE` lines `echo` printed.
fn env_lines(records: &[LogRecord]) -> Vec<String> {
    stdout(records)
        .into_iter()
        .filter(|line| line.starts_with("env "))
        .collect()
}

fn ns(time: SystemTime) -> i64 {
    let since_epoch = time.duration_since(SystemTime::UNIX_EPOCH).unwrap();
    i64::try_from(since_epoch.as_nanos()).unwrap()
}

#[tokio::test]
async fn exit_code_zero_is_reported_as_completed() {
    let wasmlet = Wasmlet::start().await;
    let (status, log) = run(&wasmlet, ContainerConfigBuilder::new("echo", ECHO_P1)).await;
    assert_eq!(status.exit_code, 0, "{status:?}");
    assert_eq!(status.reason, "Completed", "{status:?}");
    assert_eq!(stderr(&log), ["echo done"]);
}

#[tokio::test]
async fn nonzero_exit_code_is_reported_with_reason_error() {
    let wasmlet = Wasmlet::start().await;
    let config = ContainerConfigBuilder::new("echo", ECHO_P1).env("EXIT_CODE", "7");
    let (status, _) = run(&wasmlet, config).await;
    assert_eq!(status.exit_code, 7, "{status:?}");
    assert_eq!(status.reason, "Error", "{status:?}");
}

#[tokio::test]
async fn trap_is_exit_code_134_with_the_trap_in_the_message() {
    let wasmlet = Wasmlet::start().await;
    let (status, log) = run(&wasmlet, ContainerConfigBuilder::new("trap", TRAP_P1)).await;
    assert_eq!(status.exit_code, 134, "{status:?}");
    assert_eq!(status.reason, "Error", "{status:?}");
    assert!(status.message.contains("unreachable"), "{status:?}");
    assert_eq!(stdout(&log), ["about to trap"]);
}

#[tokio::test]
async fn argv_is_the_command_followed_by_the_args() {
    let wasmlet = Wasmlet::start().await;
    let config = ContainerConfigBuilder::new("echo", ECHO_P1)
        .command(["echo.wasm", "--from-command"])
        .args(["two words", "--flag=x"]);
    let (status, log) = run(&wasmlet, config).await;
    assert_eq!(status.exit_code, 0, "{status:?}");
    let argv: Vec<_> = stdout(&log)
        .into_iter()
        .filter(|line| line.starts_with("arg"))
        .collect();
    assert_eq!(
        argv,
        [
            "argc=4",
            "arg[0]=echo.wasm",
            "arg[1]=--from-command",
            "arg[2]=two words",
            "arg[3]=--flag=x",
        ]
    );
}

#[tokio::test]
async fn env_is_exactly_the_configured_variables() {
    let wasmlet = Wasmlet::start().await;
    // The daemon's own environment (HOME, PATH, RUST_LOG...) must not leak in.
    assert!(
        std::env::var_os("PATH").is_some(),
        "the test needs a PATH to leak"
    );
    let config = ContainerConfigBuilder::new("echo", ECHO_P1)
        .env("FOO", "bar")
        .env("EMPTY", "")
        .env("WITH_EQUALS", "a=b c")
        .env("UNICODE", "ünï");
    let (status, log) = run(&wasmlet, config).await;
    assert_eq!(status.exit_code, 0, "{status:?}");
    assert_eq!(
        without_hostname(env_lines(&log)),
        [
            "env EMPTY=",
            "env FOO=bar",
            "env UNICODE=ünï",
            "env WITH_EQUALS=a=b c",
        ]
    );
}

#[tokio::test]
async fn a_mount_is_a_preopened_directory_at_its_container_path() {
    let wasmlet = Wasmlet::start().await;
    let data = wasmlet.scratch("data");
    std::fs::write(data.join("greeting.txt"), "hello from the host\n").unwrap();
    let config = ContainerConfigBuilder::new("echo", ECHO_P1)
        .mount(&data, "/data", false)
        .env("READ_FILE", "/data/greeting.txt");
    let (status, log) = run(&wasmlet, config).await;
    assert_eq!(status.exit_code, 0, "{status:?}\n{log:#?}");
    assert!(
        stdout(&log).contains(&"file /data/greeting.txt: hello from the host".to_owned()),
        "{log:#?}"
    );
}

#[tokio::test]
async fn paths_outside_the_mounts_are_not_reachable() {
    let wasmlet = Wasmlet::start().await;
    let secret_dir = wasmlet.scratch("host-only");
    let secret = secret_dir.join("secret.txt");
    std::fs::write(&secret, "host secret\n").unwrap();
    let config =
        ContainerConfigBuilder::new("echo", ECHO_P1).env("READ_FILE", secret.to_string_lossy());
    let (status, log) = run(&wasmlet, config).await;
    assert_eq!(status.exit_code, 2, "{status:?}\n{log:#?}");
    assert!(
        !stdout(&log).iter().any(|line| line.contains("host secret")),
        "{log:#?}"
    );
}

#[tokio::test]
async fn a_readonly_mount_rejects_writes_as_a_read_only_file_system() {
    let wasmlet = Wasmlet::start().await;
    let data = wasmlet.scratch("data");
    // A module and a component: the kernel's EROFS reaches both as theirs
    // (preview1 `rofs`, WASI 0.2 `error-code.read-only`).
    for image in [ECHO_P1, ECHO_P2] {
        let config =
            ContainerConfigBuilder::new(format!("echo-{}", &image[image.len() - 2..]), image)
                .mount(&data, "/data", true)
                .env("WRITE_FILE", "/data/out.txt");
        let (status, log) = run(&wasmlet, config).await;
        // WASI 0.2's exit says only success or failure (1).
        let code = if image == ECHO_P1 { 3 } else { 1 };
        assert_eq!(status.exit_code, code, "{status:?}\n{log:#?}");
        assert!(
            stderr(&log)
                .iter()
                .any(|line| line.starts_with("error writing /data/out.txt: Read-only file system")),
            "{image}: {log:#?}"
        );
        assert!(
            !data.join("out.txt").exists(),
            "the guest wrote through a readonly mount"
        );
    }
}

#[tokio::test]
async fn a_read_write_mount_is_writable() {
    let wasmlet = Wasmlet::start().await;
    let data = wasmlet.scratch("data");
    let config = ContainerConfigBuilder::new("echo", ECHO_P1)
        .mount(&data, "/data", false)
        .env("WRITE_FILE", "/data/out.txt");
    let (status, log) = run(&wasmlet, config).await;
    assert_eq!(status.exit_code, 0, "{status:?}\n{log:#?}");
    assert!(
        stdout(&log).contains(&"wrote /data/out.txt".to_owned()),
        "{log:#?}"
    );
    assert_eq!(
        std::fs::read_to_string(data.join("out.txt")).unwrap(),
        "written"
    );
}

#[tokio::test]
async fn a_wasi_p2_component_runs_like_the_equivalent_module() {
    let wasmlet = Wasmlet::start().await;
    let data = wasmlet.scratch("data");
    std::fs::write(data.join("in.txt"), "same for both").unwrap();
    let config = |image: &str| {
        ContainerConfigBuilder::new(format!("echo-{}", &image[image.len() - 2..]), image)
            .command(["echo"])
            .args(["a", "b c"])
            .env("GREETING", "hi")
            .env("READ_FILE", "/data/in.txt")
            .mount(&data, "/data", true)
    };
    let (module, module_log) = run(&wasmlet, config(ECHO_P1)).await;
    let (component, component_log) = run(&wasmlet, config(ECHO_P2)).await;

    assert_eq!(module.exit_code, 0, "{module:?}");
    assert_eq!(component.exit_code, 0, "{component:?}\n{component_log:#?}");
    assert_eq!(component.reason, "Completed");
    assert_eq!(
        without_hostname(stdout(&component_log)),
        without_hostname(stdout(&module_log))
    );
    assert!(
        stdout(&component_log).contains(&"file /data/in.txt: same for both".to_owned()),
        "{component_log:#?}"
    );
    assert_eq!(stderr(&component_log), ["echo done"]);
}

#[tokio::test]
async fn stdout_and_stderr_are_logged_as_timestamped_cri_records() {
    let wasmlet = Wasmlet::start().await;
    let config = ContainerConfigBuilder::new("echo", ECHO_P1)
        .command(["echo"])
        .env("K", "v");
    let (status, log) = run(&wasmlet, config).await;

    // read_cri_log already rejected any malformed record.
    assert_eq!(
        without_hostname(stdout(&log)),
        ["argc=1", "arg[0]=echo", "env K=v"],
        "{log:#?}"
    );
    assert_eq!(stderr(&log), ["echo done"]);
    assert!(log.iter().all(|r| !r.partial), "{log:#?}");
    for stream in [Stream::Stdout, Stream::Stderr] {
        let times: Vec<_> = log
            .iter()
            .filter(|r| r.stream == stream)
            .map(|r| ns(r.time))
            .collect();
        assert!(
            times.is_sorted(),
            "{stream} timestamps go backwards: {times:?}"
        );
    }
    let window = status.started_at - 1_000_000_000..=status.finished_at + 1_000_000_000;
    for record in &log {
        assert!(
            window.contains(&ns(record.time)),
            "{record:?} is not within the container's run {window:?}"
        );
    }
}

#[tokio::test]
async fn a_line_longer_than_16_kib_is_split_into_partial_records() {
    let wasmlet = Wasmlet::start().await;
    let length: usize = 40_000;
    let config = ContainerConfigBuilder::new("echo", ECHO_P1).env("LONG_LINE", length.to_string());
    let (status, log) = run(&wasmlet, config).await;
    assert_eq!(status.exit_code, 0, "{status:?}");

    let stdout_records: Vec<_> = log.iter().filter(|r| r.stream == Stream::Stdout).collect();
    let first = stdout_records
        .iter()
        .position(|r| r.text.starts_with('x'))
        .expect("no record of the long line");
    let last = first
        + stdout_records[first..]
            .iter()
            .position(|r| !r.partial)
            .expect("the long line never ends with an F record");
    let pieces = &stdout_records[first..=last];

    assert!(
        pieces.len() >= length.div_ceil(MAX_RECORD_BYTES),
        "{} records",
        pieces.len()
    );
    for piece in pieces {
        assert!(
            piece.text.len() <= MAX_RECORD_BYTES,
            "a record of {} bytes",
            piece.text.len()
        );
        assert!(piece.text.bytes().all(|b| b == b'x'), "{piece:?}");
    }
    let joined: usize = pieces.iter().map(|p| p.text.len()).sum();
    assert_eq!(joined, length);
    assert!(
        lines(&log).iter().any(|l| l.text == "x".repeat(length)),
        "the long line does not reassemble"
    );
}

#[tokio::test]
async fn output_left_without_a_newline_at_exit_is_logged_as_a_partial_record() {
    let wasmlet = Wasmlet::start().await;
    let config = ContainerConfigBuilder::new("echo", ECHO_P1).env("NO_NEWLINE", "1");
    let (status, log) = run(&wasmlet, config).await;
    assert_eq!(status.exit_code, 0, "{status:?}");
    let last_stdout = log
        .iter()
        .rfind(|r| r.stream == Stream::Stdout)
        .expect("no stdout record");
    assert_eq!(last_stdout.text, "tail-without-newline", "{log:#?}");
    // As containerd writes it: `kubectl logs` shows no newline the program
    // never wrote.
    assert!(last_stdout.partial, "{last_stdout:?}");
}

#[tokio::test]
async fn output_reaches_the_log_while_the_guest_is_running() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let config = ContainerConfigBuilder::new("ticker", TICKER_P1)
        .env("TICK_MS", "20")
        .build();
    let log = pod.container_log(&config);
    let id = cri.start(&pod, config).await.unwrap();

    wait_for_log(&log, RUNNING_TIMEOUT, "three ticks", |records| {
        stdout(records)
            .iter()
            .filter(|l| l.starts_with("tick "))
            .count()
            >= 3
    })
    .await
    .unwrap();

    let status = cri.container_status(&id).await.unwrap();
    assert_eq!(
        status.state(),
        cri::ContainerState::ContainerRunning,
        "{status:?}"
    );
    cri.stop_container(&id, 0).await.unwrap();
}

#[tokio::test]
async fn a_ticker_with_a_tick_count_logs_each_tick_then_completes() {
    let wasmlet = Wasmlet::start().await;
    let config = ContainerConfigBuilder::new("ticker", TICKER_P1)
        .env("TICK_MS", "10")
        .env("TICKS", "3");
    let (status, log) = run(&wasmlet, config).await;
    assert_eq!(status.exit_code, 0, "{status:?}");
    assert_eq!(status.reason, "Completed", "{status:?}");
    let ticks: Vec<u64> = stdout(&log)
        .iter()
        .filter_map(|line| line.strip_prefix("tick "))
        .map(|n| n.parse().expect("tick N"))
        .collect();
    assert_eq!(ticks.len(), 3, "{log:#?}");
    assert!(ticks.windows(2).all(|w| w[1] == w[0] + 1), "{ticks:?}");
}

/// `(module (import "nope" "nothing" (func)) (func (export "_start")))`: valid
/// Wasm whose import no runtime provides, so it fails before the guest runs.
#[rustfmt::skip]
const UNRUNNABLE_MODULE: &[u8] = &[
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version 1
    0x01, 0x04, 0x01, 0x60, 0x00, 0x00, // type section: [] -> []
    0x02, 0x10, 0x01, // import section, one import:
    0x04, b'n', b'o', b'p', b'e', // module "nope"
    0x07, b'n', b'o', b't', b'h', b'i', b'n', b'g', // name "nothing"
    0x00, 0x00, // a function of type 0
    0x03, 0x02, 0x01, 0x00, // function section: one function of type 0
    // export section: "_start" is function 1 (the import is function 0)
    0x07, 0x0a, 0x01, 0x06, b'_', b's', b't', b'a', b'r', b't', 0x00, 0x01,
    0x0a, 0x04, 0x01, 0x02, 0x00, 0x0b, // code section: an empty body
];

const UNRUNNABLE: &str = "wasmlet.local/conformance/unrunnable:1";

#[tokio::test]
async fn a_guest_that_cannot_start_is_exited_128_start_error_with_the_reason_logged() {
    let mut wasmlet = Wasmlet::new();
    let module = wasmlet.scratch("images").join("unrunnable.wasm");
    std::fs::write(&module, UNRUNNABLE_MODULE).unwrap();
    wasmlet.import(&module, UNRUNNABLE);
    let mut cri = wasmlet.serve().await;
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let config = ContainerConfigBuilder::new("unrunnable", UNRUNNABLE).build();
    let log = pod.container_log(&config);
    let id = cri.create_container(&pod, config).await.unwrap();

    let started = cri.start_container(&id).await;
    let error = started.expect_err("StartContainer of an unrunnable guest succeeded");
    assert!(error.status().is_some(), "not an RPC error: {error}");

    let status = cri.wait_exited(&id, Duration::from_secs(2)).await.unwrap();
    assert_eq!(status.exit_code, 128, "{status:?}");
    assert_eq!(status.reason, "StartError", "{status:?}");
    assert!(
        status.message.contains("nope"),
        "the message does not say why: {status:?}"
    );

    let records = read_cri_log(&log).unwrap();
    assert!(
        records.iter().any(|r| r.text.contains("nope")),
        "the reason is not in the log {}: {records:#?}",
        Path::new(&log).display()
    );
}

#[tokio::test]
async fn working_dir_is_where_relative_paths_resolve() {
    let wasmlet = Wasmlet::start().await;
    let data = wasmlet.scratch("data");
    std::fs::write(data.join("rel.txt"), "found relatively").unwrap();
    for image in [ECHO_P2, ECHO_P1] {
        let config = ContainerConfigBuilder::new(
            format!("cwd-{}", &image[image.len() - 7..image.len() - 5]),
            image,
        )
        .mount(&data, "/data", true)
        .working_dir("/data")
        .env("CWD_PROBE", "rel.txt");
        let (status, log) = run(&wasmlet, config).await;
        assert_eq!(status.exit_code, 0, "{image}: {status:?}\n{log:#?}");
        // wasi-libc reports "/" as the current directory whatever the
        // runtime says; what users rely on is where relative paths go.
        let out = stdout(&log);
        assert!(
            out.contains(&"relative rel.txt: found relatively".to_owned()),
            "{image}: {out:#?}"
        );
    }
}

/// The kubelet mounts single files into every container (`/etc/hosts`
/// read-only, `/dev/termination-log` writable): they must be readable and
/// writable at their container paths, and writes must reach the host file.
#[tokio::test]
async fn file_mounts_like_the_kubelets_etc_hosts_and_termination_log_work() {
    let wasmlet = Wasmlet::start().await;
    let data = wasmlet.scratch("pod-files");
    let hosts = data.join("etc-hosts");
    let termination = data.join("termination-log");
    std::fs::write(&hosts, "127.0.0.1 localhost").unwrap();
    std::fs::write(&termination, "").unwrap();
    let config = ContainerConfigBuilder::new("echo", ECHO_P1)
        .mount(&hosts, "/etc/hosts", true)
        .mount(&termination, "/dev/termination-log", false)
        .env("READ_FILE", "/etc/hosts")
        .env("WRITE_FILE", "/dev/termination-log");
    let (status, log) = run(&wasmlet, config).await;
    assert_eq!(status.exit_code, 0, "{status:?}\n{log:#?}");
    assert!(
        stdout(&log).contains(&"file /etc/hosts: 127.0.0.1 localhost".to_owned()),
        "{log:#?}"
    );
    assert_eq!(std::fs::read_to_string(&termination).unwrap(), "written");
    assert_eq!(
        std::fs::read_to_string(&hosts).unwrap(),
        "127.0.0.1 localhost"
    );
}

/// The kubelet's pod directory is often on another filesystem than the
/// runtime's root (it bind-mounts its root dir): a file mount there cannot
/// be linked, and what the guest writes must still reach the host file —
/// the termination message the kubelet reads after the exit.
#[tokio::test]
async fn a_termination_log_on_another_filesystem_reaches_the_host() {
    let wasmlet = Wasmlet::start().await;
    let shm = tempfile::Builder::new()
        .prefix("wasmlet-pod-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let termination = shm.path().join("termination-log");
    std::fs::write(&termination, "").unwrap();
    let same_fs = std::fs::hard_link(&termination, wasmlet.root().join("probe-link")).is_ok();
    assert!(
        !same_fs,
        "/dev/shm is on the root's filesystem: the test proves nothing"
    );
    let config = ContainerConfigBuilder::new("echo", ECHO_P1)
        .mount(&termination, "/dev/termination-log", false)
        .env("WRITE_FILE", "/dev/termination-log");
    let (status, log) = run(&wasmlet, config).await;
    assert_eq!(status.exit_code, 0, "{status:?}\n{log:#?}");
    assert_eq!(std::fs::read_to_string(&termination).unwrap(), "written");
}

/// Many guests run at once on the agent's async runtime, and the CRI server
/// keeps answering while they do (even with guests spinning).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_guests_run_at_once_without_blocking_the_server() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let mut ids = Vec::new();
    for i in 0..40 {
        let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
        let image = if i % 10 == 0 { SPIN_P1 } else { SLEEPER_P1 };
        let config = ContainerConfigBuilder::new("guest", image).build();
        ids.push(cri.start(&pod, config).await.unwrap());
    }
    for id in &ids {
        cri.wait_for_state(id, cri::ContainerState::ContainerRunning, RUNNING_TIMEOUT)
            .await
            .unwrap();
    }
    let running = cri
        .list_containers(Some(cri::ContainerFilter {
            state: Some(cri::ContainerStateValue {
                state: cri::ContainerState::ContainerRunning as i32,
            }),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(running.len(), ids.len());
    // The server still answers promptly with four guests spinning.
    let started = std::time::Instant::now();
    cri.version().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_into_a_wasm_artifact_runs_its_one_program_by_its_names() {
    let wasmlet = Wasmlet::start().await;
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let config = ContainerConfigBuilder::new("ticker", TICKER_P1)
        .env("TICK_MS", "1000")
        .build();
    let id = cri.start(&pod, config).await.unwrap();
    let exec = |cmd: &[&str], timeout: i64| cri::ExecSyncRequest {
        container_id: id.clone(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        timeout,
    };
    // Its own program (it ticks forever): the timeout ends it.
    let slow = cri
        .runtime()
        .exec_sync(exec(&["/proc/self/exe"], 1))
        .await
        .unwrap_err();
    assert_eq!(slow.code(), tonic::Code::DeadlineExceeded, "{slow:?}");
    // An empty argv[0] is the container's own program too.
    let own = cri
        .runtime()
        .exec_sync(exec(&["", "x"], 1))
        .await
        .unwrap_err();
    assert_eq!(own.code(), tonic::Code::DeadlineExceeded, "{own:?}");
    // Anything else is not in the image.
    let other = cri
        .runtime()
        .exec_sync(exec(&["cat", "/etc/hostname"], 5))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(other.exit_code, 127, "{other:?}");
    assert!(
        String::from_utf8_lossy(&other.stderr).contains("cat: not found"),
        "{other:?}"
    );
    cri.stop_container(&id, 0).await.unwrap();
}
