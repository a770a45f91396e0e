//! Tier 4 proof that the chain works before Kiln's VMM exists: QEMU with `-accel kvm` boots the
//! Kiln guest kernel (ELF, through PVH) + initramfs and the agent's `KILN-AGENT-READY` line
//! appears on the serial console. Later it is the cold-boot comparison peer for Kiln's VMM.
//!
//! Here it runs inside the harness: `cargo test -p kiln-tests --no-run`, then
//! `cargo xtask harness -- <test binary> --nocapture` (or `cargo xtask test`).

use std::time::Duration;

use kiln_tests::{guest_initramfs, guest_kernel, is_elf, qemu_boot_to_ready, Machine, QemuBoot};

#[test]
fn qemu_kvm_boots_kiln_guest_to_agent_ready() {
    kiln_tests::require_tier4();
    let kernel = guest_kernel().unwrap();
    let initramfs = guest_initramfs().unwrap();
    assert!(
        is_elf(&kernel),
        "{} should be the ELF vmlinux (PVH boot)",
        kernel.display()
    );
    let mut boot = QemuBoot::new(&kernel, &initramfs);
    boot.machine = Machine::Microvm;
    boot.timeout = Duration::from_secs(90);
    // Every console byte is a trapped port write; under nested virtualization the kernel's
    // boot log alone costs seconds, and Kiln's own VMM boots the guest `quiet` as well.
    boot.extra_cmdline = "quiet".into();
    let report = qemu_boot_to_ready(&boot).unwrap();
    eprintln!(
        "L2 QEMU -M microvm -accel kvm: {} after {:.3} s (first console line after {:.3} s)",
        kiln_tests::READY_LINE,
        report.ready_after.as_secs_f64(),
        report.first_output_after.unwrap_or_default().as_secs_f64()
    );
}
