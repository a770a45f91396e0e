//! The exec engine: spawns commands (own session/process group, clean environment, cwd,
//! stdin from bytes or a stream), pumps stdout/stderr as chunks with an output cap, enforces
//! timeouts by SIGKILLing the whole group, and keeps the agent-wide table of running execs
//! used by `Signal`, `Wait` and `StdinData`. In the guest each exec runs in its own cgroup
//! (crate::cgroup: limits, OOM and pids-limit reporting); any exec may run as another user
//! (crate::user), switched to in the child before `execve`.
//!
//! Spawning is a hand-written fork + execve (not `std::process::Command`) because the
//! [`Reaper`] owns every `waitpid`: std would wait for a child whose exec failed itself.
//! A command that cannot be started (not found, not executable) ends, for a foreground exec,
//! with a `Stderr` message and `Exit { code: 127 }` (126 when found but not executable); a
//! background exec answers `Error { ExecFailed }` instead.

use std::collections::{HashMap, VecDeque};
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use kiln_proto::{
    ErrorKind, ExecRequest, ExitStatus, Response, Stdin, BACKGROUND_BUFFER, MAX_CHUNK,
    MAX_STDIN_QUEUE,
};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::{pipe2, Pid};

use crate::cgroup::{CgroupError, ExecCgroup};
use crate::reaper::{ChildStatus, Reaper};
use crate::user::{ExecUser, UserError};
use crate::writer::ConnWriter;

/// PATH of the clean default environment.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long output is still drained after the leader exited while something else keeps the
/// pipes open (e.g. a daemonised grandchild); reset by every read.
const DRAIN_GRACE: Duration = Duration::from_millis(200);
/// Poll tick: how often the pump checks for the leader's exit and a dead connection.
const TICK: Duration = Duration::from_millis(100);
/// How long to wait for the kernel to deliver the exit of a SIGKILLed leader.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// Read size for the output pipes: one full protocol chunk.
const READ_BUF: usize = MAX_CHUNK;
/// Requested capacity of the output pipes (the kernel default is 64 KiB; unprivileged
/// processes may go up to /proc/sys/fs/pipe-max-size, 1 MiB by default). Fewer, larger reads.
const PIPE_SIZE: libc::c_int = 1024 * 1024;

