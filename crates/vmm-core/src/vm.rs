//! A Kiln microVM: configuration, start-up (memory -> KVM VM -> devices -> kernel -> vCPU
//! threads -> device loop), the running handle and its orderly teardown.
//!
//! Start-up follows rust-vmm's vmm-reference order. Teardown ([`Vm::stop`] and `Drop`) asks
//! every vCPU to stop, kicks it out of `KVM_RUN`, joins every thread, then closes the KVM fds
//! and unmaps guest memory; it never waits on a blocked ioctl.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_fpu, kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::boot::{self, BootEntry, BootError};
use crate::bus::{Bus, BusError, SharedDevice};
use crate::event_loop::{DeviceEventManager, EventLoop, Subscriber};
use crate::memory::{self, MemoryError, MMIO_DEVICES_END, MMIO_SLOT_SIZE, MMIO_START};
use crate::mptable::{self, MpTableError};
use crate::seccomp::{self, SeccompError, SeccompMode, ThreadKind};
use crate::serial::{Console, SerialDevice, WaitOutcome, COM1_IRQ, COM1_LEN, COM1_PORT};
use crate::vcpu::{self, VcpuRunner, VcpuState, VmShared};

pub use crate::vcpu::ExitReason;

/// `Vm::snapshot` / `Vm::restore` (snapshot module's entry points; vm/snapshot.rs).
mod snapshot;
pub use snapshot::PreparedRestore;
/// `Vm::fork_source` / `Vm::fork` and [`ForkSource`] (live fork; vm/fork.rs).
mod fork;
pub use fork::{ForkInfo, ForkShell, ForkSource};
/// `Vm::exit_process` (end the process without waiting for the VM's teardown; vm/teardown.rs).
mod teardown;
pub use teardown::ExitMode;

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u8 = 8;
/// Least guest memory (MiB): the kernel loads at 1 MiB.
pub const MIN_MEM_MIB: u64 = 2;
/// Most guest memory (MiB).
pub const MAX_MEM_MIB: u64 = 64 * 1024;
/// Largest serial ring buffer.
pub const MAX_SERIAL_RING: usize = 16 << 20;
/// Bytes of serial output quoted in errors.
pub const ERROR_TAIL_BYTES: usize = 2048;
/// First GSI handed to devices (0-4 are PIT, keyboard, cascade, COM2, COM1).
pub const FIRST_DEVICE_GSI: u32 = 5;
/// Last usable IOAPIC GSI.
pub const LAST_DEVICE_GSI: u32 = 23;

/// What to boot and how big.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Name used in thread names, logs and errors.
    pub name: String,
    /// vCPU count, 1..=8.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Kernel image: ELF vmlinux (PVH) or bzImage.
    pub kernel: PathBuf,
    /// Optional initramfs (uncompressed newc cpio for Kiln guests).
    pub initramfs: Option<PathBuf>,
    /// Appended to the kernel command line after the base and device arguments.
    pub cmdline_extra: String,
    /// Guest CID for the virtio-vsock device; `None` means no vsock device.
    pub vsock_cid: Option<u64>,
    /// Disks (virtio-blk), in the order the guest sees them (vda, vdb, ...).
    pub disks: Vec<crate::virtio::block::DiskConfig>,
    /// Bytes of serial output kept.
    pub serial_ring_bytes: usize,
    /// Also log guest serial lines through `tracing` (info level).
    pub serial_log: bool,
    /// seccomp filters on the VM's threads (default: `$KILN_SECCOMP`, read once per process;
    /// filters on unless it is `0`). docs/SECURITY.md.
    pub seccomp: SeccompMode,
}

impl VmConfig {
    /// Defaults (1 vCPU, 128 MiB, 64 KiB serial ring, no vsock) for booting `kernel`.
    pub fn new(name: impl Into<String>, kernel: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            vcpus: 1,
            mem_mib: 128,
            kernel: kernel.into(),
            initramfs: None,
            cmdline_extra: String::new(),
            vsock_cid: None,
            disks: Vec::new(),
            serial_ring_bytes: 64 * 1024,
            serial_log: false,
            seccomp: SeccompMode::from_env(),
        }
    }

    /// Checks the configuration; the error names the VM and the offending field.
    pub fn validate(&self) -> Result<(), VmError> {
        let bad = |what: String| Err(VmError::new(&self.name, VmErrorKind::Config { what }));
        if self.name.is_empty() || self.name.len() > 64 || self.name.chars().any(char::is_control) {
            return bad(format!(
                "name {:?} must be 1-64 printable characters",
                self.name
            ));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return bad(format!("vcpus = {} (must be 1..={MAX_VCPUS})", self.vcpus));
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return bad(format!(
                "mem_mib = {} (must be {MIN_MEM_MIB}..={MAX_MEM_MIB})",
                self.mem_mib
            ));
        }
        if self.serial_ring_bytes == 0 || self.serial_ring_bytes > MAX_SERIAL_RING {
            return bad(format!(
                "serial_ring_bytes = {} (must be 1..={MAX_SERIAL_RING})",
                self.serial_ring_bytes
            ));
        }
        if let Some(cid) = self.vsock_cid {
            if cid < 3 || cid > u64::from(u32::MAX) {
                return bad(format!("vsock_cid = {cid} (must be 3..=2^32-1)"));
            }
        }
        if self.disks.len() > crate::virtio::block::MAX_DISKS {
            return bad(format!(
                "{} disks (at most {})",
                self.disks.len(),
                crate::virtio::block::MAX_DISKS
            ));
        }
        for (i, d) in self.disks.iter().enumerate() {
            if let Err(e) = d.validate() {
                return bad(format!("disk {i}: {e}"));
            }
        }
        for (what, path) in [
            ("kernel", Some(&self.kernel)),
            ("initramfs", self.initramfs.as_ref()),
        ] {
            if let Some(p) = path {
                if !p.is_file() {
                    return Err(VmError::new(
                        &self.name,
                        VmErrorKind::FileMissing {
                            what,
                            path: p.clone(),
                        },
                    ));
                }
            }
        }
        Ok(())
    }
}

