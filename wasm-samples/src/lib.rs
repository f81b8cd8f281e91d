//! Sample WebAssembly guests for testing and demonstrating wasmlet.
//!
//! The build script compiles the small std-only programs in
//! `wasm-samples/guests/` (a Cargo workspace of its own) once, with a nested
//! `cargo build --release`, into the shared directory
//! `<workspace root>/target/wasm-samples`, and this crate exposes the
//! absolute paths of the resulting `.wasm` files. Tests of the other crates
//! load them from there instead of compiling guests themselves; the Pod
//! manifests in `wasm-samples/pods/` refer to them through the image
//! references listed in [`ALL`].
//!
//! `*_P1` constants are core modules built for `wasm32-wasip1` (WASI preview
//! 1); `*_P2` constants are components built for `wasm32-wasip2` (WASI
//! 0.2): [`ECHO_P2`] and [`PONG_P2`] export `wasi:cli/run`,
//! [`HELLO_HTTP_P2`] exports `wasi:http/incoming-handler` (the
//! `wasi:http/proxy` world).
//!
//! The samples:
//! - `echo` prints `argc=N`, `arg[i]=VALUE` per argument (argv\[0\]
//!   included) and `env KEY=VALUE` per variable (sorted by key) to stdout,
//!   then acts on these environment variables, in this order:
//!   `READ_FILE=<path>` prints `file <path>: <contents trimmed>` (exit 2 on
//!   error); `WRITE_FILE=<path>` writes `written` there and prints
//!   `wrote <path>` (exit 3 on error); `LONG_LINE=N` prints N `x`;
//!   `CWD_PROBE=<relative path>` prints `cwd=<current dir>` (or
//!   `cwd=error: <err>`) and `relative <path>: <contents trimmed>` (or
//!   `relative error: <err>`); `STDIN_LINES` prints `stdin: <line>` per line
//!   of stdin, then `stdin closed`; `NO_NEWLINE` prints `tail-without-newline`
//!   without a newline. It then prints `echo done` to stderr and exits with
//!   `EXIT_CODE` (default 0).
//! - `ticker` prints `tick N` (N from 1) every `TICK_MS` milliseconds
//!   (default 1000), forever, or until `TICKS` ticks were printed (exit 0).
//! - `trap` prints `about to trap` and executes `unreachable` (a wasm trap).
//! - `spin` prints `spinning` and then loops forever without host calls.
//! - `sleeper` prints `sleeping` and then sleeps forever.
//! - `hog` allocates memory 1 MiB at a time (printing `holding N MiB`)
//!   until an allocation fails, or up to `HOG_LIMIT_MIB` and exits 0 (or,
//!   with `HOG_CYCLES=N`, frees it all and allocates it again N times, printing
//!   `freed N MiB` each time; with `HOG_HOLD`, keeps holding it forever).
//! - `pong` (WASI 0.2 sockets) connects to `CONNECT_TO=<ip>:<port>` and
//!   prints `got <first line>` (or `connect error: <err>`); with
//!   `LISTEN_PORT` it then listens on all addresses, prints `listening on
//!   <addr>` (or `listen error: <err>`, exit 1) and answers each connection
//!   with `pong <PONG_NAME>`; with `UDP_PORT` it instead answers each UDP
//!   datagram with `pong <PONG_NAME> <datagram>`.
//! - `hello-http` (a `wasi:http/proxy` component) answers `/healthz` with
//!   `ok`, `/spin?ms=N` after burning N ms of CPU, `/alloc?mib=N` after
//!   allocating N MiB, and anything else with `hello from <HELLO_NAME>
//!   path=<path>`, logging `request <method> <path>`.
//! - `minibox` ([`MINIBOX_P1`], and [`MINIBOX_P2`] with `wasi:sockets`;
//!   not in [`ALL`]) is a busybox-like multi-call program, the Wasm
//!   stand-in for the busybox and httpd images of the CRI validation suite:
//!   the applet is the basename of `argv[0]` (`sh`, `echo`, `cat`, `ls`,
//!   `touch`, `mkdir`, `rm`, `hostname`, `sleep`, `top`, `env`, `test`/`[`,
//!   `grep`, `dd`, `id`, `true`, `false`, and `httpd`, which needs the WASI
//!   0.2 build); `sh -c LINE` (or lines from stdin) interprets `;`, `&&`,
//!   `||`, `|`, redirections, quotes, `$VAR`, `$(...)`, `while` and `if`
//!   itself, and `hostname` reads `/etc/hostname` (else `HOSTNAME`).
//!
//! ```
//! let module = std::fs::read(wasm_samples::ECHO_P1).unwrap();
//! assert_eq!(&module[..4], b"\0asm");
//! ```

include!(concat!(env!("OUT_DIR"), "/samples.rs"));

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::path::Path;

    const CORE_MODULE: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00];
    const COMPONENT: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];

    fn magic(path: &str) -> [u8; 8] {
        let mut header = [0; 8];
        std::fs::File::open(path)
            .and_then(|mut file| file.read_exact(&mut header))
            .unwrap_or_else(|err| panic!("reading {path}: {err}"));
        header
    }

    #[test]
    fn samples_exist_with_the_right_magic() {
        for &(image, path) in ALL {
            assert!(Path::new(path).is_absolute(), "{image}: {path}");
            let expected = if image.ends_with(":p2") {
                COMPONENT
            } else {
                CORE_MODULE
            };
            assert_eq!(magic(path), expected, "{image}: {path}");
        }
        for path in [ECHO_P2, PONG_P2, HELLO_HTTP_P2, MINIBOX_P2] {
            assert_eq!(magic(path), COMPONENT, "{path}");
        }
        for path in [
            ECHO_P1, TICKER_P1, TRAP_P1, SPIN_P1, SLEEPER_P1, HOG_P1, MINIBOX_P1,
        ] {
            assert_eq!(magic(path), CORE_MODULE, "{path}");
        }
    }

    #[test]
    fn image_references_and_paths_are_unique() {
        for (i, (image, path)) in ALL.iter().enumerate() {
            assert!(image.starts_with("wasmlet.local/samples/"), "{image}");
            for (other_image, other_path) in &ALL[i + 1..] {
                assert_ne!(image, other_image);
                assert_ne!(path, other_path);
            }
        }
        assert_eq!(ALL.len(), 9);
    }
}
