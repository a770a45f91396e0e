//! Turning a root directory into an image file (`mkfs.ext4 -d` or `mkfs.erofs`), and the
//! cheap header check that spots a file that is not (or no longer) such an image.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use crate::meta::ImageFormat;
use crate::tools;
use crate::{ImageError, Result};

/// Sums of a root directory, used to size an ext4 image.
#[derive(Debug, Default, Clone, Copy)]
pub struct TreeSize {
    pub inodes: u64,
    /// Bytes of content (regular files and symlinks).
    pub bytes: u64,
    /// Space of the content in 4 KiB blocks.
    pub blocks: u64,
}

/// Walks `root` without following symlinks.
pub fn tree_size(root: &Path) -> Result<TreeSize> {
    let mut t = TreeSize::default();
    let mut stack = vec![root.to_path_buf()];
    let mut seen = std::collections::HashSet::new();
    while let Some(dir) = stack.pop() {
        let rd =
            std::fs::read_dir(&dir).map_err(|e| ImageError::io("reading directory", &dir, e))?;
        for ent in rd {
            let ent = ent.map_err(|e| ImageError::io("reading directory", &dir, e))?;
            let m = ent
                .metadata()
                .map_err(|e| ImageError::io("stat", ent.path(), e))?;
            if m.nlink() > 1 && !m.is_dir() && !seen.insert((m.dev(), m.ino())) {
                continue;
            }
            t.inodes += 1;
            if m.is_dir() {
                t.blocks += 1;
                stack.push(ent.path());
            } else {
                t.bytes += m.len();
                t.blocks += m.len().div_ceil(4096);
            }
        }
    }
    Ok(t)
}

fn run(cmd: &mut Command, step: &str) -> Result<()> {
    let out = cmd.output().map_err(|e| ImageError::BuildFailed {
        step: step.to_string(),
        reason: format!("could not run: {e}"),
    })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(8).collect();
        return Err(ImageError::BuildFailed {
            step: step.to_string(),
            reason: format!(
                "{} exited with {}: {}",
                step,
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            ),
        });
    }
    Ok(())
}

/// Writes the image of `root` to `out` (which must not exist) and fsyncs it.
pub fn make_image(format: ImageFormat, root: &Path, out: &Path) -> Result<()> {
    match format {
        ImageFormat::Erofs => {
            tools::require(&[tools::MKFS_EROFS])?;
            run(
                Command::new("mkfs.erofs")
                    .arg("--quiet")
                    .arg("-zlz4hc")
                    .arg(out)
                    .arg(root),
                "mkfs.erofs",
            )?;
        }
        ImageFormat::Ext4 => {
            tools::require(&[tools::MKFS_EXT4, tools::RESIZE2FS])?;
            let t = tree_size(root)?;
            // Generous first size (metadata, directories, inode tables), then shrink.
            let inodes = t.inodes + t.inodes / 4 + 1024;
            let mut size_kib = (t.blocks * 4) + (t.blocks * 4) / 5 + inodes / 4 + 64 * 1024;
            let mut attempt = 0;
            loop {
                let _ = std::fs::remove_file(out);
                let res = run(
                    Command::new("mkfs.ext4")
                        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0"])
                        .args(["-O", "^has_journal", "-L", "kiln-rootfs"])
                        .args(["-E", "root_owner=0:0"])
                        .arg("-N")
                        .arg(inodes.to_string())
                        .arg("-d")
                        .arg(root)
                        .arg(out)
                        .arg(format!("{size_kib}k")),
                    "mkfs.ext4",
                );
                match res {
                    Ok(()) => break,
                    Err(e) if attempt < 3 => {
                        tracing::debug!(error = %e, size_kib, "mkfs.ext4 too small, retrying");
                        size_kib *= 2;
                        attempt += 1;
                    }
                    Err(e) => return Err(e),
                }
            }
            run(Command::new("resize2fs").arg("-M").arg(out), "resize2fs -M")?;
        }
    }
    let f = File::options()
        .read(true)
        .write(true)
        .open(out)
        .map_err(|e| ImageError::io("opening image", out, e))?;
    f.sync_all()
        .map_err(|e| ImageError::io("fsync image", out, e))?;
    Ok(())
}

/// Checks the filesystem magic of `path`; an error string says what is wrong.
pub fn check_magic(format: ImageFormat, path: &Path) -> std::result::Result<(), String> {
    let mut f = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let (offset, magic): (u64, &[u8]) = match format {
        // ext4 superblock at 1024, s_magic at +0x38 (little-endian 0xEF53).
        ImageFormat::Ext4 => (1024 + 0x38, &[0x53, 0xEF]),
        // EROFS superblock at 1024, magic 0xE0F5E1E2 little-endian.
        ImageFormat::Erofs => (1024, &[0xE2, 0xE1, 0xF5, 0xE0]),
    };
    let mut buf = vec![0u8; magic.len()];
    f.seek(SeekFrom::Start(offset))
        .map_err(|e| format!("cannot seek: {e}"))?;
    f.read_exact(&mut buf)
        .map_err(|_| "too short for a filesystem header".to_string())?;
    if buf != magic {
        return Err(format!("no {} superblock", format.as_str()));
    }
    Ok(())
}
