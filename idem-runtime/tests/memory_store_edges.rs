//! The memory store at the edges of its bounds and under mixed expiries, end to end and
//! through the `Store` contract.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::post;
use bytes::Bytes;
use common::{Counters, app, post_with, send};
use idem_runtime::store::{MemoryStore, Store};
use idem_runtime::{Idempotency, Idempotent, Problem};

/// Sends `request` on its own task, so that a panic inside the app is seen as an
/// error instead of ending the test.
async fn send_caught(app: &Router, request: axum::extract::Request) -> Option<common::Answer> {
    let app = app.clone();
    tokio::spawn(async move { send(&app, request).await })
        .await
        .ok()
}

/// Guards: a store bounded by count with no practical byte bound
/// (`with_bounds(20, u64::MAX)`, which `with_bounds` accepts) stores every response and
/// never runs a key twice: each record weighs `ceil(u64::MAX / 20)`, and the shard's total
/// weight must not overflow (a panic inside `complete`, after the claim was removed and
/// before the record was kept, leaves the key free to run again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_bounded_by_count_only_never_runs_a_key_twice() {
    let store = MemoryStore::with_bounds(20, u64::MAX).unwrap();
    let idem = common::test_builder(Idempotency::builder().store(store)).build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());

    let mut failed = Vec::new();
    for n in 0..20 {
        let key = format!("count-{n}");
        match send_caught(&app, post_with("/pay", Some(&key), "{}")).await {
            Some(answer) if answer.status == StatusCode::CREATED => {}
            other => failed.push((key, other.map(|answer| answer.status))),
        }
    }
    for n in 0..20 {
        let key = format!("count-{n}");
        send_caught(&app, post_with("/pay", Some(&key), "{}")).await;
    }
    assert_eq!(
        (counters.runs(), failed),
        (20, vec![]),
        "20 keys in a store of 20 records: handler runs, and first requests that failed (None: the app panicked)"
    );
}

/// Guards: `with_bounds(20, u64::MAX)` holds at most 20 records and completes every
/// claim it gave (no overflow of the weight sum, which panics in debug builds and wraps
/// in release, after which no record is ever evicted).
#[tokio::test]
async fn a_store_bounded_by_count_only_stays_within_its_count() {
    let store = MemoryStore::with_bounds(20, u64::MAX).unwrap();
    let lease = Duration::from_secs(60);
    for n in 0..100 {
        let key = format!("k{n}");
        let claim = Bytes::from(format!("claim {n}"));
        assert_eq!(store.begin(&key, &claim, lease).await.unwrap(), None);
        let stored = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            futures_ready(store.complete(&key, &claim, Bytes::from_static(b"r"), lease))
        }));
        assert!(
            matches!(stored, Ok(Ok(true))),
            "record {n} of a store bounded at 20 records, u64::MAX bytes: {:?}",
            stored.map_err(|_| "complete panicked")
        );
        assert!(
            store.entry_count() <= 20,
            "after {n}: {}",
            store.entry_count()
        );
    }
}

/// The memory store's steps are ready at once.
fn futures_ready<T>(mut future: idem_runtime::store::BoxFuture<'_, T>) -> T {
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut context) {
        std::task::Poll::Ready(value) => value,
        std::task::Poll::Pending => unreachable!("the memory store never waits"),
    }
}

/// Guards: records whose TTL has passed make room before live records are evicted: a
/// store of 40 records holding 10 live long-lived records and 30 expired short-lived ones
/// keeps the 10 when 10 more arrive (20 live records, half the bound), so none of their
/// keys runs again on a retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_records_make_room_before_live_ones_are_evicted() {
    let store = MemoryStore::with_bounds(40, 1 << 30).unwrap();
    let idem = common::test_builder(Idempotency::builder().store(store.clone())).build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());

    for n in 0..10 {
        let first = send(&app, post_with("/pay", Some(&format!("long-{n}")), "{}")).await;
        assert_eq!(first.status, StatusCode::CREATED);
    }
    // Short-lived records (1 s TTL), completed after the long ones.
    for n in 0..30 {
        let first = send(&app, post_with("/short", Some(&format!("short-{n}")), "")).await;
        assert_eq!(first.status, StatusCode::CREATED);
    }
    tokio::time::sleep(Duration::from_millis(1300)).await;
    for n in 10..20 {
        let first = send(&app, post_with("/pay", Some(&format!("long-{n}")), "{}")).await;
        assert_eq!(first.status, StatusCode::CREATED);
    }
    let runs = counters.runs();
    let mut rerun = Vec::new();
    for n in 0..20 {
        let retry = send(&app, post_with("/pay", Some(&format!("long-{n}")), "{}")).await;
        if !retry.is_replay() {
            rerun.push(n);
        }
    }
    assert_eq!(
        (counters.runs() - runs, rerun),
        (0, vec![]),
        "live records (20 of a bound of 40) evicted while expired ones stayed; store held {} records",
        store.entry_count()
    );
}

async fn huge(idem: Idempotent, State(counters): State<Arc<Counters>>) -> Response {
    idem.run(async move {
        counters
            .runs
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        (StatusCode::CREATED, "h".repeat(17 << 20))
    })
    .await
}

