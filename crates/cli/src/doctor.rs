//! `kiln doctor`: what this host offers (KVM kind, /dev/kvm and its permissions), where the
//! guest assets are and whether they exist, the images in the image store (`<assets>/images`:
//! name, format, size, problems), and what to run when something is missing. Exits 0 when
//! sandboxes can run here, else with the `kiln run` code of the first problem (a damaged image
//! is reported but does not change the exit status).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use clap::Args;
use kiln::assets;
use kiln_vmm::host::{self, HostKind, NoKvmReason};
use serde::Serialize;

use super::exit;
use super::image::{human_size, ListLine};

/// `kiln doctor` arguments.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// One guest asset in the report.
#[derive(Debug, Serialize)]
struct AssetReport {
    path: Option<PathBuf>,
    present: bool,
    size: Option<u64>,
    fix: Option<String>,
}

/// The image store in the report.
#[derive(Debug, Serialize)]
struct ImagesReport {
    /// `<assets>/images`.
    dir: Option<PathBuf>,
    /// Every named image; a damaged one carries its `problem`.
    images: Vec<ListLine>,
    /// Why the store could not be read.
    error: Option<String>,
}

/// The whole report.
#[derive(Debug, Serialize)]
struct Report {
    host: String,
    runs_linux_guests: bool,
    kvm_device: String,
    kvm_permissions: Option<String>,
    assets_dir: Option<PathBuf>,
    kernel: AssetReport,
    initramfs: AssetReport,
    images: ImagesReport,
    ready: bool,
    status: i32,
    advice: Vec<String>,
}

/// Runs `kiln doctor`; returns the exit code.
pub fn doctor(args: &DoctorArgs) -> i32 {
    let report = gather();
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("kiln: error: encoding the report: {e}");
                return exit::INTERNAL;
            }
        }
    } else {
        print_human(&report);
    }
    report.status
}

fn gather() -> Report {
    let kind = host::detect();
    let kvm = Path::new("/dev/kvm");
    let kvm_permissions = describe_device(kvm);
    let mut advice = Vec::new();
    let mut status = 0;
    match &kind {
        HostKind::HardwareVirt { .. } => {}
        HostKind::Pvm => {
            status = exit::NO_KVM;
            advice.push(
                "this /dev/kvm is kvm-pvm: it cannot boot the Linux guest. Run commands through \
                 the emulated-virtualization harness: `cargo xtask run -- CMD ARGS...`"
                    .into(),
            );
        }
        HostKind::NoKvm { reason } => {
            status = exit::NO_KVM;
            advice.push(match reason {
                NoKvmReason::DeviceMissing { .. } => {
                    "load KVM (`modprobe kvm_intel` or `modprobe kvm_amd`) and enable \
                     virtualization in the firmware, or use `cargo xtask run` (harness)"
                        .into()
                }
                NoKvmReason::PermissionDenied { .. } => {
                    "give this user read-write access to /dev/kvm: \
                     `sudo usermod -aG kvm $USER` (then log in again)"
                        .into()
                }
                other => format!("fix /dev/kvm: {other}"),
            });
        }
    }

    let assets_dir = assets::assets_dir().ok();
    let kernel = asset(
        assets::default_kernel().ok(),
        "cargo xtask kernel && cargo xtask build-guest",
    );
    let initramfs = asset(assets::default_initramfs().ok(), "cargo xtask build-guest");
    let images = images();
    for a in [&kernel, &initramfs] {
        if let Some(fix) = &a.fix {
            advice.push(fix.clone());
            if status == 0 {
                status = exit::ASSETS;
            }
        }
    }
    Report {
        host: kind.to_string(),
        runs_linux_guests: kind.runs_linux_guests(),
        kvm_device: kvm.display().to_string(),
        kvm_permissions,
        assets_dir,
        kernel,
        initramfs,
        images,
        ready: status == 0,
        status,
        advice,
    }
}

/// The images in `<assets>/images`; a store that does not exist yet is empty (and is not
/// created).
fn images() -> ImagesReport {
    let dir = match assets::images_dir() {
        Ok(d) => d,
        Err(e) => {
            return ImagesReport {
                dir: None,
                images: Vec::new(),
                error: Some(e.to_string()),
            }
        }
    };
    images_in(dir)
}

fn images_in(dir: PathBuf) -> ImagesReport {
    if !dir.exists() {
        return ImagesReport {
            dir: Some(dir),
            images: Vec::new(),
            error: None,
        };
    }
    let listed = kiln_image::ImageStore::open(&dir).and_then(|s| s.list());
    match listed {
        Ok(list) => ImagesReport {
            images: list.iter().map(ListLine::from).collect(),
            dir: Some(dir),
            error: None,
        },
        Err(e) => ImagesReport {
            dir: Some(dir),
            images: Vec::new(),
            error: Some(super::image::with_causes(&e)),
        },
    }
}

fn asset(path: Option<PathBuf>, build: &str) -> AssetReport {
    let Some(path) = path else {
        return AssetReport {
            path: None,
            present: false,
            size: None,
            fix: Some(
                "set KILN_ASSETS_DIR (or HOME): the assets directory cannot be located".into(),
            ),
        };
    };
    let meta = std::fs::metadata(&path).ok().filter(|m| m.is_file());
    let present = meta.is_some();
    AssetReport {
        fix: (!present).then(|| format!("{} is missing: run `{build}`", path.display())),
        size: meta.map(|m| m.len()),
        present,
        path: Some(path),
    }
}

