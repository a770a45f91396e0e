//! Live-fork memory: the frozen, copy-on-write layers guest RAM is mapped from after a fork.
//!
//! Fresh guest RAM is one memfd mapped `MAP_SHARED` (crate::memory). At the first fork that
//! memfd is frozen (sealed against writes) and becomes the *base layer*: the parent remaps its
//! regions `MAP_PRIVATE | MAP_FIXED` over it (same host addresses, so the KVM memory slots stay
//! valid; KVM's MMU notifier drops the old translations) and every child maps it
//! `MAP_PRIVATE` too. Nothing is copied: all of them fault pages in from the shared page
//! cache and their writes go to private copy-on-write pages.
//!
//! A VM whose memory is already private over layers (a forked parent, a child, a VM
//! restored from a snapshot directory) forks by *stacking*: the pages it wrote since its
//! layers were made (its private pages, found in `/proc/self/pagemap`: present and not
//! file-backed) are copied into a new sparse memfd layer, the VM remaps exactly those page
//! runs from the new layer (so its copies are shared again) and the children map the base
//! layer and then each upper layer's runs over it with `MAP_FIXED`. The copy is
//! proportional to what the VM wrote since its last fork, not to its memory. A stack deeper
//! than [`MAX_LAYERS`] or with more than [`MAX_RUNS`] mapped runs is *flattened* into one
//! new base layer (a copy of every page that may hold data) so a long chain of forks never
//! exhausts `vm.max_map_count`. docs/SNAPSHOT.md "Live fork" has the measurements behind
//! this choice.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

/// Page size of the layers.
pub const PAGE: u64 = 4096;
/// Most layers (base included) before a fork flattens the stack.
pub const MAX_LAYERS: usize = 8;
/// Most page runs mapped over the base layer (per VM, all layers) before a fork flattens.
pub const MAX_RUNS: usize = 16 * 1024;
/// Pages read from pagemap at once.
const PAGEMAP_CHUNK: usize = 16 * 1024;
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;

/// Errors making or mapping fork layers.
#[derive(Debug, thiserror::Error)]
pub enum ForkMemError {
    /// A system call on guest memory or a layer failed.
    #[error("fork memory: {op}: {source}")]
    Os {
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The memory does not have the shape a fork expects.
    #[error("fork memory: {what}")]
    Layout {
        /// What is wrong.
        what: String,
    },
}

fn os(op: &'static str) -> impl FnOnce(io::Error) -> ForkMemError {
    move |source| ForkMemError::Os { op, source }
}

/// One frozen layer: a file nobody writes any more and, per guest RAM region, where the
/// region starts in it and which of its pages the layer supplies.
#[derive(Debug)]
pub struct Layer {
    file: Arc<File>,
    /// Per region: the file offset of the region's first page.
    offsets: Vec<u64>,
    /// Per region: the page runs `[first, end)` this layer supplies; `None` = all of them.
    runs: Vec<Option<Vec<(u64, u64)>>>,
}

impl Layer {
    fn run_count(&self) -> usize {
        self.runs
            .iter()
            .map(|r| r.as_ref().map_or(1, Vec::len))
            .sum()
    }
}

/// The frozen layers a VM's guest RAM is mapped from, bottom (a whole base) first.
#[derive(Debug, Clone)]
pub struct MemLayers {
    layers: Vec<Arc<Layer>>,
}

impl MemLayers {
    /// The layers of memory restored `MAP_PRIVATE` from a snapshot's memory file (or any
    /// memory whose regions are all mapped private from one file): that file is the base.
    pub fn from_private_file_mapping(mem: &GuestMemoryMmap) -> Option<Self> {
        let base = whole_layer(mem)?;
        Some(MemLayers {
            layers: vec![Arc::new(base)],
        })
    }

    /// How many layers are stacked.
    pub fn depth(&self) -> usize {
        self.layers.len()
    }

