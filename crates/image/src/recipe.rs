//! Image recipes: a TOML file naming a Debian suite, its sources, a package list, an
//! optional unprivileged user and the exec defaults (format in docs/IMAGES.md; the
//! built-in `python` recipe is `images/python.toml`).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::meta::ExecDefaults;
use crate::{ImageError, Result};

/// The built-in recipes, by name.
pub const BUILTIN: &[(&str, &str)] = &[("python", include_str!("../../../images/python.toml"))];

/// A user the build creates (`useradd -m -u UID -U -s SHELL NAME`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeUser {
    pub name: String,
    pub uid: u32,
    pub home: String,
    #[serde(default = "default_shell")]
    pub shell: String,
}

fn default_shell() -> String {
    "/bin/bash".into()
}
fn default_suite() -> String {
    "bookworm".into()
}
fn default_variant() -> String {
    "apt".into()
}

/// A parsed, validated recipe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// The image name a build stores it under unless told otherwise.
    pub name: String,
    #[serde(default = "default_suite")]
    pub suite: String,
    /// mmdebstrap variant (`apt`, `essential`, `minbase`, ...).
    #[serde(default = "default_variant")]
    pub variant: String,
    /// sources.list lines (`deb URI SUITE COMPONENTS`); default: deb.debian.org main.
    #[serde(default)]
    pub sources: Vec<String>,
    /// Packages installed on top of the variant (no Recommends).
    pub packages: Vec<String>,
    /// dpkg `path-exclude` globs (documentation, man pages, ...).
    #[serde(default)]
    pub path_exclude: Vec<String>,
    /// dpkg `path-include` globs that win over `path_exclude` (e.g. copyright files).
    #[serde(default)]
    pub path_include: Vec<String>,
    #[serde(default)]
    pub user: Option<RecipeUser>,
    /// Shell commands run inside the new root (`chroot ROOT sh -c CMD`) at the end.
    #[serde(default)]
    pub customize: Vec<String>,
    #[serde(default)]
    pub exec: ExecDefaults,
}

fn word_ok(s: &str, extra: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || extra.contains(c))
}

