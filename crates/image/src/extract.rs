//! Safe application of one OCI/Docker layer (a tar stream) onto a root directory.
//!
//! Owns the extraction rules (docs/IMAGES.md "Safe extraction"): entry paths are taken
//! apart into components; an absolute path or a `..` component is refused; parent
//! directories are walked one component at a time with `lstat`, following only relative
//! symlinks that stay inside the root (at most [`MAX_SYMLINK_HOPS`]), and a parent symlink
//! that is absolute or climbs out of the root is refused; the last component is never
//! followed (an existing entry there is replaced, files are opened `O_NOFOLLOW|O_EXCL`).
//! Hard-link targets go through the same walk and must already exist in the root. Whiteouts
//! (`.wh.NAME`) and opaque markers (`.wh..wh..opq`) remove entries of lower layers only.
//! Device nodes and FIFOs are skipped. Ownership is applied when running as root.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Symlinks followed while resolving one parent path before it counts as a loop.
pub const MAX_SYMLINK_HOPS: usize = 40;
/// Entries allowed in one layer.
pub const MAX_ENTRIES: u64 = 2_000_000;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Why a layer could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("entry `{0}` has an absolute path")]
    AbsolutePath(String),
    #[error("entry `{0}` has a `..` component")]
    ParentDir(String),
    #[error("entry `{entry}` goes through symlink `{link}` -> `{target}`, which leaves the root")]
    SymlinkEscape {
        entry: String,
        link: String,
        target: String,
    },
    #[error("entry `{0}`: too many symlinks while resolving its parent (loop?)")]
    SymlinkLoop(String),
    #[error("hard link `{entry}` points outside the root or at `..`: `{target}`")]
    HardlinkEscape { entry: String, target: String },
    #[error("hard link `{entry}`: target `{target}` does not exist in the root or is a directory")]
    HardlinkTarget { entry: String, target: String },
    #[error("entry `{entry}`: parent component `{component}` is not a directory")]
    NotADirectory { entry: String, component: String },
    #[error("entry `{0}` has an invalid name")]
    BadName(String),
    #[error("layer has more than {MAX_ENTRIES} entries")]
    TooManyEntries,
    #[error("layer expands beyond the limit of {0} bytes")]
    TooLarge(u64),
    #[error("malformed tar stream")]
    Tar(#[source] io::Error),
    #[error("writing `{path}`")]
    Write {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl ExtractError {
    /// Whether the layer tried to escape the root (refused on purpose).
    pub fn is_unsafe(&self) -> bool {
        matches!(
            self,
            ExtractError::AbsolutePath(_)
                | ExtractError::ParentDir(_)
                | ExtractError::SymlinkEscape { .. }
                | ExtractError::SymlinkLoop(_)
                | ExtractError::HardlinkEscape { .. }
                | ExtractError::BadName(_)
        )
    }

    /// Whether the layer itself is malformed.
    pub fn is_corrupt(&self) -> bool {
        matches!(
            self,
            ExtractError::Tar(_)
                | ExtractError::HardlinkTarget { .. }
                | ExtractError::NotADirectory { .. }
                | ExtractError::TooManyEntries
                | ExtractError::TooLarge(_)
        )
    }
}

/// Counts of one applied layer.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LayerStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    pub whiteouts: u64,
    pub opaque_dirs: u64,
    /// Device nodes, FIFOs and unknown entry types left out.
    pub skipped: u64,
    /// Bytes of regular-file content written.
    pub bytes: u64,
}

/// Options of [`apply_layer`].
#[derive(Debug, Clone, Copy)]
pub struct ExtractOptions {
    /// Apply the entries' uid/gid (needs root). Default: whether the process is root.
    pub preserve_owner: bool,
    /// Upper bound of file content written by this layer.
    pub max_bytes: u64,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        ExtractOptions {
            preserve_owner: nix::unistd::geteuid().is_root(),
            max_bytes: 64 << 30,
        }
    }
}

