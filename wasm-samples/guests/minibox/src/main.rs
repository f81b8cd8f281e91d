//! `minibox`: a busybox-like multi-call program, the Wasm stand-in for the
//! busybox image of the CRI validation suite (critest).
//!
//! It picks its applet by the basename of `argv[0]` (`/bin/sh`, `echo`,
//! `cat`...), or by `argv[1]` when run as `minibox`. There are no
//! processes in WASI, so `sh` interprets its command lines itself: simple
//! commands, `;`, `&&`, `||`, `|` (the left side runs to its end first),
//! `>`, `>>`, `<`, `2>&1`, `2>/dev/null`, quotes, `$VAR`, `$?`, `$(...)`,
//! `while`/`until`/`if` blocks and `exit`. Without `-c` it reads commands
//! from stdin, line by line (an attached or exec'd shell).
//!
//! The applets read what they would in a Linux container: `hostname` reads
//! `/etc/hostname` (else `HOSTNAME`), `cat /etc/resolv.conf` the file the
//! runtime wrote; `dd` has `/dev/zero` and `/dev/null` of its own where
//! the guest has no such files (WASI gives it no devices). What has no
//! meaning without processes answers as in an empty container (`pgrep` and
//! `pidof` find nothing) or fails the way a container without the
//! privilege would (`hostname NAME`, `mount`).

use std::cell::RefCell;
use std::fs;
use std::io::{self, BufRead, Read, Write};
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

type Out = Rc<RefCell<dyn Write>>;
type In = Rc<RefCell<dyn BufRead>>;

/// A command's standard streams.
#[derive(Clone)]
struct Io {
    input: In,
    out: Out,
    err: Out,
}

/// Exiting the whole program (`exit N`) unwinds through the interpreter.
struct Exit(i32);

