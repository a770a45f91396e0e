//! Fuzzes the OCI layer extractor (kiln-image `extract::apply_layer`) with arbitrary tar
//! streams onto a fresh root, applied twice (a second layer over the first exercises
//! whiteouts, replacements and symlinks left by the first). Invariants: nothing panics, and
//! nothing is created, changed or removed outside the root: a sibling directory holding a
//! file, a directory and a symlink back into the root must be byte-for-byte as before, and
//! the parent holds only the root and that sibling.
#![no_main]

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kiln_image::extract::{apply_layer, ExtractOptions};
use libfuzzer_sys::fuzz_target;

/// Per-process scratch directory (tmpfs when available).
fn scratch() -> Option<&'static Path> {
    static DIR: OnceLock<Option<tempfile::TempDir>> = OnceLock::new();
    DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("kiln-fuzz-extract")
            .tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .ok()
    })
    .as_ref()
    .map(|d| d.path())
}

/// Everything under `dir` (not following symlinks): path, kind, mode, content or target.
fn listing(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(m) = fs::symlink_metadata(&p) else {
                continue;
            };
            let desc = if m.file_type().is_symlink() {
                format!("link {:?}", fs::read_link(&p).ok())
            } else if m.is_dir() {
                stack.push(p.clone());
                format!(
                    "dir {:o}",
                    std::os::unix::fs::PermissionsExt::mode(&m.permissions())
                )
            } else {
                format!(
                    "file {:o} {:?}",
                    std::os::unix::fs::PermissionsExt::mode(&m.permissions()),
                    fs::read(&p).ok()
                )
            };
            out.push((p, desc));
        }
    }
    out.sort();
    out
}

fuzz_target!(|data: &[u8]| {
    let Some(base) = scratch() else { return };
    let case = base.join("case");
    let _ = fs::remove_dir_all(&case);
    let root = case.join("root");
    let outside = case.join("outside");
    if fs::create_dir_all(&root).is_err() || fs::create_dir_all(outside.join("dir")).is_err() {
        return;
    }
    let _ = fs::write(outside.join("file"), b"outside");
    let _ = symlink("../root", outside.join("back"));
    // Lures inside the root: absolute and climbing symlinks a layer might write through.
    let _ = symlink(&outside, root.join("abs"));
    let _ = symlink("../outside", root.join("up"));
    let _ = symlink("/", root.join("slash"));
    let before = listing(&outside);

    let opts = ExtractOptions {
        preserve_owner: false,
        max_bytes: 4 << 20,
    };
    let _ = apply_layer(&root, data, &opts);
    let _ = apply_layer(&root, data, &opts);

    assert_eq!(
        listing(&outside),
        before,
        "the layer changed something outside the root"
    );
    let mut names: Vec<_> = fs::read_dir(&case)
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    names.sort();
    assert_eq!(
        names,
        ["outside", "root"],
        "the layer created something beside the root"
    );
    // Make the whole case removable again (a layer may leave read-only directories).
    for (p, _) in listing(&root) {
        if let Ok(m) = fs::symlink_metadata(&p) {
            if m.is_dir() {
                let _ =
                    fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755));
            }
        }
    }
    let _ = fs::remove_dir_all(&case);
});
