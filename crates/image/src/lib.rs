//! kiln-image: root-filesystem images for Kiln sandboxes.
//!
//! An image is one filesystem file (EROFS by default, or ext4) that a sandbox boots as a
//! read-only virtio-blk disk, with an overlay on top in the guest. Images live in an
//! [`ImageStore`] directory (the kiln library passes `<assets>/images`) under a content key,
//! with names pointing at keys. They come from:
//!
//! - [`ImageStore::build`]: a [`Recipe`] (Debian packages, mmdebstrap), keyed by the recipe
//!   and the resolved package versions;
//! - `ImageStore::pull` (feature `registry`, on by default): an OCI / Docker registry v2
//!   (oci-client), keyed by manifest digest;
//! - [`ImageStore::import`]: an OCI layout directory or a docker-archive tar.
//!
//! [`ImageStore::list`], [`ImageStore::remove`] and [`ImageStore::resolve`] manage them.
//! Every error is an [`ImageError`] whose [`ErrorKind`] maps to an exit code. Layer
//! extraction rules: [`extract`]. docs/IMAGES.md describes the store, keys, format choice
//! and measurements.

pub mod build;
pub mod error;
pub mod extract;
pub mod format;
pub mod import;
pub mod meta;
pub mod oci;
pub mod progress;
#[cfg(feature = "registry")]
pub mod pull;
pub mod recipe;
pub mod store;
pub mod tools;

pub use build::BuildOptions;
pub use error::{ErrorKind, ImageError, Result};
pub use import::ImportOptions;
pub use meta::{ExecDefaults, ImageFormat, ImageMeta, ImageSource};
pub use progress::Event;
#[cfg(feature = "registry")]
pub use pull::{Auth, PullOptions};
pub use recipe::Recipe;
pub use store::{Image, ImageStore, ListEntry};
