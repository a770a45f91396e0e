//! The parent side: [`JailedVm::spawn`] finds the `kiln-vm` binary, spawns it with one end of
//! a socketpair on its fd 3 (fork + exec by `std::process::Command`; the pre-exec hook only
//! `dup2`s), puts it into its cgroup, sends the `Start` frame and waits for `Running`. A
//! reader thread then mirrors the child's serial console, queues the guest connections it
//! hands over and records how the VM ended; a child that dies without saying so is a dead VM
//! ([`End::Died`], [`JailError::Died`] with the serial tail). Every wait has a deadline.
//! Dropping a [`JailedVm`] asks the child to stop, kills it if it does not end within
//! [`STOP_GRACE`] (the VMM process dies with it: `PR_SET_PDEATHSIG`), reaps it and removes
//! its cgroup and root directory.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln_vmm::serial::SerialRing;

use crate::cgroup::{self, CgroupError};
use crate::child::CHILD_FD;
use crate::config::JailConfig;
use crate::proto::{self, FrameError, StartSpec, ToChild, ToParent, VmSpec};

/// Environment variable naming the `kiln-vm` binary.
pub const BIN_ENV: &str = "KILN_VM_BIN";
/// The binary's file name.
pub const BIN_NAME: &str = "kiln-vm";
/// How long a dropped or stopped jailed VM may take to end before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(3);
/// Guest connections queued per bridged port before further ones are closed.
const MAX_PENDING_CONNS: usize = 64;
/// Serial console mirrored in the parent.
const SERIAL_MIRROR_BYTES: usize = 256 * 1024;
/// How long the reader waits for the child's exit status after its socket closed.
const REAP_GRACE: Duration = Duration::from_millis(500);

/// What went wrong with a jailed VM.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// The `kiln-vm` binary was not found.
    #[error("the jailed VMM binary `{BIN_NAME}` was not found (looked at: {searched}); build it (`cargo build -p kiln-jail`) or set ${BIN_ENV}")]
    BinaryNotFound {
        /// Where we looked.
        searched: String,
    },
    /// The jail configuration is invalid.
    #[error("invalid jail configuration: {0}")]
    Config(String),
    /// Spawning the binary failed.
    #[error("spawning {bin}: {source}")]
    Spawn {
        /// The binary.
        bin: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A host-side step failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The cgroup was required and could not be set up.
    #[error("the jail's cgroup: {0}")]
    Cgroup(#[source] CgroupError),
    /// The socketpair failed.
    #[error("talking to the jailed VMM: {0}")]
    Frame(#[source] FrameError),
    /// The child reported that setting up the jail or starting the VM failed.
    #[error("jailed VMM for {vm}: {stage} failed: {message}")]
    Setup {
        /// The VM.
        vm: String,
        /// The step.
        stage: String,
        /// Why.
        message: String,
    },
    /// The VMM process died (killed, crashed) instead of reporting the VM's end.
    #[error(
        "the jailed VMM process of {vm} died: {status}{}",
        tail_note(serial_tail)
    )]
    Died {
        /// The VM.
        vm: String,
        /// How it ended (signal or exit status).
        status: String,
        /// The end of the serial console.
        serial_tail: String,
    },
    /// The VM ended (guest shutdown, stop).
    #[error("the VM {vm} ended: {reason}")]
    Ended {
        /// The VM.
        vm: String,
        /// kiln-vmm's exit reason.
        reason: String,
    },
    /// A wait ran out.
    #[error("{what} did not happen within {after:?}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// The deadline.
        after: Duration,
    },
}

fn tail_note(tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("; serial console tail:\n{tail}")
    }
}

/// How a jailed VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The VM ended and the child said why (kiln-vmm's exit reason).
    Exited(String),
    /// Set-up failed (stage: message).
    SetupFailed {
        /// The step.
        stage: String,
        /// Why.
        message: String,
    },
    /// The VMM process died without saying so (how).
    Died(String),
}

#[derive(Debug)]
struct State {
    ring: SerialRing,
    vmm_pid: Option<u32>,
    end: Option<End>,
    conns: HashMap<u32, VecDeque<UnixStream>>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    cond: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        kiln_sync::lock(&self.state)
    }

    /// Waits for a change of the state, or until `deadline`: `None` once it has passed.
    fn wait_until<'a>(
        &self,
        st: MutexGuard<'a, State>,
        deadline: Instant,
    ) -> Option<MutexGuard<'a, State>> {
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        Some(
            self.cond
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0),
        )
    }
}

/// A VM running in its own jailed `kiln-vm` process.
#[derive(Debug)]
pub struct JailedVm {
    name: String,
    vmm_pid: u32,
    launcher_pid: u32,
    child: Arc<Mutex<Child>>,
    sock: UnixStream,
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
    cgroup: Option<cgroup::Created>,
    cgroup_warning: Option<String>,
    _root: tempfile::TempDir,
}

