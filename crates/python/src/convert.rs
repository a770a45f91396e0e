//! Python arguments -> Kiln's Rust types: commands (`argv` list or shell string), guest paths
//! (`str`, `bytes`, `os.PathLike`), data (`bytes`-like, `str`, file-like), environments,
//! durations (seconds as `int`/`float` or a `datetime.timedelta`) and the sandbox
//! configuration keywords.
//!
//! The decisions are pure Rust ([`command_argv`], [`seconds`], [`ConfigArgs::to_config`]...),
//! unit-tested without an interpreter; the `extract_*` functions only unwrap Python objects.

use std::io::{self, Read};
use std::path::PathBuf;
use std::time::Duration;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::pybacked::{PyBackedBytes, PyBackedStr};
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyString};

use kiln::SandboxConfig;

/// A command as given to `run`/`stream`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// An argv list, run as is.
    Argv(Vec<String>),
    /// A shell command line, run as `sh -c LINE`.
    Shell(String),
}

/// The argv for `cmd`: a string runs under `sh -c`.
pub fn command_argv(cmd: Command) -> Result<Vec<String>, String> {
    match cmd {
        Command::Shell(line) if line.is_empty() => Err("empty command".into()),
        Command::Shell(line) => Ok(vec!["sh".into(), "-c".into(), line]),
        Command::Argv(argv) if argv.first().is_none_or(String::is_empty) => {
            Err("empty command".into())
        }
        Command::Argv(argv) => Ok(argv),
    }
}

/// A duration of `secs` seconds for `field`; `allow_inf` maps infinity to "forever"
/// (`Duration::MAX`), otherwise it is refused like NaN and negatives.
pub fn seconds(field: &str, secs: f64, allow_inf: bool) -> Result<Duration, String> {
    if secs.is_infinite() && secs > 0.0 && allow_inf {
        return Ok(Duration::MAX);
    }
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!(
            "{field}: {secs} is not a non-negative number of seconds"
        ));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{field}: {secs} s: {e}"))
}

/// An output cap from Python (`None` = unlimited).
pub fn output_cap(cap: Option<i64>) -> Result<Option<u64>, String> {
    cap.map(|c| u64::try_from(c).map_err(|_| format!("output_cap: {c} is negative")))
        .transpose()
}

/// The sandbox configuration keywords, already unwrapped to Rust values (`None` = Kiln's
/// default).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigArgs {
    pub name: Option<String>,
    pub vcpus: Option<i64>,
    pub memory_mib: Option<i64>,
    pub kernel: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    pub extra_cmdline: Option<String>,
    pub quiet_kernel: Option<bool>,
    pub boot_timeout: Option<f64>,
    pub request_timeout: Option<f64>,
    pub consumer_deadline: Option<f64>,
    /// Root-filesystem image: a name in the image store or an image file.
    pub image: Option<String>,
    /// Size of the image's in-RAM overlay, MiB.
    pub overlay_size_mib: Option<i64>,
}

impl ConfigArgs {
    /// The configuration; `Err((field, reason))` for a value that does not even convert (a
    /// negative vCPU count). Range checks are `SandboxConfig::validate`'s, at boot.
    pub fn to_config(&self) -> Result<SandboxConfig, (&'static str, String)> {
        let mut c = SandboxConfig::default();
        if let Some(n) = &self.name {
            c.name = Some(n.clone());
        }
        if let Some(v) = self.vcpus {
            c.vcpus = u32::try_from(v).map_err(|_| ("vcpus", format!("{v} is out of range")))?;
        }
        if let Some(m) = self.memory_mib {
            c.memory_mib =
                u32::try_from(m).map_err(|_| ("memory_mib", format!("{m} MiB is out of range")))?;
        }
        c.kernel = self.kernel.clone().or(c.kernel);
        c.initramfs = self.initramfs.clone().or(c.initramfs);
        if let Some(s) = &self.extra_cmdline {
            c.extra_cmdline = s.clone();
        }
        if let Some(q) = self.quiet_kernel {
            c.quiet_kernel = q;
        }
        if let Some(i) = &self.image {
            c.image = Some(i.clone());
        }
        if let Some(m) = self.overlay_size_mib {
            c.overlay_size_mib = Some(
                u32::try_from(m)
                    .map_err(|_| ("overlay_size_mib", format!("{m} MiB is out of range")))?,
            );
        }
        let dur = |field: &'static str, v: Option<f64>, default: Duration, inf: bool| match v {
            None => Ok(default),
            Some(s) => seconds(field, s, inf).map_err(|r| (field, r)),
        };
        c.boot_timeout = dur("boot_timeout", self.boot_timeout, c.boot_timeout, false)?;
        c.request_timeout = dur(
            "request_timeout",
            self.request_timeout,
            c.request_timeout,
            false,
        )?;
        c.consumer_deadline = dur(
            "consumer_deadline",
            self.consumer_deadline,
            c.consumer_deadline,
            true,
        )?;
        Ok(c)
    }
}