/// Errors of starting an exec.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("exec: empty argv")]
    EmptyArgv,
    #[error("exec: {what} contains a NUL byte")]
    Nul { what: &'static str },
    #[error("exec: invalid environment variable name {key:?}")]
    BadEnvKey { key: String },
    #[error("exec: working directory {path}: {source}")]
    Cwd {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("exec: working directory {path} is not a directory")]
    CwdNotDir { path: String },
    #[error("exec: creating pipes: {0}")]
    Pipe(#[source] nix::Error),
    #[error("exec: fork: {0}")]
    Fork(#[source] nix::Error),
    #[error("kiln-agent: {argv0}: command not found")]
    NotFound { argv0: String },
    #[error("kiln-agent: {path}: {source}")]
    Exec {
        path: String,
        code: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("exec {exec_id}: not found (unknown id or already reaped)")]
    UnknownExec { exec_id: u64 },
    #[error("exec {exec_id}: {message}")]
    BadState { exec_id: u64, message: String },
    #[error("exec {exec_id}: signal {signal}: {source}")]
    Signal {
        exec_id: u64,
        signal: i32,
        #[source]
        source: nix::Error,
    },
    #[error("exec {exec_id}: stdin queue full ({max} chunks); wait for the Ok of earlier chunks")]
    StdinFull { exec_id: u64, max: usize },
    #[error("exec: spawning a thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error(transparent)]
    User(#[from] UserError),
    #[error("exec: switching to user {user:?} (uid {uid}, gid {gid}): {source}")]
    SwitchUser {
        user: String,
        uid: u32,
        gid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("exec: {0}")]
    Cgroup(#[from] CgroupError),
    #[error("exec: moving the command into its cgroup: {0}")]
    CgroupAttach(#[source] std::io::Error),
}

impl ExecError {
    /// The protocol error kind for this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::EmptyArgv | Self::Nul { .. } | Self::BadEnvKey { .. } => {
                ErrorKind::InvalidRequest
            }
            Self::Cwd { source, .. } => ErrorKind::from_io(source),
            Self::CwdNotDir { .. } => ErrorKind::NotADirectory,
            Self::NotFound { .. } | Self::Exec { .. } => ErrorKind::ExecFailed,
            Self::UnknownExec { .. } => ErrorKind::NotFound,
            Self::BadState { .. } => ErrorKind::InvalidRequest,
            Self::StdinFull { .. } => ErrorKind::TooLarge,
            Self::User(UserError::Unknown { .. }) => ErrorKind::NotFound,
            Self::User(UserError::Invalid { .. }) => ErrorKind::InvalidRequest,
            Self::User(UserError::Read { source, .. }) => ErrorKind::from_io(source),
            Self::SwitchUser { .. } => ErrorKind::PermissionDenied,
            Self::Signal { .. }
            | Self::Pipe(_)
            | Self::Fork(_)
            | Self::Thread(_)
            | Self::Cgroup(_)
            | Self::CgroupAttach(_) => ErrorKind::Io,
        }
    }

    /// As an `Error` response.
    pub fn response(&self) -> Response {
        Response::error(self.kind(), self.to_string())
    }
}

enum StdinMsg {
    Data(Vec<u8>, u64),
    Eof(u64),
}

struct StdinHandle {
    tx: SyncSender<StdinMsg>,
    queued: Arc<AtomicUsize>,
    conn: Arc<ConnWriter>,
}

struct ExecEntry {
    pgid: Pid,
    finished: bool,
    background: Option<Arc<BgState>>,
    stdin: Option<StdinHandle>,
}

/// Agent-wide table of execs.
#[derive(Default)]
pub struct ExecTable {
    entries: Mutex<HashMap<u64, ExecEntry>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for ExecTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecTable").finish_non_exhaustive()
    }
}

// Critical sections are short map/queue operations that leave the data consistent.
use kiln_sync::lock;

/// Output of a background exec, buffered until a `Wait` attaches.
#[derive(Default)]
struct BgState {
    inner: Mutex<BgInner>,
}

#[derive(Default)]
struct BgInner {
    events: VecDeque<Response>,
    buffered: u64,
    dropped: bool,
    waiter: Option<(Arc<ConnWriter>, u64)>,
    exit: Option<ExitStatus>,
}

/// Where an exec's events go.
enum Sink {
    Conn { conn: Arc<ConnWriter>, id: u64 },
    Background { state: Arc<BgState> },
}

impl Sink {
    fn send(&self, r: Response) {
        match self {
            Self::Conn { conn, id } => {
                conn.send(*id, r);
            }
            Self::Background { state } => {
                let mut st = lock(&state.inner);
                if let Some((conn, id)) = &st.waiter {
                    if conn.send(*id, r) {
                        return;
                    }
                    st.waiter = None;
                    return;
                }
                let len = match &r {
                    Response::Stdout(d) | Response::Stderr(d) => d.len() as u64,
                    _ => 0,
                };
                if st.buffered + len > BACKGROUND_BUFFER {
                    st.dropped = true;
                } else {
                    st.buffered += len;
                    st.events.push_back(r);
                }
            }
        }
    }

    /// A foreground exec whose connection died is killed.
    fn is_dead(&self) -> bool {
        match self {
            Self::Conn { conn, .. } => !conn.is_alive(),
            Self::Background { .. } => false,
        }
    }
}

/// Everything prepared before `fork`, so that the child only makes async-signal-safe calls.
struct Prepared {
    path: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    cwd: Option<CString>,
    /// The user to switch to, with the request's spelling of it (for errors).
    user: Option<(String, ExecUser)>,
}

/// Guest-mode settings the child applies before `execve`: its cgroup, and undoing the
/// agent's own OOM protection and priority.
struct ChildSetup<'a> {
    cgroup_procs: Option<&'a std::ffi::CStr>,
    reset_agent_protection: bool,
}

