//! `kiln snapshot`, `kiln restore`, `kiln fork`: snapshots from the command line.
//!
//! - `kiln snapshot --dir DIR [-- SETUP-CMD...]`: boot a sandbox, run an optional setup command
//!   (its output is shown; a failure aborts), save the sandbox to DIR.
//! - `kiln restore --dir DIR -- CMD...`: restore a sandbox from DIR, run CMD, print its
//!   output and exit with its status.
//! - `kiln fork --dir DIR -n N -- CMD...`: restore N sandboxes from DIR at once and run CMD in
//!   each; prints each fork's output prefixed with `[fork i]`; exits 0 when all succeeded,
//!   else with the first failing status.
//! - `kiln fork --live -n N [--setup SHELL-CMD] -- CMD...`: boot a sandbox, run the optional
//!   setup (`sh -c`), fork it live N times (`Sandbox::fork_live`: memory shared
//!   copy-on-write, no snapshot file) and run CMD in each child, output and status as above.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use kiln::sandbox::MAX_FORKS;
use kiln::{ExecResult, Sandbox, SandboxConfig, SandboxError};

use super::{exit, MachineArgs};
// Boot / restore deadline default (seconds): the same as `kiln run`'s.
use super::run::DEFAULT_BOOT_TIMEOUT_SECS;

/// `kiln snapshot` arguments.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// Snapshot directory (created; a snapshot there is replaced).
    #[arg(long)]
    pub dir: PathBuf,
    /// The guest machine.
    #[command(flatten)]
    pub machine: MachineArgs,
    /// Deadline for the guest to boot.
    #[arg(long, value_name = "SECS", value_parser = super::parse_secs,
          default_value = DEFAULT_BOOT_TIMEOUT_SECS)]
    pub boot_timeout: Duration,
    /// Setup command run before the snapshot (after `--`).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub command: Vec<String>,
}

/// `kiln restore` arguments.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Snapshot directory.
    #[arg(long)]
    pub dir: PathBuf,
    /// Deadline for the restored guest's agent to reconnect.
    #[arg(long, value_name = "SECS", value_parser = super::parse_secs,
          default_value = DEFAULT_BOOT_TIMEOUT_SECS)]
    pub boot_timeout: Duration,
    /// The command and its arguments (after `--`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true,
          num_args = 1.., value_name = "CMD")]
    pub command: Vec<String>,
}

/// `kiln fork` arguments: a restore done `--count` times at once, or (`--live`) a live fork
/// of a freshly booted sandbox into `--count` children.
#[derive(Debug, Args)]
pub struct ForkArgs {
    /// Number of forks.
    #[arg(short = 'n', long, default_value_t = 2)]
    pub count: usize,
    /// Snapshot directory to restore the forks from (not with --live).
    #[arg(long, required_unless_present = "live", conflicts_with = "live")]
    pub dir: Option<PathBuf>,
    /// Boot a sandbox and fork it live (memory shared copy-on-write, no snapshot file).
    #[arg(long)]
    pub live: bool,
    /// With --live: a shell command (`sh -c`) run in the sandbox before it is forked.
    #[arg(long, requires = "live", value_name = "SHELL-CMD")]
    pub setup: Option<String>,
    /// With --live: the guest machine.
    #[command(flatten)]
    pub machine: MachineArgs,
    /// Deadline for each fork's agent (and with --live the first boot).
    #[arg(long, value_name = "SECS", value_parser = super::parse_secs,
          default_value = DEFAULT_BOOT_TIMEOUT_SECS)]
    pub boot_timeout: Duration,
    /// The command and its arguments (after `--`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true,
          num_args = 1.., value_name = "CMD")]
    pub command: Vec<String>,
}

fn fail(e: &SandboxError) -> i32 {
    eprintln!("kiln: error: {e}");
    exit::for_error(e)
}

fn show(prefix: &str, r: &ExecResult) {
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    // Nothing useful to do if our own stdout/stderr are gone.
    if prefix.is_empty() {
        let _ = out.write_all(&r.stdout);
        let _ = err.write_all(&r.stderr);
    } else {
        for l in String::from_utf8_lossy(&r.stdout).lines() {
            let _ = writeln!(out, "{prefix} {l}");
        }
        for l in String::from_utf8_lossy(&r.stderr).lines() {
            let _ = writeln!(err, "{prefix} {l}");
        }
    }
    let _ = out.flush();
}

