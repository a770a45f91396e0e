//! `kiln run`: boot a sandbox, run one command, stream its output live (or print a JSON
//! result) and exit with the command's status. See [`super::exit`] for the codes.

use std::fs::File;
use std::io::{self, Write};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use clap::Args;
use kiln::{ExecEvent, ExecOptions, ExitStatus, Sandbox, SandboxConfig, SandboxError, StdinSource};
use serde::Serialize;

use super::{exit, signals, MachineArgs};

/// SIGPIPE: sent to the command when our stdout is closed (`kiln run -- yes | head`).
const SIGPIPE: i32 = 13;
/// SIGKILL: for a command still running [`BROKEN_PIPE_GRACE`] after its SIGPIPE.
const SIGKILL: i32 = 9;
/// How long a command may keep running after kiln's stdout closed and its process group got
/// SIGPIPE (it may ignore or handle it) before the group is killed.
pub const BROKEN_PIPE_GRACE: Duration = Duration::from_secs(2);

/// `kiln run` arguments.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The guest machine.
    #[command(flatten)]
    pub machine: MachineArgs,
    /// The root-filesystem image (`--image`, `--overlay-size`).
    #[command(flatten)]
    pub image: super::ImageRunArgs,
    /// The command's user and guest-side limits.
    #[command(flatten)]
    pub limits: super::args::LimitArgs,
    /// Kill the command (and all its children) after SECS seconds; exit status 124.
    #[arg(long, value_name = "SECS", value_parser = super::parse_secs)]
    pub timeout: Option<Duration>,
    /// Set an environment variable for the command (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V", value_parser = super::parse_env)]
    pub env: Vec<(String, String)>,
    /// Working directory of the command in the guest (default /).
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// Feed this host file to the command's stdin, or `-` for kiln's own stdin
    /// (default: /dev/null).
    #[arg(long, value_name = "FILE|-")]
    pub stdin: Option<String>,
    /// Print a one-line timing summary (boot, exec, total) to stderr.
    #[arg(short, long)]
    pub verbose: bool,
    /// Print a JSON result (exit code, signal, timed_out, truncated, timings, output) on
    /// stdout instead of streaming the output.
    #[arg(long)]
    pub json: bool,
    /// Keep at most BYTES of stdout + stderr (the rest is dropped, `truncated` is set).
    #[arg(long, value_name = "BYTES")]
    pub output_cap: Option<u64>,
    /// Deadline for the guest to boot and its agent to connect.
    #[arg(long, value_name = "SECS", value_parser = super::parse_secs,
          default_value = DEFAULT_BOOT_TIMEOUT_SECS)]
    pub boot_timeout: Duration,
    /// Boot the guest kernel without `quiet`: its whole log goes to the serial console (quoted
    /// in errors); slower, every console byte is a VM exit.
    #[arg(long)]
    pub kernel_log: bool,
    /// Name of the sandbox (in logs and errors).
    #[arg(long)]
    pub name: Option<String>,
    /// Network egress through the host proxy (docs/EGRESS.md).
    #[command(flatten)]
    pub egress: Box<super::EgressArgs>,
    /// Run the VM in its own jailed process (`kiln-vm`, installed next to `kiln` or named by
    /// $KILN_VM_BIN): new namespaces, a root holding only the VM's files, a cgroup, rlimits,
    /// uid/gid 65534 and no capabilities (docs/SECURITY.md). Needs root.
    #[arg(long)]
    pub jailed: bool,
    /// The command and its arguments (after `--`).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required_unless_present = "image",
        num_args = 1..,
        value_name = "CMD"
    )]
    pub command: Vec<String>,
}

/// `--boot-timeout` default, in sync with [`kiln::config::DEFAULT_BOOT_TIMEOUT`] (unit test);
/// also `kiln snapshot`/`restore`/`fork`'s.
pub(super) const DEFAULT_BOOT_TIMEOUT_SECS: &str = "60";

/// Timings of one `kiln run`, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Timings {
    /// Sandbox creation: from start to the agent's handshake.
    pub boot_ms: f64,
    /// From sending the command to its exit.
    pub exec_ms: f64,
    /// The whole run, including stopping the VM.
    pub total_ms: f64,
}

/// The `--json` document.
#[derive(Debug, Serialize)]
struct JsonResult<'a> {
    vm: &'a str,
    exit_code: Option<i32>,
    signal: Option<i32>,
    timed_out: bool,
    truncated: bool,
    oom_killed: bool,
    pids_limit_hit: bool,
    status: i32,
    timings: Timings,
    stdout: String,
    stderr: String,
}

