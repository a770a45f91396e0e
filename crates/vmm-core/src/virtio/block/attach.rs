//! Attaching a VM's disks while the VM is built: per disk one MMIO window + GSI, the irqfd,
//! the queue ioeventfd, the transport on the MMIO bus and the `virtio_mmio.device=` entry;
//! and one block I/O thread (`<vm>-blk`) for all of the VM's disks.
//!
//! Why a thread of its own rather than the device event loop: a request is handled to
//! completion with a blocking `preadv`/`pwritev`/`fdatasync`, which may take milliseconds
//! on a slow or contended host disk; on the shared loop that would stall vsock (the agent's
//! control channel) behind disk I/O. The block thread only ever touches guest memory, the
//! rings and the backing files, so it can get a seccomp filter of its own ("block I/O"
//! thread kind). The disks of one VM share the thread; each yields after a bounded number of
//! requests per wake-up.

use std::sync::{Arc, Mutex};

use super::{BlockDevice, DiskConfig};
use crate::event_loop::{DeviceEventManager, EventLoop};
use crate::seccomp::{SeccompMode, ThreadKind};
use crate::virtio::mmio::{regs, MmioTransport};
use crate::vm::{DeviceContext, MmioSlot, VmErrorKind};

/// One disk attached to a VM: the device and transport for snapshot save/restore (lock the
/// transport only with the vCPUs paused), and its MMIO window and GSI.
#[derive(Debug)]
pub struct AttachedBlock {
    /// The device (a subscriber of the block I/O thread).
    pub device: Arc<Mutex<BlockDevice>>,
    /// Its virtio-mmio transport (also on the MMIO bus).
    pub transport: Arc<Mutex<MmioTransport<BlockDevice>>>,
    /// MMIO window and GSI.
    pub slot: MmioSlot,
}

/// The disks of a VM and their I/O thread (stopped and joined when this is dropped).
#[derive(Debug, Default)]
pub struct AttachedBlocks {
    /// The disks, in configuration order (the guest's vda, vdb, ...).
    pub disks: Vec<AttachedBlock>,
    io_loop: Option<EventLoop>,
}

/// Open every disk of `disks`, wire each into the VM through `ctx`, and start the VM's block
/// I/O thread (none without disks).
pub fn attach_all(
    ctx: &mut DeviceContext<'_>,
    disks: &[DiskConfig],
    seccomp: SeccompMode,
) -> Result<AttachedBlocks, VmErrorKind> {
    let mut out = AttachedBlocks::default();
    if disks.is_empty() {
        return Ok(out);
    }
    let vm = ctx.vm_name().to_owned();
    let mut manager = DeviceEventManager::new().map_err(VmErrorKind::EventManager)?;
    for (index, cfg) in disks.iter().enumerate() {
        let slot = ctx.allocate_mmio_slot()?;
        let irq = ctx.irqfd(slot.gsi)?;
        let queue_evt = ctx.ioeventfd(slot.base + regs::QUEUE_NOTIFY, Some(0))?;
        let dev = BlockDevice::with_eventfds(index, cfg, queue_evt, irq).map_err(|source| {
            VmErrorKind::Disk {
                index,
                source: Box::new(source),
            }
        })?;
        let dev = Arc::new(Mutex::new(dev));
        let transport = MmioTransport::new(ctx.memory().clone(), dev.clone()).map_err(|e| {
            VmErrorKind::Device {
                device: "virtio-blk transport",
                source: Box::new(e),
            }
        })?;
        let transport = Arc::new(Mutex::new(transport));
        ctx.register_mmio(slot, transport.clone())?;
        ctx.add_cmdline(slot.virtio_cmdline());
        event_manager::SubscriberOps::add_subscriber(&mut manager, dev.clone());
        out.disks.push(AttachedBlock {
            device: dev,
            transport,
            slot,
        });
    }
    out.io_loop = Some(
        EventLoop::spawn_named(
            &vm,
            &format!("{vm}-blk"),
            manager,
            ThreadKind::BlockIo,
            seccomp,
        )
        .map_err(VmErrorKind::os("block I/O thread"))?,
    );
    Ok(out)
}