    /// Page runs above the base, per region (sorted by start; they may overlap): pages that
    /// hold data although the base file may have a hole there (memory-file writes).
    pub fn upper_runs(&self, regions: usize) -> Vec<Vec<(u64, u64)>> {
        let mut out = vec![Vec::new(); regions];
        for l in self.layers.iter().skip(1) {
            for (r, runs) in l.runs.iter().enumerate() {
                if let (Some(o), Some(runs)) = (out.get_mut(r), runs) {
                    o.extend_from_slice(runs);
                }
            }
        }
        for o in &mut out {
            o.sort_unstable();
        }
        out
    }

    /// Per region of the given lengths, the sorted page runs that may hold data in these
    /// layers (the base file's data extents, or all of it if the file system cannot tell,
    /// plus every upper layer's runs): a memory-file write reads only these and the pages
    /// present in the process.
    pub fn data_runs(&self, region_lens: &[u64]) -> Vec<Vec<(u64, u64)>> {
        let upper = self.upper_runs(region_lens.len());
        let base = self.layers.first();
        region_lens
            .iter()
            .enumerate()
            .map(|(r, &len)| {
                let mut v = base
                    .and_then(|b| b.offsets.get(r).map(|&o| (b, o)))
                    .and_then(|(b, o)| {
                        crate::snapshot::memory_file::file_data_pages(&b.file, o, len)
                    })
                    .unwrap_or_else(|| vec![(0, len / PAGE)]);
                v.extend(upper.get(r).into_iter().flatten().copied());
                merge(v)
            })
            .collect()
    }

