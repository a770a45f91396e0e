//! [`Sandbox`]: one microVM running the Kiln guest, driven through its agent.
//!
//! [`Sandbox::create`] validates the configuration, checks the host's KVM, listens on vsock
//! host port [`kiln_proto::AGENT_PORT`] before the VM starts, boots the VM, accepts the
//! agent's connection within the boot deadline, checks its `Hello` and wraps a
//! [`kiln_proto::Client`]. Every method maps protocol failures to [`SandboxError`]s that name
//! the sandbox and the operation; when the guest died the error quotes its serial console.
//! Dropping a sandbox stops its VM (bounded: it never waits on the guest).

use std::io::{self, Read, Write};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread;
use std::time::{Duration, Instant};

use kiln_proto::{
    Client, ClientConfig, ClientError, DirEntry, ExecLimits, ExecRequest, FileStat, Hello,
    ProtoError, Stdin, MAX_CHUNK, PROTOCOL_VERSION,
};
use kiln_vmm::host::{self, HostKind};
use kiln_vmm::virtio::vsock::{VsockListener, VsockStream};
use kiln_vmm::{Vm, VmConfig};

use crate::config::{ResolvedConfig, SandboxConfig};
use crate::error::{SandboxError, SERIAL_TAIL_BYTES};
use crate::exec::{
    ExecEvent, ExecOptions, ExecResult, ExitStatus, StdinSource, DEFAULT_OUTPUT_CAP,
};

/// `Sandbox::snapshot`, `Sandbox::restore`, `Sandbox::fork` (sandbox/snapshot.rs).
pub(crate) mod snapshot;
pub use snapshot::MAX_FORKS;

/// Jailed sandboxes: the VM in a `kiln-vm` child process (sandbox/jailed.rs).
pub(crate) mod jailed;
use jailed::{AgentStream, Conn, Machine};

/// Guest CID of every sandbox VM (each VM has its own in-process vsock device).
pub const GUEST_CID: u64 = kiln_proto::GUEST_CID as u64;
/// How often the boot wait checks whether the VM already ended.
const BOOT_POLL: Duration = Duration::from_millis(50);
/// How often the watchdog checks whether the VM ended.
const WATCHDOG_POLL: Duration = Duration::from_millis(100);
/// How long [`Sandbox::shutdown`] waits for the guest to end itself before stopping it.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long an error path waits for a dying VM to report its exit reason.
const DEATH_GRACE: Duration = Duration::from_millis(500);
/// Write deadline on the agent connection: a guest that stops reading cannot block a host
/// thread forever.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Serial console kept per VM (for error messages and `serial_tail`).
const SERIAL_RING_BYTES: usize = 256 * 1024;

/// Set to any non-empty value to boot even on a kvm-pvm host.
pub const ALLOW_PVM_ENV: &str = "KILN_ALLOW_PVM";

/// Timings of a sandbox's creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootTimings {
    /// From the call to `Sandbox::create` to the VM running (validation, VMM setup, load).
    pub vm_start: Duration,
    /// From the call to the agent's `Hello` (the sandbox is usable).
    pub ready: Duration,
}

struct Inner {
    name: String,
    vm: Mutex<Option<Machine>>,
    client: Client,
    /// A handle on the agent connection, shut down when the VM ends so that every waiter
    /// sees the connection close instead of waiting on a dead guest.
    conn: Conn,
    hello: Hello,
    timings: BootTimings,
    /// The image's exec defaults (crate::image); set once right after boot or restore.
    exec_defaults: std::sync::OnceLock<crate::image::SandboxExecDefaults>,
    /// The sandbox's egress, set once after boot/restore when it has a policy (egress.rs).
    egress: std::sync::OnceLock<crate::egress::Attached>,
    /// Dropping it ends the watchdog thread.
    _watchdog_stop: mpsc::Sender<()>,
}

/// A running microVM with the Kiln agent. `Send + Sync`: share it between threads (by
/// reference or in an `Arc`) to run several commands at once.
pub struct Sandbox {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("name", &self.inner.name)
            .field("agent", &self.inner.hello.agent_version)
            .finish_non_exhaustive()
    }
}

impl Sandbox {
    /// Boots a sandbox and waits for its agent.
    pub fn create(config: SandboxConfig) -> Result<Sandbox, SandboxError> {
        let t0 = Instant::now();
        let cfg = config.validate()?;
        // Input first, then the host: a wrong file is reported as such on any host.
        cfg.check_asset_contents()?;
        check_host(&cfg.name)?;
        if cfg.jail.is_some() {
            return jailed::boot(cfg, t0);
        }
        boot(cfg, t0)
    }

    /// The sandbox's name (used in every error).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The agent's handshake (protocol version, capabilities, agent version).
    pub fn hello(&self) -> &Hello {
        &self.inner.hello
    }

    /// How long the creation took.
    pub fn boot_timings(&self) -> BootTimings {
        self.inner.timings
    }

    /// The last `max` bytes the guest wrote to its serial console.
    pub fn serial_tail(&self, max: usize) -> String {
        self.inner.serial_tail(max)
    }

