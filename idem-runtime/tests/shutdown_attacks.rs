//! Attacks on `Idempotency::shutdown` waiting for keys not yet settled (a claim sent and
//! unanswered, a release under way) beside the executions holding a claim.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::{Counters, Gated, Gates, app, post_with, send, until};
use futures_util::FutureExt;
use idem_runtime::once::OnceError;
use idem_runtime::store::MemoryStore;
use idem_runtime::{Idempotency, IdempotencyBuilder, OnceKey};
use tokio::sync::Notify;

/// A handle on a hooked memory store (lease 60 s), configured further by `configure`.
fn hooked(
    configure: impl FnOnce(IdempotencyBuilder) -> IdempotencyBuilder,
) -> (Arc<Gates>, Idempotency) {
    let hooks = Arc::new(Gates::default());
    let store = Gated::new(Arc::new(MemoryStore::new()), hooks.clone());
    let builder =
        common::test_builder(Idempotency::builder().store(store)).lease(Duration::from_secs(60));
    (hooks, configure(builder).build())
}

/// Asserts that `shutdown` finds nothing under way: it answers 0, and at once.
async fn settles_promptly(idem: &Idempotency, what: &str) {
    let started = Instant::now();
    let left = idem.shutdown(Duration::from_secs(2)).await;
    let took = started.elapsed();
    assert_eq!(
        left, 0,
        "{what}: shutdown reported {left} still under way (after {took:?}) although every request had ended"
    );
    assert!(
        took < Duration::from_millis(500),
        "{what}: shutdown took {took:?} although every request had ended"
    );
}

// ---------------------------------------------------------------------------------------
// Guarantee 3: nothing stays counted once all work has ended.

/// Attack: a `begin` that times out and whose claim never reaches the store (the command
/// was lost: the memory store never saw it). The request is answered 503 and the key is
/// free (a retry runs at once). Then `shutdown(short)` must answer 0 promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_begin_that_timed_out_leaves_shutdown_nothing_to_wait_for() {
    let (hooks, idem) = hooked(|builder| builder.store_timeout(Duration::from_millis(100)));
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    hooks.hang_begins.store(1, Ordering::SeqCst);
    let first = send(&app, post_with("/pay", Some("late"), "{}")).await;
    assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE);
    // Nothing of the first request is in the store: the retry runs and is stored.
    let retry = send(&app, post_with("/pay", Some("late"), "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(counters.runs(), 1);
    let replay = send(&app, post_with("/pay", Some("late"), "{}")).await;
    assert!(replay.is_replay());
    settles_promptly(
        &idem,
        "after a begin that timed out, its key since run and stored",
    )
    .await;
}

/// Attack: the same with `once` (answered `Unavailable`, nothing ran).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_once_call_whose_begin_timed_out_leaves_shutdown_nothing_to_wait_for() {
    let (hooks, idem) = hooked(|builder| builder.store_timeout(Duration::from_millis(100)));
    hooks.hang_begins.store(1, Ordering::SeqCst);
    let key = OnceKey::compose(["late", "once"]);
    let first = idem
        .once(key.clone(), &1)
        .run(|| async { Ok::<u32, String>(1) })
        .await;
    assert!(matches!(first, Err(OnceError::Unavailable)), "{first:?}");
    let again = idem
        .once(key, &1)
        .run(|| async { Ok::<u32, String>(2) })
        .await;
    assert_eq!(again.unwrap(), 2);
    settles_promptly(&idem, "after a once call whose begin timed out").await;
}