/// An error of the VM API ([`Vm::start`], the running [`Vm`]'s waits, [`VmConfig::validate`]):
/// the VM's name, added here and nowhere below, and what failed ([`VmErrorKind`], whose
/// causes are kept as [`source`](std::error::Error::source)s). Displays as
/// `VM <name>: <kind>`; a layer above that names the VM itself (a sandbox) wraps
/// [`kind`](Self::kind) instead.
#[derive(Debug, thiserror::Error)]
#[error("VM {vm}: {kind}")]
pub struct VmError {
    vm: String,
    #[source]
    kind: VmErrorKind,
}

impl VmError {
    /// `kind` of the VM called `vm`.
    pub fn new(vm: impl Into<String>, kind: VmErrorKind) -> Self {
        Self {
            vm: vm.into(),
            kind,
        }
    }

    /// The VM's name.
    pub fn vm(&self) -> &str {
        &self.vm
    }

    /// What failed.
    pub fn kind(&self) -> &VmErrorKind {
        &self.kind
    }

    /// What failed, without the VM's name (for a caller that names the VM itself).
    pub fn into_kind(self) -> VmErrorKind {
        self.kind
    }
}

/// What failed creating or driving a VM (the VM is named once, by [`VmError`]).
#[derive(Debug, thiserror::Error)]
pub enum VmErrorKind {
    /// A configuration value is out of range.
    #[error("invalid config: {what}")]
    Config {
        /// What is wrong.
        what: String,
    },
    /// The kernel or initramfs file does not exist.
    #[error("{what} file {path} does not exist")]
    FileMissing {
        /// "kernel" or "initramfs".
        what: &'static str,
        /// The path given.
        path: PathBuf,
    },
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// The operation.
        op: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Loading the kernel or writing boot structures failed.
    #[error("boot: {0}")]
    Boot(#[source] BootError),
    /// The MP table could not be written.
    #[error(transparent)]
    MpTable(#[from] MpTableError),
    /// A device range clashes on a bus.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// An OS resource (thread, eventfd, signal) could not be created.
    #[error("{what}: {source}")]
    Os {
        /// What was being created.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A disk (virtio-blk) could not be attached.
    #[error("disk {index}: {source}")]
    Disk {
        /// Position in `VmConfig::disks`.
        index: usize,
        /// Cause.
        #[source]
        source: Box<crate::virtio::block::BlockError>,
    },
    /// The boot MSR list could not be built.
    #[error("MSR list: {0}")]
    MsrList(#[source] vmm_sys_util::fam::Error),
    /// The device event manager (epoll) could not be created.
    #[error("device event manager: {0}")]
    EventManager(#[source] event_manager::Error),
    /// Every MMIO slot or device GSI is taken.
    #[error("device mmio: no free MMIO slot or GSI")]
    NoMmioSlot,
    /// A device could not be created or attached.
    #[error("device {device}: {source}")]
    Device {
        /// Device name.
        device: &'static str,
        /// Cause (the device's own error type).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The VM's threads could not be given their seccomp filters.
    #[error("seccomp: {0}")]
    Seccomp(#[source] SeccompError),
    /// A wait passed its deadline.
    #[error("timed out after {waited:?} waiting for {what}; serial tail:\n{serial_tail}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        waited: Duration,
        /// Last serial output.
        serial_tail: String,
    },
    /// The VM ended while something was awaited.
    #[error("exited ({reason}) while waiting for {what}; serial tail:\n{serial_tail}")]
    Exited {
        /// What was awaited.
        what: String,
        /// Why it ended.
        reason: ExitReason,
        /// Last serial output.
        serial_tail: String,
    },
}

impl VmErrorKind {
    /// A failed KVM ioctl `op` (for `map_err`).
    pub fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Self {
        move |source| Self::Kvm { op, source }
    }

    /// A failed OS call creating `what` (for `map_err`).
    pub fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| Self::Os { what, source }
    }

    /// Device `device` failed with `source` (for `map_err`).
    pub fn device<E: std::error::Error + Send + Sync + 'static>(
        device: &'static str,
    ) -> impl FnOnce(E) -> Self {
        move |source| Self::Device {
            device,
            source: Box::new(source),
        }
    }
}

/// A virtio-mmio window and its interrupt, handed out by [`DeviceContext::allocate_mmio_slot`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    /// Guest physical base address.
    pub base: u64,
    /// Window size.
    pub len: u64,
    /// GSI (IOAPIC pin) of the device's interrupt.
    pub gsi: u32,
}

impl MmioSlot {
    /// The kernel command-line fragment announcing a virtio-mmio device in this slot.
    pub fn virtio_cmdline(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            self.len / 1024,
            self.base,
            self.gsi
        )
    }
}

/// What a device gets while the VM is being built: guest memory, the VM fd for irqfd /
/// ioeventfd wiring, the MMIO bus, the device event loop and the command line.
pub struct DeviceContext<'a> {
    vm_name: &'a str,
    vm_fd: &'a VmFd,
    mem: &'a GuestMemoryMmap,
    mmio: &'a mut Bus,
    events: &'a mut DeviceEventManager,
    cmdline: &'a mut Vec<String>,
    next_mmio: u64,
    next_gsi: u32,
    subscribers: usize,
}

impl std::fmt::Debug for DeviceContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceContext")
            .field("vm", &self.vm_name)
            .field("next_mmio", &self.next_mmio)
            .field("next_gsi", &self.next_gsi)
            .finish_non_exhaustive()
    }
}

