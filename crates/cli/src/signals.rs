//! Forwarding of kiln's own SIGINT / SIGTERM / SIGHUP to the command running in the guest
//! (`kiln run`): Ctrl-C interrupts the command, not just kiln, and kiln still exits with the
//! command's status. The handler only records the signal; a thread forwards it. The third
//! signal sends SIGKILL instead, for commands that ignore the others.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use kiln::ExecSignaller;

/// The last signal received and not yet forwarded (0 = none).
static PENDING: AtomicI32 = AtomicI32::new(0);
/// How often the forwarding thread looks for a pending signal.
const POLL: Duration = Duration::from_millis(50);
/// SIGKILL.
const SIGKILL: i32 = 9;

extern "C" fn record(sig: libc::c_int) {
    // Async-signal-safe: one atomic store.
    PENDING.store(sig, Ordering::SeqCst);
}

/// Installs the recording handler for SIGINT, SIGTERM and SIGHUP.
fn install() -> std::io::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler is
        // an `extern "C" fn(c_int)` that only performs an atomic store (async-signal-safe),
        // and `sigaction` only reads `act` and writes nothing (null `oldact`).
        let rc = unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = record as *const () as libc::sighandler_t;
            act.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(sig, &act, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Forwards kiln's signals to the command until dropped.
#[derive(Debug)]
pub struct Forwarder {
    done: Arc<AtomicBool>,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
    }
}

/// Starts forwarding to `target`; when the handlers cannot be installed kiln keeps the
/// default behaviour (a signal ends kiln, and with it the VM).
pub fn forward_to(target: ExecSignaller) -> Option<Forwarder> {
    if let Err(e) = install() {
        eprintln!("kiln: warning: cannot forward signals to the command: {e}");
        return None;
    }
    let done = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&done);
    let spawned = thread::Builder::new()
        .name("kiln-signals".into())
        .spawn(move || {
            let mut count = 0u32;
            while !flag.load(Ordering::SeqCst) {
                thread::sleep(POLL);
                let sig = PENDING.swap(0, Ordering::SeqCst);
                if sig == 0 {
                    continue;
                }
                count += 1;
                let sig = if count >= 3 { SIGKILL } else { sig };
                if let Err(e) = target.signal(sig) {
                    eprintln!("kiln: forwarding signal {sig} to the command: {e}");
                }
            }
        });
    match spawned {
        Ok(_) => Some(Forwarder { done }),
        Err(e) => {
            eprintln!("kiln: warning: cannot forward signals to the command: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handler_records_the_signal() {
        install().unwrap();
        // SAFETY: raising a signal whose handler was just installed; the handler only stores.
        let rc = unsafe { libc::raise(libc::SIGHUP) };
        assert_eq!(rc, 0);
        assert_eq!(PENDING.swap(0, Ordering::SeqCst), libc::SIGHUP);
    }
}
