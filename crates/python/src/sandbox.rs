//! `kiln.Sandbox` and the value classes it returns (`Result`, `Event`, `ExecStream`,
//! `DirEntry`, `FileStat`, `SnapshotInfo`).
//!
//! Every call that waits on the guest runs detached from the interpreter (`Python::detach`),
//! so other Python threads keep running and many threads can drive one sandbox (or many) at
//! once. A sandbox is shared by its calls through an `Arc`; `shutdown()` takes it out (later
//! calls raise `SandboxClosedError`), kills the commands still running, waits (bounded) for
//! the calls in flight, then stops the VM.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use kiln::{
    ExecEvent, ExecOptions, ExecSignaller, ExitStatus, PooledSandbox, SandboxConfig, SandboxError,
    DEFAULT_OUTPUT_CAP,
};

use crate::convert::{self, ConfigArgs};
use crate::errors::{self, ErrorClass, ErrorInfo};

/// How long `shutdown()` waits for calls still running in other threads once their commands
/// were killed; after it the VM stops when the last of them returns.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);
/// SIGKILL.
const SIGKILL: i32 = 9;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An owned sandbox or one lent by a pool (returned to it when dropped).
pub(crate) enum Holder {
    Own(kiln::Sandbox),
    Pooled(PooledSandbox),
}

impl Holder {
    fn sb(&self) -> &kiln::Sandbox {
        match self {
            Holder::Own(s) => s,
            Holder::Pooled(p) => p,
        }
    }

    fn shutdown(self) -> Result<(), SandboxError> {
        match self {
            Holder::Own(s) => s.shutdown(),
            // Back to the pool, which replaces it with a pristine one.
            Holder::Pooled(p) => {
                drop(p);
                Ok(())
            }
        }
    }
}

/// The commands running in one sandbox, so that `shutdown()` can kill them.
#[derive(Debug, Default)]
struct Running {
    next: AtomicU64,
    execs: Mutex<HashMap<u64, ExecSignaller>>,
}

impl Running {
    fn register(self: &Arc<Self>, sig: ExecSignaller) -> RunningGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.execs).insert(id, sig);
        RunningGuard {
            running: Arc::clone(self),
            id,
        }
    }

    fn kill_all(&self) {
        let sigs: Vec<ExecSignaller> = lock(&self.execs).values().cloned().collect();
        for s in sigs {
            // It may have ended meanwhile.
            let _ = s.signal(SIGKILL);
        }
    }
}

/// Unregisters a command when it ended (or its stream was dropped).
#[derive(Debug)]
struct RunningGuard {
    running: Arc<Running>,
    id: u64,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        lock(&self.running.execs).remove(&self.id);
    }
}

/// A Kiln microVM sandbox: run commands, move files, snapshot, fork.
///
/// `Sandbox(**config)` boots one (the calling thread waits, other Python threads run).
/// Use it as a context manager, or call `shutdown()`; an unreachable sandbox is stopped when
/// it is garbage-collected.
#[pyclass(module = "kiln", name = "Sandbox", frozen)]
pub struct PySandbox {
    name: String,
    slot: Mutex<Option<Arc<Holder>>>,
    running: Arc<Running>,
    pooled: bool,
}

impl std::fmt::Debug for PySandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("name", &self.name)
            .field("pooled", &self.pooled)
            .finish_non_exhaustive()
    }
}

/// A running command's options, as the Python keywords give them.
struct ExecArgs {
    argv: Vec<String>,
    opts: ExecOptions,
}

#[allow(clippy::too_many_arguments)]
fn exec_args(
    cmd: &Bound<'_, PyAny>,
    env: Option<&Bound<'_, PyAny>>,
    cwd: Option<&Bound<'_, PyAny>>,
    stdin: Option<&Bound<'_, PyAny>>,
    timeout: Option<&Bound<'_, PyAny>>,
    output_cap: Option<i64>,
) -> PyResult<ExecArgs> {
    let argv = convert::extract_command(cmd)?;
    let mut opts = ExecOptions::new();
    opts.env = convert::extract_env(env)?;
    if let Some(cwd) = cwd.filter(|c| !c.is_none()) {
        opts.cwd = Some(convert::extract_path(cwd)?);
    }
    if let Some(s) = stdin.filter(|s| !s.is_none()) {
        opts.stdin = convert::extract_data(s)?.into_stdin();
    }
    opts.timeout = convert::extract_timeout(timeout, "timeout")?;
    opts.output_cap =
        Some(convert::output_cap(output_cap).map_err(pyo3::exceptions::PyValueError::new_err)?);
    Ok(ExecArgs { argv, opts })
}

