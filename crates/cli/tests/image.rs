//! `kiln image ...` and `kiln doctor`'s image list, run as the built `kiln` binary with
//! `KILN_ASSETS_DIR` pointing at a temporary directory (tier 1: no KVM, no network; the OCI
//! layout is made by `umoci`, as crates/image/tests do). `kiln image build` is not run here
//! (it downloads Debian packages); its argument parsing is unit-tested in src/image.rs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use kiln_image::tools::{self, Tool};
use serde_json::Value;

const UMOCI: Tool = Tool {
    binary: "umoci",
    package: "umoci",
};

/// Fails (never skips) naming the missing Debian packages.
fn require_tools() {
    let missing = tools::missing(&[UMOCI, tools::MKFS_EXT4, tools::RESIZE2FS]);
    assert!(
        missing.is_empty(),
        "these tests need the Debian packages {:?} (the xtask test flow installs them)",
        missing.iter().map(|t| t.package).collect::<Vec<_>>()
    );
}

/// A temporary assets directory; the store is `<dir>/images`.
struct Assets {
    dir: tempfile::TempDir,
}

impl Assets {
    fn new() -> Self {
        Assets {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn store(&self) -> PathBuf {
        self.dir.path().join("images")
    }

    fn kiln(&self, args: &[&str]) -> Output {
        self.kiln_env(args, &[])
    }

    fn kiln_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.args(args)
            .env("KILN_ASSETS_DIR", self.dir.path())
            .env_remove("KILN_REGISTRY_USERNAME")
            .env_remove("KILN_REGISTRY_PASSWORD")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().expect("running kiln")
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the exit code, showing both streams when it differs.
fn expect_code(o: &Output, code: i32, what: &str) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "{what}: stdout:\n{}\nstderr:\n{}",
        stdout(o),
        stderr(o)
    );
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", stdout(o), stderr(o)))
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An OCI layout made by umoci (one image, tag `base`): `/etc/hello` in one layer, and a
/// config with Env and Cmd.
fn umoci_layout(dir: &Path) -> PathBuf {
    let layout = dir.join("layout");
    let bundle = dir.join("bundle");
    let l = layout.to_str().unwrap();
    let image = format!("{l}:base");
    run(Command::new("umoci").args(["init", "--layout", l]));
    run(Command::new("umoci").args(["new", "--image", &image]));
    run(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle));
    let etc = bundle.join("rootfs/etc");
    fs::create_dir_all(&etc).unwrap();
    fs::write(etc.join("hello"), "hello from the cli test\n").unwrap();
    run(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle));
    run(Command::new("umoci").args([
        "config",
        "--image",
        &image,
        "--config.env=GREETING=hello",
        "--config.cmd=/bin/sh",
    ]));
    layout
}

#[test]
fn ls_of_an_empty_store() {
    let a = Assets::new();
    let o = a.kiln(&["image", "ls"]);
    expect_code(&o, 0, "ls");
    assert_eq!(
        stdout(&o).trim(),
        format!("no images in {}", a.store().display())
    );
    let o = a.kiln(&["image", "ls", "--json"]);
    expect_code(&o, 0, "ls --json");
    let v = json(&o);
    assert_eq!(v["images"], Value::Array(vec![]));
    assert_eq!(v["store"], a.store().to_str().unwrap());
}

