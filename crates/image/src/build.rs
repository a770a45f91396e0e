//! `kiln image build`: a root filesystem from Debian packages (mmdebstrap), keyed by the
//! recipe and the package versions apt resolves for it, so an unchanged recipe against an
//! unchanged archive returns the stored image without building.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};

use crate::meta::{ImageFormat, ImageSource};
use crate::progress::Event;
use crate::recipe::Recipe;
use crate::store::{hex, Image, ImageStore, Made};
use crate::tools;
use crate::{ImageError, Result};

/// Version of the build procedure; part of every build key.
const BUILD_VERSION: &str = "kiln-image-build-1";

/// Options of [`ImageStore::build`].
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub format: ImageFormat,
    /// Store under this name instead of the recipe's.
    pub name: Option<String>,
    /// Reuse the package index fetched less than this long ago instead of `apt-get update`.
    pub index_max_age: Duration,
    /// Upper bound of the mmdebstrap run.
    pub timeout: Duration,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            format: ImageFormat::default(),
            name: None,
            index_max_age: Duration::from_secs(3600),
            timeout: Duration::from_secs(45 * 60),
        }
    }
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn failed(step: &str, reason: impl Into<String>) -> ImageError {
    ImageError::BuildFailed {
        step: step.to_string(),
        reason: reason.into(),
    }
}

/// A private apt configuration (sources, lists, empty dpkg status) under `<store>/apt/`.
struct PrivateApt {
    dir: PathBuf,
}

impl PrivateApt {
    fn new(store: &Path, recipe: &Recipe) -> Result<Self> {
        let id = hex(&Sha256::digest(recipe.sources.join("\n").as_bytes()));
        let dir = store.join("apt").join(&id[..16]);
        for sub in [
            "lists/partial",
            "cache/archives/partial",
            "etc/sources.list.d",
            "etc/preferences.d",
        ] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(|e| ImageError::io("creating apt directory", &p, e))?;
        }
        let mut list = recipe.sources.join("\n");
        list.push('\n');
        crate::store::write_atomic(&dir.join("etc/sources.list"), list.as_bytes())?;
        let status = dir.join("status");
        if !status.exists() {
            File::create(&status).map_err(|e| ImageError::io("creating", &status, e))?;
        }
        Ok(PrivateApt { dir })
    }

    fn command(&self) -> Command {
        let d = &self.dir;
        let mut c = Command::new("apt-get");
        c.arg("-q")
            .arg(format!("-oDir::Etc={}", d.join("etc").display()))
            .arg(format!(
                "-oDir::Etc::SourceList={}",
                d.join("etc/sources.list").display()
            ))
            .arg("-oDir::Etc::TrustedParts=/usr/share/keyrings")
            .arg(format!("-oDir::State={}", d.display()))
            .arg(format!("-oDir::State::Lists={}", d.join("lists").display()))
            .arg(format!(
                "-oDir::State::status={}",
                d.join("status").display()
            ))
            .arg(format!("-oDir::Cache={}", d.join("cache").display()))
            // Keep the binary cache (Debian's container images turn it off).
            .args([
                "-oDir::Cache::pkgcache=pkgcache.bin",
                "-oDir::Cache::srcpkgcache=srcpkgcache.bin",
            ])
            .args(["-oAPT::Architecture=amd64", "-oAPT::Architectures=amd64"])
            .args(["-oDebug::NoLocking=1", "-oAPT::Sandbox::User=root"])
            .env("LC_ALL", "C.UTF-8")
            .stdin(Stdio::null());
        c
    }

    fn update(&self, max_age: Duration) -> Result<()> {
        let stamp = self.dir.join("updated");
        let fresh = fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age < max_age);
        if fresh {
            return Ok(());
        }
        let out = self
            .command()
            .arg("update")
            .output()
            .map_err(|e| failed("apt-get update", e.to_string()))?;
        let err = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() || err.contains("W: Failed to fetch") || err.contains("E: ") {
            return Err(failed("apt-get update", last_lines(&err, 6)));
        }
        File::create(&stamp).map_err(|e| ImageError::io("writing", &stamp, e))?;
        Ok(())
    }

    /// `name=version` of every package `apt-get install` would bring in, sorted. The answer
    /// is kept in `resolved/<hash>` until the next `apt-get update`.
    fn resolve(&self, packages: &[String]) -> Result<Vec<String>> {
        let id = hex(&Sha256::digest(packages.join("\n").as_bytes()));
        let memo = self.dir.join("resolved").join(&id[..32]);
        let mtime = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
        if let (Some(m), Some(u)) = (mtime(&memo), mtime(&self.dir.join("updated"))) {
            if m >= u {
                if let Ok(text) = fs::read_to_string(&memo) {
                    let v: Vec<String> = text.lines().map(str::to_string).collect();
                    if !v.is_empty() {
                        return Ok(v);
                    }
                }
            }
        }
        let v = self.simulate(packages)?;
        let dir = self.dir.join("resolved");
        fs::create_dir_all(&dir).map_err(|e| ImageError::io("creating", &dir, e))?;
        crate::store::write_atomic(&memo, v.join("\n").as_bytes())?;
        Ok(v)
    }

    fn simulate(&self, packages: &[String]) -> Result<Vec<String>> {
        let out = self
            .command()
            .args(["-s", "install", "--no-install-recommends"])
            .args(packages)
            .output()
            .map_err(|e| failed("resolving packages", e.to_string()))?;
        if !out.status.success() {
            return Err(failed(
                "resolving packages",
                last_lines(&String::from_utf8_lossy(&out.stderr), 6),
            ));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let mut v: Vec<String> = text
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix("Inst ")?;
                let (name, rest) = rest.split_once(' ')?;
                let ver = rest.strip_prefix('(')?.split(' ').next()?;
                Some(format!("{name}={ver}"))
            })
            .collect();
        v.sort();
        Ok(v)
    }
}