/// Attack: every ordinary way a request or a `once` call ends (stored, replayed from the
/// store and from the local tier, key reused, unkeyed, 5xx, panic, a store error on
/// begin, 409 in flight, waiting for a request in flight, once ok / err / panic / stored
/// error / in flight, fail-open): afterwards nothing may stay counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ordinary_outcome_leaves_shutdown_nothing_to_wait_for() {
    let (hooks, idem) = hooked(|builder| {
        builder
            .local_tier(1 << 20, Duration::from_secs(60))
            .wait_for_in_flight(Duration::from_secs(10))
    });
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());

    assert_eq!(
        send(&app, post_with("/pay", Some("k1"), "{}")).await.status,
        StatusCode::CREATED
    );
    assert!(
        send(&app, post_with("/pay", Some("k1"), "{}"))
            .await
            .is_replay()
    );
    let reused = send(&app, post_with("/pay", Some("k1"), "other")).await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        send(&app, post_with("/pay", None, "{}")).await.status,
        StatusCode::CREATED
    );
    settles_promptly(&idem, "executed, replayed, reused, unkeyed").await;

    let failing = Arc::new(Counters::default());
    let fail_app = common::app(&idem, failing.clone());
    let failed = send(&fail_app, post_with("/fail", Some("k2"), "")).await;
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        send(&fail_app, post_with("/fail", Some("k2"), ""))
            .await
            .status,
        StatusCode::CREATED
    );
    settles_promptly(&idem, "a 5xx released, then run again").await;

    let panicking = Arc::new(Counters::default());
    let panic_app = common::app(&idem, panicking.clone());
    let caught =
        std::panic::AssertUnwindSafe(send(&panic_app, post_with("/panic", Some("k3"), "")))
            .catch_unwind()
            .await;
    assert!(caught.is_err());
    assert_eq!(
        send(&panic_app, post_with("/panic", Some("k3"), ""))
            .await
            .status,
        StatusCode::CREATED
    );
    settles_promptly(&idem, "a panicking handler").await;

    hooks.fail_begins.store(1, Ordering::SeqCst);
    let refused = send(&app, post_with("/pay", Some("k4"), "{}")).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    settles_promptly(&idem, "a store error on begin").await;

    // In flight: one request waits for it (wait_for_in_flight), then replays.
    let gated = Arc::new(Counters::default());
    let gated_app = common::app(&idem, gated.clone());
    let holder = tokio::spawn({
        let app = gated_app.clone();
        async move { send(&app, post_with("/gated", Some("k5"), "")).await }
    });
    until(|| gated.runs() == 1).await;
    let answered = hooks.begins_answered.load(Ordering::SeqCst);
    let waiter = tokio::spawn({
        let app = gated_app.clone();
        async move { send(&app, post_with("/gated", Some("k5"), "")).await }
    });
    until(|| hooks.begins_answered.load(Ordering::SeqCst) > answered).await;
    gated.gate.notify_one();
    assert_eq!(holder.await.unwrap().status, StatusCode::CREATED);
    assert!(waiter.await.unwrap().is_replay());
    assert_eq!(gated.runs(), 1);
    settles_promptly(&idem, "a request that waited for one in flight").await;

    // once: ok, replay, err, panic, stored error, in flight without waiting.
    let ok = OnceKey::compose(["once", "ok"]);
    assert_eq!(
        idem.once(ok.clone(), &1)
            .run(|| async { Ok::<u32, String>(1) })
            .await
            .unwrap(),
        1
    );
    let replayed = idem
        .once(ok, &1)
        .run_with_outcome(|| async { Ok::<u32, String>(9) })
        .await
        .unwrap();
    assert!(replayed.is_replay());
    let err = idem
        .once(OnceKey::compose(["once", "err"]), &1)
        .run(|| async { Err::<u32, String>("no".into()) })
        .await;
    assert!(matches!(err, Err(OnceError::Operation(_))));
    let panicked = tokio::spawn({
        let idem = idem.clone();
        async move {
            idem.once(OnceKey::compose(["once", "panic"]), &1)
                .run(|| async {
                    if true {
                        panic!("the operation panics");
                    }
                    Ok::<u32, String>(1)
                })
                .await
        }
    })
    .await;
    assert!(panicked.unwrap_err().is_panic());
    let stored_err = OnceKey::compose(["once", "stored-err"]);
    for _ in 0..2 {
        let _ = idem
            .once(stored_err.clone(), &1)
            .run_storing_errors(|| async { Err::<u32, String>("no".into()) })
            .await;
    }
    let release = Arc::new(Notify::new());
    let busy_started = Arc::new(Notify::new());
    let busy = OnceKey::compose(["once", "busy"]);
    let running = tokio::spawn({
        let (idem, busy, release, busy_started) = (
            idem.clone(),
            busy.clone(),
            release.clone(),
            busy_started.clone(),
        );
        async move {
            idem.once(busy, &1)
                .run(|| async move {
                    busy_started.notify_one();
                    release.notified().await;
                    Ok::<u32, String>(1)
                })
                .await
        }
    });
    busy_started.notified().await;
    let in_flight = idem
        .once(busy.clone(), &1)
        .no_wait()
        .run(|| async { Ok::<u32, String>(2) })
        .await;
    assert!(
        matches!(in_flight, Err(OnceError::InFlight)),
        "{in_flight:?}"
    );
    release.notify_one();
    assert_eq!(running.await.unwrap().unwrap(), 1);
    settles_promptly(
        &idem,
        "once: ok, replay, err, panic, stored error, in flight",
    )
    .await;

    // Fail-open: the store fails, the work runs unprotected.
    let (open_hooks, open) = hooked(|builder| builder.fail_open(true));
    let open_app = common::app(&open, Arc::new(Counters::default()));
    open_hooks.fail_begins.store(1, Ordering::SeqCst);
    assert_eq!(
        send(&open_app, post_with("/pay", Some("k6"), "{}"))
            .await
            .status,
        StatusCode::CREATED
    );
    settles_promptly(&open, "a fail-open run").await;
}

