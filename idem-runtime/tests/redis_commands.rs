//! The Redis store's steps as the server sees them (the key each touches under its
//! prefix, values byte for byte, expiries, fencing, scripts the server lost, restarts, a
//! cluster), and a first execution's failure paths (a `5xx`, a panic, a response too
//! large or failing) on the memory store and on Redis.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use axum::routing::post;
use bytes::Bytes;
use common::{AppState, Backend, Counters, post_with, send};
use futures_util::FutureExt;
use idem_runtime::store::{RedisStore, Store, StoreError};
use idem_runtime::{Idempotency, Idempotent, Problem};
use redis::aio::MultiplexedConnection;
use testkit::{RedisServer, keys_under, redis_connection, unique_prefix};

// ---------------------------------------------------------------- helpers

async fn store_at(url: &str, prefix: &str) -> RedisStore {
    RedisStore::builder(url)
        .prefix(prefix)
        .connect()
        .await
        .unwrap_or_else(|error| panic!("Redis at {url}: {error}"))
}

async fn get(admin: &mut MultiplexedConnection, key: &str) -> Option<Vec<u8>> {
    redis::cmd("GET").arg(key).query_async(admin).await.unwrap()
}

async fn pttl(admin: &mut MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(key)
        .query_async(admin)
        .await
        .unwrap()
}

async fn exists(admin: &mut MultiplexedConnection, key: &str) -> bool {
    let n: i64 = redis::cmd("EXISTS")
        .arg(key)
        .query_async(admin)
        .await
        .unwrap();
    n == 1
}

async fn script_flush(admin: &mut MultiplexedConnection) {
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(admin)
        .await
        .unwrap();
}

fn binary(len: usize, seed: u8) -> Bytes {
    // Every byte value, CR/LF and RESP markers included.
    let mut state = u32::from(seed).wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            match i % 7 {
                0 => b'\r',
                1 => b'\n',
                2 => b'$',
                _ => (state >> 8) as u8,
            }
        })
        .collect::<Vec<u8>>()
        .into()
}

/// Polls an async condition every 5 ms for up to 10 s.
async fn until_async<F, Fut>(mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        if condition().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

// ---------------------------------------------------------------- keys

/// Runs every step on `key` and checks, from a separate connection, that exactly
/// `<prefix><key>` is touched, with the right value and PTTL after each step.
async fn steps_touch_exactly(
    store: &RedisStore,
    admin: &mut MultiplexedConnection,
    prefix: &str,
    key: &str,
    scan: bool,
) {
    let full = format!("{prefix}{key}");
    let short: String = key.chars().take(40).collect();
    assert_eq!(store.redis_key(key), full, "redis_key for {short:?}");
    let claim = Bytes::from([b"claim\0\r\n".as_slice(), key.as_bytes()].concat());
    let record = Bytes::from([b"record\xff\x00".as_slice(), key.as_bytes()].concat());

    assert_eq!(
        store
            .begin(key, &claim, Duration::from_secs(20))
            .await
            .unwrap(),
        None,
        "{short:?}"
    );
    assert_eq!(
        get(admin, &full).await.as_deref(),
        Some(claim.as_ref()),
        "begin wrote the claim under {short:?}"
    );
    let after_begin = pttl(admin, &full).await;
    assert!(
        after_begin > 0 && after_begin <= 20_000,
        "PTTL after begin {after_begin} for {short:?}"
    );
    if scan {
        assert_eq!(
            keys_under(admin, prefix).await,
            vec![full.clone()],
            "only the key itself under the prefix"
        );
    }
    assert_eq!(
        store
            .begin(key, &claim, Duration::from_secs(20))
            .await
            .unwrap()
            .as_deref(),
        Some(claim.as_ref()),
        "a second begin finds the claim ({short:?})"
    );

    assert!(
        store
            .renew(key, &claim, Duration::from_secs(60))
            .await
            .unwrap(),
        "renew {short:?}"
    );
    let after_renew = pttl(admin, &full).await;
    assert!(
        after_renew > 20_000 && after_renew <= 60_000,
        "PTTL after renew {after_renew} for {short:?}"
    );

    assert!(
        store
            .complete(key, &claim, record.clone(), Duration::from_secs(120))
            .await
            .unwrap(),
        "complete {short:?}"
    );
    assert_eq!(
        get(admin, &full).await.as_deref(),
        Some(record.as_ref()),
        "complete wrote the record under {short:?}"
    );
    let after_complete = pttl(admin, &full).await;
    assert!(
        after_complete > 60_000 && after_complete <= 120_000,
        "PTTL after complete {after_complete} for {short:?}"
    );
    if scan {
        assert_eq!(
            keys_under(admin, prefix).await,
            vec![full.clone()],
            "still only the key itself"
        );
    }

    assert!(
        !store.release(key, &claim).await.unwrap(),
        "the claim no longer holds {short:?}"
    );
    assert!(exists(admin, &full).await);
    assert!(
        store.release(key, &record).await.unwrap(),
        "release of the stored value {short:?}"
    );
    assert!(!exists(admin, &full).await, "released {short:?}");
    if scan {
        assert!(
            keys_under(admin, prefix).await.is_empty(),
            "nothing left under the prefix"
        );
    }
}

fn odd_keys() -> Vec<String> {
    vec![
        String::new(),
        "plain".to_owned(),
        "with space and  two".to_owned(),
        "quo\"te's \\back\\slash".to_owned(),
        "ключ-日本語-🙂".to_owned(),
        "{tag}rest".to_owned(),
        "a{b}c{d}".to_owned(),
        "\r\n*3\r\n$3\r\nDEL\r\n".to_owned(),
        "*?[glob]".to_owned(),
        "0123456789abcdef0123456789abcdef:visible-key".to_owned(),
        "k".repeat(100_000),
        "é".repeat(300),
    ]
}

/// Guards: each step writes exactly `<prefix><key>` as one argument, for odd keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_step_touches_exactly_prefix_plus_key() {
    let url = testkit::shared_redis_url();
    let mut admin = redis_connection(&url).await;
    let prefixes = [
        unique_prefix("cmd-keys"),
        format!("{} sp \"q\" {{h}} ü*?\\:", unique_prefix("cmd-odd")),
        format!("{}\r\n$", unique_prefix("cmd-crlf")),
    ];
    for prefix in &prefixes {
        let store = store_at(&url, prefix).await;
        assert!(
            keys_under(&mut admin, prefix).await.is_empty(),
            "connect left nothing under {prefix:?}"
        );
        for key in odd_keys() {
            steps_touch_exactly(&store, &mut admin, prefix, &key, true).await;
        }
    }
}

