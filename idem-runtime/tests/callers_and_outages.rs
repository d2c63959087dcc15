//! Callers that go away and stores that fail: a request dropped at any point, a panic
//! beside the work, a response with a loose size hint, a store outage. Each test states the
//! promise it guards and the defect it once showed.

#![allow(clippy::unwrap_used)]

mod common;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::post;
use bytes::Bytes;
use common::{Counters, NoRenewals, SlowAnswers, eventually, post_with, send, test_builder};
use http_body::{Frame, SizeHint};
use idem_runtime::store::{BoxFuture, MemoryStore, Store, StoreError};
use idem_runtime::{Idempotency, Idempotent, Problem};
use tokio::sync::Notify;

// ---------------------------------------------------------------------------------------
// 1. A caller dropped while `begin` releases a claim it found too slow to hold leaves the
//    key held for a whole lease, with nothing running it.
// ---------------------------------------------------------------------------------------

/// A store in front of a memory store: `begin` and `renew` are applied at once but
/// answered late (a slow network); `release` waits a little before it reaches the store
/// (a connection to check out of a pool, a reconnecting client), and says when it starts.
struct SlowStore {
    inner: MemoryStore,
    answer_delay: Duration,
    release_delay: Duration,
    release_started: Arc<Notify>,
    releases_applied: Arc<AtomicUsize>,
}

impl Store for SlowStore {
    fn begin<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        Box::pin(async move {
            let found = self.inner.begin(key, claim, lease).await;
            tokio::time::sleep(self.answer_delay).await;
            found
        })
    }
    fn renew<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let renewed = self.inner.renew(key, claim, lease).await;
            tokio::time::sleep(self.answer_delay).await;
            renewed
        })
    }
    fn complete<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        record: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.inner.complete(key, claim, record, ttl)
    }
    fn release<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            self.release_started.notify_one();
            tokio::time::sleep(self.release_delay).await;
            let released = self.inner.release(key, claim).await;
            self.releases_applied.fetch_add(1, Ordering::SeqCst);
            released
        })
    }
}

/// Guards: a request dropped at any point never leaves its key claimed with nothing
/// running it ("a client that hangs up ... releases the claim, so its retry runs instead
/// of getting 409 for a whole lease").
///
/// `begin` whose answer took half the lease confirms the claim with a renewal; when that
/// renewal is slow too it releases the claim and answers 503. If the client gives up
/// during that release (likely: the store is slow), the release is dropped half way; the
/// execution must stay armed until it is done, so that `Drop` releases again (it once
/// disarmed first, and the key answered 409 until the lease ran out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_dropped_while_begin_releases_never_sticks_the_key() {
    let memory = MemoryStore::new();
    let release_started = Arc::new(Notify::new());
    let releases_applied = Arc::new(AtomicUsize::new(0));
    let lease = Duration::from_secs(4);
    let slow = test_builder(Idempotency::builder().store(SlowStore {
        inner: memory.clone(),
        // At least half the lease: the claim is confirmed, and the confirmation is too slow.
        answer_delay: Duration::from_millis(2100),
        release_delay: Duration::from_millis(50),
        release_started: release_started.clone(),
        releases_applied: releases_applied.clone(),
    }))
    .lease(lease)
    .store_timeout(Duration::from_secs(10))
    .build();
    // A second instance on the same store, answering at once: the client's retry.
    let fast = test_builder(Idempotency::builder().store(memory.clone()))
        .lease(lease)
        .build();
    let counters = Arc::new(Counters::default());
    let slow_app = common::app(&slow, counters.clone());
    let fast_app = common::app(&fast, counters.clone());

    let request = send(&slow_app, post_with("/pay", Some("slow-store"), "{}"));
    tokio::select! {
        answer = request => panic!("expected the client to give up first, got {answer:?}"),
        () = release_started.notified() => {} // the request future is dropped here
    }
    assert_eq!(counters.runs(), 0, "nothing ran the key");

    // The key is not used by anything: a retry should run well within the lease.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1200);
    let mut last = None;
    while tokio::time::Instant::now() < deadline {
        let retry = send(&fast_app, post_with("/pay", Some("slow-store"), "{}")).await;
        if retry.status != StatusCode::CONFLICT {
            last = Some(retry);
            break;
        }
        last = Some(retry);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let last = last.unwrap();
    assert_eq!(
        last.status,
        StatusCode::CREATED,
        "1.2 s after the client left, with nothing running the key, the retry still gets {} ({} releases applied, {} claims held): the claim stays until its lease runs out",
        last.status,
        releases_applied.load(Ordering::SeqCst),
        memory.claim_count(),
    );
}

