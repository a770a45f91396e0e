//! Test support: tool checks, a real `docker-registry` on 127.0.0.1, OCI layouts made with
//! umoci plus crafted layers, skopeo pushes, and reading files back out of an image.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_image::tools;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Fails (never skips) naming every missing Debian package.
pub fn require_tools() {
    let missing = tools::missing(tools::TEST_TOOLS);
    if !missing.is_empty() {
        let pkgs: Vec<String> = missing
            .iter()
            .map(|t| format!("{} (for `{}`)", t.package, t.binary))
            .collect();
        panic!(
            "kiln-image tests need these Debian packages, not installed: {}; \
             the xtask test flow installs them (ensure_packages)",
            pkgs.join(", ")
        );
    }
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `docker-registry` process on 127.0.0.1 with its own config and storage; killed on drop.
pub struct Registry {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub creds: Option<(String, String)>,
    child: Child,
}

impl Registry {
    pub fn start(creds: Option<(&str, &str)>) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let data = dir.path().join("data");
        fs::create_dir(&data).unwrap();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
             delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            data.display()
        );
        if let Some((u, p)) = creds {
            let hp = dir.path().join("htpasswd");
            let line = run(Command::new("htpasswd").args(["-Bbn", u, p]));
            fs::write(&hp, line).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
                hp.display()
            ));
        }
        let cfg = dir.path().join("config.yml");
        fs::write(&cfg, config).unwrap();
        let log = fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let reg = Registry {
            dir,
            port,
            creds: creds.map(|(u, p)| (u.into(), p.into())),
            child,
        };
        reg.wait_ready();
        reg
    }

    fn wait_ready(&self) {
        // Generous: under the harness's emulated L1 (tier 4) the Go binary starts slowly.
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
                let mut buf = [0u8; 64];
                if let Ok(n) = s.read(&mut buf) {
                    if buf[..n].starts_with(b"HTTP/1.") {
                        return;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let log = fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default();
        panic!(
            "docker-registry did not answer on 127.0.0.1:{} within 120 s; log:\n{log}",
            self.port
        );
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `skopeo copy oci:LAYOUT:TAG docker://127.0.0.1:PORT/REPO:TAG`.
    pub fn push(&self, layout: &Path, tag: &str, repo: &str) -> String {
        let dest = format!("docker://{}/{repo}:{tag}", self.host());
        let mut c = Command::new("skopeo");
        c.args([
            "--insecure-policy",
            "copy",
            "--dest-tls-verify=false",
            "--quiet",
        ]);
        if let Some((u, p)) = &self.creds {
            c.arg(format!("--dest-creds={u}:{p}"));
        }
        c.arg(format!("oci:{}:{tag}", layout.display())).arg(&dest);
        run(&mut c);
        format!("{}/{repo}:{tag}", self.host())
    }

    /// The registry's stored file of blob `digest`.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn sha256(b: &[u8]) -> String {
    format!(
        "sha256:{}",
        Sha256::digest(b)
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
    )
}

/// An OCI layout made by umoci: tag `base` has two layers (files, then deletions that
/// umoci writes as whiteouts) and a config with Env/WorkingDir/User/Entrypoint/Cmd.
pub fn umoci_layout(dir: &Path) -> PathBuf {
    let layout = dir.join("layout");
    let bundle = dir.join("bundle");
    let l = layout.to_str().unwrap();
    run(Command::new("umoci").args(["init", "--layout", l]));
    run(Command::new("umoci").args(["new", "--image", &format!("{l}:base")]));
    run(Command::new("umoci")
        .args(["unpack", "--image", &format!("{l}:base")])
        .arg(&bundle));
    let rootfs = bundle.join("rootfs");
    fs::create_dir_all(rootfs.join("etc")).unwrap();
    fs::write(rootfs.join("etc/hello"), "hello from layer 1\n").unwrap();
    fs::write(rootfs.join("gone.txt"), "deleted in layer 2\n").unwrap();
    fs::create_dir_all(rootfs.join("data/old")).unwrap();
    fs::write(rootfs.join("data/old/file"), "old\n").unwrap();
    fs::hard_link(rootfs.join("etc/hello"), rootfs.join("etc/hello.hard")).unwrap();
    std::os::unix::fs::symlink("hello", rootfs.join("etc/hello.link")).unwrap();
    run(Command::new("umoci")
        .args([
            "repack",
            "--refresh-bundle",
            "--image",
            &format!("{l}:base"),
        ])
        .arg(&bundle));
    fs::remove_file(rootfs.join("gone.txt")).unwrap();
    fs::remove_dir_all(rootfs.join("data")).unwrap();
    fs::create_dir_all(rootfs.join("data")).unwrap();
    fs::write(rootfs.join("data/new"), "new in layer 2\n").unwrap();
    run(Command::new("umoci")
        .args(["repack", "--image", &format!("{l}:base")])
        .arg(&bundle));
    run(Command::new("umoci").args([
        "config",
        "--image",
        &format!("{l}:base"),
        "--config.env=GREETING=hello",
        "--config.workingdir=/data",
        "--config.user=1000:1000",
        "--config.entrypoint=/bin/sh",
        "--config.cmd=-c",
        "--config.cmd=echo hi",
    ]));
    layout
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&fs::read(p).unwrap()).unwrap()
}

fn write_blob(layout: &Path, bytes: &[u8]) -> (String, u64) {
    let d = sha256(bytes);
    fs::write(layout.join("blobs/sha256").join(&d[7..]), bytes).unwrap();
    (d, bytes.len() as u64)
}

/// Adds tag `new_tag` to the layout: `from_tag`'s image plus `layers` (uncompressed tars,
/// stored gzipped), with `edit` applied to the config.
pub fn derive_tag(
    layout: &Path,
    from_tag: &str,
    new_tag: &str,
    layers: &[Vec<u8>],
    edit: impl FnOnce(&mut Value),
) {
    derive_tag_compressed(layout, from_tag, new_tag, layers, false, edit)
}

/// [`derive_tag`] with the new layers stored zstd-compressed when `zstd`.
pub fn derive_tag_compressed(
    layout: &Path,
    from_tag: &str,
    new_tag: &str,
    layers: &[Vec<u8>],
    zstd: bool,
    edit: impl FnOnce(&mut Value),
) {
    let idx_path = layout.join("index.json");
    let mut index = read_json(&idx_path);
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == from_tag)
        .unwrap()
        .clone();
    let mdigest = entry["digest"].as_str().unwrap().to_string();
    let mut manifest = read_json(&layout.join("blobs/sha256").join(&mdigest[7..]));
    let cdigest = manifest["config"]["digest"].as_str().unwrap().to_string();
    let mut config = read_json(&layout.join("blobs/sha256").join(&cdigest[7..]));
    for tar_bytes in layers {
        let (blob, media_type) = if zstd {
            let z = ruzstd::encoding::compress_to_vec(
                tar_bytes.as_slice(),
                ruzstd::encoding::CompressionLevel::Fastest,
            );
            (z, "application/vnd.oci.image.layer.v1.tar+zstd")
        } else {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(tar_bytes).unwrap();
            (
                gz.finish().unwrap(),
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )
        };
        let (d, size) = write_blob(layout, &blob);
        manifest["layers"].as_array_mut().unwrap().push(json!({
            "mediaType": media_type,
            "digest": d,
            "size": size,
        }));
        config["rootfs"]["diff_ids"]
            .as_array_mut()
            .unwrap()
            .push(json!(sha256(tar_bytes)));
    }
    edit(&mut config);
    let (cd, cs) = write_blob(layout, &serde_json::to_vec(&config).unwrap());
    manifest["config"]["digest"] = json!(cd);
    manifest["config"]["size"] = json!(cs);
    let (md, ms) = write_blob(layout, &serde_json::to_vec(&manifest).unwrap());
    let mut new_entry = entry;
    new_entry["digest"] = json!(md);
    new_entry["size"] = json!(ms);
    new_entry["annotations"]["org.opencontainers.image.ref.name"] = json!(new_tag);
    index["manifests"].as_array_mut().unwrap().push(new_entry);
    fs::write(&idx_path, serde_json::to_vec(&index).unwrap()).unwrap();
}

