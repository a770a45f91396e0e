//! Supervising one L1 QEMU process: console (serial on QEMU's stdout) parsed for the init's
//! phase markers and logged, the command's stdout/stderr copied live from the virtio serial
//! sockets, QEMU's own stderr filtered, and the boot and overall deadlines enforced — on a
//! deadline QEMU is killed, the run never hangs.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// Listener QEMU's `kiln.tick` port connects to (see [`tick`]).
    pub tick: UnixListener,
    /// Where the console is logged.
    pub console_log: PathBuf,
    /// Where L1's init writes the command's exit status.
    pub status_file: PathBuf,
    /// Deadline for the INIT marker.
    pub boot_timeout: Duration,
    /// Overall deadline.
    pub timeout: Duration,
    /// Deadline for silence: the command printed nothing for this long (host clock).
    pub idle_timeout: Option<Duration>,
    /// QEMU's human monitor socket, asked for a diagnosis before a stalled run is killed.
    pub monitor: PathBuf,
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
    // Milliseconds after launch at which the command last printed something.
    let last_output = Arc::new(AtomicU64::new(0));
    let out_thread = pump(
        s.stdout,
        Arc::clone(&stop),
        std::io::stdout,
        Activity::new(launched, &last_output),
    );
    let err_thread = pump(
        s.stderr,
        Arc::clone(&stop),
        std::io::stderr,
        Activity::new(launched, &last_output),
    );

    let tick_thread = tick(s.tick, Arc::clone(&stop));

    let limits = Limits {
        boot: s.boot_timeout,
        total: s.timeout,
        idle: s.idle_timeout,
    };
    let paths = (s.monitor.as_path(), s.console_log.as_path());
    let waited = wait(&mut child, &rx, launched, &limits, &last_output, paths);
    let exit = launched.elapsed();
    stop.store(true, Ordering::SeqCst);
    // The pumps end at EOF (QEMU closed the sockets) or, never connected, at the stop flag;
    // the console reader at EOF of QEMU's stdout.
    for t in [out_thread, err_thread, tick_thread] {
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

/// The deadlines [`wait`] enforces.
#[derive(Debug)]
struct Limits {
    boot: Duration,
    total: Duration,
    idle: Option<Duration>,
}

/// Records, for the idle deadline, when the command last printed something.
#[derive(Debug, Clone)]
struct Activity {
    launched: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Activity {
    fn new(launched: Instant, last_ms: &Arc<AtomicU64>) -> Self {
        Self {
            launched,
            last_ms: Arc::clone(last_ms),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.launched.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::SeqCst);
    }
}

/// Polls QEMU and the marker channel until QEMU exits or a deadline passes (then diagnoses a
/// stall through the monitor and kills QEMU).
fn wait(
    child: &mut Child,
    rx: &Receiver<Event>,
    launched: Instant,
    limits: &Limits,
    last_output: &AtomicU64,
    (monitor, console_log): (&std::path::Path, &std::path::Path),
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
        if times.init.is_none() && elapsed > limits.boot {
            kill(child);
            bail!(
                "L1 did not reach its init within {} s (QEMU killed); rerun with --verbose to see its console",
                limits.boot.as_secs()
            );
        }
        let silent = |idle: Duration, start: Duration| {
            let last = Duration::from_millis(last_output.load(Ordering::SeqCst)).max(start);
            elapsed.saturating_sub(last) > idle
        };
        let stuck = if elapsed > limits.total {
            Some(format!(
                "harness timeout: the run took longer than {} s (QEMU killed){}",
                limits.total.as_secs(),
                if times.start.is_some() {
                    " while the command was running"
                } else {
                    " before the command started"
                }
            ))
        } else {
            match (limits.idle, times.start) {
                (Some(idle), Some(start)) if silent(idle, start) => Some(format!(
                    "harness stall: the command printed nothing for {} s (QEMU killed)",
                    idle.as_secs()
                )),
                _ => None,
            }
        };
        if let Some(what) = stuck {
            let diagnosis = diagnose(monitor, console_log);
            kill(child);
            bail!("{what}{diagnosis}");
        }
    }
}

/// HMP commands whose answers describe a stalled L1; the register dump is taken several times
/// so a spinning vCPU can be told from a stopped one.
const MONITOR_QUERIES: &[&str] = &[
    "info status",
    "info registers",
    "info lapic",
    "info pic",
    "info registers",
    "info registers",
];
/// SysRq keys sent to L1 (its kernel runs with `sysrq_always_enabled`): console log level 9
/// (L1 boots `quiet`), CPU backtraces, blocked tasks, all tasks.
const SYSRQ_KEYS: &[&str] = &["alt-sysrq-9", "alt-sysrq-l", "alt-sysrq-w", "alt-sysrq-t"];

/// Asks QEMU's monitor about a stalled L1 and L1's kernel for backtraces, writes the answers
/// next to the console log (`monitor.txt`) and returns a short text for the error message.
/// Best effort and bounded: a monitor that does not answer costs a few seconds, nothing more.
fn diagnose(monitor: &std::path::Path, console_log: &std::path::Path) -> String {
    let Some(dir) = console_log.parent() else {
        return String::new();
    };
    let out = dir.join("monitor.txt");
    let text = match query_monitor(monitor) {
        Ok(t) => {
            // The backtraces land on the console, which is still being logged.
            std::thread::sleep(Duration::from_secs(10));
            t
        }
        Err(e) => format!("monitor: {e:#}"),
    };
    let _ = fs::write(&out, &text);
    let rip: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("RIP=")))
        .collect();
    let status = text
        .lines()
        .find(|l| l.starts_with("VM status"))
        .unwrap_or("VM status unknown");
    format!(
        "\nharness: diagnosis: {status}; vCPU {}; monitor answers in {}; console (with SysRq \
         backtraces) in {}\n---- console ----\n{}",
        if rip.is_empty() {
            "registers unknown".to_string()
        } else {
            rip.join(" ")
        },
        out.display(),
        console_log.display(),
        cpu_backtrace_or_tail(&fs::read_to_string(console_log).unwrap_or_default())
    )
}

