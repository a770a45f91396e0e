//! `kiln image`: the image store commands (`build`, `ls`, `rm`, `pull`, `import`, `verify`)
//! over the `kiln-image` library. The store is `kiln::assets::images_dir()`
//! (`<assets>/images`). The library's progress events become an indicatif bar on stderr
//! (plain lines when stderr is not a terminal, nothing with `--json`). A failure prints
//! `kiln image: MESSAGE: CAUSE: ...` on stderr (and `{"error":{...}}` on stdout with `--json`)
//! and exits with `ImageError::kind().exit_code()`: the table in [`HELP`], docs/IMAGES.md and
//! docs/API.md.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_image::{
    Auth, BuildOptions, Event, Image, ImageError, ImageFormat, ImageMeta, ImageSource, ImageStore,
    ImportOptions, ListEntry, PullOptions, Recipe,
};
use serde::Serialize;

/// The exit-code table shown by `kiln image --help` (also in docs/IMAGES.md and docs/API.md).
pub const HELP: &str = "\
Exit status of `kiln image`:
  0   success
  1   local I/O error in the image store, or the store cannot be located
  2   invalid flags or arguments, bad reference, name, recipe or media type
  10  unknown image (see `kiln image ls`)
  11  corrupt image or input (truncated/changed image file, malformed archive or layer)
  12  registry unreachable (connection refused, DNS, TLS, timeout, other registry errors)
  13  the registry refused access (HTTP 401/403, no or wrong credentials)
  14  unknown repository, tag or manifest (or tag not in a layout)
  15  no linux/amd64 image
  16  a manifest, config or layer does not match its digest
  17  unsafe layer (`..`, absolute path, escaping symlink or hard link)
  18  a host tool is missing (the message names its Debian package)
  19  apt, mmdebstrap or mkfs failed (with the tool's last lines)

The store is <assets>/images: $KILN_ASSETS_DIR/images, else $XDG_CACHE_HOME/kiln/images,
else $HOME/.cache/kiln/images. Registry credentials: --username U --password-stdin, or
$KILN_REGISTRY_USERNAME and $KILN_REGISTRY_PASSWORD.";

/// Exit code of a local I/O failure (and of a store directory that cannot be located).
const IO: i32 = 1;
/// Exit code of invalid input (clap's usage code, `ErrorKind::InvalidInput`).
const INVALID: i32 = 2;
/// Longest password accepted on stdin.
const MAX_PASSWORD: u64 = 64 * 1024;
/// Environment variables with registry credentials.
pub const ENV_USERNAME: &str = "KILN_REGISTRY_USERNAME";
/// See [`ENV_USERNAME`].
pub const ENV_PASSWORD: &str = "KILN_REGISTRY_PASSWORD";

/// `kiln image` arguments.
#[derive(Debug, Args)]
pub struct ImageArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: ImageCommand,
}

/// The `kiln image` subcommands.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build an image from a recipe: Debian packages installed with mmdebstrap (needs root,
    /// network and mmdebstrap). A second build with nothing changed returns the stored image.
    #[command(after_help = HELP)]
    Build(BuildArgs),
    /// List the images in the store (name, format, size, source, key, problems).
    #[command(visible_alias = "list", after_help = HELP)]
    Ls(LsArgs),
    /// Remove image names; an image file goes when no other name points at it.
    #[command(visible_alias = "remove", after_help = HELP)]
    Rm(RmArgs),
    /// Pull an image (linux/amd64) from an OCI / Docker registry; every digest is checked.
    #[command(after_help = HELP)]
    Pull(PullArgs),
    /// Import an OCI image layout directory or a docker-archive tar file.
    #[command(after_help = HELP)]
    Import(ImportArgs),
    /// Check a stored image: metadata, size, superblock and the SHA-256 of the whole file.
    #[command(after_help = HELP)]
    Verify(VerifyArgs),
}

/// `--format ext4|erofs`.
#[derive(Debug, Clone, Copy, Args)]
pub struct FormatArg {
    /// Filesystem of the image file (default: ext4; erofs is smaller but needs the guest
    /// kernel's CONFIG_EROFS_FS).
    #[arg(long, value_name = "ext4|erofs", value_parser = parse_format)]
    pub format: Option<ImageFormat>,
}

