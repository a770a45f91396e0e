//! Sandboxes booted from a root-filesystem image ([`SandboxConfig::image`]): resolving the
//! image (a name in the kiln-image store at [`crate::assets::images_dir`], or an image file's
//! path), the disks and kernel command line that make the agent switch root (read-only image
//! disk + overlay, docs/IMAGES.md "Root switch"), and the image's exec defaults (env, working
//! directory, user) that every exec of the sandbox uses unless its [`ExecOptions`] say
//! otherwise. A snapshot of such a sandbox carries the defaults in `exec-defaults.json`
//! beside `vm.state`, so restores and forks keep them.
//!
//! [`SandboxConfig::image`]: crate::SandboxConfig::image

use std::path::{Path, PathBuf};

use kiln_image::{ExecDefaults, ImageFormat, ImageStore};
use kiln_vmm::virtio::block::DiskConfig;

use crate::exec::ExecOptions;

/// File of a snapshot directory holding the exec defaults of an image sandbox.
pub const EXEC_DEFAULTS_FILE: &str = "exec-defaults.json";
/// Largest exec-defaults file read back from a snapshot.
const MAX_DEFAULTS_FILE: u64 = 1 << 20;

/// Errors of image resolution.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The store could not give the image (unknown name, corrupt image...).
    #[error("image {name:?}")]
    Store {
        /// The name asked for.
        name: String,
        /// kiln-image's error (its kind gives the CLI's exit code).
        #[source]
        source: Box<kiln_image::ImageError>,
    },
    /// The store directory is unknown (no `$HOME`...).
    #[error("image {name:?}: the image store directory")]
    StoreDir {
        /// The name asked for.
        name: String,
        /// Why.
        #[source]
        source: crate::assets::AssetsError,
    },
    /// An image file given by path is not an ext4 or EROFS file system.
    #[error("image file {}: {reason}", path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The scratch disk could not be prepared.
    #[error("scratch disk {}: {reason}", path.display())]
    Scratch {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl ImageError {
    /// kiln-image's error kind, when the store gave the error.
    pub fn store_kind(&self) -> Option<kiln_image::ErrorKind> {
        match self {
            ImageError::Store { source, .. } => Some(source.kind()),
            ImageError::BadFile { .. } => Some(kiln_image::ErrorKind::CorruptImage),
            _ => None,
        }
    }
}

/// What a sandbox runs commands with by default: an image's `Env`, `WorkingDir`, `User`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SandboxExecDefaults {
    /// Environment (applied before the caller's, which wins per key).
    pub env: Vec<(String, String)>,
    /// Working directory unless the caller gives one.
    pub cwd: Option<String>,
    /// User unless the caller gives one.
    pub user: Option<String>,
    /// The image's entrypoint + cmd (what `kiln run --image` runs without a command).
    pub command: Vec<String>,
}

impl SandboxExecDefaults {
    /// From an image's [`ExecDefaults`] (`KEY=VALUE` strings without `=` are dropped).
    pub fn from_image(e: &ExecDefaults) -> Self {
        Self {
            env: e
                .env
                .iter()
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    (!k.is_empty()).then(|| (k.to_owned(), v.to_owned()))
                })
                .collect(),
            cwd: e.working_dir.clone().filter(|d| !d.is_empty()),
            user: e.user.clone().filter(|u| !u.is_empty()),
            command: e.entrypoint.iter().chain(&e.cmd).cloned().collect(),
        }
    }

    /// Whether there is nothing to apply.
    pub fn is_empty(&self) -> bool {
        self.env.is_empty() && self.cwd.is_none() && self.user.is_none() && self.command.is_empty()
    }

    /// `opts` with these defaults under it: the caller's env entries come after (and so
    /// override) the image's, its cwd and user win when set.
    pub fn apply(&self, mut opts: ExecOptions) -> ExecOptions {
        if !self.env.is_empty() {
            let mut env = self.env.clone();
            env.append(&mut opts.env);
            opts.env = env;
        }
        if opts.cwd.is_none() {
            opts.cwd.clone_from(&self.cwd);
        }
        if opts.user.is_none() {
            opts.user.clone_from(&self.user);
        }
        opts
    }

    /// Writes them into a snapshot directory (nothing when empty; a stale file is removed).
    pub(crate) fn save(&self, dir: &Path) -> std::io::Result<()> {
        let path = dir.join(EXEC_DEFAULTS_FILE);
        if self.is_empty() {
            return match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        let tmp = dir.join(format!("{EXEC_DEFAULTS_FILE}.tmp"));
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, &path)
    }

    /// Reads them from a snapshot directory (`None` without the file).
    pub(crate) fn load(dir: &Path) -> std::io::Result<Option<Self>> {
        use std::io::Read;
        let path = dir.join(EXEC_DEFAULTS_FILE);
        let f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut buf = Vec::new();
        f.take(MAX_DEFAULTS_FILE).read_to_end(&mut buf)?;
        serde_json::from_slice(&buf)
            .map(Some)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}

