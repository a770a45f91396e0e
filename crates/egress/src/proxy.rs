//! The egress proxy of one sandbox: the HTTP/1.1 proxy entry (absolute-form requests and
//! CONNECT), the transparent entry (a raw TCP connection to NAME:PORT), `http_request` for the
//! host, and what they share: policy check, host-side resolution with address re-check,
//! connecting to the checked address, limits, TLS interception for secret hosts, the log.
//!
//! Threading: blocking, one thread per guest connection (plus one per tunnel for the second
//! direction), admitted against `max_connections` before the thread is spawned.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::ServerName;

use crate::ca::{self, CaError, SandboxCa, UpstreamRoots};
use crate::http::{
    body_framing, header, is_timeout, parse_request_head, parse_response_head, relay_body,
    simple_response, strip_hop_by_hop, write_request_head, write_response_head, BufConn, Framing,
    HttpError, Meter, RequestHead,
};
use crate::limits::{LimitHit, Limiter, Permit};
use crate::log::{ConnKind, EgressLog, LogEntry, Verdict, DEFAULT_LOG_CAPACITY};
use crate::policy::{parse_port, Denial, Host, Policy};
use crate::secrets::{inject_header, Secret};
use crate::stream::{EgressStream, Timed};

/// Most addresses of one name considered.
const MAX_ADDRS: usize = 16;
/// Default bound of an `http_request` response body.
pub const DEFAULT_MAX_RESPONSE: u64 = 64 << 20;

/// Errors of the proxy's public operations.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// The CA or a TLS configuration could not be built.
    #[error("setting up egress TLS")]
    Ca(#[source] CaError),
    /// The policy denied the destination.
    #[error("egress {0}")]
    Denied(Denial),
    /// A per-sandbox limit was hit.
    #[error("egress {0}")]
    Limit(LimitHit),
    /// The URL is not `http(s)://host[:port][/path]`.
    #[error("invalid URL {url:?}: {why}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong.
        why: &'static str,
    },
    /// A request header name or value is invalid.
    #[error("invalid request header {0:?}")]
    Header(String),
    /// The name did not resolve.
    #[error("resolving {name}")]
    Resolve {
        /// The name.
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// No checked address accepted the connection.
    #[error("connecting to {addr}")]
    Connect {
        /// The (last) address tried.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The exchange with the destination failed (TLS, HTTP, I/O, timeout).
    #[error("HTTP exchange with {host}")]
    Exchange {
        /// The destination.
        host: String,
        /// The cause.
        #[source]
        source: HttpError,
    },
    /// A connection thread could not be spawned.
    #[error("spawning an egress connection thread")]
    Spawn(#[source] io::Error),
}

/// Resolves names on the host.
pub trait Resolve: Send + Sync + fmt::Debug {
    /// The addresses of `name` (port given for `getaddrinfo`).
    fn resolve(&self, name: &str, port: u16) -> io::Result<Vec<IpAddr>>;
}

/// The system resolver (`getaddrinfo`).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, name: &str, port: u16) -> io::Result<Vec<IpAddr>> {
        Ok((name, port).to_socket_addrs()?.map(|a| a.ip()).collect())
    }
}

/// A fixed name table (tests; also a way to pin names). Unknown names fail to resolve.
#[derive(Debug, Default, Clone)]
pub struct StaticResolver {
    map: HashMap<String, Vec<IpAddr>>,
}

impl StaticResolver {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `name` resolving to `addrs`.
    pub fn with(mut self, name: &str, addrs: &[IpAddr]) -> Self {
        self.map.insert(name.to_ascii_lowercase(), addrs.to_vec());
        self
    }
}

impl Resolve for StaticResolver {
    fn resolve(&self, name: &str, _port: u16) -> io::Result<Vec<IpAddr>> {
        self.map
            .get(name)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "name not in the table"))
    }
}

/// Timeouts of guest connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// A whole request head (and a TLS handshake) must arrive within this.
    pub head: Duration,
    /// Connecting to the destination.
    pub connect: Duration,
    /// A connection with no byte in either direction for this long is closed.
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            head: Duration::from_secs(10),
            connect: Duration::from_secs(10),
            idle: Duration::from_secs(120),
        }
    }
}

/// Everything a sandbox's proxy is built from.
#[derive(Debug, Clone)]
pub struct EgressConfig {
    /// Allow/deny rules and limits.
    pub policy: Policy,
    /// Secrets (their hosts are TLS-intercepted).
    pub secrets: Vec<Secret>,
    /// Roots upstream certificates are verified against.
    pub upstream_roots: UpstreamRoots,
    /// Host-side resolver.
    pub resolver: Arc<dyn Resolve>,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Log entries kept.
    pub log_capacity: usize,
    /// Names the CA (e.g. the sandbox id).
    pub label: String,
}

impl EgressConfig {
    /// A configuration with `policy`, no secrets, the host's roots and resolver.
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            secrets: Vec::new(),
            upstream_roots: UpstreamRoots::Native,
            resolver: Arc::new(SystemResolver),
            timeouts: Timeouts::default(),
            log_capacity: DEFAULT_LOG_CAPACITY,
            label: "sandbox".into(),
        }
    }
}

/// A request the host makes on the sandbox's behalf (`Sandbox::http_request`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    /// Method, e.g. `GET`.
    pub method: String,
    /// `http://` or `https://` URL.
    pub url: String,
    /// Header fields (placeholders in them are replaced for secret hosts over HTTPS).
    pub headers: Vec<(String, String)>,
    /// Body (sent with `Content-Length`).
    pub body: Vec<u8>,
    /// Bound of each connect, read and write, and of the response head.
    pub timeout: Duration,
    /// Largest response body accepted.
    pub max_response_bytes: u64,
}

