//! x86_64 boot: load the kernel (ELF `vmlinux` through PVH, or a bzImage / PVH-less ELF through
//! the Linux 64-bit boot protocol), the initramfs and the command line, write the boot
//! information the entry expects, and give the boot vCPU its entry registers.
//!
//! PVH entry: 32-bit protected mode, paging off, flat segments, `%ebx` = `hvm_start_info`.
//! 64-bit entry: long mode on our identity-mapped page tables (first 1 GiB), `%rsi` = zero page.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::memory::*;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const PAGE_SIZE: u64 = 4096;

/// Base of every Kiln kernel command line (see docs/ARCHITECTURE.md).
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=t panic=-1";

/// Errors while preparing the guest to boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel (or initramfs) file cannot be opened or read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// linux-loader rejected the kernel image.
    #[error("cannot load kernel {path}: {source}")]
    Load {
        /// The kernel.
        path: PathBuf,
        /// Cause.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The command line is invalid or too long.
    #[error("kernel command line: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    /// The command line could not be written.
    #[error("cannot write the kernel command line: {0}")]
    CmdlineWrite(linux_loader::loader::Error),
    /// The initramfs does not fit in guest RAM.
    #[error("initramfs {path} ({size} bytes) does not fit in guest RAM below {limit:#x}")]
    InitramfsTooBig {
        /// The initramfs.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Where RAM ends.
        limit: u64,
    },
    /// Writing boot structures to guest memory failed.
    #[error("cannot write {what} to guest memory: {source}")]
    Write {
        /// Which structure.
        what: &'static str,
        /// Cause (vm-memory's or linux-loader's error).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The memory map has more entries than the zero page's e820 table holds.
    #[error("cannot write e820 table to guest memory: too many entries")]
    E820Full,
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: 32-bit protected mode at `entry`, `%ebx` = [`PVH_INFO_START`].
    Pvh,
    /// Linux 64-bit boot protocol at `entry`, `%rsi` = [`ZERO_PAGE_START`].
    Linux64,
}

/// Where and how to start the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntry {
    /// Entry mode.
    pub mode: EntryMode,
    /// Entry address.
    pub entry: u64,
}

/// Assembles the kernel command line: the Kiln base, device fragments (in registration
/// order), then the user's extra arguments.
pub fn build_cmdline(devices: &[String], extra: &str) -> Result<Cmdline, BootError> {
    let mut c = Cmdline::new(CMDLINE_MAX_SIZE)?;
    c.insert_str(BASE_CMDLINE)?;
    for d in devices {
        c.insert_str(d)?;
    }
    let extra = extra.trim();
    if !extra.is_empty() {
        c.insert_str(extra)?;
    }
    Ok(c)
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> BootError + '_ {
    move |source| BootError::Read {
        path: path.to_owned(),
        source,
    }
}

fn write_err<E: std::error::Error + Send + Sync + 'static>(
    what: &'static str,
) -> impl FnOnce(E) -> BootError {
    move |e| BootError::Write {
        what,
        source: Box::new(e),
    }
}

/// Loads the initramfs at the top of low RAM (page aligned); returns `(addr, size)`.
fn load_initramfs(
    mem: &GuestMemoryMmap,
    mem_mib: u64,
    path: &Path,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let mut f = File::open(path).map_err(read_err(path))?;
    let size = f.seek(SeekFrom::End(0)).map_err(read_err(path))?;
    f.seek(SeekFrom::Start(0)).map_err(read_err(path))?;
    let limit = low_ram_end(mem_mib);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|&a| a >= kernel_end)
        .ok_or_else(|| BootError::InitramfsTooBig {
            path: path.to_owned(),
            size,
            limit,
        })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(write_err("initramfs"))?;
    Ok((addr, size))
}

/// A kernel (and initramfs) loaded into guest memory, before the boot information is written.
#[derive(Debug)]
pub struct LoadedKernel {
    res: linux_loader::loader::KernelLoaderResult,
    bzimage: bool,
    initrd: Option<(u64, u64)>,
}

/// Loads kernel, initramfs and command line into `mem` and writes the boot information.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_mib: u64,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &Cmdline,
) -> Result<BootEntry, BootError> {
    let loaded = load_kernel(mem, mem_mib, kernel, initramfs)?;
    write_boot_info(mem, mem_mib, loaded, cmdline)
}

