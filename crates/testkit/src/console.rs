//! Bounded console readers for output that is not trusted (a guest's serial console, a QEMU or
//! benchmark process's stdout/stderr): [`read_bounded_line`] reads one line of at most
//! [`MAX_LINE`] bytes; a [`Console`] reads streams on their own threads, keeps a bounded
//! history ([`MAX_LINES`] lines, [`MAX_HISTORY_BYTES`] bytes) and waits for a line with a
//! deadline ([`Console::wait_for_line`]). Nothing a stream writes makes it hang or grow
//! without bound.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Longest line kept (the rest of a longer line is dropped).
pub const MAX_LINE: usize = 64 * 1024;
/// Lines retained for error messages and [`Console::lines`].
pub const MAX_LINES: usize = 4096;
/// Bytes retained in the history at most.
pub const MAX_HISTORY_BYTES: usize = 4 << 20;

/// Errors of [`Console::wait_for_line`].
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The wanted line did not appear before the deadline.
    #[error("no line containing {needle:?} within {waited:?}; last console lines:\n{tail}")]
    Timeout {
        /// What was waited for.
        needle: String,
        /// How long.
        waited: Duration,
        /// The last console lines.
        tail: String,
    },
    /// The stream ended (process exited) before the wanted line.
    #[error("console closed before a line containing {needle:?}; last console lines:\n{tail}")]
    Closed {
        /// What was waited for.
        needle: String,
        /// The last console lines.
        tail: String,
    },
}

/// Reads one line of at most [`MAX_LINE`] bytes (the rest of a longer line is dropped);
/// strips the `\n` and trailing `\r`. `None` at end of stream.
pub fn read_bounded_line(reader: &mut impl BufRead) -> std::io::Result<Option<String>> {
    let mut line = Vec::new();
    let mut any = false;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            break;
        }
        any = true;
        let (chunk, used, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], i + 1, true),
            None => (buf, buf.len(), false),
        };
        let room = MAX_LINE.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        reader.consume(used);
        if done {
            break;
        }
    }
    if !any {
        return Ok(None);
    }
    while line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

/// One retained line.
#[derive(Debug)]
struct Line {
    at: Instant,
    text: String,
    /// From the watched stream (diagnostics lines never satisfy a wait).
    watched: bool,
}

#[derive(Debug, Default)]
struct History {
    lines: VecDeque<Line>,
    bytes: usize,
    /// Absolute index of `lines[0]`.
    first_index: u64,
    first_line: Option<Instant>,
    /// The watched stream ended.
    closed: bool,
}

impl History {
    fn push(&mut self, line: Line) {
        self.bytes += line.text.len();
        self.lines.push_back(line);
        while self.lines.len() > MAX_LINES || self.bytes > MAX_HISTORY_BYTES {
            match self.lines.pop_front() {
                Some(l) => {
                    self.bytes -= l.text.len();
                    self.first_index += 1;
                }
                None => break,
            }
        }
    }
}

type Shared = Arc<(Mutex<History>, Condvar)>;

fn lock(shared: &Shared) -> MutexGuard<'_, History> {
    kiln_sync::lock(&shared.0)
}

/// Console streams read line by line on their own threads, with bounded lines and history.
#[derive(Debug)]
pub struct Console {
    shared: Shared,
    /// Absolute index of the next line [`Console::wait_for_line`] looks at.
    cursor: u64,
}

