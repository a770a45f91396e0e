//! The crate's error type: one enum whose variants name the input that failed, and a
//! [`ErrorKind`] the CLI maps to a distinct exit code.

use std::path::PathBuf;

use crate::extract::ExtractError;

/// What went wrong, coarsely: the CLI maps each kind to its own exit code
/// ([`ErrorKind::exit_code`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// No image of that name (or key) in the store.
    UnknownImage,
    /// An image file in the store, or an input archive/layer, is corrupt or truncated.
    CorruptImage,
    /// The registry could not be reached (connection refused, DNS, timeout, TLS).
    RegistryUnreachable,
    /// The registry refused the credentials (HTTP 401 / 403), or none were given.
    Unauthorized,
    /// The registry has no such repository, tag or manifest.
    UnknownManifest,
    /// The image exists but not for linux/amd64.
    WrongArchitecture,
    /// A manifest, config or layer did not match its digest.
    DigestMismatch,
    /// A layer tried to write outside the root (`..`, absolute path, symlink escape).
    UnsafeLayer,
    /// Bad input from the caller: a malformed reference, name or recipe, HTTP without
    /// `--insecure`, an unsupported media type.
    InvalidInput,
    /// A host tool the operation needs is not installed.
    MissingTool,
    /// mmdebstrap, apt or mkfs failed.
    BuildFailed,
    /// A local I/O error in the store.
    Io,
}

impl ErrorKind {
    /// The exit code the `kiln` CLI uses for this kind (1 for plain I/O errors, 2 for bad
    /// input, 10.. for the rest).
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Io => 1,
            ErrorKind::InvalidInput => 2,
            ErrorKind::UnknownImage => 10,
            ErrorKind::CorruptImage => 11,
            ErrorKind::RegistryUnreachable => 12,
            ErrorKind::Unauthorized => 13,
            ErrorKind::UnknownManifest => 14,
            ErrorKind::WrongArchitecture => 15,
            ErrorKind::DigestMismatch => 16,
            ErrorKind::UnsafeLayer => 17,
            ErrorKind::MissingTool => 18,
            ErrorKind::BuildFailed => 19,
        }
    }
}

/// Every error of the crate. Each message names the image, reference, file or tool.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("unknown image `{0}` (see `kiln image ls`)")]
    UnknownImage(String),
    #[error("image `{name}` is corrupt: {reason} ({path})")]
    CorruptImage {
        name: String,
        path: PathBuf,
        reason: String,
    },
    #[error("{what} is corrupt: {reason}")]
    CorruptInput { what: String, reason: String },
    #[error("registry {registry} is unreachable: {reason}")]
    RegistryUnreachable { registry: String, reason: String },
    #[error("registry refused access to {reference}: {reason}")]
    Unauthorized { reference: String, reason: String },
    #[error("unknown manifest or tag {reference}: {reason}")]
    UnknownManifest { reference: String, reason: String },
    #[error("{reference} has no linux/amd64 image (found: {found})")]
    WrongArchitecture { reference: String, found: String },
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("layer {layer} of {image} is unsafe")]
    UnsafeLayer {
        image: String,
        layer: String,
        #[source]
        source: Box<ExtractError>,
    },
    #[error("could not apply layer {layer} of {image}")]
    Layer {
        image: String,
        layer: String,
        #[source]
        source: Box<ExtractError>,
    },
    #[error("invalid {what}: {reason}")]
    InvalidInput { what: String, reason: String },
    #[error("`{tool}` is not installed (Debian package `{package}`)")]
    MissingTool { tool: String, package: String },
    #[error("{step} failed: {reason}")]
    BuildFailed { step: String, reason: String },
    #[cfg(feature = "registry")]
    #[error("registry error for {reference}")]
    Registry {
        reference: String,
        #[source]
        source: Box<oci_client::errors::OciDistributionError>,
    },
    #[error("{what}: {path}")]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ImageError {
    /// The coarse kind (and so the exit code) of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ImageError::UnknownImage(_) => ErrorKind::UnknownImage,
            ImageError::CorruptImage { .. } | ImageError::CorruptInput { .. } => {
                ErrorKind::CorruptImage
            }
            ImageError::RegistryUnreachable { .. } => ErrorKind::RegistryUnreachable,
            ImageError::Unauthorized { .. } => ErrorKind::Unauthorized,
            ImageError::UnknownManifest { .. } => ErrorKind::UnknownManifest,
            ImageError::WrongArchitecture { .. } => ErrorKind::WrongArchitecture,
            ImageError::DigestMismatch { .. } => ErrorKind::DigestMismatch,
            ImageError::UnsafeLayer { .. } => ErrorKind::UnsafeLayer,
            ImageError::Layer { source, .. } => {
                if source.is_unsafe() {
                    ErrorKind::UnsafeLayer
                } else if source.is_corrupt() {
                    ErrorKind::CorruptImage
                } else {
                    ErrorKind::Io
                }
            }
            ImageError::InvalidInput { .. } => ErrorKind::InvalidInput,
            ImageError::MissingTool { .. } => ErrorKind::MissingTool,
            ImageError::BuildFailed { .. } => ErrorKind::BuildFailed,
            #[cfg(feature = "registry")]
            ImageError::Registry { .. } => ErrorKind::RegistryUnreachable,
            ImageError::Io { .. } => ErrorKind::Io,
        }
    }

    pub(crate) fn io(
        what: impl Into<String>,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        ImageError::Io {
            what: what.into(),
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        ImageError::InvalidInput {
            what: what.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn corrupt(what: impl Into<String>, reason: impl Into<String>) -> Self {
        ImageError::CorruptInput {
            what: what.into(),
            reason: reason.into(),
        }
    }
}

/// Shorthand for the crate's results.
pub type Result<T, E = ImageError> = std::result::Result<T, E>;
