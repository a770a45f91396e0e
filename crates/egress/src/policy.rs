//! Egress policy: allow/deny rules over host names (`name`, `*.suffix`, `*`), IP addresses,
//! CIDR ranges and ports; the built-in denial of special address ranges; per-sandbox limits;
//! parsing of `HOST[:PORT]` rules and of the TOML policy file.
//!
//! Semantics (docs/EGRESS.md "Policy"): a connection to `HOST:PORT` is allowed only when
//! 1. no deny rule matches the host (or one of the addresses it resolves to) and the port,
//! 2. an allow rule matches the host and the port (default deny), and
//! 3. every address actually connected to is a public address, or is *named* by an allow rule
//!    (an IP/CIDR rule containing it, or an exact `localhost` rule for a loopback address).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use serde::Deserialize;

/// Longest host name accepted anywhere (DNS limit).
pub const MAX_NAME_LEN: usize = 253;

/// Errors of rule parsing and policy loading.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The rule text was empty.
    #[error("empty host rule")]
    Empty,
    /// The host part is not a name, `*.suffix`, `*`, IP address or CIDR.
    #[error("invalid host {host:?} in rule {rule:?}: {why}")]
    Host {
        /// The whole rule.
        rule: String,
        /// The host part.
        host: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The port part is not a number in 1..=65535 or `*`.
    #[error("invalid port {port:?} in rule {rule:?}")]
    Port {
        /// The whole rule.
        rule: String,
        /// The port part.
        port: String,
    },
    /// The policy file could not be read.
    #[error("reading egress policy file {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The policy file is not valid TOML of the expected shape.
    #[error("parsing egress policy file {path}")]
    Toml {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: toml::de::Error,
    },
    /// A rule in the policy file is invalid.
    #[error("{list} rule {rule:?} in egress policy file {path}")]
    FileRule {
        /// The file.
        path: String,
        /// `allow` or `deny`.
        list: &'static str,
        /// The rule text.
        rule: String,
        /// The cause.
        #[source]
        source: Box<PolicyError>,
    },
}

/// An IP network: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// A network from an address (normalised: IPv4-mapped IPv6 becomes IPv4) and a prefix
    /// length; `None` when the prefix is too long for the family. Host bits are cleared.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        let addr = canonical_ip(addr);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return None;
        }
        let addr = match addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask32(prefix))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask128(prefix))),
        };
        Some(Self { addr, prefix })
    }

    /// Whether `ip` (normalised) lies in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical_ip(ip)) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                u32::from(a) & mask32(self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                u128::from(a) & mask128(self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }

    /// Parses `ADDR` or `ADDR/PREFIX`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.split_once('/') {
            Some((a, p)) => {
                let addr: IpAddr = a.parse().ok()?;
                if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                Self::new(addr, p.parse().ok()?)
            }
            None => {
                let addr: IpAddr = s.parse().ok()?;
                let addr = canonical_ip(addr);
                Self::new(addr, if addr.is_ipv4() { 32 } else { 128 })
            }
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let full = if self.addr.is_ipv4() { 32 } else { 128 };
        match (self.addr, self.prefix == full) {
            (IpAddr::V6(a), true) => write!(f, "[{a}]"),
            (a, true) => write!(f, "{a}"),
            (a, false) => write!(f, "{a}/{}", self.prefix),
        }
    }
}

fn mask32(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

fn mask128(prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(prefix))
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) become IPv4; everything else is unchanged.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// The host part of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// `*`: every host (used with a port: `*:443`).
    Any,
    /// One exact name (lower case, no trailing dot).
    Exact(String),
    /// `*.suffix`: every name strictly below `suffix` (not `suffix` itself).
    Suffix(String),
    /// An IP address (a full-length prefix) or a CIDR range.
    Net(Cidr),
}