impl Console {
    /// Starts reading `reader` (e.g. a child's piped stdout).
    pub fn spawn<R: Read + Send + 'static>(reader: R) -> Console {
        let console = Console::empty();
        console.read(reader, true);
        console
    }

    /// Starts reading a process's `console` (watched: [`Console::wait_for_line`] looks at it)
    /// and its `diagnostics` (e.g. QEMU's stderr: kept in the history for error messages, but
    /// never a match), both at once so that neither pipe fills up.
    pub fn spawn_with_diagnostics<R, E>(console: R, diagnostics: E) -> Console
    where
        R: Read + Send + 'static,
        E: Read + Send + 'static,
    {
        let c = Console::empty();
        c.read(console, true);
        c.read(diagnostics, false);
        c
    }

    fn empty() -> Console {
        Console {
            shared: Arc::new((Mutex::new(History::default()), Condvar::new())),
            cursor: 0,
        }
    }

    fn read<R: Read + Send + 'static>(&self, reader: R, watched: bool) {
        let shared = Arc::clone(&self.shared);
        std::thread::spawn(move || {
            let mut reader = BufReader::new(reader);
            while let Ok(Some(text)) = read_bounded_line(&mut reader) {
                let at = Instant::now();
                let mut h = lock(&shared);
                h.first_line.get_or_insert(at);
                h.push(Line { at, text, watched });
                drop(h);
                shared.1.notify_all();
            }
            if watched {
                lock(&shared).closed = true;
                shared.1.notify_all();
            }
        });
    }

    /// Waits until a line of the watched stream containing `needle` arrives, at most until
    /// `deadline`; returns when it was read. Lines before it are passed over (and kept in the
    /// history); the next wait starts after it.
    pub fn wait_for_line(
        &mut self,
        needle: &str,
        deadline: Instant,
    ) -> Result<Instant, ConsoleError> {
        let started = Instant::now();
        let mut h = lock(&self.shared);
        loop {
            let start = self.cursor.max(h.first_index);
            let skip = usize::try_from(start - h.first_index).unwrap_or(usize::MAX);
            let found = h
                .lines
                .iter()
                .enumerate()
                .skip(skip)
                .find(|(_, l)| l.watched && l.text.contains(needle))
                .map(|(i, l)| (i, l.at));
            if let Some((i, at)) = found {
                self.cursor = h.first_index + i as u64 + 1;
                return Ok(at);
            }
            self.cursor = h.first_index + h.lines.len() as u64;
            if h.closed {
                drop(h);
                return Err(ConsoleError::Closed {
                    needle: needle.to_string(),
                    tail: self.tail(40),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(h);
                return Err(ConsoleError::Timeout {
                    needle: needle.to_string(),
                    waited: started.elapsed(),
                    tail: self.tail(40),
                });
            }
            h = self
                .shared
                .1
                .wait_timeout(h, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// When the first line (of any stream) was read, if one was.
    pub fn first_line_at(&self) -> Option<Instant> {
        lock(&self.shared).first_line
    }

    /// All retained lines (the last [`MAX_LINES`]), of every stream, in arrival order.
    pub fn lines(&self) -> Vec<String> {
        lock(&self.shared)
            .lines
            .iter()
            .map(|l| l.text.clone())
            .collect()
    }

    /// The last `n` lines joined with newlines.
    pub fn tail(&self, n: usize) -> String {
        let lines = self.lines();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// Waits until `reader` yields a line containing `needle`, at most until `deadline`; returns
/// the console (to keep reading or inspect) and when the line arrived.
pub fn wait_for_line<R: Read + Send + 'static>(
    reader: R,
    needle: &str,
    deadline: Instant,
) -> Result<(Console, Instant), ConsoleError> {
    let mut console = Console::spawn(reader);
    let at = console.wait_for_line(needle, deadline)?;
    Ok((console, at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    const READY_LINE: &str = "KILN-AGENT-READY";

    #[test]
    fn wait_for_line_finds_the_line() {
        let input = b"booting\r\nstill booting\nKILN-AGENT-READY\nafter\n".to_vec();
        let (mut console, _) = wait_for_line(
            std::io::Cursor::new(input),
            READY_LINE,
            Instant::now() + Duration::from_secs(5),
        )
        .unwrap();
        assert!(console.first_line_at().is_some());
        // Lines before READY are in the history without their \r.
        assert_eq!(console.lines()[..2], ["booting", "still booting"]);
        console
            .wait_for_line("after", Instant::now() + Duration::from_secs(5))
            .unwrap();
    }

    #[test]
    fn wait_for_line_reports_closed_stream() {
        let err = wait_for_line(
            std::io::Cursor::new(b"panic: no init\n".to_vec()),
            READY_LINE,
            Instant::now() + Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(matches!(err, ConsoleError::Closed { .. }), "{err}");
        assert!(err.to_string().contains("panic: no init"), "{err}");
    }

    #[test]
    fn wait_for_line_times_out() {
        // A pipe that stays open and silent: the deadline must end the wait.
        let mut child = Command::new("sleep")
            .arg("5")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let started = Instant::now();
        let err = wait_for_line(out, READY_LINE, Instant::now() + Duration::from_millis(200))
            .unwrap_err();
        assert!(matches!(err, ConsoleError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn long_lines_are_bounded() {
        let mut input = vec![b'x'; MAX_LINE * 3];
        input.extend_from_slice(b"\nKILN-AGENT-READY\n");
        let (console, _) = wait_for_line(
            std::io::Cursor::new(input),
            READY_LINE,
            Instant::now() + Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(console.lines()[0].len(), MAX_LINE);
    }

    #[test]
    fn console_lines_are_bounded_and_ready_is_seen() {
        // (from the QEMU peer's console, which this replaces)
        let mut input = vec![b'x'; MAX_LINE * 2];
        input.extend_from_slice(b"\r\nbooting\nKILN-AGENT-READY\n");
        let mut console =
            Console::spawn_with_diagnostics(std::io::Cursor::new(input), std::io::empty());
        console
            .wait_for_line(READY_LINE, Instant::now() + Duration::from_secs(5))
            .unwrap();
        let tail = console.tail(40);
        let lines: Vec<&str> = tail.lines().collect();
        assert_eq!(lines.len(), 3, "{tail}");
        assert_eq!(lines[0].len(), MAX_LINE);
        assert_eq!(lines[1..], ["booting", READY_LINE]);
    }

    #[test]
    fn diagnostics_do_not_count_as_ready() {
        let mut console = Console::spawn_with_diagnostics(
            std::io::empty(),
            std::io::Cursor::new(b"KILN-AGENT-READY\n".to_vec()),
        );
        let until = Instant::now() + Duration::from_secs(5);
        while console.tail(40).is_empty() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(console.tail(40), READY_LINE);
        let err = console
            .wait_for_line(READY_LINE, Instant::now() + Duration::from_millis(100))
            .unwrap_err();
        assert!(matches!(err, ConsoleError::Closed { .. }), "{err}");
    }

    #[test]
    fn history_is_bounded_in_lines() {
        let input = "l\n".repeat(MAX_LINES + 10);
        let console = Console::spawn(std::io::Cursor::new(input.into_bytes()));
        let until = Instant::now() + Duration::from_secs(5);
        while !lock(&console.shared).closed && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(console.lines().len(), MAX_LINES);
    }
}
