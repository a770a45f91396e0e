//! Ending the process that runs a VM without waiting for the VM's teardown: [`Vm::exit_process`].
//!
//! Dropping a [`Vm`] stops its threads, closes the VM fd and unmaps guest memory; closing the
//! VM fd alone is the slow part (the kernel destroys the VM: shadow/EPT pages, memslots, SRCU
//! and RCU grace periods — ~3 ms on this host kind, tens of ms on a loaded one). A process that
//! is done with its VM (a CLI run whose output is flushed, a benchmark child) does not need to
//! wait for that: the kernel frees everything at exit anyway. But exiting with the fds open
//! still runs the same destruction inside the exit path, before the parent learns the process
//! is gone. [`ExitMode::Handoff`] moves it off that path: a forked helper inherits the fds,
//! the process exits at once, and the helper (no threads, no VM use, `SCHED_IDLE`) waits on a
//! pidfd until the process is gone, then closes them — the last references to the VM, so the
//! kernel's teardown runs there — and exits.

use std::io::Write;

use super::Vm;

/// How [`Vm::exit_process`] ends the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitMode {
    /// Stop the VM as a drop does (join threads, close fds, unmap memory), then exit.
    Drop,
    /// Exit without stopping the VM: the kernel ends the vCPU threads and frees the VM inside
    /// the exit path (the process is gone only after that).
    Exit,
    /// Fork a helper that inherits every fd, then exit: the helper waits until this process
    /// is gone, closes them all (the last references to the VM fd, so the kernel's VM teardown
    /// runs in the helper) and exits. The helper is reparented to the nearest subreaper / init,
    /// which reaps it.
    Handoff,
}

impl Vm {
    /// Flushes stdout and stderr and ends the process with `code`, handling the VM as `mode`
    /// says. Destructors of other objects do not run (as with [`std::process::exit`]).
    pub fn exit_process(self, code: i32, mode: ExitMode) -> ! {
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        match mode {
            ExitMode::Drop => {
                drop(self);
                std::process::exit(code)
            }
            ExitMode::Exit => {
                // The VM is deliberately leaked: the kernel tears it down at exit.
                std::mem::forget(self);
                exit_now(code)
            }
            ExitMode::Handoff => {
                std::mem::forget(self);
                handoff_fds();
                exit_now(code)
            }
        }
    }
}

/// `_exit(code)`: no atexit handlers, no stdio flush (done before), no destructors.
fn exit_now(code: i32) -> ! {
    // SAFETY: _exit ends the process; it touches no Rust state.
    unsafe { libc::_exit(code) }
}

/// How long the helper waits for this process to be gone before it closes the fds anyway.
const HANDOFF_WAIT_MS: libc::c_int = 10_000;

/// Forks a helper that holds every fd until this process is gone, then closes them (the last
/// references, so the kernel's VM teardown runs in the helper) and exits. The helper closes
/// stdin/stdout/stderr first, so readers of this process's pipes see end-of-file when it exits,
/// and runs as `SCHED_IDLE` so it does not compete with anything for a CPU. Only
/// async-signal-safe system calls run in the child (this process has other threads). A failed
/// fork is ignored: the exit path then does the teardown itself.
fn handoff_fds() {
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: fork in a multi-threaded process; the child only makes raw system calls
    // (sched_setscheduler, close_range, pidfd_open, poll, _exit) and never returns into Rust
    // code or touches the heap.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: every call below is a plain system call on the child's own copies of the
        // fds and on a pidfd it opens itself; `param` and `pfd` live on this stack frame.
        unsafe {
            let param = libc::sched_param { sched_priority: 0 };
            libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
            libc::close_range(0, 2, 0);
            // Wait until the parent has exited (its fds closed): only then are ours the last.
            let pidfd = libc::syscall(libc::SYS_pidfd_open, parent, 0);
            if let Ok(fd) = libc::c_int::try_from(pidfd) {
                if fd >= 0 {
                    let mut pfd = libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    libc::poll(&mut pfd, 1, HANDOFF_WAIT_MS);
                }
            }
            libc::close_range(0, libc::c_uint::MAX, 0);
            libc::_exit(0)
        }
    }
}
