//! `EgressProxy::http_request`: the host's requests on the sandbox's behalf, under the same
//! policy, secrets and log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use kiln_egress::{ConnKind, EgressError, EgressProxy, HttpRequest, Verdict};

#[test]
fn http_request_allowed_denied_and_secrets() {
    let w = World::new();
    let mut c = w.config(w.policy());
    c.secrets = vec![secret("TOKEN", "host-side-value", &["secret.test"])];
    let proxy = EgressProxy::new(c).unwrap();
    let ph = proxy.secrets()[0].placeholder().to_string();

    let r = proxy
        .http_request(&HttpRequest::get(&format!(
            "http://plain.test:{}/hello",
            w.http
        )))
        .unwrap();
    assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]));
    assert_eq!(r.header("content-length"), Some("5"));

    let r = proxy
        .http_request(&HttpRequest::get(&format!(
            "http://plain.test:{}/chunked",
            w.http
        )))
        .unwrap();
    assert_eq!(r.body, b"hello world");

    let mut post = HttpRequest::get(&format!("http://plain.test:{}/upload", w.http));
    post.method = "POST".into();
    post.body = vec![7; 1000];
    assert_eq!(proxy.http_request(&post).unwrap().body, b"len=1000");

    // HTTPS to the secret host: verified against the test CA, placeholder replaced.
    let mut req = HttpRequest::get(&format!("https://secret.test:{}/headers", w.https));
    req.headers.push(("X-Api-Key".into(), ph.clone()));
    let r = proxy.http_request(&req).unwrap();
    let body = String::from_utf8(r.body).unwrap();
    assert!(body.contains("X-Api-Key: host-side-value"), "{body}");
    // Another host: the placeholder stays.
    let mut req = HttpRequest::get(&format!("https://other.test:{}/headers", w.https));
    req.headers.push(("X-Api-Key".into(), ph.clone()));
    let body = String::from_utf8(proxy.http_request(&req).unwrap().body).unwrap();
    assert!(body.contains(&format!("X-Api-Key: {ph}")), "{body}");

    // Denied: by default, by a deny rule, by the built-in ranges.
    for (url, rule) in [
        (
            format!("http://unknown.test:{}/", w.http),
            "default deny".to_string(),
        ),
        (
            format!("http://bad.evil.test:{}/", w.http),
            "deny *.evil.test".to_string(),
        ),
        (
            "http://169.254.169.254/".to_string(),
            "default deny".to_string(),
        ),
    ] {
        match proxy.http_request(&HttpRequest::get(&url)) {
            Err(EgressError::Denied(d)) => assert_eq!(d.rule, rule, "{url}"),
            other => panic!("{url}: {other:?}"),
        }
    }
    // Bad input is a typed error.
    assert!(matches!(
        proxy.http_request(&HttpRequest::get("ftp://x/")),
        Err(EgressError::Url { .. })
    ));
    let mut bad = HttpRequest::get(&format!("http://plain.test:{}/", w.http));
    bad.headers.push(("X".into(), "a\r\nInjected: 1".into()));
    assert!(matches!(
        proxy.http_request(&bad),
        Err(EgressError::Header(_))
    ));

    // A response larger than allowed.
    let mut big = HttpRequest::get(&format!("http://plain.test:{}/big/100000", w.http));
    big.max_response_bytes = 1000;
    assert!(matches!(
        proxy.http_request(&big),
        Err(EgressError::Exchange { .. })
    ));

    let log = proxy.log().entries();
    assert!(log.iter().all(|e| e.kind == ConnKind::HostRequest));
    assert_eq!(
        log.iter().filter(|e| e.verdict == Verdict::Allowed).count(),
        6,
        "{log:?}"
    );
    assert_eq!(
        log.iter().filter(|e| e.verdict == Verdict::Denied).count(),
        3
    );
}

#[test]
fn http_request_untrusted_upstream_fails() {
    let w = World::new();
    let mut c = w.config(w.policy());
    c.upstream_roots = kiln_egress::UpstreamRoots::Pem(TestCa::new().pem);
    let proxy = EgressProxy::new(c).unwrap();
    let err = proxy
        .http_request(&HttpRequest::get(&format!(
            "https://other.test:{}/hello",
            w.https
        )))
        .unwrap_err();
    let text = kiln_egress::proxy::error_chain(&err);
    assert!(
        text.contains("certificate") || text.contains("UnknownIssuer"),
        "{text}"
    );
}
