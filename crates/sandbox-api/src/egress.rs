//! A sandbox's network egress (docs/EGRESS.md): the [`EgressSettings`] a [`SandboxConfig`]
//! carries, and the per-sandbox wiring of the `kiln-egress` proxy.
//!
//! With settings, a sandbox (booted, restored or forked) builds its own
//! [`kiln_egress::EgressProxy`] (own CA, limits and log), listens on vsock host port
//! [`kiln_proto::EGRESS_PORT`] where the agent forwards the guest's connections to
//! 127.0.0.1:3128, serves each accepted stream on a proxy thread (admitted against the policy's
//! `max_connections` before it is spawned), writes the CA files into the guest and adds the
//! proxy variables (and the secrets' placeholders) to every exec's environment, under the
//! caller's own variables. Without settings nothing listens: the guest has no egress.
//!
//! Policies are host configuration, never guest state: a restored or forked sandbox gets the
//! settings of its restore call, with a fresh CA and fresh secret placeholders.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

pub use kiln_egress::{
    ConnKind, EgressError, HttpRequest, HttpResponse, LogEntry, Policy, PolicyError, Resolve, Rule,
    SecretError, SecretSpec, StaticResolver, Timeouts, UpstreamRoots, Verdict,
};
use kiln_egress::{EgressConfig, EgressProxy, EgressStream, Secret};
use kiln_vmm::virtio::vsock::{VsockError, VsockListener, VsockStream};

use crate::config::{ConfigError, SandboxConfig};
use crate::error::SandboxError;
use crate::sandbox::Sandbox;

/// The proxy URL the guest's proxy variables name.
pub const GUEST_PROXY_URL: &str = "http://127.0.0.1:3128";
/// How often the accept thread checks whether its sandbox is gone.
const ACCEPT_POLL: Duration = Duration::from_millis(200);

/// One secret as configured: `name` (the guest env var), `value`, `hosts`. Its placeholder is
/// drawn per sandbox when the proxy is built.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretConfig {
    /// The guest environment variable carrying the placeholder.
    pub name: String,
    /// The value (host side only).
    pub value: String,
    /// Exact names or `*.suffix` the value may be sent to.
    pub hosts: Vec<String>,
}

impl fmt::Debug for SecretConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretConfig")
            .field("name", &self.name)
            .field("hosts", &self.hosts)
            .field("value", &"<redacted>")
            .finish()
    }
}

/// Egress of a sandbox: policy, secrets, upstream roots, resolver, timeouts.
#[derive(Clone, Default)]
pub struct EgressSettings {
    /// Allow/deny rules and limits.
    pub policy: Policy,
    /// Secrets injected into TLS requests to their hosts.
    pub secrets: Vec<SecretConfig>,
    /// Roots upstream certificates are verified against (the host's by default).
    pub upstream_roots: UpstreamRoots,
    /// Host-side resolver; `None` = the system's (`getaddrinfo`).
    pub resolver: Option<Arc<dyn Resolve>>,
    /// Timeouts of guest connections.
    pub timeouts: Timeouts,
}

impl fmt::Debug for EgressSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EgressSettings")
            .field("policy", &self.policy)
            .field("secrets", &self.secrets)
            .field("upstream_roots", &self.upstream_roots)
            .field("resolver", &self.resolver)
            .field("timeouts", &self.timeouts)
            .finish()
    }
}

impl PartialEq for EgressSettings {
    fn eq(&self, other: &Self) -> bool {
        let roots = |r: &UpstreamRoots| match r {
            UpstreamRoots::Native => None,
            UpstreamRoots::Pem(p) => Some(p.clone()),
        };
        let same_resolver = match (&self.resolver, &other.resolver) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        self.policy == other.policy
            && self.secrets == other.secrets
            && roots(&self.upstream_roots) == roots(&other.upstream_roots)
            && same_resolver
            && self.timeouts == other.timeouts
    }
}

impl Eq for EgressSettings {}

impl EgressSettings {
    /// Builds the `kiln-egress` secrets (fresh placeholders).
    fn build_secrets(&self) -> Result<Vec<Secret>, SecretError> {
        self.secrets
            .iter()
            .map(|s| Secret::new(&s.name, &s.value, &s.hosts))
            .collect()
    }

