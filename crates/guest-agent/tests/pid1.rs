//! Tier-3: kiln-agent's PID 1 duties, run as PID 1 of fresh pid/mount/uts/net namespaces
//! (`unshare`, needs root) and driven over a unix socket: pseudo filesystems, hostname,
//! loopback, orphan reaping as the real init of the namespace.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

mod common;

use std::process::Command;
use std::time::Duration;

use common::Agent;
use kiln_proto::ExecRequest;

fn start_pid1() -> Agent {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the PID 1 test needs root (to create namespaces and mount); run the tests as root"
    );
    // Under /tmp on purpose: the agent mounts a fresh tmpfs there, and must bind its socket
    // before that so that it stays reachable from outside its mount namespace (a checkout
    // under /tmp puts CARGO_TARGET_TMPDIR there too).
    let dir = tempfile::tempdir_in("/tmp").expect("tempdir");
    let sock = dir.path().join("pid1.sock");
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--pid", "--fork", "--uts", "--net"])
        .args(["--propagation", "private", "--kill-child"])
        .arg(env!("CARGO_BIN_EXE_kiln-agent"))
        .arg("--pid1-setup")
        .arg("--listen-unix")
        .arg(&sock);
    Agent::spawn(cmd, dir, sock)
}

fn run(c: &kiln_proto::Client, script: &str) -> String {
    let out = c.exec(ExecRequest::new(["sh", "-c", script])).unwrap();
    assert_eq!(
        out.status.code,
        Some(0),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn pid1_mounts_hostname_loopback_and_reaping() {
    let agent = start_pid1();
    let c = agent.client();
    assert_eq!(run(&c, "cat /proc/1/comm").trim(), "kiln-agent");
    assert_eq!(run(&c, "hostname").trim(), "kiln");

    let mounts = run(&c, "cat /proc/self/mounts");
    let missing = kiln_testkit::guest::missing_pid1_mounts(&mounts);
    assert!(missing.is_empty(), "not mounted: {missing:?}\n{mounts}");
    // /dev/shm and /tmp are world-writable with the sticky bit.
    assert_eq!(run(&c, "stat -c %a /dev/shm /tmp"), "1777\n1777\n");

    let flags = run(&c, "cat /sys/class/net/lo/flags");
    let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
    assert!(flags & 1 != 0, "lo is not up (flags {flags:#x})");

    // Orphans re-parented to PID 1 are reaped: no zombies remain.
    run(&c, "for i in 1 2 3 4 5; do (sleep 0.1 &) ; done");
    std::thread::sleep(Duration::from_millis(600));
    let states = run(&c, "cat /proc/[0-9]*/stat 2>/dev/null || true");
    let zombies: Vec<&str> = states
        .lines()
        .filter(|l| {
            l.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                == Some("Z")
        })
        .collect();
    assert!(zombies.is_empty(), "zombies left: {zombies:?}");

    // The exec engine still works as PID 1: statuses are not stolen by the orphan reaping.
    for code in [0, 3, 77] {
        let out = c
            .exec(ExecRequest::new(["sh", "-c", &format!("exit {code}")]))
            .unwrap();
        assert_eq!(out.status.code, Some(code));
    }
}