    /// Whether the sandbox's VM is still running: `false` once the guest ended it (reboot,
    /// kernel panic — `panic=-1` reboots —, triple fault, the agent dying as PID 1) or the host
    /// stopped it. Reads the exit state the VMM records: no guest round trip, cheap enough for
    /// a pool's hot path (`SandboxPool` checks it before handing out an idle sandbox). A guest
    /// that hangs without ending its VM still counts as running; a ping tells.
    pub fn is_running(&self) -> bool {
        self.inner
            .vm_guard()
            .as_ref()
            .is_some_and(|vm| vm.exit_reason().is_none())
    }

    /// Round trip a ping to the agent.
    pub fn ping(&self) -> Result<(), SandboxError> {
        self.inner.call("ping", |c| c.ping())
    }

    /// Round trip a ping that must be answered within `timeout` (instead of the configured
    /// request timeout): a health check. A slow agent gives [`SandboxError::Timeout`].
    pub fn ping_timeout(&self, timeout: Duration) -> Result<(), SandboxError> {
        self.inner.call("ping", |c| c.ping_within(timeout))
    }

    /// Runs `argv` to completion with default options and collects its output. A command
    /// that is not found ends with exit code 127 and the agent's message on stderr.
    pub fn exec<S: AsRef<str>>(&self, argv: &[S]) -> Result<ExecResult, SandboxError> {
        self.exec_with_options(argv, ExecOptions::default())
    }

    /// The exec defaults of the sandbox's image (empty without one): applied under every
    /// exec's [`ExecOptions`]; `command` is the image's entrypoint + cmd.
    pub fn exec_defaults(&self) -> crate::image::SandboxExecDefaults {
        self.inner.exec_defaults.get().cloned().unwrap_or_default()
    }

    pub(crate) fn set_exec_defaults(&self, d: crate::image::SandboxExecDefaults) {
        if !d.is_empty() {
            let _ = self.inner.exec_defaults.set(d);
        }
    }

    /// Alias of [`exec`](Self::exec) (the seed's vocabulary).
    pub fn execute<S: AsRef<str>>(&self, argv: &[S]) -> Result<ExecResult, SandboxError> {
        self.exec(argv)
    }

    /// Runs `argv` to completion with `opts` and collects its output (capped at
    /// [`DEFAULT_OUTPUT_CAP`] unless `opts.output_cap` says otherwise).
    pub fn exec_with_options<S: AsRef<str>>(
        &self,
        argv: &[S],
        mut opts: ExecOptions,
    ) -> Result<ExecResult, SandboxError> {
        let started = Instant::now();
        if opts.output_cap.is_none() {
            opts.output_cap = Some(Some(DEFAULT_OUTPUT_CAP));
        }
        let mut stream = self.stream_exec_with_options(argv, opts)?;
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        while let Some(ev) = stream.next_event()? {
            match ev {
                ExecEvent::Started { .. } => {}
                ExecEvent::Stdout(d) => stdout.extend_from_slice(&d),
                ExecEvent::Stderr(d) => stderr.extend_from_slice(&d),
                ExecEvent::Exit(status) => {
                    return Ok(ExecResult {
                        stdout,
                        stderr,
                        status,
                        duration: started.elapsed(),
                    })
                }
            }
        }
        Err(SandboxError::Protocol {
            vm: self.inner.name.clone(),
            op: "exec",
            message: "the event stream ended without an exit status".into(),
        })
    }

    /// Alias of [`exec_with_options`](Self::exec_with_options).
    pub fn execute_with_options<S: AsRef<str>>(
        &self,
        argv: &[S],
        opts: ExecOptions,
    ) -> Result<ExecResult, SandboxError> {
        self.exec_with_options(argv, opts)
    }

    /// Starts `argv` and returns its live events (stdout/stderr chunks as they are produced,
    /// then the exit). Output is not capped.
    pub fn stream_exec<S: AsRef<str>>(&self, argv: &[S]) -> Result<ExecStream, SandboxError> {
        self.stream_exec_with_options(argv, ExecOptions::default())
    }

    /// Alias of [`stream_exec`](Self::stream_exec).
    pub fn stream_execute<S: AsRef<str>>(&self, argv: &[S]) -> Result<ExecStream, SandboxError> {
        self.stream_exec(argv)
    }