    /// Checks the secrets (names, values, hosts) without keeping anything.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.build_secrets()
            .map(|_| ())
            .map_err(|e| ConfigError::Invalid {
                field: "secrets",
                reason: e.to_string(),
            })
    }
}

/// Egress builders of [`SandboxConfig`].
impl SandboxConfig {
    fn egress_mut(&mut self) -> &mut EgressSettings {
        self.egress.get_or_insert_with(EgressSettings::default)
    }

    /// Gives the sandbox egress under `policy` (replacing an earlier policy; secrets and the
    /// other settings stay).
    pub fn egress(mut self, policy: Policy) -> Self {
        self.egress_mut().policy = policy;
        self
    }

    /// Adds a secret: the guest sees a placeholder in env var `name`; the proxy puts `value`
    /// in the headers of HTTPS requests to `hosts` (exact names or `*.suffix`) only, which it
    /// TLS-intercepts. The hosts must still be allowed by the policy. Enables egress (default
    /// deny) when no policy was set. Checked by [`SandboxConfig::validate`].
    pub fn secret<H: AsRef<str>>(mut self, name: &str, value: &str, hosts: &[H]) -> Self {
        self.egress_mut().secrets.push(SecretConfig {
            name: name.into(),
            value: value.into(),
            hosts: hosts.iter().map(|h| h.as_ref().to_owned()).collect(),
        });
        self
    }

    /// Sets the roots upstream TLS certificates of intercepted hosts are verified against
    /// (tests: a test CA). Enables egress (default deny) when no policy was set.
    pub fn egress_upstream_roots(mut self, roots: UpstreamRoots) -> Self {
        self.egress_mut().upstream_roots = roots;
        self
    }

    /// Sets the host-side resolver of the egress proxy (tests: a [`StaticResolver`]).
    pub fn egress_resolver(mut self, resolver: Arc<dyn Resolve>) -> Self {
        self.egress_mut().resolver = Some(resolver);
        self
    }

    /// Sets the egress proxy's timeouts.
    pub fn egress_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.egress_mut().timeouts = timeouts;
        self
    }
}

/// A [`VsockStream`] as an [`EgressStream`]: the proxy sets timeouts through `&self`, the
/// vsock handle through `&mut self`, so they are kept here and applied before each call.
struct GuestConn {
    stream: VsockStream,
    read_timeout: std::cell::Cell<Option<Duration>>,
    write_timeout: std::cell::Cell<Option<Duration>>,
}

impl GuestConn {
    fn new(stream: VsockStream) -> Self {
        Self {
            stream,
            read_timeout: std::cell::Cell::new(None),
            write_timeout: std::cell::Cell::new(None),
        }
    }
}

impl Read for GuestConn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(self.read_timeout.get())?;
        self.stream.read(buf)
    }
}

impl Write for GuestConn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.set_write_timeout(self.write_timeout.get())?;
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.set_write_timeout(self.write_timeout.get())?;
        self.stream.flush()
    }
}

impl EgressStream for GuestConn {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            stream: self.stream.try_clone()?,
            read_timeout: self.read_timeout.clone(),
            write_timeout: self.write_timeout.clone(),
        })
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.stream.shutdown(how)
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        if t == Some(Duration::ZERO) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "zero timeout"));
        }
        self.read_timeout.set(t);
        Ok(())
    }

    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        if t == Some(Duration::ZERO) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "zero timeout"));
        }
        self.write_timeout.set(t);
        Ok(())
    }
}

/// The egress of a running sandbox: its proxy and the environment execs get. Dropping it
/// (with the sandbox) ends the accept thread within [`ACCEPT_POLL`]; connections being
/// served end with the VM's vsock device.
pub(crate) struct Attached {
    proxy: EgressProxy,
    env: Vec<(String, String)>,
    stop: Arc<AtomicBool>,
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Attached {
    /// `caller`'s variables over the egress ones (the caller's win).
    pub(crate) fn exec_env(&self, caller: Vec<(String, String)>) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self
            .env
            .iter()
            .filter(|(k, _)| !caller.iter().any(|(c, _)| c == k))
            .cloned()
            .collect();
        env.extend(caller);
        env
    }
}

