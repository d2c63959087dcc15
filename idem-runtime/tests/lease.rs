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

/// Guards: a claim's lease is renewed for as long as its work runs, whichever runtime
/// started the handle's renewals. A handle shared by two runtimes: the first one's claim
/// starts the renewals, the second one's work then runs past its lease while the first
/// runtime shuts down (a test's runtime, a worker's); a call with the second one's key
/// still finds it in flight, and the work runs once.
#[test]
fn a_runtime_shutting_down_leaves_the_claims_of_another_renewed() {
    use idem_runtime::OnceKey;
    use idem_runtime::once::{OnceError, Outcome};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::Notify;

    let lease = Duration::from_millis(300);
    let first = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let second = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let idem = second.block_on(async {
        common::test_builder(Idempotency::builder())
            .lease(lease)
            .build()
    });

    // The first runtime's work holds its key until that runtime goes.
    let first_started = Arc::new(AtomicUsize::new(0));
    first.spawn({
        let (idem, started) = (idem.clone(), first_started.clone());
        async move {
            idem.once(OnceKey::compose(["lease", "first"]), "in")
                .run(|| async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    std::future::pending::<Result<u32, String>>().await
                })
                .await
        }
    });
    second.block_on(common::until(|| first_started.load(Ordering::SeqCst) == 1));

    let runs = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Notify::new());
    let gated = {
        let (runs, gate) = (runs.clone(), gate.clone());
        move || async move {
            runs.fetch_add(1, Ordering::SeqCst);
            gate.notified().await;
            Ok::<u32, String>(7)
        }
    };
    let held = second.spawn({
        let (idem, gated) = (idem.clone(), gated.clone());
        async move {
            idem.once(OnceKey::compose(["lease", "second"]), "in")
                .run_with_outcome(gated)
                .await
        }
    });
    second.block_on(common::until(|| runs.load(Ordering::SeqCst) == 1));

    drop(first);

    second.block_on(async {
        // Past several leases: only renewals keep the key.
        tokio::time::sleep(lease * 4).await;
        // A retry that took the key over would wait on the gate: it is not waited for.
        let retry = idem
            .once(OnceKey::compose(["lease", "second"]), "in")
            .wait(Duration::ZERO)
            .run(gated);
        let retry = tokio::time::timeout(Duration::from_secs(5), retry).await;
        assert!(
            matches!(retry, Ok(Err(OnceError::InFlight))),
            "the key is still held: {retry:?}"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1, "the work ran once");
        gate.notify_one();
        assert_eq!(held.await.unwrap().unwrap(), Outcome::Ran(7));
    });
}
