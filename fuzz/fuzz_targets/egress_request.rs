//! Fuzzes the egress proxy's request and response readers (kiln-egress): bounded heads,
//! framing checks, chunked bodies. Any input must give a value or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((head, body)) = kiln_egress::http::fuzz::read_request(data) {
        assert!(body.len() <= 1 << 20);
        assert!(head.headers.len() <= kiln_egress::http::MAX_HEADERS);
        // The proxy parses the target next.
        let _ = kiln_egress::proxy::parse_url(&head.target);
        let _ = kiln_egress::proxy::split_authority(&head.target);
    }
    let _ = kiln_egress::http::fuzz::read_response(data);
    let _ = kiln_egress::http::parse_request_head(data);
});