/// The `--json` document when kiln itself failed.
#[derive(Debug, Serialize)]
struct JsonError {
    error: JsonErrorBody,
}

#[derive(Debug, Serialize)]
struct JsonErrorBody {
    status: i32,
    message: String,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs `kiln run`; returns the exit code.
pub fn run(args: RunArgs) -> i32 {
    let t0 = Instant::now();
    let json = args.json;
    let fail = |status: i32, message: String| -> i32 {
        eprintln!("kiln: error: {message}");
        if json {
            print_json(&JsonError {
                error: JsonErrorBody { status, message },
            });
        }
        status
    };

    if let Err(message) = super::check_command(&args.command) {
        return fail(exit::USAGE, message);
    }
    let boot_timeout = args.boot_timeout;
    let stdin = match args.stdin.as_deref() {
        None => StdinSource::Null,
        Some("-") => StdinSource::Reader(Box::new(io::stdin())),
        Some(path) => match File::open(path) {
            Ok(f) => StdinSource::Reader(Box::new(f)),
            Err(e) => return fail(exit::USAGE, format!("--stdin {path}: {e}")),
        },
    };
    // One command, one consumer: when whatever reads kiln's stdout pauses (`kiln run | less`),
    // the guest is throttled for as long as it takes instead of the command failing.
    let mut config = args.machine.apply(
        SandboxConfig::new()
            .boot_timeout(boot_timeout)
            .consumer_deadline(Duration::MAX),
    );
    config.name = args.name;
    config.quiet_kernel = !args.kernel_log;
    let config = config.jailed(args.jailed);
    let config_memory_mib = config.memory_mib;
    // Flags first (no work), then the image (may pull).
    let config = match args.egress.apply(config, &|var| std::env::var(var).ok()) {
        Ok(c) => c,
        Err(message) => return fail(exit::USAGE, message),
    };
    let config = match args.image.apply(config) {
        Ok(c) => c,
        Err((status, message)) => return fail(status, message),
    };

    let sandbox = match Sandbox::create(config) {
        Ok(s) => s,
        Err(e) => {
            if args.verbose {
                eprintln!("kiln: boot failed after {:.3}s", t0.elapsed().as_secs_f64());
            }
            return fail(exit::for_error(&e), e.to_string());
        }
    };
    let boot = t0.elapsed();
    // `kiln run --image X` without CMD: the image's entrypoint + cmd.
    let mut command = args.command;
    if command.is_empty() {
        command = sandbox.exec_defaults().command;
        if command.is_empty() {
            return fail(
                exit::USAGE,
                "no CMD given and the image has no entrypoint or cmd".into(),
            );
        }
    }

    let mut opts = ExecOptions {
        env: args.env,
        cwd: args.cwd,
        stdin,
        timeout: args.timeout,
        output_cap: Some(args.output_cap),
        ..ExecOptions::default()
    };
    // The collected JSON result keeps everything unless capped explicitly.
    if json && args.output_cap.is_none() {
        opts.output_cap = Some(None);
    }
    let opts = args.limits.apply(opts);
    let guest_mib = config_memory_mib;

    let t_exec = Instant::now();
    let mut out = Vec::new();
    let mut err = Vec::new();
    let result = if json {
        run_collect(&sandbox, &command, opts, &mut out, &mut err).map(|status| Streamed {
            status,
            stdout_closed: false,
        })
    } else {
        run_streaming(&sandbox, &command, opts)
    };
    let exec = t_exec.elapsed();
    let name = sandbox.name().to_owned();
    drop(sandbox);
    let timings = Timings {
        boot_ms: ms(boot),
        exec_ms: ms(exec),
        total_ms: ms(t0.elapsed()),
    };

    let (status, code) = match result {
        Ok(s) => (s.status, s.code()),
        Err(e) => {
            if args.verbose {
                summary(&name, &timings, None);
            }
            return fail(exit::for_error(&e), e.to_string());
        }
    };
    if args.verbose {
        summary(&name, &timings, Some(&status));
    }
    if status.timed_out && !json {
        eprintln!(
            "kiln: the command timed out after {:.3}s and was killed",
            args.timeout.map(|d| d.as_secs_f64()).unwrap_or_default()
        );
    }
    if !json {
        for line in limit_messages(&status, &args.limits, guest_mib) {
            eprintln!("{line}");
        }
    }
    if json {
        print_json(&JsonResult {
            vm: &name,
            exit_code: status.code,
            signal: status.signal,
            timed_out: status.timed_out,
            truncated: status.truncated,
            oom_killed: status.oom_killed,
            pids_limit_hit: status.pids_limit_hit,
            status: code,
            timings,
            stdout: String::from_utf8_lossy(&out).into_owned(),
            stderr: String::from_utf8_lossy(&err).into_owned(),
        });
    }
    code
}

/// What `kiln run` says on stderr (without `-v`) when a guest-side limit ended or hampered
/// the command.
pub fn limit_messages(
    status: &ExitStatus,
    limits: &super::args::LimitArgs,
    guest_mib: u32,
) -> Vec<String> {
    let mut lines = Vec::new();
    if status.oom_killed {
        let limit = match limits.memory_max {
            Some(m) => format!("memory limit {m} MiB"),
            None => format!("the sandbox's default limit: {guest_mib} MiB of guest RAM minus the agent's reserve; raise --memory"),
        };
        lines.push(format!(
            "kiln: the command was killed by the guest's OOM killer ({limit})"
        ));
    }
    if status.pids_limit_hit {
        let limit = match limits.pids_max {
            Some(n) => format!("{n}"),
            None => "the sandbox default".to_owned(),
        };
        lines.push(format!(
            "kiln: the command hit its process limit (pids max {limit}): some fork/clone calls failed"
        ));
    }
    lines
}

fn summary(name: &str, t: &Timings, status: Option<&ExitStatus>) {
    let end = match status {
        Some(s) => match (s.code, s.signal) {
            (Some(c), _) => format!("exit {c}"),
            (None, Some(sig)) => format!("signal {sig}"),
            (None, None) => "no status".into(),
        },
        None => "failed".into(),
    };
    eprintln!(
        "kiln: {name}: boot {:.3}s, exec {:.3}s, total {:.3}s, {end}",
        t.boot_ms / 1e3,
        t.exec_ms / 1e3,
        t.total_ms / 1e3
    );
}

fn print_json<T: Serialize>(v: &T) {
    match serde_json::to_string(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("kiln: error: encoding the JSON result: {e}"),
    }
}

/// What [`run_streaming`] saw: the command's status and whether kiln's stdout was closed
/// under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Streamed {
    /// The command's exit status.
    pub status: ExitStatus,
    /// kiln's stdout was closed (EPIPE) while the command ran: the command got SIGPIPE.
    pub stdout_closed: bool,
}

