//! Test support: a test CA (rcgen), an HTTP and an HTTPS origin server on 127.0.0.1, a proxy
//! on a loopback listener, and the real clients (curl, python3 urllib).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use kiln_egress::{
    EgressConfig, EgressProxy, Policy, Secret, StaticResolver, Timeouts, UpstreamRoots,
};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// Names the test resolver maps to 127.0.0.1.
pub const NAMES: &[&str] = &["plain.test", "secret.test", "other.test", "bad.evil.test"];

/// The test CA that signs the HTTPS origin's certificate.
pub struct TestCa {
    pub pem: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new() -> Self {
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "Kiln egress test CA");
        let issuer = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
        Self {
            pem: issuer.pem(),
            issuer,
        }
    }

    fn server_config(&self, names: &[&str]) -> Arc<rustls::ServerConfig> {
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone(), self.issuer.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
        Arc::new(cfg)
    }
}

/// Deterministic test data: xorshift64 bytes.
pub struct Pattern(u64);

impl Pattern {
    pub fn new() -> Self {
        Self(0x9e37_79b9_7f4a_7c15)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let b = self.0.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
    }
}

/// The SHA-256 (hex) of the first `n` pattern bytes.
pub fn pattern_sha256(n: u64) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut p = Pattern::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = n;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        p.fill(&mut buf[..k]);
        h.update(&buf[..k]);
        left -= k as u64;
    }
    hex(&h.finalize())
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn sha256_file(p: &Path) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut f = std::fs::File::open(p).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex(&h.finalize())
}

/// Serves one origin connection: `/hello`, `/headers` (request headers echoed),
/// `/big/N` (N pattern bytes), `/slow/MS`, `/chunked`, `POST /upload` (length echoed).
fn serve_origin<S: Read + Write>(mut s: S) {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    let (method, path, headers, n) = loop {
        let k = match s.read(&mut tmp) {
            Ok(0) | Err(_) => return,
            Ok(k) => k,
        };
        buf.extend_from_slice(&tmp[..k]);
        let mut hs = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut hs);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => {
                let headers: Vec<(String, String)> = req
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                break (
                    req.method.unwrap().to_string(),
                    req.path.unwrap().to_string(),
                    headers,
                    n,
                );
            }
            Ok(httparse::Status::Partial) if buf.len() < 65536 => continue,
            _ => return,
        }
    };
    let cl: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or(0);
    let mut body = buf[n..].to_vec();
    while body.len() < cl {
        let k = match s.read(&mut tmp) {
            Ok(0) | Err(_) => return,
            Ok(k) => k,
        };
        body.extend_from_slice(&tmp[..k]);
    }
    let respond = |s: &mut S, body: &[u8]| {
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = s.write_all(head.as_bytes());
        let _ = s.write_all(body);
    };
    if path == "/hello" {
        respond(&mut s, b"hello");
    } else if path == "/headers" {
        let text: String = headers.iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
        respond(&mut s, text.as_bytes());
    } else if let Some(n) = path.strip_prefix("/big/") {
        let n: u64 = n.parse().unwrap();
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n");
        if s.write_all(head.as_bytes()).is_err() {
            return;
        }
        let mut p = Pattern::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let mut left = n;
        while left > 0 {
            let k = left.min(chunk.len() as u64) as usize;
            p.fill(&mut chunk[..k]);
            if s.write_all(&chunk[..k]).is_err() {
                return;
            }
            left -= k as u64;
        }
    } else if let Some(ms) = path.strip_prefix("/slow/") {
        std::thread::sleep(Duration::from_millis(ms.parse().unwrap()));
        respond(&mut s, b"slow");
    } else if path == "/chunked" {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n");
    } else if path == "/upload" && method == "POST" {
        respond(&mut s, format!("len={}", body.len()).as_bytes());
    } else {
        let _ = s
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    }
    let _ = s.flush();
}

/// Starts the plain HTTP origin; returns its port.
pub fn start_http_origin() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || serve_origin(s));
        }
    });
    port
}

/// Starts the HTTPS origin (certificate for every name in [`NAMES`] from `ca`); its port.
pub fn start_https_origin(ca: &TestCa) -> u16 {
    let cfg = ca.server_config(NAMES);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                let conn = rustls::ServerConnection::new(cfg).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, s);
                serve_origin(&mut tls);
                tls.conn.send_close_notify();
                let _ = tls.flush();
            });
        }
    });
    port
}

/// The test world: origins, the test CA, a proxy (and its port).
pub struct World {
    pub http: u16,
    pub https: u16,
    pub ca: TestCa,
    pub dir: tempfile::TempDir,
}

impl World {
    pub fn new() -> Self {
        let ca = TestCa::new();
        let https = start_https_origin(&ca);
        Self {
            http: start_http_origin(),
            https,
            ca,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A resolver mapping [`NAMES`] to 127.0.0.1.
    pub fn resolver() -> StaticResolver {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        NAMES
            .iter()
            .fold(StaticResolver::new(), |r, n| r.with(n, &[lo]))
    }

    /// A config: `policy`, the test resolver, the test CA as upstream roots, short timeouts.
    pub fn config(&self, policy: Policy) -> EgressConfig {
        let mut c = EgressConfig::new(policy);
        c.resolver = Arc::new(Self::resolver());
        c.upstream_roots = UpstreamRoots::Pem(self.ca.pem.clone());
        c.timeouts = Timeouts {
            head: Duration::from_secs(2),
            connect: Duration::from_secs(5),
            idle: Duration::from_secs(20),
        };
        c
    }

    /// The usual policy: the three test names on both origin ports, loopback named by rule.
    pub fn policy(&self) -> Policy {
        let mut allow = Vec::new();
        for n in ["plain.test", "secret.test", "other.test"] {
            allow.push(format!("{n}:{}", self.http));
            allow.push(format!("{n}:{}", self.https));
        }
        allow.push("127.0.0.1".into());
        let mut p = Policy::from_rules(&allow, &["*.evil.test"]).unwrap();
        p.limits.max_new_connections_per_sec = 1000;
        p
    }

    /// A proxy on a loopback listener; returns it and its port.
    pub fn proxy(&self, config: EgressConfig) -> (EgressProxy, u16) {
        let p = EgressProxy::new(config).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        p.serve_tcp(l);
        (p, port)
    }

    /// Writes a CA bundle file for clients: the sandbox CA and the test CA.
    pub fn client_bundle(&self, proxy: &EgressProxy) -> PathBuf {
        let path = self
            .dir
            .path()
            .join(format!("bundle-{}.pem", rand_suffix()));
        std::fs::write(&path, format!("{}{}", proxy.ca().cert_pem(), self.ca.pem)).unwrap();
        path
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

pub fn secret(name: &str, value: &str, hosts: &[&str]) -> Secret {
    Secret::new(name, value, hosts).unwrap()
}

/// The output of a real client.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs curl (fails the test with a clear message when curl is not installed).
pub fn curl(args: &[&str]) -> Out {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "120"])
        .args(args)
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => panic!("curl is required for these tests and could not be run ({e}); install it: apt-get install curl"),
    };
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs a python3 script with `env` (fails clearly when python3 is missing).
pub fn python(script: &str, env: &[(String, String)]) -> Out {
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(script);
    for k in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
        "NO_PROXY",
        "no_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("python3 is required for these tests and could not be run: {e}")
    });
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Sends raw bytes to the proxy and reads the reply until close (bounded by `timeout`).
pub fn raw(port: u16, bytes: &[u8], timeout: Duration) -> (String, Duration) {
    let start = std::time::Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    (String::from_utf8_lossy(&out).into_owned(), start.elapsed())
}
