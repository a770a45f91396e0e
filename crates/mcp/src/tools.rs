//! The MCP tools ([`KilnMcp`], an rmcp `ServerHandler`): create_sandbox, run_command,
//! run_python, read_file, write_file, list_files, kill_sandbox, list_sandboxes. Arguments
//! are typed structs (their JSON Schema is the tool's `inputSchema`); each result is
//! structured content (the tool's `outputSchema`) plus a text summary; every failure is a
//! tool error ([`ToolError`]). Blocking `kiln` calls run on `spawn_blocking`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use kiln::{ExecEvent, ExecOptions, FileKind};
use rmcp::handler::server::common::schema_for_output;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{tool, tool_handler, tool_router, ErrorData, ServerHandler};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::ToolError;
use crate::state::{CreateSpec, Entry, Sandboxes, MAX_SANDBOX_TIMEOUT};

/// Default command timeout.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest command timeout a client may ask for.
pub const MAX_COMMAND_TIMEOUT: Duration = Duration::from_secs(3600);
/// Most bytes of stdout and of stderr a result carries (the rest is dropped, `truncated`).
pub const MAX_OUTPUT: u64 = 1 << 20;
/// Largest file `read_file` returns and `write_file` takes.
pub const MAX_FILE: u64 = 8 << 20;
/// Longest `command` / `code`.
pub const MAX_COMMAND: usize = 128 * 1024;
/// Most entries `list_files` returns.
pub const MAX_ENTRIES: usize = 1024;
/// Guest RAM bounds of `create_sandbox`.
pub const MEMORY_RANGE: (u32, u32) = (128, 16384);

// ---- arguments ----

/// `create_sandbox` arguments.
#[derive(Debug, Default, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateArgs {
    /// Guest image: a name in Kiln's image store (e.g. "python", which has python3 and bash),
    /// an OCI reference or an image file. Default: the server's `--image`, else the bare
    /// Kiln guest (busybox only).
    #[serde(default)]
    pub image: Option<String>,
    /// Guest RAM in MiB (128..=16384). Default: the server's `--memory`.
    #[serde(default)]
    pub memory_mib: Option<u32>,
    /// Lifetime in seconds, after which the sandbox is killed (1..=86400). Default: the
    /// server's `--sandbox-timeout`.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// `run_command` arguments.
#[derive(Debug, Default, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RunCommandArgs {
    /// Sandbox id from create_sandbox.
    pub sandbox_id: String,
    /// Shell command line, run as `/bin/sh -c COMMAND`.
    pub command: String,
    /// Working directory (absolute). Default: the image's.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Kill the command (its whole process group) after this many seconds (1..=3600,
    /// default 60).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// `run_python` arguments.
#[derive(Debug, Default, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RunPythonArgs {
    /// Sandbox id (created with an image that has python3, e.g. "python").
    pub sandbox_id: String,
    /// Python source, run by `python3 -` (the program read from stdin).
    pub code: String,
    /// Working directory (absolute). Default: the image's.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Kill after this many seconds (1..=3600, default 60).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// How file content is encoded in `read_file` / `write_file`.
#[derive(Debug, Default, Clone, Copy, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// UTF-8 text.
    #[default]
    Utf8,
    /// Base64 of the bytes (any file).
    Base64,
}

/// `read_file` arguments.
#[derive(Debug, Default, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReadFileArgs {
    /// Sandbox id.
    pub sandbox_id: String,
    /// Absolute path in the guest.
    pub path: String,
    /// "utf8" (default; a file that is not valid UTF-8 comes back as "base64") or "base64".
    #[serde(default)]
    pub encoding: Encoding,
}

/// `write_file` arguments.
#[derive(Debug, Default, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WriteFileArgs {
    /// Sandbox id.
    pub sandbox_id: String,
    /// Absolute path in the guest; missing parent directories are created. An existing file
    /// is truncated.
    pub path: String,
    /// The content, encoded as `encoding` says.
    pub content: String,
    /// "utf8" (default) or "base64".
    #[serde(default)]
    pub encoding: Encoding,
}

/// `list_files` arguments.
#[derive(Debug, Default, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ListFilesArgs {
    /// Sandbox id.
    pub sandbox_id: String,
    /// Absolute directory path (default "/").
    #[serde(default)]
    pub path: Option<String>,
}

