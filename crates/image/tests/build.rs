//! The built-in `python` image built for real with mmdebstrap (downloads ~100+ MB of Debian
//! packages, so `#[ignore]`d; the lead's tier-4 flow runs it):
//! `KILN_ASSETS_DIR=/path nice cargo test -p kiln-image --test build -- --ignored --nocapture`
//! Needs root (mmdebstrap --mode=root, loop mount for the checks).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use kiln_image::{tools, BuildOptions, Event, ImageFormat, ImageSource, ImageStore, Recipe};

fn store() -> ImageStore {
    let assets = std::env::var_os("KILN_ASSETS_DIR")
        .expect("set KILN_ASSETS_DIR to a scratch assets directory");
    ImageStore::open(PathBuf::from(assets).join("images")).unwrap()
}

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[ignore = "downloads Debian packages; run by the tier-4 flow"]
fn build_python_image() {
    tools::require(&[tools::MMDEBSTRAP, tools::MKFS_EROFS, tools::MKFS_EXT4]).unwrap();
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root (mmdebstrap --mode=root, mount)"
    );
    let store = store();
    let recipe = Recipe::builtin("python").unwrap();
    let format: ImageFormat = match std::env::var("KILN_IMAGE_FORMAT") {
        Ok(f) => f.parse().unwrap(),
        Err(_) => ImageFormat::default(),
    };
    let opts = BuildOptions {
        format,
        ..Default::default()
    };
    let t = Instant::now();
    let mut print = |e: Event<'_>| eprintln!("{e:?}");
    let img = store.build(&recipe, &opts, &mut print).expect("build");
    eprintln!(
        "build: {:.1} s, {} bytes, key {}",
        t.elapsed().as_secs_f64(),
        img.meta.size,
        img.key
    );
    let ImageSource::Build { packages, .. } = &img.meta.source else {
        panic!("source")
    };
    for p in [
        "python3",
        "python3-pip",
        "python3-venv",
        "python3-numpy",
        "bash",
        "coreutils",
        "ca-certificates",
        "curl",
        "git",
    ] {
        assert!(
            packages.iter().any(|x| x.starts_with(&format!("{p}="))),
            "{p} installed: {packages:?}"
        );
    }
    assert_eq!(img.meta.exec.user.as_deref(), Some("user"));

    // Mount it read-only and look inside: the user, and python with numpy running.
    let mnt = tempfile::tempdir().unwrap();
    sh(Command::new("mount")
        .args(["-o", "loop,ro", "-t", img.meta.format.as_str()])
        .arg(&img.path)
        .arg(mnt.path()));
    let check = std::panic::catch_unwind(|| {
        let passwd = std::fs::read_to_string(mnt.path().join("etc/passwd")).unwrap();
        assert!(passwd.lines().any(|l| l.starts_with("user:x:1000:1000:") && l.ends_with(":/home/user:/bin/bash")), "{passwd}");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(mnt.path().join("home/user"))
                .unwrap()
                .uid(),
            1000
        );
        let out = sh(Command::new("chroot").arg(mnt.path()).args([
            "/usr/bin/python3",
            "-c",
            "import numpy, venv, pip; print(numpy.arange(4).sum())",
        ]));
        assert_eq!(out.trim(), "6");
        sh(Command::new("chroot").arg(mnt.path()).args([
            "/bin/bash",
            "-l",
            "-c",
            "git --version && curl --version",
        ]));
    });
    sh(Command::new("umount").arg(mnt.path()));
    if let Err(p) = check {
        std::panic::resume_unwind(p);
    }

    // Nothing changed: the second build returns the stored image at once.
    let t = Instant::now();
    let mut cached = false;
    let again = store
        .build(&recipe, &opts, &mut |e| {
            if let Event::Done { cached: c, .. } = e {
                cached = c;
            }
        })
        .expect("rebuild");
    let secs = t.elapsed().as_secs_f64();
    eprintln!("second build: {secs:.2} s");
    assert!(cached && again.key == img.key, "served from the store");
    assert!(secs < 10.0, "second build took {secs} s");
}