impl HttpRequest {
    /// A `GET` of `url` with a 30 s timeout.
    pub fn get(url: &str) -> Self {
        Self {
            method: "GET".into(),
            url: url.into(),
            headers: Vec::new(),
            body: Vec::new(),
            timeout: Duration::from_secs(30),
            max_response_bytes: DEFAULT_MAX_RESPONSE,
        }
    }
}

/// The response of [`EgressProxy::http_request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Header fields (values lossily UTF-8).
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked).
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct Inner {
    policy: Policy,
    secrets: Vec<Secret>,
    ca: SandboxCa,
    client_tls: Arc<rustls::ClientConfig>,
    resolver: Arc<dyn Resolve>,
    timeouts: Timeouts,
    limiter: Arc<Limiter>,
    log: EgressLog,
    own_addrs: Vec<IpAddr>,
}

/// The proxy of one sandbox; cheap to clone (shared state).
#[derive(Clone)]
pub struct EgressProxy {
    inner: Arc<Inner>,
}

impl fmt::Debug for EgressProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EgressProxy")
            .field("policy", &self.inner.policy)
            .field("secrets", &self.inner.secrets)
            .finish_non_exhaustive()
    }
}

/// Why opening a destination failed.
enum OpenError {
    Denied(Denial, Option<IpAddr>),
    Limit(LimitHit),
    Failed(EgressError),
}

struct Opened {
    stream: TcpStream,
    addr: IpAddr,
    rule: String,
}

/// Counts bytes into one direction's total and charges the sandbox budget.
struct Count<'a> {
    limiter: &'a Limiter,
    n: &'a mut u64,
}

impl Meter for Count<'_> {
    fn charge(&mut self, n: usize) -> Result<(), HttpError> {
        self.limiter
            .charge(n as u64)
            .map_err(|hit| HttpError::Malformed(hit.rule()))?;
        *self.n += n as u64;
        Ok(())
    }
}

/// The host's own interface addresses (denied unless named by a rule).
fn host_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for ifa in addrs {
            if let Some(a) = ifa.address {
                if let Some(v4) = a.as_sockaddr_in() {
                    out.push(IpAddr::V4(v4.ip()));
                } else if let Some(v6) = a.as_sockaddr_in6() {
                    out.push(IpAddr::V6(v6.ip()));
                }
            }
        }
    }
    out
}

fn now_entry(kind: ConnKind, name: String, port: u16) -> LogEntry {
    LogEntry {
        time: SystemTime::now(),
        kind,
        name,
        addr: None,
        port,
        bytes_up: 0,
        bytes_down: 0,
        verdict: Verdict::Denied,
        rule: String::new(),
        detail: None,
    }
}

/// Splits `host:port` (IPv6 in brackets).
pub fn split_authority(s: &str) -> Option<(Host, Option<u16>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let host = Host::parse(&format!("[{h}]"))?;
        return match after {
            "" => Some((host, None)),
            p => Some((host, Some(parse_port(p.strip_prefix(':')?)?))),
        };
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Some((Host::parse(h)?, Some(parse_port(p)?))),
        Some(_) => None,
        None => Some((Host::parse(s)?, None)),
    }
}

/// A parsed absolute URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// `https`?
    pub tls: bool,
    /// Host.
    pub host: Host,
    /// Port (default 80 / 443).
    pub port: u16,
    /// Origin-form target: path and query, at least `/`.
    pub path: String,
    /// The `Host` header value.
    pub authority: String,
}

/// Parses `http(s)://host[:port][/path][?query]` (no userinfo; fragment dropped).
pub fn parse_url(url: &str) -> Result<Url, &'static str> {
    let (tls, rest) = if let Some(r) = strip_prefix_ci(url, "http://") {
        (false, r)
    } else if let Some(r) = strip_prefix_ci(url, "https://") {
        (true, r)
    } else {
        return Err("not an http:// or https:// URL");
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (auth, tail) = rest.split_at(end);
    if auth.contains('@') {
        return Err("userinfo in URLs is not supported");
    }
    let (host, port) = split_authority(auth).ok_or("invalid host or port")?;
    let port = port.unwrap_or(if tls { 443 } else { 80 });
    let tail = tail.split('#').next().unwrap_or_default();
    let path = if tail.starts_with('/') {
        tail.to_string()
    } else {
        format!("/{tail}")
    };
    if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err("control characters or spaces in the path");
    }
    let default = if tls { 443 } else { 80 };
    let authority = if port == default {
        host.to_string()
    } else {
        format!("{host}:{port}")
    };
    Ok(Url {
        tls,
        host,
        port,
        path,
        authority,
    })
}

fn strip_prefix_ci<'a>(s: &'a str, p: &str) -> Option<&'a str> {
    (s.len() >= p.len() && s.is_char_boundary(p.len()) && s[..p.len()].eq_ignore_ascii_case(p))
        .then(|| &s[p.len()..])
}

fn denial_body(host: &Host, port: u16, d: &Denial) -> String {
    format!("kiln egress: {host}:{port} {d}\n")
}

impl EgressProxy {
    /// Builds the proxy: generates the sandbox CA and the upstream TLS configuration, reads the
    /// host's own addresses.
    pub fn new(config: EgressConfig) -> Result<Self, EgressError> {
        let ca = SandboxCa::generate(&config.label).map_err(EgressError::Ca)?;
        let client_tls = ca::client_config(&config.upstream_roots).map_err(EgressError::Ca)?;
        Ok(Self {
            inner: Arc::new(Inner {
                limiter: Limiter::new(config.policy.limits),
                policy: config.policy,
                secrets: config.secrets,
                ca,
                client_tls,
                resolver: config.resolver,
                timeouts: config.timeouts,
                log: EgressLog::new(config.log_capacity),
                own_addrs: host_addresses(),
            }),
        })
    }

    /// The connection log (`Sandbox::egress_log()`).
    pub fn log(&self) -> &EgressLog {
        &self.inner.log
    }