fn egress_err(vm: &str, op: &'static str, source: EgressError) -> SandboxError {
    SandboxError::Egress {
        vm: vm.to_owned(),
        op,
        source,
    }
}

/// Starts the egress of `sandbox` under `settings` (nothing without them): builds the proxy,
/// listens on [`kiln_proto::EGRESS_PORT`], writes the CA files into the guest. Called once
/// after boot and after every restore.
pub(crate) fn attach(
    sandbox: &Sandbox,
    settings: Option<&EgressSettings>,
) -> Result<(), SandboxError> {
    let Some(settings) = settings else {
        return Ok(());
    };
    let vm = sandbox.name();
    let secrets = settings.build_secrets().map_err(|e| {
        SandboxError::Config(ConfigError::Invalid {
            field: "secrets",
            reason: e.to_string(),
        })
    })?;
    let mut cfg = EgressConfig::new(settings.policy.clone());
    cfg.secrets = secrets;
    cfg.upstream_roots = settings.upstream_roots.clone();
    if let Some(r) = &settings.resolver {
        cfg.resolver = Arc::clone(r);
    }
    cfg.timeouts = settings.timeouts;
    cfg.label = vm.to_owned();
    let proxy =
        EgressProxy::new(cfg).map_err(|e| egress_err(vm, "starting the egress proxy", e))?;
    // A jailed VM's child bridges the port and hands each connection over (sandbox/jailed.rs).
    let source = match sandbox.jail_acceptor() {
        Some(a) => Source::Jailed(a),
        None => Source::Vsock(
            sandbox
                .vsock_host()
                .ok_or_else(|| SandboxError::Protocol {
                    vm: vm.to_owned(),
                    op: "starting the egress proxy",
                    message: "the VM has no vsock device".into(),
                })?
                .listen(kiln_proto::EGRESS_PORT)
                .map_err(|source| SandboxError::Vsock {
                    vm: vm.to_owned(),
                    op: "listening for egress connections",
                    source,
                })?,
        ),
    };
    // Always: the exec environment's trust variables point at these files.
    write_guest_files(sandbox, &proxy)?;
    let stop = Arc::new(AtomicBool::new(false));
    let (p2, s2) = (proxy.clone(), Arc::clone(&stop));
    thread::Builder::new()
        .name(format!("{vm}-egress"))
        .spawn(move || match source {
            Source::Vsock(listener) => accept_loop(&listener, &p2, &s2),
            Source::Jailed(a) => jailed_accept_loop(&a, &p2, &s2),
        })
        .map_err(|source| SandboxError::Io {
            vm: vm.to_owned(),
            op: "spawning the egress accept thread",
            source,
        })?;
    let env = proxy.guest_env(GUEST_PROXY_URL);
    sandbox.set_egress(Attached { proxy, env, stop });
    tracing::debug!(vm, "egress proxy listening");
    Ok(())
}

/// The CA bundle and certificate, written where the exec environment's trust variables point.
fn write_guest_files(sandbox: &Sandbox, proxy: &EgressProxy) -> Result<(), SandboxError> {
    for (path, content) in proxy.guest_files() {
        if let Some((dir, _)) = path.rsplit_once('/') {
            sandbox.mkdir(dir)?;
        }
        sandbox.write_file(path, content.as_bytes())?;
    }
    Ok(())
}

/// Where the guest's egress connections come from.
enum Source {
    /// This process's vsock endpoint.
    Vsock(VsockListener),
    /// A jailed VM's bridged port (unix sockets).
    Jailed(kiln_jail::Acceptor),
}

/// [`accept_loop`] for a jailed VM: the child hands over each guest connection.
fn jailed_accept_loop(a: &kiln_jail::Acceptor, proxy: &EgressProxy, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match a.accept(kiln_proto::EGRESS_PORT, ACCEPT_POLL) {
            Ok(s) => {
                let _ = proxy.spawn_http(s);
            }
            Err(kiln_jail::JailError::Timeout { .. }) => {}
            Err(e) => {
                tracing::debug!(error = %e, "egress accept loop ends");
                return;
            }
        }
    }
}

