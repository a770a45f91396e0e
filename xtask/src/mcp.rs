//! The venv of the tier-4 `kiln mcp` test (tests/tests/mcp.rs): `<target>/kiln-mcp/venv` with
//! the real `mcp` Python SDK from PyPI (its client drives `kiln mcp` over stdio and
//! streamable HTTP), created once on the host before tier 4 (the harness has no network).

use std::path::PathBuf;
use std::process::Command;

use anyhow::Result;

use crate::util;

/// The `mcp` version docs/MCP.md and tests/mcp/client.py are written against.
const MCP_VERSION: &str = "2.3.0";

/// Creates the venv and installs the client (once). Returns its python.
pub fn ensure() -> Result<PathBuf> {
    let dir = util::target_dir().join("kiln-mcp");
    let _lock = util::lock_file(&dir.join(".lock"))?;
    let requirement = format!("mcp=={MCP_VERSION}");
    util::ensure_venv(
        "mcp",
        &dir.join("venv"),
        &[requirement.as_str()],
        |python| {
            Command::new(python)
            .args([
                "-c",
                &format!("import importlib.metadata as m; assert m.version('mcp') == '{MCP_VERSION}'"),
            ])
            .output()
            .is_ok_and(|o| o.status.success())
        },
    )
}
