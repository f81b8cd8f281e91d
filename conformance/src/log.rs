//! The CRI container log format, read strictly.
//!
//! Each record is one line: `<RFC3339Nano time> <stdout|stderr> <F|P> <text>\n`.
//! `P` marks a partial record: the guest's line continues in the next record of
//! the same stream; `F` ends a line. This is what the kubelet's log reader
//! parses; a runtime that writes anything else breaks `kubectl logs`.

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::Error;

/// Which output stream of the container a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    /// The stream's name as written in the log.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One record (one line of the log file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub time: SystemTime,
    pub stream: Stream,
    /// `P`: the guest's line continues in the next record of this stream.
    pub partial: bool,
    /// The text, without the record's trailing newline.
    pub text: String,
}

/// A guest's output line, reassembled from its `P` records and final `F` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub stream: Stream,
    pub text: String,
    /// The log ended with `P` records of this stream and no `F` after them.
    pub unterminated: bool,
}

/// Why a log record could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ParseError {
    /// 1-based line number in the log.
    pub line: usize,
    pub reason: String,
}

/// Parses a whole CRI log. Every record must be well formed and the log must
/// end with a newline (an empty log is fine). Record text must be UTF-8.
pub fn parse_cri_log(bytes: &[u8]) -> Result<Vec<LogRecord>, ParseError> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let Some(body) = bytes.strip_suffix(b"\n") else {
        let line = bytes.split(|b| *b == b'\n').count();
        return Err(ParseError {
            line,
            reason: "the last record does not end with a newline".to_owned(),
        });
    };
    body.split(|b| *b == b'\n')
        .enumerate()
        .map(|(index, raw)| {
            parse_record(raw).map_err(|reason| ParseError {
                line: index + 1,
                reason,
            })
        })
        .collect()
}

/// Reads and strictly parses the CRI log at `path`.
pub fn read_cri_log(path: impl AsRef<Path>) -> Result<Vec<LogRecord>, Error> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        action: "reading CRI log",
        path: path.to_owned(),
        source,
    })?;
    parse_cri_log(&bytes).map_err(|e| Error::MalformedLog {
        path: path.to_owned(),
        line: e.line,
        reason: e.reason,
    })
}

