//! Exec and attach: a [`RemoteCommand`] session over either transport, and
//! the `metav1.Status` its error stream ends with.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::mpsc;

use super::connection::{Connection, LinkState, Outbound, header};
use super::spdy::SpdyConn;
use super::websocket::WsConn;
use super::{Outcome, REMOTE_COMMAND_V4, REMOTE_COMMAND_V5, StreamError, StreamOptions, Transport};

/// An exec or attach session, as `kubectl exec`/`kubectl attach` run it.
#[derive(Debug)]
pub struct RemoteCommand {
    protocol: String,
    options: StreamOptions,
    stdin: Option<Outbound>,
    resize: Option<Outbound>,
    stdout: Option<mpsc::UnboundedReceiver<Bytes>>,
    stderr: Option<mpsc::UnboundedReceiver<Bytes>>,
    error: Option<mpsc::UnboundedReceiver<Bytes>>,
    stdout_seen: Vec<u8>,
    stderr_seen: Vec<u8>,
    error_seen: Vec<u8>,
    conn: Arc<Connection>,
}

impl RemoteCommand {
    /// Upgrades `url` and opens the session's streams (on SPDY in the
    /// Kubernetes client's order: error, stdin, stdout, stderr unless tty,
    /// resize if tty), waiting for the server to accept each.
    pub async fn connect(
        url: &str,
        transport: Transport,
        options: StreamOptions,
    ) -> Result<RemoteCommand, StreamError> {
        match transport {
            Transport::Spdy => RemoteCommand::connect_spdy(url, options).await,
            Transport::WebSocket => RemoteCommand::connect_websocket(url, options).await,
        }
    }

    async fn connect_spdy(url: &str, options: StreamOptions) -> Result<Self, StreamError> {
        let spdy = SpdyConn::connect(url, &[REMOTE_COMMAND_V4]).await?;
        let open = |kind: &'static str| spdy.open_stream(vec![header("streamtype", kind)], kind);
        let (_, error) = open("error").await?;
        let mut stdin = None;
        if options.stdin {
            stdin = Some(spdy.outbound(open("stdin").await?.0));
        }
        let mut stdout = None;
        if options.stdout {
            stdout = Some(open("stdout").await?.1);
        }
        let mut stderr = None;
        if options.stderr && !options.tty {
            stderr = Some(open("stderr").await?.1);
        }
        let mut resize = None;
        if options.tty {
            resize = Some(spdy.outbound(open("resize").await?.0));
        }
        Ok(RemoteCommand::new(
            spdy.conn, options, stdin, resize, stdout, stderr, error,
        ))
    }

    async fn connect_websocket(url: &str, options: StreamOptions) -> Result<Self, StreamError> {
        let mut ws =
            WsConn::connect(url, &[REMOTE_COMMAND_V5, REMOTE_COMMAND_V4], "", 1..=3).await?;
        let mut take = |channel: u8| ws.inbound.remove(&channel).expect("channel was registered");
        let (stdout, stderr, error) = (take(1), take(2), take(3));
        let stdin = options.stdin.then(|| ws.outbound(0));
        let resize = options.tty.then(|| ws.outbound(4));
        Ok(RemoteCommand::new(
            ws.conn,
            options,
            stdin,
            resize,
            options.stdout.then_some(stdout),
            (options.stderr && !options.tty).then_some(stderr),
            error,
        ))
    }

    fn new(
        conn: Arc<Connection>,
        options: StreamOptions,
        stdin: Option<Outbound>,
        resize: Option<Outbound>,
        stdout: Option<mpsc::UnboundedReceiver<Bytes>>,
        stderr: Option<mpsc::UnboundedReceiver<Bytes>>,
        error: mpsc::UnboundedReceiver<Bytes>,
    ) -> Self {
        RemoteCommand {
            protocol: conn.protocol.clone(),
            options,
            stdin,
            resize,
            stdout,
            stderr,
            error: Some(error),
            stdout_seen: Vec::new(),
            stderr_seen: Vec::new(),
            error_seen: Vec::new(),
            conn,
        }
    }

    /// The subprotocol the server chose.
    pub fn protocol(&self) -> &str {
        &self.protocol
    }

    /// Everything read from stdout so far.
    pub fn stdout_so_far(&self) -> &[u8] {
        &self.stdout_seen
    }

    /// Queues `data` for the remote stdin.
    pub async fn write_stdin(&mut self, data: &[u8]) -> Result<(), StreamError> {
        let stdin = self
            .stdin
            .as_ref()
            .ok_or(StreamError::NotRequested { stream: "stdin" })?;
        stdin.write(data)
    }

    /// Ends the remote stdin: FIN on SPDY, a channel close on WebSocket v5
    /// (v4 cannot close a single channel).
    pub async fn close_stdin(&mut self) -> Result<(), StreamError> {
        let stdin = self
            .stdin
            .as_ref()
            .ok_or(StreamError::NotRequested { stream: "stdin" })?;
        stdin.close(&self.protocol)
    }

    /// Sends a terminal size; the session must have been opened with `tty`.
    pub async fn resize(&mut self, width: u16, height: u16) -> Result<(), StreamError> {
        let resize = self
            .resize
            .as_ref()
            .ok_or(StreamError::NotRequested { stream: "resize" })?;
        let size = serde_json::json!({ "Width": width, "Height": height });
        resize.write(size.to_string().as_bytes())
    }

