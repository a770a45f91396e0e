//! The root switch: with an image disk named on the kernel command line, PID 1 mounts it
//! read-only under an overlay (upper layer in a tmpfs in guest RAM, or on a writable scratch
//! disk), moves /proc, /sys, /dev, /run and /tmp into the new root, and makes it `/`
//! (`MS_MOVE` + `chroot`, as `switch_root` does). The initramfs stays in memory under the new
//! root (unreachable; it holds only the agent and busybox).
//!
//! Command line (written by the `kiln` library, docs/IMAGES.md "Root switch"):
//! - `kiln.root=/dev/vdX` the image disk; without it nothing is done.
//! - `kiln.rootfstype=ext4|erofs` (default ext4).
//! - `kiln.overlay=tmpfs` or `tmpfs:SIZE_MIB` (default: tmpfs of the kernel's default size,
//!   half the RAM), or `kiln.overlay=/dev/vdY`: an ext4 scratch disk (formatted by the host)
//!   holding `upper/` and `work/`.
//! - `kiln.root_fallback=1`: on failure, report and go on serving from the initramfs.
//!   Without it a failure is reported and the VM is ended before the readiness line, so the
//!   host sees a boot failure with the console tail.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};

/// Prefix of every console line of the root switch.
pub const PREFIX: &str = "kiln-agent: root:";

/// Where the lower (image), the writable layer and the merged root are mounted in the
/// initramfs.
const BASE: &str = "/.kiln";
/// How long to wait for the image's block device node to appear.
const DEVICE_WAIT: Duration = Duration::from_secs(5);
/// Longest value of a `kiln.*` parameter we accept.
const MAX_VALUE: usize = 256;

/// The image file system type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    /// ext4 (mounted `ro,noload`).
    Ext4,
    /// EROFS.
    Erofs,
}

impl FsType {
    fn name(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Erofs => "erofs",
        }
    }
}

/// Where the overlay's upper layer lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upper {
    /// A tmpfs in guest RAM, `None` = the kernel's default size.
    Tmpfs(Option<u32>),
    /// An ext4 scratch disk.
    Disk(PathBuf),
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootSpec {
    /// The image's block device.
    pub device: PathBuf,
    /// Its file system.
    pub fstype: FsType,
    /// The overlay's upper layer.
    pub upper: Upper,
    /// Whether a failure falls back to the initramfs root.
    pub fallback: bool,
}

