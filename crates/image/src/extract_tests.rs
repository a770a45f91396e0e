//! Unit tests of the layer extractor with synthetic tar layers (raw headers, so that
//! hostile names the tar crate's safe setters refuse can be written).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::*;

enum E<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8]),
    Sym(&'a str, &'a str),
    Hard(&'a str, &'a str),
    Fifo(&'a str),
    Char(&'a str),
}

fn raw_header(
    name: &str,
    kind: tar::EntryType,
    size: u64,
    link: Option<&str>,
    mode: u32,
) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    {
        let g = h.as_gnu_mut().expect("gnu header");
        assert!(name.len() < 100, "test names fit the header");
        g.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            g.linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
    }
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_cksum();
    h
}

fn layer(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let (h, data): (tar::Header, &[u8]) = match e {
            E::Dir(n) => (
                raw_header(n, tar::EntryType::Directory, 0, None, 0o755),
                b"",
            ),
            E::File(n, d) => (
                raw_header(n, tar::EntryType::Regular, d.len() as u64, None, 0o644),
                d,
            ),
            E::Sym(n, t) => (
                raw_header(n, tar::EntryType::Symlink, 0, Some(t), 0o777),
                b"",
            ),
            E::Hard(n, t) => (raw_header(n, tar::EntryType::Link, 0, Some(t), 0o644), b""),
            E::Fifo(n) => (raw_header(n, tar::EntryType::Fifo, 0, None, 0o644), b""),
            E::Char(n) => (raw_header(n, tar::EntryType::Char, 0, None, 0o644), b""),
        };
        b.append(&h, data).expect("append");
    }
    b.into_inner().expect("finish")
}

struct Fixture {
    outer: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let outer = tempfile::tempdir().expect("tempdir");
        fs::create_dir(outer.path().join("root")).expect("root");
        Fixture { outer }
    }
    fn root(&self) -> std::path::PathBuf {
        self.outer.path().join("root")
    }
    fn outside(&self) -> &Path {
        self.outer.path()
    }
    fn apply(&self, entries: &[E]) -> Result<LayerStats, ExtractError> {
        apply_layer(
            &self.root(),
            layer(entries).as_slice(),
            &ExtractOptions::default(),
        )
    }
    /// Everything in the outer directory besides `root` (must stay empty).
    fn outside_entries(&self) -> Vec<String> {
        fs::read_dir(self.outside())
            .expect("read outer")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n != "root")
            .collect()
    }
}

#[test]
fn regular_tree_with_dirs_files_symlinks_hardlinks() {
    let f = Fixture::new();
    let stats = f
        .apply(&[
            E::Dir("./etc/"),
            E::File("./etc/hello", b"hi\n"),
            E::Sym("./etc/hello.link", "hello"),
            E::Hard("./etc/hello.hard", "./etc/hello"),
            E::File("usr/bin/tool", b"#!/bin/sh\n"),
        ])
        .expect("apply");
    let r = f.root();
    assert_eq!(fs::read(r.join("etc/hello")).expect("read"), b"hi\n");
    assert_eq!(
        fs::read_link(r.join("etc/hello.link")).expect("link"),
        Path::new("hello")
    );
    let a = fs::metadata(r.join("etc/hello")).expect("stat");
    let b = fs::metadata(r.join("etc/hello.hard")).expect("stat");
    assert_eq!(a.ino(), b.ino(), "hard link shares the inode");
    assert_eq!(a.mode() & 0o7777, 0o644);
    assert!(r.join("usr/bin").is_dir(), "missing parents are created");
    assert_eq!(stats.files, 2);
    assert_eq!(stats.symlinks, 1);
    assert_eq!(stats.hardlinks, 1);
    assert_eq!(stats.bytes, 3 + 10);
}