/// Digests of the layers of `tag` in a layout.
pub fn layer_digests(layout: &Path, tag: &str) -> Vec<String> {
    let index = read_json(&layout.join("index.json"));
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap()
        .clone();
    let mdigest = entry["digest"].as_str().unwrap();
    let manifest = read_json(&layout.join("blobs/sha256").join(&mdigest[7..]));
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

/// A tar layer with raw header names (hostile names included).
pub enum Entry<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8]),
    Sym(&'a str, &'a str),
}

pub fn tar_layer(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let (name, kind, data, link, mode): (&str, tar::EntryType, &[u8], Option<&str>, u32) =
            match e {
                Entry::Dir(n) => (n, tar::EntryType::Directory, b"", None, 0o755),
                Entry::File(n, d) => (n, tar::EntryType::Regular, d, None, 0o644),
                Entry::Sym(n, t) => (n, tar::EntryType::Symlink, b"", Some(t), 0o777),
            };
        let mut h = tar::Header::new_gnu();
        let g = h.as_gnu_mut().unwrap();
        g.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            g.linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

/// Extracts an image file (EROFS via `fsck.erofs --extract`, ext4 via `debugfs rdump`)
/// into a new directory, checking its integrity on the way.
pub fn unpack_image(img: &kiln_image::Image) -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("root");
    match img.meta.format {
        kiln_image::ImageFormat::Erofs => {
            run(Command::new("fsck.erofs")
                .arg(format!("--extract={}", dest.display()))
                .arg(&img.path));
        }
        kiln_image::ImageFormat::Ext4 => {
            run(Command::new("e2fsck").args(["-fn"]).arg(&img.path));
            fs::create_dir(&dest).unwrap();
            run(Command::new("debugfs")
                .arg("-R")
                .arg(format!("rdump / {}", dest.display()))
                .arg(&img.path));
        }
    }
    out
}

