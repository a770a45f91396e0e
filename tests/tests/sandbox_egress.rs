//! Tier-4: egress (issue 11, docs/EGRESS.md) through a real guest. Guest programs connect to
//! the agent's proxy port 127.0.0.1:3128, the agent forwards over vsock, and the sandbox's
//! host-side proxy applies the policy. Every origin server is started by the test on L1's
//! loopback (the origins of crates/egress/tests/common) and reached through names the test
//! resolver maps to 127.0.0.1, each allowed by an explicit rule.
//!
//! Guest clients: busybox `wget` (plain HTTP through `http_proxy`; busybox wget sends
//! `GET https://..` to a proxy instead of CONNECT, so HTTPS from the guest needs the python
//! image) and busybox `nc` for raw proxy requests (CONNECT, denials with their body).
// Test support: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod sandbox_common;

#[path = "../../crates/egress/tests/common/mod.rs"]
mod egress_common;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use egress_common::{pattern_sha256, World};
use kiln::egress::{ConnKind, EgressError, HttpRequest, Policy, UpstreamRoots, Verdict};
use kiln::{ExecOptions, Sandbox, SandboxConfig, SandboxError};
use sandbox_common::config;

/// The resolver of every test: the common test names plus `rebind.test`, all 127.0.0.1.
fn resolver() -> kiln::egress::StaticResolver {
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    World::resolver().with("rebind.test", &[lo])
}

/// A config with egress under `policy`, the test resolver and the test CA as upstream roots.
fn egress_config(name: &str, w: &World, policy: Policy, memory_mib: u32) -> SandboxConfig {
    config(name, memory_mib)
        .egress(policy)
        .egress_resolver(Arc::new(resolver()))
        .egress_upstream_roots(UpstreamRoots::Pem(w.ca.pem.clone()))
}

fn boot(cfg: SandboxConfig) -> Sandbox {
    let name = cfg.name.clone().unwrap_or_default();
    match Sandbox::create(cfg) {
        Ok(s) => s,
        Err(e) => panic!("creating sandbox {name}: {e}"),
    }
}

/// Runs `sh -c script` in the guest (with a deadline); returns (exit code, stdout, stderr).
fn sh(sb: &Sandbox, script: &str) -> (i32, String, String) {
    let r = sb
        .exec_with_options(
            &["sh", "-c", script],
            ExecOptions::new().timeout(Duration::from_secs(240)),
        )
        .unwrap_or_else(|e| panic!("exec {script:?}: {e}"));
    (
        r.status.code.unwrap_or(-1),
        r.stdout_str(),
        String::from_utf8_lossy(&r.stderr).into_owned(),
    )
}

/// A raw request to the guest proxy with busybox nc (stdin held open so the answer arrives).
fn raw_proxy(sb: &Sandbox, request: &str) -> String {
    let script = format!("(printf '{request}'; sleep 4) | nc 127.0.0.1 3128");
    sh(sb, &script).1
}

fn get_line(url: &str, host: &str) -> String {
    format!("GET {url} HTTP/1.1\\r\\nHost: {host}\\r\\n\\r\\n")
}

