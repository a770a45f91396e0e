//! Host tools the crate runs, the Debian package of each, and the check that names the
//! missing package.

use std::path::PathBuf;

use crate::{ImageError, Result};

/// A host program and the Debian package that ships it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tool {
    pub binary: &'static str,
    pub package: &'static str,
}

pub const MMDEBSTRAP: Tool = Tool {
    binary: "mmdebstrap",
    package: "mmdebstrap",
};
pub const APT_GET: Tool = Tool {
    binary: "apt-get",
    package: "apt",
};
pub const MKFS_EXT4: Tool = Tool {
    binary: "mkfs.ext4",
    package: "e2fsprogs",
};
pub const RESIZE2FS: Tool = Tool {
    binary: "resize2fs",
    package: "e2fsprogs",
};
pub const MKFS_EROFS: Tool = Tool {
    binary: "mkfs.erofs",
    package: "erofs-utils",
};

/// Every tool the tests of this crate need, for the repo's test flow to install
/// (`docker-registry`, `skopeo`, `umoci`, `htpasswd`, plus the build tools).
pub const TEST_TOOLS: &[Tool] = &[
    Tool {
        binary: "docker-registry",
        package: "docker-registry",
    },
    Tool {
        binary: "skopeo",
        package: "skopeo",
    },
    Tool {
        binary: "umoci",
        package: "umoci",
    },
    Tool {
        binary: "htpasswd",
        package: "apache2-utils",
    },
    MKFS_EXT4,
    RESIZE2FS,
    MKFS_EROFS,
    Tool {
        binary: "fsck.erofs",
        package: "erofs-utils",
    },
    Tool {
        binary: "debugfs",
        package: "e2fsprogs",
    },
];

/// Full path of `tool` on `$PATH` (plus the sbin directories), if present.
pub fn find(tool: Tool) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(extra)
        .map(|d| d.join(tool.binary))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Fails with [`ImageError::MissingTool`] naming the first missing tool and its package.
pub fn require(tools: &[Tool]) -> Result<()> {
    for t in tools {
        if find(*t).is_none() {
            return Err(ImageError::MissingTool {
                tool: t.binary.to_string(),
                package: t.package.to_string(),
            });
        }
    }
    Ok(())
}

/// All missing tools of `tools` (for a message that lists every package at once).
pub fn missing(tools: &[Tool]) -> Vec<Tool> {
    tools
        .iter()
        .copied()
        .filter(|t| find(*t).is_none())
        .collect()
}