/// `kiln image build` arguments.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Without --recipe: the built-in recipe to build (default `python`). With --recipe: the
    /// name to store the image under (default: the recipe's `name`).
    #[arg(value_name = "NAME")]
    pub name: Option<String>,
    /// A recipe TOML file (docs/IMAGES.md, "Recipes").
    #[arg(long, value_name = "FILE")]
    pub recipe: Option<PathBuf>,
    #[command(flatten)]
    pub format: FormatArg,
    /// Print one JSON object with the result instead of progress and a summary.
    #[arg(long)]
    pub json: bool,
}

/// `kiln image ls` arguments.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// Print `{"store", "images": [...]}` as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `kiln image rm` arguments.
#[derive(Debug, Args)]
pub struct RmArgs {
    /// The image names to remove.
    #[arg(value_name = "NAME", required = true)]
    pub names: Vec<String>,
}

/// `kiln image pull` arguments.
#[derive(Debug, Args)]
pub struct PullArgs {
    /// `host[:port]/repository:tag` or `host[:port]/repository@sha256:DIGEST`. Registries on
    /// a loopback address are reached over HTTP, others over HTTPS.
    #[arg(value_name = "REF")]
    pub reference: String,
    /// Use plain HTTP for a registry that is not on a loopback address.
    #[arg(long)]
    pub insecure: bool,
    /// Registry user name (basic auth); the password is read from stdin (--password-stdin).
    /// Without it: $KILN_REGISTRY_USERNAME and $KILN_REGISTRY_PASSWORD, else anonymous.
    #[arg(long, value_name = "USER", requires = "password_stdin")]
    pub username: Option<String>,
    /// Read the password for --username from stdin (up to the first newline).
    #[arg(long, requires = "username")]
    pub password_stdin: bool,
    /// Store the image under this name instead of REF.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    #[command(flatten)]
    pub format: FormatArg,
    /// Print one JSON object with the result instead of progress and a summary.
    #[arg(long)]
    pub json: bool,
}

/// `kiln image import` arguments.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// An OCI image layout directory (`oci-layout`, `index.json`, `blobs/`) or a
    /// docker-archive tar file (`docker save`).
    #[arg(value_name = "PATH")]
    pub path: PathBuf,
    /// The name to store it under (default: PATH's file name without `.tar`).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// In an OCI layout holding several images, the one whose
    /// `org.opencontainers.image.ref.name` is TAG.
    #[arg(long, value_name = "TAG")]
    pub tag: Option<String>,
    #[command(flatten)]
    pub format: FormatArg,
    /// Print one JSON object with the result instead of progress and a summary.
    #[arg(long)]
    pub json: bool,
}

/// `kiln image verify` arguments.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The image name (or key).
    #[arg(value_name = "NAME")]
    pub name: String,
    /// Print one JSON object with the result.
    #[arg(long)]
    pub json: bool,
}

fn parse_format(s: &str) -> Result<ImageFormat, String> {
    s.parse::<ImageFormat>().map_err(|e| e.to_string())
}

impl ImageCommand {
    /// Whether the command prints JSON.
    pub fn json(&self) -> bool {
        match self {
            ImageCommand::Build(a) => a.json,
            ImageCommand::Ls(a) => a.json,
            ImageCommand::Rm(_) => false,
            ImageCommand::Pull(a) => a.json,
            ImageCommand::Import(a) => a.json,
            ImageCommand::Verify(a) => a.json,
        }
    }
}

/// A failed command: its exit code, error kind (for `--json`) and message with causes.
#[derive(Debug)]
struct Failure {
    code: i32,
    kind: String,
    message: String,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Self {
        Failure {
            code: INVALID,
            kind: "InvalidInput".into(),
            message: message.into(),
        }
    }
}

impl From<ImageError> for Failure {
    fn from(e: ImageError) -> Self {
        Failure {
            code: e.kind().exit_code(),
            kind: format!("{:?}", e.kind()),
            message: with_causes(&e),
        }
    }
}

/// `error: cause: cause ...`.
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = c.source();
    }
    s
}

/// Runs `kiln image ...`; returns the exit code.
pub fn image(args: ImageArgs) -> i32 {
    let json = args.command.json();
    match dispatch(args.command) {
        Ok(()) => 0,
        Err(f) => {
            eprintln!("kiln image: {}", f.message);
            if json {
                let doc = serde_json::json!({
                    "error": { "status": f.code, "kind": f.kind, "message": f.message }
                });
                println!("{doc}");
            }
            f.code
        }
    }
}

