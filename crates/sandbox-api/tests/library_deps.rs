//! The `kiln` library is the API alone: its normal dependencies, directly or through another
//! crate, include none of the command line's (clap, tracing-subscriber, indicatif) nor those
//! of registry pulls (tokio, oci-client: kiln-image's `registry` feature). kiln-image itself
//! (the image store: serde_json, nix) is allowed, without `registry`.
//!
//! `cargo tree -p kiln -e normal` resolves features for `kiln` alone, so the CLI enabling
//! `registry` for itself does not show here (`cargo metadata` unifies the whole workspace).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::process::Command;

#[test]
fn the_library_does_not_depend_on_the_cli_crates() {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree", "-p", "kiln", "-e", "normal", "--prefix", "none", "--format", "{p} {f}",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let reached: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        reached.contains("kiln-vmm") && reached.contains("kiln-proto"),
        "{reached:?}"
    );
    assert!(reached.contains("kiln-image"), "{reached:?}");
    let image_line = text.lines().find(|l| l.starts_with("kiln-image ")).unwrap();
    assert!(
        !image_line.contains("registry"),
        "kiln-image is built with `registry` for the library: {image_line}"
    );
    for cli_only in [
        "clap",
        "tracing-subscriber",
        "indicatif",
        "kiln-cli",
        "tokio",
        "oci-client",
    ] {
        assert!(
            !reached.contains(cli_only),
            "the kiln library depends on {cli_only}: {reached:?}"
        );
    }
}