type Status = Result<i32, Exit>;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let io = Io {
        input: Rc::new(RefCell::new(io::BufReader::new(io::stdin()))),
        out: Rc::new(RefCell::new(io::stdout())),
        err: Rc::new(RefCell::new(io::stderr())),
    };
    let mut shell = Shell { last: 0 };
    let code = match shell.run_applet(&args, &io) {
        Ok(code) | Err(Exit(code)) => code,
    };
    let _ = io.out.borrow_mut().flush();
    let _ = io.err.borrow_mut().flush();
    std::process::exit(code);
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// An OS error as busybox prints it: the text without Rust's "(os error N)".
fn reason(error: &io::Error) -> String {
    let text = error.to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

macro_rules! say {
    ($w:expr, $($arg:tt)*) => {{
        let _ = writeln!($w.borrow_mut(), $($arg)*);
    }};
}

struct Shell {
    /// `$?`.
    last: i32,
}

impl Shell {
    /// Runs `args[0]` (by basename) with `args[1..]`.
    fn run_applet(&mut self, args: &[String], io: &Io) -> Status {
        let Some(name) = args.first() else {
            return Ok(0);
        };
        let name = basename(name);
        let rest = &args[1..];
        let code = match name {
            "minibox" | "busybox" => {
                return if rest.is_empty() {
                    say!(io.out, "minibox: a busybox stand-in for Wasm");
                    Ok(0)
                } else {
                    self.run_applet(rest, io)
                };
            }
            "sh" | "ash" | "bash" => return self.sh(rest, io),
            "exit" => {
                return Err(Exit(
                    rest.first()
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(self.last),
                ));
            }
            "echo" => echo(rest, io),
            "cat" => cat(rest, io),
            "ls" => ls(rest, io),
            "touch" => touch(rest, io),
            "mkdir" => mkdir(rest, io),
            "rm" => rm(rest, io),
            "hostname" => hostname(rest, io),
            "sleep" => sleep(rest, io),
            "top" => {
                say!(io.out, "Mem: -\nPID  USER     COMMAND\n    1 root     top");
                let _ = io.out.borrow_mut().flush();
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
            "env" | "printenv" => env(rest, io),
            "test" => test(rest, io),
            "[" => match rest.split_last() {
                Some((last, inner)) if last == "]" => test(inner, io),
                _ => {
                    say!(io.err, "[: missing ]");
                    2
                }
            },
            "true" | ":" => 0,
            "false" => 1,
            "grep" => grep(rest, io),
            "dd" => dd(rest, io),
            "httpd" => httpd(rest, io),
            "pgrep" | "pidof" => 1,
            "id" => id(rest, io),
            "pwd" => match std::env::current_dir() {
                Ok(dir) => {
                    say!(io.out, "{}", dir.display());
                    0
                }
                Err(e) => {
                    say!(io.err, "pwd: {}", reason(&e));
                    1
                }
            },
            "mount" | "umount" => {
                say!(io.err, "{name}: permission denied (are you root?)");
                1
            }
            _ => {
                say!(io.err, "{name}: applet not found");
                127
            }
        };
        Ok(code)
    }

    /// `sh -c LINE [ARG0 ARGS...]`, or commands from stdin.
    fn sh(&mut self, args: &[String], io: &Io) -> Status {
        if let Some(i) = args.iter().position(|a| a == "-c") {
            let Some(line) = args.get(i + 1) else {
                say!(io.err, "sh: -c requires an argument");
                return Ok(2);
            };
            return self.eval(line, io);
        }
        if let Some(script) = args.first() {
            return match fs::read_to_string(script) {
                Ok(text) => self.eval(&text, io),
                Err(e) => {
                    say!(io.err, "sh: {script}: {}", reason(&e));
                    Ok(127)
                }
            };
        }
        let mut line = String::new();
        loop {
            line.clear();
            let read = io.input.borrow_mut().read_line(&mut line);
            match read {
                Ok(0) | Err(_) => return Ok(self.last),
                Ok(_) => {
                    self.eval(&line, io)?;
                    let _ = io.out.borrow_mut().flush();
                }
            }
        }
    }

    fn eval(&mut self, text: &str, io: &Io) -> Status {
        let tokens = match lex(text) {
            Ok(tokens) => tokens,
            Err(e) => {
                say!(io.err, "sh: syntax error: {e}");
                self.last = 2;
                return Ok(2);
            }
        };
        let mut parser = Parser { tokens, pos: 0 };
        let list = match parser.list(&[]) {
            Ok(list) if parser.pos == parser.tokens.len() => list,
            Ok(_) => {
                say!(io.err, "sh: syntax error: unexpected {:?}", parser.peek());
                self.last = 2;
                return Ok(2);
            }
            Err(e) => {
                say!(io.err, "sh: syntax error: {e}");
                self.last = 2;
                return Ok(2);
            }
        };
        self.list(&list, io)
    }

    fn list(&mut self, list: &[AndOr], io: &Io) -> Status {
        let mut code = self.last;
        for and_or in list {
            code = self.pipeline(&and_or.first, io)?;
            for (op, pipeline) in &and_or.rest {
                let run = match op {
                    Op::And => code == 0,
                    Op::Or => code != 0,
                };
                if run {
                    code = self.pipeline(pipeline, io)?;
                }
            }
        }
        Ok(code)
    }

    /// Each command but the last writes into a buffer the next one reads.
    fn pipeline(&mut self, pipeline: &Pipeline, io: &Io) -> Status {
        let mut input = io.input.clone();
        let mut code = 0;
        for (i, command) in pipeline.commands.iter().enumerate() {
            let last = i + 1 == pipeline.commands.len();
            let buffer = Rc::new(RefCell::new(Vec::new()));
            let out: Out = if last { io.out.clone() } else { buffer.clone() };
            let stage = Io {
                input: input.clone(),
                out,
                err: io.err.clone(),
            };
            code = self.command(command, &stage)?;
            if !last {
                let bytes = std::mem::take(&mut *buffer.borrow_mut());
                input = Rc::new(RefCell::new(io::Cursor::new(bytes)));
            }
        }
        if pipeline.negated {
            code = i32::from(code == 0);
        }
        self.last = code;
        Ok(code)
    }

    fn command(&mut self, command: &Command, io: &Io) -> Status {
        match command {
            Command::Loop { until, cond, body } => {
                let mut code = 0;
                loop {
                    let c = self.list(cond, io)?;
                    if (c == 0) == *until {
                        return Ok(code);
                    }
                    code = self.list(body, io)?;
                }
            }
            Command::If {
                branches,
                otherwise,
            } => {
                for (cond, body) in branches {
                    if self.list(cond, io)? == 0 {
                        return self.list(body, io);
                    }
                }
                match otherwise {
                    Some(body) => self.list(body, io),
                    None => Ok(0),
                }
            }
            Command::Simple { words, redirects } => {
                let mut args = Vec::new();
                for word in words {
                    args.extend(self.expand(word, io)?);
                }
                let mut io = io.clone();
                for redirect in redirects {
                    if let Err(message) = self.redirect(redirect, &mut io) {
                        say!(io.err, "sh: {message}");
                        return Ok(1);
                    }
                }
                let code = self.run_applet(&args, &io);
                let _ = io.out.borrow_mut().flush();
                code
            }
        }
    }

    fn redirect(&mut self, redirect: &Redirect, io: &mut Io) -> Result<(), String> {
        let target = |shell: &mut Shell| -> Result<String, String> {
            let io = io.clone();
            shell
                .expand(&redirect.target, &io)
                .map_err(|_| "exit in a redirection".to_owned())
                .map(|words| words.concat())
        };
        match redirect.kind.as_str() {
            ">&" => {
                let to = if redirect.target.literal() == "1" {
                    io.out.clone()
                } else {
                    io.err.clone()
                };
                if redirect.fd == 2 {
                    io.err = to;
                } else {
                    io.out = to;
                }
            }
            "<" => {
                let path = target(self)?;
                let file = fs::File::open(&path).map_err(|e| format!("{path}: {}", reason(&e)))?;
                io.input = Rc::new(RefCell::new(io::BufReader::new(file)));
            }
            kind => {
                let path = target(self)?;
                let file = fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .append(kind == ">>")
                    .truncate(kind == ">")
                    .open(&path)
                    .map_err(|e| format!("can't create {path}: {}", reason(&e)))?;
                let file: Out = Rc::new(RefCell::new(file));
                if redirect.fd == 2 {
                    io.err = file;
                } else {
                    io.out = file;
                }
            }
        }
        Ok(())
    }

    /// A word's expansions; unquoted expansions split on whitespace.
    fn expand(&mut self, word: &Word, io: &Io) -> Result<Vec<String>, Exit> {
        let mut fields = vec![String::new()];
        let mut any_quoted = false;
        for part in &word.0 {
            let (text, quoted) = match part {
                Part::Lit(text) => {
                    fields.last_mut().expect("one field").push_str(text);
                    continue;
                }
                Part::Quoted(text) => {
                    any_quoted = true;
                    fields.last_mut().expect("one field").push_str(text);
                    continue;
                }
                Part::Var(name, quoted) => (self.var(name), *quoted),
                Part::Sub(text, quoted) => {
                    let buffer = Rc::new(RefCell::new(Vec::new()));
                    let sub = Io {
                        input: io.input.clone(),
                        out: buffer.clone(),
                        err: io.err.clone(),
                    };
                    self.eval(text, &sub)?;
                    let bytes = std::mem::take(&mut *buffer.borrow_mut());
                    let text = String::from_utf8_lossy(&bytes);
                    (text.trim_end_matches('\n').to_owned(), *quoted)
                }
            };
            if quoted {
                any_quoted = true;
                fields.last_mut().expect("one field").push_str(&text);
            } else {
                let mut pieces = text.split_whitespace();
                if let Some(first) = pieces.next() {
                    fields.last_mut().expect("one field").push_str(first);
                }
                for piece in pieces {
                    fields.push(piece.to_owned());
                }
            }
        }
        if fields.len() == 1 && fields[0].is_empty() && !any_quoted {
            return Ok(Vec::new());
        }
        Ok(fields)
    }

    fn var(&self, name: &str) -> String {
        match name {
            "?" => self.last.to_string(),
            "$" => "1".to_owned(),
            _ => std::env::var(name).unwrap_or_default(),
        }
    }
}

// ---- the language ----

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Lit(String),
    Quoted(String),
    /// `$NAME`, and whether it was inside double quotes.
    Var(String, bool),
    /// `$(...)`.
    Sub(String, bool),
}

#[derive(Debug, Clone, PartialEq)]
struct Word(Vec<Part>);

impl Word {
    /// The word's text if it is only literal text.
    fn literal(&self) -> String {
        self.0
            .iter()
            .map(|p| match p {
                Part::Lit(t) | Part::Quoted(t) => t.as_str(),
                _ => "\u{0}",
            })
            .collect()
    }

    fn is_keyword(&self, keyword: &str) -> bool {
        matches!(self.0.as_slice(), [Part::Lit(t)] if t == keyword)
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(Word),
    /// `;`, newline or `&` (run in the foreground all the same).
    Sep,
    And,
    Or,
    Pipe,
    /// A redirection: fd, `>`, `>>`, `<` or `>&`.
    Redir(u32, String),
}

fn lex(text: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    let mut word: Vec<Part> = Vec::new();
    let mut lit = String::new();
    let mut in_word = false;
    fn flush(word: &mut Vec<Part>, lit: &mut String) {
        if !lit.is_empty() {
            word.push(Part::Lit(std::mem::take(lit)));
        }
    }
    macro_rules! end_word {
        () => {
            if in_word {
                flush(&mut word, &mut lit);
                tokens.push(Token::Word(Word(std::mem::take(&mut word))));
                in_word = false;
            }
        };
    }
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '\t' => {
                end_word!();
                i += 1;
            }
            '#' if !in_word => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '\n' | ';' => {
                end_word!();
                tokens.push(Token::Sep);
                i += 1;
            }
            '&' => {
                end_word!();
                if chars.get(i + 1) == Some(&'&') {
                    tokens.push(Token::And);
                    i += 2;
                } else {
                    tokens.push(Token::Sep);
                    i += 1;
                }
            }
            '|' => {
                end_word!();
                if chars.get(i + 1) == Some(&'|') {
                    tokens.push(Token::Or);
                    i += 2;
                } else {
                    tokens.push(Token::Pipe);
                    i += 1;
                }
            }
            '>' | '<' => {
                // A word of only digits right before is the fd.
                let fd = if in_word
                    && word.is_empty()
                    && !lit.is_empty()
                    && lit.chars().all(|c| c.is_ascii_digit())
                {
                    let fd = lit.parse().unwrap_or(1);
                    lit.clear();
                    in_word = false;
                    fd
                } else {
                    end_word!();
                    u32::from(c != '<')
                };
                let kind = if c == '<' {
                    i += 1;
                    "<"
                } else if chars.get(i + 1) == Some(&'>') {
                    i += 2;
                    ">>"
                } else if chars.get(i + 1) == Some(&'&') {
                    i += 2;
                    ">&"
                } else {
                    i += 1;
                    ">"
                };
                tokens.push(Token::Redir(fd, kind.to_owned()));
            }
            '\'' => {
                in_word = true;
                flush(&mut word, &mut lit);
                let end = chars[i + 1..]
                    .iter()
                    .position(|&c| c == '\'')
                    .ok_or("unterminated '")?;
                word.push(Part::Quoted(chars[i + 1..i + 1 + end].iter().collect()));
                i += end + 2;
            }
            '"' => {
                in_word = true;
                flush(&mut word, &mut lit);
                i += 1;
                let mut text = String::new();
                loop {
                    let Some(&c) = chars.get(i) else {
                        return Err("unterminated \"".to_owned());
                    };
                    match c {
                        '"' => {
                            i += 1;
                            break;
                        }
                        '\\' if matches!(chars.get(i + 1), Some('"' | '\\' | '$' | '`')) => {
                            text.push(chars[i + 1]);
                            i += 2;
                        }
                        '$' => {
                            if !text.is_empty() {
                                word.push(Part::Quoted(std::mem::take(&mut text)));
                            }
                            let (part, next) = dollar(&chars, i, true)?;
                            word.push(part);
                            i = next;
                        }
                        _ => {
                            text.push(c);
                            i += 1;
                        }
                    }
                }
                word.push(Part::Quoted(text));
            }
            '\\' => {
                in_word = true;
                if let Some(&next) = chars.get(i + 1) {
                    if next != '\n' {
                        flush(&mut word, &mut lit);
                        word.push(Part::Quoted(next.to_string()));
                    }
                }
                i += 2;
            }
            '$' => {
                in_word = true;
                flush(&mut word, &mut lit);
                let (part, next) = dollar(&chars, i, false)?;
                word.push(part);
                i = next;
            }
            _ => {
                in_word = true;
                lit.push(c);
                i += 1;
            }
        }
    }
    if in_word {
        flush(&mut word, &mut lit);
        tokens.push(Token::Word(Word(word)));
    }
    Ok(tokens)
}

