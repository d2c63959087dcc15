//! Regressions of bounds: the detached-work bound and the memory store's claim bound.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use common::{Counters, app, eventually, post_with, send};
use idem_runtime::Idempotency;
use idem_runtime::store::MemoryStore;

/// Guards (a defect once shown): `max_detached(0)` ("no detached work") refuses every keyed request with 503,
/// even with nothing detached at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_detached_zero_still_serves_keyed_requests() {
    let idem = common::test_builder(Idempotency::builder())
        .max_detached(0)
        .build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let answer = send(&app, post_with("/pay", Some("k"), "{}")).await;
    assert_eq!(
        answer.status,
        StatusCode::CREATED,
        "nothing is detached, yet: {:?}",
        String::from_utf8_lossy(&answer.body)
    );
}

/// Guards (a defect once shown): with the memory store's claims full and fail-open on, one key runs its handler
/// twice at once (the docs promise a full claim map is answered 503, never run unprotected).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_claim_map_never_runs_a_key_twice_with_fail_open() {
    let store = MemoryStore::with_limits(1000, 1 << 20, 1).unwrap();
    let idem = common::test_builder(Idempotency::builder().store(store))
        .fail_open(true)
        .build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());

    // Another key holds the only claim.
    let holder = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with("/gated", Some("holder"), "")).await }
    });
    assert!(eventually(Duration::from_secs(10), || counters.runs() == 1).await);

    // Two tries of one key, concurrently.
    let tries: Vec<_> = (0..2)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { send(&app, post_with("/gated", Some("victim"), "")).await })
        })
        .collect();
    eventually(Duration::from_secs(3), || {
        counters.runs() == 3 || tries.iter().all(tokio::task::JoinHandle::is_finished)
    })
    .await;
    let ran = counters.runs() - 1;
    counters.gate.notify_waiters();
    counters.gate.notify_one();
    let _ = holder.await;
    for t in tries {
        let _ = t.await;
    }
    assert!(ran <= 1, "key `victim` ran {ran} times at once");
}

/// Guards (a defect once shown): a memory store whose byte bound per entry exceeds 4 GiB (one entry, 8 GiB)
/// refuses every record as too large, so no response is ever stored for replay.
#[tokio::test]
async fn memory_store_with_a_large_per_entry_bound_stores_records() {
    use bytes::Bytes;
    use idem_runtime::store::Store;
    let store = MemoryStore::with_bounds(1, 8 << 30).unwrap();
    let lease = Duration::from_secs(30);
    let claim = Bytes::from_static(b"claim");
    assert_eq!(store.begin("k", &claim, lease).await.unwrap(), None);
    let stored = store
        .complete("k", &claim, Bytes::from_static(b"small record"), lease)
        .await;
    assert!(matches!(stored, Ok(true)), "{stored:?}");
}