impl HostPattern {
    /// Parses a host part: `*`, `*.suffix`, a name, an IP address or a CIDR.
    pub fn parse(host: &str) -> Result<Self, &'static str> {
        if host == "*" {
            return Ok(Self::Any);
        }
        if let Some(suffix) = host.strip_prefix("*.") {
            return normalize_name(suffix)
                .map(Self::Suffix)
                .ok_or("not a valid `*.suffix` pattern");
        }
        if host.contains('/') || host.parse::<IpAddr>().is_ok() {
            return Cidr::parse(host)
                .map(Self::Net)
                .ok_or("not a valid IP address or CIDR range");
        }
        normalize_name(host)
            .map(Self::Exact)
            .ok_or("not a valid host name")
    }

    /// Whether the pattern matches `host`.
    pub fn matches(&self, host: &Host) -> bool {
        match (self, host) {
            (Self::Any, _) => true,
            (Self::Exact(n), Host::Name(h)) => n == h,
            (Self::Suffix(s), Host::Name(h)) => {
                h.len() > s.len() + 1 && h.ends_with(s.as_str()) && {
                    let cut = h.len() - s.len() - 1;
                    h.as_bytes().get(cut) == Some(&b'.')
                }
            }
            (Self::Net(c), Host::Ip(ip)) => c.contains(*ip),
            _ => false,
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Exact(n) => f.write_str(n),
            Self::Suffix(s) => write!(f, "*.{s}"),
            Self::Net(c) => write!(f, "{c}"),
        }
    }
}

/// Lower-cases a DNS name and strips one trailing dot; `None` when it is not a plausible
/// host name (labels of `[a-z0-9_-]`, 1..=63 bytes each, at most 253 bytes in all).
pub fn normalize_name(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return None;
    }
    for label in name.split('.') {
        if label.is_empty()
            || label.len() > 63
            || !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return None;
        }
    }
    Some(name.to_ascii_lowercase())
}

/// A destination host as the guest named it: a DNS name or an IP literal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A normalised DNS name.
    Name(String),
    /// An IP literal (normalised).
    Ip(IpAddr),
}

impl Host {
    /// Parses a host as it appears in a URL or CONNECT authority (IPv6 in brackets or bare).
    pub fn parse(s: &str) -> Option<Self> {
        let inner = s
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .unwrap_or(s);
        if let Ok(ip) = inner.parse::<IpAddr>() {
            return Some(Self::Ip(canonical_ip(ip)));
        }
        if inner.len() != s.len() {
            return None;
        }
        normalize_name(s).map(Self::Name)
    }

    /// The name, if this is a name.
    pub fn name(&self) -> Option<&str> {
        match self {
            Self::Name(n) => Some(n),
            Self::Ip(_) => None,
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name(n) => f.write_str(n),
            Self::Ip(IpAddr::V6(a)) => write!(f, "[{a}]"),
            Self::Ip(a) => write!(f, "{a}"),
        }
    }
}

/// One allow or deny rule: `HOST[:PORT]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The host part.
    pub host: HostPattern,
    /// The port, `None` for every port.
    pub port: Option<u16>,
}

impl Rule {
    /// Parses `HOST[:PORT]`: HOST is a name, `*.suffix`, `*`, an IP address (IPv6 in brackets
    /// when a port follows) or a CIDR; PORT is 1..=65535 or `*`.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(PolicyError::Empty);
        }
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            match rest.split_once(']') {
                Some((h, "")) => (h, None),
                Some((h, p)) => match p.strip_prefix(':') {
                    Some(p) => (h, Some(p)),
                    None => {
                        return Err(PolicyError::Host {
                            rule: text.into(),
                            host: text.into(),
                            why: "unexpected text after `]`",
                        })
                    }
                },
                None => {
                    return Err(PolicyError::Host {
                        rule: text.into(),
                        host: text.into(),
                        why: "missing `]`",
                    })
                }
            }
        } else if text.matches(':').count() > 1 {
            (text, None) // bare IPv6 address or range, no port
        } else {
            match text.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (text, None),
            }
        };
        let host_pat = HostPattern::parse(host).map_err(|why| PolicyError::Host {
            rule: text.into(),
            host: host.into(),
            why,
        })?;
        let port = match port {
            None | Some("*") => None,
            Some(p) => Some(parse_port(p).ok_or_else(|| PolicyError::Port {
                rule: text.into(),
                port: p.into(),
            })?),
        };
        Ok(Self {
            host: host_pat,
            port,
        })
    }

    fn port_matches(&self, port: u16) -> bool {
        self.port.is_none_or(|p| p == port)
    }

    /// Whether this rule *names* `ip` for the special-range check: an IP/CIDR rule containing
    /// it, or an exact `localhost` / `*.localhost`-style name rule for a loopback address when
    /// the guest asked for that name.
    fn names_addr(&self, host: &Host, ip: IpAddr) -> bool {
        match &self.host {
            HostPattern::Net(c) => c.contains(ip),
            HostPattern::Exact(n) => {
                ip.is_loopback()
                    && (n == "localhost" || n.ends_with(".localhost"))
                    && host.name() == Some(n.as_str())
            }
            _ => false,
        }
    }
}

