//! Shared helpers for the tier-3 agent tests: run kiln-agent in host mode on a unix socket in
//! a temp dir and connect kiln-proto clients to it.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use kiln_proto::{Client, ClientConfig};

pub struct Agent {
    child: Child,
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
}

impl Agent {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("agent.sock");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln-agent"));
        cmd.arg("--listen-unix").arg(&sock);
        Self::spawn(cmd, dir, sock)
    }

    /// Run `cmd` (which must end up running kiln-agent listening on `sock`) and wait for READY.
    pub fn spawn(mut cmd: Command, dir: tempfile::TempDir, sock: PathBuf) -> Self {
        let mut child = cmd
            .env("KILN_TEST_LEAK", "leaked")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn kiln-agent");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line == kiln_proto::READY_LINE {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("agent printed KILN-AGENT-READY");
        Agent { child, dir, sock }
    }

    pub fn stream(&self) -> UnixStream {
        UnixStream::connect(&self.sock).expect("connect to agent socket")
    }

    pub fn client(&self) -> Client {
        let s = self.stream();
        let r = s.try_clone().expect("clone stream");
        Client::connect(r, s, ClientConfig::default()).expect("handshake")
    }

    pub fn path(&self, name: &str) -> String {
        self.dir
            .path()
            .join(name)
            .to_str()
            .expect("utf-8 path")
            .to_owned()
    }

    /// Creates the directory `name` in the agent's temporary directory; returns its path.
    pub fn mkdir(&self, name: &str) -> String {
        let dir = self.path(name);
        std::fs::create_dir(&dir).expect("create a test directory");
        dir
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the agent process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a process exists and is not a zombie.
pub fn process_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

/// Poll `cond` until true or `within` passes.
pub fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn exists(p: impl AsRef<Path>) -> bool {
    p.as_ref().exists()
}
