//! The server's configuration: `--listen`, and the TOML file given with `--config`
//! (templates, limits, API keys). docs/SERVER.md lists every key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Default listen address (envd's port, loopback only).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:49983";

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("parsing {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// One template: what a sandbox created from it boots.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TemplateConfig {
    /// Image name in the Kiln image store (`None` = the bare Kiln guest).
    pub image: Option<String>,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Disk size reported to clients (MB).
    pub disk_mb: u32,
    /// Default user of commands and files (`None` = root).
    pub user: Option<String>,
    /// That user's home: default cwd and the base of relative paths.
    pub home: String,
    /// Boot deadline, seconds.
    pub boot_timeout_secs: u64,
    /// Warm sandboxes kept booted for creates (0 = no pool; `/kiln/v1/pools` changes it).
    pub pool_size: usize,
    /// Egress allow rules (docs/EGRESS.md); `None` = no network at all.
    pub egress_allow: Option<Vec<String>>,
    /// Egress deny rules (checked first).
    pub egress_deny: Vec<String>,
}

impl Default for TemplateConfig {
    fn default() -> Self {
        Self {
            image: None,
            vcpus: 1,
            memory_mib: 512,
            disk_mb: 1024,
            user: None,
            home: "/root".into(),
            boot_timeout_secs: 120,
            pool_size: 0,
            egress_allow: None,
            egress_deny: Vec::new(),
        }
    }
}

impl TemplateConfig {
    /// The `base` template: the python image (bash, user `user`, home `/home/user`).
    pub fn base() -> Self {
        Self {
            image: Some("python".into()),
            user: Some("user".into()),
            home: "/home/user".into(),
            ..Self::default()
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Listen address.
    pub listen: String,
    /// Templates by name (`base` is always present: the built-in one unless configured).
    pub templates: BTreeMap<String, TemplateConfig>,
    /// Default sandbox timeout (seconds) when create gives none.
    pub default_timeout_secs: u64,
    /// Longest timeout a client may ask for (seconds).
    pub max_timeout_secs: u64,
    /// Most sandboxes alive at once.
    pub max_sandboxes: usize,
    /// Largest upload (bytes) of `POST /files`.
    pub max_upload_bytes: usize,
    /// SHA-256 hex digests of the accepted API keys; empty = any non-empty key.
    pub api_key_sha256: Vec<String>,
    /// Most live sandboxes one API key may own (create, restore and fork count); `None` = only
    /// `max_sandboxes` applies.
    pub max_sandboxes_per_key: Option<usize>,
    /// Where `/kiln/v1` snapshots are kept (`None` = a temporary directory removed at exit).
    pub snapshot_dir: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        let mut templates = BTreeMap::new();
        templates.insert("base".to_string(), TemplateConfig::base());
        Self {
            listen: DEFAULT_LISTEN.into(),
            templates,
            default_timeout_secs: 300,
            max_timeout_secs: 24 * 3600,
            max_sandboxes: 64,
            max_upload_bytes: 512 * 1024 * 1024,
            api_key_sha256: Vec::new(),
            snapshot_dir: None,
            max_sandboxes_per_key: None,
        }
    }
}

impl ServerConfig {
    /// Loads a TOML file (missing keys take their defaults).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                source,
            },
            other => other,
        })
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let mut c: ServerConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::new(),
            source,
        })?;
        c.templates
            .entry("base".to_string())
            .or_insert_with(TemplateConfig::base);
        c.validate()?;
        Ok(c)
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        if self.default_timeout_secs == 0 || self.default_timeout_secs > self.max_timeout_secs {
            return Err(ConfigError::Invalid(
                "default_timeout_secs must be in 1..=max_timeout_secs".into(),
            ));
        }
        if self.max_sandboxes == 0 {
            return Err(ConfigError::Invalid("max_sandboxes must be > 0".into()));
        }
        for (name, t) in &self.templates {
            if !t.home.starts_with('/') {
                return Err(ConfigError::Invalid(format!(
                    "template {name}: home must be an absolute path"
                )));
            }
            if t.pool_size > 16 {
                return Err(ConfigError::Invalid(format!(
                    "template {name}: pool_size must be in 0..=16"
                )));
            }
            if let Some(allow) = &t.egress_allow {
                kiln::Policy::from_rules(allow, &t.egress_deny).map_err(|e| {
                    ConfigError::Invalid(format!("template {name}: egress rules: {e}"))
                })?;
            }
        }
        for k in &self.api_key_sha256 {
            if k.len() != 64 || !k.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ConfigError::Invalid(
                    "api_key_sha256 entries are 64 hex digits".into(),
                ));
            }
        }
        Ok(())
    }

    /// The listen address, parsed.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen
            .parse()
            .map_err(|e| ConfigError::Invalid(format!("listen {:?}: {e}", self.listen)))
    }

    /// Whether `key` is an accepted API key.
    pub fn api_key_ok(&self, key: &str) -> bool {
        if key.is_empty() {
            return false;
        }
        if self.api_key_sha256.is_empty() {
            return true;
        }
        let digest = sha256_hex(key.as_bytes());
        self.api_key_sha256
            .iter()
            .any(|k| k.eq_ignore_ascii_case(&digest))
    }
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_have_the_base_template() {
        let c = ServerConfig::from_toml("").unwrap();
        assert_eq!(c.listen, DEFAULT_LISTEN);
        let b = &c.templates["base"];
        assert_eq!(b.image.as_deref(), Some("python"));
        assert_eq!(b.user.as_deref(), Some("user"));
        assert_eq!(b.home, "/home/user");
    }

    #[test]
    fn file_keys_override() {
        let c = ServerConfig::from_toml(
            r#"
listen = "127.0.0.1:8000"
max_sandboxes = 3
[templates.tiny]
memory_mib = 256
"#,
        )
        .unwrap();
        assert_eq!(c.max_sandboxes, 3);
        assert_eq!(c.templates["tiny"].memory_mib, 256);
        assert_eq!(c.templates["tiny"].image, None);
        assert!(c.templates.contains_key("base"));
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(ServerConfig::from_toml("listen = \"nope\"").is_err());
        assert!(ServerConfig::from_toml("max_sandboxes = 0").is_err());
        assert!(ServerConfig::from_toml("frobnicate = 1").is_err());
        assert!(ServerConfig::from_toml("[templates.x]\nhome = \"rel\"").is_err());
        assert!(ServerConfig::from_toml("api_key_sha256 = [\"abc\"]").is_err());
    }

    #[test]
    fn api_keys_are_checked_by_hash() {
        let mut c = ServerConfig::default();
        assert!(c.api_key_ok("anything"));
        assert!(!c.api_key_ok(""));
        c.api_key_sha256 = vec![sha256_hex(b"secret")];
        assert!(c.api_key_ok("secret"));
        assert!(!c.api_key_ok("other"));
    }
}