#[test]
fn allowed_host_reached_with_wget_and_denials_name_their_rule() {
    kiln_tests::require_tier4();
    let w = World::new();
    // Loopback named per origin port only: `rebind.test` (a name rule) on another loopback
    // port must meet the built-in loopback denial.
    let other = egress_common::start_http_origin();
    let mut policy = w.policy();
    policy.allow.retain(|r| r.to_string() != "127.0.0.1");
    policy = policy
        .allow(&format!("127.0.0.1:{}", w.http))
        .unwrap()
        .allow(&format!("127.0.0.1:{}", w.https))
        .unwrap()
        .allow(&format!("rebind.test:{other}"))
        .unwrap()
        .allow("*:9")
        .unwrap();
    let sb = boot(egress_config("egress-basic", &w, policy, 256));

    // The exec environment names the proxy; NO_PROXY only the guest's own loopback.
    let (_, env, _) = sh(&sb, "echo \"$http_proxy|$HTTPS_PROXY|$NO_PROXY\"");
    assert_eq!(
        env.trim(),
        "http://127.0.0.1:3128|http://127.0.0.1:3128|localhost,127.0.0.1,::1"
    );
    // ... overridable by the caller.
    let r = sb
        .exec_with_options(
            &["sh", "-c", "echo \"$NO_PROXY\""],
            ExecOptions::new().env("NO_PROXY", "*"),
        )
        .unwrap();
    assert_eq!(r.stdout_str().trim(), "*");

    // Allowed: busybox wget through http_proxy.
    let (code, out, err) = sh(
        &sb,
        &format!("wget -q -O - http://plain.test:{}/hello", w.http),
    );
    assert_eq!((code, out.as_str()), (0, "hello"), "stderr: {err}");

    // Denied by a deny rule, by default, built-in ranges, DNS answer to loopback.
    for (url, host, rule) in [
        (
            format!("http://bad.evil.test:{}/", w.http),
            "bad.evil.test",
            "deny *.evil.test",
        ),
        (
            format!("http://unknown.test:{}/", w.http),
            "unknown.test",
            "default deny",
        ),
        (
            "http://10.1.2.3:9/".to_string(),
            "10.1.2.3",
            "builtin: private",
        ),
        (
            "http://169.254.169.254:9/".to_string(),
            "169.254.169.254",
            "builtin: link-local",
        ),
        (
            format!("http://rebind.test:{other}/"),
            "rebind.test",
            "builtin: loopback",
        ),
    ] {
        let resp = raw_proxy(&sb, &get_line(&url, host));
        assert!(resp.starts_with("HTTP/1.1 403"), "{url}: {resp:?}");
        assert!(resp.contains(&format!("`{rule}`")), "{url}: {resp:?}");
    }
    // wget sees the 403 as a failure.
    let (code, _, err) = sh(
        &sb,
        &format!("wget -q -O - http://unknown.test:{}/hello", w.http),
    );
    assert_ne!(code, 0, "{err}");

    // CONNECT to a port no rule allows: 403. To an allowed one: 200 (a tunnel).
    let resp = raw_proxy(
        &sb,
        "CONNECT plain.test:1 HTTP/1.1\\r\\nHost: plain.test:1\\r\\n\\r\\n",
    );
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp:?}");
    assert!(resp.contains("`default deny`"), "{resp:?}");
    let resp = raw_proxy(
        &sb,
        &format!(
            "CONNECT plain.test:{p} HTTP/1.1\\r\\nHost: plain.test:{p}\\r\\n\\r\\nGET /hello HTTP/1.1\\r\\nHost: plain.test\\r\\n\\r\\n",
            p = w.http
        ),
    );
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp:?}");
    assert!(resp.ends_with("hello"), "{resp:?}");

    // The log has every connection with its verdict and rule.
    let log = sb.egress_log();
    let allowed: Vec<_> = log
        .iter()
        .filter(|e| e.verdict == Verdict::Allowed)
        .collect();
    assert!(
        allowed
            .iter()
            .any(|e| e.name == "plain.test" && e.kind == ConnKind::Http && e.bytes_down > 0),
        "{log:?}"
    );
    assert!(
        allowed.iter().any(|e| e.kind == ConnKind::Connect),
        "{log:?}"
    );
    for rule in [
        "deny *.evil.test",
        "default deny",
        "builtin: private",
        "builtin: link-local",
        "builtin: loopback",
    ] {
        assert!(
            log.iter()
                .any(|e| e.verdict == Verdict::Denied && e.rule == rule),
            "{rule}: {log:?}"
        );
    }

    // The host's requests on the sandbox's behalf: same policy, same log.
    let n = sb.egress_log().len();
    let r = sb
        .http_request(HttpRequest::get(&format!(
            "http://plain.test:{}/hello",
            w.http
        )))
        .unwrap();
    assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]));
    match sb.http_request(HttpRequest::get(&format!(
        "http://bad.evil.test:{}/",
        w.http
    ))) {
        Err(SandboxError::Egress {
            source: EgressError::Denied(d),
            ..
        }) => assert_eq!(d.rule, "deny *.evil.test"),
        other => panic!("{other:?}"),
    }
    let log = sb.egress_log();
    assert_eq!(log.len(), n + 2, "{log:?}");
    assert!(log[n..].iter().all(|e| e.kind == ConnKind::HostRequest));
}