    /// Starts `argv` with `opts` and returns its live events. `opts.output_cap` = `None`
    /// means no cap here. Stdin given as large bytes or a reader is streamed by a helper
    /// thread while the events are read.
    pub fn stream_exec_with_options<S: AsRef<str>>(
        &self,
        argv: &[S],
        opts: ExecOptions,
    ) -> Result<ExecStream, SandboxError> {
        const OP: &str = "exec";
        let argv: Vec<String> = argv.iter().map(|s| s.as_ref().to_owned()).collect();
        if argv.is_empty() || argv[0].is_empty() {
            return Err(SandboxError::InvalidArgument {
                vm: self.inner.name.clone(),
                op: OP,
                message: "empty command".into(),
            });
        }
        let opts = match self.inner.exec_defaults.get() {
            Some(d) => d.apply(opts),
            None => opts,
        };
        let (stdin, feed): (Stdin, Option<Box<dyn Read + Send>>) = match opts.stdin {
            StdinSource::Null => (Stdin::Null, None),
            StdinSource::Bytes(b) if b.len() <= MAX_CHUNK => (Stdin::Bytes(b), None),
            StdinSource::Bytes(b) => (Stdin::Stream, Some(Box::new(io::Cursor::new(b)))),
            StdinSource::Reader(r) => (Stdin::Stream, Some(r)),
        };
        let program = argv[0].clone();
        let env = match self.egress() {
            Some(e) => e.exec_env(opts.env),
            None => opts.env,
        };
        let req = ExecRequest {
            argv,
            env,
            cwd: opts.cwd,
            stdin,
            timeout_ms: opts
                .timeout
                .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1)),
            output_cap: opts.output_cap.flatten(),
            background: false,
            user: opts.user,
            limits: ExecLimits {
                memory_max: opts.memory_max,
                pids_max: opts.pids_max,
            },
        };
        let mut inner_stream = self
            .inner
            .client
            .exec_stream(req)
            .map_err(|e| self.inner.exec_error(OP, &program, e))?;
        let mut pump = None;
        if let Some(reader) = feed {
            // Not started: the exit (127/126 with the agent's message) follows.
            if let Some((exec_id, _pid)) = inner_stream
                .started()
                .map_err(|e| self.inner.exec_error(OP, &program, e))?
            {
                let writer = self.inner.client.stdin(exec_id);
                pump = Some(spawn_stdin_pump(reader, writer)?);
            }
        }
        Ok(ExecStream {
            inner: Arc::clone(&self.inner),
            stream: inner_stream,
            program,
            pump,
        })
    }

    /// Reads a whole file from the guest.
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>, SandboxError> {
        self.inner.call("read_file", |c| c.read_file(path))
    }

    /// Streams a guest file into `out`; returns the bytes copied.
    pub fn read_file_to(&self, path: &str, out: &mut dyn Write) -> Result<u64, SandboxError> {
        self.inner
            .call("read_file", |c| c.read_file_to(path, 0, None, out))
    }

    /// Writes `data` as the whole content of the guest file `path` (created or truncated).
    pub fn write_file(&self, path: &str, data: &[u8]) -> Result<(), SandboxError> {
        self.inner
            .call("write_file", |c| c.write_file(path, data, None))
    }

    /// Writes everything `src` yields as the content of the guest file `path`; returns the
    /// bytes written.
    pub fn write_file_from(&self, path: &str, src: &mut dyn Read) -> Result<u64, SandboxError> {
        self.inner
            .call("write_file", |c| c.write_file_from(path, src, None))
    }

    /// Lists a directory, sorted by name.
    pub fn list_dir(&self, path: &str) -> Result<Vec<DirEntry>, SandboxError> {
        self.inner.call("list_dir", |c| c.list_dir(path))
    }

    /// Whether `path` exists in the guest.
    pub fn file_exists(&self, path: &str) -> Result<bool, SandboxError> {
        self.inner.call("file_exists", |c| c.exists(path))
    }

    /// Removes a file, symlink or empty directory.
    pub fn remove_file(&self, path: &str) -> Result<(), SandboxError> {
        self.inner.call("remove_file", |c| c.remove(path, false))
    }

    /// Removes a path recursively (`rm -rf` without following symlinks).
    pub fn remove_all(&self, path: &str) -> Result<(), SandboxError> {
        self.inner.call("remove_all", |c| c.remove(path, true))
    }

    /// Renames `from` to `to`.
    pub fn rename(&self, from: &str, to: &str) -> Result<(), SandboxError> {
        self.inner.call("rename", |c| c.rename(from, to))
    }

    /// Stats a path (without following a final symlink).
    pub fn stat(&self, path: &str) -> Result<FileStat, SandboxError> {
        self.inner.call("stat", |c| c.stat(path))
    }

    /// Creates a directory and its missing parents (`mkdir -p`).
    pub fn mkdir(&self, path: &str) -> Result<(), SandboxError> {
        self.inner.call("mkdir", |c| c.mkdir(path, true))
    }

    /// Asks the agent to end the VM and waits (bounded) for it to stop; stops it forcibly
    /// when it does not end by itself.
    pub fn shutdown(self) -> Result<(), SandboxError> {
        let res = self.inner.client.shutdown();
        let ended = {
            let vm = self.inner.vm_guard();
            vm.as_ref()
                .map(|vm| vm.wait_exit(SHUTDOWN_GRACE).is_some())
                .unwrap_or(true)
        };
        // Drop stops the VM whatever happened.
        match res {
            Ok(()) if ended => Ok(()),
            Ok(()) => Err(SandboxError::Timeout {
                vm: self.inner.name.clone(),
                op: "shutdown",
                after: SHUTDOWN_GRACE,
            }),
            // The guest may end before its `Ok` reaches us: that is a successful shutdown.
            Err(_) if ended => Ok(()),
            Err(e) => Err(self.inner.error("shutdown", e)),
        }
    }
}

/// Egress hooks (crate::egress).
impl Sandbox {
    /// The VM's vsock host endpoint (a clone; `None` once the VM is gone).
    pub(crate) fn vsock_host(&self) -> Option<kiln_vmm::virtio::vsock::VsockHost> {
        self.inner
            .vm_guard()
            .as_ref()
            .and_then(|vm| vm.vsock().cloned())
    }

