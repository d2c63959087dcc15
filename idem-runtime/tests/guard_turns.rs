//! Guards of one request: which one claims the key, which passes its work through, and
//! that none of them waits for ever, or lets the work run twice (regressions of defects
//! once shown); and the not-stored record when the store refuses a response.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use common::{Gated, Gates, post_with, send, send_past_in_flight};
use idem_runtime::store::MemoryStore;
use idem_runtime::{Idempotency, Idempotent, idempotent};
use tokio::sync::Notify;

#[derive(Clone, Default)]
struct Runs(Arc<AtomicUsize>);

async fn work(runs: Runs) -> (StatusCode, String) {
    let n = runs.0.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::CREATED, format!("run {n}"))
}

/// The first guard gets 20 ms; past that the handler falls back to the second guard,
/// keeping the first one's future aside (a `select!` on `&mut fut`, the usual shape when
/// the first may still be wanted) and dropping it when the handler returns.
async fn first_kept_aside(
    first: Idempotent,
    second: Idempotent,
    State(runs): State<Runs>,
    _body: String,
) -> Response {
    let first = first.run(work(runs.clone()));
    let mut first = std::pin::pin!(first);
    tokio::select! {
        biased;
        answer = &mut first => return answer,
        () = tokio::time::sleep(Duration::from_millis(20)) => {}
    }
    second.run(work(runs)).await
}

/// A second guard taken beside `#[idempotent]` (an alias, which the macro does not see).
type Guard = Idempotent;

/// `#[idempotent]` whose work runs a guard taken by hand in a task of its own (the work
/// spawns it, e.g. to run it on the runtime's other worker, and awaits it).
#[idempotent]
async fn inner_spawned(extra: Guard, State(runs): State<Runs>, _body: String) -> Response {
    tokio::spawn(extra.run(work(runs))).await.unwrap()
}

fn app(idem: &Idempotency, runs: &Runs) -> Router {
    Router::new()
        .route("/kept_aside", post(first_kept_aside))
        .route("/inner_spawned", post(inner_spawned))
        .with_state(runs.clone())
        .layer(idem.layer())
}

/// Guards (a defect once shown): a guard whose claim is under way, kept alive but no
/// longer polled, never makes the next guard of the request wait for it: without a
/// transaction to finish, that one claims the key itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_guard_never_waits_for_a_first_kept_aside_mid_claim() {
    let inner = MemoryStore::new();
    let gates = Arc::new(Gates::default());
    let idem = Idempotency::builder()
        .shared_scope(true)
        .store(Gated::new(Arc::new(inner.clone()), gates.clone()))
        .build();
    let runs = Runs::default();
    let app = app(&idem, &runs);
    // The first guard's claim is applied; its answer comes 100 ms later.
    gates.answer.close();
    let opener = tokio::spawn({
        let gates = gates.clone();
        async move {
            gates.answer.reached.notified().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            gates.answer.open();
        }
    });
    let answered = tokio::time::timeout(
        Duration::from_secs(5),
        send(&app, post_with("/kept_aside", Some("aside-1"), "{}")),
    )
    .await;
    opener.await.unwrap();
    let answer = answered.expect(
        "the request hung: its second guard waits for the first one's turn, which nothing polls",
    );
    assert!(
        answer.status == StatusCode::CREATED || answer.status == StatusCode::CONFLICT,
        "{} {:?}",
        answer.status,
        String::from_utf8_lossy(&answer.body)
    );
}

/// Guards (a defect once shown): a guard run in a task spawned from `#[idempotent]`'s
/// work, which idem cannot tell from one run beside it, is refused (`500`): its work never
/// runs, and nothing is stored for the key (it claimed the key the outer guard held, was
/// answered `409`, and that `409` was stored as the key's response).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_run_in_a_task_spawned_from_the_work_is_refused_and_nothing_stored() {
    let idem = Idempotency::builder().shared_scope(true).build();
    let runs = Runs::default();
    let app = app(&idem, &runs);
    for _ in 0..3 {
        let answer = send(&app, post_with("/inner_spawned", Some("spawned-1"), "{}")).await;
        assert!(!answer.is_replay(), "{answer:?}");
        answer.assert_problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            idem_runtime::Problem::GUARD_CONFLICT,
        );
    }
    assert_eq!(runs.0.load(Ordering::SeqCst), 0);
}

