//! Tier-4: snapshots of a real Linux guest through the `kiln` API — a file written before the
//! snapshot is seen by two restored sandboxes, a change in one is invisible to the other and
//! to the original, the clock moves forward, exec works right after restore; `Sandbox::fork`
//! and the `kiln snapshot` / `kiln restore` / `kiln fork` commands.

// Test helpers outside #[test] fns may unwrap too.
#![allow(clippy::unwrap_used)]

mod sandbox_common;

use std::time::Duration;

use kiln::{Sandbox, SandboxConfig};
use sandbox_common::{run_kiln, sandbox, BOOT_TIMEOUT, REQUEST_TIMEOUT};

fn restore_config(name: &str) -> SandboxConfig {
    SandboxConfig::new()
        .name(name)
        .boot_timeout(BOOT_TIMEOUT)
        .request_timeout(REQUEST_TIMEOUT)
}

fn guest_time(sb: &Sandbox) -> u64 {
    let r = sb.exec(&["date", "+%s"]).unwrap();
    assert_eq!(r.status.code, Some(0), "{r:?}");
    String::from_utf8_lossy(&r.stdout).trim().parse().unwrap()
}

fn host_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn restored_sandboxes_share_the_snapshot_and_diverge_independently() {
    kiln_tests::require_tier4();
    let dir = tempfile::tempdir().unwrap();
    let orig = sandbox("snap-orig", 256, 1);
    orig.write_file("/tmp/snap.txt", b"before\n").unwrap();
    let t_snap = guest_time(&orig);
    orig.snapshot(dir.path()).unwrap();
    // The original keeps working after the snapshot.
    assert_eq!(orig.read_file("/tmp/snap.txt").unwrap(), b"before\n");

    // Let wall-clock time pass so a forward-moving clock is visible.
    std::thread::sleep(Duration::from_secs(2));
    let a = Sandbox::restore(dir.path(), restore_config("snap-a")).unwrap();
    // exec works right after the restore.
    let r = a.exec(&["cat", "/tmp/snap.txt"]).unwrap();
    assert_eq!(r.stdout, b"before\n", "{r:?}");
    let b = Sandbox::restore(dir.path(), restore_config("snap-b")).unwrap();
    // Informational (never asserted): boot vs restore under this host's virtualization.
    eprintln!(
        "timings: boot {:?} (VM {:?}); restore {:?} / {:?} (VM {:?} / {:?})",
        orig.boot_timings().ready,
        orig.boot_timings().vm_start,
        a.boot_timings().ready,
        b.boot_timings().ready,
        a.boot_timings().vm_start,
        b.boot_timings().vm_start
    );
    assert_eq!(b.read_file("/tmp/snap.txt").unwrap(), b"before\n");

    // A change in one fork is invisible to the other and to the original.
    a.write_file("/tmp/snap.txt", b"changed in a\n").unwrap();
    a.write_file("/tmp/only-a.txt", b"a\n").unwrap();
    assert_eq!(a.read_file("/tmp/snap.txt").unwrap(), b"changed in a\n");
    assert_eq!(b.read_file("/tmp/snap.txt").unwrap(), b"before\n");
    assert!(!b.file_exists("/tmp/only-a.txt").unwrap());
    assert_eq!(orig.read_file("/tmp/snap.txt").unwrap(), b"before\n");

    // The clock moved forward: set from the host at restore, not frozen at the snapshot.
    let now = host_time();
    for sb in [&a, &b] {
        let t = guest_time(sb);
        assert!(t >= t_snap + 2, "guest clock {t}, snapshot at {t_snap}");
        assert!(t + 5 >= now && t <= now + 5, "guest clock {t}, host {now}");
    }
    // Forks get different random streams (PostRestore reseeds them).
    let rand = |sb: &Sandbox| {
        sb.exec(&["sh", "-c", "head -c 16 /dev/urandom | od -An -tx1"])
            .unwrap()
            .stdout
    };
    assert_ne!(rand(&a), rand(&b));
    for sb in [a, b, orig] {
        sb.shutdown().unwrap();
    }
}

