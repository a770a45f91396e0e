//! Live fork of a running VM: [`Vm::fork_source`], [`Vm::fork`] and [`ForkSource`].
//!
//! Pause the vCPUs -> capture vCPU and device state in memory (the snapshot state types, no
//! file) with the devices locked -> freeze guest RAM into copy-on-write layers and remap the
//! parent over them (crate::fork) -> unlock -> resume the parent. The pause window is that
//! and nothing more: the children are built from the [`ForkSource`] afterwards, while the
//! parent runs, exactly as a restore builds a VM (memory from the layers instead of a memory
//! file), each with a vsock TRANSPORT_RESET so its guest drops its connections.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_sync::lock;

use super::snapshot::{check_layout, tmp_name, write_state, MemSource};
use super::{build_machine, create_vm_fd, register_memory, Machine, Vm, VmConfig, VmError};
use crate::fork::{self, FreezeStats, MemLayers};
use crate::snapshot::state::VmSnapshot;
use crate::snapshot::{
    self, memory_file, RestoreConfig, SnapshotError, SnapshotErrorKind, SnapshotInfo, VCPU_TIMEOUT,
};
use crate::vcpu::VcpuState;
use crate::vm::VmErrorKind;

/// Most children one [`Vm::fork`] call starts.
pub const MAX_FORK_CHILDREN: usize = 4096;

/// What taking a [`ForkSource`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForkInfo {
    /// How long the parent's vCPUs were paused.
    pub paused_for: Duration,
    /// Guest RAM bytes copied into a new layer (0 for the first fork of a fresh VM).
    pub copied_bytes: u64,
    /// Whether the layer stack was flattened.
    pub flattened: bool,
    /// Layers the memory is mapped from now.
    pub depth: usize,
}

/// A running VM's state frozen at one instant, from which any number of children start.
/// Holds the captured vCPU and device state and the frozen memory layers; dropping it lets
/// the layers go once no VM maps them.
#[derive(Debug, Clone)]
pub struct ForkSource {
    snap: Arc<VmSnapshot>,
    layers: MemLayers,
    info: ForkInfo,
}

impl Vm {
    /// Freezes this running (or paused) VM into a [`ForkSource`]: pauses the vCPUs, captures
    /// their and the devices' state in memory, makes guest RAM a frozen copy-on-write base
    /// this VM and the children map `MAP_PRIVATE` (no copy of guest memory on a first fork)
    /// and resumes the VM if it was running. Refuses a VM with a read-write disk
    /// ([`SnapshotErrorKind::ReadWriteDisk`]); read-only disks are shared with the children.
    pub fn fork_source(&self) -> Result<ForkSource, SnapshotError> {
        self.fork_source_kind()
            .map_err(|kind| SnapshotError::new(&self.name, kind))
    }

    fn fork_source_kind(&self) -> Result<ForkSource, SnapshotErrorKind> {
        let not = |what: String| SnapshotErrorKind::NotSnapshottable { what };
        if let Some(r) = self.shared.exit_reason() {
            return Err(not(format!("it has exited ({r})")));
        }
        for (index, d) in self.devices.blocks.disks.iter().enumerate() {
            let dev = crate::virtio::mmio::lock(&d.device);
            let cfg = dev.config();
            if !cfg.read_only {
                return Err(SnapshotErrorKind::ReadWriteDisk {
                    index,
                    path: cfg.path.clone(),
                });
            }
        }
        let was_running = self.vcpu_states().contains(&VcpuState::Running);
        let t0 = Instant::now();
        let res = match self.pause(VCPU_TIMEOUT) {
            Ok(()) => self.freeze_paused(),
            Err(e) => Err(e.into_kind().into()),
        };
        if was_running && self.shared.exit_reason().is_none() {
            self.resume();
        }
        let paused_for = t0.elapsed();
        let (snap, layers, st) = res?;
        Ok(ForkSource {
            snap: Arc::new(snap),
            layers,
            info: ForkInfo {
                paused_for,
                copied_bytes: st.copied_bytes,
                flattened: st.flattened,
                depth: st.depth,
            },
        })
    }

    fn freeze_paused(&self) -> Result<(VmSnapshot, MemLayers, FreezeStats), SnapshotErrorKind> {
        let (snap, held) = self.capture_paused()?;
        let Some(mem) = self.memory.as_ref() else {
            return Err(SnapshotErrorKind::NotSnapshottable {
                what: "it is being torn down".into(),
            });
        };
        let mut layers = lock(&self.layers);
        let st = fork::freeze(mem, &mut layers).map_err(SnapshotErrorKind::ForkMemory)?;
        let Some(l) = layers.clone() else {
            return Err(SnapshotErrorKind::NotSnapshottable {
                what: "its memory has no layers after freezing".into(),
            });
        };
        drop(layers);
        drop(held);
        Ok((snap, l, st))
    }