/// Reads a stream to its exit, collecting the output.
fn collect(stream: &mut kiln::ExecStream) -> Result<(Vec<u8>, Vec<u8>, ExitStatus), SandboxError> {
    let mut out = Vec::new();
    let mut err = Vec::new();
    while let Some(ev) = stream.next_event()? {
        match ev {
            ExecEvent::Started { .. } => {}
            ExecEvent::Stdout(d) => out.extend_from_slice(&d),
            ExecEvent::Stderr(d) => err.extend_from_slice(&d),
            ExecEvent::Exit(s) => return Ok((out, err, s)),
        }
    }
    Err(SandboxError::Protocol {
        vm: String::new(),
        op: "exec",
        message: "the event stream ended without an exit status".into(),
    })
}

impl PySandbox {
    pub(crate) fn wrap(holder: Holder) -> PySandbox {
        let pooled = matches!(holder, Holder::Pooled(_));
        PySandbox {
            name: holder.sb().name().to_owned(),
            slot: Mutex::new(Some(Arc::new(holder))),
            running: Arc::default(),
            pooled,
        }
    }

    fn get(&self, py: Python<'_>) -> PyResult<Arc<Holder>> {
        lock(&self.slot)
            .as_ref()
            .cloned()
            .ok_or_else(|| errors::closed_err(py, &self.name))
    }

    /// Runs `f` on the sandbox detached from the interpreter; maps its error.
    fn call<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&kiln::Sandbox) -> Result<T, SandboxError> + Send,
    ) -> PyResult<T> {
        let h = self.get(py)?;
        py.detach(move || f(h.sb()))
            .map_err(|e| errors::sandbox_err(py, &e))
    }
}

/// `SandboxConfig` from the keywords; unconvertible values raise `ConfigError`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn config_from_kwargs(
    py: Python<'_>,
    name: Option<String>,
    vcpus: Option<i64>,
    memory_mib: Option<i64>,
    kernel: Option<&Bound<'_, PyAny>>,
    initramfs: Option<&Bound<'_, PyAny>>,
    extra_cmdline: Option<String>,
    quiet_kernel: Option<bool>,
    boot_timeout: Option<&Bound<'_, PyAny>>,
    request_timeout: Option<&Bound<'_, PyAny>>,
    consumer_deadline: Option<&Bound<'_, PyAny>>,
    image: Option<String>,
    overlay_size_mib: Option<i64>,
) -> PyResult<SandboxConfig> {
    let args = ConfigArgs {
        name,
        vcpus,
        memory_mib,
        kernel: convert::extract_host_path(kernel)?,
        initramfs: convert::extract_host_path(initramfs)?,
        extra_cmdline,
        quiet_kernel,
        boot_timeout: convert::extract_seconds(boot_timeout, "boot_timeout")?,
        request_timeout: convert::extract_seconds(request_timeout, "request_timeout")?,
        consumer_deadline: convert::extract_seconds(consumer_deadline, "consumer_deadline")?,
        image,
        overlay_size_mib,
    };
    args.to_config()
        .map_err(|(field, reason)| errors::config_err(py, field, reason))
}

fn deadlines_config(
    py: Python<'_>,
    name: Option<String>,
    boot_timeout: Option<&Bound<'_, PyAny>>,
    request_timeout: Option<&Bound<'_, PyAny>>,
    consumer_deadline: Option<&Bound<'_, PyAny>>,
) -> PyResult<SandboxConfig> {
    config_from_kwargs(
        py,
        name,
        None,
        None,
        None,
        None,
        None,
        None,
        boot_timeout,
        request_timeout,
        consumer_deadline,
        None,
        None,
    )
}

