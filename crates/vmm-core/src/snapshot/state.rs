//! What a snapshot records about a VM (the state file's payload), and the checks a decoded
//! payload must pass before anything is built from it.
//!
//! Every KVM structure is stored as kvm-bindings serialises it (its `serde` feature); the
//! rest are plain Kiln structs. Nothing here touches KVM: [`VmSnapshot::validate`] bounds
//! every count and size so a crafted (but correctly checksummed) file cannot make the
//! restore path allocate without bound, index out of range or map past the memory file.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;

use crate::memory;
use crate::vm::{MAX_MEM_MIB, MAX_VCPUS, MIN_MEM_MIB};

/// Most CPUID entries per vCPU we accept (KVM's own limit).
pub const MAX_CPUID_ENTRIES: usize = kvm_bindings::KVM_MAX_CPUID_ENTRIES;
/// Most MSRs per vCPU we accept.
pub const MAX_MSRS: usize = 1024;
/// Longest command line / VM name we accept from a state file.
pub const MAX_STRING: usize = 4096;
/// Most bytes in the UART's receive FIFO.
pub const MAX_SERIAL_FIFO: usize = 64;
/// Most virtqueues per virtio-mmio device.
pub const MAX_QUEUES: usize = 8;

/// Size of `kvm_fpu` as stored (raw bytes; kvm-bindings has no serde for it).
pub const FPU_BYTES: usize = std::mem::size_of::<kvm_bindings::kvm_fpu>();

/// The state of one vCPU, in the order it is restored.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuSnapshot {
    /// vCPU id (= APIC id).
    pub index: u8,
    /// The CPUID the guest saw.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Run state (runnable, halted, waiting for SIPI).
    pub mp_state: kvm_mp_state,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// Legacy FPU state (`kvm_fpu`, raw bytes); XSAVE below supersedes it where supported.
    pub fpu: Vec<u8>,
    /// XSAVE area (legacy 4 KiB layout).
    pub xsave: Option<kvm_xsave>,
    /// Extended control registers.
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM reports (KVM_GET_MSR_INDEX_LIST) that could be read.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs, SMI state.
    pub events: kvm_vcpu_events,
}

/// How a snapshot stores the UART's registers: vm-superio's `SerialState` has no serde, so
/// this mirror of its fields (serde `remote`) (de)serialises it in place.
#[derive(Serialize, Deserialize)]
#[serde(remote = "SerialState")]
struct SerialStateDef {
    /// Divisor latch low byte.
    baud_divisor_low: u8,
    /// Divisor latch high byte.
    baud_divisor_high: u8,
    /// Interrupt enable register.
    interrupt_enable: u8,
    /// Interrupt identification register.
    interrupt_identification: u8,
    /// Line control register.
    line_control: u8,
    /// Line status register.
    line_status: u8,
    /// Modem control register.
    modem_control: u8,
    /// Modem status register.
    modem_status: u8,
    /// Scratch register.
    scratch: u8,
    /// Receive FIFO contents.
    in_buffer: Vec<u8>,
}

/// One virtqueue's configuration as the driver wrote it, plus the ring position
/// ([`crate::virtio::mmio::MmioTransport::save_state`] fills it in).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Maximum size the device offers.
    pub max_size: u16,
    /// Size the driver chose (raw register value).
    pub size: u32,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    /// Next available/used index. At rest (device lock held) every chain the device popped
    /// has been returned, so both equal the used ring's `idx`. 0 when the device is not
    /// active.
    pub next_index: u16,
}

/// The virtio-mmio transport's register file, as
/// [`crate::virtio::mmio::MmioTransport::save_state`] saves it and `restore_state` loads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioSnapshot {
    /// Per-queue configuration.
    pub queues: Vec<QueueSnapshot>,
    /// QueueSel.
    pub queue_sel: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver acknowledged.
    pub driver_features: u64,
    /// The driver wrote feature bits past 64.
    pub bad_driver_features: bool,
    /// Device status register (without DEVICE_NEEDS_RESET, see `needs_reset`).
    pub status: u32,
    /// The device was activated (DRIVER_OK accepted).
    pub activated: bool,
    /// Interrupt status bits not yet acknowledged.
    pub interrupt_status: u32,
    /// The device asked for a reset.
    pub needs_reset: bool,
}

/// The virtio-vsock device: where it sits and its transport registers. Connections are not
/// saved: a restored device starts with none and sends TRANSPORT_RESET.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockSnapshot {
    /// Guest CID.
    pub guest_cid: u64,
    /// MMIO window base.
    pub mmio_base: u64,
    /// GSI.
    pub gsi: u32,
    /// Transport registers.
    pub transport: MmioSnapshot,
}

/// One guest RAM region and where its bytes sit in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionSnapshot {
    /// Guest physical start.
    pub guest_addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset of the region's first byte in the memory file.
    pub file_offset: u64,
}

