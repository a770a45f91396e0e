//! End-to-end pulls from a real `docker-registry` on 127.0.0.1 (started and killed by the
//! test), with images made by umoci, crafted layers, and pushed by skopeo; plus imports of
//! the same OCI layout and of a docker-archive.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::fs;
use std::path::Path;
use std::process::Command;

use kiln_image::{Auth, ErrorKind, Event, ImageFormat, ImageStore, ImportOptions, PullOptions};
use support::*;

struct World {
    _tmp: tempfile::TempDir,
    layout: std::path::PathBuf,
    store: ImageStore,
    base: std::path::PathBuf,
}

fn world() -> World {
    require_tools();
    let tmp = tempfile::tempdir().unwrap();
    let layout = umoci_layout(tmp.path());
    let store = ImageStore::open(tmp.path().join("store")).unwrap();
    let base = tmp.path().to_path_buf();
    World {
        _tmp: tmp,
        layout,
        store,
        base,
    }
}

/// The store holds no image and no staging left over.
fn assert_store_clean(store: &ImageStore) {
    let images: Vec<_> = fs::read_dir(store.dir().join("images")).unwrap().collect();
    assert!(images.is_empty(), "no image stored: {images:?}");
    let tmp: Vec<_> = fs::read_dir(store.dir().join("tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "no staging left: {tmp:?}");
    assert!(store.list().unwrap().is_empty());
}

fn opts() -> PullOptions {
    PullOptions::default()
}

#[test]
fn anonymous_pull_applies_layers_whiteouts_and_config() {
    let w = world();
    // A third, crafted layer: an opaque directory over layer 1's `etc` contents kept by
    // name, a file whiteout, and a new file.
    let extra = tar_layer(&[
        Entry::Dir("opq/"),
        Entry::File("opq/.wh..wh..opq", b""),
        Entry::File("opq/fresh", b"fresh\n"),
        Entry::File("etc/.wh.hello.link", b""),
    ]);
    let pre = tar_layer(&[Entry::File("opq/stale", b"stale\n")]);
    derive_tag(&w.layout, "base", "full", &[pre, extra], |_| {});
    let reg = Registry::start(None);
    let reference = reg.push(&w.layout, "full", "kiln/test");

    let mut events = Vec::new();
    let img = w
        .store
        .pull(&reference, &opts(), &mut |e| events.push(format!("{e:?}")))
        .expect("pull");
    assert!(
        events.iter().any(|e| e.contains("applying layer 4/4")),
        "{events:?}"
    );
    assert_eq!(img.meta.format, ImageFormat::Ext4, "the default format");
    assert_eq!(img.name, reference);
    let exec = &img.meta.exec;
    assert!(exec.env.iter().any(|e| e == "GREETING=hello"), "{exec:?}");
    assert_eq!(exec.working_dir.as_deref(), Some("/data"));
    assert_eq!(exec.user.as_deref(), Some("1000:1000"));
    assert_eq!(exec.entrypoint, vec!["/bin/sh"]);
    assert_eq!(exec.cmd, vec!["-c", "echo hi"]);

    let out = unpack_image(&img);
    let root = out.path().join("root");
    assert_eq!(
        fs::read_to_string(root.join("etc/hello")).unwrap(),
        "hello from layer 1\n"
    );
    assert_eq!(
        fs::read_to_string(root.join("etc/hello.hard")).unwrap(),
        "hello from layer 1\n"
    );
    assert!(
        !root.join("etc/hello.link").exists(),
        "whited out in layer 4"
    );
    assert!(
        !root.join("gone.txt").exists(),
        "whited out by umoci in layer 2"
    );
    assert!(
        !root.join("data/old").exists(),
        "removed directory in layer 2"
    );
    assert_eq!(
        fs::read_to_string(root.join("data/new")).unwrap(),
        "new in layer 2\n"
    );
    assert!(
        !root.join("opq/stale").exists(),
        "opaque directory hides layer 3"
    );
    assert_eq!(
        fs::read_to_string(root.join("opq/fresh")).unwrap(),
        "fresh\n"
    );

    // The same manifest again: from the cache, without downloading.
    let mut cached = false;
    let again = w
        .store
        .pull(&reference, &opts(), &mut |e| {
            if let Event::Done { cached: c, .. } = e {
                cached = c;
            }
        })
        .expect("second pull");
    assert!(cached, "second pull is served from the store");
    assert_eq!(again.key, img.key);
    assert_eq!(w.store.list().unwrap().len(), 1);
    w.store
        .verify(&reference)
        .expect("sha256 of the stored file");
}

#[test]
fn basic_auth_pull_and_401_without_credentials() {
    let w = world();
    let reg = Registry::start(Some(("kiln", "s3cret")));
    let reference = reg.push(&w.layout, "base", "private/img");

    let e = w
        .store
        .pull(&reference, &opts(), &mut silent())
        .expect_err("anonymous is refused");
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
    assert!(e.to_string().contains(&reference), "{e}");
    let wrong = PullOptions {
        auth: Auth::Basic {
            username: "kiln".into(),
            password: "nope".into(),
        },
        ..opts()
    };
    let e = w
        .store
        .pull(&reference, &wrong, &mut silent())
        .expect_err("wrong password");
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
    assert_store_clean(&w.store);

    let good = PullOptions {
        auth: Auth::Basic {
            username: "kiln".into(),
            password: "s3cret".into(),
        },
        ..opts()
    };
    let img = w
        .store
        .pull(&reference, &good, &mut silent())
        .expect("pull with credentials");
    assert_eq!(img.meta.exec.working_dir.as_deref(), Some("/data"));
}

#[test]
fn unknown_tag_and_repository() {
    let w = world();
    let reg = Registry::start(None);
    reg.push(&w.layout, "base", "kiln/known");
    for r in [
        format!("{}/kiln/known:nope", reg.host()),
        format!("{}/kiln/unknown:base", reg.host()),
    ] {
        let e = w
            .store
            .pull(&r, &opts(), &mut silent())
            .expect_err("unknown");
        assert_eq!(e.kind(), ErrorKind::UnknownManifest, "{r}: {e}");
        assert!(e.to_string().contains(&r), "{e}");
    }
    assert_store_clean(&w.store);
}

#[test]
fn corrupt_blob_in_registry_is_a_digest_mismatch() {
    let w = world();
    let reg = Registry::start(None);
    let reference = reg.push(&w.layout, "base", "kiln/corrupt");
    let digest = layer_digests(&w.layout, "base")[0].clone();
    let blob = reg.blob_file(&digest);
    let mut bytes = fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&blob, bytes).unwrap();

    let e = w
        .store
        .pull(&reference, &opts(), &mut silent())
        .expect_err("mismatch");
    assert_eq!(e.kind(), ErrorKind::DigestMismatch, "{e}");
    assert!(e.to_string().contains(&digest), "{e}");
    assert_store_clean(&w.store);
}

#[test]
fn unsafe_layers_are_refused_and_nothing_is_written_outside() {
    let w = world();
    let outside = w.base.join("outside");
    fs::create_dir(&outside).unwrap();
    let abs = outside.join("abs-pwned");
    let abs_name = abs.to_str().unwrap().to_string();
    let out_name = outside.to_str().unwrap().to_string();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "dotdot",
            tar_layer(&[Entry::File("../../../../../../../x-pwned", b"x")]),
        ),
        ("absolute", tar_layer(&[Entry::File(&abs_name, b"x")])),
        (
            "symlink",
            tar_layer(&[
                Entry::Sym("esc", &out_name),
                Entry::File("esc/link-pwned", b"x"),
            ]),
        ),
        (
            "relsymlink",
            tar_layer(&[
                Entry::Sym("up", "../../../../../../.."),
                Entry::File("up/rel-pwned", b"x"),
            ]),
        ),
    ];
    let reg = Registry::start(None);
    for (tag, layer) in &cases {
        derive_tag(&w.layout, "base", tag, std::slice::from_ref(layer), |_| {});
        let reference = reg.push(&w.layout, tag, "kiln/evil");
        let e = w
            .store
            .pull(&reference, &opts(), &mut silent())
            .expect_err("refused");
        assert_eq!(e.kind(), ErrorKind::UnsafeLayer, "{tag}: {e}");
        let msg = format!(
            "{e}: {}",
            std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_default()
        );
        assert!(msg.contains("unsafe") && msg.contains("kiln/evil"), "{msg}");
    }
    assert_eq!(
        fs::read_dir(&outside).unwrap().count(),
        0,
        "nothing written outside"
    );
    assert!(!Path::new("/x-pwned").exists());
    assert!(!Path::new("/rel-pwned").exists());
    assert_store_clean(&w.store);
}