    /// The sandbox CA.
    pub fn ca(&self) -> &SandboxCa {
        &self.inner.ca
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.inner.policy
    }

    /// The secrets.
    pub fn secrets(&self) -> &[Secret] {
        &self.inner.secrets
    }

    /// Guest connections being served now.
    pub fn active_connections(&self) -> usize {
        self.inner.limiter.active()
    }

    /// Bytes charged against `max_total_bytes` so far.
    pub fn total_bytes(&self) -> u64 {
        self.inner.limiter.bytes()
    }

    /// Serves one guest HTTP proxy connection on this thread until it ends. Never panics on
    /// guest input; every outcome is logged.
    pub fn serve_http<S: EgressStream>(&self, client: S) {
        match self.inner.limiter.admit() {
            Ok(permit) => self.inner.handle_http(client, permit),
            Err(hit) => self.inner.refuse(client, hit, true),
        }
    }

    /// Admits one guest HTTP proxy connection and serves it on a new thread. Over
    /// `max_connections` the guest gets a 403 and `Err(Limit)`.
    pub fn spawn_http<S: EgressStream>(&self, client: S) -> Result<(), EgressError> {
        let permit = match self.inner.limiter.admit() {
            Ok(p) => p,
            Err(hit) => {
                self.inner.refuse(client, hit, true);
                return Err(EgressError::Limit(hit));
            }
        };
        let inner = self.inner.clone();
        std::thread::Builder::new()
            .name("egress-http".into())
            .spawn(move || inner.handle_http(client, permit))
            .map(|_| ())
            .map_err(EgressError::Spawn)
    }

    /// Serves one transparent connection (the guest connected to `name:port`) on this thread:
    /// the same policy by name and port, no HTTP parsing (TLS to a secret host is intercepted).
    pub fn serve_raw<S: EgressStream>(&self, client: S, name: &str, port: u16) {
        match self.inner.limiter.admit() {
            Ok(permit) => self.inner.handle_raw(client, name, port, permit),
            Err(hit) => self.inner.refuse(client, hit, false),
        }
    }

    /// [`serve_raw`](Self::serve_raw) on a new thread, admitted first.
    pub fn spawn_raw<S: EgressStream>(
        &self,
        client: S,
        name: &str,
        port: u16,
    ) -> Result<(), EgressError> {
        let permit = match self.inner.limiter.admit() {
            Ok(p) => p,
            Err(hit) => {
                self.inner.refuse(client, hit, false);
                return Err(EgressError::Limit(hit));
            }
        };
        let inner = self.inner.clone();
        let name = name.to_string();
        std::thread::Builder::new()
            .name("egress-raw".into())
            .spawn(move || inner.handle_raw(client, &name, port, permit))
            .map(|_| ())
            .map_err(EgressError::Spawn)
    }

    /// Accepts HTTP proxy connections on `listener` on a new thread (development and tests;
    /// the sandbox feeds vsock streams to [`spawn_http`](Self::spawn_http) instead). The
    /// thread runs until the listener fails.
    pub fn serve_tcp(&self, listener: TcpListener) -> std::thread::JoinHandle<()> {
        let this = self.clone();
        std::thread::spawn(move || loop {
            match listener.accept() {
                Ok((s, _)) => {
                    let _ = this.spawn_http(s);
                }
                // EMFILE and friends: back off instead of spinning.
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        })
    }

    /// Makes `req` from the host under the sandbox's policy, limits, secrets and log.
    pub fn http_request(&self, req: &HttpRequest) -> Result<HttpResponse, EgressError> {
        self.inner.http_request(req)
    }

    /// The environment variables a guest exec gets: proxy variables for `proxy_url` (e.g.
    /// `http://127.0.0.1:3128`), `NO_PROXY` for the guest's own loopback only, the CA trust
    /// variables pointing at [`GUEST_CA_BUNDLE`](crate::GUEST_CA_BUNDLE) /
    /// [`GUEST_CA_CERT`](crate::GUEST_CA_CERT), and each secret's placeholder.
    pub fn guest_env(&self, proxy_url: &str) -> Vec<(String, String)> {
        let mut env = crate::guest_proxy_env(proxy_url);
        for s in &self.inner.secrets {
            env.push((s.name().to_string(), s.placeholder().to_string()));
        }
        env
    }

    /// The files to write into the guest before the first exec: the CA bundle (host roots +
    /// sandbox CA) and the sandbox CA alone.
    pub fn guest_files(&self) -> Vec<(&'static str, String)> {
        vec![
            (crate::GUEST_CA_BUNDLE, ca::guest_ca_bundle(&self.inner.ca)),
            (crate::GUEST_CA_CERT, self.inner.ca.cert_pem()),
        ]
    }
}

impl Inner {
    fn refuse<S: EgressStream>(&self, client: S, hit: LimitHit, http: bool) {
        let mut e = now_entry(ConnKind::Invalid, String::new(), 0);
        e.rule = hit.rule();
        self.log.push(e);
        if http {
            let _ = client.set_write_timeout(Some(Duration::from_secs(1)));
            let mut c = client;
            let _ = c.write_all(&simple_response(
                403,
                "Forbidden",
                &format!("kiln egress: denied by {hit}\n"),
            ));
            let _ = c.shutdown(Shutdown::Both);
        } else {
            let _ = client.shutdown(Shutdown::Both);
        }
    }

