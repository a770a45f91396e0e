//! vCPU threads: one thread per vCPU running `KVM_RUN`, an explicit run state
//! (running, paused, exited) and a kick that gets a thread out of `KVM_RUN` at once.
//!
//! The kick is a real-time signal sent to the vCPU thread; its handler sets
//! `kvm_run.immediate_exit`, so a kick that lands just before `KVM_RUN` is not lost (the
//! ioctl then returns `EINTR` immediately). This is the scheme Firecracker uses.

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::bus::Bus;
use crate::serial::Console;
use crate::snapshot::kvm_state::{self, KvmStateError};
use crate::snapshot::state::VcpuSnapshot;

/// i8042 command port; writing 0xFE there resets the machine.
const I8042_COMMAND_PORT: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// Why a VM (or one vCPU) stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// `KVM_EXIT_SHUTDOWN`: triple fault — a guest reboot with `reboot=t`, or a crash.
    Shutdown {
        /// The vCPU that faulted.
        vcpu: u8,
    },
    /// The guest wrote 0xFE to the i8042 command port (reset).
    I8042Reset {
        /// The vCPU that wrote it.
        vcpu: u8,
    },
    /// `KVM_EXIT_SYSTEM_EVENT` (e.g. PSCI-style shutdown/reset).
    SystemEvent {
        /// The vCPU that reported it.
        vcpu: u8,
        /// KVM's event type.
        kind: u32,
    },
    /// `KVM_EXIT_HLT` (only seen without an in-kernel LAPIC).
    Halted {
        /// The vCPU that halted.
        vcpu: u8,
    },
    /// `KVM_EXIT_INTERNAL_ERROR` (e.g. an instruction KVM cannot emulate).
    InternalError {
        /// The vCPU.
        vcpu: u8,
        /// KVM's suberror code and data, plus the guest RIP.
        detail: String,
    },
    /// `KVM_EXIT_FAIL_ENTRY`: the hardware refused to enter the guest.
    FailEntry {
        /// The vCPU.
        vcpu: u8,
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// `KVM_RUN` itself failed, or an exit Kiln does not handle.
    VcpuError {
        /// The vCPU.
        vcpu: u8,
        /// What happened.
        detail: String,
    },
    /// The host stopped the VM.
    Stopped,
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Shutdown { vcpu } => {
                write!(f, "shutdown (triple fault / guest reboot) on vCPU {vcpu}")
            }
            Self::I8042Reset { vcpu } => write!(f, "i8042 reset on vCPU {vcpu}"),
            Self::SystemEvent { vcpu, kind } => write!(f, "system event {kind} on vCPU {vcpu}"),
            Self::Halted { vcpu } => write!(f, "vCPU {vcpu} halted"),
            Self::InternalError { vcpu, detail } => {
                write!(f, "KVM internal error on vCPU {vcpu}: {detail}")
            }
            Self::FailEntry { vcpu, reason } => {
                write!(
                    f,
                    "VM entry failed on vCPU {vcpu}: hardware reason {reason:#x}"
                )
            }
            Self::VcpuError { vcpu, detail } => write!(f, "vCPU {vcpu} error: {detail}"),
            Self::Stopped => write!(f, "stopped by the host"),
        }
    }
}

impl ExitReason {
    /// True when the guest itself ended the VM (reboot, power-off, reset).
    pub fn is_guest_shutdown(&self) -> bool {
        matches!(
            self,
            Self::Shutdown { .. } | Self::I8042Reset { .. } | Self::SystemEvent { .. }
        )
    }
}

/// The run state of one vCPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuState {
    /// Executing guest code (or about to).
    Running,
    /// Parked by the host; resumes on request.
    Paused,
    /// Finished; the thread has ended or is ending.
    Exited(ExitReason),
}

/// What the host asks of a vCPU. `Stop` is final: no later request replaces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum VcpuRequest {
    /// Run guest code (resume a paused vCPU).
    Run = 0,
    /// Leave `KVM_RUN` and park until the next request.
    Pause = 1,
    /// End the vCPU thread.
    Stop = 2,
}

impl VcpuRequest {
    fn from_raw(v: u8) -> Self {
        match v {
            0 => Self::Run,
            1 => Self::Pause,
            _ => Self::Stop,
        }
    }
}

