//! Helpers shared by the `sandbox_*` tier-4 tests: booting a sandbox with generous deadlines
//! (the harness runs under software emulation), locating and running the built `kiln` CLI with
//! a deadline, and deterministic data generators for the large-transfer tests.

#![allow(dead_code)]
// Test support: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln::{Sandbox, SandboxConfig};

/// Boot deadline for test sandboxes: software emulation is slow and the machine is shared.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// Deadline of each non-exec request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Deadline of one `kiln` CLI process.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(300);

/// A sandbox config with the test deadlines and `memory_mib` of RAM (other fields default).
pub fn config(name: &str, memory_mib: u32) -> SandboxConfig {
    SandboxConfig::new()
        .name(name)
        .memory_mib(memory_mib)
        .boot_timeout(BOOT_TIMEOUT)
        .request_timeout(REQUEST_TIMEOUT)
}

/// A sandbox with the test deadlines and `memory_mib` of RAM.
pub fn sandbox(name: &str, memory_mib: u32, vcpus: u32) -> Sandbox {
    let cfg = config(name, memory_mib).vcpus(vcpus);
    match Sandbox::create(cfg) {
        Ok(s) => s,
        Err(e) => panic!("creating sandbox {name}: {e}"),
    }
}

/// The `kiln` binary built next to this test executable (`target/<profile>/kiln`).
pub fn kiln_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable has a path");
    // target/<profile>/deps/<test>-<hash>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test executable lives in target/<profile>/deps");
    let bin = profile_dir.join("kiln");
    assert!(
        bin.is_file(),
        "the kiln CLI is not built at {} (build it with `cargo build -p kiln-cli` in the same \
         profile; `cargo xtask test` does)",
        bin.display()
    );
    bin
}

/// Runs `kiln <args>` with extra environment and optional stdin; kills it after
/// [`CLI_TIMEOUT`] (the test then fails) so a test never hangs.
pub fn run_kiln(args: &[&str], env: &[(&str, &str)], stdin: Option<&[u8]>) -> Output {
    run_kiln_with(args, env, stdin, None)
}

/// [`run_kiln`] whose stdout is first read after `stdout_pause` (a reader that pauses, like
/// a pager nobody scrolls).
pub fn run_kiln_with(
    args: &[&str],
    env: &[(&str, &str)],
    stdin: Option<&[u8]>,
    stdout_pause: Option<Duration>,
) -> Output {
    let mut cmd = Command::new(kiln_bin());
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawning kiln");
    if let Some(data) = stdin {
        let mut w = child.stdin.take().expect("piped stdin");
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = w.write_all(&data);
        });
    }
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let t_out = std::thread::spawn(move || {
        if let Some(pause) = stdout_pause {
            std::thread::sleep(pause);
        }
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + CLI_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for kiln") {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kiln {args:?} did not finish within {CLI_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: t_out.join().expect("stdout reader"),
        stderr: t_err.join().expect("stderr reader"),
    }
}

/// `Output` as readable text for assertion messages.
pub fn describe(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A deterministic pseudo-random byte stream of `len` bytes (xorshift64*), as a reader.
pub struct PatternReader {
    state: u64,
    left: u64,
}

impl PatternReader {
    /// `len` bytes from `seed`.
    pub fn new(seed: u64, len: u64) -> Self {
        Self {
            state: seed | 1,
            left: len,
        }
    }
}

impl Read for PatternReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        for chunk in buf[..n].chunks_mut(8) {
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            let v = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Hex encoding of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
