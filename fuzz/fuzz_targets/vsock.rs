//! Fuzzes the virtio-vsock device as a hostile guest drives it: the real MMIO transport and
//! device over mock guest memory (`kiln_vmm::virtio::testutil`, the tier-1 test driver), fed
//! well-formed packets with arbitrary header fields, raw guest-written descriptors (any
//! address, length, flags, next index), garbage bytes where headers are read, forged avail
//! indices, queue notifies, register writes, and host-side reads, writes, shutdowns and
//! resets. Nothing may panic, hang, or grow without bound.
#![no_main]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::Duration;

use kiln_vmm::virtio::mmio::regs;
use kiln_vmm::virtio::testutil::{TestGuest, RXQ_BASE, TX_BUF, VRING_DESC_F_NEXT};
use kiln_vmm::virtio::vsock::device::DeviceEvent;
use kiln_vmm::virtio::vsock::packet::{Header, HDR_SIZE};
use kiln_vmm::virtio::vsock::{VsockStream, EVQ, RXQ, TXQ};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

/// Operations per input (bounds the time one input takes).
const MAX_OPS: usize = 256;

fn addr(u: &mut Unstructured<'_>) -> Result<u64> {
    Ok(match u.int_in_range(0..=3u8)? {
        // Inside the TX buffer area.
        0 | 1 => TX_BUF + u64::from(u.arbitrary::<u16>()?),
        // Anywhere in (or just past) the 64 MiB of guest memory.
        2 => u64::from(u.arbitrary::<u32>()?) % (80 << 20),
        _ => u.arbitrary()?,
    })
}

fn len(u: &mut Unstructured<'_>) -> Result<u32> {
    Ok(match u.int_in_range(0..=3u8)? {
        0 => HDR_SIZE as u32,
        1 => u32::from(u.arbitrary::<u8>()?),
        2 => u32::from(u.arbitrary::<u16>()?),
        _ => u.arbitrary()?,
    })
}