/// Work a paused vCPU does on its own thread (KVM wants vCPU ioctls there).
pub enum VcpuJob {
    /// Complete a pending I/O exit, then save the vCPU's state (snapshots) and send it back.
    SaveState {
        /// KVM's MSR index list.
        msrs: &'static [u32],
        /// Where the vCPU sends its index and its state.
        reply: mpsc::Sender<SavedVcpu>,
    },
    /// Test hook (`Vm::post_vcpu_job`): run a closure on the vCPU thread, under its seccomp
    /// filter, with its fd.
    #[doc(hidden)]
    Test(Box<dyn FnOnce(&VcpuFd) + Send>),
}

impl std::fmt::Debug for VcpuJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VcpuJob::SaveState { msrs, .. } => f
                .debug_struct("SaveState")
                .field("msrs", &msrs.len())
                .finish_non_exhaustive(),
            VcpuJob::Test(_) => f.write_str("Test(..)"),
        }
    }
}

/// A vCPU's answer to [`VcpuJob::SaveState`]: its index and its state.
pub type SavedVcpu = (u8, Result<VcpuSnapshot, KvmStateError>);

/// Host-side control of one vCPU: the requested state (read by the vCPU thread before every
/// `KVM_RUN`, so an atomic), the current one and the job slot.
pub struct VcpuControl {
    request: AtomicU8,
    state: Mutex<VcpuState>,
    cond: Condvar,
    /// A job to run on the vCPU thread while it is paused (snapshots).
    job: Mutex<Option<VcpuJob>>,
}

impl Default for VcpuControl {
    fn default() -> Self {
        Self {
            request: AtomicU8::new(VcpuRequest::Run as u8),
            state: Mutex::new(VcpuState::Running),
            cond: Condvar::new(),
            job: Mutex::new(None),
        }
    }
}

impl VcpuControl {
    fn lock(&self) -> MutexGuard<'_, VcpuState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current state.
    pub fn state(&self) -> VcpuState {
        self.lock().clone()
    }

    /// The current request.
    pub fn requested(&self) -> VcpuRequest {
        VcpuRequest::from_raw(self.request.load(Ordering::SeqCst))
    }

    fn set_state(&self, s: VcpuState) {
        *self.lock() = s;
        self.cond.notify_all();
    }