/// For `kiln run --image NAME|REF`: nothing when `name` is in the store; an OCI reference
/// that is not (it has a registry host, `HOST[:PORT]/REPO[:TAG]`) is pulled first, with
/// progress on stderr and anonymous or `$KILN_REGISTRY_USERNAME`/`_PASSWORD` auth. Errors:
/// the exit code of `kiln image` and the message.
pub fn ensure_stored(name: &str) -> Result<(), (i32, String)> {
    let fail = |f: Failure| (f.code, format!("image {name}: {}", f.message));
    let store = open_store().map_err(fail)?;
    match store.resolve(name) {
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == kiln_image::ErrorKind::UnknownImage && name.contains('/') => {}
        Err(e) => return Err(fail(e.into())),
    }
    let auth = auth(None, |k| std::env::var(k).ok(), &mut std::io::empty()).map_err(fail)?;
    let opts = PullOptions {
        auth,
        insecure: false,
        format: ImageFormat::default(),
        name: None,
    };
    eprintln!("kiln: {name} is not in the image store: pulling it");
    let mut progress = Progress::new(false);
    let img = store.pull(name, &opts, &mut |e| progress.event(e));
    progress.finish();
    img.map(|_| ()).map_err(|e| fail(e.into()))
}

fn dispatch(command: ImageCommand) -> Result<(), Failure> {
    match command {
        ImageCommand::Build(a) => build(&a),
        ImageCommand::Ls(a) => ls(&a),
        ImageCommand::Rm(a) => rm(&a),
        ImageCommand::Pull(a) => pull(&a),
        ImageCommand::Import(a) => import(&a),
        ImageCommand::Verify(a) => verify(&a),
    }
}

fn open_store() -> Result<ImageStore, Failure> {
    let dir = kiln::assets::images_dir().map_err(|e| Failure {
        code: IO,
        kind: "Io".into(),
        message: format!("{e} (the image store is <assets>/images)"),
    })?;
    Ok(ImageStore::open(dir)?)
}

fn build(a: &BuildArgs) -> Result<(), Failure> {
    let (recipe, name) = match &a.recipe {
        Some(file) => (Recipe::from_file(file)?, a.name.clone()),
        None => (
            Recipe::builtin(a.name.as_deref().unwrap_or("python"))?,
            None,
        ),
    };
    let opts = BuildOptions {
        format: a.format.format.unwrap_or_default(),
        name,
        ..BuildOptions::default()
    };
    let store = open_store()?;
    let mut progress = Progress::new(a.json);
    let img = store.build(&recipe, &opts, &mut |e| progress.event(e));
    progress.finish();
    report(&img?, progress.cached, a.json, "built")
}

fn pull(a: &PullArgs) -> Result<(), Failure> {
    let auth = auth(
        a.username.as_deref(),
        |k| std::env::var(k).ok(),
        &mut std::io::stdin().lock(),
    )?;
    let opts = PullOptions {
        auth,
        insecure: a.insecure,
        format: a.format.format.unwrap_or_default(),
        name: a.name.clone(),
    };
    let store = open_store()?;
    let mut progress = Progress::new(a.json);
    let img = store.pull(&a.reference, &opts, &mut |e| progress.event(e));
    progress.finish();
    report(&img?, progress.cached, a.json, "pulled")
}

fn import(a: &ImportArgs) -> Result<(), Failure> {
    let name = match &a.name {
        Some(n) => n.clone(),
        None => default_import_name(&a.path)?,
    };
    let opts = ImportOptions {
        format: a.format.format.unwrap_or_default(),
        tag: a.tag.clone(),
    };
    // Record an absolute source path in image.json; a missing path is passed as given so
    // the library's error names it.
    let path = std::fs::canonicalize(&a.path).unwrap_or_else(|_| a.path.clone());
    let store = open_store()?;
    let mut progress = Progress::new(a.json);
    let img = store.import(&path, &name, &opts, &mut |e| progress.event(e));
    progress.finish();
    report(&img?, progress.cached, a.json, "imported")
}

fn verify(a: &VerifyArgs) -> Result<(), Failure> {
    let store = open_store()?;
    let img = store.verify(&a.name)?;
    if a.json {
        print_json(&ImageReport::new(&img, None))
    } else {
        println!(
            "{}: ok ({}, {}, {}, {})",
            img.name,
            img.key,
            img.meta.format.as_str(),
            human_size(img.meta.size),
            img.meta.sha256
        );
        println!("  {}", img.path.display());
        Ok(())
    }
}

