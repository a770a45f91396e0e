//! Guest CPUID: KVM's supported set (read once per process) plus the features KVM emulates
//! but leaves for the VMM to announce (the TSC-deadline timer), with per-vCPU fixups for APIC
//! ids and a flat topology (one package, one core per vCPU, no SMT), for Intel (leaves 1, 4,
//! 0xb, 0x1f) and AMD (0x8000_0008, 0x8000_001e) guests; no virtual PMU (leaf 0xa).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;
const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const EDX_HTT: u32 = 1 << 28;

/// Bits needed to number `n` logical CPUs.
fn id_bits(n: u8) -> u32 {
    u32::from(n.max(1)).next_power_of_two().trailing_zeros()
}

/// Applies the fixups for vCPU `index` of `count` to one entry.
fn fix_entry(e: &mut kvm_cpuid_entry2, index: u8, count: u8) {
    let apic_id = u32::from(index);
    match e.function {
        LEAF_FEATURES => {
            // EBX: initial APIC id [31:24], logical CPU count [23:16], CLFLUSH size 8 qwords.
            e.ebx = (apic_id << 24) | (u32::from(count) << 16) | (8 << 8);
            e.ecx |= ECX_HYPERVISOR;
            if count > 1 {
                e.edx |= EDX_HTT;
            } else {
                e.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE if e.eax & 0x1f != 0 => {
            // Cores per package - 1 in [31:26]; each cache shared by one thread.
            e.eax = (e.eax & 0x3fff) | ((u32::from(count) - 1) << 26);
        }
        LEAF_PMU => {
            // No virtual PMU.
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
            e.edx = apic_id;
            match e.index {
                0 => {
                    // SMT level: one thread per core.
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = 1 << 8;
                }
                1 => {
                    // Core level: `count` cores.
                    e.eax = id_bits(count);
                    e.ebx = u32::from(count);
                    e.ecx = (2 << 8) | 1;
                }
                i => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = i;
                }
            }
        }
        LEAF_AMD_SIZES => {
            // AMD: ECX[15:12] APIC-id bits per package, ECX[7:0] cores per package - 1.
            e.ecx = (e.ecx & !0xf0ff) | (id_bits(count) << 12) | (u32::from(count) - 1);
        }
        LEAF_AMD_TOPOLOGY => {
            // AMD: extended APIC id; compute unit = vCPU, one thread each; node 0.
            e.eax = apic_id;
            e.ebx = apic_id & 0xff;
            e.ecx = 0;
            e.edx = 0;
        }
        _ => {}
    }
}

/// Announces what KVM emulates in its in-kernel LAPIC but does not list in
/// `KVM_GET_SUPPORTED_CPUID`: the TSC-deadline timer (`KVM_CAP_TSC_DEADLINE_TIMER`). A Linux
/// guest that sees it skips calibrating its LAPIC timer against the PIT — a busy-wait of
/// HZ/10 ticks (100 ms) at every boot, and under nested emulation a loop that can wait on a
/// timer interrupt the emulator loses.
pub fn add_emulated_features(supported: &mut CpuId, tsc_deadline: bool) {
    if !tsc_deadline {
        return;
    }
    for e in supported.as_mut_slice() {
        if e.function == LEAF_FEATURES {
            e.ecx |= ECX_TSC_DEADLINE;
        }
    }
}

/// The CPUID for vCPU `index` of `count`, derived from KVM's supported set.
pub fn for_vcpu(supported: &CpuId, index: u8, count: u8) -> CpuId {
    let mut c = supported.clone();
    for e in c.as_mut_slice() {
        fix_entry(e, index, count);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0,
            edx: 0,
            ..Default::default()
        }
    }

    #[test]
    fn tsc_deadline_is_announced_only_when_kvm_emulates_it() {
        let base = CpuId::from_entries(&[entry(LEAF_FEATURES, 0), entry(LEAF_CACHE, 0)]).unwrap();
        let mut without = base.clone();
        add_emulated_features(&mut without, false);
        assert_eq!(without.as_slice()[0].ecx & ECX_TSC_DEADLINE, 0);
        let mut with = base;
        add_emulated_features(&mut with, true);
        assert_ne!(with.as_slice()[0].ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!(with.as_slice()[1].ecx & ECX_TSC_DEADLINE, 0, "only leaf 1");
    }

    #[test]
    fn apic_ids_and_topology_follow_the_vcpu() {
        let sup = CpuId::from_entries(&[
            entry(1, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(0xa, 0),
            entry(0x8000_0008, 0),
            entry(0x8000_001e, 0),
        ])
        .unwrap();
        let c = for_vcpu(&sup, 3, 4);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 3);
        assert_eq!((s[0].ebx >> 16) & 0xff, 4);
        assert_ne!(s[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(s[0].edx & EDX_HTT, 0);
        assert!(s[1..4].iter().all(|e| e.edx == 3));
        assert_eq!(s[2].ebx, 4);
        assert_eq!(s[2].eax, 2);
        assert_eq!(s[3].ecx, 2);
        assert_eq!(s[4].eax, 0);
        assert_eq!(s[5].ecx & 0xf0ff, (2 << 12) | 3);
        assert_eq!((s[6].eax, s[6].ebx, s[6].ecx), (3, 3, 0));
        let one = for_vcpu(&sup, 0, 1);
        assert_eq!(one.as_slice()[0].edx & EDX_HTT, 0);
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(5), 3);
    }
}
