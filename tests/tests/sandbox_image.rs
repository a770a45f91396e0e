//! Tier-4: sandboxes booted from the python image (`kiln image build python`, in the image
//! store of `$KILN_ASSETS_DIR`; `cargo xtask test` builds or finds it). The agent switches
//! root to the read-only image disk under a tmpfs overlay: Python, numpy, pip and venv work;
//! a session that writes everywhere it can leaves the image file unchanged; two sandboxes of
//! one image do not see each other's files; snapshot, restore and fork keep the image root;
//! `kiln run --image python` prints 42; a restore-mode pool serves image sandboxes; an image that does not mount is a boot failure whose
//! error quotes the agent's `kiln-agent: root:` line.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod sandbox_common;

use std::path::PathBuf;
use std::time::Instant;

use kiln::{ExecOptions, Sandbox, SandboxConfig};

/// The image the tests boot (a store name).
const IMAGE: &str = "python";
/// Guest memory for image sandboxes (python + numpy + a 128 MiB overlay).
const MEMORY_MIB: u32 = 512;

fn config(name: &str) -> SandboxConfig {
    sandbox_common::config(name, MEMORY_MIB)
        .image(IMAGE)
        .overlay_size_mib(128)
}

fn boot(name: &str) -> Sandbox {
    let t0 = Instant::now();
    let sb = Sandbox::create(config(name)).unwrap_or_else(|e| panic!("booting {name}: {e}"));
    eprintln!(
        "{name}: python image ready in {:.2}s (agent ready {:?})",
        t0.elapsed().as_secs_f64(),
        sb.boot_timings().ready
    );
    sb
}

/// Runs `bash -c script` as root (the image's default user is `user`).
fn root_sh(sb: &Sandbox, script: &str) -> (bool, String, String) {
    let r = sb
        .exec_with_options(&["bash", "-c", script], ExecOptions::new().user("root"))
        .unwrap();
    (
        r.success(),
        r.stdout_str().trim().to_owned(),
        r.stderr_str(),
    )
}

fn image_path() -> PathBuf {
    let r = kiln::image::resolve(IMAGE).unwrap_or_else(|e| {
        panic!("the {IMAGE} image is not in the store ({e}); `cargo xtask test` builds it")
    });
    r.path
}

/// `sha256:<hex>` of a file, by `sha256sum` (fast even in the harness's emulated L1).
fn sha256_file(path: &std::path::Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "sha256sum {}", path.display());
    let text = String::from_utf8_lossy(&out.stdout);
    format!("sha256:{}", text.split_whitespace().next().unwrap())
}

/// The SHA-256 the store recorded when it made the image.
fn recorded_sha256() -> String {
    let store = kiln_image::ImageStore::open(kiln::assets::images_dir().unwrap()).unwrap();
    store.resolve(IMAGE).unwrap().meta.sha256
}

