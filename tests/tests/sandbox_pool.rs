//! Tier-4: `kiln::SandboxPool` with real Linux guests — a returned sandbox is pristine for the
//! next user (no file, process, mount, hostname or profile change of one user is visible to the
//! next), the pool's hit/miss/evict counters behave with real sandboxes, a guest that died is
//! never handed out again, and the health-check ping has its own short deadline.
//!
//! The pristine and counter tests run in both reset modes: `Reboot` (a returned sandbox is
//! destroyed and a fresh one booted) and `Restore` (the pool's first sandbox is snapshotted
//! before anyone uses it; new sandboxes are restored from that snapshot). In both a returned
//! sandbox is destroyed (an eviction), never reused in place.

// Test code: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod sandbox_common;

use std::time::{Duration, Instant};

use kiln::{
    ExecEvent, ExecOptions, PoolConfig, ResetMode, Sandbox, SandboxConfig, SandboxPool,
    SandboxPoolError,
};
use sandbox_common::BOOT_TIMEOUT;

/// The pools' sandboxes: 256 MiB, one vCPU, the test deadlines.
fn sandbox_config(name: &str) -> SandboxConfig {
    sandbox_common::config(name, 256).vcpus(1)
}

/// One sandbox in use at a time, none expires idle, a health check at every release.
fn pool_config(min_size: usize, max_size: usize, maintenance_interval: Duration) -> PoolConfig {
    PoolConfig {
        min_size,
        max_size,
        max_in_use: 1,
        max_idle_duration: None,
        health_check_interval: 1,
        acquire_timeout: Duration::from_secs(60),
        maintenance_interval,
    }
}

/// `SandboxPool::with_reset_mode`; a failure names the pool.
fn new_pool(name: &str, sandbox: SandboxConfig, cfg: PoolConfig, mode: ResetMode) -> SandboxPool {
    SandboxPool::with_reset_mode(sandbox, cfg, mode)
        .unwrap_or_else(|e| panic!("creating pool {name}: {e}"))
}

/// A pool of sandboxes with the test deadlines.
fn pool(name: &str, min_size: usize, max_size: usize, mode: ResetMode) -> SandboxPool {
    let cfg = pool_config(min_size, max_size, Duration::from_millis(200));
    new_pool(name, sandbox_config(name), cfg, mode)
}

