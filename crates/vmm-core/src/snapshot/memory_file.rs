//! The memory file: one 4 KiB header page, then guest RAM, region after region. Pages that
//! are all zero are never written, so they stay holes (`SEEK_HOLE` finds them, `du` does not
//! count them) and the file's allocated size is only the pages the guest touched.
//!
//! Writing skips pages without reading them where it can: `/proc/self/pagemap` tells which
//! pages of the mapping were ever faulted in (present or swapped), and for memory mapped from
//! a file (the memfd behind fresh guest RAM, a fork layer, a restored VM's memory file)
//! `SEEK_DATA` / `SEEK_HOLE` tell which pages of the file hold data; a page that is neither is
//! zero by construction. The others are checked for zero before they are written, and runs
//! of non-zero pages go out in one `pwrite`.
//!
//! Restoring maps each region `MAP_PRIVATE` over the file: nothing is read up front, the
//! guest faults pages in from the page cache on first touch, and its writes go to private
//! copy-on-write pages, so any number of VMs can share one memory file.
//!
//! Header page layout (little endian): magic `KILNMEM\0` (8), format version (4), reserved
//! (4), snapshot id (16), data length (8); the rest is zero.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use super::state::RegionSnapshot;

/// First bytes of every memory file.
pub const MAGIC: [u8; 8] = *b"KILNMEM\0";
/// Memory file layout version.
pub const FORMAT_VERSION: u32 = 1;
/// Page size the file is organised in.
pub const PAGE: u64 = 4096;
/// Offset of guest RAM in the file (after the header page).
pub const DATA_OFFSET: u64 = PAGE;
/// Pages looked up in pagemap per read.
const PAGEMAP_CHUNK: usize = 16 * 1024;
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;

/// Errors writing, checking or mapping a memory file.
#[derive(Debug, thiserror::Error)]
pub enum MemFileError {
    /// A file operation failed.
    #[error("memory file {path}: {op}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The file is not the memory file of this state file.
    #[error("memory file {path}: {what}")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// What does not match.
        what: String,
    },
    /// mmap of a region failed.
    #[error("memory file {path}: cannot map region at {guest_addr:#x}: {source}")]
    Map {
        /// The file.
        path: PathBuf,
        /// Guest address of the region.
        guest_addr: u64,
        /// Cause (vm-memory's error, or a size that does not fit).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A region of the state file does not fit the memory file or the address space.
    #[error("memory file {path}: cannot map region at {guest_addr:#x}: {what}")]
    Region {
        /// The file.
        path: PathBuf,
        /// Guest address of the region.
        guest_addr: u64,
        /// What is wrong.
        what: &'static str,
    },
}

/// What writing the memory file did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Guest RAM bytes.
    pub guest_bytes: u64,
    /// Bytes written (non-zero pages).
    pub written_bytes: u64,
    /// Pages whose contents were checked.
    pub pages_checked: u64,
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> MemFileError + 'a {
    move |source| MemFileError::Io {
        path: path.to_owned(),
        op,
        source,
    }
}

fn header(snapshot_id: &[u8; 16], data_len: u64) -> [u8; 40] {
    let mut h = [0u8; 40];
    h[..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[16..32].copy_from_slice(snapshot_id);
    h[32..40].copy_from_slice(&data_len.to_le_bytes());
    h
}

fn is_zero(page: &[u8]) -> bool {
    // Folding 64-byte blocks vectorises; bail out at the first non-zero block.
    page.chunks_exact(64)
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

/// Which pages of `[addr, addr + pages * PAGE)` in this process were ever faulted in, or
/// `None` if pagemap cannot be read (then every page is checked).
struct Pagemap {
    file: Option<File>,
    buf: Vec<u64>,
    first: usize,
}

impl Pagemap {
    fn open() -> Self {
        Pagemap {
            file: File::open("/proc/self/pagemap").ok(),
            buf: Vec::new(),
            first: 0,
        }
    }

    /// Whether page `i` of the range at host address `base` may hold data.
    fn maybe_data(&mut self, base: usize, i: usize, pages: usize) -> bool {
        let Some(f) = &self.file else {
            return true;
        };
        if self.buf.is_empty() || i < self.first || i >= self.first + self.buf.len() {
            let n = PAGEMAP_CHUNK.min(pages - i);
            let mut bytes = vec![0u8; n * 8];
            let off = ((base / PAGE as usize) + i) as u64 * 8;
            if f.read_exact_at(&mut bytes, off).is_err() {
                self.file = None;
                return true;
            }
            self.buf = bytes
                .chunks_exact(8)
                .map(|c| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(c);
                    u64::from_le_bytes(a)
                })
                .collect();
            self.first = i;
        }
        self.buf[i - self.first] & (PM_PRESENT | PM_SWAPPED) != 0
    }
}

/// The page ranges `[first, end)` (relative to `start`) of `file` in `[start, start + len)`
/// that hold data, by `SEEK_DATA` / `SEEK_HOLE`; `None` if the file system cannot tell (then
/// every page may hold data).
pub(crate) fn file_data_pages(file: &File, start: u64, len: u64) -> Option<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let end = start + len;
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        let off = i64::try_from(pos).ok()?;
        // SAFETY: lseek on a descriptor we own; it only moves the file position, which no
        // reader of guest memory uses (all I/O is positional or through mappings).
        let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data at or after `pos`.
            return (io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO)).then_some(out);
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as i64, libc::SEEK_HOLE) };
        if hole < 0 {
            return None;
        }
        let hole = (hole as u64).min(end);
        out.push(((data - start) / PAGE, (hole - start).div_ceil(PAGE)));
        pos = hole;
    }
    Some(out)
}