fn last_lines(s: &str, n: usize) -> String {
    let v: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    v[v.len().saturating_sub(n)..].join(" | ")
}

/// The content key of a build.
pub fn build_key(
    recipe: &Recipe,
    format: ImageFormat,
    versions: &[String],
) -> Result<(String, String)> {
    let canon =
        serde_json::to_vec(recipe).map_err(|e| ImageError::invalid("recipe", e.to_string()))?;
    let recipe_sha = hex(&Sha256::digest(&canon));
    let mut h = Sha256::new();
    h.update(BUILD_VERSION.as_bytes());
    h.update(b"\n");
    h.update(format.as_str().as_bytes());
    h.update(b"\n");
    h.update(&canon);
    for v in versions {
        h.update(b"\n");
        h.update(v.as_bytes());
    }
    Ok((
        format!("build-{}-{}", &hex(&h.finalize())[..32], format.as_str()),
        recipe_sha,
    ))
}

/// `name=version` of every installed package in a root's dpkg status.
fn installed_packages(root: &Path) -> Vec<String> {
    let Ok(text) = fs::read_to_string(root.join("var/lib/dpkg/status")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for para in text.split("\n\n") {
        let (mut name, mut ver, mut ok) = (None, None, false);
        for l in para.lines() {
            if let Some(v) = l.strip_prefix("Package: ") {
                name = Some(v);
            } else if let Some(v) = l.strip_prefix("Version: ") {
                ver = Some(v);
            } else if l == "Status: install ok installed" {
                ok = true;
            }
        }
        if let (Some(n), Some(v), true) = (name, ver, ok) {
            out.push(format!("{n}={v}"));
        }
    }
    out.sort();
    out
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl ImageStore {
    /// Builds `recipe` (or returns the stored image when its key is already there).
    pub fn build(
        &self,
        recipe: &Recipe,
        opts: &BuildOptions,
        progress: &mut dyn FnMut(Event<'_>),
    ) -> Result<Image> {
        let started = Instant::now();
        let name = opts.name.clone().unwrap_or_else(|| recipe.name.clone());
        crate::store::validate_name(&name)?;
        tools::require(&[tools::APT_GET, tools::MMDEBSTRAP])?;
        progress(Event::Step("resolving package versions"));
        let apt = PrivateApt::new(self.dir(), recipe)?;
        apt.update(opts.index_max_age)?;
        let versions = apt.resolve(&recipe.packages)?;
        let (key, recipe_sha) = build_key(recipe, opts.format, &versions)?;
        if let Some(img) = self.reuse(&name, &key, progress) {
            return img;
        }

        let staging = self.staging()?;
        let root = staging.rootfs();
        progress(Event::Step(&format!(
            "mmdebstrap {} ({} packages)",
            recipe.suite,
            versions.len()
        )));
        let mut cmd = Command::new("mmdebstrap");
        let mode = if nix::unistd::geteuid().is_root() {
            "root"
        } else {
            "unshare"
        };
        cmd.arg(format!("--mode={mode}"))
            .arg(format!("--variant={}", recipe.variant))
            .arg("--architectures=amd64")
            .arg("--format=directory")
            .arg(format!("--include={}", recipe.packages.join(",")))
            .arg("--aptopt=APT::Install-Recommends \"false\"")
            .arg("--aptopt=APT::Install-Suggests \"false\"");
        for g in &recipe.path_exclude {
            cmd.arg(format!("--dpkgopt=path-exclude={g}"));
        }
        for g in &recipe.path_include {
            cmd.arg(format!("--dpkgopt=path-include={g}"));
        }
        if let Some(u) = &recipe.user {
            cmd.arg(format!(
                "--customize-hook=chroot \"$1\" useradd -m -d {} -u {} -U -s {} {}",
                u.home, u.uid, u.shell, u.name
            ));
        }
        for c in &recipe.customize {
            cmd.arg(format!(
                "--customize-hook=chroot \"$1\" sh -c {}",
                sh_quote(c)
            ));
        }
        // The package lists and caches are not needed in a read-only image.
        cmd.arg("--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/* \"$1\"/var/log/apt/*");
        cmd.arg(&recipe.suite).arg(&root);
        for s in &recipe.sources {
            cmd.arg(s);
        }
        self.run_logged(
            cmd,
            &staging.path().join("build.log"),
            opts.timeout,
            progress,
        )?;
        let packages = installed_packages(&root);
        if packages.is_empty() {
            return Err(failed(
                "mmdebstrap",
                "the new root has no installed packages",
            ));
        }
        progress(Event::Step(&format!("mkfs.{}", opts.format.as_str())));
        let content = crate::format::tree_size(&root)?;
        let made = Made {
            key,
            format: opts.format,
            source: ImageSource::Build {
                recipe: recipe.name.clone(),
                recipe_sha256: format!("sha256:{recipe_sha}"),
                suite: recipe.suite.clone(),
                packages,
            },
            exec: recipe.exec.clone(),
            content_bytes: content.bytes,
            started,
        };
        self.store_made(staging, &name, made, progress)
    }

    /// Runs `cmd` with its output in `log`, passing `I:`/`E:` lines to `progress`; kills it
    /// after `timeout`.
    fn run_logged(
        &self,
        mut cmd: Command,
        log: &Path,
        timeout: Duration,
        progress: &mut dyn FnMut(Event<'_>),
    ) -> Result<()> {
        let mut logf =
            File::create(log).map_err(|e| ImageError::io("creating build log", log, e))?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| failed("mmdebstrap", format!("could not start: {e}")))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| failed("mmdebstrap", "no stderr pipe"))?;
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + timeout;
        let mut tail: Vec<String> = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => {
                    let _ = writeln!(logf, "{line}");
                    if line.starts_with("I: ") || line.starts_with("E: ") || line.starts_with("W: ")
                    {
                        progress(Event::Log(&line));
                    }
                    tail.push(line);
                    if tail.len() > 12 {
                        tail.remove(0);
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(failed(
                    "mmdebstrap",
                    format!("timed out after {} s", timeout.as_secs()),
                ));
            }
        }
        let _ = reader.join();
        let status = child
            .wait()
            .map_err(|e| failed("mmdebstrap", e.to_string()))?;
        if !status.success() {
            return Err(failed(
                "mmdebstrap",
                format!("{status}: {}", tail.join(" | ")),
            ));
        }
        Ok(())
    }
}