/// `$NAME`, `${NAME}`, `$?` or `$(...)` at `chars[i]`; the part and the
/// index after it.
fn dollar(chars: &[char], i: usize, quoted: bool) -> Result<(Part, usize), String> {
    match chars.get(i + 1) {
        Some('(') => {
            let mut depth = 0;
            for (j, &c) in chars.iter().enumerate().skip(i + 1) {
                match c {
                    '(' => depth += 1,
                    ')' => {
                        depth -= 1;
                        if depth == 0 {
                            let text: String = chars[i + 2..j].iter().collect();
                            return Ok((Part::Sub(text, quoted), j + 1));
                        }
                    }
                    _ => {}
                }
            }
            Err("unterminated $(".to_owned())
        }
        Some('{') => {
            let end = chars[i + 2..]
                .iter()
                .position(|&c| c == '}')
                .ok_or("unterminated ${")?;
            let name: String = chars[i + 2..i + 2 + end].iter().collect();
            Ok((Part::Var(name, quoted), i + 3 + end))
        }
        Some(&c) if c == '?' || c == '$' => Ok((Part::Var(c.to_string(), quoted), i + 2)),
        Some(&c) if c.is_ascii_alphabetic() || c == '_' => {
            let len = chars[i + 1..]
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric() || **c == '_')
                .count();
            let name: String = chars[i + 1..i + 1 + len].iter().collect();
            Ok((Part::Var(name, quoted), i + 1 + len))
        }
        _ => Ok((Part::Lit("$".to_owned()), i + 1)),
    }
}

