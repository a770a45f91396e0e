//! Fuzzes the virtio-blk device with guest-written requests: the real MMIO transport and
//! device over mock guest memory (`kiln_vmm::virtio::testutil`) and a 1 MiB backing file,
//! fed request chains with arbitrary header fields (type, sector), any number of data
//! descriptors with arbitrary addresses, lengths and flags, missing or misplaced status
//! descriptors, raw descriptor-table writes, forged avail indices and notifies, on
//! read-write and read-only disks. Nothing may panic, hang, or touch the backing file
//! outside its size.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use kiln_vmm::virtio::block::{
    BlockDevice, DiskConfig, SECTOR_SIZE, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use kiln_vmm::virtio::mmio::{regs, MmioTransport};
use kiln_vmm::virtio::testutil::{test_mem, GuestQueue, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use kiln_vmm::virtio::{STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK};
use libfuzzer_sys::arbitrary::{Error, Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

const QBASE: u64 = 0x1_0000;
const HDR_BASE: u64 = 0x10_0000;
const DATA: u64 = 0x100_0000;
const DISK_BYTES: u64 = 1 << 20;
const MAX_OPS: usize = 128;

/// One backing file per process and mode.
fn disk() -> Option<&'static tempfile::NamedTempFile> {
    static DISK: OnceLock<Option<tempfile::NamedTempFile>> = OnceLock::new();
    DISK.get_or_init(|| {
        let f = tempfile::NamedTempFile::new_in("/dev/shm")
            .or_else(|_| tempfile::NamedTempFile::new())
            .ok()?;
        f.as_file().set_len(DISK_BYTES).ok()?;
        Some(f)
    })
    .as_ref()
}

fn w32(t: &mut MmioTransport<BlockDevice>, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn r32(t: &mut MmioTransport<BlockDevice>, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn addr(u: &mut Unstructured<'_>) -> Result<u64> {
    Ok(match u.int_in_range(0..=7u8)? {
        0..=5 => DATA + u64::from(u.arbitrary::<u16>()?) * 16,
        6 => u64::from(u.arbitrary::<u32>()?) % (80 << 20),
        _ => u.arbitrary()?,
    })
}

fn len(u: &mut Unstructured<'_>) -> Result<u32> {
    Ok(match u.int_in_range(0..=5u8)? {
        0 | 1 => 512 * u32::from(u.int_in_range(1..=8u8)?),
        2 => u32::from(u.arbitrary::<u16>()?),
        3 => 512 * u32::from(u.arbitrary::<u8>()?),
        4 => u32::from(u.arbitrary::<u8>()?),
        _ => u.arbitrary()?,
    })
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let mem = test_mem();
    let mut cfg = DiskConfig::new(disk().ok_or(Error::IncorrectFormat)?.path(), u.ratio(1, 4)?);
    if u.ratio(1, 8)? {
        cfg.id = Some("fuzz-disk".into());
    }
    let dev = Arc::new(Mutex::new(
        BlockDevice::open(0, &cfg).map_err(|_| Error::IncorrectFormat)?,
    ));
    let mut t = MmioTransport::new(mem.clone(), dev.clone()).map_err(|_| Error::IncorrectFormat)?;
    let mut q = GuestQueue::new(&mem, QBASE, 256);

    // The Linux driver's initialisation, accepting a fuzzed subset of the offered features.
    w32(&mut t, regs::STATUS, STATUS_ACKNOWLEDGE);
    w32(&mut t, regs::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    w32(&mut t, regs::DEVICE_FEATURES_SEL, 0);
    let lo = r32(&mut t, regs::DEVICE_FEATURES) & if u.ratio(3, 4)? { !0 } else { u.arbitrary()? };
    w32(&mut t, regs::DEVICE_FEATURES_SEL, 1);
    let hi = r32(&mut t, regs::DEVICE_FEATURES);
    w32(&mut t, regs::DRIVER_FEATURES_SEL, 0);
    w32(&mut t, regs::DRIVER_FEATURES, lo);
    w32(&mut t, regs::DRIVER_FEATURES_SEL, 1);
    w32(&mut t, regs::DRIVER_FEATURES, hi);
    let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
    w32(&mut t, regs::STATUS, s);
    w32(&mut t, regs::QUEUE_SEL, 0);
    w32(&mut t, regs::QUEUE_NUM, u32::from(q.size));
    w32(&mut t, regs::QUEUE_DESC_LOW, q.desc_addr() as u32);
    w32(&mut t, regs::QUEUE_DESC_HIGH, 0);
    w32(&mut t, regs::QUEUE_AVAIL_LOW, q.avail_addr() as u32);
    w32(&mut t, regs::QUEUE_AVAIL_HIGH, 0);
    w32(&mut t, regs::QUEUE_USED_LOW, q.used_addr() as u32);
    w32(&mut t, regs::QUEUE_USED_HIGH, 0);
    w32(&mut t, regs::QUEUE_READY, 1);
    w32(&mut t, regs::STATUS, s | STATUS_DRIVER_OK);
    if !t.is_activated() {
        return Ok(());
    }

    let mut slot = 0u64;
    for _ in 0..MAX_OPS {
        if u.is_empty() {
            break;
        }
        match u.int_in_range(0..=9u8)? {
            // A request chain: header, data segments, status.
            0..=5 => {
                while q.pop_used(&mem).is_some() {}
                let nseg = usize::from(u.int_in_range(0..=6u8)?);
                if q.free_count() < nseg + 2 {
                    continue;
                }
                let type_ = match u.int_in_range(0..=5u8)? {
                    0 | 1 => VIRTIO_BLK_T_IN,
                    2 | 3 => VIRTIO_BLK_T_OUT,
                    4 => [VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID]
                        [usize::from(u.arbitrary::<bool>()?)],
                    _ => u.arbitrary()?,
                };
                let sector: u64 = if u.ratio(7, 8)? {
                    u64::from(u.arbitrary::<u16>()?) % (DISK_BYTES / SECTOR_SIZE + 16)
                } else {
                    u.arbitrary()?
                };
                let h = HDR_BASE + (slot % 256) * 32;
                let st = h + 16;
                slot += 1;
                let mut hb = [0u8; 16];
                hb[..4].copy_from_slice(&type_.to_le_bytes());
                hb[4..8].copy_from_slice(&u.arbitrary::<u32>()?.to_le_bytes());
                hb[8..].copy_from_slice(&sector.to_le_bytes());
                let _ = mem.write_slice(&hb, GuestAddress(h));
                let mut bufs = vec![(
                    h,
                    if u.ratio(15, 16)? { 16 } else { len(u)? },
                    u.ratio(1, 16)?,
                )];
                for _ in 0..nseg {
                    let w = if type_ == VIRTIO_BLK_T_OUT {
                        u.ratio(1, 8)?
                    } else {
                        u.ratio(7, 8)?
                    };
                    bufs.push((addr(u)?, len(u)?, w));
                }
                if u.ratio(15, 16)? {
                    bufs.push((
                        st,
                        if u.ratio(15, 16)? { 1 } else { len(u)? },
                        u.ratio(15, 16)?,
                    ));
                }
                if q.add_chain(&mem, &bufs).is_some() && u.ratio(7, 8)? {
                    w32(&mut t, regs::QUEUE_NOTIFY, 0);
                    if let Ok(mut d) = dev.lock() {
                        let _ = d.queue_evt().read();
                        d.process_queue();
                    }
                }
            }
            // A raw descriptor anywhere in the table, maybe published as a head.
            6 => {
                let idx = u16::from(u.arbitrary::<u8>()?);
                let flags = u.arbitrary::<u16>()?
                    & if u.ratio(7, 8)? {
                        VRING_DESC_F_NEXT | VRING_DESC_F_WRITE
                    } else {
                        0xffff
                    };
                let d = Descriptor::new(addr(u)?, len(u)?, flags, u.arbitrary::<u16>()? % 300);
                q.write_desc(&mem, idx, d);
                if u.ratio(1, 2)? {
                    q.publish(&mem, idx);
                }
            }
            7 => {
                let v = u.arbitrary()?;
                q.set_avail_idx(&mem, v);
            }
            8 => {
                w32(&mut t, regs::QUEUE_NOTIFY, 0);
                if let Ok(mut d) = dev.lock() {
                    d.process_queue();
                }
            }
            _ => {
                let off = u64::from(u.arbitrary::<u8>()?) & !3;
                let v = u.arbitrary::<u32>()?;
                if off != regs::STATUS || u.ratio(1, 4)? {
                    w32(&mut t, off, v);
                }
            }
        }
    }
    if let Ok(mut d) = dev.lock() {
        d.process_queue();
    }
    let len = disk().map_or(0, |f| f.as_file().metadata().map_or(0, |m| m.len()));
    assert_eq!(
        len, DISK_BYTES,
        "the device changed the backing file's size"
    );
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = run(&mut u);
});