#[pymethods]
impl PySandbox {
    /// Boots a sandbox. Every keyword is optional (`None` = Kiln's default): `name`,
    /// `vcpus` (1..=8), `memory_mib` (64..=65536), `kernel`, `initramfs` (host paths),
    /// `extra_cmdline`, `quiet_kernel`, `boot_timeout`, `request_timeout`,
    /// `consumer_deadline` (seconds or `datetime.timedelta`; `consumer_deadline=math.inf`
    /// waits forever), `image` (a root-filesystem image: a name in the image store such as
    /// `"python"`, or an image file), `overlay_size_mib` (its in-RAM overlay). Raises `ConfigError`, `MissingAssetError`, `NoKvmError`,
    /// `BootError`...
    #[new]
    #[pyo3(signature = (*, name=None, vcpus=None, memory_mib=None, kernel=None, initramfs=None,
        extra_cmdline=None, quiet_kernel=None, boot_timeout=None, request_timeout=None,
        consumer_deadline=None, image=None, overlay_size_mib=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        name: Option<String>,
        vcpus: Option<i64>,
        memory_mib: Option<i64>,
        kernel: Option<&Bound<'_, PyAny>>,
        initramfs: Option<&Bound<'_, PyAny>>,
        extra_cmdline: Option<String>,
        quiet_kernel: Option<bool>,
        boot_timeout: Option<&Bound<'_, PyAny>>,
        request_timeout: Option<&Bound<'_, PyAny>>,
        consumer_deadline: Option<&Bound<'_, PyAny>>,
        image: Option<String>,
        overlay_size_mib: Option<i64>,
    ) -> PyResult<PySandbox> {
        let config = config_from_kwargs(
            py,
            name,
            vcpus,
            memory_mib,
            kernel,
            initramfs,
            extra_cmdline,
            quiet_kernel,
            boot_timeout,
            request_timeout,
            consumer_deadline,
            image,
            overlay_size_mib,
        )?;
        let sb = py
            .detach(|| kiln::Sandbox::create(config))
            .map_err(|e| errors::sandbox_err(py, &e))?;
        Ok(PySandbox::wrap(Holder::Own(sb)))
    }

    /// Restores a new sandbox from the snapshot in `dir` (see `snapshot`). vCPUs, memory and
    /// the guest come from the snapshot; `name` and the deadlines from the keywords.
    #[staticmethod]
    #[pyo3(signature = (dir, *, name=None, boot_timeout=None, request_timeout=None,
        consumer_deadline=None))]
    fn restore(
        py: Python<'_>,
        dir: &Bound<'_, PyAny>,
        name: Option<String>,
        boot_timeout: Option<&Bound<'_, PyAny>>,
        request_timeout: Option<&Bound<'_, PyAny>>,
        consumer_deadline: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PySandbox> {
        let dir: std::path::PathBuf = dir.extract()?;
        let config = deadlines_config(py, name, boot_timeout, request_timeout, consumer_deadline)?;
        let sb = py
            .detach(|| kiln::Sandbox::restore(&dir, config))
            .map_err(|e| errors::sandbox_err(py, &e))?;
        Ok(PySandbox::wrap(Holder::Own(sb)))
    }

    /// The sandbox's name (it appears in every error).
    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// Whether the VM still runs (`False` after `shutdown()` or when the guest ended it).
    #[getter]
    fn is_running(&self) -> bool {
        lock(&self.slot)
            .as_ref()
            .is_some_and(|h| h.sb().is_running())
    }

    /// Whether `shutdown()` was called (or the sandbox went back to its pool).
    #[getter]
    fn closed(&self) -> bool {
        lock(&self.slot).is_none()
    }

    /// Whether this sandbox is lent by a `SandboxPool` (`shutdown()` returns it).
    #[getter]
    fn pooled(&self) -> bool {
        self.pooled
    }

    /// Seconds from the start of the boot (or restore) to the agent's handshake.
    #[getter]
    fn boot_seconds(&self, py: Python<'_>) -> PyResult<f64> {
        Ok(self.get(py)?.sb().boot_timings().ready.as_secs_f64())
    }

    /// The agent's version string.
    #[getter]
    fn agent_version(&self, py: Python<'_>) -> PyResult<String> {
        Ok(self.get(py)?.sb().hello().agent_version.clone())
    }

    /// The last `max_bytes` the guest wrote to its serial console.
    #[pyo3(signature = (max_bytes=2048))]
    fn serial_tail(&self, py: Python<'_>, max_bytes: usize) -> PyResult<String> {
        Ok(self.get(py)?.sb().serial_tail(max_bytes))
    }

    /// Runs a command to its end and returns its `Result`. `cmd` is an argv list or a shell
    /// line (`sh -c`). `env` adds variables to the guest's clean environment, `cwd` sets
    /// the directory, `stdin` is `bytes`/`str`/a buffer/a binary file object (default
    /// `/dev/null`), `timeout` (seconds) kills the command's whole process group
    /// (`Result.timed_out`), `output_cap` bounds stdout + stderr (`None` = unlimited;
    /// `Result.truncated`). A missing command exits 127 (not an exception). `check=True`
    /// raises `CommandTimeout` / `CommandError` unless it exited 0.
    #[pyo3(signature = (cmd, *, env=None, cwd=None, stdin=None, timeout=None,
        output_cap=Some(DEFAULT_OUTPUT_CAP as i64), check=false))]
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        py: Python<'_>,
        cmd: &Bound<'_, PyAny>,
        env: Option<&Bound<'_, PyAny>>,
        cwd: Option<&Bound<'_, PyAny>>,
        stdin: Option<&Bound<'_, PyAny>>,
        timeout: Option<&Bound<'_, PyAny>>,
        output_cap: Option<i64>,
        check: bool,
    ) -> PyResult<Py<ExecResult>> {
        let ExecArgs { argv, opts } = exec_args(cmd, env, cwd, stdin, timeout, output_cap)?;
        let h = self.get(py)?;
        let running = Arc::clone(&self.running);
        let started = Instant::now();
        let (out, err, status) = py
            .detach(move || {
                let sb = h.sb();
                let mut stream = sb.stream_exec_with_options(&argv, opts)?;
                let _guard = stream.signaller()?.map(|s| running.register(s));
                collect(&mut stream)
            })
            .map_err(|e| errors::sandbox_err(py, &e))?;
        let result = Py::new(
            py,
            ExecResult::new(py, &out, &err, status, started.elapsed()),
        )?;
        if check {
            result.bind(py).get().check_inner(py, &result)?;
        }
        Ok(result)
    }

    /// Starts a command and returns an `ExecStream`: iterate it for `Event`s (`started`,
    /// `stdout`/`stderr` chunks as they come, then one `exit`). Same keywords as `run`;
    /// output is not capped unless `output_cap` says so.
    #[pyo3(signature = (cmd, *, env=None, cwd=None, stdin=None, timeout=None,
        output_cap=None))]
    #[allow(clippy::too_many_arguments)]
    fn stream(
        &self,
        py: Python<'_>,
        cmd: &Bound<'_, PyAny>,
        env: Option<&Bound<'_, PyAny>>,
        cwd: Option<&Bound<'_, PyAny>>,
        stdin: Option<&Bound<'_, PyAny>>,
        timeout: Option<&Bound<'_, PyAny>>,
        output_cap: Option<i64>,
    ) -> PyResult<ExecStream> {
        let ExecArgs { argv, opts } = exec_args(cmd, env, cwd, stdin, timeout, output_cap)?;
        let h = self.get(py)?;
        let running = Arc::clone(&self.running);
        let (stream, sig, guard) = py
            .detach(move || {
                let mut stream = h.sb().stream_exec_with_options(&argv, opts)?;
                let sig = stream.signaller()?;
                let guard = sig.clone().map(|s| running.register(s));
                Ok::<_, SandboxError>((stream, sig, guard))
            })
            .map_err(|e| errors::sandbox_err(py, &e))?;
        Ok(ExecStream {
            state: Mutex::new(StreamState {
                stream: Some(stream),
                guard,
            }),
            signaller: sig,
            name: self.name.clone(),
            done: AtomicBool::new(false),
        })
    }

    /// The whole content of guest file `path`, as bytes.
    fn read(&self, py: Python<'_>, path: &Bound<'_, PyAny>) -> PyResult<Py<PyBytes>> {
        let path = convert::extract_path(path)?;
        let data = self.call(py, move |sb| sb.read_file(&path))?;
        Ok(PyBytes::new(py, &data).unbind())
    }

    /// The content of guest file `path` decoded as text.
    #[pyo3(signature = (path, encoding="utf-8", errors="strict"))]
    fn read_text(
        &self,
        py: Python<'_>,
        path: &Bound<'_, PyAny>,
        encoding: &str,
        errors: &str,
    ) -> PyResult<Py<PyAny>> {
        let data = self.read(py, path)?;
        Ok(data
            .bind(py)
            .call_method1("decode", (encoding, errors))?
            .unbind())
    }

    /// Writes `data` (bytes, str as UTF-8, a buffer, or a binary file object read to its end)
    /// as the whole content of guest file `path` (created or truncated). Returns the bytes
    /// written.
    fn write(
        &self,
        py: Python<'_>,
        path: &Bound<'_, PyAny>,
        data: &Bound<'_, PyAny>,
    ) -> PyResult<u64> {
        let path = convert::extract_path(path)?;
        let data = convert::extract_data(data)?;
        self.call(py, move |sb| match data {
            convert::Data::Reader(mut r) => sb.write_file_from(&path, &mut r),
            d => {
                let bytes = d.as_bytes().unwrap_or_default();
                sb.write_file(&path, bytes).map(|()| bytes.len() as u64)
            }
        })
    }

    /// The entries of guest directory `path`, sorted by name.
    #[pyo3(signature = (path=None))]
    fn list(&self, py: Python<'_>, path: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<DirEntry>> {
        let path = match path {
            Some(p) => convert::extract_path(p)?,
            None => "/".to_owned(),
        };
        let entries = self.call(py, move |sb| sb.list_dir(&path))?;
        Ok(entries
            .into_iter()
            .map(|e| DirEntry {
                name: e.name,
                kind: kind_name(e.kind),
                size: e.size,
            })
            .collect())
    }

    /// `FileStat` of guest `path` (a final symlink is not followed).
    fn stat(&self, py: Python<'_>, path: &Bound<'_, PyAny>) -> PyResult<FileStat> {
        let path = convert::extract_path(path)?;
        let st = self.call(py, move |sb| sb.stat(&path))?;
        Ok(FileStat {
            kind: kind_name(st.kind),
            size: st.size,
            mode: st.mode,
            mtime_ns: st.mtime_ns,
        })
    }

    /// Whether guest `path` exists.
    fn exists(&self, py: Python<'_>, path: &Bound<'_, PyAny>) -> PyResult<bool> {
        let path = convert::extract_path(path)?;
        self.call(py, move |sb| sb.file_exists(&path))
    }

    /// Creates guest directory `path` and its missing parents (`mkdir -p`).
    fn mkdir(&self, py: Python<'_>, path: &Bound<'_, PyAny>) -> PyResult<()> {
        let path = convert::extract_path(path)?;
        self.call(py, move |sb| sb.mkdir(&path))
    }

    /// Removes a guest file, symlink or empty directory; `recursive=True` removes a tree
    /// (`rm -rf`, symlinks not followed).
    #[pyo3(signature = (path, *, recursive=false))]
    fn remove(&self, py: Python<'_>, path: &Bound<'_, PyAny>, recursive: bool) -> PyResult<()> {
        let path = convert::extract_path(path)?;
        self.call(py, move |sb| {
            if recursive {
                sb.remove_all(&path)
            } else {
                sb.remove_file(&path)
            }
        })
    }

    /// Renames guest path `src` to `dst`.
    fn rename(
        &self,
        py: Python<'_>,
        src: &Bound<'_, PyAny>,
        dst: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let src = convert::extract_path(src)?;
        let dst = convert::extract_path(dst)?;
        self.call(py, move |sb| sb.rename(&src, &dst))
    }

    /// A round trip to the guest agent (within `timeout` seconds, default `request_timeout`).
    #[pyo3(signature = (timeout=None))]
    fn ping(&self, py: Python<'_>, timeout: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let t = convert::extract_timeout(timeout, "timeout")?;
        self.call(py, move |sb| match t {
            Some(t) => sb.ping_timeout(t),
            None => sb.ping(),
        })
    }

    /// Saves the VM to directory `dir` (created; a snapshot there is replaced). The VM pauses
    /// meanwhile and then continues. `Sandbox.restore(dir)` makes new sandboxes from it.
    fn snapshot(&self, py: Python<'_>, dir: &Bound<'_, PyAny>) -> PyResult<SnapshotInfo> {
        let dir: std::path::PathBuf = dir.extract()?;
        let info = self.call(py, move |sb| sb.snapshot(&dir))?;
        Ok(SnapshotInfo {
            dir: info.dir.display().to_string(),
            state_bytes: info.state_bytes,
            guest_bytes: info.guest_bytes,
            written_bytes: info.written_bytes,
            paused_seconds: info.paused_for.as_secs_f64(),
        })
    }

    /// `n` new sandboxes, each a copy of this one as it is now (they share its memory
    /// copy-on-write; a change in one is invisible to the others). This one keeps running.
    /// Names are `<name>-fork<i>`; deadlines from the keywords.
    #[pyo3(signature = (n, *, boot_timeout=None, request_timeout=None, consumer_deadline=None))]
    fn fork(
        &self,
        py: Python<'_>,
        n: usize,
        boot_timeout: Option<&Bound<'_, PyAny>>,
        request_timeout: Option<&Bound<'_, PyAny>>,
        consumer_deadline: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Vec<PySandbox>> {
        let config = deadlines_config(py, None, boot_timeout, request_timeout, consumer_deadline)?;
        let forks = self.call(py, move |sb| sb.fork_with(n, config))?;
        Ok(forks
            .into_iter()
            .map(|s| PySandbox::wrap(Holder::Own(s)))
            .collect())
    }

    /// Stops the sandbox: later calls raise `SandboxClosedError`, commands still running are
    /// killed, the guest is asked to power off (a pooled sandbox goes back to its pool).
    /// Waits up to 10 s for calls still in flight in other threads; after that the VM stops
    /// as soon as they return. Calling it again does nothing.
    fn shutdown(&self, py: Python<'_>) -> PyResult<()> {
        let Some(h) = lock(&self.slot).take() else {
            return Ok(());
        };
        let running = Arc::clone(&self.running);
        py.detach(move || {
            running.kill_all();
            let deadline = Instant::now() + SHUTDOWN_WAIT;
            let mut h = h;
            loop {
                match Arc::try_unwrap(h) {
                    Ok(holder) => return holder.shutdown(),
                    Err(shared) if Instant::now() >= deadline => {
                        drop(shared);
                        return Ok(());
                    }
                    Err(shared) => {
                        h = shared;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        })
        .map_err(|e| errors::sandbox_err(py, &e))
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.shutdown(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        let state = if self.closed() {
            "closed"
        } else if self.pooled {
            "pooled"
        } else {
            "running"
        };
        format!("<kiln.Sandbox {:?} {state}>", self.name)
    }
}

/// `FileKind` as the Python-side string.
fn kind_name(k: kiln::FileKind) -> &'static str {
    match k {
        kiln::FileKind::File => "file",
        kiln::FileKind::Dir => "dir",
        kiln::FileKind::Symlink => "symlink",
        _ => "other",
    }
}

/// The collected result of `Sandbox.run`.
#[pyclass(module = "kiln", name = "Result", frozen)]
#[derive(Debug)]
pub struct ExecResult {
    /// Everything the command wrote on stdout (up to the output cap).
    #[pyo3(get)]
    stdout: Py<PyBytes>,
    /// Everything it wrote on stderr (up to the output cap).
    #[pyo3(get)]
    stderr: Py<PyBytes>,
    /// Exit code when it exited (`None` when a signal killed it).
    #[pyo3(get)]
    exit_code: Option<i32>,
    /// The signal that killed it, if one did.
    #[pyo3(get)]
    signal: Option<i32>,
    /// Its `timeout` fired and its process group was killed.
    #[pyo3(get)]
    timed_out: bool,
    /// Output beyond `output_cap` was dropped.
    #[pyo3(get)]
    truncated: bool,
    /// Seconds from the request to the exit.
    #[pyo3(get)]
    duration: f64,
}

impl ExecResult {
    fn new(py: Python<'_>, out: &[u8], err: &[u8], s: ExitStatus, took: Duration) -> Self {
        ExecResult {
            stdout: PyBytes::new(py, out).unbind(),
            stderr: PyBytes::new(py, err).unbind(),
            exit_code: s.code,
            signal: s.signal,
            timed_out: s.timed_out,
            truncated: s.truncated,
            duration: took.as_secs_f64(),
        }
    }

    fn status(&self) -> ExitStatus {
        ExitStatus {
            code: self.exit_code,
            signal: self.signal,
            timed_out: self.timed_out,
            truncated: self.truncated,
            ..Default::default()
        }
    }

    fn check_inner(&self, py: Python<'_>, me: &Py<ExecResult>) -> PyResult<()> {
        let s = self.status();
        let class = if s.timed_out {
            ErrorClass::CommandTimeout
        } else if s.success() {
            return Ok(());
        } else {
            ErrorClass::CommandError
        };
        let how = if s.timed_out {
            "timed out and was killed".to_string()
        } else if let Some(sig) = s.signal {
            format!("was killed by signal {sig}")
        } else {
            format!("exited {}", s.shell_code())
        };
        let stderr = self.stderr.bind(py).as_bytes();
        let tail = String::from_utf8_lossy(&stderr[stderr.len().saturating_sub(1024)..]);
        let mut msg = format!("the command {how}");
        if !tail.trim().is_empty() {
            msg.push_str(&format!("; stderr: {}", tail.trim_end()));
        }
        Err(errors::to_pyerr_with_result(
            py,
            ErrorInfo::new(class, msg),
            me.clone_ref(py).into_any(),
        ))
    }
}

#[pymethods]
impl ExecResult {
    /// `True` when the command exited 0.
    #[getter]
    fn ok(&self) -> bool {
        self.status().success()
    }

    /// The exit code in shell convention: the code, or 128 + the signal.
    #[getter]
    fn returncode(&self) -> i32 {
        self.status().shell_code()
    }

    /// stdout decoded as UTF-8 (invalid bytes replaced).
    #[getter]
    fn stdout_text(&self, py: Python<'_>) -> String {
        String::from_utf8_lossy(self.stdout.bind(py).as_bytes()).into_owned()
    }

    /// stderr decoded as UTF-8 (invalid bytes replaced).
    #[getter]
    fn stderr_text(&self, py: Python<'_>) -> String {
        String::from_utf8_lossy(self.stderr.bind(py).as_bytes()).into_owned()
    }

    /// Raises `CommandTimeout` when the timeout fired, `CommandError` when the command did
    /// not exit 0; returns the result otherwise.
    fn check(slf: &Bound<'_, Self>) -> PyResult<Py<Self>> {
        let me = slf.clone().unbind();
        slf.get().check_inner(slf.py(), &me)?;
        Ok(me)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "Result(exit_code={:?}, signal={:?}, timed_out={}, truncated={}, stdout={} bytes, stderr={} bytes)",
            self.exit_code,
            self.signal,
            if self.timed_out { "True" } else { "False" },
            if self.truncated { "True" } else { "False" },
            self.stdout.bind(py).as_bytes().len(),
            self.stderr.bind(py).as_bytes().len()
        )
    }
}

/// One event of a streamed command: `kind` is `"started"` (`pid`), `"stdout"` / `"stderr"`
/// (`data`), or `"exit"` (`exit_code`, `signal`, `timed_out`, `truncated`), always last.
#[pyclass(module = "kiln", name = "Event", frozen)]
#[derive(Debug)]
pub struct Event {
    #[pyo3(get)]
    kind: &'static str,
    /// The output chunk (empty for `started` and `exit`).
    #[pyo3(get)]
    data: Py<PyBytes>,
    /// The guest pid (`started` only).
    #[pyo3(get)]
    pid: Option<u32>,
    #[pyo3(get)]
    exit_code: Option<i32>,
    #[pyo3(get)]
    signal: Option<i32>,
    #[pyo3(get)]
    timed_out: bool,
    #[pyo3(get)]
    truncated: bool,
}

impl Event {
    fn new(py: Python<'_>, ev: ExecEvent) -> Self {
        let mut e = Event {
            kind: "started",
            data: PyBytes::new(py, b"").unbind(),
            pid: None,
            exit_code: None,
            signal: None,
            timed_out: false,
            truncated: false,
        };
        match ev {
            ExecEvent::Started { pid } => e.pid = Some(pid),
            ExecEvent::Stdout(d) => {
                e.kind = "stdout";
                e.data = PyBytes::new(py, &d).unbind();
            }
            ExecEvent::Stderr(d) => {
                e.kind = "stderr";
                e.data = PyBytes::new(py, &d).unbind();
            }
            ExecEvent::Exit(s) => {
                e.kind = "exit";
                e.exit_code = s.code;
                e.signal = s.signal;
                e.timed_out = s.timed_out;
                e.truncated = s.truncated;
            }
        }
        e
    }
}

#[pymethods]
impl Event {
    fn __repr__(&self, py: Python<'_>) -> String {
        match self.kind {
            "started" => format!("Event(started, pid={:?})", self.pid),
            "exit" => format!(
                "Event(exit, exit_code={:?}, signal={:?}, timed_out={})",
                self.exit_code, self.signal, self.timed_out
            ),
            k => format!("Event({k}, {} bytes)", self.data.bind(py).as_bytes().len()),
        }
    }
}

struct StreamState {
    stream: Option<kiln::ExecStream>,
    guard: Option<RunningGuard>,
}

/// A running command's events (`Sandbox.stream`): iterate it; `signal(n)` / `kill()` from
/// any thread.
#[pyclass(module = "kiln", name = "ExecStream", frozen)]
pub struct ExecStream {
    state: Mutex<StreamState>,
    signaller: Option<ExecSignaller>,
    name: String,
    /// Set with the exit (read without the lock, which a waiting reader holds).
    done: AtomicBool,
}

impl std::fmt::Debug for ExecStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecStream")
            .field("vm", &self.name)
            .finish_non_exhaustive()
    }
}