    /// Policy, rate limit, resolution, address re-check, connect to a checked address.
    fn open(&self, host: &Host, port: u16) -> Result<Opened, OpenError> {
        let rule = self
            .policy
            .check_target(host, port)
            .map_err(|d| OpenError::Denied(d, None))?;
        let rule = format!("allow {rule}");
        let addrs = match host {
            Host::Ip(ip) => vec![*ip],
            Host::Name(n) => {
                let mut a = self.resolve_bounded(n, port).map_err(|source| {
                    OpenError::Failed(EgressError::Resolve {
                        name: n.clone(),
                        source,
                    })
                })?;
                a.truncate(MAX_ADDRS);
                a
            }
        };
        let mut ok = Vec::new();
        let mut first_denial = None;
        for ip in addrs {
            let ip = crate::policy::canonical_ip(ip);
            match self.policy.check_addr(host, ip, port, &self.own_addrs) {
                Ok(()) => ok.push(ip),
                Err(d) => {
                    first_denial.get_or_insert((d, ip));
                }
            }
        }
        if ok.is_empty() {
            return Err(match first_denial {
                Some((d, ip)) => OpenError::Denied(d, Some(ip)),
                None => OpenError::Failed(EgressError::Resolve {
                    name: host.to_string(),
                    source: io::Error::new(io::ErrorKind::NotFound, "no address"),
                }),
            });
        }
        self.limiter.check_budget().map_err(OpenError::Limit)?;
        self.limiter.new_connection().map_err(OpenError::Limit)?;
        let mut last = None;
        for ip in ok {
            let sa = SocketAddr::new(ip, port);
            match TcpStream::connect_timeout(&sa, self.timeouts.connect) {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(Opened {
                        stream,
                        addr: ip,
                        rule,
                    });
                }
                Err(e) => last = Some((sa, e)),
            }
        }
        let (addr, source) = last.unwrap_or_else(|| {
            (
                SocketAddr::new(IpAddr::from([0, 0, 0, 0]), port),
                io::Error::other("no address"),
            )
        });
        Err(OpenError::Failed(EgressError::Connect { addr, source }))
    }

