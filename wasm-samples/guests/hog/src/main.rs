//! `hog`: eats memory in 1 MiB steps, printing how much it holds, until an
//! allocation fails (which aborts: a trap). `HOG_LIMIT_MIB` stops it early
//! and makes it exit 0 instead, holding that much; with `HOG_HOLD` set it
//! then keeps holding it, sleeping forever.

use std::io::Write;

fn main() {
    let limit: usize = std::env::var("HOG_LIMIT_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(usize::MAX);
    let mut held: Vec<Vec<u8>> = Vec::new();
    let mut stdout = std::io::stdout();
    while held.len() < limit {
        // Touch every page so the memory is really committed.
        held.push(vec![1u8; 1024 * 1024]);
        writeln!(stdout, "holding {} MiB", held.len()).ok();
    }
    writeln!(stdout, "done holding {} MiB", held.len()).ok();
    std::hint::black_box(&held);
    if std::env::var_os("HOG_HOLD").is_some() {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}
