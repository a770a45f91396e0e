//! `cargo xtask test`: runs every test tier that applies on this host and never silently
//! skips one (docs/ARCHITECTURE.md "Test tiers").
//!
//! 1. unit tests of every crate (and the integration tests of crates that need no KVM);
//! 2. the VMM tests in `crates/vmm-core/tests/` and the jail tests in `crates/jail/tests/` on
//!    the host's /dev/kvm;
//! 3. the agent tests in `crates/guest-agent/tests/` over a unix socket;
//! 4. the Linux end-to-end tests of the `tests` crate: directly on a hardware-virtualization
//!    host, elsewhere inside the emulated-virtualization harness (one L1 boot for all of them).
//!
//! Test counts come from libtest's `test result:` lines. The last line printed is
//! `N passed, N failed`; the exit status is non-zero if any test failed or a tier could not run.

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use kiln_vmm::host::{self, HostKind};
use serde::Deserialize;

use crate::harness::{self, HarnessOptions};
use crate::{build_guest, kernel, util};

/// Package whose integration tests are tier 2.
const TIER2_PACKAGE: &str = "kiln-vmm";
/// The jailed VMM process's package: its integration tests are tier 2 too (root + /dev/kvm).
const TIER2_JAIL_PACKAGE: &str = "kiln-jail";
/// Package whose integration tests are tier 3.
const TIER3_PACKAGE: &str = "kiln-agent";
/// Package holding the tier-4 tests.
const TIER4_PACKAGE: &str = "kiln-tests";
/// Deadline for the whole tier-4 run inside the harness, measured on the host (CI allows 90 min
/// in all; `$KILN_HARNESS_TIMEOUT` overrides it).
const HARNESS_TIMEOUT: Duration = Duration::from_secs(55 * 60);
/// Deadline for one tier-4 test (each runs in its own process) inside the harness, measured by
/// L1's clock: a hung test fails and the others still run.
const EXE_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Host-side deadline for silence from the harness: each test prints a start line and its
/// output when it ends, so silence longer than a test's own deadline means L1 itself stalled
/// (its clock, and so [`EXE_TIMEOUT`], stopped with it).
const IDLE_TIMEOUT: Duration = Duration::from_secs(7 * 60);
/// Harness relaunches after L1 stalls before tier 4 gives up.
const MAX_RELAUNCHES: usize = 3;
/// `timeout`'s exit status when it had to stop the command.
const TIMED_OUT: i32 = 124;

/// `cargo xtask test` arguments.
#[derive(Debug, Args)]
pub struct TestArgs {
    /// Run only this tier (1-4).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=4))]
    pub tier: Option<u8>,
    /// Tier 4 only runs the tests whose `<test executable> <test name>` contains this text
    /// (e.g. `sandbox_cli` or `kiln_run_uname_a`).
    #[arg(long, value_name = "TEXT")]
    pub filter: Option<String>,
}

/// Tally of libtest results.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Tests passed.
    pub passed: u64,
    /// Tests failed.
    pub failed: u64,
}

impl Counts {
    fn add(&mut self, other: Counts) {
        self.passed += other.passed;
        self.failed += other.failed;
    }
}

/// Parses a libtest summary line: `test result: ok. 3 passed; 1 failed; ...`.
pub fn parse_result_line(line: &str) -> Option<Counts> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let (_, rest) = rest.split_once(". ")?;
    let mut counts = Counts::default();
    let mut seen = false;
    for part in rest.split(';') {
        let mut words = part.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match what {
            "passed" => {
                counts.passed = n;
                seen = true;
            }
            "failed" => counts.failed = n,
            _ => {}
        }
    }
    seen.then_some(counts)
}

/// Sum of every libtest summary in `text`.
pub fn count_results(text: &str) -> (Counts, usize) {
    let mut total = Counts::default();
    let mut summaries = 0;
    for c in text.lines().filter_map(parse_result_line) {
        total.add(c);
        summaries += 1;
    }
    (total, summaries)
}

/// How one tier went.
#[derive(Debug)]
enum Outcome {
    /// Ran; counts tell how it went (plus a note when a command failed beyond its tests).
    Ran {
        counts: Counts,
        error: Option<String>,
    },
    /// The tier has no tests yet (said loudly, not a failure).
    NoTests(String),
    /// The tier could not run on this host or its preparation failed.
    CouldNotRun(String),
}

#[derive(Debug)]
struct TierReport {
    tier: u8,
    title: &'static str,
    outcome: Outcome,
    took: Duration,
}