/// Applies the tar stream `reader` onto `root` (an existing directory).
pub fn apply_layer<R: Read>(
    root: &Path,
    reader: R,
    opts: &ExtractOptions,
) -> Result<LayerStats, ExtractError> {
    let mut layer = Layer {
        root: root.to_path_buf(),
        opts: *opts,
        stats: LayerStats::default(),
        created: HashSet::new(),
        dir_modes: Vec::new(),
    };
    let mut archive = tar::Archive::new(reader);
    let mut count = 0u64;
    for entry in archive.entries().map_err(ExtractError::Tar)? {
        let entry = entry.map_err(ExtractError::Tar)?;
        count += 1;
        if count > MAX_ENTRIES {
            return Err(ExtractError::TooManyEntries);
        }
        layer.entry(entry)?;
    }
    // Directory modes last, so a read-only directory can still be filled first.
    for (path, mode) in layer.dir_modes.iter().rev() {
        fs::set_permissions(path, fs::Permissions::from_mode(*mode)).map_err(|source| {
            ExtractError::Write {
                path: path.display().to_string(),
                source,
            }
        })?;
    }
    Ok(layer.stats)
}

struct Layer {
    root: PathBuf,
    opts: ExtractOptions,
    stats: LayerStats,
    /// Root-relative real paths written by this layer (whiteouts spare them).
    created: HashSet<PathBuf>,
    dir_modes: Vec<(PathBuf, u32)>,
}

/// Splits an entry path into normal components; refuses absolute paths and `..`.
fn components(raw: &[u8]) -> Result<Vec<OsString>, ExtractError> {
    let shown = String::from_utf8_lossy(raw).into_owned();
    if raw.first() == Some(&b'/') {
        return Err(ExtractError::AbsolutePath(shown));
    }
    let mut out = Vec::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err(ExtractError::ParentDir(shown)),
            p => out.push(OsStr::from_bytes(p).to_os_string()),
        }
    }
    Ok(out)
}

fn write_err(path: &Path) -> impl FnOnce(io::Error) -> ExtractError + '_ {
    move |source| ExtractError::Write {
        path: path.display().to_string(),
        source,
    }
}

