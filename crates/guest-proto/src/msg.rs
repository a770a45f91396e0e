//! The protocol's messages: the handshake, requests (host -> agent) and responses
//! (agent -> host), plus [`Message::validate`], which checks every per-field bound.
//!
//! Enum variants are encoded by index (postcard varint), so new variants are only ever appended.

use serde::{Deserialize, Serialize};

use crate::limits::*;

/// One frame's payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Agent -> host, the first message on every connection.
    Hello(Hello),
    /// Host -> agent. `id` is chosen by the host; every response to it carries the same id.
    Request { id: u64, body: Request },
    /// Agent -> host. `id` echoes the request's id; 0 is a connection-level error.
    Response { id: u64, body: Response },
}

/// The agent's handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the agent.
    pub version: u32,
    /// Optional features, e.g. `"exec"`, `"files"`, `"stdin-stream"`, `"background"`.
    pub capabilities: Vec<String>,
    /// True when this is not the agent's first connection since boot (it reconnected, as it
    /// does after a snapshot restore resets the vsock transport).
    pub restored: bool,
    /// The agent's build version (informational).
    pub agent_version: String,
}

/// Where an exec's stdin comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stdin {
    /// `/dev/null`.
    Null,
    /// These bytes, then end of file (at most one chunk; larger stdin must be streamed).
    Bytes(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Streamed with `StdinData` / `StdinEof` requests naming the exec id.
    Stream,
}

/// A command to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in `PATH` when it has no `/`.
    pub argv: Vec<String>,
    /// Variables added to (or overriding) the agent's clean default environment.
    pub env: Vec<(String, String)>,
    /// Working directory; `None` = `/` in the guest, the agent's own cwd in host mode.
    pub cwd: Option<String>,
    /// Stdin source.
    pub stdin: Stdin,
    /// Kill the whole process group with SIGKILL after this long; `None` = no limit.
    pub timeout_ms: Option<u64>,
    /// Most stdout+stderr bytes sent; `None` = unlimited. Output past it is drained, not sent.
    pub output_cap: Option<u64>,
    /// Background exec: the request completes with `ExecStarted`; output is buffered until a
    /// `Wait` on the exec id.
    pub background: bool,
    /// Run as this user: a name from the guest's `/etc/passwd`, or `UID` / `UID:GID`; `None` =
    /// the agent's own user (root in the guest). A name also sets `HOME`, `USER` and `LOGNAME`
    /// unless `env` sets them, and the supplementary groups from `/etc/group`.
    pub user: Option<String>,
    /// Resource limits of this exec's cgroup in the guest.
    pub limits: ExecLimits,
}

/// Limits the agent applies to one exec (a cgroup v2 below the agent's own). `None` = the
/// sandbox's default for that limit (see the agent docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecLimits {
    /// `memory.max` in bytes: past it the guest kernel's OOM killer kills within the exec.
    pub memory_max: Option<u64>,
    /// `pids.max`: fork/clone past it fails with EAGAIN inside the exec.
    pub pids_max: Option<u64>,
}

impl ExecRequest {
    /// A foreground exec of `argv` with default settings.
    pub fn new<S: Into<String>>(argv: impl IntoIterator<Item = S>) -> Self {
        Self {
            argv: argv.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            cwd: None,
            stdin: Stdin::Null,
            timeout_ms: None,
            output_cap: None,
            background: false,
            user: None,
            limits: ExecLimits::default(),
        }
    }
}

