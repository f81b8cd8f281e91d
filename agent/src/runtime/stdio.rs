//! Standard streams of instances a client is connected to (exec, attach):
//! output into a bounded channel the streaming server drains, input from a
//! pipe it writes, and, when the client asked for a terminal, the little of
//! a terminal's line discipline a guest without a pty needs.
//!
//! A Wasm guest has no pseudo-terminal: with `tty` the runtime plays one.
//! Output gets `\n` → `\r\n` (a terminal's `onlcr`); input is edited a line
//! at a time and echoed (canonical mode: backspace erases, Enter hands the
//! line over, Ctrl-D ends input, Ctrl-C interrupts the instance).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncWrite, DuplexStream};
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;
use wasmtime_wasi::cli::{AsyncStdinStream, IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};

/// Chunks of output in flight between a guest and its client: the guest
/// waits when the client falls this far behind.
pub const OUTPUT_CHUNKS: usize = 64;

/// Bytes of input buffered between the client and the guest.
pub const INPUT_BUFFER: usize = 64 * 1024;

/// A guest's stdout or stderr feeding a channel. Writes wait (the guest
/// blocks) while the channel is full; once the receiver is gone the stream
/// is closed, as a pipe whose reader left.
#[derive(Clone)]
pub struct ChannelOutput {
    tx: mpsc::Sender<Bytes>,
    /// Play a terminal: `\n` leaves as `\r\n`.
    terminal: bool,
}

impl ChannelOutput {
    pub fn new(tx: mpsc::Sender<Bytes>, terminal: bool) -> Self {
        Self { tx, terminal }
    }

    /// Writes a message of the runtime's (waits for room; dropped if the
    /// client is gone).
    pub async fn send(&self, text: &str) {
        let _ = self.tx.send(self.chunk(text.as_bytes())).await;
    }

    fn chunk(&self, bytes: &[u8]) -> Bytes {
        if self.terminal {
            Bytes::from(onlcr(bytes))
        } else {
            Bytes::copy_from_slice(bytes)
        }
    }
}

/// `\n` → `\r\n`, as a terminal's output processing does (a `\r\n` the
/// guest wrote itself stays as it is).
pub fn onlcr(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 16);
    let mut prev = 0u8;
    for &b in bytes {
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        prev = b;
    }
    out
}

impl IsTerminal for ChannelOutput {
    fn is_terminal(&self) -> bool {
        self.terminal
    }
}

impl StdoutStream for ChannelOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(ChannelWriter {
            output: self.clone(),
            sender: PollSender::new(self.tx.clone()),
        })
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for ChannelOutput {
    async fn ready(&mut self) {
        // One guest task writes: a slot free now is still free when it
        // writes. A closed channel is "ready" too: the write then fails.
        let _ = self.tx.reserve().await;
    }
}

impl OutputStream for ChannelOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let chunk = self.chunk(&bytes);
        match self.tx.try_send(chunk) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(StreamError::Closed),
            Err(mpsc::error::TrySendError::Full(_)) => Err(StreamError::Trap(
                wasmtime::format_err!("output written past its write permit"),
            )),
        }
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        if self.tx.is_closed() {
            return Err(StreamError::Closed);
        }
        Ok(if self.tx.capacity() == 0 {
            0
        } else {
            1024 * 1024
        })
    }
}

/// The same channel as an [`AsyncWrite`], for the guests' async stdio.
struct ChannelWriter {
    output: ChannelOutput,
    sender: PollSender<Bytes>,
}

impl AsyncWrite for ChannelWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let closed = || std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        match self.sender.poll_reserve(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(_)) => Poll::Ready(Err(closed())),
            Poll::Ready(Ok(())) => {
                let chunk = self.output.chunk(buf);
                self.sender.send_item(chunk).map_err(|_| closed())?;
                Poll::Ready(Ok(buf.len()))
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A pipe into a guest's stdin: the guest reads what is written to the
/// returned writer, and end-of-file once the writer is dropped.
pub fn stdin_pipe() -> (DuplexStream, Arc<AsyncStdinStream>) {
    let (writer, reader) = tokio::io::duplex(INPUT_BUFFER);
    (writer, Arc::new(AsyncStdinStream::new(reader)))
}

/// What a keystroke read through [`LineDiscipline`] asks for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Edited {
    /// Bytes for the guest's stdin (whole lines).
    pub input: Vec<u8>,
    /// Bytes to echo to the client's terminal.
    pub echo: Vec<u8>,
    /// Ctrl-D on an empty line: end of input.
    pub end_of_input: bool,
    /// Ctrl-C: interrupt the instance.
    pub interrupt: bool,
}