/// Loads the kernel image and the initramfs into `mem` (the part that does not depend on the
/// command line, so it can run while devices are still being set up).
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    mem_mib: u64,
    kernel: &Path,
    initramfs: Option<&Path>,
) -> Result<LoadedKernel, BootError> {
    let mut f = File::open(kernel).map_err(read_err(kernel))?;
    let mut magic = [0u8; 4];
    f.read_exact(&mut magic).map_err(read_err(kernel))?;
    f.seek(SeekFrom::Start(0)).map_err(read_err(kernel))?;
    let load_err = |source| BootError::Load {
        path: kernel.to_owned(),
        source,
    };
    let himem = Some(GuestAddress(HIMEM_START));
    let (res, bzimage) = if magic == *b"\x7fELF" {
        (
            Elf::load(mem, None, &mut f, himem).map_err(load_err)?,
            false,
        )
    } else {
        (
            BzImage::load(mem, None, &mut f, himem).map_err(load_err)?,
            true,
        )
    };
    drop(f);
    let initrd = match initramfs {
        Some(p) => Some(load_initramfs(mem, mem_mib, p, res.kernel_end)?),
        None => None,
    };
    Ok(LoadedKernel {
        res,
        bzimage,
        initrd,
    })
}

/// Writes the command line and the boot information (PVH `hvm_start_info` or the Linux zero
/// page) for a loaded kernel; returns how to enter it.
pub fn write_boot_info(
    mem: &GuestMemoryMmap,
    mem_mib: u64,
    loaded: LoadedKernel,
    cmdline: &Cmdline,
) -> Result<BootEntry, BootError> {
    let LoadedKernel {
        res,
        bzimage,
        initrd,
    } = loaded;
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(BootError::CmdlineWrite)?;
    let cmdline_len = cmdline.as_cstring()?.as_bytes().len() as u32;
    let e820 = e820_map(mem_mib);

    match res.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) if !bzimage => {
            let mut info = hvm_start_info {
                magic: XEN_HVM_START_MAGIC,
                version: 1,
                cmdline_paddr: CMDLINE_START,
                memmap_paddr: PVH_MEMMAP_START,
                memmap_entries: e820.len() as u32,
                ..Default::default()
            };
            let memmap: Vec<hvm_memmap_table_entry> = e820
                .iter()
                .map(|&(addr, size, type_)| hvm_memmap_table_entry {
                    addr,
                    size,
                    type_,
                    reserved: 0,
                })
                .collect();
            let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
            if let Some((addr, size)) = initrd {
                info.nr_modules = 1;
                info.modlist_paddr = PVH_MODLIST_START;
                params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
                let module = hvm_modlist_entry {
                    paddr: addr,
                    size,
                    ..Default::default()
                };
                params.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
            }
            params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
            PvhBootConfigurator::write_bootparams(&params, mem)
                .map_err(write_err("hvm_start_info"))?;
            Ok(BootEntry {
                mode: EntryMode::Pvh,
                entry: entry.0,
            })
        }
        _ => {
            let mut bp = boot_params::default();
            if let Some(hdr) = res.setup_header {
                bp.hdr = hdr;
            }
            bp.hdr.type_of_loader = KERNEL_LOADER_OTHER;
            bp.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            bp.hdr.header = KERNEL_HDR_MAGIC;
            bp.hdr.cmd_line_ptr = CMDLINE_START as u32;
            bp.hdr.cmdline_size = cmdline_len;
            bp.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
            if let Some((addr, size)) = initrd {
                bp.hdr.ramdisk_image = addr as u32;
                bp.hdr.ramdisk_size = size as u32;
            }
            for (i, &(addr, size, type_)) in e820.iter().enumerate() {
                let slot = bp.e820_table.get_mut(i).ok_or(BootError::E820Full)?;
                *slot = boot_e820_entry {
                    addr,
                    size,
                    r#type: type_,
                };
            }
            bp.e820_entries = e820.len() as u8;
            LinuxBootConfigurator::write_bootparams(
                &BootParams::new(&bp, GuestAddress(ZERO_PAGE_START)),
                mem,
            )
            .map_err(write_err("boot_params"))?;
            // bzImage: the 64-bit entry is 0x200 past the protected-mode code.
            let entry = if bzimage {
                res.kernel_load.0 + 0x200
            } else {
                res.kernel_load.0
            };
            Ok(BootEntry {
                mode: EntryMode::Linux64,
                entry,
            })
        }
    }
}

