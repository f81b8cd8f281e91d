//! `sleeper`: prints `sleeping`, then sleeps forever (an idle pod).

use std::io::{self, Write};
use std::thread;
use std::time::Duration;

fn main() {
    println!("sleeping");
    let _ = io::stdout().flush();
    loop {
        thread::sleep(Duration::from_hours(1));
    }
}