#[derive(Debug)]
struct Redirect {
    fd: u32,
    kind: String,
    target: Word,
}

#[derive(Debug)]
enum Command {
    Simple {
        words: Vec<Word>,
        redirects: Vec<Redirect>,
    },
    Loop {
        until: bool,
        cond: Vec<AndOr>,
        body: Vec<AndOr>,
    },
    If {
        branches: Vec<(Vec<AndOr>, Vec<AndOr>)>,
        otherwise: Option<Vec<AndOr>>,
    },
}

#[derive(Debug)]
struct Pipeline {
    negated: bool,
    commands: Vec<Command>,
}

#[derive(Debug)]
enum Op {
    And,
    Or,
}

#[derive(Debug)]
struct AndOr {
    first: Pipeline,
    rest: Vec<(Op, Pipeline)>,
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn at_keyword(&self, keywords: &[&str]) -> bool {
        matches!(self.peek(), Some(Token::Word(w)) if keywords.iter().any(|k| w.is_keyword(k)))
    }

    fn expect_keyword(&mut self, keyword: &str) -> Result<(), String> {
        if self.at_keyword(&[keyword]) {
            self.pos += 1;
            Ok(())
        } else {
            Err(format!("expected {keyword}, found {:?}", self.peek()))
        }
    }

    /// And-or lists separated by `;`/newlines, up to one of `stops`
    /// (keywords) or the end.
    fn list(&mut self, stops: &[&str]) -> Result<Vec<AndOr>, String> {
        let mut list = Vec::new();
        loop {
            while self.peek() == Some(&Token::Sep) {
                self.pos += 1;
            }
            if self.peek().is_none() || self.at_keyword(stops) {
                return Ok(list);
            }
            list.push(self.and_or(stops)?);
        }
    }

    fn and_or(&mut self, stops: &[&str]) -> Result<AndOr, String> {
        let first = self.pipeline(stops)?;
        let mut rest = Vec::new();
        loop {
            let op = match self.peek() {
                Some(Token::And) => Op::And,
                Some(Token::Or) => Op::Or,
                _ => return Ok(AndOr { first, rest }),
            };
            self.pos += 1;
            while self.peek() == Some(&Token::Sep) {
                self.pos += 1;
            }
            rest.push((op, self.pipeline(stops)?));
        }
    }

    fn pipeline(&mut self, stops: &[&str]) -> Result<Pipeline, String> {
        let negated = self.at_keyword(&["!"]);
        if negated {
            self.pos += 1;
        }
        let mut commands = vec![self.command(stops)?];
        while self.peek() == Some(&Token::Pipe) {
            self.pos += 1;
            commands.push(self.command(stops)?);
        }
        Ok(Pipeline { negated, commands })
    }