#[test]
fn no_policy_means_no_egress() {
    kiln_tests::require_tier4();
    let w = World::new();
    let sb = boot(config("egress-none", 256));
    let (_, env, _) = sh(&sb, "echo \"[$http_proxy]\"");
    assert_eq!(env.trim(), "[]");
    // The agent's port refuses: the connection closes without a byte.
    let resp = raw_proxy(
        &sb,
        &get_line(&format!("http://127.0.0.1:{}/hello", w.http), "x"),
    );
    assert_eq!(resp, "");
    assert!(sb.egress_log().is_empty());
    assert!(matches!(
        sb.http_request(HttpRequest::get("http://plain.test/")),
        Err(SandboxError::InvalidArgument { .. })
    ));
}

#[test]
fn secret_replaced_for_its_host_only_and_never_in_guest_memory() {
    kiln_tests::require_tier4();
    const VALUE: &str = "host-side-value-9f3e2d1c";
    let w = World::new();
    let cfg = egress_config("egress-secret", &w, w.policy(), 256).secret(
        "API_TOKEN",
        VALUE,
        &["secret.test"],
    );
    let sb = boot(cfg);
    let ph = sb.secret_placeholder("API_TOKEN").expect("the secret");
    assert!(ph.starts_with("kiln-secret-"), "{ph}");

    // The guest sees the placeholder, and the CA files its trust variables name.
    let (_, out, _) = sh(
        &sb,
        "echo \"$API_TOKEN\"; echo \"$SSL_CERT_FILE $REQUESTS_CA_BUNDLE $NODE_EXTRA_CA_CERTS\"; \
         grep -c 'BEGIN CERTIFICATE' /etc/kiln/egress-ca.pem; \
         grep -c 'BEGIN CERTIFICATE' \"$SSL_CERT_FILE\"",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], ph);
    assert_eq!(
        lines[1],
        "/etc/kiln/ca-bundle.pem /etc/kiln/ca-bundle.pem /etc/kiln/egress-ca.pem"
    );
    assert_eq!(lines[2], "1");
    assert!(lines[3].parse::<u32>().unwrap() >= 1, "{out}");

    // Plain HTTP to the secret host: never replaced.
    let (code, out, err) = sh(
        &sb,
        &format!(
            "wget -q -O - --header \"X-Api-Key: $API_TOKEN\" http://secret.test:{}/headers",
            w.http
        ),
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("X-Api-Key: {ph}")), "{out}");
    assert!(!out.contains(VALUE));

    // HTTPS (verified against the test CA) with the placeholder: replaced for the secret's
    // host, left for another.
    let mut req = HttpRequest::get(&format!("https://secret.test:{}/headers", w.https));
    req.headers.push(("X-Api-Key".into(), ph.clone()));
    let body = String::from_utf8(sb.http_request(req).unwrap().body).unwrap();
    assert!(body.contains(&format!("X-Api-Key: {VALUE}")), "{body}");
    let mut req = HttpRequest::get(&format!("https://other.test:{}/headers", w.https));
    req.headers.push(("X-Api-Key".into(), ph.clone()));
    let body = String::from_utf8(sb.http_request(req).unwrap().body).unwrap();
    assert!(body.contains(&format!("X-Api-Key: {ph}")), "{body}");

    // A full memory snapshot of the guest holds guest data (a marker file in its tmpfs) but
    // not the secret's value.
    const MARKER: &str = "kiln-egress-marker-5b7d9a0e41c3";
    sb.write_file("/tmp/marker", MARKER.as_bytes()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    sb.snapshot(&snap).unwrap();
    let mem = std::fs::read(snap.join("memory.bin")).unwrap();
    assert!(mem.len() >= 64 << 20, "memory.bin is {} bytes", mem.len());
    assert!(
        contains(&mem, MARKER.as_bytes()),
        "the scan must see guest data"
    );
    assert!(
        !contains(&mem, VALUE.as_bytes()),
        "the secret's value is in guest memory"
    );
}

