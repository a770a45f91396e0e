//! Secrets: a value the guest never sees. The guest gets a random placeholder (in the env var
//! of the secret's name); the proxy swaps the placeholder for the value in the request headers
//! of requests to the secret's hosts only, and only on TLS connections it intercepted and
//! verified upstream (never over plain HTTP, never for another host). Also the
//! `NAME@host[,host..]=env:VAR` spec parser of the CLI's `--secret`.

use std::fmt;

use base64::Engine as _;
use rand::RngCore;

use crate::policy::{normalize_name, Host, HostPattern};

/// Longest secret value accepted.
pub const MAX_SECRET_LEN: usize = 16 * 1024;

/// Errors of secret construction and spec parsing.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The name is not an environment variable name.
    #[error("secret name {0:?} is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*)")]
    Name(String),
    /// A host is not a name or `*.suffix`.
    #[error("secret host {0:?} is not a host name or `*.suffix`")]
    Host(String),
    /// No host was given.
    #[error("secret {0} names no host")]
    NoHost(String),
    /// The value is empty, too long or has CR, LF or NUL (it goes into a header).
    #[error("the value of secret {0} is empty, longer than 16 KiB or contains CR, LF or NUL")]
    Value(String),
    /// The spec is not `NAME@host[,host]=env:VAR`.
    #[error("secret spec {0:?} is not NAME@host[,host..]=env:VAR")]
    Spec(String),
    /// The environment variable of a spec is not set (or not UTF-8).
    #[error("secret {name}: environment variable {var} is not set or not UTF-8")]
    Env {
        /// The secret.
        name: String,
        /// The variable.
        var: String,
    },
}

/// One secret: name, value, hosts it may be sent to, and its placeholder.
#[derive(Clone)]
pub struct Secret {
    name: String,
    value: String,
    hosts: Vec<HostPattern>,
    placeholder: String,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secret")
            .field("name", &self.name)
            .field("hosts", &self.hosts)
            .field("value", &"<redacted>")
            .finish_non_exhaustive()
    }
}

fn valid_env_name(n: &str) -> bool {
    let mut b = n.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
        && n.len() <= 128
}

