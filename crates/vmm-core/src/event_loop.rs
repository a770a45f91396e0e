//! The device thread: one `event-manager` loop per VM where device subscribers (virtio queue
//! notifications, backend sockets, ...) are dispatched. Stopped through an eventfd and joined.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::seccomp::{SeccompMode, ThreadKind};

/// A device subscriber as the loop stores it.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;
/// The event manager type devices register with.
pub type DeviceEventManager = EventManager<Subscriber>;

/// Ends the loop when its eventfd is written.
struct StopSubscriber {
    fd: EventFd,
    flag: Arc<AtomicBool>,
}

impl MutEventSubscriber for StopSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.fd.read();
        self.flag.store(true, Ordering::SeqCst);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            tracing::error!(
                "device loop: cannot watch the stop eventfd {}: {e:?}",
                self.fd.as_raw_fd()
            );
            self.flag.store(true, Ordering::SeqCst);
        }
    }
}

/// A running device thread.
#[derive(Debug)]
pub struct EventLoop {
    stop: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl EventLoop {
    /// Starts `manager` on a thread named `<vm>-dev`, which installs the device seccomp filter
    /// (`seccomp`) before it dispatches any event.
    pub fn spawn(vm: &str, manager: DeviceEventManager, seccomp: SeccompMode) -> io::Result<Self> {
        Self::spawn_named(
            vm,
            &format!("{vm}-dev"),
            manager,
            ThreadKind::Device,
            seccomp,
        )
    }

    /// Starts `manager` on a thread named `thread` (logs name `vm`), which installs the
    /// seccomp filter of `kind` before it dispatches any event.
    pub fn spawn_named(
        vm: &str,
        thread: &str,
        mut manager: DeviceEventManager,
        kind: ThreadKind,
        seccomp: SeccompMode,
    ) -> io::Result<Self> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let flag = Arc::new(AtomicBool::new(false));
        let sub: Subscriber = Arc::new(Mutex::new(StopSubscriber {
            fd: stop.try_clone()?,
            flag: flag.clone(),
        }));
        manager.add_subscriber(sub);
        let vm_name = vm.to_owned();
        let handle = std::thread::Builder::new()
            .name(thread.to_owned())
            .spawn(move || {
                if let Err(e) = crate::seccomp::install(kind, seccomp) {
                    // Fail closed: no device runs on an unfiltered thread.
                    tracing::error!(vm = %vm_name, "device loop not started: {e}");
                    return;
                }
                while !flag.load(Ordering::SeqCst) {
                    if let Err(e) = manager.run_with_timeout(1000) {
                        tracing::error!(vm = %vm_name, "device loop failed: {e:?}");
                        break;
                    }
                }
                // Dropping the manager here drops every device subscriber and its fds.
            })?;
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }

    /// Stops the loop and joins the thread (idempotent).
    pub fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            if let Err(e) = self.stop.write(1) {
                tracing::error!("device loop: cannot signal stop: {e}");
            }
            if h.join().is_err() {
                tracing::error!("device loop thread panicked");
            }
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.stop();
    }
}