/// `kill_sandbox` arguments.
#[derive(Debug, Default, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KillArgs {
    /// Sandbox id.
    pub sandbox_id: String,
}

// ---- results ----

/// `create_sandbox` result.
#[derive(Debug, Serialize, JsonSchema)]
pub struct SandboxInfo {
    /// The id to pass to the other tools.
    pub sandbox_id: String,
    /// Image (null: the bare Kiln guest).
    pub image: Option<String>,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Seconds until the server kills it.
    pub expires_in_secs: u64,
    /// Whether the VM runs.
    pub running: bool,
}

/// `run_command` / `run_python` result.
#[derive(Debug, Serialize, JsonSchema, PartialEq, Eq)]
pub struct ExecOutput {
    /// The sandbox.
    pub sandbox_id: String,
    /// Exit code (null when a signal killed it).
    pub exit_code: Option<i32>,
    /// Signal that killed it, if any.
    pub signal: Option<i32>,
    /// The timeout fired and the command's process group was killed.
    pub timed_out: bool,
    /// Output beyond 1 MiB per stream was dropped.
    pub truncated: bool,
    /// Standard output (UTF-8, invalid bytes replaced).
    pub stdout: String,
    /// Standard error (UTF-8, invalid bytes replaced).
    pub stderr: String,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
}

/// `read_file` result.
#[derive(Debug, Serialize, JsonSchema)]
pub struct FileContent {
    /// The path.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// How `content` is encoded.
    pub encoding: Encoding,
    /// The content.
    pub content: String,
}

/// `write_file` result.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Written {
    /// The path.
    pub path: String,
    /// Bytes written.
    pub bytes_written: u64,
}

/// One `list_files` entry.
#[derive(Debug, Serialize, JsonSchema)]
pub struct FileEntry {
    /// Name within the directory.
    pub name: String,
    /// "file", "dir", "symlink" or "other".
    pub kind: String,
    /// Size in bytes.
    pub size: u64,
}

/// `list_files` result.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Listing {
    /// The directory.
    pub path: String,
    /// Entries sorted by name.
    pub entries: Vec<FileEntry>,
    /// More than 1024 entries: the rest were left out.
    pub truncated: bool,
}

/// `kill_sandbox` result.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Killed {
    /// The sandbox.
    pub sandbox_id: String,
    /// Always true (an unknown id is a tool error).
    pub killed: bool,
}

/// `list_sandboxes` result.
#[derive(Debug, Serialize, JsonSchema)]
pub struct SandboxList {
    /// Live sandboxes, oldest first.
    pub sandboxes: Vec<SandboxInfo>,
    /// The server's bound on live sandboxes.
    pub max_sandboxes: usize,
}

// ---- validation ----

/// A timeout argument in seconds within `1..=max` (default `default`).
pub fn timeout_arg(
    field: &'static str,
    secs: Option<u64>,
    default: Duration,
    max: Duration,
) -> Result<Duration, ToolError> {
    match secs {
        None => Ok(default),
        Some(s) if s >= 1 && s <= max.as_secs() => Ok(Duration::from_secs(s)),
        Some(s) => Err(ToolError::invalid(
            field,
            format!("{s} is out of range 1..={}", max.as_secs()),
        )),
    }
}

/// An absolute guest path of at most 4096 bytes without NUL.
pub fn path_arg(field: &'static str, p: &str) -> Result<(), ToolError> {
    if !p.starts_with('/') {
        return Err(ToolError::invalid(field, format!("{p:?} is not absolute")));
    }
    if p.len() > kiln_proto_max_path() || p.contains('\0') {
        return Err(ToolError::invalid(
            field,
            "longer than 4096 bytes or contains NUL",
        ));
    }
    Ok(())
}

fn kiln_proto_max_path() -> usize {
    4096
}

/// Environment names: non-empty, no `=` or NUL; values without NUL.
pub fn env_arg(env: &BTreeMap<String, String>) -> Result<(), ToolError> {
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(ToolError::invalid(
                "env",
                format!("{k:?} is not a valid variable name (or its value has NUL)"),
            ));
        }
    }
    Ok(())
}

