//! Tier-4 fault drills: a hostile or broken guest (the victim) next to a healthy sandbox (the
//! bystander). In every drill the host stays responsive, the bystander answers pings within
//! [`PING_DEADLINE`] throughout, the victim's result or error names what happened, and no
//! host thread or fd is left once the victim is gone (`/proc/self/fd`, `/proc/self/task`).
//!
//! Storms the sandbox survives (fork bomb, memory hog beyond guest RAM, a 1 GB output flood,
//! an infinite loop) share one victim; the drills that end the guest (kernel panic, the agent
//! crashed) boot their own. A guest program writing garbage to the host's vsock ports runs
//! Python from the `python` image (`kiln image build python`), mounted read-only in the guest:
//! the initramfs has no tool that opens AF_VSOCK.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

mod sandbox_common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln::{ExecOptions, Sandbox};
use sandbox_common::sandbox;

/// The bystander's ping deadline (software emulation, shared host: generous, but bounded).
const PING_DEADLINE: Duration = Duration::from_secs(10);
/// How long host threads and fds may take to go after the victim is dropped.
const SETTLE: Duration = Duration::from_secs(15);

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// A bystander sandbox pinged every 200 ms by its own thread.
struct Bystander {
    sb: Arc<Sandbox>,
    stop: Arc<AtomicBool>,
    pinger: Option<JoinHandle<Result<(u32, Duration), String>>>,
    fds: usize,
    threads: usize,
}

impl Bystander {
    fn start(name: &str) -> Self {
        let sb = Arc::new(sandbox(name, 192, 1));
        sb.ping_timeout(PING_DEADLINE).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let pinger = {
            let (sb, stop) = (Arc::clone(&sb), Arc::clone(&stop));
            std::thread::spawn(move || {
                let (mut n, mut worst) = (0u32, Duration::ZERO);
                while !stop.load(Ordering::Acquire) {
                    let t = Instant::now();
                    sb.ping_timeout(PING_DEADLINE)
                        .map_err(|e| format!("bystander ping {n} failed: {e}"))?;
                    worst = worst.max(t.elapsed());
                    n += 1;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Ok((n, worst))
            })
        };
        // Counted with the bystander and its pinger running: what the victim adds must go.
        Self {
            sb,
            stop,
            pinger: Some(pinger),
            fds: fds(),
            threads: threads(),
        }
    }

    /// Stop pinging; fail if a ping failed or a host fd/thread of the victim stayed.
    fn finish(mut self, drill: &str) {
        self.stop.store(true, Ordering::Release);
        let (pings, worst) = self
            .pinger
            .take()
            .unwrap()
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("{drill}: {e}"));
        eprintln!("{drill}: bystander answered {pings} pings, worst {worst:?}");
        assert!(pings > 0, "{drill}: the bystander was never pinged");
        let t = Instant::now();
        while (fds() > self.fds || threads() > self.threads) && t.elapsed() < SETTLE {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            fds() <= self.fds && threads() <= self.threads,
            "{drill}: host fds {} -> {}, threads {} -> {} after the victim went",
            self.fds,
            fds(),
            self.threads,
            threads()
        );
        self.sb.ping_timeout(PING_DEADLINE).unwrap();
    }
}

#[test]
fn drill_storms_kill_the_command_not_the_sandbox_or_its_neighbour() {
    kiln_tests::require_tier4();
    let by = Bystander::start("drill-bystander-storms");
    {
        let victim = sandbox("drill-victim-storms", 256, 1);

        // A fork bomb with the default pids.max: the exec's cgroup stops it (pids.max, or
        // memory.max when the processes' memory runs out first); the timeout ends it.
        let t = Instant::now();
        let r = victim
            .exec_with_options(
                &["sh", "-c", "f() { f | f & }; f; sleep 600"],
                ExecOptions::new().timeout(Duration::from_secs(20)),
            )
            .unwrap();
        eprintln!("fork bomb: {r:?} after {:?}", t.elapsed());
        assert!(
            r.status.pids_limit_hit || r.status.oom_killed,
            "the fork bomb hit a limit: {r:?}"
        );
        victim.ping_timeout(PING_DEADLINE).unwrap();

        // A memory hog beyond guest RAM: OOM-killed inside its cgroup, the agent lives.
        let t = Instant::now();
        let r = victim
            .exec_with_options(
                &["awk", "BEGIN { s = \"x\"; while (1) s = s s }"],
                ExecOptions::new().timeout(Duration::from_secs(120)),
            )
            .unwrap();
        eprintln!("memory hog: {r:?} after {:?}", t.elapsed());
        assert!(r.status.oom_killed, "{r:?}");
        victim.ping_timeout(PING_DEADLINE).unwrap();

        // 1 GB of output: collected results keep the output cap, the rest is drained in the
        // guest; host memory stays bounded.
        let t = Instant::now();
        let r = victim
            .exec_with_options(
                &["sh", "-c", "head -c 1000000000 /dev/zero"],
                ExecOptions::new().timeout(Duration::from_secs(240)),
            )
            .unwrap();
        eprintln!(
            "1 GB flood: {} bytes kept, truncated {}, after {:?}",
            r.stdout.len(),
            r.truncated(),
            t.elapsed()
        );
        assert!(r.success(), "{:?}", r.status);
        assert!(r.truncated());
        assert_eq!(r.stdout.len() as u64, kiln::exec::DEFAULT_OUTPUT_CAP);
        drop(r);

        // An infinite loop: killed at its timeout, the sandbox answers meanwhile.
        let r = victim
            .exec_with_options(
                &["sh", "-c", "while :; do :; done"],
                ExecOptions::new().timeout(Duration::from_secs(5)),
            )
            .unwrap();
        assert!(r.timed_out(), "{r:?}");
        victim.ping_timeout(PING_DEADLINE).unwrap();
        assert_eq!(victim.exec(&["echo", "ok"]).unwrap().stdout, b"ok\n");
    }
    by.finish("storms");
}