/// Writes guest memory `mem` to a new file at `path` (replacing it). The guest must not run
/// and no device may write guest memory meanwhile. Returns the region table, the file
/// length and counters.
pub fn write(
    path: &Path,
    mem: &GuestMemoryMmap,
    snapshot_id: &[u8; 16],
) -> Result<(Vec<RegionSnapshot>, u64, WriteStats), MemFileError> {
    write_with_hint(path, mem, snapshot_id, None)
}

/// [`write`], with `data_pages` (per region, sorted page runs) saying which pages not
/// present in this process's page tables may hold data — for memory mapped from fork layers
/// (crate::fork::MemLayers::data_runs), where the region's own file is not the whole story.
/// `None`: the region's backing file's data extents (`SEEK_DATA`) say it.
pub fn write_with_hint(
    path: &Path,
    mem: &GuestMemoryMmap,
    snapshot_id: &[u8; 16],
    data_pages: Option<&[Vec<(u64, u64)>]>,
) -> Result<(Vec<RegionSnapshot>, u64, WriteStats), MemFileError> {
    let file = File::create(path).map_err(io_err(path, "create"))?;
    let mut regions = Vec::new();
    let mut off = DATA_OFFSET;
    for r in mem.iter() {
        regions.push(RegionSnapshot {
            guest_addr: r.start_addr().raw_value(),
            len: r.len(),
            file_offset: off,
        });
        off += r.len();
    }
    let file_len = off;
    file.write_all_at(&header(snapshot_id, file_len - DATA_OFFSET), 0)
        .map_err(io_err(path, "write header"))?;
    // Size first: everything not written below stays a hole.
    file.set_len(file_len).map_err(io_err(path, "set length"))?;

    let mut stats = WriteStats::default();
    let mut pagemap = Pagemap::open();
    for (index, (r, snap)) in mem.iter().zip(&regions).enumerate() {
        let len = r.len() as usize;
        let base = r.as_ptr() as usize;
        // SAFETY: `base..base + len` is the live mapping of this region, owned by `mem` which
        // outlives this borrow. The caller guarantees nothing writes guest memory meanwhile
        // (vCPUs parked, device locks held), so reading it as a shared byte slice is sound.
        let bytes = unsafe { std::slice::from_raw_parts(base as *const u8, len) };
        // Pages of the backing file that hold data (all of them if it cannot tell).
        let file_data = match data_pages {
            Some(hint) => Some(hint.get(index).cloned()),
            None => r
                .file_offset()
                .map(|fo| file_data_pages(fo.file(), fo.start(), len as u64)),
        };
        // `i` only grows: walk the runs with a cursor.
        let mut cursor = 0usize;
        let mut in_file = |i: usize| match &file_data {
            None => false,
            Some(None) => true,
            Some(Some(runs)) => {
                let i = i as u64;
                while runs.get(cursor).is_some_and(|&(_, b)| b <= i) {
                    cursor += 1;
                }
                runs.get(cursor).is_some_and(|&(a, _)| a <= i)
            }
        };
        let pages = len / PAGE as usize;
        stats.guest_bytes += len as u64;
        let mut run: Option<usize> = None;
        for i in 0..=pages {
            let data = i < pages && {
                let may = pagemap.maybe_data(base, i, pages) || in_file(i);
                may && {
                    stats.pages_checked += 1;
                    !is_zero(&bytes[i * PAGE as usize..(i + 1) * PAGE as usize])
                }
            };
            match (data, run) {
                (true, None) => run = Some(i),
                (false, Some(start)) => {
                    let chunk = &bytes[start * PAGE as usize..i * PAGE as usize];
                    file.write_all_at(chunk, snap.file_offset + start as u64 * PAGE)
                        .map_err(io_err(path, "write guest pages"))?;
                    stats.written_bytes += chunk.len() as u64;
                    run = None;
                }
                _ => {}
            }
        }
    }
    Ok((regions, file_len, stats))
}