/// Whether `hay` contains `needle` (first-byte scan, then compare).
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    let Some((&first, rest)) = needle.split_first() else {
        return true;
    };
    let mut i = 0;
    while let Some(off) = hay[i..].iter().position(|&b| b == first) {
        let at = i + off;
        if hay.get(at + 1..at + 1 + rest.len()) == Some(rest) {
            return true;
        }
        i = at + 1;
    }
    false
}

#[test]
fn hundred_concurrent_connections() {
    kiln_tests::require_tier4();
    let w = World::new();
    let sb = boot(egress_config("egress-conc", &w, w.policy(), 512));
    let script = format!(
        "for i in $(seq 100); do wget -q -O /tmp/o$i http://plain.test:{}/slow/2000 & done; \
         wait; for i in $(seq 100); do cat /tmp/o$i; echo; done | grep -c '^slow$'",
        w.http
    );
    let t = Instant::now();
    let (_, out, err) = sh(&sb, &script);
    assert_eq!(out.trim(), "100", "stderr: {err}");
    let log = sb.egress_log();
    assert_eq!(
        log.iter()
            .filter(|e| e.verdict == Verdict::Allowed && e.name == "plain.test")
            .count(),
        100,
        "{log:?}"
    );
    // 100 sequential 2 s requests would take 200 s.
    assert!(t.elapsed() < Duration::from_secs(150), "{:?}", t.elapsed());
}

#[test]
fn download_of_256_mib_is_intact() {
    kiln_tests::require_tier4();
    const N: u64 = 256 << 20;
    let w = World::new();
    let sb = boot(egress_config("egress-big", &w, w.policy(), 256));
    let t = Instant::now();
    let (code, out, err) = sh(
        &sb,
        &format!(
            "wget -q -O - http://plain.test:{}/big/{N} | sha256sum",
            w.http
        ),
    );
    let took = t.elapsed();
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.split_whitespace().next(),
        Some(pattern_sha256(N).as_str())
    );
    eprintln!(
        "256 MiB through the egress proxy in {took:?} ({:.1} MiB/s)",
        256.0 / took.as_secs_f64()
    );
    let log = sb.egress_log();
    assert!(log.iter().any(|e| e.bytes_down >= N), "{log:?}");
}

#[test]
fn byte_limit_enforced() {
    kiln_tests::require_tier4();
    let w = World::new();
    let mut policy = w.policy();
    policy.limits.max_total_bytes = Some(1 << 20);
    let sb = boot(egress_config("egress-bytes", &w, policy, 256));
    let (_, out, _) = sh(
        &sb,
        &format!(
            "wget -q -O - http://plain.test:{}/big/4000000 | wc -c",
            w.http
        ),
    );
    let got: u64 = out.trim().parse().unwrap();
    assert!(
        got > 0 && got <= 1 << 20,
        "{got} bytes passed; the limit cuts the transfer at 1 MiB"
    );
    let resp = raw_proxy(
        &sb,
        &get_line(&format!("http://plain.test:{}/hello", w.http), "plain.test"),
    );
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp:?}");
    assert!(resp.contains("max_total_bytes"), "{resp:?}");
}