/// Attack: requests cancelled at every await point (claim unanswered, handler running,
/// completion being stored, release after a 5xx under way). `shutdown` waits for all of
/// them, then answers 0; no key is left claimed, none runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_cancelled_at_every_step_are_waited_for_and_leave_no_key_stuck() {
    let (hooks, idem) = hooked(|builder| builder);
    let counters = Arc::new(Counters::default());
    let pay_app = app(&idem, counters.clone());
    let gated = Arc::new(Counters::default());
    let gated_app = app(&idem, gated.clone());
    let failing = Arc::new(Counters::default());
    let fail_app = app(&idem, failing.clone());

    // 1. While its claim is unanswered.
    hooks.answer.close();
    let reached = hooks.answer.reached.notified();
    let request = tokio::spawn({
        let app = pay_app.clone();
        async move { send(&app, post_with("/pay", Some("c1"), "{}")).await }
    });
    reached.await;
    request.abort();
    assert!(request.await.unwrap_err().is_cancelled());
    hooks.answer.open();

    // 2. While the handler runs.
    let request = tokio::spawn({
        let app = gated_app.clone();
        async move { send(&app, post_with("/gated", Some("c2"), "")).await }
    });
    until(|| gated.runs() == 1).await;
    request.abort();
    assert!(request.await.unwrap_err().is_cancelled());

    // 3. While its completion is being stored.
    hooks.complete.close();
    let reached = hooks.complete.reached.notified();
    let request = tokio::spawn({
        let app = pay_app.clone();
        async move { send(&app, post_with("/pay", Some("c3"), "{}")).await }
    });
    reached.await;
    request.abort();
    assert!(request.await.unwrap_err().is_cancelled());

    // 4. While its key is released after a 5xx.
    hooks.release.close();
    let reached = hooks.release.reached.notified();
    let request = tokio::spawn({
        let app = fail_app.clone();
        async move { send(&app, post_with("/fail", Some("c4"), "")).await }
    });
    reached.await;
    request.abort();
    assert!(request.await.unwrap_err().is_cancelled());

    let mut shutdown = std::pin::pin!(idem.shutdown(Duration::from_secs(30)));
    assert_eq!(
        shutdown.as_mut().now_or_never(),
        None,
        "shutdown returned while cancelled requests were still under way"
    );
    gated.gate.notify_one();
    hooks.complete.open();
    hooks.release.open();
    assert_eq!(shutdown.await, 0);
    settles_promptly(&idem, "after requests cancelled at every step").await;

    let c1 = send(&pay_app, post_with("/pay", Some("c1"), "{}")).await;
    assert_eq!(c1.status, StatusCode::CREATED, "c1 was left claimed");
    assert!(!c1.is_replay());
    assert!(
        send(&gated_app, post_with("/gated", Some("c2"), ""))
            .await
            .is_replay()
    );
    assert!(
        send(&pay_app, post_with("/pay", Some("c3"), "{}"))
            .await
            .is_replay()
    );
    let c4 = send(&fail_app, post_with("/fail", Some("c4"), "")).await;
    assert_eq!(c4.status, StatusCode::CREATED, "c4 was left claimed");
    assert_eq!(counters.runs(), 2, "c3 ran once, c1 once (on its retry)");
    assert_eq!(gated.runs(), 1);
    assert_eq!(failing.runs(), 2);
    settles_promptly(&idem, "after the retries").await;
}