impl TierReport {
    fn ok(&self) -> bool {
        match &self.outcome {
            Outcome::Ran { counts, error } => counts.failed == 0 && error.is_none(),
            Outcome::NoTests(_) => true,
            Outcome::CouldNotRun(_) => false,
        }
    }
}

/// `cargo xtask test`.
pub fn cmd_test(args: &TestArgs) -> Result<()> {
    let kind = host::detect();
    eprintln!("host: {kind}");
    let meta = Metadata::load()?;
    let tiers: Vec<u8> = match args.tier {
        Some(t) => vec![t],
        None => vec![1, 2, 3, 4],
    };
    let mut reports = Vec::new();
    for tier in tiers {
        let started = Instant::now();
        let (title, outcome) = match tier {
            1 => ("unit tests", tier1(&meta)),
            2 => ("VMM tests on the host /dev/kvm", tier2(&meta, &kind)),
            3 => ("agent tests over a unix socket", tier3(&meta)),
            _ => (
                "Linux end-to-end tests",
                tier4(&kind, args.filter.as_deref()),
            ),
        };
        let report = TierReport {
            tier,
            title,
            outcome,
            took: started.elapsed(),
        };
        eprintln!("{}", describe(&report));
        reports.push(report);
    }

    let mut total = Counts::default();
    println!();
    println!("==== test tiers ====");
    for r in &reports {
        println!("{}", describe(r));
        if let Outcome::Ran { counts, .. } = r.outcome {
            total.add(counts);
        }
    }
    // The count line must stand alone on its line for CI to read it.
    println!("{} passed, {} failed", total.passed, total.failed);
    if reports.iter().all(TierReport::ok) {
        Ok(())
    } else {
        let bad: Vec<String> = reports
            .iter()
            .filter(|r| !r.ok())
            .map(|r| format!("tier {}", r.tier))
            .collect();
        bail!("{} did not pass", bad.join(", "))
    }
}

fn describe(r: &TierReport) -> String {
    let mut s = format!("tier {} ({}): ", r.tier, r.title);
    match &r.outcome {
        Outcome::Ran { counts, error } => {
            let verdict = if counts.failed == 0 && error.is_none() {
                "ok"
            } else {
                "FAILED"
            };
            let _ = write!(
                s,
                "{verdict}: {} passed, {} failed",
                counts.passed, counts.failed
            );
            if let Some(e) = error {
                let _ = write!(s, " ({e})");
            }
        }
        Outcome::NoTests(why) => {
            let _ = write!(s, "NO TESTS: {why}");
        }
        Outcome::CouldNotRun(why) => {
            let _ = write!(s, "COULD NOT RUN: {why}");
        }
    }
    let _ = write!(s, " [{:.1}s]", r.took.as_secs_f64());
    s
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(util::repo_root());
    cmd
}

/// Runs one `cargo test` command, streaming its output, and tallies libtest summaries.
fn cargo_test(args: &[String]) -> Outcome {
    let mut cmd = cargo();
    cmd.arg("test").arg("--no-fail-fast").args(args);
    match run_counting(&mut cmd) {
        Ok((counts, summaries, success)) => Outcome::Ran {
            counts,
            error: (!success).then(|| {
                if summaries == 0 {
                    format!("`{}` failed before running tests", util::display_cmd(&cmd))
                } else {
                    format!("`{}` exited with failure", util::display_cmd(&cmd))
                }
            }),
        },
        Err(e) => Outcome::CouldNotRun(format!("{e:#}")),
    }
}

/// Runs `cmd`, echoing its stdout, and returns (counts, number of summaries, success).
fn run_counting(cmd: &mut Command) -> Result<(Counts, usize, bool)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{}`", util::display_cmd(cmd)))?;
    let mut counts = Counts::default();
    let mut summaries = 0;
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            println!("{line}");
            if let Some(c) = parse_result_line(&line) {
                counts.add(c);
                summaries += 1;
            }
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{}`", util::display_cmd(cmd)))?;
    Ok((counts, summaries, status.success()))
}

/// Combines outcomes of several commands of one tier.
fn merge(outcomes: Vec<Outcome>) -> Outcome {
    let mut counts = Counts::default();
    let mut errors = Vec::new();
    let mut ran = false;
    for o in outcomes {
        match o {
            Outcome::Ran { counts: c, error } => {
                ran = true;
                counts.add(c);
                errors.extend(error);
            }
            Outcome::CouldNotRun(e) => return Outcome::CouldNotRun(e),
            Outcome::NoTests(_) => {}
        }
    }
    if !ran {
        return Outcome::NoTests("nothing to run".into());
    }
    Outcome::Ran {
        counts,
        error: (!errors.is_empty()).then(|| errors.join("; ")),
    }
}

