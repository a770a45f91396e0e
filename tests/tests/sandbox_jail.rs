//! Tier-4: a jailed sandbox (`SandboxConfig::jailed`, kiln-jail; docs/SECURITY.md "The jailed
//! VMM process"). One sandbox, several assertions: it runs `echo`, writes and reads a file
//! and reaches an allowed origin through the egress proxy (all over connections the jailed
//! child bridges to unix sockets), while its VMM process — seen from outside, through
//! /proc/<pid> — runs as the jail's uid with no capabilities, NoNewPrivs, seccomp on its VMM
//! threads, its own namespaces and a root holding only the VM's files. Killing that process
//! is a dead sandbox with a typed error.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod sandbox_common;

#[path = "../../crates/egress/tests/common/mod.rs"]
mod egress_common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use egress_common::World;
use kiln::egress::UpstreamRoots;
use kiln::{ExecOptions, Sandbox, SandboxError};

const UID: u32 = 64_500;

fn field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in {status}"))
        .trim()
}

#[test]
fn jailed_sandbox_runs_commands_files_and_egress_inside_the_jail() {
    kiln_tests::require_tier4();
    let w = World::new();
    let jail = kiln::JailConfig {
        uid: UID,
        gid: UID,
        ..kiln::JailConfig::default()
    };
    let cfg = sandbox_common::config("jailed", 256)
        .jail(jail)
        .egress(w.policy())
        .egress_resolver(Arc::new(World::resolver()))
        .egress_upstream_roots(UpstreamRoots::Pem(w.ca.pem.clone()));
    let sb = Sandbox::create(cfg).unwrap_or_else(|e| panic!("creating the jailed sandbox: {e}"));
    assert!(sb.is_jailed());
    let pid = sb.vmm_pid().expect("a jailed sandbox has a VMM process");
    assert_ne!(pid, std::process::id());

    // exec and files through the bridged agent connection.
    let r = sb.exec(&["echo", "hello from the jail"]).unwrap();
    assert!(r.success(), "{r:?}");
    assert_eq!(r.stdout_str(), "hello from the jail\n");
    sb.write_file("/tmp/jailed.txt", b"written through the jail")
        .unwrap();
    assert_eq!(
        sb.read_file("/tmp/jailed.txt").unwrap(),
        b"written through the jail"
    );

    // Egress: the proxy listener is bridged too.
    let r = sb
        .exec_with_options(
            &[
                "sh",
                "-c",
                &format!("wget -q -O - http://plain.test:{}/hello", w.http),
            ],
            ExecOptions::new().timeout(Duration::from_secs(120)),
        )
        .unwrap();
    assert_eq!(
        (r.status.code, r.stdout_str().as_str()),
        (Some(0), "hello"),
        "{r:?}"
    );
    assert!(!sb.egress_log().is_empty());

    // The VMM process, from outside.
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert_eq!(field(&st, "NoNewPrivs"), "1");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(&st, cap), "0000000000000000", "{cap}");
    }
    assert_eq!(
        field(&st, "Uid").split_whitespace().collect::<Vec<_>>(),
        vec![UID.to_string(); 4]
    );
    let mut seccomp = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let s = std::fs::read_to_string(t.unwrap().path().join("status")).unwrap();
        seccomp.push((
            field(&s, "Name").to_owned(),
            field(&s, "Seccomp").to_owned(),
        ));
    }
    let vmm: Vec<_> = seccomp
        .iter()
        .filter(|(n, _)| n == "jailed-vcpu0" || n == "jailed-dev")
        .collect();
    assert!(
        vmm.len() == 2 && vmm.iter().all(|(_, s)| s == "2"),
        "{seccomp:?}"
    );
    for ns in ["mnt", "pid", "ipc", "uts", "net"] {
        assert_ne!(
            std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap(),
            std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap(),
            "{ns}"
        );
    }
    let root: BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        root,
        ["dev", "initramfs", "kernel"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );

    // A killed VMM process is a dead sandbox.
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let err = sb.ping_timeout(Duration::from_secs(30)).unwrap_err();
    match &err {
        SandboxError::GuestDied { reason, .. } => {
            assert!(reason.contains("jailed VMM process died"), "{err}")
        }
        other => panic!("expected GuestDied, got {other:?}"),
    }
    assert!(!sb.is_running());
}
