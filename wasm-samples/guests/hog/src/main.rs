//! `hog`: eats memory in 1 MiB steps, printing how much it holds, until an
//! allocation fails (which aborts: a trap). `HOG_LIMIT_MIB` stops it early
//! and makes it exit 0 instead, holding that much. With `HOG_CYCLES=N` it
//! then frees everything (printing `freed N MiB`) and allocates it again,
//! N times, so a test can tell a guest that reuses freed memory from one
//! that leaks. With `HOG_HOLD` set it finally keeps holding what it has,
//! sleeping forever.

use std::io::Write;

fn fill(held: &mut Vec<Vec<u8>>, limit: usize, stdout: &mut std::io::Stdout) {
    while held.len() < limit {
        // Touch every page so the memory is really committed.
        held.push(vec![1u8; 1024 * 1024]);
        writeln!(stdout, "holding {} MiB", held.len()).ok();
    }
}

fn main() {
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
    let limit: usize = var("HOG_LIMIT_MIB").unwrap_or(usize::MAX);
    let cycles: usize = var("HOG_CYCLES").unwrap_or(0);
    let mut held: Vec<Vec<u8>> = Vec::new();
    let mut stdout = std::io::stdout();
    fill(&mut held, limit, &mut stdout);
    for _ in 0..cycles {
        let mib = held.len();
        held = Vec::new();
        writeln!(stdout, "freed {mib} MiB").ok();
        fill(&mut held, limit, &mut stdout);
    }
    writeln!(stdout, "done holding {} MiB", held.len()).ok();
    std::hint::black_box(&held);
    if std::env::var_os("HOG_HOLD").is_some() {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}