#[pymethods]
impl ExecStream {
    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Event>> {
        // One reader at a time; the others wait (detached) for the lock.
        let next = py.detach(|| {
            let mut st = lock(&self.state);
            let Some(stream) = st.stream.as_mut() else {
                return Ok(None);
            };
            let ev = stream.next_event();
            if !matches!(
                ev,
                Ok(Some(
                    ExecEvent::Started { .. } | ExecEvent::Stdout(_) | ExecEvent::Stderr(_)
                ))
            ) {
                // Exit, end or error: the command is over.
                st.stream = None;
                st.guard = None;
                self.done.store(true, Ordering::Release);
            }
            ev
        });
        match next {
            Ok(ev) => Ok(ev.map(|ev| Event::new(py, ev))),
            Err(e) => Err(errors::sandbox_err(py, &e)),
        }
    }

    /// Sends signal `signum` to the command's process group.
    fn signal(&self, py: Python<'_>, signum: i32) -> PyResult<()> {
        let Some(sig) = self.signaller.clone() else {
            return Ok(()); // it never started; its exit (127/126) is queued
        };
        py.detach(move || sig.signal(signum))
            .map_err(|e| errors::sandbox_err(py, &e))
    }

    /// Kills the command's process group (SIGKILL).
    fn kill(&self, py: Python<'_>) -> PyResult<()> {
        self.signal(py, SIGKILL)
    }

