//! kiln-agent: PID 1 in the Kiln guest, serving kiln-proto over vsock.
//!
//! Modes:
//! - no arguments (normally as PID 1 in the guest): mount the pseudo filesystems, bring `lo`
//!   up, set the hostname, start the reaper, print `KILN-AGENT-READY` on the console, then
//!   connect to the host over vsock (CID 2, port `AGENT_PORT`) and serve, reconnecting after
//!   loss. With `kiln.echo=1` on the kernel command line, also run the vsock echo server.
//! - `--listen-unix PATH` / `--connect-unix PATH`: an ordinary host process serving the same
//!   protocol over a unix socket (tier-3 tests). No mounts; the agent becomes a child
//!   subreaper so orphans of its execs are reaped by it, as PID 1 would.
//!
//! - `--pid1-setup` before a unix mode: when running as PID 1 (e.g. `unshare -pf`), do PID 1's
//!   setup first, then serve on the unix socket (tier-3 test of the PID 1 duties).
//!
//! - In the guest, with `kiln.root=/dev/vdX` on the kernel command line, the agent first
//!   switches to the image's root under an overlay (module `root`, docs/IMAGES.md).
//!
//! The `KILN-AGENT-READY` line is printed in every mode once the agent can serve.

mod cgroup;
mod conn;
mod exec;
mod files;
mod reaper;
mod root;
mod sys;
mod transport;
mod user;
mod writer;

use std::sync::Arc;

use conn::Agent;
use exec::{ExecContext, ExecTable};
use reaper::Reaper;
use sys::Mode;

/// The readiness line (contract: docs/ARCHITECTURE.md).
const READY: &str = kiln_proto::READY_LINE;

enum Cli {
    Guest,
    ListenUnix(String),
    ConnectUnix(String),
}

/// Usage text.
const USAGE: &str = "usage: kiln-agent [--pid1-setup] [--listen-unix PATH | --connect-unix PATH]";

/// Parse the arguments; the flag says whether `--pid1-setup` was given (do PID 1's setup
/// before serving on a unix socket: the tier-3 test of PID 1 mode inside namespaces).
fn parse_args() -> Result<(Cli, bool), String> {
    let mut args = std::env::args().skip(1).peekable();
    let pid1_setup = args.peek().is_some_and(|a| a == "--pid1-setup");
    if pid1_setup {
        args.next();
    }
    let Some(a) = args.next() else {
        return Ok((Cli::Guest, pid1_setup));
    };
    let cli = match a.as_str() {
        "--listen-unix" => Cli::ListenUnix(args.next().ok_or("--listen-unix needs a PATH")?),
        "--connect-unix" => Cli::ConnectUnix(args.next().ok_or("--connect-unix needs a PATH")?),
        "--help" | "-h" => return Err(USAGE.into()),
        other if std::process::id() == 1 => {
            // The kernel passes unknown cmdline words to init as arguments: ignore them.
            let _ = other;
            Cli::Guest
        }
        other => return Err(format!("unknown argument {other:?} (try --help)")),
    };
    if let Some(extra) = args.next() {
        return Err(format!("unexpected argument {extra:?}"));
    }
    Ok((cli, pid1_setup))
}

fn start_agent(mode: Mode) -> Result<Arc<Agent>, std::io::Error> {
    let reaper = Reaper::start()?;
    Ok(Arc::new(Agent::new(
        ExecContext {
            table: Arc::new(ExecTable::default()),
            reaper,
        },
        mode,
    )))
}

/// PID 1's system setup: pseudo filesystems, console, hostname, loopback. Only as PID 1.
fn pid1_setup() {
    if std::process::id() != 1 {
        return;
    }
    for e in sys::mount_all() {
        eprintln!("kiln-agent: {e}");
    }
    sys::open_console();
    if let Err(e) = sys::set_hostname() {
        eprintln!("kiln-agent: {e}");
    }
    if let Err(e) = sys::loopback_up() {
        eprintln!("kiln-agent: {e}");
    }
    std::env::set_var("PATH", exec::DEFAULT_PATH);
}

/// The root switch of an image sandbox (`kiln.root=` on the command line; module `root`).
/// A failure the host did not ask to fall back from ends the VM before the readiness line.
fn switch_root() {
    match root::switch_from_cmdline() {
        Ok(None) => {}
        Ok(Some(s)) => eprintln!(
            "{} {} ({:?}) is / with an overlay on {:?} ({} ms)",
            root::PREFIX,
            s.spec.device.display(),
            s.spec.fstype,
            s.spec.upper,
            s.took.as_millis()
        ),
        Err((e, true)) => {
            eprintln!("{} {e}; falling back to the initramfs root", root::PREFIX);
        }
        Err((e, false)) => {
            eprintln!(
                "{} {e}; the guest cannot start (no fallback asked)",
                root::PREFIX
            );
            sys::shutdown(Mode::Guest);
        }
    }
}

fn guest_main() -> ! {
    sys::ensure_std_fds();
    pid1_setup();
    if std::process::id() == 1 {
        switch_root();
    }
    match cgroup::init_guest() {
        Ok(c) => eprintln!(
            "kiln-agent: exec limits: memory.max {} MiB, pids.max {}",
            c.memory_max >> 20,
            c.pids_max
        ),
        Err(e) => eprintln!("kiln-agent: execs run without limits: {e}"),
    }
    let agent = loop {
        match start_agent(Mode::Guest) {
            Ok(a) => break a,
            Err(e) => {
                eprintln!("kiln-agent: starting the reaper: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    };
    if sys::cmdline_has("kiln.echo", "1") {
        if let Err(e) = transport::start_vsock_echo() {
            eprintln!("kiln-agent: echo server: {e}");
        }
    }
    sys::console(READY);
    transport::vsock_client_loop(&agent)
}

fn host_main(cli: Cli, pid1: bool) -> Result<(), String> {
    sys::ensure_std_fds();
    // Bind before PID 1's mounts may hide the socket's directory (see `unix_bind`).
    let listener = match &cli {
        Cli::ListenUnix(path) => Some(transport::unix_bind(path).map_err(|e| e.to_string())?),
        _ => None,
    };
    if pid1 {
        pid1_setup();
    }
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) only changes this process's attributes.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let agent = start_agent(Mode::Host).map_err(|e| format!("starting the reaper: {e}"))?;
    match cli {
        Cli::ListenUnix(path) => {
            let listener = listener.ok_or("--listen-unix: no listener was bound")?;
            let accept =
                transport::unix_serve(&agent, listener, &path).map_err(|e| e.to_string())?;
            sys::console(READY);
            accept
                .join()
                .map_err(|_| "the accept loop panicked".to_owned())
        }
        Cli::ConnectUnix(path) => {
            sys::console(READY);
            transport::unix_client_loop(&agent, &path)
        }
        Cli::Guest => Err("guest mode is not a host mode".into()),
    }
}

fn main() {
    match parse_args() {
        Ok((Cli::Guest, _)) => guest_main(),
        Ok((cli, pid1)) => {
            if let Err(e) = host_main(cli, pid1) {
                eprintln!("kiln-agent: {e}");
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("kiln-agent: {e}");
            std::process::exit(2);
        }
    }
}
