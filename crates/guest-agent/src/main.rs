//! kiln-agent: PID 1 in the Kiln guest.
//!
//! Minimal bootstrap: mount the pseudo filesystems, announce readiness on the console with the
//! line `KILN-AGENT-READY`, then wait. The full agent (kiln-proto over vsock) grows from here.

use std::io::Write;

fn mount_all() {
    use nix::mount::{mount, MsFlags};
    let mounts: [(&str, &str, &str); 5] = [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
        ("tmpfs", "/tmp", "tmpfs"),
        ("tmpfs", "/run", "tmpfs"),
    ];
    for (src, target, fstype) in mounts {
        let _ = std::fs::create_dir_all(target);
        if let Err(e) = mount(Some(src), target, Some(fstype), MsFlags::empty(), None::<&str>) {
            eprintln!("kiln-agent: mount {target}: {e}");
        }
    }
}

fn main() {
    let pid1 = std::process::id() == 1;
    if pid1 {
        mount_all();
    }
    let mut out = std::io::stdout();
    let _ = writeln!(out, "KILN-AGENT-READY");
    let _ = out.flush();
    if pid1 {
        // Power off: with `reboot=t` on the command line this becomes a triple fault the VMM sees.
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
        loop {
            std::thread::park();
        }
    }
}
