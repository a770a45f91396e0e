//! Tier-4: running commands in a real Kiln guest through the `kiln` library API — env, cwd and
//! stdin; exit codes and signals; streaming; timeouts that kill the whole process group; 100 MB
//! of stdout streamed intact; 16 concurrent execs in one VM; guest death mid-command; a guest
//! that panics at boot or spins is reported with a reason, at once or at its deadline.
//!
//! Most tests share one sandbox (booting is the slow part under the harness's software
//! emulation); tests that end their VM boot their own.

mod sandbox_common;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kiln::{ExecEvent, ExecOptions, Sandbox, SandboxError};
use sandbox_common::{sandbox, PatternReader};
use sha2::{Digest, Sha256};

/// The sandbox shared by the non-destructive tests of this file.
fn shared() -> &'static Sandbox {
    static SB: OnceLock<Sandbox> = OnceLock::new();
    SB.get_or_init(|| sandbox("exec-shared", 768, 2))
}

#[test]
fn echo_env_and_cwd() {
    kiln_tests::require_tier4();
    let sb = shared();
    let r = sb
        .exec_with_options(
            &["sh", "-c", "echo \"$GREETING\"; pwd; echo \"$PATH\""],
            ExecOptions::new().env("GREETING", "hello kiln").cwd("/tmp"),
        )
        .unwrap();
    assert!(r.success(), "{r:?}");
    let out = r.stdout_str();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "hello kiln");
    assert_eq!(lines[1], "/tmp");
    assert!(lines[2].contains("/bin"), "default PATH: {}", lines[2]);
    // No variables leak from the host.
    let r = sb
        .exec(&["sh", "-c", "echo \"[$CARGO_PKG_NAME]\""])
        .unwrap();
    assert_eq!(r.stdout_str(), "[]\n");
}

#[test]
fn uname_reports_linux() {
    kiln_tests::require_tier4();
    let r = shared().exec(&["uname", "-a"]).unwrap();
    assert!(r.success(), "{r:?}");
    assert!(r.stdout_str().starts_with("Linux "), "{}", r.stdout_str());
}

#[test]
fn guest_has_no_network_but_loopback_and_the_kernel_features_it_needs() {
    // docs/SECURITY.md: the guest has no NIC (only virtual interfaces: `lo`, the kernel's
    // `sit0` tunnel); the fragment's /proc/sys,
    // /proc/sysrq-trigger, nftables and EROFS are really in the kernel.
    kiln_tests::require_tier4();
    let r = shared()
        .exec(&[
            "sh",
            "-c",
            "for i in /sys/class/net/*; do [ -e $i/device ] && echo nic:${i##*/}; \
             echo if:${i##*/}; done; echo --; cat /proc/sys/kernel/ostype; \
             test -e /proc/sysrq-trigger && echo sysrq; grep -w erofs /proc/filesystems; \
             zcat /proc/config.gz | grep -E '^CONFIG_NFT_REDIR=y'",
        ])
        .unwrap();
    assert!(r.success(), "{r:?}");
    let out = r.stdout_str();
    let (nets, rest) = out.split_once("--\n").unwrap_or((&out, ""));
    // Only virtual interfaces (lo, and the kernel's own sit0 tunnel): none has a device.
    assert!(nets.lines().any(|l| l == "if:lo"), "{out}");
    assert!(!nets.lines().any(|l| l.starts_with("nic:")), "{out}");
    assert!(rest.starts_with("Linux\n"), "{out}");
    assert!(rest.contains("sysrq\n"), "{out}");
    assert!(rest.contains("erofs"), "{out}");
    assert!(rest.contains("CONFIG_NFT_REDIR=y"), "{out}");
}

