//! The memory store's bounds, end to end: a store built with bounds it accepts must
//! store responses, or a retry runs the handler again.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::{Counters, app, post_with, send};
use idem_runtime::Idempotency;
use idem_runtime::store::MemoryStore;

/// Guards: with a memory store of few entries and many bytes (10 records, 1 GiB, which
/// `with_bounds` accepts), a key never runs its handler twice: retries of a completed
/// request are answered (replayed, or told the response was not stored), not run again
/// once the store gives up storing the response and the lease runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_of_few_entries_never_runs_a_key_twice() {
    let store = MemoryStore::with_bounds(10, 1 << 30).unwrap();
    let idem = common::test_builder(Idempotency::builder().store(store))
        .lease(Duration::from_millis(200))
        .build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());

    let first = send(&app, post_with("/pay", Some("once"), "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let mut statuses = Vec::new();
    let until = Instant::now() + Duration::from_secs(34);
    while Instant::now() < until && counters.runs() == 1 {
        let retry = send(&app, post_with("/pay", Some("once"), "{}")).await;
        if statuses.last() != Some(&retry.status) {
            statuses.push(retry.status);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        counters.runs(),
        1,
        "key `once` ran its handler {} times; retries were answered {statuses:?}",
        counters.runs()
    );
}
