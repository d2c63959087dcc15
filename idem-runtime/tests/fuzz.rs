//! Long property runs ("fuzzing") of the parsers that face untrusted bytes: the key
//! header, header maps, and stored records. Outside the default test run:
//!
//! `IDEM_FUZZ_CASES=100000 cargo test --release -p idem-runtime --test fuzz -- --ignored`
//!
//! FUZZING.md records the runs.

#![allow(clippy::unwrap_used)]

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use bytes::Bytes;
use idem_runtime::{
    FingerprintMode, IdempotencyKey, KeyError, fingerprint::Fingerprint, http::IDEMPOTENCY_KEY,
    record::FencingToken, record::Record, record::StoredResponse,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn runner() -> TestRunner {
    let cases = std::env::var("IDEM_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000);
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

/// Bytes that look like header values: mostly near-valid keys, with quotes, escapes,
/// spaces, controls and high bytes mixed in.
fn key_like() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        4 => b'!'..=b'~',
        1 => Just(b'"'),
        1 => Just(b'\\'),
        1 => Just(b' '),
        1 => Just(b'\t'),
        1 => any::<u8>(),
    ];
    proptest::collection::vec(byte, 0..300)
}

/// Every accepted key is non-empty, at most 255 visible-ASCII-or-space characters, and
/// its quoted form parses back to itself; nothing panics.
#[test]
#[ignore = "long run; see FUZZING.md"]
fn fuzz_key_parsing() {
    runner()
        .run(&key_like(), |raw| {
            match IdempotencyKey::parse(&raw) {
                Ok(key) => {
                    let text = key.as_str();
                    prop_assert!(!text.is_empty() && text.len() <= IdempotencyKey::MAX_LEN);
                    prop_assert!(text.bytes().all(|b| (b' '..=b'~').contains(&b)));
                    let again = IdempotencyKey::parse(key.to_header_value().as_bytes()).unwrap();
                    prop_assert_eq!(again.as_str(), text);
                }
                Err(KeyError::TooLong { len }) => prop_assert!(len > IdempotencyKey::MAX_LEN),
                Err(_) => {}
            }
            Ok(())
        })
        .unwrap();
}

/// Any number of `Idempotency-Key` fields with any valid header bytes: more than one is
/// always refused as repeated, one is parsed, none is `None`.
#[test]
#[ignore = "long run; see FUZZING.md"]
fn fuzz_header_maps() {
    let values = proptest::collection::vec(key_like(), 0..4);
    runner()
        .run(&values, |values| {
            let mut headers = HeaderMap::new();
            let mut count = 0;
            for value in &values {
                if let Ok(value) = HeaderValue::from_bytes(value) {
                    headers.append(&IDEMPOTENCY_KEY, value);
                    count += 1;
                }
            }
            match IdempotencyKey::from_headers(&headers) {
                Ok(None) => prop_assert_eq!(count, 0),
                Ok(Some(_)) => prop_assert_eq!(count, 1),
                Err(KeyError::Repeated { count: seen }) => {
                    prop_assert!(count > 1);
                    prop_assert_eq!(seen, count);
                }
                Err(_) => prop_assert_eq!(count, 1),
            }
            Ok(())
        })
        .unwrap();
}

fn header_pair() -> impl Strategy<Value = (HeaderName, HeaderValue)> {
    (
        "[a-z0-9!#$%&'*+.^_`|~-]{1,40}",
        proptest::collection::vec(
            prop_oneof![(0x20u8..=0x7e), (0x80u8..=0xff), Just(b'\t')],
            0..80,
        ),
    )
        .prop_filter_map("valid header", |(name, value)| {
            Some((
                HeaderName::from_bytes(name.as_bytes()).ok()?,
                HeaderValue::from_bytes(&value).ok()?,
            ))
        })
}

fn record() -> impl Strategy<Value = Record> {
    let fingerprint = any::<[u8; 32]>()
        .prop_map(|bytes| Fingerprint::of(&FingerprintMode::Exact, &Method::POST, "/", &bytes));
    prop_oneof![
        fingerprint
            .clone()
            .prop_map(|fingerprint| Record::InProgress {
                fingerprint,
                token: FencingToken::generate(),
            }),
        (
            fingerprint,
            100u16..1000,
            proptest::collection::vec(header_pair(), 0..12),
            proptest::collection::vec(any::<u8>(), 0..2048),
            any::<u64>(),
        )
            .prop_map(|(fingerprint, status, headers, body, expires_at_ms)| {
                Record::Completed(StoredResponse {
                    fingerprint,
                    status: StatusCode::from_u16(status).unwrap(),
                    headers,
                    body: Bytes::from(body),
                    expires_at_ms,
                })
            }),
    ]
}

/// Records with arbitrary headers and bodies round-trip exactly; the same bytes with one
/// byte changed, cut or extended never panic and never decode to a different kind.
#[test]
#[ignore = "long run; see FUZZING.md"]
fn fuzz_record_decoding() {
    let case = (record(), any::<prop::sample::Index>(), any::<u8>(), 0u8..3);
    runner()
        .run(&case, |(record, at, byte, mutation)| {
            let encoded = record.encode();
            let decoded = Record::decode(&encoded);
            prop_assert_eq!(decoded.as_ref(), Ok(&record));
            let mut bytes = encoded.to_vec();
            let at = at.index(bytes.len());
            match mutation {
                0 => bytes[at] = byte,
                1 => bytes.truncate(at),
                _ => bytes.insert(at, byte),
            }
            if let Ok(decoded) = Record::decode(&Bytes::from(bytes)) {
                prop_assert_eq!(
                    std::mem::discriminant(&decoded),
                    std::mem::discriminant(&record)
                );
            }
            Ok(())
        })
        .unwrap();
}

/// Arbitrary bytes never panic the decoder, and whatever decodes re-encodes to the same
/// bytes (no two encodings of one record).
#[test]
#[ignore = "long run; see FUZZING.md"]
fn fuzz_arbitrary_record_bytes() {
    let bytes = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..512),
        proptest::collection::vec(any::<u8>(), 0..512).prop_map(|mut tail| {
            let mut bytes = b"idem\x01".to_vec();
            bytes.push(tail.first().map_or(2, |b| b % 4));
            bytes.append(&mut tail);
            bytes
        }),
    ];
    runner()
        .run(&bytes, |bytes| {
            let bytes = Bytes::from(bytes);
            if let Ok(record) = Record::decode(&bytes) {
                prop_assert_eq!(record.encode(), bytes);
            }
            Ok(())
        })
        .unwrap();
}

/// The canonical-JSON fingerprint never panics on arbitrary bodies.
#[test]
#[ignore = "long run; see FUZZING.md"]
fn fuzz_canonical_json_fingerprint() {
    let body = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..256),
        "[\\[\\]{}:,\"0-9a-z .eE+-]{0,200}".prop_map(String::into_bytes),
    ];
    runner()
        .run(&body, |body| {
            let a = Fingerprint::of(&FingerprintMode::CanonicalJson, &Method::POST, "/", &body);
            let b = Fingerprint::of(&FingerprintMode::CanonicalJson, &Method::POST, "/", &body);
            prop_assert_eq!(a, b);
            Ok(())
        })
        .unwrap();
}
