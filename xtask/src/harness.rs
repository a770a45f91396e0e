//! The emulated-virtualization harness: QEMU (software mode, emulated AMD SVM) as L1 with
//! kvm-amd loaded, the host filesystem shared in, running one command and returning its status.
//!
//! `cargo xtask harness [--timeout SECS] -- <command...>` (see docs/HARNESS.md):
//! 1. [`assets::prepare`] installs the host tools and builds/reuses the L1 kernel + initramfs;
//! 2. [`run`] writes the run spec (mounts, `run.sh`) into a per-run scratch directory, starts
//!    QEMU with the host root shared read-only, the workspace's target dir (and any extra
//!    `--writable` dir) shared read-write and the scratch dir, all over virtio-9p;
//! 3. [`l1::supervise`] streams the command's stdout/stderr (virtio serial ports) live, watches
//!    the console for the init's phase markers, enforces the boot and overall deadlines (QEMU is
//!    killed, never left hanging), and returns the exit status the init wrote to the scratch dir.

mod assets;
mod l1;

use std::fmt::Write as _;
use std::fs;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

use crate::util;
use kiln_testkit::QemuCommand;

/// Default overall timeout of one harness run.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default deadline for L1 to reach its /init.
const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Default L1 memory.
const DEFAULT_MEMORY_MIB: u32 = 4096;

/// What to run inside L1.
#[derive(Debug, Default, Clone)]
pub struct HarnessOptions {
    /// argv of the command, run with the caller's working directory.
    pub command: Vec<String>,
    /// Give up (and fail) after this long; `None` = default (1 h or `$KILN_HARNESS_TIMEOUT`).
    pub timeout: Option<Duration>,
    /// Extra environment passed to the command inside L1 (on top of the caller's own).
    pub env: Vec<(String, String)>,
    /// Give up (and fail) when the command prints nothing, on stdout or stderr, for this long,
    /// measured on the host: a frozen L1 cannot enforce its own deadlines. `None` = no limit
    /// (or `$KILN_HARNESS_IDLE_TIMEOUT`).
    pub idle_timeout: Option<Duration>,
}

/// Less common knobs of a run (kept apart so `HarnessOptions` literals stay short).
#[derive(Debug, Default, Clone)]
pub struct HarnessExtras {
    /// Extra host directories shared read-write (the workspace's target dir always is).
    pub writable: Vec<PathBuf>,
    /// Echo L1's console (kernel log, init markers) to stderr (also `KILN_HARNESS_VERBOSE=1`).
    pub verbose: bool,
}

