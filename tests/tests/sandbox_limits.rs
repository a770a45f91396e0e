//! Tier-4: guest-side limits and users through the `kiln` library — a command as user 1000
//! (named through an /etc/passwd written first, and as `UID:GID`); a memory hog past its
//! `memory_max` is OOM-killed (`oom_killed`) and the sandbox carries on; a fork bomb stops at
//! its `pids_max` (`pids_limit_hit`) while the sandbox keeps answering pings. The agent
//! protects itself (oom_score_adj -1000) and removes each exec's cgroup.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

mod sandbox_common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln::{ExecOptions, Sandbox};
use kiln_proto::ErrorKind;
use sandbox_common::sandbox;

const MIB: u64 = 1024 * 1024;
/// A ping during a storm must come back within this (software emulation, shared host).
const PING_DEADLINE: Duration = Duration::from_secs(10);

/// `sh -c script`, expecting success; returns stdout.
fn run(sb: &Sandbox, script: &str, opts: ExecOptions) -> String {
    let r = sb.exec_with_options(&["sh", "-c", script], opts).unwrap();
    assert!(r.success(), "{script}: {r:?}");
    r.stdout_str()
}

/// The exec cgroups left in the guest, apart from the one of the exec that lists them.
fn lingering_cgroups(sb: &Sandbox) -> Vec<String> {
    let own = run(
        sb,
        "cat /proc/self/cgroup; ls /sys/fs/cgroup/kiln-exec",
        ExecOptions::new(),
    );
    let mut lines = own.lines();
    let me = lines
        .next()
        .and_then(|l| l.rsplit('/').next())
        .unwrap_or_default()
        .to_owned();
    lines
        .filter(|l| l.starts_with("exec-") && *l != me)
        .map(str::to_owned)
        .collect()
}

#[test]
fn commands_run_as_a_named_or_numeric_user() {
    kiln_tests::require_tier4();
    let sb = sandbox("limits-user", 256, 1);
    // The initramfs has no users: give it one.
    sb.write_file(
        "/etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nkiln:x:1000:1000:Kiln:/home/kiln:/bin/sh\n",
    )
    .unwrap();
    sb.write_file("/etc/group", b"root:x:0:\nkiln:x:1000:\nstaff:x:50:kiln\n")
        .unwrap();
    run(&sb, "mkdir -p /home/kiln", ExecOptions::new());
    let out = run(
        &sb,
        r#"id -u; id -g; echo "$HOME|$USER|$LOGNAME"; id -G"#,
        ExecOptions::new().user("kiln"),
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[..3],
        ["1000", "1000", "/home/kiln|kiln|kiln"],
        "{out}"
    );
    let mut groups: Vec<&str> = lines[3].split_whitespace().collect();
    groups.sort_unstable();
    groups.dedup();
    assert_eq!(
        groups,
        ["1000", "50"],
        "primary and supplementary groups: {out}"
    );
    let out = run(&sb, "id -u; id -g", ExecOptions::new().user("1000:1000"));
    assert_eq!(out, "1000\n1000\n");
    // As that user, root's files are out of reach.
    let r = sb
        .exec_with_options(
            &["sh", "-c", "echo x > /root/owned"],
            ExecOptions::new().user("1000"),
        )
        .unwrap();
    assert!(!r.success(), "{r:?}");
    // An unknown user is refused, by name.
    let e = sb
        .exec_with_options(&["true"], ExecOptions::new().user("nosuchuser"))
        .expect_err("an unknown user must be refused");
    assert_eq!(e.guest_kind(), Some(ErrorKind::NotFound), "{e}");
    assert!(e.to_string().contains("nosuchuser"), "{e}");
}

