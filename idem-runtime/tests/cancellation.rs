//! A request dropped while its claim is in flight does not leave the key stuck.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use common::{Counters, SlowAnswers, app, post_with, send};
use idem_runtime::Idempotency;
use idem_runtime::store::MemoryStore;

/// Guards: a client that hangs up while the claim is on its way releases the claim, so
/// its retry runs instead of getting 409 for a whole lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_during_begin_releases_the_claim() {
    let memory = MemoryStore::new();
    let idem = common::test_builder(Idempotency::builder().store(SlowAnswers::new(
        std::sync::Arc::new(memory.clone()),
        Duration::from_millis(300),
    )))
    .build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());

    let abandoned = tokio::time::timeout(
        Duration::from_millis(100),
        send(&app, post_with("/pay", Some("hang-up"), "{}")),
    )
    .await;
    assert!(
        abandoned.is_err(),
        "the request was dropped while begin was in flight"
    );

    let mut status = None;
    for _ in 0..50 {
        memory.run_pending_tasks();
        if memory.entry_count() == 0 && memory.claim_count() == 0 {
            status = Some(
                send(&app, post_with("/pay", Some("hang-up"), "{}"))
                    .await
                    .status,
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        status,
        Some(StatusCode::CREATED),
        "the claim was released and the retry ran"
    );
    assert_eq!(counters.runs(), 1);
}