#[test]
fn other_architecture_is_refused() {
    let w = world();
    derive_tag(&w.layout, "base", "arm", &[], |c| {
        c["architecture"] = "arm64".into()
    });
    let reg = Registry::start(None);
    let reference = reg.push(&w.layout, "arm", "kiln/arm");
    let e = w
        .store
        .pull(&reference, &opts(), &mut silent())
        .expect_err("arm64");
    assert_eq!(e.kind(), ErrorKind::WrongArchitecture, "{e}");
    assert!(e.to_string().contains("linux/arm64"), "{e}");
    assert_store_clean(&w.store);
}

#[test]
fn unreachable_registry() {
    let w = world();
    let port = free_port();
    let e = w
        .store
        .pull(
            &format!("127.0.0.1:{port}/kiln/none:latest"),
            &opts(),
            &mut silent(),
        )
        .expect_err("nothing listens");
    assert_eq!(e.kind(), ErrorKind::RegistryUnreachable, "{e}");
    assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
}

#[test]
fn import_oci_layout_and_docker_archive() {
    let w = world();
    let img = w
        .store
        .import(
            &w.layout,
            "imported",
            &ImportOptions {
                tag: Some("base".into()),
                ..Default::default()
            },
            &mut silent(),
        )
        .expect("import layout");
    let out = unpack_image(&img);
    assert_eq!(
        fs::read_to_string(out.path().join("root/data/new")).unwrap(),
        "new in layer 2\n"
    );
    assert!(!out.path().join("root/gone.txt").exists());
    assert_eq!(img.meta.exec.user.as_deref(), Some("1000:1000"));

    let archive = w.base.join("image.tar");
    run(Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--quiet"])
        .arg(format!("oci:{}:base", w.layout.display()))
        .arg(format!(
            "docker-archive:{}:kiln/archived:v1",
            archive.display()
        )));
    let opts = ImportOptions {
        format: ImageFormat::Erofs,
        ..Default::default()
    };
    let img2 = w
        .store
        .import(&archive, "archived", &opts, &mut silent())
        .expect("import archive");
    assert_eq!(img2.meta.format, ImageFormat::Erofs);
    let out2 = unpack_image(&img2);
    assert_eq!(
        fs::read_to_string(out2.path().join("root/etc/hello")).unwrap(),
        "hello from layer 1\n"
    );
    assert!(!out2.path().join("root/data/old").exists());
    assert_eq!(img2.meta.exec.cmd, vec!["-c", "echo hi"]);

    let names: Vec<String> = w
        .store
        .list()
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, vec!["archived", "imported"]);

    // A truncated archive is refused as corrupt, and leaves nothing behind.
    let bytes = fs::read(&archive).unwrap();
    let cut = w.base.join("cut.tar");
    fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = w
        .store
        .import(&cut, "cut", &opts, &mut silent())
        .expect_err("truncated");
    assert_eq!(e.kind(), ErrorKind::CorruptImage, "{e}");
    assert_eq!(w.store.list().unwrap().len(), 2);
    assert_eq!(fs::read_dir(w.store.dir().join("tmp")).unwrap().count(), 0);
}

