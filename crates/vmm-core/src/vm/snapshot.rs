//! [`Vm::snapshot`] and [`Vm::restore`]: where the snapshot module (crate::snapshot) meets
//! the VM core. A child of `vm` so it can reach the VM's fds, threads and devices.
//!
//! Snapshot: pause -> save each vCPU on its own thread (after completing pending I/O) ->
//! lock serial, vsock transport and device -> save VM/device state -> write memory (temp +
//! rename) -> write state (temp + rename) -> unlock -> resume if it was running.
//!
//! Restore: load and check the state file, map the memory file `MAP_PRIVATE` and check it —
//! all before any KVM object exists — then build the machine as [`Vm::start`] does (minus
//! kernel loading), load VM state, vCPU state, serial and transport registers, send the vsock
//! TRANSPORT_RESET, and start the device loop and the vCPU threads. [`Vm::prepare_restore`]
//! does everything up to the state load ahead of time; [`PreparedRestore::start`] the rest.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use kvm_ioctls::Kvm;

use super::{
    build_machine, create_vm_fd, kvm, register_memory, Machine, Vm, VmConfig, VmError, VmErrorKind,
};
use crate::snapshot::kvm_state::{self, VmKvmState};
use crate::snapshot::state::{
    MmioSnapshot, RegionSnapshot, VcpuSnapshot, VmSnapshot, VsockSnapshot,
};
use crate::snapshot::{
    self, format, memory_file, RestoreConfig, SnapshotError, SnapshotErrorKind, SnapshotInfo,
    VCPU_TIMEOUT,
};
use crate::vcpu::{VcpuJob, VcpuState};
use crate::virtio::block::BlockSnapshot;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::VirtioDevice;

/// How often snapshotting retries when the device thread moved a queue between reading the
/// transport and locking the device.
const DEVICE_QUIESCE_TRIES: usize = 100;

use kiln_sync::lock;

/// KVM's MSR index list, read once per process.
fn msr_indices(kvm: &Kvm) -> Result<&'static [u32], SnapshotErrorKind> {
    static LIST: OnceLock<Vec<u32>> = OnceLock::new();
    if let Some(l) = LIST.get() {
        return Ok(l);
    }
    let l = kvm
        .get_msr_index_list()
        .map_err(VmErrorKind::kvm("get MSR index list"))?
        .as_slice()
        .to_vec();
    Ok(LIST.get_or_init(|| l))
}

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> SnapshotErrorKind {
    let path = path.to_owned();
    move |source| SnapshotErrorKind::Io { path, op, source }
}

impl Vm {
    /// Saves this VM to `dir` (created if missing; an existing snapshot there is replaced).
    /// The vCPUs are paused for the duration and resumed afterwards if they were running; a
    /// VM that was paused stays paused. Open vsock connections are not saved (a restored VM
    /// starts without them and its guest gets a TRANSPORT_RESET).
    pub fn snapshot(&self, dir: &Path) -> Result<SnapshotInfo, SnapshotError> {
        self.snapshot_kind(dir)
            .map_err(|kind| SnapshotError::new(&self.name, kind))
    }

    /// [`Vm::snapshot`]; the caller adds the VM's name to an error.
    fn snapshot_kind(&self, dir: &Path) -> Result<SnapshotInfo, SnapshotErrorKind> {
        let not = |what: String| SnapshotErrorKind::NotSnapshottable { what };
        if let Some(r) = self.shared.exit_reason() {
            return Err(not(format!("it has exited ({r})")));
        }
        let origin = snapshot::current_origin()?;
        std::fs::create_dir_all(dir).map_err(io_err(dir, "create directory"))?;
        let was_running = self.vcpu_states().contains(&VcpuState::Running);
        let t0 = Instant::now();
        let res = match self.pause(VCPU_TIMEOUT) {
            Ok(()) => self.snapshot_paused(dir, &origin),
            Err(e) => Err(e.into_kind().into()),
        };
        if was_running && self.shared.exit_reason().is_none() {
            self.resume();
        }
        let mut info = res?;
        info.paused_for = t0.elapsed();
        Ok(info)
    }