/// Accepts a jailed VM's bridged guest connections ([`JailedVm::acceptor`]).
#[derive(Debug, Clone)]
pub struct Acceptor {
    name: String,
    shared: Arc<Shared>,
}

impl Acceptor {
    /// The next guest connection to bridged `port` within `timeout`; once the VM ended, its
    /// end as an error ([`JailError::Died`], [`JailError::Ended`], ...).
    pub fn accept(&self, port: u32, timeout: Duration) -> Result<UnixStream, JailError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if let Some(s) = st.conns.get_mut(&port).and_then(VecDeque::pop_front) {
                return Ok(s);
            }
            if let Some(end) = st.end.clone() {
                let tail = st.ring.tail(crate::SERIAL_TAIL_BYTES);
                drop(st);
                return Err(end_error(&self.name, end, tail));
            }
            st = self
                .shared
                .wait_until(st, deadline)
                .ok_or_else(|| JailError::Timeout {
                    what: format!("a guest connection to vsock port {port}"),
                    after: timeout,
                })?;
        }
    }
}

fn end_error(name: &str, end: End, serial_tail: String) -> JailError {
    match end {
        End::Exited(reason) => JailError::Ended {
            vm: name.to_owned(),
            reason,
        },
        End::SetupFailed { stage, message } => JailError::Setup {
            vm: name.to_owned(),
            stage,
            message,
        },
        End::Died(status) => JailError::Died {
            vm: name.to_owned(),
            status,
            serial_tail,
        },
    }
}

/// Finds `kiln-vm`: `$KILN_VM_BIN`, else next to the current executable (or one directory
/// up, for test executables in `target/*/deps`), else on `$PATH`.
pub fn find_binary() -> Result<PathBuf, JailError> {
    let mut searched = Vec::new();
    if let Some(p) = std::env::var_os(BIN_ENV).filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        return Err(JailError::BinaryNotFound {
            searched: format!("${BIN_ENV}={}", p.display()),
        });
    }
    if let Ok(exe) = std::env::current_exe() {
        let mut dir = exe.parent().map(Path::to_path_buf);
        for _ in 0..2 {
            let Some(d) = dir else { break };
            let p = d.join(BIN_NAME);
            if p.is_file() {
                return Ok(p);
            }
            searched.push(p.display().to_string());
            dir = d.parent().map(Path::to_path_buf);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let p = d.join(BIN_NAME);
            if p.is_file() {
                return Ok(p);
            }
        }
        searched.push("$PATH".into());
    }
    Err(JailError::BinaryNotFound {
        searched: searched.join(", "),
    })
}

