//! Supervising one L1 QEMU process: console (serial on QEMU's stdout) parsed for the init's
//! phase markers and logged, the command's stdout/stderr copied live from the virtio serial
//! sockets, QEMU's own stderr filtered, and the boot and overall deadlines enforced — on a
//! deadline QEMU is killed, the run never hangs.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::RunTimes;
use crate::util;

/// Marker lines printed by l1-init.sh on the console.
const INIT: &str = "KILN-HARNESS-INIT";
const START: &str = "KILN-HARNESS-START";
const END: &str = "KILN-HARNESS-END";
const FAIL: &str = "KILN-HARNESS-FAIL";

/// Everything [`supervise`] needs.
#[derive(Debug)]
pub struct Supervise {
    /// The fully configured QEMU command (stdout and stderr piped).
    pub qemu: Command,
    /// Listener QEMU's `kiln.stdout` port connects to.
    pub stdout: UnixListener,
    /// Listener QEMU's `kiln.stderr` port connects to.
    pub stderr: UnixListener,
    /// Where the console is logged.
    pub console_log: PathBuf,
    /// Where L1's init writes the command's exit status.
    pub status_file: PathBuf,
    /// Deadline for the INIT marker.
    pub boot_timeout: Duration,
    /// Overall deadline.
    pub timeout: Duration,
    /// Echo the console to stderr.
    pub verbose: bool,
}

/// Result of a run that reported a status.
#[derive(Debug)]
pub struct Outcome {
    /// The command's exit status.
    pub status: i32,
    /// Phase timings.
    pub times: RunTimes,
}

#[derive(Debug)]
enum Event {
    Init(Instant),
    Start(Instant),
    End(Instant),
    Fail(String),
}

/// Starts QEMU and runs it to completion (or a deadline).
pub fn supervise(s: Supervise) -> Result<Outcome> {
    let mut qemu = s.qemu;
    let launched = Instant::now();
    let mut child = qemu
        .spawn()
        .with_context(|| format!("starting `{}`", util::display_cmd(&qemu)))?;
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();

    let console = child.stdout.take().context("QEMU stdout not piped")?;
    let log = File::create(&s.console_log)
        .with_context(|| format!("creating {}", s.console_log.display()))?;
    let console_thread = std::thread::spawn({
        let verbose = s.verbose;
        move || read_console(console, log, tx, verbose)
    });
    let qemu_err = child.stderr.take().context("QEMU stderr not piped")?;
    let qemu_err_thread = std::thread::spawn(move || filter_qemu_stderr(qemu_err));
    let out_thread = pump(s.stdout, Arc::clone(&stop), std::io::stdout);
    let err_thread = pump(s.stderr, Arc::clone(&stop), std::io::stderr);

    let waited = wait(&mut child, &rx, launched, s.boot_timeout, s.timeout);
    let exit = launched.elapsed();
    stop.store(true, Ordering::SeqCst);
    // The pumps end at EOF (QEMU closed the sockets) or, never connected, at the stop flag;
    // the console reader at EOF of QEMU's stdout.
    for t in [out_thread, err_thread] {
        let _ = t.join();
    }
    let _ = console_thread.join();
    let _ = qemu_err_thread.join();
    let (qemu_status, mut times, mut fail) = waited?;
    // Markers that arrived after the last poll (the console reader has finished by now).
    for ev in rx.try_iter() {
        record(&mut times, launched, ev, &mut fail);
    }
    times.exit = exit;

    if let Ok(text) = fs::read_to_string(&s.status_file) {
        if let Ok(status) = text.trim().parse::<i32>() {
            return Ok(Outcome { status, times });
        }
    }
    let tail = console_tail(&s.console_log, 30);
    if let Some(why) = fail {
        bail!("L1's init failed: {why}\n---- last console lines ----\n{tail}");
    }
    bail!(
        "L1 ended ({qemu_status}) without reporting the command's exit status\n---- last console lines ----\n{tail}"
    )
}

/// Polls QEMU and the marker channel until QEMU exits or a deadline passes (then kills it).
fn wait(
    child: &mut Child,
    rx: &Receiver<Event>,
    launched: Instant,
    boot_timeout: Duration,
    timeout: Duration,
) -> Result<(std::process::ExitStatus, RunTimes, Option<String>)> {
    let mut times = RunTimes::default();
    let mut fail = None;
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(ev) => record(&mut times, launched, ev, &mut fail),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
        }
        if let Some(status) = child.try_wait().context("waiting for QEMU")? {
            return Ok((status, times, fail));
        }
        let elapsed = launched.elapsed();
        if times.init.is_none() && elapsed > boot_timeout {
            kill(child);
            bail!(
                "L1 did not reach its init within {} s (QEMU killed); rerun with --verbose to see its console",
                boot_timeout.as_secs()
            );
        }
        if elapsed > timeout {
            kill(child);
            bail!(
                "harness timeout: the run took longer than {} s (QEMU killed){}",
                timeout.as_secs(),
                if times.start.is_some() {
                    " while the command was running"
                } else {
                    " before the command started"
                }
            );
        }
    }
}

