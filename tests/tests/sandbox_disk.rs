//! Tier-4: virtio-blk disks in a real Linux guest. A read-only and a read-write disk with
//! known content: the guest sees them as /dev/vda and /dev/vdb with the right size, read-only
//! flag and serial (GET_ID), reads the host file's bytes (sha256 on both sides), cannot write
//! the read-only disk, and what it writes to the read-write disk lands in the host file.

#![allow(clippy::unwrap_used)]

mod sandbox_common;

use kiln::Sandbox;
use sha2::{Digest, Sha256};

/// Deterministic content for a disk file.
fn content(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn sha_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn sh(sb: &Sandbox, script: &str) -> (bool, String, String) {
    let r = sb.exec(&["sh", "-c", script]).unwrap();
    (
        r.success(),
        r.stdout_str().trim().to_owned(),
        r.stderr_str(),
    )
}

#[test]
fn guest_reads_disk_bytes_and_cannot_write_a_read_only_disk() {
    kiln_tests::require_tier4();
    let dir = tempfile::tempdir().unwrap();
    let ro_path = dir.path().join("ro.img");
    let rw_path = dir.path().join("rw.img");
    let ro = content(1 << 20, 1);
    let rw = content(2 << 20, 2);
    std::fs::write(&ro_path, &ro).unwrap();
    std::fs::write(&rw_path, &rw).unwrap();

    let cfg = sandbox_common::config("disk", 256)
        .disk(&ro_path, true)
        .disk(&rw_path, false);
    let sb = Sandbox::create(cfg).unwrap();

    // Sizes (512-byte sectors), read-only flags, serials (GET_ID).
    let (ok, out, err) = sh(
        &sb,
        // (sysfs `serial` has no trailing newline.)
        "cd /sys/block; for d in vda vdb; do echo $(cat $d/size) $(cat $d/ro) $(cat $d/serial); done",
    );
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines, ["2048 1 kiln-disk0", "4096 0 kiln-disk1"], "{out}");

    // The guest reads the host file's bytes.
    let (ok, out, err) = sh(
        &sb,
        "dd if=/dev/vda bs=4096 count=256 2>/dev/null | sha256sum",
    );
    assert!(ok, "{err}");
    assert_eq!(out.split_whitespace().next(), Some(sha_hex(&ro).as_str()));
    let (ok, out, err) = sh(&sb, "dd if=/dev/vdb bs=65536 2>/dev/null | sha256sum");
    assert!(ok, "{err}");
    assert_eq!(out.split_whitespace().next(), Some(sha_hex(&rw).as_str()));

    // What the guest writes to the read-write disk (flushed) is in the host file.
    let (ok, out, err) = sh(
        &sb,
        "dd if=/dev/vda of=/dev/vdb bs=4096 count=16 seek=1 conv=notrunc,fsync 2>&1",
    );
    assert!(ok, "{out} {err}");
    let now = std::fs::read(&rw_path).unwrap();
    assert_eq!(now.len(), rw.len());
    assert!(
        now[4096..4096 + 65536] == ro[..65536],
        "written bytes differ"
    );
    assert!(now[..4096] == rw[..4096] && now[4096 + 65536..] == rw[4096 + 65536..]);

    // The same dd into the read-only disk (so not a dd option problem) fails; its file is
    // untouched.
    let (ok, out, err) = sh(
        &sb,
        "dd if=/dev/vdb of=/dev/vda bs=4096 count=16 seek=1 conv=notrunc,fsync 2>&1; echo rc=$?",
    );
    assert!(ok, "{err}");
    assert!(
        !out.ends_with("rc=0"),
        "write to a read-only disk succeeded: {out}"
    );
    assert!(
        std::fs::read(&ro_path).unwrap() == ro,
        "read-only file changed"
    );
    sb.shutdown().unwrap();
}
