//! Container logs in the CRI format the kubelet and `kubectl logs` read:
//! `<RFC3339Nano> <stdout|stderr> <F|P> <text>\n`, one record per line; a
//! line longer than [`MAX_LINE`] is cut into `P` (partial) records ending
//! with an `F` (full) one.
//!
//! Guests write to a [`LogStream`] (their stdout or stderr); both streams of
//! a container share one [`ContainerLog`], so records never interleave
//! within a line.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use crate::error::{Error, Result};
use crate::model::time::Timestamp;

/// The longest line written as one record, as containerd's
/// `max_container_log_line_size` default.
pub const MAX_LINE: usize = 16 * 1024;

/// Which standard stream a record came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

struct Inner {
    file: Option<File>,
    path: Option<PathBuf>,
    /// Bytes of an unfinished line, per stream.
    pending: [Vec<u8>; 2],
    /// Raw output kept in memory instead (an exec's), up to a limit.
    capture: Option<Capture>,
    /// Live copies of the output for attached clients.
    tap: Option<tokio::sync::broadcast::Sender<Output>>,
    /// The guest ended: no more output, attached clients are let go.
    closed: bool,
    /// When the guest was started, until its first output is timed.
    awaiting_output: Option<std::time::Instant>,
}

/// A chunk of a running container's output, as attached clients see it.
#[derive(Clone, Debug)]
pub struct Output {
    pub stream: Stream,
    pub data: Bytes,
}

/// Chunks an attached client may fall behind before it misses output
/// (the guest never waits for an attached client; the log has it all).
pub const ATTACH_BUFFER: usize = 1024;

struct Capture {
    limit: usize,
    streams: [Vec<u8>; 2],
}

impl Inner {
    fn record(&mut self, stream: Stream, partial: bool, text: &[u8]) {
        let Some(file) = self.file.as_mut() else {
            return;
        };
        let mut line = Vec::with_capacity(text.len() + 48);
        line.extend_from_slice(Timestamp::now().to_rfc3339_nanos().as_bytes());
        line.push(b' ');
        line.extend_from_slice(stream.name().as_bytes());
        line.extend_from_slice(if partial { b" P " } else { b" F " });
        line.extend_from_slice(text);
        line.push(b'\n');
        if let Err(error) = file.write_all(&line) {
            tracing::warn!(path = ?self.path, %error, "writing container log failed; further output is dropped");
            self.file = None;
        }
    }

    fn write(&mut self, stream: Stream, mut data: &[u8]) {
        let idx = stream as usize;
        if let Some(tap) = self.tap.as_ref().filter(|t| t.receiver_count() > 0) {
            let _ = tap.send(Output {
                stream,
                data: Bytes::copy_from_slice(data),
            });
        }
        if let Some(capture) = self.capture.as_mut() {
            let room = capture.limit.saturating_sub(capture.streams[idx].len());
            capture.streams[idx].extend_from_slice(&data[..data.len().min(room)]);
            return;
        }
        while let Some(nl) = data.iter().position(|b| *b == b'\n') {
            let mut pending = std::mem::take(&mut self.pending[idx]);
            pending.extend_from_slice(&data[..nl]);
            self.emit_line(stream, &pending);
            data = &data[nl + 1..];
        }
        self.pending[idx].extend_from_slice(data);
        while self.pending[idx].len() > MAX_LINE {
            let rest = self.pending[idx].split_off(MAX_LINE);
            let chunk = std::mem::replace(&mut self.pending[idx], rest);
            self.record(stream, true, &chunk);
        }
    }

    fn emit_line(&mut self, stream: Stream, mut line: &[u8]) {
        while line.len() > MAX_LINE {
            self.record(stream, true, &line[..MAX_LINE]);
            line = &line[MAX_LINE..];
        }
        self.record(stream, false, line);
    }

    /// Writes what is left of each stream's last line: when the streams
    /// close (`closing`), as a partial record (`P`), as containerd writes
    /// it, since the program never ended the line; before a runtime message,
    /// as a full one, so that the message starts a line of its own.
    fn flush_pending(&mut self, closing: bool) {
        for stream in [Stream::Stdout, Stream::Stderr] {
            let pending = std::mem::take(&mut self.pending[stream as usize]);
            if pending.is_empty() {
                continue;
            }
            if closing {
                self.record(stream, true, &pending);
            } else {
                self.emit_line(stream, &pending);
            }
        }
    }
}

/// The log file of one container run.
#[derive(Clone)]
pub struct ContainerLog {
    inner: Arc<Mutex<Inner>>,
}

