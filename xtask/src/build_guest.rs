//! `cargo xtask build-guest`: builds the static kiln-agent and packs the guest initramfs.
//!
//! The initramfs (`<assets>/guest/initramfs.cpio`, uncompressed newc) holds `/init` = the
//! agent (debug info stripped), `/bin/busybox` from Debian's `busybox-static` with a symlink per
//! applet, the usual empty directories, and the `/dev/console` and `/dev/null` nodes (the kernel opens `/dev/console`
//! for PID 1 before devtmpfs can be mounted). It is rebuilt only when the agent or busybox
//! changed (a key of their hashes is stored beside it).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use cpio::newc::{Builder, ModeFileType};

use crate::util;

/// Preferred Rust target for the agent: fully static with musl.
const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
/// Fallback: glibc with a statically linked C runtime.
const GNU_TARGET: &str = "x86_64-unknown-linux-gnu";
/// Debian package providing a statically linked busybox at [`BUSYBOX`].
const BUSYBOX_PACKAGE: &str = "busybox-static";
const BUSYBOX: &str = "/bin/busybox";
/// Bump when the initramfs layout changes so that cached archives are rebuilt.
const LAYOUT_VERSION: u32 = 2;

/// Directories every initramfs has (besides those busybox applets need).
const DIRS: &[(&str, u32)] = &[
    ("bin", 0o755),
    ("dev", 0o755),
    ("etc", 0o755),
    ("mnt", 0o755),
    ("proc", 0o555),
    ("root", 0o700),
    ("run", 0o755),
    ("sbin", 0o755),
    ("sys", 0o555),
    ("tmp", 0o1777),
    ("usr", 0o755),
    ("usr/bin", 0o755),
    ("usr/sbin", 0o755),
];

/// The built guest userland.
#[derive(Debug, Clone)]
pub struct GuestArtifacts {
    /// `<assets>/guest/initramfs-<key hash>.cpio`: this build's archive under a name no other
    /// checkout's build replaces (the shared `initramfs.cpio` is the newest build of any
    /// checkout, so a run that boots it could get another tree's agent).
    pub initramfs: PathBuf,
    /// The static agent binary that is `/init`.
    pub agent: PathBuf,
}

/// `cargo xtask build-guest`: ensure the initramfs and print where it is.
pub fn cmd_build_guest() -> Result<()> {
    let g = ensure()?;
    eprintln!("agent: {}", g.agent.display());
    println!("{}", g.initramfs.display());
    Ok(())
}

/// Builds the agent (cargo decides whether anything changed) and repacks the initramfs when
/// the agent or busybox differ from what the cached archive was built from.
pub fn ensure() -> Result<GuestArtifacts> {
    let agent = build_agent()?;
    let agent_bytes =
        fs::read(&agent).with_context(|| format!("reading the agent {}", agent.display()))?;
    check_static_elf(&agent_bytes).with_context(|| format!("checking {}", agent.display()))?;

    util::ensure_packages(&[BUSYBOX_PACKAGE, "binutils"])?;
    let busybox_bytes = fs::read(BUSYBOX).with_context(|| format!("reading {BUSYBOX}"))?;
    check_static_elf(&busybox_bytes).with_context(|| {
        format!("checking {BUSYBOX} (is Debian's dynamic `busybox` installed instead of {BUSYBOX_PACKAGE}?)")
    })?;

    let guest = util::assets_dir()?.join("guest");
    fs::create_dir_all(&guest).with_context(|| format!("creating {}", guest.display()))?;
    // Serialises packing and linking between checkouts sharing the assets directory.
    let _lock = util::lock_file(&guest.join(".lock"))?;
    let initramfs = guest.join("initramfs.cpio");
    let key_file = guest.join("initramfs.key");
    let key = format!(
        "layout={LAYOUT_VERSION} agent={} busybox={}",
        util::sha256_hex(&agent_bytes),
        util::sha256_hex(&busybox_bytes)
    );
    let cached = fs::read_to_string(&key_file).ok();
    if initramfs.is_file() && cached.as_deref() == Some(key.as_str()) {
        eprintln!("initramfs up to date: {}", initramfs.display());
        let initramfs = keyed_copy(&guest, &initramfs, &key)?;
        return Ok(GuestArtifacts { initramfs, agent });
    }

    let pb = util::spinner("packing the initramfs");
    let applets = busybox_applets()?;
    let init = stripped(&agent, &guest)?;
    check_static_elf(&init).context("checking the stripped agent")?;
    let entries = layout(&applets, init, busybox_bytes)?;
    let count = entries.len();
    let tmp = guest.join(format!("initramfs.cpio.tmp-{}", std::process::id()));
    let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut out = BufWriter::new(file);
    write_cpio(&entries, &mut out, |i, name| {
        if i % 32 == 0 {
            pb.set_message(format!("packing the initramfs: {i}/{count} {name}"));
        }
    })
    .with_context(|| format!("writing {}", tmp.display()))?;
    out.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .with_context(|| format!("flushing {}", tmp.display()))?;
    fs::rename(&tmp, &initramfs)
        .with_context(|| format!("renaming {} into place", tmp.display()))?;
    fs::write(&key_file, &key).with_context(|| format!("writing {}", key_file.display()))?;
    pb.finish_and_clear();
    let size = fs::metadata(&initramfs).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "packed {count} entries ({} applets, {:.1} MiB) into {}",
        applets.len(),
        size as f64 / (1024.0 * 1024.0),
        initramfs.display()
    );
    let initramfs = keyed_copy(&guest, &initramfs, &key)?;
    Ok(GuestArtifacts { initramfs, agent })
}