#[test]
fn whiteouts_remove_lower_entries_only() {
    let f = Fixture::new();
    f.apply(&[
        E::File("a/keep", b"1"),
        E::File("a/gone", b"2"),
        E::Dir("a/gonedir"),
        E::File("a/gonedir/x", b"3"),
        E::File("d/old", b"4"),
        E::Dir("d/olddir"),
    ])
    .expect("layer 1");
    let s = f
        .apply(&[
            E::File("a/.wh.gone", b""),
            E::File("a/.wh.gonedir", b""),
            E::File("a/fresh", b"5"),
            E::File("a/.wh.fresh", b""), // same layer: does not hide `fresh`
            E::File("d/new", b"6"),
            E::File("d/.wh..wh..opq", b""), // opaque after `new`: keeps `new`
            E::File("nothere/.wh.x", b""),  // whiteout under a missing dir: no-op
        ])
        .expect("layer 2");
    let r = f.root();
    assert!(r.join("a/keep").exists());
    assert!(!r.join("a/gone").exists());
    assert!(!r.join("a/gonedir").exists());
    assert!(
        r.join("a/fresh").exists(),
        "a whiteout hides lower layers only"
    );
    assert!(!r.join("d/old").exists(), "opaque dir hides lower entries");
    assert!(!r.join("d/olddir").exists());
    assert!(
        r.join("d/new").exists(),
        "opaque keeps this layer's entries"
    );
    assert!(!r.join("nothere").exists(), "a whiteout creates nothing");
    assert!(
        !r.join("a/.wh.gone").exists(),
        "whiteout markers are not materialised"
    );
    assert_eq!(s.whiteouts, 3);
    assert_eq!(s.opaque_dirs, 1);
}

#[test]
fn opaque_before_entries_in_same_layer() {
    let f = Fixture::new();
    f.apply(&[E::File("d/old", b"x")]).expect("layer 1");
    f.apply(&[
        E::Dir("d"),
        E::File("d/.wh..wh..opq", b""),
        E::File("d/new", b"y"),
    ])
    .expect("layer 2");
    assert!(!f.root().join("d/old").exists());
    assert!(f.root().join("d/new").exists());
}

#[test]
fn devices_and_fifos_are_skipped() {
    let f = Fixture::new();
    let s = f
        .apply(&[E::Char("dev/null"), E::Fifo("run/pipe"), E::File("ok", b"")])
        .expect("apply");
    assert_eq!(s.skipped, 2);
    assert!(fs::symlink_metadata(f.root().join("dev/null")).is_err());
    assert!(fs::symlink_metadata(f.root().join("run/pipe")).is_err());
    assert!(f.root().join("ok").exists());
}

#[test]
fn parent_dir_component_is_refused() {
    let f = Fixture::new();
    let e = f
        .apply(&[E::File("../../x", b"pwned")])
        .expect_err("refused");
    assert!(matches!(e, ExtractError::ParentDir(_)), "{e}");
    assert!(e.is_unsafe());
    let e = f
        .apply(&[E::File("a/../../x", b"pwned")])
        .expect_err("refused");
    assert!(matches!(e, ExtractError::ParentDir(_)), "{e}");
    assert!(f.outside_entries().is_empty(), "{:?}", f.outside_entries());
    assert!(!f.outside().parent().expect("parent").join("x").exists());
}

#[test]
fn absolute_path_is_refused() {
    let f = Fixture::new();
    let target = f.outside().join("abs-x");
    let name = target.to_str().expect("utf8").to_string();
    let e = f.apply(&[E::File(&name, b"pwned")]).expect_err("refused");
    assert!(matches!(e, ExtractError::AbsolutePath(_)), "{e}");
    assert!(!target.exists());
    assert!(f.outside_entries().is_empty());
}

#[test]
fn absolute_symlink_escape_is_refused() {
    let f = Fixture::new();
    let out = f.outside().to_str().expect("utf8").to_string();
    let e = f
        .apply(&[E::Sym("esc", &out), E::File("esc/pwned", b"x")])
        .expect_err("refused");
    assert!(matches!(e, ExtractError::SymlinkEscape { .. }), "{e}");
    assert!(e.to_string().contains("esc"), "{e}");
    assert_eq!(f.outside_entries(), Vec::<String>::new());
}

#[test]
fn relative_symlink_escape_and_chains_are_refused() {
    let f = Fixture::new();
    let e = f
        .apply(&[E::Sym("up", ".."), E::File("up/pwned", b"x")])
        .expect_err("refused");
    assert!(matches!(e, ExtractError::SymlinkEscape { .. }), "{e}");
    let e = f
        .apply(&[
            E::Dir("sub"),
            E::Sym("sub/a", "b"),
            E::Sym("sub/b", "../.."),
            E::File("sub/a/pwned", b"x"),
        ])
        .expect_err("refused");
    assert!(matches!(e, ExtractError::SymlinkEscape { .. }), "{e}");
    assert!(f.outside_entries().is_empty(), "{:?}", f.outside_entries());
}