impl ContainerLog {
    /// Opens (appending, creating parent directories) the log at `path`, or
    /// a log that discards everything when the kubelet asked for none.
    pub fn open(path: Option<&Path>) -> Result<Self> {
        let file = match path {
            Some(path) => {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(Error::io("creating log directory", parent))?;
                }
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(Error::io("opening container log", path))?;
                Some(file)
            }
            None => None,
        };
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                file,
                path: path.map(Path::to_owned),
                pending: [Vec::new(), Vec::new()],
                tap: None,
                closed: false,
                awaiting_output: None,
                capture: None,
            })),
        })
    }

    /// A log keeping each stream's raw output in memory, at most `limit`
    /// bytes of each (the rest is dropped): an exec's output.
    pub fn capture(limit: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                file: None,
                path: None,
                pending: [Vec::new(), Vec::new()],
                tap: None,
                closed: false,
                awaiting_output: None,
                capture: Some(Capture {
                    limit,
                    streams: [Vec::new(), Vec::new()],
                }),
            })),
        }
    }

    /// What a capturing log holds: (stdout, stderr).
    pub fn captured(&self) -> (Vec<u8>, Vec<u8>) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match &inner.capture {
            Some(c) => (c.streams[0].clone(), c.streams[1].clone()),
            None => Default::default(),
        }
    }

    /// Appends raw output of `stream`.
    pub fn write(&self, stream: Stream, data: &[u8]) {
        if let Ok(mut inner) = self.inner.lock() {
            if !data.is_empty()
                && let Some(since) = inner.awaiting_output.take()
            {
                crate::metrics::global().phase(crate::metrics::Phase::FirstOutput, since.elapsed());
            }
            inner.write(stream, data);
        }
    }

    /// Times the guest's first output from now (the `first_output` phase
    /// of a pod's start); a guest that never writes is not counted.
    pub fn time_first_output(&self) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.awaiting_output = Some(std::time::Instant::now());
        }
    }

    /// Writes one whole line (e.g. a runtime message for the user).
    pub fn write_line(&self, stream: Stream, line: &str) {
        if let Ok(mut inner) = self.inner.lock() {
            if inner.capture.is_some() {
                inner.write(stream, format!("{line}\n").as_bytes());
                return;
            }
            inner.flush_pending(false);
            if let Some(tap) = inner.tap.as_ref().filter(|t| t.receiver_count() > 0) {
                let _ = tap.send(Output {
                    stream,
                    data: Bytes::from(format!("{line}\n")),
                });
            }
            for l in line.lines() {
                inner.emit_line(stream, l.as_bytes());
            }
        }
    }

    /// Reopens the log at its path, for the kubelet's rotation (it renamed
    /// the file): records written before go to the old file, records after
    /// to the new one; a record is never split, lost or written twice.
    /// On failure the old file stays in use.
    pub fn reopen(&self) -> Result<()> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(path) = inner.path.clone() else {
            return Ok(());
        };
        if let Some(f) = inner.file.as_mut() {
            let _ = f.flush();
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(Error::io("reopening container log", &path))?;
        inner.file = Some(file);
        Ok(())
    }

    /// A live copy of the output from now on, ending when the guest ends.
    pub fn attach(&self) -> tokio::sync::broadcast::Receiver<Output> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.closed {
            // Already over: a receiver whose sender is gone.
            return tokio::sync::broadcast::channel(1).1;
        }
        inner
            .tap
            .get_or_insert_with(|| tokio::sync::broadcast::channel(ATTACH_BUFFER).0)
            .subscribe()
    }

    /// Writes out unfinished lines as full records; called when the guest ends.
    pub fn close(&self) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.closed = true;
            inner.tap = None;
            inner.flush_pending(true);
            if let Some(f) = inner.file.as_mut() {
                let _ = f.flush();
            }
        }
    }

    /// A guest-facing stream writing into this log.
    pub fn stream(&self, stream: Stream) -> LogStream {
        LogStream {
            log: self.clone(),
            stream,
        }
    }
}

/// The guest's stdout or stderr. Writes go straight to the log file; there
/// is no buffering to flush and no back-pressure.
#[derive(Clone)]
pub struct LogStream {
    log: ContainerLog,
    stream: Stream,
}

impl IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStream {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogStream {
    async fn ready(&mut self) {}
}

impl OutputStream for LogStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.log.write(self.stream, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(1024 * 1024)
    }
}

impl tokio::io::AsyncWrite for LogStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.log.write(self.stream, buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(path: &Path) -> Vec<(String, String, String)> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| {
                let mut parts = l.splitn(4, ' ');
                let ts = parts.next().unwrap();
                assert!(ts.ends_with('Z') && ts.len() == 30, "bad timestamp {ts}");
                (
                    parts.next().unwrap().to_owned(),
                    parts.next().unwrap().to_owned(),
                    parts.next().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn lines_are_split_and_tagged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pod/c/0.log");
        let log = ContainerLog::open(Some(&path)).unwrap();
        log.write(Stream::Stdout, b"hel");
        log.write(Stream::Stderr, b"oops\n");
        log.write(Stream::Stdout, b"lo\nworld\n\n");
        log.write(Stream::Stdout, b"tail");
        log.close();
        let r = records(&path);
        let got: Vec<(&str, &str, &str)> = r
            .iter()
            .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("stderr", "F", "oops"),
                ("stdout", "F", "hello"),
                ("stdout", "F", "world"),
                ("stdout", "F", ""),
                ("stdout", "P", "tail"),
            ]
        );
    }

    #[test]
    fn long_lines_become_partial_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let log = ContainerLog::open(Some(&path)).unwrap();
        let long = vec![b'x'; MAX_LINE * 2 + 10];
        log.write(Stream::Stdout, &long[..100]);
        log.write(Stream::Stdout, &long[100..]);
        log.write(Stream::Stdout, b"\n");
        log.close();
        let r = records(&path);
        let tags: Vec<&str> = r.iter().map(|x| x.1.as_str()).collect();
        assert_eq!(tags, vec!["P", "P", "F"]);
        let total: usize = r.iter().map(|x| x.2.len()).sum();
        assert_eq!(total, long.len());
    }

    #[test]
    fn no_path_discards() {
        let log = ContainerLog::open(None).unwrap();
        log.write(Stream::Stdout, b"x\n");
        log.close();
    }
}