/// Debian packages tier 1's loopback tests drive as real components: kiln-image's registry,
/// layout and image-format tests (docker-registry, skopeo, umoci, htpasswd, mkfs.ext4,
/// mkfs.erofs) and kiln-egress's proxy clients (curl, wget, git).
const TIER1_PACKAGES: &[&str] = &[
    "docker-registry",
    "skopeo",
    "umoci",
    "apache2-utils",
    "e2fsprogs",
    "erofs-utils",
    "curl",
    "wget",
    "git",
];

fn tier1(meta: &Metadata) -> Outcome {
    if let Err(e) = util::ensure_packages(TIER1_PACKAGES) {
        return Outcome::CouldNotRun(format!("installing the tier-1 test tools: {e:#}"));
    }
    let mut outcomes = vec![cargo_test(&strings(&[
        "--workspace",
        "--exclude",
        TIER4_PACKAGE,
        "--exclude",
        TIER2_PACKAGE,
        "--exclude",
        TIER2_JAIL_PACKAGE,
        "--exclude",
        TIER3_PACKAGE,
    ]))];
    // The tier-2/3 crates' own unit tests (and doc tests) need no KVM either.
    for name in [TIER2_PACKAGE, TIER2_JAIL_PACKAGE, TIER3_PACKAGE] {
        let Some(pkg) = meta.package(name) else {
            return Outcome::CouldNotRun(format!("workspace has no package {name}"));
        };
        let mut args = strings(&["-p", name]);
        if pkg.has_kind("lib") {
            args.push("--lib".into());
        }
        if pkg.has_kind("bin") {
            args.push("--bins".into());
        }
        outcomes.push(cargo_test(&args));
        if pkg.has_kind("lib") && pkg.targets.iter().any(|t| t.doctest) {
            outcomes.push(cargo_test(&strings(&["-p", name, "--doc"])));
        }
    }
    outcomes.push(fuzz_smoke());
    merge(outcomes)
}

/// Tier 1's fuzz step: every cargo-fuzz target for a short fixed time (`crate::fuzz`); each
/// target counts as one test, failed if it crashed, hung or could not run.
fn fuzz_smoke() -> Outcome {
    eprintln!(
        "tier 1: fuzz smoke run, {} targets x {}s",
        crate::fuzz::TARGETS.len(),
        crate::fuzz::SMOKE_SECONDS
    );
    match crate::fuzz::smoke() {
        Ok((passed, failed, errors)) => Outcome::Ran {
            counts: Counts { passed, failed },
            error: (!errors.is_empty()).then(|| format!("fuzz: {}", errors.join("; "))),
        },
        Err(e) => Outcome::CouldNotRun(format!("fuzz smoke run: {e:#}")),
    }
}

fn integration_tests(meta: &Metadata, package: &str) -> Outcome {
    let Some(pkg) = meta.package(package) else {
        return Outcome::CouldNotRun(format!("workspace has no package {package}"));
    };
    let tests: Vec<&str> = pkg
        .targets
        .iter()
        .filter(|t| t.kind.iter().any(|k| k == "test"))
        .map(|t| t.name.as_str())
        .collect();
    if tests.is_empty() {
        return Outcome::NoTests(format!("{package} has no integration tests yet"));
    }
    let mut args = strings(&["-p", package]);
    for t in tests {
        args.push("--test".into());
        args.push(t.into());
    }
    cargo_test(&args)
}

fn tier2(meta: &Metadata, kind: &HostKind) -> Outcome {
    if !kind.has_kvm() {
        return Outcome::CouldNotRun(format!(
            "the VMM tests need /dev/kvm and this host has none usable: {kind}"
        ));
    }
    merge(vec![
        integration_tests(meta, TIER2_PACKAGE),
        integration_tests(meta, TIER2_JAIL_PACKAGE),
    ])
}

fn tier3(meta: &Metadata) -> Outcome {
    integration_tests(meta, TIER3_PACKAGE)
}

fn tier4(kind: &HostKind, filter: Option<&str>) -> Outcome {
    match tier4_inner(kind, filter) {
        Ok(o) => o,
        Err(e) => Outcome::CouldNotRun(format!("{e:#}")),
    }
}

/// What the tier-4 tests need (assets, the `kiln` binary, the test executables).
#[derive(Debug)]
struct Tier4Build {
    /// The guest kernel (ELF).
    kernel: PathBuf,
    /// The guest initramfs.
    initramfs: PathBuf,
    /// `target/debug/kiln`.
    kiln: PathBuf,
    /// Test executables of the `tests` crate.
    executables: Vec<PathBuf>,
}

