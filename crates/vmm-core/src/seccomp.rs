//! seccomp-bpf filters for the VMM's own threads: one allowlist per [`ThreadKind`], installed
//! by each thread itself (no `TSYNC`) before it touches guest-controlled data, so the threads
//! of the program that embeds kiln-vmm are never filtered. docs/SECURITY.md lists every
//! allowed system call and why.
//!
//! Modes ([`SeccompMode`], `$KILN_SECCOMP`, [`crate::VmConfig::seccomp`]):
//! - `Enforce` (default): a call outside the list raises `SIGSYS` (`SECCOMP_RET_TRAP`); the
//!   handler writes the thread, its kind and the system call number to stderr and ends the
//!   process with exit status [`EXIT_BAD_SYSCALL`] (159 = 128 + SIGSYS). The path-based file
//!   calls in [`REFUSED_WITH_EACCES`] are the exception: the handler logs them and makes them
//!   fail with `EACCES`.
//! - `Log`: a call outside the list is allowed and the kernel logs it (`SECCOMP_RET_LOG`,
//!   `audit: type=1326 ... comm="<thread>" ... syscall=<nr>` in the kernel log) — for finding a
//!   missing entry on a new code path without ending the process.
//! - `Off` (`KILN_SECCOMP=0`): no filter (a debugging aid).
//!
//! Every filter sets `PR_SET_NO_NEW_PRIVS` on its thread first (seccompiler does it), refuses
//! `PROT_EXEC` in `mmap`/`mprotect`, and restricts `ioctl` to the requests the thread kind
//! makes (KVM vCPU ioctls on vCPU threads, none elsewhere).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Once, OnceLock};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

/// Exit status of a process ended by a forbidden system call (128 + SIGSYS, as a shell
/// reports a process killed by SIGSYS).
pub const EXIT_BAD_SYSCALL: i32 = 159;

/// The environment variable that selects the mode (`0`/`off`, `log`, `1`/`on`; unset = on).
pub const ENV: &str = "KILN_SECCOMP";

/// What the filters do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// Filters on; a call outside the allowlist is logged and ends the process.
    #[default]
    Enforce,
    /// Filters on; a call outside the allowlist is allowed and logged by the kernel.
    Log,
    /// No filters (debugging aid).
    Off,
}

impl SeccompMode {
    /// Parses a `$KILN_SECCOMP` value: unset, empty, `1`, `on` -> `Enforce`; `0`, `off` ->
    /// `Off`; `log` -> `Log`. Anything else is `None` (the caller keeps the filters on).
    pub fn parse(value: Option<&str>) -> Option<Self> {
        match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            None | Some("") | Some("1") | Some("on") => Some(Self::Enforce),
            Some("0") | Some("off") => Some(Self::Off),
            Some("log") => Some(Self::Log),
            Some(_) => None,
        }
    }

    /// The mode `$KILN_SECCOMP` asks for, read once per process; an unknown value keeps the
    /// filters on (with a warning).
    pub fn from_env() -> Self {
        static MODE: OnceLock<SeccompMode> = OnceLock::new();
        *MODE.get_or_init(|| {
            let raw = std::env::var(ENV).ok();
            Self::parse(raw.as_deref()).unwrap_or_else(|| {
                tracing::warn!(value = ?raw, "{ENV}: unknown value, seccomp filters stay on");
                Self::Enforce
            })
        })
    }
}