#[test]
fn import_ls_verify_doctor_rm() {
    require_tools();
    let a = Assets::new();
    let work = tempfile::tempdir().unwrap();
    let layout = umoci_layout(work.path());

    let o = a.kiln(&[
        "image",
        "import",
        layout.to_str().unwrap(),
        "--name",
        "hello",
        "--json",
    ]);
    expect_code(&o, 0, "import");
    let v = json(&o);
    assert_eq!(v["name"], "hello");
    assert_eq!(v["format"], "ext4");
    assert_eq!(v["cached"], false);
    let key = v["key"].as_str().unwrap().to_string();
    assert!(key.starts_with("oci-") && key.ends_with("-ext4"), "{key}");
    let path = PathBuf::from(v["path"].as_str().unwrap());
    assert!(path.starts_with(a.store()), "{}", path.display());
    let size = fs::metadata(&path).unwrap().len();
    assert_eq!(v["size"], size);
    assert_eq!(v["meta"]["exec"]["env"][0], "GREETING=hello");
    assert_eq!(v["meta"]["source"]["kind"], "import");

    // The same layout again, under its default name (the directory's), is already stored.
    let o = a.kiln(&["image", "import", layout.to_str().unwrap()]);
    expect_code(&o, 0, "second import");
    assert!(
        stdout(&o).starts_with(&format!("layout: {key} (ext4, ")),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("already stored"), "{}", stdout(&o));

    let o = a.kiln(&["image", "ls", "--json"]);
    expect_code(&o, 0, "ls --json");
    let v = json(&o);
    let images = v["images"].as_array().unwrap();
    let names: Vec<&str> = images.iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["hello", "layout"]);
    for i in images {
        assert_eq!(i["key"], key.as_str());
        assert_eq!(i["format"], "ext4");
        assert_eq!(i["size"], size);
        assert_eq!(i["problem"], Value::Null);
    }
    let o = a.kiln(&["image", "ls"]);
    expect_code(&o, 0, "ls");
    let text = stdout(&o);
    assert!(text.starts_with("NAME "), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("hello ") && l.contains("ext4") && l.ends_with(&key)),
        "{text}"
    );

    let o = a.kiln(&["image", "verify", "hello"]);
    expect_code(&o, 0, "verify");
    assert!(
        stdout(&o).starts_with(&format!("hello: ok ({key}, ext4")),
        "{}",
        stdout(&o)
    );

    // kiln doctor lists both names (its exit status is about KVM and guest assets).
    let o = a.kiln(&["doctor", "--json"]);
    let v = json(&o);
    let listed: Vec<(&str, &str)> = v["images"]["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["name"].as_str().unwrap(), i["format"].as_str().unwrap()))
        .collect();
    assert_eq!(listed, [("hello", "ext4"), ("layout", "ext4")]);
    assert_eq!(v["images"]["dir"], a.store().to_str().unwrap());
    let o = a.kiln(&["doctor"]);
    let text = stdout(&o);
    assert!(
        text.contains(&format!("  images:     {} [2]", a.store().display())),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("hello") && l.contains("ext4")),
        "{text}"
    );

    // A changed byte in the image file: verify fails with the corrupt-image code.
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&path, &bytes).unwrap();
    let o = a.kiln(&["image", "verify", "hello"]);
    expect_code(&o, 11, "verify of a changed file");
    assert!(
        stderr(&o).starts_with("kiln image: image `hello` is corrupt: sha256"),
        "{}",
        stderr(&o)
    );

    // rm: one name keeps the image for the other; the last one removes the file.
    let o = a.kiln(&["image", "rm", "hello"]);
    expect_code(&o, 0, "rm hello");
    assert_eq!(stdout(&o).trim(), "removed hello");
    assert!(path.exists(), "still named `layout`");
    let o = a.kiln(&["image", "rm", "layout"]);
    expect_code(&o, 0, "rm layout");
    assert!(
        !path.exists(),
        "{} removed with its last name",
        path.display()
    );
    let o = a.kiln(&["image", "ls", "--json"]);
    assert_eq!(json(&o)["images"], Value::Array(vec![]));
    let o = a.kiln(&["image", "verify", "hello"]);
    expect_code(&o, 10, "verify of a removed image");
}

#[test]
fn rm_of_an_unknown_name_exits_10_naming_it() {
    let a = Assets::new();
    let o = a.kiln(&["image", "rm", "no-such-image"]);
    expect_code(&o, 10, "rm unknown");
    assert_eq!(
        stderr(&o).trim(),
        "kiln image: unknown image `no-such-image` (see `kiln image ls`)"
    );
    assert!(stdout(&o).is_empty());
}