/// Runs `kiln snapshot`; returns the exit code.
pub fn snapshot(args: SnapshotArgs) -> i32 {
    if let Err(message) = super::check_command(&args.command) {
        eprintln!("kiln: error: {message}");
        return exit::USAGE;
    }
    let config = args
        .machine
        .apply(SandboxConfig::new().boot_timeout(args.boot_timeout));
    let sandbox = match Sandbox::create(config) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    if !args.command.is_empty() {
        match sandbox.exec(&args.command) {
            Ok(r) => {
                show("", &r);
                let code = exit::for_status(&r.status);
                if code != 0 {
                    eprintln!("kiln: the setup command failed (status {code}); no snapshot");
                    return code;
                }
            }
            Err(e) => return fail(&e),
        }
    }
    let t0 = Instant::now();
    match sandbox.snapshot(&args.dir) {
        Ok(info) => {
            eprintln!(
                "kiln: snapshot of {} written to {} in {:.1} ms ({} of {} MiB of guest RAM \
                 stored)",
                sandbox.name(),
                args.dir.display(),
                t0.elapsed().as_secs_f64() * 1e3,
                info.written_bytes >> 20,
                info.guest_bytes >> 20
            );
            0
        }
        Err(e) => fail(&e),
    }
}

fn restore_config(boot_timeout: Duration) -> SandboxConfig {
    SandboxConfig::new().boot_timeout(boot_timeout)
}

fn restore_and_run(
    dir: &Path,
    timeout: Duration,
    cmd: &[String],
) -> Result<ExecResult, SandboxError> {
    let sandbox = Sandbox::restore(dir, restore_config(timeout))?;
    sandbox.exec(cmd)
}

/// Runs `kiln restore`; returns the exit code.
pub fn restore(args: RestoreArgs) -> i32 {
    if let Err(message) = super::check_command(&args.command) {
        eprintln!("kiln: error: {message}");
        return exit::USAGE;
    }
    match restore_and_run(&args.dir, args.boot_timeout, &args.command) {
        Ok(r) => {
            show("", &r);
            exit::for_status(&r.status)
        }
        Err(e) => fail(&e),
    }
}

/// Runs `kiln fork`; returns the exit code.
pub fn fork(args: ForkArgs) -> i32 {
    if args.count == 0 || args.count > MAX_FORKS {
        eprintln!("kiln: error: -n {} is not in 1..={MAX_FORKS}", args.count);
        return exit::USAGE;
    }
    if let Err(message) = super::check_command(&args.command) {
        eprintln!("kiln: error: {message}");
        return exit::USAGE;
    }
    if args.live {
        return fork_live(&args);
    }
    let Some(dir) = args.dir.as_deref() else {
        eprintln!("kiln: error: --dir is required without --live");
        return exit::USAGE;
    };
    let results = on_threads(args.count, |_| {
        restore_and_run(dir, args.boot_timeout, &args.command)
    });
    report_forks(&results)
}

/// `f(0..n)`, each on its own thread; a panicked thread is an error result.
fn on_threads(
    n: usize,
    f: impl Fn(usize) -> Result<ExecResult, SandboxError> + Sync,
) -> Vec<Result<ExecResult, SandboxError>> {
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = (0..n).map(|i| s.spawn(move || f(i))).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(SandboxError::InvalidArgument {
                        vm: "fork".into(),
                        op: "fork",
                        message: "a fork thread panicked".into(),
                    })
                })
            })
            .collect()
    })
}

/// Prints each fork's output prefixed `[fork i]`; the first failing status, else 0.
fn report_forks(results: &[Result<ExecResult, SandboxError>]) -> i32 {
    let mut code = 0;
    for (i, r) in results.iter().enumerate() {
        let c = match r {
            Ok(r) => {
                show(&format!("[fork {i}]"), r);
                exit::for_status(&r.status)
            }
            Err(e) => fail(e),
        };
        if code == 0 {
            code = c;
        }
    }
    code
}

/// `kiln fork --live`: boot, optional setup, live fork, CMD in every child (in parallel).
fn fork_live(args: &ForkArgs) -> i32 {
    let config = args
        .machine
        .clone()
        .apply(SandboxConfig::new().boot_timeout(args.boot_timeout));
    let parent = match Sandbox::create(config) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    if let Some(setup) = &args.setup {
        let cmd = ["sh".to_owned(), "-c".to_owned(), setup.clone()];
        match parent.exec(&cmd) {
            Ok(r) => {
                show("", &r);
                let code = exit::for_status(&r.status);
                if code != 0 {
                    eprintln!("kiln: the setup command failed (status {code}); no fork");
                    return code;
                }
            }
            Err(e) => return fail(&e),
        }
    }
    let t0 = Instant::now();
    let children = match parent.fork_live_with(args.count, restore_config(args.boot_timeout)) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    eprintln!(
        "kiln: {} forked live into {} children in {:.1} ms",
        parent.name(),
        children.len(),
        t0.elapsed().as_secs_f64() * 1e3
    );
    let results = on_threads(children.len(), |i| children[i].exec(&args.command));
    report_forks(&results)
}
