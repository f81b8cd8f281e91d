//! Following a container log file in the CRI format, as `kubectl logs -f`
//! shows it: one text line per full record, partial records joined.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

/// A joined line longer than this is shown in pieces, so that a guest that
/// never writes a newline cannot grow play's memory without bound.
const MAX_LINE: usize = 1024 * 1024;

/// Which stream of the container a line was written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn index(self) -> usize {
        match self {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }
}

/// One line of a container's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub stream: Stream,
    pub text: String,
}

/// One record: `<timestamp> <stream> <tags> <text>`, where the first tag is
/// `P` (a part of a line, continued by the next record of the stream) or
/// `F` (the end of a line).
#[derive(Debug, PartialEq, Eq)]
struct Record<'a> {
    stream: Stream,
    partial: bool,
    text: &'a str,
}

fn parse_record(line: &str) -> Option<Record<'_>> {
    let (timestamp, rest) = line.split_once(' ')?;
    let (stream, rest) = rest.split_once(' ')?;
    let (tags, text) = rest.split_once(' ').unwrap_or((rest, ""));
    let stream = match stream {
        "stdout" => Stream::Stdout,
        "stderr" => Stream::Stderr,
        _ => return None,
    };
    let partial = match tags.split(':').next() {
        Some("P") => true,
        Some("F") => false,
        _ => return None,
    };
    if timestamp.is_empty() {
        return None;
    }
    Some(Record {
        stream,
        partial,
        text,
    })
}

/// Reads a log file as it grows. The file may not exist yet: the runtime
/// creates it when the container starts.
#[derive(Debug)]
pub struct LogFollower {
    path: PathBuf,
    offset: u64,
    /// Bytes after the last newline read.
    unterminated: Vec<u8>,
    /// Text of `P` records not yet ended by an `F`, per stream.
    partial: [String; 2],
}

impl LogFollower {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            offset: 0,
            unterminated: Vec::new(),
            partial: [String::new(), String::new()],
        }
    }

    /// The lines completed since the last call. A read error counts as
    /// nothing new: the next poll tries again.
    pub fn poll(&mut self) -> Vec<Line> {
        let bytes = self.read_new().unwrap_or_default();
        self.feed(&bytes)
    }

    /// The lines completed since the last call, then whatever was left
    /// unfinished; called once the container has exited.
    pub fn finish(&mut self) -> Vec<Line> {
        let mut lines = self.poll();
        if !self.unterminated.is_empty() {
            let rest = std::mem::take(&mut self.unterminated);
            lines.extend(self.feed_line(&rest));
        }
        for stream in [Stream::Stdout, Stream::Stderr] {
            let text = std::mem::take(&mut self.partial[stream.index()]);
            if !text.is_empty() {
                lines.push(Line { stream, text });
            }
        }
        lines
    }

    fn read_new(&mut self) -> std::io::Result<Vec<u8>> {
        let mut file = match std::fs::File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        if file.metadata()?.len() < self.offset {
            // Truncated or replaced: start over.
            self.offset = 0;
            self.unterminated.clear();
        }
        file.seek(SeekFrom::Start(self.offset))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        self.offset += bytes.len() as u64;
        Ok(bytes)
    }

    fn feed(&mut self, bytes: &[u8]) -> Vec<Line> {
        self.unterminated.extend_from_slice(bytes);
        let Some(end) = self.unterminated.iter().rposition(|&b| b == b'\n') else {
            return Vec::new();
        };
        let rest = self.unterminated.split_off(end + 1);
        let complete = std::mem::replace(&mut self.unterminated, rest);
        complete[..end]
            .split(|&b| b == b'\n')
            .filter_map(|record| self.feed_line(record))
            .collect()
    }

    fn feed_line(&mut self, raw: &[u8]) -> Option<Line> {
        let raw = String::from_utf8_lossy(raw);
        let Some(record) = parse_record(&raw) else {
            // Not a CRI record: show it as it is rather than lose it.
            return Some(Line {
                stream: Stream::Stdout,
                text: raw.into_owned(),
            });
        };
        let pending = &mut self.partial[record.stream.index()];
        pending.push_str(record.text);
        if record.partial && pending.len() < MAX_LINE {
            return None;
        }
        Some(Line {
            stream: record.stream,
            text: std::mem::take(pending),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(text: &str) -> Line {
        Line {
            stream: Stream::Stdout,
            text: text.into(),
        }
    }

    fn err(text: &str) -> Line {
        Line {
            stream: Stream::Stderr,
            text: text.into(),
        }
    }

    #[test]
    fn parses_records() {
        let r = parse_record("2024-01-01T00:00:00.1Z stdout F hello  world ").unwrap();
        assert_eq!(
            (r.stream, r.partial, r.text),
            (Stream::Stdout, false, "hello  world ")
        );
        let r = parse_record("2024-01-01T00:00:00Z stderr P:x part").unwrap();
        assert_eq!(
            (r.stream, r.partial, r.text),
            (Stream::Stderr, true, "part")
        );
        assert_eq!(
            parse_record("2024-01-01T00:00:00Z stdout F").unwrap().text,
            ""
        );
        for bad in ["", "x", "t stdin F a", "t stdout X a", " stdout F a"] {
            assert_eq!(parse_record(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn joins_partial_records_and_waits_for_whole_records() {
        let mut log = LogFollower::new(PathBuf::from("/nonexistent"));
        assert_eq!(
            log.feed(b"t stdout P ab\nt stderr F e1\nt stdout P cd"),
            [err("e1")]
        );
        assert_eq!(log.feed(b"\nt stdout F ef\n"), [out("abcdef")]);
        assert_eq!(log.feed(b"garbage\n\n"), [out("garbage"), out("")]);
        assert_eq!(log.feed(b"t stderr P dangling\nt stdout F no newline"), []);
        assert_eq!(log.finish(), [out("no newline"), err("dangling")]);
    }

    #[test]
    fn follows_a_file_as_it_grows() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let mut log = LogFollower::new(path.clone());
        assert_eq!(log.poll(), []);
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(b"t stdout F one\nt stdout F tw").unwrap();
        assert_eq!(log.poll(), [out("one")]);
        file.write_all(b"o\n").unwrap();
        assert_eq!(log.poll(), [out("two")]);
        assert_eq!(log.poll(), []);
    }
}