/// Attack: many requests at once, of every kind, some cancelled at random points:
/// afterwards nothing stays counted (no leak, no underflow wrapping to a huge count).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_mixed_requests_some_cancelled_leave_nothing_counted() {
    let (_, idem) = hooked(|builder| builder.wait_for_in_flight(Duration::from_millis(200)));
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let mut tasks = Vec::new();
    for i in 0..1000usize {
        let app = app.clone();
        let (path, key) = match i % 5 {
            0 => ("/pay", format!("p{}", i % 37)),
            1 => ("/fail", format!("f{i}")),
            2 => ("/slow", format!("s{}", i % 11)),
            3 => ("/stream", format!("t{i}")),
            _ => ("/pay", format!("q{i}")),
        };
        let body = if path == "/slow" || path == "/stream" {
            "5"
        } else {
            "{}"
        };
        let task = tokio::spawn(async move { send(&app, post_with(path, Some(&key), body)).await });
        if i % 7 == 0 {
            for _ in 0..(i % 5) {
                tokio::task::yield_now().await;
            }
            task.abort();
        }
        tasks.push(task);
    }
    for task in tasks {
        let _ = task.await;
    }
    let started = Instant::now();
    let left = idem.shutdown(Duration::from_secs(10)).await;
    assert_eq!(left, 0, "{left} left under way after every request ended");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    settles_promptly(&idem, "after a thousand mixed requests").await;
}

// ---------------------------------------------------------------------------------------
// Guarantee 2: never past `within`, never for ever once settled.

/// Attack: several shutdowns at once, over many rounds, each waiting for one release;
/// they must all wake when it settles (no lost wake-up), and a second call after them
/// answers 0 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_shutdowns_all_wake_when_the_last_release_settles() {
    let (hooks, idem) = hooked(|builder| builder);
    for round in 0..150 {
        let failing = Arc::new(Counters::default());
        let fail_app = app(&idem, failing.clone());
        hooks.release.close();
        let reached = hooks.release.reached.notified();
        let request = tokio::spawn({
            let app = fail_app.clone();
            let key = format!("round-{round}");
            async move { send(&app, post_with("/fail", Some(&key), "")).await }
        });
        reached.await;
        let waiters: Vec<_> = (0..4)
            .map(|_| {
                let idem = idem.clone();
                tokio::spawn(async move { idem.shutdown(Duration::from_secs(30)).await })
            })
            .collect();
        for _ in 0..(round % 4) {
            tokio::task::yield_now().await;
        }
        hooks.release.open();
        let joined = tokio::time::timeout(
            Duration::from_secs(5),
            futures_util::future::join_all(waiters),
        )
        .await
        .unwrap_or_else(|_| {
            panic!("round {round}: a shutdown kept waiting after the release settled")
        });
        for left in joined {
            assert_eq!(left.unwrap(), 0, "round {round}");
        }
        assert_eq!(
            request.await.unwrap().status,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            idem.shutdown(Duration::from_secs(30)).now_or_never(),
            Some(0),
            "round {round}: a second shutdown did not answer 0 at once"
        );
    }
}