#[derive(Clone, Default)]
struct St {
    runs: Arc<AtomicUsize>,
    started: Arc<Notify>,
    hold: Arc<Notify>,
    a_runs: Arc<AtomicUsize>,
    a_fail: Arc<Notify>,
    b_runs: Arc<AtomicUsize>,
}

/// The first guard's work starts, then pauses; the handler, seeing it started, keeps its
/// future aside (a `select!` on `&mut first`) and falls back to the second guard.
async fn kept_aside_mid_work(
    first: Idempotent,
    second: Idempotent,
    State(s): State<St>,
    _body: String,
) -> Response {
    let first_work = {
        let s = s.clone();
        async move {
            let n = s.runs.fetch_add(1, Ordering::SeqCst) + 1;
            s.started.notify_one();
            s.hold.notified().await;
            (StatusCode::CREATED, format!("run {n}"))
        }
    };
    let first = first.run(first_work);
    let mut first = std::pin::pin!(first);
    tokio::select! {
        biased;
        answer = &mut first => return answer,
        () = s.started.notified() => {}
    }
    let second_work = {
        let s = s.clone();
        async move {
            let n = s.runs.fetch_add(1, Ordering::SeqCst) + 1;
            (StatusCode::CREATED, format!("run {n}"))
        }
    };
    second.run(second_work).await
}

/// Two guards side by side: the second starts once the first one's work runs; the first
/// one's work answers 500 (the key released) on the first request, 201 after.
async fn beside(
    first: Idempotent,
    second: Idempotent,
    State(s): State<St>,
    _body: String,
) -> Response {
    let first_work = {
        let s = s.clone();
        async move {
            let n = s.a_runs.fetch_add(1, Ordering::SeqCst);
            s.started.notify_one();
            if n == 0 {
                s.a_fail.notified().await;
                (StatusCode::INTERNAL_SERVER_ERROR, "a failed".to_owned())
            } else {
                (StatusCode::CREATED, "a done".to_owned())
            }
        }
    };
    let second_work = {
        let s = s.clone();
        async move {
            s.b_runs.fetch_add(1, Ordering::SeqCst);
            (StatusCode::CREATED, "b done".to_owned())
        }
    };
    let second = {
        let s = s.clone();
        async move {
            s.started.notified().await;
            let answer = second.run(second_work).await;
            s.a_fail.notify_one();
            answer
        }
    };
    let (a, b) = tokio::join!(first.run(first_work), second);
    let (a, b) = (common::read(a).await, common::read(b).await);
    let body = serde_json::json!({
        "a": [a.status.as_u16(), String::from_utf8_lossy(&a.body)],
        "b": [b.status.as_u16(), String::from_utf8_lossy(&b.body)],
    });
    (StatusCode::OK, axum::Json(body)).into_response()
}

/// Guards (a defect once shown): a first guard whose work started, then kept aside
/// unpolled: the second guard is refused (it passed its work through, and the first one's
/// work, detached when the handler returned, ran to the end too: the work ran twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_beside_an_owner_kept_aside_mid_work_is_refused() {
    let idem = Idempotency::builder().shared_scope(true).build();
    let s = St::default();
    let app = Router::new()
        .route("/kept_aside", post(kept_aside_mid_work))
        .with_state(s.clone())
        .layer(idem.layer());
    let first = send(&app, post_with("/kept_aside", Some("aside-w-1"), "{}")).await;
    first.assert_problem(
        StatusCode::INTERNAL_SERVER_ERROR,
        idem_runtime::Problem::GUARD_CONFLICT,
    );
    // The first guard's work, detached, ends now and stores its response.
    s.hold.notify_one();
    // The client retries while the first run ends.
    let retry =
        send_past_in_flight(&app, || post_with("/kept_aside", Some("aside-w-1"), "{}")).await;
    assert!(retry.is_replay(), "{retry:?}");
    assert_eq!(retry.body, "run 1");
    assert_eq!(s.runs.load(Ordering::SeqCst), 1);
}

