//! Kiln's developer flows.
fn main() {}