/// Hard-links (or copies) `initramfs` to `<guest>/initramfs-<hash of key>.cpio` and prunes the
/// keyed archives of other builds once they are an hour old (a younger one may be booted by a
/// concurrent run of another checkout).
fn keyed_copy(guest: &Path, initramfs: &Path, key: &str) -> Result<PathBuf> {
    let hash = util::sha256_hex(key.as_bytes());
    let keyed = guest.join(format!("initramfs-{}.cpio", &hash[..16]));
    if !keyed.is_file() {
        let tmp = guest.join(format!(".initramfs-keyed.tmp-{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        if fs::hard_link(initramfs, &tmp).is_err() {
            fs::copy(initramfs, &tmp)
                .with_context(|| format!("copying {} to {}", initramfs.display(), tmp.display()))?;
        }
        fs::rename(&tmp, &keyed)
            .with_context(|| format!("renaming {} into place", tmp.display()))?;
    }
    if let Ok(entries) = fs::read_dir(guest) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if entry.path() != keyed
                && name.starts_with("initramfs-")
                && name.ends_with(".cpio")
                && util::modified_longer_ago(&entry, std::time::Duration::from_secs(3600))
            {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    Ok(keyed)
}

/// The agent without debug info (symbols stay for backtraces): ~5x smaller, so the guest
/// kernel has less to unpack at every boot.
fn stripped(agent: &Path, scratch_dir: &Path) -> Result<Vec<u8>> {
    let out = scratch_dir.join(format!(".init.stripped-{}", std::process::id()));
    util::run(
        Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&out)
            .arg(agent),
    )
    .context("stripping the agent's debug info")?;
    let bytes = fs::read(&out).with_context(|| format!("reading {}", out.display()));
    let _ = fs::remove_file(&out);
    bytes
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Builds kiln-agent statically (musl if the target can be had, else gnu + crt-static).
fn build_agent() -> Result<PathBuf> {
    let target = if musl_target_available() {
        MUSL_TARGET
    } else {
        eprintln!(
            "warning: rust target {MUSL_TARGET} unavailable; building the agent for \
             {GNU_TARGET} with crt-static"
        );
        GNU_TARGET
    };
    eprintln!("building kiln-agent ({target}, release)");
    let mut cmd = cargo();
    cmd.current_dir(util::repo_root()).args([
        "build",
        "-p",
        "kiln-agent",
        "--release",
        "--target",
        target,
    ]);
    if target == GNU_TARGET {
        // With an explicit --target, RUSTFLAGS applies to the target only, not build scripts.
        let mut flags = std::env::var("RUSTFLAGS").unwrap_or_default();
        flags.push_str(" -C target-feature=+crt-static");
        cmd.env("RUSTFLAGS", flags.trim());
    }
    util::run(&mut cmd).context("building kiln-agent")?;
    let path = util::target_dir()
        .join(target)
        .join("release")
        .join("kiln-agent");
    if !path.is_file() {
        bail!("cargo built kiln-agent but {} is missing", path.display());
    }
    Ok(path)
}

/// Whether the musl target is installed, adding it with rustup when it is not.
fn musl_target_available() -> bool {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == MUSL_TARGET)
        })
        .unwrap_or(false);
    if installed {
        return true;
    }
    eprintln!("adding rust target {MUSL_TARGET}");
    Command::new("rustup")
        .args(["target", "add", MUSL_TARGET])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Checks that `bytes` is an x86_64 ELF executable without a PT_INTERP program header, i.e.
