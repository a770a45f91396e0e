//! Kiln's developer flows: `cargo xtask <kernel|build-guest|harness|run|test|bench>`.

mod harness;

fn main() {
    let _ = harness::HarnessOptions::default;
}
