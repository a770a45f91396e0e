//! `cargo xtask fuzz`: builds and runs the cargo-fuzz targets in `fuzz/` (docs/SECURITY.md
//! "Fuzzing"), and the short smoke run of every target that `cargo xtask test` tier 1 does.
//!
//! cargo-fuzz needs `-Z` flags; on the stable toolchain `RUSTC_BOOTSTRAP=1` allows them, so
//! no nightly toolchain is needed. cargo-fuzz itself is installed with `cargo install` when
//! missing. Each target runs over a working corpus (`fuzz/corpus-work/<target>`, not in git)
//! seeded from the committed corpus (`fuzz/corpus/<target>`); crashes are written to
//! `fuzz/artifacts/<target>/` and the libFuzzer log of each run to
//! `fuzz/target/logs/<target>.log`.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;

use crate::util;

/// Every fuzz target, in the order they run, with the largest input libFuzzer may try.
pub const TARGETS: &[(&str, usize)] = &[
    ("decode", 4096),
    ("vsock", 4096),
    ("mmio", 4096),
    ("block", 4096),
    ("snapshot_state", 16384),
    ("extract", 16384),
    ("egress_request", 4096),
    ("egress_policy", 4096),
];

/// Seconds each target runs in `cargo xtask test` tier 1.
pub const SMOKE_SECONDS: u64 = 6;

/// An input that takes longer than this is reported as a hang (a crash).
const INPUT_TIMEOUT_SECS: u64 = 10;

/// `cargo xtask fuzz` arguments.
#[derive(Debug, Args)]
pub struct FuzzArgs {
    /// Run only this target (default: all, one after the other).
    #[arg(long, value_name = "TARGET")]
    pub target: Option<String>,
    /// Stop each target after this many seconds (default 60 unless --runs is given).
    #[arg(long, value_name = "N")]
    pub seconds: Option<u64>,
    /// Stop each target after this many executions.
    #[arg(long, value_name = "N")]
    pub runs: Option<u64>,
}

/// What one run of one target did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunStats {
    /// Target name.
    pub target: String,
    /// Inputs executed.
    pub execs: u64,
    /// Average executions per second.
    pub exec_per_sec: u64,
    /// Crash, hang or out-of-memory artifacts written.
    pub artifacts: Vec<PathBuf>,
    /// Whether libFuzzer exited cleanly.
    pub success: bool,
    /// Wall-clock time of the run.
    pub took: Duration,
    /// The libFuzzer log.
    pub log: PathBuf,
}

impl RunStats {
    /// Whether the run found nothing.
    pub fn clean(&self) -> bool {
        self.success && self.artifacts.is_empty()
    }

    /// One line: executions, exec/s, crashes.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{:<15} {:>12} execs  {:>8} exec/s  {:>6.1}s  crashes: {}",
            self.target,
            self.execs,
            self.exec_per_sec,
            self.took.as_secs_f64(),
            self.artifacts.len()
        );
        for a in &self.artifacts {
            s.push_str(&format!("\n    artifact: {}", a.display()));
        }
        if !self.success && self.artifacts.is_empty() {
            s.push_str(&format!(
                "\n    libFuzzer failed without an artifact; see {}",
                self.log.display()
            ));
        }
        s
    }
}

fn fuzz_dir() -> PathBuf {
    util::repo_root().join("fuzz")
}

/// The cargo-fuzz command with the flags every build and run uses (release with debug
/// assertions and overflow checks, AddressSanitizer off: the targets are safe Rust over
/// mmap'd guest memory, and ASan would halve the campaigns' speed).
fn cargo_fuzz(sub: &str) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(fuzz_dir())
        .env("RUSTC_BOOTSTRAP", "1")
        .args(["fuzz", sub, "-O", "-a", "--sanitizer", "none"]);
    cmd
}

/// Installs cargo-fuzz with `cargo install` if `cargo fuzz` does not run.
pub fn ensure_cargo_fuzz() -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let have = Command::new(&cargo)
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if have {
        return Ok(());
    }
    eprintln!("cargo-fuzz is not installed; installing it with `cargo install cargo-fuzz`");
    util::run(Command::new(&cargo).args(["install", "cargo-fuzz"])).context("installing cargo-fuzz")
}