impl DeviceContext<'_> {
    /// The VM's name (for device errors and logs).
    pub fn vm_name(&self) -> &str {
        self.vm_name
    }

    /// Guest memory (cheap to clone; the clone keeps the mapping alive until dropped).
    pub fn memory(&self) -> &GuestMemoryMmap {
        self.mem
    }

    /// The next free 4 KiB MMIO window and GSI.
    pub fn allocate_mmio_slot(&mut self) -> Result<MmioSlot, VmErrorKind> {
        if self.next_mmio + MMIO_SLOT_SIZE > MMIO_DEVICES_END || self.next_gsi > LAST_DEVICE_GSI {
            return Err(VmErrorKind::NoMmioSlot);
        }
        let slot = MmioSlot {
            base: self.next_mmio,
            len: MMIO_SLOT_SIZE,
            gsi: self.next_gsi,
        };
        self.next_mmio += MMIO_SLOT_SIZE;
        self.next_gsi += 1;
        Ok(slot)
    }

    /// Puts `dev` on the MMIO bus at `slot`.
    pub fn register_mmio(&mut self, slot: MmioSlot, dev: SharedDevice) -> Result<(), VmErrorKind> {
        Ok(self.mmio.insert(slot.base, slot.len, dev)?)
    }

    /// Allocates a slot, registers `dev` there and announces it on the kernel command line
    /// (`virtio_mmio.device=4K@<base>:<gsi>`). Returns the slot.
    pub fn add_virtio_mmio(&mut self, dev: SharedDevice) -> Result<MmioSlot, VmErrorKind> {
        let slot = self.allocate_mmio_slot()?;
        self.register_mmio(slot, dev)?;
        self.cmdline.push(slot.virtio_cmdline());
        Ok(slot)
    }

    /// An eventfd that injects interrupt `gsi` when written (KVM_IRQFD).
    pub fn irqfd(&self, gsi: u32) -> Result<EventFd, VmErrorKind> {
        let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(VmErrorKind::os("irq eventfd"))?;
        self.vm_fd
            .register_irqfd(&fd, gsi)
            .map_err(VmErrorKind::kvm("register irqfd"))?;
        Ok(fd)
    }

    /// An eventfd signalled (without a vCPU exit to user space) when the guest writes
    /// `datamatch` (or anything, if `None`) as a 32-bit value to MMIO address `addr`
    /// (KVM_IOEVENTFD) — for virtio queue notifications.
    pub fn ioeventfd(&self, addr: u64, datamatch: Option<u32>) -> Result<EventFd, VmErrorKind> {
        let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(VmErrorKind::os("ioeventfd"))?;
        let res = match datamatch {
            Some(v) => self
                .vm_fd
                .register_ioevent(&fd, &IoEventAddress::Mmio(addr), v),
            None => self.vm_fd.register_ioevent(
                &fd,
                &IoEventAddress::Mmio(addr),
                kvm_ioctls::NoDatamatch,
            ),
        };
        res.map_err(VmErrorKind::kvm("register ioeventfd"))?;
        Ok(fd)
    }

    /// Adds a subscriber to the VM's device event loop (the loop thread starts only if at
    /// least one subscriber is added).
    pub fn add_subscriber(&mut self, sub: Subscriber) -> event_manager::SubscriberId {
        self.subscribers += 1;
        event_manager::SubscriberOps::add_subscriber(self.events, sub)
    }

    /// Appends a fragment to the kernel command line.
    pub fn add_cmdline(&mut self, fragment: impl Into<String>) {
        self.cmdline.push(fragment.into());
    }
}