    /// Resolves on a helper thread so that a slow resolver cannot hold the connection past
    /// the connect timeout (the helper ends when `getaddrinfo` returns).
    fn resolve_bounded(&self, name: &str, port: u16) -> io::Result<Vec<IpAddr>> {
        let (tx, rx) = std::sync::mpsc::channel();
        let resolver = self.resolver.clone();
        let n = name.to_string();
        std::thread::Builder::new()
            .name("egress-dns".into())
            .spawn(move || {
                let _ = tx.send(resolver.resolve(&n, port));
            })?;
        rx.recv_timeout(self.timeouts.connect)
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "name resolution timed out"))?
    }

    /// Opens, logging a refusal into `entry`; on failure returns the status and body to send.
    fn open_logged(
        &self,
        host: &Host,
        port: u16,
        entry: &mut LogEntry,
    ) -> Result<Opened, (u16, &'static str, String)> {
        match self.open(host, port) {
            Ok(o) => {
                entry.verdict = Verdict::Allowed;
                entry.rule = o.rule.clone();
                entry.addr = Some(o.addr);
                Ok(o)
            }
            Err(OpenError::Denied(d, ip)) => {
                entry.rule = d.rule.clone();
                entry.detail = Some(d.reason.clone());
                entry.addr = ip;
                Err((403, "Forbidden", denial_body(host, port, &d)))
            }
            Err(OpenError::Limit(hit)) => {
                entry.rule = hit.rule();
                Err((
                    403,
                    "Forbidden",
                    format!("kiln egress: {host}:{port} denied by {hit}\n"),
                ))
            }
            Err(OpenError::Failed(e)) => {
                // The policy allowed it; the destination could not be reached.
                entry.verdict = Verdict::Allowed;
                entry.rule = self
                    .policy
                    .check_target(host, port)
                    .map(|r| format!("allow {r}"))
                    .unwrap_or_default();
                let msg = error_chain(&e);
                entry.detail = Some(msg.clone());
                Err((
                    502,
                    "Bad Gateway",
                    format!("kiln egress: {host}:{port}: {msg}\n"),
                ))
            }
        }
    }

    fn secrets_for(&self, host: &Host) -> Vec<&Secret> {
        self.secrets.iter().filter(|s| s.applies_to(host)).collect()
    }

    fn handle_http<S: EgressStream>(&self, client: S, _permit: Permit) {
        let _ = client.set_write_timeout(Some(self.timeouts.idle));
        let mut conn = BufConn::new(client);
        let head = match conn.read_head(self.timeouts.head, parse_request_head) {
            Ok(h) => h,
            Err(e) => {
                self.bad_request(&mut conn, &e);
                return;
            }
        };
        if head.method.eq_ignore_ascii_case("CONNECT") {
            self.handle_connect(conn, head);
        } else {
            self.handle_forward(conn, head);
        }
    }

    fn bad_request<T: Timed>(&self, conn: &mut BufConn<T>, e: &HttpError) {
        let (status, reason) = match e {
            HttpError::Closed | HttpError::Io(_) => (0, ""),
            HttpError::TooLarge => (431, "Request Header Fields Too Large"),
            HttpError::Timeout(_) => (408, "Request Timeout"),
            _ => (400, "Bad Request"),
        };
        if matches!(e, HttpError::Closed) {
            return;
        }
        let mut entry = now_entry(ConnKind::Invalid, String::new(), 0);
        entry.rule = "bad request".into();
        entry.detail = Some(error_chain(e));
        self.log.push(entry);
        if status != 0 {
            let _ = conn.write_all(&simple_response(
                status,
                reason,
                &format!("kiln egress: {}\n", error_chain(e)),
            ));
        }
    }

    fn handle_forward<S: EgressStream>(&self, mut conn: BufConn<S>, head: RequestHead) {
        let url = match parse_url(&head.target) {
            Ok(u) if !u.tls => u,
            Ok(_) => {
                return self.reject(
                    &mut conn,
                    400,
                    "Bad Request",
                    "kiln egress: https:// URLs go through CONNECT\n".into(),
                );
            }
            Err(why) => {
                return self.reject(&mut conn, 400, "Bad Request", format!("kiln egress: request target {:?}: {why} (absolute-form http:// required)\n", truncate(&head.target)));
            }
        };
        if let Err(e) = body_framing(&head.headers, false) {
            return self.reject(&mut conn, 400, "Bad Request", format!("kiln egress: {e}\n"));
        }
        let mut entry = now_entry(ConnKind::Http, url.host.to_string(), url.port);
        let opened = match self.open_logged(&url.host, url.port, &mut entry) {
            Ok(o) => o,
            Err((status, reason, body)) => {
                self.log.push(entry);
                let _ = conn.write_all(&simple_response(status, reason, &body));
                return;
            }
        };
        let mut up = BufConn::new(opened.stream);
        // Secrets never travel over plain HTTP.
        if let Err(e) = self.exchange(
            &mut conn,
            &mut up,
            head,
            &url.path,
            &url.authority,
            &[],
            &mut entry,
        ) {
            entry.detail = Some(error_chain(&e));
        }
        let _ = up.io.shutdown(Shutdown::Both);
        let _ = conn.io.shutdown(Shutdown::Both);
        self.log.push(entry);
    }

    fn reject<T: Timed>(&self, conn: &mut BufConn<T>, status: u16, reason: &str, body: String) {
        let mut entry = now_entry(ConnKind::Invalid, String::new(), 0);
        entry.rule = "bad request".into();
        entry.detail = Some(body.trim_end().to_string());
        self.log.push(entry);
        let _ = conn.write_all(&simple_response(status, reason, &body));
    }

    /// One request/response exchange: the guest's request (head rewritten, secrets injected,
    /// body relayed) to `up`, the response back. `Connection: close` both ways.
    #[allow(clippy::too_many_arguments)]
    fn exchange<C: Timed, U: Timed>(
        &self,
        client: &mut BufConn<C>,
        up: &mut BufConn<U>,
        mut head: RequestHead,
        path: &str,
        authority: &str,
        secrets: &[&Secret],
        entry: &mut LogEntry,
    ) -> Result<(), HttpError> {
        let idle = Some(self.timeouts.idle);
        let framing = match body_framing(&head.headers, false) {
            Ok(f) => f,
            Err(e) => {
                let _ = client.write_all(&simple_response(
                    400,
                    "Bad Request",
                    &format!("kiln egress: {e}\n"),
                ));
                return Err(e);
            }
        };
        let expect = strip_hop_by_hop(&mut head.headers);
        if header(&head.headers, "host").is_none() {
            head.headers
                .insert(0, ("Host".into(), authority.as_bytes().to_vec()));
        }
        if !secrets.is_empty() {
            for (n, v) in head.headers.iter_mut() {
                inject_header(n, v, secrets);
            }
        }
        head.headers.push(("Connection".into(), b"close".to_vec()));
        let mut out = Vec::new();
        write_request_head(&mut out, &head.method, path, &head.headers);
        let mut bytes_up = 0u64;
        let mut bytes_down = 0u64;
        let result = (|| -> Result<(), HttpError> {
            up.read_timeout(idle).map_err(HttpError::Io)?;
            up.write_timeout(idle).map_err(HttpError::Io)?;
            client.read_timeout(idle).map_err(HttpError::Io)?;
            Count {
                limiter: &self.limiter,
                n: &mut bytes_up,
            }
            .charge(out.len())?;
            up.write_all(&out).map_err(HttpError::Io)?;
            if expect {
                client
                    .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                    .map_err(HttpError::Io)?;
            }
            relay_body(
                client,
                up,
                framing,
                false,
                u64::MAX,
                &mut Count {
                    limiter: &self.limiter,
                    n: &mut bytes_up,
                },
            )?;
            let resp = loop {
                let r = up.read_head(self.timeouts.idle, parse_response_head)?;
                match r.status {
                    101 => return Err(HttpError::Malformed("upstream switched protocols".into())),
                    100..=199 => continue,
                    _ => break r,
                }
            };
            let mut rframing = body_framing(&resp.headers, true)?;
            if head.method.eq_ignore_ascii_case("HEAD") || matches!(resp.status, 204 | 304) {
                rframing = Framing::None;
            }
            let mut headers = resp.headers;
            strip_hop_by_hop(&mut headers);
            headers.push(("Connection".into(), b"close".to_vec()));
            let mut rh = Vec::new();
            write_response_head(&mut rh, resp.status, &resp.reason, &headers);
            Count {
                limiter: &self.limiter,
                n: &mut bytes_down,
            }
            .charge(rh.len())?;
            client.write_all(&rh).map_err(HttpError::Io)?;
            relay_body(
                up,
                client,
                rframing,
                false,
                u64::MAX,
                &mut Count {
                    limiter: &self.limiter,
                    n: &mut bytes_down,
                },
            )?;
            client.flush().map_err(HttpError::Io)?;
            Ok(())
        })();
        entry.bytes_up = bytes_up;
        entry.bytes_down = bytes_down;
        if let Err(e) = &result {
            if bytes_down == 0 {
                let _ = client.write_all(&simple_response(
                    502,
                    "Bad Gateway",
                    &format!("kiln egress: {}: {}\n", entry.name, error_chain(e)),
                ));
                let _ = client.flush();
            }
        }
        result
    }

    fn handle_connect<S: EgressStream>(&self, mut conn: BufConn<S>, head: RequestHead) {
        let (host, port) = match split_authority(&head.target) {
            Some((h, Some(p))) => (h, p),
            _ => {
                return self.reject(
                    &mut conn,
                    400,
                    "Bad Request",
                    format!(
                        "kiln egress: CONNECT target {:?} is not host:port\n",
                        truncate(&head.target)
                    ),
                );
            }
        };
        let intercept = !self.secrets_for(&host).is_empty();
        let kind = if intercept {
            ConnKind::Intercepted
        } else {
            ConnKind::Connect
        };
        let mut entry = now_entry(kind, host.to_string(), port);
        let opened = match self.open_logged(&host, port, &mut entry) {
            Ok(o) => o,
            Err((status, reason, body)) => {
                self.log.push(entry);
                let _ = conn.write_all(&simple_response(status, reason, &body));
                return;
            }
        };
        if let Err(e) = conn.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n") {
            entry.detail = Some(format!("writing the CONNECT response: {e}"));
            self.log.push(entry);
            return;
        }
        if intercept {
            self.intercept(conn, opened.stream, &host, port, &mut entry);
        } else {
            let (client, leftover) = conn.into_parts();
            self.tunnel(client, leftover, opened.stream, &mut entry);
        }
        self.log.push(entry);
    }

    fn handle_raw<S: EgressStream>(&self, client: S, name: &str, port: u16, _permit: Permit) {
        let mut entry = now_entry(ConnKind::Raw, truncate(name), port);
        let Some(host) = Host::parse(name).filter(|_| port != 0) else {
            entry.rule = "bad request".into();
            entry.detail = Some("invalid destination name or port".into());
            self.log.push(entry);
            let _ = client.shutdown(Shutdown::Both);
            return;
        };
        entry.name = host.to_string();
        let _ = client.set_write_timeout(Some(self.timeouts.idle));
        let opened = match self.open_logged(&host, port, &mut entry) {
            Ok(o) => o,
            Err(_) => {
                self.log.push(entry);
                let _ = client.shutdown(Shutdown::Both);
                return;
            }
        };
        let mut conn = BufConn::new(client);
        // Intercept only TLS (first byte 0x16, a handshake record) to a secret host.
        let intercept = !self.secrets_for(&host).is_empty()
            && conn.peek_byte(self.timeouts.head).ok().flatten() == Some(0x16);
        if intercept {
            entry.kind = ConnKind::Intercepted;
            self.intercept(conn, opened.stream, &host, port, &mut entry);
        } else {
            let (client, leftover) = conn.into_parts();
            self.tunnel(client, leftover, opened.stream, &mut entry);
        }
        self.log.push(entry);
    }

    /// Relays bytes both ways until both directions ended, a limit was hit or the connection
    /// was idle for `timeouts.idle`.
    fn tunnel<S: EgressStream>(
        &self,
        client: S,
        leftover: Vec<u8>,
        upstream: TcpStream,
        entry: &mut LogEntry,
    ) {
        let state = Arc::new(TunnelState {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            detail: std::sync::Mutex::new(None),
        });
        let tick = self.timeouts.idle.min(Duration::from_secs(1));
        let _ = client.set_read_timeout(Some(tick));
        let _ = upstream.set_read_timeout(Some(tick));
        let _ = client.set_write_timeout(Some(self.timeouts.idle));
        let _ = upstream.set_write_timeout(Some(self.timeouts.idle));
        let clones = client
            .try_clone()
            .and_then(|c| Ok((c, upstream.try_clone()?)));
        let (client2, upstream2) = match clones {
            Ok(c) => c,
            Err(e) => {
                entry.detail = Some(format!("cloning the streams: {e}"));
                let _ = client.shutdown(Shutdown::Both);
                let _ = upstream.shutdown(Shutdown::Both);
                return;
            }
        };
        let down = Arc::new(AtomicU64::new(0));
        let limiter = self.limiter.clone();
        let idle = self.timeouts.idle;
        let (st, dn) = (state.clone(), down.clone());
        let back = std::thread::Builder::new()
            .name("egress-tunnel".into())
            .spawn(move || pump(upstream2, client2, &[], &dn, &st, &limiter, idle));
        let up = AtomicU64::new(0);
        match back {
            Ok(handle) => {
                pump(
                    client,
                    upstream,
                    &leftover,
                    &up,
                    &state,
                    &self.limiter,
                    idle,
                );
                let _ = handle.join();
            }
            Err(e) => {
                entry.detail = Some(format!("spawning the tunnel thread: {e}"));
                let _ = client.shutdown(Shutdown::Both);
                let _ = upstream.shutdown(Shutdown::Both);
            }
        }
        entry.bytes_up = up.load(Ordering::Acquire);
        entry.bytes_down = down.load(Ordering::Acquire);
        let detail = state
            .detail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(d) = detail {
            entry.detail = Some(d);
        }
    }

    /// TLS interception for a secret host: the guest's TLS ends here (leaf issued by the
    /// sandbox CA), a new TLS connection to the destination is verified against the upstream
    /// roots, and one request is relayed with the host's placeholders replaced.
    fn intercept<S: EgressStream>(
        &self,
        conn: BufConn<S>,
        upstream: TcpStream,
        host: &Host,
        port: u16,
        entry: &mut LogEntry,
    ) {
        let result = self.intercept_inner(conn, upstream, host, port, entry);
        if let Err(e) = result {
            entry.detail = Some(e);
        }
    }

    fn intercept_inner<S: EgressStream>(
        &self,
        conn: BufConn<S>,
        upstream: TcpStream,
        host: &Host,
        port: u16,
        entry: &mut LogEntry,
    ) -> Result<(), String> {
        let Host::Name(name) = host else {
            return Err("interception needs a host name".into());
        };
        let server_cfg = self.ca.server_config(name).map_err(|e| error_chain(&e))?;
        let server =
            rustls::ServerConnection::new(server_cfg).map_err(|e| format!("TLS server: {e}"))?;
        let mut client = BufConn::new(rustls::StreamOwned::new(server, conn));
        let sni = ServerName::try_from(name.clone()).map_err(|e| format!("server name: {e}"))?;
        let cc = rustls::ClientConnection::new(self.client_tls.clone(), sni)
            .map_err(|e| format!("TLS client: {e}"))?;
        let mut up = BufConn::new(rustls::StreamOwned::new(cc, upstream));
        // The guest's handshake and request head, within the head deadline.
        let head = match client.read_head(self.timeouts.head, parse_request_head) {
            Ok(h) => h,
            Err(e) => {
                let msg = format!("guest TLS or request: {}", error_chain(&e));
                if !matches!(e, HttpError::Io(_) | HttpError::Closed) {
                    let _ = client.write_all(&simple_response(
                        400,
                        "Bad Request",
                        &format!("kiln egress: {msg}\n"),
                    ));
                }
                return Err(msg);
            }
        };
        // The destination's handshake (certificate verified against the upstream roots).
        let _ = up.io.sock.set_read_timeout(Some(self.timeouts.head));
        let _ = up.io.sock.set_write_timeout(Some(self.timeouts.head));
        let hs = (|| -> io::Result<()> {
            while up.io.conn.is_handshaking() {
                up.io.conn.complete_io(&mut up.io.sock)?;
            }
            Ok(())
        })();
        if let Err(e) = hs {
            let msg = format!("upstream TLS with {name}: {e}");
            let _ = client.write_all(&simple_response(
                502,
                "Bad Gateway",
                &format!("kiln egress: {msg}\n"),
            ));
            let _ = client.flush();
            return Err(msg);
        }
        let path = if head.target.starts_with('/') {
            head.target.clone()
        } else if let Ok(u) = parse_url(&head.target).map_err(|_| ()).and_then(|u| {
            if &u.host == host {
                Ok(u)
            } else {
                Err(())
            }
        }) {
            u.path
        } else {
            let _ = client.write_all(&simple_response(
                400,
                "Bad Request",
                "kiln egress: unexpected request target\n",
            ));
            return Err("unexpected request target inside the intercepted connection".into());
        };
        let authority = if port == 443 {
            name.clone()
        } else {
            format!("{name}:{port}")
        };
        let secrets = self.secrets_for(host);
        let r = self.exchange(
            &mut client,
            &mut up,
            head,
            &path,
            &authority,
            &secrets,
            entry,
        );
        client.io.conn.send_close_notify();
        let _ = client.flush();
        let _ = client.io.sock.io.shutdown(Shutdown::Both);
        let _ = up.io.sock.shutdown(Shutdown::Both);
        r.map_err(|e| error_chain(&e))
    }

    fn http_request(&self, req: &HttpRequest) -> Result<HttpResponse, EgressError> {
        let _permit = self.limiter.admit().map_err(|hit| {
            let mut e = now_entry(ConnKind::HostRequest, String::new(), 0);
            e.rule = hit.rule();
            self.log.push(e);
            EgressError::Limit(hit)
        })?;
        let url = parse_url(&req.url).map_err(|why| EgressError::Url {
            url: truncate(&req.url),
            why,
        })?;
        let method_ok = !req.method.is_empty()
            && req.method.len() <= 32
            && req
                .method
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b == b'-');
        if !method_ok {
            return Err(EgressError::Header(format!(
                "method {}",
                truncate(&req.method)
            )));
        }
        let mut headers: Vec<(String, Vec<u8>)> = Vec::new();
        for (n, v) in &req.headers {
            let name_ok = !n.is_empty()
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !name_ok || v.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
                return Err(EgressError::Header(truncate(n)));
            }
            let l = n.to_ascii_lowercase();
            if matches!(
                l.as_str(),
                "content-length" | "transfer-encoding" | "connection" | "host"
            ) {
                continue;
            }
            headers.push((n.clone(), v.as_bytes().to_vec()));
        }
        headers.insert(0, ("Host".into(), url.authority.clone().into_bytes()));
        if !req.body.is_empty() || matches!(req.method.as_str(), "POST" | "PUT" | "PATCH") {
            headers.push((
                "Content-Length".into(),
                req.body.len().to_string().into_bytes(),
            ));
        }
        headers.push(("Connection".into(), b"close".to_vec()));
        let mut entry = now_entry(ConnKind::HostRequest, url.host.to_string(), url.port);
        let opened = match self.open(&url.host, url.port) {
            Ok(o) => o,
            Err(e) => {
                let err = match e {
                    OpenError::Denied(d, ip) => {
                        entry.rule = d.rule.clone();
                        entry.detail = Some(d.reason.clone());
                        entry.addr = ip;
                        EgressError::Denied(d)
                    }
                    OpenError::Limit(hit) => {
                        entry.rule = hit.rule();
                        EgressError::Limit(hit)
                    }
                    OpenError::Failed(e) => {
                        entry.verdict = Verdict::Allowed;
                        entry.detail = Some(error_chain(&e));
                        e
                    }
                };
                self.log.push(entry);
                return Err(err);
            }
        };
        entry.verdict = Verdict::Allowed;
        entry.rule = opened.rule.clone();
        entry.addr = Some(opened.addr);
        let _ = opened.stream.set_read_timeout(Some(req.timeout));
        let _ = opened.stream.set_write_timeout(Some(req.timeout));
        let result = if url.tls {
            let secrets = self.secrets_for(&url.host);
            if !secrets.is_empty() {
                for (n, v) in headers.iter_mut() {
                    inject_header(n, v, &secrets);
                }
            }
            let name = url.host.to_string();
            let sni = ServerName::try_from(
                name.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
            )
            .map_err(|_| EgressError::Url {
                url: truncate(&req.url),
                why: "host is not a valid TLS server name",
            })?;
            let cc = rustls::ClientConnection::new(self.client_tls.clone(), sni).map_err(|e| {
                EgressError::Exchange {
                    host: name.clone(),
                    source: HttpError::Io(io::Error::other(e)),
                }
            })?;
            self.host_exchange(
                rustls::StreamOwned::new(cc, opened.stream),
                req,
                &url,
                &headers,
                &mut entry,
            )
        } else {
            self.host_exchange(opened.stream, req, &url, &headers, &mut entry)
        };
        if let Err(e) = &result {
            entry.detail = Some(error_chain(e));
        }
        self.log.push(entry);
        result.map_err(|source| EgressError::Exchange {
            host: url.host.to_string(),
            source,
        })
    }

    fn host_exchange<U: Timed>(
        &self,
        up: U,
        req: &HttpRequest,
        url: &Url,
        headers: &[(String, Vec<u8>)],
        entry: &mut LogEntry,
    ) -> Result<HttpResponse, HttpError> {
        let mut up = BufConn::new(up);
        let mut out = Vec::new();
        write_request_head(&mut out, &req.method, &url.path, headers);
        out.extend_from_slice(&req.body);
        let mut bytes_up = 0;
        let mut bytes_down = 0;
        let r = (|| {
            Count {
                limiter: &self.limiter,
                n: &mut bytes_up,
            }
            .charge(out.len())?;
            up.write_all(&out).map_err(HttpError::Io)?;
            up.flush().map_err(HttpError::Io)?;
            let resp = loop {
                let r = up.read_head(req.timeout, parse_response_head)?;
                if !(100..=199).contains(&r.status) {
                    break r;
                }
            };
            let mut framing = body_framing(&resp.headers, true)?;
            if req.method == "HEAD" || matches!(resp.status, 204 | 304) {
                framing = Framing::None;
            }
            let mut body = Vec::new();
            relay_body(
                &mut up,
                &mut body,
                framing,
                true,
                req.max_response_bytes,
                &mut Count {
                    limiter: &self.limiter,
                    n: &mut bytes_down,
                },
            )?;
            Ok(HttpResponse {
                status: resp.status,
                headers: resp
                    .headers
                    .into_iter()
                    .map(|(n, v)| (n, String::from_utf8_lossy(&v).into_owned()))
                    .collect(),
                body,
            })
        })();
        entry.bytes_up = bytes_up;
        entry.bytes_down = bytes_down;
        r
    }
}