#[test]
fn drill_guest_kernel_panic_is_reported_and_contained() {
    kiln_tests::require_tier4();
    let by = Bystander::start("drill-bystander-panic");
    {
        let victim = sandbox("drill-victim-panic", 192, 1);
        let err = victim
            .exec(&["sh", "-c", "echo c > /proc/sysrq-trigger; sleep 60"])
            .expect_err("the guest kernel panicked under the command");
        assert!(err.is_guest_death(), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("drill-victim-panic"), "{msg}");
        assert!(msg.contains("sysrq triggered crash"), "{msg}");
        assert!(victim.ping().unwrap_err().is_guest_death());
    }
    by.finish("kernel panic");
}

#[test]
fn drill_agent_crash_is_reported_and_contained() {
    kiln_tests::require_tier4();
    let by = Bystander::start("drill-bystander-agent");
    {
        let victim = sandbox("drill-victim-agent", 192, 1);
        // PID 1 ignores signals it has no handler for, even SIGKILL, so "killing the agent"
        // means crashing it: overwrite its code with int3 through /proc/1/mem (root in the
        // guest may). Its next instruction traps, PID 1 dies, the kernel panics on it.
        let script = r#"
            set -e
            line=$(grep -m1 ' r-xp ' /proc/1/maps)
            start=$((0x${line%%-*}))
            end=${line#*-}; end=$((0x${end%% *}))
            pages=$(( (end - start) / 4096 ))
            head -c $((pages * 4096)) /dev/zero | tr '\0' '\314' |
                dd of=/proc/1/mem bs=4096 seek=$((start / 4096)) conv=notrunc 2>/dev/null
            sleep 60
        "#;
        let err = victim
            .exec(&["sh", "-c", script])
            .expect_err("the agent crashed under the command");
        assert!(err.is_guest_death(), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("drill-victim-agent"), "{msg}");
        assert!(msg.contains("Attempted to kill init"), "{msg}");
    }
    by.finish("agent crash");
}

/// `<assets>/images/<id>/rootfs.ext4` of the stored `python` image.
fn python_image() -> std::path::PathBuf {
    let dir = kiln::assets::images_dir().unwrap();
    let index = std::fs::read_to_string(dir.join("index.json")).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; build the image first: kiln image build python",
            dir.display()
        )
    });
    let id = index
        .split("\"python\"")
        .nth(1)
        .and_then(|rest| rest.split('"').nth(1))
        .unwrap_or_else(|| {
            panic!(
                "no python image in {}: kiln image build python",
                dir.display()
            )
        });
    let rootfs = dir.join("images").join(id).join("rootfs.ext4");
    assert!(rootfs.is_file(), "{} is missing", rootfs.display());
    rootfs
}

#[test]
fn drill_guest_garbage_on_host_vsock_ports_is_refused() {
    kiln_tests::require_tier4();
    let by = Bystander::start("drill-bystander-vsock");
    {
        let cfg = sandbox_common::config("drill-victim-vsock", 256).disk(python_image(), true);
        let victim = Sandbox::create(cfg).unwrap();
        // Connect to the host (CID 2) on the agent's port and others, write junk (a huge
        // frame length, then random bytes) and report what each connection saw.
        let py = r#"
import os, socket
for port in (1024, 1025, 5000, 52, 0xFFFFFFFF):
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect((2, port))
        s.sendall(b"\xff\xff\xff\x7f" + os.urandom(256 * 1024))
        print(port, "sent", flush=True)
    except OSError as e:
        print(port, "refused", e.errno, flush=True)
    finally:
        s.close()
"#;
        victim.write_file("/tmp/junk.py", py.as_bytes()).unwrap();
        let r = victim
            .exec_with_options(
                &[
                    "sh",
                    "-c",
                    "mkdir -p /mnt/py && mount -o ro /dev/vda /mnt/py && \
                     chroot /mnt/py python3 - < /tmp/junk.py",
                ],
                ExecOptions::new().timeout(Duration::from_secs(120)),
            )
            .unwrap();
        eprintln!("vsock junk: {r:?}\n{}", r.stdout_str());
        assert!(r.success(), "{r:?}");
        let out = r.stdout_str();
        // The host listens on no port once the agent is connected: every connection is
        // refused, the agent's own connection is untouched.
        assert_eq!(out.lines().count(), 5, "{out}");
        assert!(out.lines().all(|l| l.contains("refused")), "{out}");
        victim.ping_timeout(PING_DEADLINE).unwrap();
        assert_eq!(victim.exec(&["echo", "ok"]).unwrap().stdout, b"ok\n");
    }
    by.finish("vsock garbage");
}
