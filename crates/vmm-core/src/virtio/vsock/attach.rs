//! Attaching a vsock device to a VM being built: MMIO window, irqfd, one ioeventfd per
//! queue, the event-loop subscriber and the `virtio_mmio.device=` command-line entry.

use std::sync::{Arc, Mutex};

use super::{VsockConfig, VsockDevice, VsockHost};
use crate::virtio::mmio::{regs, MmioTransport};
use crate::vm::{DeviceContext, MmioSlot, VmErrorKind};

/// A vsock device attached to a VM: its host endpoint, and the device and transport for
/// snapshot save/restore (lock the transport only with the vCPUs paused).
#[derive(Debug)]
pub struct AttachedVsock {
    /// Host endpoint.
    pub host: VsockHost,
    /// The device (also an event-loop subscriber).
    pub device: Arc<Mutex<VsockDevice>>,
    /// Its virtio-mmio transport (also on the MMIO bus).
    pub transport: Arc<Mutex<MmioTransport<VsockDevice>>>,
    /// MMIO window and GSI.
    pub slot: MmioSlot,
}

/// Create a vsock device for `cfg`, wire it into the VM through `ctx`, and return its
/// handles.
pub fn attach(ctx: &mut DeviceContext<'_>, cfg: VsockConfig) -> Result<AttachedVsock, VmErrorKind> {
    let slot = ctx.allocate_mmio_slot()?;
    let irq = ctx.irqfd(slot.gsi)?;
    let queue_evts = (0..3u32)
        .map(|q| ctx.ioeventfd(slot.base + regs::QUEUE_NOTIFY, Some(q)))
        .collect::<Result<Vec<_>, _>>()?;
    let dev = VsockDevice::with_eventfds(cfg, queue_evts, irq)
        .map_err(VmErrorKind::device::<super::VsockError>("virtio-vsock"))?;
    let host = dev.host();
    let dev = Arc::new(Mutex::new(dev));
    let transport =
        MmioTransport::new(ctx.memory().clone(), dev.clone()).map_err(VmErrorKind::device::<
            std::io::Error,
        >(
            "virtio-vsock transport",
        ))?;
    let transport = Arc::new(Mutex::new(transport));
    ctx.register_mmio(slot, transport.clone())?;
    ctx.add_cmdline(slot.virtio_cmdline());
    ctx.add_subscriber(dev.clone());
    Ok(AttachedVsock {
        host,
        device: dev,
        transport,
        slot,
    })
}