impl Streamed {
    /// kiln's exit code: the command's status, except that a command killed after kiln's
    /// stdout was closed (by the SIGPIPE, or the SIGKILL after [`BROKEN_PIPE_GRACE`]) ends
    /// like a shell pipeline's writer: 128 + SIGPIPE = 141.
    pub fn code(&self) -> i32 {
        if self.stdout_closed && !self.status.timed_out && self.status.signal.is_some() {
            128 + SIGPIPE
        } else {
            exit::for_status(&self.status)
        }
    }
}

/// Ends the command after kiln's stdout closed, from a helper thread (so that the caller
/// keeps reading the command's events meanwhile and no request waits behind unread output):
/// sends SIGPIPE to its process group, then SIGKILL unless the returned sender is dropped
/// (the command ended) within `grace` of the call.
fn end_after_broken_pipe(
    signaller: kiln::ExecSignaller,
    grace: Duration,
) -> Option<mpsc::Sender<()>> {
    let (tx, rx) = mpsc::channel::<()>();
    let start = Instant::now();
    let spawned = thread::Builder::new()
        .name("kiln-epipe".into())
        .spawn(move || {
            if let Err(e) = signaller.signal(SIGPIPE) {
                // Not worth a word when the command has ended meanwhile.
                if rx.try_recv() != Err(mpsc::TryRecvError::Disconnected) {
                    eprintln!("kiln: sending SIGPIPE to the command: {e}");
                }
            }
            let left = grace.saturating_sub(start.elapsed());
            if rx.recv_timeout(left) == Err(mpsc::RecvTimeoutError::Timeout) {
                if let Err(e) = signaller.signal(SIGKILL) {
                    eprintln!("kiln: killing the command after its SIGPIPE: {e}");
                }
            }
        });
    match spawned {
        Ok(_) => Some(tx),
        Err(e) => {
            eprintln!("kiln: warning: cannot signal the command after SIGPIPE: {e}");
            None
        }
    }
}

