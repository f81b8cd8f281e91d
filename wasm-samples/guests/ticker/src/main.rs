//! `ticker`: prints `tick N` (N from 1) every `TICK_MS` milliseconds
//! (default 1000), flushing after each line. With `TICKS=M` it exits 0 after
//! M ticks; otherwise it runs forever.

use std::env;
use std::io::{self, Write};
use std::process;
use std::thread;
use std::time::Duration;

fn env_number(name: &str) -> Option<u64> {
    let raw = env::var(name).ok()?;
    match raw.trim().parse() {
        Ok(n) => Some(n),
        Err(err) => {
            eprintln!("invalid {name} {raw:?}: {err}");
            process::exit(2);
        }
    }
}

fn main() {
    let interval = Duration::from_millis(env_number("TICK_MS").unwrap_or(1000));
    let ticks = env_number("TICKS");
    let mut stdout = io::stdout();
    let mut n: u64 = 0;
    loop {
        if ticks.is_some_and(|max| n >= max) {
            return;
        }
        thread::sleep(interval);
        n += 1;
        // A closed stdout is not a reason to stop ticking.
        let _ = writeln!(stdout, "tick {n}");
        let _ = stdout.flush();
    }
}
