//! The Intel MultiProcessor Specification table that tells the guest how many CPUs it has
//! (Kiln guests have no ACPI; Linux finds CPUs through X86_MPPARSE).
//!
//! Layout at [`crate::memory::MPTABLE_START`]: the 16-byte floating pointer, then the
//! configuration table with one processor entry per vCPU, the ISA bus, the IOAPIC, one
//! I/O interrupt entry per IOAPIC pin and the two LAPIC local interrupts (ExtINT, NMI).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::memory::{APIC_ADDR, IOAPIC_ADDR, MPTABLE_START};

/// Largest vCPU count the table (and Kiln) supports.
pub const MAX_CPUS: u8 = 8;
/// IOAPIC pins described.
pub const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// Unsupported vCPU count.
    #[error("MP table supports 1..={MAX_CPUS} CPUs, asked for {0}")]
    CpuCount(u8),
    /// The table does not fit in guest memory.
    #[error("cannot write the MP table to guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, &b| a.wrapping_add(b))
        .wrapping_neg()
}

/// Builds the MP table bytes for `cpus` CPUs to be placed at guest address `base`.
pub fn build(cpus: u8, base: u64) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MpTableError::CpuCount(cpus));
    }
    let ioapic_id = cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = 1 | if id == 0 { 2 } else { 0 }; // enabled, BSP
        entries.extend_from_slice(&[0, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // FPU | APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        // type 3 (I/O interrupt), INT, default polarity/trigger, ISA bus irq -> same pin.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    // type 4 (local interrupt): ExtINT -> LINT0, NMI -> LINT1 on every LAPIC.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = HEADER_LEN + entries.len();
    let mut header = Vec::with_capacity(table_len);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&(table_len as u16).to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, below
    header.extend_from_slice(b"KILN    ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(APIC_ADDR as u32).to_le_bytes());
    header.extend_from_slice(&[0; 4]); // extended table length/checksum, reserved
    header.extend_from_slice(&entries);
    header[7] = checksum(&header);

    let mut out = Vec::with_capacity(FLOATING_LEN + table_len);
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&((base + FLOATING_LEN as u64) as u32).to_le_bytes());
    out.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length 1 (16 B), rev 1.4, checksum, features
    out[10] = checksum(&out);
    out.extend_from_slice(&header);
    Ok(out)
}

/// Writes the MP table for `cpus` CPUs into guest memory.
pub fn setup(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MpTableError> {
    let bytes = build(cpus, MPTABLE_START)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    #[test]
    fn checksums_and_counts_are_valid() {
        for cpus in 1..=MAX_CPUS {
            let t = build(cpus, MPTABLE_START).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
            let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(ptr, MPTABLE_START + 16);
            let cfg = &t[16..];
            assert_eq!(&cfg[0..4], b"PCMP");
            let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
            assert_eq!(len, cfg.len());
            assert_eq!(sum(cfg), 0, "config table checksum");
            let count = u16::from_le_bytes([cfg[34], cfg[35]]) as usize;
            // Walk the entries: processors are 20 bytes, the rest 8.
            let (mut off, mut n, mut procs) = (HEADER_LEN, 0, 0);
            while off < len {
                let size = if cfg[off] == 0 { 20 } else { 8 };
                if cfg[off] == 0 {
                    assert_eq!(cfg[off + 1], procs as u8, "APIC ids are 0..n");
                    procs += 1;
                }
                off += size;
                n += 1;
            }
            assert_eq!(off, len);
            assert_eq!(n, count);
            assert_eq!(procs, cpus as usize);
            assert!(
                MPTABLE_START as usize + t.len() <= 0xa0000,
                "fits in the EBDA"
            );
        }
    }

    #[test]
    fn rejects_bad_cpu_counts() {
        assert!(matches!(build(0, 0), Err(MpTableError::CpuCount(0))));
        assert!(matches!(build(9, 0), Err(MpTableError::CpuCount(9))));
    }
}