/// Builds every target (one cargo invocation).
pub fn build() -> Result<()> {
    ensure_cargo_fuzz()?;
    eprintln!("building the fuzz targets (fuzz/target)");
    util::run(&mut cargo_fuzz("build")).context("building the fuzz targets")
}

fn target_max_len(target: &str) -> Result<usize> {
    TARGETS
        .iter()
        .find(|(t, _)| *t == target)
        .map(|&(_, l)| l)
        .with_context(|| {
            let names: Vec<&str> = TARGETS.iter().map(|(t, _)| *t).collect();
            format!("no fuzz target `{target}` (targets: {})", names.join(", "))
        })
}

/// Runs one (built) target for `seconds` and/or `runs` executions.
pub fn run_target(target: &str, seconds: Option<u64>, runs: Option<u64>) -> Result<RunStats> {
    let max_len = target_max_len(target)?;
    let dir = fuzz_dir();
    let work = dir.join("corpus-work").join(target);
    let seeds = dir.join("corpus").join(target);
    let artifacts = dir.join("artifacts").join(target);
    let logs = dir.join("target").join("logs");
    for d in [&work, &seeds, &artifacts, &logs] {
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let log_path = logs.join(format!("{target}.log"));
    let mut log =
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = cargo_fuzz("run");
    cmd.arg(target)
        .arg(&work)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(format!("-max_len={max_len}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
        .arg("-print_final_stats=1");
    if let Some(s) = seconds {
        cmd.arg(format!("-max_total_time={s}"));
    }
    if let Some(r) = runs {
        cmd.arg(format!("-runs={r}"));
    }
    eprintln!("fuzzing {target} (log: {})", log_path.display());
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{}`", util::display_cmd(&cmd)))?;
    // libFuzzer writes everything to stderr; stdout is drained on a thread.
    let out = child.stdout.take();
    let out_thread = std::thread::spawn(move || {
        let mut lines = Vec::new();
        if let Some(o) = out {
            for l in BufReader::new(o).lines().map_while(std::result::Result::ok) {
                lines.push(l);
            }
        }
        lines
    });
    let mut stats = RunStats {
        target: target.to_owned(),
        execs: 0,
        exec_per_sec: 0,
        artifacts: Vec::new(),
        success: false,
        took: Duration::ZERO,
        log: log_path.clone(),
    };
    if let Some(err) = child.stderr.take() {
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            let _ = writeln!(log, "{line}");
            parse_line(&line, &mut stats);
        }
    }
    for l in out_thread.join().unwrap_or_default() {
        let _ = writeln!(log, "{l}");
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{}`", util::display_cmd(&cmd)))?;
    stats.success = status.success();
    stats.took = started.elapsed();
    Ok(stats)
}

/// Picks the final stats and artifact paths out of one libFuzzer stderr line.
pub fn parse_line(line: &str, stats: &mut RunStats) {
    let line = line.trim();
    if let Some(v) = line.strip_prefix("stat::number_of_executed_units:") {
        if let Ok(n) = v.trim().parse() {
            stats.execs = n;
        }
    } else if let Some(v) = line.strip_prefix("stat::average_exec_per_sec:") {
        if let Ok(n) = v.trim().parse() {
            stats.exec_per_sec = n;
        }
    } else if let Some((_, path)) = line.split_once("Test unit written to ") {
        stats.artifacts.push(PathBuf::from(path.trim()));
    }
}

/// `cargo xtask fuzz`: exit status 1 if any target crashed.
pub fn cmd_fuzz(args: &FuzzArgs) -> Result<i32> {
    let targets: Vec<&str> = match &args.target {
        Some(t) => {
            target_max_len(t)?;
            vec![t.as_str()]
        }
        None => TARGETS.iter().map(|(t, _)| *t).collect(),
    };
    let seconds = match (args.seconds, args.runs) {
        (None, None) => Some(60),
        (s, _) => s,
    };
    build()?;
    let mut all = Vec::new();
    for t in targets {
        let s = run_target(t, seconds, args.runs)?;
        eprintln!("{}", s.summary());
        all.push(s);
    }
    println!();
    println!("==== fuzz targets ====");
    for s in &all {
        println!("{}", s.summary());
    }
    let bad: Vec<&RunStats> = all.iter().filter(|s| !s.clean()).collect();
    if bad.is_empty() {
        println!("{} targets, 0 crashes", all.len());
        Ok(0)
    } else {
        let names: Vec<&str> = bad.iter().map(|s| s.target.as_str()).collect();
        println!(
            "{} of {} targets crashed: {} (reproduce: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -O -a --sanitizer none TARGET ARTIFACT)",
            bad.len(),
            all.len(),
            names.join(", ")
        );
        Ok(1)
    }
}

/// Tier-1 smoke run: every target for [`SMOKE_SECONDS`]; one passed/failed count per target.
/// Returns (passed, failed, error lines).
pub fn smoke() -> Result<(u64, u64, Vec<String>)> {
    build()?;
    let (mut passed, mut failed, mut errors) = (0, 0, Vec::new());
    for (t, _) in TARGETS {
        let s = run_target(t, Some(SMOKE_SECONDS), None)?;
        eprintln!("fuzz smoke: {}", s.summary());
        if s.clean() && s.execs > 0 {
            passed += 1;
        } else {
            failed += 1;
            errors.push(s.summary());
        }
    }
    Ok((passed, failed, errors))
}

/// Whether `path` looks like a libFuzzer artifact (for messages).
#[allow(dead_code)]
fn is_artifact(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
        n.starts_with("crash-") || n.starts_with("timeout-") || n.starts_with("oom-")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty(target: &str) -> RunStats {
        RunStats {
            target: target.into(),
            execs: 0,
            exec_per_sec: 0,
            artifacts: Vec::new(),
            success: true,
            took: Duration::ZERO,
            log: PathBuf::new(),
        }
    }

    #[test]
    fn final_stats_and_artifacts_are_parsed() {
        let mut s = empty("decode");
        for l in [
            "#2097152\tpulse  cov: 100 ft: 200 corp: 10/1Kb exec/s: 69905 rss: 40Mb",
            "stat::number_of_executed_units: 2466839",
            "stat::average_exec_per_sec:     80865",
            "stat::new_units_added:          3",
            "artifact_prefix='fuzz/artifacts/decode/'; Test unit written to fuzz/artifacts/decode/crash-da39a3ee",
        ] {
            parse_line(l, &mut s);
        }
        assert_eq!(s.execs, 2_466_839);
        assert_eq!(s.exec_per_sec, 80_865);
        assert_eq!(
            s.artifacts,
            vec![PathBuf::from("fuzz/artifacts/decode/crash-da39a3ee")]
        );
        assert!(!s.clean());
        assert!(s.summary().contains("crashes: 1"));
        assert!(s.summary().contains("crash-da39a3ee"));
    }

    #[test]
    fn a_clean_run_is_clean_and_a_failed_one_is_not() {
        let mut s = empty("vsock");
        assert!(s.clean());
        s.success = false;
        assert!(!s.clean());
        assert!(s.summary().contains("without an artifact"));
    }

    #[test]
    fn unknown_targets_are_refused_with_the_list() {
        let e = target_max_len("nope").unwrap_err().to_string();
        assert!(e.contains("decode") && e.contains("extract"), "{e}");
        assert_eq!(target_max_len("snapshot_state").unwrap(), 16384);
    }

    #[test]
    fn every_target_has_a_seed_corpus_and_a_source() {
        for (t, _) in TARGETS {
            let src = fuzz_dir().join("fuzz_targets").join(format!("{t}.rs"));
            assert!(src.is_file(), "{}", src.display());
            let seeds = fuzz_dir().join("corpus").join(t);
            let n = fs::read_dir(&seeds).map_or(0, |d| d.count());
            assert!(n > 0, "no seeds in {}", seeds.display());
        }
    }

    #[test]
    fn artifact_names_are_recognised() {
        assert!(is_artifact(Path::new("a/crash-1234")));
        assert!(is_artifact(Path::new("timeout-1")));
        assert!(!is_artifact(Path::new("seed")));
    }
}
