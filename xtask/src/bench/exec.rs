//! `cargo xtask bench exec` (placeholder until its benchmark is written).

use anyhow::{bail, Result};

use super::Format;

/// Runs the exec benchmark and reports each metric in `format`.
pub fn run(format: Format) -> Result<()> {
    let _ = format;
    bail!("bench exec not implemented yet")
}
