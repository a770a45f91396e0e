//! Proves kiln-pool is vendorable alone: `cargo metadata` shows no kiln crate anywhere in its
//! dependency graph (normal, build or dev), and its direct dependencies are the allowed few.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, HashMap};
use std::process::Command;

use serde_json::Value;

#[test]
fn dependency_graph_has_no_kiln_crate() {
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
    let pool = packages
        .iter()
        .find(|p| p["name"] == "kiln-pool")
        .expect("kiln-pool in the workspace");

    // Direct normal dependencies, from the manifest.
    let direct: BTreeSet<&str> = pool["dependencies"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["kind"].is_null())
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    let allowed: BTreeSet<&str> = ["thiserror", "crossbeam-channel", "tracing"].into();
    assert!(
        direct.is_subset(&allowed),
        "unexpected dependencies: {direct:?}"
    );

    // The resolved graph, transitively, every dependency kind.
    let nodes: HashMap<&str, &Value> = meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap(), n))
        .collect();
    let mut seen = BTreeSet::new();
    let mut stack = vec![pool["id"].as_str().unwrap()];
    while let Some(id) = stack.pop() {
        for dep in nodes[id]["deps"].as_array().unwrap() {
            let dep_id = dep["pkg"].as_str().unwrap();
            if seen.insert(dep_id) {
                stack.push(dep_id);
            }
        }
    }
    let reached: BTreeSet<&str> = seen.iter().map(|id| names[id]).collect();
    assert!(reached.contains("thiserror") && reached.contains("crossbeam-channel"));
    let kiln: Vec<&&str> = reached
        .iter()
        .filter(|n| n.starts_with("kiln") || **n == "xtask")
        .collect();
    assert!(kiln.is_empty(), "kiln-pool depends on {kiln:?}");
}
