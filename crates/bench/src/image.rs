//! `kiln-bench image` and `kiln-bench image-formats`: the measuring halves of
//! `cargo xtask bench image` (xtask/src/bench/image.rs).
//!
//! `kiln-bench image` runs where Linux guests boot (inside the harness's L1 here) and prints
//! raw samples ([`ImageSamples`], ms) as one JSON document:
//! - cold boots until the agent's handshake (`Sandbox::create`) of the initramfs guest and of
//!   the python image (ext4, and the EROFS file of the same tree when given), taking turns;
//! - `python3 -c pass` round trips in one warm python sandbox;
//! - sequential reads of a file (`dd bs=1M`) on an ext4 disk given with `--seq-image`, in a
//!   Kiln initramfs sandbox (the disk read-only, `/dev/vda`) and in the QEMU microvm peer
//!   with `virtio-blk-device` on the same file (`readonly=on`, QEMU's default cache), the two
//!   taking turns, the guest page cache dropped before every read.
//!
//! Every image file is first copied to a private directory under `/tmp` (L1's tmpfs), so
//! that both VMMs read the same file from the same page cache rather than through the 9p
//! share of the harness.
//!
//! `kiln-bench image-formats` makes the image of one directory tree in both formats
//! (`kiln_image::format::make_image`, exactly what a build does) and reports the time and the
//! file size of each ([`FormatSamples`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use kiln::{ExecResult, Sandbox, SandboxConfig, DEFAULT_OUTPUT_CAP};
use kiln_image::ImageFormat;
use kiln_proto::ExecRequest;
use kiln_testkit::stats::ms;
use serde::{Deserialize, Serialize};

use super::exec::qemu::{QemuPeer, QemuPeerError};
use super::exit;

/// Raw samples of `kiln-bench image` (ms unless named otherwise).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageSamples {
    /// Create until the handshake, initramfs guest.
    pub boot_initramfs_ms: Vec<f64>,
    /// Create until the handshake, the python image (ext4).
    pub boot_python_ms: Vec<f64>,
    /// Create until the handshake, the same tree as EROFS (empty without `--erofs`).
    pub boot_python_erofs_ms: Vec<f64>,
    /// `python3 -c pass` exec round trips in a warm python sandbox.
    pub python_pass_ms: Vec<f64>,
    /// Sequential read of the file in Kiln (exec of `dd`, host clock).
    pub seq_read_kiln_ms: Vec<f64>,
    /// The same in the QEMU peer.
    pub seq_read_qemu_ms: Vec<f64>,
    /// Bytes of one sequential read.
    pub seq_read_bytes: u64,
    /// Why the QEMU peer is missing or incomplete.
    pub qemu_error: Option<String>,
    /// Why the EROFS image did not boot.
    #[serde(default)]
    pub erofs_error: Option<String>,
}

/// Samples of `kiln-bench image-formats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FormatSamples {
    /// Bytes of file content in the tree.
    pub tree_bytes: u64,
    /// Seconds to make the ext4 image, per run.
    pub ext4_make_s: Vec<f64>,
    /// The ext4 image's size.
    pub ext4_bytes: u64,
    /// Seconds to make the EROFS image, per run.
    pub erofs_make_s: Vec<f64>,
    /// The EROFS image's size.
    pub erofs_bytes: u64,
}