fn build_tier4() -> Result<Tier4Build> {
    let k = kernel::ensure().context("building the guest kernel")?;
    let g = build_guest::ensure().context("building the guest initramfs")?;
    let kiln = crate::run::build_kiln_cli()?;
    // The jailed VMM process (SandboxConfig::jailed, tests/tests/sandbox_jail.rs), found next
    // to the test executables' parent directory.
    eprintln!("building kiln-vm (the jailed VMM)");
    let st = cargo()
        .args(["build", "-p", "kiln-jail", "--bin", "kiln-vm"])
        .status()
        .context("running cargo build -p kiln-jail")?;
    if !st.success() {
        bail!("building kiln-vm failed");
    }
    // tests/tests/sandbox_image.rs boots the python image (built once, cached in the assets
    // directory outside the clone).
    crate::run::ensure_image(&kiln, "python").context("building the python image")?;
    // tests/tests/python_sdk.rs runs pytest in this venv.
    crate::python::ensure().context("building the kiln Python package")?;
    // tests/tests/serve_e2b.rs runs the e2b SDK from this venv.
    crate::e2b::ensure().context("installing the e2b SDK venv")?;
    // ... and schemathesis (the /kiln/v1 OpenAPI check) from this one.
    crate::e2b::ensure_schemathesis().context("installing the schemathesis venv")?;
    // ... and the JS check with the `e2b` npm package from here.
    crate::e2b::ensure_npm().context("installing the e2b npm package")?;
    crate::mcp::ensure().context("installing the mcp client venv")?; // tests/tests/mcp.rs
    eprintln!("building the {TIER4_PACKAGE} test executables");
    let out = cargo()
        .args([
            "test",
            "-p",
            TIER4_PACKAGE,
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the {TIER4_PACKAGE} tests failed");
    }
    let executables = test_executables(&String::from_utf8_lossy(&out.stdout));
    Ok(Tier4Build {
        kernel: k.vmlinux,
        initramfs: g.initramfs,
        kiln,
        executables,
    })
}

/// Test executables named in cargo's JSON messages.
fn test_executables(json_lines: &str) -> Vec<PathBuf> {
    #[derive(Deserialize)]
    struct Profile {
        test: bool,
    }
    #[derive(Deserialize)]
    struct Msg {
        reason: String,
        profile: Option<Profile>,
        executable: Option<PathBuf>,
    }
    let mut exes: Vec<PathBuf> = json_lines
        .lines()
        .filter_map(|l| serde_json::from_str::<Msg>(l).ok())
        .filter(|m| m.reason == "compiler-artifact" && m.profile.as_ref().is_some_and(|p| p.test))
        .filter_map(|m| m.executable)
        .collect();
    exes.sort();
    exes.dedup();
    exes
}

fn tier4_env(b: &Tier4Build) -> Vec<(String, String)> {
    let mut env = vec![
        ("KILN_KERNEL".into(), b.kernel.display().to_string()),
        ("KILN_INITRAMFS".into(), b.initramfs.display().to_string()),
        // The image store (<assets>/images) the image tests boot from.
        (
            "KILN_ASSETS_DIR".into(),
            crate::util::assets_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
        ),
        ("RUST_BACKTRACE".into(), "1".into()),
    ];
    // tests/tests/soak_tier4.rs: `cargo xtask soak --tier4` asks for more cycles.
    if let Ok(n) = std::env::var("KILN_SOAK_CYCLES") {
        env.push(("KILN_SOAK_CYCLES".into(), n));
    }
    env
}

fn tier4_inner(kind: &HostKind, filter: Option<&str>) -> Result<Outcome> {
    let b = build_tier4()?;
    if b.executables.is_empty() {
        return Ok(Outcome::NoTests(format!(
            "{TIER4_PACKAGE} produced no test executables"
        )));
    }
    eprintln!(
        "tier 4: {} test executables; kernel {}, initramfs {}, kiln CLI {}",
        b.executables.len(),
        b.kernel.display(),
        b.initramfs.display(),
        b.kiln.display()
    );
    let workdir = util::repo_root().join("tests");
    if kind.runs_linux_guests() {
        eprintln!("tier 4: running directly on this host ({kind})");
        let mut outcomes = Vec::new();
        for exe in &b.executables {
            let mut cmd = Command::new(exe);
            cmd.current_dir(&workdir).envs(tier4_env(&b));
            if let Some(f) = filter {
                cmd.arg(f);
            }
            let (counts, summaries, success) = run_counting(&mut cmd)?;
            outcomes.push(Outcome::Ran {
                counts,
                error: (!success).then(|| {
                    format!(
                        "{} exited with failure{}",
                        exe.display(),
                        if summaries == 0 {
                            " before its summary"
                        } else {
                            ""
                        }
                    )
                }),
            });
        }
        return Ok(merge(outcomes));
    }
    eprintln!("tier 4: this host cannot boot Linux guests ({kind}); running inside the emulated-virtualization harness");
    run_in_harness(&b, &workdir, filter)
}

/// One tier-4 test: an executable and, when it could be listed, one test of it.
#[derive(Debug, Clone)]
struct Tier4Test {
    /// Index into [`Tier4Build::executables`].
    exe: usize,
    /// The exact libtest name; `None` runs the whole executable.
    name: Option<String>,
}

/// Every tier-4 test, one per process: `--list` runs on the host (listing needs no KVM).
fn list_tier4_tests(b: &Tier4Build) -> Vec<Tier4Test> {
    let mut tests = Vec::new();
    for (exe, path) in b.executables.iter().enumerate() {
        let names: Vec<String> = Command::new(path)
            .args(["--list", "--format", "terse"])
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| parse_test_list(&String::from_utf8_lossy(&o.stdout)))
            .unwrap_or_default();
        if names.is_empty() {
            tests.push(Tier4Test { exe, name: None });
        }
        tests.extend(names.into_iter().map(|name| Tier4Test {
            exe,
            name: Some(name),
        }));
    }
    tests
}

