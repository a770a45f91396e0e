//! The bare-metal tier-2 test guest (source: `crates/vmm-core/test-guest/guest.S`, built by
//! build.rs with binutils). It boots through the same PVH ELF entry as a Linux vmlinux,
//! switches to long mode on its own page tables, prints [`READY`] and then performs the
//! action chosen with `kiln.test=<action>` on the command line (see [`Action`]).

use std::io;
use std::path::{Path, PathBuf};

/// The ELF image.
pub const ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/test-guest.elf"));

/// The line the guest prints once it runs 64-bit code.
pub const READY: &str = "READY";

/// What the guest does after printing READY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Triple fault (KVM_EXIT_SHUTDOWN), like Linux with `reboot=t`.
    Shutdown,
    /// Busy loop in guest mode forever.
    Spin,
    /// `cli; hlt` forever (blocked inside KVM_RUN).
    Halt,
    /// Write 0xFE to the i8042 command port.
    Reset,
    /// Print `cpus=<hex> memkib=<hex> cmdline=<...>`, then triple fault.
    Info,
    /// Print `C=<hex>` lines forever, counting up from 0 with a short busy delay between
    /// lines; the counter lives in guest memory (snapshot tests).
    Count,
    /// [`Action::Count`] without the delay: output never pauses (snapshot benchmark).
    FastCount,
    /// Print `mmio magic=<hex> version=<hex> devid=<hex>` from the first virtio-mmio window
    /// (0xd0000000), then triple fault.
    Mmio,
    /// Print `rep outsb OK` with one `rep outsb` (string port I/O), then triple fault.
    Outs,
}

impl Action {
    /// The command-line argument selecting this action (empty for the default).
    pub fn cmdline(self) -> &'static str {
        match self {
            Action::Shutdown => "",
            Action::Spin => "kiln.test=spin",
            Action::Halt => "kiln.test=halt",
            Action::Reset => "kiln.test=reset",
            Action::Info => "kiln.test=info",
            Action::Count => "kiln.test=count",
            Action::FastCount => "kiln.test=fastcount",
            Action::Mmio => "kiln.test=mmio",
            Action::Outs => "kiln.test=outs",
        }
    }
}

/// The counter values of the complete `C=<hex>` lines in `serial` output of [`Action::Count`].
pub fn counter_values(serial: &str) -> Vec<u64> {
    serial
        .split('\n')
        .rev()
        .skip(1) // the last piece is an unfinished line (or empty)
        .filter_map(|l| l.strip_prefix("C="))
        .filter_map(|h| u64::from_str_radix(h.trim_end_matches('\r'), 16).ok())
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect()
}

/// Writes the guest to `dir/kiln-test-guest.elf` (if not already identical) and returns the
/// path.
pub fn write_to(dir: &Path) -> io::Result<PathBuf> {
    let path = dir.join("kiln-test-guest.elf");
    if std::fs::read(&path).ok().as_deref() != Some(ELF) {
        let tmp = dir.join(format!("kiln-test-guest.elf.{}", std::process::id()));
        std::fs::write(&tmp, ELF)?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use linux_loader::loader::elf::{Elf, PvhBootCapability};
    use linux_loader::loader::KernelLoader;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    #[test]
    fn image_carries_a_pvh_entry_note() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let mut f = io::Cursor::new(ELF.to_vec());
        let r = Elf::load(&mem, None, &mut f, Some(GuestAddress(0x10_0000))).unwrap();
        assert_eq!(
            r.pvh_boot_cap,
            PvhBootCapability::PvhEntryPresent(GuestAddress(0x10_0000))
        );
    }
}