#[test]
fn a_flooding_sandbox_leaves_another_unaffected() {
    kiln_tests::require_tier4();
    let w = World::new();
    let mut flood_policy = w.policy();
    flood_policy.limits.max_connections = 16;
    flood_policy.limits.max_new_connections_per_sec = 20;
    let a = boot(egress_config("egress-flood", &w, flood_policy, 256));
    let b = boot(egress_config("egress-calm", &w, w.policy(), 256));
    // A: 64 loops opening connections that send an incomplete head and hold it, for 40 s.
    let flood = format!(
        "end=$(( $(date +%s) + 40 )); for j in $(seq 64); do \
         (while [ $(date +%s) -lt $end ]; do (printf 'GET http://plain.test:{}/ HTTP/1.1\\r\\n'; sleep 3) \
         | nc 127.0.0.1 3128 >/dev/null 2>&1; done) & done; wait; echo flooded",
        w.http
    );
    let flooder = std::thread::scope(|s| {
        let h = s.spawn(|| sh(&a, &flood));
        std::thread::sleep(Duration::from_secs(8));
        // B: 20 requests, each answered promptly.
        for i in 0..20 {
            let t = Instant::now();
            let (code, out, err) = sh(
                &b,
                &format!("wget -q -O - http://plain.test:{}/hello", w.http),
            );
            assert_eq!((code, out.as_str()), (0, "hello"), "request {i}: {err}");
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "request {i} took {:?}",
                t.elapsed()
            );
        }
        h.join().unwrap()
    });
    assert_eq!(flooder.1.trim(), "flooded", "{flooder:?}");
    let log_a = a.egress_log();
    assert!(
        log_a.len() >= 20,
        "the flood reached A's proxy: {}",
        log_a.len()
    );
    let log_b = b.egress_log();
    assert_eq!(
        log_b
            .iter()
            .filter(|e| e.verdict == Verdict::Allowed)
            .count(),
        20,
        "{log_b:?}"
    );
}