    /// Whether the exit was read (or the stream failed).
    #[getter]
    fn done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    fn __repr__(&self) -> String {
        format!(
            "<kiln.ExecStream in {:?}{}>",
            self.name,
            if self.done() { " done" } else { "" }
        )
    }
}

/// One entry of `Sandbox.list`.
#[pyclass(module = "kiln", name = "DirEntry", frozen)]
#[derive(Debug, Clone)]
pub struct DirEntry {
    #[pyo3(get)]
    name: String,
    /// `"file"`, `"dir"`, `"symlink"` or `"other"`.
    #[pyo3(get)]
    kind: &'static str,
    #[pyo3(get)]
    size: u64,
}

#[pymethods]
impl DirEntry {
    fn __repr__(&self) -> String {
        format!(
            "DirEntry(name={:?}, kind={:?}, size={})",
            self.name, self.kind, self.size
        )
    }
}

/// `Sandbox.stat`'s answer.
#[pyclass(module = "kiln", name = "FileStat", frozen)]
#[derive(Debug, Clone)]
pub struct FileStat {
    /// `"file"`, `"dir"`, `"symlink"` or `"other"`.
    #[pyo3(get)]
    kind: &'static str,
    #[pyo3(get)]
    size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    #[pyo3(get)]
    mode: u32,
    /// Modification time in nanoseconds since the Unix epoch.
    #[pyo3(get)]
    mtime_ns: i64,
}