/// that it runs in the initramfs without a dynamic loader.
pub fn check_static_elf(bytes: &[u8]) -> Result<()> {
    use object::elf::{FileHeader64, EM_X86_64, ET_DYN, ET_EXEC, PT_INTERP};
    use object::read::elf::{FileHeader, ProgramHeader};
    use object::Endianness;

    let header = FileHeader64::<Endianness>::parse(bytes)
        .map_err(|e| anyhow::anyhow!("not a 64-bit ELF file: {e}"))?;
    let endian = header
        .endian()
        .map_err(|e| anyhow::anyhow!("bad ELF endianness: {e}"))?;
    if header.e_machine(endian) != EM_X86_64 {
        bail!("ELF machine is {}, not x86_64", header.e_machine(endian));
    }
    let kind = header.e_type(endian);
    if kind != ET_EXEC && kind != ET_DYN {
        bail!("ELF type {kind} is not an executable");
    }
    let phdrs = header
        .program_headers(endian, bytes)
        .map_err(|e| anyhow::anyhow!("bad ELF program headers: {e}"))?;
    if phdrs.is_empty() {
        bail!("ELF has no program headers");
    }
    if let Some(interp) = phdrs.iter().find(|p| p.p_type(endian) == PT_INTERP) {
        let name = interp
            .data(endian, bytes)
            .ok()
            .map(|d| {
                String::from_utf8_lossy(d)
                    .trim_end_matches('\0')
                    .to_string()
            })
            .unwrap_or_default();
        bail!("ELF is dynamically linked (PT_INTERP {name:?}); it must be static");
    }
    Ok(())
}

/// The applet paths busybox installs, relative to `/` (from `busybox --list-full`).
fn busybox_applets() -> Result<Vec<String>> {
    let text = util::output(Command::new(BUSYBOX).arg("--list-full"))?;
    let applets: Vec<String> = text
        .lines()
        .map(|l| l.trim().trim_start_matches('/').to_string())
        .filter(|l| !l.is_empty())
        .collect();
    if applets.is_empty() {
        bail!("`{BUSYBOX} --list-full` listed no applets");
    }
    Ok(applets)
}

/// One initramfs entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Dir {
        name: String,
        perm: u32,
    },
    File {
        name: String,
        perm: u32,
        data: Vec<u8>,
    },
    Symlink {
        name: String,
        target: String,
    },
    CharDev {
        name: String,
        perm: u32,
        major: u32,
        minor: u32,
    },
}

impl Entry {
    fn name(&self) -> &str {
        match self {
            Entry::Dir { name, .. }
            | Entry::File { name, .. }
            | Entry::Symlink { name, .. }
            | Entry::CharDev { name, .. } => name,
        }
    }
}