/// Attack: a release that never ends: every shutdown (one, then three at once, then one
/// more) returns at its deadline, not much later, and reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_keeps_to_its_deadline_beside_a_stuck_release() {
    let (hooks, idem) = hooked(|builder| builder);
    let failing = Arc::new(Counters::default());
    let fail_app = app(&idem, failing.clone());
    hooks.release.close();
    let reached = hooks.release.reached.notified();
    let request = tokio::spawn({
        let app = fail_app.clone();
        async move { send(&app, post_with("/fail", Some("stuck"), "")).await }
    });
    reached.await;
    let within = Duration::from_millis(150);
    let started = Instant::now();
    assert_eq!(idem.shutdown(within).await, 1);
    let took = started.elapsed();
    assert!(
        took >= within && took < within + Duration::from_millis(350),
        "{took:?}"
    );
    let started = Instant::now();
    let three: Vec<_> = (0..3)
        .map(|_| {
            let idem = idem.clone();
            tokio::spawn(async move { idem.shutdown(within).await })
        })
        .collect();
    for left in futures_util::future::join_all(three).await {
        assert_eq!(left.unwrap(), 1);
    }
    let took = started.elapsed();
    assert!(took < within + Duration::from_millis(350), "{took:?}");
    hooks.release.open();
    assert_eq!(
        request.await.unwrap().status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    settles_promptly(&idem, "after the stuck release ended").await;
}

// ---------------------------------------------------------------------------------------
// Guarantee 1: 0 only when nothing is under way; otherwise the number under way.