/// Guards: an empty prefix (private server) writes the bare key; a prefix ending where a
/// neighbour's begins never collides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_prefix_and_adjacent_prefixes() {
    let server = RedisServer::start();
    let mut admin = redis_connection(&server.url()).await;
    let bare = store_at(&server.url(), "").await;
    for key in odd_keys() {
        steps_touch_exactly(&bare, &mut admin, "", &key, false).await;
    }
    // "ab" + "c" and "a" + "bc" are the same Redis key: the prefix is only a prefix.
    let ab = store_at(&server.url(), "ab").await;
    let a = store_at(&server.url(), "a").await;
    let claim = Bytes::from_static(b"c1");
    assert_eq!(
        ab.begin("c", &claim, Duration::from_secs(10))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        a.begin("bc", &claim, Duration::from_secs(10))
            .await
            .unwrap()
            .as_deref(),
        Some(b"c1".as_slice())
    );
    assert!(a.release("bc", &claim).await.unwrap());
    assert!(!exists(&mut admin, "abc").await);
}

// ---------------------------------------------------------------- records

/// Guards: claims and records of any bytes round-trip exactly through every step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_claims_and_records_round_trip() {
    let url = testkit::shared_redis_url();
    let prefix = unique_prefix("cmd-bytes");
    let store = store_at(&url, &prefix).await;
    let mut admin = redis_connection(&url).await;
    let all_bytes: Bytes = (0..=255u8).collect::<Vec<_>>().into();
    let records = [
        Bytes::new(),
        Bytes::from_static(b"\0"),
        all_bytes.clone(),
        Bytes::from_static(b"$-1\r\n"),
        Bytes::from_static(b"*1\r\n$7\r\nEVALSHA\r\n"),
        binary(3 * 1024 * 1024 + 17, 9),
    ];
    for (i, record) in records.iter().enumerate() {
        let key = format!("rec-{i}");
        let claim = binary(40 + i, i as u8);
        assert_eq!(
            store
                .begin(&key, &claim, Duration::from_secs(30))
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            get(&mut admin, &format!("{prefix}{key}")).await.unwrap(),
            claim.as_ref()
        );
        assert!(
            store
                .renew(&key, &claim, Duration::from_secs(30))
                .await
                .unwrap()
        );
        assert!(
            store
                .complete(&key, &claim, record.clone(), Duration::from_secs(60))
                .await
                .unwrap(),
            "record {i}"
        );
        assert_eq!(
            get(&mut admin, &format!("{prefix}{key}")).await.unwrap(),
            record.as_ref(),
            "record {i} stored"
        );
        let found = store
            .begin(&key, &Bytes::from_static(b"other"), Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(
            found.as_deref(),
            Some(record.as_ref()),
            "record {i} read back"
        );
        assert!(
            store
                .complete(&key, &claim, record.clone(), Duration::from_secs(60))
                .await
                .unwrap(),
            "complete again finds its record {i}"
        );
    }
}

/// Guards: a record exactly at `proto-max-bulk-len` is stored; one byte more is refused
/// before it is sent, and the claim stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_at_the_bulk_limit() {
    let server = RedisServer::start_with(&["--proto-max-bulk-len", "1048576"]);
    let store = store_at(&server.url(), "bulk:").await;
    let mut admin = redis_connection(&server.url()).await;
    let claim = Bytes::from_static(b"bulk claim");
    let at = binary(1_048_576, 3);
    assert_eq!(
        store
            .begin("at", &claim, Duration::from_secs(30))
            .await
            .unwrap(),
        None
    );
    assert!(
        store
            .complete("at", &claim, at.clone(), Duration::from_secs(60))
            .await
            .unwrap()
    );
    assert_eq!(get(&mut admin, "bulk:at").await.unwrap(), at.as_ref());

    let over = binary(1_048_577, 4);
    assert_eq!(
        store
            .begin("over", &claim, Duration::from_secs(30))
            .await
            .unwrap(),
        None
    );
    let refused = store
        .complete("over", &claim, over, Duration::from_secs(60))
        .await;
    assert!(
        matches!(refused, Err(StoreError::RecordRefused { .. })),
        "{refused:?}"
    );
    assert_eq!(
        get(&mut admin, "bulk:over").await.unwrap(),
        claim.as_ref(),
        "the claim stays"
    );
    assert!(
        store
            .complete(
                "over",
                &claim,
                Bytes::from_static(b"marker"),
                Duration::from_secs(60)
            )
            .await
            .unwrap()
    );
}