/// Attaches the configured devices (besides the serial port). Each device registers its
/// MMIO window, interrupts and event-loop subscribers through `ctx`.
///
/// HOOK for devices: the virtio-vsock device is attached here when `cfg.vsock_cid` is set,
/// and its host handle is returned in [`AttachedDevices`].
fn attach_devices(
    cfg: &VmConfig,
    ctx: &mut DeviceContext<'_>,
) -> Result<AttachedDevices, VmErrorKind> {
    let mut devices = AttachedDevices::default();
    // --- vsock (virtio/vsock/attach.rs) ---
    if let Some(guest_cid) = cfg.vsock_cid {
        let vsock_cfg = crate::virtio::vsock::VsockConfig {
            guest_cid,
            seccomp: cfg.seccomp,
            ..Default::default()
        };
        devices.vsock = Some(crate::virtio::vsock::attach::attach(ctx, vsock_cfg)?);
    }
    // --- end vsock ---
    // --- disks (virtio/block/attach.rs): after vsock, so vda is the first disk ---
    devices.blocks = crate::virtio::block::attach::attach_all(ctx, &cfg.disks, cfg.seccomp)?;
    Ok(devices)
}

/// Host-side handles of the attached devices, kept by the [`Vm`].
#[derive(Debug, Default)]
struct AttachedDevices {
    /// The virtio-vsock device: host endpoint, device, transport, slot (vsock).
    vsock: Option<crate::virtio::vsock::attach::AttachedVsock>,
    /// The disks and their I/O thread (virtio-blk).
    blocks: crate::virtio::block::attach::AttachedBlocks,
}

static KVM: OnceLock<Kvm> = OnceLock::new();
static SUPPORTED_CPUID: OnceLock<CpuId> = OnceLock::new();

fn kvm() -> Result<&'static Kvm, VmErrorKind> {
    if let Some(k) = KVM.get() {
        return Ok(k);
    }
    let k = Kvm::new().map_err(VmErrorKind::kvm("open /dev/kvm"))?;
    Ok(KVM.get_or_init(|| k))
}

/// Installs the vCPU kick handler and creates the KVM VM: the first KVM step of building any
/// VM, fresh or restored.
fn create_vm_fd() -> Result<(&'static Kvm, VmFd), VmErrorKind> {
    vcpu::install_kick_handler().map_err(VmErrorKind::os("install vCPU kick handler"))?;
    let kvm = kvm()?;
    let vm_fd = kvm.create_vm().map_err(VmErrorKind::kvm("create VM"))?;
    Ok((kvm, vm_fd))
}

fn supported_cpuid(kvm: &Kvm) -> Result<&'static CpuId, VmErrorKind> {
    if let Some(c) = SUPPORTED_CPUID.get() {
        return Ok(c);
    }
    let mut c = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VmErrorKind::kvm("get supported CPUID"))?;
    crate::cpuid::add_emulated_features(
        &mut c,
        kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer),
    );
    Ok(SUPPORTED_CPUID.get_or_init(|| c))
}

/// A running microVM. Dropping it stops it.
pub struct Vm {
    name: String,
    shared: Arc<VmShared>,
    threads: Vec<Option<JoinHandle<()>>>,
    event_loop: Option<EventLoop>,
    vm_fd: Option<VmFd>,
    memory: Option<GuestMemoryMmap>,
    devices: AttachedDevices,
    cmdline: String,
    started: Instant,
    /// The UART (snapshots read and restore its registers).
    serial: Arc<Mutex<SerialDevice>>,
    /// The frozen layers guest RAM is mapped from (`None`: fresh RAM, one memfd mapped
    /// shared). Set by restores, forks and children (crate::fork).
    layers: Mutex<Option<crate::fork::MemLayers>>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("name", &self.name)
            .field("vcpus", &self.shared.vcpus.len())
            .field("exit", &self.shared.exit_reason())
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Validates `cfg`, builds the VM and starts its vCPUs.
    pub fn start(cfg: VmConfig) -> Result<Vm, VmError> {
        cfg.validate()?;
        let name = cfg.name.clone();
        Self::build(cfg).map_err(|kind| VmError::new(name, kind))
    }