#[test]
fn kiln_run_allow_host_flags() {
    kiln_tests::require_tier4();
    let port = egress_common::start_http_origin();
    let allow = format!("127.0.0.1:{port}");
    // The origin by its loopback address, named by the rule; a denied one by a deny rule.
    let script = format!(
        "(printf 'GET http://127.0.0.1:{port}/hello HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'; sleep 4) \
         | nc 127.0.0.1 3128; echo; \
         (printf 'GET http://127.0.0.2:{port}/hello HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'; sleep 4) \
         | nc 127.0.0.1 3128"
    );
    let o = sandbox_common::run_kiln(
        &[
            "run",
            "--boot-timeout",
            "180",
            "--allow-host",
            &allow,
            "--deny-host",
            "127.0.0.2",
            "--",
            "sh",
            "-c",
            &script,
        ],
        &[],
        None,
    );
    let d = sandbox_common::describe(&o);
    assert_eq!(o.status.code(), Some(0), "{d}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("HTTP/1.1 200") && out.contains("hello"), "{d}");
    assert!(out.contains("`deny 127.0.0.2`"), "{d}");
    // A bad rule is a usage error before anything boots.
    let o = sandbox_common::run_kiln(&["run", "--allow-host", "a b", "--", "true"], &[], None);
    assert_eq!(o.status.code(), Some(2), "{}", sandbox_common::describe(&o));
}

/// The wheel the pip test installs: `kilnpkg` 1.0, pure Python.
const WHEEL_NAME: &str = "kilnpkg-1.0-py3-none-any.whl";

/// CRC-32 (IEEE, reflected) of `data`, for the stored zip entries.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Unpadded URL-safe base64 (the encoding of wheel RECORD hashes).
fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut s = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..=c.len() {
            s.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    s
}

/// A zip archive of `files`, every entry stored (no compression).
fn stored_zip(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in files {
        let offset = out.len() as u32;
        let (crc, len, nlen) = (crc32(data), data.len() as u32, name.len() as u16);
        // Version 2.0, no flags, stored, DOS time/date 1980-01-01 00:00.
        let common = |v: &mut Vec<u8>| {
            v.extend_from_slice(&20u16.to_le_bytes());
            v.extend_from_slice(&0u16.to_le_bytes());
            v.extend_from_slice(&0u16.to_le_bytes());
            v.extend_from_slice(&0u16.to_le_bytes());
            v.extend_from_slice(&0x21u16.to_le_bytes());
            v.extend_from_slice(&crc.to_le_bytes());
            v.extend_from_slice(&len.to_le_bytes());
            v.extend_from_slice(&len.to_le_bytes());
            v.extend_from_slice(&nlen.to_le_bytes());
            v.extend_from_slice(&0u16.to_le_bytes());
        };
        out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        common(&mut out);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);
        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        central.extend_from_slice(&20u16.to_le_bytes()); // made by
        common(&mut central);
        central.extend_from_slice(&[0; 6]); // comment len, disk, internal attrs
        central.extend_from_slice(&(0o100644u32 << 16).to_le_bytes()); // external attrs
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(name.as_bytes());
    }
    let (cd_off, cd_len, n) = (out.len() as u32, central.len() as u32, files.len() as u16);
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&cd_len.to_le_bytes());
    out.extend_from_slice(&cd_off.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

/// The `kilnpkg` wheel: `kilnpkg/__init__.py` (defining `MAGIC`) and its dist-info.
fn build_wheel() -> Vec<u8> {
    use sha2::Digest;
    let init = b"MAGIC = 'kiln-wheel-ok'\n".to_vec();
    let metadata = b"Metadata-Version: 2.1\nName: kilnpkg\nVersion: 1.0\n".to_vec();
    let wheel =
        b"Wheel-Version: 1.0\nGenerator: kiln-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
            .to_vec();
    let mut files = vec![
        ("kilnpkg/__init__.py", init),
        ("kilnpkg-1.0.dist-info/METADATA", metadata),
        ("kilnpkg-1.0.dist-info/WHEEL", wheel),
    ];
    let mut record: String = files
        .iter()
        .map(|(n, d)| {
            format!(
                "{n},sha256={},{}\n",
                b64url(&sha2::Sha256::digest(d)),
                d.len()
            )
        })
        .collect();
    record.push_str("kilnpkg-1.0.dist-info/RECORD,,\n");
    files.push(("kilnpkg-1.0.dist-info/RECORD", record.into_bytes()));
    stored_zip(&files)
}

/// A PyPI-style simple index (PEP 503) on L1's loopback serving `kilnpkg`: `/simple/`,
/// `/simple/kilnpkg/` (one link, with the wheel's sha256) and the wheel. Returns its port.
fn start_simple_index() -> u16 {
    use sha2::Digest;
    use std::io::{Read, Write};
    let whl = Arc::new(build_wheel());
    let sha = egress_common::hex(&sha2::Sha256::digest(whl.as_slice()));
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let (whl, sha) = (Arc::clone(&whl), sha.clone());
            std::thread::spawn(move || {
                let mut s = s;
                let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                let mut buf = Vec::new();
                let mut tmp = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 65536 {
                    match s.read(&mut tmp) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf);
                let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                let (ctype, body): (&str, Vec<u8>) = match path.as_str() {
                    "/simple/" => (
                        "text/html",
                        b"<html><body><a href=\"/simple/kilnpkg/\">kilnpkg</a></body></html>"
                            .to_vec(),
                    ),
                    "/simple/kilnpkg/" => (
                        "text/html",
                        format!(
                            "<html><body><a href=\"/files/{WHEEL_NAME}#sha256={sha}\">\
                             {WHEEL_NAME}</a></body></html>"
                        )
                        .into_bytes(),
                    ),
                    p if p == format!("/files/{WHEEL_NAME}") => {
                        ("application/octet-stream", whl.to_vec())
                    }
                    _ => {
                        let _ = s.write_all(
                            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        );
                        return;
                    }
                };
                let _ = s.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\
                         Connection: close\r\n\r\n",
                        body.len()
                    )
                    .as_bytes(),
                );
                let _ = s.write_all(&body);
            });
        }
    });
    port
}

#[test]
fn wheel_builder_makes_a_valid_zip() {
    // Host-side check of the test's own wheel (no guest): CRC and base64 against known values.
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    assert_eq!(b64url(b"\xfb\xff"), "-_8");
    assert_eq!(b64url(b"abc"), "YWJj");
    let whl = build_wheel();
    assert_eq!(&whl[..4], b"PK\x03\x04");
    let eocd = &whl[whl.len() - 22..];
    assert_eq!(&eocd[..4], b"PK\x05\x06");
    assert_eq!(u16::from_le_bytes([eocd[10], eocd[11]]), 4);
    let cd_len = u32::from_le_bytes(eocd[12..16].try_into().unwrap()) as usize;
    let cd_off = u32::from_le_bytes(eocd[16..20].try_into().unwrap()) as usize;
    assert_eq!(cd_off + cd_len, whl.len() - 22);
    // Each central entry is 46 bytes plus its name, and starts with its signature.
    let mut at = cd_off;
    for _ in 0..4 {
        assert_eq!(&whl[at..at + 4], b"PK\x01\x02", "entry at {at}");
        at += 46 + usize::from(u16::from_le_bytes([whl[at + 28], whl[at + 29]]));
    }
    assert_eq!(at, cd_off + cd_len);
}