impl Secret {
    /// A secret `name` (the guest env var) with `value`, sent only to `hosts` (exact names or
    /// `*.suffix`). A fresh placeholder is drawn (128 random bits).
    pub fn new<H: AsRef<str>>(name: &str, value: &str, hosts: &[H]) -> Result<Self, SecretError> {
        if !valid_env_name(name) {
            return Err(SecretError::Name(name.into()));
        }
        if value.is_empty()
            || value.len() > MAX_SECRET_LEN
            || value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0))
        {
            return Err(SecretError::Value(name.into()));
        }
        let hosts = hosts
            .iter()
            .map(|h| {
                let h = h.as_ref();
                match HostPattern::parse(h) {
                    Ok(p @ (HostPattern::Exact(_) | HostPattern::Suffix(_))) => Ok(p),
                    _ => Err(SecretError::Host(h.into())),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        if hosts.is_empty() {
            return Err(SecretError::NoHost(name.into()));
        }
        Ok(Self {
            name: name.into(),
            value: value.into(),
            hosts,
            placeholder: new_placeholder(),
        })
    }

    /// The secret's name (the guest env var carrying the placeholder).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The placeholder the guest sees.
    pub fn placeholder(&self) -> &str {
        &self.placeholder
    }

    /// The hosts the value may be sent to.
    pub fn hosts(&self) -> &[HostPattern] {
        &self.hosts
    }

    /// Whether the value may be sent to `host`.
    pub fn applies_to(&self, host: &Host) -> bool {
        self.hosts.iter().any(|p| p.matches(host))
    }
}

/// `kiln-secret-` and 32 hex digits of the OS RNG.
fn new_placeholder() -> String {
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let mut s = String::from("kiln-secret-");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// A parsed `--secret NAME@host[,host..]=env:VAR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretSpec {
    /// The secret's name.
    pub name: String,
    /// Its hosts.
    pub hosts: Vec<String>,
    /// The host environment variable holding the value.
    pub env: String,
}

impl SecretSpec {
    /// Parses `NAME@host[,host..]=env:VAR`.
    pub fn parse(spec: &str) -> Result<Self, SecretError> {
        let bad = || SecretError::Spec(spec.into());
        let (name, rest) = spec.split_once('@').ok_or_else(bad)?;
        let (hosts, source) = rest.split_once('=').ok_or_else(bad)?;
        let var = source.strip_prefix("env:").ok_or_else(bad)?;
        if !valid_env_name(name) {
            return Err(SecretError::Name(name.into()));
        }
        if !valid_env_name(var) {
            return Err(bad());
        }
        let hosts: Vec<String> = hosts.split(',').map(str::to_string).collect();
        for h in &hosts {
            let inner = h.strip_prefix("*.").unwrap_or(h);
            if normalize_name(inner).is_none() || inner.parse::<std::net::IpAddr>().is_ok() {
                return Err(SecretError::Host(h.clone()));
            }
        }
        Ok(Self {
            name: name.into(),
            hosts,
            env: var.into(),
        })
    }

    /// Reads the value from the host environment and builds the secret.
    pub fn resolve(&self) -> Result<Secret, SecretError> {
        self.resolve_with(|v| std::env::var(v).ok())
    }

    /// Builds the secret with `lookup` giving the variable's value.
    pub fn resolve_with(
        &self,
        lookup: impl FnOnce(&str) -> Option<String>,
    ) -> Result<Secret, SecretError> {
        let value = lookup(&self.env).ok_or_else(|| SecretError::Env {
            name: self.name.clone(),
            var: self.env.clone(),
        })?;
        Secret::new(&self.name, &value, &self.hosts)
    }
}

/// Replaces, in one header value, the placeholder of every secret in `secrets` (those that
/// apply to the destination) by its value; inside `Basic` credentials too (base64-decoded,
/// replaced, re-encoded). Returns whether anything was replaced.
pub fn inject_header(name: &str, value: &mut Vec<u8>, secrets: &[&Secret]) -> bool {
    let mut changed = false;
    for s in secrets {
        if let Some(v) = replace_all(value, s.placeholder.as_bytes(), s.value.as_bytes()) {
            *value = v;
            changed = true;
        }
    }
    if name.eq_ignore_ascii_case("authorization")
        || name.eq_ignore_ascii_case("proxy-authorization")
    {
        let b64 = base64::engine::general_purpose::STANDARD;
        let is_basic = value.len() > 6 && value[..6].eq_ignore_ascii_case(b"basic ");
        if is_basic {
            let creds = value[6..].trim_ascii();
            if let Ok(mut decoded) = b64.decode(creds) {
                let mut inner = false;
                for s in secrets {
                    if let Some(v) =
                        replace_all(&decoded, s.placeholder.as_bytes(), s.value.as_bytes())
                    {
                        decoded = v;
                        inner = true;
                    }
                }
                if inner {
                    let mut v = value[..6].to_vec();
                    v.extend_from_slice(b64.encode(&decoded).as_bytes());
                    *value = v;
                    changed = true;
                }
            }
        }
    }
    changed
}

fn replace_all(hay: &[u8], needle: &[u8], with: &[u8]) -> Option<Vec<u8>> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    let mut found = false;
    while i < hay.len() {
        if hay[i..].starts_with(needle) {
            out.extend_from_slice(with);
            i += needle.len();
            found = true;
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    found.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parses() {
        let s =
            SecretSpec::parse("GH_TOKEN@api.github.com,*.githubusercontent.com=env:MY_GH").unwrap();
        assert_eq!(s.name, "GH_TOKEN");
        assert_eq!(s.hosts, ["api.github.com", "*.githubusercontent.com"]);
        assert_eq!(s.env, "MY_GH");
        for bad in [
            "X",
            "X@h",
            "X@h=MY",
            "X@h=env:",
            "1X@h=env:V",
            "X@=env:V",
            "X@1.2.3.4=env:V",
        ] {
            assert!(SecretSpec::parse(bad).is_err(), "{bad}");
        }
        let sec = s
            .resolve_with(|v| (v == "MY_GH").then(|| "tok".into()))
            .unwrap();
        assert!(sec.applies_to(&Host::parse("api.github.com").unwrap()));
        assert!(sec.applies_to(&Host::parse("raw.githubusercontent.com").unwrap()));
        assert!(!sec.applies_to(&Host::parse("github.com").unwrap()));
        assert!(s.resolve_with(|_| None).is_err());
    }

    #[test]
    fn placeholders_are_random_and_value_is_redacted() {
        let a = Secret::new("A", "v1", &["x.org"]).unwrap();
        let b = Secret::new("A", "v1", &["x.org"]).unwrap();
        assert_ne!(a.placeholder(), b.placeholder());
        assert_eq!(a.placeholder().len(), "kiln-secret-".len() + 32);
        assert!(!format!("{a:?}").contains("v1"));
        assert!(Secret::new("A", "bad\r\nX: y", &["x.org"]).is_err());
        assert!(Secret::new("A", "v", &["10.0.0.0/8"]).is_err());
    }

    #[test]
    fn injects_plain_and_basic() {
        let s = Secret::new("T", "s3cret", &["x.org"]).unwrap();
        let mut v = format!("Bearer {}", s.placeholder()).into_bytes();
        assert!(inject_header("Authorization", &mut v, &[&s]));
        assert_eq!(v, b"Bearer s3cret");
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut v =
            format!("Basic {}", b64.encode(format!("user:{}", s.placeholder()))).into_bytes();
        assert!(inject_header("authorization", &mut v, &[&s]));
        assert_eq!(
            v,
            format!("Basic {}", b64.encode("user:s3cret")).into_bytes()
        );
        let mut v = b"nothing".to_vec();
        assert!(!inject_header("X", &mut v, &[&s]));
    }
}
