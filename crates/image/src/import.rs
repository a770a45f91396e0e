//! `kiln image import PATH`: an OCI image layout directory (`oci-layout`, `index.json`,
//! `blobs/sha256/...`) or a `docker save` / `skopeo copy ... docker-archive:` tar file.
//! Every blob is checked against its digest before use.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Deserialize;

use crate::meta::{ImageFormat, ImageSource};
use crate::oci::{self, Document, LayerFile, MAX_DOCUMENT};
use crate::progress::Event;
use crate::store::{digest_key, Image, ImageStore, Made, Staging};
use crate::{ImageError, Result};

/// Options of [`ImageStore::import`].
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    pub format: ImageFormat,
    /// In an OCI layout with several images, the one whose
    /// `org.opencontainers.image.ref.name` is this tag.
    pub tag: Option<String>,
}

/// Entries a docker-archive may have.
const MAX_ARCHIVE_ENTRIES: usize = 100_000;

#[derive(Debug, Deserialize)]
struct DockerManifestEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

fn read_bounded(path: &Path, what: &str) -> Result<Vec<u8>> {
    let f = File::open(path).map_err(|e| ImageError::io(format!("opening {what}"), path, e))?;
    let mut v = Vec::new();
    f.take(MAX_DOCUMENT + 1)
        .read_to_end(&mut v)
        .map_err(|e| ImageError::io(format!("reading {what}"), path, e))?;
    if v.len() as u64 > MAX_DOCUMENT {
        return Err(ImageError::corrupt(what, "larger than 4 MiB"));
    }
    Ok(v)
}

fn blob_path(layout: &Path, digest: &str, what: &str) -> Result<PathBuf> {
    oci::check_algorithm(digest, what)?;
    let p = layout.join("blobs/sha256").join(&digest["sha256:".len()..]);
    if !p.is_file() {
        return Err(ImageError::corrupt(
            format!("OCI layout {}", layout.display()),
            format!("{what} {digest} is missing"),
        ));
    }
    Ok(p)
}

/// A 64-hex digest inside an archive member name (`<hex>.tar`, `blobs/sha256/<hex>`).
fn digest_in_name(name: &str) -> Option<String> {
    let stem = name.rsplit('/').next()?;
    let stem = stem.split('.').next()?;
    (stem.len() == 64 && stem.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| format!("sha256:{stem}"))
}