/// The kinds of VMM thread, each with its own allowlist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU thread (`<vm>-vcpu<N>`): `KVM_RUN`, device emulation on MMIO/PIO exits, the
    /// snapshot save job.
    Vcpu,
    /// The device event-loop thread (`<vm>-dev`): virtio queues, the vsock muxer, timers.
    Device,
    /// A vsock unix-front copy thread (`vsock-unix-conn`, `vsock-unix-up`).
    VsockProxy,
    /// A block-device I/O thread (for a virtio-blk backend on its own thread).
    BlockIo,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 4] = [Self::Vcpu, Self::Device, Self::VsockProxy, Self::BlockIo];

    /// A short name for logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Vcpu => "vcpu",
            Self::Device => "device",
            Self::VsockProxy => "vsock-proxy",
            Self::BlockIo => "block-io",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Vcpu => 0,
            Self::Device => 1,
            Self::VsockProxy => 2,
            Self::BlockIo => 3,
        }
    }
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The kernel lacks seccomp filters or the action the mode needs.
    #[error("the kernel does not support seccomp filters with {action} (set {ENV}=0 to run without them): {source}")]
    Unsupported {
        /// The action probed.
        action: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A filter could not be built (a bug in the rule tables).
    #[error("building the {kind} seccomp filter: {source}")]
    Build {
        /// Thread kind.
        kind: &'static str,
        /// Cause.
        #[source]
        source: seccompiler::BackendError,
    },
    /// A filter could not be compiled to BPF.
    #[error("compiling the {kind} seccomp filter: {source}")]
    Compile {
        /// Thread kind.
        kind: &'static str,
        /// Cause.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The SIGSYS handler could not be installed.
    #[error("installing the SIGSYS handler: {source}")]
    Handler {
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `prctl(PR_SET_NO_NEW_PRIVS)` or `seccomp(SECCOMP_SET_MODE_FILTER)` failed.
    #[error("installing the {kind} seccomp filter on thread {thread:?}: {source}")]
    Install {
        /// Thread kind.
        kind: &'static str,
        /// Thread name.
        thread: String,
        /// Cause.
        #[source]
        source: seccompiler::Error,
    },
}

// ---- rule tables ----

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

fn cond(arg: u8, op: Op, value: u64) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(arg, Len::Dword, op, value)
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(conds)
}

/// `nr` with any arguments.
fn allow(rules: &mut Rules, nrs: &[libc::c_long]) {
    for &nr in nrs {
        rules.insert(nr, Vec::new());
    }
}

/// `nr` when argument `arg` equals one of `values`.
fn allow_arg(
    rules: &mut Rules,
    nr: libc::c_long,
    arg: u8,
    values: &[u64],
) -> Result<(), seccompiler::BackendError> {
    let mut chain = Vec::with_capacity(values.len());
    for &v in values {
        chain.push(rule(vec![cond(arg, Op::Eq, v)?])?);
    }
    rules.insert(nr, chain);
    Ok(())
}

/// `nr` when argument `arg` has no `PROT_EXEC` bit.
fn allow_no_exec(
    rules: &mut Rules,
    nr: libc::c_long,
    arg: u8,
) -> Result<(), seccompiler::BackendError> {
    let no_exec = cond(arg, Op::MaskedEq(libc::PROT_EXEC as u64), 0)?;
    rules.insert(nr, vec![rule(vec![no_exec])?]);
    Ok(())
}

/// What every VMM thread does: memory allocation, locks and condvars, clocks, logging to an
/// fd (stderr), closing fds it drops, signal return, thread exit and abort.
fn common_rules(kind: ThreadKind) -> Result<Rules, seccompiler::BackendError> {
    let mut r = Rules::new();
    allow(
        &mut r,
        &[
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_writev,
            libc::SYS_close,
            libc::SYS_futex,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_madvise,
            libc::SYS_brk,
            libc::SYS_rt_sigreturn,
            libc::SYS_rt_sigprocmask,
            libc::SYS_sigaltstack,
            libc::SYS_sched_yield,
            libc::SYS_clock_gettime,
            libc::SYS_clock_getres,
            libc::SYS_gettimeofday,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            libc::SYS_restart_syscall,
            libc::SYS_getrandom,
            libc::SYS_getpid,
            libc::SYS_gettid,
            libc::SYS_sched_getaffinity,
            libc::SYS_exit,
            libc::SYS_exit_group,
        ],
    );
    allow_no_exec(&mut r, libc::SYS_mmap, 2)?;
    allow_no_exec(&mut r, libc::SYS_mprotect, 2)?;
    // std checks an fd is open (F_GETFD) before closing it in debug builds.
    allow_arg(
        &mut r,
        libc::SYS_fcntl,
        1,
        &[libc::F_GETFD as u64, libc::F_GETFL as u64],
    )?;
    // abort() raises SIGABRT at itself; vCPU threads also kick their siblings out of KVM_RUN
    // when the guest ends the VM. Only threads of this process (tgid = our pid).
    let mut signals = vec![libc::SIGABRT as u64];
    if kind == ThreadKind::Vcpu {
        signals.push(crate::vcpu::kick_signal() as u64);
    }
    let pid = u64::from(std::process::id());
    let mut chain = Vec::with_capacity(signals.len());
    for sig in signals {
        chain.push(rule(vec![cond(0, Op::Eq, pid)?, cond(2, Op::Eq, sig)?])?);
    }
    r.insert(libc::SYS_tgkill, chain);
    Ok(r)
}

/// The ioctls a vCPU thread makes: `KVM_RUN`, `KVM_GET_REGS` for an internal-error report,
/// and the `KVM_GET_*` calls of the snapshot save job (which runs on the paused vCPU's own
/// thread).
pub fn vcpu_ioctls() -> Vec<u64> {
    use kvm_bindings::*;
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};
    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
    ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
    ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
    ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
    ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
    ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
    vec![
        KVM_RUN(),
        KVM_GET_REGS(),
        KVM_GET_SREGS(),
        KVM_GET_MSRS(),
        KVM_GET_FPU(),
        KVM_GET_LAPIC(),
        KVM_GET_CPUID2(),
        KVM_GET_MP_STATE(),
        KVM_GET_VCPU_EVENTS(),
        KVM_GET_DEBUGREGS(),
        KVM_GET_XSAVE(),
        KVM_GET_XCRS(),
    ]
}