/// Everything about a VM needed to rebuild it, except guest RAM (in the memory file).
#[derive(Debug, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// Random id tying the state file to its memory file.
    pub snapshot_id: [u8; 16],
    /// Name of the VM that was snapshotted (informational).
    pub vm_name: String,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// The kernel command line the guest booted with (informational).
    pub cmdline: String,
    /// RAM regions, sorted by guest address.
    pub regions: Vec<RegionSnapshot>,
    /// Expected length of the memory file.
    pub memory_file_len: u64,
    /// vCPUs, by index.
    pub vcpus: Vec<VcpuSnapshot>,
    /// PIC master (KVM_IRQCHIP_PIC_MASTER).
    pub pic_master: kvm_irqchip,
    /// PIC slave.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// PIT.
    pub pit: kvm_pit_state2,
    /// KVM clock.
    pub clock: kvm_clock_data,
    /// The 8250 UART's registers and receive FIFO.
    #[serde(with = "SerialStateDef")]
    pub serial: SerialState,
    /// The virtio-vsock device, if the VM had one.
    pub vsock: Option<VsockSnapshot>,
    /// The disks (virtio-blk), in configuration order.
    pub blocks: Vec<crate::virtio::block::BlockSnapshot>,
}

impl VmSnapshot {
    /// Checks every bound the restore path relies on; the message says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(format!("mem_mib {} out of range", self.mem_mib));
        }
        if self.vm_name.len() > MAX_STRING || self.cmdline.len() > MAX_STRING {
            return Err("VM name or command line too long".into());
        }
        // The regions must be exactly the layout a VM of this size has.
        let want = memory::ram_ranges(self.mem_mib);
        if self.regions.len() != want.len() {
            return Err(format!(
                "{} memory regions, a {} MiB guest has {}",
                self.regions.len(),
                self.mem_mib,
                want.len()
            ));
        }
        let mut end = crate::snapshot::memory_file::DATA_OFFSET;
        for (r, (addr, len)) in self.regions.iter().zip(want) {
            if r.guest_addr != addr.0 || r.len != len as u64 || r.file_offset != end {
                return Err(format!(
                    "memory region {:#x}+{:#x}@{:#x} does not match the layout",
                    r.guest_addr, r.len, r.file_offset
                ));
            }
            end = end
                .checked_add(r.len)
                .ok_or_else(|| "memory region end overflows".to_owned())?;
        }
        if self.memory_file_len != end {
            return Err(format!(
                "memory file length {} but the regions end at {end}",
                self.memory_file_len
            ));
        }
        let n = self.vcpus.len();
        if n == 0 || n > usize::from(MAX_VCPUS) {
            return Err(format!("{n} vCPUs (must be 1..={MAX_VCPUS})"));
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            if usize::from(v.index) != i {
                return Err(format!("vCPU {i} is recorded as index {}", v.index));
            }
            if v.cpuid.is_empty() || v.cpuid.len() > MAX_CPUID_ENTRIES {
                return Err(format!("vCPU {i}: {} CPUID entries", v.cpuid.len()));
            }
            if v.msrs.len() > MAX_MSRS {
                return Err(format!("vCPU {i}: {} MSRs", v.msrs.len()));
            }
            if v.fpu.len() != FPU_BYTES {
                return Err(format!("vCPU {i}: FPU state is {} bytes", v.fpu.len()));
            }
        }
        if self.pic_master.chip_id != kvm_bindings::KVM_IRQCHIP_PIC_MASTER
            || self.pic_slave.chip_id != kvm_bindings::KVM_IRQCHIP_PIC_SLAVE
            || self.ioapic.chip_id != kvm_bindings::KVM_IRQCHIP_IOAPIC
        {
            return Err("irqchip ids do not match PIC master / PIC slave / IOAPIC".into());
        }
        if self.serial.in_buffer.len() > MAX_SERIAL_FIFO {
            return Err(format!(
                "serial FIFO holds {} bytes",
                self.serial.in_buffer.len()
            ));
        }
        if let Some(v) = &self.vsock {
            if v.guest_cid < 3 || v.guest_cid > u64::from(u32::MAX) {
                return Err(format!("vsock guest CID {}", v.guest_cid));
            }
            if v.transport.queues.len() != 3 || v.transport.queues.len() > MAX_QUEUES {
                return Err(format!(
                    "vsock transport has {} queues",
                    v.transport.queues.len()
                ));
            }
            if !(memory::MMIO_START..memory::MMIO_DEVICES_END).contains(&v.mmio_base)
                || !(crate::vm::FIRST_DEVICE_GSI..=crate::vm::LAST_DEVICE_GSI).contains(&v.gsi)
            {
                return Err(format!(
                    "vsock window {:#x} / GSI {} outside the device ranges",
                    v.mmio_base, v.gsi
                ));
            }
        }
        if self.blocks.len() > crate::virtio::block::MAX_DISKS {
            return Err(format!("{} disks", self.blocks.len()));
        }
        for (i, b) in self.blocks.iter().enumerate() {
            b.validate().map_err(|e| format!("disk {i}: {e}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A payload that passes validation (zeroed KVM state), for unit tests.
    pub(crate) fn sample(mem_mib: u64, vcpus: u8) -> VmSnapshot {
        let mut off = crate::snapshot::memory_file::DATA_OFFSET;
        let regions = memory::ram_ranges(mem_mib)
            .into_iter()
            .map(|(a, l)| {
                let r = RegionSnapshot {
                    guest_addr: a.0,
                    len: l as u64,
                    file_offset: off,
                };
                off += l as u64;
                r
            })
            .collect();
        let irq = |id| kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        VmSnapshot {
            snapshot_id: [7; 16],
            vm_name: "t".into(),
            mem_mib,
            cmdline: "console=ttyS0".into(),
            regions,
            memory_file_len: off,
            vcpus: (0..vcpus)
                .map(|i| VcpuSnapshot {
                    index: i,
                    cpuid: vec![kvm_cpuid_entry2::default(); 3],
                    mp_state: kvm_mp_state::default(),
                    regs: kvm_regs {
                        rip: 0x1000 + u64::from(i),
                        ..Default::default()
                    },
                    sregs: kvm_sregs::default(),
                    fpu: vec![0; FPU_BYTES],
                    xsave: Some(kvm_xsave::default()),
                    xcrs: Some(kvm_xcrs::default()),
                    debug_regs: kvm_debugregs::default(),
                    lapic: kvm_lapic_state::default(),
                    msrs: vec![kvm_msr_entry {
                        index: 0x10,
                        data: 42,
                        ..Default::default()
                    }],
                    events: kvm_vcpu_events::default(),
                })
                .collect(),
            pic_master: irq(kvm_bindings::KVM_IRQCHIP_PIC_MASTER),
            pic_slave: irq(kvm_bindings::KVM_IRQCHIP_PIC_SLAVE),
            ioapic: irq(kvm_bindings::KVM_IRQCHIP_IOAPIC),
            pit: kvm_pit_state2::default(),
            clock: kvm_clock_data::default(),
            serial: SerialState::default(),
            vsock: None,
            blocks: Vec::new(),
        }
    }

    #[test]
    fn sample_is_valid_and_bounds_are_enforced() {
        let s = sample(128, 2);
        s.validate().unwrap();
        let big = sample(8192, 1);
        big.validate().unwrap();
        assert_eq!(big.regions.len(), 2);

        let mut s = sample(128, 1);
        s.vcpus.clear();
        assert!(s.validate().unwrap_err().contains("0 vCPUs"));
        let mut s = sample(128, 1);
        s.memory_file_len += 4096;
        assert!(s.validate().unwrap_err().contains("memory file length"));
        let mut s = sample(128, 1);
        s.regions[0].len = 1 << 40;
        assert!(s.validate().is_err());
        let mut s = sample(128, 2);
        s.vcpus[1].index = 5;
        assert!(s.validate().unwrap_err().contains("index 5"));
        let mut s = sample(128, 1);
        s.vcpus[0].fpu.push(0);
        assert!(s.validate().unwrap_err().contains("FPU"));
        let mut s = sample(128, 1);
        s.serial.in_buffer = vec![0; 65];
        assert!(s.validate().unwrap_err().contains("FIFO"));
        let mut s = sample(128, 1);
        s.ioapic.chip_id = 0;
        assert!(s.validate().unwrap_err().contains("irqchip"));
        let mut s = sample(128, 1);
        s.mem_mib = 0;
        assert!(s.validate().unwrap_err().contains("mem_mib"));
        let mut s = sample(128, 1);
        s.vsock = Some(VsockSnapshot {
            guest_cid: 2,
            mmio_base: memory::MMIO_START,
            gsi: 5,
            transport: MmioSnapshot {
                queues: vec![],
                queue_sel: 0,
                device_features_sel: 0,
                driver_features_sel: 0,
                driver_features: 0,
                bad_driver_features: false,
                status: 0,
                activated: false,
                interrupt_status: 0,
                needs_reset: false,
            },
        });
        assert!(s.validate().unwrap_err().contains("CID"));
    }

    #[test]
    fn uart_state_encodes_as_its_fields_in_order() {
        // The state file holds vm-superio's UART fields in declaration order, FIFO last with
        // its length; pinned so the serde mirror cannot change the format unnoticed.
        #[derive(Serialize, Deserialize)]
        struct Uart(#[serde(with = "SerialStateDef")] SerialState);
        let st = SerialState {
            baud_divisor_low: 1,
            baud_divisor_high: 2,
            interrupt_enable: 3,
            interrupt_identification: 4,
            line_control: 5,
            line_status: 6,
            modem_control: 7,
            modem_status: 8,
            scratch: 9,
            in_buffer: vec![0xaa, 0xbb],
        };
        let bytes = postcard::to_stdvec(&Uart(st.clone())).unwrap();
        assert_eq!(bytes, [1, 2, 3, 4, 5, 6, 7, 8, 9, 2, 0xaa, 0xbb]);
        let back: Uart = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.0, st);
    }
}