// ---------------------------------------------------------------- fencing

/// Guards: a stale claim (another, a prefix of it, an extension of it) changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_claims_change_nothing() {
    let url = testkit::shared_redis_url();
    let prefix = unique_prefix("cmd-fence");
    let store = store_at(&url, &prefix).await;
    let mut admin = redis_connection(&url).await;
    let full = format!("{prefix}k");
    let claim = Bytes::from_static(b"claim-A-0123456789");
    let lease = Duration::from_secs(5);
    assert_eq!(store.begin("k", &claim, lease).await.unwrap(), None);
    let stale = [
        Bytes::from_static(b"claim-B-0123456789"),
        Bytes::from_static(b"claim-A-012345678"),
        Bytes::from_static(b"claim-A-0123456789\0"),
        Bytes::new(),
    ];
    for other in &stale {
        assert!(
            !store
                .complete(
                    "k",
                    other,
                    Bytes::from_static(b"R"),
                    Duration::from_secs(100)
                )
                .await
                .unwrap(),
            "{other:?}"
        );
        assert!(
            !store
                .renew("k", other, Duration::from_secs(100))
                .await
                .unwrap(),
            "{other:?}"
        );
        assert!(!store.release("k", other).await.unwrap(), "{other:?}");
        assert_eq!(get(&mut admin, &full).await.unwrap(), claim.as_ref());
        assert!(
            pttl(&mut admin, &full).await <= 5_000,
            "a stale renew/complete extended the lease"
        );
    }
    let record = Bytes::from_static(b"the record");
    assert!(
        store
            .complete("k", &claim, record.clone(), Duration::from_secs(100))
            .await
            .unwrap()
    );
    assert!(
        store
            .complete("k", &claim, record.clone(), Duration::from_secs(100))
            .await
            .unwrap(),
        "applied twice"
    );
    assert!(
        !store
            .complete(
                "k",
                &claim,
                Bytes::from_static(b"other record"),
                Duration::from_secs(100)
            )
            .await
            .unwrap()
    );
    assert!(
        !store
            .renew("k", &claim, Duration::from_millis(1))
            .await
            .unwrap()
    );
    assert!(!store.release("k", &claim).await.unwrap());
    assert_eq!(get(&mut admin, &full).await.unwrap(), record.as_ref());
    assert!(pttl(&mut admin, &full).await > 90_000);
    // Steps on a missing key create nothing.
    let ghost = Bytes::from_static(b"ghost");
    assert!(
        !store
            .renew("missing", &ghost, Duration::from_secs(10))
            .await
            .unwrap()
    );
    assert!(
        !store
            .complete("missing", &ghost, ghost.clone(), Duration::from_secs(10))
            .await
            .unwrap()
    );
    assert!(!store.release("missing", &ghost).await.unwrap());
    assert_eq!(keys_under(&mut admin, &prefix).await, vec![full]);
}