pub fn silent() -> impl FnMut(kiln_image::Event<'_>) {
    |_| {}
}

/// Adds tag `new_tag` for an image index over existing tags, each with its platform
/// architecture (os linux).
pub fn index_tag(layout: &Path, new_tag: &str, members: &[(&str, &str)]) {
    let idx_path = layout.join("index.json");
    let mut index = read_json(&idx_path);
    let entries = index["manifests"].as_array().unwrap().clone();
    let manifests: Vec<Value> = members
        .iter()
        .map(|(tag, arch)| {
            let e = entries
                .iter()
                .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == *tag)
                .unwrap();
            json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": e["digest"],
                "size": e["size"],
                "platform": {"architecture": arch, "os": "linux"},
            })
        })
        .collect();
    let doc = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    });
    let (d, s) = write_blob(layout, &serde_json::to_vec(&doc).unwrap());
    index["manifests"].as_array_mut().unwrap().push(json!({
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": d,
        "size": s,
        "annotations": {"org.opencontainers.image.ref.name": new_tag},
    }));
    fs::write(&idx_path, serde_json::to_vec(&index).unwrap()).unwrap();
}

impl Registry {
    /// `skopeo copy --all` (keeps a manifest list).
    pub fn push_all(&self, layout: &Path, tag: &str, repo: &str) -> String {
        let dest = format!("docker://{}/{repo}:{tag}", self.host());
        run(Command::new("skopeo")
            .args([
                "--insecure-policy",
                "copy",
                "--all",
                "--dest-tls-verify=false",
                "--quiet",
            ])
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(&dest));
        format!("{}/{repo}:{tag}", self.host())
    }
}