    /// [`Vm::start`] after validation; the caller adds the VM's name to an error.
    fn build(cfg: VmConfig) -> Result<Vm, VmErrorKind> {
        let name = cfg.name.clone();
        let (kvm, vm_fd) = create_vm_fd()?;

        let mem = memory::create_guest_memory(cfg.mem_mib)?;
        let boot_err = VmErrorKind::Boot;

        // Memory slots first, then irqchip/PIT/devices/vCPUs, then the kernel. (Running the
        // memory registration and kernel load on a helper thread in parallel was measured and
        // did not pay off here; see docs/VMM.md "Start-up cost".)
        register_memory(&vm_fd, &mem)?;
        let machine = build_machine(&cfg, kvm, &vm_fd, &mem)?;
        let loaded = boot::load_kernel(&mem, cfg.mem_mib, &cfg.kernel, cfg.initramfs.as_deref())
            .map_err(boot_err)?;

        // Command line (base + devices + extra), boot information, MP table, entry registers.
        let cmdline =
            boot::build_cmdline(&machine.cmdline_parts, &cfg.cmdline_extra).map_err(boot_err)?;
        let entry = boot::write_boot_info(&mem, cfg.mem_mib, loaded, &cmdline).map_err(boot_err)?;
        mptable::setup(&mem, cfg.vcpus)?;
        if let Some(bsp) = machine.vcpu_fds.first() {
            set_boot_registers(bsp, &mem, entry)?;
        }

        let cmdline_str = cmdline
            .as_cstring()
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default();
        let launched = Vm::launch(
            name,
            machine,
            vm_fd,
            mem,
            None,
            cfg.vcpus,
            cmdline_str,
            |_| Ok::<(), VmErrorKind>(()),
        );
        launched.map(|(vm, ())| vm)
    }

    /// Wraps a built machine whose guest is ready to run (kernel loaded, or state restored) in
    /// a `Vm`, starts its device thread, calls `before_start` and starts one thread per vCPU.
    /// On error the partly started `Vm` is dropped, which stops it.
    #[allow(clippy::too_many_arguments)]
    fn launch<T, E: From<VmErrorKind>>(
        name: String,
        machine: Machine,
        vm_fd: VmFd,
        mem: GuestMemoryMmap,
        layers: Option<crate::fork::MemLayers>,
        vcpus: u8,
        cmdline: String,
        before_start: impl FnOnce(&Vm) -> Result<T, E>,
    ) -> Result<(Vm, T), E> {
        let Machine {
            console,
            pio,
            mmio,
            events,
            cmdline_parts: _,
            subscribers,
            devices,
            vcpu_fds,
            serial,
            seccomp: seccomp_mode,
        } = machine;
        let os_err = VmErrorKind::os;
        // Filters compiled (and kernel support checked) here, applied by each thread.
        seccomp::prepare(seccomp_mode).map_err(VmErrorKind::Seccomp)?;
        let shared = Arc::new(VmShared::new(&name, console, vcpus));
        let pio = Arc::new(pio);
        let mmio = Arc::new(mmio);
        let mut vm = Vm {
            name: name.clone(),
            shared: shared.clone(),
            threads: Vec::new(),
            event_loop: None,
            vm_fd: Some(vm_fd),
            memory: Some(mem),
            devices,
            cmdline,
            started: Instant::now(),
            serial,
            layers: Mutex::new(layers),
        };
        if subscribers > 0 {
            vm.event_loop = Some(
                EventLoop::spawn(&name, events, seccomp_mode).map_err(os_err("device thread"))?,
            );
        } else {
            drop(events);
        }
        // On error `vm` is dropped (and stopped) here.
        let hook = before_start(&vm)?;
        for (i, fd) in vcpu_fds.into_iter().enumerate() {
            let runner = VcpuRunner {
                fd,
                index: i as u8,
                shared: shared.clone(),
                pio: pio.clone(),
                mmio: mmio.clone(),
            };
            // On error `vm` is dropped, which stops the threads already started.
            let h = std::thread::Builder::new()
                .name(format!("{name}-vcpu{i}"))
                .spawn(move || {
                    // Before the first KVM_RUN; a thread that cannot be filtered never runs.
                    if let Err(e) = seccomp::install(ThreadKind::Vcpu, seccomp_mode) {
                        let detail = e.to_string();
                        let vcpu = runner.index;
                        runner
                            .shared
                            .record_exit(ExitReason::VcpuError { vcpu, detail });
                        runner.shared.request_stop_all();
                        return;
                    }
                    runner.run()
                })
                .map_err(os_err("vCPU thread"))?;
            shared.set_thread(i, h.pthread_handle());
            vm.threads.push(Some(h));
        }
        Ok((vm, hook))
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The kernel command line the guest got.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// When the vCPUs were started.
    pub fn started_at(&self) -> Instant {
        self.started
    }

    /// The last `max_bytes` of guest serial output.
    pub fn serial_tail(&self, max_bytes: usize) -> String {
        self.shared.console.tail(max_bytes)
    }

    /// Serial output from absolute byte position `from` on (at most `max` bytes) and the
    /// position to ask from next time (`serial::SerialRing::since`).
    pub fn serial_since(&self, from: u64, max: usize) -> (Vec<u8>, u64) {
        self.shared.console.since(from, max)
    }

    /// Waits until `needle` shows up on the serial console. Errors if the VM exits first or
    /// `deadline` passes; the error quotes the serial tail.
    pub fn wait_for_serial(&self, needle: &str, deadline: Instant) -> Result<(), VmError> {
        let start = Instant::now();
        match self.shared.console.wait_for(needle.as_bytes(), deadline) {
            WaitOutcome::Found(_) => Ok(()),
            WaitOutcome::TimedOut => Err(self.error(VmErrorKind::Timeout {
                what: format!("{needle:?} on the serial console"),
                waited: start.elapsed(),
                serial_tail: self.serial_tail(ERROR_TAIL_BYTES),
            })),
            WaitOutcome::Closed => Err(self.error(VmErrorKind::Exited {
                what: format!("{needle:?} on the serial console"),
                reason: self.shared.exit_reason().unwrap_or(ExitReason::Stopped),
                serial_tail: self.serial_tail(ERROR_TAIL_BYTES),
            })),
        }
    }

    /// `kind`, naming this VM.
    fn error(&self, kind: VmErrorKind) -> VmError {
        VmError::new(&self.name, kind)
    }

    /// The exit reason if the VM has ended.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.shared.exit_reason()
    }

