//! Where Kiln keeps its guest assets (the contract in docs/ARCHITECTURE.md, "Assets"): the
//! assets directory ([`assets_dir`]: `$KILN_ASSETS_DIR`, else `$XDG_CACHE_HOME/kiln`, else
//! `$HOME/.cache/kiln`) and the current guest in it ([`default_kernel`],
//! [`default_initramfs`], overridden by `$KILN_KERNEL` / `$KILN_INITRAMFS`), and the image
//! store directory in it ([`images_dir`], `<assets>/images`, docs/IMAGES.md).
//!
//! The VMM only takes paths; this is the one place that knows where Kiln caches its assets.
//! `kiln doctor`, `SandboxConfig`'s defaults, xtask and the tier-4 tests use it.

use std::ffi::OsString;
use std::path::PathBuf;

/// Errors of the asset lookup.
#[derive(Debug, thiserror::Error)]
pub enum AssetsError {
    /// None of `$KILN_ASSETS_DIR`, `$XDG_CACHE_HOME`, `$HOME` is set.
    #[error(
        "cannot locate the assets directory: none of KILN_ASSETS_DIR, XDG_CACHE_HOME, HOME is set"
    )]
    NoAssetsDir,
}

fn non_empty(value: Option<OsString>) -> Option<OsString> {
    value.filter(|v| !v.is_empty())
}

/// Assets directory from an environment lookup (see [`assets_dir`]).
pub fn assets_dir_from(env: impl Fn(&str) -> Option<OsString>) -> Result<PathBuf, AssetsError> {
    if let Some(dir) = non_empty(env("KILN_ASSETS_DIR")) {
        return Ok(PathBuf::from(dir));
    }
    if let Some(cache) = non_empty(env("XDG_CACHE_HOME")) {
        return Ok(PathBuf::from(cache).join("kiln"));
    }
    if let Some(home) = non_empty(env("HOME")) {
        return Ok(PathBuf::from(home).join(".cache").join("kiln"));
    }
    Err(AssetsError::NoAssetsDir)
}

/// `$KILN_ASSETS_DIR`, else `$XDG_CACHE_HOME/kiln`, else `$HOME/.cache/kiln` (empty = unset).
pub fn assets_dir() -> Result<PathBuf, AssetsError> {
    assets_dir_from(|k| std::env::var_os(k))
}

/// Image store directory from an environment lookup (see [`images_dir`]).
pub fn images_dir_from(env: impl Fn(&str) -> Option<OsString>) -> Result<PathBuf, AssetsError> {
    Ok(assets_dir_from(env)?.join("images"))
}

/// `<assets>/images`: the `kiln-image` store (`kiln image ...`, docs/IMAGES.md).
pub fn images_dir() -> Result<PathBuf, AssetsError> {
    images_dir_from(|k| std::env::var_os(k))
}

/// Guest kernel path from an environment lookup (see [`default_kernel`]).
pub fn default_kernel_from(env: impl Fn(&str) -> Option<OsString>) -> Result<PathBuf, AssetsError> {
    if let Some(kernel) = non_empty(env("KILN_KERNEL")) {
        return Ok(PathBuf::from(kernel));
    }
    Ok(assets_dir_from(env)?.join("guest").join("vmlinux"))
}

/// `$KILN_KERNEL`, else `<assets>/guest/vmlinux` (the ELF guest kernel, booted through PVH).
pub fn default_kernel() -> Result<PathBuf, AssetsError> {
    default_kernel_from(|k| std::env::var_os(k))
}

/// Guest initramfs path from an environment lookup (see [`default_initramfs`]).
pub fn default_initramfs_from(
    env: impl Fn(&str) -> Option<OsString>,
) -> Result<PathBuf, AssetsError> {
    if let Some(initramfs) = non_empty(env("KILN_INITRAMFS")) {
        return Ok(PathBuf::from(initramfs));
    }
    Ok(assets_dir_from(env)?.join("guest").join("initramfs.cpio"))
}

/// `$KILN_INITRAMFS`, else `<assets>/guest/initramfs.cpio` (uncompressed newc).
pub fn default_initramfs() -> Result<PathBuf, AssetsError> {
    default_initramfs_from(|k| std::env::var_os(k))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn assets_dir_precedence() {
        let all = env(&[
            ("KILN_ASSETS_DIR", "/a"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ]);
        assert_eq!(assets_dir_from(all).unwrap(), PathBuf::from("/a"));
        let xdg = env(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/h")]);
        assert_eq!(assets_dir_from(xdg).unwrap(), PathBuf::from("/x/kiln"));
        let home = env(&[("HOME", "/h")]);
        assert_eq!(
            assets_dir_from(home).unwrap(),
            PathBuf::from("/h/.cache/kiln")
        );
    }

    #[test]
    fn empty_variables_count_as_unset() {
        let e = env(&[
            ("KILN_ASSETS_DIR", ""),
            ("XDG_CACHE_HOME", ""),
            ("HOME", "/h"),
        ]);
        assert_eq!(assets_dir_from(e).unwrap(), PathBuf::from("/h/.cache/kiln"));
        let none = env(&[("HOME", "")]);
        assert!(matches!(
            assets_dir_from(none),
            Err(AssetsError::NoAssetsDir)
        ));
    }

    #[test]
    fn images_dir_is_under_the_assets_dir() {
        let a = env(&[("KILN_ASSETS_DIR", "/a"), ("HOME", "/h")]);
        assert_eq!(images_dir_from(a).unwrap(), PathBuf::from("/a/images"));
        let home = env(&[("HOME", "/h")]);
        assert_eq!(
            images_dir_from(home).unwrap(),
            PathBuf::from("/h/.cache/kiln/images")
        );
        assert!(images_dir_from(env(&[])).is_err());
    }

    #[test]
    fn kernel_and_initramfs_defaults_and_overrides() {
        let base = env(&[("KILN_ASSETS_DIR", "/a")]);
        assert_eq!(
            default_kernel_from(&base).unwrap(),
            PathBuf::from("/a/guest/vmlinux")
        );
        assert_eq!(
            default_initramfs_from(&base).unwrap(),
            PathBuf::from("/a/guest/initramfs.cpio")
        );
        let over = env(&[("KILN_KERNEL", "/k"), ("KILN_INITRAMFS", "/i")]);
        assert_eq!(default_kernel_from(&over).unwrap(), PathBuf::from("/k"));
        assert_eq!(default_initramfs_from(&over).unwrap(), PathBuf::from("/i"));
        // Overrides do not need an assets directory at all.
        let none = env(&[]);
        assert!(default_kernel_from(&none).is_err());
    }
}