    /// Records the sandbox's egress (once).
    pub(crate) fn set_egress(&self, e: crate::egress::Attached) {
        let _ = self.inner.egress.set(e);
    }

    /// The sandbox's egress, when it has a policy.
    pub(crate) fn egress(&self) -> Option<&crate::egress::Attached> {
        self.inner.egress.get()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.inner.stop_vm();
    }
}

/// The live events of one exec. Also an `Iterator` over `Result<ExecEvent, SandboxError>`.
pub struct ExecStream {
    inner: Arc<Inner>,
    stream: kiln_proto::ExecStream,
    program: String,
    pump: Option<thread::JoinHandle<Result<(), String>>>,
}

impl std::fmt::Debug for ExecStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecStream")
            .field("vm", &self.inner.name)
            .field("program", &self.program)
            .field("stream", &self.stream)
            .finish()
    }
}

impl ExecStream {
    /// The next event; `Ok(None)` after the exit.
    pub fn next_event(&mut self) -> Result<Option<ExecEvent>, SandboxError> {
        let ev = self
            .stream
            .next_event()
            .map_err(|e| self.inner.exec_error("exec", &self.program, e))?;
        Ok(ev.map(|ev| match ev {
            kiln_proto::ExecEvent::Started { pid, .. } => ExecEvent::Started { pid },
            kiln_proto::ExecEvent::Stdout(d) => ExecEvent::Stdout(d),
            kiln_proto::ExecEvent::Stderr(d) => ExecEvent::Stderr(d),
            kiln_proto::ExecEvent::Exit(s) => {
                if let Some(p) = self.pump.take() {
                    // The command ended: its stdin pump finishes (or fails) promptly because
                    // the agent answers further stdin chunks with an error.
                    drop(p);
                }
                ExecEvent::Exit(s)
            }
        }))
    }

    /// Sends `signal` to the command's process group.
    pub fn signal(&mut self, signal: i32) -> Result<(), SandboxError> {
        self.stream
            .signal(signal)
            .map_err(|e| self.inner.exec_error("signal", &self.program, e))
    }

    /// Kills the command's process group (SIGKILL).
    pub fn kill(&mut self) -> Result<(), SandboxError> {
        self.signal(9)
    }

    /// A handle that signals this command from any thread (waits until it started; `None`
    /// when it could not be started — its exit follows). Events read meanwhile stay queued.
    pub fn signaller(&mut self) -> Result<Option<ExecSignaller>, SandboxError> {
        let started = self
            .stream
            .started()
            .map_err(|e| self.inner.exec_error("exec", &self.program, e))?;
        Ok(started.map(|(exec_id, _pid)| ExecSignaller {
            inner: Arc::clone(&self.inner),
            exec_id,
            program: self.program.clone(),
        }))
    }

    /// Reads every remaining event, passing output to `on_stdout` / `on_stderr` as it
    /// arrives, and returns the exit status.
    pub fn forward(
        mut self,
        on_stdout: &mut dyn FnMut(&[u8]) -> io::Result<()>,
        on_stderr: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<ExitStatus, SandboxError> {
        let io_err = |inner: &Inner, source| SandboxError::Io {
            vm: inner.name.clone(),
            op: "exec output",
            source,
        };
        while let Some(ev) = self.next_event()? {
            match ev {
                ExecEvent::Started { .. } => {}
                ExecEvent::Stdout(d) => on_stdout(&d).map_err(|e| io_err(&self.inner, e))?,
                ExecEvent::Stderr(d) => on_stderr(&d).map_err(|e| io_err(&self.inner, e))?,
                ExecEvent::Exit(s) => return Ok(s),
            }
        }
        Err(SandboxError::Protocol {
            vm: self.inner.name.clone(),
            op: "exec",
            message: "the event stream ended without an exit status".into(),
        })
    }
}

/// Signals one running command from any thread (see [`ExecStream::signaller`]).
#[derive(Clone)]
pub struct ExecSignaller {
    inner: Arc<Inner>,
    exec_id: u64,
    program: String,
}

impl std::fmt::Debug for ExecSignaller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecSignaller")
            .field("vm", &self.inner.name)
            .field("exec_id", &self.exec_id)
            .field("program", &self.program)
            .finish()
    }
}

impl ExecSignaller {
    /// Sends `signal` to the command's process group.
    pub fn signal(&self, signal: i32) -> Result<(), SandboxError> {
        self.inner
            .client
            .signal(self.exec_id, signal)
            .map_err(|e| self.inner.exec_error("signal", &self.program, e))
    }
}

impl Iterator for ExecStream {
    type Item = Result<ExecEvent, SandboxError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_event().transpose()
    }
}

/// Copies `reader` into the exec's stdin on a helper thread, then closes it.
fn spawn_stdin_pump(
    mut reader: Box<dyn Read + Send>,
    writer: kiln_proto::StdinWriter,
) -> Result<thread::JoinHandle<Result<(), String>>, SandboxError> {
    thread::Builder::new()
        .name("kiln-stdin".into())
        .spawn(move || {
            let mut buf = vec![0u8; MAX_CHUNK];
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // Still close the command's stdin so it does not wait forever.
                        let _ = writer.close();
                        return Err(format!("reading stdin: {e}"));
                    }
                };
                // The command may have exited without reading everything: stop quietly.
                if writer.send(&buf[..n]).is_err() {
                    return Ok(());
                }
            }
            writer.close().map_err(|e| e.to_string())
        })
        .map_err(|source| SandboxError::Io {
            vm: String::new(),
            op: "spawning the stdin thread",
            source,
        })
}