    fn command(&mut self, stops: &[&str]) -> Result<Command, String> {
        if self.at_keyword(&["while", "until"]) {
            let until = self.at_keyword(&["until"]);
            self.pos += 1;
            let cond = self.list(&["do"])?;
            self.expect_keyword("do")?;
            let body = self.list(&["done"])?;
            self.expect_keyword("done")?;
            return Ok(Command::Loop { until, cond, body });
        }
        if self.at_keyword(&["if"]) {
            self.pos += 1;
            let mut branches = Vec::new();
            let mut otherwise = None;
            loop {
                let cond = self.list(&["then"])?;
                self.expect_keyword("then")?;
                let body = self.list(&["elif", "else", "fi"])?;
                branches.push((cond, body));
                if self.at_keyword(&["elif"]) {
                    self.pos += 1;
                    continue;
                }
                if self.at_keyword(&["else"]) {
                    self.pos += 1;
                    otherwise = Some(self.list(&["fi"])?);
                }
                self.expect_keyword("fi")?;
                return Ok(Command::If {
                    branches,
                    otherwise,
                });
            }
        }
        let mut words = Vec::new();
        let mut redirects = Vec::new();
        loop {
            match self.peek() {
                Some(Token::Word(w))
                    if !(words.is_empty() && stops.iter().any(|k| w.is_keyword(k))) =>
                {
                    words.push(w.clone());
                    self.pos += 1;
                }
                Some(Token::Redir(fd, kind)) => {
                    let (fd, kind) = (*fd, kind.clone());
                    self.pos += 1;
                    let Some(Token::Word(target)) = self.peek().cloned() else {
                        return Err(format!("a redirection {kind} without a target"));
                    };
                    self.pos += 1;
                    redirects.push(Redirect { fd, kind, target });
                }
                _ => break,
            }
        }
        if words.is_empty() && redirects.is_empty() {
            return Err(format!("unexpected {:?}", self.peek()));
        }
        Ok(Command::Simple { words, redirects })
    }
}

// ---- the applets ----

fn echo(args: &[String], io: &Io) -> i32 {
    let mut newline = true;
    let mut escapes = false;
    let mut args = args;
    while let Some(flag) = args.first() {
        match flag.as_str() {
            "-n" => newline = false,
            "-e" => escapes = true,
            "-ne" | "-en" => {
                newline = false;
                escapes = true;
            }
            _ => break,
        }
        args = &args[1..];
    }
    let mut text = args.join(" ");
    if escapes {
        text = text
            .replace("\\n", "\n")
            .replace("\\t", "\t")
            .replace("\\\\", "\\");
    }
    if newline {
        text.push('\n');
    }
    let _ = io.out.borrow_mut().write_all(text.as_bytes());
    0
}

fn cat(args: &[String], io: &Io) -> i32 {
    let files: Vec<&String> = args.iter().filter(|a| a.as_str() != "-u").collect();
    if files.is_empty() || files.iter().all(|f| f.as_str() == "-") {
        let mut bytes = Vec::new();
        let _ = io.input.borrow_mut().read_to_end(&mut bytes);
        let _ = io.out.borrow_mut().write_all(&bytes);
        return 0;
    }
    let mut code = 0;
    for file in files {
        match fs::read(file) {
            Ok(bytes) => {
                let _ = io.out.borrow_mut().write_all(&bytes);
            }
            Err(e) => {
                say!(io.err, "cat: can't open '{file}': {}", reason(&e));
                code = 1;
            }
        }
    }
    code
}

fn ls(args: &[String], io: &Io) -> i32 {
    let mut all = false;
    let mut almost_all = false;
    let mut long = false;
    let mut paths = Vec::new();
    for arg in args {
        match arg.strip_prefix('-') {
            Some(flags) if !flags.is_empty() => {
                all |= flags.contains('a');
                almost_all |= flags.contains('A');
                long |= flags.contains('l');
            }
            _ => paths.push(arg.clone()),
        }
    }
    if paths.is_empty() {
        paths.push(".".to_owned());
    }
    let mut code = 0;
    let many = paths.len() > 1;
    for path in &paths {
        let meta = match fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) => {
                say!(io.err, "ls: {path}: {}", reason(&e));
                code = 1;
                continue;
            }
        };
        if !meta.is_dir() {
            say!(io.out, "{}", line(path, &meta, long));
            continue;
        }
        let mut names = Vec::new();
        match fs::read_dir(path) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    names.push(entry.file_name().to_string_lossy().into_owned());
                }
            }
            Err(e) => {
                say!(io.err, "ls: {path}: {}", reason(&e));
                code = 1;
                continue;
            }
        }
        if all {
            names.push(".".to_owned());
            names.push("..".to_owned());
        }
        names.retain(|n| all || almost_all || !n.starts_with('.'));
        names.sort();
        if many {
            say!(io.out, "{path}:");
        }
        for name in names {
            let meta = fs::symlink_metadata(Path::new(path).join(&name)).ok();
            match meta {
                Some(meta) if long => say!(io.out, "{}", line(&name, &meta, true)),
                _ => say!(io.out, "{name}"),
            }
        }
    }
    code
}

