//! `spin`: prints `spinning`, then computes forever without any host call, so
//! the only way to stop it is for the runtime to interrupt the wasm code
//! (epoch interruption, fuel, ...).

use std::hint::black_box;
use std::io::{self, Write};

fn main() {
    println!("spinning");
    let _ = io::stdout().flush();
    let mut x: u64 = black_box(0x9e37_79b9_7f4a_7c15);
    loop {
        // xorshift; black_box keeps the loop body from being optimised away.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x = black_box(x);
    }
}