struct TunnelState {
    start: Instant,
    last_ms: AtomicU64,
    stop: AtomicBool,
    detail: std::sync::Mutex<Option<String>>,
}

impl TunnelState {
    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Release);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Acquire));
        self.start.elapsed().saturating_sub(last)
    }

    fn fail(&self, why: String) {
        self.stop.store(true, Ordering::Release);
        let mut d = self.detail.lock().unwrap_or_else(|e| e.into_inner());
        d.get_or_insert(why);
    }
}

/// One tunnel direction: `src` to `dst`, counting into `count`.
fn pump<A: EgressStream, B: EgressStream>(
    mut src: A,
    mut dst: B,
    first: &[u8],
    count: &AtomicU64,
    state: &TunnelState,
    limiter: &Limiter,
    idle: Duration,
) {
    let kill = |src: &A, dst: &B| {
        let _ = src.shutdown(Shutdown::Both);
        let _ = dst.shutdown(Shutdown::Both);
    };
    if !first.is_empty() {
        if let Err(hit) = limiter.charge(first.len() as u64) {
            state.fail(hit.rule());
            return kill(&src, &dst);
        }
        if dst.write_all(first).is_err() {
            return kill(&src, &dst);
        }
        count.fetch_add(first.len() as u64, Ordering::AcqRel);
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if state.stop.load(Ordering::Acquire) {
            return kill(&src, &dst);
        }
        match src.read(&mut buf) {
            Ok(0) => {
                let _ = dst.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if let Err(hit) = limiter.charge(n as u64) {
                    state.fail(hit.rule());
                    return kill(&src, &dst);
                }
                if let Err(e) = dst.write_all(&buf[..n]) {
                    state.fail(format!("write: {e}"));
                    return kill(&src, &dst);
                }
                count.fetch_add(n as u64, Ordering::AcqRel);
                state.touch();
            }
            Err(e) if is_timeout(&e) => {
                if state.idle_for() >= idle {
                    state.fail(format!("idle for {idle:?}"));
                    return kill(&src, &dst);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                if !state.stop.load(Ordering::Acquire) {
                    state.fail(format!("read: {e}"));
                }
                return kill(&src, &dst);
            }
        }
    }
}

impl<T: Timed> BufConn<T> {
    /// Reads at least one byte (within `timeout`) and returns the first buffered byte.
    fn peek_byte(&mut self, timeout: Duration) -> io::Result<Option<u8>> {
        let mut b = [0u8; 1];
        self.read_timeout(Some(timeout))?;
        let n = loop {
            match self.read(&mut b) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => break r?,
            }
        };
        if n == 0 {
            return Ok(None);
        }
        self.unread(b[0]);
        Ok(Some(b[0]))
    }
}

/// An error and its sources, `: `-joined.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn truncate(s: &str) -> String {
    let mut end = s.len().min(200);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_authorities() {
        let u = parse_url("http://Example.com:8080/a?b#frag").unwrap();
        assert_eq!(u.host, Host::Name("example.com".into()));
        assert_eq!(
            (u.port, u.path.as_str(), u.authority.as_str()),
            (8080, "/a?b", "example.com:8080")
        );
        let u = parse_url("https://[::1]").unwrap();
        assert_eq!(
            (u.port, u.path.as_str(), u.authority.as_str()),
            (443, "/", "[::1]")
        );
        assert!(parse_url("ftp://x").is_err());
        assert!(parse_url("http://u:p@x/").is_err());
        assert!(parse_url("http://x:0/").is_err());
        assert_eq!(
            split_authority("x.org:443"),
            Some((Host::Name("x.org".into()), Some(443)))
        );
        assert_eq!(split_authority("[::1]:80").map(|a| a.1), Some(Some(80)));
        assert_eq!(split_authority("::1:80"), None);
    }
}