/// Guards (a defect once shown): a guard started beside another's running work is refused,
/// whatever that work answers: it passed its work through, the other's `500` released the
/// key while it ran, and a retry ran it again at the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_beside_a_running_owner_never_runs_its_work() {
    let idem = Idempotency::builder().shared_scope(true).build();
    let s = St::default();
    let app = Router::new()
        .route("/beside", post(beside))
        .with_state(s.clone())
        .layer(idem.layer());
    let first = send(&app, post_with("/beside", Some("beside-1"), "{}"))
        .await
        .json();
    assert_eq!(first["a"][0], 500, "{first}");
    assert_eq!(first["b"][0], 500, "{first}");
    let retry = send(&app, post_with("/beside", Some("beside-1"), "{}"))
        .await
        .json();
    assert_eq!(retry["a"], serde_json::json!([201, "a done"]), "{retry}");
    // Started once the retry's first guard's work ended: answered with its replay.
    assert_eq!(retry["b"], serde_json::json!([201, "a done"]), "{retry}");
    assert_eq!(s.b_runs.load(Ordering::SeqCst), 0);
    assert_eq!(
        s.a_runs.load(Ordering::SeqCst),
        2,
        "the 500 released the key"
    );
}

#[derive(Clone, Default)]
struct Spawning {
    runs: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
    started: Arc<Notify>,
    go: Arc<Notify>,
}

/// `#[idempotent]` whose work, on its first call once let go, runs a guard taken by hand
/// in a task it spawns and awaits.
#[idempotent]
async fn spawns_late(extra: Guard, State(s): State<Spawning>, _body: String) -> Response {
    if s.calls.fetch_add(1, Ordering::SeqCst) == 0 {
        s.started.notify_one();
        s.go.notified().await;
    }
    let runs = s.runs.clone();
    tokio::spawn(extra.run(async move {
        let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
        (StatusCode::CREATED, format!("run {n}"))
    }))
    .await
    .unwrap()
}

/// Guards (a defect once shown): the client hangs up while `#[idempotent]`'s work runs,
/// and the work, on in a task of its own, starts a guard in a task it spawns: that guard
/// is refused (`500`, so the key is released), never answered `409` by the key its own
/// request holds (that `409` was stored as the key's response for its lifetime).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_spawned_after_a_hang_up_never_stores_a_409() {
    let idem = Idempotency::builder().shared_scope(true).build();
    let s = Spawning::default();
    let app = Router::new()
        .route("/spawns_late", post(spawns_late))
        .with_state(s.clone())
        .layer(idem.layer());
    let request = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with("/spawns_late", Some("hangup-1"), "{}")).await }
    });
    s.started.notified().await;
    // The client hangs up.
    request.abort();
    let _ = request.await;
    s.go.notify_one();
    // The client retries while the first call's work ends.
    let retry =
        send_past_in_flight(&app, || post_with("/spawns_late", Some("hangup-1"), "{}")).await;
    assert!(!retry.is_replay(), "{retry:?}");
    retry.assert_problem(
        StatusCode::INTERNAL_SERVER_ERROR,
        idem_runtime::Problem::GUARD_CONFLICT,
    );
    assert_eq!(s.runs.load(Ordering::SeqCst), 0);
}

/// The first guard gets 20 ms, then is dropped; the handler falls back to the second.
async fn first_dropped(
    first: Idempotent,
    second: Idempotent,
    State(runs): State<Runs>,
    _body: String,
) -> Response {
    if let Ok(answer) =
        tokio::time::timeout(Duration::from_millis(20), first.run(work(runs.clone()))).await
    {
        return answer;
    }
    second.run(work(runs)).await
}

/// Guards: a first guard dropped mid-claim whose release never answers: the second guard
/// waits for that release (it holds the turn) no longer than the store timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_guard_wakes_when_the_given_up_claims_release_never_answers() {
    let inner = MemoryStore::new();
    let gates = Arc::new(Gates::default());
    gates.hang_begins.store(1, Ordering::SeqCst);
    gates.release.close();
    let idem = Idempotency::builder()
        .shared_scope(true)
        .store_timeout(Duration::from_millis(300))
        .store(Gated::new(Arc::new(inner.clone()), gates.clone()))
        .build();
    let runs = Runs::default();
    let app = Router::new()
        .route("/dropped", post(first_dropped))
        .with_state(runs.clone())
        .layer(idem.layer());
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        send(&app, post_with("/dropped", Some("rel-1"), "{}")),
    )
    .await
    .expect("the second guard woke");
    assert_eq!(answer.status, StatusCode::CREATED, "{:?}", answer.body);
    assert_eq!(runs.0.load(Ordering::SeqCst), 1);
}

