//! Fuzzes the egress policy (kiln-egress): rule, host, CIDR, secret-spec and TOML parsers and
//! the matcher. Invariants: a parsed rule prints to text that parses back to the same rule; a
//! host matched by a deny rule is never allowed; nothing panics.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use kiln_egress::{Host, Policy, Rule};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = Policy::from_toml(&text, "fuzz");
    let mut policy = Policy::default();
    let mut hosts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let _ = kiln_egress::SecretSpec::parse(line);
        let _ = kiln_egress::Cidr::parse(line);
        if let Ok(rule) = Rule::parse(line) {
            let again = Rule::parse(&rule.to_string()).expect("a printed rule parses");
            assert_eq!(again, rule, "{line:?}");
            if i % 2 == 0 {
                policy.allow.push(rule);
            } else {
                policy.deny.push(rule);
            }
        }
        if let Some(h) = Host::parse(line) {
            hosts.push(h);
        }
        if let Some((h, _)) = line.split_once(':') {
            if let Some(h) = Host::parse(h) {
                hosts.push(h);
            }
        }
    }
    let mut addrs: Vec<IpAddr> = data
        .chunks_exact(4)
        .take(16)
        .map(|c| IpAddr::V4(Ipv4Addr::new(c[0], c[1], c[2], c[3])))
        .collect();
    addrs.extend(data.chunks_exact(16).take(8).map(|c| {
        let mut b = [0u8; 16];
        b.copy_from_slice(c);
        IpAddr::V6(Ipv6Addr::from(b))
    }));
    let port = data.first().map_or(443, |&b| (u16::from(b) << 8) | 1);
    for h in hosts.iter().chain(
        addrs
            .iter()
            .map(|a| Host::Ip(*a))
            .collect::<Vec<_>>()
            .iter(),
    ) {
        let denied_by_rule = policy
            .deny
            .iter()
            .any(|r| r.port.is_none_or(|p| p == port) && r.host.matches(h));
        let verdict = policy.check_target(h, port);
        if denied_by_rule {
            assert!(verdict.is_err());
        }
        for a in &addrs {
            let _ = policy.check_addr(h, *a, port, &addrs[..addrs.len().min(2)]);
        }
    }
});