impl ImageStore {
    /// Imports an OCI layout directory or a docker-archive file as `name`.
    pub fn import(
        &self,
        path: &Path,
        name: &str,
        opts: &ImportOptions,
        progress: &mut dyn FnMut(Event<'_>),
    ) -> Result<Image> {
        crate::store::validate_name(name)?;
        let started = Instant::now();
        let md =
            fs::metadata(path).map_err(|e| ImageError::io("opening import source", path, e))?;
        let shown = path.display().to_string();
        let staging = self.staging()?;
        let (key_digest, archive, config, layers) = if md.is_dir() {
            progress(Event::Step(&format!("reading OCI layout {shown}")));
            self.read_layout(path, opts)?
        } else {
            progress(Event::Step(&format!("reading docker archive {shown}")));
            read_docker_archive(path, &staging)?
        };
        let prefix = if archive == "oci" { "oci" } else { "img" };
        let key = digest_key(prefix, &key_digest, opts.format);
        if let Some(img) = self.reuse(name, &key, progress) {
            return img;
        }
        let cfg = oci::parse_config(&config, &shown)?;
        oci::check_layer_count(&cfg, layers.len(), &shown)?;
        let files: Vec<LayerFile> = layers
            .into_iter()
            .enumerate()
            .map(|(i, (path, name))| LayerFile {
                path,
                name,
                diff_id: oci::diff_id(&cfg, i, cfg.diff_ids.len()),
            })
            .collect();
        let stats = oci::apply_layers(&staging.rootfs(), &files, &shown, progress)?;
        progress(Event::Step(&format!("mkfs.{}", opts.format.as_str())));
        let made = Made {
            key,
            format: opts.format,
            source: ImageSource::Import {
                path: shown,
                archive,
                digest: key_digest,
            },
            exec: cfg.exec,
            content_bytes: stats.bytes,
            started,
        };
        self.store_made(staging, name, made, progress)
    }

    /// Returns (manifest digest, "oci", config bytes, [(layer path, digest)]).
    #[allow(clippy::type_complexity)]
    fn read_layout(
        &self,
        layout: &Path,
        opts: &ImportOptions,
    ) -> Result<(String, String, Vec<u8>, Vec<(PathBuf, String)>)> {
        let shown = format!("OCI layout {}", layout.display());
        if !layout.join("oci-layout").is_file() {
            return Err(ImageError::invalid(
                "import source",
                format!("{} has no `oci-layout` file", layout.display()),
            ));
        }
        let index = read_bounded(
            &layout.join("index.json"),
            &format!("index.json of {shown}"),
        )?;
        let mut doc = Document::parse(&index, &format!("index.json of {shown}"))?;
        let mut digest = String::new();
        // Follow (at most 4 levels of) indexes down to an image manifest.
        for depth in 0..5 {
            if !doc.is_index() {
                break;
            }
            if depth == 4 {
                return Err(ImageError::corrupt(&shown, "indexes nested too deeply"));
            }
            let entries = doc.manifests.clone().unwrap_or_default();
            let tagged: Vec<oci::Descriptor> = match (&opts.tag, depth) {
                (Some(tag), 0) => entries
                    .iter()
                    .filter(|d| {
                        d.annotations
                            .as_ref()
                            .and_then(|a| a.get("org.opencontainers.image.ref.name"))
                            .is_some_and(|n| n == tag)
                    })
                    .cloned()
                    .collect(),
                _ => entries,
            };
            if tagged.is_empty() {
                return Err(ImageError::UnknownManifest {
                    reference: shown.clone(),
                    reason: format!("no image tagged `{}`", opts.tag.clone().unwrap_or_default()),
                });
            }
            let d = oci::select_platform(&tagged, &shown)?.clone();
            let p = blob_path(layout, &d.digest, "manifest")?;
            let bytes = read_bounded(&p, &format!("manifest {} of {shown}", d.digest))?;
            oci::verify_bytes(&bytes, &d.digest, &format!("manifest of {shown}"))?;
            doc = Document::parse(&bytes, &format!("manifest of {shown}"))?;
            digest = d.digest;
        }
        if digest.is_empty() {
            return Err(ImageError::corrupt(&shown, "index.json lists no manifest"));
        }
        let cd = doc
            .config
            .clone()
            .ok_or_else(|| ImageError::corrupt(&shown, "manifest has no config"))?;
        let cp = blob_path(layout, &cd.digest, "config")?;
        let config = read_bounded(&cp, &format!("config of {shown}"))?;
        oci::verify_bytes(&config, &cd.digest, &format!("config of {shown}"))?;
        let mut layers = Vec::new();
        for l in doc.layers.clone().unwrap_or_default() {
            let p = blob_path(layout, &l.digest, "layer")?;
            oci::verify_file(&p, &l.digest, &format!("layer {} of {shown}", l.digest))?;
            layers.push((p, l.digest));
        }
        Ok((digest, "oci".into(), config, layers))
    }
}

/// Copies the members of a docker-archive into the staging directory (by index, never by
/// their path) and returns (config digest, "docker-archive", config, layers).
#[allow(clippy::type_complexity)]
fn read_docker_archive(
    path: &Path,
    staging: &Staging,
) -> Result<(String, String, Vec<u8>, Vec<(PathBuf, String)>)> {
    let shown = format!("docker archive {}", path.display());
    let f = File::open(path).map_err(|e| ImageError::io("opening", path, e))?;
    let dir = staging.path().join("archive");
    fs::create_dir(&dir).map_err(|e| ImageError::io("creating", &dir, e))?;
    let mut members: HashMap<String, PathBuf> = HashMap::new();
    let mut ar = tar::Archive::new(f);
    let bad = |e: io::Error| ImageError::corrupt(&shown, format!("not a tar archive: {e}"));
    for (i, ent) in ar.entries().map_err(bad)?.enumerate() {
        if i >= MAX_ARCHIVE_ENTRIES {
            return Err(ImageError::corrupt(&shown, "too many members"));
        }
        let mut ent = ent.map_err(bad)?;
        if ent.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let name = String::from_utf8_lossy(&ent.path_bytes())
            .trim_start_matches("./")
            .to_string();
        let dest = dir.join(i.to_string());
        let mut out = File::create(&dest).map_err(|e| ImageError::io("writing", &dest, e))?;
        io::copy(&mut ent, &mut out).map_err(bad)?;
        members.insert(name, dest);
    }
    let get = |n: &str| {
        members
            .get(n.trim_start_matches("./"))
            .cloned()
            .ok_or_else(|| ImageError::corrupt(&shown, format!("member `{n}` is missing")))
    };
    let manifest = read_bounded(&get("manifest.json")?, &format!("manifest.json of {shown}"))?;
    let entries: Vec<DockerManifestEntry> = serde_json::from_slice(&manifest)
        .map_err(|e| ImageError::corrupt(format!("manifest.json of {shown}"), e.to_string()))?;
    let [entry] = entries.as_slice() else {
        return Err(ImageError::invalid(
            "import source",
            format!(
                "{shown} holds {} images; import one at a time",
                entries.len()
            ),
        ));
    };
    let config = read_bounded(&get(&entry.config)?, &format!("config of {shown}"))?;
    let config_digest = oci::digest_of(&config);
    if let Some(d) = digest_in_name(&entry.config) {
        oci::verify_bytes(&config, &d, &format!("config {} of {shown}", entry.config))?;
    }
    let mut layers = Vec::new();
    for l in &entry.layers {
        let p = get(l)?;
        if let Some(d) = digest_in_name(l) {
            oci::verify_file(&p, &d, &format!("layer {l} of {shown}"))?;
        }
        layers.push((p, l.clone()));
    }
    Ok((config_digest, "docker-archive".into(), config, layers))
}
