//! One execution with a slow store: the lease runs from when the claim is sent, and a claim
//! whose answer came too late is confirmed before anything runs.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use common::{Backend, Counters, SlowAnswers, app, post_with, send};
use idem_runtime::store::Store;
use idem_runtime::{Idempotency, Problem};

/// A retry is sent while the first request of `key` runs; every retry must be 409.
async fn one_run_despite_slow_begin(backend: Backend, delay: Duration) {
    let inner = backend.builder().await.build();
    let store: Arc<dyn Store> = Arc::new(SlowAnswers::new(inner.store().clone(), delay));
    let idem = common::test_builder(Idempotency::builder().shared_store(store))
        .lease(Duration::from_millis(300))
        .build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());

    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with("/gated", Some("slow-begin"), "")).await }
    });
    common::until(|| counters.runs() > 0).await;
    // The first handler runs (and keeps running); retries must all be 409.
    let mut pending = Vec::new();
    for _ in 0..4 {
        let retry = tokio::spawn({
            let app = app.clone();
            async move { send(&app, post_with("/gated", Some("slow-begin"), "")).await }
        });
        while !retry.is_finished() && counters.runs() == 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if counters.runs() > 1 {
            pending.push(retry);
            break;
        }
        retry
            .await
            .unwrap()
            .assert_problem(StatusCode::CONFLICT, Problem::IN_FLIGHT);
    }
    let runs = counters.runs();
    counters.gate.notify_waiters();
    counters.gate.notify_one();
    let _ = first.await;
    for retry in pending {
        let _ = retry.await;
    }
    assert_eq!(runs, 1, "the key ran twice at once");
}

/// Guards: when `begin`'s answer takes more than 2/3 of the lease (250 ms of 300 ms), the
/// lease is confirmed and renewed in time: no retry runs beside the first execution.
async fn slow_begin_answer_keeps_the_lease(backend: Backend) {
    one_run_despite_slow_begin(backend, Duration::from_millis(250)).await;
}

/// Guards: a `begin` answered after the whole lease ran out (400 ms of 300 ms, within the
/// store timeout) never executes on a claim that may have been taken over: the request is
/// answered 409 and nothing runs.
async fn begin_answered_after_the_lease_never_executes(backend: Backend) {
    let inner = backend.builder().await.build();
    let store: Arc<dyn Store> = Arc::new(SlowAnswers::new(
        inner.store().clone(),
        Duration::from_millis(400),
    ));
    let idem = common::test_builder(Idempotency::builder().shared_store(store))
        .lease(Duration::from_millis(300))
        .build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let answers: Vec<_> = (0..3)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { send(&app, post_with("/pay", Some("late"), "{}")).await })
        })
        .collect();
    for answer in answers {
        let answer = answer.await.unwrap();
        answer.assert_problem(StatusCode::CONFLICT, Problem::IN_FLIGHT);
    }
    assert_eq!(counters.runs(), 0, "nothing ran on a lapsed claim");
}

on_both_stores!(
    slow_begin_answer_keeps_the_lease,
    begin_answered_after_the_lease_never_executes
);
