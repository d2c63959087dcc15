//! Attacks on the completed record's header count past 65,534 (`src/record.rs`), on
//! responses whose headers fill a header map, and on `Recent::keep` replacing an entry in
//! place (`src/sharded.rs`). Each test says what it attacks.

#![allow(clippy::unwrap_used)]
// The tests run one at a time under a plain mutex (see `alone`), held across the async
// tests' awaits: each test has a runtime of its own, so no task waits on another's lock.
#![allow(clippy::await_holding_lock)]

mod common;

/// The sharded LRU map, built into this test from its source (as `memory_review.rs` does).
#[allow(dead_code, unreachable_pub)]
#[path = "../src/sharded.rs"]
mod sharded;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::post;
use bytes::{BufMut, Bytes, BytesMut};
use common::{post_with, send};
use idem_runtime::record::{Record, StoredResponse};
use idem_runtime::store::MemoryStore;
use idem_runtime::{Idempotency, Idempotent};

// ---------------------------------------------------------------------------------------
// Resident memory, for whether keys are held once: the tests of this file run one at a
// time, so that one's allocations do not show in another's measure.

static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// This process's resident bytes.
fn resident() -> i64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: i64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

// ---------------------------------------------------------------------------------------
// 1. The record's header count, on the record itself.

/// Offset of the header count in a completed record: magic, version, kind, fingerprint,
/// expiry, status.
const COUNT_AT: usize = 4 + 1 + 1 + 32 + 8 + 2;

/// A completed record written by hand in the documented layout, with `count` written as
/// the two-byte count of earlier builds.
fn old_format(headers: &[(&str, &str)], count: u16, body: &[u8]) -> Bytes {
    let mut out = BytesMut::new();
    out.put_slice(b"idem");
    out.put_u8(1);
    out.put_u8(2);
    out.put_slice(&[7; 32]);
    out.put_u64(1_000);
    out.put_u16(200);
    out.put_u16(count);
    for (name, value) in headers {
        out.put_u16(name.len() as u16);
        out.put_slice(name.as_bytes());
        out.put_u32(value.len() as u32);
        out.put_slice(value.as_bytes());
    }
    out.put_u64(body.len() as u64);
    out.put_slice(body);
    out.freeze()
}

fn response_with(values: usize) -> StoredResponse {
    let Record::Completed(mut response) = Record::decode(&old_format(&[], 0, b"")).unwrap() else {
        panic!("a completed record")
    };
    let names = [
        HeaderName::from_static("x-a"),
        HeaderName::from_static("content-type"),
        HeaderName::from_static("x-b"),
    ];
    response.headers = (0..values)
        .map(|n| (names[n % 3].clone(), HeaderValue::from(n)))
        .collect();
    response.body = Bytes::from_static(b"the body");
    response.status = StatusCode::CREATED;
    response
}

/// Attack: damage the four-byte count of a kind 6 record (every single-bit flip of its
/// bytes, and the count off by one to three either way), or its kind, or truncate the
/// record: it must never decode into another valid response. Also raises a two-byte count
/// of 65,534 to 65,535.
#[test]
fn a_damaged_or_truncated_header_count_never_reads_as_another_response() {
    let _alone = alone();
    let original = Record::Completed(response_with(65_536));
    let bytes = original.encode();
    assert_eq!(bytes[5], 6, "a record of the wide kind");
    assert_eq!(&bytes[COUNT_AT..COUNT_AT + 4], &[0, 1, 0, 0]);
    let mut silent = Vec::new();
    for kind in [2u8, 3, 4, 5] {
        let mut damaged = bytes.to_vec();
        damaged[5] = kind;
        if Record::decode(&Bytes::from(damaged)).is_ok() {
            silent.push(format!("kind 6 read as kind {kind}"));
        }
    }
    for at in COUNT_AT..COUNT_AT + 4 {
        for bit in 0..8 {
            let mut damaged = bytes.to_vec();
            damaged[at] ^= 1 << bit;
            if let Ok(record) = Record::decode(&Bytes::from(damaged))
                && record != original
            {
                silent.push(format!("byte {at} bit {bit}"));
            }
        }
    }
    for delta in [-3i64, -2, -1, 1, 2, 3] {
        let mut damaged = bytes.to_vec();
        let count = (65_536 + delta) as u32;
        damaged[COUNT_AT..COUNT_AT + 4].copy_from_slice(&count.to_be_bytes());
        if Record::decode(&Bytes::from(damaged)).is_ok() {
            silent.push(format!("count {count}"));
        }
    }
    let cuts = (0..COUNT_AT + 64).chain(bytes.len() - 64..bytes.len());
    for cut in cuts {
        if Record::decode(&bytes.slice(..cut)).is_ok() {
            silent.push(format!("cut at {cut}"));
        }
    }
    let below = Record::Completed(response_with(65_534)).encode();
    assert_eq!(below[5], 2, "a record of the narrow kind");
    assert_eq!(&below[COUNT_AT..COUNT_AT + 2], &[0xff, 0xfe]);
    let mut damaged = below.to_vec();
    damaged[COUNT_AT + 1] = 0xff;
    if Record::decode(&Bytes::from(damaged)).is_ok() {
        silent.push("65,534 raised to 65,535".to_owned());
    }
    assert!(silent.is_empty(), "decoded silently: {silent:?}");
}

