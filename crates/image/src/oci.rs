//! OCI image documents (index, manifest, config) as far as Kiln reads them, platform
//! selection, and turning verified layer files into a root directory and exec defaults.
//! Shared by registry pulls and imports.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::extract::{self, ExtractOptions, LayerStats};
use crate::meta::ExecDefaults;
use crate::progress::Event;
use crate::store::hex;
use crate::{ImageError, Result};

/// Upper bound of a manifest, index or config document.
pub const MAX_DOCUMENT: u64 = 4 << 20;
/// Upper bound of one (compressed) layer blob.
pub const MAX_LAYER: u64 = 32 << 30;

pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

#[derive(Debug, Clone, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub annotations: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
}

/// An image index / manifest list, or an image manifest.
#[derive(Debug, Clone, Deserialize)]
pub struct Document {
    #[serde(rename = "mediaType", default)]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    pub config: Option<Descriptor>,
    #[serde(default)]
    pub layers: Option<Vec<Descriptor>>,
}

impl Document {
    pub fn parse(bytes: &[u8], what: &str) -> Result<Self> {
        serde_json::from_slice(bytes)
            .map_err(|e| ImageError::corrupt(what, format!("not a manifest: {e}")))
    }
    pub fn is_index(&self) -> bool {
        self.manifests.is_some()
            || matches!(
                self.media_type.as_deref(),
                Some(MT_OCI_INDEX) | Some(MT_DOCKER_LIST)
            )
    }
}

/// Picks the linux/amd64 entry of an index, or says which platforms there are.
pub fn select_platform<'a>(entries: &'a [Descriptor], reference: &str) -> Result<&'a Descriptor> {
    let found = entries.iter().find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
    });
    if let Some(d) = found {
        return Ok(d);
    }
    // An index without platform fields (common in OCI layouts) with one manifest: take it,
    // the config's architecture is checked later.
    if entries.len() == 1 && entries[0].platform.is_none() {
        return Ok(&entries[0]);
    }
    let list: Vec<String> = entries
        .iter()
        .map(|d| {
            d.platform.as_ref().map_or("unknown".to_string(), |p| {
                format!("{}/{}", p.os, p.architecture)
            })
        })
        .collect();
    Err(ImageError::WrongArchitecture {
        reference: reference.to_string(),
        found: if list.is_empty() {
            "no manifests".into()
        } else {
            list.join(", ")
        },
    })
}

#[derive(Debug, Clone, Deserialize, Default)]
struct ConfigFile {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    config: Option<RunConfig>,
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Debug, Clone, Deserialize, Default)]
struct RunConfig {
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
    #[serde(rename = "User", default)]
    user: Option<String>,
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize, Default)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// The parts of an image config Kiln uses.
#[derive(Debug, Clone)]
pub struct ImageConfig {
    pub exec: ExecDefaults,
    pub diff_ids: Vec<String>,
}

/// Refuses a config of `image` whose diff_ids do not count its manifest's `layers`.
pub fn check_layer_count(cfg: &ImageConfig, layers: usize, image: &str) -> Result<()> {
    if cfg.diff_ids.len() != layers {
        return Err(ImageError::corrupt(
            format!("image {image}"),
            format!(
                "{} layers but {} diff_ids in the config",
                layers,
                cfg.diff_ids.len()
            ),
        ));
    }
    Ok(())
}

/// Parses a config and refuses anything but linux/amd64.
pub fn parse_config(bytes: &[u8], reference: &str) -> Result<ImageConfig> {
    let c: ConfigFile = serde_json::from_slice(bytes)
        .map_err(|e| ImageError::corrupt(format!("image config of {reference}"), e.to_string()))?;
    if c.os != "linux" || c.architecture != "amd64" {
        return Err(ImageError::WrongArchitecture {
            reference: reference.to_string(),
            found: format!("{}/{}", c.os, c.architecture),
        });
    }
    let rc = c.config.unwrap_or_default();
    let nonempty = |s: Option<String>| s.filter(|s| !s.is_empty());
    Ok(ImageConfig {
        exec: ExecDefaults {
            env: rc.env.unwrap_or_default(),
            working_dir: nonempty(rc.working_dir),
            user: nonempty(rc.user),
            entrypoint: rc.entrypoint.unwrap_or_default(),
            cmd: rc.cmd.unwrap_or_default(),
        },
        diff_ids: c.rootfs.unwrap_or_default().diff_ids,
    })
}

/// `sha256:<hex>` of bytes.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