    /// Reads stdout until everything read so far contains `needle`.
    pub async fn wait_stdout_contains(
        &mut self,
        needle: &str,
        timeout: Duration,
    ) -> Result<(), StreamError> {
        if !self.options.stdout {
            return Err(StreamError::NotRequested { stream: "stdout" });
        }
        let read = async {
            while !contains(&self.stdout_seen, needle.as_bytes()) {
                let chunk = recv(&mut self.stdout)
                    .await
                    .ok_or_else(|| StreamError::Ended {
                        waiting_for: self.stdout_wait(needle),
                    })?;
                self.stdout_seen.extend_from_slice(&chunk);
            }
            Ok(())
        };
        match tokio::time::timeout(timeout, read).await {
            Ok(result) => result,
            Err(_) => Err(StreamError::Timeout {
                waiting_for: self.stdout_wait(needle),
                timeout,
            }),
        }
    }

    fn stdout_wait(&self, needle: &str) -> String {
        let seen = String::from_utf8_lossy(&self.stdout_seen);
        format!("stdout to contain {needle:?} (stdout so far: {seen:?})")
    }

    /// Reads every stream until the server has ended them and the
    /// connection, then turns the status on the error stream into an
    /// [`Outcome`].
    pub async fn finish(mut self, timeout: Duration) -> Result<Outcome, StreamError> {
        if tokio::time::timeout(timeout, self.drain()).await.is_err() {
            let waiting_for = format!(
                "the session to end (stdout: {:?}, stderr: {:?}, status: {:?})",
                String::from_utf8_lossy(&self.stdout_seen),
                String::from_utf8_lossy(&self.stderr_seen),
                String::from_utf8_lossy(&self.error_seen),
            );
            return Err(StreamError::Timeout {
                waiting_for,
                timeout,
            });
        }
        if let LinkState::Failed(reason) = self.conn.state() {
            return Err(StreamError::Protocol(reason));
        }
        if self.error_seen.is_empty() {
            return Err(StreamError::MissingStatus {
                stdout: String::from_utf8_lossy(&self.stdout_seen).into_owned(),
                stderr: String::from_utf8_lossy(&self.stderr_seen).into_owned(),
            });
        }
        let (exit_code, message, status) = parse_status(&self.error_seen)?;
        Ok(Outcome {
            stdout: std::mem::take(&mut self.stdout_seen),
            stderr: std::mem::take(&mut self.stderr_seen),
            exit_code,
            message,
            status,
        })
    }

    async fn drain(&mut self) {
        loop {
            tokio::select! {
                Some(chunk) = recv(&mut self.stdout) => self.stdout_seen.extend_from_slice(&chunk),
                Some(chunk) = recv(&mut self.stderr) => self.stderr_seen.extend_from_slice(&chunk),
                Some(chunk) = recv(&mut self.error) => self.error_seen.extend_from_slice(&chunk),
                else => break,
            }
        }
        self.conn.ended().await;
    }
}

/// The next chunk of an optional stream; `None` once it ended or if absent.
pub(super) async fn recv(stream: &mut Option<mpsc::UnboundedReceiver<Bytes>>) -> Option<Bytes> {
    let chunk = stream.as_mut()?.recv().await;
    if chunk.is_none() {
        *stream = None;
    }
    chunk
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty()
        || haystack
            .windows(needle.len())
            .any(|window| window == needle)
}

/// Reads a `metav1.Status` into (exit code, message, status).
fn parse_status(bytes: &[u8]) -> Result<(Option<i32>, String, Value), StreamError> {
    let bad = |reason: String| StreamError::BadStatus {
        text: String::from_utf8_lossy(bytes).into_owned(),
        reason,
    };
    let status: Value = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    let message = status["message"].as_str().unwrap_or_default().to_owned();
    match status["status"].as_str() {
        Some("Success") => Ok((Some(0), message, status)),
        Some("Failure") if status["reason"] == "NonZeroExitCode" => {
            let causes = status["details"]["causes"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            let exit_code = causes
                .iter()
                .find(|cause| cause["reason"] == "ExitCode")
                .and_then(|cause| cause["message"].as_str()?.parse().ok())
                .ok_or_else(|| bad("NonZeroExitCode without an integer ExitCode cause".into()))?;
            Ok((Some(exit_code), message, status))
        }
        Some("Failure") => Ok((None, message, status)),
        _ => Err(bad("`status` is neither Success nor Failure".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_status_parses_success_exit_codes_and_failures() {
        let (code, message, _) = parse_status(br#"{"metadata":{},"status":"Success"}"#).unwrap();
        assert_eq!((code, message.as_str()), (Some(0), ""));

        let nonzero = br#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: 3","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}"#;
        let (code, message, status) = parse_status(nonzero).unwrap();
        assert_eq!(code, Some(3));
        assert!(message.contains("exit code: 3"));
        assert_eq!(status["reason"], "NonZeroExitCode");

        let failure = br#"{"metadata":{},"status":"Failure","message":"container not found"}"#;
        let (code, message, _) = parse_status(failure).unwrap();
        assert_eq!((code, message.as_str()), (None, "container not found"));

        assert!(matches!(
            parse_status(b"oops"),
            Err(StreamError::BadStatus { .. })
        ));
        let no_cause = br#"{"status":"Failure","reason":"NonZeroExitCode"}"#;
        assert!(matches!(
            parse_status(no_cause),
            Err(StreamError::BadStatus { .. })
        ));
    }
}