/// Attack: "records written for other counts are unchanged" — a record of 0, 3 or 65,534
/// values is byte for byte what the earlier format wrote; and one written by an earlier
/// build with 65,535 values reads as those 65,535 values.
#[test]
fn records_under_65535_values_are_unchanged_and_an_old_full_count_still_reads() {
    let _alone = alone();
    let values: Vec<String> = (0..65_535).map(|n| n.to_string()).collect();
    for count in [0usize, 3, 65_534] {
        let headers: Vec<(&str, &str)> = (0..count)
            .map(|n| (["x-a", "content-type", "x-b"][n % 3], values[n].as_str()))
            .collect();
        let mut response = response_with(count);
        response.fingerprint = *Record::decode(&old_format(&[], 0, b""))
            .unwrap()
            .fingerprint();
        response.status = StatusCode::OK;
        response.expires_at_ms = 1_000;
        let old = old_format(&headers, count as u16, b"the body");
        assert!(
            Record::Completed(response).encode() == old,
            "{count} values: the record differs from the earlier format"
        );
    }
    let headers: Vec<(&str, &str)> = values.iter().map(|v| ("x-a", v.as_str())).collect();
    let old_full = old_format(&headers, u16::MAX, b"the body");
    let Ok(Record::Completed(read)) = Record::decode(&old_full) else {
        panic!("an earlier build's 65,535-value record does not read")
    };
    assert_eq!(read.headers.len(), 65_535);
    assert_eq!(read.body, "the body");
}

// ---------------------------------------------------------------------------------------
// 2. The header count end to end, through axum.

/// The response `/many` answers: `values` header values over three names (given as the
/// request body), then a final header, status 201 and a body.
async fn many_values(
    idem: Idempotent,
    State(runs): State<Arc<AtomicUsize>>,
    body: String,
) -> Response {
    idem.run(async move {
        runs.fetch_add(1, Ordering::SeqCst);
        let values: usize = body.trim().parse().unwrap();
        let mut response = Response::new(Body::from(format!("{values} values")));
        *response.status_mut() = StatusCode::CREATED;
        let names = ["x-a", "x-b", "x-c"].map(HeaderName::from_static);
        for n in 0..values {
            response
                .headers_mut()
                .append(names[n % 3].clone(), HeaderValue::from(n));
        }
        response
            .headers_mut()
            .insert("x-last", HeaderValue::from_static("end"));
        response
    })
    .await
}

/// `/distinct`: as many distinct header names as the request body says, each once; with
/// `+cl` after the number, also the body's `content-length` (else axum adds it).
async fn distinct_names(
    idem: Idempotent,
    State(runs): State<Arc<AtomicUsize>>,
    body: String,
) -> Response {
    idem.run(async move {
        runs.fetch_add(1, Ordering::SeqCst);
        let (names, with_length) = match body.trim().strip_suffix("+cl") {
            Some(names) => (names.parse::<usize>().unwrap(), true),
            None => (body.trim().parse::<usize>().unwrap(), false),
        };
        let mut response = Response::new(Body::from("distinct"));
        for n in 0..names {
            let name = HeaderName::from_bytes(format!("x-h{n}").as_bytes()).unwrap();
            response.headers_mut().insert(name, HeaderValue::from(n));
        }
        if with_length {
            response
                .headers_mut()
                .insert("content-length", HeaderValue::from(8));
        }
        response
    })
    .await
}