fn rm(a: &RmArgs) -> Result<(), Failure> {
    let store = open_store()?;
    let mut failures = Vec::new();
    for name in &a.names {
        match store.remove(name) {
            Ok(()) => println!("removed {name}"),
            Err(e) => failures.push(Failure::from(e)),
        }
    }
    let failed = failures.len();
    let mut failures = failures.into_iter();
    match failures.next() {
        None => Ok(()),
        Some(first) if failed == 1 => Err(first),
        // Several failed: print each, exit with the first one's code.
        Some(first) => {
            eprintln!("kiln image: {}", first.message);
            for f in failures {
                eprintln!("kiln image: {}", f.message);
            }
            Err(Failure {
                message: format!("{failed} of {} names not removed", a.names.len()),
                ..first
            })
        }
    }
}

fn ls(a: &LsArgs) -> Result<(), Failure> {
    let store = open_store()?;
    let entries: Vec<ListLine> = store.list()?.iter().map(ListLine::from).collect();
    if a.json {
        return print_json(&serde_json::json!({
            "store": store.dir(),
            "images": entries,
        }));
    }
    if entries.is_empty() {
        println!("no images in {}", store.dir().display());
        return Ok(());
    }
    print!("{}", table(&entries));
    Ok(())
}

/// One image of `kiln image ls` / `kiln doctor`.
#[derive(Debug, Clone, Serialize)]
pub struct ListLine {
    pub name: String,
    pub key: String,
    /// `ext4` / `erofs`; `None` when the image is damaged (see `problem`).
    pub format: Option<&'static str>,
    /// Bytes of the image file.
    pub size: Option<u64>,
    /// `build RECIPE`, `pull REF`, `import PATH`.
    pub source: Option<String>,
    /// What is wrong with it (missing directory, unreadable metadata, wrong size...).
    pub problem: Option<String>,
    /// The whole `image.json` when readable.
    pub meta: Option<ImageMeta>,
}

impl From<&ListEntry> for ListLine {
    fn from(e: &ListEntry) -> Self {
        ListLine {
            name: e.name.clone(),
            key: e.key.clone(),
            format: e.meta.as_ref().map(|m| m.format.as_str()),
            size: e.meta.as_ref().map(|m| m.size),
            source: e.meta.as_ref().map(|m| source_summary(&m.source)),
            problem: e.problem.clone(),
            meta: e.meta.clone(),
        }
    }
}

fn source_summary(s: &ImageSource) -> String {
    match s {
        ImageSource::Build { recipe, .. } => format!("build {recipe}"),
        ImageSource::Registry { reference, .. } => format!("pull {reference}"),
        ImageSource::Import { path, .. } => format!("import {path}"),
    }
}

