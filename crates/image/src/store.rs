//! The image store: a directory of content-keyed images and a name index.
//!
//! Layout (docs/IMAGES.md): `images/<key>/{image.json, rootfs.<fmt>}`, `index.json`
//! (name -> key), `tmp/<pid>-*` staging directories, `apt/` (package index cache of builds),
//! `.lock` (flock serialising index changes). An image directory appears only by `rename`
//! of a complete, fsynced staging directory; the index is rewritten through a temporary
//! file, fsync and rename. Staging directories of dead processes are removed on open.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::format;
use crate::meta::{ExecDefaults, ImageFormat, ImageMeta, ImageSource, META_SCHEMA};
use crate::progress::Event;
use crate::{ImageError, Result};

/// What a build, import or pull records of the root it staged (see `ImageStore::store_made`).
pub(crate) struct Made {
    pub key: String,
    pub format: ImageFormat,
    pub source: ImageSource,
    pub exec: ExecDefaults,
    /// Bytes of file content in the root filesystem.
    pub content_bytes: u64,
    /// When the build, import or pull began.
    pub started: Instant,
}

/// The content key `<prefix>-<first 32 hex digits of digest>-<format>` of an image whose
/// identity is `digest` (`sha256:<hex>`, algorithm already checked).
pub(crate) fn digest_key(prefix: &str, digest: &str, format: ImageFormat) -> String {
    format!(
        "{prefix}-{}-{}",
        &digest["sha256:".len()..][..32],
        format.as_str()
    )
}

/// An image in the store, resolved and checked.
#[derive(Debug, Clone)]
pub struct Image {
    /// The name it was resolved by (or its key when resolved by key).
    pub name: String,
    pub key: String,
    /// The image file (boot it as a read-only virtio-blk disk).
    pub path: PathBuf,
    pub meta: ImageMeta,
}

/// One line of [`ImageStore::list`].
#[derive(Debug, Clone)]
pub struct ListEntry {
    pub name: String,
    pub key: String,
    /// `None` when the image directory is missing or unreadable (see `problem`).
    pub meta: Option<ImageMeta>,
    pub problem: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    schema: u32,
    names: BTreeMap<String, String>,
}

/// A store directory (e.g. `<assets>/images`).
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
}

/// A staging directory under `tmp/`, removed on drop unless committed.
#[derive(Debug)]
pub(crate) struct Staging {
    pub dir: tempfile::TempDir,
}

impl Staging {
    pub fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }
    pub fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Checks an image name: 1..=200 bytes of `[A-Za-z0-9._:/@+-]`, not starting with `-` or `.`.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with(['-', '.', '/'])
        && !name.contains("..")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._:/@+-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ImageError::invalid(
            "image name",
            format!("`{name}` (use letters, digits and . _ : / @ + -)"),
        ))
    }
}

fn is_key(s: &str) -> bool {
    (s.starts_with("build-") || s.starts_with("oci-") || s.starts_with("img-"))
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| ImageError::io("fsync directory", dir, e))
}