/// The complete initramfs, parents before children, in a fixed order (reproducible archives).
fn layout(applets: &[String], agent: Vec<u8>, busybox: Vec<u8>) -> Result<Vec<Entry>> {
    let mut dirs: BTreeMap<String, u32> = DIRS.iter().map(|(d, p)| (d.to_string(), *p)).collect();
    let mut files: BTreeSet<String> = ["init".to_string(), "bin/busybox".to_string()]
        .into_iter()
        .collect();
    let mut links = Vec::new();
    for applet in applets {
        if applet.split('/').any(|c| c == ".." || c == ".") || applet.starts_with('/') {
            bail!("unexpected busybox applet path {applet:?}");
        }
        if !files.insert(applet.clone()) {
            continue; // `init` or a duplicate: ours wins.
        }
        // Every ancestor directory must exist before the link.
        for ancestor in Path::new(applet).ancestors().skip(1) {
            let a = ancestor.to_string_lossy();
            if !a.is_empty() {
                dirs.entry(a.into_owned()).or_insert(0o755);
            }
        }
        links.push(Entry::Symlink {
            name: applet.clone(),
            target: BUSYBOX.to_string(),
        });
    }
    let mut entries: Vec<Entry> = dirs
        .into_iter()
        .map(|(name, perm)| Entry::Dir { name, perm })
        .collect();
    // BTreeMap order puts "usr" before "usr/bin": parents come first.
    entries.push(Entry::CharDev {
        name: "dev/console".into(),
        perm: 0o600,
        major: 5,
        minor: 1,
    });
    entries.push(Entry::CharDev {
        name: "dev/null".into(),
        perm: 0o666,
        major: 1,
        minor: 3,
    });
    entries.push(Entry::File {
        name: "init".into(),
        perm: 0o755,
        data: agent,
    });
    entries.push(Entry::File {
        name: "bin/busybox".into(),
        perm: 0o755,
        data: busybox,
    });
    entries.extend(links);
    Ok(entries)
}

fn mode(kind: ModeFileType, perm: u32) -> u32 {
    u32::from(kind) | (perm & 0o7777)
}