impl JailedVm {
    /// Spawns the jailed VMM for `vm` and waits (within `timeout`) until the VM runs.
    pub fn spawn(vm: VmSpec, jail: JailConfig, timeout: Duration) -> Result<JailedVm, JailError> {
        jail.validate().map_err(JailError::Config)?;
        let bin = find_binary()?;
        let root = tempfile::Builder::new()
            .prefix("kiln-jail-")
            .tempdir()
            .map_err(|source| JailError::Io {
                what: "creating the jail's root directory",
                source,
            })?;
        let (sock, child_sock) = UnixStream::pair().map_err(|source| JailError::Io {
            what: "creating the socketpair",
            source,
        })?;
        let child_fd = child_sock.as_raw_fd();
        let mut cmd = Command::new(&bin);
        cmd.env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for var in ["RUST_LOG", "RUST_BACKTRACE"] {
            if let Some(v) = std::env::var_os(var) {
                cmd.env(var, v);
            }
        }
        // SAFETY: the hook runs in the forked child before exec and only calls dup2 / fcntl,
        // which are async-signal-safe; it touches no lock or allocation.
        unsafe {
            cmd.pre_exec(move || {
                if child_fd == CHILD_FD {
                    if libc::fcntl(CHILD_FD, libc::F_SETFD, 0) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                } else if libc::dup2(child_fd, CHILD_FD) != CHILD_FD {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|source| JailError::Spawn { bin, source })?;
        drop(child_sock);
        let launcher_pid = child.id();
        let child = Arc::new(Mutex::new(child));
        let kill = |child: &Arc<Mutex<Child>>| {
            let mut c = kiln_sync::lock(child);
            let _ = c.kill();
            let _ = c.wait();
        };
        let wants_limits = jail.cgroup != crate::config::CgroupLimits::default();
        let (cgroup, cgroup_warning) = match cgroup::create(&vm.name, launcher_pid, &jail.cgroup) {
            Ok(c) if !c.warnings.is_empty() && jail.require_cgroup => {
                kill(&child);
                return Err(JailError::Cgroup(CgroupError::Controller {
                    path: c.path.clone(),
                    missing: c.warnings.join("; "),
                }));
            }
            Ok(c) => {
                let w = (!c.warnings.is_empty()).then(|| c.warnings.join("; "));
                (Some(c), w)
            }
            Err(e) if jail.require_cgroup => {
                kill(&child);
                return Err(JailError::Cgroup(e));
            }
            Err(e) => (None, Some(e.to_string())),
        };
        if let Some(w) = &cgroup_warning {
            if wants_limits {
                tracing::warn!(vm = %vm.name, "jail: cgroup v2 limits not applied: {w}");
            } else {
                tracing::debug!(vm = %vm.name, "jail: cgroup: {w}");
            }
        }
        let name = vm.name.clone();
        let ports = vm.bridge_ports.clone();
        let start = ToChild::Start(Box::new(StartSpec {
            vm,
            jail,
            root: root.path().to_owned(),
        }));
        if let Err(e) = proto::send(&sock, &start, None) {
            kill(&child);
            return Err(JailError::Frame(e));
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                ring: SerialRing::new(SERIAL_MIRROR_BYTES),
                vmm_pid: None,
                end: None,
                conns: HashMap::new(),
            }),
            cond: Condvar::new(),
        });
        let reader_sock = match sock.try_clone() {
            Ok(s) => s,
            Err(source) => {
                kill(&child);
                return Err(JailError::Io {
                    what: "cloning the socket",
                    source,
                });
            }
        };
        let reader = {
            let shared = shared.clone();
            let child = child.clone();
            std::thread::Builder::new()
                .name(format!("{name}-jail"))
                .spawn(move || reader_loop(&reader_sock, &shared, &child, &ports))
        };
        let reader = match reader {
            Ok(r) => r,
            Err(source) => {
                kill(&child);
                return Err(JailError::Io {
                    what: "spawning the jail reader thread",
                    source,
                });
            }
        };
        let mut vm = JailedVm {
            name,
            vmm_pid: 0,
            launcher_pid,
            child,
            sock,
            shared,
            reader: Some(reader),
            cgroup,
            cgroup_warning,
            _root: root,
        };
        let deadline = Instant::now() + timeout;
        let mut st = vm.shared.lock();
        loop {
            if let Some(pid) = st.vmm_pid {
                drop(st);
                vm.vmm_pid = pid;
                return Ok(vm);
            }
            if let Some(end) = st.end.clone() {
                let tail = st.ring.tail(crate::SERIAL_TAIL_BYTES);
                drop(st);
                return Err(vm.end_error(end, tail));
            }
            st = vm
                .shared
                .wait_until(st, deadline)
                .ok_or_else(|| JailError::Timeout {
                    what: "the jailed VMM starting".into(),
                    after: timeout,
                })?;
        }
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The VMM process (in this process's pid namespace): read its `/proc/<pid>/…`.
    pub fn vmm_pid(&self) -> u32 {
        self.vmm_pid
    }

    /// The launcher process (the spawned `kiln-vm`, the VMM's parent outside the new pid
    /// namespace).
    pub fn launcher_pid(&self) -> u32 {
        self.launcher_pid
    }

    /// The VMM's cgroup directory, when one was created.
    pub fn cgroup(&self) -> Option<&Path> {
        self.cgroup.as_ref().map(|c| c.path.as_path())
    }

    /// Every cgroup limit file written for the VMM process, with its value: in the v2 cgroup,
    /// or in a v1 hierarchy for a limit v2 cannot enforce on this host.
    pub fn cgroup_applied(&self) -> &[(PathBuf, String)] {
        self.cgroup.as_ref().map_or(&[], |c| c.applied.as_slice())
    }

    /// The cgroup as `/proc/<pid>/cgroup` names it (`0::<this>`).
    pub fn cgroup_name(&self) -> Option<&str> {
        self.cgroup.as_ref().map(|c| c.rel.as_str())
    }

    /// Why the cgroup (or some of its limits) is missing, if it is.
    pub fn cgroup_warning(&self) -> Option<&str> {
        self.cgroup_warning.as_deref()
    }

    /// The last `max` bytes of the guest's serial console.
    pub fn serial_tail(&self, max: usize) -> String {
        self.shared.lock().ring.tail(max)
    }

    /// How the VM ended, if it did.
    pub fn end(&self) -> Option<End> {
        self.shared.lock().end.clone()
    }

    /// Waits up to `timeout` for the VM to end.
    pub fn wait_end(&self, timeout: Duration) -> Option<End> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if st.end.is_some() {
                return st.end.clone();
            }
            st = self.shared.wait_until(st, deadline)?;
        }
    }

