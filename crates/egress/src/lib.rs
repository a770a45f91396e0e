//! kiln-egress: the host side of a sandbox's network egress (issue 11).
//!
//! A guest reaches the network only through this proxy: guest TCP connections (to the proxy
//! port in the guest, or transparently redirected ones) are forwarded over vsock and served
//! here by [`EgressProxy`] against a default-deny [`Policy`], with per-sandbox [`Limits`], an
//! [`EgressLog`], and [`Secret`]s injected only into TLS connections to their hosts, which the
//! per-sandbox CA ([`SandboxCa`]) intercepts. docs/EGRESS.md describes the design.
//!
//! Modules: `policy` (rules, special ranges, TOML), `secrets` (placeholders, `--secret` specs,
//! header injection), `ca` (rcgen CA, rustls configs), `http` (bounded heads and bodies),
//! `limits`, `log`, `stream` (the [`EgressStream`] trait), `proxy` (the entry points).

pub mod ca;
pub mod http;
pub mod limits;
pub mod log;
pub mod policy;
pub mod proxy;
pub mod secrets;
pub mod stream;

pub use ca::{SandboxCa, UpstreamRoots};
pub use limits::LimitHit;
pub use log::{ConnKind, EgressLog, LogEntry, Verdict};
pub use policy::{Cidr, Denial, Host, HostPattern, Limits, Policy, PolicyError, Rule};
pub use proxy::{
    EgressConfig, EgressError, EgressProxy, HttpRequest, HttpResponse, Resolve, StaticResolver,
    SystemResolver, Timeouts,
};
pub use secrets::{Secret, SecretError, SecretSpec};
pub use stream::EgressStream;

/// The proxy port the guest's proxy variables point at (guest loopback).
pub const GUEST_PROXY_PORT: u16 = 3128;
/// The guest path of the CA bundle (host roots + sandbox CA): `SSL_CERT_FILE` and friends.
pub const GUEST_CA_BUNDLE: &str = "/etc/kiln/ca-bundle.pem";
/// The guest path of the sandbox CA certificate alone (`NODE_EXTRA_CA_CERTS`).
pub const GUEST_CA_CERT: &str = "/etc/kiln/egress-ca.pem";
/// `NO_PROXY`: the guest's own loopback only.
pub const GUEST_NO_PROXY: &str = "localhost,127.0.0.1,::1";

/// The proxy and CA-trust environment of a guest exec for `proxy_url` (e.g.
/// `http://127.0.0.1:3128`), without secrets (see [`EgressProxy::guest_env`]).
pub fn guest_proxy_env(proxy_url: &str) -> Vec<(String, String)> {
    let mut env = Vec::new();
    for k in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        env.push((k.to_string(), proxy_url.to_string()));
    }
    for k in ["NO_PROXY", "no_proxy"] {
        env.push((k.to_string(), GUEST_NO_PROXY.to_string()));
    }
    for k in [
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "GIT_SSL_CAINFO",
        "PIP_CERT",
    ] {
        env.push((k.to_string(), GUEST_CA_BUNDLE.to_string()));
    }
    env.push(("NODE_EXTRA_CA_CERTS".into(), GUEST_CA_CERT.into()));
    env
}

/// Parses the CLI's `--allow-host` / `--deny-host` value `HOST[:PORT]`.
pub fn parse_host_rule(s: &str) -> Result<Rule, PolicyError> {
    Rule::parse(s)
}

/// Parses the CLI's `--secret NAME@host[,host..]=env:VAR`.
pub fn parse_secret_spec(s: &str) -> Result<SecretSpec, SecretError> {
    SecretSpec::parse(s)
}