    /// Waits up to `timeout` for the guest to end the VM; never hangs.
    pub fn wait_exit(&self, timeout: Duration) -> Result<ExitReason, VmError> {
        self.shared
            .wait_exit(Instant::now() + timeout)
            .ok_or_else(|| {
                self.error(VmErrorKind::Timeout {
                    what: "the guest to exit".into(),
                    waited: timeout,
                    serial_tail: self.serial_tail(ERROR_TAIL_BYTES),
                })
            })
    }

    /// Each vCPU's run state.
    pub fn vcpu_states(&self) -> Vec<VcpuState> {
        self.shared.vcpus.iter().map(|c| c.state()).collect()
    }

    /// Test hook: runs `job` on vCPU `index`'s own thread (under its seccomp filter) while
    /// the VM is paused, as the snapshot save does. False if there is no such vCPU.
    #[doc(hidden)]
    pub fn post_vcpu_job(&self, index: usize, job: crate::vcpu::VcpuJob) -> bool {
        match self.shared.vcpus.get(index) {
            Some(c) => {
                c.post_job(job);
                true
            }
            None => false,
        }
    }

    /// Pauses every vCPU (kicking it out of the guest) and waits until all are parked.
    pub fn pause(&self, timeout: Duration) -> Result<(), VmError> {
        self.shared.request_all(vcpu::VcpuRequest::Pause);
        let deadline = Instant::now() + timeout;
        for c in &self.shared.vcpus {
            if !c.wait_state(deadline, |s| !matches!(s, VcpuState::Running)) {
                return Err(self.error(VmErrorKind::Timeout {
                    what: "the vCPUs to pause".into(),
                    waited: timeout,
                    serial_tail: self.serial_tail(ERROR_TAIL_BYTES),
                }));
            }
        }
        Ok(())
    }

    /// Resumes paused vCPUs.
    pub fn resume(&self) {
        self.shared.request_all(vcpu::VcpuRequest::Run);
    }

    /// Host endpoint of the VM's virtio-vsock device (`None` without `vsock_cid`). Clone it
    /// freely; it stays valid (returning `DeviceGone`) after the VM stops. (vsock)
    pub fn vsock(&self) -> Option<&crate::virtio::vsock::VsockHost> {
        self.devices.vsock.as_ref().map(|v| &v.host)
    }

    /// Counters of each disk's virtio-blk device, in configuration order.
    pub fn disk_stats(&self) -> Vec<crate::virtio::block::BlockStats> {
        self.devices
            .blocks
            .disks
            .iter()
            .map(|d| crate::virtio::mmio::lock(&d.device).stats())
            .collect()
    }

    /// Guest memory (`None` only during teardown).
    pub fn memory(&self) -> Option<&GuestMemoryMmap> {
        self.memory.as_ref()
    }

    /// Stops the VM: kicks and joins every vCPU thread and the device thread, closes the KVM
    /// fds and unmaps guest memory. Returns why the VM ended (`Stopped` if it was running).
    pub fn stop(mut self) -> ExitReason {
        self.shutdown();
        self.shared.exit_reason().unwrap_or(ExitReason::Stopped)
    }

