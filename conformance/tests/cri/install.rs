//! What `deploy/` installs: the systemd unit is valid as systemd reads it,
//! and the installer script puts the binary, the unit and a working
//! configuration onto a node's root — sending other pods on to the node's
//! containerd when it has one — without losing an operator's own config.
//! (The manifests are applied to a real API server in `kube::`.)

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::daemon::Wasmlet;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

#[test]
fn the_systemd_unit_verifies_cleanly() {
    let Ok(analyze) = which("systemd-analyze") else {
        // scripts/setup installs it; a user's machine may lack it.
        eprintln!("SKIP install::the_systemd_unit_verifies_cleanly: no systemd-analyze");
        return;
    };
    // An offline root of the test's own: systemd's stock units, the unit,
    // and the binary its ExecStart names.
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::create_dir_all(r.join("usr/local/bin")).unwrap();
    std::fs::create_dir_all(r.join("etc/systemd/system")).unwrap();
    std::fs::copy(Wasmlet::bin(), r.join("usr/local/bin/wasmlet")).unwrap();
    let stock = ["/lib/systemd/system", "/usr/lib/systemd/system"]
        .into_iter()
        .find(|d| Path::new(d).join("multi-user.target").exists())
        .expect("systemd's own units");
    std::fs::create_dir_all(r.join("lib/systemd")).unwrap();
    let copied = Command::new("cp")
        .args(["-r", stock])
        .arg(r.join("lib/systemd/system"))
        .status()
        .unwrap();
    assert!(copied.success());
    let unit = r.join("etc/systemd/system/wasmlet.service");
    std::fs::copy(deploy().join("systemd/wasmlet.service"), &unit).unwrap();
    let out = Command::new(analyze)
        .arg("verify")
        .arg(format!("--root={}", r.display()))
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Unknown keys are only warnings to systemd: any output is a fault.
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {:?}\n{stderr}",
        out.status
    );
    let text = std::fs::read_to_string(&unit).unwrap();
    for line in [
        "ExecStart=/usr/local/bin/wasmlet --config /etc/wasmlet/wasmlet.toml serve",
        "Restart=always",
        "LimitNOFILE=1048576",
        "OOMScoreAdjust=-998",
        "StateDirectory=wasmlet",
        "RuntimeDirectory=wasmlet",
        "RuntimeDirectoryPreserve=yes",
    ] {
        assert!(text.lines().any(|l| l == line), "the unit has no {line:?}");
    }
}

/// Runs deploy/installer/install.sh against `root` as the node's root.
fn install(root: &Path, extra: &[(&str, &str)]) -> String {
    let mut cmd = Command::new("bash");
    cmd.arg(deploy().join("installer/install.sh"))
        .env("HOST_ROOT", root)
        .env("WASMLET_BINARY", Wasmlet::bin())
        .env("UNIT_FILE", deploy().join("systemd/wasmlet.service"))
        .env_remove("NODE_NAME");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "install.sh failed:\n{text}");
    text
}

#[test]
fn the_installer_puts_wasmlet_on_a_node_and_delegates_to_its_containerd() {
    // A node with containerd (its socket), a kubelet config, and runc set
    // to the systemd cgroup driver.
    let node = tempfile::tempdir().unwrap();
    let root = node.path();
    std::fs::create_dir_all(root.join("run/containerd")).unwrap();
    let _containerd =
        std::os::unix::net::UnixListener::bind(root.join("run/containerd/containerd.sock"))
            .unwrap();
    std::fs::create_dir_all(root.join("etc/containerd")).unwrap();
    std::fs::write(
        root.join("etc/containerd/config.toml"),
        "[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]\n  SystemdCgroup = true\n",
    )
    .unwrap();
    std::fs::create_dir_all(root.join("var/lib/kubelet")).unwrap();
    let kubelet_config = root.join("var/lib/kubelet/config.yaml");
    std::fs::write(
        &kubelet_config,
        "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\ncontainerRuntimeEndpoint: unix:///run/containerd/containerd.sock\n",
    )
    .unwrap();

    let log = install(root, &[("CONFIGURE_KUBELET", "true")]);
    let binary = root.join("usr/local/bin/wasmlet");
    assert_eq!(
        std::fs::read(&binary).unwrap(),
        std::fs::read(Wasmlet::bin()).unwrap()
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&binary).unwrap().permissions().mode() & 0o777,
        0o755
    );
    assert!(root.join("etc/systemd/system/wasmlet.service").is_file());
    let config = std::fs::read_to_string(root.join("etc/wasmlet/wasmlet.toml")).unwrap();
    assert!(config.contains("cgroup_driver = \"systemd\""), "{config}");
    assert!(
        config.contains("[delegate]\nsocket = \"/run/containerd/containerd.sock\""),
        "{config}"
    );
    // The kubelet now talks to wasmlet, which forwards the rest.
    let kubelet = std::fs::read_to_string(&kubelet_config).unwrap();
    assert!(
        kubelet
            .lines()
            .any(|l| l == "containerRuntimeEndpoint: unix:///run/wasmlet/wasmlet.sock"),
        "{kubelet}"
    );
    assert_eq!(
        kubelet
            .lines()
            .filter(|l| l.starts_with("containerRuntimeEndpoint"))
            .count(),
        1
    );
    assert!(
        root.join("var/lib/kubelet/config.yaml.before-wasmlet")
            .is_file()
    );
    assert!(log.contains("does not run systemd here"), "{log}");

    // Again, after the operator edited the config: kept, and nothing else
    // changes.
    let edited = format!("{config}\n[http]\ndefault_port = 9090\n");
    std::fs::write(root.join("etc/wasmlet/wasmlet.toml"), &edited).unwrap();
    let log = install(root, &[("CONFIGURE_KUBELET", "true")]);
    assert!(log.contains("keeping the existing"), "{log}");
    assert!(log.contains("already uses wasmlet"), "{log}");
    assert_eq!(
        std::fs::read_to_string(root.join("etc/wasmlet/wasmlet.toml")).unwrap(),
        edited
    );
}

#[test]
fn without_containerd_the_installer_leaves_the_kubelet_alone() {
    let node = tempfile::tempdir().unwrap();
    let root = node.path();
    std::fs::create_dir_all(root.join("var/lib/kubelet")).unwrap();
    let before = "containerRuntimeEndpoint: unix:///run/crio/crio.sock\n";
    std::fs::write(root.join("var/lib/kubelet/config.yaml"), before).unwrap();
    let log = install(root, &[("CONFIGURE_KUBELET", "true")]);
    let config = std::fs::read_to_string(root.join("etc/wasmlet/wasmlet.toml")).unwrap();
    assert!(!config.contains("[delegate]"), "{config}");
    assert!(config.contains("cgroup_driver = \"cgroupfs\""), "{config}");
    assert_eq!(
        std::fs::read_to_string(root.join("var/lib/kubelet/config.yaml")).unwrap(),
        before
    );
    assert!(log.contains("without [delegate]"), "{log}");
    // A broken config the operator left is refused, naming the key.
    std::fs::write(root.join("etc/wasmlet/wasmlet.toml"), "sockett = \"/x\"\n").unwrap();
    let out = Command::new("bash")
        .arg(deploy().join("installer/install.sh"))
        .env("HOST_ROOT", root)
        .env("WASMLET_BINARY", Wasmlet::bin())
        .env("UNIT_FILE", deploy().join("systemd/wasmlet.service"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("sockett"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn which(name: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}
