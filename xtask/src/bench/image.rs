//! `cargo xtask bench image [--formats] [--json]`: guest images (docs/IMAGES.md, "Benchmark").
//!
//! Host side (no VM): builds the release `kiln-bench` and `kiln`, finds (or builds once) the
//! shared `python` image, extracts its tree (`debugfs rdump`) under `<target>/bench/image/`,
//! makes the 256 MiB sequential-read disk there (cached), then measures
//! - `image.build_warm`: `kiln image build python` with nothing changed, in a private store
//!   holding a hard link of the shared image (never the shared store itself);
//! - `image.build_warm_small`: the small recipe again right after its cold build;
//! - `image.build_cold`: `kiln image build --recipe bench-small.toml` of a small recipe
//!   (xtask/src/bench/image-small.toml) into a fresh private store (downloads included);
//! - `image.pull`: `kiln image pull localhost:PORT/python-tree:bench` into a fresh private
//!   store, from a `docker-registry` on loopback holding the python tree as one gzip layer
//!   (made with umoci, pushed with skopeo);
//! - with `--formats`: `kiln-bench image-formats` (the time and size of making the python
//!   tree's image in each format, the step in which a build of each format differs).
//!
//! Then `kiln-bench image` (inside the harness on this host kind) measures the boots
//! (`image.boot_initramfs`, `image.boot_python`, with `--formats` `image.boot_python_erofs` of
//! the same tree), `image.python_pass` and the sequential reads `image.seq_read_kiln` /
//! `image.seq_read_qemu` (MiB/s, Kiln's row with its ratio to QEMU's virtio-blk).
//!
//! Nothing here is part of `cargo xtask test`; the shared `python` image is only read.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::{
    format_row, metric_stats as stats, note, read_samples, samples_file, Format, PeerRatio, Stats,
};
use crate::{build_guest, kernel, util};

/// Cold boots of each guest.
const BOOTS: usize = 4;
/// Measured `python3 -c pass` round trips.
const ITERATIONS: usize = 20;
/// Sequential reads on each VMM.
const READS: usize = 3;
/// Warm builds.
const WARM_BUILDS: usize = 3;
/// Cold builds of the small recipe (per format).
const COLD_BUILDS: usize = 1;
/// Pulls.
const PULLS: usize = 2;
/// Runs of each format's mkfs.
const FORMAT_RUNS: usize = 1;
/// Size of the sequential-read file.
const SEQ_BYTES: u64 = 256 << 20;
/// Deadline of the harness part.
const TIMEOUT: Duration = Duration::from_secs(40 * 60);
/// The small recipe of the cold build.
const SMALL_RECIPE: &str = include_str!("image-small.toml");
const TAG: &str = "bench image: ";

/// Samples of `kiln-bench image` (crates/bench/src/image.rs `ImageSamples`).
#[derive(Debug, Default, Deserialize)]
struct GuestSamples {
    boot_initramfs_ms: Vec<f64>,
    boot_python_ms: Vec<f64>,
    #[serde(default)]
    boot_python_erofs_ms: Vec<f64>,
    python_pass_ms: Vec<f64>,
    #[serde(default)]
    seq_read_kiln_ms: Vec<f64>,
    #[serde(default)]
    seq_read_qemu_ms: Vec<f64>,
    #[serde(default)]
    seq_read_bytes: u64,
    #[serde(default)]
    qemu_error: Option<String>,
    #[serde(default)]
    erofs_error: Option<String>,
}

/// Samples of `kiln-bench image-formats` (`FormatSamples`).
#[derive(Debug, Default, Serialize, Deserialize)]
struct FormatSamples {
    tree_bytes: u64,
    ext4_make_s: Vec<f64>,
    ext4_bytes: u64,
    erofs_make_s: Vec<f64>,
    erofs_bytes: u64,
}

/// Host-side timings (s).
#[derive(Debug, Default, Serialize, Deserialize)]
struct HostSamples {
    build_warm_s: Vec<f64>,
    build_warm_small_s: Vec<f64>,
    build_cold_s: Vec<f64>,
    build_cold_erofs_s: Vec<f64>,
    pull_s: Vec<f64>,
    formats: Option<FormatSamples>,
}