fn query_monitor(path: &std::path::Path) -> Result<String> {
    use std::os::unix::net::UnixStream;
    let mut conn = UnixStream::connect(path)
        .with_context(|| format!("connecting to QEMU's monitor {}", path.display()))?;
    conn.set_read_timeout(Some(Duration::from_millis(500)))?;
    conn.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut text = String::new();
    let read_available = |conn: &mut UnixStream, text: &mut String| {
        let mut buf = [0u8; 16 * 1024];
        // Bounded: at most ~5 s of answers per command.
        for _ in 0..10 {
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
                Err(_) => break,
            }
        }
    };
    read_available(&mut conn, &mut text);
    for q in MONITOR_QUERIES {
        conn.write_all(format!("{q}\n").as_bytes())?;
        read_available(&mut conn, &mut text);
        std::thread::sleep(Duration::from_millis(300));
    }
    for key in SYSRQ_KEYS {
        conn.write_all(format!("sendkey {key}\n").as_bytes())?;
        read_available(&mut conn, &mut text);
        std::thread::sleep(Duration::from_secs(2));
    }
    // HMP echoes with terminal escapes; keep the text readable.
    Ok(text
        .replace("\u{1b}[D", "")
        .replace("\u{1b}[K", "")
        .replace('\r', ""))
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

/// Period of the ticks sent into L1.
const TICK_PERIOD: Duration = Duration::from_secs(1);

/// Accepts QEMU's connection on `listener` (the `kiln.tick` port) and writes one byte every
/// [`TICK_PERIOD`] until told to stop or QEMU goes away; L1's init reads and discards them.
///
/// Why: QEMU's TCG can lose L1's timer interrupt (it stays pending in L1's LAPIC IRR while
/// the CPU never takes it — seen while L2 busy-waited under L1's KVM), which freezes L1, its
/// clock and every deadline inside it until some other interrupt arrives. Each tick is such an
/// interrupt (virtio), so a lost timer interrupt costs at most a second instead of the run.
fn tick(listener: UnixListener, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let Some(mut conn) = accept_until_stopped(&listener, &stop) else {
            return;
        };
        // A full pipe (L1 not reading) must not block this thread past the stop flag.
        if conn.set_write_timeout(Some(TICK_PERIOD)).is_err() {
            return;
        }
        while !stop.load(Ordering::SeqCst) {
            match conn.write(b".") {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => return,
            }
            std::thread::sleep(TICK_PERIOD);
        }
    })
}