fn line(name: &str, meta: &fs::Metadata, long: bool) -> String {
    if !long {
        return name.to_owned();
    }
    let kind = if meta.is_dir() {
        'd'
    } else if meta.is_symlink() {
        'l'
    } else {
        '-'
    };
    format!(
        "{kind}rw-r--r--    1 root     root     {:>8} {name}",
        meta.len()
    )
}

fn touch(args: &[String], io: &Io) -> i32 {
    let mut code = 0;
    for path in args.iter().filter(|a| !a.starts_with('-')) {
        let opened = fs::OpenOptions::new().create(true).append(true).open(path);
        if let Err(e) = opened {
            say!(io.err, "touch: {path}: {}", reason(&e));
            code = 1;
        }
    }
    code
}

fn mkdir(args: &[String], io: &Io) -> i32 {
    let parents = args.iter().any(|a| a == "-p");
    let mut code = 0;
    for path in args.iter().filter(|a| !a.starts_with('-')) {
        let made = if parents {
            fs::create_dir_all(path)
        } else {
            fs::create_dir(path)
        };
        if let Err(e) = made {
            say!(
                io.err,
                "mkdir: can't create directory '{path}': {}",
                reason(&e)
            );
            code = 1;
        }
    }
    code
}

fn rm(args: &[String], io: &Io) -> i32 {
    let force = args.iter().any(|a| a.starts_with('-') && a.contains('f'));
    let recursive = args
        .iter()
        .any(|a| a.starts_with('-') && (a.contains('r') || a.contains('R')));
    let mut code = 0;
    for path in args.iter().filter(|a| !a.starts_with('-')) {
        let removed = match fs::symlink_metadata(path) {
            Ok(meta) if meta.is_dir() && recursive => fs::remove_dir_all(path),
            Ok(_) => fs::remove_file(path),
            Err(e) => Err(e),
        };
        match removed {
            Err(e) if !(force && e.kind() == io::ErrorKind::NotFound) => {
                say!(io.err, "rm: can't remove '{path}': {}", reason(&e));
                code = 1;
            }
            _ => {}
        }
    }
    code
}

/// The name a Linux container's `hostname` prints: its UTS namespace's,
/// which the runtime also writes to `/etc/hostname`.
fn hostname(args: &[String], io: &Io) -> i32 {
    if let Some(name) = args.iter().find(|a| !a.starts_with('-')) {
        say!(io.err, "hostname: sethostname: Operation not permitted");
        let _ = name;
        return 1;
    }
    let name = fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok());
    match name {
        Some(name) => {
            say!(io.out, "{name}");
            0
        }
        None => {
            say!(io.err, "hostname: no /etc/hostname and no HOSTNAME");
            1
        }
    }
}

fn sleep(args: &[String], io: &Io) -> i32 {
    let Some(arg) = args.first() else {
        say!(io.err, "sleep: missing operand");
        return 1;
    };
    if arg == "infinity" {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    let (number, unit) = match arg.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => (&arg[..i], &arg[i..]),
        None => (arg.as_str(), "s"),
    };
    let scale = match unit {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => {
            say!(io.err, "sleep: invalid number '{arg}'");
            return 1;
        }
    };
    match number.parse::<f64>() {
        Ok(n) if n >= 0.0 => {
            let _ = io.out.borrow_mut().flush();
            std::thread::sleep(Duration::from_secs_f64(n * scale));
            0
        }
        _ => {
            say!(io.err, "sleep: invalid number '{arg}'");
            1
        }
    }
}

fn env(args: &[String], io: &Io) -> i32 {
    if let Some(name) = args.first() {
        return match std::env::var(name) {
            Ok(value) => {
                say!(io.out, "{value}");
                0
            }
            Err(_) => 1,
        };
    }
    for (key, value) in std::env::vars() {
        say!(io.out, "{key}={value}");
    }
    0
}

/// `test`: the file and string tests scripts use.
fn test(args: &[String], io: &Io) -> i32 {
    let truth = |b: bool| i32::from(!b);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        [] => 1,
        ["!", rest @ ..] => {
            let rest: Vec<String> = rest.iter().map(|s| (*s).to_owned()).collect();
            match test(&rest, io) {
                0 => 1,
                1 => 0,
                other => other,
            }
        }
        [s] => truth(!s.is_empty()),
        [op, path] => {
            let meta = fs::metadata(path);
            match *op {
                "-e" => truth(meta.is_ok()),
                "-f" => truth(meta.is_ok_and(|m| m.is_file())),
                "-d" => truth(meta.is_ok_and(|m| m.is_dir())),
                "-s" => truth(meta.is_ok_and(|m| m.len() > 0)),
                "-L" | "-h" => truth(fs::symlink_metadata(path).is_ok_and(|m| m.is_symlink())),
                "-r" | "-x" => truth(meta.is_ok()),
                "-w" => truth(meta.is_ok_and(|m| !m.permissions().readonly())),
                "-z" => truth(path.is_empty()),
                "-n" => truth(!path.is_empty()),
                _ => {
                    say!(io.err, "test: {op}: unknown operand");
                    2
                }
            }
        }
        [a, op, b] => {
            let numbers = || Some((a.parse::<i64>().ok()?, b.parse::<i64>().ok()?));
            match (*op, numbers()) {
                ("=" | "==", _) => truth(a == b),
                ("!=", _) => truth(a != b),
                ("-eq", Some((x, y))) => truth(x == y),
                ("-ne", Some((x, y))) => truth(x != y),
                ("-lt", Some((x, y))) => truth(x < y),
                ("-le", Some((x, y))) => truth(x <= y),
                ("-gt", Some((x, y))) => truth(x > y),
                ("-ge", Some((x, y))) => truth(x >= y),
                _ => {
                    say!(io.err, "test: {op}: bad comparison");
                    2
                }
            }
        }
        _ => {
            say!(io.err, "test: too many arguments");
            2
        }
    }
}