/// Opens the memory file at `path`, checks it belongs to snapshot `snapshot_id` and has the
/// length the state file expects, and maps `regions` from it `MAP_PRIVATE` (nothing is read
/// beyond the header).
pub fn map(
    path: &Path,
    snapshot_id: &[u8; 16],
    regions: &[RegionSnapshot],
    file_len: u64,
) -> Result<GuestMemoryMmap, MemFileError> {
    let file = File::open(path).map_err(io_err(path, "open"))?;
    let mismatch = |what: String| MemFileError::Mismatch {
        path: path.to_owned(),
        what,
    };
    let len = file.metadata().map_err(io_err(path, "stat"))?.len();
    if len != file_len {
        return Err(mismatch(format!(
            "is {len} bytes, the state file expects {file_len} (truncated or replaced?)"
        )));
    }
    let mut h = [0u8; 40];
    file.read_exact_at(&mut h, 0)
        .map_err(io_err(path, "read header"))?;
    if h[..8] != MAGIC {
        return Err(mismatch("not a Kiln memory file (bad magic)".into()));
    }
    let mut v = [0u8; 4];
    v.copy_from_slice(&h[8..12]);
    let v = u32::from_le_bytes(v);
    if v != FORMAT_VERSION {
        return Err(mismatch(format!(
            "format version {v}, this Kiln reads {FORMAT_VERSION}"
        )));
    }
    if h != header(snapshot_id, file_len - DATA_OFFSET) {
        return Err(mismatch(
            "belongs to another snapshot (snapshot id or length differ)".into(),
        ));
    }
    let file = Arc::new(file);
    let mut out = Vec::with_capacity(regions.len());
    for r in regions {
        let map_err = |source: Box<dyn std::error::Error + Send + Sync>| MemFileError::Map {
            path: path.to_owned(),
            guest_addr: r.guest_addr,
            source,
        };
        let region_err = |what| MemFileError::Region {
            path: path.to_owned(),
            guest_addr: r.guest_addr,
            what,
        };
        let end = r.file_offset.checked_add(r.len);
        if end.is_none_or(|e| e > file_len) || r.file_offset % PAGE != 0 {
            return Err(region_err("region outside the file"));
        }
        let size = usize::try_from(r.len).map_err(|e| map_err(Box::new(e)))?;
        let region = MmapRegion::build(
            Some(FileOffset::from_arc(file.clone(), r.file_offset)),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| map_err(Box::new(e)))?;
        out.push(
            GuestRegionMmap::new(region, GuestAddress(r.guest_addr))
                .ok_or_else(|| region_err("region wraps the address space"))?,
        );
    }
    let mem = GuestMemoryMmap::from_regions(out).map_err(|e| MemFileError::Map {
        path: path.to_owned(),
        guest_addr: 0,
        source: Box::new(e),
    })?;
    crate::memory::exclude_from_core_dumps(&mem).map_err(|e| MemFileError::Map {
        path: path.to_owned(),
        guest_addr: 0,
        source: Box::new(e),
    })?;
    Ok(mem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use vm_memory::Bytes;

    fn written_pages(path: &Path) -> u64 {
        // st_blocks counts 512-byte units actually allocated.
        std::fs::metadata(path).unwrap().blocks() * 512 / PAGE
    }

    #[test]
    fn zero_pages_stay_holes_and_data_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let mem = crate::memory::create_guest_memory(64).unwrap();
        // Touched-but-zero page, a two-page run, a lone page at the end.
        mem.write_obj(0u64, GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[0xab; 8192], GuestAddress(0x20_0000))
            .unwrap();
        mem.write_obj(0x1122_3344u32, GuestAddress((64 << 20) - 4))
            .unwrap();
        let id = [3u8; 16];
        let (regions, len, stats) = write(&path, &mem, &id).unwrap();
        assert_eq!(len, DATA_OFFSET + (64 << 20));
        assert_eq!(stats.written_bytes, 3 * PAGE);
        assert_eq!(stats.guest_bytes, 64 << 20);
        // pagemap spares reading the untouched pages (a few more may be present).
        assert!(stats.pages_checked < 64, "{stats:?}");
        // Header page + 3 data pages allocated (filesystems may round up a little).
        assert!(written_pages(&path) <= 8, "{} pages", written_pages(&path));

        let back = map(&path, &id, &regions, len).unwrap();
        for r in vm_memory::GuestMemoryBackend::iter(&back) {
            let flags = crate::memory::vm_flags_of(r.as_ptr() as usize).unwrap();
            assert!(
                flags.split(' ').any(|f| f == "dd"),
                "restored RAM VmFlags {flags}"
            );
        }
        let mut b = [0u8; 8192];
        back.read_slice(&mut b, GuestAddress(0x20_0000)).unwrap();
        assert!(b.iter().all(|&x| x == 0xab));
        assert_eq!(
            back.read_obj::<u32>(GuestAddress((64 << 20) - 4)).unwrap(),
            0x1122_3344
        );
        assert_eq!(back.read_obj::<u64>(GuestAddress(0x30_0000)).unwrap(), 0);
    }

    #[test]
    fn mappings_are_private_copies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let mem = crate::memory::create_guest_memory(8).unwrap();
        mem.write_obj(1u32, GuestAddress(0x5000)).unwrap();
        let id = [1u8; 16];
        let (regions, len, _) = write(&path, &mem, &id).unwrap();
        let a = map(&path, &id, &regions, len).unwrap();
        let b = map(&path, &id, &regions, len).unwrap();
        a.write_obj(2u32, GuestAddress(0x5000)).unwrap();
        a.write_obj(9u32, GuestAddress(0x7000)).unwrap();
        assert_eq!(b.read_obj::<u32>(GuestAddress(0x5000)).unwrap(), 1);
        assert_eq!(b.read_obj::<u32>(GuestAddress(0x7000)).unwrap(), 0);
        let before = std::fs::read(&path).unwrap();
        drop(a);
        assert_eq!(std::fs::read(&path).unwrap(), before, "file unchanged");
    }

    #[test]
    fn file_backed_memory_is_written_from_the_file_data_and_the_private_pages() {
        // A restored VM's memory is file-backed: pagemap cannot vouch for unread pages, the
        // file's data extents (SEEK_DATA) do.
        let dir = tempfile::tempdir().unwrap();
        let (p1, p2) = (dir.path().join("m1"), dir.path().join("m2"));
        let mem = crate::memory::create_guest_memory(4).unwrap();
        mem.write_obj(0x55u8, GuestAddress(0x3000)).unwrap();
        let (regions, len, _) = write(&p1, &mem, &[1; 16]).unwrap();
        let restored = map(&p1, &[1; 16], &regions, len).unwrap();
        restored.write_obj(0x66u8, GuestAddress(0x9000)).unwrap();
        let (_, len2, stats) = write(&p2, &restored, &[2; 16]).unwrap();
        assert_eq!(len2, len);
        assert_eq!(stats.written_bytes, 2 * PAGE);
        // Only the file's data pages and the page the guest wrote were read.
        assert!(stats.pages_checked < 16, "{stats:?}");
        let again = map(&p2, &[2; 16], &regions, len2).unwrap();
        assert_eq!(again.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), 0x55);
        assert_eq!(again.read_obj::<u8>(GuestAddress(0x9000)).unwrap(), 0x66);
    }

    #[test]
    fn wrong_truncated_or_foreign_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let mem = crate::memory::create_guest_memory(4).unwrap();
        let id = [4u8; 16];
        let (regions, len, _) = write(&path, &mem, &id).unwrap();
        let e = map(&path, &[5; 16], &regions, len).unwrap_err();
        assert!(e.to_string().contains("another snapshot"), "{e}");
        let e = map(&path, &id, &regions, len + PAGE).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - PAGE).unwrap();
        assert!(matches!(
            map(&path, &id, &regions, len).unwrap_err(),
            MemFileError::Mismatch { .. }
        ));
        f.set_len(len).unwrap();
        f.write_all_at(b"NOTKILN!", 0).unwrap();
        let e = map(&path, &id, &regions, len).unwrap_err();
        assert!(e.to_string().contains("bad magic"), "{e}");
        let e = map(&dir.path().join("missing"), &id, &regions, len).unwrap_err();
        assert!(matches!(e, MemFileError::Io { op: "open", .. }), "{e}");
    }
}