#[test]
fn symlink_loop_is_refused() {
    let f = Fixture::new();
    let e = f
        .apply(&[
            E::Sym("l1", "l2"),
            E::Sym("l2", "l1"),
            E::File("l1/x", b"x"),
        ])
        .expect_err("refused");
    assert!(matches!(e, ExtractError::SymlinkLoop(_)), "{e}");
}

#[test]
fn in_root_symlink_parents_are_followed() {
    let f = Fixture::new();
    f.apply(&[
        E::Dir("usr/lib"),
        E::Sym("lib", "usr/lib"),
        E::Dir("x"),
        E::Sym("x/up", "../usr"),
        E::File("lib/a.so", b"so"),
        E::File("x/up/b", b"b"),
    ])
    .expect("apply");
    assert_eq!(
        fs::read(f.root().join("usr/lib/a.so")).expect("read"),
        b"so"
    );
    assert_eq!(fs::read(f.root().join("usr/b")).expect("read"), b"b");
    assert!(fs::symlink_metadata(f.root().join("lib"))
        .expect("lstat")
        .file_type()
        .is_symlink());
}

#[test]
fn hardlink_escapes_are_refused() {
    let f = Fixture::new();
    fs::write(f.outside().join("secret"), b"s").expect("write");
    let e = f.apply(&[E::Hard("h", "../secret")]).expect_err("refused");
    assert!(matches!(e, ExtractError::HardlinkEscape { .. }), "{e}");
    let abs = f.outside().join("secret");
    let e = f
        .apply(&[E::Hard("h", abs.to_str().expect("utf8"))])
        .expect_err("refused");
    assert!(matches!(e, ExtractError::HardlinkEscape { .. }), "{e}");
    let out = f.outside().to_str().expect("utf8").to_string();
    let e = f
        .apply(&[E::Sym("s", &out), E::Hard("h", "s/secret")])
        .expect_err("refused");
    assert!(matches!(e, ExtractError::HardlinkEscape { .. }), "{e}");
    assert!(
        fs::symlink_metadata(f.root().join("h")).is_err(),
        "no link made"
    );
    assert_eq!(
        fs::metadata(f.outside().join("secret"))
            .expect("stat")
            .nlink(),
        1
    );
}

#[test]
fn hardlink_to_missing_target_is_an_error() {
    let f = Fixture::new();
    let e = f.apply(&[E::Hard("h", "nope")]).expect_err("refused");
    assert!(matches!(e, ExtractError::HardlinkTarget { .. }), "{e}");
    assert!(e.is_corrupt());
}

#[test]
fn entries_replace_symlinks_without_following_them() {
    let f = Fixture::new();
    let target = f.outside().join("target");
    let t = target.to_str().expect("utf8").to_string();
    f.apply(&[E::Sym("t", &t), E::File("t", b"inside")])
        .expect("apply");
    assert!(!target.exists(), "the file did not go through the symlink");
    let m = fs::symlink_metadata(f.root().join("t")).expect("lstat");
    assert!(m.is_file());
    // A directory replaces a file, a file replaces a directory.
    f.apply(&[E::File("x", b"1")]).expect("file");
    f.apply(&[E::Dir("x"), E::File("x/y", b"2")])
        .expect("dir over file");
    f.apply(&[E::File("x", b"3")]).expect("file over dir");
    assert_eq!(fs::read(f.root().join("x")).expect("read"), b"3");
}

#[test]
fn bad_whiteout_names_are_refused() {
    let f = Fixture::new();
    let e = f.apply(&[E::File("a/.wh.", b"")]).expect_err("refused");
    assert!(e.is_unsafe(), "{e}");
}

#[test]
fn truncated_layer_is_corrupt() {
    let f = Fixture::new();
    let mut bytes = layer(&[E::File("big", &[7u8; 5000])]);
    bytes.truncate(1024);
    let e = apply_layer(&f.root(), bytes.as_slice(), &ExtractOptions::default())
        .expect_err("truncated");
    assert!(e.is_corrupt(), "{e}");
}

#[test]
fn size_limit_is_enforced() {
    let f = Fixture::new();
    let opts = ExtractOptions {
        max_bytes: 100,
        ..ExtractOptions::default()
    };
    let e = apply_layer(
        &f.root(),
        layer(&[E::File("big", &[1u8; 101])]).as_slice(),
        &opts,
    )
    .expect_err("too big");
    assert!(matches!(e, ExtractError::TooLarge(100)), "{e}");
}