/// The `kiln image ls` table: NAME FORMAT SIZE SOURCE KEY, one line per image; a damaged
/// image shows `PROBLEM: ...` at the end of its line.
pub fn table(entries: &[ListLine]) -> String {
    let rows: Vec<[String; 5]> = entries
        .iter()
        .map(|e| {
            [
                e.name.clone(),
                e.format.unwrap_or("-").to_string(),
                e.size.map_or_else(|| "-".into(), human_size),
                e.source.clone().unwrap_or_else(|| "-".into()),
                e.key.clone(),
            ]
        })
        .collect();
    let header = ["NAME", "FORMAT", "SIZE", "SOURCE", "KEY"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |r: &[String; 5]| {
        let mut s = String::new();
        for (i, (c, w)) in r.iter().zip(widths).enumerate() {
            if i + 1 == r.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s
    };
    let mut out = line(&header);
    out.push('\n');
    for (r, e) in rows.iter().zip(entries) {
        out.push_str(&line(r));
        if let Some(p) = &e.problem {
            out.push_str(&format!("  PROBLEM: {p}"));
        }
        out.push('\n');
    }
    out
}

/// `512 B`, `4.0 KiB`, `293.4 MiB`, `1.2 GiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// The result of build / pull / import / verify with `--json`.
#[derive(Debug, Serialize)]
struct ImageReport<'a> {
    name: &'a str,
    key: &'a str,
    path: &'a Path,
    format: &'static str,
    size: u64,
    /// Whether the image was already stored (build / pull / import).
    #[serde(skip_serializing_if = "Option::is_none")]
    cached: Option<bool>,
    meta: &'a ImageMeta,
}

impl<'a> ImageReport<'a> {
    fn new(img: &'a Image, cached: Option<bool>) -> Self {
        ImageReport {
            name: &img.name,
            key: &img.key,
            path: &img.path,
            format: img.meta.format.as_str(),
            size: img.meta.size,
            cached,
            meta: &img.meta,
        }
    }
}

fn print_json(v: &impl Serialize) -> Result<(), Failure> {
    let s = serde_json::to_string(v).map_err(|e| Failure {
        code: IO,
        kind: "Io".into(),
        message: format!("encoding the JSON result: {e}"),
    })?;
    println!("{s}");
    Ok(())
}

fn report(img: &Image, cached: bool, json: bool, verb: &str) -> Result<(), Failure> {
    if json {
        return print_json(&ImageReport::new(img, Some(cached)));
    }
    let how = if cached {
        "already stored".to_string()
    } else {
        format!("{verb} in {:.1} s", img.meta.build_secs)
    };
    println!(
        "{}: {} ({}, {}, {how})",
        img.name,
        img.key,
        img.meta.format.as_str(),
        human_size(img.meta.size)
    );
    println!("  {}", img.path.display());
    Ok(())
}

/// The image name `import PATH` uses without `--name`: PATH's last component without
/// `.tar` / `.tar.gz` / `.tgz` (the current directory's name for `.`).
fn default_import_name(path: &Path) -> Result<String, Failure> {
    let base = path.file_name().map(PathBuf::from).or_else(|| {
        std::fs::canonicalize(path)
            .ok()
            .and_then(|p| p.file_name().map(PathBuf::from))
    });
    let Some(base) = base.and_then(|b| b.to_str().map(str::to_owned)) else {
        return Err(Failure::usage(format!(
            "cannot derive an image name from {}; give --name NAME",
            path.display()
        )));
    };
    let stem = [".tar.gz", ".tgz", ".tar"]
        .iter()
        .find_map(|s| base.strip_suffix(s).filter(|s| !s.is_empty()))
        .unwrap_or(&base);
    Ok(stem.to_string())
}

/// Registry credentials: `--username U` with the password on `stdin`, else
/// `$KILN_REGISTRY_USERNAME` + `$KILN_REGISTRY_PASSWORD` (both or neither), else anonymous.
fn auth(
    username: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
    stdin: &mut dyn Read,
) -> Result<Auth, Failure> {
    if let Some(user) = username {
        if user.is_empty() {
            return Err(Failure::usage("--username is empty"));
        }
        return Ok(Auth::Basic {
            username: user.to_string(),
            password: read_password(stdin)?,
        });
    }
    let get = |k: &str| env(k).filter(|v| !v.is_empty());
    match (get(ENV_USERNAME), get(ENV_PASSWORD)) {
        (Some(username), Some(password)) => Ok(Auth::Basic { username, password }),
        (None, None) => Ok(Auth::Anonymous),
        (Some(_), None) => Err(Failure::usage(format!(
            "{ENV_USERNAME} is set but {ENV_PASSWORD} is not (set both, or use --username U \
             --password-stdin)"
        ))),
        (None, Some(_)) => Err(Failure::usage(format!(
            "{ENV_PASSWORD} is set but {ENV_USERNAME} is not (set both, or use --username U \
             --password-stdin)"
        ))),
    }
}

/// The password on stdin: up to the first newline (`\r\n` too), at most 64 KiB, not empty.
fn read_password(stdin: &mut dyn Read) -> Result<String, Failure> {
    let mut buf = Vec::new();
    stdin
        .take(MAX_PASSWORD + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Failure {
            code: IO,
            kind: "Io".into(),
            message: format!("reading the password from stdin: {e}"),
        })?;
    if buf.len() as u64 > MAX_PASSWORD {
        return Err(Failure::usage(
            "the password on stdin is longer than 64 KiB",
        ));
    }
    let text = String::from_utf8(buf)
        .map_err(|_| Failure::usage("the password on stdin is not valid UTF-8"))?;
    let line = text.split('\n').next().unwrap_or("");
    let line = line.strip_suffix('\r').unwrap_or(line);
    if line.is_empty() {
        return Err(Failure::usage(
            "--password-stdin: no password on stdin (e.g. `echo \"$PW\" | kiln image pull ...`)",
        ));
    }
    Ok(line.to_string())
}

/// Renders the library's progress events on stderr: an indicatif spinner / byte bar on a
/// terminal, one line per step otherwise, nothing when `quiet` (`--json`). Remembers whether
/// the image was already stored (`Event::Done { cached }`).
struct Progress {
    mode: Mode,
    cached: bool,
    /// The download the bar shows (`Event::Bytes::what`).
    bytes_of: Option<String>,
}

enum Mode {
    Quiet,
    Lines,
    Bar(ProgressBar),
}

/// Longest tool line shown on the spinner.
const MAX_LOG_CHARS: usize = 100;

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_spinner())
}

