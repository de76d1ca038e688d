//! The control API's request decoding: the route table over a method, a
//! percent-encoded path and query string, and the JSON bodies of every
//! request that has one.
//!
//! Input: byte 0 picks the method (GET, POST, DELETE, PUT), then the path,
//! a newline, the query, a newline, and the body (hyper hands the daemon
//! path and query as text, the body as bytes).
//!
//! Checked besides "no panic": decoding never makes a name longer; text
//! without escapes decodes to itself; a route found answers that method
//! and names each of its `{...}` segments; every body that decodes
//! encodes (as the CLI sends it) to JSON that decodes to the same request.
#![no_main]

use fleece::parsers::*;
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Decodes `body` as `T`; if that works, what `T` encodes to must decode to
/// the same value.
fn round_trip<T: DeserializeOwned + Serialize>(body: &[u8]) {
    let Ok(req) = serde_json::from_slice::<T>(body) else {
        return;
    };
    let sent = serde_json::to_vec(&req).expect("a decoded request encodes");
    let again: T = serde_json::from_slice(&sent).unwrap_or_else(|e| {
        panic!(
            "{} encodes to {} which does not decode: {e}",
            std::any::type_name::<T>(),
            String::from_utf8_lossy(&sent)
        )
    });
    let (a, b) = (
        serde_json::to_value(&req).unwrap(),
        serde_json::to_value(&again).unwrap(),
    );
    assert_eq!(a, b, "{} changes in a round trip", std::any::type_name::<T>());
}

fn check_decode(s: &str) {
    if let Ok(d) = percent_decode(s) {
        assert!(d.len() <= s.len());
        if !s.contains('%') {
            assert_eq!(d, s);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&m, rest)) = data.split_first() else {
        return;
    };
    let method = ["GET", "POST", "DELETE", "PUT"][m as usize % 4];
    let mut parts = rest.splitn(3, |&b| b == b'\n');
    let (Some(path), query, body) = (
        parts.next(),
        parts.next().unwrap_or(b""),
        parts.next().unwrap_or(b""),
    ) else {
        return;
    };
    let (Ok(path), Ok(query)) = (std::str::from_utf8(path), std::str::from_utf8(query)) else {
        return;
    };
    for seg in path.split('/') {
        check_decode(seg);
    }
    if let Ok(pairs) = parse_query(query) {
        assert!(pairs.len() <= query.split('&').count());
    }
    if let Ok(Routed::Found { route, params, .. }) = route(method, path, query) {
        assert_eq!(route.method, method);
        assert_eq!(params.len(), route.path.matches('{').count());
    }
    if body.len() > MAX_BODY {
        return;
    }
    round_trip::<AddDisk>(body);
    round_trip::<ResizeDisk>(body);
    round_trip::<CreateSnapshot>(body);
    round_trip::<AddBitmap>(body);
    round_trip::<MergeSources>(body);
    round_trip::<Transaction>(body);
    round_trip::<Action>(body);
    round_trip::<StartBackup>(body);
    round_trip::<SetSpeed>(body);
});
