//! `cargo xtask bench pool` (placeholder until its benchmark is written).

use anyhow::{bail, Result};

use super::Format;

/// Runs the pool benchmark and reports each metric in `format`.
pub fn run(format: Format) -> Result<()> {
    let _ = format;
    bail!("bench pool not implemented yet")
}
