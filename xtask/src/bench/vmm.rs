//! `cargo xtask bench vmm` (placeholder until its benchmark is written).

use anyhow::{bail, Result};

use super::Format;

/// Runs the vmm benchmark and reports each metric in `format`.
pub fn run(format: Format) -> Result<()> {
    let _ = format;
    bail!("bench vmm not implemented yet")
}
