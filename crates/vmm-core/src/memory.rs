//! Guest physical memory: the layout of the x86_64 guest address space and the
//! `GuestMemoryMmap` that backs it.
//!
//! RAM starts at 0. Everything from [`MMIO_START`] up to 4 GiB is a hole for device MMIO
//! (virtio-mmio slots, IOAPIC, LAPIC); RAM that does not fit below the hole continues at 4 GiB.
//! The backing is one memfd (sparse shmem, `MFD_ALLOW_SEALING`) holding every region back to
//! back, mapped `MAP_SHARED | MAP_NORESERVE`: nothing is zeroed or touched up front, pages
//! appear when the guest (or the loader) first uses them. The memfd is what makes a live fork
//! cheap: at a fork its pages become the frozen base the parent and the children map
//! `MAP_PRIVATE` (crate::fork, docs/SNAPSHOT.md "Live fork"). Guest RAM is `MADV_DONTDUMP`:
//! a core dump of the embedding process never carries guest memory.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use vm_memory::mmap::MmapRegion;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

/// Start of the MMIO hole below 4 GiB (virtio-mmio devices live here, 4 KiB apiece).
pub const MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const MMIO_SLOT_SIZE: u64 = 0x1000;
/// End of the MMIO window usable for devices (IOAPIC and LAPIC sit above).
pub const MMIO_DEVICES_END: u64 = 0xfec0_0000;
/// First address above the 32-bit hole.
pub const FOUR_GIB: u64 = 1 << 32;
/// GDT used at entry (the PVH and 64-bit boot protocols both need flat segments).
pub const GDT_START: u64 = 0x500;
/// Empty IDT at entry.
pub const IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initramfs), right after `hvm_start_info`.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux zero page (`boot_params`) for the 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack for the 64-bit boot protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PML4 of the identity map used for 64-bit entry (PDPT and PD follow, 4 KiB apart).
pub const PML4_START: u64 = 0x9000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest kernel command line we pass (Linux x86 COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// MP floating pointer + configuration table, at the top of base memory (EBDA).
pub const MPTABLE_START: u64 = 0x9fc00;
/// End of base (conventional) memory.
pub const EBDA_START: u64 = 0x9fc00;
/// Kernels are loaded at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// IOAPIC MMIO base.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// LAPIC MMIO base.
pub const APIC_ADDR: u64 = 0xfee0_0000;
/// KVM's TSS (needed by KVM on Intel; harmless elsewhere), in the hole above the devices.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity-map page, just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Errors building guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap of the guest RAM failed.
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    Map {
        /// Requested size.
        mib: u64,
        /// Cause (vm-memory's error).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Creating or sizing the memfd behind guest RAM failed.
    #[error("cannot create the {mib} MiB memfd behind guest memory: {source}")]
    Memfd {
        /// Requested size.
        mib: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// madvise(MADV_DONTDUMP) on the guest RAM failed.
    #[error("cannot exclude guest memory from core dumps: {source}")]
    DontDump {
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// The RAM ranges `(start, len)` for a guest of `mem_mib` MiB, avoiding the MMIO hole.
pub fn ram_ranges(mem_mib: u64) -> Vec<(GuestAddress, usize)> {
    let size = mem_mib << 20;
    if size <= MMIO_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_START as usize),
            (GuestAddress(FOUR_GIB), (size - MMIO_START) as usize),
        ]
    }
}

/// End (exclusive) of the RAM below the MMIO hole.
pub fn low_ram_end(mem_mib: u64) -> u64 {
    (mem_mib << 20).min(MMIO_START)
}

/// A new sparse memfd of `len` bytes that can be sealed (guest RAM, fork layers).
pub fn new_memfd(name: &str, len: u64) -> Result<File, std::io::Error> {
    let cname = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: `cname` is a valid NUL-terminated string; memfd_create only reads it.
    let fd =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len)?;
    Ok(file)
}