/// Path-based file calls that harmless code may reach on any thread — a panic's backtrace
/// symbolizer opening the executable, a log formatter looking up the time zone — are not
/// in any allowlist, but in `Enforce` mode the SIGSYS handler makes them fail with `EACCES`
/// (and logs them) instead of ending the process. Either way the call never runs.
pub const REFUSED_WITH_EACCES: &[libc::c_long] = &[
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_creat,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
];

/// Event-loop calls: waiting on and (un)registering fds, close-deadline timers.
const EVENT_LOOP_CALLS: &[libc::c_long] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
];

/// Disk-image I/O on fds opened before the thread started (a virtio-blk backend, on the
/// device loop or on its own thread): positioned and vectored reads/writes, flushes,
/// discard (`fallocate` punch-hole).
pub const BLOCK_IO_CALLS: &[libc::c_long] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_readv,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
];

/// The allowlist of one thread kind.
pub fn rules(kind: ThreadKind) -> Result<Rules, seccompiler::BackendError> {
    let mut r = common_rules(kind)?;
    match kind {
        ThreadKind::Vcpu => {
            allow_arg(&mut r, libc::SYS_ioctl, 1, &vcpu_ioctls())?;
        }
        ThreadKind::Device | ThreadKind::BlockIo => {
            allow(&mut r, EVENT_LOOP_CALLS);
            allow(&mut r, BLOCK_IO_CALLS);
        }
        ThreadKind::VsockProxy => {
            allow(
                &mut r,
                &[
                    libc::SYS_recvfrom,
                    libc::SYS_sendto,
                    libc::SYS_shutdown,
                    libc::SYS_poll,
                    libc::SYS_ppoll,
                ],
            );
        }
    }
    Ok(r)
}

// ---- compiled programs ----

struct Programs {
    /// The allowlists, by [`ThreadKind::index`].
    by_kind: Vec<BpfProgram>,
}

fn compile(mode: SeccompMode) -> Result<Programs, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let mut by_kind = Vec::with_capacity(ThreadKind::ALL.len());
    for kind in ThreadKind::ALL {
        let build = |source| SeccompError::Build {
            kind: kind.name(),
            source,
        };
        let filter = SeccompFilter::new(
            rules(kind).map_err(build)?,
            mismatch.clone(),
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .map_err(build)?;
        let prog: BpfProgram = filter.try_into().map_err(|source| SeccompError::Compile {
            kind: kind.name(),
            source,
        })?;
        by_kind.push(prog);
    }
    Ok(Programs { by_kind })
}