/// A command: `str` (shell line) or a sequence of `str`/path-like arguments.
pub fn extract_command(obj: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
    let cmd = if let Ok(s) = obj.cast::<PyString>() {
        Command::Shell(s.extract::<String>()?)
    } else if obj.is_instance_of::<PyBytes>() || obj.is_instance_of::<PyByteArray>() {
        return Err(PyTypeError::new_err(
            "command must be a str (run by `sh -c`) or a list of str, not bytes",
        ));
    } else {
        let mut argv = Vec::new();
        for item in obj.try_iter().map_err(|_| {
            PyTypeError::new_err("command must be a str (run by `sh -c`) or a list of str")
        })? {
            argv.push(extract_text(&item?, "command argument")?);
        }
        Command::Argv(argv)
    };
    command_argv(cmd).map_err(PyValueError::new_err)
}

/// A guest path: `str`, UTF-8 `bytes` or `os.PathLike`.
pub fn extract_path(obj: &Bound<'_, PyAny>) -> PyResult<String> {
    extract_text(obj, "path")
}

fn extract_text(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<String> {
    if let Ok(s) = obj.cast::<PyString>() {
        return s.extract::<String>();
    }
    if let Ok(b) = obj.cast::<PyBytes>() {
        return String::from_utf8(b.as_bytes().to_vec())
            .map_err(|_| PyValueError::new_err(format!("{what} is not valid UTF-8")));
    }
    if obj.hasattr("__fspath__")? {
        let p = obj.call_method0("__fspath__")?;
        if p.is_instance_of::<PyString>() || p.is_instance_of::<PyBytes>() {
            return extract_text(&p, what);
        }
    }
    Err(PyTypeError::new_err(format!(
        "{what} must be str, bytes or os.PathLike, not {}",
        obj.get_type().name()?
    )))
}

/// Data to write or feed on stdin.
#[derive(Debug)]
pub enum Data {
    /// `bytes` (kept without a copy).
    Bytes(PyBackedBytes),
    /// `str`, UTF-8 encoded (kept without a copy).
    Str(PyBackedStr),
    /// Any other buffer (`bytearray`, `memoryview`...), copied.
    Owned(Vec<u8>),
    /// An object with `read(n)`, read while the data is sent.
    Reader(PyReader),
}

impl Data {
    /// The data as a byte slice, unless it is a reader.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Data::Bytes(b) => Some(b),
            Data::Str(s) => Some(s.as_bytes()),
            Data::Owned(v) => Some(v),
            Data::Reader(_) => None,
        }
    }

    /// The data as owned bytes or a boxed reader.
    pub fn into_stdin(self) -> kiln::StdinSource {
        match self {
            Data::Reader(r) => kiln::StdinSource::Reader(Box::new(r)),
            other => kiln::StdinSource::Bytes(other.as_bytes().unwrap_or_default().to_vec()),
        }
    }
}

/// `bytes`, `str`, a buffer, or a binary file-like object (`read(n)`).
pub fn extract_data(obj: &Bound<'_, PyAny>) -> PyResult<Data> {
    if let Ok(b) = obj.extract::<PyBackedBytes>() {
        // bytes and bytearray
        return Ok(Data::Bytes(b));
    }
    if let Ok(s) = obj.extract::<PyBackedStr>() {
        return Ok(Data::Str(s));
    }
    if obj.hasattr("read")? {
        return Ok(Data::Reader(PyReader(obj.clone().unbind())));
    }
    // memoryview and other buffers: bytes(obj) copies them.
    let py = obj.py();
    let bytes = py.get_type::<PyBytes>().call1((obj,)).map_err(|_| {
        PyTypeError::new_err(format!(
            "data must be bytes, str, a buffer or a binary file object, not {}",
            obj.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))
    })?;
    Ok(Data::Owned(bytes.cast::<PyBytes>()?.as_bytes().to_vec()))
}

/// A Python binary file-like object read from Rust (any thread: each read attaches).
#[derive(Debug)]
pub struct PyReader(Py<PyAny>);