/// Runs the image benchmark.
pub fn run(format: Format, with_formats: bool) -> Result<()> {
    let k = kernel::ensure()?;
    let g = build_guest::ensure()?;
    eprintln!("{TAG}building kiln-bench and kiln (release)");
    let release = util::target_dir().join("release");
    let bench = util::cargo_build(
        "kiln-bench and kiln",
        &[
            "build",
            "--release",
            "-p",
            "kiln-bench",
            "--bin",
            "kiln-bench",
            "-p",
            "kiln-cli",
            "--bin",
            "kiln",
        ],
        release.join("kiln-bench"),
    )?;
    let kiln = release.join("kiln");
    let python =
        crate::run::ensure_image(&kiln, "python")?.context("the python image has no file")?;

    let work = util::target_dir().join("bench").join("image");
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let seq = seq_image(&work)?;
    // `KILN_BENCH_IMAGE_PHASE=host` runs the host side only (no VM, no harness slot) and
    // keeps its samples in `host.json`; `=guest` then runs the VM side and reports both.
    let phase = std::env::var("KILN_BENCH_IMAGE_PHASE").unwrap_or_default();
    let host_file = work.join("host.json");
    let host: HostSamples = if phase == "guest" {
        read_samples(&host_file)?
    } else {
        let bundle = work.join("bundle");
        extract_tree(&python, &bundle)?;
        let mut host = HostSamples::default();
        let r = host_side(
            &kiln,
            &python,
            &bench,
            &work,
            &bundle,
            with_formats,
            &mut host,
        );
        // The tree and the bundle are ~300 MB; the images made from it stay for the boots.
        let _ = fs::remove_dir_all(&bundle);
        r?;
        fs::write(&host_file, serde_json::to_string(&host)?)?;
        host
    };
    if phase == "host" {
        eprintln!("{TAG}host side done: {}", host_file.display());
        eprintln!("{host:?}");
        return Ok(());
    }

    let (boot_image, erofs) = if with_formats {
        (work.join("bench.ext4"), Some(work.join("bench.erofs")))
    } else {
        (python.clone(), None)
    };
    let out = samples_file("image-kiln.json")?;
    let mut argv: Vec<String> = vec![
        bench.display().to_string(),
        "image".into(),
        "--python".into(),
        boot_image.display().to_string(),
        "--seq-image".into(),
        seq.display().to_string(),
        "--boots".into(),
        BOOTS.to_string(),
        "--iterations".into(),
        ITERATIONS.to_string(),
        "--reads".into(),
        READS.to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    if let Some(e) = &erofs {
        argv.extend(["--erofs".into(), e.display().to_string()]);
    }
    let status = util::run_here_or_in_harness(
        TAG,
        " (software-emulation numbers: compare ratios, not absolute values)",
        argv,
        util::guest_env(&k.vmlinux, &g.initramfs),
        Some(TIMEOUT),
    )?;
    if status != 0 {
        bail!("kiln-bench image failed with status {status}");
    }
    let s: GuestSamples = read_samples(&out)?;
    for row in rows(&s, &host, format)? {
        println!("{row}");
    }
    if let Some(f) = &host.formats {
        note(
            format,
            TAG,
            &format!(
                "image.format sizes: tree {} MiB of content, ext4 {} MiB, erofs (lz4hc) {} MiB",
                f.tree_bytes >> 20,
                f.ext4_bytes >> 20,
                f.erofs_bytes >> 20
            ),
        );
    }
    if let Some(e) = &s.erofs_error {
        eprintln!("{TAG}the EROFS image did not boot: {e}");
    }
    if let Some(e) = &s.qemu_error {
        eprintln!("{TAG}QEMU virtio-blk peer incomplete: {e}");
    }
    Ok(())
}

/// The host-side measurements.
fn host_side(
    kiln: &Path,
    python: &Path,
    bench: &Path,
    work: &Path,
    bundle: &Path,
    with_formats: bool,
    host: &mut HostSamples,
) -> Result<()> {
    let tree = &bundle.join("b").join("rootfs");
    // Warm builds of python in a private store holding a hard link of the shared image (a
    // Debian update since it was built would make this a real build: it must never touch the
    // shared store). The first run fetches the private store's package index, unmeasured.
    let warm = private_python_store(python, &work.join("warm-store"))?;
    let mut c = Command::new("timeout");
    c.env("KILN_ASSETS_DIR", &warm)
        .arg("300")
        .arg(kiln)
        .args(["image", "build", "python"]);
    match timed(&mut c) {
        Ok(_) => {
            for i in 0..WARM_BUILDS {
                eprintln!("{TAG}warm build {}/{WARM_BUILDS}", i + 1);
                let mut c = Command::new(kiln);
                c.env("KILN_ASSETS_DIR", &warm)
                    .args(["image", "build", "python"]);
                host.build_warm_s.push(timed(&mut c)?);
            }
        }
        Err(e) => eprintln!("{TAG}no warm python build figure: {e:#}"),
    }
    let _ = fs::remove_dir_all(&warm);

    if with_formats {
        let out = work.join("formats.json");
        util::run(
            Command::new(bench)
                .arg("image-formats")
                .arg("--tree")
                .arg(tree)
                .arg("--out-dir")
                .arg(work)
                .arg("--runs")
                .arg(FORMAT_RUNS.to_string())
                .arg("--out")
                .arg(&out),
        )?;
        host.formats = Some(read_samples(&out)?);
    }

    let recipe = work.join("bench-small.toml");
    fs::write(&recipe, SMALL_RECIPE).with_context(|| format!("writing {}", recipe.display()))?;
    // EROFS's cold build would differ from ext4's only by the mkfs step, which
    // `image-formats` measures on its own (mmdebstrap dominates a cold build).
    let formats: &[&str] = &["ext4"];
    for fmt in formats {
        for i in 0..COLD_BUILDS {
            eprintln!(
                "{TAG}cold build of bench-small ({fmt}) {}/{COLD_BUILDS}",
                i + 1
            );
            let store = fresh_dir(&work.join("cold-store"))?;
            let mut c = Command::new(kiln);
            c.env("KILN_ASSETS_DIR", &store)
                .args(["image", "build", "--format", fmt, "--recipe"])
                .arg(&recipe)
                .arg("bench-small");
            let secs = timed(&mut c);
            if *fmt == "ext4" && secs.is_ok() {
                // The same recipe again in the same store: nothing changed.
                let mut c = Command::new(kiln);
                c.env("KILN_ASSETS_DIR", &store)
                    .args(["image", "build", "--format", fmt, "--recipe"])
                    .arg(&recipe)
                    .arg("bench-small");
                host.build_warm_small_s.push(timed(&mut c)?);
            }
            let _ = fs::remove_dir_all(&store);
            match *fmt {
                "erofs" => host.build_cold_erofs_s.push(secs?),
                _ => host.build_cold_s.push(secs?),
            }
        }
    }

    let reg = Registry::start(work)?;
    let layout = bundle.join("layout");
    util::run(
        Command::new("umoci")
            .args(["repack", "--image"])
            .arg(format!("{}:bench", layout.display()))
            .arg(bundle.join("b")),
    )?;
    util::run(Command::new("skopeo").args([
        "--insecure-policy",
        "copy",
        "--dest-tls-verify=false",
        "--quiet",
        &format!("oci:{}:bench", layout.display()),
        &format!("docker://127.0.0.1:{}/python-tree:bench", reg.port),
    ]))?;
    let reference = format!("localhost:{}/python-tree:bench", reg.port);
    for i in 0..PULLS {
        eprintln!("{TAG}pull {}/{PULLS}", i + 1);
        let store = fresh_dir(&work.join("pull-store"))?;
        let mut c = Command::new(kiln);
        c.env("KILN_ASSETS_DIR", &store)
            .args(["image", "pull"])
            .arg(&reference);
        let secs = timed(&mut c);
        let _ = fs::remove_dir_all(&store);
        host.pull_s.push(secs?);
    }
    Ok(())
}

/// A store at `dir` whose `python` is a hard link of the shared image (same key, so a build
/// with nothing changed finds it), for builds that must not touch the shared store.
fn private_python_store(image: &Path, dir: &Path) -> Result<PathBuf> {
    let key_dir = image
        .parent()
        .context("the python image has no directory")?;
    let key = key_dir
        .file_name()
        .and_then(|k| k.to_str())
        .context("the python image's key is not UTF-8")?;
    let store = fresh_dir(dir)?;
    let images = store.join("images");
    let dst = images.join("images").join(key);
    fs::create_dir_all(&dst)?;
    fs::copy(key_dir.join("image.json"), dst.join("image.json"))?;
    let file = image
        .file_name()
        .context("the python image has no file name")?;
    fs::hard_link(image, dst.join(file))
        .or_else(|_| fs::copy(image, dst.join(file)).map(|_| ()))
        .with_context(|| format!("linking {} into {}", image.display(), dst.display()))?;
    fs::write(
        images.join("index.json"),
        format!("{{\"schema\":1,\"names\":{{\"python\":\"{key}\"}}}}\n"),
    )?;
    Ok(store)
}

/// Runs `cmd` (output discarded unless it fails) and returns its wall time in seconds.
fn timed(cmd: &mut Command) -> Result<f64> {
    let t = Instant::now();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", util::display_cmd(cmd)))?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            util::display_cmd(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(secs)
}

fn fresh_dir(dir: &Path) -> Result<PathBuf> {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir.to_path_buf())
}