/// `cargo xtask harness` arguments.
#[derive(Debug, clap::Args)]
pub struct HarnessArgs {
    /// Overall timeout in seconds (QEMU is killed after it); default 3600.
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Fail when the command prints nothing for this many seconds (host clock); the stalled L1
    /// is diagnosed through QEMU's monitor first.
    #[arg(long, value_name = "SECS")]
    pub idle_timeout: Option<u64>,
    /// Share this host directory read-write too (repeatable; the target dir always is).
    #[arg(long, value_name = "DIR")]
    pub writable: Vec<PathBuf>,
    /// Echo L1's console (kernel messages, init phases) to stderr.
    #[arg(long, short)]
    pub verbose: bool,
    /// The command to run inside L1, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// `cargo xtask harness`: runs the command in L1 and exits with its status.
pub fn cmd_harness(args: HarnessArgs) -> Result<()> {
    let opts = HarnessOptions {
        command: args.command,
        timeout: args.timeout.map(Duration::from_secs),
        env: Vec::new(),
        idle_timeout: args.idle_timeout.map(Duration::from_secs),
    };
    let extras = HarnessExtras {
        writable: args.writable,
        verbose: args.verbose,
    };
    let code = run_with(&opts, &extras)?;
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

/// Timings of one run, measured on the host from QEMU's launch.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunTimes {
    /// L1's /init printed its first marker.
    pub init: Option<Duration>,
    /// The command was started (modules loaded, shares mounted).
    pub start: Option<Duration>,
    /// The command exited.
    pub end: Option<Duration>,
    /// QEMU exited.
    pub exit: Duration,
}

/// Runs `opts.command` inside L1 and returns its exit status (128+N when killed by signal N).
/// Fails when the assets cannot be prepared, L1 does not reach its init in time, the overall
/// timeout passes, or L1 ends without reporting a status.
pub fn run(opts: &HarnessOptions) -> Result<i32> {
    run_with(opts, &HarnessExtras::default())
}

/// [`run`] with the less common knobs.
pub fn run_with(opts: &HarnessOptions, extras: &HarnessExtras) -> Result<i32> {
    if opts.command.is_empty() {
        bail!("harness: no command given (usage: cargo xtask harness -- <command...>)");
    }
    let prep_start = Instant::now();
    let assets = assets::prepare().context("preparing the harness's L1 assets")?;
    let prep = prep_start.elapsed();

    let scratch = Scratch::create()?;
    let spec = RunSpec::from_caller(opts, &extras.writable)?;
    spec.write(scratch.path())?;

    let stdout_sock = scratch.path().join("stdout.sock");
    let stderr_sock = scratch.path().join("stderr.sock");
    let stdout_listener = UnixListener::bind(&stdout_sock)
        .with_context(|| format!("binding {}", stdout_sock.display()))?;
    let stderr_listener = UnixListener::bind(&stderr_sock)
        .with_context(|| format!("binding {}", stderr_sock.display()))?;
    let tick_sock = scratch.path().join("tick.sock");
    let tick_listener = UnixListener::bind(&tick_sock)
        .with_context(|| format!("binding {}", tick_sock.display()))?;

    let qemu = qemu_command(
        &assets,
        &spec,
        scratch.path(),
        [&stdout_sock, &stderr_sock, &tick_sock],
    )?;
    let timeout = opts
        .timeout
        .or_else(|| env_secs("KILN_HARNESS_TIMEOUT"))
        .unwrap_or(DEFAULT_TIMEOUT);
    let boot_timeout = env_secs("KILN_HARNESS_BOOT_TIMEOUT").unwrap_or(DEFAULT_BOOT_TIMEOUT);
    let verbose = extras.verbose || env_flag("KILN_HARNESS_VERBOSE");
    if verbose {
        eprintln!("harness: {}", util::display_cmd(&qemu));
    }

    let outcome = l1::supervise(l1::Supervise {
        qemu,
        stdout: stdout_listener,
        stderr: stderr_listener,
        tick: tick_listener,
        console_log: scratch.path().join("console.log"),
        status_file: scratch.path().join("status"),
        boot_timeout,
        timeout,
        idle_timeout: opts
            .idle_timeout
            .or_else(|| env_secs("KILN_HARNESS_IDLE_TIMEOUT")),
        monitor: scratch.path().join(MONITOR_SOCKET),
        verbose,
    });
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            scratch.keep_on_error();
            return Err(e);
        }
    };
    if !env_flag("KILN_HARNESS_QUIET") {
        eprintln!("{}", summary(&assets.kernel_version, prep, &outcome.times));
    }
    Ok(outcome.status)
}

/// One line with the run's numbers.
fn summary(kernel: &str, prep: Duration, t: &RunTimes) -> String {
    let secs = |d: Option<Duration>| {
        d.map(|d| format!("{:.2}s", d.as_secs_f64()))
            .unwrap_or_else(|| "-".into())
    };
    let mut s = format!(
        "harness: L1 {kernel}: assets {:.2}s; after launch: init {}, command start {}, command end {}, L1 exit {:.2}s",
        prep.as_secs_f64(),
        secs(t.init),
        secs(t.start),
        secs(t.end),
        t.exit.as_secs_f64()
    );
    if let (Some(start), Some(end)) = (t.start, t.end) {
        let overhead = t.exit.saturating_sub(end.saturating_sub(start));
        let _ = write!(s, " (overhead {:.2}s)", overhead.as_secs_f64());
    }
    s
}