/// Errors of the root switch.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    /// A `kiln.*` parameter is malformed.
    #[error("kernel command line: {param}: {reason}")]
    Cmdline {
        /// The parameter.
        param: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The device node did not appear.
    #[error("{} did not appear within {:?}", device.display(), DEVICE_WAIT)]
    NoDevice {
        /// The device.
        device: PathBuf,
    },
    /// A mount or move failed.
    #[error("{what} {}: {source}", target.display())]
    Mount {
        /// What was being done.
        what: String,
        /// Where.
        target: PathBuf,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// A directory could not be made.
    #[error("mkdir {}: {source}", path.display())]
    Mkdir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `chdir`/`chroot` failed.
    #[error("{op} {}: {source}", path.display())]
    Chroot {
        /// `chdir` or `chroot`.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// The image has no usable shell-free layout (no /etc, /usr...).
    #[error("the image at {} has no {missing}: not a root file system", device.display())]
    NotARoot {
        /// The device.
        device: PathBuf,
        /// The missing directory.
        missing: &'static str,
    },
}

/// Parses the `kiln.root*` / `kiln.overlay` parameters of a command line. `Ok(None)`: no
/// `kiln.root`, nothing to do.
pub fn parse(cmdline: &str) -> Result<Option<RootSpec>, RootError> {
    let value = |key: &str| -> Option<&str> {
        cmdline
            .split_whitespace()
            .filter_map(|w| w.strip_prefix(key)?.strip_prefix('='))
            .next_back()
    };
    let bad = |param, reason: String| RootError::Cmdline { param, reason };
    let Some(device) = value("kiln.root") else {
        return Ok(None);
    };
    let check_dev = |param, v: &str| -> Result<PathBuf, RootError> {
        let ok = v.len() <= MAX_VALUE
            && v.starts_with("/dev/")
            && !v.split('/').any(|c| c == "..")
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/_-.".contains(&b));
        if ok {
            Ok(PathBuf::from(v))
        } else {
            Err(bad(param, format!("{v:?} is not a /dev/ path")))
        }
    };
    let device = check_dev("kiln.root", device)?;
    let fstype = match value("kiln.rootfstype").unwrap_or("ext4") {
        "ext4" => FsType::Ext4,
        "erofs" => FsType::Erofs,
        other => {
            return Err(bad(
                "kiln.rootfstype",
                format!("{other:?} is not ext4 or erofs"),
            ))
        }
    };
    let upper = match value("kiln.overlay").unwrap_or("tmpfs") {
        "tmpfs" => Upper::Tmpfs(None),
        v if v.starts_with("tmpfs:") => {
            let n = &v["tmpfs:".len()..];
            match n.parse::<u32>() {
                Ok(mib) if mib > 0 => Upper::Tmpfs(Some(mib)),
                _ => {
                    return Err(bad(
                        "kiln.overlay",
                        format!("{n:?} is not a size in MiB (> 0)"),
                    ))
                }
            }
        }
        v => Upper::Disk(check_dev("kiln.overlay", v)?),
    };
    if let Upper::Disk(d) = &upper {
        if *d == device {
            return Err(bad(
                "kiln.overlay",
                "the scratch disk is the image disk".into(),
            ));
        }
    }
    Ok(Some(RootSpec {
        device,
        fstype,
        upper,
        fallback: value("kiln.root_fallback") == Some("1"),
    }))
}

/// What the root switch did, for the console.
#[derive(Debug)]
pub struct Switched {
    /// The spec it followed.
    pub spec: RootSpec,
    /// How long it took.
    pub took: Duration,
}

/// Performs the root switch when the command line asks for one. Only as PID 1, after the
/// pseudo file systems are mounted (devtmpfs gives the disk's node).
pub fn switch_from_cmdline() -> Result<Option<Switched>, (RootError, bool)> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let spec = match parse(&cmdline) {
        Ok(Some(s)) => s,
        Ok(None) => return Ok(None),
        // A malformed parameter: the host asked for a fallback only if it said so.
        Err(e) => {
            return Err((
                e,
                cmdline
                    .split_whitespace()
                    .any(|w| w == "kiln.root_fallback=1"),
            ))
        }
    };
    let t0 = Instant::now();
    match switch(&spec) {
        Ok(()) => Ok(Some(Switched {
            spec,
            took: t0.elapsed(),
        })),
        Err(e) => Err((e, spec.fallback)),
    }
}

fn mkdir(path: &Path) -> Result<(), RootError> {
    std::fs::create_dir_all(path).map_err(|source| RootError::Mkdir {
        path: path.to_owned(),
        source,
    })
}

fn do_mount(
    what: &str,
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), RootError> {
    mount(src, target, fstype, flags, data).map_err(|source| RootError::Mount {
        what: what.to_owned(),
        target: target.to_owned(),
        source,
    })
}

fn wait_for(device: &Path) -> Result<(), RootError> {
    let deadline = Instant::now() + DEVICE_WAIT;
    while std::fs::symlink_metadata(device).is_err() {
        if Instant::now() >= deadline {
            return Err(RootError::NoDevice {
                device: device.to_owned(),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// The switch itself.
fn switch(spec: &RootSpec) -> Result<(), RootError> {
    let base = Path::new(BASE);
    let lower = base.join("lower");
    let rw = base.join("rw");
    let root = base.join("root");
    for d in [&lower, &rw, &root] {
        mkdir(d)?;
    }
    wait_for(&spec.device)?;
    let (flags, data) = match spec.fstype {
        FsType::Ext4 => (MsFlags::MS_RDONLY | MsFlags::MS_NODEV, Some("noload")),
        FsType::Erofs => (MsFlags::MS_RDONLY | MsFlags::MS_NODEV, None),
    };
    do_mount(
        &format!(
            "mounting the image {} ({})",
            spec.device.display(),
            spec.fstype.name()
        ),
        Some(&spec.device),
        &lower,
        Some(spec.fstype.name()),
        flags,
        data,
    )?;
    for missing in ["etc", "usr"] {
        if !lower.join(missing).is_dir() {
            return Err(RootError::NotARoot {
                device: spec.device.clone(),
                missing,
            });
        }
    }
    match &spec.upper {
        Upper::Tmpfs(size) => {
            let data = match size {
                Some(mib) => format!("mode=0755,size={mib}m"),
                None => "mode=0755".to_owned(),
            };
            do_mount(
                "mounting the overlay's tmpfs on",
                Some(Path::new("tmpfs")),
                &rw,
                Some("tmpfs"),
                MsFlags::empty(),
                Some(&data),
            )?;
        }
        Upper::Disk(dev) => {
            wait_for(dev)?;
            do_mount(
                &format!("mounting the scratch disk {} (ext4) on", dev.display()),
                Some(dev),
                &rw,
                Some("ext4"),
                MsFlags::empty(),
                None,
            )?;
        }
    }
    let upper = rw.join("upper");
    let work = rw.join("work");
    mkdir(&upper)?;
    mkdir(&work)?;
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    do_mount(
        "mounting the overlay on",
        Some(Path::new("overlay")),
        &root,
        Some("overlay"),
        MsFlags::empty(),
        Some(&opts),
    )?;
    // The pseudo file systems (with their submounts: /dev/pts, /dev/shm) move into the new
    // root; /run and /tmp stay tmpfs (in RAM, outside the overlay).
    for dir in ["/dev", "/proc", "/sys", "/run", "/tmp"] {
        let target = root.join(&dir[1..]);
        mkdir(&target)?;
        if let Err(e) = do_mount(
            "moving into",
            Some(Path::new(dir)),
            &target,
            None,
            MsFlags::MS_MOVE,
            None,
        ) {
            // Not mounted (its mount failed earlier and was reported): leave the image's.
            if !matches!(
                e,
                RootError::Mount {
                    source: nix::Error::EINVAL,
                    ..
                }
            ) {
                return Err(e);
            }
        }
    }
    let chdir = |path: &Path| {
        nix::unistd::chdir(path).map_err(|source| RootError::Chroot {
            op: "chdir",
            path: path.to_owned(),
            source,
        })
    };
    chdir(&root)?;
    do_mount(
        "moving the new root onto /:",
        Some(Path::new(".")),
        Path::new("/"),
        None,
        MsFlags::MS_MOVE,
        None,
    )?;
    nix::unistd::chroot(".").map_err(|source| RootError::Chroot {
        op: "chroot",
        path: root.clone(),
        source,
    })?;
    chdir(Path::new("/"))?;
    host_files();
    Ok(())
}

/// /etc/hostname and a /etc/hosts naming the host name (written into the overlay; the image
/// is never touched). The guest has no network: /etc/resolv.conf is left as the image has it.
fn host_files() {
    let name = crate::sys::HOSTNAME;
    let _ = std::fs::write("/etc/hostname", format!("{name}\n"));
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    if !hosts.lines().any(|l| {
        !l.trim_start().starts_with('#') && l.split_whitespace().skip(1).any(|h| h == name)
    }) {
        let mut new = if hosts.trim().is_empty() {
            "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n".to_owned()
        } else {
            hosts
        };
        if !new.ends_with('\n') {
            new.push('\n');
        }
        new.push_str(&format!("127.0.1.1\t{name}\n"));
        let _ = std::fs::write("/etc/hosts", new);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_root_means_nothing_to_do() {
        assert_eq!(parse("console=ttyS0 quiet").unwrap(), None);
        assert_eq!(parse("").unwrap(), None);
        // A key that only starts like ours is not ours.
        assert_eq!(parse("kiln.rootx=/dev/vda").unwrap(), None);
    }

    #[test]
    fn defaults_and_every_field() {
        let s = parse("quiet kiln.root=/dev/vda").unwrap().unwrap();
        assert_eq!(s.device, PathBuf::from("/dev/vda"));
        assert_eq!(s.fstype, FsType::Ext4);
        assert_eq!(s.upper, Upper::Tmpfs(None));
        assert!(!s.fallback);
        let s = parse(
            "kiln.root=/dev/vdb kiln.rootfstype=erofs kiln.overlay=tmpfs:256 kiln.root_fallback=1",
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.fstype, FsType::Erofs);
        assert_eq!(s.upper, Upper::Tmpfs(Some(256)));
        assert!(s.fallback);
        let s = parse("kiln.root=/dev/vda kiln.overlay=/dev/vdb")
            .unwrap()
            .unwrap();
        assert_eq!(s.upper, Upper::Disk(PathBuf::from("/dev/vdb")));
        // The last occurrence wins, as for the kernel's own parameters.
        let s = parse("kiln.root=/dev/vda kiln.root=/dev/vdc")
            .unwrap()
            .unwrap();
        assert_eq!(s.device, PathBuf::from("/dev/vdc"));
    }

    #[test]
    fn malformed_parameters_name_themselves() {
        for (line, param) in [
            ("kiln.root=vda", "kiln.root"),
            ("kiln.root=/dev/../etc/passwd", "kiln.root"),
            (
                "kiln.root=/dev/vda kiln.rootfstype=btrfs",
                "kiln.rootfstype",
            ),
            ("kiln.root=/dev/vda kiln.overlay=tmpfs:0", "kiln.overlay"),
            ("kiln.root=/dev/vda kiln.overlay=tmpfs:lots", "kiln.overlay"),
            ("kiln.root=/dev/vda kiln.overlay=disk", "kiln.overlay"),
            ("kiln.root=/dev/vda kiln.overlay=/dev/vda", "kiln.overlay"),
        ] {
            match parse(line) {
                Err(RootError::Cmdline { param: p, .. }) => assert_eq!(p, param, "{line}"),
                other => panic!("{line}: {other:?}"),
            }
        }
    }
}