impl Inner {
    fn vm_guard(&self) -> MutexGuard<'_, Option<Machine>> {
        // The guarded value stays consistent even if a holder panicked.
        self.vm.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn serial_tail(&self, max: usize) -> String {
        self.vm_guard()
            .as_ref()
            .map(|vm| vm.serial_tail(max))
            .unwrap_or_default()
    }

    /// Whether the VM ended; waits up to `grace` for it to do so.
    fn vm_exit(&self, grace: Duration) -> Option<String> {
        let vm = self.vm_guard();
        let vm = vm.as_ref()?;
        if grace.is_zero() {
            return vm.exit_reason().map(|r| r.to_string());
        }
        vm.wait_exit(grace)
    }

    /// The guest died during `op`: `what` was observed; adds the VM's exit reason and tail.
    fn died(&self, op: &'static str, what: String) -> SandboxError {
        map_client_error(
            &self.name,
            op,
            None,
            ClientError::Closed { op, reason: what },
            self,
        )
    }

    /// Maps a client error to a sandbox error.
    fn error(&self, op: &'static str, e: ClientError) -> SandboxError {
        map_client_error(&self.name, op, None, e, self)
    }

    /// Runs one agent request through `f`; a failure is mapped by [`error`](Self::error).
    fn call<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Client) -> Result<T, ClientError>,
    ) -> Result<T, SandboxError> {
        f(&self.client).map_err(|e| self.error(op, e))
    }

    /// Like [`error`](Self::error), but a refused exec names the program.
    fn exec_error(&self, op: &'static str, program: &str, e: ClientError) -> SandboxError {
        map_client_error(&self.name, op, Some(program), e, self)
    }

    fn stop_vm(&self) {
        // Wake every waiter first: the reader thread sees end of stream.
        let _ = self.conn.shutdown(std::net::Shutdown::Both);
        let vm = self.vm_guard().take();
        if let Some(vm) = vm {
            let reason = vm.stop();
            tracing::debug!(vm = %self.name, %reason, "sandbox VM stopped");
        }
    }
}

/// What the error mapping needs to know about the VM (a trait so the mapping is unit-tested
/// without KVM).
trait VmProbe {
    /// The VM's exit reason, waiting up to `grace` for it to end; `None` while it runs.
    fn exit_within(&self, grace: Duration) -> Option<String>;
    /// The end of the serial console.
    fn tail(&self) -> String;
}

impl VmProbe for Inner {
    fn exit_within(&self, grace: Duration) -> Option<String> {
        self.vm_exit(grace)
    }

    fn tail(&self) -> String {
        self.serial_tail(SERIAL_TAIL_BYTES)
    }
}

/// Maps a client error of operation `op` to a sandbox error: agent errors keep their kind (an
/// exec's name the program), a closed or broken connection is the guest's death (with the
/// VM's exit reason and serial tail), a missed deadline is a timeout while the VM runs and a
/// death once it ended.
fn map_client_error(
    name: &str,
    op: &'static str,
    program: Option<&str>,
    e: ClientError,
    probe: &dyn VmProbe,
) -> SandboxError {
    let vm = name.to_owned();
    let died = |what: String| {
        let reason = match probe.exit_within(DEATH_GRACE) {
            Some(exit) => format!("{what} (VM exit: {exit})"),
            None => what,
        };
        SandboxError::GuestDied {
            vm: name.to_owned(),
            op,
            reason,
            serial_tail: probe.tail(),
        }
    };
    match e {
        ClientError::Remote { kind, message, .. } => match program {
            Some(program) => SandboxError::ExecFailed {
                vm,
                op,
                program: program.to_owned(),
                kind,
                message,
            },
            None => SandboxError::Guest {
                vm,
                op,
                kind,
                message,
            },
        },
        ClientError::Closed { reason, .. } => died(reason),
        ClientError::Timeout { after, .. } => match probe.exit_within(Duration::ZERO) {
            Some(_) => died(format!("no response within {after:?}")),
            None => SandboxError::Timeout { vm, op, after },
        },
        ClientError::Proto(ProtoError::Io(err)) => {
            died(format!("connection to the agent failed: {err}"))
        }
        ClientError::Proto(p) => SandboxError::Protocol {
            vm,
            op,
            message: p.to_string(),
        },
        ClientError::Unexpected { got, .. } => SandboxError::Protocol {
            vm,
            op,
            message: format!("unexpected response {got}"),
        },
        ClientError::Usage { message, .. } => SandboxError::InvalidArgument { vm, op, message },
        // The host side did not read the output in time; the VM is fine.
        e @ ClientError::ConsumerTooSlow { .. } => SandboxError::Io {
            vm,
            op,
            source: io::Error::new(io::ErrorKind::TimedOut, e.to_string()),
        },
    }
}