    /// Forks this VM into `n` running children named `<prefix><i>` (i = 0..n): one
    /// [`Vm::fork_source`], then [`ForkSource::spawn`] per child (the parent runs again
    /// meanwhile). On an error the children already started are stopped.
    pub fn fork(&self, n: usize, prefix: &str) -> Result<(ForkSource, Vec<Vm>), SnapshotError> {
        if n == 0 || n > MAX_FORK_CHILDREN {
            return Err(SnapshotError::new(
                &self.name,
                SnapshotErrorKind::NotSnapshottable {
                    what: format!("{n} children asked (1..={MAX_FORK_CHILDREN})"),
                },
            ));
        }
        let source = self.fork_source()?;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            out.push(source.spawn(RestoreConfig::new(format!("{prefix}{i}")))?);
        }
        Ok((source, out))
    }
}

/// A child VM built ahead of time ([`Vm::fork_shell`]) with the parent's machine shape —
/// KVM VM, memory slots over placeholder memory, irqchip, PIT, devices, vCPUs — so that
/// [`ForkSource::spawn_shell`] only maps the frozen memory over the placeholder, loads the
/// state and starts the threads: none of the kernel registrations that can each wait for an
/// SRCU grace period is left on the fork's path. Dropping it frees everything.
pub struct ForkShell {
    // Drop order: devices and vCPU fds, then the VM fd, then the memory they use.
    machine: Machine,
    vm_fd: kvm_ioctls::VmFd,
    mem: vm_memory::GuestMemoryMmap,
    name: String,
    vcpus: u8,
}

impl std::fmt::Debug for ForkShell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForkShell")
            .field("name", &self.name)
            .field("vcpus", &self.vcpus)
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Builds a [`ForkShell`] shaped like this VM (vCPUs, memory size, vsock, read-only disks)
    /// for a later [`ForkSource::spawn_shell`] of one of its fork sources.
    pub fn fork_shell(&self, cfg: RestoreConfig) -> Result<ForkShell, SnapshotError> {
        let name = cfg.name.clone();
        self.fork_shell_kind(cfg)
            .map_err(|kind| SnapshotError::new(name, kind))
    }

    fn fork_shell_kind(&self, cfg: RestoreConfig) -> Result<ForkShell, SnapshotErrorKind> {
        let Some(mem) = self.memory.as_ref() else {
            return Err(SnapshotErrorKind::NotSnapshottable {
                what: "it is being torn down".into(),
            });
        };
        let total: u64 = vm_memory::GuestMemoryBackend::iter(mem)
            .map(vm_memory::GuestMemoryRegion::len)
            .sum();
        let mut vcfg = VmConfig::new(cfg.name.clone(), std::path::PathBuf::new());
        vcfg.vcpus = self.shared.vcpus.len() as u8;
        vcfg.mem_mib = total >> 20;
        vcfg.serial_ring_bytes = cfg.serial_ring_bytes;
        vcfg.serial_log = cfg.serial_log;
        vcfg.seccomp = cfg.seccomp;
        vcfg.vsock_cid = self.vsock().map(|v| v.guest_cid());
        vcfg.disks = self
            .devices
            .blocks
            .disks
            .iter()
            .map(|d| crate::virtio::mmio::lock(&d.device).config().clone())
            .collect();
        match vcfg.validate().map_err(VmError::into_kind) {
            Ok(()) | Err(VmErrorKind::FileMissing { what: "kernel", .. }) => {}
            Err(e) => return Err(e.into()),
        }
        // Placeholder RAM (anonymous, never touched): the fork maps its layers over it.
        let placeholder =
            vm_memory::GuestMemoryMmap::from_ranges(&crate::memory::ram_ranges(vcfg.mem_mib))
                .map_err(|e| {
                    VmErrorKind::Memory(crate::memory::MemoryError::Map {
                        mib: vcfg.mem_mib,
                        source: Box::new(e),
                    })
                })?;
        let (kvm, vm_fd) = create_vm_fd()?;
        register_memory(&vm_fd, &placeholder)?;
        let machine = build_machine(&vcfg, kvm, &vm_fd, &placeholder)?;
        Ok(ForkShell {
            machine,
            vm_fd,
            mem: placeholder,
            name: cfg.name,
            vcpus: vcfg.vcpus,
        })
    }
}

impl ForkSource {
    /// Starts a child in `shell` (built by [`Vm::fork_shell`] of the same VM): checks the
    /// device layout and disks, maps the frozen layers over the shell's memory in place,
    /// loads the state and starts the threads, as [`spawn_with`](Self::spawn_with) does.
    pub fn spawn_shell<T>(
        &self,
        shell: ForkShell,
        before_start: impl FnOnce(&Vm) -> Result<T, SnapshotErrorKind>,
    ) -> Result<(Vm, T), SnapshotError> {
        let name = shell.name.clone();
        let prepared = (|| {
            let ForkShell {
                machine,
                vm_fd,
                mem,
                name,
                vcpus,
            } = shell;
            if usize::from(vcpus) != self.snap.vcpus.len() {
                return Err(SnapshotErrorKind::Device {
                    device: "vCPU",
                    what: format!("shell has {vcpus}, the fork {}", self.snap.vcpus.len()),
                });
            }
            check_layout(&self.snap, &machine)?;
            self.layers
                .map_over(&mem)
                .map_err(SnapshotErrorKind::ForkMemory)?;
            Ok(super::snapshot::PreparedRestore::from_parts(
                machine,
                vm_fd,
                mem,
                Some(self.layers.clone()),
                self.snap.clone(),
                name,
                vcpus,
            ))
        })()
        .map_err(|kind| SnapshotError::new(&name, kind))?;
        prepared.start_with(before_start)
    }

