//! Timing fresh processes: from spawning a benchmark child to a line on its stdout, and the
//! warm-up + measured loop around it (shared by the `vmm` and `snapshot` benchmarks).

use std::io::BufReader;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kiln_testkit::read_bounded_line;

/// Which stdout line stops the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineMatch {
    /// A line that starts with the needle.
    StartsWith,
    /// A line that contains the needle anywhere.
    Contains,
}

/// What happens to the child once its line was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterLine {
    /// It exits by itself: wait for it; a failing exit fails the run.
    Wait,
    /// Kill it and reap it; its exit status does not matter.
    Kill,
}

/// Spawns `cmd` with stdin null and stdout piped (stderr as the caller set it, by default the
/// caller's) and returns the time from spawn until a stdout line matching `needle` (`how`).
/// The rest of stdout is drained so the child never blocks on a full pipe; then the child is
/// handled as `after` says. No such line within `timeout` kills the child and is an error.
pub fn time_to_line(
    mut cmd: Command,
    needle: &str,
    how: LineMatch,
    after: AfterLine,
    timeout: Duration,
) -> Result<Duration> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    let t0 = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let stdout = child.stdout.take().context("child has no stdout")?;
    let (tx, rx) = mpsc::channel();
    let needle_owned = needle.to_owned();
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        loop {
            match read_bounded_line(&mut r) {
                Ok(None) | Err(_) => {
                    let _ = tx.send(None);
                    return;
                }
                Ok(Some(text)) => {
                    let hit = match how {
                        LineMatch::StartsWith => text.starts_with(&needle_owned),
                        LineMatch::Contains => text.contains(&needle_owned),
                    };
                    if hit {
                        let _ = tx.send(Some(Instant::now()));
                        let _ = std::io::copy(&mut r, &mut std::io::sink());
                        return;
                    }
                }
            }
        }
    });
    let got = rx.recv_timeout(timeout);
    if got.is_err() || after == AfterLine::Kill {
        let _ = child.kill();
    }
    let status = child.wait();
    let _ = reader.join();
    match got {
        Ok(Some(at)) => {
            if let (AfterLine::Wait, Ok(s)) = (after, status) {
                if !s.success() {
                    bail!("{cmd:?} failed: {s}");
                }
            }
            Ok(at - t0)
        }
        Ok(None) => bail!("{cmd:?} ended without printing {needle:?}"),
        Err(_) => bail!("{cmd:?} did not print {needle:?} within {timeout:?}"),
    }
}

/// Spawns `cmd` (stdin null, stdout piped) that prints a line containing `needle` and then
/// exits by itself; returns (spawn -> that line, that line -> the process reaped). The rest of
/// stdout is drained on a thread (its end-of-file is not waited for before the clock stops: a
/// process is gone when `wait` returns). A failing exit or no line within `timeout` is an error
/// (the child is then killed).
pub fn time_line_and_exit(
    mut cmd: Command,
    needle: &str,
    timeout: Duration,
) -> Result<(Duration, Duration)> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    let t0 = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let stdout = child.stdout.take().context("child has no stdout")?;
    let (tx, rx) = mpsc::channel();
    let needle_owned = needle.to_owned();
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        loop {
            match read_bounded_line(&mut r) {
                Ok(None) | Err(_) => {
                    let _ = tx.send(None);
                    return;
                }
                Ok(Some(text)) if text.contains(&needle_owned) => {
                    let _ = tx.send(Some(Instant::now()));
                    let _ = std::io::copy(&mut r, &mut std::io::sink());
                    return;
                }
                Ok(Some(_)) => {}
            }
        }
    });
    let got = rx.recv_timeout(timeout);
    if !matches!(got, Ok(Some(_))) {
        let _ = child.kill();
    }
    let status = child.wait();
    let gone = Instant::now();
    let _ = reader.join();
    match got {
        Ok(Some(at)) => {
            let s = status.with_context(|| format!("waiting for {cmd:?}"))?;
            if !s.success() {
                bail!("{cmd:?} failed: {s}");
            }
            Ok((at - t0, gone.saturating_duration_since(at)))
        }
        Ok(None) => bail!("{cmd:?} ended without printing {needle:?}"),
        Err(_) => bail!("{cmd:?} did not print {needle:?} within {timeout:?}"),
    }
}

/// Runs `run(i)` for `i` in `0..warmup + runs` and returns the last `runs` results (the first
/// `warmup` are thrown away). The first error ends the loop.
pub fn measured_runs(
    warmup: usize,
    runs: usize,
    mut run: impl FnMut(usize) -> Result<Duration>,
) -> Result<Vec<Duration>> {
    let mut v = Vec::with_capacity(runs);
    for i in 0..warmup + runs {
        let d = run(i)?;
        if i >= warmup {
            v.push(d);
        }
    }
    Ok(v)
}