/// Refuses hosts that cannot boot the Linux guest, with the reason.
fn check_host(name: &str) -> Result<(), SandboxError> {
    match host::detect() {
        HostKind::HardwareVirt { .. } => Ok(()),
        HostKind::Pvm => {
            if std::env::var_os(ALLOW_PVM_ENV).is_some_and(|v| !v.is_empty()) {
                Ok(())
            } else {
                Err(SandboxError::UnsupportedHost {
                    vm: name.to_owned(),
                })
            }
        }
        HostKind::NoKvm { reason } => Err(SandboxError::NoKvm {
            vm: name.to_owned(),
            reason,
        }),
    }
}

pub(crate) fn vm_config(cfg: &ResolvedConfig) -> VmConfig {
    let mut v = VmConfig::new(cfg.name.clone(), cfg.kernel.clone());
    // Validated against kiln_vmm::vm::MAX_VCPUS (a u8) in SandboxConfig::validate.
    v.vcpus = u8::try_from(cfg.vcpus).unwrap_or(u8::MAX);
    v.mem_mib = u64::from(cfg.memory_mib);
    v.initramfs = Some(cfg.initramfs.clone());
    v.cmdline_extra = cfg.extra_cmdline.clone();
    v.vsock_cid = Some(GUEST_CID);
    v.disks = cfg.disks.clone();
    v.serial_ring_bytes = SERIAL_RING_BYTES;
    v
}

fn boot(cfg: ResolvedConfig, t0: Instant) -> Result<Sandbox, SandboxError> {
    let name = cfg.name.clone();
    let exec_defaults = cfg.exec_defaults.clone();
    // The VM is named after the sandbox: keep only what failed.
    let vm = Vm::start(vm_config(&cfg)).map_err(|e| SandboxError::Vm {
        vm: name.clone(),
        op: "starting the VM",
        source: Box::new(e.into_kind()),
        serial_tail: String::new(),
    })?;
    let vm_start = t0.elapsed();
    // The guest needs far longer than this to boot its kernel, and the agent retries its
    // connection with backoff anyway.
    let listener = match vm.vsock() {
        Some(vsock) => vsock.listen(kiln_proto::AGENT_PORT),
        None => {
            vm.stop();
            return Err(SandboxError::Protocol {
                vm: name,
                op: "boot",
                message: "the VM has no vsock device".into(),
            });
        }
    };
    let listener = match listener {
        Ok(l) => l,
        Err(source) => {
            vm.stop();
            return Err(SandboxError::Vsock {
                vm: name,
                op: "listening for the agent",
                source,
            });
        }
    };
    let sandbox = connect_agent(vm, listener, name, t0, vm_start, Deadlines::of(&cfg))?;
    sandbox.set_exec_defaults(exec_defaults);
    crate::egress::attach(&sandbox, cfg.egress.as_ref())?;
    let ready = sandbox.inner.timings.ready;
    let agent = &sandbox.inner.hello.agent_version;
    tracing::debug!(vm = %sandbox.inner.name, ?vm_start, ?ready, %agent, "sandbox ready");
    Ok(sandbox)
}

/// The deadlines a sandbox's connection to its agent runs under.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadlines {
    pub(crate) boot: Duration,
    pub(crate) request: Duration,
    pub(crate) consumer: Duration,
}

impl Deadlines {
    pub(crate) fn of(cfg: &ResolvedConfig) -> Self {
        Self {
            boot: cfg.boot_timeout,
            request: cfg.request_timeout,
            consumer: cfg.consumer_deadline,
        }
    }
}

/// Waits (within `deadlines.boot`) for the guest agent to connect to `listener`, checks its
/// `Hello` and wraps `vm` and the client in a [`Sandbox`] with its watchdog thread. `t0` is
/// when creating the sandbox began, `vm_start` how long after it the VM was running. On
/// error the VM is stopped.
fn connect_agent(
    vm: Vm,
    listener: VsockListener,
    name: String,
    t0: Instant,
    vm_start: Duration,
    deadlines: Deadlines,
) -> Result<Sandbox, SandboxError> {
    let boot_timeout = deadlines.boot;
    let deadline = Instant::now() + boot_timeout;
    // On error `vm` is dropped, which stops it.
    let stream = accept_agent(&vm, &listener, &name, deadline, boot_timeout)?;
    drop(listener);
    finish_agent(
        Machine::Local(vm),
        stream,
        deadline,
        name,
        t0,
        vm_start,
        deadlines,
    )
}