/// A store whose `complete`s are scripted: `fail` of them fail (a transient error), and
/// any record over `limit` bytes is refused.
struct Refusing {
    inner: MemoryStore,
    fail_calls: Vec<usize>,
    limit: usize,
    completes: AtomicUsize,
}

impl idem_runtime::store::Store for Refusing {
    fn begin<'a>(
        &'a self,
        key: &'a str,
        claim: &'a bytes::Bytes,
        lease: Duration,
    ) -> idem_runtime::store::BoxFuture<
        'a,
        Result<Option<bytes::Bytes>, idem_runtime::store::StoreError>,
    > {
        self.inner.begin(key, claim, lease)
    }
    fn renew<'a>(
        &'a self,
        key: &'a str,
        claim: &'a bytes::Bytes,
        lease: Duration,
    ) -> idem_runtime::store::BoxFuture<'a, Result<bool, idem_runtime::store::StoreError>> {
        self.inner.renew(key, claim, lease)
    }
    fn complete<'a>(
        &'a self,
        key: &'a str,
        claim: &'a bytes::Bytes,
        record: bytes::Bytes,
        ttl: Duration,
    ) -> idem_runtime::store::BoxFuture<'a, Result<bool, idem_runtime::store::StoreError>> {
        use idem_runtime::store::StoreError;
        let call = self.completes.fetch_add(1, Ordering::SeqCst);
        if self.fail_calls.contains(&call) {
            return Box::pin(async { Err(StoreError::backend("blip")) });
        }
        if record.len() > self.limit {
            let size = record.len() as u64;
            return Box::pin(async move {
                Err(StoreError::RecordRefused {
                    size,
                    reason: "too large".into(),
                })
            });
        }
        self.inner.complete(key, claim, record, ttl)
    }
    fn release<'a>(
        &'a self,
        key: &'a str,
        claim: &'a bytes::Bytes,
    ) -> idem_runtime::store::BoxFuture<'a, Result<bool, idem_runtime::store::StoreError>> {
        self.inner.release(key, claim)
    }
}

async fn big(idem: Idempotent, State(runs): State<Runs>, _body: String) -> Response {
    idem.run(async move {
        runs.0.fetch_add(1, Ordering::SeqCst);
        (StatusCode::CREATED, "x".repeat(10_000))
    })
    .await
}

/// Guards: the not-stored fallback, after a store error first, then refusals (the
/// background retry), or a refusal first and the fallback's store failing once. Either
/// way a retry is told the response was not stored; the work never runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_record_after_a_store_error_never_runs_the_work_again() {
    for fail_calls in [vec![0], vec![1], vec![0, 1], vec![0, 2], vec![1, 2]] {
        {
            let inner = MemoryStore::new();
            let store = Arc::new(Refusing {
                inner: inner.clone(),
                fail_calls: fail_calls.clone(),
                limit: 1_000,
                completes: AtomicUsize::new(0),
            });
            let idem = Idempotency::builder()
                .shared_scope(true)
                .shared_store(store.clone())
                .build();
            let runs = Runs::default();
            let app = Router::new()
                .route("/big", post(big))
                .with_state(runs.clone())
                .layer(idem.layer());
            let key = format!(
                "fail-{}",
                fail_calls
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("-")
            );
            let first = send(&app, post_with("/big", Some(&key), "{}")).await;
            assert_eq!(first.status, StatusCode::CREATED);
            common::until(|| {
                inner.run_pending_tasks();
                inner.claim_count() == 0
            })
            .await;
            for _ in 0..3 {
                let retry = send(&app, post_with("/big", Some(&key), "{}")).await;
                assert!(
                    retry.status != StatusCode::CREATED || retry.is_replay(),
                    "{key}: {}",
                    retry.status
                );
            }
            assert_eq!(runs.0.load(Ordering::SeqCst), 1, "{key}");
        }
    }
}
