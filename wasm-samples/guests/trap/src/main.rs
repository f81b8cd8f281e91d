//! `trap`: prints `about to trap`, then executes the wasm `unreachable`
//! instruction, so the runtime reports
//! "wasm trap: wasm `unreachable` instruction executed".

use std::io::{self, Write};

fn main() {
    println!("about to trap");
    let _ = io::stdout().flush();
    trap()
}

#[cfg(target_arch = "wasm32")]
fn trap() -> ! {
    core::arch::wasm32::unreachable()
}

/// Only so that the crate also builds for the host (editors, `cargo check`).
#[cfg(not(target_arch = "wasm32"))]
fn trap() -> ! {
    std::process::abort()
}
