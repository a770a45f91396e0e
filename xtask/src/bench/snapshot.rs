//! `cargo xtask bench snapshot` (placeholder until its benchmark is written).

use anyhow::{bail, Result};

use super::Format;

/// Runs the snapshot benchmark and reports each metric in `format`.
pub fn run(format: Format) -> Result<()> {
    let _ = format;
    bail!("bench snapshot not implemented yet")
}