/// Accepts one connection on `listener`, polling so that the stop flag ends the wait.
fn accept_until_stopped(
    listener: &UnixListener,
    stop: &AtomicBool,
) -> Option<std::os::unix::net::UnixStream> {
    listener.set_nonblocking(true).ok()?;
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                conn.set_nonblocking(false).ok()?;
                return Some(conn);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if stop.load(Ordering::SeqCst) {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => return None,
        }
    }
}

/// Accepts QEMU's connection on `listener` and copies everything to `out` until EOF.
fn pump<W: Write + 'static>(
    listener: UnixListener,
    stop: Arc<AtomicBool>,
    out: fn() -> W,
    activity: Activity,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let Some(mut conn) = accept_until_stopped(&listener, &stop) else {
            return;
        };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    activity.touch();
                    let mut w = out();
                    // A closed stdout (e.g. `| head`) must not stop QEMU's side from draining.
                    let _ = w.write_all(&buf[..n]);
                    let _ = w.flush();
                }
            }
        }
    })
}

/// The part of L1's console a stall report quotes: the CPU backtraces SysRq `l` printed (what
/// L1 was doing), at most 60 lines; without them the last 40 lines.
fn cpu_backtrace_or_tail(console: &str) -> String {
    let lines: Vec<&str> = console.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.contains("sysrq: Show backtrace of all active CPUs"));
    match start {
        Some(start) => lines[start..]
            .iter()
            .take_while(|l| !l.contains("sysrq: Show Blocked State"))
            .take(60)
            .copied()
            .collect::<Vec<_>>()
            .join("\n"),
        None => last_lines(console, 40),
    }
}

fn console_tail(path: &std::path::Path, lines: usize) -> String {
    last_lines(&fs::read_to_string(path).unwrap_or_default(), lines)
}

/// The last `n` lines of `text`.
fn last_lines(text: &str, n: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;

    /// A stand-in for QEMU: a shell script printing on "the console" (its stdout).
    fn fake(dir: &std::path::Path, script: &str, boot: u64, total: u64) -> Result<Outcome> {
        fake_idle(dir, script, boot, total, None)
    }

    fn fake_idle(
        dir: &std::path::Path,
        script: &str,
        boot: u64,
        total: u64,
        idle: Option<u64>,
    ) -> Result<Outcome> {
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
            tick: UnixListener::bind(dir.join("t.sock")).unwrap(),
            console_log: dir.join("console.log"),
            status_file: dir.join("status"),
            boot_timeout: Duration::from_secs(boot),
            timeout: Duration::from_secs(total),
            idle_timeout: idle.map(Duration::from_secs),
            monitor: dir.join("monitor.sock"),
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

    #[test]
    fn silence_deadline_kills_a_stalled_command_and_says_what_it_found() {
        let dir = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let err = fake_idle(
            dir.path(),
            "echo KILN-HARNESS-INIT; echo KILN-HARNESS-START; exec sleep 30",
            5,
            20,
            Some(1),
        )
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("printed nothing for 1 s"), "{msg}");
        // No monitor to ask: the diagnosis says so instead of hanging.
        assert!(msg.contains("monitor"), "{msg}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn stall_reports_quote_the_cpu_backtraces() {
        let console =
            "boot\n[1] sysrq: Show backtrace of all active CPUs\n[1] NMI backtrace for cpu 0\n\
                       [1]  kvm_arch_vcpu_ioctl_run\n[2] sysrq: Show Blocked State\n[2] task list";
        let quoted = cpu_backtrace_or_tail(console);
        assert!(quoted.starts_with("[1] sysrq: Show backtrace"), "{quoted}");
        assert!(quoted.contains("kvm_arch_vcpu_ioctl_run"), "{quoted}");
        assert!(!quoted.contains("task list"), "{quoted}");
        let plain: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let tail = cpu_backtrace_or_tail(&plain);
        assert!(
            tail.starts_with("line 60") && tail.ends_with("line 99"),
            "{tail}"
        );
    }
}