/// `$name` as whole seconds, if set and a number.
pub(crate) fn env_secs(name: &str) -> Option<Duration> {
    std::env::var(name)
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// What L1 must set up for the command: shares and the command itself.
#[derive(Debug, Clone)]
struct RunSpec {
    /// Host paths hidden by L1's tmpfs mounts (/tmp, /run...) that must be visible read-only.
    ro_binds: Vec<PathBuf>,
    /// Host directories shared read-write, mounted at the same path.
    writable: Vec<PathBuf>,
    cwd: PathBuf,
    env: Vec<(String, String)>,
    command: Vec<String>,
}

/// Directories L1 mounts a fresh filesystem over inside the chroot.
const HIDDEN_PREFIXES: &[&str] = &["/tmp", "/run", "/dev", "/proc", "/sys"];

impl RunSpec {
    fn from_caller(opts: &HarnessOptions, extra_writable: &[PathBuf]) -> Result<RunSpec> {
        let cwd = std::env::current_dir().context("reading the current directory")?;
        let target = util::target_dir();
        fs::create_dir_all(&target).with_context(|| format!("creating {}", target.display()))?;
        let mut writable = vec![canonical(&target)?];
        for dir in extra_writable {
            let dir = canonical(dir)?;
            if !dir.is_dir() {
                bail!("--writable {}: not a directory", dir.display());
            }
            writable.push(dir);
        }
        writable.dedup();
        let mut ro_candidates = vec![cwd.clone(), util::repo_root()];
        if let Ok(assets) = util::assets_dir() {
            ro_candidates.push(assets);
        }
        let ro_binds = hidden_binds(
            ro_candidates
                .iter()
                .map(|p| canonical(p))
                .collect::<Result<Vec<_>>>()?,
        );
        let mut env: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| k != "PWD" && k != "OLDPWD" && !k.is_empty() && !k.contains('='))
            .collect();
        env.push(("PWD".into(), path_str(&cwd)?.to_string()));
        env.push(("KILN_HARNESS_L1".into(), "1".into()));
        env.extend(opts.env.iter().cloned());
        Ok(RunSpec {
            ro_binds,
            writable,
            cwd,
            env,
            command: opts.command.clone(),
        })
    }

    /// The `mounts` file read by l1-init.sh: `ro <path>` and `rw <tag> <path>` lines.
    fn mounts(&self) -> Result<String> {
        let mut s = String::new();
        for p in &self.ro_binds {
            let _ = writeln!(s, "ro {}", spec_path(p)?);
        }
        for (i, p) in self.writable.iter().enumerate() {
            let _ = writeln!(s, "rw {} {}", rw_tag(i), spec_path(p)?);
        }
        Ok(s)
    }

    /// The script run with the host's /bin/sh inside L1's chroot.
    fn script(&self) -> Result<String> {
        if let Some(first) = self.command.first() {
            if first.contains('=') {
                bail!("harness: the command name {first:?} contains '=' (env would take it for a variable)");
            }
        }
        let mut s = String::from("# generated by cargo xtask harness\n");
        let _ = writeln!(s, "cd {} || exit 125", util::sh_quote(path_str(&self.cwd)?));
        s.push_str("exec /usr/bin/env -i");
        for (k, v) in &self.env {
            s.push_str(" \\\n  ");
            s.push_str(&util::sh_quote(&format!("{k}={v}")));
        }
        for arg in &self.command {
            s.push_str(" \\\n  ");
            s.push_str(&util::sh_quote(arg));
        }
        s.push('\n');
        Ok(s)
    }

    fn write(&self, scratch: &Path) -> Result<()> {
        fs::write(scratch.join("mounts"), self.mounts()?)
            .with_context(|| format!("writing {}/mounts", scratch.display()))?;
        fs::write(scratch.join("run.sh"), self.script()?)
            .with_context(|| format!("writing {}/run.sh", scratch.display()))?;
        Ok(())
    }
}

/// Those of `candidates` that L1's tmpfs mounts would hide, without ones nested in another.
fn hidden_binds(mut candidates: Vec<PathBuf>) -> Vec<PathBuf> {
    candidates.retain(|p| HIDDEN_PREFIXES.iter().any(|h| p.starts_with(h)));
    candidates.sort();
    candidates.dedup();
    let mut binds: Vec<PathBuf> = Vec::new();
    for p in candidates {
        if !binds.iter().any(|b| p.starts_with(b)) {
            binds.push(p);
        }
    }
    binds
}

fn rw_tag(i: usize) -> String {
    format!("rw{i}")
}

fn canonical(p: &Path) -> Result<PathBuf> {
    p.canonicalize()
        .with_context(|| format!("resolving {}", p.display()))
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("path {} is not UTF-8", p.display()))
}

/// A path as it can appear in the whitespace-separated mounts file.
fn spec_path(p: &Path) -> Result<&str> {
    let s = path_str(p)?;
    if s.chars().any(char::is_whitespace) {
        bail!("harness: cannot share {s:?}: the path contains whitespace");
    }
    Ok(s)
}