/// Guards: many tasks racing on one key: one claim wins, one completion wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_steps_on_one_key() {
    let url = testkit::shared_redis_url();
    let prefix = unique_prefix("cmd-race");
    let store = store_at(&url, &prefix).await;
    let mut admin = redis_connection(&url).await;
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let claim = Bytes::from(format!("claim-{i}"));
                let found = store
                    .begin("one", &claim, Duration::from_secs(30))
                    .await
                    .unwrap();
                (claim, found)
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    let winners: Vec<_> = outcomes
        .iter()
        .filter(|(_, found)| found.is_none())
        .collect();
    assert_eq!(winners.len(), 1, "exactly one claim wins");
    let winner = winners[0].0.clone();
    for (_, found) in &outcomes {
        if let Some(found) = found {
            assert_eq!(found, &winner);
        }
    }
    let completes: Vec<_> = outcomes
        .iter()
        .map(|(claim, _)| {
            let (store, claim) = (store.clone(), claim.clone());
            tokio::spawn(async move {
                let record = Bytes::from([b"rec-".as_slice(), &claim[..]].concat());
                store
                    .complete("one", &claim, record, Duration::from_secs(30))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut stored = 0;
    for task in completes {
        stored += usize::from(task.await.unwrap());
    }
    assert_eq!(stored, 1, "exactly one completion");
    let expected = [b"rec-".as_slice(), &winner[..]].concat();
    assert_eq!(
        get(&mut admin, &format!("{prefix}one")).await.unwrap(),
        expected
    );
}

// ---------------------------------------------------------------- NOSCRIPT

/// Guards: after SCRIPT FLUSH, each step loads its script, is applied once and answers
/// right; a renew after a flush extends the PTTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_scripts_each_step_applies_once() {
    let server = RedisServer::start();
    let store = store_at(&server.url(), "ns:").await;
    let mut admin = redis_connection(&server.url()).await;
    let (a, b) = (
        Bytes::from_static(b"claim a"),
        Bytes::from_static(b"claim b"),
    );
    let record = Bytes::from_static(b"record \x00\xff");

    script_flush(&mut admin).await;
    assert_eq!(
        store.begin("k1", &a, Duration::from_secs(2)).await.unwrap(),
        None
    );
    script_flush(&mut admin).await;
    assert!(
        store
            .renew("k1", &a, Duration::from_secs(60))
            .await
            .unwrap(),
        "renew after flush"
    );
    assert!(
        pttl(&mut admin, "ns:k1").await > 2_000,
        "the renew after a flush extended"
    );
    script_flush(&mut admin).await;
    assert!(
        !store
            .renew("k1", &b, Duration::from_secs(60))
            .await
            .unwrap(),
        "stale renew after flush"
    );
    script_flush(&mut admin).await;
    assert!(
        !store
            .complete("k1", &b, record.clone(), Duration::from_secs(100))
            .await
            .unwrap()
    );
    assert_eq!(get(&mut admin, "ns:k1").await.unwrap(), a.as_ref());
    script_flush(&mut admin).await;
    assert!(
        store
            .complete("k1", &a, record.clone(), Duration::from_secs(100))
            .await
            .unwrap()
    );
    assert_eq!(get(&mut admin, "ns:k1").await.unwrap(), record.as_ref());
    assert!(pttl(&mut admin, "ns:k1").await > 60_000);
    script_flush(&mut admin).await;
    assert!(
        store
            .complete("k1", &a, record.clone(), Duration::from_secs(100))
            .await
            .unwrap()
    );
    script_flush(&mut admin).await;
    assert!(!store.release("k1", &a).await.unwrap());
    assert_eq!(get(&mut admin, "ns:k1").await.unwrap(), record.as_ref());

    assert_eq!(
        store
            .begin("k2", &a, Duration::from_secs(30))
            .await
            .unwrap(),
        None
    );
    script_flush(&mut admin).await;
    assert!(
        store.release("k2", &a).await.unwrap(),
        "a release after a flush answers true: applied once"
    );
    assert!(!exists(&mut admin, "ns:k2").await);
    script_flush(&mut admin).await;
    assert!(!store.release("k2", &a).await.unwrap());
}

/// Guards: a flushed step costs one failed EVALSHA, one SCRIPT LOAD and one EVALSHA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_step_sends_evalsha_twice_and_loads_once() {
    let server = RedisServer::start();
    let store = store_at(&server.url(), "ns:").await;
    let mut admin = redis_connection(&server.url()).await;
    let a = Bytes::from_static(b"claim a");
    assert_eq!(
        store.begin("k", &a, Duration::from_secs(30)).await.unwrap(),
        None
    );
    for step in ["renew", "complete", "release"] {
        let key = "k";
        if step == "release" {
            assert_eq!(
                store.begin("r", &a, Duration::from_secs(30)).await.unwrap(),
                None
            );
        }
        script_flush(&mut admin).await;
        testkit::reset_stats(&mut admin).await;
        let answer = match step {
            "renew" => store.renew(key, &a, Duration::from_secs(30)).await.unwrap(),
            "complete" => store
                .complete(key, &a, Bytes::from_static(b"r"), Duration::from_secs(30))
                .await
                .unwrap(),
            _ => store.release("r", &a).await.unwrap(),
        };
        assert!(answer, "{step}");
        let calls = testkit::command_calls(&mut admin).await;
        let count = |name: &str| calls.iter().find(|(n, _)| n == name).map_or(0, |(_, c)| *c);
        assert_eq!(count("script|load"), 1, "{step}: {calls:?}");
        assert_eq!(count("evalsha"), 2, "{step}: {calls:?}");
        // Not flushed: one EVALSHA, no load.
        testkit::reset_stats(&mut admin).await;
        let _ = match step {
            "renew" => store.renew("absent", &a, Duration::from_secs(1)).await,
            "complete" => {
                store
                    .complete(
                        "absent",
                        &a,
                        Bytes::from_static(b"r"),
                        Duration::from_secs(1),
                    )
                    .await
            }
            _ => store.release("absent", &a).await,
        }
        .unwrap();
        let calls = testkit::command_calls(&mut admin).await;
        let count = |name: &str| calls.iter().find(|(n, _)| n == name).map_or(0, |(_, c)| *c);
        assert_eq!(
            (count("evalsha"), count("script|load")),
            (1, 0),
            "{step}: {calls:?}"
        );
    }
}

// ---------------------------------------------------------------- restarts

/// Guards: a restart (empty server, scripts gone, connection dead) between steps: each
/// step answers, without an error, as the empty server says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_between_steps() {
    let mut server = RedisServer::start();
    let store = store_at(&server.url(), "rs:").await;
    let a = Bytes::from_static(b"claim a");
    let record = Bytes::from_static(b"record");
    let lease = Duration::from_secs(30);

    assert_eq!(store.begin("k", &a, lease).await.unwrap(), None);
    server.restart();
    assert!(
        !store.renew("k", &a, lease).await.unwrap(),
        "renew after restart"
    );
    assert_eq!(store.begin("k", &a, lease).await.unwrap(), None);
    server.restart();
    assert!(
        !store
            .complete("k", &a, record.clone(), lease)
            .await
            .unwrap(),
        "complete after restart"
    );
    assert_eq!(store.begin("k", &a, lease).await.unwrap(), None);
    server.restart();
    assert!(
        !store.release("k", &a).await.unwrap(),
        "release after restart"
    );
    server.restart();
    assert_eq!(
        store.begin("k", &a, lease).await.unwrap(),
        None,
        "begin after restart"
    );
    assert!(store.renew("k", &a, lease).await.unwrap());
    assert!(
        store
            .complete("k", &a, record.clone(), lease)
            .await
            .unwrap()
    );
    let mut admin = redis_connection(&server.url()).await;
    assert_eq!(get(&mut admin, "rs:k").await.unwrap(), record.as_ref());
}