#[test]
fn store_resolve_rm_and_corruption() {
    let w = world();
    let img = w
        .store
        .import(&w.layout, "one", &ImportOptions::default(), &mut silent())
        .expect("import");
    w.store
        .import(&w.layout, "two", &ImportOptions::default(), &mut silent())
        .expect("same image, 2nd name");
    assert_eq!(w.store.resolve("one").unwrap().key, img.key);
    assert_eq!(
        w.store.resolve(&img.key).unwrap().key,
        img.key,
        "a key resolves too"
    );
    let e = w.store.resolve("three").expect_err("unknown");
    assert_eq!(e.kind(), ErrorKind::UnknownImage);
    assert!(e.to_string().contains("three"));

    // Truncate the image file: resolve says corrupt, naming the image.
    let f = fs::OpenOptions::new().write(true).open(&img.path).unwrap();
    f.set_len(img.meta.size / 2).unwrap();
    let e = w.store.resolve("one").expect_err("truncated");
    assert_eq!(e.kind(), ErrorKind::CorruptImage, "{e}");
    assert!(
        e.to_string().contains("one") && e.to_string().contains("truncated"),
        "{e}"
    );
    // A re-import repairs the damaged copy.
    drop(f);
    w.store
        .import(&w.layout, "one", &ImportOptions::default(), &mut silent())
        .expect("re-import");
    w.store.verify("one").expect("repaired");
    // Same size, changed bytes: resolve() does not read it all, verify() notices.
    let mut bytes = fs::read(&img.path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x5a;
    fs::write(&img.path, bytes).unwrap();
    w.store.resolve("one").expect("cheap checks pass");
    let e = w.store.verify("one").expect_err("changed");
    assert_eq!(e.kind(), ErrorKind::CorruptImage, "{e}");
    assert!(e.to_string().contains("sha256"), "{e}");

    w.store.remove("one").unwrap();
    assert!(img.path.exists(), "still named `two`");
    w.store.remove("two").unwrap();
    assert!(!img.path.exists(), "last name gone: image removed");
    assert_eq!(
        w.store.remove("two").expect_err("gone").kind(),
        ErrorKind::UnknownImage
    );
    assert_store_clean(&w.store);
}

#[test]
fn manifest_list_picks_linux_amd64_or_says_what_there_is() {
    let w = world();
    derive_tag(
        &w.layout,
        "base",
        "arm",
        &[tar_layer(&[Entry::File("arch", b"arm64\n")])],
        |c| c["architecture"] = "arm64".into(),
    );
    derive_tag(
        &w.layout,
        "base",
        "amd",
        &[tar_layer(&[Entry::File("arch", b"amd64\n")])],
        |_| {},
    );
    index_tag(&w.layout, "multi", &[("arm", "arm64"), ("amd", "amd64")]);
    index_tag(&w.layout, "armonly", &[("arm", "arm64")]);
    let reg = Registry::start(None);
    let multi = reg.push_all(&w.layout, "multi", "kiln/multi");
    let img = w
        .store
        .pull(&multi, &opts(), &mut silent())
        .expect("pull list");
    let out = unpack_image(&img);
    assert_eq!(
        fs::read_to_string(out.path().join("root/arch")).unwrap(),
        "amd64\n"
    );
    let armonly = reg.push_all(&w.layout, "armonly", "kiln/multi");
    let e = w
        .store
        .pull(&armonly, &opts(), &mut silent())
        .expect_err("no amd64");
    assert_eq!(e.kind(), ErrorKind::WrongArchitecture, "{e}");
    assert!(e.to_string().contains("linux/arm64"), "{e}");
}

#[test]
fn import_checks_zstd_layers_blob_digests_and_diff_ids() {
    let w = world();
    let import = |tag: &str| {
        let o = ImportOptions {
            tag: Some(tag.into()),
            ..Default::default()
        };
        w.store.import(&w.layout, tag, &o, &mut silent())
    };
    // A zstd layer on top.
    derive_tag_compressed(
        &w.layout,
        "base",
        "zstd",
        &[tar_layer(&[Entry::File("z/file", b"zstd layer\n")])],
        true,
        |_| {},
    );
    let img = import("zstd").expect("zstd import");
    let out = unpack_image(&img);
    assert_eq!(
        fs::read_to_string(out.path().join("root/z/file")).unwrap(),
        "zstd layer\n"
    );

    // A config whose diff_id does not match the (intact) layer.
    derive_tag(
        &w.layout,
        "base",
        "baddiff",
        &[tar_layer(&[Entry::File("d", b"d")])],
        |c| {
            let ids = c["rootfs"]["diff_ids"].as_array_mut().unwrap();
            let last = ids.len() - 1;
            ids[last] = serde_json::json!(sha256(b"something else"));
        },
    );
    let e = import("baddiff").expect_err("diff_id");
    assert_eq!(e.kind(), ErrorKind::DigestMismatch, "{e}");
    assert!(e.to_string().contains("diff_id"), "{e}");

    // A layer blob changed in the layout.
    let digest = layer_digests(&w.layout, "base")[1].clone();
    let blob = w.layout.join("blobs/sha256").join(&digest[7..]);
    let mut bytes = fs::read(&blob).unwrap();
    bytes[10] ^= 1;
    fs::write(&blob, bytes).unwrap();
    let e = import("base").expect_err("blob");
    assert_eq!(e.kind(), ErrorKind::DigestMismatch, "{e}");
    assert!(e.to_string().contains(&digest), "{e}");
    assert_eq!(w.store.list().unwrap().len(), 1, "only the zstd image");
    assert_eq!(fs::read_dir(w.store.dir().join("tmp")).unwrap().count(), 0);
}
