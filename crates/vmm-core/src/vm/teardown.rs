//! Ending the process that runs a VM without waiting for the VM's teardown: [`Vm::exit_process`].
//!
//! Dropping a [`Vm`] stops its threads, closes the VM fd and unmaps guest memory; closing the
//! VM fd alone is the slow part (the kernel destroys the VM: shadow/EPT pages, memslots, SRCU
//! and RCU grace periods — ~3 ms on this host kind, tens of ms on a loaded one). A process that
//! is done with its VM (a CLI run whose output is flushed, a benchmark child) does not need to
//! wait for that: the kernel frees everything at exit anyway. But exiting with the fds open
//! still runs the same destruction inside the exit path, before the parent learns the process
//! is gone. [`ExitMode::Handoff`] moves it off that path: a forked helper inherits the fds,
//! the process exits at once, and the helper (no threads, no VM use) closes them — the last
//! reference to the VM, so the kernel's teardown runs there — and exits.

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
    /// Fork a helper that inherits every fd, then exit: the helper closes them all (the last
    /// reference to the VM fd, so the kernel's VM teardown runs in the helper, after this
    /// process is gone) and exits. The helper is reparented to the nearest subreaper / init,
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

/// Forks a helper that closes every fd it inherited and exits. Only async-signal-safe calls run
/// in the child (this process has other threads). A failed fork is ignored: the exit path then
/// does the teardown itself.
fn handoff_fds() {
    // SAFETY: fork in a multi-threaded process; the child only calls close_range and _exit
    // (both async-signal-safe system calls) and never returns into Rust code.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: closes fds 0..=MAX of the child, which owns copies of them; then ends the
        // child. stdin/stdout/stderr are closed first (lowest numbers), so a reader of this
        // process's pipes sees end-of-file before the VM fd's slow close.
        unsafe {
            libc::close_range(0, libc::c_uint::MAX, 0);
            libc::_exit(0)
        }
    }
}