/// Guards: a killed server fails a step in bounded time; once it is back, steps work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_fails_then_recovers() {
    let mut server = RedisServer::start();
    let store = RedisStore::builder(server.url())
        .prefix("kill:")
        .response_timeout(Duration::from_millis(500))
        .connection_timeout(Duration::from_millis(500))
        .connect()
        .await
        .unwrap();
    let a = Bytes::from_static(b"claim a");
    assert_eq!(
        store.begin("k", &a, Duration::from_secs(30)).await.unwrap(),
        None
    );
    server.kill();
    let renewed = tokio::time::timeout(
        Duration::from_secs(60),
        store.renew("k", &a, Duration::from_secs(30)),
    )
    .await
    .expect("a step on a dead server ends");
    assert!(renewed.is_err(), "{renewed:?}");
    let released = tokio::time::timeout(Duration::from_secs(60), store.release("k", &a))
        .await
        .expect("a step on a dead server ends");
    assert!(released.is_err(), "{released:?}");
    server.restart();
    let came_back = until_async(|| {
        let store = store.clone();
        let a = a.clone();
        async move {
            matches!(
                store.begin("k2", &a, Duration::from_secs(30)).await,
                Ok(None) | Ok(Some(_))
            )
        }
    })
    .await;
    assert!(came_back, "steps work again once the server is back");
    assert!(store.release("k2", &a).await.unwrap());
}

/// One server: the response timeout bounds a whole step, the client's attempts to
/// reconnect to a server that is gone included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_on_a_killed_server_fails_within_its_response_timeout() {
    let limit = Duration::from_millis(300);
    let mut server = RedisServer::start();
    let store = RedisStore::builder(server.url())
        .prefix("bound:")
        .response_timeout(limit)
        .connection_timeout(limit)
        .connect()
        .await
        .unwrap();
    let a = Bytes::from_static(b"claim a");
    let lease = Duration::from_secs(30);
    assert_eq!(store.begin("k", &a, lease).await.unwrap(), None);
    server.kill();
    for step in ["renew", "release", "begin", "ping"] {
        let started = std::time::Instant::now();
        let failed = match step {
            "renew" => store.renew("k", &a, lease).await.err(),
            "release" => store.release("k", &a).await.err(),
            "begin" => store.begin("k2", &a, lease).await.err(),
            _ => store.ping().await.err(),
        };
        let took = started.elapsed();
        assert!(failed.is_some(), "{step} on a killed server failed");
        // Generous beside 300 ms; a step retried through reconnects took 7.5 s.
        assert!(
            took < Duration::from_secs(2),
            "{step} took {took:?}: {failed:?}"
        );
    }
}

/// A server that stops answering (its connection open): the step fails as a timeout,
/// which the protocol knows may still land, in the response timeout even where the store
/// timeout is longer; the key is free again once the server answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_server_times_a_step_out_and_leaves_the_key_free() {
    let limit = Duration::from_millis(300);
    let server = RedisServer::start();
    let connect = || {
        RedisStore::builder(server.url())
            .prefix("stall:")
            .response_timeout(limit)
            .connection_timeout(limit)
            .connect()
    };
    let store = connect().await.unwrap();
    let idem = Idempotency::builder()
        .store(connect().await.unwrap())
        .shared_scope(true)
        .store_timeout(Duration::from_secs(30))
        .build();
    let counters = Arc::new(Counters::default());
    let app = common::app(&idem, counters.clone());
    let a = Bytes::from_static(b"claim a");

    server.pause();
    let direct = store.begin("direct", &a, Duration::from_secs(30)).await;
    assert!(
        matches!(direct, Err(StoreError::Timeout(took)) if took == limit),
        "{direct:?}"
    );
    let started = std::time::Instant::now();
    let stalled = send(&app, post_with("/pay", Some("stalled"), "{}")).await;
    let took = started.elapsed();
    stalled.assert_problem(StatusCode::SERVICE_UNAVAILABLE, Problem::STORE_UNAVAILABLE);
    assert!(took < Duration::from_secs(10), "answered after {took:?}");
    server.resume();

    // The claim sent while the server stood still lands when it wakes; the release
    // idem keeps sending for a claim that timed out frees the key.
    let freed = until_async(|| {
        let app = app.clone();
        async move {
            send(&app, post_with("/pay", Some("stalled"), "{}"))
                .await
                .status
                == StatusCode::CREATED
        }
    })
    .await;
    assert!(freed, "the key runs once the server answers again");
    assert_eq!(counters.runs(), 1);
    assert!(store.release("direct", &a).await.unwrap());
}

/// A store timeout shorter than the Redis response timeout still bounds each step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_timeout_shorter_than_the_response_timeout_bounds_the_step() {
    let server = RedisServer::start();
    let store = RedisStore::builder(server.url())
        .prefix("short:")
        .response_timeout(Duration::from_secs(60))
        .connect()
        .await
        .unwrap();
    let idem = Idempotency::builder()
        .store(store)
        .shared_scope(true)
        .store_timeout(Duration::from_millis(300))
        .build();
    let counters = Arc::new(Counters::default());
    let app = common::app(&idem, counters.clone());
    server.pause();
    let started = std::time::Instant::now();
    let stalled = send(&app, post_with("/pay", Some("short"), "{}")).await;
    let took = started.elapsed();
    server.resume();
    stalled.assert_problem(StatusCode::SERVICE_UNAVAILABLE, Problem::STORE_UNAVAILABLE);
    assert!(took < Duration::from_secs(10), "answered after {took:?}");
    assert_eq!(counters.runs(), 0);
}