#[test]
fn python_numpy_pip_and_venv_run_and_writes_leave_the_image_unchanged() {
    kiln_tests::require_tier4();
    let img = image_path();
    // The file as the store made it (checked after the session against the same digest).
    let before = recorded_sha256();
    let meta_before = std::fs::metadata(&img).unwrap();
    // Boot time of the initramfs guest next to the image's, in the same run (docs/IMAGES.md).
    let t0 = Instant::now();
    let plain = sandbox_common::sandbox("image-compare-initramfs", MEMORY_MIB, 1);
    let initramfs_boot = t0.elapsed();
    plain.shutdown().unwrap();
    let t0 = Instant::now();
    let sb = boot("image-python");
    eprintln!(
        "boot-compare: initramfs {:.2}s, python image {:.2}s (create to agent ready)",
        initramfs_boot.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );

    let r = sb.exec(&["python3", "-c", "print(6*7)"]).unwrap();
    assert!(r.success(), "{r:?}");
    assert_eq!(r.stdout_str().trim(), "42");

    let r = sb
        .exec(&[
            "python3",
            "-c",
            "import numpy; print(numpy.arange(4).sum())",
        ])
        .unwrap();
    assert!(r.success(), "{}", r.stderr_str());
    assert_eq!(r.stdout_str().trim(), "6");

    let (ok, out, err) = root_sh(
        &sb,
        "python3 -m pip --version && python3 -m venv --without-pip /tmp/venv && /tmp/venv/bin/python -c \
         'import sys; print(sys.prefix)' && grep -c bookworm /etc/os-release >/dev/null && echo ok",
    );
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("pip ") && out.contains("/tmp/venv") && out.ends_with("ok"),
        "{out}"
    );

    // The root is the overlay, the image below it read-only.
    let (ok, out, err) = root_sh(&sb, "findmnt -n -o FSTYPE / && cat /sys/block/vda/ro");
    assert!(ok, "{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), ["overlay", "1"], "{out}");

    // Write everywhere a root user can: every directory of the tree, deletions of image
    // files, the block device itself, a remount.
    let (ok, out, err) = root_sh(
        &sb,
        r#"set -u
        n=0
        for d in / /etc /usr /usr/bin /usr/lib /var /opt /root /home/user /usr/lib/python3; do
          echo kiln > "$d/kiln-was-here" && n=$((n+1))
        done
        rm -rf /usr/share/doc /etc/apt && n=$((n+1))
        echo "print('changed')" > /usr/lib/python3/dist-packages/numpy/__init__.py && n=$((n+1))
        dd if=/dev/zero of=/dev/vda bs=4096 count=16 conv=fsync 2>/dev/null && echo "DISK WRITTEN"
        mount -o remount,rw /dev/vda 2>/dev/null && echo "REMOUNTED RW"
        blockdev --setrw /dev/vda 2>/dev/null; dd if=/dev/zero of=/dev/vda bs=512 count=1 seek=2 conv=fsync 2>/dev/null && echo "DISK WRITTEN AFTER SETRW"
        sync
        echo "writes=$n"
        cat /usr/lib/kiln-was-here"#,
    );
    assert!(ok, "{out}\n{err}");
    assert!(
        !out.contains("WRITTEN") && !out.contains("REMOUNTED"),
        "{out}"
    );
    assert!(out.contains("writes=12"), "{out}");
    assert!(out.ends_with("kiln"), "{out}");
    // The overlay shows the change; a fresh read of the lower layer would not.
    let r = sb.exec(&["python3", "-c", "import numpy"]).unwrap();
    assert_eq!(r.stdout_str().trim(), "changed");
    sb.shutdown().unwrap();

    let after = sha256_file(&img);
    let meta_after = std::fs::metadata(&img).unwrap();
    assert_eq!(before, after, "the image file changed");
    assert_eq!(meta_before.len(), meta_after.len());
    assert_eq!(
        meta_before.modified().unwrap(),
        meta_after.modified().unwrap()
    );
}

#[test]
fn two_sandboxes_of_one_image_do_not_see_each_others_files() {
    kiln_tests::require_tier4();
    let a = boot("image-a");
    let b = boot("image-b");
    a.write_file("/home/user/only-a", b"a").unwrap();
    let (ok, _, err) = root_sh(&b, "echo b > /etc/only-b");
    assert!(ok, "{err}");
    assert!(a.file_exists("/home/user/only-a").unwrap());
    assert!(!b.file_exists("/home/user/only-a").unwrap());
    assert!(!a.file_exists("/etc/only-b").unwrap());
    assert!(b.file_exists("/etc/only-b").unwrap());
}

#[test]
fn snapshot_restore_and_fork_keep_the_image_root() {
    kiln_tests::require_tier4();
    let sb = boot("image-snap");
    let (ok, _, err) = root_sh(&sb, "echo before > /root/state");
    assert!(ok, "{err}");
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    sb.snapshot(&snap).unwrap();
    assert!(snap.join(kiln::image::EXEC_DEFAULTS_FILE).is_file());

    let restored = Sandbox::restore(
        &snap,
        SandboxConfig::new()
            .name("image-restored")
            .boot_timeout(sandbox_common::BOOT_TIMEOUT)
            .request_timeout(sandbox_common::REQUEST_TIMEOUT),
    )
    .unwrap();
    // The image's exec defaults came back with the snapshot.
    assert_eq!(restored.exec_defaults(), sb.exec_defaults());
    assert_eq!(restored.exec_defaults().cwd.as_deref(), Some("/home/user"));
    // /root is root's (the image's default user is `user`).
    let r = restored
        .exec_with_options(
            &[
                "python3",
                "-c",
                "print(open('/root/state').read().strip(), 6*7)",
            ],
            ExecOptions::new().user("root"),
        )
        .unwrap();
    assert!(r.success(), "{}", r.stderr_str());
    assert_eq!(r.stdout_str().trim(), "before 42");
    // The default working directory is the image's.
    let r = restored.exec(&["pwd"]).unwrap();
    assert_eq!(r.stdout_str().trim(), "/home/user");

    let forks = sb.fork(2).unwrap();
    for (i, f) in forks.iter().enumerate() {
        let (ok, _, err) = root_sh(f, &format!("echo {i} > /root/fork-{i}"));
        assert!(ok, "{err}");
    }
    for (i, f) in forks.iter().enumerate() {
        let (ok, out, err) = root_sh(f, "cat /root/state; ls /root | grep fork- | tr '\\n' ' '");
        assert!(ok, "{err}");
        assert_eq!(out, format!("before\nfork-{i}"), "fork {i}");
    }
    assert!(!sb.file_exists("/root/fork-0").unwrap());
    assert!(!restored.file_exists("/root/fork-1").unwrap());
}