    /// The error for `end` (with the serial tail).
    pub fn end_error(&self, end: End, serial_tail: String) -> JailError {
        end_error(&self.name, end, serial_tail)
    }

    /// Waits until `needle` appears on the serial console; a VM that ends first or the
    /// deadline passing is an error.
    pub fn wait_for_serial(&self, needle: &str, deadline: Instant) -> Result<(), JailError> {
        let started = Instant::now();
        let mut from = 0;
        let mut st = self.shared.lock();
        loop {
            match st.ring.find_from(needle.as_bytes(), from) {
                Ok(_) => return Ok(()),
                Err(next) => from = next,
            }
            if let Some(end) = st.end.clone() {
                let tail = st.ring.tail(crate::SERIAL_TAIL_BYTES);
                drop(st);
                return Err(self.end_error(end, tail));
            }
            st = self
                .shared
                .wait_until(st, deadline)
                .ok_or_else(|| JailError::Timeout {
                    what: format!("{needle:?} on the serial console"),
                    after: started.elapsed(),
                })?;
        }
    }

    /// The next guest connection to bridged `port` (a unix socket carrying its bytes), within
    /// `timeout`.
    pub fn accept(&self, port: u32, timeout: Duration) -> Result<UnixStream, JailError> {
        self.acceptor().accept(port, timeout)
    }

    /// A handle that accepts the guest's bridged connections without borrowing the VM (for
    /// an accept loop on another thread).
    pub fn acceptor(&self) -> Acceptor {
        Acceptor {
            name: self.name.clone(),
            shared: self.shared.clone(),
        }
    }

    /// Stops the VM (asks the child, kills it after [`STOP_GRACE`]) and returns how it ended.
    pub fn stop(mut self) -> End {
        self.shutdown()
    }

    fn shutdown(&mut self) -> End {
        let _ = proto::send(&self.sock, &ToChild::Stop, None);
        let end = self.wait_end(STOP_GRACE);
        {
            let mut c = kiln_sync::lock(&self.child);
            let deadline = Instant::now() + STOP_GRACE;
            loop {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        // The VMM process follows (PR_SET_PDEATHSIG).
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        end.or_else(|| self.end())
            .unwrap_or_else(|| End::Died("killed by the host after the stop grace".into()))
    }
}

impl Drop for JailedVm {
    fn drop(&mut self) {
        if self.reader.is_some() {
            self.shutdown();
        }
    }
}

/// Reads the child's frames until its socket closes.
fn reader_loop(sock: &UnixStream, shared: &Shared, child: &Mutex<Child>, ports: &[u32]) {
    loop {
        match proto::recv::<ToParent>(sock) {
            Ok((msg, fd)) => {
                let mut st = shared.lock();
                match msg {
                    ToParent::Running { vmm_pid } => st.vmm_pid = Some(vmm_pid),
                    ToParent::Serial { data } => st.ring.push(&data),
                    ToParent::Conn { port } => {
                        let q = st.conns.entry(port).or_default();
                        match fd {
                            Some(fd) if ports.contains(&port) && q.len() < MAX_PENDING_CONNS => {
                                q.push_back(UnixStream::from(fd));
                            }
                            _ => tracing::warn!(port, "jail: dropped an unexpected connection"),
                        }
                    }
                    ToParent::Exited { reason } => {
                        st.end.get_or_insert(End::Exited(reason));
                    }
                    ToParent::Failed { stage, message } => {
                        st.end.get_or_insert(End::SetupFailed { stage, message });
                    }
                }
                shared.cond.notify_all();
            }
            Err(e) => {
                let how = match e {
                    FrameError::Closed => None,
                    other => Some(other.to_string()),
                };
                let status = child_status(child);
                let mut st = shared.lock();
                if st.end.is_none() {
                    let mut what = status;
                    if let Some(h) = how {
                        what = format!("{what} (socket: {h})");
                    }
                    st.end = Some(End::Died(what));
                }
                shared.cond.notify_all();
                return;
            }
        }
    }
}

/// How the launcher ended (it exits with the VMM's status, 128 + signal for a signal).
fn child_status(child: &Mutex<Child>) -> String {
    let deadline = Instant::now() + REAP_GRACE;
    loop {
        let st = kiln_sync::lock(child).try_wait();
        match st {
            Ok(Some(s)) => {
                if let Some(sig) = s.signal() {
                    return format!("the VMM launcher was killed by signal {sig}");
                }
                return match s.code() {
                    Some(c) if c > 128 => format!("killed by signal {}", c - 128),
                    Some(c) => format!("exited with status {c}"),
                    None => "ended".into(),
                };
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => return "closed its control socket".into(),
            Err(e) => return format!("unknown status ({e})"),
        }
    }
}