/// `/short`: as `/many`, kept one second.
async fn short_many(
    idem: Idempotent<1>,
    State(runs): State<Arc<AtomicUsize>>,
    body: String,
) -> Response {
    idem.run(async move {
        runs.fetch_add(1, Ordering::SeqCst);
        let values: usize = body.trim().parse().unwrap();
        let mut response = Response::new(Body::from("short"));
        for n in 0..values {
            response.headers_mut().append("x-a", HeaderValue::from(n));
        }
        response
    })
    .await
}

fn review_app(idem: &Idempotency, runs: Arc<AtomicUsize>) -> axum::Router {
    axum::Router::new()
        .route("/many", post(many_values))
        .route("/distinct", post(distinct_names))
        .route("/short", post(short_many))
        .with_state(runs)
        .layer(idem.layer())
}

/// The headers as the client sees them, in order, without the replay's mark.
fn seen(headers: &axum::http::HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    headers
        .iter()
        .filter(|(name, _)| name.as_str() != "idempotent-replayed")
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}

/// Attack: responses either side of the count's switch (65,534, 65,535, 65,536 values over
/// three names), retried twice with the local tier on (the second retry replays the local
/// copy): every retry is a replay with the same status, headers in order, and body, and
/// each key runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_either_side_of_the_count_switch_replay_exactly() {
    let _alone = alone();
    let idem = common::test_builder(Idempotency::builder())
        .local_tier(64 * 1024 * 1024, Duration::from_secs(60))
        .build();
    let runs = Arc::new(AtomicUsize::new(0));
    let app = review_app(&idem, runs.clone());
    for values in [65_534usize, 65_535, 65_536] {
        let key = format!("switch-{values}");
        let body = values.to_string();
        let first = send(&app, post_with("/many", Some(&key), &body)).await;
        assert_eq!(first.status, StatusCode::CREATED);
        let theirs: Vec<_> = seen(&first.headers)
            .into_iter()
            .filter(|(name, _)| !["x-a", "x-b", "x-c", "x-last"].contains(&name.as_str()))
            .collect();
        assert_eq!(
            seen(&first.headers).len(),
            values + 1 + theirs.len(),
            "{theirs:?}"
        );
        assert!(theirs.len() <= 1, "headers added: {theirs:?}");
        for attempt in 1..=2 {
            let retry = send(&app, post_with("/many", Some(&key), &body)).await;
            assert!(
                retry.is_replay(),
                "{values} values, retry {attempt}: {} {:?}",
                retry.status,
                String::from_utf8_lossy(&retry.body)
            );
            assert_eq!(retry.status, first.status, "{values} values");
            assert!(
                seen(&retry.headers) == seen(&first.headers),
                "{values} values, retry {attempt}: the headers differ"
            );
            assert_eq!(retry.body, first.body, "{values} values");
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 3, "each key ran once");
}