fn record(times: &mut RunTimes, launched: Instant, ev: Event, fail: &mut Option<String>) {
    let since = |t: Instant| Some(t.saturating_duration_since(launched));
    match ev {
        Event::Init(t) => times.init = times.init.or(since(t)),
        Event::Start(t) => times.start = times.start.or(since(t)),
        Event::End(t) => times.end = times.end.or(since(t)),
        Event::Fail(why) => {
            if let Some(f) = fail.as_mut() {
                f.push_str("; ");
                f.push_str(&why);
            } else {
                *fail = Some(why);
            }
        }
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Reads the console line by line: logs it, turns marker lines into events, echoes if verbose.
fn read_console(console: impl Read, mut log: File, tx: Sender<Event>, verbose: bool) {
    let mut reader = BufReader::new(console);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let now = Instant::now();
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end_matches(['\r', '\n']);
        // The log is best effort: a full disk must not stop the run.
        let _ = writeln!(log, "{line}");
        if verbose {
            eprintln!("[L1] {line}");
        }
        let event = if line == INIT {
            Some(Event::Init(now))
        } else if line == START {
            Some(Event::Start(now))
        } else if line.starts_with(END) {
            Some(Event::End(now))
        } else {
            line.strip_prefix(FAIL)
                .map(|why| Event::Fail(why.trim().to_string()))
        };
        if let Some(ev) = event {
            if let Event::Fail(why) = &ev {
                eprintln!("harness: L1 init: {why}");
            }
            let _ = tx.send(ev);
        }
    }
}

/// Passes QEMU's stderr on, minus TCG's "doesn't support requested feature" noise.
fn filter_qemu_stderr(err: impl Read) {
    for line in BufReader::new(err).lines() {
        let Ok(line) = line else { break };
        if line.contains("TCG doesn't support requested feature") {
            continue;
        }
        eprintln!("qemu: {line}");
    }
}

/// Accepts QEMU's connection on `listener` and copies everything to `out` until EOF.
fn pump<W: Write + 'static>(
    listener: UnixListener,
    stop: Arc<AtomicBool>,
    out: fn() -> W,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        if listener.set_nonblocking(true).is_err() {
            return;
        }
        let mut conn = loop {
            match listener.accept() {
                Ok((conn, _)) => break conn,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(_) => return,
            }
        };
        if conn.set_nonblocking(false).is_err() {
            return;
        }
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut w = out();
                    // A closed stdout (e.g. `| head`) must not stop QEMU's side from draining.
                    let _ = w.write_all(&buf[..n]);
                    let _ = w.flush();
                }
            }
        }
    })
}

fn console_tail(path: &std::path::Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;

    /// A stand-in for QEMU: a shell script printing on "the console" (its stdout).
    fn fake(dir: &std::path::Path, script: &str, boot: u64, total: u64) -> Result<Outcome> {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        supervise(Supervise {
            qemu: cmd,
            stdout: UnixListener::bind(dir.join("o.sock")).unwrap(),
            stderr: UnixListener::bind(dir.join("e.sock")).unwrap(),
            console_log: dir.join("console.log"),
            status_file: dir.join("status"),
            boot_timeout: Duration::from_secs(boot),
            timeout: Duration::from_secs(total),
            verbose: false,
        })
    }

    #[test]
    fn status_and_phases_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let out = fake(
            dir.path(),
            "echo '[ 0.1] kernel'; echo KILN-HARNESS-INIT; echo KILN-HARNESS-START; \
             echo 7 > status; echo 'KILN-HARNESS-END 7'",
            10,
            20,
        )
        .unwrap();
        assert_eq!(out.status, 7);
        assert!(out.times.init.is_some() && out.times.start.is_some() && out.times.end.is_some());
        let log = fs::read_to_string(dir.path().join("console.log")).unwrap();
        assert!(
            log.starts_with("[ 0.1] kernel\nKILN-HARNESS-INIT\n"),
            "{log}"
        );
    }

    #[test]
    fn init_failure_is_explained() {
        let dir = tempfile::tempdir().unwrap();
        let err = fake(
            dir.path(),
            "echo KILN-HARNESS-INIT; echo 'KILN-HARNESS-FAIL /dev/kvm is missing'",
            10,
            20,
        )
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("init failed: /dev/kvm is missing"), "{msg}");
    }

    #[test]
    fn missing_status_is_an_error_with_the_console_tail() {
        let dir = tempfile::tempdir().unwrap();
        let err = fake(
            dir.path(),
            "echo KILN-HARNESS-INIT; echo 'Kernel panic - not syncing'",
            10,
            20,
        )
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("without reporting"), "{msg}");
        assert!(msg.contains("Kernel panic"), "{msg}");
    }

    #[test]
    fn boot_deadline_kills_a_silent_l1() {
        let dir = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let err = fake(dir.path(), "exec sleep 30", 1, 20).unwrap_err();
        assert!(format!("{err:#}").contains("did not reach its init within 1 s"));
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn overall_deadline_kills_a_long_command() {
        let dir = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let err = fake(
            dir.path(),
            "echo KILN-HARNESS-INIT; echo KILN-HARNESS-START; exec sleep 30",
            5,
            1,
        )
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("longer than 1 s"), "{msg}");
        assert!(msg.contains("while the command was running"), "{msg}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
