//! Reading and writing KVM's view of a VM: per-vCPU state ([`save_vcpu`], [`restore_vcpu`])
//! and VM-wide state — PIC master/slave, IOAPIC, PIT, KVM clock ([`save_vm`],
//! [`restore_vm`]).
//!
//! The order follows KVM's rules: `KVM_GET_MP_STATE` first (it may change LAPIC state), vCPU
//! events last; on restore CPUID before anything that depends on it, MSRs after the LAPIC,
//! events last. The caller must have completed any pending I/O exit before saving (a
//! `KVM_RUN` with `immediate_exit` set), so the registers are consistent.

use kvm_bindings::{
    kvm_fpu, kvm_irqchip, kvm_msr_entry, CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{VcpuFd, VmFd};

use super::state::{VcpuSnapshot, FPU_BYTES};

/// A KVM operation on saved state failed.
#[derive(Debug, thiserror::Error)]
pub enum KvmStateError {
    /// An ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Ioctl {
        /// The operation.
        op: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM refused to set an MSR.
    #[error("KVM refused MSR {index:#x} = {value:#x}")]
    Msr {
        /// MSR index.
        index: u32,
        /// The value.
        value: u64,
    },
    /// A list could not be built (too many entries).
    #[error("{what}: {source}")]
    List {
        /// Which list.
        what: &'static str,
        /// Cause.
        #[source]
        source: vmm_sys_util::fam::Error,
    },
    /// The saved FPU state has the wrong size.
    #[error("FPU state: {len} bytes")]
    FpuSize {
        /// Its size.
        len: usize,
    },
}

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmStateError {
    move |source| KvmStateError::Ioctl { op, source }
}

fn fpu_to_bytes(fpu: &kvm_fpu) -> Vec<u8> {
    // SAFETY: kvm_fpu is a repr(C) struct of integers and byte arrays with explicit padding
    // fields and no implicit padding; viewing it as FPU_BYTES bytes reads initialised memory.
    unsafe { std::slice::from_raw_parts((fpu as *const kvm_fpu).cast::<u8>(), FPU_BYTES) }.to_vec()
}

fn fpu_from_bytes(b: &[u8]) -> Option<kvm_fpu> {
    if b.len() != FPU_BYTES {
        return None;
    }
    let mut fpu = kvm_fpu::default();
    // SAFETY: `fpu` is FPU_BYTES long (checked above) and every bit pattern is a valid
    // kvm_fpu (integers and byte arrays only); source and destination do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(
            b.as_ptr(),
            (&mut fpu as *mut kvm_fpu).cast::<u8>(),
            FPU_BYTES,
        )
    };
    Some(fpu)
}

fn msr_list(indices: &[u32], values: Option<&[kvm_msr_entry]>) -> Result<Msrs, KvmStateError> {
    let entries: Vec<kvm_msr_entry> = match values {
        Some(v) => v.to_vec(),
        None => indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect(),
    };
    Msrs::from_entries(&entries).map_err(|source| KvmStateError::List {
        what: "MSR list",
        source,
    })
}

/// Reads every MSR in `indices` that KVM lets us read (unreadable ones are skipped).
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, KvmStateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let mut msrs = msr_list(chunk, None)?;
        let n = fd.get_msrs(&mut msrs).map_err(ioctl("get MSRs"))?;
        out.extend_from_slice(&msrs.as_slice()[..n.min(chunk.len())]);
        // KVM stops at the first MSR it cannot read: skip that one and go on.
        rest = &rest[(n + 1).min(chunk.len()).max(1)..];
        if n >= chunk.len() {
            continue;
        }
        tracing::trace!(msr = chunk[n], "snapshot: MSR not readable, skipped");
    }
    Ok(out)
}

/// Saves one vCPU. `msr_indices` is KVM's MSR index list.
pub fn save_vcpu(
    fd: &VcpuFd,
    index: u8,
    msr_indices: &[u32],
) -> Result<VcpuSnapshot, KvmStateError> {
    let mp_state = fd.get_mp_state().map_err(ioctl("get MP state"))?;
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(ioctl("get CPUID"))?;
    let regs = fd.get_regs().map_err(ioctl("get regs"))?;
    let sregs = fd.get_sregs().map_err(ioctl("get sregs"))?;
    let fpu = fd.get_fpu().map_err(ioctl("get FPU"))?;
    let xsave = fd.get_xsave().ok();
    let xcrs = fd.get_xcrs().ok();
    let debug_regs = fd.get_debug_regs().map_err(ioctl("get debug regs"))?;
    let lapic = fd.get_lapic().map_err(ioctl("get LAPIC"))?;
    let msrs = read_msrs(fd, msr_indices)?;
    let events = fd.get_vcpu_events().map_err(ioctl("get vCPU events"))?;
    Ok(VcpuSnapshot {
        index,
        cpuid: cpuid.as_slice().to_vec(),
        mp_state,
        regs,
        sregs,
        fpu: fpu_to_bytes(&fpu),
        xsave,
        xcrs,
        debug_regs,
        lapic,
        msrs,
        events,
    })
}

