//! The harness's L1 assets, cached in `<assets>/harness/<debian-kernel-version>/`:
//! Debian's `linux-image-6.1.0-<N>-amd64` unpacked (`pkg/`, with `depmod -b` run on it), the
//! ELF `vmlinux` unpacked from its vmlinuz (QEMU boots it through PVH, ~4-5 s faster than the
//! bzImage), and `initramfs-<hash>.cpio` (newc: static busybox, the modules L1 needs in load
//! order — KVM (kvm_amd nested), the virtio/9p stack for the shares and console ports, and
//! vhost_vsock for QEMU peers that need `/dev/vhost-vsock` — `/modules.load`, and
//! `l1-init.sh` as `/init`).
//!
//! Also installs the host tools the harness needs (qemu-system-x86, busybox-static, kmod,
//! xz-utils) with apt-get when they are missing.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::util;

/// Debian packages the harness needs on the host.
pub const HOST_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "kmod", "xz-utils"];

/// The L1 init script (see the file for what it does).
pub const L1_INIT: &str = include_str!("l1-init.sh");

/// Modules L1 needs (their dependencies are added from modules.dep), with parameters.
/// A module that the kernel has built in is skipped.
const WANTED_MODULES: &[(&str, &str)] = &[
    ("irqbypass", ""),
    ("ccp", ""),
    ("kvm", ""),
    ("kvm_amd", "nested=1 npt=1"),
    ("virtio_pci", ""),
    ("virtio_console", ""),
    ("9pnet_virtio", ""),
    ("9p", ""),
    // /dev/vhost-vsock for QEMU's vhost-vsock-device (the QEMU peer of `cargo xtask bench
    // exec`); pulls in vsock, vmw_vsock_virtio_transport_common, vhost_iotlb and vhost.
    ("vhost_vsock", ""),
];

/// Where static busybox comes from (Debian's busybox-static).
const BUSYBOX: &str = "/bin/busybox";

/// Everything needed to boot L1.
#[derive(Debug, Clone)]
pub struct L1Assets {
    /// Debian kernel release, e.g. `6.1.0-56-amd64`.
    pub kernel_version: String,
    /// The ELF kernel.
    pub vmlinux: PathBuf,
    /// The L1 initramfs.
    pub initramfs: PathBuf,
}

/// Installs missing host tools and builds (or reuses) the L1 assets.
pub fn prepare() -> Result<L1Assets> {
    util::ensure_packages(HOST_PACKAGES)
        .context("the harness needs Debian's qemu-system-x86, busybox-static, kmod and xz-utils")?;
    let root = util::assets_dir()?.join("harness");
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let _lock = util::lock_file(&root.join(".lock"))?;

    let kernel_version = match std::env::var("KILN_HARNESS_KERNEL_VERSION") {
        Ok(v) if !v.is_empty() => v,
        _ => match newest_cached(&root)? {
            Some(v) => v,
            None => newest_available()?,
        },
    };
    let dir = root.join(&kernel_version);
    let pkg = dir.join("pkg");
    if !pkg.join("done").exists() {
        fetch_kernel_package(&kernel_version, &dir)?;
    }
    let vmlinux = dir.join("vmlinux");
    if !vmlinux.exists() {
        let vmlinuz = pkg.join("boot").join(format!("vmlinuz-{kernel_version}"));
        extract_vmlinux(&vmlinuz, &vmlinux)?;
    }
    let initramfs = build_initramfs(&kernel_version, &dir)?;
    Ok(L1Assets {
        kernel_version,
        vmlinux,
        initramfs,
    })
}

