//! `cargo xtask kernel`: builds Kiln's guest kernel from Debian's `linux-source-6.1` package.
//!
//! Flow: install the build packages when missing, unpack the source tarball once into the
//! assets directory, `make allnoconfig`, merge the repo's fragment `kernel/microvm.config`
//! (`scripts/kconfig/merge_config.sh -m` + `make olddefconfig`), check that every option the
//! fragment asks for stuck, then build `vmlinux` and `bzImage`. The result is cached under
//! `<assets>/kernel/<source-version>-<fragment-hash12>/{vmlinux,bzImage,config}` and
//! `<assets>/guest/{vmlinux,bzImage}` point at it (docs/ARCHITECTURE.md "Assets").

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::util;

/// Debian package holding the kernel source tarball.
pub const SOURCE_PACKAGE: &str = "linux-source-6.1";
/// The tarball that package installs.
pub const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
/// Everything the kernel build needs from Debian.
pub const PACKAGES: &[&str] = &[
    SOURCE_PACKAGE,
    "bc",
    "bison",
    "flex",
    "libelf-dev",
    "libssl-dev",
    "make",
    "gcc",
    "cpio",
    "xz-utils",
    "lz4",
];

/// The built guest kernel.
#[derive(Debug, Clone)]
pub struct KernelArtifacts {
    /// Cache directory holding the three files.
    pub dir: PathBuf,
    /// The ELF kernel (booted through PVH).
    pub vmlinux: PathBuf,
    /// The compressed bzImage.
    pub bzimage: PathBuf,
    /// The resolved kernel .config.
    pub config: PathBuf,
}

impl KernelArtifacts {
    fn in_dir(dir: PathBuf) -> Self {
        Self {
            vmlinux: dir.join("vmlinux"),
            bzimage: dir.join("bzImage"),
            config: dir.join("config"),
            dir,
        }
    }

    fn complete(&self) -> bool {
        [&self.vmlinux, &self.bzimage, &self.config]
            .iter()
            .all(|p| p.is_file())
    }
}

/// The fragment kept in the repository.
pub fn fragment_path() -> PathBuf {
    util::repo_root().join("kernel/microvm.config")
}

/// `cargo xtask kernel`: ensure the kernel and print where it is.
pub fn cmd_kernel() -> Result<()> {
    let k = ensure()?;
    println!("{}", k.vmlinux.display());
    Ok(())
}

/// Builds the guest kernel unless the cache already holds it; points `<assets>/guest/` at it.
pub fn ensure() -> Result<KernelArtifacts> {
    util::ensure_packages(PACKAGES)?;
    let version = util::package_version(SOURCE_PACKAGE)?;
    let fragment = fragment_path();
    let fragment_text = fs::read_to_string(&fragment)
        .with_context(|| format!("reading the kernel fragment {}", fragment.display()))?;
    let hash = util::sha256_hex(fragment_text.as_bytes());
    let key = format!("{version}-{}", &hash[..12]);
    let assets = util::assets_dir()?;
    let kernel_root = assets.join("kernel");
    let artifacts = KernelArtifacts::in_dir(kernel_root.join(&key));

    if !artifacts.complete() {
        let _lock = util::lock_file(&kernel_root.join(".lock"))?;
        // Another xtask may have built it while we waited for the lock.
        if !artifacts.complete() {
            build(
                &kernel_root,
                &version,
                &fragment,
                &fragment_text,
                &artifacts,
            )?;
        }
    }
    let guest = assets.join("guest");
    util::replace_symlink(&artifacts.vmlinux, &guest.join("vmlinux"))?;
    util::replace_symlink(&artifacts.bzimage, &guest.join("bzImage"))?;
    eprintln!("guest kernel {key}: {}", artifacts.dir.display());
    Ok(artifacts)
}