/// Polls the log at `path` until `done` holds for its complete records.
///
/// A missing file counts as empty and a record still being written (no newline
/// yet) is ignored; a malformed complete record fails at once. `what` describes
/// the awaited condition for the timeout error.
pub async fn wait_for_log(
    path: impl AsRef<Path>,
    timeout: Duration,
    what: &str,
    mut done: impl FnMut(&[LogRecord]) -> bool,
) -> Result<Vec<LogRecord>, Error> {
    let path = path.as_ref();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(Error::Io {
                    action: "reading CRI log",
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let complete = match bytes.iter().rposition(|b| *b == b'\n') {
            Some(last_newline) => &bytes[..=last_newline],
            None => &[][..],
        };
        let records = parse_cri_log(complete).map_err(|e| Error::MalformedLog {
            path: path.to_owned(),
            line: e.line,
            reason: e.reason,
        })?;
        if done(&records) {
            return Ok(records);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::LogTimeout {
                path: path.to_owned(),
                waited_for: what.to_owned(),
                timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reassembles the guest's lines: `P` records are joined with the next `F`
/// record of the same stream. Lines are ordered by their final record.
pub fn lines(records: &[LogRecord]) -> Vec<LogLine> {
    let mut pending_stdout = None::<String>;
    let mut pending_stderr = None::<String>;
    let mut out = Vec::new();
    for record in records {
        let pending = match record.stream {
            Stream::Stdout => &mut pending_stdout,
            Stream::Stderr => &mut pending_stderr,
        };
        let text = pending.get_or_insert_with(String::new);
        text.push_str(&record.text);
        if !record.partial {
            out.push(LogLine {
                stream: record.stream,
                text: pending.take().unwrap_or_default(),
                unterminated: false,
            });
        }
    }
    for (stream, pending) in [
        (Stream::Stdout, pending_stdout),
        (Stream::Stderr, pending_stderr),
    ] {
        if let Some(text) = pending {
            out.push(LogLine {
                stream,
                text,
                unterminated: true,
            });
        }
    }
    out
}

/// The complete lines of one stream, as the guest wrote them.
pub fn stream_lines(records: &[LogRecord], stream: Stream) -> Vec<String> {
    lines(records)
        .into_iter()
        .filter(|line| line.stream == stream && !line.unterminated)
        .map(|line| line.text)
        .collect()
}

fn parse_record(raw: &[u8]) -> Result<LogRecord, String> {
    let line = std::str::from_utf8(raw).map_err(|e| format!("not UTF-8: {e}"))?;
    let mut fields = line.splitn(4, ' ');
    let (Some(time), Some(stream), Some(tag), Some(text)) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(format!(
            "expected `<time> <stream> <F|P> <text>`, got {line:?}"
        ));
    };
    let time = parse_rfc3339_nano(time).map_err(|e| format!("timestamp {time:?}: {e}"))?;
    let stream = match stream {
        "stdout" => Stream::Stdout,
        "stderr" => Stream::Stderr,
        other => return Err(format!("unknown stream {other:?}")),
    };
    let partial = match tag {
        "F" => false,
        "P" => true,
        other => return Err(format!("unknown tag {other:?} (want F or P)")),
    };
    Ok(LogRecord {
        time,
        stream,
        partial,
        text: text.to_owned(),
    })
}

/// Parses Go's `time.RFC3339Nano`: `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`,
/// with 1 to 9 fraction digits.
fn parse_rfc3339_nano(s: &str) -> Result<SystemTime, String> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return Err("too short".to_owned());
    }
    let num = |range: std::ops::Range<usize>| -> Result<u32, String> {
        let digits = &b[range.clone()];
        if !digits.iter().all(u8::is_ascii_digit) {
            return Err(format!("expected digits at {range:?}"));
        }
        Ok(digits
            .iter()
            .fold(0, |acc, d| acc * 10 + u32::from(d - b'0')))
    };
    let sep = |at: usize, want: u8| -> Result<(), String> {
        if b[at] == want {
            Ok(())
        } else {
            Err(format!("expected {:?} at {at}", want as char))
        }
    };
    let year = num(0..4)?;
    sep(4, b'-')?;
    let month = num(5..7)?;
    sep(7, b'-')?;
    let day = num(8..10)?;
    sep(10, b'T')?;
    let hour = num(11..13)?;
    sep(13, b':')?;
    let minute = num(14..16)?;
    sep(16, b':')?;
    let second = num(17..19)?;
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return Err("no such date".to_owned());
    }
    if hour > 23 || minute > 59 || second > 59 {
        return Err("no such time of day".to_owned());
    }

    let mut at = 19;
    let mut nanos = 0u32;
    if b[at] == b'.' {
        let digits = b[at + 1..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        if !(1..=9).contains(&digits) {
            return Err("fraction must have 1 to 9 digits".to_owned());
        }
        nanos = num(at + 1..at + 1 + digits)? * 10u32.pow(9 - digits as u32);
        at += 1 + digits;
    }
    let offset_seconds: i64 = match &b[at..] {
        b"Z" => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let hours = num(at + 1..at + 3)?;
            let minutes = num(at + 4..at + 6)?;
            if hours > 23 || minutes > 59 {
                return Err("no such UTC offset".to_owned());
            }
            let magnitude = i64::from(hours * 3600 + minutes * 60);
            if *sign == b'+' { magnitude } else { -magnitude }
        }
        _ => return Err("expected `Z` or `±HH:MM` after the seconds".to_owned()),
    };

    let days = days_from_civil(i64::from(year), month, day);
    let unix = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second) - offset_seconds;
    let unix = u64::try_from(unix).map_err(|_| "before the Unix epoch".to_owned())?;
    Ok(SystemTime::UNIX_EPOCH + Duration::new(unix, nanos))
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400) => {
            29
        }
        _ => 28,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = i64::from((month + 9) % 12);
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(unix: u64, nanos: u32) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::new(unix, nanos)
    }

    #[test]
    fn parses_go_rfc3339_nano_timestamps() {
        let cases = [
            ("1970-01-01T00:00:00Z", at(0, 0)),
            (
                "2024-02-29T12:34:56.123456789Z",
                at(1_709_210_096, 123_456_789),
            ),
            ("2024-02-29T12:34:56.5Z", at(1_709_210_096, 500_000_000)),
            ("2024-02-29T14:34:56.000000001+02:00", at(1_709_210_096, 1)),
            ("2024-02-29T10:04:56-02:30", at(1_709_210_096, 0)),
            ("2000-03-01T00:00:00Z", at(951_868_800, 0)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_rfc3339_nano(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn rejects_malformed_timestamps() {
        for text in [
            "2024-02-29 12:34:56Z",
            "2024-02-30T12:34:56Z",
            "2023-02-29T12:34:56Z",
            "2024-13-01T12:34:56Z",
            "2024-01-01T24:00:00Z",
            "2024-01-01T12:34:56",
            "2024-01-01T12:34:56.Z",
            "2024-01-01T12:34:56.1234567890Z",
            "2024-01-01T12:34:56+0200",
            "2024-01-01T12:34:56ZZ",
            "1969-12-31T23:59:59Z",
            "1700000000",
        ] {
            assert!(parse_rfc3339_nano(text).is_err(), "{text} was accepted");
        }
    }

    #[test]
    fn parses_records_and_keeps_spaces_in_text() {
        let log = b"2024-01-01T00:00:00.1Z stdout F hello  world \n\
                    2024-01-01T00:00:00.2Z stderr P part\n\
                    2024-01-01T00:00:00.3Z stderr F \n";
        let records = parse_cri_log(log).unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(records[0].stream, Stream::Stdout);
        assert!(!records[0].partial);
        assert_eq!(records[0].text, "hello  world ");
        assert_eq!(records[1].stream, Stream::Stderr);
        assert!(records[1].partial);
        assert_eq!(records[2].text, "");
        assert_eq!(stream_lines(&records, Stream::Stderr), ["part"]);
        assert_eq!(stream_lines(&records, Stream::Stdout), ["hello  world "]);
    }

    #[test]
    fn rejects_malformed_records() {
        for log in [
            &b"2024-01-01T00:00:00Z stdout F no newline"[..],
            b"2024-01-01T00:00:00Z stdout F\n",
            b"2024-01-01T00:00:00Z stdin F text\n",
            b"2024-01-01T00:00:00Z stdout X text\n",
            b"2024-01-01T00:00:00Z stdout F:P text\n",
            b"yesterday stdout F text\n",
            b"2024-01-01T00:00:00Z  stdout F text\n",
            b"\n",
            b"2024-01-01T00:00:00Z stdout F \xff\n",
        ] {
            assert!(
                parse_cri_log(log).is_err(),
                "{:?} was accepted",
                String::from_utf8_lossy(log)
            );
        }
    }

    #[test]
    fn names_the_line_of_a_malformed_record() {
        let log = b"2024-01-01T00:00:00Z stdout F ok\nbad\n";
        assert_eq!(parse_cri_log(log).unwrap_err().line, 2);
    }

    #[test]
    fn joins_partial_records_per_stream() {
        let record = |stream, partial, text: &str| LogRecord {
            time: at(0, 0),
            stream,
            partial,
            text: text.to_owned(),
        };
        let records = [
            record(Stream::Stdout, true, "ab"),
            record(Stream::Stderr, false, "err"),
            record(Stream::Stdout, true, "cd"),
            record(Stream::Stdout, false, "ef"),
            record(Stream::Stderr, true, "dangling"),
        ];
        let lines = lines(&records);
        assert_eq!(
            lines,
            [
                LogLine {
                    stream: Stream::Stderr,
                    text: "err".into(),
                    unterminated: false
                },
                LogLine {
                    stream: Stream::Stdout,
                    text: "abcdef".into(),
                    unterminated: false
                },
                LogLine {
                    stream: Stream::Stderr,
                    text: "dangling".into(),
                    unterminated: true
                },
            ]
        );
    }
}