const GDT_CODE64: u64 = 0x00af_9b00_0000_ffff;
const GDT_CODE32: u64 = 0x00cf_9b00_0000_ffff;
const GDT_DATA: u64 = 0x00cf_9300_0000_ffff;
const GDT_TSS: u64 = 0x0000_8b00_0000_0067;
/// Boot code selector (Linux's `__BOOT_CS`).
pub const BOOT_CS: u16 = 0x10;
/// Boot data selector (Linux's `__BOOT_DS`).
pub const BOOT_DS: u16 = 0x18;
const BOOT_TSS: u16 = 0x20;

fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    kvm_segment {
        base: (((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000)),
        limit: {
            let l = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
            if (entry >> 55) & 1 == 1 {
                (l << 12) | 0xfff
            } else {
                l
            }
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the entry GDT/IDT (and, for 64-bit entry, the identity page tables) and returns the
/// boot vCPU's special and general registers. `sregs` is the vCPU's current state.
pub fn entry_registers(
    mem: &GuestMemoryMmap,
    entry: BootEntry,
    mut sregs: kvm_sregs,
) -> Result<(kvm_sregs, kvm_regs), BootError> {
    let code = match entry.mode {
        EntryMode::Pvh => GDT_CODE32,
        EntryMode::Linux64 => GDT_CODE64,
    };
    let gdt = [0u64, 0, code, GDT_DATA, GDT_TSS];
    for (i, d) in gdt.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT_START + 8 * i as u64))
            .map_err(write_err("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))
        .map_err(write_err("IDT"))?;
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    let cs = segment_from_gdt(code, BOOT_CS);
    let ds = segment_from_gdt(GDT_DATA, BOOT_DS);
    sregs.cs = cs;
    sregs.ds = ds;
    sregs.es = ds;
    sregs.fs = ds;
    sregs.gs = ds;
    sregs.ss = ds;
    sregs.tr = segment_from_gdt(GDT_TSS, BOOT_TSS);
    let mut regs = kvm_regs {
        rip: entry.entry,
        rflags: 2,
        ..Default::default()
    };
    match entry.mode {
        EntryMode::Pvh => {
            sregs.cr0 = 0x11; // PE | ET
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rbx = PVH_INFO_START;
        }
        EntryMode::Linux64 => {
            // PML4[0] -> PDPT, PDPT[0] -> PD, PD: 512 x 2 MiB identity pages (1 GiB).
            let pdpt = PML4_START + PAGE_SIZE;
            let pd = pdpt + PAGE_SIZE;
            mem.write_obj(pdpt | 0x3, GuestAddress(PML4_START))
                .map_err(write_err("page tables"))?;
            mem.write_obj(pd | 0x3, GuestAddress(pdpt))
                .map_err(write_err("page tables"))?;
            let mut pdes = [0u8; 4096];
            for (i, c) in pdes.chunks_exact_mut(8).enumerate() {
                c.copy_from_slice(&(((i as u64) << 21) | 0x83).to_le_bytes());
            }
            mem.write_slice(&pdes, GuestAddress(pd))
                .map_err(write_err("page tables"))?;
            sregs.cr3 = PML4_START;
            sregs.cr4 = 0x20; // PAE
            sregs.cr0 = 0x8000_0033; // PG | ET | MP | PE  (+NE)
            sregs.efer = 0x500; // LME | LMA
            regs.rsi = ZERO_PAGE_START;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
        }
    }
    Ok((sregs, regs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_is_base_then_devices_then_extra() {
        let c = build_cmdline(
            &["virtio_mmio.device=4K@0xd0000000:5".into()],
            "  kiln.echo=1 quiet ",
        )
        .unwrap();
        assert_eq!(
            c.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 reboot=t panic=-1 virtio_mmio.device=4K@0xd0000000:5 kiln.echo=1 quiet"
        );
        let plain = build_cmdline(&[], "").unwrap();
        assert_eq!(plain.as_cstring().unwrap().to_str().unwrap(), BASE_CMDLINE);
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            build_cmdline(&[], &long),
            Err(BootError::Cmdline(_))
        ));
    }

    #[test]
    fn gdt_segments_decode() {
        let cs = segment_from_gdt(GDT_CODE64, BOOT_CS);
        assert_eq!((cs.l, cs.db, cs.g, cs.present, cs.type_), (1, 0, 1, 1, 0xb));
        assert_eq!(cs.limit, 0xffff_ffff);
        let cs32 = segment_from_gdt(GDT_CODE32, BOOT_CS);
        assert_eq!((cs32.l, cs32.db), (0, 1));
        let tss = segment_from_gdt(GDT_TSS, BOOT_TSS);
        assert_eq!((tss.type_, tss.s, tss.limit), (0xb, 0, 0x67));
    }

    fn read_u32(mem: &GuestMemoryMmap, a: u64) -> u32 {
        mem.read_obj(GuestAddress(a)).unwrap()
    }

    fn read_u64(mem: &GuestMemoryMmap, a: u64) -> u64 {
        mem.read_obj(GuestAddress(a)).unwrap()
    }

    /// A minimal bzImage: one setup sector after the boot sector, then `payload`.
    fn fake_bzimage(payload: &[u8]) -> Vec<u8> {
        let mut img = vec![0u8; 1024];
        img[0x1f1] = 1; // setup_sects
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x211] = 1; // LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        img.extend_from_slice(payload);
        img
    }

    fn assert_zero_page(mem: &GuestMemoryMmap, mem_mib: u64, cmdline: &str) {
        let zp = ZERO_PAGE_START;
        let byte = |off: u64| -> u8 { mem.read_obj(GuestAddress(zp + off)).unwrap() };
        assert_eq!(byte(0x210), KERNEL_LOADER_OTHER, "type_of_loader");
        assert_eq!(read_u32(mem, zp + 0x202), KERNEL_HDR_MAGIC);
        assert_eq!(
            read_u32(mem, zp + 0x228),
            CMDLINE_START as u32,
            "cmd_line_ptr"
        );
        assert_eq!(
            read_u32(mem, zp + 0x238),
            cmdline.len() as u32,
            "cmdline_size"
        );
        let e820 = e820_map(mem_mib);
        assert_eq!(byte(0x1e8) as usize, e820.len(), "e820_entries");
        for (i, &(addr, size, ty)) in e820.iter().enumerate() {
            let at = zp + 0x2d0 + 20 * i as u64;
            assert_eq!(read_u64(mem, at), addr);
            assert_eq!(read_u64(mem, at + 8), size);
            assert_eq!(read_u32(mem, at + 16), ty);
        }
        let mut got = vec![0u8; cmdline.len() + 1];
        mem.read_slice(&mut got, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&got[..cmdline.len()], cmdline.as_bytes());
        assert_eq!(got[cmdline.len()], 0);
    }

    #[test]
    fn bzimage_gets_zero_page_and_64_bit_entry() {
        let mem = create_guest_memory(64).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let payload: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
        let kernel = dir.path().join("bzImage");
        std::fs::write(&kernel, fake_bzimage(&payload)).unwrap();
        let initrd = dir.path().join("initrd");
        std::fs::write(&initrd, vec![0x11u8; 5000]).unwrap();
        let c = build_cmdline(&[], "quiet").unwrap();
        let entry = load(&mem, 64, &kernel, Some(&initrd), &c).unwrap();
        assert_eq!(
            entry,
            BootEntry {
                mode: EntryMode::Linux64,
                entry: HIMEM_START + 0x200
            }
        );
        let mut k = vec![0u8; payload.len()];
        mem.read_slice(&mut k, GuestAddress(HIMEM_START)).unwrap();
        assert_eq!(k, payload);
        assert_zero_page(&mem, 64, "console=ttyS0 reboot=t panic=-1 quiet");
        let (rd_addr, rd_size) = (
            read_u32(&mem, ZERO_PAGE_START + 0x218) as u64,
            read_u32(&mem, ZERO_PAGE_START + 0x21c) as u64,
        );
        assert_eq!(rd_size, 5000);
        assert_eq!(rd_addr % PAGE_SIZE, 0);
        assert!(rd_addr + rd_size <= 64 << 20);
        let b: u8 = mem.read_obj(GuestAddress(rd_addr + 4999)).unwrap();
        assert_eq!(b, 0x11);

        // 64-bit entry: identity page tables, long mode, %rsi = zero page.
        let (sregs, regs) = entry_registers(&mem, entry, kvm_sregs::default()).unwrap();
        assert_eq!(regs.rip, HIMEM_START + 0x200);
        assert_eq!(regs.rsi, ZERO_PAGE_START);
        assert_eq!((sregs.cs.l, sregs.cs.selector), (1, BOOT_CS));
        assert_eq!(sregs.efer & 0x500, 0x500);
        assert_ne!(sregs.cr0 & 0x8000_0000, 0);
        assert_eq!(sregs.cr3, PML4_START);
        assert_eq!(read_u64(&mem, PML4_START), (PML4_START + PAGE_SIZE) | 3);
        let pd = PML4_START + 2 * PAGE_SIZE;
        assert_eq!(read_u64(&mem, pd + 8), (1 << 21) | 0x83);
        assert_eq!(read_u64(&mem, pd + 511 * 8), (511 << 21) | 0x83);
    }

    #[test]
    fn elf_with_pvh_note_gets_start_info_and_32_bit_entry() {
        let mem = create_guest_memory(32).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let kernel = crate::test_guest::write_to(dir.path()).unwrap();
        let c = build_cmdline(&[], "").unwrap();
        let entry = load(&mem, 32, &kernel, None, &c).unwrap();
        assert_eq!(entry.mode, EntryMode::Pvh);
        assert_eq!(read_u32(&mem, PVH_INFO_START), XEN_HVM_START_MAGIC);
        assert_eq!(read_u64(&mem, PVH_INFO_START + 24), CMDLINE_START);
        assert_eq!(read_u64(&mem, PVH_INFO_START + 40), PVH_MEMMAP_START);
        assert_eq!(
            read_u32(&mem, PVH_INFO_START + 48) as usize,
            e820_map(32).len()
        );
        let (sregs, regs) = entry_registers(&mem, entry, kvm_sregs::default()).unwrap();
        assert_eq!(regs.rbx, PVH_INFO_START);
        assert_eq!((sregs.cr0 & 1, sregs.cr0 & 0x8000_0000), (1, 0));
        assert_eq!((sregs.cs.l, sregs.cs.db), (0, 1));
    }

    #[test]
    fn elf_without_pvh_note_uses_the_64_bit_protocol() {
        // The test guest with its PT_NOTE turned into PT_NULL.
        let mut elf = crate::test_guest::ELF.to_vec();
        let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
        let phentsize = u16::from_le_bytes([elf[0x36], elf[0x37]]) as usize;
        let phnum = u16::from_le_bytes([elf[0x38], elf[0x39]]) as usize;
        let mut patched = 0;
        for i in 0..phnum {
            let at = phoff + i * phentsize;
            if u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == 4 {
                elf[at..at + 4].copy_from_slice(&0u32.to_le_bytes());
                patched += 1;
            }
        }
        assert_eq!(patched, 1);
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux-nopvh");
        std::fs::write(&kernel, &elf).unwrap();
        let mem = create_guest_memory(16).unwrap();
        let c = build_cmdline(&[], "").unwrap();
        let entry = load(&mem, 16, &kernel, None, &c).unwrap();
        assert_eq!(
            entry,
            BootEntry {
                mode: EntryMode::Linux64,
                entry: HIMEM_START
            }
        );
        assert_zero_page(&mem, 16, BASE_CMDLINE);
    }

    #[test]
    fn missing_and_garbage_kernels_are_typed_errors() {
        let mem = create_guest_memory(16).unwrap();
        let c = build_cmdline(&[], "").unwrap();
        let e = load(&mem, 16, Path::new("/nonexistent/vmlinux"), None, &c).unwrap_err();
        assert!(matches!(e, BootError::Read { .. }), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("junk");
        std::fs::write(&p, vec![0x5a; 8192]).unwrap();
        let e = load(&mem, 16, &p, None, &c).unwrap_err();
        assert!(matches!(e, BootError::Load { .. }), "{e}");
        assert!(e.to_string().contains("junk"));
    }
}