/// Waits (bounded) until the pool has `n` idle sandboxes.
fn wait_idle(pool: &SandboxPool, n: usize) {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        let s = pool.stats();
        if s.idle_count >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the pool did not reach {n} idle sandbox(es) within {BOOT_TIMEOUT:?}: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A deadline for every exec: a guest that stops answering fails the test instead of
/// hanging it.
fn deadline() -> ExecOptions {
    ExecOptions::new().timeout(Duration::from_secs(120))
}

/// Runs a shell snippet, asserts it succeeded, returns its stdout.
fn sh(sb: &Sandbox, script: &str) -> String {
    let r = sb
        .exec_with_options(&["sh", "-c", script], deadline())
        .unwrap();
    assert!(r.success(), "`{script}` failed: {r:?}");
    r.stdout_str()
}

const FILES: [&str; 3] = [
    "/tmp/kiln-user-a",
    "/root/kiln-user-a",
    "/dev/shm/kiln-user-a",
];

/// What user A leaves behind, checked to be really there; returns the still-running
/// foreground exec (drop it without waiting, as a careless user would).
fn leave_traces(a: &Sandbox) -> kiln::ExecStream {
    // Files in /tmp, /root and /dev/shm.
    for f in FILES {
        a.write_file(f, b"secret of user A").unwrap();
    }
    // A background process that outlives its exec, and a foreground one still running when
    // the handle is returned.
    sh(a, "sleep 1000 </dev/null >/dev/null 2>&1 &");
    let mut fg = a.stream_exec(&["sleep", "1001"]).unwrap();
    assert!(matches!(
        fg.next_event().unwrap(),
        Some(ExecEvent::Started { .. })
    ));
    // A mount, a hostname and a login environment.
    sh(
        a,
        "mkdir -p /mnt/kiln-a && mount -t tmpfs kiln-user-a-tmpfs /mnt/kiln-a && \
         echo x > /mnt/kiln-a/f",
    );
    sh(a, "hostname kiln-user-a");
    sh(
        a,
        "echo 'export KILN_USER_A_SECRET=1' >> /root/.profile; \
         echo 'export KILN_USER_A_SECRET=1' >> /etc/profile",
    );
    // Every change is really there.
    for f in FILES {
        assert!(a.file_exists(f).unwrap(), "{f}");
    }
    let ps = sh(a, "ps");
    assert!(
        ps.contains("sleep 1000") && ps.contains("sleep 1001"),
        "{ps}"
    );
    assert!(sh(a, "cat /proc/mounts").contains("kiln-user-a-tmpfs"));
    assert_eq!(sh(a, "hostname").trim(), "kiln-user-a");
    assert!(sh(a, "sh -l -c env").contains("KILN_USER_A_SECRET=1"));
    fg
}

/// Every trace of user A that `b` still shows, by kind.
fn leftovers(b: &Sandbox, default_hostname: &str) -> Vec<String> {
    let mut found = Vec::new();
    for f in FILES {
        if b.file_exists(f).unwrap() {
            found.push(format!("file {f}"));
        }
    }
    let ps = sh(b, "ps");
    for p in ["sleep 1000", "sleep 1001"] {
        if ps.contains(p) {
            found.push(format!("process {p}"));
        }
    }
    if sh(b, "cat /proc/mounts").contains("kiln-user-a") {
        found.push("mount kiln-user-a-tmpfs".into());
    }
    if b.file_exists("/mnt/kiln-a").unwrap() {
        found.push("directory /mnt/kiln-a".into());
    }
    if sh(b, "hostname").trim() != default_hostname {
        found.push("hostname".into());
    }
    if sh(b, "sh -l -c env").contains("KILN_USER_A") {
        found.push("login environment".into());
    }
    if b.file_exists("/root/.profile").unwrap() {
        found.push("file /root/.profile".into());
    }
    if sh(b, "cat /etc/profile 2>/dev/null; true").contains("KILN_USER_A") {
        found.push("line in /etc/profile".into());
    }
    found
}

/// User A leaves traces of every kind, returns the sandbox; user B, who gets the single slot
/// next, must see none of them.
fn next_user_sees_nothing(name: &str, mode: ResetMode) {
    // One slot: the second user gets what the pool has for that slot after the first returned.
    let pool = pool(name, 1, 1, mode);
    assert_eq!(pool.reset_mode(), mode);
    wait_idle(&pool, 1);

    let default_hostname;
    {
        let a = pool.acquire().unwrap();
        default_hostname = sh(&a, "hostname").trim().to_owned();
        let fg = leave_traces(&a);
        drop(fg);
    }

    // Same slot again (max_size 1, max_in_use 1).
    wait_idle(&pool, 1);
    let b = pool.acquire().unwrap();
    let found = leftovers(&b, &default_hostname);
    assert!(found.is_empty(), "user B sees user A's {found:?}");
    // The agent's Hello says whether its VM was restored from a snapshot (it reconnected).
    match mode {
        ResetMode::Reboot => assert!(!b.hello().restored, "a reboot-mode sandbox was restored"),
        // Restored from the pristine snapshot of A's sandbox, taken before A used it.
        ResetMode::Restore => assert!(b.hello().restored, "a restore-mode sandbox booted"),
        other => panic!("unexpected reset mode {other:?}"),
    }
    drop(b);

    let s = pool.stats();
    assert_eq!((s.hit_count, s.miss_count), (2, 0), "{s:?}");
    // In both modes a returned sandbox is destroyed (evicted), never reused in place.
    assert_eq!(s.evict_count, 2, "{s:?}");
    pool.shutdown();
    let s = pool.stats();
    assert_eq!(s.created_count, s.destroyed_count, "{s:?}");
}

#[test]
fn next_user_sees_nothing_of_the_previous_one() {
    kiln_tests::require_tier4();
    next_user_sees_nothing("pool-pristine", ResetMode::Reboot);
}

#[test]
fn next_user_sees_nothing_of_the_previous_one_restore_mode() {
    kiln_tests::require_tier4();
    next_user_sees_nothing("pool-pristine-r", ResetMode::Restore);
}

/// Control for the test above: in one sandbox reused without any reset, the same checks find
/// every kind of trace (so an empty list above means something).
#[test]
fn the_leftover_checks_find_every_trace_in_a_reused_sandbox() {
    kiln_tests::require_tier4();
    let sb = sandbox_common::sandbox("pool-control", 256, 1);
    let default_hostname = sh(&sb, "hostname").trim().to_owned();
    drop(leave_traces(&sb));
    let found = leftovers(&sb, &default_hostname);
    let want = [
        "file /tmp/kiln-user-a",
        "file /root/kiln-user-a",
        "file /dev/shm/kiln-user-a",
        "process sleep 1000",
        "process sleep 1001",
        "mount kiln-user-a-tmpfs",
        "directory /mnt/kiln-a",
        "hostname",
        "login environment",
        "file /root/.profile",
        "line in /etc/profile",
    ];
    assert_eq!(found, want);
}

fn stats_count(name: &str, mode: ResetMode) {
    let pool = pool(name, 0, 1, mode);
    assert_eq!(pool.stats().created_count, 0, "min_size 0 boots nothing");

    // Empty pool: a miss boots in this thread.
    {
        let sb = pool.acquire().unwrap();
        let s = pool.stats();
        assert_eq!((s.hit_count, s.miss_count, s.in_use_count), (0, 1, 1));
        assert_eq!(
            sb.exec_with_options(&["echo", "one"], deadline())
                .unwrap()
                .stdout,
            b"one\n"
        );
    }
    let s = pool.stats();
    assert_eq!(s.in_use_count, 0);
    // Not reused in place in either mode: destroyed.
    assert_eq!((s.evict_count, s.idle_count, s.destroyed_count), (1, 0, 1));

    // warm(1) boots (Restore: restores) one now; the next acquire is a hit.
    assert_eq!(pool.warm(1).unwrap(), 1);
    assert_eq!(pool.stats().idle_count, 1);
    assert_eq!(pool.warm(1).unwrap(), 0, "never beyond max_size idle");
    {
        let sb = pool.acquire().unwrap();
        let s = pool.stats();
        assert_eq!((s.hit_count, s.miss_count, s.idle_count), (1, 1, 0));
        assert!(sb
            .exec_with_options(&["true"], deadline())
            .unwrap()
            .success());
        sb.ping_timeout(Duration::from_secs(30)).unwrap();
    }
    let s = pool.stats();
    assert_eq!(s.created_count, 2);
    pool.shutdown();
    assert!(matches!(pool.acquire(), Err(SandboxPoolError::ShutDown)));
    let s = pool.stats();
    assert_eq!(s.created_count, s.destroyed_count, "{s:?}");

    // min_size 1: the background thread boots one without any acquire, and refills after a
    // hit while the first is still out.
    let warm = pool_refilling(&format!("{name}-refill"), mode);
    wait_idle(&warm, 1);
    let first = warm.acquire().unwrap();
    assert_eq!(warm.stats().hit_count, 1);
    drop(first);
    wait_idle(&warm, 1);
    let s = warm.stats();
    assert_eq!((s.hit_count, s.miss_count), (1, 0), "{s:?}");
    assert!(s.created_count >= 2, "{s:?}");
}

#[test]
fn stats_count_hits_misses_and_refills() {
    kiln_tests::require_tier4();
    stats_count("pool-stats", ResetMode::Reboot);
}

#[test]
fn stats_count_hits_misses_and_refills_restore_mode() {
    kiln_tests::require_tier4();
    stats_count("pool-stats-r", ResetMode::Restore);
}

/// min_size 1, max_size 1, max_in_use 2 (the refill happens while one is out).
fn pool_refilling(name: &str, mode: ResetMode) -> SandboxPool {
    SandboxPool::with_reset_mode(
        sandbox_common::config(name, 256),
        PoolConfig {
            min_size: 1,
            max_size: 1,
            max_in_use: 2,
            max_idle_duration: None,
            maintenance_interval: Duration::from_millis(200),
            ..PoolConfig::default()
        },
        mode,
    )
    .unwrap()
}

#[test]
fn a_dead_guest_is_never_handed_out_and_pings_fail_fast() {
    kiln_tests::require_tier4();
    let pool = pool("pool-dead", 0, 1, ResetMode::Reboot);
    {
        let a = pool.acquire().unwrap();
        let dead_name = a.name().to_owned();
        let _ = a.exec(&["reboot", "-f"]);
        // The health-check ping gives up on a dead guest quickly, whatever request_timeout is.
        let t = Instant::now();
        let err = a.ping_timeout(Duration::from_secs(2)).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
        assert!(
            err.is_guest_death() || matches!(err, kiln::SandboxError::Timeout { .. }),
            "{err}"
        );
        drop(a);
        let b = pool.acquire().unwrap();
        assert_ne!(b.name(), dead_name, "the dead sandbox was handed out again");
        assert!(b
            .exec_with_options(&["true"], deadline())
            .unwrap()
            .success());
        b.ping_timeout(Duration::from_secs(30)).unwrap();
    }
    let s = pool.stats();
    assert!(s.evict_count >= 1, "{s:?}");
    assert_eq!(s.in_use_count, 0);
}

/// How long after its VM starts every guest of the dying pools below reboots itself.
/// Long enough for two first boots + pristine snapshots side by side under software emulation
/// (22 s in the harness), short enough to keep the test around two minutes.
const GUEST_LIFETIME: Duration = Duration::from_secs(60);

/// A restore-mode pool (min_size 1, max_size 1, one slot) whose guests all end their VM
/// [`GUEST_LIFETIME`] after it started, idle or not: the kernel runs `/bin/sh` as init, which
/// starts a background `sleep; reboot -f` and then `exec`s the agent as PID 1. The timer is
/// part of the pristine snapshot, so a restored sandbox reboots once its guest clock (restored
/// with the snapshot) reaches the same point: `GUEST_LIFETIME` minus the snapshot's age.
fn dying_pool(name: &str, maintenance_interval: Duration) -> SandboxPool {
    let secs = GUEST_LIFETIME.as_secs();
    let sandbox = sandbox_config(name).extra_cmdline(format!(
        "rdinit=/bin/sh -- -c \"(/bin/busybox sleep {secs}; /bin/busybox reboot -f) & \
         exec /init\""
    ));
    let cfg = pool_config(1, 1, maintenance_interval);
    new_pool(name, sandbox, cfg, ResetMode::Restore)
}

/// A guest that dies while its sandbox waits idle in the pool (here: reboots itself) is never
/// handed out. Two pools: in one the background pass (every 200 ms) finds the dead idle
/// sandbox and restores a replacement before anyone asks; in the other the background pass
/// never runs on its own (1 h tick), so the check on the hit finds it and the acquire
/// restores a new one itself. Both then run `true` in what they got.
#[test]
fn an_idle_sandbox_whose_guest_died_is_not_handed_out() {
    kiln_tests::require_tier4();
    let t0 = Instant::now();
    let background = dying_pool("pool-dies-bg", Duration::from_millis(200));
    let on_hit = dying_pool("pool-dies-hit", Duration::from_secs(3600));
    wait_idle(&background, 1);
    wait_idle(&on_hit, 1);
    let booted = t0.elapsed();
    assert!(
        booted < GUEST_LIFETIME,
        "booting and snapshotting the first sandboxes took {booted:?}, longer than the \
         guests live ({GUEST_LIFETIME:?})"
    );
    for pool in [&background, &on_hit] {
        let s = pool.stats();
        assert_eq!(
            (s.dead_count, s.hit_count, s.miss_count),
            (0, 0, 0),
            "{s:?}"
        );
    }

    // Background pass: the dead idle sandbox is evicted and replaced without an acquire.
    let replaced_by = t0 + GUEST_LIFETIME + BOOT_TIMEOUT;
    let mut found_dead_at = None;
    loop {
        let s = background.stats();
        if s.dead_count >= 1 && found_dead_at.is_none() {
            found_dead_at = Some(t0.elapsed());
        }
        if s.dead_count >= 1 && s.idle_count == 1 {
            break;
        }
        assert!(
            Instant::now() < replaced_by,
            "the dead idle sandbox was not replaced by {:?}: {s:?}",
            replaced_by - t0
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "first sandboxes idle after {booted:?}; background pool: idle guest found dead after \
         {found_dead_at:?}, replaced after {:?}",
        t0.elapsed()
    );
    {
        let sb = background.acquire().unwrap();
        assert!(sb.is_running());
        assert!(
            sb.hello().restored,
            "the replacement is restored from the snapshot"
        );
        let r = sb.exec_with_options(&["true"], deadline()).unwrap();
        assert!(r.success(), "{r:?}");
    }
    let s = background.stats();
    assert_eq!((s.hit_count, s.miss_count), (1, 0), "{s:?}");
    assert!(s.dead_count >= 1 && s.evict_count > s.dead_count, "{s:?}");
    background.shutdown();

    // Check on the hit: the first guest has been dead for a while (its timer started before
    // its agent said hello, so before `booted`; it rebooted GUEST_LIFETIME of guest time
    // later — 30 s of slack for a guest clock that lags under emulation) but, with no
    // background pass, the pool has not noticed yet.
    let dead_by = GUEST_LIFETIME + booted + Duration::from_secs(30);
    if let Some(wait) = dead_by.checked_sub(t0.elapsed()) {
        std::thread::sleep(wait);
    }
    let s = on_hit.stats();
    assert_eq!(
        (s.idle_count, s.dead_count, s.evict_count),
        (1, 0, 0),
        "{s:?}"
    );
    {
        let sb = on_hit.acquire().unwrap();
        let s = on_hit.stats();
        assert_eq!(
            (s.hit_count, s.miss_count, s.dead_count, s.evict_count),
            (0, 1, 1, 1),
            "the dead idle sandbox was skipped and a new one restored (a hit with dead_count 0 \
             means the guest had not died yet {:?} after start): {s:?}",
            t0.elapsed()
        );
        assert!(sb.is_running());
        assert!(
            sb.hello().restored,
            "the new one is restored from the snapshot"
        );
        let r = sb.exec_with_options(&["true"], deadline()).unwrap();
        assert!(r.success(), "{r:?}");
    }
    on_hit.shutdown();
    let s = on_hit.stats();
    assert_eq!(s.created_count, s.destroyed_count, "{s:?}");
}
