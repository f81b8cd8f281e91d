//! Builds the guest workspace in `guests/` for wasm32-wasip1 (the command
//! guests) and wasm32-wasip2 (`echo`, `pong`, `hello-http`, `minibox`) with a nested
//! `cargo build --release`,
//! into the fixed, shared target dir `<workspace root>/target/wasm-samples`,
//! and writes `$OUT_DIR/samples.rs` holding the absolute paths of the
//! resulting `.wasm` files.

use std::env;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Guest crates (directory and package name).
const GUESTS: &[&str] = &[
    "echo",
    "ticker",
    "trap",
    "spin",
    "sleeper",
    "hog",
    "pong",
    "hello-http",
    "minibox",
];

/// The packages built for WASI preview 1 (core modules).
const P1_PACKAGES: &[&str] = &[
    "echo", "ticker", "trap", "spin", "sleeper", "hog", "minibox",
];
/// The packages built for WASI 0.2 (components).
const P2_PACKAGES: &[&str] = &["echo", "pong", "hello-http", "minibox"];

/// The constants of the lib: (constant name, target, output file stem,
/// image reference).
const SAMPLES: &[(&str, &str, &str, &str)] = &[
    (
        "ECHO_P1",
        "wasm32-wasip1",
        "echo",
        "wasmlet.local/samples/echo:p1",
    ),
    (
        "ECHO_P2",
        "wasm32-wasip2",
        "echo",
        "wasmlet.local/samples/echo:p2",
    ),
    (
        "TICKER_P1",
        "wasm32-wasip1",
        "ticker",
        "wasmlet.local/samples/ticker:p1",
    ),
    (
        "TRAP_P1",
        "wasm32-wasip1",
        "trap",
        "wasmlet.local/samples/trap:p1",
    ),
    (
        "SPIN_P1",
        "wasm32-wasip1",
        "spin",
        "wasmlet.local/samples/spin:p1",
    ),
    (
        "SLEEPER_P1",
        "wasm32-wasip1",
        "sleeper",
        "wasmlet.local/samples/sleeper:p1",
    ),
    (
        "HOG_P1",
        "wasm32-wasip1",
        "hog",
        "wasmlet.local/samples/hog:p1",
    ),
    (
        "PONG_P2",
        "wasm32-wasip2",
        "pong",
        "wasmlet.local/samples/pong:p2",
    ),
    (
        "HELLO_HTTP_P2",
        "wasm32-wasip2",
        "hello_http",
        "wasmlet.local/samples/hello-http:p2",
    ),
];

/// Guests exposed as constants but not in `ALL` (not imported into every
/// test's daemon): (constant name, target, output file stem).
const EXTRAS: &[(&str, &str, &str)] = &[
    ("MINIBOX_P1", "wasm32-wasip1", "minibox"),
    ("MINIBOX_P2", "wasm32-wasip2", "minibox"),
];

/// Environment variables, set by the outer cargo (or by whoever runs it,
/// e.g. clippy's `RUSTC_WORKSPACE_WRAPPER`), that must not leak into the
/// nested build.
const REMOVED_VARS: &[&str] = &[
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTC_WRAPPER",
    "RUSTC_LINKER",
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "RUSTDOCFLAGS",
    "CARGO_ENCODED_RUSTDOCFLAGS",
    "CARGO_BUILD_RUSTDOCFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_MAKEFLAGS",
    "MAKEFLAGS",
    "MFLAGS",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CLIPPY_ARGS",
    "CLIPPY_CONF_DIR",
    "PROFILE",
    "TARGET",
    "HOST",
    "OPT_LEVEL",
    "DEBUG",
    "OUT_DIR",
    "NUM_JOBS",
];