fn cstring(what: &'static str, s: impl Into<Vec<u8>>) -> Result<CString, ExecError> {
    CString::new(s).map_err(|_| ExecError::Nul { what })
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn prepare(req: &ExecRequest) -> Result<Prepared, ExecError> {
    let argv0 = req.argv.first().ok_or(ExecError::EmptyArgv)?;
    let user = match &req.user {
        Some(u) => Some((u.clone(), crate::user::resolve(u)?)),
        None => None,
    };
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        ("HOME".into(), "/root".into()),
        ("TERM".into(), "xterm".into()),
        ("LANG".into(), "C.UTF-8".into()),
    ];
    if let Some((_, u)) = &user {
        // The user's login variables; the request's env below still overrides them.
        env[1].1 = u.home.clone();
        if let Some(name) = &u.name {
            env.push(("USER".into(), name.clone()));
            env.push(("LOGNAME".into(), name.clone()));
        }
    }
    for (k, v) in &req.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(ExecError::BadEnvKey { key: k.clone() });
        }
        match env.iter_mut().find(|(ek, _)| ek == k) {
            Some(slot) => slot.1 = v.clone(),
            None => env.push((k.clone(), v.clone())),
        }
    }
    let cwd = match &req.cwd {
        Some(c) => {
            let md = std::fs::metadata(c).map_err(|source| ExecError::Cwd {
                path: c.clone(),
                source,
            })?;
            if !md.is_dir() {
                return Err(ExecError::CwdNotDir { path: c.clone() });
            }
            Some(PathBuf::from(c))
        }
        None => None,
    };
    let path = if argv0.contains('/') {
        PathBuf::from(argv0)
    } else {
        let search = env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_str())
            .unwrap_or(DEFAULT_PATH);
        let base = cwd
            .clone()
            .or_else(|| std::env::current_dir().ok())
            .unwrap_or_else(|| PathBuf::from("/"));
        search
            .split(':')
            .map(|d| if d.is_empty() { "." } else { d })
            .map(|d| base.join(d).join(argv0))
            .find(|p| is_executable(p))
            .ok_or_else(|| ExecError::NotFound {
                argv0: argv0.clone(),
            })?
    };
    Ok(Prepared {
        path: cstring("program path", path.as_os_str().as_bytes())?,
        argv: req
            .argv
            .iter()
            .map(|a| cstring("argv", a.as_bytes()))
            .collect::<Result<_, _>>()?,
        envp: env
            .iter()
            .map(|(k, v)| cstring("env", format!("{k}={v}")))
            .collect::<Result<_, _>>()?,
        cwd: cwd
            .map(|c| cstring("cwd", c.as_os_str().as_bytes()))
            .transpose()?,
        user,
    })
}

/// Pipes of a running child, parent ends.
struct ChildPipes {
    stdin: Option<OwnedFd>,
    stdout: OwnedFd,
    stderr: OwnedFd,
}