    /// What taking it did (pause window, bytes copied, layer depth).
    pub fn info(&self) -> ForkInfo {
        self.info
    }

    /// Guest RAM size in bytes.
    pub fn guest_bytes(&self) -> u64 {
        self.snap.regions.iter().map(|r| r.len).sum()
    }

    /// Starts a child: a new VM whose memory maps the frozen layers copy-on-write, with the
    /// captured vCPU and device state, read-only disks reopened (and checked unchanged) and a
    /// vsock TRANSPORT_RESET.
    pub fn spawn(&self, cfg: RestoreConfig) -> Result<Vm, SnapshotError> {
        self.spawn_with(cfg, |_| Ok(())).map(|(vm, ())| vm)
    }

    /// [`spawn`](Self::spawn), calling `before_start` as [`Vm::restore_with`] does (e.g. to
    /// listen on the agent port before the vCPUs start).
    pub fn spawn_with<T>(
        &self,
        cfg: RestoreConfig,
        before_start: impl FnOnce(&Vm) -> Result<T, SnapshotErrorKind>,
    ) -> Result<(Vm, T), SnapshotError> {
        let name = cfg.name.clone();
        Vm::prepare_source(self.snap.clone(), MemSource::Layers(&self.layers), cfg)
            .map_err(|kind| SnapshotError::new(&name, kind))?
            .start_with(before_start)
    }

    /// Saves the fork as a snapshot directory (`vm.state` + `memory.bin`) that
    /// [`Vm::restore`] reads like any other; the parent and children keep running.
    pub fn save(&self, dir: &Path) -> Result<SnapshotInfo, SnapshotError> {
        self.save_kind(dir)
            .map_err(|kind| SnapshotError::new(&self.snap.vm_name, kind))
    }

    fn save_kind(&self, dir: &Path) -> Result<SnapshotInfo, SnapshotErrorKind> {
        let origin = snapshot::current_origin()?;
        std::fs::create_dir_all(dir).map_err(|source| SnapshotErrorKind::Io {
            path: dir.to_owned(),
            op: "create directory",
            source,
        })?;
        let table: Vec<(vm_memory::GuestAddress, usize)> = self
            .snap
            .regions
            .iter()
            .map(|r| (vm_memory::GuestAddress(r.guest_addr), r.len as usize))
            .collect();
        // A private view nobody else writes: read only what the layers hold.
        let mem = self
            .layers
            .map(&table)
            .map_err(SnapshotErrorKind::ForkMemory)?;
        let lens: Vec<u64> = self.snap.regions.iter().map(|r| r.len).collect();
        let hint = self.layers.data_runs(&lens);
        let id = snapshot::new_snapshot_id();
        let (state_path, mem_path) = snapshot::paths(dir);
        let tmp_mem = tmp_name(&mem_path);
        let (regions, memory_file_len, stats) =
            match memory_file::write_with_hint(&tmp_mem, &mem, &id, Some(&hint)) {
                Ok(w) => w,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp_mem);
                    return Err(e.into());
                }
            };
        std::fs::rename(&tmp_mem, &mem_path).map_err(|source| SnapshotErrorKind::Io {
            path: mem_path.clone(),
            op: "rename",
            source,
        })?;
        let snap = VmSnapshot {
            snapshot_id: id,
            regions,
            memory_file_len,
            ..clone_snapshot(&self.snap)?
        };
        let (state_bytes, stats) = write_state(&snap, &state_path, &origin, stats)?;
        Ok(SnapshotInfo {
            dir: dir.to_owned(),
            state_bytes,
            guest_bytes: stats.guest_bytes,
            written_bytes: stats.written_bytes,
            paused_for: self.info.paused_for,
        })
    }
}

/// A copy of `s` (VmSnapshot is not `Clone`, kvm_xsave is not: a postcard round trip
/// copies it exactly).
fn clone_snapshot(s: &VmSnapshot) -> Result<VmSnapshot, SnapshotErrorKind> {
    let err = |e: postcard::Error| SnapshotErrorKind::NotSnapshottable {
        what: format!("its state does not copy: {e}"),
    };
    let bytes = postcard::to_allocvec(s).map_err(err)?;
    postcard::from_bytes(&bytes).map_err(err)
}