fn build(
    kernel_root: &Path,
    version: &str,
    fragment: &Path,
    fragment_text: &str,
    out: &KernelArtifacts,
) -> Result<()> {
    let started = Instant::now();
    let src = unpack_source(kernel_root, version)?;
    let build_dir = kernel_root.join("build").join(version);
    fs::create_dir_all(&build_dir).with_context(|| format!("creating {}", build_dir.display()))?;
    let log = kernel_root.join(format!("build-{version}.log"));
    // Start each build's log afresh; the previous one is of no use once we rebuild.
    fs::write(&log, b"").with_context(|| format!("creating {}", log.display()))?;
    eprintln!("building the guest kernel (log: {})", log.display());

    let make = |args: &[&str]| {
        let mut cmd = Command::new("make");
        cmd.current_dir(&src)
            .arg(format!("O={}", build_dir.display()))
            .args(args)
            .env("KBUILD_BUILD_USER", "kiln")
            .env("KBUILD_BUILD_HOST", "kiln");
        cmd
    };

    let pb = util::spinner("configuring (allnoconfig + fragment)");
    util::run_logged(&mut make(&["allnoconfig"]), &log, |_| {})?;
    let dot_config = build_dir.join(".config");
    util::run_logged(
        Command::new(src.join("scripts/kconfig/merge_config.sh"))
            .current_dir(&src)
            .arg("-m")
            .arg("-O")
            .arg(&build_dir)
            .arg(&dot_config)
            .arg(fragment),
        &log,
        |_| {},
    )?;
    util::run_logged(&mut make(&["olddefconfig"]), &log, |_| {})?;
    pb.finish_and_clear();

    let resolved = fs::read_to_string(&dot_config)
        .with_context(|| format!("reading {}", dot_config.display()))?;
    check_config(fragment_text, &resolved).map_err(|e| {
        anyhow::anyhow!(
            "{e}\nresolved config: {}\nfragment: {}",
            dot_config.display(),
            fragment.display()
        )
    })?;

    let count_file = build_dir.join(".kiln-object-count");
    let expected: Option<u64> = fs::read_to_string(&count_file)
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let pb = match expected {
        Some(n) => util::bar(n, "compiling"),
        None => util::spinner("compiling"),
    };
    let mut compiled: u64 = 0;
    let mut last_note = Instant::now();
    let jobs = util::jobs().to_string();
    let result = util::run_logged(
        &mut make(&["-j", &jobs, "vmlinux", "bzImage"]),
        &log,
        |line| {
            if let Some((step, file)) = parse_kbuild_line(line) {
                if matches!(step, "CC" | "AS") {
                    compiled += 1;
                }
                pb.set_position(compiled);
                pb.set_message(format!("{compiled} objects compiled, {step} {file}"));
                if pb.is_hidden() && last_note.elapsed() > Duration::from_secs(30) {
                    last_note = Instant::now();
                    eprintln!("kernel: {compiled} objects compiled, now {step} {file}");
                }
            }
        },
    );
    pb.finish_and_clear();
    result?;
    // Only a full build's count is a useful total for the next progress bar.
    if expected.is_none() || compiled > expected.unwrap_or(0) / 2 {
        let _ = fs::write(&count_file, compiled.to_string());
    }

    let vmlinux = build_dir.join("vmlinux");
    let bytes = fs::read(&vmlinux).with_context(|| format!("reading {}", vmlinux.display()))?;
    check_pvh_entry(&bytes).with_context(|| format!("checking {}", vmlinux.display()))?;
    drop(bytes);

    let tmp = sibling_tmp(&out.dir)?;
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    for (from, name) in [
        (build_dir.join("vmlinux"), "vmlinux"),
        (build_dir.join("arch/x86/boot/bzImage"), "bzImage"),
        (dot_config.clone(), "config"),
    ] {
        fs::copy(&from, tmp.join(name))
            .with_context(|| format!("copying {} into the cache", from.display()))?;
    }
    let _ = fs::remove_dir_all(&out.dir);
    fs::rename(&tmp, &out.dir).with_context(|| format!("renaming into {}", out.dir.display()))?;
    eprintln!(
        "kernel built in {:.0?} ({compiled} objects compiled)",
        started.elapsed()
    );
    Ok(())
}