/// Handshakes with the agent on `stream` (within `deadline`) and wraps `vm` and the client in
/// a [`Sandbox`] with its watchdog thread. On error the VM is stopped.
fn finish_agent<S: AgentStream>(
    vm: Machine,
    stream: S,
    deadline: Instant,
    name: String,
    t0: Instant,
    vm_start: Duration,
    deadlines: Deadlines,
) -> Result<Sandbox, SandboxError> {
    let Deadlines {
        request: request_timeout,
        consumer: consumer_deadline,
        ..
    } = deadlines;
    let (hello, reader, writer, conn) = match handshake(stream, deadline) {
        Ok(parts) => parts,
        Err(source) => {
            let serial_tail = vm.serial_tail(SERIAL_TAIL_BYTES);
            vm.stop();
            return Err(SandboxError::Handshake {
                vm: name,
                source,
                serial_tail,
            });
        }
    };
    let conn = conn.into();
    let client = Client::from_hello(
        hello.clone(),
        reader,
        writer,
        ClientConfig {
            request_timeout,
            consumer_deadline,
            ..ClientConfig::default()
        },
    );
    let client = match client {
        Ok(c) => c,
        Err(e) => {
            let serial_tail = vm.serial_tail(SERIAL_TAIL_BYTES);
            vm.stop();
            return Err(SandboxError::Handshake {
                vm: name,
                source: HandshakeError::Client(e),
                serial_tail,
            });
        }
    };
    let ready = t0.elapsed();
    let (stop_tx, stop_rx) = mpsc::channel();
    let inner = Arc::new(Inner {
        name,
        vm: Mutex::new(Some(vm)),
        client,
        conn,
        hello,
        timings: BootTimings { vm_start, ready },
        exec_defaults: std::sync::OnceLock::new(),
        egress: std::sync::OnceLock::new(),
        _watchdog_stop: stop_tx,
    });
    let weak = Arc::downgrade(&inner);
    thread::Builder::new()
        .name(format!("{}-watchdog", inner.name))
        .spawn(move || watchdog(weak, stop_rx))
        .map_err(|source| SandboxError::Io {
            vm: inner.name.clone(),
            op: "spawning the watchdog thread",
            source,
        })?;
    Ok(Sandbox { inner })
}