/// Test names in libtest's `--list --format terse` output (`name: test` lines).
fn parse_test_list(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_owned)
        .collect()
}

/// Runs the tier-4 tests inside the harness, each in its own process under its own deadline;
/// outputs and exit codes go to files in the target dir (shared writable into L1) and are
/// tallied here. L1 runs under QEMU's TCG, which can lose an interrupt and freeze L1 (seen as
/// a timer interrupt pending forever in L1's LAPIC); L1 then cannot enforce its own deadlines,
/// so the harness's host-side silence deadline catches it, diagnoses it through QEMU's
/// monitor, and this runner relaunches the harness for the tests not yet run — the stalled one
/// included, once. Every relaunch is reported; a test that stalls twice fails.
fn run_in_harness(b: &Tier4Build, workdir: &Path, filter: Option<&str>) -> Result<Outcome> {
    // One directory per run: several `cargo xtask test` may share a target dir.
    let out_dir = util::target_dir()
        .join("kiln-tier4")
        .join(std::process::id().to_string());
    let _ = fs::remove_dir_all(&out_dir);
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let tests: Vec<Tier4Test> = list_tier4_tests(b)
        .into_iter()
        .filter(|t| filter.is_none_or(|f| describe_test(b, t).contains(f)))
        .collect();
    if tests.is_empty() {
        return Ok(Outcome::CouldNotRun(format!(
            "no tier-4 test matches the filter {:?}",
            filter.unwrap_or_default()
        )));
    }
    let idle_timeout = harness::env_secs("KILN_TIER4_IDLE_TIMEOUT").unwrap_or(IDLE_TIMEOUT);
    let total = harness::env_secs("KILN_HARNESS_TIMEOUT").unwrap_or(HARNESS_TIMEOUT);
    let deadline = Instant::now() + total;
    let file = |k: usize, what: &str| test_file(&out_dir, k, what);
    let shards = tier4_shards().min(tests.len()).max(1);
    if shards > 1 {
        eprintln!(
            "tier 4: {} tests in {shards} harness instances side by side (KILN_TIER4_SHARDS)",
            tests.len()
        );
    }
    let run = ShardRun {
        b,
        tests: &tests,
        workdir,
        out_dir: &out_dir,
        deadline,
        total,
        idle_timeout,
    };
    // Test k goes to shard k % shards: neighbours in a file (often the slow ones) spread out.
    let results: Vec<ShardResult> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..shards)
            .map(|shard| {
                let run = &run;
                let mine: Vec<usize> = (shard..tests.len()).step_by(shards).collect();
                scope.spawn(move || run.run(shard, mine))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| ShardResult {
                    problems: vec!["a tier-4 shard runner panicked".into()],
                    ..ShardResult::default()
                })
            })
            .collect()
    });
    let mut stalls = vec![0u32; tests.len()];
    let mut problems = Vec::new();
    let mut relaunches = Vec::new();
    for r in results {
        for (k, n) in r.stalls {
            stalls[k] += n;
        }
        problems.extend(r.problems);
        relaunches.extend(r.relaunches);
    }

    let mut counts = Counts::default();
    for (k, t) in tests.iter().enumerate() {
        let log = fs::read_to_string(file(k, "log")).unwrap_or_default();
        let rc = fs::read_to_string(file(k, "rc"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        let (c, summaries) = count_results(&log);
        counts.add(c);
        match rc {
            None | Some(0) => {}
            Some(TIMED_OUT) | Some(137) => problems.push(format!(
                "{} was stopped after its {} s deadline",
                describe_test(b, t),
                EXE_TIMEOUT.as_secs()
            )),
            Some(rc) => {
                if c.failed == 0 {
                    // A crash before libtest's summary is a failure the counts do not show.
                    problems.push(format!(
                        "{} exited {rc}{}",
                        describe_test(b, t),
                        if summaries == 0 {
                            " before its summary"
                        } else {
                            ""
                        }
                    ));
                }
            }
        }
    }
    let never_ran = tests
        .iter()
        .enumerate()
        .filter(|(k, _)| !file(*k, "rc").exists() && stalls[*k] < 2)
        .count();
    if never_ran > 0 && problems.is_empty() {
        problems.push(format!("{never_ran} tests never ran"));
    }
    if !relaunches.is_empty() {
        eprintln!(
            "tier 4: NOTE: the harness was relaunched {} time(s) after L1 stalled during: {} \
             (diagnosis above; logs in {})",
            relaunches.len(),
            relaunches.join(", "),
            out_dir.display()
        );
    }
    Ok(Outcome::Ran {
        counts,
        error: (!problems.is_empty()).then(|| problems.join("; ")),
    })
}

/// `$KILN_TIER4_SHARDS`, else one harness instance per CPU up to two: each L1 is one TCG
/// vCPU, so on a 2-core machine two instances halve tier 4's wall time.
fn tier4_shards() -> usize {
    std::env::var("KILN_TIER4_SHARDS")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(2)
        })
        .clamp(1, 8)
}