/// A scratch path beside `path` (same filesystem, so it can be renamed onto `path`).
fn sibling_tmp(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    Ok(path.with_file_name(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// Unpacks the Debian source tarball once per package version; returns the source tree.
fn unpack_source(kernel_root: &Path, version: &str) -> Result<PathBuf> {
    let dest = kernel_root.join("src").join(version);
    let tree = dest.join("linux-source-6.1");
    if dest.join(".kiln-unpacked").is_file() && tree.join("Makefile").is_file() {
        return Ok(tree);
    }
    let tarball = Path::new(SOURCE_TARBALL);
    if !tarball.is_file() {
        bail!(
            "{} is missing although {SOURCE_PACKAGE} is installed",
            tarball.display()
        );
    }
    let tmp = sibling_tmp(&dest)?;
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let log = kernel_root.join(format!("unpack-{version}.log"));
    let _ = fs::write(&log, b"");
    let pb = util::spinner(format!("unpacking {}", tarball.display()));
    let mut files = 0u64;
    let res = util::run_logged(
        Command::new("tar")
            .arg("-xvJf")
            .arg(tarball)
            .arg("-C")
            .arg(&tmp),
        &log,
        |line| {
            files += 1;
            if files % 200 == 0 {
                pb.set_message(format!(
                    "unpacking the kernel source: {files} files, {line}"
                ));
            }
        },
    );
    pb.finish_and_clear();
    res?;
    if !tmp.join("linux-source-6.1/Makefile").is_file() {
        bail!(
            "{} did not unpack into linux-source-6.1/ (see {})",
            tarball.display(),
            log.display()
        );
    }
    fs::write(tmp.join(".kiln-unpacked"), version)
        .with_context(|| format!("writing marker in {}", tmp.display()))?;
    let _ = fs::remove_dir_all(&dest);
    fs::rename(&tmp, &dest).with_context(|| format!("renaming into {}", dest.display()))?;
    eprintln!(
        "unpacked {files} files of the kernel source into {}",
        dest.display()
    );
    Ok(tree)
}

/// Xen ELF note type announcing the 32-bit PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY).
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// Checks that `vmlinux` is an x86_64 ELF carrying the PVH entry note the VMM boots through.
fn check_pvh_entry(vmlinux: &[u8]) -> Result<()> {
    use object::elf::{FileHeader64, EM_X86_64, PT_NOTE};
    use object::read::elf::{FileHeader, ProgramHeader};
    use object::Endianness;

    let header = FileHeader64::<Endianness>::parse(vmlinux)
        .map_err(|e| anyhow::anyhow!("not a 64-bit ELF: {e}"))?;
    let endian = header
        .endian()
        .map_err(|e| anyhow::anyhow!("bad ELF endianness: {e}"))?;
    if header.e_machine(endian) != EM_X86_64 {
        bail!("not an x86_64 kernel");
    }
    let phdrs = header
        .program_headers(endian, vmlinux)
        .map_err(|e| anyhow::anyhow!("bad ELF program headers: {e}"))?;
    for phdr in phdrs.iter().filter(|p| p.p_type(endian) == PT_NOTE) {
        let Ok(Some(mut notes)) = phdr.notes(endian, vmlinux) else {
            continue;
        };
        while let Ok(Some(note)) = notes.next() {
            if note.name() == b"Xen" && note.n_type(endian).0 == XEN_ELFNOTE_PHYS32_ENTRY {
                return Ok(());
            }
        }
    }
    bail!("no PVH entry note (Xen note type {XEN_ELFNOTE_PHYS32_ENTRY}): is CONFIG_PVH=y?")
}

/// Parses a kbuild progress line such as `  CC      kernel/fork.o` into (step, file).
fn parse_kbuild_line(line: &str) -> Option<(&str, &str)> {
    if !line.starts_with("  ") {
        return None;
    }
    let mut parts = line.split_whitespace();
    let step = parts.next()?;
    let file = parts.next()?;
    let is_step = !step.is_empty()
        && step.len() <= 12
        && step
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_' || c == '-');
    is_step.then_some((step, file))
}

/// What a fragment line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Want {
    /// `CONFIG_X=y`
    Yes,
    /// `# CONFIG_X is not set`
    Off,
    /// `CONFIG_X=<value>` other than `y`
    Value(String),
}

fn parse_fragment(text: &str) -> BTreeMap<String, Want> {
    let mut out = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("# ") {
            if let Some(name) = rest.strip_suffix(" is not set") {
                if name.starts_with("CONFIG_") {
                    out.insert(name.to_string(), Want::Off);
                }
            }
        } else if let Some((name, value)) = line.split_once('=') {
            if name.starts_with("CONFIG_") {
                let want = if value == "y" {
                    Want::Yes
                } else {
                    Want::Value(value.to_string())
                };
                out.insert(name.to_string(), want);
            }
        }
    }
    out
}

fn parse_config(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Checks the resolved `.config` against the fragment: every `=y` must be `=y`, every
/// `is not set` must be off. Other values only warn (Kconfig may clamp them).
fn check_config(fragment: &str, resolved: &str) -> Result<()> {
    let want = parse_fragment(fragment);
    let have = parse_config(resolved);
    let mut missing = Vec::new();
    let mut unwanted = Vec::new();
    for (name, w) in &want {
        let got = have.get(name).map(String::as_str);
        match w {
            Want::Yes if got != Some("y") => {
                missing.push(format!("{name}=y (got {})", got.unwrap_or("not set")))
            }
            Want::Off if matches!(got, Some("y") | Some("m")) => {
                unwanted.push(format!("{name} (got {})", got.unwrap_or("")))
            }
            Want::Value(v) if got != Some(v.as_str()) => eprintln!(
                "warning: kernel option {name}={v} resolved to {}",
                got.unwrap_or("not set")
            ),
            _ => {}
        }
    }
    if missing.is_empty() && unwanted.is_empty() {
        return Ok(());
    }
    let mut msg = String::from("the resolved kernel config does not honour the fragment:");
    for m in &missing {
        msg.push_str("\n  missing: ");
        msg.push_str(m);
    }
    for u in &unwanted {
        msg.push_str("\n  should be off: ");
        msg.push_str(u);
    }
    msg.push_str("\n(a dependency is probably missing from kernel/microvm.config)");
    bail!(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAGMENT: &str =
        "# comment\nCONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\nCONFIG_N=64\n";

    #[test]
    fn config_check_accepts_a_matching_config() {
        let resolved = "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\nCONFIG_N=64\n";
        check_config(FRAGMENT, resolved).unwrap();
    }

    #[test]
    fn config_check_lists_every_missing_option() {
        let resolved = "CONFIG_A=m\n# CONFIG_B is not set\nCONFIG_C=y\nCONFIG_N=32\n";
        let err = check_config(FRAGMENT, resolved).unwrap_err().to_string();
        assert!(err.contains("CONFIG_A=y (got m)"), "{err}");
        assert!(err.contains("CONFIG_B=y (got not set)"), "{err}");
        assert!(err.contains("should be off: CONFIG_C"), "{err}");
    }

    #[test]
    fn repo_fragment_has_the_design_options() {
        let text = fs::read_to_string(fragment_path()).unwrap();
        let want = parse_fragment(&text);
        for opt in [
            "64BIT",
            "SMP",
            "PARAVIRT",
            "KVM_GUEST",
            "PVH",
            "SERIAL_8250",
            "SERIAL_8250_CONSOLE",
            "BLK_DEV_INITRD",
            "DEVTMPFS",
            "DEVTMPFS_MOUNT",
            "TMPFS",
            "PROC_FS",
            "SYSFS",
            "VIRTIO",
            "VIRTIO_MMIO",
            "VIRTIO_MMIO_CMDLINE_DEVICES",
            "VSOCKETS",
            "VIRTIO_VSOCKETS",
            "NET",
            "INET",
            "UNIX",
            "VIRTIO_BLK",
            "EXT4_FS",
            "OVERLAY_FS",
            "SECCOMP",
            "CGROUPS",
            "MEMCG",
            "CGROUP_PIDS",
            "CGROUP_SCHED",
            "FUTEX",
            "EPOLL",
            "EVENTFD",
            "SIGNALFD",
            "TIMERFD",
            "SHMEM",
            "POSIX_TIMERS",
            "MULTIUSER",
            "BINFMT_ELF",
            "BINFMT_SCRIPT",
            "FILE_LOCKING",
            "HW_RANDOM_VIRTIO",
            "X86_MPPARSE",
        ] {
            assert_eq!(
                want.get(&format!("CONFIG_{opt}")),
                Some(&Want::Yes),
                "CONFIG_{opt}=y missing from kernel/microvm.config"
            );
        }
        for opt in ["PCI", "ACPI", "MODULES"] {
            assert_eq!(
                want.get(&format!("CONFIG_{opt}")),
                Some(&Want::Off),
                "{opt}"
            );
        }
    }

    /// A minimal ELF64 x86_64 image with one PT_NOTE segment holding `notes`.
    fn elf_with_note(name: &[u8], n_type: u32) -> Vec<u8> {
        let mut note = Vec::new();
        note.extend((name.len() as u32 + 1).to_le_bytes());
        note.extend(4u32.to_le_bytes());
        note.extend(n_type.to_le_bytes());
        note.extend(name);
        note.push(0);
        while note.len() % 4 != 0 {
            note.push(0);
        }
        note.extend(0x100_0000u32.to_le_bytes());
        let mut b = vec![0u8; 64 + 56];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        b[16..18].copy_from_slice(&2u16.to_le_bytes());
        b[18..20].copy_from_slice(&62u16.to_le_bytes());
        b[20..24].copy_from_slice(&1u32.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[52..54].copy_from_slice(&64u16.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        b[ph..ph + 4].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
        b[ph + 8..ph + 16].copy_from_slice(&(120u64).to_le_bytes()); // p_offset
        b[ph + 32..ph + 40].copy_from_slice(&(note.len() as u64).to_le_bytes()); // p_filesz
        b[ph + 48..ph + 56].copy_from_slice(&4u64.to_le_bytes()); // p_align
        b.extend(note);
        b
    }

    #[test]
    fn pvh_note_is_required() {
        check_pvh_entry(&elf_with_note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY)).unwrap();
        assert!(check_pvh_entry(&elf_with_note(b"Xen", 1)).is_err());
        assert!(check_pvh_entry(&elf_with_note(b"GNU", XEN_ELFNOTE_PHYS32_ENTRY)).is_err());
        assert!(check_pvh_entry(b"not an elf").is_err());
    }

    #[test]
    fn built_kernel_has_the_pvh_note() {
        // Only meaningful once `cargo xtask kernel` has run on this host.
        let Ok(path) = kiln::assets::default_kernel() else {
            return;
        };
        let Ok(bytes) = fs::read(&path) else { return };
        check_pvh_entry(&bytes).unwrap();
    }

    #[test]
    fn kbuild_lines_are_parsed() {
        assert_eq!(
            parse_kbuild_line("  CC      kernel/fork.o"),
            Some(("CC", "kernel/fork.o"))
        );
        assert_eq!(
            parse_kbuild_line("  LD      vmlinux.o"),
            Some(("LD", "vmlinux.o"))
        );
        assert_eq!(parse_kbuild_line("make[1]: Entering directory"), None);
        assert_eq!(parse_kbuild_line("  lower case"), None);
    }
}
