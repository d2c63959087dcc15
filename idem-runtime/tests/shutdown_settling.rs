//! `Idempotency::shutdown` waits for every key this process has not settled: a claim sent
//! and not answered yet, and a release under way, not only executions holding a claim.
//! A process that exits past them leaves a claim behind, and its key answers "in flight"
//! to every retry until the lease runs out.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use common::{Counters, Gated, Gates, app, post_with, send};
use futures_util::FutureExt;
use idem_runtime::Idempotency;
use idem_runtime::store::MemoryStore;

fn gated() -> (Arc<Gates>, Idempotency) {
    let gates = Arc::new(Gates::default());
    let store = Gated::new(Arc::new(MemoryStore::new()), gates.clone());
    let idem = common::test_builder(Idempotency::builder().store(store))
        .lease(Duration::from_secs(60))
        .build();
    (gates, idem)
}

/// Guards (a defect once shown): a request whose client went away while its claim was
/// unanswered leaves the release of that claim to a task of its own. `shutdown` returned
/// 0 at once beside it, and a process exiting then left the claim for a whole lease.
/// Held: `shutdown` waits for the release, and the key is free once it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_the_release_of_a_claim_whose_client_went_away() {
    let (store, idem) = gated();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    store.answer.close();
    store.release.close();

    let answered = store.answer.reached.notified();
    let request = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with("/pay", Some("gone"), "{}")).await }
    });
    answered.await;
    // The client goes away while the claim is applied and unanswered.
    let released = store.release.reached.notified();
    request.abort();
    assert!(request.await.unwrap_err().is_cancelled());
    store.answer.open();
    released.await;

    let mut shutdown = std::pin::pin!(idem.shutdown(Duration::from_secs(30)));
    assert_eq!(
        shutdown.as_mut().now_or_never(),
        None,
        "shutdown returned while the claim's release was under way"
    );
    store.release.open();
    assert_eq!(shutdown.await, 0);
    let retry = send(&app, post_with("/pay", Some("gone"), "{}")).await;
    assert_eq!(
        retry.status,
        StatusCode::CREATED,
        "the key was left claimed"
    );
    assert_eq!(counters.runs(), 1);
}

/// Guards (a defect once shown): an execution counted only once its claim is answered, so
/// `shutdown` called while the claim was on its way returned 0 at once, and the work then
/// ran after it. Held: `shutdown` waits for the claim's answer and the work it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_a_claim_not_yet_answered() {
    let (store, idem) = gated();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    store.answer.close();

    let answered = store.answer.reached.notified();
    let request = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with("/pay", Some("unanswered"), "{}")).await }
    });
    answered.await;

    let mut shutdown = std::pin::pin!(idem.shutdown(Duration::from_secs(30)));
    assert_eq!(
        shutdown.as_mut().now_or_never(),
        None,
        "shutdown returned while a claim was unanswered"
    );
    store.answer.open();
    assert_eq!(shutdown.await, 0);
    assert_eq!(counters.runs(), 1, "the work ran before shutdown returned");
    let first = request.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
}

/// Guards (a defect once shown): an execution whose handler failed (503) stopped being
/// counted before its key was released, so `shutdown` could return while the release was
/// under way and the process exit with the key claimed. Held: `shutdown` waits for the
/// release, and the key is free once it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_the_release_after_a_server_error() {
    let (store, idem) = gated();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    store.release.close();

    let released = store.release.reached.notified();
    let request = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with("/fail", Some("failed"), "")).await }
    });
    released.await;

    let mut shutdown = std::pin::pin!(idem.shutdown(Duration::from_secs(30)));
    assert_eq!(
        shutdown.as_mut().now_or_never(),
        None,
        "shutdown returned while the key's release was under way"
    );
    store.release.open();
    assert_eq!(shutdown.await, 0);
    let first = request.await.unwrap();
    assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE);
    let retry = send(&app, post_with("/fail", Some("failed"), "")).await;
    assert_eq!(
        retry.status,
        StatusCode::CREATED,
        "the key was left claimed"
    );
    assert_eq!(counters.runs(), 2);
}

/// Guards: a claim whose release keeps failing is reported by a `shutdown` that cannot
/// wait for it, not passed over as settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_counts_a_release_it_cannot_wait_for() {
    let (store, idem) = gated();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    store.release.close();

    let released = store.release.reached.notified();
    let request = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with("/fail", Some("stuck"), "")).await }
    });
    released.await;
    assert_eq!(idem.shutdown(Duration::from_millis(50)).await, 1);
    store.release.open();
    assert_eq!(
        request.await.unwrap().status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(idem.shutdown(Duration::from_secs(30)).await, 0);
}

/// Guards: the last execution to end wakes a shutdown that waits for it (the registry
/// wakes `shutdown` only while one waits). Its deadline is an hour: a shutdown not woken
/// would still be waiting when the test gives up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_execution_to_end_wakes_a_waiting_shutdown() {
    let (store, idem) = gated();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    store.complete.close();

    let completing = store.complete.reached.notified();
    let request = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with("/pay", Some("last"), "{}")).await }
    });
    completing.await;

    let mut shutdown = std::pin::pin!(idem.shutdown(Duration::from_secs(3600)));
    assert_eq!(
        shutdown.as_mut().now_or_never(),
        None,
        "shutdown returned while an execution held its key"
    );
    store.complete.open();
    assert_eq!(request.await.unwrap().status, StatusCode::CREATED);
    let woken = tokio::time::timeout(Duration::from_secs(20), shutdown).await;
    assert_eq!(
        woken,
        Ok(0),
        "the execution ended, and the waiting shutdown was not woken"
    );
}
