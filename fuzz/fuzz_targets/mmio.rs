//! Fuzzes the virtio-mmio transport's register file as a hostile guest's vCPU writes it:
//! arbitrary reads and writes (any offset in the window, widths 1, 2, 4 and 8, any value)
//! against the real transport in front of a vsock or a block device over mock guest memory,
//! with the device's queue processing run after each notify (queue addresses the guest set
//! may be anywhere). Also saves the register file and restores it into a fresh transport.
//! Nothing may panic; a refused configuration must leave the transport answering.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use kiln_vmm::virtio::block::{BlockDevice, DiskConfig};
use kiln_vmm::virtio::mmio::{regs, MmioTransport, MMIO_MAGIC};
use kiln_vmm::virtio::testutil::test_mem;
use kiln_vmm::virtio::vsock::device::DeviceEvent;
use kiln_vmm::virtio::vsock::{VsockConfig, VsockDevice};
use kiln_vmm::virtio::{GuestMem, VirtioDevice};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

const MAX_OPS: usize = 512;

/// One backing file for every block device of this process (1 MiB).
fn disk() -> Option<&'static tempfile::NamedTempFile> {
    static DISK: OnceLock<Option<tempfile::NamedTempFile>> = OnceLock::new();
    DISK.get_or_init(|| {
        let f = tempfile::NamedTempFile::new_in("/dev/shm")
            .or_else(|_| tempfile::NamedTempFile::new())
            .ok()?;
        f.as_file().set_len(1 << 20).ok()?;
        Some(f)
    })
    .as_ref()
}

fn offset(u: &mut Unstructured<'_>) -> Result<u64> {
    const KNOWN: [u64; 24] = [
        regs::MAGIC,
        regs::VERSION,
        regs::DEVICE_ID,
        regs::DEVICE_FEATURES,
        regs::DEVICE_FEATURES_SEL,
        regs::DRIVER_FEATURES,
        regs::DRIVER_FEATURES_SEL,
        regs::QUEUE_SEL,
        regs::QUEUE_NUM_MAX,
        regs::QUEUE_NUM,
        regs::QUEUE_READY,
        regs::QUEUE_NOTIFY,
        regs::INTERRUPT_STATUS,
        regs::INTERRUPT_ACK,
        regs::STATUS,
        regs::STATUS,
        regs::QUEUE_DESC_LOW,
        regs::QUEUE_DESC_HIGH,
        regs::QUEUE_AVAIL_LOW,
        regs::QUEUE_AVAIL_HIGH,
        regs::QUEUE_USED_LOW,
        regs::QUEUE_USED_HIGH,
        regs::CONFIG_GENERATION,
        regs::CONFIG,
    ];
    Ok(if u.ratio(7, 8)? {
        KNOWN[usize::from(u.int_in_range(0..=23u8)?)]
            + if u.ratio(15, 16)? {
                0
            } else {
                u64::from(u.int_in_range(0..=7u8)?)
            }
    } else {
        u64::from(u.arbitrary::<u16>()?)
    })
}

fn value(u: &mut Unstructured<'_>) -> Result<u64> {
    Ok(match u.int_in_range(0..=3u8)? {
        0 => u64::from(u.int_in_range(0..=16u8)?),
        1 => u64::from(u.arbitrary::<u8>()?),
        // A guest address inside (or just past) the 64 MiB of memory.
        2 => u64::from(u.arbitrary::<u32>()? % (72 << 20)) & !0xf,
        _ => u.arbitrary()?,
    })
}

fn drive<D: VirtioDevice>(
    u: &mut Unstructured<'_>,
    mem: GuestMem,
    dev: Arc<Mutex<D>>,
    fresh: impl Fn() -> Option<Arc<Mutex<D>>>,
    process: impl Fn(&mut D),
) -> Result<()> {
    let Ok(mut t) = MmioTransport::new(mem.clone(), dev.clone()) else {
        return Ok(());
    };
    for _ in 0..MAX_OPS {
        if u.is_empty() {
            break;
        }
        let off = offset(u)?;
        let width = [1usize, 2, 4, 4, 4, 8][usize::from(u.int_in_range(0..=5u8)?)];
        if u.ratio(1, 3)? {
            let mut b = [0u8; 8];
            t.read(off, &mut b[..width]);
            if off == regs::MAGIC && width == 4 {
                assert_eq!(u32::from_le_bytes([b[0], b[1], b[2], b[3]]), MMIO_MAGIC);
            }
        } else {
            let v = value(u)?.to_le_bytes();
            t.write(off, &v[..width]);
            if off == regs::QUEUE_NOTIFY || u.ratio(1, 8)? {
                if let Ok(mut d) = dev.lock() {
                    process(&mut d);
                }
            }
        }
    }
    let st = t.save_state();
    if let Some(d2) = fresh() {
        if let Ok(mut t2) = MmioTransport::new(mem, d2.clone()) {
            if t2.restore_state(&st).is_ok() {
                assert_eq!(t2.save_state().status, st.status);
                if let Ok(mut d) = d2.lock() {
                    process(&mut d);
                }
            }
        }
    }
    Ok(())
}

fn vsock() -> Option<Arc<Mutex<VsockDevice>>> {
    VsockDevice::new(VsockConfig::default())
        .ok()
        .map(|d| Arc::new(Mutex::new(d)))
}

fn block(read_only: bool) -> Option<Arc<Mutex<BlockDevice>>> {
    let cfg = DiskConfig::new(disk()?.path(), read_only);
    BlockDevice::open(0, &cfg)
        .ok()
        .map(|d| Arc::new(Mutex::new(d)))
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let mem = test_mem();
    match u.int_in_range(0..=2u8)? {
        0 => {
            let Some(dev) = vsock() else { return Ok(()) };
            let _host = dev.lock().map(|d| d.host()).ok();
            drive(u, mem, dev, vsock, |d| {
                for ev in [
                    DeviceEvent::RxQueue,
                    DeviceEvent::TxQueue,
                    DeviceEvent::EventQueue,
                    DeviceEvent::HostWake,
                ] {
                    d.handle_event(ev);
                }
            })
        }
        n => {
            let ro = n == 2;
            let Some(dev) = block(ro) else { return Ok(()) };
            drive(u, mem, dev, || block(ro), |d| d.process_queue())
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = run(&mut u);
});