impl Recipe {
    /// Parses recipe text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let mut r: Recipe = toml::from_str(text)
            .map_err(|e| ImageError::invalid(format!("recipe {origin}"), e.to_string()))?;
        if r.sources.is_empty() {
            r.sources = vec![format!("deb http://deb.debian.org/debian {} main", r.suite)];
        }
        r.validate(origin)?;
        Ok(r)
    }

    /// Reads and parses a recipe file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ImageError::io("reading recipe", path, e))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// A built-in recipe (`python`).
    pub fn builtin(name: &str) -> Result<Self> {
        let (_, text) = BUILTIN.iter().find(|(n, _)| *n == name).ok_or_else(|| {
            let names: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
            ImageError::invalid(
                "recipe",
                format!(
                    "no built-in recipe `{name}` (built in: {})",
                    names.join(", ")
                ),
            )
        })?;
        Self::parse(text, &format!("built-in `{name}`"))
    }

    fn validate(&self, origin: &str) -> Result<()> {
        let bad = |reason: String| Err(ImageError::invalid(format!("recipe {origin}"), reason));
        crate::store::validate_name(&self.name)?;
        if !word_ok(&self.suite, "-") {
            return bad(format!("suite `{}`", self.suite));
        }
        if !word_ok(&self.variant, "") {
            return bad(format!("variant `{}`", self.variant));
        }
        if self.packages.is_empty() {
            return bad("no packages".into());
        }
        for p in &self.packages {
            if !word_ok(p, "+.-") || p.starts_with(['-', '.', '+']) {
                return bad(format!("package name `{p}`"));
            }
        }
        for s in &self.sources {
            let parts: Vec<&str> = s.split_whitespace().collect();
            if parts.len() < 4
                || parts[0] != "deb"
                || !(parts[1].starts_with("http://") || parts[1].starts_with("https://"))
            {
                return bad(format!(
                    "source `{s}` (expected `deb http(s)://URI SUITE COMPONENT...`)"
                ));
            }
            if s.contains(['\'', '"', '\n', '`', '$', '\\']) {
                return bad(format!("source `{s}` has quotes or shell characters"));
            }
        }
        for g in self.path_exclude.iter().chain(&self.path_include) {
            if !g.starts_with('/') || g.contains(['\'', '"', '\n', '=']) {
                return bad(format!("path glob `{g}`"));
            }
        }
        if let Some(u) = &self.user {
            let name_ok = u
                .name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
                && word_ok(&u.name, "_-")
                && u.name.len() <= 32;
            if !name_ok {
                return bad(format!("user name `{}`", u.name));
            }
            if u.uid == 0 || u.uid > 60000 {
                return bad(format!("uid {} (1..=60000)", u.uid));
            }
            for (what, p) in [("home", &u.home), ("shell", &u.shell)] {
                if !p.starts_with('/')
                    || !p
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "/._-".contains(c))
                {
                    return bad(format!("user {what} `{p}`"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_python_parses_with_the_e2b_user() {
        let r = Recipe::builtin("python").expect("built-in");
        assert_eq!(r.suite, "bookworm");
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
            assert!(r.packages.iter().any(|x| x == p), "{p}");
        }
        let u = r.user.as_ref().expect("user");
        assert_eq!(
            (u.name.as_str(), u.uid, u.home.as_str()),
            ("user", 1000, "/home/user")
        );
        assert_eq!(r.sources.len(), 3);
    }

    #[test]
    fn bad_recipes_name_the_problem() {
        let e = Recipe::parse(
            "name = \"x\"\npackages = [\"ok\", \"bad name\"]\n",
            "t.toml",
        )
        .expect_err("bad");
        assert!(
            e.to_string().contains("bad name") && e.to_string().contains("t.toml"),
            "{e}"
        );
        let e = Recipe::parse("name = \"x\"\npackages = []\n", "t.toml").expect_err("empty");
        assert!(e.to_string().contains("no packages"), "{e}");
        let e = Recipe::parse("name = \"x\"\npackages = [\"a\"]\nfoo = 1\n", "t.toml")
            .expect_err("unknown field");
        assert!(e.to_string().contains("foo"), "{e}");
        let e = Recipe::parse(
            "name = \"x\"\npackages = [\"a\"]\nsources = [\"deb ftp://x y z\"]\n",
            "t",
        )
        .expect_err("src");
        assert!(e.to_string().contains("ftp://"), "{e}");
        let e = Recipe::parse("name = \"x\"\npackages = [\"a\"]\n[user]\nname = \"root\"\nuid = 0\nhome = \"/root\"\n", "t")
            .expect_err("uid 0");
        assert!(e.to_string().contains("uid 0"), "{e}");
        assert!(Recipe::builtin("nope").is_err());
    }

    #[test]
    fn build_key_tracks_recipe_versions_and_format() {
        let r = Recipe::builtin("python").expect("built-in");
        let v1 = vec!["python3=3.11.2-1".to_string()];
        let v2 = vec!["python3=3.11.2-2".to_string()];
        let (k1, _) = crate::build::build_key(&r, crate::ImageFormat::Erofs, &v1).expect("key");
        let (k1b, _) = crate::build::build_key(&r, crate::ImageFormat::Erofs, &v1).expect("key");
        let (k2, _) = crate::build::build_key(&r, crate::ImageFormat::Erofs, &v2).expect("key");
        let (k3, _) = crate::build::build_key(&r, crate::ImageFormat::Ext4, &v1).expect("key");
        let mut r2 = r.clone();
        r2.packages.push("vim".into());
        let (k4, _) = crate::build::build_key(&r2, crate::ImageFormat::Erofs, &v1).expect("key");
        assert_eq!(k1, k1b);
        assert!(k1.starts_with("build-") && k1.ends_with("-erofs"));
        assert!(k1 != k2 && k1 != k3 && k1 != k4);
        // Comments do not change the key.
        let text = include_str!("../../../images/python.toml");
        let commented = format!("# another comment\n{text}");
        let r3 = Recipe::parse(&commented, "t").expect("parse");
        assert_eq!(
            crate::build::build_key(&r3, crate::ImageFormat::Erofs, &v1)
                .expect("key")
                .0,
            k1
        );
    }
}
