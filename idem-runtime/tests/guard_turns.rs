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
use axum::response::Response;
use axum::routing::post;
use common::{Gated, Gates, post_with, send};
use idem_runtime::store::MemoryStore;
use idem_runtime::{Idempotency, Idempotent, idempotent};

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
/// work passes its work through under the key the outer guard holds (it was answered
/// 409, and that 409 stored as the key's response).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_run_in_a_task_spawned_from_the_work_runs_it() {
    let idem = Idempotency::builder().shared_scope(true).build();
    let runs = Runs::default();
    let app = app(&idem, &runs);
    let first = send(&app, post_with("/inner_spawned", Some("spawned-1"), "{}")).await;
    let retry = send(&app, post_with("/inner_spawned", Some("spawned-1"), "{}")).await;
    assert!(
        first.status == StatusCode::CREATED && runs.0.load(Ordering::SeqCst) == 1,
        "first answered {} {:?}; the work ran {} times; the retry answered {} (replay: {}) {:?}",
        first.status,
        String::from_utf8_lossy(&first.body),
        runs.0.load(Ordering::SeqCst),
        retry.status,
        retry.is_replay(),
        String::from_utf8_lossy(&retry.body),
    );
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
