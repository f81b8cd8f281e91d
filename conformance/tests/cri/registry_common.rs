//! Helpers the registry tests (pull, tls, token_auth) share.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Fails the test if `test` takes longer than `timeout`.
pub async fn bounded<F: Future>(timeout: Duration, test: F) -> F::Output {
    tokio::time::timeout(timeout, test)
        .await
        .expect("test did not finish in time")
}

/// `bytes` (a module or a component) with a custom section named
/// `wasmlet-conformance` holding `tag` appended: the same program, another
/// digest.
pub fn tagged_wasm(bytes: &[u8], tag: &str) -> Vec<u8> {
    fn leb128(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let name = b"wasmlet-conformance";
    let mut payload = Vec::new();
    leb128(name.len(), &mut payload);
    payload.extend_from_slice(name);
    payload.extend_from_slice(tag.as_bytes());
    let mut wasm = bytes.to_vec();
    wasm.push(0);
    leb128(payload.len(), &mut wasm);
    wasm.extend_from_slice(&payload);
    wasm
}

/// The echo sample tagged with `tag`, written to `dir/<tag>.wasm`: the same
/// program, blobs of its own.
pub fn unique_echo(dir: &Path, tag: &str) -> PathBuf {
    let wasm = std::fs::read(wasm_samples::ECHO_P1).expect("reading the echo sample");
    let path = dir.join(format!("{tag}.wasm"));
    std::fs::write(&path, tagged_wasm(&wasm, tag)).expect("writing the tagged echo sample");
    path
}