/// Loads `s` into a freshly created vCPU.
pub fn restore_vcpu(fd: &VcpuFd, s: &VcpuSnapshot) -> Result<(), KvmStateError> {
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|source| KvmStateError::List {
        what: "CPUID",
        source,
    })?;
    fd.set_cpuid2(&cpuid).map_err(ioctl("set CPUID"))?;
    fd.set_mp_state(s.mp_state).map_err(ioctl("set MP state"))?;
    fd.set_regs(&s.regs).map_err(ioctl("set regs"))?;
    fd.set_sregs(&s.sregs).map_err(ioctl("set sregs"))?;
    let fpu = fpu_from_bytes(&s.fpu).ok_or(KvmStateError::FpuSize { len: s.fpu.len() })?;
    fd.set_fpu(&fpu).map_err(ioctl("set FPU"))?;
    if let Some(x) = &s.xsave {
        // SAFETY: `x` is a complete legacy kvm_xsave (4 KiB region) as KVM_GET_XSAVE returned
        // it; KVM_SET_XSAVE reads exactly that struct.
        unsafe { fd.set_xsave(x) }.map_err(ioctl("set XSAVE"))?;
    }
    if let Some(x) = &s.xcrs {
        fd.set_xcrs(x).map_err(ioctl("set XCRs"))?;
    }
    fd.set_debug_regs(&s.debug_regs)
        .map_err(ioctl("set debug regs"))?;
    fd.set_lapic(&s.lapic).map_err(ioctl("set LAPIC"))?;
    for chunk in s.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let msrs = msr_list(&[], Some(chunk))?;
        let n = fd.set_msrs(&msrs).map_err(ioctl("set MSRs"))?;
        if n < chunk.len() {
            return Err(KvmStateError::Msr {
                index: chunk[n].index,
                value: chunk[n].data,
            });
        }
    }
    fd.set_vcpu_events(&s.events)
        .map_err(ioctl("set vCPU events"))?;
    Ok(())
}

/// VM-wide KVM state.
#[derive(Debug, Clone)]
pub struct VmKvmState {
    /// PIC master.
    pub pic_master: kvm_irqchip,
    /// PIC slave.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// PIT.
    pub pit: kvm_bindings::kvm_pit_state2,
    /// KVM clock.
    pub clock: kvm_bindings::kvm_clock_data,
}

/// Reads the irqchips, PIT and clock.
pub fn save_vm(vm: &VmFd) -> Result<VmKvmState, KvmStateError> {
    let chip = |id| -> Result<kvm_irqchip, KvmStateError> {
        let mut c = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        vm.get_irqchip(&mut c).map_err(ioctl("get irqchip"))?;
        Ok(c)
    };
    let mut clock = vm.get_clock().map_err(ioctl("get clock"))?;
    // Restore sets the clock to exactly this value; the flags only describe how it was read.
    clock.flags = 0;
    Ok(VmKvmState {
        pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(ioctl("get PIT"))?,
        clock,
    })
}

/// Loads VM-wide state into a VM whose irqchip and PIT exist.
pub fn restore_vm(vm: &VmFd, s: &VmKvmState) -> Result<(), KvmStateError> {
    for c in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        vm.set_irqchip(c).map_err(ioctl("set irqchip"))?;
    }
    vm.set_pit2(&s.pit).map_err(ioctl("set PIT"))?;
    let mut clock = s.clock;
    clock.flags = 0;
    vm.set_clock(&clock).map_err(ioctl("set clock"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fpu_bytes_round_trip() {
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            last_ip: 0xdead_beef,
            ..Default::default()
        };
        let b = fpu_to_bytes(&fpu);
        assert_eq!(b.len(), FPU_BYTES);
        let back = fpu_from_bytes(&b).unwrap();
        assert_eq!(back.fcw, 0x37f);
        assert_eq!(back.mxcsr, 0x1f80);
        assert_eq!(back.last_ip, 0xdead_beef);
        assert!(fpu_from_bytes(&b[1..]).is_none());
    }

    #[test]
    fn msr_lists_hold_values() {
        let m = msr_list(&[1, 2, 3], None).unwrap();
        assert_eq!(m.as_slice().len(), 3);
        assert_eq!(m.as_slice()[2].index, 3);
        let e = [kvm_msr_entry {
            index: 7,
            data: 9,
            ..Default::default()
        }];
        assert_eq!(msr_list(&[], Some(&e)).unwrap().as_slice()[0].data, 9);
        assert!(msr_list(&[0; KVM_MAX_MSR_ENTRIES + 1], None).is_err());
    }
}