/// The newest kernel version already unpacked in `<assets>/harness/`.
fn newest_cached(root: &Path) -> Result<Option<String>> {
    let mut versions = Vec::new();
    for entry in fs::read_dir(root).with_context(|| format!("listing {}", root.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if abi_number(&name).is_some() && entry.path().join("pkg/done").exists() {
            versions.push(name);
        }
    }
    Ok(versions.into_iter().max_by_key(|v| abi_number(v)))
}

/// `6.1.0-<N>-amd64` -> N.
fn abi_number(version: &str) -> Option<u32> {
    version
        .strip_prefix("6.1.0-")?
        .strip_suffix("-amd64")?
        .parse()
        .ok()
}

/// The newest `6.1.0-<N>-amd64` that apt knows of (runs `apt-get update` if it knows none).
fn newest_available() -> Result<String> {
    let search = || -> Result<Option<String>> {
        let out = util::output(Command::new("apt-cache").args([
            "search",
            "--names-only",
            r"^linux-image-6\.1\.0-[0-9]+-amd64$",
        ]))?;
        Ok(newest_from_search(&out))
    };
    if let Some(v) = search()? {
        return Ok(v);
    }
    apt_update()?;
    search()?.context(
        "apt knows no linux-image-6.1.0-<N>-amd64 package (is this Debian bookworm with main?)",
    )
}

/// Picks the newest version out of `apt-cache search` output.
fn newest_from_search(out: &str) -> Option<String> {
    out.lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter_map(|pkg| pkg.strip_prefix("linux-image-"))
        .filter(|v| abi_number(v).is_some())
        .max_by_key(|v| abi_number(v))
        .map(str::to_string)
}

fn apt_update() -> Result<()> {
    util::run(
        Command::new("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null()),
    )
    .context("apt-get update failed")
}

/// Downloads the kernel package and unpacks it into `<dir>/pkg` (no install, no hooks), then
/// generates modules.dep there.
fn fetch_kernel_package(version: &str, dir: &Path) -> Result<()> {
    let package = format!("linux-image-{version}");
    eprintln!("harness: fetching {package} for L1 ...");
    let download = dir.join(format!("download-{}", std::process::id()));
    let _ = fs::remove_dir_all(&download);
    fs::create_dir_all(&download).with_context(|| format!("creating {}", download.display()))?;
    let fetch = |d: &Path| {
        util::run(
            Command::new("apt-get")
                .args(["download", "-q", "-o", "APT::Sandbox::User=root", &package])
                .current_dir(d)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdin(Stdio::null()),
        )
    };
    if fetch(&download).is_err() {
        apt_update()?;
        fetch(&download)
            .with_context(|| format!("could not download the Debian package {package}"))?;
    }
    let deb = fs::read_dir(&download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", download.display()))?;
    let unpack = dir.join(format!("pkg.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&unpack);
    util::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpack))?;
    util::run(
        Command::new("depmod")
            .arg("-b")
            .arg(&unpack)
            .arg(version)
            .stdin(Stdio::null()),
    )
    .context("depmod -b on the unpacked kernel package")?;
    fs::write(unpack.join("done"), package.as_bytes())?;
    let pkg = dir.join("pkg");
    let _ = fs::remove_dir_all(&pkg);
    fs::rename(&unpack, &pkg).with_context(|| format!("moving into {}", pkg.display()))?;
    let _ = fs::remove_dir_all(&download);
    Ok(())
}

/// Compression formats a vmlinuz payload may use, as (magic, decompressor argv).
const PAYLOADS: &[(&[u8], &[&str])] = &[
    (b"\xfd7zXZ\x00", &["xz", "-dc", "--single-stream"]),
    (b"\x28\xb5\x2f\xfd", &["zstd", "-dcq"]),
    (b"\x1f\x8b\x08", &["gzip", "-dcq"]),
];

/// Unpacks the ELF kernel from a bzImage: tries each embedded compressed stream until one
/// decompresses to an ELF file.
pub fn extract_vmlinux(vmlinuz: &Path, out: &Path) -> Result<()> {
    let image = fs::read(vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
    let mut candidates: Vec<(usize, &[&str])> = Vec::new();
    for (magic, argv) in PAYLOADS {
        let mut from = 0;
        while let Some(pos) = find(&image[from..], magic) {
            candidates.push((from + pos, argv));
            from += pos + 1;
        }
    }
    candidates.sort_by_key(|(pos, _)| *pos);
    for (pos, argv) in candidates {
        let Ok(elf) = decompress(argv, &image[pos..]) else {
            continue;
        };
        if elf.starts_with(b"\x7fELF") {
            let tmp = out.with_extension(format!("tmp-{}", std::process::id()));
            fs::write(&tmp, &elf).with_context(|| format!("writing {}", tmp.display()))?;
            fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
            return Ok(());
        }
    }
    bail!(
        "no compressed ELF kernel found in {} (tried xz, zstd, gzip payloads)",
        vmlinuz.display()
    )
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Pipes `input` through a decompressor; trailing garbage after the stream is tolerated (the
/// caller checks what came out).
fn decompress(argv: &[&str], input: &[u8]) -> Result<Vec<u8>> {
    let (program, args) = argv.split_first().context("empty decompressor argv")?;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    let mut stdin = child.stdin.take().context("decompressor stdin")?;
    let input = input.to_vec();
    let feeder = std::thread::spawn(move || {
        // A decompressor that stops early closes its stdin: that broken pipe is expected.
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output()?;
    let _ = feeder.join();
    Ok(out.stdout)
}

/// One module to put into the initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleLoad {
    /// Module name with underscores (`kvm_amd`).
    pub name: String,
    /// Path relative to `lib/modules/<version>/`.
    pub path: String,
    /// insmod parameters.
    pub params: String,
}

/// Normalised module name of a modules.dep path (`kernel/arch/x86/kvm/kvm-amd.ko` -> `kvm_amd`).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Resolves the wanted modules and their dependencies into a load order (dependencies first),
/// from the text of modules.dep and modules.builtin.
pub fn resolve_modules(
    modules_dep: &str,
    modules_builtin: &str,
    wanted: &[(&str, &str)],
) -> Result<Vec<ModuleLoad>> {
    let mut deps: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in modules_dep.lines() {
        let Some((path, rest)) = line.split_once(':') else {
            continue;
        };
        let dep_paths: Vec<String> = rest.split_whitespace().map(str::to_string).collect();
        deps.insert(module_name(path), (path.to_string(), dep_paths));
    }
    let builtin: HashSet<String> = modules_builtin.lines().map(module_name).collect();
    let params: HashMap<String, &str> = wanted
        .iter()
        .map(|(name, params)| (name.replace('-', "_"), *params))
        .collect();

    let mut order = Vec::new();
    let mut done = HashSet::new();
    for (name, _) in wanted {
        let name = name.replace('-', "_");
        if builtin.contains(&name) {
            continue;
        }
        visit(&name, &deps, &mut done, &mut order, 0)?;
    }
    Ok(order
        .into_iter()
        .map(|(name, path)| ModuleLoad {
            params: params.get(&name).copied().unwrap_or("").to_string(),
            name,
            path,
        })
        .collect())
}

fn visit(
    name: &str,
    deps: &HashMap<String, (String, Vec<String>)>,
    done: &mut HashSet<String>,
    order: &mut Vec<(String, String)>,
    depth: usize,
) -> Result<()> {
    if done.contains(name) {
        return Ok(());
    }
    if depth > 64 {
        bail!("module dependency chain through {name} is too deep (a cycle in modules.dep?)");
    }
    let (path, dep_paths) = deps.get(name).with_context(|| {
        format!("module {name} is neither in modules.dep nor built in to the L1 kernel")
    })?;
    // modprobe loads a module's dependency list from its end.
    for dep in dep_paths.iter().rev() {
        visit(&module_name(dep), deps, done, order, depth + 1)?;
    }
    done.insert(name.to_string());
    order.push((name.to_string(), path.clone()));
    Ok(())
}

/// Builds `<dir>/initramfs-<hash>.cpio` unless it exists; returns its path.
fn build_initramfs(version: &str, dir: &Path) -> Result<PathBuf> {
    let moddir = dir.join("pkg/lib/modules").join(version);
    let read = |name: &str| {
        let p = moddir.join(name);
        fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    };
    let modules = resolve_modules(
        &read("modules.dep")?,
        &read("modules.builtin")?,
        WANTED_MODULES,
    )?;
    let load_list: String = modules
        .iter()
        .map(|m| format!("{} {}\n", m.name, m.params))
        .collect();
    let busybox_meta =
        fs::metadata(BUSYBOX).with_context(|| format!("{BUSYBOX} (from busybox-static)"))?;
    let key = format!(
        "{version}\n{L1_INIT}\n{load_list}\n{}\n{:?}",
        busybox_meta.len(),
        busybox_meta.modified().ok()
    );
    let hash = util::sha256_hex(key.as_bytes());
    let out = dir.join(format!("initramfs-{}.cpio", &hash[..16]));
    if out.exists() {
        return Ok(out);
    }

    let dir_entry = |name: &str| {
        (
            cpio::NewcBuilder::new(name).mode(0o040755),
            Cursor::new(Vec::new()),
        )
    };
    let file_entry = |name: &str, mode: u32, data: Vec<u8>| {
        (
            cpio::NewcBuilder::new(name).mode(0o100000 | mode),
            Cursor::new(data),
        )
    };
    let mut entries = Vec::new();
    for d in [
        "bin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "lib",
        "lib/modules",
        "newroot",
        "hostview",
        "scratch",
    ] {
        entries.push(dir_entry(d));
    }
    entries.push(file_entry(
        "bin/busybox",
        0o755,
        fs::read(BUSYBOX).with_context(|| format!("reading {BUSYBOX}"))?,
    ));
    entries.push(file_entry("init", 0o755, L1_INIT.as_bytes().to_vec()));
    entries.push(file_entry("modules.load", 0o644, load_list.into_bytes()));
    for m in &modules {
        let src = moddir.join(&m.path);
        let data = if m.path.ends_with(".ko") {
            fs::read(&src).with_context(|| format!("reading {}", src.display()))?
        } else if m.path.ends_with(".ko.xz") {
            let packed = fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
            decompress(&["xz", "-dc"], &packed)?
        } else {
            bail!(
                "unsupported module file {} (want .ko or .ko.xz)",
                src.display()
            );
        };
        entries.push(file_entry(
            &format!("lib/modules/{}.ko", m.name),
            0o644,
            data,
        ));
    }
    let tmp = out.with_extension(format!("tmp-{}", std::process::id()));
    let file = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut file = cpio::write_cpio(entries.into_iter(), std::io::BufWriter::new(file))
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.flush()?;
    drop(file);
    fs::rename(&tmp, &out).with_context(|| format!("writing {}", out.display()))?;
    prune_old_initramfs(dir, &out);
    Ok(out)
}

/// Removes initramfs files of earlier init scripts once they are an hour old (a younger one may
/// be about to be booted by a concurrent run of another checkout).
fn prune_old_initramfs(dir: &Path, keep: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path == keep || !(name.starts_with("initramfs-") && name.ends_with(".cpio")) {
            continue;
        }
        if util::modified_longer_ago(&entry, std::time::Duration::from_secs(3600)) {
            let _ = fs::remove_file(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/arch/x86/kvm/kvm.ko: kernel/virt/lib/irqbypass.ko
kernel/arch/x86/kvm/kvm-amd.ko: kernel/drivers/crypto/ccp/ccp.ko kernel/arch/x86/kvm/kvm.ko kernel/virt/lib/irqbypass.ko
kernel/virt/lib/irqbypass.ko:
kernel/drivers/crypto/ccp/ccp.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
";

    #[test]
    fn modules_resolve_dependencies_first() {
        let order = resolve_modules(
            DEP,
            "kernel/fs/ext4/ext4.ko\n",
            &[("kvm-amd", "nested=1"), ("virtio_pci", ""), ("ext4", "")],
        )
        .unwrap();
        let names: Vec<&str> = order.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "irqbypass",
                "kvm",
                "ccp",
                "kvm_amd",
                "virtio_ring",
                "virtio",
                "virtio_pci_modern_dev",
                "virtio_pci_legacy_dev",
                "virtio_pci",
            ]
        );
        assert_eq!(order[3].params, "nested=1");
        assert_eq!(order[3].path, "kernel/arch/x86/kvm/kvm-amd.ko");
        for (i, m) in order.iter().enumerate() {
            assert!(
                !order[i + 1..].iter().any(|later| DEP
                    .lines()
                    .any(|l| l.starts_with(&format!("{}:", m.path)) && l.contains(&later.path))),
                "{} loaded before one of its dependencies",
                m.name
            );
        }
    }

    #[test]
    fn vhost_vsock_comes_after_its_dependencies() {
        // The lines of Debian 6.1's modules.dep for vhost-vsock.
        let dep = "\
kernel/drivers/vhost/vhost_vsock.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/drivers/vhost/vhost.ko kernel/drivers/vhost/vhost_iotlb.ko kernel/net/vmw_vsock/vsock.ko
kernel/drivers/vhost/vhost.ko: kernel/drivers/vhost/vhost_iotlb.ko
kernel/drivers/vhost/vhost_iotlb.ko:
kernel/net/vmw_vsock/vsock.ko:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko
";
        let order = resolve_modules(dep, "", &[("vhost_vsock", "")]).unwrap();
        let names: Vec<&str> = order.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "vsock",
                "vhost_iotlb",
                "vhost",
                "vmw_vsock_virtio_transport_common",
                "vhost_vsock",
            ]
        );
        assert!(WANTED_MODULES.iter().any(|(m, _)| *m == "vhost_vsock"));
    }

    #[test]
    fn missing_module_is_an_error() {
        let err = resolve_modules(DEP, "", &[("9p", "")]).unwrap_err();
        assert!(err.to_string().contains("9p"), "{err}");
        let err = resolve_modules("a.ko: b.ko\nb.ko: a.ko\n", "", &[("a", "")]).unwrap_err();
        assert!(err.to_string().contains("too deep"), "{err}");
    }

    #[test]
    fn old_initramfs_files_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        for n in [
            "initramfs-old.cpio",
            "initramfs-new.cpio",
            "initramfs-young.cpio",
            "vmlinux",
        ] {
            fs::write(p(n), b"x").unwrap();
        }
        let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        for n in ["initramfs-old.cpio", "initramfs-new.cpio", "vmlinux"] {
            fs::File::options()
                .write(true)
                .open(p(n))
                .unwrap()
                .set_modified(two_hours_ago)
                .unwrap();
        }
        prune_old_initramfs(dir.path(), &p("initramfs-new.cpio"));
        assert!(!p("initramfs-old.cpio").exists());
        assert!(p("initramfs-new.cpio").exists());
        assert!(p("initramfs-young.cpio").exists());
        assert!(p("vmlinux").exists());
    }

    #[test]
    fn newest_kernel_from_apt_search() {
        let out = "linux-image-6.1.0-9-amd64 - Linux 6.1 for 64-bit PCs (signed)\n\
                   linux-image-6.1.0-56-amd64 - Linux 6.1 for 64-bit PCs (signed)\n\
                   linux-image-6.1.0-10-amd64 - Linux 6.1 for 64-bit PCs (signed)\n";
        assert_eq!(newest_from_search(out).as_deref(), Some("6.1.0-56-amd64"));
        assert_eq!(newest_from_search(""), None);
        assert_eq!(abi_number("6.1.0-56-amd64"), Some(56));
        assert_eq!(abi_number("6.1.0-56-cloud-amd64"), None);
    }

    #[test]
    fn vmlinux_is_found_behind_a_compressed_payload() {
        // xz-utils is one of HOST_PACKAGES; without it this test cannot say anything.
        if Command::new("xz").arg("-V").output().is_err() {
            eprintln!("xz not installed: skipping");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let elf = b"\x7fELF\x02\x01\x01 a pretend kernel".repeat(100);
        let mut xz = Command::new("xz")
            .args(["-c"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        xz.stdin.take().unwrap().write_all(&elf).unwrap();
        let packed = xz.wait_with_output().unwrap().stdout;
        // A decoy xz magic that does not decompress, the real stream, then trailing data.
        let mut image = b"MZ boot stub \xfd7zXZ\x00 junk".to_vec();
        image.extend_from_slice(&packed);
        image.extend_from_slice(b"trailing signature bytes");
        let vmlinuz = dir.path().join("vmlinuz");
        fs::write(&vmlinuz, &image).unwrap();
        let out = dir.path().join("vmlinux");
        extract_vmlinux(&vmlinuz, &out).unwrap();
        assert_eq!(fs::read(&out).unwrap(), elf);

        fs::write(&vmlinuz, b"no payload here").unwrap();
        assert!(extract_vmlinux(&vmlinuz, &out).is_err());
    }
}