/// Prefixes of environment variables removed for the same reason.
const REMOVED_PREFIXES: &[&str] = &[
    "CARGO_CFG_",
    "CARGO_FEATURE_",
    "CARGO_PKG_",
    "CARGO_MANIFEST_",
    // Per-target rustflags/linker/runner of the outer build.
    "CARGO_TARGET_",
    // Cargo-internal variables (e.g. set by `cargo fix`).
    "__CARGO",
];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let workspace_root = manifest_dir
        .parent()
        .expect("wasm-samples lives inside the workspace root")
        .to_path_buf();
    let guests_dir = manifest_dir.join("guests");
    let target_dir = workspace_root.join("target").join("wasm-samples");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let jobs = env::var("NUM_JOBS").ok();

    println!("cargo:rerun-if-changed=build.rs");
    println!(
        "cargo:rerun-if-changed={}",
        guests_dir.join("Cargo.toml").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        guests_dir.join("Cargo.lock").display()
    );
    for guest in GUESTS {
        let dir = guests_dir.join(guest);
        println!(
            "cargo:rerun-if-changed={}",
            dir.join("Cargo.toml").display()
        );
        println!("cargo:rerun-if-changed={}", dir.join("src").display());
    }

    let manifest = guests_dir.join("Cargo.toml");
    build(
        &cargo,
        &manifest,
        &target_dir,
        "wasm32-wasip1",
        P1_PACKAGES,
        jobs.as_deref(),
    );
    build(
        &cargo,
        &manifest,
        &target_dir,
        "wasm32-wasip2",
        P2_PACKAGES,
        jobs.as_deref(),
    );

    let mut generated = String::from("// @generated by wasm-samples/build.rs\n\n");
    let outputs = SAMPLES
        .iter()
        .map(|&(name, target, guest, _)| (name, target, guest))
        .chain(EXTRAS.iter().copied());
    for (name, target, guest) in outputs {
        let path = target_dir
            .join(target)
            .join("release")
            .join(format!("{guest}.wasm"));
        assert!(
            path.is_file(),
            "nested cargo build did not produce {}",
            path.display()
        );
        // Rebuild if an output disappears (e.g. `cargo clean` of another
        // target dir removed the shared guest target dir).
        println!("cargo:rerun-if-changed={}", path.display());
        let path = path
            .to_str()
            .unwrap_or_else(|| panic!("non UTF-8 path {}", path.display()));
        writeln!(
            generated,
            "/// `{guest}` built for `{target}`.\npub const {name}: &str = {path:?};"
        )
        .unwrap();
    }
    generated.push_str(
        "\n/// Every sample: (image reference used in the Pod manifests, path).\n\
         pub const ALL: &[(&str, &str)] = &[\n",
    );
    for (name, _, _, image) in SAMPLES {
        writeln!(generated, "    ({image:?}, {name}),").unwrap();
    }
    generated.push_str("];\n");
    fs::write(out_dir.join("samples.rs"), generated).expect("write samples.rs");
}

/// Runs `cargo build --release --target <target> -p <package>...` on the guest
/// workspace, with a clean environment; panics with cargo's output on failure.
fn build(
    cargo: &OsStr,
    manifest: &Path,
    target_dir: &Path,
    target: &str,
    packages: &[&str],
    jobs: Option<&str>,
) {
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--release")
        .arg("--manifest-path")
        .arg(manifest)
        .arg("--target")
        .arg(target)
        .arg("--target-dir")
        .arg(target_dir);
    for package in packages {
        cmd.arg("-p").arg(package);
    }
    if let Some(jobs) = jobs {
        cmd.arg("--jobs").arg(jobs);
    }
    for (key, _) in env::vars_os() {
        let Some(key_str) = key.to_str() else {
            continue;
        };
        if REMOVED_VARS.contains(&key_str)
            || REMOVED_PREFIXES
                .iter()
                .any(|prefix| key_str.starts_with(prefix))
        {
            cmd.env_remove(&key);
        }
    }
    cmd.env("CARGO_TERM_COLOR", "never")
        .current_dir(manifest.parent().expect("manifest has a parent"))
        .stdin(Stdio::null());

    // Capture stdout too: a build script's stdout is parsed by cargo.
    let output = cmd
        .output()
        .unwrap_or_else(|err| panic!("failed to run {}: {err}", show(&cmd)));
    if !output.status.success() {
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        panic!(
            "building the wasm guests for {target} failed ({status}): {shown}\n\
             --- nested cargo stderr ---\n{stderr}\n--- nested cargo stdout ---\n{stdout}",
            status = output.status,
            shown = show(&cmd),
        );
    }
}

/// The command line, without the (long) list of removed variables.
fn show(cmd: &Command) -> String {
    let mut shown = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        shown.push(' ');
        shown.push_str(&arg.to_string_lossy());
    }
    shown
}