/// What every shard of one tier-4 run shares.
struct ShardRun<'a> {
    b: &'a Tier4Build,
    tests: &'a [Tier4Test],
    workdir: &'a Path,
    out_dir: &'a Path,
    deadline: Instant,
    total: Duration,
    idle_timeout: Duration,
}

/// What one shard saw: stalls per test index, problems, the tests L1 stalled during.
#[derive(Debug, Default)]
struct ShardResult {
    stalls: Vec<(usize, u32)>,
    problems: Vec<String>,
    relaunches: Vec<String>,
}

impl ShardRun<'_> {
    /// Runs the tests `pending` (indices into `tests`) in harness instances one after the
    /// other, relaunching L1 after a stall for the tests not yet run.
    fn run(&self, shard: usize, mut pending: Vec<usize>) -> ShardResult {
        let b = self.b;
        let file = |k: usize, what: &str| test_file(self.out_dir, k, what);
        let mut stalls = std::collections::BTreeMap::<usize, u32>::new();
        let mut r = ShardResult::default();
        for launch in 1.. {
            if pending.is_empty() {
                break;
            }
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left < Duration::from_secs(60) {
                r.problems.push(format!(
                    "no time left for {} tests (tier-4 deadline {} s)",
                    pending.len(),
                    self.total.as_secs()
                ));
                break;
            }
            let script = self.out_dir.join(format!("run-{shard}-{launch}.sh"));
            if let Err(e) = fs::write(
                &script,
                harness_script(
                    &b.executables,
                    self.tests,
                    &pending,
                    self.workdir,
                    self.out_dir,
                ),
            ) {
                r.problems
                    .push(format!("writing {}: {e}", script.display()));
                break;
            }
            let opts = HarnessOptions {
                command: vec!["bash".into(), script.display().to_string()],
                timeout: Some(left),
                env: tier4_env(b),
                idle_timeout: Some(self.idle_timeout),
            };
            let result = harness::run(&opts);
            pending.retain(|&k| !file(k, "rc").exists());
            let err = match result {
                Ok(_) if pending.is_empty() => break,
                Ok(status) => {
                    r.problems.push(format!(
                        "the harness command exited {status} before running {} tests",
                        pending.len()
                    ));
                    break;
                }
                Err(e) => e,
            };
            let Some(&stalled) = pending.first() else {
                r.problems
                    .push(format!("the harness failed after the last test: {err:#}"));
                break;
            };
            let what = describe_test(b, &self.tests[stalled]);
            let n = stalls.entry(stalled).or_default();
            // The partial output of the stalled attempt stays next to the logs.
            let kept = file(stalled, &format!("stall{}.log", *n + 1));
            let _ = fs::rename(file(stalled, "log"), &kept);
            *n += 1;
            eprintln!(
                "tier 4: the harness failed while {what} ran ({err:#}); partial output in {}",
                kept.display()
            );
            if *n >= 2 {
                r.problems.push(format!("{what} stalled the harness twice"));
                pending.remove(0);
            }
            if pending.is_empty() {
                break;
            }
            r.relaunches.push(what.clone());
            if r.relaunches.len() > MAX_RELAUNCHES {
                r.problems.push(format!(
                    "gave up after {} harness relaunches; {} tests not run",
                    MAX_RELAUNCHES,
                    pending.len()
                ));
                break;
            }
            eprintln!(
                "tier 4: relaunching the harness for the {} tests not yet run",
                pending.len()
            );
        }
        r.stalls = stalls.into_iter().collect();
        r
    }
}

