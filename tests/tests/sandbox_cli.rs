//! Tier-4: the `kiln` CLI end to end — `kiln run -- uname -a`, env/cwd/stdin, exit codes
//! and signals, `--json`, `-v`, and the distinct exit codes of its own failures (unknown
//! command, timeout, guest death, missing assets, invalid flags). Spawns the built
//! `target/<profile>/kiln`.

mod sandbox_common;

use std::time::Duration;

use sandbox_common::{describe, run_kiln, run_kiln_with};

/// Flags every booting test passes: generous deadlines for software emulation.
const BOOT: &[&str] = &["run", "--boot-timeout", "180"];

fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v: Vec<&str> = BOOT.to_vec();
    v.extend_from_slice(extra);
    v
}

#[test]
fn kiln_run_uname_a() {
    kiln_tests::require_tier4();
    let o = run_kiln(&args(&["-v", "--", "uname", "-a"]), &[], None);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.starts_with("Linux "), "{}", describe(&o));
    // -v: one timing line on stderr.
    let err = String::from_utf8_lossy(&o.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("kiln: "))
        .unwrap_or_else(|| panic!("no summary line: {}", describe(&o)));
    for part in ["boot ", "exec ", "total ", "exit 0"] {
        assert!(line.contains(part), "{line}");
    }
}

#[test]
fn kiln_run_env_cwd_and_stdin() {
    kiln_tests::require_tier4();
    let o = run_kiln(
        &args(&[
            "--env",
            "A=hello",
            "-e",
            "B=x=y",
            "--cwd",
            "/tmp",
            "--stdin",
            "-",
            "--",
            "sh",
            "-c",
            "echo \"$A $B\"; pwd; cat",
        ]),
        &[],
        Some(b"from the host's stdin\n"),
    );
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "hello x=y\n/tmp\nfrom the host's stdin\n",
        "{}",
        describe(&o)
    );
}

#[test]
fn kiln_run_waits_for_a_reader_that_pauses() {
    // `kiln run ... | less` left alone: nothing reads kiln's stdout for longer than boot +
    // filling the client's 16 MiB buffer + its default 30 s consumer deadline, while the
    // command writes more than the buffer holds. The guest must be throttled, not the command
    // failed, and every byte must arrive once the reader resumes.
    kiln_tests::require_tier4();
    const LEN: usize = 24_000_000;
    let o = run_kiln_with(
        &args(&["--", "head", "-c", "24000000", "/dev/zero"]),
        &[],
        None,
        Some(Duration::from_secs(80)),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "stderr: {err}");
    assert_eq!(o.stdout.len(), LEN, "stderr: {err}");
    assert!(o.stdout.iter().all(|&b| b == 0), "the bytes were changed");
}

#[test]
fn kiln_run_stdin_from_a_file() {
    kiln_tests::require_tier4();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("in.txt");
    std::fs::write(&f, "line 1\nline 2\n").unwrap();
    let path = f.to_str().unwrap();
    let o = run_kiln(&args(&["--stdin", path, "--", "wc", "-l"]), &[], None);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "2");
}

#[test]
fn kiln_run_exit_codes_and_signals() {
    kiln_tests::require_tier4();
    let o = run_kiln(
        &args(&["--", "sh", "-c", "echo out; echo err >&2; exit 7"]),
        &[],
        None,
    );
    assert_eq!(o.status.code(), Some(7), "{}", describe(&o));
    assert_eq!(o.stdout, b"out\n");
    assert!(String::from_utf8_lossy(&o.stderr).contains("err\n"));
    let o = run_kiln(&args(&["--", "sh", "-c", "kill -KILL $$"]), &[], None);
    assert_eq!(o.status.code(), Some(137), "{}", describe(&o));
}

