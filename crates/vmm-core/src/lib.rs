//! kiln-vmm: Kiln's virtual machine monitor.
//!
//! Owns guest memory, the KVM VM and its vCPU threads, x86_64 boot, the 8250 serial port,
//! the virtio-mmio transport with the virtio-vsock device and its in-process host endpoint,
//! the device event loop, VM state save/restore, and host detection / asset locations.
//! It knows nothing of the host<->guest protocol.

pub mod boot;
pub mod bus;
pub mod cpuid;
pub mod event_loop;
pub mod fork;
pub mod host;
pub mod memory;
pub mod mptable;
pub mod msr;
pub mod seccomp;
pub mod serial;
pub mod snapshot;
pub mod test_guest;
pub mod vcpu;
pub mod virtio;
pub mod vm;

pub use vm::{ExitReason, Vm, VmConfig, VmError, VmErrorKind};
/// vm-memory, whose `GuestMemoryMmap` [`Vm::memory`] returns.
pub use vm_memory;