impl Progress {
    fn new(quiet: bool) -> Self {
        let mode = if quiet {
            Mode::Quiet
        } else if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new_spinner();
            bar.set_style(style("{spinner} {msg}"));
            bar.enable_steady_tick(Duration::from_millis(120));
            Mode::Bar(bar)
        } else {
            Mode::Lines
        };
        Progress {
            mode,
            cached: false,
            bytes_of: None,
        }
    }

    fn event(&mut self, e: Event<'_>) {
        if let Event::Done { cached, .. } = e {
            self.cached = cached;
        }
        match (&self.mode, e) {
            (Mode::Quiet, _) => {}
            (Mode::Lines, Event::Step(s)) => eprintln!("kiln image: {s}"),
            (Mode::Lines, Event::Bytes { what, done, total }) => {
                // One line per download, when it completes.
                if total == Some(done) {
                    eprintln!("kiln image:   {what}: {}", human_size(done));
                }
            }
            (Mode::Lines, Event::Log(_) | Event::Done { .. }) => {}
            (Mode::Bar(bar), Event::Step(s)) => {
                self.bytes_of = None;
                bar.set_style(style("{spinner} {msg}"));
                bar.println(format!("- {s}"));
                bar.set_message(s.to_string());
            }
            (Mode::Bar(bar), Event::Log(line)) => {
                if self.bytes_of.is_none() {
                    let short: String = line.chars().take(MAX_LOG_CHARS).collect();
                    bar.set_message(short);
                }
            }
            (Mode::Bar(bar), Event::Bytes { what, done, total }) => {
                if self.bytes_of.as_deref() != Some(what) {
                    self.bytes_of = Some(what.to_string());
                    match total {
                        Some(t) => {
                            bar.set_style(style(
                                "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                            ));
                            bar.set_length(t);
                        }
                        None => {
                            bar.set_style(style("{spinner} {msg} {bytes} {bytes_per_sec}"));
                            bar.unset_length();
                        }
                    }
                    bar.reset();
                    bar.set_message(what.to_string());
                }
                bar.set_position(done);
            }
            (Mode::Bar(_), Event::Done { .. }) => {}
        }
    }

    fn finish(&self) {
        if let Mode::Bar(bar) = &self.mode {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Command};
    use clap::{CommandFactory, Parser};
    use kiln_image::ErrorKind;

    fn parse(argv: &[&str]) -> ImageCommand {
        let mut full = vec!["kiln", "image"];
        full.extend_from_slice(argv);
        match Cli::try_parse_from(&full) {
            Ok(Cli {
                command: Command::Image(a),
            }) => a.command,
            Ok(other) => panic!("not image: {other:?}"),
            Err(e) => panic!("{argv:?}: {e}"),
        }
    }

    fn parse_err(argv: &[&str]) -> clap::Error {
        let mut full = vec!["kiln", "image"];
        full.extend_from_slice(argv);
        Cli::try_parse_from(&full).expect_err("must not parse")
    }

    #[test]
    fn build_defaults_and_flags() {
        let ImageCommand::Build(a) = parse(&["build"]) else {
            panic!()
        };
        assert!(a.name.is_none() && a.recipe.is_none() && !a.json);
        assert!(a.format.format.is_none());
        let ImageCommand::Build(a) = parse(&[
            "build", "mine", "--recipe", "r.toml", "--format", "erofs", "--json",
        ]) else {
            panic!()
        };
        assert_eq!(a.name.as_deref(), Some("mine"));
        assert_eq!(a.recipe.as_deref(), Some(Path::new("r.toml")));
        assert_eq!(a.format.format, Some(ImageFormat::Erofs));
        assert!(a.json);
        let ImageCommand::Build(a) = parse(&["build", "python", "--format", "ext4"]) else {
            panic!()
        };
        assert_eq!(a.format.format, Some(ImageFormat::Ext4));
        let e = parse_err(&["build", "--format", "squashfs"]);
        assert_eq!(e.exit_code(), crate::exit::USAGE);
        assert!(e.to_string().contains("squashfs"), "{e}");
    }

    #[test]
    fn pull_flags_and_credentials_need_each_other() {
        let ImageCommand::Pull(a) = parse(&[
            "pull",
            "localhost:5000/a:b",
            "--insecure",
            "--username",
            "u",
            "--password-stdin",
            "--name",
            "x",
            "--json",
        ]) else {
            panic!()
        };
        assert_eq!(a.reference, "localhost:5000/a:b");
        assert!(a.insecure && a.password_stdin && a.json);
        assert_eq!(a.username.as_deref(), Some("u"));
        assert_eq!(a.name.as_deref(), Some("x"));
        for argv in [
            &["pull", "r", "--username", "u"][..],
            &["pull", "r", "--password-stdin"][..],
            &["pull"][..],
        ] {
            assert_eq!(parse_err(argv).exit_code(), crate::exit::USAGE, "{argv:?}");
        }
    }

    #[test]
    fn import_ls_rm_verify_parse() {
        let ImageCommand::Import(a) = parse(&["import", "/x/layout", "--name", "n", "--tag", "t"])
        else {
            panic!()
        };
        assert_eq!(a.path, Path::new("/x/layout"));
        assert_eq!(
            (a.name.as_deref(), a.tag.as_deref()),
            (Some("n"), Some("t"))
        );
        assert!(matches!(
            parse(&["ls", "--json"]),
            ImageCommand::Ls(LsArgs { json: true })
        ));
        assert!(matches!(
            parse(&["list"]),
            ImageCommand::Ls(LsArgs { json: false })
        ));
        let ImageCommand::Rm(a) = parse(&["rm", "a", "b"]) else {
            panic!()
        };
        assert_eq!(a.names, vec!["a", "b"]);
        assert!(matches!(parse(&["verify", "a"]), ImageCommand::Verify(_)));
        for argv in [&["rm"][..], &["verify"][..], &["import"][..], &[][..]] {
            assert_eq!(parse_err(argv).exit_code(), crate::exit::USAGE, "{argv:?}");
        }
    }

    #[test]
    fn json_flag_is_seen() {
        assert!(parse(&["pull", "r", "--json"]).json());
        assert!(!parse(&["rm", "x"]).json());
    }

    /// Every kind, by an exhaustive match so a new kind breaks this test's build.
    fn all_kinds() -> Vec<ErrorKind> {
        let all = vec![
            ErrorKind::Io,
            ErrorKind::InvalidInput,
            ErrorKind::UnknownImage,
            ErrorKind::CorruptImage,
            ErrorKind::RegistryUnreachable,
            ErrorKind::Unauthorized,
            ErrorKind::UnknownManifest,
            ErrorKind::WrongArchitecture,
            ErrorKind::DigestMismatch,
            ErrorKind::UnsafeLayer,
            ErrorKind::MissingTool,
            ErrorKind::BuildFailed,
        ];
        for k in &all {
            match k {
                ErrorKind::Io
                | ErrorKind::InvalidInput
                | ErrorKind::UnknownImage
                | ErrorKind::CorruptImage
                | ErrorKind::RegistryUnreachable
                | ErrorKind::Unauthorized
                | ErrorKind::UnknownManifest
                | ErrorKind::WrongArchitecture
                | ErrorKind::DigestMismatch
                | ErrorKind::UnsafeLayer
                | ErrorKind::MissingTool
                | ErrorKind::BuildFailed => {}
            }
        }
        all
    }

    #[test]
    fn help_lists_every_exit_code() {
        let mut codes: Vec<i32> = all_kinds().iter().map(|k| k.exit_code()).collect();
        for code in &codes {
            assert!(HELP.contains(&format!("\n  {code} ")), "{code} missing");
        }
        assert_eq!(
            (IO, INVALID),
            (
                ErrorKind::Io.exit_code(),
                ErrorKind::InvalidInput.exit_code()
            )
        );
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), all_kinds().len(), "codes are distinct");
        let help = Cli::command()
            .find_subcommand_mut("image")
            .expect("image")
            .render_long_help()
            .to_string();
        assert!(
            help.contains("19  apt, mmdebstrap or mkfs failed"),
            "{help}"
        );
    }

    #[test]
    fn failures_carry_the_kind_code_and_causes() {
        let f = Failure::from(ImageError::UnknownImage("nope".into()));
        assert_eq!(f.code, 10);
        assert_eq!(f.kind, "UnknownImage");
        assert!(f.message.contains("nope"));
        let f = Failure::from(ImageError::Io {
            what: "opening import source".into(),
            path: "/missing".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        });
        assert_eq!(f.code, 1);
        assert!(
            f.message
                .starts_with("opening import source: /missing: No such file"),
            "{}",
            f.message
        );
    }

    #[test]
    fn credentials_from_flags_env_or_none() {
        let no_env = |_: &str| None;
        let basic = |a: Auth| match a {
            Auth::Basic { username, password } => (username, password),
            other => panic!("{other:?}"),
        };
        assert!(matches!(
            auth(None, no_env, &mut &b""[..]),
            Ok(Auth::Anonymous)
        ));
        let a = auth(Some("u"), no_env, &mut &b"s3cret\r\nignored"[..]).unwrap();
        assert_eq!(basic(a), ("u".into(), "s3cret".into()));
        let env = |k: &str| match k {
            ENV_USERNAME => Some("eu".to_string()),
            ENV_PASSWORD => Some("ep".to_string()),
            _ => None,
        };
        assert_eq!(
            basic(auth(None, env, &mut &b""[..]).unwrap()),
            ("eu".into(), "ep".into())
        );
        // Flags win over the environment.
        let a = auth(Some("u"), env, &mut &b"pw\n"[..]).unwrap();
        assert_eq!(basic(a), ("u".into(), "pw".into()));
        let half = |k: &str| (k == ENV_USERNAME).then(|| "eu".to_string());
        let e = auth(None, half, &mut &b""[..]).unwrap_err();
        assert_eq!(e.code, INVALID);
        assert!(e.message.contains(ENV_PASSWORD), "{}", e.message);
        for bad in [&b""[..], b"\n", &vec![b'x'; 70 * 1024][..], b"\xff\xfe"] {
            let e = auth(Some("u"), no_env, &mut &bad[..]).unwrap_err();
            assert_eq!(e.code, INVALID, "{}", e.message);
        }
    }

    #[test]
    fn import_names_come_from_the_path() {
        let n = |p: &str| default_import_name(Path::new(p)).unwrap();
        assert_eq!(n("/x/layout"), "layout");
        assert_eq!(n("/x/layout/"), "layout");
        assert_eq!(n("img.tar"), "img");
        assert_eq!(n("img.tar.gz"), "img");
        assert_eq!(n(".tar"), ".tar");
        let dir = tempfile::tempdir().unwrap();
        let inner = dir.path().join("here");
        std::fs::create_dir(&inner).unwrap();
        assert_eq!(n(&format!("{}/.", inner.display())), "here");
    }

    #[test]
    fn sizes_and_table() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(4096), "4.0 KiB");
        assert_eq!(human_size(293 * 1024 * 1024 + 512 * 1024), "293.5 MiB");
        assert_eq!(human_size(3 << 30), "3.0 GiB");
        let lines = vec![
            ListLine {
                name: "python".into(),
                key: "build-1-ext4".into(),
                format: Some("ext4"),
                size: Some(2 << 20),
                source: Some("build python".into()),
                problem: None,
                meta: None,
            },
            ListLine {
                name: "b".into(),
                key: "oci-2-ext4".into(),
                format: None,
                size: None,
                source: None,
                problem: Some("image.json missing".into()),
                meta: None,
            },
        ];
        let t = table(&lines);
        let rows: Vec<&str> = t.lines().collect();
        assert_eq!(rows.len(), 3, "{t}");
        assert!(
            rows[0].starts_with("NAME    FORMAT  SIZE     SOURCE"),
            "{t}"
        );
        assert!(
            rows[1].starts_with("python  ext4    2.0 MiB  build python  build-1-ext4"),
            "{t}"
        );
        assert!(
            rows[2].ends_with("oci-2-ext4  PROBLEM: image.json missing"),
            "{t}"
        );
    }
}