/// The compiled filters for `mode`, cached per process (they name our pid, so a forked
/// child compiles its own).
fn programs(mode: SeccompMode) -> Result<Arc<Programs>, SeccompError> {
    type Cache = Vec<(SeccompMode, u32, Arc<Programs>)>;
    static CACHE: Mutex<Cache> = Mutex::new(Vec::new());
    let pid = std::process::id();
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, _, p)) = cache.iter().find(|(m, id, _)| *m == mode && *id == pid) {
        return Ok(p.clone());
    }
    let p = Arc::new(compile(mode)?);
    cache.retain(|(_, id, _)| *id == pid);
    cache.push((mode, pid, p.clone()));
    Ok(p)
}

/// `seccomp(SECCOMP_GET_ACTION_AVAIL)`: does the kernel support filters with `action`?
fn probe_action(action: u32, name: &'static str) -> Result<(), SeccompError> {
    const SECCOMP_GET_ACTION_AVAIL: libc::c_ulong = 2;
    // SAFETY: the kernel only reads the u32 the pointer refers to, which outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            SECCOMP_GET_ACTION_AVAIL,
            0,
            &action as *const u32,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(SeccompError::Unsupported {
            action: name,
            source: std::io::Error::last_os_error(),
        })
    }
}

/// Checks kernel support, installs the SIGSYS handler (once per process) and compiles the
/// filters, on the thread that builds the VM — so a VM whose threads could not be filtered
/// fails to start with a typed error, and the VMM threads only apply a ready program.
pub fn prepare(mode: SeccompMode) -> Result<(), SeccompError> {
    match mode {
        SeccompMode::Off => return Ok(()),
        SeccompMode::Log => probe_action(libc::SECCOMP_RET_LOG, "SECCOMP_RET_LOG")?,
        SeccompMode::Enforce => {
            probe_action(libc::SECCOMP_RET_TRAP, "SECCOMP_RET_TRAP")?;
            install_sigsys_handler()?;
        }
    }
    programs(mode).map(|_| ())
}

/// Installs the `kind` filter on the calling thread (after `PR_SET_NO_NEW_PRIVS`). Call it
/// first thing on a VMM thread, before it touches guest-controlled data; does nothing in
/// `Off` mode. The filter stays for the thread's life and is inherited by threads it spawns.
pub fn install(kind: ThreadKind, mode: SeccompMode) -> Result<(), SeccompError> {
    if mode == SeccompMode::Off {
        return Ok(());
    }
    if mode == SeccompMode::Enforce {
        install_sigsys_handler()?;
    }
    let progs = programs(mode)?;
    remember_thread(kind);
    // One filter per thread: attaching one costs ~0.2 ms of kernel time (it precomputes the
    // always-allowed calls), so the EACCES calls are the SIGSYS handler's, not a second
    // filter's.
    seccompiler::apply_filter(&progs.by_kind[kind.index()]).map_err(|source| {
        SeccompError::Install {
            kind: kind.name(),
            thread: std::thread::current()
                .name()
                .unwrap_or("<unnamed>")
                .to_owned(),
            source,
        }
    })
}

/// `(thread name, Seccomp, NoNewPrivs)` of every thread of this process, from
/// /proc/self/task/*/status (tests).
#[doc(hidden)]
pub fn task_filters() -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in tasks.flatten() {
        let p = t.path();
        let (Ok(comm), Ok(status)) = (
            std::fs::read_to_string(p.join("comm")),
            std::fs::read_to_string(p.join("status")),
        ) else {
            continue; // the thread ended meanwhile
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse::<u32>().ok())
                .unwrap_or(u32::MAX)
        };
        out.push((
            comm.trim().to_owned(),
            field("Seccomp:"),
            field("NoNewPrivs:"),
        ));
    }
    out
}

// ---- SIGSYS: name the offending call, then end the process ----

const NAME_LEN: usize = 32;

thread_local! {
    /// This thread's kind (index + 1; 0 = none) and name, for the SIGSYS handler.
    static KIND: Cell<u8> = const { Cell::new(0) };
    static NAME: Cell<[u8; NAME_LEN]> = const { Cell::new([0; NAME_LEN]) };
}

fn remember_thread(kind: ThreadKind) {
    let mut name = [0u8; NAME_LEN];
    if let Some(n) = std::thread::current().name() {
        let b = n.as_bytes();
        let len = b.len().min(NAME_LEN);
        name[..len].copy_from_slice(&b[..len]);
    }
    NAME.with(|c| c.set(name));
    KIND.with(|c| c.set(kind.index() as u8 + 1));
}