/// Attack: a claim turning into an execution (`begin`: the registry entry is made, then
/// the `Settling` dropped) while `shutdown` reads its two counts one after the other
/// (`count()`, then `unsettled()`, in `shutdown` and in `idle`). A chain of `once` calls
/// keeps at least one of them counted at every moment: the next call's claim is sent
/// (counted as unsettled) before the previous execution ends, and answered only after it
/// ended. Threads calling `shutdown(0)` meanwhile must never get 0.
#[test]
fn shutdown_never_answers_zero_while_a_claim_turns_into_an_execution() {
    const CYCLES: usize = 40_000;
    const TIME_LIMIT: Duration = Duration::from_secs(40);
    const SPINNERS: usize = 4;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (hooks, idem) = hooked(|builder| builder);
    hooks.paced.store(true, Ordering::SeqCst);
    let stop = Arc::new(AtomicBool::new(false));
    let zeros = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let op = |i: usize| {
        let (idem, started, release) = (idem.clone(), started.clone(), release.clone());
        async move {
            idem.once(OnceKey::compose(["chain", &i.to_string()]), &i)
                .run(move || async move {
                    started.notify_one();
                    release.notified().await;
                    Ok::<usize, String>(i)
                })
                .await
        }
    };
    let cycles = runtime.block_on(async {
        let mut current = tokio::spawn(op(0));
        hooks.entered.notified().await;
        // From here on, something is counted at every moment until the last call ends.
        let spinners: Vec<_> = (0..SPINNERS)
            .map(|_| {
                let (idem, stop, zeros, calls) =
                    (idem.clone(), stop.clone(), zeros.clone(), calls.clone());
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_time()
                        .build()
                        .unwrap();
                    while !stop.load(Ordering::SeqCst) {
                        if rt.block_on(idem.shutdown(Duration::ZERO)) == 0 {
                            zeros.fetch_add(1, Ordering::SeqCst);
                        }
                        calls.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        hooks.permits.add_permits(1);
        started.notified().await;
        let began = Instant::now();
        let mut cycles = 0;
        for i in 1..CYCLES {
            let next = tokio::spawn(op(i));
            hooks.entered.notified().await;
            release.notify_one();
            assert_eq!(current.await.unwrap().unwrap(), i - 1);
            hooks.permits.add_permits(1);
            started.notified().await;
            current = next;
            cycles = i;
            if zeros.load(Ordering::SeqCst) > 0 || began.elapsed() > TIME_LIMIT {
                break;
            }
        }
        stop.store(true, Ordering::SeqCst);
        for spinner in spinners {
            spinner.join().unwrap();
        }
        release.notify_one();
        current.await.unwrap().unwrap();
        cycles
    });
    let zeros = zeros.load(Ordering::SeqCst);
    assert_eq!(
        zeros,
        0,
        "shutdown answered 0 {zeros} times (of {} calls, {cycles} claims turned into executions) while a claim or an execution was counted at every moment",
        calls.load(Ordering::Relaxed)
    );
}

/// Guards: one key in flight in this process, and one request waiting for it
/// (`wait_for_in_flight`): `shutdown` counts the waiter too (it may yet claim the key and
/// run, should the holder release it), so it reports 2, as documented; and both end
/// right, the waiter with the holder's replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_for_a_key_is_counted_until_it_is_answered() {
    let (hooks, idem) = hooked(|builder| builder.wait_for_in_flight(Duration::from_secs(30)));
    let gated = Arc::new(Counters::default());
    let gated_app = app(&idem, gated.clone());
    let holder = tokio::spawn({
        let app = gated_app.clone();
        async move { send(&app, post_with("/gated", Some("one"), "")).await }
    });
    until(|| gated.runs() == 1).await;
    let answered = hooks.begins_answered.load(Ordering::SeqCst);
    let waiter = tokio::spawn({
        let app = gated_app.clone();
        async move { send(&app, post_with("/gated", Some("one"), "")).await }
    });
    until(|| hooks.begins_answered.load(Ordering::SeqCst) > answered).await;
    let left = idem.shutdown(Duration::from_millis(100)).await;
    gated.gate.notify_one();
    assert_eq!(holder.await.unwrap().status, StatusCode::CREATED);
    assert!(waiter.await.unwrap().is_replay());
    assert_eq!(
        left, 2,
        "shutdown reported {left} under way for one execution and one request waiting for its key"
    );
    assert_eq!(idem.shutdown(Duration::from_secs(10)).await, 0);
}

// ---------------------------------------------------------------------------------------
// Guarantee 1 on SQLite: the release after a commit that rolled back.

#[cfg(feature = "sqlite")]
mod sqlite {
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::Duration;

    use axum::Router;
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    use axum::routing::post;
    use futures_util::FutureExt;
    use idem_runtime::store::{SqliteStore, SqliteTransaction};
    use idem_runtime::{Idempotency, Idempotent};
    use tokio::sync::Notify;
    use tracing::field::{Field, Visit};
    use tracing::{Event, Metadata, Subscriber, span};

    use super::common::{SqliteFile, post_with, send};

    /// Holds the thread that logs a message containing `needle` until `go` is called:
    /// the log line as slow as a log sink may be, or the thread preempted right there.
    struct Pause {
        needle: &'static str,
        reached: Arc<Notify>,
        held: Arc<(Mutex<bool>, Condvar)>,
    }

    struct Message(String);

    impl Visit for Message {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            if field.name() == "message" {
                self.0 = format!("{value:?}");
            }
        }
    }

    impl Subscriber for Pause {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
            span::Id::from_u64(1)
        }
        fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
        fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
        fn event(&self, event: &Event<'_>) {
            let mut message = Message(String::new());
            event.record(&mut message);
            if message.0.contains(self.needle) {
                self.reached.notify_one();
                let (lock, go) = &*self.held;
                let mut held = lock.lock().unwrap();
                while *held {
                    held = go.wait(held).unwrap();
                }
            }
        }
        fn enter(&self, _: &span::Id) {}
        fn exit(&self, _: &span::Id) {}
    }

    /// Writes a payment, then makes SQLite roll the whole transaction back (`INSERT OR
    /// ROLLBACK` on a taken tag), ignores that, and answers 201: idem's commit of the
    /// record in that transaction is refused (rolled back) and it releases the key.
    async fn careless(idem: Idempotent, tx: SqliteTransaction) -> Response {
        idem.run(async move {
            sqlx::query("INSERT INTO payments (note) VALUES ('careless')")
                .execute(&mut *tx.conn().await.unwrap())
                .await
                .unwrap();
            let conflict = match tx.conn().await {
                Ok(mut conn) => sqlx::query("INSERT OR ROLLBACK INTO tags VALUES ('taken')")
                    .execute(&mut *conn)
                    .await
                    .map(drop),
                Err(error) => Err(error),
            };
            assert!(conflict.is_err(), "the tag is taken");
            (StatusCode::CREATED, "paid").into_response()
        })
        .await
    }

    /// Attack: after a commit that rolled back, the execution stops being counted
    /// (`complete_in` drops its lease keeper, and with it the registry entry) before
    /// `Execution::release` counts the release (after a `warn!` and the transaction's
    /// roll-back). A `shutdown` looking then (as it does: the entry's end wakes it) sees
    /// nothing under way and answers 0, and the process may exit before the release is
    /// even sent: the key stays claimed for a lease.
    #[test]
    fn shutdown_waits_for_the_release_after_a_commit_that_rolled_back() {
        let reached = Arc::new(Notify::new());
        let held = Arc::new((Mutex::new(true), Condvar::new()));
        let dispatch = tracing::Dispatch::new(Pause {
            needle: "could not take its result and was rolled back",
            reached: reached.clone(),
            held: held.clone(),
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .on_thread_start(move || {
                std::mem::forget(tracing::dispatcher::set_default(&dispatch));
            })
            .build()
            .unwrap();
        runtime.block_on(async {
            let file = SqliteFile::create("review_shutdown_rollback");
            let store = SqliteStore::connect(&file.url).await.unwrap();
            sqlx::query("CREATE TABLE payments (id INTEGER PRIMARY KEY AUTOINCREMENT, note TEXT NOT NULL)")
                .execute(store.pool())
                .await
                .unwrap();
            sqlx::query("CREATE TABLE tags (name TEXT PRIMARY KEY)")
                .execute(store.pool())
                .await
                .unwrap();
            sqlx::query("INSERT INTO tags VALUES ('taken')")
                .execute(store.pool())
                .await
                .unwrap();
            let idem = Idempotency::builder()
                .shared_scope(true)
                .store(store.clone())
                .lease(Duration::from_secs(60))
                .build();
            let app = Router::new()
                .route("/careless", post(careless))
                .layer(idem.layer());
            let request = tokio::spawn({
                let app = app.clone();
                async move { send(&app, post_with("/careless", Some("rb"), "")).await }
            });
            reached.notified().await;
            // The commit was refused; the key is still claimed and its release not sent.
            let shutdown = idem.shutdown(Duration::from_secs(30)).now_or_never();
            // The key is still claimed at this moment: a retry is told it is in flight.
            let retry = send(&app, post_with("/careless", Some("rb"), "")).await;
            assert_eq!(retry.status, StatusCode::CONFLICT);
            {
                let (lock, go) = &*held;
                *lock.lock().unwrap() = false;
                go.notify_all();
            }
            let answer = request.await.unwrap();
            assert!(!answer.status.is_success(), "{}", answer.status);
            assert_eq!(
                shutdown, None,
                "shutdown answered {shutdown:?} while the key was claimed and its release not yet sent"
            );
            assert_eq!(idem.shutdown(Duration::from_secs(5)).await, 0);
        });
    }
}