    /// Asks the vCPU for `r` (a vCPU asked to stop stays stopping). Does not kick it.
    pub fn request(&self, r: VcpuRequest) {
        let stop = VcpuRequest::Stop as u8;
        let _ = self
            .request
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |cur| {
                (cur != stop).then_some(r as u8)
            });
        // Take the lock so a thread between "check request" and "wait" cannot miss this.
        drop(self.lock());
        self.cond.notify_all();
    }

    /// Waits until the state satisfies `pred` or `deadline` passes; returns whether it did.
    pub fn wait_state(&self, deadline: Instant, pred: impl Fn(&VcpuState) -> bool) -> bool {
        let mut g = self.lock();
        loop {
            if pred(&g) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self
                .cond
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Hands `job` to the vCPU thread, which runs it if and while it is paused (replacing a
    /// job not yet picked up). The job reports back through its own channel.
    pub fn post_job(&self, job: VcpuJob) {
        *self.job.lock().unwrap_or_else(|p| p.into_inner()) = Some(job);
        // Take the state lock so a thread between "check job" and "wait" cannot miss this.
        drop(self.lock());
        self.cond.notify_all();
    }

    fn take_job(&self) -> Option<VcpuJob> {
        self.job.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl std::fmt::Debug for VcpuControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuControl")
            .field("request", &self.requested())
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

thread_local! {
    /// The running vCPU's `kvm_run` page, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = KVM_RUN.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: the pointer is this thread's own mapped kvm_run page; it is set after the
        // VcpuFd is created and cleared before it is dropped, on this same thread. A single
        // byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*p).immediate_exit).write_volatile(1) };
    }
}

/// The signal used to kick vCPU threads.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the kick handler (once per process).
pub fn install_kick_handler() -> Result<(), std::io::Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

/// Everything shared by a VM's vCPU threads and its host handle.
#[derive(Debug)]
pub struct VmShared {
    /// VM name (for errors and logs).
    pub name: String,
    /// Serial console output.
    pub console: Arc<Console>,
    /// Per-vCPU control blocks, indexed by vCPU id.
    pub vcpus: Vec<Arc<VcpuControl>>,
    exit: Mutex<Option<ExitReason>>,
    exit_cond: Condvar,
    /// pthread ids of live vCPU threads (cleared before a thread is joined).
    threads: Mutex<Vec<Option<libc::pthread_t>>>,
}

impl VmShared {
    /// Shared state for `vcpus` vCPUs.
    pub fn new(name: &str, console: Arc<Console>, vcpus: u8) -> Self {
        Self {
            name: name.to_owned(),
            console,
            vcpus: (0..vcpus)
                .map(|_| Arc::new(VcpuControl::default()))
                .collect(),
            exit: Mutex::new(None),
            exit_cond: Condvar::new(),
            threads: Mutex::new(vec![None; usize::from(vcpus)]),
        }
    }

    fn threads(&self) -> MutexGuard<'_, Vec<Option<libc::pthread_t>>> {
        self.threads.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the pthread of vCPU `i` so it can be kicked.
    pub fn set_thread(&self, i: usize, t: libc::pthread_t) {
        if let Some(slot) = self.threads().get_mut(i) {
            *slot = Some(t);
        }
    }

    /// Forgets vCPU `i`'s thread (call before joining it).
    pub fn clear_thread(&self, i: usize) {
        if let Some(slot) = self.threads().get_mut(i) {
            *slot = None;
        }
    }

    /// Interrupts `KVM_RUN` on every live vCPU thread.
    pub fn kick_all(&self) {
        let sig = kick_signal();
        for t in self.threads().iter().flatten() {
            // SAFETY: `t` is a thread that has not been joined (entries are cleared under
            // this lock before joining), so the pthread_t is valid.
            unsafe { libc::pthread_kill(*t, sig) };
        }
    }

    /// Asks every vCPU to stop and kicks them.
    pub fn request_stop_all(&self) {
        self.request_all(VcpuRequest::Stop);
    }

    /// Asks every vCPU for `r`, kicking them out of `KVM_RUN` unless `r` is `Run`.
    pub fn request_all(&self, r: VcpuRequest) {
        for c in &self.vcpus {
            c.request(r);
        }
        if r != VcpuRequest::Run {
            self.kick_all();
        }
    }

    /// Records the VM's exit reason (the first one wins) and wakes waiters.
    pub fn record_exit(&self, reason: ExitReason) {
        let mut g = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(reason);
        }
        drop(g);
        self.exit_cond.notify_all();
        self.console.close();
    }

    /// The exit reason, if the VM has ended.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.exit.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits for the exit reason until `deadline`.
    pub fn wait_exit(&self, deadline: Instant) -> Option<ExitReason> {
        let mut g = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = g.as_ref() {
                return Some(r.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            g = self
                .exit_cond
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// One vCPU, ready to run on its own thread.
pub struct VcpuRunner {
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Its id (= APIC id).
    pub index: u8,
    /// The VM's shared state.
    pub shared: Arc<VmShared>,
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
}

impl std::fmt::Debug for VcpuRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuRunner")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

enum Step {
    Continue,
    Exit(ExitReason),
}

impl VcpuRunner {
    /// Runs the vCPU until it exits or is stopped; the thread body.
    pub fn run(mut self) {
        let ctl = self.shared.vcpus[usize::from(self.index)].clone();
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|c| c.set(run_ptr));
        let reason = self.run_loop(&ctl);
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
        ctl.set_state(VcpuState::Exited(reason.clone()));
        if reason != ExitReason::Stopped {
            tracing::debug!(vm = %self.shared.name, vcpu = self.index, "vCPU exit: {reason}");
            self.shared.record_exit(reason);
            self.shared.request_stop_all();
        }
    }

    /// The run-state machine: one handler per [`VcpuState`], each returning the next state.
    fn run_loop(&mut self, ctl: &VcpuControl) -> ExitReason {
        let mut state = VcpuState::Running;
        loop {
            state = match state {
                VcpuState::Running => self.running(ctl),
                VcpuState::Paused => self.paused(ctl),
                VcpuState::Exited(reason) => return reason,
            };
        }
    }

    /// Runs guest code until a request or an exit changes the state.
    fn running(&mut self, ctl: &VcpuControl) -> VcpuState {
        loop {
            match ctl.requested() {
                VcpuRequest::Stop => return VcpuState::Exited(ExitReason::Stopped),
                VcpuRequest::Pause => return VcpuState::Paused,
                VcpuRequest::Run => {}
            }
            if let Step::Exit(r) = self.step() {
                return VcpuState::Exited(r);
            }
        }
    }

    /// Parks (running posted jobs) until asked to run again or to stop.
    fn paused(&mut self, ctl: &VcpuControl) -> VcpuState {
        ctl.set_state(VcpuState::Paused);
        let mut g = ctl.lock();
        let next = loop {
            match ctl.requested() {
                VcpuRequest::Pause => {}
                VcpuRequest::Run => {
                    *g = VcpuState::Running;
                    break VcpuState::Running;
                }
                VcpuRequest::Stop => break VcpuState::Exited(ExitReason::Stopped),
            }
            if let Some(job) = ctl.take_job() {
                drop(g);
                self.run_job(job);
                g = ctl.lock();
                continue;
            }
            g = ctl
                .cond
                .wait_timeout(g, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        };
        drop(g);
        ctl.cond.notify_all();
        next
    }

    /// Does a job posted to this paused vCPU.
    fn run_job(&mut self, job: VcpuJob) {
        match job {
            VcpuJob::SaveState { msrs, reply } => {
                // KVM completes an instruction that exited to user space for I/O only on the
                // next KVM_RUN; with immediate_exit set it does that and returns at once.
                self.fd.set_kvm_immediate_exit(1);
                let _ = self.fd.run();
                self.fd.set_kvm_immediate_exit(0);
                let _ = reply.send((self.index, kvm_state::save_vcpu(&self.fd, self.index, msrs)));
            }
            VcpuJob::Test(f) => f(&self.fd),
        }
    }

    fn step(&mut self) -> Step {
        let vcpu = self.index;
        let run_ptr: *const kvm_run = self.fd.get_kvm_run();
        // String port I/O (`rep outs`/`rep ins`) arrives as one exit carrying `count`
        // accesses of `size` bytes each; devices get them one at a time.
        let io_size = || {
            // SAFETY: `run_ptr` is this vCPU's kvm_run mapping, alive as long as `self.fd`;
            // after KVM_EXIT_IO the `io` member of the exit union is the one KVM filled in.
            // It lies in the header, apart from the data bytes borrowed as `data` below.
            let size = unsafe { std::ptr::addr_of!((*run_ptr).__bindgen_anon_1.io.size).read() };
            usize::from(size).clamp(1, 8)
        };
        match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                for access in data.chunks(io_size()) {
                    if port == I8042_COMMAND_PORT && access.first() == Some(&I8042_RESET) {
                        return Step::Exit(ExitReason::I8042Reset { vcpu });
                    }
                    self.pio.write(u64::from(port), access);
                }
                Step::Continue
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                for access in data.chunks_mut(io_size()) {
                    self.pio.read(u64::from(port), access);
                }
                Step::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                self.mmio.read(addr, data);
                Step::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.mmio.write(addr, data);
                Step::Continue
            }
            Ok(VcpuExit::Shutdown) => Step::Exit(ExitReason::Shutdown { vcpu }),
            Ok(VcpuExit::Hlt) => Step::Exit(ExitReason::Halted { vcpu }),
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                Step::Exit(ExitReason::SystemEvent { vcpu, kind })
            }
            Ok(VcpuExit::FailEntry(reason, _)) => {
                Step::Exit(ExitReason::FailEntry { vcpu, reason })
            }
            Ok(VcpuExit::InternalError) => {
                let detail = self.internal_error_detail();
                Step::Exit(ExitReason::InternalError { vcpu, detail })
            }
            Ok(other) => {
                let detail = format!("unhandled exit {other:?}");
                Step::Exit(ExitReason::VcpuError { vcpu, detail })
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                Step::Continue
            }
            Err(e) => Step::Exit(ExitReason::VcpuError {
                vcpu,
                detail: format!("KVM_RUN: {e}"),
            }),
        }
    }

    fn internal_error_detail(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member of the exit union is
        // the one KVM filled in.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        let data: Vec<String> = internal.data[..n]
            .iter()
            .map(|d| format!("{d:#x}"))
            .collect();
        let rip = self
            .fd
            .get_regs()
            .map(|r| format!("{:#x}", r.rip))
            .unwrap_or_else(|e| format!("? ({e})"));
        format!(
            "suberror {} data [{}] rip {rip}",
            internal.suberror,
            data.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_typed_and_stop_is_final() {
        let c = VcpuControl::default();
        assert_eq!(c.requested(), VcpuRequest::Run);
        c.request(VcpuRequest::Pause);
        assert_eq!(c.requested(), VcpuRequest::Pause);
        c.request(VcpuRequest::Run);
        assert_eq!(c.requested(), VcpuRequest::Run);
        c.request(VcpuRequest::Stop);
        c.request(VcpuRequest::Run);
        c.request(VcpuRequest::Pause);
        assert_eq!(c.requested(), VcpuRequest::Stop);
        for r in [VcpuRequest::Run, VcpuRequest::Pause, VcpuRequest::Stop] {
            assert_eq!(VcpuRequest::from_raw(r as u8), r);
        }
    }
}