/// Fork and exec. Returns the pid (also the process group id) and the parent's pipe ends.
fn fork_exec(
    p: &Prepared,
    setup: &ChildSetup<'_>,
    want_stdin: bool,
    reaper: &Reaper,
) -> Result<(Pid, Receiver<ChildStatus>, ChildPipes), ExecError> {
    use nix::fcntl::OFlag;
    let (in_r, in_w) = if want_stdin {
        let (r, w) = pipe2(OFlag::O_CLOEXEC).map_err(ExecError::Pipe)?;
        (Some(r), Some(w))
    } else {
        (None, None)
    };
    let devnull = if want_stdin {
        None
    } else {
        Some(
            std::fs::File::open("/dev/null")
                .map(OwnedFd::from)
                .map_err(|e| {
                    ExecError::Pipe(nix::Error::from_raw(e.raw_os_error().unwrap_or(5)))
                })?,
        )
    };
    let (out_r, out_w) = pipe2(OFlag::O_CLOEXEC).map_err(ExecError::Pipe)?;
    let (err_r, err_w) = pipe2(OFlag::O_CLOEXEC).map_err(ExecError::Pipe)?;
    for fd in [&out_r, &err_r] {
        // SAFETY: F_SETPIPE_SZ on a pipe we own; failure only leaves the default size.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
    }
    let (st_r, st_w) = pipe2(OFlag::O_CLOEXEC).map_err(ExecError::Pipe)?;

    let child_in = in_r
        .as_ref()
        .or(devnull.as_ref())
        .map(|f| f.as_raw_fd())
        .unwrap_or(-1);
    let child_out = out_w.as_raw_fd();
    let child_err = err_w.as_raw_fd();
    let status_fd = st_w.as_raw_fd();

    let mut argv_ptrs: Vec<*const libc::c_char> = p.argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = p.envp.iter().map(|a| a.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());
    let cwd_ptr = p.cwd.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    let path_ptr = p.path.as_ptr();
    let ids = p.user.as_ref().map(|(_, u)| ChildIds {
        uid: u.uid,
        gid: u.gid,
        groups: u.groups.iter().map(|&g| g as libc::gid_t).collect(),
    });
    let creds = ChildCreds {
        ids: ids.as_ref(),
        cgroup_procs: setup.cgroup_procs.map_or(std::ptr::null(), |c| c.as_ptr()),
        reset_agent_protection: setup.reset_agent_protection,
    };

    let (pid, status_rx) = reaper.spawn_registered(|| {
        // SAFETY: fork in a multi-threaded process: the child only calls async-signal-safe
        // functions (setsid, dup2, sigaction, sigprocmask, open, write, close,
        // setpriority, raw setgroups/setresgid/setresuid, chdir, execve, _exit) on
        // data prepared before the fork, and never returns into Rust code.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(ExecError::Fork(nix::Error::last()));
        }
        if pid == 0 {
            // SAFETY: see above; this is the child and it ends in execve or _exit.
            unsafe {
                child_after_fork(
                    child_in, child_out, child_err, status_fd, &creds, cwd_ptr, path_ptr,
                    &argv_ptrs, &envp_ptrs,
                )
            }
        }
        Ok(Pid::from_raw(pid))
    })?;
    // Parent: close the child's ends, then learn whether execve succeeded.
    drop((in_r, devnull, out_w, err_w, st_w));
    let mut report = [0u8; 5];
    let mut got = 0;
    let mut st_file = std::fs::File::from(st_r);
    while got < report.len() {
        match st_file.read(&mut report[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if got == report.len() {
        let errno = i32::from_ne_bytes([report[1], report[2], report[3], report[4]]);
        let source = std::io::Error::from_raw_os_error(errno);
        if report[0] == 3 {
            return Err(ExecError::CgroupAttach(source));
        }
        if report[0] == 4 {
            let (user, u) = p.user.clone().unwrap_or_default();
            return Err(ExecError::SwitchUser {
                user,
                uid: u.uid,
                gid: u.gid,
                source,
            });
        }
        let (path, code) = if report[0] == 1 {
            (
                p.cwd
                    .as_ref()
                    .map(|c| c.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                126,
            )
        } else {
            let code = if errno == libc::ENOENT { 127 } else { 126 };
            (p.path.to_string_lossy().into_owned(), code)
        };
        return Err(ExecError::Exec { path, code, source });
    }
    Ok((
        pid,
        status_rx,
        ChildPipes {
            stdin: in_w,
            stdout: out_r,
            stderr: err_r,
        },
    ))
}

/// The ids the child switches to.
struct ChildIds {
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
}

/// What the child does before `chdir` + `execve`, prepared before the fork.
struct ChildCreds<'a> {
    ids: Option<&'a ChildIds>,
    /// NUL-terminated `cgroup.procs` path, or null.
    cgroup_procs: *const libc::c_char,
    reset_agent_protection: bool,
}

/// The child side of [`fork_exec`].
///
/// # Safety
/// Must only be called in the child right after `fork`; all pointers must be valid
/// NUL-terminated strings / NULL-terminated arrays owned by the parent's (copied) memory.
#[allow(clippy::too_many_arguments)]
unsafe fn child_after_fork(
    stdin_fd: i32,
    stdout_fd: i32,
    stderr_fd: i32,
    status_fd: i32,
    creds: &ChildCreds<'_>,
    cwd: *const libc::c_char,
    path: *const libc::c_char,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
) -> ! {
    unsafe fn fail(status_fd: i32, stage: u8, errno: i32) -> ! {
        let e = errno.to_ne_bytes();
        let buf = [stage, e[0], e[1], e[2], e[3]];
        // SAFETY: writing a stack buffer to an fd, then exiting without running any Rust code.
        unsafe {
            libc::write(status_fd, buf.as_ptr().cast(), buf.len());
            libc::_exit(127)
        }
    }
    // SAFETY: async-signal-safe libc calls on valid fds and pointers (caller's contract).
    unsafe {
        libc::setsid();
        // Signal dispositions: every signal back to its default. Ignored signals survive
        // execve, and the agent may have inherited some (the Rust runtime ignores SIGPIPE; a
        // host-mode agent started from a background shell job ignores SIGINT and SIGQUIT) —
        // a user's command must not. The raw syscall also reaches the signals libc reserves
        // for itself (32, 33), which its sigaction() refuses; the kernel's struct with every
        // field zero is SIG_DFL, no flags, empty mask. SIGKILL/SIGSTOP just fail.
        let dfl = [0u64; 4];
        for sig in 1..=64 {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                dfl.as_ptr(),
                std::ptr::null_mut::<u64>(),
                8usize,
            );
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        if stdin_fd >= 0 {
            libc::dup2(stdin_fd, 0);
        }
        libc::dup2(stdout_fd, 1);
        libc::dup2(stderr_fd, 2);
        if creds.reset_agent_protection {
            // The agent's oom_score_adj -1000 and nice are inherited: the command gets the
            // defaults back (raising both needs no privilege).
            let adj = c"/proc/self/oom_score_adj";
            let fd = libc::open(adj.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd >= 0 {
                libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
            }
            libc::setpriority(libc::PRIO_PROCESS, 0, 0);
        }
        if !creds.cgroup_procs.is_null() {
            let fd = libc::open(creds.cgroup_procs, libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                fail(status_fd, 3, *libc::__errno_location());
            }
            libc::close(fd);
        }
        if let Some(ids) = creds.ids {
            // Raw syscalls: libc's wrappers synchronise every thread of the process, which
            // after fork is only this one; the raw calls are async-signal-safe.
            if libc::syscall(libc::SYS_setgroups, ids.groups.len(), ids.groups.as_ptr()) != 0
                || libc::syscall(libc::SYS_setresgid, ids.gid, ids.gid, ids.gid) != 0
                || libc::syscall(libc::SYS_setresuid, ids.uid, ids.uid, ids.uid) != 0
            {
                fail(status_fd, 4, *libc::__errno_location());
            }
        }
        if !cwd.is_null() && libc::chdir(cwd) != 0 {
            fail(status_fd, 1, *libc::__errno_location());
        }
        libc::execve(path, argv.as_ptr(), envp.as_ptr());
        fail(status_fd, 2, *libc::__errno_location())
    }
}

/// Context an exec runs with.
#[derive(Clone)]
pub struct ExecContext {
    pub table: Arc<ExecTable>,
    pub reaper: Reaper,
}

impl std::fmt::Debug for ExecContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecContext").finish_non_exhaustive()
    }
}

/// An exec given up after its fork: kill what runs in its cgroup and remove it (or leave it
/// to the next sweep).
fn abandon(cgroup: Option<ExecCgroup>, cgroups: Option<&crate::cgroup::Cgroups>) {
    if let (Some(cg), Some(cgs)) = (cgroup, cgroups) {
        cg.kill();
        cg.finish(cgs);
    }
}

/// Decide how an exec that could not start is reported (see the module docs).
fn spawn_failure(err: ExecError, background: bool, conn: &ConnWriter, id: u64) {
    let code = match &err {
        ExecError::NotFound { .. } => Some(127),
        ExecError::Exec { code, .. } => Some(*code),
        _ => None,
    };
    match code {
        Some(code) if !background => {
            conn.send(id, Response::Stderr(format!("{err}\n").into_bytes()));
            conn.send(
                id,
                Response::Exit(ExitStatus {
                    code: Some(code),
                    signal: None,
                    timed_out: false,
                    truncated: false,
                    ..Default::default()
                }),
            );
        }
        _ => {
            conn.send(id, err.response());
        }
    }
}

impl ExecContext {
    /// Run one `Exec` request to completion (foreground) or until started (background).
    /// Called on its own thread; all responses go to `conn` under request id `id`.
    pub fn run(&self, req: ExecRequest, conn: Arc<ConnWriter>, id: u64) {
        let background = req.background;
        let prepared = match prepare(&req) {
            Ok(p) => p,
            Err(e) => return spawn_failure(e, background, &conn, id),
        };
        let want_stdin = !matches!(req.stdin, Stdin::Null);
        let cgroups = crate::cgroup::get();
        let cgroup = match cgroups.map(|c| c.create(&req.limits)).transpose() {
            Ok(c) => c,
            Err(e) => return spawn_failure(e.into(), background, &conn, id),
        };
        let setup = ChildSetup {
            cgroup_procs: cgroup.as_ref().map(ExecCgroup::procs_path),
            reset_agent_protection: cgroups.is_some(),
        };
        let forked = fork_exec(&prepared, &setup, want_stdin, &self.reaper);
        let (pid, status_rx, pipes) = match forked {
            Ok(x) => x,
            Err(e) => {
                abandon(cgroup, cgroups);
                return spawn_failure(e, background, &conn, id);
            }
        };
        let start = Instant::now();
        let exec_id = self.table.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let bg = background.then(|| Arc::new(BgState::default()));
        let mut entry = ExecEntry {
            pgid: pid,
            finished: false,
            background: bg.clone(),
            stdin: None,
        };
        match (req.stdin, pipes.stdin) {
            (Stdin::Bytes(bytes), Some(fd)) => {
                // A thread, so a child that reads slowly never blocks the output pump.
                let spawned = thread::Builder::new()
                    .name(format!("stdin-{exec_id}"))
                    .spawn(move || {
                        let mut f = std::fs::File::from(fd);
                        let _ = f.write_all(&bytes);
                    });
                if let Err(e) = spawned {
                    let _ = killpg(pid, Signal::SIGKILL);
                    abandon(cgroup, cgroups);
                    return spawn_failure(ExecError::Thread(e), background, &conn, id);
                }
            }
            (Stdin::Stream, Some(fd)) => match start_stdin_stream(exec_id, fd, &conn) {
                Ok(h) => entry.stdin = Some(h),
                Err(e) => {
                    let _ = killpg(pid, Signal::SIGKILL);
                    abandon(cgroup, cgroups);
                    return spawn_failure(e, background, &conn, id);
                }
            },
            _ => {}
        }
        lock(&self.table.entries).insert(exec_id, entry);
        let pid_u32 = u32::try_from(pid.as_raw()).unwrap_or(0);
        conn.send(
            id,
            Response::ExecStarted {
                exec_id,
                pid: pid_u32,
            },
        );
        let sink = match &bg {
            Some(state) => Sink::Background {
                state: Arc::clone(state),
            },
            None => Sink::Conn {
                conn: Arc::clone(&conn),
                id,
            },
        };
        drop(conn);
        // A timeout too large to represent is no timeout.
        let deadline = req
            .timeout_ms
            .and_then(|t| start.checked_add(Duration::from_millis(t)));
        let mut status = pump(
            pid,
            cgroup.as_ref(),
            pipes.stdout,
            pipes.stderr,
            &sink,
            req.output_cap,
            deadline,
            &status_rx,
        );
        if let (Some(cg), Some(cgs)) = (cgroup, cgroups) {
            let outcome = cg.finish(cgs);
            status.oom_killed = outcome.oom_killed;
            status.pids_limit_hit = outcome.pids_limit_hit;
        }
        self.finish(exec_id, status, &sink);
    }

    fn finish(&self, exec_id: u64, mut status: ExitStatus, sink: &Sink) {
        match sink {
            Sink::Conn { .. } => {
                lock(&self.table.entries).remove(&exec_id);
                sink.send(Response::Exit(status));
            }
            Sink::Background { state } => {
                let mut st = lock(&state.inner);
                status.truncated |= st.dropped;
                let mut table = lock(&self.table.entries);
                if let Some((conn, id)) = st.waiter.take() {
                    conn.send(id, Response::Exit(status));
                    table.remove(&exec_id);
                } else {
                    st.exit = Some(status);
                    if let Some(e) = table.get_mut(&exec_id) {
                        e.finished = true;
                        e.stdin = None;
                    }
                }
            }
        }
    }

    /// `Signal`: signal the exec's whole process group.
    pub fn signal(&self, exec_id: u64, signal: i32) -> Result<(), ExecError> {
        let table = lock(&self.table.entries);
        let e = table
            .get(&exec_id)
            .ok_or(ExecError::UnknownExec { exec_id })?;
        if e.finished {
            return Err(ExecError::BadState {
                exec_id,
                message: "has already exited".into(),
            });
        }
        let sig = Signal::try_from(signal).map_err(|source| ExecError::Signal {
            exec_id,
            signal,
            source,
        })?;
        killpg(e.pgid, sig).map_err(|source| ExecError::Signal {
            exec_id,
            signal,
            source,
        })
    }

    /// `StdinData` / `StdinEof`: queue for the exec's stdin thread, which answers `id` once
    /// the data is in the pipe. `data == None` closes stdin.
    pub fn stdin(
        &self,
        exec_id: u64,
        data: Option<Vec<u8>>,
        conn: &Arc<ConnWriter>,
        id: u64,
    ) -> Result<(), ExecError> {
        let mut table = lock(&self.table.entries);
        let e = table
            .get_mut(&exec_id)
            .ok_or(ExecError::UnknownExec { exec_id })?;
        let Some(h) = &e.stdin else {
            return Err(ExecError::BadState {
                exec_id,
                message: "has no streamed stdin (or it was closed)".into(),
            });
        };
        if !Arc::ptr_eq(&h.conn, conn) {
            return Err(ExecError::BadState {
                exec_id,
                message: "stdin belongs to another connection".into(),
            });
        }
        let eof = data.is_none();
        let msg = match data {
            Some(d) => StdinMsg::Data(d, id),
            None => StdinMsg::Eof(id),
        };
        if h.queued.fetch_add(1, Ordering::AcqRel) >= MAX_STDIN_QUEUE {
            h.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(ExecError::StdinFull {
                exec_id,
                max: MAX_STDIN_QUEUE,
            });
        }
        if h.tx.try_send(msg).is_err() {
            h.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(ExecError::BadState {
                exec_id,
                message: "stdin is closed".into(),
            });
        }
        if eof {
            e.stdin = None;
        }
        Ok(())
    }

    /// `Wait`: attach `conn`/`id` to a background exec; flushes buffered output and, if it
    /// already ended, its `Exit`.
    pub fn wait(&self, exec_id: u64, conn: &Arc<ConnWriter>, id: u64) -> Result<(), ExecError> {
        let state = {
            let table = lock(&self.table.entries);
            let e = table
                .get(&exec_id)
                .ok_or(ExecError::UnknownExec { exec_id })?;
            e.background.clone().ok_or(ExecError::BadState {
                exec_id,
                message: "is a foreground exec; its output goes to its own request".into(),
            })?
        };
        let mut st = lock(&state.inner);
        if let Some((w, _)) = &st.waiter {
            if w.is_alive() {
                return Err(ExecError::BadState {
                    exec_id,
                    message: "already has a waiter".into(),
                });
            }
        }
        while let Some(ev) = st.events.pop_front() {
            conn.send(id, ev);
        }
        st.buffered = 0;
        if let Some(status) = st.exit.take() {
            conn.send(id, Response::Exit(status));
            lock(&self.table.entries).remove(&exec_id);
        } else {
            st.waiter = Some((Arc::clone(conn), id));
        }
        Ok(())
    }
}

fn start_stdin_stream(
    exec_id: u64,
    fd: OwnedFd,
    conn: &Arc<ConnWriter>,
) -> Result<StdinHandle, ExecError> {
    let (tx, rx) = mpsc::sync_channel::<StdinMsg>(MAX_STDIN_QUEUE);
    let queued = Arc::new(AtomicUsize::new(0));
    let q2 = Arc::clone(&queued);
    let c2 = Arc::clone(conn);
    thread::Builder::new()
        .name(format!("stdin-{exec_id}"))
        .spawn(move || {
            let mut pipe = Some(std::fs::File::from(fd));
            for msg in rx {
                q2.fetch_sub(1, Ordering::AcqRel);
                match msg {
                    StdinMsg::Data(d, id) => {
                        let r = match pipe.as_mut() {
                            Some(p) => p.write_all(&d).map_err(|e| e.to_string()),
                            None => Err("stdin already failed".to_owned()),
                        };
                        match r {
                            Ok(()) => c2.send(id, Response::Ok),
                            Err(e) => {
                                pipe = None;
                                c2.send(
                                    id,
                                    Response::error(
                                        ErrorKind::Io,
                                        format!("exec {exec_id}: writing stdin: {e}"),
                                    ),
                                )
                            }
                        };
                    }
                    StdinMsg::Eof(id) => {
                        pipe = None;
                        c2.send(id, Response::Ok);
                    }
                }
            }
        })
        .map_err(ExecError::Thread)?;
    Ok(StdinHandle {
        tx,
        queued,
        conn: Arc::clone(conn),
    })
}

fn status_of(s: ChildStatus) -> (Option<i32>, Option<i32>) {
    match s {
        ChildStatus::Exited(c) => (Some(c), None),
        ChildStatus::Signaled(s) => (None, Some(s)),
    }
}

/// Stream both pipes to `sink` until they close (or the drain grace after the leader's exit
/// runs out), enforcing `cap` and `deadline`; returns the exit status.
#[allow(clippy::too_many_arguments)]
fn pump(
    pgid: Pid,
    cgroup: Option<&ExecCgroup>,
    stdout: OwnedFd,
    stderr: OwnedFd,
    sink: &Sink,
    cap: Option<u64>,
    deadline: Option<Instant>,
    status_rx: &Receiver<ChildStatus>,
) -> ExitStatus {
    let mut fds = [Some(stdout), Some(stderr)];
    let mut sent: u64 = 0;
    let mut truncated = false;
    let mut timed_out = false;
    let mut status: Option<ChildStatus> = None;
    let mut last_read = Instant::now();
    let mut buf = vec![0u8; READ_BUF];
    let kill = |timed_out: &mut bool, why_timeout: bool| {
        if !*timed_out {
            let _ = killpg(pgid, Signal::SIGKILL);
            if let Some(cg) = cgroup {
                cg.kill();
            }
            *timed_out = why_timeout;
        }
    };
    let mut killed_at: Option<Instant> = None;

    while fds.iter().any(Option::is_some) {
        if status.is_none() {
            match status_rx.try_recv() {
                Ok(s) => {
                    status = Some(s);
                    // The drain grace counts from the exit at the earliest, so output written
                    // just before it is always read.
                    last_read = Instant::now();
                }
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => break,
            }
        }
        let now = Instant::now();
        if let Some(k) = killed_at {
            if now.duration_since(k) > KILL_GRACE {
                break;
            }
        }
        if killed_at.is_none() {
            if deadline.is_some_and(|d| now >= d) {
                kill(&mut timed_out, true);
                killed_at = Some(now);
            } else if sink.is_dead() {
                kill(&mut timed_out, false);
                killed_at = Some(now);
            }
        }
        let mut wait = TICK;
        if let Some(d) = deadline {
            wait = wait.min(d.saturating_duration_since(now));
        }
        let mut pfds: Vec<PollFd<'_>> = Vec::with_capacity(2);
        let mut which = Vec::with_capacity(2);
        for (i, fd) in fds.iter().enumerate() {
            if let Some(fd) = fd {
                pfds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                which.push(i);
            }
        }
        let ms = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX);
        match poll(&mut pfds, PollTimeout::from(ms)) {
            Ok(0) => {
                // The drain grace only runs out while the pipes are idle: a poll that found
                // nothing to read. Time spent blocked in `sink.send` (host back-pressure) or
                // descheduled never counts, so output still buffered in a pipe is never lost.
                if status.is_some() && Instant::now().duration_since(last_read) > DRAIN_GRACE {
                    break;
                }
                continue;
            }
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(_) => break,
        }
        let ready: Vec<usize> = pfds
            .iter()
            .zip(&which)
            .filter(|(p, _)| p.revents().is_some_and(|r| !r.is_empty()))
            .map(|(_, &i)| i)
            .collect();
        drop(pfds);
        for i in ready {
            let Some(fd) = fds[i].as_ref() else { continue };
            // SAFETY: reading into a valid buffer from an fd we own.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                if nix::Error::last() == nix::Error::EINTR {
                    continue;
                }
                fds[i] = None;
                continue;
            }
            let n = n as usize;
            if n == 0 {
                fds[i] = None;
                continue;
            }
            let allowed = cap.map_or(n as u64, |c| c.saturating_sub(sent).min(n as u64)) as usize;
            if allowed < n {
                truncated = true;
            }
            if allowed > 0 {
                sent += allowed as u64;
                let data = buf[..allowed].to_vec();
                sink.send(if i == 0 {
                    Response::Stdout(data)
                } else {
                    Response::Stderr(data)
                });
            }
            // After the (possibly blocking) send: the grace measures idle pipes, not our own
            // time spent delivering.
            last_read = Instant::now();
        }
    }
    drop(fds);
    // Pipes closed (or given up): wait for the leader, still honouring the timeout.
    let status = loop {
        if let Some(s) = status {
            break Some(s);
        }
        let now = Instant::now();
        let limit = match (killed_at, deadline) {
            (Some(k), _) => Some(k + KILL_GRACE),
            (None, Some(d)) => Some(d),
            (None, None) => None,
        };
        let r = match limit {
            Some(l) => status_rx.recv_timeout(l.saturating_duration_since(now).max(TICK)),
            None => status_rx.recv_timeout(TICK),
        };
        match r {
            Ok(s) => status = Some(s),
            Err(RecvTimeoutError::Disconnected) => break None,
            Err(RecvTimeoutError::Timeout) => {
                let now = Instant::now();
                if killed_at.is_some() {
                    if limit.is_some_and(|l| now >= l) {
                        break None;
                    }
                } else if deadline.is_some_and(|d| now >= d) {
                    kill(&mut timed_out, true);
                    killed_at = Some(now);
                } else if sink.is_dead() {
                    kill(&mut timed_out, false);
                    killed_at = Some(now);
                }
            }
        }
    };
    let (code, signal) = status.map_or((None, Some(libc::SIGKILL)), status_of);
    ExitStatus {
        code,
        signal,
        timed_out,
        truncated,
        ..Default::default()
    }
}