/// A step's timer starts when the step is first polled: a `begin` made, then awaited
/// after longer than the response timeout, on a server that answers, takes its claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_awaited_late_is_timed_from_its_first_poll() {
    let limit = Duration::from_millis(300);
    let server = RedisServer::start();
    let store = RedisStore::builder(server.url())
        .prefix("late:")
        .response_timeout(limit)
        .connect()
        .await
        .unwrap();
    let a = Bytes::from_static(b"claim a");
    let step = store.begin("k", &a, Duration::from_secs(30));
    // The delay is what this test is about: longer than the response timeout.
    tokio::time::sleep(limit + Duration::from_millis(200)).await;
    let answer = step.await;
    assert!(matches!(answer, Ok(None)), "{answer:?}");
    let mut admin = redis_connection(&server.url()).await;
    assert_eq!(
        get(&mut admin, "late:k").await.as_deref(),
        Some(&b"claim a"[..])
    );
}

/// Making a step needs no runtime, only polling it does; and its timer is armed on the
/// runtime that polls it, so a step made while an idle runtime was current still times
/// out on a stalled server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_made_outside_the_runtime_polling_it_is_bounded_by_that_runtime() {
    let limit = Duration::from_millis(300);
    let server = RedisServer::start();
    let store: &'static RedisStore = Box::leak(Box::new(
        RedisStore::builder(server.url())
            .prefix("made:")
            .response_timeout(limit)
            .connection_timeout(limit)
            .connect()
            .await
            .unwrap(),
    ));
    let a: &'static Bytes = Box::leak(Box::new(Bytes::from_static(b"claim a")));

    let made = std::thread::spawn(move || store.ping()).join();
    let ping = made.unwrap_or_else(|_| panic!("making a step outside a runtime panicked"));
    ping.await.unwrap();

    let idle = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let step = {
        let _entered = idle.enter();
        store.begin("k", a, Duration::from_secs(30))
    };
    server.pause();
    let answer = tokio::time::timeout(Duration::from_secs(5), step).await;
    server.resume();
    tokio::task::spawn_blocking(move || drop(idle))
        .await
        .unwrap();
    let answer = answer.expect("the step on a stalled server was still unanswered after 5 s");
    assert!(
        matches!(answer, Err(StoreError::Timeout(took)) if took == limit),
        "{answer:?}"
    );
}

// ---------------------------------------------------------------- HTTP

async fn bin(idem: Idempotent, State(counters): State<AppState>, body: String) -> Response {
    use axum::response::IntoResponse;
    idem.run(async move {
        counters.runs.fetch_add(1, Ordering::SeqCst);
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            "application/octet-stream".parse().unwrap(),
        );
        headers.insert("x-kind", body.parse().unwrap());
        let (kind, len) = body.split_once(':').unwrap_or((body.as_str(), "0"));
        let len: usize = len.parse().unwrap();
        let bytes = match kind {
            "empty" => Bytes::new(),
            _ => binary(len, 7),
        };
        (StatusCode::OK, headers, bytes).into_response()
    })
    .await
}

async fn always_500(idem: Idempotent, State(counters): State<AppState>) -> Response {
    use axum::response::IntoResponse;
    idem.run(async move {
        let n = counters.runs.fetch_add(1, Ordering::SeqCst) + 1;
        let mut body = binary(2000, 11).to_vec();
        body.extend_from_slice(format!("run {n}").as_bytes());
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("x-failed", "yes")],
            body,
        )
            .into_response()
    })
    .await
}

fn failing_app(idem: &Idempotency, counters: AppState) -> Router {
    common::routes(counters.clone())
        .merge(
            Router::new()
                .route("/bin", post(bin))
                .route("/always500", post(always_500))
                .with_state(counters),
        )
        .layer(idem.layer())
}

/// Keys under the backend's prefix (Redis), for inspection.
async fn redis_keys(backend: &Backend) -> Option<(MultiplexedConnection, String, Vec<String>)> {
    match backend {
        Backend::Redis { url, prefix } => {
            let mut admin = redis_connection(url).await;
            let keys = keys_under(&mut admin, prefix).await;
            Some((admin, prefix.clone(), keys))
        }
        _ => None,
    }
}

async fn binary_and_empty_bodies_replay_byte_for_byte(backend: Backend) {
    let idem = backend
        .builder()
        .await
        .max_response_bytes(64 * 1024)
        .build();
    let counters = Arc::new(Counters::default());
    let app = failing_app(&idem, counters.clone());
    for (i, kind) in ["empty", "bin:1", "bin:4096", "bin:65536"]
        .iter()
        .enumerate()
    {
        let key = format!("bin-{i}");
        let first = send(&app, post_with("/bin", Some(&key), kind)).await;
        assert_eq!(first.status, StatusCode::OK, "{kind}");
        assert!(!first.is_replay());
        let again = send(&app, post_with("/bin", Some(&key), kind)).await;
        assert!(again.is_replay(), "{kind}: {:?}", again.status);
        assert_eq!(again.status, first.status);
        assert_eq!(again.body, first.body, "{kind}: replay body differs");
        assert_eq!(again.headers["x-kind"], first.headers["x-kind"]);
        assert_eq!(
            again.headers[header::CONTENT_TYPE],
            "application/octet-stream"
        );
    }
    assert_eq!(counters.runs(), 4);
}