/// Parses a decimal port in 1..=65535.
pub fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse::<u16>().ok().filter(|&p| p != 0)
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.port, &self.host) {
            // An IPv6 range with a port: brackets around the range.
            (Some(p), HostPattern::Net(c)) if c.addr.is_ipv6() && c.prefix < 128 => {
                write!(f, "[{}/{}]:{p}", c.addr, c.prefix)
            }
            (Some(p), h) => write!(f, "{h}:{p}"),
            (None, h) => write!(f, "{h}"),
        }
    }
}

/// Per-sandbox limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Guest connections served at once (proxy and transparent connections together).
    pub max_connections: usize,
    /// Bytes in both directions over the sandbox's life; `None` is unlimited.
    pub max_total_bytes: Option<u64>,
    /// New upstream connections per second (token bucket with a burst of the same size).
    pub max_new_connections_per_sec: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 128,
            max_total_bytes: Some(4 << 30),
            max_new_connections_per_sec: 50,
        }
    }
}

/// Why a connection was denied: the rule (or built-in check) and a sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// The rule that denied, e.g. `deny *.example.com`, `default deny`, `builtin: loopback`.
    pub rule: String,
    /// What was checked, e.g. `address 127.0.0.1 of localhost is loopback`.
    pub reason: String,
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "denied by rule `{}`: {}", self.rule, self.reason)
    }
}

/// The allow and deny lists and the limits of one sandbox. The default denies everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Allow rules (default deny: something must match).
    pub allow: Vec<Rule>,
    /// Deny rules (checked first).
    pub deny: Vec<Rule>,
    /// Per-sandbox limits.
    pub limits: Limits,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
    #[serde(default)]
    limits: Limits,
}

impl Policy {
    /// A policy from rule texts (`--allow-host` / `--deny-host` values).
    pub fn from_rules<A: AsRef<str>, D: AsRef<str>>(
        allow: &[A],
        deny: &[D],
    ) -> Result<Self, PolicyError> {
        Ok(Self {
            allow: allow
                .iter()
                .map(|r| Rule::parse(r.as_ref()))
                .collect::<Result<_, _>>()?,
            deny: deny
                .iter()
                .map(|r| Rule::parse(r.as_ref()))
                .collect::<Result<_, _>>()?,
            limits: Limits::default(),
        })
    }

    /// Adds an allow rule.
    pub fn allow(mut self, rule: &str) -> Result<Self, PolicyError> {
        self.allow.push(Rule::parse(rule)?);
        Ok(self)
    }

    /// Adds a deny rule.
    pub fn deny(mut self, rule: &str) -> Result<Self, PolicyError> {
        self.deny.push(Rule::parse(rule)?);
        Ok(self)
    }

