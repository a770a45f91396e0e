//! The guest's 8250 UART at 0x3f8 (vm-superio) and the console that keeps its output.
//!
//! Guest output goes into a bounded ring buffer ([`SerialRing`]) inside a [`Console`] that the
//! API reads (`Vm::serial_tail`) and waits on (`Vm::wait_for_serial`); complete lines are
//! optionally logged through `tracing`. The UART raises IRQ 4 through an irqfd.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// COM1 I/O port base.
pub const COM1_PORT: u64 = 0x3f8;
/// COM1 port range length.
pub const COM1_LEN: u64 = 8;
/// COM1 interrupt line.
pub const COM1_IRQ: u32 = 4;
/// Longest line the console logs in one piece; longer lines are logged in chunks.
const MAX_LOG_LINE: usize = 4096;

/// A bounded byte ring: keeps the last `cap` bytes ever pushed and counts all of them.
#[derive(Debug)]
pub struct SerialRing {
    buf: VecDeque<u8>,
    cap: usize,
    total: u64,
}

impl SerialRing {
    /// A ring keeping at most `cap` bytes (at least 1).
    pub fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        Self {
            buf: VecDeque::with_capacity(cap.min(64 * 1024)),
            cap,
            total: 0,
        }
    }

    /// Appends bytes, dropping the oldest beyond the capacity.
    pub fn push(&mut self, bytes: &[u8]) {
        self.total += bytes.len() as u64;
        let bytes = if bytes.len() > self.cap {
            &bytes[bytes.len() - self.cap..]
        } else {
            bytes
        };
        let overflow = (self.buf.len() + bytes.len()).saturating_sub(self.cap);
        self.buf.drain(..overflow);
        self.buf.extend(bytes);
    }

    /// Bytes pushed since creation (including those already dropped).
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Bytes currently held.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The last `max` held bytes as (lossy) UTF-8.
    pub fn tail(&self, max: usize) -> String {
        let skip = self.buf.len().saturating_sub(max);
        let bytes: Vec<u8> = self.buf.iter().skip(skip).copied().collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The held bytes from absolute position `from` on (at most `max`, the oldest first) and
    /// the position after them: a reader that streams the console elsewhere (the jailed VMM
    /// process) calls it with the position it got last time. Bytes already dropped from the
    /// ring are skipped.
    pub fn since(&self, from: u64, max: usize) -> (Vec<u8>, u64) {
        let oldest = self.total - self.buf.len() as u64;
        let start = from.clamp(oldest, self.total);
        let skip = (start - oldest) as usize;
        let bytes: Vec<u8> = self.buf.iter().skip(skip).take(max).copied().collect();
        let next = start + bytes.len() as u64;
        (bytes, next)
    }

    /// Searches for `needle` in the held bytes that start at or after absolute position
    /// `from` (minus the needle overlap). Returns `Ok(pos)` with the absolute position of the
    /// first match, or `Err(next_from)` to resume from next time.
    pub fn find_from(&self, needle: &[u8], from: u64) -> Result<u64, u64> {
        if needle.is_empty() {
            return Ok(from.min(self.total));
        }
        let oldest = self.total - self.buf.len() as u64;
        let start = from.saturating_sub(needle.len() as u64 - 1).max(oldest);
        let skip = (start - oldest) as usize;
        let (a, b) = self.buf.as_slices();
        // Copy only the unscanned part; the ring is bounded so this is too.
        let hay: Vec<u8> = if skip >= a.len() {
            b[skip - a.len()..].to_vec()
        } else {
            let mut v = a[skip..].to_vec();
            v.extend_from_slice(b);
            v
        };
        match hay.windows(needle.len()).position(|w| w == needle) {
            Some(p) => Ok(start + p as u64),
            None => Err(self.total),
        }
    }
}

/// How a wait on the console ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitOutcome {
    /// The needle appeared; its absolute byte position.
    Found(u64),
    /// The console was closed (the VM exited) before the needle appeared.
    Closed,
    /// The deadline passed.
    TimedOut,
}

#[derive(Debug)]
struct ConsoleInner {
    ring: SerialRing,
    line: Vec<u8>,
    closed: bool,
}

/// Guest serial output, shared between the UART (vCPU threads) and API readers.
#[derive(Debug)]
pub struct Console {
    vm: String,
    log: bool,
    inner: Mutex<ConsoleInner>,
    cond: Condvar,
}