/// Checks `bytes` against `expected` (`sha256:<hex>`).
pub fn verify_bytes(bytes: &[u8], expected: &str, what: &str) -> Result<()> {
    check_algorithm(expected, what)?;
    let actual = digest_of(bytes);
    if actual != expected {
        return Err(ImageError::DigestMismatch {
            what: what.to_string(),
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(())
}

pub fn check_algorithm(digest: &str, what: &str) -> Result<()> {
    match digest.strip_prefix("sha256:") {
        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => Ok(()),
        _ => Err(ImageError::invalid(
            what,
            format!("unsupported digest `{digest}` (only sha256)"),
        )),
    }
}

/// Checks a file against `expected`.
pub fn verify_file(path: &Path, expected: &str, what: &str) -> Result<()> {
    check_algorithm(expected, what)?;
    let (actual, _) = crate::store::sha256_file(path)?;
    if actual != expected {
        return Err(ImageError::DigestMismatch {
            what: what.to_string(),
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(())
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// A layer file ready to apply.
#[derive(Debug, Clone)]
pub struct LayerFile {
    pub path: PathBuf,
    /// Shown in errors and progress (`sha256:...` or the archive path).
    pub name: String,
    /// Digest of the uncompressed tar (the config's diff_id), checked while applying.
    pub diff_id: Option<String>,
}

/// Applies layers in order onto `root`, decompressing by magic (gzip, zstd or plain tar)
/// and checking each uncompressed stream against its diff_id.
pub fn apply_layers(
    root: &Path,
    layers: &[LayerFile],
    image: &str,
    progress: &mut dyn FnMut(Event<'_>),
) -> Result<LayerStats> {
    let opts = ExtractOptions::default();
    let mut total = LayerStats::default();
    for (i, layer) in layers.iter().enumerate() {
        progress(Event::Step(&format!(
            "applying layer {}/{} {}",
            i + 1,
            layers.len(),
            short(&layer.name)
        )));
        let f =
            File::open(&layer.path).map_err(|e| ImageError::io("opening layer", &layer.path, e))?;
        let mut buf = BufReader::with_capacity(1 << 20, f);
        let head = buf
            .fill_buf()
            .map_err(|e| ImageError::io("reading layer", &layer.path, e))?;
        let decoded: Box<dyn Read> = if head.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::read::MultiGzDecoder::new(buf))
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            let dec = ruzstd::decoding::StreamingDecoder::new(buf).map_err(|e| {
                ImageError::corrupt(
                    format!("layer {} of {image}", layer.name),
                    format!("bad zstd stream: {e}"),
                )
            })?;
            Box::new(dec)
        } else {
            Box::new(buf)
        };
        let mut hashing = Hashing {
            inner: decoded,
            hasher: Sha256::new(),
        };
        let stats = extract::apply_layer(root, &mut hashing, &opts).map_err(|source| {
            if source.is_unsafe() {
                ImageError::UnsafeLayer {
                    image: image.to_string(),
                    layer: layer.name.clone(),
                    source: Box::new(source),
                }
            } else {
                ImageError::Layer {
                    image: image.to_string(),
                    layer: layer.name.clone(),
                    source: Box::new(source),
                }
            }
        })?;
        // Hash the tail (end-of-archive blocks and padding) too.
        io::copy(&mut (&mut hashing).take(MAX_LAYER), &mut io::sink()).map_err(|e| {
            ImageError::corrupt(
                format!("layer {} of {image}", layer.name),
                format!("truncated: {e}"),
            )
        })?;
        if let Some(expected) = &layer.diff_id {
            let actual = format!("sha256:{}", hex(&hashing.hasher.finalize()));
            if &actual != expected {
                return Err(ImageError::DigestMismatch {
                    what: format!("uncompressed layer {} of {image} (diff_id)", layer.name),
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        total.files += stats.files;
        total.dirs += stats.dirs;
        total.symlinks += stats.symlinks;
        total.hardlinks += stats.hardlinks;
        total.whiteouts += stats.whiteouts;
        total.opaque_dirs += stats.opaque_dirs;
        total.skipped += stats.skipped;
        total.bytes += stats.bytes;
    }
    Ok(total)
}

/// `sha256:0123456789ab` from a long digest, for progress lines.
pub fn short(s: &str) -> &str {
    s.get(..19).unwrap_or(s)
}

/// The diff_id of layer `i`, when the config lists one per layer.
pub fn diff_id(cfg: &ImageConfig, i: usize, layers: usize) -> Option<String> {
    if cfg.diff_ids.len() == layers {
        cfg.diff_ids.get(i).cloned()
    } else {
        None
    }
}