/// Host -> agent requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// -> `Pong`.
    Ping,
    /// Foreground: -> `ExecStarted`, `Stdout`/`Stderr`*, `Exit` (or `Error`).
    /// Background: -> `ExecStarted` (or `Error`).
    Exec(ExecRequest),
    /// Stdin bytes for an exec started with `Stdin::Stream` -> `Ok` once written to the pipe.
    StdinData {
        exec_id: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Close a streamed stdin -> `Ok`.
    StdinEof { exec_id: u64 },
    /// Send `signal` to the exec's whole process group -> `Ok`.
    Signal { exec_id: u64, signal: i32 },
    /// Attach to a background exec -> buffered then live `Stdout`/`Stderr`*, `Exit`.
    Wait { exec_id: u64 },
    /// -> one `Data` chunk of at most `min(len, MAX_CHUNK)` bytes from `offset`.
    ReadFile { path: String, offset: u64, len: u64 },
    /// Write `data` at `offset` -> `Written`.
    WriteFile {
        path: String,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        /// Create the file if missing.
        create: bool,
        /// Truncate to zero length before writing.
        truncate: bool,
        /// Permission bits for a newly created file (default 0o644).
        mode: Option<u32>,
    },
    /// -> `DirEntries` with entries sorted by name, starting at index `start`.
    ListDir { path: String, start: u64 },
    /// -> `Stat` (does not follow a final symlink).
    Stat { path: String },
    /// -> `Ok`.
    Mkdir {
        path: String,
        parents: bool,
        mode: Option<u32>,
    },
    /// Remove a file, symlink or (empty, or any with `recursive`) directory -> `Ok`.
    Remove { path: String, recursive: bool },
    /// -> `Ok`.
    Rename { from: String, to: String },
    /// -> `Bool`.
    Exists { path: String },
    /// After a snapshot restore: set the clock and mix `seed` into the kernel RNG -> `Ok`.
    PostRestore {
        unix_time_ns: u64,
        #[serde(with = "serde_bytes")]
        seed: Vec<u8>,
    },
    /// -> `Ok`, then the agent syncs and reboots (ends the VM); in host mode it exits.
    Shutdown,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code when the process exited normally.
    pub code: Option<i32>,
    /// Signal number when it was killed by a signal.
    pub signal: Option<i32>,
    /// The exec's timeout fired and the agent killed its process group.
    pub timed_out: bool,
    /// Output was dropped because of the output cap (or the background buffer).
    pub truncated: bool,
    /// The guest kernel's OOM killer killed a process of this exec (its cgroup's
    /// `memory.events` counted an `oom_kill`).
    pub oom_killed: bool,
    /// A fork or clone in this exec failed at its `pids.max` (`pids.events` counted `max`).
    pub pids_limit_hit: bool,
}

impl ExitStatus {
    /// Exit code in shell convention: `code`, or 128 + signal.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 255,
        }
    }

    /// True for exit code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Kinds of filesystem entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: String,
    pub kind: FileKind,
    pub size: u64,
}

/// Result of `Stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
}

/// Error categories.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    NotFound,
    PermissionDenied,
    AlreadyExists,
    InvalidRequest,
    TooLarge,
    ExecFailed,
    Timeout,
    Io,
    Unsupported,
    /// The agent received a frame it could not decode.
    Malformed,
    NotADirectory,
    IsADirectory,
    DirectoryNotEmpty,
}

impl ErrorKind {
    /// Map an I/O error kind (or raw errno) to a protocol error kind.
    pub fn from_io(e: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::NotFound => Self::NotFound,
            K::PermissionDenied => Self::PermissionDenied,
            K::AlreadyExists => Self::AlreadyExists,
            K::InvalidInput | K::InvalidFilename => Self::InvalidRequest,
            K::NotADirectory => Self::NotADirectory,
            K::IsADirectory => Self::IsADirectory,
            K::DirectoryNotEmpty => Self::DirectoryNotEmpty,
            K::FileTooLarge => Self::TooLarge,
            _ => Self::Io,
        }
    }
}

/// Agent -> host responses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Pong,
    Ok,
    /// The exec is running: its agent-wide id (for `Signal`, `Wait`, `StdinData`) and pid.
    ExecStarted {
        exec_id: u64,
        pid: u32,
    },
    Stdout(#[serde(with = "serde_bytes")] Vec<u8>),
    Stderr(#[serde(with = "serde_bytes")] Vec<u8>),
    Exit(ExitStatus),
    /// File data read at the requested offset; `eof` when the end of the file was reached.
    Data {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        eof: bool,
    },
    Written {
        len: u64,
    },
    /// A page of a directory listing; `more` when entries remain after this page.
    DirEntries {
        entries: Vec<DirEntry>,
        more: bool,
    },
    Stat(FileStat),
    Bool(bool),
    Error {
        kind: ErrorKind,
        message: String,
    },
}

impl Response {
    /// Shorthand for an `Error` response.
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Self {
        let mut message: String = message.into();
        if message.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Self::Error { kind, message }
    }

    /// Name of the variant, for error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Pong => "Pong",
            Self::Ok => "Ok",
            Self::ExecStarted { .. } => "ExecStarted",
            Self::Stdout(_) => "Stdout",
            Self::Stderr(_) => "Stderr",
            Self::Exit(_) => "Exit",
            Self::Data { .. } => "Data",
            Self::Written { .. } => "Written",
            Self::DirEntries { .. } => "DirEntries",
            Self::Stat(_) => "Stat",
            Self::Bool(_) => "Bool",
            Self::Error { .. } => "Error",
        }
    }
}