async fn too_large_by_one_is_not_stored(backend: Backend) {
    let idem = backend.builder().await.max_response_bytes(1024).build();
    let counters = Arc::new(Counters::default());
    let app = failing_app(&idem, counters.clone());
    let at = send(&app, post_with("/bin", Some("at"), "bin:1024")).await;
    assert_eq!(at.body.len(), 1024);
    let at_again = send(&app, post_with("/bin", Some("at"), "bin:1024")).await;
    assert!(at_again.is_replay());
    assert_eq!(at_again.body, at.body);

    let over = send(&app, post_with("/bin", Some("over"), "bin:1025")).await;
    assert_eq!(over.status, StatusCode::OK);
    assert_eq!(
        over.body,
        binary(1025, 7),
        "the client gets every byte of a too-large body"
    );
    let over_again = send(&app, post_with("/bin", Some("over"), "bin:1025")).await;
    over_again.assert_problem(StatusCode::CONFLICT, Problem::RESPONSE_NOT_STORED);
    assert_eq!(counters.runs(), 2, "neither key ran twice");
    if let Some((mut admin, _, keys)) = redis_keys(&backend).await {
        assert_eq!(keys.len(), 2, "{keys:?}");
        for key in keys {
            assert!(
                pttl(&mut admin, &key).await > 30_000,
                "{key}: a record, not a claim"
            );
        }
    }
}

async fn failed_body_is_recorded_not_released(backend: Backend) {
    let idem = backend.builder().await.build();
    let counters = Arc::new(Counters::default());
    let app = failing_app(&idem, counters.clone());
    let first = send(&app, post_with("/broken", Some("broken"), "")).await;
    first.assert_problem(StatusCode::BAD_GATEWAY, Problem::RESPONSE_NOT_STORED);
    let again = send(&app, post_with("/broken", Some("broken"), "")).await;
    again.assert_problem(StatusCode::CONFLICT, Problem::RESPONSE_NOT_STORED);
    assert_eq!(counters.runs(), 1);
    assert_eq!(backend.record_count().await, 1);
}

async fn server_error_releases_and_retry_runs(backend: Backend) {
    let idem = backend.builder().await.build();
    let counters = Arc::new(Counters::default());
    let app = failing_app(&idem, counters.clone());
    let first = send(&app, post_with("/always500", Some("5xx"), "")).await;
    assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(first.headers["x-failed"], "yes");
    assert!(first.body.ends_with(b"run 1"));
    assert_eq!(
        backend.record_count().await,
        0,
        "the key is released once the answer is out"
    );
    let again = send(&app, post_with("/always500", Some("5xx"), "")).await;
    assert!(!again.is_replay());
    assert!(again.body.ends_with(b"run 2"));
    assert_eq!(counters.runs(), 2);
    // `/fail` answers 503 on the app's first run only: a fresh app and counter.
    let counters = Arc::new(Counters::default());
    let app = failing_app(&idem, counters.clone());
    let fail = send(&app, post_with("/fail", Some("fail"), "")).await;
    assert_eq!(fail.status, StatusCode::SERVICE_UNAVAILABLE);
    let ok = send(&app, post_with("/fail", Some("fail"), "")).await;
    assert_eq!(ok.status, StatusCode::CREATED);
    let replay = send(&app, post_with("/fail", Some("fail"), "")).await;
    assert!(replay.is_replay());
    assert_eq!(replay.body, ok.body);
}

async fn stored_server_error_replays_exactly(backend: Backend) {
    let idem = backend.builder().await.store_server_errors(true).build();
    let counters = Arc::new(Counters::default());
    let app = failing_app(&idem, counters.clone());
    let first = send(&app, post_with("/always500", Some("5xx-stored"), "")).await;
    assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
    let again = send(&app, post_with("/always500", Some("5xx-stored"), "")).await;
    assert!(again.is_replay(), "{:?}", again.status);
    assert_eq!(again.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(again.body, first.body);
    assert_eq!(again.headers["x-failed"], "yes");
    assert_eq!(counters.runs(), 1);
    if let Some((mut admin, _, keys)) = redis_keys(&backend).await {
        assert_eq!(keys.len(), 1, "{keys:?}");
        let ttl = pttl(&mut admin, &keys[0]).await;
        assert!(
            ttl > 86_000_000 && ttl <= 86_400_000,
            "stored for the TTL: {ttl}"
        );
    }
}

async fn panic_releases_the_key(backend: Backend) {
    let idem = backend.builder().await.build();
    let counters = Arc::new(Counters::default());
    let app = failing_app(&idem, counters.clone());
    let caught = std::panic::AssertUnwindSafe(send(&app, post_with("/panic", Some("p"), "")))
        .catch_unwind()
        .await;
    assert!(caught.is_err(), "the first run panics");
    assert_eq!(
        backend.record_count().await,
        0,
        "the panic released the key"
    );
    let retry = send(&app, post_with("/panic", Some("p"), "")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    let replay = send(&app, post_with("/panic", Some("p"), "")).await;
    assert!(replay.is_replay());
    assert_eq!(replay.body, retry.body);
    assert_eq!(counters.runs(), 2);
}

async fn many_requests_on_one_key_run_once(backend: Backend) {
    let idem = backend
        .builder()
        .await
        .wait_for_in_flight(Duration::from_secs(20))
        .build();
    let counters = Arc::new(Counters::default());
    let app = failing_app(&idem, counters.clone());
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { send(&app, post_with("/slow", Some("crowd"), "100")).await })
        })
        .collect();
    let mut bodies = Vec::new();
    for task in tasks {
        let answer = task.await.unwrap();
        assert_eq!(
            answer.status,
            StatusCode::CREATED,
            "{:?}",
            String::from_utf8_lossy(&answer.body)
        );
        bodies.push(answer.body);
    }
    assert_eq!(counters.runs(), 1, "one execution");
    assert!(bodies.iter().all(|b| b == &bodies[0]));
}

