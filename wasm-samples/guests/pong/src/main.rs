//! `pong`: TCP through `wasi:sockets` (WASI 0.2), for the network tests.
//!
//! With `UDP_PORT=<port>` it only serves UDP: it prints `udp listening on
//! <address>` and answers every datagram with `pong <PONG_NAME> <datagram>`.
//! With `CONNECT_TO=<ip>:<port>` it connects there and prints the first
//! line it reads as `got <line>`, or `connect error: <error>`. With
//! `LISTEN_PORT=<port>` it then listens on all addresses (printing
//! `listening on <address>`, or `listen error: <error>` and exit 1) and
//! answers every connection with `pong <PONG_NAME>` and a newline.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};

fn serve_udp(port: &str, name: &str, out: &mut std::io::Stdout) {
    let port: u16 = port.parse().expect("UDP_PORT is a port number");
    let socket = match UdpSocket::bind(("0.0.0.0", port)) {
        Ok(s) => s,
        Err(e) => {
            writeln!(out, "udp error: {e}").ok();
            std::process::exit(1);
        }
    };
    writeln!(out, "udp listening on port {port}").ok();
    let mut buf = [0u8; 1500];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                let mut reply = format!("pong {name} ").into_bytes();
                reply.extend_from_slice(&buf[..n]);
                let _ = socket.send_to(&reply, from);
            }
            Err(e) => {
                writeln!(out, "udp error: {e}").ok();
            }
        }
    }
}

fn main() {
    let mut out = std::io::stdout();
    if let Ok(port) = std::env::var("UDP_PORT") {
        let name = std::env::var("PONG_NAME").unwrap_or_else(|_| "pong".to_owned());
        serve_udp(&port, &name, &mut out);
    }
    if let Ok(target) = std::env::var("CONNECT_TO") {
        match TcpStream::connect(target.as_str()) {
            Ok(stream) => {
                let mut line = String::new();
                match BufReader::new(stream).read_line(&mut line) {
                    Ok(_) => writeln!(out, "got {}", line.trim_end()).ok(),
                    Err(e) => writeln!(out, "read error: {e}").ok(),
                };
            }
            Err(e) => {
                writeln!(out, "connect error: {e}").ok();
            }
        }
    }
    let Ok(port) = std::env::var("LISTEN_PORT") else {
        return;
    };
    let name = std::env::var("PONG_NAME").unwrap_or_else(|_| "pong".to_owned());
    let port: u16 = port.parse().expect("LISTEN_PORT is a port number");
    let listener = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => {
            writeln!(out, "listen error: {e}").ok();
            std::process::exit(1);
        }
    };
    match listener.local_addr() {
        Ok(addr) => writeln!(out, "listening on {addr}").ok(),
        Err(_) => writeln!(out, "listening on port {port}").ok(),
    };
    for conn in listener.incoming() {
        match conn {
            Ok(mut conn) => {
                let _ = writeln!(conn, "pong {name}");
            }
            Err(e) => {
                writeln!(out, "accept error: {e}").ok();
            }
        }
    }
}
