//! Facts about the Kiln guest that tests check: the file systems the agent mounts as PID 1
//! (crates/guest-agent/src/sys.rs), checked by the tier-3 PID 1 test and the QEMU vsock smoke
//! example.

/// `(mount point, file system type)` of every file system PID 1 mounts.
pub const PID1_MOUNTS: [(&str, &str); 7] = [
    ("/proc", "proc"),
    ("/sys", "sysfs"),
    ("/dev", "devtmpfs"),
    ("/dev/pts", "devpts"),
    ("/dev/shm", "tmpfs"),
    ("/tmp", "tmpfs"),
    ("/run", "tmpfs"),
];

/// The entries of [`PID1_MOUNTS`] missing from `mounts` (the text of `/proc/mounts`).
pub fn missing_pid1_mounts(mounts: &str) -> Vec<(&'static str, &'static str)> {
    PID1_MOUNTS
        .iter()
        .copied()
        .filter(|(target, fstype)| {
            !mounts.lines().any(|l| {
                let mut w = l.split_whitespace().skip(1);
                w.next() == Some(target) && w.next() == Some(fstype)
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_mounts_are_named() {
        let all: String = PID1_MOUNTS
            .iter()
            .map(|(t, f)| format!("{f} {t} {f} rw 0 0\n"))
            .collect();
        assert!(missing_pid1_mounts(&all).is_empty());
        let without_run = all.replace("tmpfs /run tmpfs", "tmpfs /other tmpfs");
        assert_eq!(missing_pid1_mounts(&without_run), [("/run", "tmpfs")]);
        // The type must match too.
        let wrong = all.replace("proc /proc proc", "proc /proc tmpfs");
        assert_eq!(missing_pid1_mounts(&wrong), [("/proc", "proc")]);
    }
}
