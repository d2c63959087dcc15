//! Regressions of the one-execution promise: each test is a way one key once ran twice or
//! stuck, reproduced with real stores, real servers and real concurrency.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::{FromRequestParts, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::Response;
use axum::routing::post;
use bytes::Bytes;
use common::{Backend, Counters, app, post_with, send, until};
use idem_runtime::store::{BoxFuture, MemoryStore, Store, StoreError};
use idem_runtime::{Idempotency, Idempotent, Problem};
use tokio::sync::Notify;

/// Guards: other keys' traffic never evicts a claim whose handler is still running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_never_evicts_a_running_claim() {
    let store = MemoryStore::with_bounds(8, 1 << 30).unwrap();
    let idem = common::test_builder(Idempotency::builder().store(store.clone())).build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());

    let victim = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with("/gated", Some("victim"), "")).await }
    });
    until(|| counters.runs() == 1).await;
    let probe = send(&app, post_with("/gated", Some("victim"), "")).await;
    probe.assert_problem(StatusCode::CONFLICT, Problem::IN_FLIGHT);
    let others = app_on(&idem);
    for n in 0..16 {
        let other = send(
            &others,
            post_with("/pay", Some(&format!("other-{n}")), "{}"),
        )
        .await;
        assert_eq!(other.status, StatusCode::CREATED);
    }
    store.run_pending_tasks();
    let retry = tokio::time::timeout(
        Duration::from_secs(10),
        send(&app, post_with("/gated", Some("victim"), "")),
    )
    .await
    .expect("the retry is answered at once, not run");
    retry.assert_problem(StatusCode::CONFLICT, Problem::IN_FLIGHT);
    assert_eq!(counters.runs(), 1, "no second run beside the first");
    counters.gate.notify_one();
    assert_eq!(victim.await.unwrap().status, StatusCode::CREATED);
}

/// Another app on the same handle, with counters of its own.
fn app_on(idem: &Idempotency) -> axum::Router {
    app(idem, Arc::new(Counters::default()))
}

/// Guards: at the default bounds, 120,000 other keys leave a live claim in place.
#[tokio::test]
async fn memory_store_keeps_claims_under_a_flood_of_keys() {
    let store = MemoryStore::new();
    let lease = Duration::from_secs(30);
    let claim = Bytes::from_static(b"victim's claim");
    assert_eq!(store.begin("victim", &claim, lease).await.unwrap(), None);
    let other = Bytes::from_static(b"someone else");
    for n in 0..120_000 {
        let key = format!("flood-{n}");
        store.begin(&key, &other, lease).await.unwrap();
        store
            .complete(&key, &other, other.clone(), lease)
            .await
            .unwrap();
    }
    store.run_pending_tasks();
    assert_eq!(
        store.begin("victim", &other, lease).await.unwrap(),
        Some(claim),
        "the live claim is still there"
    );
}

/// Guards: a response the memory store cannot hold is recorded as not stored, never
/// dropped after `complete` reported success (which would run the retry again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_heavier_than_the_memory_bound_is_never_rerun() {
    let store = MemoryStore::with_bounds(100, 4000).unwrap();
    let idem = common::test_builder(Idempotency::builder().store(store.clone())).build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let first = send(&app, post_with("/big", Some("heavy"), "")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(
        first.body.len(),
        4096,
        "the client still gets the whole response"
    );
    store.run_pending_tasks();
    let retry = send(&app, post_with("/big", Some("heavy"), "")).await;
    retry.assert_problem(StatusCode::CONFLICT, Problem::RESPONSE_NOT_STORED);
    assert_eq!(counters.runs(), 1, "the handler did not run again");
}

/// Guards: bounds too small to hold a claim and a record are refused when the store is
/// built, with the minimum in the message.
#[test]
fn memory_bounds_too_small_are_refused() {
    let error = MemoryStore::with_bounds(100, 600).unwrap_err();
    let message = error.to_string();
    assert!(message.contains("600"), "{message}");
    assert!(
        message.contains(&idem_runtime::store::MemoryStore::MIN_BYTES.to_string()),
        "{message}"
    );
    assert!(MemoryStore::with_bounds(0, 1 << 20).is_err());
    assert!(MemoryStore::with_bounds(1, idem_runtime::store::MemoryStore::MIN_BYTES).is_ok());
}

/// An extractor that waits on a gate before the handler runs: a slow authentication call.
struct SlowAuth;