#[test]
fn every_vcpu_has_the_tsc_deadline_timer() {
    // Kiln announces KVM's TSC-deadline timer, so Linux skips calibrating its LAPIC timer
    // against the PIT (a 100 ms busy-wait at every boot; docs/VMM.md).
    kiln_tests::require_tier4();
    let r = shared()
        .exec(&["grep", "-c", "tsc_deadline_timer", "/proc/cpuinfo"])
        .unwrap();
    assert!(r.success(), "{r:?}");
    assert_eq!(
        r.stdout_str().trim(),
        "2",
        "one line per vCPU of the shared sandbox"
    );
}

#[test]
fn stdin_bytes_and_streamed_reader() {
    kiln_tests::require_tier4();
    let sb = shared();
    let r = sb
        .exec_with_options(
            &["cat"],
            ExecOptions::new().stdin_bytes(b"small input".to_vec()),
        )
        .unwrap();
    assert_eq!(r.stdout, b"small input");

    // 8 MiB through the streamed-stdin path, checked by the guest's own sha256sum.
    const LEN: u64 = 8 << 20;
    let mut h = Sha256::new();
    std::io::copy(&mut PatternReader::new(7, LEN), &mut h).unwrap();
    let want = sandbox_common::hex(&h.finalize());
    let r = sb
        .exec_with_options(
            &["sh", "-c", "sha256sum | cut -d' ' -f1"],
            ExecOptions::new().stdin_reader(PatternReader::new(7, LEN)),
        )
        .unwrap();
    assert!(r.success(), "{r:?}");
    assert_eq!(r.stdout_str().trim(), want);
}

#[test]
fn exit_codes_and_signals() {
    kiln_tests::require_tier4();
    let sb = shared();
    let r = sb.exec(&["sh", "-c", "exit 42"]).unwrap();
    assert_eq!((r.code(), r.signal(), r.shell_code()), (Some(42), None, 42));
    let r = sb.exec(&["sh", "-c", "kill -TERM $$"]).unwrap();
    assert_eq!(
        (r.code(), r.signal(), r.shell_code()),
        (None, Some(15), 143)
    );
    assert!(!r.timed_out());

    // A signal sent through the stream reaches the running command.
    let mut s = sb.stream_exec(&["sleep", "1000"]).unwrap();
    s.kill().unwrap();
    let mut status = None;
    for ev in s.by_ref() {
        if let ExecEvent::Exit(st) = ev.unwrap() {
            status = Some(st);
        }
    }
    let status = status.expect("an exit event");
    assert_eq!(status.signal, Some(9), "{status:?}");
}