/// An image resolved for a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedImage {
    /// The image file (the read-only /dev/vda).
    pub path: PathBuf,
    /// Its file system.
    pub format: ImageFormat,
    /// Its exec defaults.
    pub exec: SandboxExecDefaults,
}

/// Whether `name_or_path` names a file rather than a store entry: it starts with `/` or `.`
/// (store names never do) or ends in `.img`, `.ext4` or `.erofs`. Anything else is a name
/// (`python`, `localhost:5000/app:1`).
pub fn is_path(name_or_path: &str) -> bool {
    name_or_path.starts_with(['/', '.'])
        || [".img", ".ext4", ".erofs"]
            .iter()
            .any(|s| name_or_path.ends_with(s))
}

/// Resolves `name_or_path` in `store_dir` (or as a file; its format from its superblock, no
/// exec defaults).
pub fn resolve_in(store_dir: &Path, name_or_path: &str) -> Result<ResolvedImage, ImageError> {
    if is_path(name_or_path) {
        let path = PathBuf::from(name_or_path);
        let mut reasons = Vec::new();
        for format in [ImageFormat::Ext4, ImageFormat::Erofs] {
            match kiln_image::format::check_magic(format, &path) {
                Ok(()) => {
                    return Ok(ResolvedImage {
                        path,
                        format,
                        exec: SandboxExecDefaults::default(),
                    })
                }
                Err(r) => reasons.push(r),
            }
        }
        reasons.dedup();
        return Err(ImageError::BadFile {
            path,
            reason: reasons.join("; "),
        });
    }
    let store_err = |source| ImageError::Store {
        name: name_or_path.to_owned(),
        source: Box::new(source),
    };
    let store = ImageStore::open(store_dir).map_err(store_err)?;
    let img = store.resolve(name_or_path).map_err(store_err)?;
    Ok(ResolvedImage {
        path: img.path,
        format: img.meta.format,
        exec: SandboxExecDefaults::from_image(&img.meta.exec),
    })
}

/// Resolves `name_or_path` in [`crate::assets::images_dir`].
pub fn resolve(name_or_path: &str) -> Result<ResolvedImage, ImageError> {
    if is_path(name_or_path) {
        return resolve_in(Path::new("/"), name_or_path);
    }
    let dir = crate::assets::images_dir().map_err(|source| ImageError::StoreDir {
        name: name_or_path.to_owned(),
        source,
    })?;
    resolve_in(&dir, name_or_path)
}

