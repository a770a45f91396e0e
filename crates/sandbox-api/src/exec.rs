//! Exec types of the public API: [`ExecOptions`] (env, cwd, stdin, timeout, output cap),
//! [`ExecResult`] (collected output and exit status) and [`ExecEvent`] (the live events of a
//! streamed exec).

use std::fmt;
use std::io::Read;
use std::time::Duration;

pub use kiln_proto::ExitStatus;

/// Output cap of the collecting [`crate::Sandbox::exec_with_options`] unless set otherwise:
/// stdout + stderr beyond it are dropped in the guest and `truncated` is reported, so a
/// runaway command cannot fill the host's memory.
pub const DEFAULT_OUTPUT_CAP: u64 = 64 * 1024 * 1024;

/// Where an exec's standard input comes from.
#[derive(Default)]
pub enum StdinSource {
    /// `/dev/null`.
    #[default]
    Null,
    /// These bytes, then end of file (streamed in chunks when large).
    Bytes(Vec<u8>),
    /// Everything the reader yields, streamed while the command runs, then end of file.
    Reader(Box<dyn Read + Send>),
}

impl fmt::Debug for StdinSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StdinSource::Null => f.write_str("Null"),
            StdinSource::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            StdinSource::Reader(_) => f.write_str("Reader(..)"),
        }
    }
}

/// How to run a command. The default: clean guest environment, cwd `/`, stdin from
/// `/dev/null`, no timeout, output capped at [`DEFAULT_OUTPUT_CAP`] when collected (no cap
/// when streamed).
#[derive(Debug, Default)]
pub struct ExecOptions {
    /// Variables added to (or overriding) the agent's clean default environment.
    pub env: Vec<(String, String)>,
    /// Working directory in the guest.
    pub cwd: Option<String>,
    /// Standard input.
    pub stdin: StdinSource,
    /// Kill the command's whole process group after this long (reported as `timed_out`).
    pub timeout: Option<Duration>,
    /// Output cap: `None` = the default for the call, `Some(None)` = no cap,
    /// `Some(Some(n))` = at most `n` bytes of stdout + stderr.
    pub output_cap: Option<Option<u64>>,
    /// Run as this guest user (a name from the guest's `/etc/passwd`, `UID` or `UID:GID`);
    /// `None` = root (or the image's default user).
    pub user: Option<String>,
    /// `memory.max` of the exec's cgroup in the guest, in bytes.
    pub memory_max: Option<u64>,
    /// `pids.max` of the exec's cgroup in the guest.
    pub pids_max: Option<u64>,
}

impl ExecOptions {
    /// Default options.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets the working directory.
    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }

    /// Feeds these bytes on stdin.
    pub fn stdin_bytes(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = StdinSource::Bytes(data.into());
        self
    }

    /// Streams this reader on stdin.
    pub fn stdin_reader(mut self, r: impl Read + Send + 'static) -> Self {
        self.stdin = StdinSource::Reader(Box::new(r));
        self
    }

    /// Sets the timeout.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }

    /// Sets the output cap (`None` = unlimited).
    pub fn output_cap(mut self, cap: Option<u64>) -> Self {
        self.output_cap = Some(cap);
        self
    }

    /// Runs the command as this guest user.
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// Caps the command's memory (its cgroup's `memory.max`, bytes).
    pub fn memory_max(mut self, bytes: u64) -> Self {
        self.memory_max = Some(bytes);
        self
    }

    /// Caps the command's number of processes and threads (its cgroup's `pids.max`).
    pub fn pids_max(mut self, n: u64) -> Self {
        self.pids_max = Some(n);
        self
    }
}

/// The collected result of a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    /// Everything the command wrote on stdout (up to the output cap).
    pub stdout: Vec<u8>,
    /// Everything the command wrote on stderr (up to the output cap).
    pub stderr: Vec<u8>,
    /// How it ended.
    pub status: ExitStatus,
    /// Wall time from sending the request to receiving the exit.
    pub duration: Duration,
}

impl ExecResult {
    /// Exit code when the command exited normally.
    pub fn code(&self) -> Option<i32> {
        self.status.code
    }

    /// Signal number when it was killed by a signal.
    pub fn signal(&self) -> Option<i32> {
        self.status.signal
    }

    /// True for exit code 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Exit code in shell convention (128 + signal when killed).
    pub fn shell_code(&self) -> i32 {
        self.status.shell_code()
    }

    /// The timeout fired and the command's process group was killed.
    pub fn timed_out(&self) -> bool {
        self.status.timed_out
    }

    /// Output was dropped because of the output cap.
    pub fn truncated(&self) -> bool {
        self.status.truncated
    }

    /// Stdout as text (invalid UTF-8 replaced).
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Stderr as text (invalid UTF-8 replaced).
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// One event of a streamed exec, in order: `Started`, output chunks, then exactly one `Exit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// The command is running in the guest with this pid.
    Started {
        /// Guest pid of the command.
        pid: u32,
    },
    /// A chunk of stdout.
    Stdout(Vec<u8>),
    /// A chunk of stderr.
    Stderr(Vec<u8>),
    /// The command ended (always the last event).
    Exit(ExitStatus),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_sets_fields() {
        let o = ExecOptions::new()
            .env("A", "1")
            .cwd("/tmp")
            .stdin_bytes(b"hi".to_vec())
            .timeout(Duration::from_secs(3))
            .output_cap(None);
        assert_eq!(o.env, vec![("A".to_string(), "1".to_string())]);
        assert_eq!(o.cwd.as_deref(), Some("/tmp"));
        assert!(matches!(o.stdin, StdinSource::Bytes(ref b) if b == b"hi"));
        assert_eq!(o.timeout, Some(Duration::from_secs(3)));
        assert_eq!(o.output_cap, Some(None));
        assert_eq!(format!("{:?}", o.stdin), "Bytes(2 bytes)");
    }

    #[test]
    fn result_accessors_follow_the_status() {
        let r = ExecResult {
            stdout: b"out\xff".to_vec(),
            stderr: Vec::new(),
            status: ExitStatus {
                code: None,
                signal: Some(9),
                timed_out: true,
                truncated: false,
                ..Default::default()
            },
            duration: Duration::ZERO,
        };
        assert_eq!(r.shell_code(), 137);
        assert!(!r.success());
        assert!(r.timed_out());
        assert_eq!(r.signal(), Some(9));
        assert_eq!(r.stdout_str(), "out\u{fffd}");
    }
}