/// Closes the agent connection once the VM has ended (a dead guest never answers, and a
/// request without a deadline would wait forever). Ends when the sandbox is dropped.
fn watchdog(inner: Weak<Inner>, stop: mpsc::Receiver<()>) {
    loop {
        match stop.recv_timeout(WATCHDOG_POLL) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let ended = inner
            .vm_guard()
            .as_ref()
            .is_none_or(|vm| vm.exit_reason().is_some());
        if ended {
            tracing::debug!(vm = %inner.name, "VM ended: closing the agent connection");
            let _ = inner.conn.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
}

/// Waits for the agent's connection, noticing an early VM exit.
fn accept_agent(
    vm: &Vm,
    listener: &VsockListener,
    name: &str,
    deadline: Instant,
    boot_timeout: Duration,
) -> Result<VsockStream, SandboxError> {
    loop {
        let now = Instant::now();
        if now >= deadline {
            let serial_tail = vm.serial_tail(SERIAL_TAIL_BYTES);
            return Err(SandboxError::BootTimeout {
                vm: name.to_owned(),
                after: boot_timeout,
                serial_tail,
            });
        }
        match listener.accept(BOOT_POLL.min(deadline - now)) {
            Ok(s) => return Ok(s),
            Err(kiln_vmm::virtio::vsock::VsockError::AcceptTimeout { .. }) => {}
            Err(e) => {
                let serial_tail = vm.serial_tail(SERIAL_TAIL_BYTES);
                return Err(SandboxError::GuestDied {
                    vm: name.to_owned(),
                    op: "boot",
                    reason: e.to_string(),
                    serial_tail,
                });
            }
        }
        if let Some(exit) = vm.exit_reason() {
            let serial_tail = vm.serial_tail(SERIAL_TAIL_BYTES);
            return Err(SandboxError::GuestDied {
                vm: name.to_owned(),
                op: "boot",
                reason: format!("the VM ended before the agent connected ({exit})"),
                serial_tail,
            });
        }
    }
}

/// Why the handshake with the guest agent failed ([`SandboxError::Handshake`]'s source).
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The agent's first message was not a `Hello`.
    #[error("expected Hello, got {what} {name}")]
    NotHello {
        /// "request" or "response".
        what: &'static str,
        /// The message's name.
        name: &'static str,
    },
    /// The `Hello` could not be read (timeout, broken connection, bad frame).
    #[error("reading the agent's Hello: {0}")]
    Read(#[source] ProtoError),
    /// A field of the `Hello` exceeds the protocol's bounds.
    #[error("the agent's Hello is out of bounds: {0}")]
    Bounds(#[source] kiln_proto::LimitError),
    /// The agent speaks another protocol version.
    #[error("the agent speaks protocol version {agent}, this host speaks {PROTOCOL_VERSION}")]
    Version {
        /// The agent's version.
        agent: u32,
    },
    /// Setting up the connection's handles failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The protocol client refused the connection.
    #[error(transparent)]
    Client(ClientError),
}

/// Reads the agent's `Hello` (within the boot deadline) and checks its version; returns the
/// handshake, the reader/writer halves for the client and a third handle for the watchdog.
fn handshake<S: AgentStream>(
    stream: S,
    deadline: Instant,
) -> Result<(Hello, S, S, S), HandshakeError> {
    let io_err = |what| move |source| HandshakeError::Io { what, source };
    let mut reader = stream;
    let remaining = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    reader
        .set_read_deadline(Some(remaining))
        .map_err(io_err("setting the read timeout"))?;
    let hello = match kiln_proto::read_frame(&mut reader) {
        Ok(kiln_proto::Message::Hello(h)) => h,
        Ok(kiln_proto::Message::Request { body, .. }) => {
            return Err(HandshakeError::NotHello {
                what: "request",
                name: body.name(),
            })
        }
        Ok(kiln_proto::Message::Response { body, .. }) => {
            return Err(HandshakeError::NotHello {
                what: "response",
                name: body.name(),
            })
        }
        Err(e) => return Err(HandshakeError::Read(e)),
    };
    hello.validate().map_err(HandshakeError::Bounds)?;
    if hello.version != PROTOCOL_VERSION {
        return Err(HandshakeError::Version {
            agent: hello.version,
        });
    }
    reader
        .set_read_deadline(None)
        .map_err(io_err("clearing the read timeout"))?;
    let mut writer = reader
        .clone_handle()
        .map_err(io_err("cloning the connection"))?;
    writer
        .set_write_deadline(Some(WRITE_TIMEOUT))
        .map_err(io_err("setting the write timeout"))?;
    let conn = reader
        .clone_handle()
        .map_err(io_err("cloning the connection"))?;
    Ok((hello, reader, writer, conn))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::ErrorKind;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn sandbox_and_streams_cross_threads() {
        assert_send_sync::<Sandbox>();
        fn assert_send<T: Send>() {}
        assert_send::<ExecStream>();
    }

    /// A VM that is running (`exit = None`) or ended, with a console.
    struct FakeVm {
        exit: Option<&'static str>,
        tail: &'static str,
    }

    impl VmProbe for FakeVm {
        fn exit_within(&self, _grace: Duration) -> Option<String> {
            self.exit.map(str::to_owned)
        }
        fn tail(&self) -> String {
            self.tail.to_owned()
        }
    }

    const RUNNING: FakeVm = FakeVm {
        exit: None,
        tail: "booted\n",
    };
    const DEAD: FakeVm = FakeVm {
        exit: Some("triple fault on vCPU 0"),
        tail: "Kernel panic - not syncing\n",
    };

    fn remote() -> ClientError {
        ClientError::Remote {
            op: "x",
            kind: ErrorKind::NotFound,
            message: "/nope: No such file or directory".into(),
        }
    }

    #[test]
    fn agent_errors_keep_their_kind_and_name_the_program() {
        let e = map_client_error("vm1", "read_file", None, remote(), &RUNNING);
        assert!(
            matches!(
                e,
                SandboxError::Guest {
                    kind: ErrorKind::NotFound,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string().starts_with("sandbox vm1: read_file failed"),
            "{e}"
        );
        let e = map_client_error("vm1", "exec", Some("ls"), remote(), &RUNNING);
        assert!(
            matches!(&e, SandboxError::ExecFailed { program, .. } if program == "ls"),
            "{e}"
        );
    }

    #[test]
    fn a_closed_connection_is_a_death_with_exit_reason_and_serial_tail() {
        let closed = ClientError::Closed {
            op: "exec",
            reason: "agent closed the connection".into(),
        };
        let e = map_client_error("vm1", "exec", Some("sleep"), closed, &DEAD);
        assert!(e.is_guest_death(), "{e}");
        let s = e.to_string();
        assert!(s.contains("the guest died during exec"), "{s}");
        assert!(s.contains("VM exit: triple fault on vCPU 0"), "{s}");
        assert!(s.contains("Kernel panic - not syncing"), "{s}");
        let io = ClientError::Proto(ProtoError::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        )));
        assert!(map_client_error("vm1", "ping", None, io, &DEAD).is_guest_death());
    }

    #[test]
    fn a_timeout_is_a_timeout_while_the_vm_runs_and_a_death_after() {
        let t = || ClientError::Timeout {
            op: "ping",
            after: Duration::from_secs(3),
        };
        let e = map_client_error("vm1", "ping", None, t(), &RUNNING);
        assert!(matches!(e, SandboxError::Timeout { op: "ping", .. }), "{e}");
        let e = map_client_error("vm1", "ping", None, t(), &DEAD);
        assert!(e.is_guest_death(), "{e}");
    }

    #[test]
    fn protocol_and_usage_errors() {
        let e = map_client_error(
            "vm1",
            "stat",
            None,
            ClientError::Unexpected {
                op: "stat",
                got: "Pong",
            },
            &RUNNING,
        );
        assert!(matches!(e, SandboxError::Protocol { .. }), "{e}");
        assert!(e.to_string().contains("Pong"), "{e}");
        let e = map_client_error(
            "vm1",
            "exec",
            None,
            ClientError::Usage {
                op: "exec",
                message: "bad".into(),
            },
            &RUNNING,
        );
        assert!(matches!(e, SandboxError::InvalidArgument { .. }), "{e}");
    }

    #[test]
    fn a_too_slow_consumer_is_a_host_error_not_a_death() {
        let slow = ClientError::ConsumerTooSlow {
            op: "exec",
            id: 7,
            after: Duration::from_secs(30),
        };
        let e = map_client_error("vm1", "exec", Some("yes"), slow, &DEAD);
        assert!(!e.is_guest_death(), "{e}");
        assert!(
            matches!(&e, SandboxError::Io { source, .. } if source.kind() == io::ErrorKind::TimedOut),
            "{e}"
        );
        assert!(e.to_string().contains("request 7"), "{e}");
    }
}