#[pymethods]
impl FileStat {
    /// Modification time in seconds since the Unix epoch.
    #[getter]
    fn mtime(&self) -> f64 {
        self.mtime_ns as f64 / 1e9
    }

    fn __repr__(&self) -> String {
        format!(
            "FileStat(kind={:?}, size={}, mode=0o{:o}, mtime_ns={})",
            self.kind, self.size, self.mode, self.mtime_ns
        )
    }
}

/// What `Sandbox.snapshot` wrote.
#[pyclass(module = "kiln", name = "SnapshotInfo", frozen)]
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    #[pyo3(get)]
    dir: String,
    #[pyo3(get)]
    state_bytes: u64,
    /// Guest RAM size.
    #[pyo3(get)]
    guest_bytes: u64,
    /// Guest RAM actually written (non-zero pages).
    #[pyo3(get)]
    written_bytes: u64,
    /// How long the vCPUs were paused.
    #[pyo3(get)]
    paused_seconds: f64,
}

#[pymethods]
impl SnapshotInfo {
    fn __repr__(&self) -> String {
        format!(
            "SnapshotInfo(dir={:?}, written_bytes={}, paused_seconds={:.3})",
            self.dir, self.written_bytes, self.paused_seconds
        )
    }
}

/// `_native._bench_exec_rust(sb, n)`: `n` round trips of `exec(["true"])` timed in Rust on
/// `sb` (detached), in seconds — the Rust side of the Python-vs-Rust benchmark.
#[pyfunction]
pub fn _bench_exec_rust(py: Python<'_>, sb: &PySandbox, n: usize) -> PyResult<Vec<f64>> {
    sb.call(py, move |sb| {
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let r = sb.exec(&["true"])?;
            samples.push(t.elapsed().as_secs_f64());
            if !r.success() {
                return Err(SandboxError::Protocol {
                    vm: sb.name().to_owned(),
                    op: "bench",
                    message: format!("`true` ended with {:?}", r.status),
                });
            }
        }
        Ok(samples)
    })
}