/// The `create_sandbox` spec from its arguments and the server's defaults.
pub fn create_spec(args: CreateArgs, sandboxes: &Sandboxes) -> Result<CreateSpec, ToolError> {
    let c = sandboxes.config();
    let memory_mib = args.memory_mib.unwrap_or(c.memory_mib);
    if !(MEMORY_RANGE.0..=MEMORY_RANGE.1).contains(&memory_mib) {
        return Err(ToolError::invalid(
            "memory_mib",
            format!(
                "{memory_mib} is out of range {}..={}",
                MEMORY_RANGE.0, MEMORY_RANGE.1
            ),
        ));
    }
    let image = match args.image {
        Some(i) if i.trim().is_empty() => {
            return Err(ToolError::invalid("image", "is empty"));
        }
        Some(i) => Some(i),
        None => c.default_image.clone(),
    };
    let timeout = timeout_arg(
        "timeout_secs",
        args.timeout_secs,
        c.sandbox_timeout,
        MAX_SANDBOX_TIMEOUT,
    )?;
    Ok(CreateSpec {
        image,
        memory_mib,
        timeout,
    })
}

/// What to run: argv, options and the deadline it was given.
#[derive(Debug)]
pub struct Job {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Options (env, cwd, stdin, timeout, output cap).
    pub opts: ExecOptions,
    /// The command's timeout.
    pub timeout: Duration,
}

fn job(
    argv: Vec<String>,
    stdin: Option<Vec<u8>>,
    cwd: Option<String>,
    env: BTreeMap<String, String>,
    timeout_secs: Option<u64>,
) -> Result<Job, ToolError> {
    if let Some(c) = &cwd {
        path_arg("cwd", c)?;
    }
    env_arg(&env)?;
    let timeout = timeout_arg(
        "timeout_secs",
        timeout_secs,
        DEFAULT_COMMAND_TIMEOUT,
        MAX_COMMAND_TIMEOUT,
    )?;
    let mut opts = ExecOptions::new()
        .timeout(timeout)
        .output_cap(Some(MAX_OUTPUT));
    for (k, v) in env {
        opts = opts.env(k, v);
    }
    if let Some(c) = cwd {
        opts = opts.cwd(c);
    }
    if let Some(s) = stdin {
        opts = opts.stdin_bytes(s);
    }
    Ok(Job {
        argv,
        opts,
        timeout,
    })
}

/// The job of `run_command`: `/bin/sh -c COMMAND`.
pub fn command_job(a: RunCommandArgs) -> Result<Job, ToolError> {
    if a.command.trim().is_empty() {
        return Err(ToolError::invalid("command", "is empty"));
    }
    if a.command.len() > MAX_COMMAND || a.command.contains('\0') {
        return Err(ToolError::invalid(
            "command",
            format!("longer than {MAX_COMMAND} bytes or contains NUL"),
        ));
    }
    job(
        vec!["/bin/sh".into(), "-c".into(), a.command],
        None,
        a.cwd,
        a.env,
        a.timeout_secs,
    )
}

/// The job of `run_python`: `python3 -` with the code on stdin.
pub fn python_job(a: RunPythonArgs) -> Result<Job, ToolError> {
    if a.code.len() > MAX_FILE as usize {
        return Err(ToolError::invalid(
            "code",
            format!("longer than {MAX_FILE} bytes"),
        ));
    }
    job(
        vec!["python3".into(), "-".into()],
        Some(a.code.into_bytes()),
        a.cwd,
        a.env,
        a.timeout_secs,
    )
}

/// Decodes `write_file`'s content.
pub fn decode_content(content: String, encoding: Encoding) -> Result<Vec<u8>, ToolError> {
    let bytes = match encoding {
        Encoding::Utf8 => content.into_bytes(),
        Encoding::Base64 => base64::engine::general_purpose::STANDARD
            .decode(content.as_bytes())
            .map_err(|e| ToolError::invalid("content", format!("not valid base64: {e}")))?,
    };
    if bytes.len() as u64 > MAX_FILE {
        return Err(ToolError::invalid(
            "content",
            format!("{} bytes is more than {MAX_FILE}", bytes.len()),
        ));
    }
    Ok(bytes)
}

/// Encodes `read_file`'s content: UTF-8 when asked and valid, else base64.
pub fn encode_content(data: Vec<u8>, asked: Encoding) -> (Encoding, String) {
    if asked == Encoding::Utf8 {
        match String::from_utf8(data) {
            Ok(s) => return (Encoding::Utf8, s),
            Err(e) => {
                let data = e.into_bytes();
                return (
                    Encoding::Base64,
                    base64::engine::general_purpose::STANDARD.encode(data),
                );
            }
        }
    }
    (
        Encoding::Base64,
        base64::engine::general_purpose::STANDARD.encode(data),
    )
}