    /// Parses the TOML policy format (docs/EGRESS.md): `allow = [..]`, `deny = [..]`,
    /// `[limits]`. `origin` names the source in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, PolicyError> {
        let file: PolicyFile = toml::from_str(text).map_err(|source| PolicyError::Toml {
            path: origin.into(),
            source,
        })?;
        let parse = |list: &'static str, rules: &[String]| -> Result<Vec<Rule>, PolicyError> {
            rules
                .iter()
                .map(|r| {
                    Rule::parse(r).map_err(|e| PolicyError::FileRule {
                        path: origin.into(),
                        list,
                        rule: r.clone(),
                        source: Box::new(e),
                    })
                })
                .collect()
        };
        Ok(Self {
            allow: parse("allow", &file.allow)?,
            deny: parse("deny", &file.deny)?,
            limits: file.limits,
        })
    }

    /// Reads and parses a TOML policy file (`--egress-policy FILE`).
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Adds the rules of `other` after this policy's (CLI flags on top of a file).
    pub fn merge(&mut self, other: Policy) {
        self.allow.extend(other.allow);
        self.deny.extend(other.deny);
    }

    /// The name-level check, before resolution: deny rules, then allow rules. Returns the
    /// allow rule that matched.
    pub fn check_target(&self, host: &Host, port: u16) -> Result<&Rule, Denial> {
        if let Some(r) = self
            .deny
            .iter()
            .find(|r| r.port_matches(port) && r.host.matches(host))
        {
            return Err(Denial {
                rule: format!("deny {r}"),
                reason: format!("{host}:{port} matches a deny rule"),
            });
        }
        self.allow
            .iter()
            .find(|r| r.port_matches(port) && r.host.matches(host))
            .ok_or_else(|| Denial {
                rule: "default deny".into(),
                reason: format!("no allow rule matches {host}:{port}"),
            })
    }

    /// The address-level check of one address `host` resolved to (or its IP literal): deny
    /// IP/CIDR rules, then the special ranges (and `own`, the host's own addresses), which
    /// only a rule naming the address lets through.
    pub fn check_addr(
        &self,
        host: &Host,
        ip: IpAddr,
        port: u16,
        own: &[IpAddr],
    ) -> Result<(), Denial> {
        let ip = canonical_ip(ip);
        let as_host = Host::Ip(ip);
        if let Some(r) = self.deny.iter().find(|r| {
            r.port_matches(port)
                && matches!(r.host, HostPattern::Net(_))
                && r.host.matches(&as_host)
        }) {
            return Err(Denial {
                rule: format!("deny {r}"),
                reason: format!("address {ip} of {host} matches a deny rule"),
            });
        }
        let class = special_class(ip).or_else(|| {
            own.iter()
                .any(|o| canonical_ip(*o) == ip)
                .then_some("one of the host's own addresses")
        });
        if let Some(class) = class {
            let named = self
                .allow
                .iter()
                .any(|r| r.port_matches(port) && r.names_addr(host, ip));
            if !named {
                return Err(Denial {
                    rule: format!("builtin: {class}"),
                    reason: format!(
                        "address {ip} of {host} is {class}; only an allow rule naming the address or range permits it"
                    ),
                });
            }
        }
        Ok(())
    }
}