/// `grep [-q] [-v] [-i] [-F|-E] PATTERN [FILE...]`: fixed-string matching,
/// with `^` and `$` anchors.
fn grep(args: &[String], io: &Io) -> i32 {
    let mut quiet = false;
    let mut invert = false;
    let mut nocase = false;
    let mut rest = Vec::new();
    for arg in args {
        match arg.strip_prefix('-') {
            Some(flags) if !flags.is_empty() && rest.is_empty() => {
                quiet |= flags.contains('q');
                invert |= flags.contains('v');
                nocase |= flags.contains('i');
            }
            _ => rest.push(arg.clone()),
        }
    }
    let Some((pattern, files)) = rest.split_first() else {
        say!(io.err, "grep: no pattern");
        return 2;
    };
    let fold = |s: &str| {
        if nocase {
            s.to_lowercase()
        } else {
            s.to_owned()
        }
    };
    let pattern = fold(pattern);
    let (start, pattern) = match pattern.strip_prefix('^') {
        Some(p) => (true, p.to_owned()),
        None => (false, pattern),
    };
    let (end, pattern) = match pattern.strip_suffix('$') {
        Some(p) => (true, p.to_owned()),
        None => (false, pattern),
    };
    let matches = |line: &str| {
        let line = fold(line);
        let hit = match (start, end) {
            (true, true) => line == pattern,
            (true, false) => line.starts_with(&pattern),
            (false, true) => line.ends_with(&pattern),
            (false, false) => line.contains(&pattern),
        };
        hit != invert
    };
    let mut inputs: Vec<(String, Vec<u8>)> = Vec::new();
    if files.is_empty() {
        let mut bytes = Vec::new();
        let _ = io.input.borrow_mut().read_to_end(&mut bytes);
        inputs.push((String::new(), bytes));
    }
    let mut code = 1;
    for file in files {
        match fs::read(file) {
            Ok(bytes) => inputs.push((file.clone(), bytes)),
            Err(e) => {
                say!(io.err, "grep: {file}: {}", reason(&e));
                code = 2;
            }
        }
    }
    let mut found = false;
    for (name, bytes) in &inputs {
        for line in String::from_utf8_lossy(bytes).lines() {
            if matches(line) {
                found = true;
                if quiet {
                    return 0;
                }
                if files.len() > 1 {
                    say!(io.out, "{name}:{line}");
                } else {
                    say!(io.out, "{line}");
                }
            }
        }
    }
    if found { 0 } else { code }
}

/// `httpd [-f] [-p [ADDR:]PORT] [-h DIR]`: busybox's web server, in the
/// foreground always. It says where it listens on stderr, then answers
/// every `GET`/`HEAD` with the file under DIR (default `/www`; `index.html`
/// for a directory) or, when there is none, `It works!`; one connection at
/// a time. Needs `wasi:sockets` (the WASI 0.2 build).
fn httpd(args: &[String], io: &Io) -> i32 {
    let mut addr = "0.0.0.0:80".to_owned();
    let mut home = "/www".to_owned();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-f" | "-v" | "-vv" => {}
            "-p" => match args.next() {
                Some(p) if p.contains(':') => addr = p.clone(),
                Some(p) => addr = format!("0.0.0.0:{p}"),
                None => {
                    say!(io.err, "httpd: -p needs a port");
                    return 1;
                }
            },
            "-h" => match args.next() {
                Some(h) => home = h.clone(),
                None => {
                    say!(io.err, "httpd: -h needs a directory");
                    return 1;
                }
            },
            other => {
                say!(io.err, "httpd: unknown option {other}");
                return 1;
            }
        }
    }
    let listener = match std::net::TcpListener::bind(&addr) {
        Ok(listener) => listener,
        Err(e) => {
            say!(io.err, "httpd: bind {addr}: {}", reason(&e));
            return 1;
        }
    };
    say!(io.err, "httpd: listening on {addr}");
    let _ = io.err.borrow_mut().flush();
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let mut reader = io::BufReader::new(&stream);
        let mut request = String::new();
        if reader.read_line(&mut request).is_err() {
            continue;
        }
        // The rest of the head.
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
            line.clear();
        }
        let mut parts = request.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
        let (status, body) = if method == "GET" || method == "HEAD" {
            let file = Path::new(&home).join(path.trim_start_matches('/'));
            let file = if file.is_dir() {
                file.join("index.html")
            } else {
                file
            };
            match fs::read(&file) {
                Ok(bytes) => ("200 OK", bytes),
                Err(_) if path == "/" => (
                    "200 OK",
                    b"<html><body><h1>It works!</h1></body></html>\n".to_vec(),
                ),
                Err(_) => ("404 Not Found", b"404 Not Found\n".to_vec()),
            }
        } else {
            ("501 Not Implemented", b"501 Not Implemented\n".to_vec())
        };
        say!(io.err, "httpd: {method} {path} {}", &status[..3]);
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let mut writer = &stream;
        let _ = writer.write_all(head.as_bytes());
        if method != "HEAD" {
            let _ = writer.write_all(&body);
        }
        let _ = writer.flush();
    }
    0
}