/// `crw-rw---- root:kvm (this user: read-write)`, or what is wrong.
fn describe_device(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    let mode = meta.permissions().mode();
    let owner = name_of("/etc/passwd", meta.uid());
    let group = name_of("/etc/group", meta.gid());
    let access = match host::probe_kvm_device(path) {
        host::KvmDevice::Usable => "this user: read-write ok".to_string(),
        host::KvmDevice::Unusable(r) => format!("this user: {r}"),
    };
    Some(format!("{} {owner}:{group} ({access})", mode_string(mode)))
}

fn mode_string(mode: u32) -> String {
    let kind = match mode & 0o170000 {
        0o020000 => 'c',
        0o060000 => 'b',
        0o040000 => 'd',
        0o100000 => '-',
        _ => '?',
    };
    let mut s = String::from(kind);
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

/// The name of uid/gid `id` from a passwd/group style file, else the number.
fn name_of(file: &str, id: u32) -> String {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                let mut f = l.split(':');
                let name = f.next()?;
                let _pw = f.next()?;
                (f.next()?.parse::<u32>().ok()? == id).then(|| name.to_owned())
            })
        })
        .unwrap_or_else(|| id.to_string())
}

fn print_human(r: &Report) {
    let mark = |ok: bool| if ok { "ok" } else { "PROBLEM" };
    println!("kiln doctor");
    println!("  host:       {} [{}]", r.host, mark(r.runs_linux_guests));
    println!(
        "  {}:   {}",
        r.kvm_device,
        r.kvm_permissions.as_deref().unwrap_or("does not exist")
    );
    println!(
        "  assets dir: {}",
        r.assets_dir
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "unknown (set KILN_ASSETS_DIR)".into())
    );
    for (what, a) in [("kernel", &r.kernel), ("initramfs", &r.initramfs)] {
        let path = a
            .path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "-".into());
        let size = a
            .size
            .map(|s| format!(", {:.1} MiB", s as f64 / (1024.0 * 1024.0)))
            .unwrap_or_default();
        println!(
            "  {what:<10}  {path} [{}{size}]",
            if a.present { "present" } else { "MISSING" }
        );
    }
    print_images(&r.images);
    if r.ready {
        println!("ready: `kiln run -- CMD` can boot sandboxes on this host");
    } else {
        println!("not ready (exit status {}):", r.status);
        for a in &r.advice {
            println!("  - {a}");
        }
    }
}

fn print_images(r: &ImagesReport) {
    let dir = r
        .dir
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "-".into());
    if let Some(e) = &r.error {
        println!("  images:     {dir} [PROBLEM: {e}]");
        return;
    }
    if r.images.is_empty() {
        println!("  images:     {dir} [none; `kiln image build` makes one]");
        return;
    }
    println!("  images:     {dir} [{}]", r.images.len());
    let width = r.images.iter().map(|i| i.name.len()).max().unwrap_or(0);
    for i in &r.images {
        match &i.problem {
            Some(p) => println!("    {:<width$}  PROBLEM: {p}", i.name),
            None => println!(
                "    {:<width$}  {:<5}  {}",
                i.name,
                i.format.unwrap_or("-"),
                i.size.map_or_else(|| "-".into(), human_size)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_render_like_ls() {
        assert_eq!(mode_string(0o020660), "crw-rw----");
        assert_eq!(mode_string(0o100755), "-rwxr-xr-x");
    }

    #[test]
    fn names_come_from_the_database_or_the_number() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("group");
        std::fs::write(&f, "root:x:0:\nkvm:x:104:alice\n").unwrap();
        let f = f.to_str().unwrap();
        assert_eq!(name_of(f, 104), "kvm");
        assert_eq!(name_of(f, 0), "root");
        assert_eq!(name_of(f, 7), "7");
    }

    #[test]
    fn images_of_a_missing_store_are_none_and_it_is_not_created() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("images");
        let r = images_in(store.clone());
        assert!(r.images.is_empty() && r.error.is_none());
        assert!(!store.exists());
        // An empty store is listed as such; an index entry without its image is a problem.
        kiln_image::ImageStore::open(&store).unwrap();
        assert!(images_in(store.clone()).images.is_empty());
        std::fs::write(
            store.join("index.json"),
            r#"{"schema":1,"names":{"gone":"oci-0123abcd-ext4"}}"#,
        )
        .unwrap();
        let r = images_in(store);
        assert_eq!(r.images.len(), 1);
        assert_eq!(r.images[0].name, "gone");
        assert!(r.images[0].problem.is_some(), "{r:?}");
        assert!(r.images[0].format.is_none());
    }

    #[test]
    fn missing_assets_name_the_build_command() {
        let dir = tempfile::tempdir().unwrap();
        let a = asset(Some(dir.path().join("vmlinux")), "cargo xtask kernel");
        assert!(!a.present);
        assert!(a.fix.unwrap().contains("cargo xtask kernel"));
        let f = dir.path().join("initramfs.cpio");
        std::fs::write(&f, b"abc").unwrap();
        let a = asset(Some(f), "cargo xtask build-guest");
        assert!(a.present && a.fix.is_none());
        assert_eq!(a.size, Some(3));
    }
}
