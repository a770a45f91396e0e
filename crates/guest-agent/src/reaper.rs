//! The reaper: one thread that `waitpid(-1)`s every child (our execs and, as PID 1 or child
//! subreaper, every orphan) and hands exit statuses to whoever registered the pid.
//!
//! Nothing else in the agent calls `waitpid`, so the exec engine never loses a status to the
//! orphan reaping. [`Reaper::spawn_registered`] forks while holding the registry lock, so a
//! child that exits at once is still dispatched to its waiter.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildStatus {
    Exited(i32),
    Signaled(i32),
}

#[derive(Default)]
struct State {
    waiters: HashMap<i32, Sender<ChildStatus>>,
    /// Bumped on every spawn, so the reaper never sleeps through a new child.
    generation: u64,
}

struct Inner {
    state: Mutex<State>,
    spawned: Condvar,
}

/// Handle to the reaper thread.
#[derive(Clone)]
pub struct Reaper {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Reaper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reaper").finish_non_exhaustive()
    }
}

impl Reaper {
    /// Start the reaper thread.
    pub fn start() -> std::io::Result<Self> {
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            spawned: Condvar::new(),
        });
        let i2 = Arc::clone(&inner);
        thread::Builder::new()
            .name("reaper".into())
            .spawn(move || reap_loop(&i2))?;
        Ok(Self { inner })
    }

    /// Run `spawn` (which forks and returns the child's pid) with the registry locked, and
    /// register the pid; the receiver gets the child's exit status.
    pub fn spawn_registered<E>(
        &self,
        spawn: impl FnOnce() -> Result<Pid, E>,
    ) -> Result<(Pid, Receiver<ChildStatus>), E> {
        let mut st = lock(&self.inner.state);
        let pid = spawn()?;
        let (tx, rx) = mpsc::channel();
        st.waiters.insert(pid.as_raw(), tx);
        st.generation = st.generation.wrapping_add(1);
        drop(st);
        self.inner.spawned.notify_all();
        Ok((pid, rx))
    }
}

// Every critical section is a single map operation: a poisoned lock is still consistent.
use kiln_sync::lock;

fn reap_loop(inner: &Inner) {
    loop {
        let generation = lock(&inner.state).generation;
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(pid, code)) => dispatch(inner, pid, ChildStatus::Exited(code)),
            Ok(WaitStatus::Signaled(pid, sig, _)) => {
                dispatch(inner, pid, ChildStatus::Signaled(sig as i32))
            }
            Ok(_) => {}
            Err(Errno::EINTR) => {}
            Err(Errno::ECHILD) => {
                // No children at all: sleep until the next spawn.
                let mut st = lock(&inner.state);
                while st.generation == generation {
                    st = match inner.spawned.wait_timeout(st, Duration::from_secs(5)) {
                        Ok((g, _)) => g,
                        Err(p) => p.into_inner().0,
                    };
                }
            }
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn dispatch(inner: &Inner, pid: Pid, status: ChildStatus) {
    // Orphans (no waiter) are simply reaped.
    if let Some(tx) = lock(&inner.state).waiters.remove(&pid.as_raw()) {
        let _ = tx.send(status);
    }
}