impl Read for PyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Python::attach(|py| {
            let chunk = self
                .0
                .call_method1(py, "read", (buf.len(),))
                .map_err(|e| io::Error::other(e.to_string()))?;
            let chunk = chunk.bind(py);
            if chunk.is_none() {
                return Ok(0);
            }
            let data: PyBackedBytes = chunk.extract().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "read() of the stdin/data object must return bytes",
                )
            })?;
            if data.len() > buf.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "read(n) returned more than n bytes",
                ));
            }
            buf[..data.len()].copy_from_slice(&data);
            Ok(data.len())
        })
    }
}

/// `env=`: a mapping of `str` to `str` (`None` = no additions).
pub fn extract_env(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<(String, String)>> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else {
        return Ok(Vec::new());
    };
    let dict = obj
        .cast::<PyDict>()
        .map_err(|_| PyTypeError::new_err("env must be a dict of str to str"))?;
    let mut env = Vec::with_capacity(dict.len());
    for (k, v) in dict.iter() {
        let (Ok(k), Ok(v)) = (k.extract::<String>(), v.extract::<String>()) else {
            return Err(PyTypeError::new_err("env must be a dict of str to str"));
        };
        env.push((k, v));
    }
    Ok(env)
}

/// Seconds from an `int`, a `float` or a `datetime.timedelta` (`None` stays `None`).
pub fn extract_seconds(obj: Option<&Bound<'_, PyAny>>, field: &str) -> PyResult<Option<f64>> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else {
        return Ok(None);
    };
    if obj.hasattr("total_seconds")? {
        return Ok(Some(obj.call_method0("total_seconds")?.extract()?));
    }
    if obj.is_instance_of::<pyo3::types::PyBool>() {
        return Err(PyTypeError::new_err(format!(
            "{field} must be seconds, not bool"
        )));
    }
    obj.extract::<f64>().map(Some).map_err(|_| {
        PyTypeError::new_err(format!(
            "{field} must be seconds (int or float) or a datetime.timedelta"
        ))
    })
}

/// A timeout argument of a call (`ValueError` when negative).
pub fn extract_timeout(obj: Option<&Bound<'_, PyAny>>, field: &str) -> PyResult<Option<Duration>> {
    extract_seconds(obj, field)?
        .map(|s| seconds(field, s, false).map_err(PyValueError::new_err))
        .transpose()
}