// ---------------------------------------------------------------------------------------
// 2. A panic elsewhere in the caller's task cancels the work holding the key, and the key
//    is released: the retry runs the handler a second time.
// ---------------------------------------------------------------------------------------

static AUDIT_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The idempotent work runs beside another future in the same task (`join!`); that other
/// future panics while the work waits on the gate.
async fn beside_a_panic(idem: Idempotent, State(counters): State<Arc<Counters>>) -> Response {
    let work = {
        let counters = counters.clone();
        async move {
            let n = counters.runs.fetch_add(1, Ordering::SeqCst) + 1;
            // Side effects happen here (the card is charged) ...
            counters.gate.notified().await;
            counters.finished.fetch_add(1, Ordering::SeqCst);
            (StatusCode::CREATED, format!("run {n}"))
        }
    };
    let audit = async {
        while counters.runs() == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Only the first request's audit fails.
        if !AUDIT_FAILED.swap(true, Ordering::SeqCst) {
            panic!("an unrelated failure beside the idempotent work");
        }
    };
    let (response, ()) = tokio::join!(idem.run(work), audit);
    response
}

/// Guards: the work holding a key is never cancelled by its caller going away: "a
/// caller that goes away ... never cancels work that holds a key; the rest of it moves to
/// a task of its own" (protocol/detach.rs), and a retry gets the stored response.
///
/// Only work that itself panicked may be dropped unfinished. (Once, any unwinding thread
/// skipped detaching, the *caller's* own panic included: the work was dropped half way,
/// the key released, and the retry ran the handler again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_beside_the_work_never_cancels_it() {
    let idem = test_builder(Idempotency::builder()).build();
    let counters = Arc::new(Counters::default());
    let app = axum::Router::new()
        .route("/joined", post(beside_a_panic))
        .with_state(counters.clone())
        .layer(idem.layer());

    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with("/joined", Some("beside"), "")).await }
    })
    .await;
    assert!(first.unwrap_err().is_panic(), "the caller's task panicked");
    assert_eq!(counters.runs(), 1, "the work had started");

    // The work should go on in a task of its own: let it finish.
    counters.gate.notify_one();
    let finished = eventually(Duration::from_secs(2), || counters.finished() == 1).await;

    let retry = send(&app, post_with("/joined", Some("beside"), "")).await;
    assert!(
        finished && retry.is_replay() && counters.runs() == 1,
        "work holding the key was cancelled by a panic outside it (finished: {finished}); the retry answered {} {:?} and the handler ran {} times",
        retry.status,
        String::from_utf8_lossy(&retry.body),
        counters.runs(),
    );
}

// ---------------------------------------------------------------------------------------
// 3. A response body whose size hint has a large upper bound panics the library once it is
//    over the response limit.
// ---------------------------------------------------------------------------------------

/// A response body of one 2 KiB chunk that announces no useful upper bound (as
/// `http_body_util::Limited::new(body, usize::MAX)` does over a stream).
struct Unbounded {
    sent: bool,
}

impl http_body::Body for Unbounded {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.sent {
            return Poll::Ready(None);
        }
        self.sent = true;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; 2048])))))
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = SizeHint::new();
        hint.set_upper(u64::MAX);
        hint
    }
}

async fn unbounded(idem: Idempotent) -> Response {
    idem.run(async move { Response::new(Body::new(Unbounded { sent: false })) })
        .await
}

/// Guards: idem never panics on a request or a response it handles.
///
/// A response over `max_response_bytes` is handed on as a `PrefixedBody`, whose
/// `size_hint` adds the bytes already read to the rest's upper bound: it once did so
/// without checking (`u64::MAX + 2048` overflowed), and hyper asks every response for its
/// size hint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_response_with_a_loose_size_hint_is_handed_on() {
    let idem = test_builder(Idempotency::builder())
        .max_response_bytes(1024)
        .build();
    let app = axum::Router::new()
        .route("/unbounded", post(unbounded))
        .layer(idem.layer());
    let hint = tokio::spawn(async move {
        let response = common::send_response(&app, post_with("/unbounded", Some("u"), "")).await;
        // What hyper does before it writes the response head.
        http_body::Body::size_hint(response.body()).upper()
    })
    .await;
    assert!(
        hint.is_ok(),
        "reading the size hint of an oversized response panicked: {:?}",
        hint.unwrap_err()
    );
}