/// Guards: a response heavier than one shard's share of the byte bound (17 MiB, with 4
/// shards of 16 MiB under a 64 MiB bound) but lighter than the store's bound is answered
/// to its client, and a retry is told it was not stored: never run again, never stuck.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_over_a_shards_share_is_not_stored_and_never_rerun() {
    let store = MemoryStore::with_bounds(100_000, 64 << 20).unwrap();
    let idem = common::test_builder(Idempotency::builder().store(store.clone()))
        .max_response_bytes(32 << 20)
        .build();
    let counters = Arc::new(Counters::default());
    let app = Router::new()
        .route("/huge", post(huge))
        .with_state(counters.clone())
        .layer(idem.layer());

    let first = send(&app, post_with("/huge", Some("huge"), "")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.body.len(), 17 << 20);
    for _ in 0..3 {
        let retry = send(&app, post_with("/huge", Some("huge"), "")).await;
        retry.assert_problem(StatusCode::CONFLICT, Problem::RESPONSE_NOT_STORED);
    }
    assert_eq!(counters.runs(), 1);
    assert_eq!(store.claim_count(), 0);
    assert_eq!(store.entry_count(), 1, "the not-stored marker");
}

/// Guards: executions racing on one key with leases that run out under them, on many
/// threads (begin, renew, complete, release and sweeps interleaved): at most one
/// execution's completion is kept per key, a stale execution never completes over a
/// newer claim or record, every begin after a kept completion finds that record, and the
/// claim count returns to zero with no claim held.
#[test]
fn racing_executions_with_lapsing_leases_keep_one_record_per_key() {
    use std::sync::Barrier;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let store = MemoryStore::with_limits(64, MemoryStore::MIN_BYTES * 64, 4).unwrap();
    const THREADS: usize = 4;
    for round in 0..300 {
        let key = format!("race-{round}");
        let barrier = Arc::new(Barrier::new(THREADS));
        let kept = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..THREADS)
            .map(|n| {
                let (store, key, barrier, kept) =
                    (store.clone(), key.clone(), barrier.clone(), kept.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let mut mine = None;
                    for attempt in 0..20 {
                        let claim = Bytes::from(format!("claim {n}-{attempt}"));
                        let lease = Duration::from_micros(200 + 50 * n as u64);
                        match futures_ready(store.begin(&key, &claim, lease)).unwrap() {
                            None => {
                                if attempt % 5 == 4 {
                                    futures_ready(store.release(&key, &claim)).unwrap();
                                    continue;
                                }
                                if attempt % 3 == 0 {
                                    std::thread::sleep(Duration::from_micros(300));
                                    futures_ready(store.renew(&key, &claim, lease)).unwrap();
                                }
                                if n == 0 {
                                    store.run_pending_tasks();
                                }
                                let record = Bytes::from(format!("record {n}-{attempt}"));
                                let ok = futures_ready(store.complete(
                                    &key,
                                    &claim,
                                    record.clone(),
                                    Duration::from_secs(60),
                                ))
                                .unwrap();
                                if ok {
                                    kept.fetch_add(1, Ordering::SeqCst);
                                    mine = Some(record);
                                    break;
                                }
                            }
                            Some(found) if found.starts_with(b"record") => break,
                            Some(_) => std::thread::yield_now(),
                        }
                    }
                    mine
                })
            })
            .collect();
        let records: Vec<_> = threads
            .into_iter()
            .filter_map(|thread| thread.join().unwrap())
            .collect();
        assert!(records.len() <= 1, "round {round}: {records:?} all kept");
        let found =
            futures_ready(store.begin(&key, &Bytes::from_static(b"late"), Duration::from_secs(60)))
                .unwrap();
        match records.first() {
            Some(record) => assert_eq!(found.as_ref(), Some(record), "round {round}"),
            None => {
                if found.is_none() {
                    futures_ready(store.release(&key, &Bytes::from_static(b"late"))).unwrap();
                }
            }
        }
    }
    std::thread::sleep(Duration::from_millis(5));
    store.run_pending_tasks();
    assert_eq!(store.claim_count(), 0);
}

/// Guards: the smallest store `with_bounds` accepts (1 record, `MIN_BYTES`) keeps the
/// not-stored marker of a response too large for it under the longest key a client may
/// send (255 characters), so a retry is told it was not stored: never stuck, never rerun.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_smallest_store_keeps_the_marker_of_the_longest_key() {
    let store = MemoryStore::with_bounds(1, MemoryStore::MIN_BYTES).unwrap();
    let idem = common::test_builder(Idempotency::builder().store(store.clone())).build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let key = "k".repeat(idem_runtime::IdempotencyKey::MAX_LEN);
    let first = send(&app, post_with("/big", Some(&key), "")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.body.len(), 4096);
    let retry = send(&app, post_with("/big", Some(&key), "")).await;
    retry.assert_problem(StatusCode::CONFLICT, Problem::RESPONSE_NOT_STORED);
    assert_eq!(counters.runs(), 1);
    assert_eq!((store.claim_count(), store.entry_count()), (0, 1));
}