fn accept_loop(listener: &VsockListener, proxy: &EgressProxy, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept(ACCEPT_POLL) {
            // Over the limit the guest got its 403 and the entry is logged.
            Ok(s) => {
                let _ = proxy.spawn_http(GuestConn::new(s));
            }
            Err(VsockError::AcceptTimeout { .. }) => {}
            Err(e) => {
                tracing::debug!(error = %e, "egress accept loop ends");
                return;
            }
        }
    }
}

/// Egress calls of [`Sandbox`].
impl Sandbox {
    /// Benchmarks only (`cargo xtask bench egress`'s raw-vsock baseline): listens on the
    /// egress vsock port itself, so the agent's forwarded guest connections arrive as plain
    /// vsock streams with no proxy in between. Only for a sandbox without egress settings
    /// (with them the proxy holds the port: [`SandboxError::Vsock`]).
    #[doc(hidden)]
    pub fn egress_raw_listener(&self) -> Result<VsockListener, SandboxError> {
        let vm = self.name().to_owned();
        let host = self.vsock_host().ok_or_else(|| SandboxError::Protocol {
            vm: vm.clone(),
            op: "listening on the egress port",
            message: "the VM has no vsock device".into(),
        })?;
        host.listen(kiln_proto::EGRESS_PORT)
            .map_err(|source| SandboxError::Vsock {
                vm,
                op: "listening on the egress port",
                source,
            })
    }

    /// The egress connection log (oldest first; empty without egress).
    pub fn egress_log(&self) -> Vec<LogEntry> {
        self.egress()
            .map(|a| a.proxy.log().entries())
            .unwrap_or_default()
    }

    /// The host makes `req` on the sandbox's behalf, under its policy, limits, secrets (by
    /// placeholder, as the guest would send them) and log. Without egress:
    /// [`SandboxError::InvalidArgument`]. A denied destination is
    /// [`SandboxError::Egress`] with [`EgressError::Denied`].
    pub fn http_request(&self, req: HttpRequest) -> Result<HttpResponse, SandboxError> {
        let Some(a) = self.egress() else {
            return Err(SandboxError::InvalidArgument {
                vm: self.name().to_owned(),
                op: "http_request",
                message: "the sandbox has no egress policy".into(),
            });
        };
        a.proxy
            .http_request(&req)
            .map_err(|e| egress_err(self.name(), "http_request", e))
    }

    /// The placeholder the guest sees for secret `name` (`None`: no such secret).
    pub fn secret_placeholder(&self, name: &str) -> Option<String> {
        self.egress()?
            .proxy
            .secrets()
            .iter()
            .find(|s| s.name() == name)
            .map(|s| s.placeholder().to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_env_wins_over_the_proxy_variables() {
        let a = Attached {
            proxy: EgressProxy::new(EgressConfig::new(Policy::default())).unwrap(),
            env: vec![
                ("HTTP_PROXY".into(), GUEST_PROXY_URL.into()),
                ("NO_PROXY".into(), "localhost".into()),
            ],
            stop: Arc::new(AtomicBool::new(false)),
        };
        let env = a.exec_env(vec![
            ("NO_PROXY".into(), "*".into()),
            ("A".into(), "1".into()),
        ]);
        assert_eq!(
            env,
            vec![
                ("HTTP_PROXY".to_string(), GUEST_PROXY_URL.to_string()),
                ("NO_PROXY".to_string(), "*".to_string()),
                ("A".to_string(), "1".to_string()),
            ]
        );
    }

    #[test]
    fn settings_compare_and_redact_and_validate() {
        let c = SandboxConfig::new()
            .egress(Policy::default().allow("example.com:443").unwrap())
            .secret("API_KEY", "s3cr3t-value", &["example.com"]);
        let e = c.egress.as_ref().unwrap();
        assert_eq!(e.policy.allow.len(), 1);
        assert!(!format!("{c:?}").contains("s3cr3t-value"));
        assert_eq!(c.clone(), c);
        c.validate_for_restore().unwrap();
        let bad = SandboxConfig::new().secret("1BAD", "v", &["example.com"]);
        let err = bad.validate_for_restore().unwrap_err();
        assert!(err.to_string().contains("secrets"), "{err}");
        let no_host = SandboxConfig::new().secret("K", "v", &[] as &[&str]);
        assert!(no_host.validate_for_restore().is_err());
    }
}