/// Guards (a defect once shown): a response that fills a `HeaderMap` (24,576 distinct
/// names, the most one holds): the handler's 24,575 and a `content-length`, given by the
/// handler (`+cl`) or added by axum. Its retry panicked: the replay's mark, or axum's
/// `content-length` beside it, did not fit. Held: the first try is answered whole, the
/// retry is told the response was not stored (a replay without its mark would break the
/// contract), and the handler runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_a_response_with_a_full_header_map_never_panics() {
    let _alone = alone();
    let idem = common::test_builder(Idempotency::builder()).build();
    let runs = Arc::new(AtomicUsize::new(0));
    let app = review_app(&idem, runs.clone());
    let mut failures = Vec::new();
    for body in ["24575+cl", "24575"] {
        let key = format!("full-map-{body}");
        let first = send(&app, post_with("/distinct", Some(&key), body)).await;
        assert_eq!(first.status, StatusCode::OK, "{body}");
        assert_eq!(first.headers.len(), 24_576, "{body}: a full map");

        let retry = tokio::spawn({
            let app = app.clone();
            async move { send(&app, post_with("/distinct", Some(&key), body)).await }
        })
        .await;
        match retry {
            // A replay must carry its mark beside every header: with no room for it, the
            // response is recorded as not stored, and the retry is told so.
            Ok(retry)
                if retry.status == StatusCode::CONFLICT
                    && retry.json()["type"] == idem_runtime::Problem::RESPONSE_NOT_STORED => {}
            Ok(retry) => failures.push(format!("{body}: the retry answered {}", retry.status)),
            Err(error) => failures.push(format!(
                "{body}: the retry panicked instead of replaying: {}",
                error
                    .into_panic()
                    .downcast::<String>()
                    .map_or_else(|_| "?".to_owned(), |message| *message)
            )),
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2, "each key ran once");
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Attack: the local tier replacing copies (concurrent retries each miss it and each keep
/// a copy, the later replacing the earlier with a slightly different expiry) while it
/// evicts (3 MiB, copies of about 0.9 MB): every retry of every key, in two rounds of six
/// at once, replays exactly the first response, and each key runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_through_a_small_local_tier_replay_exactly() {
    let _alone = alone();
    let idem = common::test_builder(Idempotency::builder())
        .local_tier(3 * 1024 * 1024, Duration::from_secs(60))
        .build();
    let runs = Arc::new(AtomicUsize::new(0));
    let app = review_app(&idem, runs.clone());
    let body = "65540";
    let mut firsts = Vec::new();
    for n in 0..4 {
        let first = send(&app, post_with("/many", Some(&format!("tier-{n}")), body)).await;
        assert_eq!(first.status, StatusCode::CREATED);
        firsts.push(seen(&first.headers));
    }
    for round in 0..2 {
        for (n, first) in firsts.iter().enumerate() {
            let retries: Vec<_> = (0..6)
                .map(|_| {
                    let app = app.clone();
                    let key = format!("tier-{n}");
                    tokio::spawn(
                        async move { send(&app, post_with("/many", Some(&key), body)).await },
                    )
                })
                .collect();
            for retry in retries {
                let retry = retry.await.unwrap();
                assert!(retry.is_replay(), "round {round} key {n}: {}", retry.status);
                assert!(
                    seen(&retry.headers) == *first,
                    "round {round} key {n}: the headers differ"
                );
            }
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 4, "each key ran once");
}

/// Attack: a memory store of 4 MiB given responses of 65,536+ header values (records of
/// about 0.9 MB, records of the wide kind): it stays within its byte bound while it evicts, and
/// once the one-second records expire, nothing is left and its weight is back to zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_store_keeps_its_bound_with_wide_records() {
    let _alone = alone();
    const MAX_BYTES: u64 = 4 * 1024 * 1024;
    let store = MemoryStore::with_bounds(1000, MAX_BYTES).unwrap();
    let idem = common::test_builder(Idempotency::builder().store(store.clone())).build();
    let runs = Arc::new(AtomicUsize::new(0));
    let app = review_app(&idem, runs.clone());
    for n in 0..8usize {
        let values = 65_536 + n;
        let answer = send(
            &app,
            post_with("/short", Some(&format!("bound-{n}")), &values.to_string()),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
        assert!(
            store.weighted_size() <= MAX_BYTES,
            "after {n}: {} bytes",
            store.weighted_size()
        );
    }
    assert!(store.entry_count() >= 1);
    // The expiry itself is under test.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    store.run_pending_tasks();
    assert_eq!(
        (store.entry_count(), store.weighted_size()),
        (0, 0),
        "(records, weight) once every record expired"
    );
}

// ---------------------------------------------------------------------------------------
// 3. `Recent::keep` replacing entries, on the map itself.

#[derive(Clone, Debug)]
struct Item {
    weight: u64,
    expires_at: Instant,
}

impl sharded::Expiring for Item {
    fn weight(&self, key: &str) -> u64 {
        self.weight + key.len() as u64
    }

    fn expires_at(&self) -> Instant {
        self.expires_at
    }
}

/// The length of the model test's keys.
const KEY_LEN: usize = 40;

fn long_key(n: u64) -> String {
    let mut key = format!("{n}:");
    key.extend(std::iter::repeat_n('k', KEY_LEN - key.len()));
    key
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// The map as it should be: keys (by number) least recently used first, with weight and
/// expiry. It holds no copy of the long keys, so that the heap count sees the map's only.
#[derive(Default)]
struct Model(Vec<(u64, u64, Instant)>);

impl Model {
    fn weight(&self) -> u64 {
        self.0
            .iter()
            .map(|(_, weight, _)| weight + KEY_LEN as u64)
            .sum()
    }

    fn expiry(&self, key: u64) -> Option<Instant> {
        self.0.iter().find(|(k, _, _)| *k == key).map(|e| e.2)
    }

    fn keep(&mut self, key: u64, weight: u64, at: Instant, bound: u64, max_len: usize) {
        self.0.retain(|(k, _, _)| *k != key);
        self.0.push((key, weight, at));
        let now = Instant::now();
        while self.weight() > bound || self.0.len() > max_len {
            let first_expired = self
                .0
                .iter()
                .enumerate()
                .filter(|(_, e)| e.2 <= now)
                .min_by(|(_, a), (_, b)| (a.2, long_key(a.0)).cmp(&(b.2, long_key(b.0))))
                .map(|(i, _)| i);
            self.0.remove(first_expired.unwrap_or(0));
        }
    }

    fn live(&mut self, key: u64, now: Instant) -> bool {
        let Some(i) = self.0.iter().position(|(k, _, _)| *k == key) else {
            return false;
        };
        let entry = self.0.remove(i);
        let live = entry.2 > now;
        if live {
            self.0.push(entry);
        }
        live
    }
}

/// Attack: keys replaced again and again with a shorter, the same, or a longer expiry
/// (crossing from expired to live and back), on maps bounded by weight and by count,
/// against a model. After every step: the same entry count and total weight (weights are
/// distinct, so the weight names the entries left: which one was evicted, expired first
/// in expiry order or least recently used); and once every entry has expired,
/// `remove_expired` drops them all (an entry missing from the index would stay).
#[test]
fn replacing_entries_with_any_expiry_keeps_weight_index_and_order() {
    let _alone = alone();
    let base = Instant::now();
    let at = |slot: u64| {
        if slot < 6 {
            base - Duration::from_secs(600) + Duration::from_secs(slot)
        } else {
            base + Duration::from_secs(3600 + slot)
        }
    };
    let mut failures = Vec::new();
    for seed in 1..=60u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let bound = [u64::MAX, 100_000][seed as usize % 2];
        let max_len = [3usize, 5, usize::MAX][seed as usize % 3];
        let mut map = sharded::Recent::new();
        let mut model = Model::default();
        let mut step_weight = 1_000u64;
        for step in 0..120 {
            let id = rng.below(7);
            let what;
            match rng.below(8) {
                0..=4 => {
                    step_weight += 1 + rng.below(997);
                    // Relative to the key's current expiry when it has one.
                    let slot = match model.expiry(id) {
                        Some(current) => {
                            let slot = (0..12).find(|s| at(*s) == current).unwrap();
                            match rng.below(3) {
                                0 => slot.saturating_sub(1 + rng.below(6)),
                                1 => slot,
                                _ => (slot + 1 + rng.below(6)).min(11),
                            }
                        }
                        None => rng.below(12),
                    };
                    what = format!("keep {id} at slot {slot}");
                    let entry = Item {
                        weight: step_weight,
                        expires_at: at(slot),
                    };
                    map.keep(&long_key(id), entry, bound, max_len);
                    model.keep(id, step_weight, at(slot), bound, max_len);
                }
                5 | 6 => {
                    what = format!("live {id}");
                    let now = Instant::now();
                    let got = map.live(&long_key(id), now).is_some();
                    let want = model.live(id, now);
                    if got != want {
                        failures.push(format!("seed {seed} step {step}: {what}: {got} vs {want}"));
                        break;
                    }
                }
                _ => {
                    what = "remove_expired".to_owned();
                    let now = Instant::now();
                    map.remove_expired(now);
                    model.0.retain(|e| e.2 > now);
                }
            }
            if (map.len(), map.weight()) != (model.0.len(), model.weight()) {
                failures.push(format!(
                    "seed {seed} step {step} ({what}): (len, weight) {:?}, the model says {:?}",
                    (map.len(), map.weight()),
                    (model.0.len(), model.weight())
                ));
                break;
            }
        }
        // Every entry expired by then: each must be in the index to be dropped.
        map.remove_expired(base + Duration::from_secs(10 * 3600));
        if (map.len(), map.weight()) != (0, 0) {
            failures.push(format!(
                "seed {seed}: once every entry expired: len {}, weight {}",
                map.len(),
                map.weight()
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Attack: the three replacements by name, each then checked by what a full map drops
/// first. `a` and `b` are expired (`a` first); `a` is replaced with an expiry later than
/// `b`'s (longer), the same (equal), or earlier still (shorter); a third insert into a map
/// of two then drops the soonest expired, and `remove_expired` the other; a live entry
/// replaced with an expired one is dropped before a live one is evicted.
#[test]
fn each_kind_of_replacement_moves_the_entry_in_the_expiry_order() {
    let _alone = alone();
    let base = Instant::now();
    let expired = |s: u64| base - Duration::from_secs(600 - s);
    let live = base + Duration::from_secs(3600);
    for (kind, new_expiry, dropped_first) in [
        ("longer", expired(30), "b"),
        ("equal", expired(10), "a"),
        ("shorter", expired(5), "a"),
    ] {
        let mut map = sharded::Recent::new();
        map.keep(
            "a",
            Item {
                weight: 1,
                expires_at: expired(10),
            },
            u64::MAX,
            3,
        );
        map.keep(
            "b",
            Item {
                weight: 20,
                expires_at: expired(20),
            },
            u64::MAX,
            3,
        );
        map.keep(
            "a",
            Item {
                weight: 300,
                expires_at: new_expiry,
            },
            u64::MAX,
            3,
        );
        assert_eq!((map.len(), map.weight()), (2, 322), "{kind}");
        map.keep(
            "c",
            Item {
                weight: 4000,
                expires_at: live,
            },
            u64::MAX,
            2,
        );
        let left = if dropped_first == "a" {
            20 + 1
        } else {
            300 + 1
        };
        assert_eq!(
            (map.len(), map.weight()),
            (2, left + 4001),
            "{kind}: the soonest expired ({dropped_first}) goes first"
        );
        map.remove_expired(Instant::now());
        assert_eq!((map.len(), map.weight()), (1, 4001), "{kind}");
    }
    let mut map = sharded::Recent::new();
    map.keep(
        "x",
        Item {
            weight: 1,
            expires_at: live,
        },
        u64::MAX,
        2,
    );
    map.keep(
        "y",
        Item {
            weight: 20,
            expires_at: live,
        },
        u64::MAX,
        2,
    );
    map.keep(
        "y",
        Item {
            weight: 300,
            expires_at: expired(1),
        },
        u64::MAX,
        2,
    );
    map.keep(
        "z",
        Item {
            weight: 4000,
            expires_at: live,
        },
        u64::MAX,
        2,
    );
    assert!(
        map.live("x", Instant::now()).is_some(),
        "a live entry was evicted"
    );
    assert_eq!((map.len(), map.weight()), (2, 4001 + 2));
}

/// Attack: "keys are not duplicated in memory". Three keys of 40 MiB (each its own mapping,
/// so resident memory follows it exactly) are kept, then each replaced ten times with a
/// shorter, the same and a longer expiry: resident memory grows by the three keys once,
/// not once more per index entry or per replacement, and falls back once they are removed.
#[test]
fn a_replaced_entry_holds_its_key_once() {
    const MIB: i64 = 1024 * 1024;
    const BIG: usize = 40 * 1024 * 1024;
    let _alone = alone();
    let keys: Vec<String> = (0..3u8)
        .map(|n| {
            let mut key = String::with_capacity(BIG);
            key.push(char::from(b'a' + n));
            key.extend(std::iter::repeat_n('k', BIG - 1));
            key
        })
        .collect();
    let base = Instant::now() + Duration::from_secs(3600);
    let before = resident();
    let mut map = sharded::Recent::new();
    for key in &keys {
        map.keep(
            key,
            Item {
                weight: 1,
                expires_at: base,
            },
            u64::MAX,
            usize::MAX,
        );
    }
    let kept = resident() - before;
    let mut expiries = [base; 3];
    for round in 0..10u64 {
        for (n, key) in keys.iter().enumerate() {
            // Shorter, the same, longer, by key and round.
            let at = match (round + n as u64) % 3 {
                0 => expiries[n] - Duration::from_secs(1),
                1 => expiries[n],
                _ => expiries[n] + Duration::from_secs(2),
            };
            expiries[n] = at;
            map.keep(
                key,
                Item {
                    weight: 1,
                    expires_at: at,
                },
                u64::MAX,
                usize::MAX,
            );
        }
    }
    let replaced = resident() - before;
    assert_eq!((map.len(), map.weight()), (3, 3 * (BIG as u64 + 1)));
    for key in &keys {
        map.remove(key);
    }
    let removed = resident() - before;
    assert!(
        (100 * MIB..140 * MIB).contains(&kept) && replaced < kept + 20 * MIB && removed < 20 * MIB,
        "resident MiB over the start: {} with three keys kept, {} after replacements, {} after removal",
        kept / MIB,
        replaced / MIB,
        removed / MIB
    );
}