fn header(u: &mut Unstructured<'_>, g: &TestGuest) -> Result<Header> {
    Ok(Header {
        src_cid: if u.ratio(7, 8)? {
            g.cid
        } else {
            u.arbitrary()?
        },
        dst_cid: if u.ratio(7, 8)? { 2 } else { u.arbitrary()? },
        src_port: if u.ratio(3, 4)? {
            40000 + u32::from(u.int_in_range(0..=3u8)?)
        } else {
            u.arbitrary()?
        },
        dst_port: if u.ratio(3, 4)? { 1024 } else { u.arbitrary()? },
        len: 0,
        type_: if u.ratio(7, 8)? { 1 } else { u.arbitrary()? },
        op: u.int_in_range(0..=8u16)?,
        flags: u.arbitrary::<u8>()?.into(),
        buf_alloc: u.arbitrary()?,
        fwd_cnt: u.arbitrary()?,
    })
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let mut g = TestGuest::new();
    let listener = g
        .host
        .listen(1024)
        .map_err(|_| libfuzzer_sys::arbitrary::Error::IncorrectFormat)?;
    let mut streams: Vec<VsockStream> = Vec::new();
    g.post_rx(usize::from(u.int_in_range(0..=64u8)?));
    for _ in 0..MAX_OPS {
        if u.is_empty() {
            break;
        }
        match u.int_in_range(0..=13u8)? {
            // A well-formed chain carrying a fuzzed header and payload.
            0..=3 => {
                g.reclaim_tx();
                if g.tx.free_count() >= 2 {
                    let h = header(u, &g)?;
                    let n = usize::from(u.arbitrary::<u8>()?);
                    let data = u.bytes(n.min(u.len()))?.to_vec();
                    g.send_hdr(h, &data);
                    if u.ratio(1, 4)? {
                        // The header claims another length than the chain carries.
                        let mut h = h;
                        h.len = len(u)?;
                        g.mem
                            .write_slice(&h.to_bytes(), GuestAddress(TX_BUF))
                            .map_err(|_| libfuzzer_sys::arbitrary::Error::IncorrectFormat)?;
                    }
                }
            }
            // A raw descriptor written anywhere in a queue's table.
            4 | 5 => {
                let idx = u.arbitrary::<u8>()?;
                let flags = u.arbitrary::<u16>()? & if u.ratio(7, 8)? { 3 } else { 0xffff };
                let d = Descriptor::new(addr(u)?, len(u)?, flags, u16::from(u.arbitrary::<u8>()?));
                let q = match u.int_in_range(0..=3u8)? {
                    0 => &g.rx,
                    3 => &g.ev,
                    _ => &g.tx,
                };
                if u16::from(idx) < q.size {
                    q.write_desc(&g.mem, u16::from(idx), d);
                }
                if u.ratio(1, 2)? {
                    let q = match u.int_in_range(0..=2u8)? {
                        0 => &mut g.rx,
                        1 => &mut g.tx,
                        _ => &mut g.ev,
                    };
                    let head = u16::from(idx) % q.size;
                    q.publish(&g.mem, head);
                }
            }
            // Garbage where the device reads headers or rings.
            6 => {
                let at = if u.ratio(3, 4)? {
                    TX_BUF + u64::from(u.arbitrary::<u16>()?)
                } else {
                    RXQ_BASE + u64::from(u.arbitrary::<u32>()? % 0x3_0000)
                };
                let n = usize::from(u.int_in_range(1..=64u8)?);
                let bytes = u.bytes(n.min(u.len()))?.to_vec();
                let _ = g.mem.write_slice(&bytes, GuestAddress(at));
            }
            // A two-descriptor chain with a fuzzed header in a fresh slot, flags from the input.
            7 => {
                if g.tx.free_count() >= 2 {
                    let i = g.tx.take_index();
                    let d = g.tx.take_index();
                    let slot = TX_BUF + u64::from(i) * 0x1_0000;
                    let mut h = header(u, &g)?;
                    h.len = len(u)?;
                    let _ = g.mem.write_slice(&h.to_bytes(), GuestAddress(slot));
                    g.tx.publish_descs(
                        &g.mem,
                        &[
                            (
                                i,
                                Descriptor::new(
                                    slot,
                                    len(u)?,
                                    VRING_DESC_F_NEXT | (u.arbitrary::<u16>()? & 2),
                                    d,
                                ),
                            ),
                            (
                                d,
                                Descriptor::new(
                                    slot + 0x100,
                                    len(u)?,
                                    u.arbitrary::<u16>()? & 3,
                                    u.arbitrary()?,
                                ),
                            ),
                        ],
                    );
                    g.notify(TXQ);
                }
            }
            8 => {
                let q = [RXQ, TXQ, EVQ][usize::from(u.int_in_range(0..=2u8)?)];
                let v = u.arbitrary::<u16>()?;
                match q {
                    RXQ => g.rx.set_avail_idx(&g.mem, v),
                    TXQ => g.tx.set_avail_idx(&g.mem, v),
                    _ => g.ev.set_avail_idx(&g.mem, v),
                }
            }
            9 => {
                let q = usize::from(u.int_in_range(0..=3u8)?);
                g.notify(q);
            }
            10 => g.post_rx(usize::from(u.int_in_range(0..=16u8)?)),
            // The host side.
            11 => {
                if streams.len() < 4 {
                    if let Ok(s) = listener.accept(Duration::ZERO) {
                        streams.push(s);
                    }
                }
                if !streams.is_empty() {
                    let i = usize::from(u.arbitrary::<u8>()?) % streams.len();
                    match u.int_in_range(0..=4u8)? {
                        0 => {
                            let _ = streams[i].set_write_timeout(Some(Duration::from_micros(1)));
                            let n = usize::from(u.arbitrary::<u16>()?);
                            let _ = streams[i].write(&vec![0x5a; n]);
                        }
                        1 => {
                            if streams[i].available() > 0 {
                                let mut b = [0u8; 512];
                                let _ = streams[i].read(&mut b);
                            }
                        }
                        2 => {
                            let _ = streams[i].shutdown(Shutdown::Write);
                        }
                        3 => {
                            let _ = streams[i].shutdown(Shutdown::Both);
                        }
                        _ => {
                            streams.swap_remove(i);
                        }
                    }
                }
                g.pump();
            }
            // Drain the used rings the way a (careless) driver would.
            12 => {
                while g.rx.pop_used(&g.mem).is_some() {}
                g.reclaim_tx();
                while g.ev.pop_used(&g.mem).is_some() {}
                if u.ratio(1, 2)? {
                    g.dev
                        .lock()
                        .map_err(|_| libfuzzer_sys::arbitrary::Error::IncorrectFormat)?
                        .handle_event(DeviceEvent::Timer);
                }
            }
            // Transport-level disruption: a register write or a host-side reset.
            _ => match u.int_in_range(0..=3u8)? {
                0 => {
                    let off = u64::from(u.arbitrary::<u8>()?) & !3;
                    let v = u.arbitrary::<u32>()?;
                    if off != regs::STATUS || u.ratio(1, 4)? {
                        g.w32(off, v);
                    }
                }
                1 => g.host.transport_reset(),
                2 => {
                    let _ = g.r32(regs::INTERRUPT_STATUS);
                    g.w32(regs::INTERRUPT_ACK, 3);
                }
                _ => g.pump(),
            },
        }
    }
    g.pump();
    drop(streams);
    g.pump();
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = run(&mut u);
});