/// Where tier-4 test `k` leaves its output (`log`), exit code (`rc`) or a stalled attempt's
/// partial output (`stall<n>.log`).
fn test_file(out_dir: &Path, k: usize, what: &str) -> PathBuf {
    out_dir.join(format!("{k}.{what}"))
}

/// `<executable file name> <test name>` for messages.
fn describe_test(b: &Tier4Build, t: &Tier4Test) -> String {
    let exe = b.executables[t.exe]
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match &t.name {
        Some(name) => format!("{exe} {name}"),
        None => exe,
    }
}

/// The script run inside L1 for the tests `which` (indices into `tests`): each in its own
/// process under [`EXE_TIMEOUT`], its output to `<k>.log` and echoed, its exit code to
/// `<k>.rc`. A start line per test keeps the harness's silence deadline from firing while
/// tests pass.
fn harness_script(
    exes: &[PathBuf],
    tests: &[Tier4Test],
    which: &[usize],
    workdir: &Path,
    out_dir: &Path,
) -> String {
    let mut s = String::from(
        "#!/usr/bin/env bash\n# Generated by `cargo xtask test`: tier-4 tests inside L1.\nset -u\nstatus=0\n",
    );
    let _ = writeln!(
        s,
        "cd {} || exit 90",
        util::sh_quote(&workdir.display().to_string())
    );
    let t = harness::env_secs("KILN_TIER4_EXE_TIMEOUT")
        .unwrap_or(EXE_TIMEOUT)
        .as_secs();
    for (n, &k) in which.iter().enumerate() {
        let test = &tests[k];
        let exe = util::sh_quote(&exes[test.exe].display().to_string());
        let log = util::sh_quote(&test_file(out_dir, k, "log").display().to_string());
        let rc = util::sh_quote(&test_file(out_dir, k, "rc").display().to_string());
        let args = match &test.name {
            Some(name) => format!(" --exact {} --test-threads=1", util::sh_quote(name)),
            None => String::new(),
        };
        let _ = writeln!(
            s,
            "echo \"==== tier 4 [{}/{}]: \"{exe}{}",
            n + 1,
            which.len(),
            test.name
                .as_deref()
                .map(|n| format!(" {}", util::sh_quote(n)))
                .unwrap_or_default()
        );
        let _ = writeln!(s, "timeout -k 10 {t} {exe}{args} > {log} 2>&1; r=$?");
        let _ = writeln!(s, "cat {log}");
        let _ = writeln!(s, "echo \"$r\" > {rc}");
        let _ = writeln!(s, "[ \"$r\" = 0 ] || status=1");
    }
    s.push_str("exit $status\n");
    s
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// The parts of `cargo metadata` this module needs.
#[derive(Debug, Deserialize)]
struct Metadata {
    packages: Vec<Package>,
}

#[derive(Debug, Deserialize)]
struct Package {
    name: String,
    targets: Vec<Target>,
}

#[derive(Debug, Deserialize)]
struct Target {
    name: String,
    kind: Vec<String>,
    #[serde(default)]
    doctest: bool,
}

impl Metadata {
    fn load() -> Result<Metadata> {
        let out = cargo()
            .args(["metadata", "--no-deps", "--format-version", "1"])
            .stderr(Stdio::inherit())
            .output()
            .context("running cargo metadata")?;
        if !out.status.success() {
            bail!("cargo metadata failed: {}", out.status);
        }
        serde_json::from_slice(&out.stdout).context("parsing cargo metadata")
    }

    fn package(&self, name: &str) -> Option<&Package> {
        self.packages.iter().find(|p| p.name == name)
    }
}

impl Package {
    fn has_kind(&self, kind: &str) -> bool {
        self.targets
            .iter()
            .any(|t| t.kind.iter().any(|k| k == kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_summaries_are_parsed() {
        assert_eq!(
            parse_result_line(
                "test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s"
            ),
            Some(Counts { passed: 12, failed: 0 })
        );
        assert_eq!(
            parse_result_line(
                "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out"
            ),
            Some(Counts {
                passed: 3,
                failed: 2
            })
        );
        assert_eq!(parse_result_line("test foo ... ok"), None);
        assert_eq!(parse_result_line("running 3 tests"), None);
    }

    #[test]
    fn results_are_summed_over_a_log() {
        let log =
            "running 2 tests\ntest a ... ok\ntest result: ok. 2 passed; 0 failed; 0 ignored\n\
                   noise\ntest result: FAILED. 1 passed; 1 failed; 0 ignored\n";
        assert_eq!(
            count_results(log),
            (
                Counts {
                    passed: 3,
                    failed: 1
                },
                2
            )
        );
    }

    #[test]
    fn cargo_json_yields_test_executables_only() {
        let json = r#"{"reason":"compiler-artifact","profile":{"test":true},"executable":"/t/deps/boot-abc"}
{"reason":"compiler-artifact","profile":{"test":false},"executable":null}
{"reason":"compiler-artifact","profile":{"test":false},"executable":"/t/debug/kiln"}
{"reason":"build-finished","success":true}
not json"#;
        assert_eq!(
            test_executables(json),
            vec![PathBuf::from("/t/deps/boot-abc")]
        );
    }

    #[test]
    fn tier_failures_and_missing_tiers_fail_the_run() {
        let r = |outcome| TierReport {
            tier: 2,
            title: "t",
            outcome,
            took: Duration::ZERO,
        };
        assert!(r(Outcome::Ran {
            counts: Counts {
                passed: 1,
                failed: 0
            },
            error: None
        })
        .ok());
        assert!(!r(Outcome::Ran {
            counts: Counts {
                passed: 1,
                failed: 1
            },
            error: None
        })
        .ok());
        assert!(!r(Outcome::Ran {
            counts: Counts::default(),
            error: Some("x".into())
        })
        .ok());
        assert!(!r(Outcome::CouldNotRun("no kvm".into())).ok());
        assert!(
            describe(&r(Outcome::CouldNotRun("no kvm".into()))).contains("COULD NOT RUN: no kvm")
        );
    }

    #[test]
    fn merge_keeps_errors_and_counts() {
        let m = merge(vec![
            Outcome::Ran {
                counts: Counts {
                    passed: 2,
                    failed: 0,
                },
                error: None,
            },
            Outcome::NoTests("none".into()),
            Outcome::Ran {
                counts: Counts {
                    passed: 1,
                    failed: 1,
                },
                error: Some("boom".into()),
            },
        ]);
        match m {
            Outcome::Ran { counts, error } => {
                assert_eq!(
                    counts,
                    Counts {
                        passed: 3,
                        failed: 1
                    }
                );
                assert_eq!(error.as_deref(), Some("boom"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            merge(vec![Outcome::CouldNotRun("x".into())]),
            Outcome::CouldNotRun(_)
        ));
    }

    #[test]
    fn harness_script_runs_the_chosen_tests_one_per_process() {
        let exes = [PathBuf::from("/t/a b"), PathBuf::from("/t/c")];
        let tests = [
            Tier4Test {
                exe: 0,
                name: Some("first".into()),
            },
            Tier4Test {
                exe: 0,
                name: Some("it's".into()),
            },
            Tier4Test { exe: 1, name: None },
        ];
        let s = harness_script(
            &exes,
            &tests,
            &[1, 2],
            Path::new("/repo/tests"),
            Path::new("/out"),
        );
        assert!(s.contains("cd '/repo/tests'"));
        assert!(!s.contains("first"), "only the chosen tests run: {s}");
        assert!(s.contains(
            "timeout -k 10 300 '/t/a b' --exact 'it'\\''s' --test-threads=1 > '/out/1.log' 2>&1; r=$?"
        ), "{s}");
        assert!(
            s.contains("timeout -k 10 300 '/t/c' > '/out/2.log' 2>&1; r=$?"),
            "{s}"
        );
        assert!(s.contains("echo \"$r\" > '/out/2.rc'"));
        assert!(s.contains("==== tier 4 [2/2]"));
        assert!(s.trim_end().ends_with("exit $status"));
    }

    #[test]
    fn test_lists_are_parsed() {
        assert_eq!(
            parse_test_list("a::b: test\nc: test\nbench_x: bench\n\n"),
            vec!["a::b".to_string(), "c".to_string()]
        );
    }

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(util::sh_quote("it's"), r"'it'\''s'");
    }
}