/// Writes `entries` as an uncompressed newc archive, owned by root, mtime 0.
fn write_cpio(
    entries: &[Entry],
    out: &mut impl Write,
    mut progress: impl FnMut(usize, &str),
) -> Result<()> {
    for (i, entry) in entries.iter().enumerate() {
        progress(i, entry.name());
        let ino = u32::try_from(i + 1).context("too many initramfs entries")?;
        let base = Builder::new(entry.name()).ino(ino).uid(0).gid(0).mtime(0);
        let (builder, data): (Builder, &[u8]) = match entry {
            Entry::Dir { perm, .. } => (
                base.mode(mode(ModeFileType::Directory, *perm)).nlink(2),
                &[],
            ),
            Entry::File { perm, data, .. } => (
                base.mode(mode(ModeFileType::Regular, *perm)),
                data.as_slice(),
            ),
            Entry::Symlink { target, .. } => (
                base.mode(mode(ModeFileType::Symlink, 0o777)),
                target.as_bytes(),
            ),
            Entry::CharDev {
                perm, major, minor, ..
            } => (
                base.mode(mode(ModeFileType::Char, *perm))
                    .rdev_major(*major)
                    .rdev_minor(*minor),
                &[],
            ),
        };
        let size = u32::try_from(data.len())
            .with_context(|| format!("{} is too large for newc", entry.name()))?;
        let mut w = builder.write(&mut *out, size);
        w.write_all(data)
            .with_context(|| format!("writing {}", entry.name()))?;
        w.finish()
            .with_context(|| format!("finishing {}", entry.name()))?;
    }
    cpio::newc::trailer(&mut *out).context("writing the cpio trailer")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn read_back(archive: &[u8]) -> Vec<(String, u32, u32, u32, Vec<u8>)> {
        let mut rest = archive;
        let mut out = Vec::new();
        loop {
            let mut r = cpio::newc::Reader::new(rest).unwrap();
            if r.entry().is_trailer() {
                break;
            }
            let e = r.entry();
            let meta = (
                e.name().to_string(),
                e.mode(),
                e.rdev_major(),
                e.rdev_minor(),
            );
            let mut data = Vec::new();
            r.read_to_end(&mut data).unwrap();
            out.push((meta.0, meta.1, meta.2, meta.3, data));
            rest = r.finish().unwrap();
        }
        out
    }

    #[test]
    fn initramfs_layout_round_trips_through_cpio() {
        let applets = vec![
            "bin/sh".to_string(),
            "usr/bin/awk".to_string(),
            "sbin/init".to_string(),
            "linuxrc".to_string(),
            "usr/local/bin/x".to_string(),
        ];
        let entries = layout(&applets, b"AGENT".to_vec(), b"BUSYBOX".to_vec()).unwrap();
        let mut buf = Vec::new();
        write_cpio(&entries, &mut buf, |_, _| {}).unwrap();
        let got = read_back(&buf);
        let find = |n: &str| {
            got.iter()
                .find(|e| e.0 == n)
                .unwrap_or_else(|| panic!("{n}"))
        };

        assert_eq!(find("init").1, 0o100755);
        assert_eq!(find("init").4, b"AGENT");
        assert_eq!(find("bin/busybox").4, b"BUSYBOX");
        let sh = find("bin/sh");
        assert_eq!(sh.1 & 0o170000, 0o120000);
        assert_eq!(sh.4, b"/bin/busybox");
        assert_eq!(find("dev/console").1, 0o020600);
        assert_eq!((find("dev/console").2, find("dev/console").3), (5, 1));
        assert_eq!((find("dev/null").2, find("dev/null").3), (1, 3));
        assert_eq!(find("tmp").1, 0o041777);
        for d in [
            "proc", "sys", "dev", "run", "etc", "root", "mnt", "usr/sbin",
        ] {
            assert_eq!(find(d).1 & 0o170000, 0o040000, "{d}");
        }
        // Parents precede children, including directories only an applet needs.
        let pos = |n: &str| got.iter().position(|e| e.0 == n).unwrap();
        assert!(pos("usr/local") < pos("usr/local/bin"));
        assert!(pos("usr/local/bin") < pos("usr/local/bin/x"));
        assert!(pos("usr") < pos("usr/bin"));
        // The agent stays /init; busybox's init applet lives elsewhere.
        assert_eq!(got.iter().filter(|e| e.0 == "init").count(), 1);
    }

    #[test]
    fn applet_paths_escaping_the_root_are_refused() {
        assert!(layout(&["../etc/x".to_string()], vec![], vec![]).is_err());
    }

    #[test]
    fn dynamic_executables_are_refused() {
        // This test binary is built for the host's default (dynamic glibc) target.
        let exe = fs::read(std::env::current_exe().unwrap()).unwrap();
        let err = check_static_elf(&exe).unwrap_err().to_string();
        assert!(err.contains("PT_INTERP"), "{err}");
    }

    #[test]
    fn non_elf_input_is_refused() {
        assert!(check_static_elf(b"#!/bin/sh\necho hi\n").is_err());
        assert!(check_static_elf(&[]).is_err());
    }

    /// A minimal ELF64 x86_64 executable header with the given program header types.
    fn fake_elf(phdr_types: &[u32]) -> Vec<u8> {
        let mut b = vec![0u8; 64 + 56 * phdr_types.len()];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2; // ELFCLASS64
        b[5] = 1; // little endian
        b[6] = 1; // EV_CURRENT
        b[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        b[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        b[20..24].copy_from_slice(&1u32.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        b[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        b[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        b[56..58].copy_from_slice(&(phdr_types.len() as u16).to_le_bytes());
        for (i, t) in phdr_types.iter().enumerate() {
            let off = 64 + 56 * i;
            b[off..off + 4].copy_from_slice(&t.to_le_bytes());
        }
        b
    }

    #[test]
    fn static_elf_is_accepted_and_interp_refused() {
        check_static_elf(&fake_elf(&[1 /* PT_LOAD */])).unwrap();
        let err = check_static_elf(&fake_elf(&[1, 3 /* PT_INTERP */]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("PT_INTERP"), "{err}");
    }

    #[test]
    fn wrong_machine_is_refused() {
        let mut elf = fake_elf(&[1]);
        elf[18..20].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
        assert!(check_static_elf(&elf).is_err());
    }
}