impl Request {
    /// Name of the variant, for error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Ping => "Ping",
            Self::Exec(_) => "Exec",
            Self::StdinData { .. } => "StdinData",
            Self::StdinEof { .. } => "StdinEof",
            Self::Signal { .. } => "Signal",
            Self::Wait { .. } => "Wait",
            Self::ReadFile { .. } => "ReadFile",
            Self::WriteFile { .. } => "WriteFile",
            Self::ListDir { .. } => "ListDir",
            Self::Stat { .. } => "Stat",
            Self::Mkdir { .. } => "Mkdir",
            Self::Remove { .. } => "Remove",
            Self::Rename { .. } => "Rename",
            Self::Exists { .. } => "Exists",
            Self::PostRestore { .. } => "PostRestore",
            Self::Shutdown => "Shutdown",
        }
    }
}

/// A field that broke one of the protocol's bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {len} exceeds the limit of {max}")]
pub struct LimitError {
    /// Which field, e.g. `"Exec.argv"`.
    pub what: &'static str,
    pub len: usize,
    pub max: usize,
}

fn check(what: &'static str, len: usize, max: usize) -> Result<(), LimitError> {
    if len > max {
        Err(LimitError { what, len, max })
    } else {
        Ok(())
    }
}

fn check_path(what: &'static str, p: &str) -> Result<(), LimitError> {
    check(what, p.len(), MAX_PATH)
}

impl Request {
    /// Check every bound of this request.
    pub fn validate(&self) -> Result<(), LimitError> {
        match self {
            Self::Exec(e) => {
                check("Exec.argv", e.argv.len(), MAX_ARGS)?;
                for a in &e.argv {
                    check("Exec.argv[i]", a.len(), MAX_STRING)?;
                }
                check("Exec.env", e.env.len(), MAX_ENV)?;
                for (k, v) in &e.env {
                    check("Exec.env key", k.len(), MAX_STRING)?;
                    check("Exec.env value", v.len(), MAX_STRING)?;
                }
                if let Some(c) = &e.cwd {
                    check_path("Exec.cwd", c)?;
                }
                if let Some(u) = &e.user {
                    check("Exec.user", u.len(), MAX_USER)?;
                }
                if let Stdin::Bytes(b) = &e.stdin {
                    check("Exec.stdin", b.len(), MAX_CHUNK)?;
                }
                Ok(())
            }
            Self::StdinData { data, .. } => check("StdinData.data", data.len(), MAX_CHUNK),
            Self::ReadFile { path, .. }
            | Self::ListDir { path, .. }
            | Self::Stat { path }
            | Self::Mkdir { path, .. }
            | Self::Remove { path, .. }
            | Self::Exists { path } => check_path("path", path),
            Self::WriteFile { path, data, .. } => {
                check_path("WriteFile.path", path)?;
                check("WriteFile.data", data.len(), MAX_CHUNK)
            }
            Self::Rename { from, to } => {
                check_path("Rename.from", from)?;
                check_path("Rename.to", to)
            }
            Self::PostRestore { seed, .. } => check("PostRestore.seed", seed.len(), MAX_SEED),
            Self::Ping
            | Self::StdinEof { .. }
            | Self::Signal { .. }
            | Self::Wait { .. }
            | Self::Shutdown => Ok(()),
        }
    }
}

impl Response {
    /// Check every bound of this response.
    pub fn validate(&self) -> Result<(), LimitError> {
        match self {
            Self::Stdout(d) | Self::Stderr(d) => check("output chunk", d.len(), MAX_CHUNK),
            Self::Data { data, .. } => check("Data.data", data.len(), MAX_CHUNK),
            Self::DirEntries { entries, .. } => {
                check("DirEntries.entries", entries.len(), MAX_DIR_ENTRIES)?;
                for e in entries {
                    check_path("DirEntry.name", &e.name)?;
                }
                Ok(())
            }
            Self::Error { message, .. } => check("Error.message", message.len(), MAX_MESSAGE),
            Self::Pong
            | Self::Ok
            | Self::ExecStarted { .. }
            | Self::Exit(_)
            | Self::Written { .. }
            | Self::Stat(_)
            | Self::Bool(_) => Ok(()),
        }
    }
}

impl Hello {
    /// Check every bound of the handshake.
    pub fn validate(&self) -> Result<(), LimitError> {
        check(
            "Hello.capabilities",
            self.capabilities.len(),
            MAX_CAPABILITIES,
        )?;
        for c in &self.capabilities {
            check("Hello.capabilities[i]", c.len(), MAX_MESSAGE)?;
        }
        check("Hello.agent_version", self.agent_version.len(), MAX_MESSAGE)
    }
}

impl Message {
    /// Check every bound of this message.
    pub fn validate(&self) -> Result<(), LimitError> {
        match self {
            Self::Hello(h) => h.validate(),
            Self::Request { body, .. } => body.validate(),
            Self::Response { body, .. } => body.validate(),
        }
    }
}