/// The ext4 disk with `/big` (256 MiB of pseudo-random bytes, so nothing is sparse or
/// compressible), made once.
fn seq_image(work: &Path) -> Result<PathBuf> {
    let img = work.join("seq.ext4");
    if img.is_file() {
        return Ok(img);
    }
    let dir = fresh_dir(&work.join("seq-tree"))?;
    let big = dir.join("big");
    let mut f = fs::File::create(&big).with_context(|| format!("creating {}", big.display()))?;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..SEQ_BYTES / buf.len() as u64 {
        for chunk in buf.chunks_exact_mut(8) {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf)?;
    }
    f.sync_all()?;
    drop(f);
    let tmp = work.join("seq.ext4.tmp");
    let _ = fs::remove_file(&tmp);
    util::run(
        Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-t",
                "ext4",
                "-b",
                "4096",
                "-m",
                "0",
                "-O",
                "^has_journal",
                "-d",
            ])
            .arg(&dir)
            .arg(&tmp)
            .arg("300M"),
    )?;
    fs::rename(&tmp, &img)?;
    let _ = fs::remove_dir_all(&dir);
    Ok(img)
}

/// An OCI bundle of the python image's tree: `umoci init/new/unpack` of an empty image, then
/// `debugfs rdump` of the image into `bundle/b/rootfs` (read only, no mount needed). The layout
/// is `bundle/layout`, the tree `bundle/b/rootfs`.
fn extract_tree(image: &Path, bundle: &Path) -> Result<()> {
    let _ = fs::remove_dir_all(bundle);
    fs::create_dir_all(bundle)?;
    let layout = bundle.join("layout");
    let l = layout.display().to_string();
    util::run(Command::new("umoci").args(["init", "--layout", &l]))?;
    util::run(Command::new("umoci").args(["new", "--image", &format!("{l}:bench")]))?;
    util::run(
        Command::new("umoci")
            .args(["unpack", "--image", &format!("{l}:bench")])
            .arg(bundle.join("b")),
    )?;
    let root = bundle.join("b").join("rootfs");
    eprintln!("{TAG}extracting the python tree into {}", root.display());
    // `rdump / DIR` dumps the root's entries one by one into DIR.
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", root.display()))
        .arg(image)
        .output()
        .context("running debugfs")?;
    if !out.status.success() {
        bail!(
            "debugfs rdump failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if !root.join("usr/bin").is_dir() {
        bail!(
            "debugfs rdump of {} left no usr/bin in {}: {}",
            image.display(),
            root.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // debugfs dumps lost+found too; an image has no use for it.
    let _ = fs::remove_dir_all(root.join("lost+found"));
    Ok(())
}

/// A `docker-registry` on a free loopback port, killed on drop.
struct Registry {
    port: u16,
    child: Child,
}

impl Registry {
    fn start(work: &Path) -> Result<Self> {
        let dir = fresh_dir(&work.join("registry"))?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let cfg = dir.join("config.yml");
        fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n",
                dir.join("data").display()
            ),
        )?;
        let log = fs::File::create(dir.join("registry.log"))?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting docker-registry (Debian package docker-registry)")?;
        let reg = Registry { port, child };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
                let mut buf = [0u8; 16];
                if matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"HTTP/1.")) {
                    return Ok(reg);
                }
            }
            if Instant::now() > deadline {
                bail!("docker-registry did not answer on 127.0.0.1:{port} within 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// MiB/s of each read.
fn throughput(bytes: u64, ms: &[f64]) -> Vec<f64> {
    ms.iter()
        .filter(|&&m| m > 0.0)
        .map(|m| bytes as f64 / f64::from(1u32 << 20) / (m / 1000.0))
        .collect()
}

fn row_vs(
    out: &mut Vec<String>,
    name: &str,
    unit: &str,
    ours: &Stats,
    theirs: Option<&Stats>,
    peer: &str,
    format: Format,
) {
    let ratio = theirs.map(|t| PeerRatio {
        peer: peer.into(),
        ratio: ours.median / t.median,
    });
    out.push(format_row(name, unit, ours, ratio.as_ref(), format));
}

/// The report rows.
fn rows(s: &GuestSamples, h: &HostSamples, format: Format) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let init = stats("image.boot_initramfs", &s.boot_initramfs_ms)?;
    let py = stats("image.boot_python", &s.boot_python_ms)?;
    out.push(format_row(
        "image.boot_initramfs",
        "ms",
        &init,
        None,
        format,
    ));
    row_vs(
        &mut out,
        "image.boot_python",
        "ms",
        &py,
        Some(&init),
        "initramfs",
        format,
    );
    if let Some(e) = Stats::from_samples(&s.boot_python_erofs_ms) {
        row_vs(
            &mut out,
            "image.boot_python_erofs",
            "ms",
            &e,
            Some(&py),
            "ext4",
            format,
        );
    }
    out.push(format_row(
        "image.python_pass",
        "ms",
        &stats("image.python_pass", &s.python_pass_ms)?,
        None,
        format,
    ));
    let kiln = throughput(s.seq_read_bytes, &s.seq_read_kiln_ms);
    let qemu = Stats::from_samples(&throughput(s.seq_read_bytes, &s.seq_read_qemu_ms));
    let k = stats("image.seq_read_kiln", &kiln)?;
    row_vs(
        &mut out,
        "image.seq_read_kiln",
        "MiB/s",
        &k,
        qemu.as_ref(),
        "qemu-virtio-blk",
        format,
    );
    if let Some(q) = &qemu {
        out.push(format_row("image.seq_read_qemu", "MiB/s", q, None, format));
    }
    if let Some(w) = Stats::from_samples(&h.build_warm_s) {
        out.push(format_row("image.build_warm", "s", &w, None, format));
    }
    if let Some(w) = Stats::from_samples(&h.build_warm_small_s) {
        out.push(format_row("image.build_warm_small", "s", &w, None, format));
    }
    let c = stats("image.build_cold", &h.build_cold_s)?;
    out.push(format_row("image.build_cold", "s", &c, None, format));
    if let Some(e) = Stats::from_samples(&h.build_cold_erofs_s) {
        row_vs(
            &mut out,
            "image.build_cold_erofs",
            "s",
            &e,
            Some(&c),
            "ext4",
            format,
        );
    }
    out.push(format_row(
        "image.pull",
        "s",
        &stats("image.pull", &h.pull_s)?,
        None,
        format,
    ));
    if let Some(f) = &h.formats {
        let e4 = stats("image.format.ext4_make", &f.ext4_make_s)?;
        let er = stats("image.format.erofs_make", &f.erofs_make_s)?;
        out.push(format_row("image.format.ext4_make", "s", &e4, None, format));
        row_vs(
            &mut out,
            "image.format.erofs_make",
            "s",
            &er,
            Some(&e4),
            "ext4",
            format,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_carry_the_ratios_and_throughput() {
        let s: GuestSamples = serde_json::from_str(
            r#"{"boot_initramfs_ms":[100.0],"boot_python_ms":[200.0],"boot_python_erofs_ms":[],
                "python_pass_ms":[5.0],"seq_read_kiln_ms":[1000.0],"seq_read_qemu_ms":[500.0],
                "seq_read_bytes":268435456,"qemu_error":null}"#,
        )
        .unwrap();
        let h = HostSamples {
            build_warm_s: vec![1.0],
            build_cold_s: vec![60.0],
            pull_s: vec![10.0],
            ..HostSamples::default()
        };
        let v: Vec<serde_json::Value> = rows(&s, &h, Format::Json)
            .unwrap()
            .iter()
            .map(|r| serde_json::from_str(r).unwrap())
            .collect();
        let names: Vec<&str> = v.iter().map(|r| r["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "image.boot_initramfs",
                "image.boot_python",
                "image.python_pass",
                "image.seq_read_kiln",
                "image.seq_read_qemu",
                "image.build_warm",
                "image.build_cold",
                "image.pull",
            ]
        );
        assert_eq!(v[1]["ratio_vs"], 2.0);
        assert_eq!(v[1]["peer"], "initramfs");
        // 256 MiB in 1 s vs 0.5 s.
        assert_eq!(v[3]["median"], 256.0);
        assert_eq!(v[3]["unit"], "MiB/s");
        assert_eq!(v[3]["ratio_vs"], 0.5);
        assert_eq!(v[4]["median"], 512.0);
    }

    #[test]
    fn the_small_recipe_is_small_and_named() {
        assert!(SMALL_RECIPE.contains("name = \"bench-small\""));
        assert!(!SMALL_RECIPE.contains("python3"));
    }
}