#[test]
fn a_memory_hog_is_oom_killed_and_the_sandbox_carries_on() {
    kiln_tests::require_tier4();
    let sb = sandbox("limits-oom", 256, 1);
    // The agent protects itself; its commands do not inherit that.
    let out = run(
        &sb,
        "cat /proc/1/oom_score_adj /proc/self/oom_score_adj; cat /sys/fs/cgroup/kiln-exec/memory.max",
        ExecOptions::new(),
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..2], ["-1000", "0"], "{out}");
    let parent_max: u64 = lines[2].parse().unwrap();
    assert!(
        parent_max < 256 * MIB && parent_max > 128 * MIB,
        "the execs' memory.max keeps a reserve for the agent: {out}"
    );

    // awk doubles a string until it cannot: past 32 MiB the cgroup's OOM killer ends it.
    let hog = ["awk", "BEGIN { s = \"x\"; while (1) s = s s }"];
    let t = Instant::now();
    let r = sb
        .exec_with_options(
            &hog,
            ExecOptions::new()
                .memory_max(32 * MIB)
                .timeout(Duration::from_secs(120)),
        )
        .unwrap();
    assert!(r.status.oom_killed, "{r:?}");
    assert_eq!(r.signal(), Some(9), "{r:?}");
    assert!(!r.timed_out() && !r.status.pids_limit_hit, "{r:?}");
    eprintln!("32 MiB hog OOM-killed after {:?}", t.elapsed());
    sb.ping_timeout(PING_DEADLINE).unwrap();

    // Without a limit of its own, the sandbox default (guest RAM minus the agent's reserve)
    // still stops it: the agent survives a hog as large as the guest.
    let r = sb
        .exec_with_options(&hog, ExecOptions::new().timeout(Duration::from_secs(120)))
        .unwrap();
    assert!(r.status.oom_killed, "{r:?}");
    sb.ping_timeout(PING_DEADLINE).unwrap();
    assert_eq!(run(&sb, "echo alive", ExecOptions::new()), "alive\n");
    // An ordinary command reports no OOM, and no exec cgroup is left behind.
    let r = sb.exec(&["true"]).unwrap();
    assert!(!r.status.oom_killed && !r.status.pids_limit_hit, "{r:?}");
    assert_eq!(lingering_cgroups(&sb), Vec::<String>::new());
}

#[test]
fn a_fork_bomb_hits_pids_max_while_pings_keep_answering() {
    kiln_tests::require_tier4();
    let sb = Arc::new(sandbox("limits-pids", 256, 1));
    let done = Arc::new(AtomicBool::new(false));
    let pinger = {
        let (sb, done) = (Arc::clone(&sb), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut worst = Duration::ZERO;
            let mut n = 0u32;
            while !done.load(Ordering::Acquire) {
                let t = Instant::now();
                if let Err(e) = sb.ping_timeout(PING_DEADLINE) {
                    return Err(format!("ping {n} failed during the fork bomb: {e}"));
                }
                worst = worst.max(t.elapsed());
                n += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            Ok((n, worst))
        })
    };
    let bomb = ["sh", "-c", "f() { f | f & }; f; sleep 60"];
    let r = sb
        .exec_with_options(
            &bomb,
            ExecOptions::new()
                .pids_max(64)
                .timeout(Duration::from_secs(15)),
        )
        .unwrap();
    done.store(true, Ordering::Release);
    let (pings, worst) = pinger.join().unwrap().unwrap();
    eprintln!("fork bomb: {pings} pings answered, worst {worst:?}; {r:?}");
    assert!(r.status.pids_limit_hit, "{r:?}");
    assert!(!r.status.oom_killed, "{r:?}");
    assert!(r.timed_out(), "the bomb runs until its timeout: {r:?}");
    assert!(pings > 0);
    // The whole bomb is gone (the timeout kills the cgroup, not only the process group).
    sb.ping_timeout(PING_DEADLINE).unwrap();
    assert_eq!(lingering_cgroups(&sb), Vec::<String>::new());
    let r = sb
        .exec(&["cat", "/sys/fs/cgroup/kiln-exec/pids.current"])
        .unwrap();
    assert_eq!(
        r.stdout_str().trim(),
        "1",
        "only the exec reading pids.current is left: {r:?}"
    );
}