impl Console {
    /// A console for VM `vm` keeping `ring_bytes` of output; `log` emits lines via tracing.
    pub fn new(vm: &str, ring_bytes: usize, log: bool) -> Self {
        Self {
            vm: vm.to_owned(),
            log,
            inner: Mutex::new(ConsoleInner {
                ring: SerialRing::new(ring_bytes),
                line: Vec::new(),
                closed: false,
            }),
            cond: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ConsoleInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends guest output and wakes waiters.
    pub fn push(&self, bytes: &[u8]) {
        let mut g = self.lock();
        g.ring.push(bytes);
        if self.log {
            for &b in bytes {
                if b == b'\n' || g.line.len() >= MAX_LOG_LINE {
                    let line = String::from_utf8_lossy(&g.line).trim_end().to_owned();
                    tracing::info!(vm = %self.vm, "serial: {line}");
                    g.line.clear();
                }
                if b != b'\n' {
                    g.line.push(b);
                }
            }
        }
        drop(g);
        self.cond.notify_all();
    }

    /// Marks the console closed (the VM ended) and wakes waiters.
    pub fn close(&self) {
        self.lock().closed = true;
        self.cond.notify_all();
    }

    /// The last `max` bytes of output.
    pub fn tail(&self, max: usize) -> String {
        self.lock().ring.tail(max)
    }

    /// Total bytes the guest wrote.
    pub fn total(&self) -> u64 {
        self.lock().ring.total()
    }

    /// [`SerialRing::since`] on the console's ring.
    pub fn since(&self, from: u64, max: usize) -> (Vec<u8>, u64) {
        self.lock().ring.since(from, max)
    }

    /// Waits until `needle` appears in the output (anywhere since boot that is still held),
    /// the console closes, or `deadline` passes.
    pub fn wait_for(&self, needle: &[u8], deadline: Instant) -> WaitOutcome {
        let mut g = self.lock();
        let mut from = 0;
        loop {
            match g.ring.find_from(needle, from) {
                Ok(pos) => return WaitOutcome::Found(pos),
                Err(next) => from = next,
            }
            if g.closed {
                return WaitOutcome::Closed;
            }
            let now = Instant::now();
            if now >= deadline {
                return WaitOutcome::TimedOut;
            }
            g = self
                .cond
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// Raises the UART's interrupt by writing to an eventfd registered as an irqfd.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Feeds UART output into the console.
#[derive(Debug)]
pub struct ConsoleWriter(pub Arc<Console>);

impl io::Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The 8250 UART as a port-I/O bus device.
pub struct SerialDevice {
    uart: Serial<EventFdTrigger, vm_superio::serial::NoEvents, ConsoleWriter>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART that signals `irq` and writes to `console`.
    pub fn new(irq: EventFd, console: Arc<Console>) -> Self {
        Self {
            uart: Serial::new(EventFdTrigger(irq), ConsoleWriter(console)),
        }
    }
}

// ---- Snapshot hook: UART register state (see snapshot/) ----
impl SerialDevice {
    /// The UART's registers and receive FIFO.
    pub fn snapshot_state(&self) -> vm_superio::serial::SerialState {
        self.uart.state()
    }

    /// A UART with the registers of `state` that signals `irq` and writes to `console`;
    /// re-raises its interrupt if the state has one pending.
    pub fn from_snapshot_state(
        irq: EventFd,
        console: Arc<Console>,
        state: &vm_superio::serial::SerialState,
    ) -> io::Result<Self> {
        let uart = Serial::from_state(
            state,
            EventFdTrigger(irq),
            vm_superio::serial::NoEvents,
            ConsoleWriter(console),
        )
        .map_err(io::Error::other)?;
        Ok(Self { uart })
    }

    /// Loads the registers of `state` into this UART, keeping its interrupt and console.
    pub fn restore_snapshot_state(
        &mut self,
        state: &vm_superio::serial::SerialState,
    ) -> io::Result<()> {
        let irq = self.uart.interrupt_evt().0.try_clone()?;
        let console = self.uart.writer().0.clone();
        *self = Self::from_snapshot_state(irq, console, state)?;
        Ok(())
    }
}
// ---- end snapshot hook ----

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < COM1_LEN {
            data[0] = self.uart.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < COM1_LEN {
            // An error here means the irqfd write failed; the byte is already in the console.
            if let Err(e) = self.uart.write(offset as u8, data[0]) {
                tracing::debug!("serial write: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn since_streams_the_held_bytes_in_order() {
        let mut r = SerialRing::new(4);
        r.push(b"ab");
        assert_eq!(r.since(0, 10), (b"ab".to_vec(), 2));
        r.push(b"cdef");
        // "ab" was dropped: the reader resumes at the oldest held byte.
        assert_eq!(r.since(2, 1), (b"c".to_vec(), 3));
        assert_eq!(r.since(3, 10), (b"def".to_vec(), 6));
        assert_eq!(r.since(6, 10), (Vec::new(), 6));
    }

    #[test]
    fn ring_keeps_only_the_newest_bytes() {
        let mut r = SerialRing::new(8);
        r.push(b"hello ");
        r.push(b"world!");
        assert_eq!(r.len(), 8);
        assert_eq!(r.total(), 12);
        assert_eq!(r.tail(100), "o world!");
        assert_eq!(r.tail(3), "ld!");
        r.push(&[b'x'; 100]);
        assert_eq!(r.len(), 8);
        assert_eq!(r.tail(100), "xxxxxxxx");
        assert_eq!(r.total(), 112);
    }

    #[test]
    fn find_resumes_and_matches_across_pushes() {
        let mut r = SerialRing::new(64);
        r.push(b"boot... RE");
        let next = r.find_from(b"READY", 0).unwrap_err();
        assert_eq!(next, 10);
        r.push(b"ADY\n");
        assert_eq!(r.find_from(b"READY", next), Ok(8));
        // Evicted bytes are not searched.
        let mut r = SerialRing::new(4);
        r.push(b"READY");
        assert!(r.find_from(b"READY", 0).is_err());
    }

    #[test]
    fn console_wait_sees_output_close_and_deadline() {
        let c = Arc::new(Console::new("t", 1024, true));
        let c2 = c.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            c2.push(b"xx READY\n");
        });
        let far = Instant::now() + Duration::from_secs(10);
        assert_eq!(c.wait_for(b"READY", far), WaitOutcome::Found(3));
        t.join().unwrap();
        let soon = Instant::now() + Duration::from_millis(20);
        assert_eq!(c.wait_for(b"NOPE", soon), WaitOutcome::TimedOut);
        c.close();
        assert_eq!(c.wait_for(b"NOPE", far), WaitOutcome::Closed);
        assert_eq!(c.wait_for(b"READY", far), WaitOutcome::Found(3));
    }

    #[test]
    fn uart_output_reaches_the_console() {
        let c = Arc::new(Console::new("t", 16, false));
        let mut dev = SerialDevice::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), c.clone());
        for &b in b"hi\n" {
            dev.write(0, &[b]);
        }
        assert_eq!(c.tail(16), "hi\n");
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty");
    }
}