    fn shutdown(&mut self) {
        self.shared.request_stop_all();
        for (i, t) in self.threads.iter_mut().enumerate() {
            if let Some(h) = t.take() {
                // Keep kicking until the thread is gone: the first kick may race with a
                // thread that was about to check its request.
                while !h.is_finished() {
                    self.shared.kick_all();
                    if h.is_finished() {
                        break;
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                self.shared.clear_thread(i);
                if h.join().is_err() {
                    tracing::error!(vm = %self.name, vcpu = i, "vCPU thread panicked");
                }
            }
        }
        if let Some(mut l) = self.event_loop.take() {
            l.stop();
        }
        self.shared.record_exit(ExitReason::Stopped);
        self.devices = AttachedDevices::default();
        // VM fd (and with it irqfds, ioeventfds, vCPU state) before the memory it maps.
        self.vm_fd = None;
        self.memory = None;
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(regs: &mut [std::os::raw::c_char; 1024], off: usize, f: impl Fn(u32) -> u32) {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = regs[off + i] as u8;
    }
    let v = f(u32::from_le_bytes(b));
    for (i, x) in v.to_le_bytes().iter().enumerate() {
        regs[off + i] = *x as std::os::raw::c_char;
    }
}

/// Creates vCPU `index` of `count` with its CPUID, boot MSRs and LAPIC LINT0/1 setup.
fn configure_vcpu(
    vm_fd: &VmFd,
    cpuid: &CpuId,
    index: u8,
    count: u8,
    name: &str,
) -> Result<VcpuFd, VmErrorKind> {
    let kvm_err = VmErrorKind::kvm;
    let fd = vm_fd
        .create_vcpu(u64::from(index))
        .map_err(kvm_err("create vCPU"))?;
    fd.set_cpuid2(&crate::cpuid::for_vcpu(cpuid, index, count))
        .map_err(kvm_err("set CPUID"))?;
    let msrs = crate::msr::boot_msrs().map_err(VmErrorKind::MsrList)?;
    let n = fd.set_msrs(&msrs).map_err(kvm_err("set MSRs"))?;
    if n != msrs.as_slice().len() {
        tracing::debug!(
            vm = name,
            vcpu = index,
            "KVM accepted {n} of {} boot MSRs",
            msrs.as_slice().len()
        );
    }
    let mut lapic = fd.get_lapic().map_err(kvm_err("get LAPIC"))?;
    lapic_reg(&mut lapic.regs, APIC_LVT0, |v| {
        (v & !0x700) | (APIC_MODE_EXTINT << 8)
    });
    lapic_reg(&mut lapic.regs, APIC_LVT1, |v| {
        (v & !0x700) | (APIC_MODE_NMI << 8)
    });
    fd.set_lapic(&lapic).map_err(kvm_err("set LAPIC"))?;
    Ok(fd)
}

/// Gives the boot vCPU its FPU state and the registers the kernel entry expects.
fn set_boot_registers(
    fd: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: BootEntry,
) -> Result<(), VmErrorKind> {
    let kvm_err = VmErrorKind::kvm;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(kvm_err("set FPU"))?;
    let sregs = fd.get_sregs().map_err(kvm_err("get sregs"))?;
    let (sregs, regs) = boot::entry_registers(mem, entry, sregs).map_err(VmErrorKind::Boot)?;
    fd.set_sregs(&sregs).map_err(kvm_err("set sregs"))?;
    fd.set_regs(&regs).map_err(kvm_err("set regs"))?;
    Ok(())
}

/// Registers every guest RAM region as a KVM memory slot.
fn register_memory(vm_fd: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmErrorKind> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping owned by `mem`. KVM reaches it only through
        // the host page tables, so even a mapping that went away before the slot would make
        // guest accesses fail rather than touch other host memory; and no vCPU runs after
        // `mem` is dropped (a running Vm joins its vCPUs and closes vm_fd before unmapping).
        unsafe { vm_fd.set_user_memory_region(r) }
            .map_err(VmErrorKind::kvm("set memory region"))?;
    }
    Ok(())
}

/// The parts of a VM built before its vCPUs run.
struct Machine {
    console: Arc<Console>,
    pio: Bus,
    mmio: Bus,
    events: DeviceEventManager,
    cmdline_parts: Vec<String>,
    subscribers: usize,
    devices: AttachedDevices,
    vcpu_fds: Vec<VcpuFd>,
    /// The UART (kept typed for snapshots).
    serial: Arc<Mutex<SerialDevice>>,
    /// seccomp mode for the VM's threads.
    seccomp: SeccompMode,
}

/// In-kernel irqchip and PIT, the serial port, the devices and the vCPUs.
fn build_machine(
    cfg: &VmConfig,
    kvm: &Kvm,
    vm_fd: &VmFd,
    mem: &GuestMemoryMmap,
) -> Result<Machine, VmErrorKind> {
    let name = cfg.name.as_str();
    let kvm_err = VmErrorKind::kvm;
    vm_fd
        .set_tss_address(memory::KVM_TSS_ADDRESS as usize)
        .map_err(kvm_err("set TSS address"))?;
    vm_fd
        .set_identity_map_address(memory::KVM_IDENTITY_MAP_ADDRESS)
        .map_err(kvm_err("set identity map address"))?;
    vm_fd.create_irq_chip().map_err(kvm_err("create irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm_fd.create_pit2(pit).map_err(kvm_err("create PIT"))?;

    // Serial console on COM1, IRQ 4.
    let console = Arc::new(Console::new(name, cfg.serial_ring_bytes, cfg.serial_log));
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmErrorKind::os("serial eventfd"))?;
    vm_fd
        .register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(kvm_err("register serial irqfd"))?;
    let mut pio = Bus::new();
    let serial_dev = Arc::new(Mutex::new(SerialDevice::new(serial_irq, console.clone())));
    let serial: SharedDevice = serial_dev.clone();
    pio.insert(COM1_PORT, COM1_LEN, serial)?;

    // Devices.
    let mut mmio = Bus::new();
    let mut events = DeviceEventManager::new().map_err(VmErrorKind::EventManager)?;
    let mut cmdline_parts = Vec::new();
    let mut ctx = DeviceContext {
        vm_name: name,
        vm_fd,
        mem,
        mmio: &mut mmio,
        events: &mut events,
        cmdline: &mut cmdline_parts,
        next_mmio: MMIO_START,
        next_gsi: FIRST_DEVICE_GSI,
        subscribers: 0,
    };
    let devices = attach_devices(cfg, &mut ctx)?;
    let subscribers = ctx.subscribers;

    // vCPUs (after the irqchip: KVM refuses an irqchip once vCPUs exist).
    let cpuid = supported_cpuid(kvm)?;
    let mut vcpu_fds = Vec::with_capacity(usize::from(cfg.vcpus));
    for i in 0..cfg.vcpus {
        vcpu_fds.push(configure_vcpu(vm_fd, cpuid, i, cfg.vcpus, name)?);
    }
    Ok(Machine {
        console,
        pio,
        mmio,
        events,
        cmdline_parts,
        subscribers,
        devices,
        vcpu_fds,
        serial: serial_dev,
        seccomp: cfg.seccomp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_slot_cmdline_format() {
        let slot = MmioSlot {
            base: MMIO_START,
            len: MMIO_SLOT_SIZE,
            gsi: FIRST_DEVICE_GSI,
        };
        assert_eq!(slot.virtio_cmdline(), "virtio_mmio.device=4K@0xd0000000:5");
    }

    #[test]
    fn errors_name_the_vm_once_and_keep_the_cause_as_source() {
        let e = VmError::new(
            "v1",
            VmErrorKind::device::<std::io::Error>("virtio-vsock")(
                std::io::Error::from_raw_os_error(libc::EMFILE),
            ),
        );
        let os = std::io::Error::from_raw_os_error(libc::EMFILE).to_string();
        assert_eq!(e.to_string(), format!("VM v1: device virtio-vsock: {os}"));
        let mut layers = vec![e.to_string()];
        let mut cur = std::error::Error::source(&e);
        let mut last = None;
        while let Some(s) = cur {
            layers.push(s.to_string());
            last = Some(s);
            cur = s.source();
        }
        assert_eq!(layers.len(), 3, "{layers:?}");
        assert_eq!(layers.join("\n").matches("v1").count(), 1, "{layers:?}");
        let io = last.and_then(|s| s.downcast_ref::<std::io::Error>());
        assert_eq!(io.and_then(|e| e.raw_os_error()), Some(libc::EMFILE));
    }

    #[test]
    fn config_validation_names_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, b"x").unwrap();
        let ok = VmConfig::new("v", &kernel);
        ok.validate().unwrap();
        type Mutation = Box<dyn Fn(&mut VmConfig)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|c| c.vcpus = 0), "vcpus = 0"),
            (Box::new(|c| c.vcpus = MAX_VCPUS + 1), "vcpus = 9"),
            (Box::new(|c| c.mem_mib = 1), "mem_mib = 1"),
            (Box::new(|c| c.mem_mib = MAX_MEM_MIB + 1), "mem_mib = 65537"),
            (
                Box::new(|c| c.serial_ring_bytes = 0),
                "serial_ring_bytes = 0",
            ),
            (Box::new(|c| c.vsock_cid = Some(1)), "vsock_cid = 1"),
            (Box::new(|c| c.vsock_cid = Some(1 << 32)), "vsock_cid"),
            (Box::new(|c| c.name = String::new()), "name"),
            (Box::new(|c| c.name = "a\nb".into()), "name"),
            (Box::new(|c| c.name = "x".repeat(65)), "name"),
        ];
        for (mutate, want) in cases {
            let mut c = ok.clone();
            mutate(&mut c);
            let e = c.validate().unwrap_err();
            assert!(matches!(e.kind(), VmErrorKind::Config { .. }), "{e}");
            assert!(e.to_string().contains(want), "{e} should mention {want}");
        }
        let mut c = ok.clone();
        c.initramfs = Some(dir.path().join("missing.cpio"));
        assert!(matches!(
            c.validate().map_err(VmError::into_kind),
            Err(VmErrorKind::FileMissing {
                what: "initramfs",
                ..
            })
        ));
        let mut c = ok;
        c.kernel = dir.path().to_path_buf(); // a directory is not a kernel file
        assert!(matches!(
            c.validate().map_err(VmError::into_kind),
            Err(VmErrorKind::FileMissing { what: "kernel", .. })
        ));
    }
}