/// Writes `bytes` to `path` through `path.tmp`, fsync and rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(|e| ImageError::io("creating", &tmp, e))?;
    f.write_all(bytes)
        .map_err(|e| ImageError::io("writing", &tmp, e))?;
    f.sync_all().map_err(|e| ImageError::io("fsync", &tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| ImageError::io("renaming into place", path, e))?;
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

/// `sha256:<hex>` of a file.
pub(crate) fn sha256_file(path: &Path) -> Result<(String, u64)> {
    let mut f = File::open(path).map_err(|e| ImageError::io("opening", path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f
            .read(&mut buf)
            .map_err(|e| ImageError::io("reading", path, e))?;
        if k == 0 {
            break;
        }
        n += k as u64;
        h.update(&buf[..k]);
    }
    Ok((format!("sha256:{}", hex(&h.finalize())), n))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl ImageStore {
    /// Opens (creating) the store at `dir` and removes staging left by dead processes.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        for sub in ["images", "tmp"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p)
                .map_err(|e| ImageError::io("creating store directory", &p, e))?;
        }
        let store = ImageStore { dir };
        store.clean_stale();
        Ok(store)
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn clean_stale(&self) {
        let Ok(rd) = fs::read_dir(self.dir.join("tmp")) else {
            return;
        };
        for ent in rd.flatten() {
            let name = ent.file_name().to_string_lossy().into_owned();
            let pid = name.split('-').next().and_then(|p| p.parse::<u32>().ok());
            let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
            if !alive {
                let _ = fs::remove_dir_all(ent.path());
            }
        }
    }

    pub(crate) fn staging(&self) -> Result<Staging> {
        let tmp = self.dir.join("tmp");
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}-", std::process::id()))
            .tempdir_in(&tmp)
            .map_err(|e| ImageError::io("creating staging directory", &tmp, e))?;
        for sub in ["rootfs", "out"] {
            let p = dir.path().join(sub);
            fs::create_dir(&p).map_err(|e| ImageError::io("creating", &p, e))?;
        }
        Ok(Staging { dir })
    }

    fn lock(&self) -> Result<nix::fcntl::Flock<File>> {
        let p = self.dir.join(".lock");
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(|e| ImageError::io("opening lock", &p, e))?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| ImageError::io("locking", &p, std::io::Error::from(e)))
    }

    fn read_index(&self) -> Result<Index> {
        let p = self.dir.join("index.json");
        match fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| ImageError::CorruptImage {
                name: "index".into(),
                path: p.clone(),
                reason: format!("unreadable index: {e}"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Index {
                schema: META_SCHEMA,
                names: BTreeMap::new(),
            }),
            Err(e) => Err(ImageError::io("reading index", p, e)),
        }
    }

    fn write_index(&self, idx: &Index) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(idx)
            .map_err(|e| ImageError::invalid("index", e.to_string()))?;
        write_atomic(&self.dir.join("index.json"), &bytes)
    }

    fn key_dir(&self, key: &str) -> PathBuf {
        self.dir.join("images").join(key)
    }

    /// Loads and checks the image stored under `key` (size and filesystem header).
    fn load(&self, name: &str, key: &str) -> Result<Image> {
        let dir = self.key_dir(key);
        let mp = dir.join("image.json");
        let corrupt = |path: &Path, reason: String| ImageError::CorruptImage {
            name: name.to_string(),
            path: path.to_path_buf(),
            reason,
        };
        let bytes = match fs::read(&mp) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !dir.exists() => {
                return Err(ImageError::UnknownImage(name.to_string()))
            }
            Err(e) => return Err(corrupt(&mp, format!("metadata unreadable: {e}"))),
        };
        let meta: ImageMeta = serde_json::from_slice(&bytes)
            .map_err(|e| corrupt(&mp, format!("metadata unreadable: {e}")))?;
        if meta.schema != META_SCHEMA {
            return Err(corrupt(
                &mp,
                format!("metadata schema {} (expected {META_SCHEMA})", meta.schema),
            ));
        }
        let path = dir.join(&meta.file);
        let len = fs::metadata(&path)
            .map_err(|e| corrupt(&path, format!("image file missing: {e}")))?
            .len();
        if len != meta.size {
            return Err(corrupt(
                &path,
                format!("truncated or changed: {len} bytes, expected {}", meta.size),
            ));
        }
        format::check_magic(meta.format, &path).map_err(|r| corrupt(&path, r))?;
        Ok(Image {
            name: name.to_string(),
            key: key.to_string(),
            path,
            meta,
        })
    }

    /// Resolves a name (or a key) to a checked image. Unknown names give
    /// [`ImageError::UnknownImage`], a damaged image [`ImageError::CorruptImage`].
    pub fn resolve(&self, name: &str) -> Result<Image> {
        let idx = self.read_index()?;
        match idx.names.get(name) {
            Some(key) => self.load(name, key),
            None if is_key(name) => self.load(name, name),
            None => Err(ImageError::UnknownImage(name.to_string())),
        }
    }

    /// Like [`resolve`](Self::resolve), and also recomputes the image file's SHA-256.
    pub fn verify(&self, name: &str) -> Result<Image> {
        let img = self.resolve(name)?;
        let (digest, _) = sha256_file(&img.path)?;
        if digest != img.meta.sha256 {
            return Err(ImageError::CorruptImage {
                name: name.to_string(),
                path: img.path.clone(),
                reason: format!("sha256 is {digest}, expected {}", img.meta.sha256),
            });
        }
        Ok(img)
    }

    /// Every named image, sorted by name; damaged ones carry a `problem`.
    pub fn list(&self) -> Result<Vec<ListEntry>> {
        let idx = self.read_index()?;
        Ok(idx
            .names
            .iter()
            .map(|(name, key)| match self.load(name, key) {
                Ok(img) => ListEntry {
                    name: name.clone(),
                    key: key.clone(),
                    meta: Some(img.meta),
                    problem: None,
                },
                Err(e) => ListEntry {
                    name: name.clone(),
                    key: key.clone(),
                    meta: None,
                    problem: Some(e.to_string()),
                },
            })
            .collect())
    }

    /// Removes the name; the image directory goes when no other name points at it.
    pub fn remove(&self, name: &str) -> Result<()> {
        let _lock = self.lock()?;
        let mut idx = self.read_index()?;
        let Some(key) = idx.names.remove(name) else {
            return Err(ImageError::UnknownImage(name.to_string()));
        };
        self.write_index(&idx)?;
        if !idx.names.values().any(|k| *k == key) {
            let dir = self.key_dir(&key);
            if dir.exists() {
                // Rename first so no half-deleted image is ever visible under its key.
                let trash = self
                    .dir
                    .join("tmp")
                    .join(format!("{}-rm-{key}", std::process::id()));
                fs::rename(&dir, &trash).map_err(|e| ImageError::io("removing image", &dir, e))?;
                fs::remove_dir_all(&trash)
                    .map_err(|e| ImageError::io("removing image", &trash, e))?;
            }
        }
        Ok(())
    }

    /// Points `name` at `key` (which must be stored).
    pub(crate) fn tag(&self, name: &str, key: &str) -> Result<Image> {
        validate_name(name)?;
        let _lock = self.lock()?;
        let mut idx = self.read_index()?;
        idx.schema = META_SCHEMA;
        if idx.names.get(name).map(String::as_str) != Some(key) {
            idx.names.insert(name.to_string(), key.to_string());
            self.write_index(&idx)?;
        }
        drop(_lock);
        self.load(name, key)
    }

    /// The stored, intact image under `key`, if any.
    pub(crate) fn cached(&self, key: &str) -> Option<Image> {
        self.load(key, key).ok()
    }

    /// Reports and names the stored image under `key` if there is one; `None`: make it.
    pub(crate) fn reuse(
        &self,
        name: &str,
        key: &str,
        progress: &mut dyn FnMut(Event<'_>),
    ) -> Option<Result<Image>> {
        self.cached(key)?;
        progress(Event::Done { key, cached: true });
        Some(self.tag(name, key))
    }

    /// Makes the image file of `made.format` from the staging root, stores it under
    /// `made.key` as `name` (see `commit`) and reports it done.
    pub(crate) fn store_made(
        &self,
        staging: Staging,
        name: &str,
        made: Made,
        progress: &mut dyn FnMut(Event<'_>),
    ) -> Result<Image> {
        format::make_image(
            made.format,
            &staging.rootfs(),
            &staging.out().join(made.format.file_name()),
        )?;
        let key = made.key.clone();
        let meta = ImageMeta {
            schema: META_SCHEMA,
            key: made.key,
            format: made.format,
            file: String::new(),
            size: 0,
            sha256: String::new(),
            source: made.source,
            exec: made.exec,
            content_bytes: made.content_bytes,
            created: crate::build::now_secs(),
            build_secs: made.started.elapsed().as_secs_f64(),
        };
        let img = self.commit(staging, meta, name)?;
        progress(Event::Done {
            key: &key,
            cached: false,
        });
        Ok(img)
    }

    /// Finishes a staging directory whose `out/` holds the image file: hashes it, writes
    /// `image.json`, fsyncs, renames `out/` to `images/<key>` and names it.
    pub(crate) fn commit(
        &self,
        staging: Staging,
        mut meta: ImageMeta,
        name: &str,
    ) -> Result<Image> {
        validate_name(name)?;
        let out = staging.out();
        let file = out.join(meta.format.file_name());
        let (digest, size) = sha256_file(&file)?;
        meta.schema = META_SCHEMA;
        meta.file = meta.format.file_name().to_string();
        meta.sha256 = digest;
        meta.size = size;
        let json = serde_json::to_vec_pretty(&meta)
            .map_err(|e| ImageError::invalid("image metadata", e.to_string()))?;
        write_atomic(&out.join("image.json"), &json)?;
        sync_dir(&out)?;
        // The root filesystem tree is not needed any more; drop it before the rename.
        let _ = fs::remove_dir_all(staging.rootfs());
        {
            let _lock = self.lock()?;
            let dest = self.key_dir(&meta.key);
            if self.cached(&meta.key).is_none() {
                if dest.exists() {
                    // A damaged earlier copy: move it away first.
                    let trash = staging.path().join("old");
                    fs::rename(&dest, &trash)
                        .map_err(|e| ImageError::io("replacing image", &dest, e))?;
                }
                fs::rename(&out, &dest).map_err(|e| ImageError::io("storing image", &dest, e))?;
                sync_dir(&self.dir.join("images"))?;
            }
        }
        drop(staging);
        self.tag(name, &meta.key)
    }
}
