//! Tier 1: bad input is reported as such, before the host check and before any VM boots, on
//! any host (no KVM, kvm-pvm or hardware virtualization). Runs the built `kiln` binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

fn kiln(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.args(args).env_remove("KILN_ALLOW_PVM");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run the kiln binary")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts exit code `code`, that stderr names every `needle`, and that it says nothing of
/// the host (the input error is not hidden behind a host check).
fn assert_input_error(o: &Output, code: i32, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
    for host in ["kvm-pvm", "/dev/kvm", "KVM"] {
        assert!(!err.contains(host), "stderr talks about the host: {err}");
    }
}

/// A directory with a stand-in initramfs and an ELF-looking kernel.
fn assets() -> (tempfile::TempDir, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("vmlinux");
    let i = dir.path().join("initramfs.cpio");
    std::fs::write(&k, b"\x7fELF\x02\x01\x01\0").unwrap();
    std::fs::write(&i, b"070701").unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let (k, i) = (s(&k), s(&i));
    (dir, k, i)
}

#[test]
fn a_directory_as_kernel_or_initramfs_is_named_a_directory() {
    let (dir, k, i) = assets();
    let d = dir.path().to_str().unwrap();
    let o = kiln(
        &["run", "--kernel", d, "--initramfs", &i, "--", "true"],
        &[],
    );
    assert_input_error(&o, 2, &["kernel", d, "is a directory"]);
    let o = kiln(
        &["run", "--kernel", &k, "--initramfs", d, "--", "true"],
        &[],
    );
    assert_input_error(&o, 2, &["initramfs", d, "is a directory"]);
    let err = stderr(&o);
    assert!(!err.contains("not found"), "{err}");
}

#[test]
fn an_empty_or_foreign_kernel_is_named_so() {
    let (dir, _k, i) = assets();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    let empty = empty.to_str().unwrap();
    let o = kiln(
        &["run", "--kernel", empty, "--initramfs", &i, "--", "true"],
        &[],
    );
    assert_input_error(&o, 2, &["kernel", empty, "is empty"]);
    assert!(!stderr(&o).contains("fill whole buffer"), "{}", stderr(&o));

    let text = dir.path().join("notes.txt");
    std::fs::write(&text, b"this is not a kernel\n").unwrap();
    let text = text.to_str().unwrap();
    let o = kiln(
        &["run", "--kernel", text, "--initramfs", &i, "--", "true"],
        &[],
    );
    assert_input_error(&o, 2, &["kernel", text, "is not a kernel image"]);

    let (_d2, k, _) = assets();
    let o = kiln(
        &["run", "--kernel", &k, "--initramfs", empty, "--", "true"],
        &[],
    );
    assert_input_error(&o, 2, &["initramfs", empty, "is empty"]);
}

#[test]
fn an_empty_command_is_refused_at_once() {
    // Even the assets are not looked at: nothing boots for a command that cannot run.
    let env = [("KILN_KERNEL", "/nonexistent/vmlinux")];
    for args in [
        &["run", "--", ""][..],
        &["run", "--", "", "x"][..],
        &["restore", "--dir", "/nonexistent", "--", ""][..],
        &["fork", "--dir", "/nonexistent", "-n", "2", "--", ""][..],
        &["snapshot", "--dir", "/nonexistent", "--", ""][..],
    ] {
        let o = kiln(args, &env);
        assert_input_error(&o, 2, &["the command is empty", "\"\""]);
        assert!(
            !stderr(&o).contains("/nonexistent"),
            "{args:?}: {}",
            stderr(&o)
        );
    }
    let o = kiln(&["run", "--json", "--", ""], &env);
    assert_eq!(o.status.code(), Some(2));
    let json = String::from_utf8_lossy(&o.stdout);
    assert!(
        json.contains("\"status\":2") && json.contains("empty"),
        "{json}"
    );
}

#[test]
fn a_missing_snapshot_directory_is_reported_before_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-snapshot");
    let m = missing.to_str().unwrap();
    let o = kiln(&["restore", "--dir", m, "--", "true"], &[]);
    assert_input_error(&o, 2, &[m, "snapshot directory"]);
    let o = kiln(&["fork", "--dir", m, "-n", "2", "--", "true"], &[]);
    assert_input_error(&o, 2, &[m]);
    // A directory that holds no snapshot names the missing file.
    let d = dir.path().to_str().unwrap();
    let o = kiln(&["restore", "--dir", d, "--", "true"], &[]);
    assert_input_error(&o, 2, &["vm.state"]);
}