/// A host path for the configuration (`str` or `os.PathLike`).
pub fn extract_host_path(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Option<PathBuf>> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else {
        return Ok(None);
    };
    Ok(Some(obj.extract::<PathBuf>()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_string_runs_under_sh_and_a_list_as_is() {
        assert_eq!(
            command_argv(Command::Shell("echo hi | wc -c".into())).unwrap(),
            ["sh", "-c", "echo hi | wc -c"]
        );
        assert_eq!(
            command_argv(Command::Argv(vec!["ls".into(), "-l".into()])).unwrap(),
            ["ls", "-l"]
        );
        assert!(command_argv(Command::Argv(vec![])).is_err());
        assert!(command_argv(Command::Argv(vec![String::new()])).is_err());
        assert!(command_argv(Command::Shell(String::new())).is_err());
    }

    #[test]
    fn seconds_refuse_negatives_nan_and_unwanted_infinity() {
        assert_eq!(
            seconds("t", 1.5, false).unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(seconds("t", 0.0, false).unwrap(), Duration::ZERO);
        assert!(seconds("t", -1.0, false).unwrap_err().starts_with("t: -1"));
        assert!(seconds("t", f64::NAN, true).is_err());
        assert!(seconds("t", f64::INFINITY, false).is_err());
        assert_eq!(seconds("t", f64::INFINITY, true).unwrap(), Duration::MAX);
        assert!(seconds("t", 1e30, false).is_err(), "overflow");
    }

    #[test]
    fn output_cap_none_is_unlimited() {
        assert_eq!(output_cap(None).unwrap(), None);
        assert_eq!(output_cap(Some(10)).unwrap(), Some(10));
        assert!(output_cap(Some(-1)).is_err());
    }

    #[test]
    fn config_args_default_to_kilns_defaults() {
        assert_eq!(
            ConfigArgs::default().to_config().unwrap(),
            SandboxConfig::default()
        );
        let a = ConfigArgs {
            name: Some("py".into()),
            vcpus: Some(2),
            memory_mib: Some(256),
            boot_timeout: Some(90.0),
            consumer_deadline: Some(f64::INFINITY),
            quiet_kernel: Some(false),
            image: Some("python".into()),
            overlay_size_mib: Some(64),
            ..ConfigArgs::default()
        };
        let c = a.to_config().unwrap();
        assert_eq!(c.image.as_deref(), Some("python"));
        assert_eq!(c.overlay_size_mib, Some(64));
        assert_eq!(c.name.as_deref(), Some("py"));
        assert_eq!((c.vcpus, c.memory_mib), (2, 256));
        assert_eq!(c.boot_timeout, Duration::from_secs(90));
        assert_eq!(c.consumer_deadline, Duration::MAX);
        assert!(!c.quiet_kernel);
    }

    #[test]
    fn unconvertible_config_values_name_their_field() {
        let bad = |a: ConfigArgs| a.to_config().unwrap_err().0;
        assert_eq!(
            bad(ConfigArgs {
                vcpus: Some(-1),
                ..Default::default()
            }),
            "vcpus"
        );
        assert_eq!(
            bad(ConfigArgs {
                memory_mib: Some(1 << 40),
                ..Default::default()
            }),
            "memory_mib"
        );
        assert_eq!(
            bad(ConfigArgs {
                request_timeout: Some(-3.0),
                ..Default::default()
            }),
            "request_timeout"
        );
        assert_eq!(
            bad(ConfigArgs {
                overlay_size_mib: Some(-1),
                ..Default::default()
            }),
            "overlay_size_mib"
        );
        // In range for the type but not for Kiln: validate() says so at boot.
        let c = ConfigArgs {
            vcpus: Some(0),
            ..Default::default()
        }
        .to_config()
        .unwrap();
        assert!(c.validate().is_err());
    }

    #[test]
    fn python_values_convert() {
        Python::initialize();
        Python::attach(|py| {
            let argv = extract_command(&py.eval(c"['ls', '-l']", None, None).unwrap()).unwrap();
            assert_eq!(argv, ["ls", "-l"]);
            let sh = extract_command(&PyString::new(py, "true").into_any()).unwrap();
            assert_eq!(sh, ["sh", "-c", "true"]);
            assert!(extract_command(&PyBytes::new(py, b"ls").into_any()).is_err());
            assert!(extract_command(&py.eval(c"[]", None, None).unwrap()).is_err());

            let p = py
                .eval(
                    c"__import__('pathlib').PurePosixPath('/tmp/a b')",
                    None,
                    None,
                )
                .unwrap();
            assert_eq!(extract_path(&p).unwrap(), "/tmp/a b");
            assert_eq!(
                extract_path(&PyBytes::new(py, b"/x").into_any()).unwrap(),
                "/x"
            );
            assert!(extract_path(&PyBytes::new(py, b"\xff").into_any()).is_err());
            assert!(extract_path(&py.eval(c"3", None, None).unwrap()).is_err());

            let d = extract_data(&PyString::new(py, "h\u{e9}").into_any()).unwrap();
            assert_eq!(d.as_bytes().unwrap(), "h\u{e9}".as_bytes());
            let d = extract_data(&py.eval(c"memoryview(b'abc')[1:]", None, None).unwrap()).unwrap();
            assert_eq!(d.as_bytes().unwrap(), b"bc");
            let d = extract_data(
                &py.eval(c"__import__('io').BytesIO(b'x' * 70000)", None, None)
                    .unwrap(),
            )
            .unwrap();
            let Data::Reader(mut r) = d else {
                panic!("a file object is read")
            };
            let mut all = Vec::new();
            // The reader attaches by itself: run it detached, as the stdin pump does.
            py.detach(|| r.read_to_end(&mut all)).unwrap();
            assert_eq!(all.len(), 70000);

            let env = extract_env(Some(&py.eval(c"{'A': '1'}", None, None).unwrap())).unwrap();
            assert_eq!(env, [("A".to_string(), "1".to_string())]);
            assert!(extract_env(Some(&py.eval(c"{'A': 1}", None, None).unwrap())).is_err());

            let td = py
                .eval(
                    c"__import__('datetime').timedelta(milliseconds=250)",
                    None,
                    None,
                )
                .unwrap();
            assert_eq!(
                extract_timeout(Some(&td), "timeout").unwrap(),
                Some(Duration::from_millis(250))
            );
            let neg = py.eval(c"-1", None, None).unwrap();
            assert!(extract_timeout(Some(&neg), "timeout").is_err());
            let t = py.eval(c"True", None, None).unwrap();
            assert!(extract_seconds(Some(&t), "timeout").is_err());
        });
    }
}