/// QEMU's human monitor socket in the scratch dir: a stalled run is diagnosed through it.
const MONITOR_SOCKET: &str = "monitor.sock";

/// Builds L1's QEMU command (the base line is `kiln_testkit::QemuCommand`'s).
fn qemu_command(
    assets: &assets::L1Assets,
    spec: &RunSpec,
    scratch: &Path,
    [stdout_sock, stderr_sock, tick_sock]: [&Path; 3],
) -> Result<Command> {
    let memory = std::env::var("KILN_HARNESS_MEMORY_MIB")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(DEFAULT_MEMORY_MIB);
    let cpu = std::env::var("KILN_HARNESS_CPU").unwrap_or_else(|_| "EPYC".into());
    // pci=noacpi: routing PCI interrupts through ACPI links costs ~1 s under TCG. (acpi=off
    // would save more, but then L2 guests under L1's KVM hang without a word.)
    // no_timer_check: under a loaded host, TCG can be slow enough that L1's IO-APIC timer check
    // fails and the kernel panics ("IO-APIC + timer doesn't work"); the check proves nothing here.
    // sysrq_always_enabled: a stalled run asks L1 for task and CPU backtraces (magic SysRq via
    // the emulated keyboard) before it is killed.
    let mut append =
        String::from("console=ttyS0 quiet panic=-1 pci=noacpi no_timer_check sysrq_always_enabled");
    if let Ok(extra) = std::env::var("KILN_HARNESS_APPEND") {
        append.push(' ');
        append.push_str(&extra);
    }
    let mut qemu = QemuCommand::new(&assets.vmlinux)
        .accel("tcg")
        .cpu(cpu)
        .smp(1)
        .memory_mib(memory)
        .monitor(format!(
            "unix:{},server=on,wait=off",
            path_str(&scratch.join(MONITOR_SOCKET))?
        ))
        .initrd(&assets.initramfs)
        .append(append);
    let virtfs = |path: &Path, tag: &str, readonly: bool| -> Result<String> {
        let p = path_str(path)?;
        if p.contains(',') {
            bail!("harness: cannot share {p:?}: QEMU options cannot hold a ','");
        }
        Ok(format!(
            "local,path={p},mount_tag={tag},security_model=none,multidevs=remap{}",
            if readonly { ",readonly=on" } else { "" }
        ))
    };
    qemu = qemu
        .arg("-virtfs")
        .arg(virtfs(Path::new("/"), "hostroot", true)?);
    qemu = qemu.arg("-virtfs").arg(virtfs(scratch, "scratch", false)?);
    for (i, dir) in spec.writable.iter().enumerate() {
        qemu = qemu.arg("-virtfs").arg(virtfs(dir, &rw_tag(i), false)?);
    }
    qemu = qemu.extra_args(["-device", "virtio-serial-pci"]);
    // kiln.tick carries one byte a second from the host into L1, which discards it: see
    // `l1::tick`.
    for (id, sock) in [
        ("stdout", stdout_sock),
        ("stderr", stderr_sock),
        ("tick", tick_sock),
    ] {
        qemu = qemu
            .arg("-chardev")
            .arg(format!("socket,id={id},path={}", path_str(sock)?))
            .arg("-device")
            .arg(format!("virtserialport,chardev={id},name=kiln.{id}"));
    }
    // stdin null, console (stdout) and QEMU's messages (stderr) piped.
    let mut qemu = qemu.command();
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2), which
    // is async-signal-safe and allocates nothing. It makes a killed harness take QEMU along.
    unsafe {
        qemu.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    Ok(qemu)
}

/// The per-run scratch directory shared with L1 (spec in, status and console log out);
/// removed on drop unless kept for a failed run or `KILN_HARNESS_KEEP=1`.
#[derive(Debug)]
struct Scratch {
    path: PathBuf,
    keep: std::cell::Cell<bool>,
}

impl Scratch {
    fn create() -> Result<Scratch> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        sweep_stale_scratch(&std::env::temp_dir());
        let path =
            std::env::temp_dir().join(format!("kiln-harness-{}-{nanos:08x}", std::process::id()));
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Scratch {
            path,
            keep: std::cell::Cell::new(env_flag("KILN_HARNESS_KEEP")),
        })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn keep_on_error(&self) {
        self.keep.set(true);
        eprintln!(
            "harness: kept the run's scratch dir (console.log, run.sh, mounts): {}",
            self.path.display()
        );
    }
}

