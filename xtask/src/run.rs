//! `cargo xtask run [KILN-RUN-FLAGS] -- CMD ARGS...`: builds the guest assets and the `kiln`
//! CLI (and, for `--image NAME` of a recipe image not yet stored, the image: `kiln image
//! build NAME`), then runs `kiln run [FLAGS] -- CMD ARGS...` directly on a
//! hardware-virtualization host, or inside the emulated-virtualization harness elsewhere
//! (saying which). Flags before `--` are `kiln run`'s, passed through as they are
//! (`cargo xtask run --image python -- python3 -c 'print(6*7)'`).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Result};
use clap::Args;

use crate::{build_guest, kernel, util};

/// `cargo xtask run` arguments.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// `kiln run` flags (`--image python`, `--memory 1024`, ...), then `--` and the command
    /// to run in a fresh Kiln sandbox; all passed to `kiln run` as they are.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required = true,
        num_args = 1..,
        value_name = "[FLAGS] -- CMD"
    )]
    pub args: Vec<String>,
}

/// The `kiln run` argument vector for `args`: as given when it has a `--`, else (a bare
/// command) `-- args`.
pub fn kiln_run_args(args: &[String]) -> Vec<String> {
    let mut v = vec!["run".to_owned()];
    if !args.iter().any(|a| a == "--") && !args.first().is_some_and(|a| a.starts_with('-')) {
        v.push("--".into());
    }
    v.extend(args.iter().cloned());
    v
}

/// The value of `--image` among the flags before `--`.
pub fn image_flag(args: &[String]) -> Option<String> {
    let flags = args.split(|a| a == "--").next().unwrap_or(&[]);
    let mut it = flags.iter();
    while let Some(a) = it.next() {
        if a == "--image" {
            return it.next().cloned();
        }
        if let Some(v) = a.strip_prefix("--image=") {
            return Some(v.to_owned());
        }
    }
    None
}

/// Recipe images `kiln image build` knows by name.
const BUILT_IN_RECIPES: &[&str] = &["python"];

/// Makes sure the recipe image `name` is in the image store (`<assets>/images`): found, or
/// built with `kiln image build NAME` (progress on stderr; minutes the first time, cached in
/// the assets directory outside the clone). Other names (OCI references, files) are left to
/// `kiln run`. Returns the image file when it is a recipe image.
pub fn ensure_image(kiln: &std::path::Path, name: &str) -> Result<Option<PathBuf>> {
    if !BUILT_IN_RECIPES.contains(&name) {
        return Ok(None);
    }
    if let Ok(img) = kiln::image::resolve(name) {
        eprintln!("image {name}:     {}", img.path.display());
        return Ok(Some(img.path));
    }
    eprintln!("image {name} is not in the image store: building it (kiln image build {name})");
    let status = Command::new(kiln)
        .args(["image", "build", name])
        .status()
        .map_err(|e| anyhow::anyhow!("running {} image build {name}: {e}", kiln.display()))?;
    if !status.success() {
        bail!("kiln image build {name} failed ({status})");
    }
    let img = kiln::image::resolve(name)
        .map_err(|e| anyhow::anyhow!("image {name} after its build: {e}"))?;
    eprintln!("image {name}:     {}", img.path.display());
    Ok(Some(img.path))
}

/// Builds the `kiln` CLI (debug; package kiln-cli, crates/cli) and returns its path.
pub fn build_kiln_cli() -> Result<PathBuf> {
    eprintln!("building the kiln CLI");
    util::cargo_build(
        "the kiln CLI",
        &["build", "-p", "kiln-cli", "--bin", "kiln"],
        util::target_dir().join("debug").join("kiln"),
    )
}

/// Whether the `kiln` binary offers a `run` subcommand (it does not until the CLI lands).
fn has_run_subcommand(kiln: &std::path::Path) -> bool {
    Command::new(kiln)
        .args(["run", "--help"])
        .output()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            o.status.success() && text.to_lowercase().contains("usage")
        })
        .unwrap_or(false)
}

/// `cargo xtask run [FLAGS] -- CMD...`: returns the exit status to exit with.
pub fn cmd_run(args: &RunArgs) -> Result<i32> {
    let k = kernel::ensure()?;
    let g = build_guest::ensure()?;
    let kiln = build_kiln_cli()?;
    eprintln!("guest kernel:    {}", k.vmlinux.display());
    eprintln!("guest initramfs: {}", g.initramfs.display());
    if !has_run_subcommand(&kiln) {
        bail!(
            "the guest assets are ready, but {} has no working `run` subcommand yet: the \
             Kiln VMM and CLI (crates/vmm-core, crates/cli) are still missing",
            kiln.display()
        );
    }
    if let Some(image) = image_flag(&args.args) {
        ensure_image(&kiln, &image)?;
    }
    let mut argv = vec![kiln.display().to_string()];
    argv.extend(kiln_run_args(&args.args));
    let mut env = util::guest_env(&k.vmlinux, &g.initramfs);
    // The image store of this host's assets directory (inside the harness too).
    env.push((
        "KILN_ASSETS_DIR".into(),
        util::assets_dir()?.display().to_string(),
    ));
    let status = util::run_here_or_in_harness("", "", argv, env, None)?;
    if status != 0 {
        eprintln!("kiln run exited with status {status}");
    }
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flags_pass_through_to_kiln_run() {
        let a = v(&["--image", "python", "--", "python3", "-c", "print(6*7)"]);
        assert_eq!(image_flag(&a).as_deref(), Some("python"));
        assert_eq!(kiln_run_args(&a)[0], "run");
        assert_eq!(&kiln_run_args(&a)[1..], &a[..]);
        // A bare command gets its `--`.
        assert_eq!(
            kiln_run_args(&v(&["uname", "-a"])),
            v(&["run", "--", "uname", "-a"])
        );
        // `--image` after `--` is the command's.
        assert_eq!(image_flag(&v(&["--", "x", "--image", "y"])), None);
        assert_eq!(
            image_flag(&v(&["--image=python", "--", "x"])).as_deref(),
            Some("python")
        );
    }

    #[test]
    fn clap_keeps_flags_and_the_separator() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            run: RunArgs,
        }
        let t = T::try_parse_from(["x", "--image", "python", "--", "python3", "-V"]).unwrap();
        assert_eq!(image_flag(&t.run.args).as_deref(), Some("python"));
        assert!(kiln_run_args(&t.run.args).iter().any(|a| a == "python3"));
        let t = T::try_parse_from(["x", "--", "uname"]).unwrap();
        assert_eq!(
            kiln_run_args(&t.run.args).last().map(String::as_str),
            Some("uname")
        );
    }
}