// ---------------------------------------------------------------------------------------
// 4. While the store is down, every refused request leaves a background task behind for a
//    whole lease.
// ---------------------------------------------------------------------------------------

/// A store that is down: every step fails at once (connection refused).
struct Down {
    calls: Arc<AtomicUsize>,
}

impl Store for Down {
    fn begin<'a>(
        &'a self,
        _: &'a str,
        _: &'a Bytes,
        _: Duration,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Err(StoreError::backend("connection refused")) })
    }
    fn renew<'a>(
        &'a self,
        _: &'a str,
        _: &'a Bytes,
        _: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Err(StoreError::backend("connection refused")) })
    }
    fn complete<'a>(
        &'a self,
        _: &'a str,
        _: &'a Bytes,
        _: Bytes,
        _: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Err(StoreError::backend("connection refused")) })
    }
    fn release<'a>(&'a self, _: &'a str, _: &'a Bytes) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Err(StoreError::backend("connection refused")) })
    }
}

/// Guards: memory stays bounded; a store outage answers 503 and runs nothing.
///
/// Each refused `begin` drops its armed `Execution`, whose `Drop` releases once. That
/// release once spawned a retry loop living until `started + lease` when it failed too, so
/// every request answered 503 during an outage left a task behind for a whole lease,
/// polling the dead store: tasks grew with outage length times request rate, and the
/// store met a retry storm when it came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_leaves_no_task_per_refused_request() {
    let calls = Arc::new(AtomicUsize::new(0));
    let idem = test_builder(Idempotency::builder().store(Down {
        calls: calls.clone(),
    }))
    .lease(Duration::from_secs(600))
    .build();
    let counters = Arc::new(Counters::default());
    let app = common::app(&idem, counters.clone());
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();

    let refused = 2000;
    for n in 0..refused {
        let answer = send(&app, post_with("/pay", Some(&format!("outage-{n}")), "{}")).await;
        answer.assert_problem(StatusCode::SERVICE_UNAVAILABLE, Problem::STORE_UNAVAILABLE);
    }
    assert_eq!(counters.runs(), 0);
    // Let every spawned release run its first attempt.
    let settled = eventually(Duration::from_secs(2), || {
        calls.load(Ordering::SeqCst) >= 3 * refused
    })
    .await;
    let alive = metrics.num_alive_tasks() - before;
    assert!(
        alive < 100,
        "{refused} requests refused with 503 while the store was down left {alive} tasks alive, each retrying its release for the 600 s lease (settled: {settled}, store calls so far: {})",
        calls.load(Ordering::SeqCst)
    );
}

// ---------------------------------------------------------------------------------------
// 4. A slow claim whose confirmation fails.
// ---------------------------------------------------------------------------------------

/// Guards: a claim answered after half its lease is confirmed before anything runs; when
/// the store fails that confirmation, the request is answered as a store failure (`503`
/// with `Retry-After`, counted as a store error), not as a key in flight (`409`), and in
/// fail-open mode too nothing runs; the key is released, so the retry runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_claim_the_store_fails_to_confirm_is_a_store_failure() {
    for fail_open in [false, true] {
        let memory = MemoryStore::new();
        // `begin` answered late (applied at once), `renew` failing.
        let unconfirmed = SlowAnswers::new(
            Arc::new(NoRenewals(memory.clone())),
            Duration::from_millis(300),
        );
        let idem = test_builder(Idempotency::builder().store(unconfirmed))
            .lease(Duration::from_millis(400))
            .fail_open(fail_open)
            .build();
        let counters = Arc::new(Counters::default());
        let app = common::app(&idem, counters.clone());
        let answer = send(&app, post_with("/pay", Some("unconfirmed"), "{}")).await;
        answer.assert_problem(StatusCode::SERVICE_UNAVAILABLE, Problem::STORE_UNAVAILABLE);
        assert_eq!(counters.runs(), 0, "fail_open({fail_open})");
        // Released (by a task of its own): then the retry, on an instance whose store
        // answers at once, runs.
        assert!(
            eventually(Duration::from_secs(5), || memory.claim_count() == 0).await,
            "the claim was released"
        );
        let direct = test_builder(Idempotency::builder().store(memory)).build();
        let retry = send(
            &common::app(&direct, counters.clone()),
            post_with("/pay", Some("unconfirmed"), "{}"),
        )
        .await;
        assert_eq!(retry.status, StatusCode::CREATED, "fail_open({fail_open})");
    }
}