/// Removes scratch dirs of harness processes that no longer run (killed before their cleanup)
/// once they are an hour old; younger ones may be kept for someone inspecting a failure.
fn sweep_stale_scratch(tmp: &Path) {
    let Ok(entries) = fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("kiln-harness-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let old = util::modified_longer_ago(&entry, Duration::from_secs(3600));
        if old && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.keep.get() {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RunSpec {
        RunSpec {
            ro_binds: vec![PathBuf::from("/tmp/ci/checkout")],
            writable: vec![PathBuf::from("/work/main/target"), PathBuf::from("/srv/x")],
            cwd: PathBuf::from("/work/main"),
            env: vec![("A".into(), "it's \"quoted\"\nline2".into())],
            command: vec!["echo".into(), "a b".into(), "$HOME".into()],
        }
    }

    #[test]
    fn mounts_file_lists_binds_then_shares() {
        assert_eq!(
            spec().mounts().unwrap(),
            "ro /tmp/ci/checkout\nrw rw0 /work/main/target\nrw rw1 /srv/x\n"
        );
        let mut s = spec();
        s.writable.push(PathBuf::from("/has space"));
        assert!(s.mounts().is_err());
    }

    #[test]
    fn script_runs_the_command_verbatim_through_sh() {
        let mut s = spec();
        s.cwd = PathBuf::from("/");
        s.command = vec![
            "/bin/sh".into(),
            "-c".into(),
            "printf '%s|%s|%s' \"$A\" \"$1\" \"$PWD\"".into(),
            "x".into(),
            "a 'b' $c".into(),
        ];
        s.env.push(("PWD".into(), "/".into()));
        let out = Command::new("sh")
            .arg("-c")
            .arg(s.script().unwrap().replace("/usr/bin/env", "env"))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "it's \"quoted\"\nline2|a 'b' $c|/"
        );
    }

    #[test]
    fn only_hidden_paths_are_bound_back_once() {
        let binds = hidden_binds(vec![
            PathBuf::from("/tmp/ci/checkout/crates/pool"),
            PathBuf::from("/tmp/ci/checkout"),
            PathBuf::from("/work/main"),
            PathBuf::from("/tmpfoo/x"),
            PathBuf::from("/run/user/0/kiln"),
            PathBuf::from("/tmp/ci/checkout"),
        ]);
        assert_eq!(
            binds,
            [
                PathBuf::from("/run/user/0/kiln"),
                PathBuf::from("/tmp/ci/checkout")
            ]
        );
    }

    #[test]
    fn stale_scratch_dirs_of_dead_processes_are_swept() {
        let tmp = tempfile::tempdir().unwrap();
        // pid_max is at most 2^22: this pid cannot be running.
        let dead = tmp.path().join("kiln-harness-99999999-0000abcd");
        let alive = tmp
            .path()
            .join(format!("kiln-harness-{}-0000abcd", std::process::id()));
        let fresh_dead = tmp.path().join("kiln-harness-99999998-0000abcd");
        let other = tmp.path().join("unrelated-99999999");
        for d in [&dead, &alive, &fresh_dead, &other] {
            fs::create_dir(d).unwrap();
        }
        let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
        for d in [&dead, &alive, &other] {
            fs::File::open(d)
                .unwrap()
                .set_modified(two_hours_ago)
                .unwrap();
        }
        sweep_stale_scratch(tmp.path());
        assert!(!dead.exists());
        assert!(alive.exists() && fresh_dead.exists() && other.exists());
    }

    #[test]
    fn command_name_with_equals_is_refused() {
        let mut s = spec();
        s.command = vec!["A=b".into()];
        assert!(s.script().is_err());
    }

    #[test]
    fn summary_reports_overhead() {
        let t = RunTimes {
            init: Some(Duration::from_millis(2500)),
            start: Some(Duration::from_millis(4000)),
            end: Some(Duration::from_millis(5000)),
            exit: Duration::from_millis(5300),
        };
        let s = summary("6.1.0-56-amd64", Duration::from_millis(100), &t);
        assert!(s.contains("init 2.50s"), "{s}");
        assert!(s.contains("overhead 4.30s"), "{s}");
    }
}