    /// Maps a new copy-on-write view of these layers: each region `MAP_PRIVATE` from the
    /// base, then every upper layer's runs over it (`MAP_FIXED`). Excluded from core dumps.
    pub fn map(&self, regions: &[(GuestAddress, usize)]) -> Result<GuestMemoryMmap, ForkMemError> {
        let layout = |what: String| ForkMemError::Layout { what };
        let Some(base) = self.layers.first() else {
            return Err(layout("no layers".into()));
        };
        let mut out = Vec::with_capacity(regions.len());
        for (r, &(addr, len)) in regions.iter().enumerate() {
            let off = *base
                .offsets
                .get(r)
                .ok_or_else(|| layout(format!("base layer has no region {r}")))?;
            let region = MmapRegion::build(
                Some(FileOffset::from_arc(base.file.clone(), off)),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            )
            .map_err(|e| layout(format!("map region {r}: {e}")))?;
            let region = GuestRegionMmap::new(region, addr)
                .ok_or_else(|| layout(format!("region {r} wraps the address space")))?;
            for l in self.layers.iter().skip(1) {
                remap_runs(region.as_ptr() as usize, len, l, r)?;
            }
            out.push(region);
        }
        let mem = GuestMemoryMmap::from_regions(out).map_err(|e| layout(e.to_string()))?;
        crate::memory::exclude_from_core_dumps(&mem).map_err(os("madvise DONTDUMP"))?;
        Ok(mem)
    }
}

impl MemLayers {
    /// Maps these layers copy-on-write over `mem`'s regions in place (`MAP_FIXED`, same host
    /// addresses: the KVM memory slots registered over `mem` stay valid), as [`MemLayers::map`]
    /// does for a new mapping. `mem` must have the regions the layers were made for and no
    /// running guest.
    pub fn map_over(&self, mem: &GuestMemoryMmap) -> Result<(), ForkMemError> {
        let layout = |what: String| ForkMemError::Layout { what };
        for (r, region) in mem.iter().enumerate() {
            let (ptr, len) = (region.as_ptr() as usize, region.len() as usize);
            for (i, l) in self.layers.iter().enumerate() {
                if i == 0 && l.runs.get(r).is_some_and(Option::is_some) {
                    return Err(layout("the base layer must cover its regions".into()));
                }
                remap_runs(ptr, len, l, r)?;
            }
        }
        crate::memory::exclude_from_core_dumps(mem).map_err(os("madvise DONTDUMP"))
    }
}

/// A layer supplying every page of every region of `mem` from the file its regions are
/// mapped from (they must all be mapped from one file).
fn whole_layer(mem: &GuestMemoryMmap) -> Option<Layer> {
    let mut file: Option<Arc<File>> = None;
    let mut offsets = Vec::new();
    for r in mem.iter() {
        let fo = r.file_offset()?;
        match &file {
            None => file = Some(fo.arc().clone()),
            Some(f) if Arc::ptr_eq(f, fo.arc()) => {}
            Some(_) => return None,
        }
        offsets.push(fo.start());
    }
    Some(Layer {
        file: file?,
        runs: vec![None; offsets.len()],
        offsets,
    })
}

/// `mmap(MAP_PRIVATE | MAP_FIXED)` of `layer`'s runs of region `r` over the region mapped at
/// `base` (`len` bytes). The old pages of those ranges (and their private copies) go away.
fn remap_runs(base: usize, len: usize, layer: &Layer, r: usize) -> Result<(), ForkMemError> {
    let layout = |what: String| ForkMemError::Layout { what };
    let off = *layer
        .offsets
        .get(r)
        .ok_or_else(|| layout(format!("layer has no region {r}")))?;
    let whole = [(0, len as u64 / PAGE)];
    let runs: &[(u64, u64)] = match layer.runs.get(r) {
        Some(Some(runs)) => runs,
        Some(None) => &whole,
        None => return Err(layout(format!("layer has no runs for region {r}"))),
    };
    for &(a, b) in runs {
        if b <= a || b * PAGE > len as u64 {
            return Err(layout(format!("run {a}..{b} outside region {r}")));
        }
        let addr = base + (a * PAGE) as usize;
        let size = ((b - a) * PAGE) as usize;
        let file_off = libc::off_t::try_from(off + a * PAGE)
            .map_err(|_| layout("layer offset too large".into()))?;
        // SAFETY: `addr..addr + size` lies inside the live mapping of region `r` (checked
        // above), which the caller owns and whose guest is paused or not yet running; the
        // new mapping replaces those pages with the frozen layer's, same protection, so every
        // pointer into the region stays valid. KVM sees the change through its MMU notifier.
        let p = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                layer.file.as_raw_fd(),
                file_off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(ForkMemError::Os {
                op: "mmap MAP_FIXED",
                source: io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// Seals `file` against writes and size changes (the layer is frozen from now on). Fails
/// (EBUSY) while anything still maps it shared and writable.
fn seal(file: &File) -> Result<(), ForkMemError> {
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor we own, with an integer argument.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    if rc != 0 {
        return Err(ForkMemError::Os {
            op: "seal the frozen layer",
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Per region, the page runs the VM wrote into private copies since its layers were made
/// (pagemap: present and not file-backed, or swapped).
fn private_runs(mem: &GuestMemoryMmap) -> Result<Vec<Vec<(u64, u64)>>, ForkMemError> {
    let pagemap = File::open("/proc/self/pagemap").map_err(os("open /proc/self/pagemap"))?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; PAGEMAP_CHUNK * 8];
    for r in mem.iter() {
        let pages = (r.len() / PAGE) as usize;
        let first = r.as_ptr() as usize / PAGE as usize;
        let mut runs = Vec::new();
        let mut run: Option<u64> = None;
        let mut i = 0usize;
        while i < pages {
            let n = PAGEMAP_CHUNK.min(pages - i);
            let bytes = &mut buf[..n * 8];
            pagemap
                .read_exact_at(bytes, ((first + i) * 8) as u64)
                .map_err(os("read /proc/self/pagemap"))?;
            for (k, c) in bytes.chunks_exact(8).enumerate() {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                let e = u64::from_le_bytes(a);
                let private = (e & PM_PRESENT != 0 && e & PM_FILE == 0) || e & PM_SWAPPED != 0;
                let page = (i + k) as u64;
                match (private, run) {
                    (true, None) => run = Some(page),
                    (false, Some(s)) => {
                        runs.push((s, page));
                        run = None;
                    }
                    _ => {}
                }
            }
            i += n;
        }
        if let Some(s) = run {
            runs.push((s, pages as u64));
        }
        out.push(runs);
    }
    Ok(out)
}

/// What freezing a VM's memory did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FreezeStats {
    /// Bytes copied into a new layer (0 for the first fork of a fresh VM).
    pub copied_bytes: u64,
    /// Whether the stack was flattened into a new base.
    pub flattened: bool,
    /// Layers after the freeze.
    pub depth: usize,
}

/// Freezes the current contents of `mem` into layers the VM and its children map
/// copy-on-write, and remaps `mem` over them. `layers` is `None` for fresh memory (one memfd
/// mapped shared, which becomes the base); otherwise the layers `mem` is mapped from now
/// (updated in place). The guest must be paused and no device may touch guest memory.
pub fn freeze(
    mem: &GuestMemoryMmap,
    layers: &mut Option<MemLayers>,
) -> Result<FreezeStats, ForkMemError> {
    let layout = |what: String| ForkMemError::Layout { what };
    let regions: Vec<(usize, usize)> = mem
        .iter()
        .map(|r| (r.as_ptr() as usize, r.len() as usize))
        .collect();
    match layers {
        None => {
            // Fresh memory: the shared memfd itself becomes the frozen base.
            let base = whole_layer(mem).ok_or_else(|| {
                layout("guest memory is not mapped from one memfd (not forkable)".into())
            })?;
            for (r, &(ptr, len)) in regions.iter().enumerate() {
                remap_runs(ptr, len, &base, r)?;
            }
            seal(&base.file)?;
            crate::memory::exclude_from_core_dumps(mem).map_err(os("madvise DONTDUMP"))?;
            *layers = Some(MemLayers {
                layers: vec![Arc::new(base)],
            });
            Ok(FreezeStats {
                copied_bytes: 0,
                flattened: false,
                depth: 1,
            })
        }
        Some(current) => {
            let dirty = private_runs(mem)?;
            let new_runs: usize = dirty.iter().map(Vec::len).sum();
            let stacked_runs: usize = current
                .layers
                .iter()
                .skip(1)
                .map(|l| l.run_count())
                .sum::<usize>()
                + new_runs;
            if new_runs == 0 {
                return Ok(FreezeStats {
                    copied_bytes: 0,
                    flattened: false,
                    depth: current.depth(),
                });
            }
            let flatten = current.depth() + 1 > MAX_LAYERS || stacked_runs > MAX_RUNS;
            let total: u64 = regions.iter().map(|&(_, l)| l as u64).sum();
            let file = crate::memory::new_memfd("kiln-fork-layer", total)
                .map_err(os("create layer memfd"))?;
            let mut offsets = Vec::with_capacity(regions.len());
            let mut off = 0u64;
            for &(_, len) in &regions {
                offsets.push(off);
                off += len as u64;
            }
            let runs: Vec<Vec<(u64, u64)>> = if flatten {
                // Every page that may hold data: the base file's data, the upper runs, the
                // private pages.
                let lens: Vec<u64> = regions.iter().map(|&(_, l)| l as u64).collect();
                let mut all = current.data_runs(&lens);
                for (v, d) in all.iter_mut().zip(&dirty) {
                    v.extend_from_slice(d);
                    *v = merge(std::mem::take(v));
                }
                all
            } else {
                dirty
            };
            let mut copied = 0u64;
            for (r, &(ptr, _)) in regions.iter().enumerate() {
                for &(a, b) in runs.get(r).into_iter().flatten() {
                    let size = ((b - a) * PAGE) as usize;
                    // SAFETY: the run lies inside region r's live mapping (pagemap or the
                    // layers said so, bounded by the region); the guest is paused and the
                    // devices are locked, so nothing writes it while it is read.
                    let bytes = unsafe {
                        std::slice::from_raw_parts((ptr + (a * PAGE) as usize) as *const u8, size)
                    };
                    file.write_all_at(bytes, offsets[r] + a * PAGE)
                        .map_err(os("write layer"))?;
                    copied += size as u64;
                }
            }
            seal(&file)?;
            let file = Arc::new(file);
            let layer = if flatten {
                Layer {
                    file,
                    offsets,
                    runs: vec![None; regions.len()],
                }
            } else {
                Layer {
                    file,
                    offsets,
                    runs: runs.into_iter().map(Some).collect(),
                }
            };
            for (r, &(ptr, len)) in regions.iter().enumerate() {
                remap_runs(ptr, len, &layer, r)?;
            }
            crate::memory::exclude_from_core_dumps(mem).map_err(os("madvise DONTDUMP"))?;
            if flatten {
                current.layers = vec![Arc::new(layer)];
            } else {
                current.layers.push(Arc::new(layer));
            }
            Ok(FreezeStats {
                copied_bytes: copied,
                flattened: flatten,
                depth: current.depth(),
            })
        }
    }
}

/// Sorts and merges overlapping or touching runs.
fn merge(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// The guest RAM regions `(guest address, length)` of `mem`.
pub fn region_table(mem: &GuestMemoryMmap) -> Vec<(GuestAddress, usize)> {
    mem.iter()
        .map(|r| (GuestAddress(r.start_addr().raw_value()), r.len() as usize))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn merge_joins_overlapping_runs() {
        assert_eq!(
            merge(vec![(5, 6), (0, 2), (1, 3), (6, 9), (20, 21)]),
            vec![(0, 3), (5, 9), (20, 21)]
        );
    }

    #[test]
    fn frozen_memory_is_copy_on_write_for_parent_and_children() {
        let mem = crate::memory::create_guest_memory(8).unwrap();
        mem.write_obj(1u32, GuestAddress(0x1000)).unwrap();
        let mut layers = None;
        let st = freeze(&mem, &mut layers).unwrap();
        assert_eq!(st.copied_bytes, 0);
        let l = layers.clone().unwrap();
        let table = region_table(&mem);
        let a = l.map(&table).unwrap();
        let b = l.map(&table).unwrap();
        assert_eq!(a.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 1);
        mem.write_obj(2u32, GuestAddress(0x1000)).unwrap();
        a.write_obj(3u32, GuestAddress(0x1000)).unwrap();
        assert_eq!(b.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 1);
        assert_eq!(a.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 3);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 2);

        // Second fork of the parent: only its private page is copied, children see 2.
        mem.write_obj(7u32, GuestAddress(0x5000)).unwrap();
        let st = freeze(&mem, &mut layers).unwrap();
        assert_eq!(st.copied_bytes, 2 * PAGE, "{st:?}");
        assert_eq!(st.depth, 2);
        let c = layers.clone().unwrap().map(&table).unwrap();
        assert_eq!(c.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 2);
        assert_eq!(c.read_obj::<u32>(GuestAddress(0x5000)).unwrap(), 7);
        assert_eq!(b.read_obj::<u32>(GuestAddress(0x5000)).unwrap(), 0);
        // A child forks too (stacking over the parent's layers).
        let mut cl = Some(layers.clone().unwrap());
        c.write_obj(9u32, GuestAddress(0x9000)).unwrap();
        freeze(&c, &mut cl).unwrap();
        let d = cl.unwrap().map(&table).unwrap();
        assert_eq!(d.read_obj::<u32>(GuestAddress(0x9000)).unwrap(), 9);
        assert_eq!(d.read_obj::<u32>(GuestAddress(0x5000)).unwrap(), 7);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x9000)).unwrap(), 0);
    }

    #[test]
    fn deep_stacks_are_flattened() {
        let mem = crate::memory::create_guest_memory(4).unwrap();
        let table = region_table(&mem);
        let mut layers = None;
        for i in 0..(MAX_LAYERS as u32 + 2) {
            mem.write_obj(i + 100, GuestAddress(u64::from(i) * PAGE))
                .unwrap();
            let st = freeze(&mem, &mut layers).unwrap();
            assert!(st.depth <= MAX_LAYERS, "{st:?}");
        }
        let l = layers.unwrap();
        assert!(l.depth() < MAX_LAYERS);
        let m = l.map(&table).unwrap();
        for i in 0..(MAX_LAYERS as u32 + 2) {
            assert_eq!(
                m.read_obj::<u32>(GuestAddress(u64::from(i) * PAGE))
                    .unwrap(),
                i + 100
            );
        }
    }
}