struct AuthGate {
    entered: AtomicUsize,
    open: Notify,
    counters: Arc<Counters>,
}

impl FromRequestParts<Arc<AuthGate>> for SlowAuth {
    type Rejection = StatusCode;

    async fn from_request_parts(_: &mut Parts, gate: &Arc<AuthGate>) -> Result<Self, StatusCode> {
        if gate.entered.fetch_add(1, Ordering::SeqCst) == 0 {
            gate.open.notified().await;
        }
        Ok(Self)
    }
}

async fn charge(idem: Idempotent, _auth: SlowAuth, State(gate): State<Arc<AuthGate>>) -> Response {
    idem.run(async move {
        let n = gate.counters.runs.fetch_add(1, Ordering::SeqCst) + 1;
        (StatusCode::CREATED, format!("charge {n}"))
    })
    .await
}

/// Guards: extractors hold nothing: a request still in a slow extractor has claimed no
/// key, so a retry that overtakes it runs once, and the slow request, once through, gets
/// the replay instead of a second run.
async fn slow_extractors_never_run_a_key_twice(backend: Backend) {
    let idem = backend
        .builder()
        .await
        .lease(Duration::from_millis(300))
        .build();
    let gate = Arc::new(AuthGate {
        entered: AtomicUsize::new(0),
        open: Notify::new(),
        counters: Arc::new(Counters::default()),
    });
    let app = axum::Router::new()
        .route("/charge", post(charge))
        .with_state(gate.clone())
        .layer(idem.layer());
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with("/charge", Some("slow-auth"), "")).await }
    });
    until(|| gate.entered.load(Ordering::SeqCst) == 1).await;
    // Leases pass while the first request is still in its extractors.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let overtaking = send(&app, post_with("/charge", Some("slow-auth"), "")).await;
    assert_eq!(overtaking.status, StatusCode::CREATED);
    assert_eq!(overtaking.body, "charge 1");
    gate.open.notify_one();
    let first = first.await.unwrap();
    assert!(first.is_replay(), "the slow request gets the replay");
    assert_eq!(first.body, "charge 1");
    assert_eq!(gate.counters.runs(), 1, "the handler ran once");
}

on_both_stores!(slow_extractors_never_run_a_key_twice);

/// A store whose `begin` is applied twice, as a client library that re-sends a command
/// whose reply was lost does.
struct SendsBeginTwice(Arc<dyn Store>);

impl Store for SendsBeginTwice {
    fn begin<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        Box::pin(async move {
            self.0.begin(key, claim, lease).await?;
            self.0.begin(key, claim, lease).await
        })
    }
    fn renew<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            self.0.renew(key, claim, lease).await?;
            self.0.renew(key, claim, lease).await
        })
    }
    fn complete<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        record: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            self.0.complete(key, claim, record.clone(), ttl).await?;
            self.0.complete(key, claim, record, ttl).await
        })
    }
    fn release<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            self.0.release(key, claim).await?;
            self.0.release(key, claim).await
        })
    }
}

/// Guards: every step applied twice (a re-sent command) acts as if applied once: the
/// request's own claim is its own, a repeated completion still counts as stored.
async fn steps_applied_twice_act_once(backend: Backend) {
    let inner = backend.builder().await.build();
    let store: Arc<dyn Store> = Arc::new(SendsBeginTwice(inner.store().clone()));
    let idem = common::test_builder(Idempotency::builder().shared_store(store.clone()))
        .lease(Duration::from_millis(300))
        .local_tier(1 << 20, Duration::from_secs(60))
        .build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());

    let first = send(&app, post_with("/slow", Some("twice"), "500")).await;
    assert_eq!(first.status, StatusCode::CREATED, "{:?}", first.body);
    let retry = send(&app, post_with("/slow", Some("twice"), "500")).await;
    assert!(retry.is_replay());
    assert_eq!(retry.body, first.body);
    assert_eq!(counters.runs(), 1);

    // A completion applied twice is stored (the retry above was answered from it).
    store
        .begin("k2", &Bytes::from_static(b"claim"), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        store
            .complete(
                "k2",
                &Bytes::from_static(b"claim"),
                Bytes::from_static(b"record"),
                Duration::from_secs(5)
            )
            .await
            .unwrap(),
        "a completion applied twice reports success"
    );
}

on_both_stores!(steps_applied_twice_act_once);