#[test]
fn import_of_a_missing_path_is_a_clear_io_error() {
    let a = Assets::new();
    let missing = a.dir.path().join("no/such/layout");
    let o = a.kiln(&["image", "import", missing.to_str().unwrap()]);
    expect_code(&o, 1, "import missing");
    assert_eq!(
        stderr(&o).trim(),
        format!(
            "kiln image: opening import source: {}: No such file or directory (os error 2)",
            missing.display()
        )
    );
    let o = a.kiln(&["image", "import", missing.to_str().unwrap(), "--json"]);
    expect_code(&o, 1, "import missing --json");
    let v = json(&o);
    assert_eq!(v["error"]["status"], 1);
    assert_eq!(v["error"]["kind"], "Io");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no/such/layout"));
}

#[test]
fn imports_of_what_is_no_image_are_refused() {
    let a = Assets::new();
    let dir = tempfile::tempdir().unwrap();
    // A directory without `oci-layout`: invalid input (2).
    let o = a.kiln(&[
        "image",
        "import",
        dir.path().to_str().unwrap(),
        "--name",
        "x",
    ]);
    expect_code(&o, 2, "not a layout");
    assert!(
        stderr(&o).contains(&format!(
            "{} has no `oci-layout` file",
            dir.path().display()
        )),
        "{}",
        stderr(&o)
    );
    // A file that is no tar: a corrupt docker archive (11).
    let junk = dir.path().join("junk.tar");
    fs::write(&junk, "junk\n").unwrap();
    let o = a.kiln(&["image", "import", junk.to_str().unwrap()]);
    expect_code(&o, 11, "not a tar");
    assert!(
        stderr(&o).contains(&format!("docker archive {} is corrupt", junk.display())),
        "{}",
        stderr(&o)
    );
    let o = a.kiln(&["image", "ls", "--json"]);
    assert_eq!(json(&o)["images"], Value::Array(vec![]));
}

#[test]
fn pull_credentials_and_unreachable_registry() {
    let a = Assets::new();
    // Only half of the credentials in the environment: a usage error before any connection.
    let o = a.kiln_env(
        &["image", "pull", "127.0.0.1:9/x:y"],
        &[("KILN_REGISTRY_USERNAME", "u")],
    );
    expect_code(&o, 2, "half credentials");
    assert!(
        stderr(&o).contains("KILN_REGISTRY_PASSWORD"),
        "{}",
        stderr(&o)
    );
    // --password-stdin with nothing on stdin.
    let o = a.kiln(&[
        "image",
        "pull",
        "127.0.0.1:9/x:y",
        "--username",
        "u",
        "--password-stdin",
    ]);
    expect_code(&o, 2, "empty password");
    // A loopback port nobody listens on: registry unreachable, naming it.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let reference = format!("127.0.0.1:{port}/x:y");
    let o = a.kiln(&["image", "pull", &reference, "--json"]);
    expect_code(&o, 12, "closed port");
    let v = json(&o);
    assert_eq!(v["error"]["kind"], "RegistryUnreachable");
    assert!(
        stderr(&o).contains(&format!("127.0.0.1:{port}")),
        "{}",
        stderr(&o)
    );
}

#[test]
fn image_help_documents_the_exit_codes() {
    let a = Assets::new();
    let o = a.kiln(&["image", "--help"]);
    expect_code(&o, 0, "help");
    let help = stdout(&o);
    for line in [
        "  10  unknown image",
        "  12  registry unreachable",
        "  19  apt, mmdebstrap",
    ] {
        assert!(help.contains(line), "{line:?} missing:\n{help}");
    }
    let o = a.kiln(&["image", "build", "--format", "zfs"]);
    expect_code(&o, 2, "bad format");
}