/// `kiln-bench image` arguments.
#[derive(Debug, Args)]
pub struct ImageBenchArgs {
    /// The python image file (ext4).
    #[arg(long, value_name = "FILE")]
    pub python: PathBuf,
    /// The same tree as an EROFS image (boots measured beside ext4's).
    #[arg(long, value_name = "FILE")]
    pub erofs: Option<PathBuf>,
    /// An ext4 image holding `/big` for the sequential read.
    #[arg(long, value_name = "FILE")]
    pub seq_image: Option<PathBuf>,
    /// Cold boots of each guest.
    #[arg(long, default_value_t = 5)]
    pub boots: usize,
    /// Measured `python3 -c pass` round trips.
    #[arg(long, default_value_t = 20)]
    pub iterations: usize,
    /// Unmeasured round trips first.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Sequential reads on each VMM.
    #[arg(long, default_value_t = 5)]
    pub reads: usize,
    /// Guest memory in MiB (both VMMs).
    #[arg(long, default_value_t = 512)]
    pub memory: u32,
    /// The QEMU binary of the sequential-read peer.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// vsock CID of the QEMU guest.
    #[arg(long, default_value_t = 7)]
    pub qemu_cid: u32,
    /// Write the JSON here instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// `kiln-bench image-formats` arguments.
#[derive(Debug, Args)]
pub struct FormatsArgs {
    /// The root directory tree to make images of.
    #[arg(long, value_name = "DIR")]
    pub tree: PathBuf,
    /// Where the images go (`bench.ext4`, `bench.erofs`; kept for the boot comparison).
    #[arg(long, value_name = "DIR")]
    pub out_dir: PathBuf,
    /// Runs of each format.
    #[arg(long, default_value_t = 2)]
    pub runs: usize,
    /// Write the JSON here instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// What can go wrong in the image benchmark.
#[derive(Debug, thiserror::Error)]
pub enum ImageBenchError {
    /// A sandbox operation failed.
    #[error(transparent)]
    Sandbox(#[from] kiln::SandboxError),
    /// A file operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A guest command did not do what it should.
    #[error("{what}: {detail}")]
    Guest {
        /// Which command.
        what: &'static str,
        /// Its status and output.
        detail: String,
    },
    /// Making an image failed.
    #[error(transparent)]
    Image(#[from] kiln_image::ImageError),
    /// Encoding the samples failed.
    #[error("encoding the samples: {0}")]
    Json(#[from] serde_json::Error),
}

impl ImageBenchError {
    fn code(&self) -> i32 {
        match self {
            Self::Sandbox(e) => exit::for_error(e),
            _ => exit::INTERNAL,
        }
    }
}

/// Deadline of one QEMU boot.
const QEMU_BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// Deadline of one guest command.
const EXEC_TIMEOUT: Duration = Duration::from_secs(300);
/// Where the sequential-read disk is mounted in the guest.
const MNT: &str = "/tmp/kiln-seq";
/// The file read on that disk.
const SEQ_FILE: &str = "big";

/// Runs `kiln-bench image`; returns the exit code.
pub fn image_bench(args: &ImageBenchArgs) -> i32 {
    finish(measure(args), args.out.as_deref())
}

/// Runs `kiln-bench image-formats`; returns the exit code.
pub fn image_formats(args: &FormatsArgs) -> i32 {
    finish(formats(args), args.out.as_deref())
}

fn finish<T: Serialize>(r: Result<T, ImageBenchError>, out: Option<&Path>) -> i32 {
    let r = r.and_then(|s| Ok(serde_json::to_string(&s)?));
    match r {
        Ok(json) => match out {
            Some(path) => match std::fs::write(path, json + "\n") {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("kiln: error: writing {}: {e}", path.display());
                    exit::INTERNAL
                }
            },
            None => {
                println!("{json}");
                0
            }
        },
        Err(e) => {
            eprintln!("kiln: error: {e}");
            e.code()
        }
    }
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ImageBenchError {
    let path = path.to_path_buf();
    move |source| ImageBenchError::Io { what, path, source }
}

/// A private directory under `/tmp`, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Self, ImageBenchError> {
        let dir = std::env::temp_dir().join(format!("kiln-bench-image-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        Ok(Self(dir))
    }

    /// Copies `src` in; returns the copy.
    fn copy(&self, src: &Path, name: &str) -> Result<PathBuf, ImageBenchError> {
        let dst = self.0.join(name);
        eprintln!(
            "kiln-bench image: copying {} to {}",
            src.display(),
            dst.display()
        );
        std::fs::copy(src, &dst).map_err(io("copying", src))?;
        Ok(dst)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config(args: &ImageBenchArgs, name: &str) -> SandboxConfig {
    SandboxConfig::new().name(name).memory_mib(args.memory)
}

fn check(what: &'static str, r: &ExecResult) -> Result<(), ImageBenchError> {
    if r.status.code == Some(0) {
        Ok(())
    } else {
        Err(ImageBenchError::Guest {
            what,
            detail: format!(
                "exited with {:?}: {} {}",
                r.status,
                String::from_utf8_lossy(&r.stdout),
                String::from_utf8_lossy(&r.stderr)
            ),
        })
    }
}

/// Shell line that mounts the read-only sequential-read disk.
fn mount_script() -> String {
    format!(
        "mkdir -p {MNT} && mount -t ext4 -o ro,noload /dev/vda {MNT} && test -f {MNT}/{SEQ_FILE}"
    )
}

/// Shell line of one cold sequential read (guest page cache dropped first).
fn read_script() -> String {
    format!("sync; echo 3 > /proc/sys/vm/drop_caches; dd if={MNT}/{SEQ_FILE} of=/dev/null bs=1M")
}

fn measure(args: &ImageBenchArgs) -> Result<ImageSamples, ImageBenchError> {
    let scratch = Scratch::new()?;
    let python = scratch.copy(&args.python, "python.ext4")?;
    let mut erofs = match &args.erofs {
        Some(p) => Some(scratch.copy(p, "python.erofs")?),
        None => None,
    };
    let mut out = ImageSamples::default();

    // Cold boots, taking turns.
    for i in 0..args.boots {
        eprintln!("kiln-bench image: boots, round {}/{}", i + 1, args.boots);
        let t = Instant::now();
        let sb = Sandbox::create(config(args, "bench-image-initramfs"))?;
        out.boot_initramfs_ms.push(ms(t.elapsed()));
        drop(sb);
        let t = Instant::now();
        let sb = Sandbox::create(
            config(args, "bench-image-python").image(python.display().to_string()),
        )?;
        out.boot_python_ms.push(ms(t.elapsed()));
        drop(sb);
        if let Some(e) = &erofs {
            let t = Instant::now();
            match Sandbox::create(config(args, "bench-image-erofs").image(e.display().to_string()))
            {
                Ok(sb) => {
                    out.boot_python_erofs_ms.push(ms(t.elapsed()));
                    drop(sb);
                }
                // The EROFS figure is a comparison: its failure does not void the rest.
                Err(e) => {
                    eprintln!("kiln-bench image: the EROFS image did not boot: {e}");
                    out.erofs_error = Some(e.to_string());
                    erofs = None;
                }
            }
        }
    }

    // python3 -c pass, warm.
    {
        eprintln!("kiln-bench image: python3 -c pass x {}", args.iterations);
        let sb =
            Sandbox::create(config(args, "bench-image-pass").image(python.display().to_string()))?;
        for i in 0..args.warmup + args.iterations {
            let t = Instant::now();
            let r = sb.exec(&["python3", "-c", "pass"])?;
            let d = ms(t.elapsed());
            check("python3 -c pass", &r)?;
            if i >= args.warmup {
                out.python_pass_ms.push(d);
            }
        }
    }
    drop(python);
    drop(erofs);

    if let Some(seq) = &args.seq_image {
        seq_reads(args, &scratch.copy(seq, "seq.ext4")?, &mut out)?;
    }
    Ok(out)
}

/// The sequential reads, Kiln and QEMU taking turns.
fn seq_reads(
    args: &ImageBenchArgs,
    disk: &Path,
    out: &mut ImageSamples,
) -> Result<(), ImageBenchError> {
    let sb = Sandbox::create(config(args, "bench-image-seq").disk(disk, true))?;
    check("mount in kiln", &sb.exec(&["sh", "-c", &mount_script()])?)?;
    let size = sb.exec(&["stat", "-c", "%s", &format!("{MNT}/{SEQ_FILE}")])?;
    check("stat", &size)?;
    out.seq_read_bytes = String::from_utf8_lossy(&size.stdout)
        .trim()
        .parse()
        .unwrap_or(0);

    let resolved = SandboxConfig::new()
        .validate()
        .map_err(kiln::SandboxError::from)?;
    let peer = QemuPeer {
        qemu: args.qemu.clone(),
        kernel: resolved.kernel,
        initramfs: resolved.initramfs,
        vcpus: 1,
        memory_mib: args.memory,
        cid: args.qemu_cid,
        extra_cmdline: resolved.extra_cmdline,
        boot_timeout: QEMU_BOOT_TIMEOUT,
        extra_args: vec![
            "-drive".into(),
            format!(
                "id=seq,file={},format=raw,if=none,readonly=on",
                disk.display()
            ),
            "-device".into(),
            "virtio-blk-device,drive=seq".into(),
        ],
    };
    let qemu = peer.check_host().and_then(|()| peer.boot());
    let mut qemu = match qemu {
        Ok(g) => Some(g),
        Err(e) => {
            out.qemu_error = Some(e.to_string());
            None
        }
    };
    let qemu_exec =
        |g: &mut super::exec::qemu::QemuGuest, script: &str| -> Result<(), QemuPeerError> {
            let mut req = ExecRequest::new(["sh", "-c", script]);
            req.output_cap = Some(DEFAULT_OUTPUT_CAP);
            req.timeout_ms = Some(EXEC_TIMEOUT.as_millis() as u64);
            let r = g.client()?.exec(req);
            match r {
                Ok(r) if r.status.code == Some(0) => Ok(()),
                Ok(r) => Err(g.request_error(
                    "exec",
                    format!(
                        "{script:?} exited with {:?}: {}",
                        r.status,
                        String::from_utf8_lossy(&r.stderr)
                    ),
                )),
                Err(e) => Err(g.request_error("exec", e)),
            }
        };
    if let Some(g) = qemu.as_mut() {
        if let Err(e) = qemu_exec(g, &mount_script()) {
            out.qemu_error = Some(e.to_string());
            qemu = None;
        }
    }
    let script = read_script();
    for i in 0..args.reads {
        eprintln!("kiln-bench image: sequential read {}/{}", i + 1, args.reads);
        let t = Instant::now();
        let r = sb.exec(&["sh", "-c", &script])?;
        let d = ms(t.elapsed());
        check("dd in kiln", &r)?;
        out.seq_read_kiln_ms.push(d);
        if let Some(g) = qemu.as_mut() {
            let t = Instant::now();
            match qemu_exec(g, &script) {
                Ok(()) => out.seq_read_qemu_ms.push(ms(t.elapsed())),
                Err(e) => {
                    out.qemu_error = Some(e.to_string());
                    qemu = None;
                }
            }
        }
    }
    Ok(())
}

fn formats(args: &FormatsArgs) -> Result<FormatSamples, ImageBenchError> {
    let mut out = FormatSamples {
        tree_bytes: kiln_image::format::tree_size(&args.tree)?.bytes,
        ..FormatSamples::default()
    };
    std::fs::create_dir_all(&args.out_dir).map_err(io("creating", &args.out_dir))?;
    for i in 0..args.runs {
        for format in [ImageFormat::Ext4, ImageFormat::Erofs] {
            let name = match format {
                ImageFormat::Ext4 => "bench.ext4",
                ImageFormat::Erofs => "bench.erofs",
            };
            let file = args.out_dir.join(name);
            let _ = std::fs::remove_file(&file);
            eprintln!(
                "kiln-bench image-formats: {name}, run {}/{}",
                i + 1,
                args.runs
            );
            let t = Instant::now();
            kiln_image::format::make_image(format, &args.tree, &file)?;
            let secs = t.elapsed().as_secs_f64();
            let size = std::fs::metadata(&file).map_err(io("stat", &file))?.len();
            match format {
                ImageFormat::Ext4 => {
                    out.ext4_make_s.push(secs);
                    out.ext4_bytes = size;
                }
                ImageFormat::Erofs => {
                    out.erofs_make_s.push(secs);
                    out.erofs_bytes = size;
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_read_drops_the_guest_cache_and_reads_the_mounted_file() {
        let s = read_script();
        assert!(s.contains("drop_caches"));
        assert!(s.find("drop_caches") < s.find("dd if="));
        assert!(s.contains(&format!("{MNT}/{SEQ_FILE}")));
        assert!(mount_script().contains("ro,noload /dev/vda"));
    }

    #[test]
    fn samples_round_trip_through_json() {
        let s = ImageSamples {
            boot_python_ms: vec![1.0],
            seq_read_bytes: 5,
            qemu_error: Some("x".into()),
            ..ImageSamples::default()
        };
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<ImageSamples>(&j).unwrap(), s);
    }
}