#[test]
fn kiln_run_image_python_prints_42() {
    kiln_tests::require_tier4();
    let out = sandbox_common::run_kiln(
        &[
            "run",
            "--boot-timeout",
            "180",
            "--image",
            IMAGE,
            "--",
            "python3",
            "-c",
            "print(6*7)",
        ],
        &[],
        None,
    );
    assert!(out.status.success(), "{}", sandbox_common::describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");

    // An unknown image: exit 10 before anything boots.
    let out = sandbox_common::run_kiln(
        &["run", "--image", "no-such-image", "--", "true"],
        &[],
        None,
    );
    assert_eq!(
        out.status.code(),
        Some(10),
        "{}",
        sandbox_common::describe(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no-such-image"),
        "{}",
        sandbox_common::describe(&out)
    );
}

#[test]
fn an_image_that_does_not_mount_is_a_boot_failure_naming_the_root_switch() {
    kiln_tests::require_tier4();
    // An ext4 superblock magic over garbage: the library accepts the file, the guest's
    // mount fails.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.ext4");
    let mut bytes = vec![0xA5u8; 4 << 20];
    bytes[1024 + 0x38] = 0x53;
    bytes[1024 + 0x39] = 0xEF;
    std::fs::write(&bad, &bytes).unwrap();
    let cfg = sandbox_common::config("image-bad", 256).image(bad.to_str().unwrap());
    let t0 = Instant::now();
    let e = Sandbox::create(cfg).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("kiln-agent: root:"), "{msg}");
    assert!(msg.contains("/dev/vda"), "{msg}");
    // The guest ended itself: no waiting for the boot deadline.
    assert!(
        t0.elapsed() < sandbox_common::BOOT_TIMEOUT,
        "{:?}: {msg}",
        t0.elapsed()
    );
    // The file is untouched.
    assert_eq!(std::fs::read(&bad).unwrap(), bytes);
}

/// A restore-mode `SandboxPool` of python-image sandboxes: the second user gets a sandbox
/// restored from the pool's snapshot (image disk reopened, overlay in the snapshot's RAM),
/// with Python and the image's exec defaults, and none of the first user's files.
#[test]
fn a_restore_mode_pool_serves_python_image_sandboxes_without_the_last_users_files() {
    kiln_tests::require_tier4();
    let cfg = kiln::PoolConfig {
        min_size: 1,
        max_size: 1,
        max_in_use: 1,
        max_idle_duration: None,
        health_check_interval: 1,
        acquire_timeout: std::time::Duration::from_secs(240),
        maintenance_interval: std::time::Duration::from_millis(200),
    };
    let pool =
        kiln::SandboxPool::with_reset_mode(config("img-pool"), cfg, kiln::ResetMode::Restore)
            .unwrap();
    {
        let a = pool.acquire().unwrap();
        let r = a
            .exec(&[
                "sh",
                "-c",
                "echo secret > ~/left-behind && python3 -c 'print(6*7)'",
            ])
            .unwrap();
        assert_eq!(r.stdout_str().trim(), "42", "{}", r.stderr_str());
    }
    let b = pool.acquire().unwrap();
    assert!(b.hello().restored, "a restore-mode sandbox booted instead");
    let r = b
        .exec(&["sh", "-c", "pwd; test -e ~/left-behind && echo LEFT; python3 -c 'import numpy; print(numpy.int64(6)*7)'"])
        .unwrap();
    assert_eq!(
        r.stdout_str().trim(),
        "/home/user\n42",
        "{}",
        r.stderr_str()
    );
}