/// Streams the command's output to our stdout/stderr as it arrives. When our stdout is
/// closed (EPIPE) it stops writing output, sends SIGPIPE to the command's process group and
/// kills the group if it has not ended [`BROKEN_PIPE_GRACE`] later (both from a helper
/// thread); meanwhile it keeps reading (and dropping) the events up to the command's exit.
fn run_streaming(
    sandbox: &Sandbox,
    argv: &[String],
    opts: ExecOptions,
) -> Result<Streamed, SandboxError> {
    let mut stream = sandbox.stream_exec_with_options(argv, opts)?;
    let signaller = stream.signaller()?;
    let _forwarder = signaller.clone().and_then(signals::forward_to);
    // Dropped on return: cancels a pending kill.
    let mut _ender: Option<mpsc::Sender<()>> = None;
    let stdout = io::stdout();
    let stderr = io::stderr();
    let mut stdout_closed = false;
    while let Some(ev) = stream.next_event()? {
        match ev {
            ExecEvent::Started { .. } => {}
            ExecEvent::Stdout(d) => {
                if !stdout_closed {
                    let mut o = stdout.lock();
                    if let Err(e) = o.write_all(&d).and_then(|()| o.flush()) {
                        if e.kind() != io::ErrorKind::BrokenPipe {
                            return Err(SandboxError::Io {
                                vm: sandbox.name().to_owned(),
                                op: "writing the command's stdout",
                                source: e,
                            });
                        }
                        // Like a pipeline: the writer gets SIGPIPE, and ends.
                        stdout_closed = true;
                        _ender = signaller
                            .clone()
                            .and_then(|s| end_after_broken_pipe(s, BROKEN_PIPE_GRACE));
                    }
                }
            }
            ExecEvent::Stderr(d) => {
                let mut e = stderr.lock();
                // A closed stderr is not worth failing the run for.
                let _ = e.write_all(&d).and_then(|()| e.flush());
            }
            ExecEvent::Exit(status) => {
                return Ok(Streamed {
                    status,
                    stdout_closed,
                })
            }
        }
    }
    Err(SandboxError::Protocol {
        vm: sandbox.name().to_owned(),
        op: "exec",
        message: "the event stream ended without an exit status".into(),
    })
}

/// Collects the command's output for the JSON result.
fn run_collect(
    sandbox: &Sandbox,
    argv: &[String],
    opts: ExecOptions,
    out: &mut Vec<u8>,
    err: &mut Vec<u8>,
) -> Result<ExitStatus, SandboxError> {
    let mut stream = sandbox.stream_exec_with_options(argv, opts)?;
    let _forwarder = stream.signaller()?.and_then(signals::forward_to);
    stream.forward(
        &mut |d| {
            out.extend_from_slice(d);
            Ok(())
        },
        &mut |d| {
            err.extend_from_slice(d);
            Ok(())
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: Option<i32>, signal: Option<i32>, timed_out: bool) -> ExitStatus {
        ExitStatus {
            code,
            signal,
            timed_out,
            truncated: false,
            ..Default::default()
        }
    }

    #[test]
    fn limit_hits_are_reported_with_the_limit() {
        let mut st = status(None, Some(9), false);
        let none = super::super::args::LimitArgs::default();
        assert!(limit_messages(&st, &none, 512).is_empty());
        st.oom_killed = true;
        let given = super::super::args::LimitArgs {
            memory_max: Some(64),
            pids_max: Some(50),
            ..Default::default()
        };
        assert_eq!(
            limit_messages(&st, &given, 512),
            ["kiln: the command was killed by the guest's OOM killer (memory limit 64 MiB)"]
        );
        assert!(limit_messages(&st, &none, 512)[0].contains("512 MiB of guest RAM"));
        st.oom_killed = false;
        st.pids_limit_hit = true;
        let m = limit_messages(&st, &given, 512);
        assert_eq!(m.len(), 1);
        assert!(m[0].contains("pids max 50"), "{m:?}");
    }

    #[test]
    fn a_closed_stdout_ends_like_a_pipeline_writer() {
        let closed = |s| Streamed {
            status: s,
            stdout_closed: true,
        };
        // Died of the SIGPIPE, or killed after the grace period: 141 either way.
        assert_eq!(closed(status(None, Some(SIGPIPE), false)).code(), 141);
        assert_eq!(closed(status(None, Some(SIGKILL), false)).code(), 141);
        // A command that exits by itself keeps its code; a timeout stays 124.
        assert_eq!(closed(status(Some(0), None, false)).code(), 0);
        assert_eq!(closed(status(Some(3), None, false)).code(), 3);
        assert_eq!(
            closed(status(None, Some(SIGKILL), true)).code(),
            exit::TIMEOUT
        );
        // With stdout open, a SIGKILL is the command's own 137.
        let open = Streamed {
            status: status(None, Some(SIGKILL), false),
            stdout_closed: false,
        };
        assert_eq!(open.code(), 137);
    }

    #[test]
    fn boot_timeout_default_matches_the_library() {
        assert_eq!(
            super::super::parse_secs(DEFAULT_BOOT_TIMEOUT_SECS).unwrap(),
            kiln::config::DEFAULT_BOOT_TIMEOUT
        );
    }
}