#[test]
fn kiln_run_unknown_command_is_127_with_the_guest_text() {
    kiln_tests::require_tier4();
    let o = run_kiln(&args(&["--", "no-such-command-kiln"]), &[], None);
    assert_eq!(o.status.code(), Some(127), "{}", describe(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no-such-command-kiln") && err.contains("not found"),
        "{}",
        describe(&o)
    );
}

#[test]
fn kiln_run_timeout_is_124() {
    kiln_tests::require_tier4();
    let o = run_kiln(&args(&["--timeout", "2", "--", "sleep", "1000"]), &[], None);
    assert_eq!(o.status.code(), Some(124), "{}", describe(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("timed out"),
        "{}",
        describe(&o)
    );
}

#[test]
fn kiln_run_json_result() {
    kiln_tests::require_tier4();
    let o = run_kiln(
        &args(&[
            "--json",
            "--",
            "sh",
            "-c",
            "printf 'a\"b'; echo e >&2; exit 3",
        ]),
        &[],
        None,
    );
    assert_eq!(o.status.code(), Some(3), "{}", describe(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out.trim();
    assert!(line.starts_with('{') && line.ends_with('}'), "{line}");
    for field in [
        "\"exit_code\":3",
        "\"signal\":null",
        "\"timed_out\":false",
        "\"truncated\":false",
        "\"status\":3",
        "\"stdout\":\"a\\\"b\"",
        "\"stderr\":\"e\\n\"",
        "\"boot_ms\":",
        "\"exec_ms\":",
        "\"total_ms\":",
    ] {
        assert!(line.contains(field), "{field} missing in {line}");
    }
}

#[test]
fn kiln_run_guest_death_is_123() {
    kiln_tests::require_tier4();
    let o = run_kiln(&args(&["--", "reboot", "-f"]), &[], None);
    assert_eq!(o.status.code(), Some(123), "{}", describe(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("guest died"),
        "{}",
        describe(&o)
    );
}

#[test]
fn kiln_run_missing_assets_is_121_and_names_the_xtask_command() {
    kiln_tests::require_tier4();
    let o = run_kiln(
        &args(&["--", "true"]),
        &[("KILN_KERNEL", "/nonexistent/vmlinux")],
        None,
    );
    assert_eq!(o.status.code(), Some(121), "{}", describe(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("/nonexistent/vmlinux") && err.contains("cargo xtask kernel"),
        "{}",
        describe(&o)
    );
    let o = run_kiln(
        &args(&["--", "true"]),
        &[("KILN_INITRAMFS", "/nonexistent/initramfs.cpio")],
        None,
    );
    assert_eq!(o.status.code(), Some(121), "{}", describe(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cargo xtask build-guest"));
}

#[test]
fn kiln_invalid_flags_are_2() {
    kiln_tests::require_tier4();
    for bad in [
        vec!["run", "--vcpus", "many", "--", "true"],
        vec!["run", "--env", "NOEQUALS", "--", "true"],
        vec!["run"],
        vec!["no-such-subcommand"],
    ] {
        let o = run_kiln(&bad, &[], None);
        assert_eq!(o.status.code(), Some(2), "{bad:?}: {}", describe(&o));
    }
    // Out-of-range values are caught before booting, with the field named.
    let o = run_kiln(&["run", "--vcpus", "0", "--", "true"], &[], None);
    assert_eq!(o.status.code(), Some(2), "{}", describe(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("vcpus"));
}

#[test]
fn kiln_doctor_reports_a_ready_host() {
    kiln_tests::require_tier4();
    let o = run_kiln(&["doctor"], &[], None);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("hardware virtualization"), "{out}");
    assert!(out.contains("/dev/kvm"), "{out}");
    assert!(out.contains("ready"), "{out}");
    // A missing asset makes it exit 121 with the build command.
    let o = run_kiln(
        &["doctor"],
        &[("KILN_INITRAMFS", "/nonexistent/i.cpio")],
        None,
    );
    assert_eq!(o.status.code(), Some(121), "{}", describe(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("cargo xtask build-guest"));
}

#[test]
fn kiln_run_forwards_ctrl_c_to_the_command() {
    kiln_tests::require_tier4();
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    let mut child = Command::new(sandbox_common::kiln_bin())
        .args(args(&[
            "--",
            "sh",
            "-c",
            "trap 'echo got-int; exit 3' INT; echo ready; while true; do sleep 1; done",
        ]))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + sandbox_common::CLI_TIMEOUT;
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l == "ready" => break,
            Ok(l) => lines.push(l),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("no `ready` from the command; stdout so far: {lines:?}");
            }
        }
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // kiln keeps running until the command handled the signal, then exits with its status.
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kiln did not exit after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // kiln has exited: the reader ends at end of file.
    let rest: Vec<String> = rx.iter().collect();
    assert_eq!(status.code(), Some(3), "stdout after ready: {rest:?}");
    assert!(rest.iter().any(|l| l == "got-int"), "{rest:?}");
}

#[test]
fn kiln_run_yes_into_a_closed_pipe_ends_with_141() {
    // `kiln run -- yes | head -c 10`: once the reader is gone, kiln's write fails with
    // EPIPE; the command must get SIGPIPE (or be killed after a short grace) and kiln must
    // exit within seconds with 128 + SIGPIPE, like a shell pipeline's writer.
    kiln_tests::require_tier4();
    use std::io::Read;
    use std::process::{Command, Stdio};
    use std::time::Instant;

    let mut child = Command::new(sandbox_common::kiln_bin())
        .args(args(&["--", "yes"]))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 10];
    // Boot plus the first output: the same deadline as every CLI run.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = out.read_exact(&mut first).map(|()| first);
        // `out` is dropped here: the reader closes after 10 bytes.
        let _ = tx.send(r);
    });
    let first = match rx.recv_timeout(sandbox_common::CLI_TIMEOUT) {
        Ok(Ok(b)) => b,
        other => {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!("no 10 bytes from `yes` ({other:?}): {}", describe(&o));
        }
    };
    assert_eq!(&first, b"y\ny\ny\ny\ny\n");
    let closed = Instant::now();
    let deadline = closed + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!(
                "kiln still ran 20 s after its stdout closed: {}",
                describe(&o)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert_eq!(status.code(), Some(141), "stderr: {err}");
    assert!(
        closed.elapsed() < Duration::from_secs(10),
        "kiln took {:?} to end after its stdout closed; stderr: {err}",
        closed.elapsed()
    );
}