    fn snapshot_paused(
        &self,
        dir: &Path,
        origin: &format::Origin,
    ) -> Result<SnapshotInfo, SnapshotErrorKind> {
        let (mut snap, held) = self.capture_paused()?;
        let Some(mem) = self.memory.as_ref() else {
            return Err(SnapshotErrorKind::NotSnapshottable {
                what: "it is being torn down".into(),
            });
        };
        let lens: Vec<u64> = snap.regions.iter().map(|r| r.len).collect();
        let hint = lock(&self.layers).as_ref().map(|l| l.data_runs(&lens));
        let id = snapshot::new_snapshot_id();
        let (state_path, mem_path) = snapshot::paths(dir);
        let tmp_mem = tmp_name(&mem_path);
        let written = memory_file::write_with_hint(&tmp_mem, mem, &id, hint.as_deref());
        drop(held);
        let (regions, memory_file_len, stats) = match written {
            Ok(w) => w,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp_mem);
                return Err(e.into());
            }
        };
        std::fs::rename(&tmp_mem, &mem_path).map_err(io_err(&mem_path, "rename"))?;
        snap.snapshot_id = id;
        snap.regions = regions;
        snap.memory_file_len = memory_file_len;
        write_state(&snap, &state_path, origin, stats).map(|(state_bytes, stats)| SnapshotInfo {
            dir: dir.to_owned(),
            state_bytes,
            guest_bytes: stats.guest_bytes,
            written_bytes: stats.written_bytes,
            paused_for: Default::default(),
        })
    }

    /// Reads the whole state of the paused VM but its memory: vCPUs (on their threads),
    /// serial, vsock and disk transports and devices, irqchips, PIT, clock. The returned
    /// guard keeps the devices locked (so nothing touches guest memory or the rings) until
    /// it is dropped. The snapshot id, region file offsets and memory file length are left
    /// for the caller (region offsets are those of one memory file laid out back to back).
    pub(super) fn capture_paused(
        &self,
    ) -> Result<(VmSnapshot, HeldDevices<'_>), SnapshotErrorKind> {
        let not = |what: &str| SnapshotErrorKind::NotSnapshottable {
            what: what.to_owned(),
        };
        if let Some(s) = self
            .vcpu_states()
            .into_iter()
            .find(|s| *s != VcpuState::Paused)
        {
            return Err(not(&format!("a vCPU is {s:?}, not paused")));
        }
        let (Some(vm_fd), Some(mem)) = (self.vm_fd.as_ref(), self.memory.as_ref()) else {
            return Err(not("it is being torn down"));
        };
        let kvm = kvm()?;
        let vcpus = self.save_vcpus(msr_indices(kvm)?)?;

        // Devices: serial, then the vsock transport and device, held until memory is written
        // so the device thread cannot touch guest memory or the rings meanwhile.
        let serial = lock(&self.serial).snapshot_state();
        let mut held = HeldDevices(Vec::new());
        let vsock = match &self.devices.vsock {
            None => None,
            Some(v) => {
                let t = lock(&v.transport);
                let mut found = None;
                for _ in 0..DEVICE_QUIESCE_TRIES {
                    let st = t.save_state();
                    let d = lock(&v.device);
                    let saved: Vec<u16> = st.queues.iter().map(|q| q.next_index).collect();
                    let now = d.queue_next_indices();
                    let same = match now {
                        Some(n) => n == saved,
                        None => saved.iter().all(|&x| x == 0),
                    };
                    if same {
                        found = Some((st, d));
                        break;
                    }
                }
                let Some((st, d)) = found else {
                    return Err(not("the vsock device kept moving its queues"));
                };
                held.0.push(Box::new((t, d)));
                Some(VsockSnapshot {
                    guest_cid: v.host.guest_cid(),
                    mmio_base: v.slot.base,
                    gsi: v.slot.gsi,
                    transport: st,
                })
            }
        };
        // Disks: each transport and device likewise, held until memory is written; the
        // backing file's identity is read with the device locked (no write in flight).
        let mut blocks = Vec::with_capacity(self.devices.blocks.disks.len());
        for (index, b) in self.devices.blocks.disks.iter().enumerate() {
            let t = lock(&b.transport);
            let Some((st, d)) = quiesced(&t, &b.device) else {
                return Err(not(&format!("disk {index} kept moving its queue")));
            };
            let backing = d.identity().map_err(|source| SnapshotErrorKind::Disk {
                index,
                source: Box::new(source),
            })?;
            let cfg = d.config();
            blocks.push(BlockSnapshot {
                path: cfg.path.clone(),
                read_only: cfg.read_only,
                id: cfg.id.clone(),
                capacity: d.capacity(),
                backing,
                mmio_base: b.slot.base,
                gsi: b.slot.gsi,
                transport: st,
            });
            held.0.push(Box::new((t, d)));
        }
        let vm_state = kvm_state::save_vm(vm_fd).map_err(|source| SnapshotErrorKind::KvmState {
            what: "VM state".into(),
            source,
        })?;
        let mut regions = Vec::new();
        let mut off = memory_file::DATA_OFFSET;
        for r in vm_memory::GuestMemoryBackend::iter(mem) {
            use vm_memory::{Address, GuestMemoryRegion};
            regions.push(RegionSnapshot {
                guest_addr: r.start_addr().raw_value(),
                len: r.len(),
                file_offset: off,
            });
            off += r.len();
        }
        let snap = VmSnapshot {
            snapshot_id: [0; 16],
            vm_name: self.name.clone(),
            mem_mib: ram_mib(&regions),
            cmdline: self.cmdline.clone(),
            regions,
            memory_file_len: off,
            vcpus,
            pic_master: vm_state.pic_master,
            pic_slave: vm_state.pic_slave,
            ioapic: vm_state.ioapic,
            pit: vm_state.pit,
            clock: vm_state.clock,
            serial,
            vsock,
            blocks,
        };
        Ok((snap, held))
    }

    /// Saves every (paused) vCPU on its own thread.
    fn save_vcpus(&self, msrs: &'static [u32]) -> Result<Vec<VcpuSnapshot>, SnapshotErrorKind> {
        let (tx, rx) = mpsc::channel();
        for ctl in &self.shared.vcpus {
            ctl.post_job(VcpuJob::SaveState {
                msrs,
                reply: tx.clone(),
            });
        }
        drop(tx);
        let deadline = Instant::now() + VCPU_TIMEOUT;
        let mut out: Vec<Option<VcpuSnapshot>> =
            (0..self.shared.vcpus.len()).map(|_| None).collect();
        for _ in 0..out.len() {
            let wait = deadline.saturating_duration_since(Instant::now());
            let (i, r) =
                rx.recv_timeout(wait)
                    .map_err(|_| SnapshotErrorKind::NotSnapshottable {
                        what: format!("a vCPU did not save its state within {VCPU_TIMEOUT:?}"),
                    })?;
            let s = r.map_err(|source| SnapshotErrorKind::KvmState {
                what: format!("vCPU {i}"),
                source,
            })?;
            if let Some(slot) = out.get_mut(usize::from(i)) {
                *slot = Some(s);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Builds a new, running VM from the snapshot in `dir`. The state file and memory file
    /// are fully checked before anything is created; on any error nothing is left behind.
    pub fn restore(dir: &Path, cfg: RestoreConfig) -> Result<Vm, SnapshotError> {
        Self::restore_with(dir, cfg, |_| Ok(())).map(|(vm, ())| vm)
    }

    /// [`Vm::restore`], calling `before_start` with the fully restored VM just before its
    /// vCPUs start (the device thread already runs). Use it to set up what the guest will
    /// use at once, e.g. the vsock listener its agent reconnects to after the
    /// TRANSPORT_RESET. An error from it stops the VM and is returned (naming the VM).
    pub fn restore_with<T>(
        dir: &Path,
        cfg: RestoreConfig,
        before_start: impl FnOnce(&Vm) -> Result<T, SnapshotErrorKind>,
    ) -> Result<(Vm, T), SnapshotError> {
        let snap = snapshot::load(dir).map_err(|kind| SnapshotError::new(&cfg.name, kind))?;
        let (_, mem_path) = snapshot::paths(dir);
        Self::restore_from(snap, &mem_path, cfg, before_start)
    }

    /// [`Vm::restore_with`] from an already loaded (and validated) state and its memory file.
    pub fn restore_from<T>(
        snap: VmSnapshot,
        mem_path: &Path,
        cfg: RestoreConfig,
        before_start: impl FnOnce(&Vm) -> Result<T, SnapshotErrorKind>,
    ) -> Result<(Vm, T), SnapshotError> {
        Self::prepare_from(snap, mem_path, cfg)?.start_with(before_start)
    }

    /// The first half of a restore, done ahead of time: checks the snapshot in `dir`, maps
    /// its memory file and builds the VM's kernel objects, devices and vCPUs. What is left
    /// for [`PreparedRestore::start`] is loading the guest state and starting the threads —
    /// no memory-slot, irqchip or device registration (each of those can wait for an SRCU
    /// grace period). Use it to keep restores ready (pool refill); dropping it frees all.
    pub fn prepare_restore(
        dir: &Path,
        cfg: RestoreConfig,
    ) -> Result<PreparedRestore, SnapshotError> {
        let snap = snapshot::load(dir).map_err(|kind| SnapshotError::new(&cfg.name, kind))?;
        let (_, mem_path) = snapshot::paths(dir);
        Self::prepare_from(snap, &mem_path, cfg)
    }

    /// [`Vm::prepare_from`] with the guest memory coming from `source` (a memory file or a
    /// live fork's frozen layers).
    pub(super) fn prepare_source(
        snap: Arc<VmSnapshot>,
        source: MemSource<'_>,
        cfg: RestoreConfig,
    ) -> Result<PreparedRestore, SnapshotErrorKind> {
        Self::prepare_kind(snap, source, cfg)
    }

    /// [`Vm::prepare_restore`] from an already loaded (and validated) state.
    pub fn prepare_from(
        snap: VmSnapshot,
        mem_path: &Path,
        cfg: RestoreConfig,
    ) -> Result<PreparedRestore, SnapshotError> {
        let name = cfg.name.clone();
        Self::prepare_kind(Arc::new(snap), MemSource::File(mem_path), cfg)
            .map_err(|kind| SnapshotError::new(name, kind))
    }

    /// [`Vm::prepare_from`]; the caller adds the VM's name to an error.
    fn prepare_kind(
        snap: Arc<VmSnapshot>,
        source: MemSource<'_>,
        cfg: RestoreConfig,
    ) -> Result<PreparedRestore, SnapshotErrorKind> {
        let name = cfg.name.clone();
        let device_err =
            |device: &'static str, what: String| SnapshotErrorKind::Device { device, what };
        let mut vcfg = VmConfig::new(cfg.name.clone(), PathBuf::new());
        vcfg.vcpus = snap.vcpus.len() as u8;
        vcfg.mem_mib = snap.mem_mib;
        vcfg.serial_ring_bytes = cfg.serial_ring_bytes;
        vcfg.serial_log = cfg.serial_log;
        vcfg.seccomp = cfg.seccomp;
        vcfg.vsock_cid = match (&snap.vsock, cfg.vsock_cid) {
            (Some(v), c) => Some(c.unwrap_or(v.guest_cid)),
            (None, None) => None,
            (None, Some(_)) => {
                return Err(device_err(
                    "virtio-vsock",
                    "a vsock CID was given but the snapshot has no vsock device".into(),
                ))
            }
        };
        vcfg.disks = snap.blocks.iter().map(|b| b.disk_config()).collect();
        // Everything but the kernel file (a restore has none) must pass VmConfig's checks;
        // the kernel check is the last one validate() makes.
        match vcfg.validate().map_err(VmError::into_kind) {
            Ok(()) | Err(VmErrorKind::FileMissing { what: "kernel", .. }) => {}
            Err(e) => return Err(e.into()),
        }
        // Map (and check) the memory file before creating any KVM object.
        let (mem, layers) = match source {
            MemSource::File(mem_path) => {
                let mem = memory_file::map(
                    mem_path,
                    &snap.snapshot_id,
                    &snap.regions,
                    snap.memory_file_len,
                )?;
                let layers = crate::fork::MemLayers::from_private_file_mapping(&mem);
                (mem, layers)
            }
            MemSource::Layers(l) => {
                let table: Vec<(vm_memory::GuestAddress, usize)> = snap
                    .regions
                    .iter()
                    .map(|r| (vm_memory::GuestAddress(r.guest_addr), r.len as usize))
                    .collect();
                let mem = l.map(&table).map_err(SnapshotErrorKind::ForkMemory)?;
                (mem, Some(l.clone()))
            }
        };

        let (kvm, vm_fd) = create_vm_fd()?;
        register_memory(&vm_fd, &mem)?;
        let machine = build_machine(&vcfg, kvm, &vm_fd, &mem)?;

        check_layout(&snap, &machine)?;
        Ok(PreparedRestore {
            machine,
            vm_fd,
            mem,
            layers,
            snap,
            name,
            vcpus: vcfg.vcpus,
        })
    }
}

/// A VM built for a snapshot by [`Vm::prepare_restore`] whose guest state is not loaded yet.
/// Dropping it frees everything (no thread runs yet).
pub struct PreparedRestore {
    // Drop order: devices and vCPU fds, then the VM fd, then the memory they use.
    machine: Machine,
    vm_fd: kvm_ioctls::VmFd,
    mem: vm_memory::GuestMemoryMmap,
    layers: Option<crate::fork::MemLayers>,
    snap: Arc<VmSnapshot>,
    name: String,
    vcpus: u8,
}

/// Where a restore's guest memory comes from.
pub(super) enum MemSource<'a> {
    /// A snapshot directory's memory file.
    File(&'a Path),
    /// A live fork's frozen layers.
    Layers(&'a crate::fork::MemLayers),
}

impl std::fmt::Debug for PreparedRestore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedRestore")
            .field("name", &self.name)
            .field("vcpus", &self.vcpus)
            .finish_non_exhaustive()
    }
}

impl PreparedRestore {
    /// Assembles a prepared restore from its parts (a fork shell being started).
    pub(super) fn from_parts(
        machine: Machine,
        vm_fd: kvm_ioctls::VmFd,
        mem: vm_memory::GuestMemoryMmap,
        layers: Option<crate::fork::MemLayers>,
        snap: Arc<VmSnapshot>,
        name: String,
        vcpus: u8,
    ) -> Self {
        PreparedRestore {
            machine,
            vm_fd,
            mem,
            layers,
            snap,
            name,
            vcpus,
        }
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Loads the guest state and starts the VM.
    pub fn start(self) -> Result<Vm, SnapshotError> {
        self.start_with(|_| Ok(())).map(|(vm, ())| vm)
    }

    /// [`start`](Self::start), calling `before_start` as [`Vm::restore_with`] does.
    pub fn start_with<T>(
        self,
        before_start: impl FnOnce(&Vm) -> Result<T, SnapshotErrorKind>,
    ) -> Result<(Vm, T), SnapshotError> {
        let name = self.name.clone();
        self.start_kind(before_start)
            .map_err(|kind| SnapshotError::new(name, kind))
    }

    /// [`start_with`](Self::start_with); the caller adds the VM's name to an error.
    fn start_kind<T>(
        self,
        before_start: impl FnOnce(&Vm) -> Result<T, SnapshotErrorKind>,
    ) -> Result<(Vm, T), SnapshotErrorKind> {
        // `machine` last: on an early return its vCPU fds and devices go first, as before.
        let PreparedRestore {
            vm_fd,
            mem,
            layers,
            snap,
            name,
            vcpus,
            machine,
        } = self;
        let state_err = |what: String| move |source| SnapshotErrorKind::KvmState { what, source };

        // KVM state: VM-wide first, then each vCPU; device interrupts only after the LAPICs
        // are loaded (loading a LAPIC overwrites pending interrupts).
        let vm_state = VmKvmState {
            pic_master: snap.pic_master,
            pic_slave: snap.pic_slave,
            ioapic: snap.ioapic,
            pit: snap.pit,
            clock: snap.clock,
        };
        kvm_state::restore_vm(&vm_fd, &vm_state).map_err(state_err("VM state".into()))?;
        for (fd, s) in machine.vcpu_fds.iter().zip(&snap.vcpus) {
            kvm_state::restore_vcpu(fd, s).map_err(state_err(format!("vCPU {}", s.index)))?;
            // Tell a kvmclock guest it was stopped (no soft-lockup reports); others refuse.
            let _ = fd.kvmclock_ctrl();
        }
        lock(&machine.serial)
            .restore_snapshot_state(&snap.serial)
            .map_err(SnapshotErrorKind::device_restore::<std::io::Error>(
                "serial",
            ))?;
        if let (Some(saved), Some(v)) = (&snap.vsock, &machine.devices.vsock) {
            lock(&v.transport).restore_state(&saved.transport).map_err(
                SnapshotErrorKind::device_restore::<crate::virtio::mmio::MmioError>("virtio-vsock"),
            )?;
            // Connections did not survive: tell the guest so its agent reconnects.
            lock(&v.device).transport_reset();
        }
        for (index, (saved, b)) in snap
            .blocks
            .iter()
            .zip(&machine.devices.blocks.disks)
            .enumerate()
        {
            lock(&b.transport)
                .restore_state(&saved.transport)
                .map_err(|e| SnapshotErrorKind::Device {
                    device: "virtio-blk",
                    what: format!("disk {index}: {e}"),
                })?;
        }

        let cmdline = snap.cmdline.clone();
        Vm::launch(
            name,
            machine,
            vm_fd,
            mem,
            layers,
            vcpus,
            cmdline,
            before_start,
        )
    }
}

/// Device locks held while guest memory is read or frozen (dropping it unlocks them).
pub(super) struct HeldDevices<'a>(Vec<Box<dyn Held + 'a>>);

/// Anything kept only to be dropped later (device guards).
pub(super) trait Held {}
impl<T> Held for T {}

/// Validates `snap`, encodes it and writes it to `state_path` (temp + rename). Returns the
/// state file's size and `stats`.
pub(super) fn write_state(
    snap: &VmSnapshot,
    state_path: &Path,
    origin: &format::Origin,
    stats: memory_file::WriteStats,
) -> Result<(u64, memory_file::WriteStats), SnapshotErrorKind> {
    snap.validate()
        .map_err(|what| SnapshotErrorKind::NotSnapshottable {
            what: format!("its state does not pass validation: {what}"),
        })?;
    let bytes = format::encode(snap, origin).map_err(|source| SnapshotErrorKind::StateFile {
        path: state_path.to_owned(),
        source,
    })?;
    snapshot::write_atomic(state_path, &bytes)?;
    Ok((bytes.len() as u64, stats))
}

/// Checks that a machine built for `snap` has the device layout its guest knows (vsock and
/// disk windows and GSIs) and that the disks' backing files are unchanged (checked on the
/// descriptors just opened).
pub(super) fn check_layout(snap: &VmSnapshot, machine: &Machine) -> Result<(), SnapshotErrorKind> {
    let device_err =
        |device: &'static str, what: String| SnapshotErrorKind::Device { device, what };
    // The device layout must be the one the guest knows.
    if let (Some(saved), Some(v)) = (&snap.vsock, &machine.devices.vsock) {
        if saved.mmio_base != v.slot.base || saved.gsi != v.slot.gsi {
            return Err(device_err(
                "virtio-vsock",
                format!(
                    "saved at {:#x} GSI {}, rebuilt at {:#x} GSI {}",
                    saved.mmio_base, saved.gsi, v.slot.base, v.slot.gsi
                ),
            ));
        }
    }
    // Disks: same windows, and backing files unchanged since the snapshot (checked on the
    // descriptors just opened).
    for (index, (saved, b)) in snap
        .blocks
        .iter()
        .zip(&machine.devices.blocks.disks)
        .enumerate()
    {
        if saved.mmio_base != b.slot.base || saved.gsi != b.slot.gsi {
            return Err(device_err(
                "virtio-blk",
                format!(
                    "disk {index} saved at {:#x} GSI {}, rebuilt at {:#x} GSI {}",
                    saved.mmio_base, saved.gsi, b.slot.base, b.slot.gsi
                ),
            ));
        }
        lock(&b.device)
            .check_identity(&saved.backing)
            .map_err(|source| SnapshotErrorKind::Disk {
                index,
                source: Box::new(source),
            })?;
    }
    if snap.blocks.len() != machine.devices.blocks.disks.len() {
        return Err(device_err(
            "virtio-blk",
            format!(
                "{} disks saved, {} built",
                snap.blocks.len(),
                machine.devices.blocks.disks.len()
            ),
        ));
    }
    Ok(())
}

/// Saves `t`'s registers once its device is at rest: the device lock is taken after reading
/// the transport, and the read is retried if the device thread moved the queue in between.
/// Returns the state with the device still locked.
fn quiesced<'a, D: VirtioDevice>(
    t: &MmioTransport<D>,
    dev: &'a Mutex<D>,
) -> Option<(MmioSnapshot, MutexGuard<'a, D>)> {
    for _ in 0..DEVICE_QUIESCE_TRIES {
        let st = t.save_state();
        let d = lock(dev);
        let saved: Vec<u16> = st.queues.iter().map(|q| q.next_index).collect();
        let same = match d.queue_next_indices() {
            Some(n) => n == saved,
            None => saved.iter().all(|&x| x == 0),
        };
        if same {
            return Some((st, d));
        }
    }
    None
}

/// `path` with a temporary suffix in the same directory (for write + rename).
pub(super) fn tmp_name(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".tmp.{}", std::process::id()));
    PathBuf::from(s)
}

/// Guest RAM in MiB from the region table.
fn ram_mib(regions: &[crate::snapshot::state::RegionSnapshot]) -> u64 {
    regions.iter().map(|r| r.len).sum::<u64>() >> 20
}