/// Python in the python image: urllib over plain HTTP (allowed, and a 403 naming the rule),
/// urllib over HTTPS through CONNECT with the secret replaced by the intercepting proxy, and
/// `pip install` of a wheel from a simple index on L1's loopback, then `import`. One sandbox.
#[test]
fn python_urllib_and_pip_install_through_the_proxy() {
    kiln_tests::require_tier4();
    let w = World::new();
    let index = start_simple_index();
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    let policy = w.policy().allow(&format!("index.test:{index}")).unwrap();
    let cfg = config("egress-python", 512)
        .image("python")
        .overlay_size_mib(128)
        .egress(policy)
        .egress_resolver(Arc::new(resolver().with("index.test", &[lo])))
        .egress_upstream_roots(UpstreamRoots::Pem(w.ca.pem.clone()))
        .secret("API_TOKEN", "py-secret-value-77ab", &["secret.test"]);
    let t = Instant::now();
    let sb = boot(cfg);
    eprintln!("python image with egress ready in {:?}", t.elapsed());

    // urllib: allowed over plain HTTP; denied with the rule in the 403 body; HTTPS to the
    // secret's host through CONNECT (trusting the sandbox CA via SSL_CERT_FILE), the header's
    // placeholder replaced on the way.
    let script = format!(
        r#"
import os, urllib.request, urllib.error
print(urllib.request.urlopen('http://plain.test:{http}/hello', timeout=60).read().decode())
try:
    urllib.request.urlopen('http://bad.evil.test:{http}/hello', timeout=60)
    print('not denied')
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
req = urllib.request.Request('https://secret.test:{https}/headers',
                             headers={{'X-Api-Key': os.environ['API_TOKEN']}})
print(urllib.request.urlopen(req, timeout=60).read().decode())
"#,
        http = w.http,
        https = w.https
    );
    let t = Instant::now();
    let r = sb
        .exec_with_options(
            &["python3", "-c", &script],
            ExecOptions::new().timeout(Duration::from_secs(240)),
        )
        .unwrap();
    eprintln!("urllib part took {:?}", t.elapsed());
    let out = r.stdout_str();
    assert!(r.success(), "stdout: {out}\nstderr: {}", r.stderr_str());
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "hello", "{out}");
    assert!(
        lines[1].starts_with("403 ") && lines[1].contains("`deny *.evil.test`"),
        "{out}"
    );
    assert!(out.contains("X-Api-Key: py-secret-value-77ab"), "{out}");

    // pip through http_proxy from the simple index, into a target dir (the image's system
    // site-packages is Debian's, externally managed), then import it.
    let t = Instant::now();
    let script = format!(
        "python3 -m pip install --no-cache-dir --disable-pip-version-check \
         --index-url http://index.test:{index}/simple/ --trusted-host index.test \
         --target /tmp/pkgs kilnpkg && \
         PYTHONPATH=/tmp/pkgs python3 -c 'import kilnpkg; print(kilnpkg.MAGIC)'"
    );
    let (code, out, err) = sh(&sb, &script);
    eprintln!("pip part took {:?}", t.elapsed());
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert_eq!(out.lines().last(), Some("kiln-wheel-ok"), "{out}\n{err}");

    let log = sb.egress_log();
    assert!(
        log.iter()
            .any(|e| e.name == "index.test" && e.verdict == Verdict::Allowed && e.bytes_down > 0),
        "{log:?}"
    );
    assert!(
        log.iter()
            .any(|e| e.name == "secret.test" && e.kind == ConnKind::Intercepted),
        "{log:?}"
    );
}