#[test]
fn fork_makes_independent_copies() {
    kiln_tests::require_tier4();
    let orig = sandbox("fork-orig", 256, 2);
    orig.write_file("/tmp/fork.txt", b"parent\n").unwrap();
    let forks = orig.fork_with(2, restore_config("ignored")).unwrap();
    assert_eq!(forks.len(), 2);
    for (i, f) in forks.iter().enumerate() {
        assert_eq!(f.name(), format!("fork-orig-fork{i}"));
        assert_eq!(f.read_file("/tmp/fork.txt").unwrap(), b"parent\n");
        f.write_file("/tmp/fork.txt", format!("fork {i}\n").as_bytes())
            .unwrap();
    }
    assert_eq!(forks[0].read_file("/tmp/fork.txt").unwrap(), b"fork 0\n");
    assert_eq!(forks[1].read_file("/tmp/fork.txt").unwrap(), b"fork 1\n");
    assert_eq!(orig.read_file("/tmp/fork.txt").unwrap(), b"parent\n");
    assert!(orig.fork(0).is_err());
}

#[test]
fn cli_snapshot_restore_and_fork() {
    kiln_tests::require_tier4();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    // `kiln <cmd> --dir <d> <opts> --boot-timeout 180 -- <argv>`, which must succeed.
    let kiln_ok = |cmd: &str, opts: &[&str], argv: &[&str]| {
        let mut args = vec![cmd, "--dir", d];
        args.extend_from_slice(opts);
        args.extend_from_slice(&["--boot-timeout", "180", "--"]);
        args.extend_from_slice(argv);
        let out = run_kiln(&args, &[], None);
        assert!(out.status.success(), "{out:?}");
        out
    };
    kiln_ok(
        "snapshot",
        &[],
        &["sh", "-c", "echo cli-state > /tmp/cli.txt"],
    );
    let out = kiln_ok("restore", &[], &["cat", "/tmp/cli.txt"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "cli-state\n");
    let out = kiln_ok("fork", &["-n", "2"], &["cat", "/tmp/cli.txt"]);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("[fork 0] cli-state") && s.contains("[fork 1] cli-state"),
        "{s}"
    );
    // A corrupted snapshot is refused with a clear error.
    let state = dir.path().join("vm.state");
    let mut bytes = std::fs::read(&state).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0xff;
    std::fs::write(&state, bytes).unwrap();
    let out = run_kiln(&["restore", "--dir", d, "--", "true"], &[], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("checksum mismatch"), "{err}");
}

#[test]
fn restore_mode_pool_hands_out_pristine_restored_sandboxes() {
    kiln_tests::require_tier4();
    use kiln::{PoolConfig, ResetMode, SandboxPool};
    let pool = SandboxPool::with_reset_mode(
        sandbox_common::config("rpool", 256),
        PoolConfig {
            min_size: 0,
            max_size: 1,
            max_in_use: 1,
            max_idle_duration: None,
            acquire_timeout: Duration::from_secs(60),
            ..PoolConfig::default()
        },
        ResetMode::Restore,
    )
    .unwrap();
    assert_eq!(pool.reset_mode(), ResetMode::Restore);
    // The kernel log of the boot, with its timestamps: identical in every restore of one
    // snapshot, different (timing) for another boot.
    let boot_id = |sb: &Sandbox| {
        let out = sb.exec(&["sh", "-c", "dmesg | head -n 60"]).unwrap().stdout;
        assert!(out.len() > 1000, "{}", String::from_utf8_lossy(&out));
        out
    };
    // The first sandbox boots and becomes the pristine snapshot.
    let first_boot = {
        let a = pool.acquire().unwrap();
        a.write_file("/tmp/user-a", b"a\n").unwrap();
        boot_id(&a)
    };
    for user in ["b", "c"] {
        let sb = pool.acquire().unwrap();
        // Restored from the snapshot of the first sandbox (same kernel boot), before user A
        // wrote anything.
        assert!(boot_id(&sb) == first_boot, "user {user}: not restored");
        assert!(
            !sb.file_exists("/tmp/user-a").unwrap(),
            "user {user} sees user a"
        );
        assert!(
            !sb.file_exists("/tmp/user-b").unwrap(),
            "user {user} sees user b"
        );
        sb.write_file(&format!("/tmp/user-{user}"), b"x\n").unwrap();
        assert!(sb.exec(&["true"]).unwrap().success());
    }
    pool.shutdown();
    let s = pool.stats();
    assert_eq!(s.created_count, s.destroyed_count, "{s:?}");
}
