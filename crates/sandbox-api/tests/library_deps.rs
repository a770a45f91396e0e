//! The `kiln` library is the API alone: `cargo metadata` shows none of the command line's
//! dependencies (clap, serde_json, nix, tracing-subscriber) among its normal dependencies,
//! directly or through another crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, HashMap};
use std::process::Command;

use serde_json::Value;

#[test]
fn the_library_does_not_depend_on_the_cli_crates() {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages = meta["packages"].as_array().unwrap();
    let names: HashMap<&str, &str> = packages
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let kiln = packages
        .iter()
        .find(|p| p["name"] == "kiln")
        .expect("kiln in the workspace");
    let nodes: HashMap<&str, &Value> = meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap(), n))
        .collect();

    // Normal (non-dev, non-build) dependencies, transitively.
    let normal = |dep: &Value| {
        dep["dep_kinds"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["kind"].is_null())
    };
    let mut seen = BTreeSet::new();
    let mut stack = vec![kiln["id"].as_str().unwrap()];
    while let Some(id) = stack.pop() {
        for dep in nodes[id]["deps"].as_array().unwrap() {
            let dep_id = dep["pkg"].as_str().unwrap();
            if normal(dep) && seen.insert(dep_id) {
                stack.push(dep_id);
            }
        }
    }
    let reached: BTreeSet<&str> = seen.iter().map(|id| names[id]).collect();
    assert!(
        reached.contains("kiln-vmm") && reached.contains("kiln-proto"),
        "{reached:?}"
    );
    for cli_only in [
        "clap",
        "serde_json",
        // nix is allowed: kiln-egress (the sandbox's egress proxy) reads the host's interface
        // addresses with it.
        "tracing-subscriber",
        "kiln-cli",
    ] {
        assert!(
            !reached.contains(cli_only),
            "the kiln library depends on {cli_only}: {reached:?}"
        );
    }
}