impl Layer {
    fn entry<R: Read>(&mut self, entry: tar::Entry<'_, R>) -> Result<(), ExtractError> {
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let mut comps = components(&raw)?;
        let Some(name) = comps.pop() else {
            // The root itself ("./"): nothing to create.
            return Ok(());
        };
        let name_bytes = name.as_bytes();
        if let Some(hidden) = name_bytes.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(ExtractError::BadName(shown));
            }
            // A whiteout under a directory that does not exist hides nothing.
            let (parent, parent_rel) = match self.resolve_dir(&comps, &shown, false) {
                Ok(p) => p,
                Err(e) if e.is_unsafe() => return Err(e),
                Err(_) => return Ok(()),
            };
            return self.whiteout(&parent, &parent_rel, name_bytes);
        }
        let (parent, parent_rel) = self.resolve_dir(&comps, &shown, true)?;
        self.write_entry(entry, &parent, &parent_rel, &name, shown)
    }

    fn whiteout(
        &mut self,
        parent: &Path,
        parent_rel: &Path,
        name_bytes: &[u8],
    ) -> Result<(), ExtractError> {
        if name_bytes == OPAQUE_MARKER.as_bytes() {
            self.stats.opaque_dirs += 1;
            return self.opaque(parent, parent_rel);
        }
        if let Some(hidden) = name_bytes.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            self.stats.whiteouts += 1;
            let rel = parent_rel.join(OsStr::from_bytes(hidden));
            if !self.created.contains(&rel) {
                remove_any(&parent.join(OsStr::from_bytes(hidden)))?;
            }
        }
        Ok(())
    }

    fn write_entry<R: Read>(
        &mut self,
        mut entry: tar::Entry<'_, R>,
        parent: &Path,
        parent_rel: &Path,
        name: &OsStr,
        shown: String,
    ) -> Result<(), ExtractError> {
        let kind = entry.header().entry_type();
        let path = parent.join(name);
        let rel = parent_rel.join(name);
        let header = entry.header();
        let mode = header.mode().map_err(ExtractError::Tar)? & 0o7777;
        let uid = header.uid().map_err(ExtractError::Tar)?;
        let gid = header.gid().map_err(ExtractError::Tar)?;
        let mtime = header.mtime().unwrap_or(0);

        match kind {
            tar::EntryType::Directory => {
                match fs::symlink_metadata(&path) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        remove_any(&path)?;
                        fs::create_dir(&path).map_err(write_err(&path))?;
                    }
                    Err(_) => fs::create_dir(&path).map_err(write_err(&path))?,
                }
                fs::set_permissions(&path, fs::Permissions::from_mode(0o700 | mode))
                    .map_err(write_err(&path))?;
                self.chown(&path, uid, gid)?;
                self.dir_modes.push((path, mode));
                self.stats.dirs += 1;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                remove_any(&path)?;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc_flags())
                    .open(&path)
                    .map_err(write_err(&path))?;
                let left = self.opts.max_bytes.saturating_sub(self.stats.bytes);
                let n = io::copy(&mut (&mut entry).take(left.saturating_add(1)), &mut file)
                    .map_err(ExtractError::Tar)?;
                if n > left {
                    return Err(ExtractError::TooLarge(self.opts.max_bytes));
                }
                self.stats.bytes += n;
                self.chown(&path, uid, gid)?;
                file.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(write_err(&path))?;
                set_mtime(&file, mtime);
                self.stats.files += 1;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| ExtractError::BadName(shown.clone()))?
                    .into_owned();
                remove_any(&path)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path)
                    .map_err(write_err(&path))?;
                self.chown(&path, uid, gid)?;
                self.stats.symlinks += 1;
            }
            tar::EntryType::Link => {
                let target_raw = entry
                    .link_name_bytes()
                    .ok_or_else(|| ExtractError::BadName(shown.clone()))?
                    .into_owned();
                let target_shown = String::from_utf8_lossy(&target_raw).into_owned();
                let escape = || ExtractError::HardlinkEscape {
                    entry: shown.clone(),
                    target: target_shown.clone(),
                };
                let mut tcomps = components(&target_raw).map_err(|_| escape())?;
                let tname = tcomps.pop().ok_or_else(escape)?;
                let (tparent, _) = self.resolve_dir(&tcomps, &shown, false).map_err(|e| {
                    if e.is_unsafe() {
                        escape()
                    } else {
                        ExtractError::HardlinkTarget {
                            entry: shown.clone(),
                            target: target_shown.clone(),
                        }
                    }
                })?;
                let target = tparent.join(&tname);
                match fs::symlink_metadata(&target) {
                    Ok(m) if !m.is_dir() => {}
                    _ => {
                        return Err(ExtractError::HardlinkTarget {
                            entry: shown,
                            target: target_shown,
                        })
                    }
                }
                if target != path {
                    remove_any(&path)?;
                    // linkat(2) without AT_SYMLINK_FOLLOW: a symlink target is linked itself.
                    fs::hard_link(&target, &path).map_err(write_err(&path))?;
                }
                self.stats.hardlinks += 1;
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => return Ok(()),
            _ => {
                // Char/block devices, FIFOs and anything unknown are not materialised.
                self.stats.skipped += 1;
                return Ok(());
            }
        }
        self.created.insert(rel);
        Ok(())
    }

    /// Walks `comps` from the root, creating missing directories when `create`, following
    /// only relative symlinks that stay inside the root. Returns the real path and the
    /// root-relative real path.
    fn resolve_dir(
        &self,
        comps: &[OsString],
        entry: &str,
        create: bool,
    ) -> Result<(PathBuf, PathBuf), ExtractError> {
        let mut real: Vec<OsString> = Vec::new();
        let mut pending: std::collections::VecDeque<OsString> = comps.iter().cloned().collect();
        let mut hops = 0usize;
        while let Some(c) = pending.pop_front() {
            let b = c.as_bytes();
            if b.is_empty() || b == b"." {
                continue;
            }
            if b == b".." {
                // Only symlink targets bring `..` here; the escape check happened there.
                real.pop();
                continue;
            }
            let mut p = self.root.clone();
            p.extend(real.iter());
            p.push(&c);
            match fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => real.push(c),
                Ok(m) if m.file_type().is_symlink() => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(ExtractError::SymlinkLoop(entry.to_string()));
                    }
                    let target = fs::read_link(&p).map_err(write_err(&p))?;
                    let tb = target.as_os_str().as_bytes();
                    let escape = || ExtractError::SymlinkEscape {
                        entry: entry.to_string(),
                        link: p
                            .strip_prefix(&self.root)
                            .unwrap_or(&p)
                            .display()
                            .to_string(),
                        target: target.display().to_string(),
                    };
                    if tb.first() == Some(&b'/') {
                        return Err(escape());
                    }
                    // Depth check: the target must not climb above the root.
                    let mut depth = real.len() as i64;
                    let mut parts = Vec::new();
                    for part in tb.split(|x| *x == b'/') {
                        match part {
                            b"" | b"." => {}
                            b".." => {
                                depth -= 1;
                                if depth < 0 {
                                    return Err(escape());
                                }
                                parts.push(OsString::from(".."));
                            }
                            q => {
                                depth += 1;
                                parts.push(OsStr::from_bytes(q).to_os_string());
                            }
                        }
                    }
                    for part in parts.into_iter().rev() {
                        pending.push_front(part);
                    }
                }
                Ok(_) => {
                    return Err(ExtractError::NotADirectory {
                        entry: entry.to_string(),
                        component: c.to_string_lossy().into_owned(),
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    fs::create_dir(&p).map_err(write_err(&p))?;
                    real.push(c);
                }
                Err(e) => {
                    return Err(ExtractError::Write {
                        path: p.display().to_string(),
                        source: e,
                    })
                }
            }
        }
        let rel: PathBuf = real.iter().collect();
        Ok((self.root.join(&rel), rel))
    }

    /// Removes every child of `dir` that a lower layer made.
    fn opaque(&mut self, dir: &Path, rel: &Path) -> Result<(), ExtractError> {
        let rd = fs::read_dir(dir).map_err(write_err(dir))?;
        for child in rd {
            let child = child.map_err(write_err(dir))?;
            if !self.created.contains(&rel.join(child.file_name())) {
                remove_any(&child.path())?;
            }
        }
        Ok(())
    }

    fn chown(&self, path: &Path, uid: u64, gid: u64) -> Result<(), ExtractError> {
        if !self.opts.preserve_owner {
            return Ok(());
        }
        let uid = u32::try_from(uid).ok();
        let gid = u32::try_from(gid).ok();
        std::os::unix::fs::lchown(path, uid, gid).map_err(write_err(path))
    }
}

fn libc_flags() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits() | nix::fcntl::OFlag::O_CLOEXEC.bits()
}

fn set_mtime(file: &File, mtime: u64) {
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(mtime);
    // Timestamps are cosmetic; a failure here is not worth failing the layer.
    let _ = file.set_modified(t);
}

/// Removes whatever is at `path` (file, symlink, or directory tree) without following it.
fn remove_any(path: &Path) -> Result<(), ExtractError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map_err(write_err(path)),
        Ok(_) => fs::remove_file(path).map_err(write_err(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ExtractError::Write {
            path: path.display().to_string(),
            source: e,
        }),
    }
}

#[cfg(test)]
#[path = "extract_tests.rs"]
mod tests;