/// A terminal's canonical input mode, for a guest that has no pty: keys
/// are echoed, the line is edited until Enter, then handed to the guest.
#[derive(Debug, Default)]
pub struct LineDiscipline {
    line: Vec<u8>,
}

impl LineDiscipline {
    /// Feeds the client's raw keystrokes.
    pub fn feed(&mut self, keys: &[u8]) -> Edited {
        let mut out = Edited::default();
        for &key in keys {
            match key {
                // Enter (a raw terminal sends CR), or a bare LF.
                b'\r' | b'\n' => {
                    self.line.push(b'\n');
                    out.input.append(&mut self.line);
                    out.echo.extend_from_slice(b"\r\n");
                }
                // Backspace / DEL: erase one character (one UTF-8 scalar).
                0x7f | 0x08 => {
                    while let Some(b) = self.line.pop() {
                        if b & 0xc0 != 0x80 {
                            out.echo.extend_from_slice(b"\x08 \x08");
                            break;
                        }
                    }
                }
                // Ctrl-C: the line is dropped and the instance interrupted.
                0x03 => {
                    self.line.clear();
                    out.echo.extend_from_slice(b"^C\r\n");
                    out.interrupt = true;
                    return out;
                }
                // Ctrl-D: hands over a partial line, or ends input on an
                // empty one.
                0x04 => {
                    if self.line.is_empty() {
                        out.end_of_input = true;
                        return out;
                    }
                    out.input.append(&mut self.line);
                }
                // Ctrl-U: erase the line.
                0x15 => {
                    for _ in 0..String::from_utf8_lossy(&self.line).chars().count() {
                        out.echo.extend_from_slice(b"\x08 \x08");
                    }
                    self.line.clear();
                }
                _ => {
                    self.line.push(key);
                    out.echo.push(key);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_output_ends_lines_with_cr_lf_once() {
        assert_eq!(onlcr(b"a\nb\r\nc\n"), b"a\r\nb\r\nc\r\n");
        assert_eq!(onlcr(b""), b"");
    }

    #[test]
    fn canonical_input_hands_over_whole_edited_lines() {
        let mut tty = LineDiscipline::default();
        let typed = tty.feed(b"helo");
        assert!(typed.input.is_empty());
        assert_eq!(typed.echo, b"helo");
        let fixed = tty.feed(b"\x7flo\r");
        assert_eq!(fixed.input, b"hello\n");
        assert_eq!(fixed.echo, b"\x08 \x08lo\r\n");
        // A multi-byte character is erased whole.
        tty.feed("é".as_bytes());
        tty.feed(b"\x7f");
        assert_eq!(tty.feed(b"x\r").input, b"x\n");
    }

    #[test]
    fn control_keys_end_input_and_interrupt() {
        let mut tty = LineDiscipline::default();
        let end = tty.feed(b"\x04");
        assert!(end.end_of_input && end.input.is_empty());
        let partial = tty.feed(b"ab\x04");
        assert_eq!(partial.input, b"ab");
        assert!(!partial.end_of_input);
        let stop = tty.feed(b"xyz\x03more");
        assert!(stop.interrupt);
        assert!(stop.input.is_empty());
        let erased = tty.feed(b"abc\x15d\r");
        assert_eq!(erased.input, b"d\n");
    }

    #[tokio::test]
    async fn output_waits_for_a_slow_client_and_closes_when_it_leaves() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut out = ChannelOutput::new(tx, true);
        assert!(out.check_write().unwrap() > 0);
        out.write(Bytes::from_static(b"one\n")).unwrap();
        assert_eq!(out.check_write().unwrap(), 0, "full: the guest must wait");
        assert_eq!(rx.recv().await.unwrap(), Bytes::from_static(b"one\r\n"));
        out.ready().await;
        assert!(out.check_write().unwrap() > 0);
        drop(rx);
        assert!(matches!(out.check_write(), Err(StreamError::Closed)));
    }
}