on_both_stores!(
    binary_and_empty_bodies_replay_byte_for_byte,
    too_large_by_one_is_not_stored,
    failed_body_is_recorded_not_released,
    server_error_releases_and_retry_runs,
    stored_server_error_replays_exactly,
    panic_releases_the_key,
    many_requests_on_one_key_run_once,
);

/// Guards: through HTTP, the Redis key is `<prefix><32 hex>:<key>` (quoted key with
/// spaces, quotes and a hash tag), a claim during the run whose PTTL the lease keeper
/// extends, and the record with the TTL after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_key_claim_renew_and_record_in_redis() {
    let backend = Backend::redis("cmd-http");
    let Backend::Redis { url, prefix } = &backend else {
        unreachable!()
    };
    let idem = backend
        .builder()
        .await
        .lease(Duration::from_millis(600))
        .build();
    let counters = Arc::new(Counters::default());
    let app = failing_app(&idem, counters.clone());
    let mut admin = redis_connection(url).await;
    let header_value = r#""with space {tag} \"q\" x""#;
    let key = r#"with space {tag} "q" x"#;
    let request = || {
        let mut request = post_with("/gated", None, "");
        request
            .headers_mut()
            .insert("idempotency-key", header_value.parse().unwrap());
        request
    };
    let first = tokio::spawn({
        let app = app.clone();
        let request = request();
        async move { send(&app, request).await }
    });
    common::until(|| counters.runs() == 1).await;
    let keys = keys_under(&mut admin, prefix).await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    let full = keys[0].clone();
    let rest = full.strip_prefix(prefix.as_str()).unwrap();
    let (scope, tail) = rest.split_at(32);
    assert!(scope.chars().all(|c| c.is_ascii_hexdigit()), "{rest:?}");
    assert_eq!(tail, format!(":{key}"), "the key as one argument");
    let claimed = pttl(&mut admin, &full).await;
    assert!(claimed > 0 && claimed <= 600, "a lease: {claimed}");
    // The keeper renews: the PTTL goes up again while the handler waits.
    let mut lowest = claimed;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut renewed = false;
    while tokio::time::Instant::now() < deadline {
        let now = pttl(&mut admin, &full).await;
        assert!(now > 0, "the claim expired while held: {now}");
        if now > lowest {
            renewed = true;
            break;
        }
        lowest = now;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(renewed, "a renewal extended the claim");
    counters.gate.notify_one();
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    let ttl = pttl(&mut admin, &full).await;
    assert!(ttl > 86_000_000, "the record lives for the TTL: {ttl}");
    let again = send(&app, request()).await;
    assert!(again.is_replay());
    assert_eq!(again.body, first.body);
    assert_eq!(keys_under(&mut admin, prefix).await, vec![full]);
}

/// The value of `key` on whichever node of the cluster owns it.
async fn cluster_get(admins: &mut [MultiplexedConnection], key: &str) -> Option<Vec<u8>> {
    for admin in admins.iter_mut() {
        let answer: redis::RedisResult<Option<Vec<u8>>> =
            redis::cmd("GET").arg(key).query_async(admin).await;
        if let Ok(value) = answer {
            return value;
        }
    }
    panic!("no node owns {key:?}")
}

/// Guards: on a cluster whose nodes all lost the scripts, each step (keys with hash tags
/// and odd characters, spread over the slots) is routed to its key's node, loads the
/// script there and is applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_steps_after_every_node_lost_the_scripts() {
    let cluster = testkit::RedisCluster::start(3);
    let prefix = "cl {x} ü:";
    let store = RedisStore::cluster_builder(cluster.urls())
        .prefix(prefix)
        .connect()
        .await
        .unwrap();
    let mut admins = Vec::new();
    for url in cluster.urls() {
        admins.push(redis_connection(&url).await);
    }
    let flush_all = |admins: &mut Vec<MultiplexedConnection>| {
        let mut admins = admins.clone();
        async move {
            for admin in &mut admins {
                script_flush(admin).await;
            }
        }
    };
    let a = Bytes::from_static(b"claim a");
    for i in 0..12 {
        let key = match i % 3 {
            0 => format!("{{tag{i}}}k"),
            1 => format!("k {i} \"q\" ключ"),
            _ => format!("{i}{{}}"),
        };
        let full = format!("{prefix}{key}");
        let record = Bytes::from(format!("record {i}"));
        assert_eq!(
            store.begin(&key, &a, Duration::from_secs(2)).await.unwrap(),
            None
        );
        assert_eq!(cluster_get(&mut admins, &full).await.unwrap(), a.as_ref());
        flush_all(&mut admins).await;
        assert!(
            store
                .renew(&key, &a, Duration::from_secs(60))
                .await
                .unwrap(),
            "{key}"
        );
        flush_all(&mut admins).await;
        assert!(
            store
                .complete(&key, &a, record.clone(), Duration::from_secs(60))
                .await
                .unwrap(),
            "{key}"
        );
        assert_eq!(
            cluster_get(&mut admins, &full).await.unwrap(),
            record.as_ref()
        );
        flush_all(&mut admins).await;
        assert!(!store.release(&key, &a).await.unwrap(), "{key}");
        flush_all(&mut admins).await;
        assert!(store.release(&key, &record).await.unwrap(), "{key}");
        assert_eq!(cluster_get(&mut admins, &full).await, None);
    }
}
