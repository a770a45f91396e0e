//! The egress proxy end to end on loopback: real origins (HTTP, HTTPS with a test CA), the
//! proxy on a loopback listener, real clients (curl, python3 urllib).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use kiln_egress::{ConnKind, EgressProxy, Policy, Verdict};

fn proxy_arg(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// curl through the proxy; the last stdout line is the status (`%{http_code}`).
fn curl_via(port: u16, extra: &[&str], url: &str) -> (u16, String, Out) {
    let p = proxy_arg(port);
    let mut args = vec!["-x", &p, "-w", "\n%{http_code} %{http_connect}"];
    args.extend_from_slice(extra);
    args.push(url);
    let out = curl(&args);
    let (body, last) = out.stdout.rsplit_once('\n').unwrap_or(("", &out.stdout));
    let mut codes = last.split(' ').map(|c| c.parse::<u16>().unwrap_or(0));
    let (http, connect) = (codes.next().unwrap_or(0), codes.next().unwrap_or(0));
    let code = if http == 0 { connect } else { http };
    // A 2xx that curl itself failed on (TLS, truncated body) is not a success.
    let code = if (200..300).contains(&code) && out.code != 0 {
        0
    } else {
        code
    };
    (code, body.to_string(), out)
}

fn wait_log(proxy: &EgressProxy, n: usize) -> Vec<kiln_egress::LogEntry> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let e = proxy.log().entries();
        if e.len() >= n || Instant::now() > deadline {
            return e;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn allowed_host_reached_with_curl_and_python() {
    let w = World::new();
    let (proxy, port) = w.proxy(w.config(w.policy()));
    let (code, body, out) = curl_via(port, &[], &format!("http://plain.test:{}/hello", w.http));
    assert_eq!((code, body.as_str()), (200, "hello"), "{out:?}");
    let (code, body, _) = curl_via(port, &[], &format!("http://plain.test:{}/chunked", w.http));
    assert_eq!((code, body.as_str()), (200, "hello world"));
    // A POST body through the proxy.
    let (code, body, _) = curl_via(
        port,
        &["--data-binary", "0123456789"],
        &format!("http://plain.test:{}/upload", w.http),
    );
    assert_eq!((code, body.as_str()), (200, "len=10"));
    let env = vec![("http_proxy".to_string(), proxy_arg(port))];
    let py = python(
        &format!("import urllib.request;print(urllib.request.urlopen('http://other.test:{}/hello', timeout=30).read().decode())", w.http),
        &env,
    );
    assert_eq!(py.stdout.trim(), "hello", "{py:?}");
    let log = wait_log(&proxy, 4);
    let e = &log[0];
    assert_eq!(
        (e.kind, e.verdict, e.name.as_str(), e.port),
        (ConnKind::Http, Verdict::Allowed, "plain.test", w.http)
    );
    assert_eq!(e.addr, Some("127.0.0.1".parse().unwrap()));
    assert_eq!(e.rule, format!("allow plain.test:{}", w.http));
    assert!(e.bytes_up > 0 && e.bytes_down > 5, "{e:?}");
}

#[test]
fn denied_hosts_get_403_naming_the_rule() {
    let w = World::new();
    let (proxy, port) = w.proxy(w.config(w.policy()));
    let (code, body, _) = curl_via(port, &[], &format!("http://unknown.test:{}/hello", w.http));
    assert_eq!(code, 403);
    assert!(body.contains("default deny"), "{body}");
    let (code, body, _) = curl_via(port, &[], &format!("http://bad.evil.test:{}/hello", w.http));
    assert_eq!(code, 403);
    assert!(body.contains("deny *.evil.test"), "{body}");
    // An allowed name on a port no rule names.
    let (code, body, _) = curl_via(
        port,
        &[],
        &format!("http://plain.test:{}/hello", w.http.wrapping_add(1).max(1)),
    );
    assert_eq!(code, 403, "{body}");
    // IP literals of private and link-local (metadata) addresses: denied before any connect.
    for (url, rule) in [
        ("http://10.1.2.3/", "builtin: private"),
        (
            "http://169.254.169.254/latest/meta-data/",
            "builtin: link-local",
        ),
        ("http://[fd00::1]/", "builtin: private"),
    ] {
        let mut p = w.policy();
        p.allow.push(kiln_egress::Rule::parse("*").unwrap());
        let (proxy2, port2) = w.proxy(w.config(p));
        let (code, body, _) = curl_via(port2, &[], url);
        assert_eq!(code, 403, "{url}");
        assert!(body.contains(rule), "{url}: {body}");
        let e = &wait_log(&proxy2, 1)[0];
        assert_eq!((e.verdict, e.rule.as_str()), (Verdict::Denied, rule));
    }
    // CONNECT to a port not allowed: 403 to curl and to a raw client.
    let (code, _, out) = curl_via(port, &[], "https://secret.test:8443/");
    assert_eq!(code, 403, "{out:?}");
    let (reply, _) = raw(
        port,
        b"CONNECT plain.test:25 HTTP/1.1\r\nHost: plain.test:25\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    assert!(reply.contains("default deny"), "{reply}");
    let log = wait_log(&proxy, 5);
    assert!(log.iter().all(|e| e.verdict == Verdict::Denied), "{log:?}");
    assert!(log
        .iter()
        .any(|e| e.kind == ConnKind::Connect && e.port == 25));
}

#[test]
fn localhost_needs_an_explicit_rule() {
    let w = World::new();
    // The system resolver: localhost resolves to loopback.
    let mut c = w.config(Policy::from_rules(&[format!("*:{}", w.http)], &[] as &[&str]).unwrap());
    c.resolver = std::sync::Arc::new(kiln_egress::SystemResolver);
    let (_p, port) = w.proxy(c);
    let (code, body, _) = curl_via(port, &[], &format!("http://localhost:{}/hello", w.http));
    assert_eq!(code, 403);
    assert!(body.contains("builtin: loopback"), "{body}");
    let (code, body, _) = curl_via(port, &[], &format!("http://127.0.0.1:{}/hello", w.http));
    assert_eq!(code, 403, "{body}");
    let mut c =
        w.config(Policy::from_rules(&[format!("localhost:{}", w.http)], &[] as &[&str]).unwrap());
    c.resolver = std::sync::Arc::new(kiln_egress::SystemResolver);
    let (_p, port) = w.proxy(c);
    let (code, body, _) = curl_via(port, &[], &format!("http://localhost:{}/hello", w.http));
    assert_eq!((code, body.as_str()), (200, "hello"));
}

#[test]
fn secret_injected_only_for_its_host_over_intercepted_tls() {
    let w = World::new();
    let mut c = w.config(w.policy());
    c.secrets = vec![secret("API_TOKEN", "the-real-value-42", &["secret.test"])];
    let (proxy, port) = w.proxy(c);
    let ph = proxy.secrets()[0].placeholder().to_string();
    let env = proxy.guest_env(&proxy_arg(port));
    assert!(env.contains(&("API_TOKEN".to_string(), ph.clone())));
    let bundle = w.client_bundle(&proxy);
    let bundle_s = bundle.to_str().unwrap();
    let auth = format!("Authorization: Bearer {ph}");
    // curl, HTTPS to the secret host: intercepted, placeholder replaced.
    let (code, body, out) = curl_via(
        port,
        &["--cacert", bundle_s, "-H", &auth],
        &format!("https://secret.test:{}/headers", w.https),
    );
    assert_eq!(code, 200, "{out:?}");
    assert!(
        body.contains("Authorization: Bearer the-real-value-42"),
        "{body}"
    );
    assert!(!body.contains(&ph));
    // Basic credentials carrying the placeholder (git over https style).
    let user = format!("x-token:{ph}");
    let (code, body, _) = curl_via(
        port,
        &["--cacert", bundle_s, "-u", &user],
        &format!("https://secret.test:{}/headers", w.https),
    );
    assert_eq!(code, 200);
    use base64::Engine as _;
    let want = base64::engine::general_purpose::STANDARD.encode("x-token:the-real-value-42");
    assert!(body.contains(&want), "{body}");
    // Another host over HTTPS: end-to-end TLS (the test CA alone verifies it), placeholder kept.
    let test_ca = w.write("test-ca.pem", &w.ca.pem);
    let (code, body, out) = curl_via(
        port,
        &["--cacert", test_ca.to_str().unwrap(), "-H", &auth],
        &format!("https://other.test:{}/headers", w.https),
    );
    assert_eq!(code, 200, "{out:?}");
    assert!(
        body.contains(&format!("Bearer {ph}")),
        "{body} {out:?} {:?}",
        proxy.log().entries()
    );
    assert!(!body.contains("the-real-value-42"));
    // The secret host over plain HTTP: never injected.
    let (code, body, _) = curl_via(
        port,
        &["-H", &auth],
        &format!("http://secret.test:{}/headers", w.http),
    );
    assert_eq!(code, 200);
    assert!(
        body.contains(&ph) && !body.contains("the-real-value-42"),
        "{body}"
    );
    // python urllib through the proxy, trusting the bundle through SSL_CERT_FILE.
    let mut env = vec![
        ("https_proxy".to_string(), proxy_arg(port)),
        ("SSL_CERT_FILE".into(), bundle_s.to_string()),
    ];
    env.push(("API_TOKEN".into(), ph.clone()));
    let script = format!(
        "import os,urllib.request\nr=urllib.request.Request('https://secret.test:{}/headers',headers={{'X-Key':os.environ['API_TOKEN']}})\nprint(urllib.request.urlopen(r,timeout=30).read().decode())",
        w.https
    );
    let py = python(&script, &env);
    assert!(py.stdout.contains("X-Key: the-real-value-42"), "{py:?}");
    let log = wait_log(&proxy, 5);
    assert_eq!(
        log.iter()
            .filter(|e| e.kind == ConnKind::Intercepted)
            .count(),
        3,
        "{log:?}"
    );
    assert!(log
        .iter()
        .any(|e| e.kind == ConnKind::Connect && e.name == "other.test"));
    // The sandbox CA is not trusted for hosts other than interception: curl with the test CA
    // alone fails on the secret host (its certificate comes from the sandbox CA).
    let (code, _, out) = curl_via(
        port,
        &["--cacert", test_ca.to_str().unwrap()],
        &format!("https://secret.test:{}/headers", w.https),
    );
    assert_ne!(code, 200);
    assert_ne!(out.code, 0);
}

#[test]
fn upstream_certificate_is_verified_when_intercepting() {
    let w = World::new();
    let mut c = w.config(w.policy());
    c.secrets = vec![secret("T", "v", &["secret.test"])];
    // Upstream roots that do not include the test CA.
    c.upstream_roots = kiln_egress::UpstreamRoots::Pem(TestCa::new().pem);
    let (proxy, port) = w.proxy(c);
    let bundle = w.client_bundle(&proxy);
    let (code, body, _) = curl_via(
        port,
        &["--cacert", bundle.to_str().unwrap()],
        &format!("https://secret.test:{}/headers", w.https),
    );
    assert_eq!(code, 502, "{body}");
    assert!(body.contains("upstream TLS"), "{body}");
}

#[test]
fn hundred_concurrent_connections() {
    let w = World::new();
    let (proxy, port) = w.proxy(w.config(w.policy()));
    let script = format!(
        "import urllib.request,concurrent.futures as cf\n\
         def f(i):\n  return urllib.request.urlopen('http://plain.test:{}/slow/1000',timeout=60).read()\n\
         with cf.ThreadPoolExecutor(100) as ex:\n  r=list(ex.map(f,range(100)))\n\
         print(sum(1 for x in r if x==b'slow'))",
        w.http
    );
    let start = Instant::now();
    let py = python(&script, &[("http_proxy".into(), proxy_arg(port))]);
    let took = start.elapsed();
    assert_eq!(py.stdout.trim(), "100", "{py:?}");
    // 100 requests of 1 s each ran concurrently, not one after another.
    assert!(took < Duration::from_secs(20), "{took:?}");
    let log = wait_log(&proxy, 100);
    assert_eq!(
        log.iter().filter(|e| e.verdict == Verdict::Allowed).count(),
        100
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(proxy.active_connections(), 0);
}

#[test]
fn large_downloads_intact() {
    let w = World::new();
    let (proxy, port) = w.proxy(w.config(w.policy()));
    let n: u64 = 128 << 20;
    let file = w.dir.path().join("big");
    let start = Instant::now();
    let (code, _, out) = curl_via(
        port,
        &["-o", file.to_str().unwrap()],
        &format!("http://plain.test:{}/big/{n}", w.http),
    );
    let took = start.elapsed();
    assert_eq!(code, 200, "{out:?}");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), n);
    assert_eq!(sha256_file(&file), pattern_sha256(n));
    eprintln!("128 MiB over plain HTTP through the proxy: {took:?}");
    // Through a CONNECT tunnel (end-to-end TLS).
    let test_ca = w.write("ca.pem", &w.ca.pem);
    let n2: u64 = 32 << 20;
    let start = Instant::now();
    let (code, _, out) = curl_via(
        port,
        &[
            "--cacert",
            test_ca.to_str().unwrap(),
            "-o",
            file.to_str().unwrap(),
        ],
        &format!("https://other.test:{}/big/{n2}", w.https),
    );
    assert_eq!(code, 200, "{out:?}");
    assert_eq!(sha256_file(&file), pattern_sha256(n2));
    eprintln!("32 MiB through a CONNECT tunnel: {:?}", start.elapsed());
    let log = wait_log(&proxy, 2);
    assert!(log[0].bytes_down > n && log[1].bytes_down > n2, "{log:?}");
}

#[test]
fn byte_limit_enforced() {
    let w = World::new();
    let mut p = w.policy();
    p.limits.max_total_bytes = Some(1 << 20);
    let (proxy, port) = w.proxy(w.config(p));
    let file = w.dir.path().join("cut");
    let (_, _, out) = curl_via(
        port,
        &["-o", file.to_str().unwrap()],
        &format!("http://plain.test:{}/big/{}", w.http, 4 << 20),
    );
    assert_ne!(out.code, 0, "the download must be cut: {out:?}");
    let got = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    assert!(got <= 1 << 20, "{got}");
    assert!(proxy.total_bytes() <= 1 << 20);
    let log = wait_log(&proxy, 1);
    assert!(
        log[0]
            .detail
            .as_deref()
            .unwrap_or("")
            .contains("limit: max_total_bytes"),
        "{log:?}"
    );
    // Used up: the next request is refused with 403 naming the limit.
    std::thread::sleep(Duration::from_millis(100));
    let (code, body, _) = curl_via(port, &[], &format!("http://plain.test:{}/hello", w.http));
    assert_eq!(code, 403);
    assert!(body.contains("max_total_bytes"), "{body}");
}

#[test]
fn connection_rate_limit() {
    let w = World::new();
    let mut p = w.policy();
    p.limits.max_new_connections_per_sec = 3;
    let (proxy, port) = w.proxy(w.config(p));
    let req = format!(
        "GET http://plain.test:{}/hello HTTP/1.1\r\nHost: plain.test\r\n\r\n",
        w.http
    );
    let mut ok = 0;
    let mut limited = 0;
    for _ in 0..8 {
        let (reply, _) = raw(port, req.as_bytes(), Duration::from_secs(5));
        if reply.starts_with("HTTP/1.1 200") {
            ok += 1;
        } else if reply.starts_with("HTTP/1.1 403") && reply.contains("max_new_connections_per_sec")
        {
            limited += 1;
        }
    }
    // 3 tokens at once, plus what refills while the 8 requests run (a few ms each).
    assert!((3..=5).contains(&ok), "ok={ok}");
    assert!(limited >= 3, "limited={limited}");
    assert_eq!(ok + limited, 8);
    std::thread::sleep(Duration::from_millis(1100));
    let (reply, _) = raw(port, req.as_bytes(), Duration::from_secs(5));
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(proxy
        .log()
        .entries()
        .iter()
        .any(|e| e.rule.contains("max_new_connections_per_sec")));
}

#[test]
fn concurrent_connection_limit() {
    let w = World::new();
    let mut p = w.policy();
    p.limits.max_connections = 2;
    let (_proxy, port) = w.proxy(w.config(p));
    // Two idle connections hold both slots (the head deadline is 2 s).
    let a = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let b = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let (reply, _) = raw(port, b"", Duration::from_secs(5));
    assert!(
        reply.starts_with("HTTP/1.1 403") && reply.contains("max_connections"),
        "{reply}"
    );
    drop((a, b));
}

#[test]
fn bad_requests_closed_within_deadline() {
    let w = World::new();
    let (proxy, port) = w.proxy(w.config(w.policy()));
    // Oversize head.
    let big = format!(
        "GET http://plain.test/ HTTP/1.1\r\nX: {}\r\n\r\n",
        "a".repeat(40_000)
    );
    let (reply, took) = raw(port, big.as_bytes(), Duration::from_secs(10));
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // Many headers.
    let many: String = (0..200).map(|i| format!("X{i}: v\r\n")).collect();
    let (reply, _) = raw(
        port,
        format!("GET http://plain.test/ HTTP/1.1\r\n{many}\r\n").as_bytes(),
        Duration::from_secs(10),
    );
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
    // Garbage.
    let (reply, took) = raw(
        port,
        b"\x16\x03\x01\x00\xff garbage \x00\r\n\r\n",
        Duration::from_secs(10),
    );
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(took < Duration::from_secs(5));
    // Origin-form to the proxy, smuggling framing.
    let (reply, _) = raw(
        port,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(10),
    );
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    let smuggle = format!("POST http://plain.test:{}/upload HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", w.http);
    let (reply, _) = raw(port, smuggle.as_bytes(), Duration::from_secs(10));
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    // Slowloris: one byte every 300 ms never completes a head; closed at the 2 s deadline.
    let start = Instant::now();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut reply = Vec::new();
    let line = b"GET http://plain.test/ HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    for b in line {
        if s.write_all(&[*b]).is_err() {
            break;
        }
        let mut buf = [0u8; 512];
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => reply.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        if start.elapsed() > Duration::from_secs(8) {
            break;
        }
    }
    let took = start.elapsed();
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(took < Duration::from_secs(6), "{took:?}");
    // A connection that sends nothing is dropped at the deadline too.
    let (reply, took) = raw(port, b"", Duration::from_secs(10));
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 408"),
        "{reply}"
    );
    assert!(took < Duration::from_secs(6), "{took:?}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(proxy.active_connections(), 0, "no proxy thread left behind");
    assert!(proxy
        .log()
        .entries()
        .iter()
        .all(|e| e.verdict == Verdict::Denied));
}

#[test]
fn unix_stream_and_transparent_entry() {
    let w = World::new();
    let proxy = EgressProxy::new(w.config(w.policy())).unwrap();
    // The HTTP proxy entry on a UnixStream (the vsock stand-in).
    let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    proxy.spawn_http(a).unwrap();
    write!(
        b,
        "GET http://plain.test:{}/hello HTTP/1.1\r\nHost: plain.test\r\n\r\n",
        w.http
    )
    .unwrap();
    let mut reply = String::new();
    b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    b.read_to_string(&mut reply).unwrap();
    assert!(
        reply.starts_with("HTTP/1.1 200") && reply.ends_with("hello"),
        "{reply}"
    );
    // The transparent entry: bytes relayed untouched to NAME:PORT.
    let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    proxy.spawn_raw(a, "plain.test", w.http).unwrap();
    b.write_all(b"GET /hello HTTP/1.1\r\nHost: plain.test\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    b.read_to_string(&mut reply).unwrap();
    assert!(
        reply.starts_with("HTTP/1.1 200") && reply.ends_with("hello"),
        "{reply}"
    );
    b.shutdown(std::net::Shutdown::Write).unwrap();
    // Denied by name and port: closed without a byte.
    let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    proxy.spawn_raw(a, "plain.test", 9).unwrap();
    let mut reply = Vec::new();
    b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = b.read_to_end(&mut reply);
    assert!(reply.is_empty());
    let log = wait_log(&proxy, 3);
    let raws: Vec<_> = log.iter().filter(|e| e.kind == ConnKind::Raw).collect();
    assert_eq!(raws.len(), 2, "{log:?}");
    assert!(raws
        .iter()
        .any(|e| e.verdict == Verdict::Allowed && e.bytes_down > 0));
    assert!(raws
        .iter()
        .any(|e| e.verdict == Verdict::Denied && e.port == 9 && e.rule == "default deny"));
}

fn run(cmd: &str, args: &[&str], env: &[(String, String)]) -> Out {
    let mut c = std::process::Command::new(cmd);
    c.args(args);
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
        c.env_remove(k);
    }
    c.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    c.stdin(std::process::Stdio::null());
    let o = c
        .output()
        .unwrap_or_else(|e| panic!("{cmd} is required for this test and could not be run: {e}"));
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// wget, python requests, git and pip through the proxy with the guest environment
/// (`guest_env`, CA bundle in place of the guest's). git and pip get a 404 from the test
/// origin (it is no git or package server): what is checked is that their HTTPS went through
/// the proxy, was intercepted with the sandbox CA trusted, and reached the origin.
#[test]
fn wget_requests_git_pip_through_the_proxy() {
    let w = World::new();
    let mut c = w.config(w.policy());
    c.secrets = vec![secret("TOKEN", "real-token", &["secret.test"])];
    let (proxy, port) = w.proxy(c);
    let bundle = w.client_bundle(&proxy);
    let bundle_s = bundle.to_str().unwrap().to_string();
    // The guest environment, with the CA paths pointing at this test's bundle.
    let env: Vec<(String, String)> = proxy
        .guest_env(&proxy_arg(port))
        .into_iter()
        .map(|(k, v)| {
            if v.starts_with("/etc/kiln/") {
                (k, bundle_s.clone())
            } else {
                (k, v)
            }
        })
        .collect();
    let ph = proxy.secrets()[0].placeholder().to_string();

    let o = run(
        "wget",
        &[
            "-q",
            "-O",
            "-",
            &format!("http://plain.test:{}/hello", w.http),
        ],
        &env,
    );
    assert_eq!(o.stdout, "hello", "{o:?}");
    let o = run(
        "wget",
        &[
            "-q",
            "-O",
            "-",
            "--ca-certificate",
            &bundle_s,
            "--header",
            &format!("X-T: {ph}"),
            &format!("https://secret.test:{}/headers", w.https),
        ],
        &env,
    );
    assert!(o.stdout.contains("X-T: real-token"), "{o:?}");

    let script = format!(
        "import os\ntry:\n  import requests\nexcept ImportError:\n  from pip._vendor import requests\nr=requests.get('https://secret.test:{}/headers',headers={{'Authorization':'token '+os.environ['TOKEN']}},timeout=30)\nprint(r.status_code);print(r.text)",
        w.https
    );
    let o = python(&script, &env);
    assert!(
        o.stdout.starts_with("200") && o.stdout.contains("Authorization: token real-token"),
        "{o:?}"
    );

    let before = proxy.log().entries().len();
    let o = run(
        "git",
        &[
            "ls-remote",
            &format!("https://secret.test:{}/repo.git", w.https),
        ],
        &env,
    );
    assert_ne!(o.code, 0);
    assert!(
        !o.stderr.to_ascii_lowercase().contains("ssl"),
        "git TLS failed: {o:?}"
    );
    let o2 = run(
        "python3",
        &[
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
            w.dir.path().to_str().unwrap(),
            "--index-url",
            &format!("https://secret.test:{}/simple/", w.https),
            "nosuchpkg",
        ],
        &env,
    );
    assert_ne!(o2.code, 0);
    assert!(
        !o2.stderr.contains("SSL") && !o2.stdout.contains("SSL"),
        "pip TLS failed: {o2:?}"
    );
    let log = proxy.log().entries();
    let later: Vec<_> = log[before..]
        .iter()
        .filter(|e| e.kind == ConnKind::Intercepted)
        .collect();
    assert!(later.len() >= 2, "{log:?}");
    assert!(
        later
            .iter()
            .all(|e| e.verdict == Verdict::Allowed && e.detail.is_none() && e.bytes_down > 0),
        "{later:?}"
    );
}

/// The transparent entry with a real client: curl connects (via `--connect-to`) to a listener
/// that hands each stream to `spawn_raw` with the original name and port, as the agent's
/// redirect will. TLS to the secret host is intercepted (secret injected); TLS to another host
/// is relayed end to end.
#[test]
fn transparent_entry_intercepts_secret_hosts_only() {
    let w = World::new();
    let mut c = w.config(w.policy());
    c.secrets = vec![secret("TOKEN", "transparent-value", &["secret.test"])];
    let proxy = EgressProxy::new(c).unwrap();
    let ph = proxy.secrets()[0].placeholder().to_string();
    let mut ports = Vec::new();
    for name in ["secret.test", "other.test"] {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        ports.push(l.local_addr().unwrap().port());
        let (p, n, dport) = (proxy.clone(), name.to_string(), w.https);
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let _ = p.spawn_raw(s, &n, dport);
            }
        });
    }
    let bundle = w.client_bundle(&proxy);
    let hdr = format!("X-T: {ph}");
    for (i, (name, want)) in [
        ("secret.test", "X-T: transparent-value".to_string()),
        ("other.test", format!("X-T: {ph}")),
    ]
    .iter()
    .enumerate()
    {
        let connect_to = format!("{name}:{}:127.0.0.1:{}", w.https, ports[i]);
        let out = curl(&[
            "--connect-to",
            &connect_to,
            "--cacert",
            bundle.to_str().unwrap(),
            "-H",
            &hdr,
            &format!("https://{name}:{}/headers", w.https),
        ]);
        assert_eq!(out.code, 0, "{out:?}");
        assert!(out.stdout.contains(want.as_str()), "{name}: {out:?}");
    }
    let log = wait_log(&proxy, 2);
    assert!(
        log.iter()
            .any(|e| e.kind == ConnKind::Intercepted && e.name == "secret.test"),
        "{log:?}"
    );
    assert!(
        log.iter()
            .any(|e| e.kind == ConnKind::Raw && e.name == "other.test" && e.bytes_down > 0),
        "{log:?}"
    );
}