#[test]
fn unknown_command_is_127_with_the_guest_message() {
    kiln_tests::require_tier4();
    let r = shared().exec(&["no-such-command-kiln"]).unwrap();
    assert_eq!(r.code(), Some(127), "{r:?}");
    let err = r.stderr_str();
    assert!(err.contains("no-such-command-kiln"), "{err}");
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn bad_cwd_is_an_exec_error_naming_the_program() {
    kiln_tests::require_tier4();
    let e = shared()
        .exec_with_options(&["true"], ExecOptions::new().cwd("/no/such/dir"))
        .unwrap_err();
    assert!(
        matches!(&e, SandboxError::ExecFailed { program, .. } if program == "true"),
        "{e}"
    );
    assert!(e.to_string().contains("exec-shared"), "{e}");
}

#[test]
fn stream_events_arrive_in_order() {
    kiln_tests::require_tier4();
    let s = shared()
        .stream_exec(&[
            "sh",
            "-c",
            "echo one; sleep 1; echo two >&2; sleep 1; echo three",
        ])
        .unwrap();
    let mut seen = Vec::new();
    for ev in s {
        match ev.unwrap() {
            ExecEvent::Started { pid } => {
                assert!(pid > 1);
                seen.push("started".to_string());
            }
            ExecEvent::Stdout(d) => seen.push(format!("out:{}", String::from_utf8_lossy(&d))),
            ExecEvent::Stderr(d) => seen.push(format!("err:{}", String::from_utf8_lossy(&d))),
            ExecEvent::Exit(st) => {
                assert!(st.success(), "{st:?}");
                seen.push("exit".into());
            }
        }
    }
    assert_eq!(
        seen,
        ["started", "out:one\n", "err:two\n", "out:three\n", "exit"]
    );
}

#[test]
fn timeout_kills_sleep_and_its_children() {
    kiln_tests::require_tier4();
    let sb = shared();
    let started = Instant::now();
    let mut s = sb
        .stream_exec_with_options(
            &[
                "sh",
                "-c",
                "sleep 1000 & echo $!; sleep 1000 & echo $!; sleep 1000",
            ],
            ExecOptions::new().timeout(Duration::from_secs(3)),
        )
        .unwrap();
    let mut pids = Vec::new();
    let mut out = Vec::new();
    let mut status = None;
    while let Some(ev) = s.next_event().unwrap() {
        match ev {
            ExecEvent::Started { pid } => pids.push(pid),
            ExecEvent::Stdout(d) => out.extend_from_slice(&d),
            ExecEvent::Stderr(_) => {}
            ExecEvent::Exit(st) => status = Some(st),
        }
    }
    let status = status.expect("an exit event");
    assert!(status.timed_out, "{status:?}");
    assert_eq!(status.signal, Some(9), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(120));
    for line in String::from_utf8_lossy(&out).lines() {
        pids.push(line.trim().parse().expect("a child pid"));
    }
    assert_eq!(pids.len(), 3, "shell + two background sleeps: {pids:?}");
    // Every process of the group is gone (killed and reaped by the agent).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let script: String = pids
            .iter()
            .map(|p| format!("[ -e /proc/{p} ] && echo {p}; "))
            .collect::<String>()
            + "true";
        let alive = sb.exec(&["sh", "-c", &script]).unwrap().stdout_str();
        if alive.trim().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "processes still alive after the timeout: {alive}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn hundred_mb_of_stdout_streamed_intact() {
    kiln_tests::require_tier4();
    let sb = shared();
    // A 1,000,000-byte pseudo-random block, printed 100 times: every byte of the stream is
    // checked against its expected position, so loss, duplication or reordering is caught.
    const BLOCK: usize = 1_000_000;
    const COUNT: usize = 100;
    let mut block = vec![0u8; BLOCK];
    std::io::Read::read_exact(&mut PatternReader::new(42, BLOCK as u64), &mut block).unwrap();
    sb.write_file("/tmp/block.bin", &block).unwrap();
    let s = sb
        .stream_exec_with_options(
            &[
                "sh",
                "-c",
                &format!("i=0; while [ $i -lt {COUNT} ]; do cat /tmp/block.bin; i=$((i+1)); done"),
            ],
            ExecOptions::new().output_cap(None),
        )
        .unwrap();
    let mut pos = 0usize;
    let mut mismatch = None;
    let status = s
        .forward(
            &mut |d| {
                for (i, b) in d.iter().enumerate() {
                    if mismatch.is_none() && *b != block[(pos + i) % BLOCK] {
                        mismatch = Some(pos + i);
                    }
                }
                pos += d.len();
                Ok(())
            },
            &mut |_| Ok(()),
        )
        .unwrap();
    assert!(status.success() && !status.truncated, "{status:?}");
    assert_eq!(mismatch, None, "first wrong byte");
    assert_eq!(pos, BLOCK * COUNT);
    sb.remove_file("/tmp/block.bin").unwrap();
}

#[test]
fn output_cap_truncates_and_says_so() {
    kiln_tests::require_tier4();
    let r = shared()
        .exec_with_options(
            &["sh", "-c", "head -c 100000 /dev/zero"],
            ExecOptions::new().output_cap(Some(1000)),
        )
        .unwrap();
    assert!(r.truncated(), "{:?}", r.status);
    assert!(r.stdout.len() <= 1000, "{}", r.stdout.len());
    assert!(r.success());
}

#[test]
fn sixteen_concurrent_execs_in_one_vm() {
    kiln_tests::require_tier4();
    let sb = shared();
    let results: Vec<(usize, Result<kiln::ExecResult, SandboxError>)> =
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..16)
                .map(|i| {
                    scope.spawn(move || {
                        (
                            i,
                            sb.exec_with_options(
                                &["sh", "-c", "echo start-$ID; sleep 2; echo end-$ID"],
                                ExecOptions::new().env("ID", i.to_string()),
                            ),
                        )
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("exec thread"))
                .collect()
        });
    for (i, r) in results {
        let r = r.unwrap_or_else(|e| panic!("exec {i}: {e}"));
        assert!(r.success(), "exec {i}: {r:?}");
        assert_eq!(r.stdout_str(), format!("start-{i}\nend-{i}\n"));
    }
    sb.ping().unwrap();
}

#[test]
fn guest_death_mid_command_is_reported_with_the_serial_tail() {
    kiln_tests::require_tier4();
    let sb = sandbox("exec-dies", 256, 1);
    std::thread::scope(|scope| {
        let long = scope.spawn(|| sb.exec(&["sleep", "1000"]));
        // Give the long command time to start, then end the guest under it.
        std::thread::sleep(Duration::from_secs(2));
        let _ = sb.exec(&["reboot", "-f"]);
        let err = long
            .join()
            .expect("exec thread")
            .expect_err("the guest died under the command");
        assert!(err.is_guest_death(), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("exec-dies"), "{msg}");
        assert!(msg.contains("during exec"), "{msg}");
    });
    let err = sb.ping().unwrap_err();
    assert!(err.is_guest_death(), "{err}");
}

#[test]
fn shutdown_ends_the_vm() {
    kiln_tests::require_tier4();
    let sb = sandbox("exec-shutdown", 256, 1);
    sb.ping().unwrap();
    sb.shutdown().unwrap();
}

#[test]
fn a_guest_that_panics_at_boot_is_reported_with_the_panic_text() {
    // No init to run: the guest kernel panics, `panic=-1` reboots it and the VM ends. The
    // error must come at once (not at the boot deadline), say the guest died during boot and
    // quote the console's panic line.
    kiln_tests::require_tier4();
    let t0 = Instant::now();
    let err = Sandbox::create(
        kiln::SandboxConfig::new()
            .name("exec-panics")
            .memory_mib(256)
            .extra_cmdline("rdinit=/nonexistent")
            .boot_timeout(sandbox_common::BOOT_TIMEOUT),
    )
    .expect_err("a guest without an init cannot boot");
    let took = t0.elapsed();
    let msg = err.to_string();
    assert!(err.is_guest_death(), "{msg}");
    assert!(msg.contains("exec-panics"), "{msg}");
    assert!(
        msg.contains("Kernel panic"),
        "the serial tail is quoted: {msg}"
    );
    assert!(
        took < sandbox_common::BOOT_TIMEOUT,
        "reported after {took:?}, not at the deadline"
    );
}

#[test]
fn a_guest_that_spins_is_reported_at_its_boot_deadline() {
    // The init spins forever and no agent ever connects: creating the sandbox fails with a
    // boot timeout naming the deadline, not later, and the VM is stopped.
    kiln_tests::require_tier4();
    let deadline = Duration::from_secs(40);
    let t0 = Instant::now();
    let err = Sandbox::create(
        kiln::SandboxConfig::new()
            .name("exec-spins")
            .memory_mib(256)
            .extra_cmdline("rdinit=/bin/sh -- -c \"while :; do :; done\"")
            .boot_timeout(deadline),
    )
    .expect_err("no agent ever connects");
    let took = t0.elapsed();
    assert!(
        matches!(err, SandboxError::BootTimeout { .. }),
        "expected a boot timeout: {err}"
    );
    assert!(err.to_string().contains("exec-spins"), "{err}");
    assert!(took >= deadline, "gave up early: {took:?}");
    assert!(
        took < deadline + Duration::from_secs(30),
        "the VM was not stopped promptly at its deadline: {took:?}"
    );
}