/// `/dev/zero` and `/dev/null` as a Linux container has them; WASI gives
/// a guest no devices, so they are these applets' own when absent.
enum Device {
    Zero,
    Null,
    File(fs::File),
}

impl Device {
    fn open(path: &str, write: bool) -> io::Result<Device> {
        let opened = if write {
            fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
        } else {
            fs::File::open(path)
        };
        match (opened, path) {
            (Ok(file), _) => Ok(Device::File(file)),
            (Err(_), "/dev/zero") => Ok(Device::Zero),
            (Err(_), "/dev/null") => Ok(Device::Null),
            (Err(e), _) => Err(e),
        }
    }
}

/// `dd [if=F] [of=F] [bs=N[kKMG]] [count=N]`: copies in blocks of `bs`,
/// the block buffer allocated before anything is read, as dd does.
fn dd(args: &[String], io: &Io) -> i32 {
    let mut input = None;
    let mut output = None;
    let mut block = 512usize;
    let mut count = None;
    for arg in args {
        let Some((key, value)) = arg.split_once('=') else {
            say!(io.err, "dd: unknown operand {arg}");
            return 1;
        };
        match key {
            "if" => input = Some(value.to_owned()),
            "of" => output = Some(value.to_owned()),
            "bs" => match size(value) {
                Some(n) if n > 0 => block = n,
                _ => {
                    say!(io.err, "dd: invalid number '{value}'");
                    return 1;
                }
            },
            "count" => match value.parse::<u64>() {
                Ok(n) => count = Some(n),
                Err(_) => {
                    say!(io.err, "dd: invalid number '{value}'");
                    return 1;
                }
            },
            _ => {
                say!(io.err, "dd: unknown operand {arg}");
                return 1;
            }
        }
    }
    let mut buffer = vec![0u8; block];
    let mut reader = match input.as_deref().map(|p| Device::open(p, false)) {
        Some(Ok(device)) => Some(device),
        Some(Err(e)) => {
            say!(
                io.err,
                "dd: can't open '{}': {}",
                input.unwrap_or_default(),
                reason(&e)
            );
            return 1;
        }
        None => None,
    };
    let mut writer = match output.as_deref().map(|p| Device::open(p, true)) {
        Some(Ok(device)) => Some(device),
        Some(Err(e)) => {
            say!(
                io.err,
                "dd: can't open '{}': {}",
                output.unwrap_or_default(),
                reason(&e)
            );
            return 1;
        }
        None => None,
    };
    let (mut blocks, mut bytes) = (0u64, 0u64);
    while count.is_none_or(|c| blocks < c) {
        let n = match &mut reader {
            Some(Device::Zero) => {
                buffer.fill(0);
                block
            }
            Some(Device::Null) => 0,
            Some(Device::File(file)) => match file.read(&mut buffer) {
                Ok(n) => n,
                Err(e) => {
                    say!(io.err, "dd: read error: {}", reason(&e));
                    return 1;
                }
            },
            None => match io.input.borrow_mut().read(&mut buffer) {
                Ok(n) => n,
                Err(e) => {
                    say!(io.err, "dd: read error: {}", reason(&e));
                    return 1;
                }
            },
        };
        if n == 0 {
            break;
        }
        let written = match &mut writer {
            Some(Device::Null | Device::Zero) => Ok(()),
            Some(Device::File(file)) => file.write_all(&buffer[..n]),
            None => io.out.borrow_mut().write_all(&buffer[..n]),
        };
        if let Err(e) = written {
            say!(io.err, "dd: write error: {}", reason(&e));
            return 1;
        }
        blocks += 1;
        bytes += n as u64;
    }
    say!(
        io.err,
        "{blocks}+0 records in\n{blocks}+0 records out\n{bytes} bytes copied"
    );
    0
}

/// `N`, `Nk`/`NK` (KiB), `NM` (MiB), `NG` (GiB).
fn size(text: &str) -> Option<usize> {
    let (number, scale) = match text.char_indices().last()? {
        (i, 'k' | 'K') => (&text[..i], 1 << 10),
        (i, 'M') => (&text[..i], 1 << 20),
        (i, 'G') => (&text[..i], 1 << 30),
        _ => (text, 1),
    };
    number.parse::<usize>().ok()?.checked_mul(scale)
}

/// A Wasm guest has no user: it runs as the runtime's, shown as root.
fn id(args: &[String], io: &Io) -> i32 {
    let names = args.iter().any(|a| a.starts_with('-') && a.contains('n'));
    let text = if args
        .iter()
        .any(|a| a.starts_with('-') && (a.contains('u') || a.contains('g') || a.contains('G')))
    {
        if names { "root" } else { "0" }
    } else {
        "uid=0(root) gid=0(root) groups=0(root)"
    };
    say!(io.out, "{text}");
    0
}