/// The class of a special (non-public) address, `None` for a public one.
pub fn special_class(ip: IpAddr) -> Option<&'static str> {
    match canonical_ip(ip) {
        IpAddr::V4(a) => {
            let o = a.octets();
            let n = u32::from(a);
            let inr = |base: u32, prefix: u8| n & mask32(prefix) == base;
            if a.is_loopback() {
                Some("loopback")
            } else if a.is_private() {
                Some("private")
            } else if a.is_link_local() {
                Some("link-local")
            } else if a.is_multicast() {
                Some("multicast")
            } else if o[0] == 0 {
                Some("unspecified")
            } else if a.is_broadcast() || o[0] >= 240 {
                Some("reserved")
            } else if inr(0x6440_0000, 10) {
                Some("shared address space")
            } else if inr(0xc000_0000, 24)
                || inr(0xc000_0200, 24)
                || inr(0xc612_0000, 15)
                || inr(0xc633_6400, 24)
                || inr(0xcb00_7100, 24)
            {
                Some("reserved")
            } else {
                None
            }
        }
        IpAddr::V6(a) => {
            let n = u128::from(a);
            let inr = |base: u128, prefix: u8| n & mask128(prefix) == base;
            if a.is_loopback() {
                Some("loopback")
            } else if a.is_unspecified() {
                Some("unspecified")
            } else if inr(0xfe80 << 112, 10) {
                Some("link-local")
            } else if inr(0xfc00 << 112, 7) || inr(0xfec0 << 112, 10) {
                Some("private")
            } else if a.is_multicast() {
                Some("multicast")
            } else if inr(0x0064_ff9b << 96, 96)
                || inr(0x0064_ff9b_0001 << 80, 48)
                || inr(0x2001_0db8 << 96, 32)
                || inr(0x2002 << 112, 16)
                || inr(0x2001 << 112, 32)
                || inr(0, 96)
            {
                Some("reserved")
            } else {
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> Host {
        Host::parse(s).unwrap()
    }

    #[test]
    fn parses_rules() {
        let r = Rule::parse("Example.COM.:443").unwrap();
        assert_eq!(r.host, HostPattern::Exact("example.com".into()));
        assert_eq!(r.port, Some(443));
        assert_eq!(
            Rule::parse("*.pypi.org").unwrap().host,
            HostPattern::Suffix("pypi.org".into())
        );
        assert_eq!(Rule::parse("*:25").unwrap().host, HostPattern::Any);
        assert_eq!(
            Rule::parse("10.0.0.0/8:5432").unwrap().to_string(),
            "10.0.0.0/8:5432"
        );
        assert_eq!(Rule::parse("[::1]:80").unwrap().to_string(), "[::1]:80");
        assert_eq!(Rule::parse("fd00::/8").unwrap().to_string(), "fd00::/8");
        assert_eq!(
            Rule::parse("[fd00::/8]:443").unwrap().to_string(),
            "[fd00::/8]:443"
        );
        assert_eq!(Rule::parse("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        for bad in [
            "",
            "a:0",
            "a:65536",
            "a:x",
            "*.",
            "a..b",
            "1.2.3.4/33",
            "[::1",
            "a b",
            "-:1:",
        ] {
            assert!(Rule::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn suffix_matches_strict_subdomains() {
        let p = HostPattern::parse("*.example.com").unwrap();
        assert!(p.matches(&host("a.example.com")));
        assert!(p.matches(&host("a.b.example.com")));
        assert!(!p.matches(&host("example.com")));
        assert!(!p.matches(&host("badexample.com")));
    }

    #[test]
    fn default_deny_and_deny_first() {
        let p = Policy::from_rules(
            &["*.example.com", "api.example.com:443"],
            &["bad.example.com"],
        )
        .unwrap();
        assert!(p.check_target(&host("a.example.com"), 80).is_ok());
        let d = p.check_target(&host("bad.example.com"), 443).unwrap_err();
        assert_eq!(d.rule, "deny bad.example.com");
        let d = p.check_target(&host("other.org"), 443).unwrap_err();
        assert_eq!(d.rule, "default deny");
    }

    #[test]
    fn special_addresses_need_a_naming_rule() {
        let p = Policy::from_rules(&["*"], &[] as &[&str]).unwrap();
        let pubip: IpAddr = "93.184.216.34".parse().unwrap();
        assert!(p.check_addr(&host("x.org"), pubip, 80, &[]).is_ok());
        for ip in [
            "127.0.0.1",
            "10.1.1.1",
            "169.254.169.254",
            "224.0.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "0.0.0.0",
            "100.64.0.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(p.check_addr(&host("x.org"), ip, 80, &[]).is_err(), "{ip}");
        }
        // The host's own addresses.
        assert!(p.check_addr(&host("x.org"), pubip, 80, &[pubip]).is_err());
        let p = Policy::from_rules(&["10.0.0.0/8:5432", "localhost"], &[] as &[&str]).unwrap();
        let ten: IpAddr = "10.2.3.4".parse().unwrap();
        assert!(p.check_addr(&host("db"), ten, 5432, &[]).is_ok());
        assert!(p.check_addr(&host("db"), ten, 5433, &[]).is_err());
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(p.check_addr(&host("localhost"), lo, 1, &[]).is_ok());
        // A name rule other than localhost never lets a loopback answer through (rebinding).
        let p = Policy::from_rules(&["evil.com"], &[] as &[&str]).unwrap();
        assert!(p.check_addr(&host("evil.com"), lo, 80, &[]).is_err());
    }

    #[test]
    fn toml_policy() {
        let p = Policy::from_toml(
            "allow = [\"pypi.org:443\", \"*.github.com\"]\ndeny = [\"*:25\"]\n[limits]\nmax_connections = 8\nmax_total_bytes = 1000\n",
            "test",
        )
        .unwrap();
        assert_eq!(p.allow.len(), 2);
        assert_eq!(p.limits.max_connections, 8);
        assert_eq!(p.limits.max_total_bytes, Some(1000));
        assert_eq!(p.limits.max_new_connections_per_sec, 50);
        assert!(Policy::from_toml("allow = [\"a:0\"]", "t").is_err());
        assert!(Policy::from_toml("allw = []", "t").is_err());
    }
}