/// Makes sure the scratch disk is an ext4 file system: a file without an ext4 superblock is
/// formatted with `mkfs.ext4` (e2fsprogs) on the host. The file must exist (its size is
/// the scratch space).
pub fn prepare_scratch(path: &Path) -> Result<(), ImageError> {
    let err = |reason: String| ImageError::Scratch {
        path: path.to_owned(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    if kiln_image::format::check_magic(ImageFormat::Ext4, path).is_ok() {
        return Ok(());
    }
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0", "-O", "^has_journal"])
        .arg(path)
        .output()
        .map_err(|e| {
            err(format!(
                "running mkfs.ext4 (Debian package e2fsprogs) to format it: {e}"
            ))
        })?;
    if !out.status.success() {
        return Err(err(format!(
            "mkfs.ext4 failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The guest device name of the `i`-th disk (0 = `/dev/vda`).
pub(crate) fn device_name(i: usize) -> String {
    let letter = char::from(b'a' + u8::try_from(i % 26).unwrap_or(0));
    format!("/dev/vd{letter}")
}

/// The disks (image first, read-only; then the scratch disk) and the command line the agent
/// reads for the root switch.
pub(crate) fn boot_parts(
    image: &ResolvedImage,
    overlay_size_mib: Option<u32>,
    scratch: Option<&Path>,
) -> (Vec<DiskConfig>, String) {
    let mut disks = vec![DiskConfig::new(image.path.clone(), true)];
    let fstype = match image.format {
        ImageFormat::Ext4 => "ext4",
        ImageFormat::Erofs => "erofs",
    };
    let overlay = match (scratch, overlay_size_mib) {
        (Some(p), _) => {
            disks.push(DiskConfig::new(p.to_owned(), false));
            device_name(1)
        }
        (None, Some(mib)) => format!("tmpfs:{mib}"),
        (None, None) => "tmpfs".to_owned(),
    };
    let cmdline = format!(
        "kiln.root={} kiln.rootfstype={fstype} kiln.overlay={overlay}",
        device_name(0)
    );
    (disks, cmdline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_come_from_the_image_and_the_caller_wins() {
        let d = SandboxExecDefaults::from_image(&ExecDefaults {
            env: vec!["PATH=/usr/bin".into(), "LANG=C.UTF-8".into(), "junk".into()],
            working_dir: Some("/home/user".into()),
            user: Some("user".into()),
            entrypoint: vec!["/bin/bash".into()],
            cmd: vec!["-l".into()],
        });
        assert_eq!(d.env.len(), 2);
        assert_eq!(d.command, ["/bin/bash", "-l"]);
        let o = d.apply(ExecOptions::new());
        assert_eq!(o.cwd.as_deref(), Some("/home/user"));
        assert_eq!(o.user.as_deref(), Some("user"));
        assert_eq!(o.env[0], ("PATH".into(), "/usr/bin".into()));
        let o = d.apply(ExecOptions::new().cwd("/tmp").user("root").env("LANG", "C"));
        assert_eq!(o.cwd.as_deref(), Some("/tmp"));
        assert_eq!(o.user.as_deref(), Some("root"));
        // The caller's entry comes last: the agent applies entries in order, last wins.
        assert_eq!(o.env.last().unwrap(), &("LANG".into(), "C".into()));
    }

    #[test]
    fn defaults_round_trip_through_a_snapshot_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(SandboxExecDefaults::load(dir.path()).unwrap(), None);
        let d = SandboxExecDefaults {
            user: Some("user".into()),
            ..Default::default()
        };
        d.save(dir.path()).unwrap();
        assert_eq!(SandboxExecDefaults::load(dir.path()).unwrap(), Some(d));
        SandboxExecDefaults::default().save(dir.path()).unwrap();
        assert_eq!(SandboxExecDefaults::load(dir.path()).unwrap(), None);
        std::fs::write(dir.path().join(EXEC_DEFAULTS_FILE), b"{nope").unwrap();
        assert!(SandboxExecDefaults::load(dir.path()).is_err());
    }

    #[test]
    fn names_and_paths_resolve_with_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let e = resolve_in(dir.path(), "nosuchimage").unwrap_err();
        assert_eq!(e.store_kind(), Some(kiln_image::ErrorKind::UnknownImage));
        assert!(e.to_string().contains("nosuchimage"), "{e}");
        let f = dir.path().join("junk.img");
        std::fs::write(&f, vec![0u8; 4096]).unwrap();
        let e = resolve_in(dir.path(), f.to_str().unwrap()).unwrap_err();
        assert!(matches!(e, ImageError::BadFile { .. }), "{e}");
        assert!(e.to_string().contains("superblock"), "{e}");
        // An ext4 superblock magic makes it an ext4 image.
        let mut b = vec![0u8; 4096];
        b[1024 + 0x38] = 0x53;
        b[1024 + 0x39] = 0xEF;
        std::fs::write(&f, b).unwrap();
        let r = resolve_in(dir.path(), f.to_str().unwrap()).unwrap();
        assert_eq!(r.format, ImageFormat::Ext4);
        assert!(r.exec.is_empty());
    }

    #[test]
    fn boot_parts_put_the_image_first_and_name_the_overlay() {
        let img = ResolvedImage {
            path: "/i.ext4".into(),
            format: ImageFormat::Ext4,
            exec: Default::default(),
        };
        let (d, c) = boot_parts(&img, None, None);
        assert_eq!(d.len(), 1);
        assert!(d[0].read_only);
        assert_eq!(
            c,
            "kiln.root=/dev/vda kiln.rootfstype=ext4 kiln.overlay=tmpfs"
        );
        let (_, c) = boot_parts(&img, Some(128), None);
        assert!(c.ends_with("kiln.overlay=tmpfs:128"), "{c}");
        let (d, c) = boot_parts(&img, Some(128), Some(Path::new("/s.img")));
        assert_eq!(d.len(), 2);
        assert!(!d[1].read_only);
        assert!(c.ends_with("kiln.overlay=/dev/vdb"), "{c}");
    }
}
