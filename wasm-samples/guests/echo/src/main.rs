//! `echo`: reports what the runtime handed the guest, then exits with a
//! chosen code.
//!
//! Output, in order:
//! - stdout `argc=N`, then `arg[i]=VALUE` per argument (argv[0] included);
//! - stdout `env KEY=VALUE` per environment variable, sorted by key;
//! - `READ_FILE=<path>`: stdout `file <path>: <contents trimmed>`; on error
//!   stderr `error reading <path>: <err>` and exit 2;
//! - `WRITE_FILE=<path>`: writes `written` into it, stdout `wrote <path>`; on
//!   error stderr `error writing <path>: <err>` and exit 3;
//! - `LONG_LINE=N`: stdout one line of N `x`;
//! - `CWD_PROBE=<relative path>`: stdout `cwd=<dir>` (or `cwd=error: <err>`),
//!   then `relative <path>: <contents trimmed>` or `relative error: <err>`;
//! - `STDIN_LINES`: stdout `stdin: <line>` per line read from stdin, then
//!   `stdin closed` at its end;
//! - `NO_NEWLINE`: stdout `tail-without-newline` with no trailing newline;
//! - stderr `echo done`;
//! - exit with `EXIT_CODE` (default 0).

use std::env;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::process;

fn lossy(s: &OsString) -> String {
    s.to_string_lossy().into_owned()
}

/// Flushes stdout, then exits; `process::exit` skips destructors.
fn exit(code: i32) -> ! {
    let _ = io::stdout().flush();
    let _ = io::stderr().flush();
    process::exit(code)
}

fn main() {
    let args: Vec<OsString> = env::args_os().collect();
    println!("argc={}", args.len());
    for (i, arg) in args.iter().enumerate() {
        println!("arg[{i}]={}", lossy(arg));
    }

    let mut vars: Vec<(OsString, OsString)> = env::vars_os().collect();
    vars.sort();
    for (key, value) in &vars {
        println!("env {}={}", lossy(key), lossy(value));
    }

    if let Some(path) = env::var_os("READ_FILE") {
        let shown = lossy(&path);
        match fs::read(&path) {
            Ok(bytes) => println!("file {shown}: {}", String::from_utf8_lossy(&bytes).trim()),
            Err(err) => {
                eprintln!("error reading {shown}: {err}");
                exit(2);
            }
        }
    }

    if let Some(path) = env::var_os("WRITE_FILE") {
        let shown = lossy(&path);
        match fs::write(&path, "written") {
            Ok(()) => println!("wrote {shown}"),
            Err(err) => {
                eprintln!("error writing {shown}: {err}");
                exit(3);
            }
        }
    }

    if let Some(n) = env::var_os("LONG_LINE") {
        match lossy(&n).trim().parse::<usize>() {
            Ok(n) => println!("{}", "x".repeat(n)),
            Err(err) => {
                eprintln!("invalid LONG_LINE {:?}: {err}", lossy(&n));
                exit(1);
            }
        }
    }

    if let Some(path) = env::var_os("CWD_PROBE") {
        match env::current_dir() {
            Ok(dir) => println!("cwd={}", dir.display()),
            Err(err) => println!("cwd=error: {err}"),
        }
        match fs::read(&path) {
            Ok(bytes) => println!(
                "relative {}: {}",
                lossy(&path),
                String::from_utf8_lossy(&bytes).trim()
            ),
            Err(err) => println!("relative error: {err}"),
        }
    }

    if env::var_os("STDIN_LINES").is_some() {
        for line in io::stdin().lines() {
            match line {
                Ok(line) => println!("stdin: {line}"),
                Err(err) => {
                    println!("stdin error: {err}");
                    break;
                }
            }
        }
        println!("stdin closed");
    }

    if env::var_os("NO_NEWLINE").is_some() {
        print!("tail-without-newline");
    }

    eprintln!("echo done");

    let code = match env::var_os("EXIT_CODE") {
        None => 0,
        Some(raw) => match lossy(&raw).trim().parse::<i32>() {
            Ok(code) => code,
            Err(err) => {
                eprintln!("invalid EXIT_CODE {:?}: {err}", lossy(&raw));
                1
            }
        },
    };
    exit(code)
}