fn kind_name(k: FileKind) -> &'static str {
    match k {
        FileKind::File => "file",
        FileKind::Dir => "dir",
        FileKind::Symlink => "symlink",
        FileKind::Other => "other",
    }
}

// ---- running ----

/// Streams `job` in `entry` and collects its output (at most [`MAX_OUTPUT`] per stream).
/// The sandbox lock is held only to start the command, so `kill_sandbox` never waits for it.
fn run_job(entry: &Entry, job: Job) -> Result<ExecOutput, ToolError> {
    let start = Instant::now();
    let mut stream = entry.with(|sb| sb.stream_exec_with_options(&job.argv, job.opts))?;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut truncated = false;
    let status = loop {
        let ev = stream.next_event().map_err(|source| ToolError::Sandbox {
            id: entry.id.clone(),
            source: Box::new(source),
        })?;
        match ev {
            Some(ExecEvent::Started { .. }) => {}
            Some(ExecEvent::Stdout(c)) => truncated |= append(&mut out, &c),
            Some(ExecEvent::Stderr(c)) => truncated |= append(&mut err, &c),
            Some(ExecEvent::Exit(s)) => break s,
            None => {
                return Err(ToolError::Internal(
                    "the command's stream ended without an exit status".into(),
                ))
            }
        }
    };
    Ok(ExecOutput {
        sandbox_id: entry.id.clone(),
        exit_code: status.code,
        signal: status.signal,
        timed_out: status.timed_out,
        truncated: truncated || status.truncated,
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::from_utf8_lossy(&err).into_owned(),
        duration_ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}

/// Appends up to the cap; true when something was dropped.
fn append(buf: &mut Vec<u8>, chunk: &[u8]) -> bool {
    let room = (MAX_OUTPUT as usize).saturating_sub(buf.len());
    let take = room.min(chunk.len());
    buf.extend_from_slice(&chunk[..take]);
    take < chunk.len()
}

/// The text summary of an exec result.
pub fn exec_summary(o: &ExecOutput, timeout: Duration) -> String {
    let mut s = match (o.exit_code, o.signal) {
        _ if o.timed_out => format!("timed out after {}s (killed)", timeout.as_secs()),
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => "ended without a status".into(),
    };
    if o.truncated {
        s.push_str(" (output truncated at 1 MiB per stream)");
    }
    s.push_str("\n--- stdout ---\n");
    s.push_str(&o.stdout);
    if !o.stderr.is_empty() {
        if !s.ends_with('\n') {
            s.push('\n');
        }
        s.push_str("--- stderr ---\n");
        s.push_str(&o.stderr);
    }
    s
}

/// Writes into a Vec, failing past `max` bytes (a file that grows while it is read).
struct Bounded {
    buf: Vec<u8>,
    max: u64,
}

impl std::io::Write for Bounded {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() as u64 + b.len() as u64 > self.max {
            return Err(std::io::Error::other(format!(
                "the file is larger than {} bytes",
                self.max
            )));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn structured<T: Serialize>(value: &T, summary: String) -> Result<CallToolResult, ErrorData> {
    let v = serde_json::to_value(value)
        .map_err(|e| ErrorData::internal_error(format!("serializing the result: {e}"), None))?;
    let mut r = CallToolResult::structured(v);
    r.content = vec![ContentBlock::text(summary)];
    Ok(r)
}

/// Runs blocking `f` off the async runtime; its error becomes a tool error result.
async fn blocking<T, F>(f: F) -> Result<T, ToolError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, ToolError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(ToolError::Internal(format!("the tool's task failed: {e}"))),
    }
}

fn done(
    r: Result<Result<CallToolResult, ErrorData>, ToolError>,
) -> Result<CallToolResult, ErrorData> {
    match r {
        Ok(r) => r,
        Err(e) => Ok(e.into_result()),
    }
}

fn info(e: &Entry) -> SandboxInfo {
    SandboxInfo {
        sandbox_id: e.id.clone(),
        image: e.image.clone(),
        memory_mib: e.memory_mib,
        created_unix: e.created_unix,
        expires_in_secs: e.expires_in().as_secs(),
        running: e.is_running(),
    }
}

// ---- the server ----

/// The MCP server: tools over the shared [`Sandboxes`] (one per process; every HTTP session
/// sees the same sandboxes).
#[derive(Debug, Clone)]
pub struct KilnMcp {
    sandboxes: Arc<Sandboxes>,
    #[allow(dead_code)] // read by the `tool_handler` macro
    tool_router: ToolRouter<Self>,
}

impl KilnMcp {
    /// A handler over `sandboxes`.
    pub fn new(sandboxes: Arc<Sandboxes>) -> Self {
        Self {
            sandboxes,
            tool_router: Self::tool_router(),
        }
    }

    async fn exec(
        &self,
        id: String,
        job: Result<Job, ToolError>,
        python: bool,
    ) -> Result<CallToolResult, ErrorData> {
        let s = Arc::clone(&self.sandboxes);
        done(
            blocking(move || {
                let job = job?;
                let timeout = job.timeout;
                let entry = s.get(&id)?;
                let o = run_job(&entry, job)?;
                if python && o.exit_code == Some(127) && o.stderr.contains("python3") {
                    return Err(ToolError::NoPython { id });
                }
                let summary = exec_summary(&o, timeout);
                Ok(structured(&o, summary))
            })
            .await,
        )
    }
}

#[tool_router]
impl KilnMcp {
    /// Boot a new sandbox (a Kiln microVM); returns its sandbox_id.
    #[tool(
        description = "Boot a new isolated Linux sandbox (a Kiln microVM) and return its sandbox_id. Use image \"python\" for Python and bash. The sandbox is killed after timeout_secs.",
        output_schema = schema_for_output::<SandboxInfo>()
    )]
    async fn create_sandbox(
        &self,
        Parameters(args): Parameters<CreateArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let s = Arc::clone(&self.sandboxes);
        done(
            blocking(move || {
                let spec = create_spec(args, &s)?;
                let e = s.create(&spec)?;
                tracing::info!(id = %e.id, image = ?e.image, "sandbox created");
                let i = info(&e);
                let summary = format!(
                    "created sandbox {} (image {}, {} MiB, killed in {} s)",
                    i.sandbox_id,
                    i.image.as_deref().unwrap_or("none: bare guest"),
                    i.memory_mib,
                    i.expires_in_secs
                );
                Ok(structured(&i, summary))
            })
            .await,
        )
    }

    /// Run a shell command.
    #[tool(
        description = "Run a shell command (/bin/sh -c) in a sandbox and return its stdout, stderr and exit code. A non-zero exit code is a normal result.",
        output_schema = schema_for_output::<ExecOutput>()
    )]
    async fn run_command(
        &self,
        Parameters(args): Parameters<RunCommandArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let id = args.sandbox_id.clone();
        self.exec(id, command_job(args), false).await
    }

    /// Run Python code.
    #[tool(
        description = "Run Python code with python3 in a sandbox (create it with image \"python\") and return its stdout, stderr and exit code.",
        output_schema = schema_for_output::<ExecOutput>()
    )]
    async fn run_python(
        &self,
        Parameters(args): Parameters<RunPythonArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let id = args.sandbox_id.clone();
        self.exec(id, python_job(args), true).await
    }

    /// Read a file.
    #[tool(
        description = "Read a file from a sandbox (at most 8 MiB). Text comes back as utf8; binary content as base64.",
        output_schema = schema_for_output::<FileContent>()
    )]
    async fn read_file(
        &self,
        Parameters(args): Parameters<ReadFileArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let s = Arc::clone(&self.sandboxes);
        done(
            blocking(move || {
                path_arg("path", &args.path)?;
                let e = s.get(&args.sandbox_id)?;
                let mut w = Bounded {
                    buf: Vec::new(),
                    max: MAX_FILE,
                };
                e.with(|sb| sb.read_file_to(&args.path, &mut w))?;
                let size = w.buf.len() as u64;
                let (encoding, content) = encode_content(w.buf, args.encoding);
                let summary = match encoding {
                    Encoding::Utf8 => content.clone(),
                    Encoding::Base64 => {
                        format!(
                            "{} ({size} bytes, binary: base64 in structured content)",
                            args.path
                        )
                    }
                };
                Ok(structured(
                    &FileContent {
                        path: args.path,
                        size,
                        encoding,
                        content,
                    },
                    summary,
                ))
            })
            .await,
        )
    }

    /// Write a file.
    #[tool(
        description = "Write a file in a sandbox (create or truncate; parent directories are created). content is utf8 text or base64.",
        output_schema = schema_for_output::<Written>()
    )]
    async fn write_file(
        &self,
        Parameters(args): Parameters<WriteFileArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let s = Arc::clone(&self.sandboxes);
        done(
            blocking(move || {
                path_arg("path", &args.path)?;
                let data = decode_content(args.content, args.encoding)?;
                let e = s.get(&args.sandbox_id)?;
                if let Some((parent, _)) = args.path.rsplit_once('/') {
                    if !parent.is_empty() {
                        e.with(|sb| sb.mkdir(parent))?;
                    }
                }
                e.with(|sb| sb.write_file(&args.path, &data))?;
                let w = Written {
                    path: args.path,
                    bytes_written: data.len() as u64,
                };
                let summary = format!("wrote {} bytes to {}", w.bytes_written, w.path);
                Ok(structured(&w, summary))
            })
            .await,
        )
    }

    /// List a directory.
    #[tool(
        description = "List a directory in a sandbox: name, kind (file, dir, symlink, other) and size of each entry.",
        output_schema = schema_for_output::<Listing>()
    )]
    async fn list_files(
        &self,
        Parameters(args): Parameters<ListFilesArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let s = Arc::clone(&self.sandboxes);
        done(
            blocking(move || {
                let path = args.path.unwrap_or_else(|| "/".into());
                path_arg("path", &path)?;
                let e = s.get(&args.sandbox_id)?;
                let mut v = e.with(|sb| sb.list_dir(&path))?;
                let truncated = v.len() > MAX_ENTRIES;
                v.truncate(MAX_ENTRIES);
                let entries: Vec<FileEntry> = v
                    .into_iter()
                    .map(|d| FileEntry {
                        name: d.name,
                        kind: kind_name(d.kind).into(),
                        size: d.size,
                    })
                    .collect();
                let mut summary = format!("{path}: {} entries\n", entries.len());
                for f in &entries {
                    let slash = if f.kind == "dir" { "/" } else { "" };
                    summary.push_str(&format!("{}{slash}\t{}\t{}\n", f.name, f.kind, f.size));
                }
                Ok(structured(
                    &Listing {
                        path,
                        entries,
                        truncated,
                    },
                    summary,
                ))
            })
            .await,
        )
    }

    /// Kill a sandbox.
    #[tool(
        description = "Kill a sandbox: its VM stops at once and everything in it is gone.",
        output_schema = schema_for_output::<Killed>()
    )]
    async fn kill_sandbox(
        &self,
        Parameters(args): Parameters<KillArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let s = Arc::clone(&self.sandboxes);
        done(
            blocking(move || {
                let e = s.kill(&args.sandbox_id)?;
                tracing::info!(id = %e.id, "sandbox killed");
                let k = Killed {
                    sandbox_id: e.id.clone(),
                    killed: true,
                };
                Ok(structured(&k, format!("killed sandbox {}", e.id)))
            })
            .await,
        )
    }

    /// List sandboxes.
    #[tool(
        description = "List the live sandboxes of this server.",
        output_schema = schema_for_output::<SandboxList>()
    )]
    async fn list_sandboxes(&self) -> Result<CallToolResult, ErrorData> {
        let s = Arc::clone(&self.sandboxes);
        done(
            blocking(move || {
                let sandboxes: Vec<SandboxInfo> = s.list().iter().map(|e| info(e)).collect();
                let mut summary = format!("{} live sandboxes\n", sandboxes.len());
                for i in &sandboxes {
                    summary.push_str(&format!(
                        "{}\timage {}\t{} MiB\t{}\n",
                        i.sandbox_id,
                        i.image.as_deref().unwrap_or("-"),
                        i.memory_mib,
                        if i.running { "running" } else { "stopped" }
                    ));
                }
                let l = SandboxList {
                    sandboxes,
                    max_sandboxes: s.config().max_sandboxes,
                };
                Ok(structured(&l, summary))
            })
            .await,
        )
    }
}

#[tool_handler]
impl ServerHandler for KilnMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("kiln-mcp", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Kiln sandboxes: create_sandbox boots an isolated Linux microVM (image \"python\" \
                 for Python); run_command, run_python, read_file, write_file and list_files act \
                 in it by sandbox_id; kill_sandbox ends it.",
            )
    }
}
