//! Tier-4: a pulled image end to end. The test starts a real `docker-registry` on loopback
//! (Debian's package; kiln-image's test support, killed on drop), builds an OCI layout with
//! umoci from a small rootfs (busybox-static, two layers: the second deletes a file and a
//! directory, written as whiteouts), pushes it with skopeo, runs `kiln image pull
//! localhost:PORT/small:v1` into a private store, then `kiln run --image
//! localhost:PORT/small:v2` (not stored: pulled first) and checks in the guest that the
//! whiteouts applied and the image's exec defaults (env, working dir) are used.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod sandbox_common;
#[path = "../../crates/image/tests/support/mod.rs"]
mod support;

use std::fs;
use std::process::Command;

/// The small rootfs: busybox as /bin/sh and friends, /etc and /usr (the root switch wants
/// both), a file and a directory that the second layer deletes.
fn small_layout(dir: &std::path::Path) -> std::path::PathBuf {
    let layout = dir.join("layout");
    let bundle = dir.join("bundle");
    let l = layout.to_str().unwrap();
    support::run(Command::new("umoci").args(["init", "--layout", l]));
    support::run(Command::new("umoci").args(["new", "--image", &format!("{l}:v1")]));
    support::run(
        Command::new("umoci")
            .args(["unpack", "--image", &format!("{l}:v1")])
            .arg(&bundle),
    );
    let root = bundle.join("rootfs");
    for d in [
        "bin", "etc", "usr/bin", "tmp", "proc", "sys", "dev", "run", "data/old",
    ] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in ["sh", "cat", "ls", "pwd", "echo", "test"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    fs::write(root.join("etc/hello"), "hello from the registry\n").unwrap();
    fs::write(root.join("etc/gone"), "deleted by layer 2\n").unwrap();
    fs::write(root.join("data/old/file"), "old\n").unwrap();
    support::run(
        Command::new("umoci")
            .args(["repack", "--refresh-bundle", "--image", &format!("{l}:v1")])
            .arg(&bundle),
    );
    fs::remove_file(root.join("etc/gone")).unwrap();
    fs::remove_dir_all(root.join("data/old")).unwrap();
    fs::write(root.join("data/new"), "new in layer 2\n").unwrap();
    support::run(
        Command::new("umoci")
            .args(["repack", "--image", &format!("{l}:v1")])
            .arg(&bundle),
    );
    support::run(Command::new("umoci").args([
        "config",
        "--image",
        &format!("{l}:v1"),
        "--config.env=GREETING=hello-from-config",
        "--config.env=PATH=/bin:/usr/bin",
        "--config.workingdir=/data",
        "--config.cmd=/bin/sh",
    ]));
    layout
}

#[test]
fn a_pulled_image_runs_with_whiteouts_applied_and_its_exec_defaults() {
    kiln_tests::require_tier4();
    support::require_tools();
    let dir = tempfile::tempdir().unwrap();
    let layout = small_layout(dir.path());
    let reg = support::Registry::start(None);
    reg.push(&layout, "v1", "small");
    // The same image under a second tag, for the pull-on-run path.
    support::run(Command::new("skopeo").args([
        "--insecure-policy",
        "copy",
        "--dest-tls-verify=false",
        "--quiet",
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{}/small:v2", reg.host()),
    ]));
    let store = dir.path().join("assets");
    let assets = store.to_str().unwrap();
    let env = [("KILN_ASSETS_DIR", assets)];
    let v1 = format!("localhost:{}/small:v1", reg.port);
    let v2 = format!("localhost:{}/small:v2", reg.port);

    let out = sandbox_common::run_kiln(&["image", "pull", &v1], &env, None);
    assert!(out.status.success(), "{}", sandbox_common::describe(&out));
    let out = sandbox_common::run_kiln(&["image", "ls"], &env, None);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&v1),
        "{}",
        sandbox_common::describe(&out)
    );

    let out = sandbox_common::run_kiln(
        &[
            "run",
            "--boot-timeout",
            "180",
            "--memory",
            "256",
            "--image",
            &v2,
            "--",
            "/bin/sh",
            "-c",
            "cat /etc/hello; test -e /etc/gone && echo GONE-PRESENT; \
             test -e /data/old && echo OLD-PRESENT; cat /data/new; pwd; echo $GREETING",
        ],
        &env,
        None,
    );
    assert!(out.status.success(), "{}", sandbox_common::describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "hello from the registry",
            "new in layer 2",
            "/data",
            "hello-from-config"
        ],
        "{}",
        sandbox_common::describe(&out)
    );
    // v2 was pulled by `kiln run` (same manifest: served from the same stored image).
    let out = sandbox_common::run_kiln(&["image", "ls"], &env, None);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&v2),
        "{}",
        sandbox_common::describe(&out)
    );

    // A tag the registry does not have: `kiln run` fails with the pull's code (14).
    let missing = format!("localhost:{}/small:nope", reg.port);
    let out = sandbox_common::run_kiln(&["run", "--image", &missing, "--", "true"], &env, None);
    assert_eq!(
        out.status.code(),
        Some(14),
        "{}",
        sandbox_common::describe(&out)
    );
}