/// The SIGSYS fields of `siginfo_t` on x86_64 (`_sigsys` of the kernel's union).
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// A fixed buffer `fmt::Write`s into (no allocation: used in the signal handler).
struct StackBuf {
    buf: [u8; 256],
    len: usize,
}

impl std::fmt::Write for StackBuf {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let room = self.buf.len() - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// The SIGSYS message (a plain function so unit tests can check it).
fn sigsys_message(out: &mut StackBuf, nr: i64, kind: u8, name: &[u8], refused: bool) {
    use std::fmt::Write;
    let kind = ThreadKind::ALL
        .get(usize::from(kind).wrapping_sub(1))
        .map_or("unknown", |k| k.name());
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    let name = std::str::from_utf8(&name[..end]).unwrap_or("?");
    if refused {
        let _ = writeln!(
            out,
            "kiln-vmm: seccomp: thread {name:?} ({kind} filter): system call {nr} refused \
             with EACCES"
        );
        return;
    }
    let _ = writeln!(
        out,
        "kiln-vmm: seccomp: thread {name:?} ({kind} filter) made forbidden system call {nr}; \
         ending the process (exit status {EXIT_BAD_SYSCALL}); {ENV}=log or {ENV}=0 lets it \
         through for debugging"
    );
}

/// `si_code` of a SIGSYS raised by a seccomp filter.
const SYS_SECCOMP: libc::c_int = 1;

extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: for SIGSYS the kernel fills `siginfo_t`'s `_sigsys` member, whose x86_64
    // layout `SigsysInfo` mirrors (`siginfo_t` is larger); checked non-null first.
    let sys = (!info.is_null()).then(|| unsafe { &*(info as *const SigsysInfo) });
    let nr = match sys {
        Some(s) if s.code == SYS_SECCOMP => i64::from(s.syscall),
        _ => -1, // not from a filter (e.g. kill -SYS): end the process all the same
    };
    let refused = nr >= 0 && !ctx.is_null() && REFUSED_WITH_EACCES.contains(&nr);
    let mut out = StackBuf {
        buf: [0; 256],
        len: 0,
    };
    sigsys_message(
        &mut out,
        nr,
        KIND.with(|c| c.get()),
        &NAME.with(|c| c.get()),
        refused,
    );
    // SAFETY: write(2) is async-signal-safe and allowed by every filter; the buffer is live.
    unsafe { libc::write(2, out.buf.as_ptr().cast(), out.len) };
    if refused {
        // The kernel skipped the call; what RAX holds when the handler returns is its
        // result. SAFETY: `ctx` is the `ucontext_t` the kernel passed to this SA_SIGINFO
        // handler (non-null, checked); its saved registers are restored by rt_sigreturn.
        unsafe {
            (*(ctx as *mut libc::ucontext_t)).uc_mcontext.gregs[libc::REG_RAX as usize] =
                -i64::from(libc::EACCES);
        }
        return;
    }
    // SAFETY: _exit(2) is async-signal-safe and allowed by every filter.
    unsafe { libc::_exit(EXIT_BAD_SYSCALL) };
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid starting point; the handler is an
        // `extern "C"` function with the SA_SIGINFO signature, alive for the whole process.
        let rc = unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = sigsys_handler as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut())
        };
        if rc != 0 {
            result = Err(SeccompError::Handler {
                source: std::io::Error::last_os_error(),
            });
        }
    });
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn env_values_parse_and_unknown_ones_are_refused() {
        assert_eq!(SeccompMode::parse(None), Some(SeccompMode::Enforce));
        assert_eq!(SeccompMode::parse(Some("")), Some(SeccompMode::Enforce));
        assert_eq!(SeccompMode::parse(Some("1")), Some(SeccompMode::Enforce));
        assert_eq!(SeccompMode::parse(Some(" ON ")), Some(SeccompMode::Enforce));
        assert_eq!(SeccompMode::parse(Some("0")), Some(SeccompMode::Off));
        assert_eq!(SeccompMode::parse(Some("off")), Some(SeccompMode::Off));
        assert_eq!(SeccompMode::parse(Some("log")), Some(SeccompMode::Log));
        assert_eq!(SeccompMode::parse(Some("no")), None);
    }

    #[test]
    fn every_filter_builds_in_both_modes() {
        for mode in [SeccompMode::Enforce, SeccompMode::Log] {
            let p = compile(mode).unwrap();
            assert_eq!(p.by_kind.len(), ThreadKind::ALL.len());
            assert!(p.by_kind.iter().all(|b| !b.is_empty() && b.len() < 4096));
        }
    }

    #[test]
    fn seccomp_vcpu_ioctl_numbers_match_the_kernel_headers() {
        let io = vcpu_ioctls();
        // From <linux/kvm.h> on x86_64.
        for want in [0xae80, 0x8090_ae81, 0x8138_ae83, 0xc008_ae88, 0x8400_ae8e] {
            assert!(io.contains(&want), "{want:#x} missing from {io:x?}");
        }
    }

    #[test]
    fn seccomp_only_the_vcpu_filter_allows_ioctl_and_none_allows_exec_or_sockets() {
        for kind in ThreadKind::ALL {
            let r = rules(kind).unwrap();
            assert_eq!(r.contains_key(&libc::SYS_ioctl), kind == ThreadKind::Vcpu);
            for nr in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_socket,
                libc::SYS_connect,
                libc::SYS_clone,
                libc::SYS_clone3,
                libc::SYS_open,
                libc::SYS_openat,
                libc::SYS_statx,
                libc::SYS_readlink,
                libc::SYS_fork,
                libc::SYS_ptrace,
                libc::SYS_mount,
                libc::SYS_prctl,
                libc::SYS_seccomp,
            ] {
                assert!(!r.contains_key(&nr), "{kind:?} allows {nr}");
            }
        }
    }

    #[test]
    fn seccomp_file_calls_fail_with_eacces_and_the_thread_exits_cleanly() {
        for kind in ThreadKind::ALL {
            let t = std::thread::Builder::new()
                .name(format!("sc-{}", kind.name()))
                .spawn(move || {
                    install(kind, SeccompMode::Enforce).unwrap();
                    let open = std::fs::File::open("/proc/self/status").map(|_| ());
                    let stat = std::fs::metadata("/").map(|_| ());
                    let link = std::fs::read_link("/proc/self/exe").map(|_| ());
                    // Allocation, locks and clocks still work.
                    let v: Vec<u64> = (0..100_000).collect();
                    let _ = std::time::Instant::now();
                    (open, stat, link, v.len())
                })
                .unwrap();
            let (open, stat, link, n) = t.join().unwrap();
            for r in [open, stat, link] {
                assert_eq!(
                    r.unwrap_err().raw_os_error(),
                    Some(libc::EACCES),
                    "{kind:?}"
                );
            }
            assert_eq!(n, 100_000);
        }
        // This (calling) thread is not filtered.
        std::fs::File::open("/proc/self/status").unwrap();
    }

    #[test]
    fn sigsys_message_names_thread_kind_and_call() {
        let mut out = StackBuf {
            buf: [0; 256],
            len: 0,
        };
        let mut name = [0u8; NAME_LEN];
        name[..10].copy_from_slice(b"vm0-vcpu1\0");
        sigsys_message(&mut out, 41, 1, &name, false);
        let s = std::str::from_utf8(&out.buf[..out.len]).unwrap();
        assert!(
            s.starts_with("kiln-vmm: seccomp: thread \"vm0-vcpu1\" (vcpu filter) made forbidden system call 41;"),
            "{s}"
        );
        assert!(s.ends_with('\n'), "{s}");
        let mut out = StackBuf {
            buf: [0; 256],
            len: 0,
        };
        sigsys_message(&mut out, 257, 2, &name, true);
        let s = std::str::from_utf8(&out.buf[..out.len]).unwrap();
        assert_eq!(
            s,
            "kiln-vmm: seccomp: thread \"vm0-vcpu1\" (device filter): system call 257 refused with EACCES\n"
        );
        assert!(s.len() < 256, "{s}");
    }
}