/// Maps `mem_mib` MiB of guest RAM from a new memfd, `MAP_SHARED` (lazily populated,
/// excluded from core dumps). Region i sits at file offset = the lengths of regions < i.
pub fn create_guest_memory(mem_mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let map_err = |source: Box<dyn std::error::Error + Send + Sync>| MemoryError::Map {
        mib: mem_mib,
        source,
    };
    let file = Arc::new(
        new_memfd("kiln-guest-ram", mem_mib << 20).map_err(|source| MemoryError::Memfd {
            mib: mem_mib,
            source,
        })?,
    );
    let mut regions = Vec::new();
    let mut off = 0u64;
    for (addr, len) in ram_ranges(mem_mib) {
        let region = MmapRegion::build(
            Some(FileOffset::from_arc(file.clone(), off)),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
        )
        .map_err(|e| map_err(Box::new(e)))?;
        regions.push(
            GuestRegionMmap::new(region, addr)
                .ok_or_else(|| map_err("region wraps the address space".into()))?,
        );
        off += len as u64;
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| map_err(Box::new(e)))?;
    exclude_from_core_dumps(&mem).map_err(|source| MemoryError::DontDump { source })?;
    Ok(mem)
}

/// `madvise(MADV_DONTDUMP)` on every region of `mem` (fresh or restored guest RAM).
pub fn exclude_from_core_dumps(mem: &GuestMemoryMmap) -> Result<(), std::io::Error> {
    for region in mem.iter() {
        let len = usize::try_from(region.len()).map_err(std::io::Error::other)?;
        // SAFETY: the range is exactly one live mapping owned by `mem`; MADV_DONTDUMP only
        // sets a VMA flag and never changes the memory's contents.
        let rc = unsafe { libc::madvise(region.as_ptr().cast(), len, libc::MADV_DONTDUMP) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The `VmFlags` of the mapping at `addr` in /proc/self/smaps (tests).
#[doc(hidden)]
pub fn vm_flags_of(addr: usize) -> Option<String> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut inside = false;
    for line in smaps.lines() {
        let range = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = range.split_once('-') {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                inside = (a..b).contains(&addr);
                continue;
            }
        }
        if inside {
            if let Some(flags) = line.strip_prefix("VmFlags:") {
                return Some(flags.trim().to_owned());
            }
        }
    }
    None
}

/// One e820 entry: `(start, len, type)`.
pub type E820Entry = (u64, u64, u32);
/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// The guest's e820 memory map for `mem_mib` MiB of RAM.
pub fn e820_map(mem_mib: u64) -> Vec<E820Entry> {
    let size = mem_mib << 20;
    let mut map = vec![(0, EBDA_START, E820_RAM)];
    map.push((EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED));
    let low_end = low_ram_end(mem_mib);
    if low_end > HIMEM_START {
        map.push((HIMEM_START, low_end - HIMEM_START, E820_RAM));
    }
    if size > MMIO_START {
        map.push((FOUR_GIB, size - MMIO_START, E820_RAM));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn guest_ram_is_not_dumped() {
        let mem = create_guest_memory(4096).unwrap();
        assert_eq!(mem.num_regions(), 2);
        for r in mem.iter() {
            let flags = vm_flags_of(r.as_ptr() as usize).unwrap();
            assert!(flags.split(' ').any(|f| f == "dd"), "VmFlags {flags}");
        }
        // A plain allocation is dumped: the check tells the two apart.
        let v = vec![1u8; 1 << 20];
        let flags = vm_flags_of(v.as_ptr() as usize).unwrap();
        assert!(!flags.split(' ').any(|f| f == "dd"), "VmFlags {flags}");
    }

    #[test]
    fn small_guest_is_one_region_below_the_hole() {
        let mem = create_guest_memory(16).unwrap();
        assert_eq!(mem.num_regions(), 1);
        mem.write_obj(0xdead_beefu32, GuestAddress(0xff_fffc))
            .unwrap();
        assert!(mem.write_obj(1u8, GuestAddress(16 << 20)).is_err());
        let e = e820_map(16);
        assert_eq!(e[0], (0, EBDA_START, E820_RAM));
        assert_eq!(e[2], (HIMEM_START, (16 << 20) - HIMEM_START, E820_RAM));
    }

    #[test]
    fn large_guest_splits_around_the_mmio_hole() {
        let r = ram_ranges(4096);
        assert_eq!(r[0], (GuestAddress(0), MMIO_START as usize));
        assert_eq!(
            r[1],
            (
                GuestAddress(FOUR_GIB),
                (4096u64 << 20) as usize - MMIO_START as usize
            )
        );
        let e = e820_map(4096);
        let total: u64 = e.iter().filter(|x| x.2 == E820_RAM).map(|x| x.1).sum();
        assert_eq!(total, (4096u64 << 20) - (HIMEM_START - EBDA_START));
        assert!(e
            .iter()
            .all(|&(s, l, _)| s + l <= MMIO_START || s >= FOUR_GIB));
    }
}
