//! Image metadata (`image.json` beside each image file): format, size, digest, where the
//! image came from, and the exec defaults a sandbox booted from it uses.

use serde::{Deserialize, Serialize};

/// Version of the `image.json` schema and of the store layout.
pub const META_SCHEMA: u32 = 1;

/// On-disk filesystem format of an image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// ext4 made by `mkfs.ext4 -d` (no journal, shrunk with `resize2fs -M`, sparse). The
    /// default: fastest to build and to read in the measurements (docs/IMAGES.md), and the
    /// guest kernel already has it.
    #[default]
    Ext4,
    /// EROFS made by `mkfs.erofs -zlz4hc`: half the size, slower to build and to read;
    /// the guest kernel needs `CONFIG_EROFS_FS` (+ `CONFIG_EROFS_FS_ZIP`).
    Erofs,
}

impl ImageFormat {
    /// File name of the image inside its store directory.
    pub fn file_name(self) -> &'static str {
        match self {
            ImageFormat::Ext4 => "rootfs.ext4",
            ImageFormat::Erofs => "rootfs.erofs",
        }
    }

    /// Short name (`ext4`, `erofs`), also the filesystem type the guest mounts.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Ext4 => "ext4",
            ImageFormat::Erofs => "erofs",
        }
    }
}

impl std::str::FromStr for ImageFormat {
    type Err = crate::ImageError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ext4" => Ok(ImageFormat::Ext4),
            "erofs" => Ok(ImageFormat::Erofs),
            other => Err(crate::ImageError::invalid(
                "image format",
                format!("`{other}` (expected ext4 or erofs)"),
            )),
        }
    }
}

/// How a command runs in a sandbox made from this image, unless the caller says otherwise
/// (from an OCI config's `Env`, `WorkingDir`, `User`, `Entrypoint`, `Cmd`, or a recipe's
/// `[exec]` table).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecDefaults {
    /// `KEY=VALUE` strings.
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub working_dir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`, as in an OCI config.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
}

/// Where an image came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ImageSource {
    /// Built from a recipe with mmdebstrap.
    Build {
        recipe: String,
        recipe_sha256: String,
        suite: String,
        /// `name=version` of every package installed, sorted.
        packages: Vec<String>,
    },
    /// Pulled from a registry.
    Registry {
        reference: String,
        manifest_digest: String,
    },
    /// Imported from an OCI layout directory or a docker-archive.
    Import {
        path: String,
        archive: String,
        digest: String,
    },
}

/// Contents of `image.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageMeta {
    pub schema: u32,
    /// Content key: the store directory name.
    pub key: String,
    pub format: ImageFormat,
    /// Image file name in the key directory.
    pub file: String,
    /// Size of the image file in bytes.
    pub size: u64,
    /// `sha256:<hex>` of the image file.
    pub sha256: String,
    pub source: ImageSource,
    pub exec: ExecDefaults,
    /// Bytes of file content in the root filesystem.
    pub content_bytes: u64,
    /// Seconds since the epoch when it was stored.
    pub created: u64,
    /// Wall seconds the build/pull/import took.
    pub build_secs: f64,
}
