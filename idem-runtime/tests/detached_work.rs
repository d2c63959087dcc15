//! Work that outlives its caller: a client that hangs up mid-handler (or mid-store)
//! never cancels the work; a panic releases the key and propagates; the execution is
//! completed or released exactly once on every path; `shutdown` waits for detached work;
//! the detached work stays in the request's `idem` span. The same for `once`.
//!
//! Synchronisation is by events only (Notify permits, the store gates of `common`,
//! `shutdown` itself, and awaited join handles), never by sleeping.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::post;
use bytes::Bytes;
use common::{Answer, Gated, Gates, post_with, read, send};
use idem_runtime::once::OnceError;
use idem_runtime::store::{BoxFuture, MemoryStore, Store, StoreError};
use idem_runtime::{Idempotency, IdempotencyBuilder, Idempotent, OnceKey, Problem};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tower::ServiceExt;

// ---------------------------------------------------------------------------------------
// A store that counts, per key, the completions and releases idem sends it.
// ---------------------------------------------------------------------------------------

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Calls {
    completes: usize,
    completes_applied: usize,
    releases: usize,
    releases_applied: usize,
}

#[derive(Default)]
struct Ledger(Mutex<HashMap<String, Calls>>);

impl Ledger {
    fn note(&self, key: &str, change: impl FnOnce(&mut Calls)) {
        change(self.0.lock().unwrap().entry(key.to_owned()).or_default());
    }

    /// The calls for the client key `key` (the store's key is `scope-hex:key`).
    fn of(&self, key: &str) -> Calls {
        let suffix = format!(":{key}");
        let map = self.0.lock().unwrap();
        let mut total = Calls::default();
        for (stored, calls) in map.iter() {
            if stored.ends_with(&suffix) {
                total.completes += calls.completes;
                total.completes_applied += calls.completes_applied;
                total.releases += calls.releases;
                total.releases_applied += calls.releases_applied;
            }
        }
        total
    }

    /// The calls for every store key containing `part` (for `once` keys).
    fn containing(&self, part: &str) -> Calls {
        let map = self.0.lock().unwrap();
        let mut total = Calls::default();
        for (stored, calls) in map.iter() {
            if stored.contains(part) {
                total.completes += calls.completes;
                total.completes_applied += calls.completes_applied;
                total.releases += calls.releases;
                total.releases_applied += calls.releases_applied;
            }
        }
        total
    }
}

struct Counting {
    inner: Arc<dyn Store>,
    ledger: Arc<Ledger>,
}

impl Store for Counting {
    fn begin<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        self.inner.begin(key, claim, lease)
    }
    fn renew<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.inner.renew(key, claim, lease)
    }
    fn complete<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        record: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            self.ledger.note(key, |calls| calls.completes += 1);
            let done = self.inner.complete(key, claim, record, ttl).await;
            if matches!(done, Ok(true)) {
                self.ledger.note(key, |calls| calls.completes_applied += 1);
            }
            done
        })
    }
    fn release<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            self.ledger.note(key, |calls| calls.releases += 1);
            let done = self.inner.release(key, claim).await;
            if matches!(done, Ok(true)) {
                self.ledger.note(key, |calls| calls.releases_applied += 1);
            }
            done
        })
    }
}

// ---------------------------------------------------------------------------------------
// Handlers driven by the test through events.
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct Script {
    runs: AtomicUsize,
    finished: AtomicUsize,
    /// A permit each time a held handler starts.
    started: Notify,
    /// While `hold` is set, handlers wait here (one permit lets one through).
    gate: Notify,
    hold: AtomicBool,
    /// A streamed body waits here before its last chunk...
    body_gate: Notify,
    /// ... after saying so here.
    body_waiting: Notify,
    /// Runs per request body (the stress test's keys).
    per_body: Mutex<HashMap<String, usize>>,
}

impl Script {
    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    fn hold(&self, hold: bool) {
        self.hold.store(hold, Ordering::SeqCst);
    }

    /// The start of every handler: counts the run, says it started, waits at the gate
    /// while held, then logs from wherever it now runs.
    async fn enter(&self) -> usize {
        let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        // Only held runs say they started: no stale permit from an earlier free run.
        if self.hold.load(Ordering::SeqCst) {
            self.started.notify_one();
            self.gate.notified().await;
        }
        tracing::info!(target: "detached_work", run = n, "handler resumed");
        n
    }
}

type Shared = Arc<Script>;

async fn ok(idem: Idempotent, State(script): State<Shared>) -> Response {
    idem.run(async move {
        let n = script.enter().await;
        script.finished.fetch_add(1, Ordering::SeqCst);
        (StatusCode::CREATED, format!("run {n}"))
    })
    .await
}

async fn server_error(idem: Idempotent, State(script): State<Shared>) -> Response {
    idem.run(async move {
        let n = script.enter().await;
        script.finished.fetch_add(1, Ordering::SeqCst);
        if n == 1 {
            (StatusCode::INTERNAL_SERVER_ERROR, format!("boom {n}"))
        } else {
            (StatusCode::CREATED, format!("run {n}"))
        }
    })
    .await
}

async fn panics(idem: Idempotent, State(script): State<Shared>) -> Response {
    idem.run(async move {
        let n = script.enter().await;
        assert!(n != 1, "test: the first run panics");
        script.finished.fetch_add(1, Ordering::SeqCst);
        (StatusCode::CREATED, format!("run {n}"))
    })
    .await
}

async fn big(idem: Idempotent, State(script): State<Shared>) -> Response {
    idem.run(async move {
        let n = script.enter().await;
        script.finished.fetch_add(1, Ordering::SeqCst);
        (StatusCode::CREATED, format!("{n}").repeat(4096))
    })
    .await
}

async fn stream(idem: Idempotent, State(script): State<Shared>) -> Response {
    idem.run(async move {
        let n = script.enter().await;
        let body_script = script.clone();
        let chunks = futures_util::stream::unfold(0u8, move |step| {
            let script = body_script.clone();
            async move {
                match step {
                    0 => Some((
                        Ok::<_, std::io::Error>(Bytes::from(format!("stream run {n}: "))),
                        1,
                    )),
                    1 => {
                        script.body_waiting.notify_one();
                        script.body_gate.notified().await;
                        script.finished.fetch_add(1, Ordering::SeqCst);
                        Some((Ok(Bytes::from_static(b"done")), 2))
                    }
                    _ => None,
                }
            }
        });
        (StatusCode::CREATED, Body::from_stream(chunks))
    })
    .await
}

async fn body_panics(idem: Idempotent, State(script): State<Shared>) -> Response {
    idem.run(async move {
        let n = script.enter().await;
        let chunks = futures_util::stream::unfold(0u8, move |step| async move {
            match step {
                0 => Some((Ok::<_, std::io::Error>(Bytes::from_static(b"part ")), 1)),
                1 => {
                    assert!(n != 1, "test: the first run's body panics");
                    Some((Ok(Bytes::from(format!("run {n}"))), 2))
                }
                _ => None,
            }
        });
        (StatusCode::CREATED, Body::from_stream(chunks))
    })
    .await
}

/// Yields a few times (so a hang-up lands anywhere in it) and counts runs per body.
async fn yieldy(idem: Idempotent, State(script): State<Shared>, body: String) -> Response {
    idem.run(async move {
        script.runs.fetch_add(1, Ordering::SeqCst);
        *script
            .per_body
            .lock()
            .unwrap()
            .entry(body.clone())
            .or_default() += 1;
        let turns = body.len() % 5;
        for _ in 0..turns {
            tokio::task::yield_now().await;
        }
        script.finished.fetch_add(1, Ordering::SeqCst);
        (StatusCode::CREATED, format!("ran {body}"))
    })
    .await
}

/// A response with so many header names that a replay could not add its own two.
async fn many_headers(idem: Idempotent, State(script): State<Shared>) -> Response {
    idem.run(async move {
        let n = script.enter().await;
        let text = format!("run {n}");
        let mut headers = axum::http::HeaderMap::new();
        // Given, so that axum adds none to a map already full (it would panic).
        headers.insert(
            axum::http::header::CONTENT_LENGTH,
            axum::http::HeaderValue::from(text.len()),
        );
        let mut i = 0usize;
        while headers.try_reserve(2).is_ok() {
            let name = axum::http::HeaderName::try_from(format!("x-h{i}")).unwrap();
            headers.insert(name, axum::http::HeaderValue::from_static("v"));
            i += 1;
        }
        script.finished.fetch_add(1, Ordering::SeqCst);
        (StatusCode::CREATED, headers, text)
    })
    .await
}

async fn probe(idem: Idempotent) -> Response {
    idem.run(async { StatusCode::OK }).await
}

fn routes(script: Shared) -> Router {
    Router::new()
        .route("/ok", post(ok))
        .route("/error", post(server_error))
        .route("/panic", post(panics))
        .route("/big", post(big))
        .route("/stream", post(stream))
        .route("/body-panic", post(body_panics))
        .route("/yieldy", post(yieldy))
        .route("/many-headers", post(many_headers))
        .route("/probe", post(probe))
        .with_state(script)
}

// ---------------------------------------------------------------------------------------
// Tracing capture: each event with the key of the `idem` span it was emitted in.
// ---------------------------------------------------------------------------------------

mod capture {
    use std::sync::{Mutex, OnceLock};

    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id};
    use tracing::{Event, Subscriber};
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::{Context, SubscriberExt};
    use tracing_subscriber::registry::LookupSpan;

    #[derive(Debug, Clone)]
    pub(crate) struct Seen {
        pub(crate) message: String,
        pub(crate) idem_key: Option<String>,
    }

    static SEEN: Mutex<Vec<Seen>> = Mutex::new(Vec::new());
    static INSTALLED: OnceLock<()> = OnceLock::new();

    struct SpanKey(String);

    #[derive(Default)]
    struct Fields {
        message: Option<String>,
        key: Option<String>,
    }

    impl Visit for Fields {
        fn record_str(&mut self, field: &Field, value: &str) {
            match field.name() {
                "message" => self.message = Some(value.to_owned()),
                "key" => self.key = Some(value.to_owned()),
                _ => {}
            }
        }
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            match field.name() {
                "message" => self.message = Some(format!("{value:?}")),
                "key" => self.key = Some(format!("{value:?}")),
                _ => {}
            }
        }
    }

    struct Capture;

    impl<S> Layer<S> for Capture
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
            if attrs.metadata().name() != "idem" {
                return;
            }
            let mut fields = Fields::default();
            attrs.record(&mut fields);
            if let (Some(span), Some(key)) = (ctx.span(id), fields.key) {
                span.extensions_mut().insert(SpanKey(key));
            }
        }

        fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
            let mut fields = Fields::default();
            event.record(&mut fields);
            let idem_key = ctx.event_scope(event).and_then(|scope| {
                scope
                    .into_iter()
                    .find(|span| span.name() == "idem")
                    .and_then(|span| span.extensions().get::<SpanKey>().map(|k| k.0.clone()))
            });
            SEEN.lock().unwrap().push(Seen {
                message: fields.message.unwrap_or_default(),
                idem_key,
            });
        }
    }

    pub(crate) fn install() {
        INSTALLED.get_or_init(|| {
            let subscriber = tracing_subscriber::registry().with(Capture);
            tracing::subscriber::set_global_default(subscriber).unwrap();
        });
    }

    /// Every event seen so far with `message`.
    pub(crate) fn with_message(message: &str) -> Vec<Seen> {
        SEEN.lock()
            .unwrap()
            .iter()
            .filter(|seen| seen.message == message)
            .cloned()
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// The fixture.
// ---------------------------------------------------------------------------------------

struct Fixture {
    idem: Idempotency,
    app: Router,
    script: Shared,
    gates: Arc<Gates>,
    ledger: Arc<Ledger>,
    probes: AtomicUsize,
}

fn fixture(configure: impl FnOnce(IdempotencyBuilder) -> IdempotencyBuilder) -> Fixture {
    capture::install();
    let memory = MemoryStore::new();
    let gates = Arc::new(Gates::default());
    let ledger = Arc::new(Ledger::default());
    let gated: Arc<dyn Store> = Arc::new(Gated::new(Arc::new(memory), gates.clone()));
    let store = Counting {
        inner: gated,
        ledger: ledger.clone(),
    };
    let idem = configure(common::test_builder(Idempotency::builder().store(store))).build();
    let script = Arc::new(Script::default());
    let app = routes(script.clone()).layer(idem.layer());
    Fixture {
        idem,
        app,
        script,
        gates,
        ledger,
        probes: AtomicUsize::new(0),
    }
}

impl Fixture {
    /// A client sending `request` in a task of its own.
    fn client(&self, request: Request) -> JoinHandle<Answer> {
        let app = self.app.clone();
        tokio::spawn(async move { read(app.oneshot(request).await.expect("infallible")).await })
    }

    /// A keyed request to a fresh key on `/probe`: refused `503 overloaded` while
    /// `max_detached` executions run detached.
    async fn probe(&self) -> Answer {
        let n = self.probes.fetch_add(1, Ordering::SeqCst);
        send(
            &self.app,
            post_with("/probe", Some(&format!("probe-{n}")), ""),
        )
        .await
    }

    /// With `max_detached(1)`: waits (yielding, bounded) until no work runs detached.
    async fn detached_drained(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let answer = self.probe().await;
            if answer.status == StatusCode::OK {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the detached count never came back to 0: the probe still gets {answer:?}"
            );
            tokio::task::yield_now().await;
        }
    }

    async fn shutdown_settles(&self, what: &str) {
        let left = self.idem.shutdown(Duration::from_secs(10)).await;
        assert_eq!(
            left, 0,
            "{what}: shutdown still had {left} under way after 10 s"
        );
    }
}

/// The client hangs up: its request future is dropped (awaited, so it is gone).
async fn hang_up(client: JoinHandle<Answer>) {
    client.abort();
    match client.await {
        Err(error) => assert!(error.is_cancelled(), "the client ended otherwise: {error}"),
        Ok(answer) => panic!("the client got an answer before it hung up: {answer:?}"),
    }
}

fn body(answer: &Answer) -> String {
    String::from_utf8_lossy(&answer.body).into_owned()
}

fn panic_message(error: tokio::task::JoinError) -> String {
    assert!(error.is_panic(), "expected a panic, got: {error}");
    let payload = error.into_panic();
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// Guarantee 1 (and 3): a hang-up never cancels the work.
// ---------------------------------------------------------------------------------------

/// A client hangs up mid-handler: the work runs on detached (counted: the probe is
/// refused with `max_detached(1)`), shutdown waits for it, its response is stored once,
/// and the retry replays it without running the handler again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hang_up_mid_handler_runs_on_detached_and_is_replayed() {
    let f = fixture(|builder| builder.max_detached(1));
    f.script.hold(true);
    let client = f.client(post_with("/ok", Some("mid-handler"), "{}"));
    f.script.started.notified().await;
    hang_up(client).await;

    f.probe()
        .await
        .assert_problem(StatusCode::SERVICE_UNAVAILABLE, Problem::OVERLOADED);
    assert_eq!(
        f.idem.shutdown(Duration::ZERO).await,
        1,
        "shutdown must count the detached execution"
    );
    assert_eq!(f.ledger.of("mid-handler"), Calls::default());

    f.script.gate.notify_one();
    f.shutdown_settles("after the detached handler was let through")
        .await;
    assert_eq!(f.script.finished.load(Ordering::SeqCst), 1);
    assert_eq!(
        f.ledger.of("mid-handler"),
        Calls {
            completes: 1,
            completes_applied: 1,
            releases: 0,
            releases_applied: 0
        },
        "the detached execution is completed exactly once"
    );

    // The detached task uncounts itself just after the work ends.
    f.detached_drained().await;
    f.script.hold(false);
    let retry = send(&f.app, post_with("/ok", Some("mid-handler"), "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert!(retry.is_replay(), "the retry is a replay: {retry:?}");
    assert_eq!(body(&retry), "run 1");
    assert_eq!(f.script.runs(), 1, "the handler ran exactly once");
    f.detached_drained().await;
}

/// The handler has answered and the response is being stored (the store's `complete`
/// held at its gate) when the client hangs up: the store goes on, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hang_up_while_the_response_is_stored_still_stores_it() {
    let f = fixture(|builder| builder.max_detached(1));
    f.gates.complete.close();
    let client = f.client(post_with("/ok", Some("mid-store"), "{}"));
    f.gates.complete.reached.notified().await;
    hang_up(client).await;
    assert_eq!(
        f.idem.shutdown(Duration::ZERO).await,
        1,
        "shutdown must count the execution being stored"
    );
    f.gates.complete.open();
    f.shutdown_settles("after the complete gate opened").await;
    assert_eq!(
        f.ledger.of("mid-store"),
        Calls {
            completes: 1,
            completes_applied: 1,
            releases: 0,
            releases_applied: 0
        }
    );
    // The detached task uncounts itself just after the work ends.
    f.detached_drained().await;
    let retry = send(&f.app, post_with("/ok", Some("mid-store"), "{}")).await;
    assert!(retry.is_replay(), "{retry:?}");
    assert_eq!(body(&retry), "run 1");
    assert_eq!(f.script.runs(), 1);
    f.detached_drained().await;
}

/// The handler answered with a streamed body, and the client hangs up while idem collects
/// it: the collection (part of the work) goes on detached and the whole body is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hang_up_while_a_streamed_body_is_collected_stores_the_whole_body() {
    let f = fixture(|builder| builder.max_detached(1));
    let client = f.client(post_with("/stream", Some("mid-body"), "{}"));
    f.script.body_waiting.notified().await;
    hang_up(client).await;
    f.probe()
        .await
        .assert_problem(StatusCode::SERVICE_UNAVAILABLE, Problem::OVERLOADED);
    f.script.body_gate.notify_one();
    f.shutdown_settles("after the body gate opened").await;
    assert_eq!(
        f.ledger.of("mid-body"),
        Calls {
            completes: 1,
            completes_applied: 1,
            releases: 0,
            releases_applied: 0
        }
    );
    // The detached task uncounts itself just after the work ends.
    f.detached_drained().await;
    let retry = send(&f.app, post_with("/stream", Some("mid-body"), "{}")).await;
    assert!(retry.is_replay(), "{retry:?}");
    assert_eq!(body(&retry), "stream run 1: done");
    assert_eq!(f.script.runs(), 1);
    f.detached_drained().await;
}

// ---------------------------------------------------------------------------------------
// Guarantee 2: a panic releases the key and propagates.
// ---------------------------------------------------------------------------------------

/// A connected client's handler panics: the panic reaches the client's task, the key is
/// released (once) before it does, and the retry runs the handler again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_propagates_and_releases_the_key_once() {
    let f = fixture(|builder| builder.max_detached(1));
    let client = f.client(post_with("/panic", Some("panics"), "{}"));
    let error = client
        .await
        .expect_err("the panic must propagate to the caller");
    let message = panic_message(error);
    assert!(
        message.contains("test: the first run panics"),
        "the handler's own panic propagates, got {message:?}"
    );
    f.shutdown_settles("after the panic").await;
    assert_eq!(
        f.ledger.of("panics"),
        Calls {
            completes: 0,
            completes_applied: 0,
            releases: 1,
            releases_applied: 1
        }
    );
    let retry = send(&f.app, post_with("/panic", Some("panics"), "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert!(!retry.is_replay());
    assert_eq!(body(&retry), "run 2");
    assert_eq!(f.script.runs(), 2);
    // Nothing was detached.
    assert_eq!(f.probe().await.status, StatusCode::OK);
}

/// The client hangs up, then the detached handler panics: the key is released (once)
/// and the retry runs again; the detached count comes back down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_after_hang_up_releases_the_key_once() {
    let f = fixture(|builder| builder.max_detached(1));
    f.script.hold(true);
    let client = f.client(post_with("/panic", Some("detached-panic"), "{}"));
    f.script.started.notified().await;
    hang_up(client).await;
    f.probe()
        .await
        .assert_problem(StatusCode::SERVICE_UNAVAILABLE, Problem::OVERLOADED);
    f.script.gate.notify_one();
    f.shutdown_settles("after the detached panic").await;
    assert_eq!(
        f.ledger.of("detached-panic"),
        Calls {
            completes: 0,
            completes_applied: 0,
            releases: 1,
            releases_applied: 1
        }
    );
    // The detached task uncounts itself just after the work ends.
    f.detached_drained().await;
    f.script.hold(false);
    let retry = send(&f.app, post_with("/panic", Some("detached-panic"), "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert!(!retry.is_replay());
    assert_eq!(body(&retry), "run 2");
    f.detached_drained().await;
}

/// The handler panics and the client hangs up while the key's release is on its way
/// (held at the store's gate): the release still happens, once, shutdown waits for it,
/// and the retry runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hang_up_during_the_release_after_a_panic_still_releases_once() {
    let f = fixture(|builder| builder.max_detached(1));
    f.gates.release.close();
    let client = f.client(post_with("/panic", Some("panic-release"), "{}"));
    f.gates.release.reached.notified().await;
    hang_up(client).await;
    assert_eq!(
        f.idem.shutdown(Duration::ZERO).await,
        1,
        "shutdown must count the release under way"
    );
    f.gates.release.open();
    f.shutdown_settles("after the release gate opened").await;
    assert_eq!(
        f.ledger.of("panic-release"),
        Calls {
            completes: 0,
            completes_applied: 0,
            releases: 1,
            releases_applied: 1
        }
    );
    // The detached task uncounts itself just after the work ends.
    f.detached_drained().await;
    let retry = send(&f.app, post_with("/panic", Some("panic-release"), "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert_eq!(body(&retry), "run 2");
    f.detached_drained().await;
}

/// The response body panics while idem collects it (after the handler returned): a body
/// that failed, as one that errs. The handler ran, so its key is not released: the
/// client is told its response was lost, the retry that it was not stored, and nothing
/// runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_panic_is_a_response_not_stored_never_a_rerun() {
    let f = fixture(|builder| builder.max_detached(1));
    let first = f
        .client(post_with("/body-panic", Some("body-panic"), "{}"))
        .await
        .expect("the panic is caught");
    first.assert_problem(StatusCode::BAD_GATEWAY, Problem::RESPONSE_NOT_STORED);
    f.shutdown_settles("after the body panic").await;
    assert_eq!(
        f.ledger.of("body-panic"),
        Calls {
            completes: 1,
            completes_applied: 1,
            releases: 0,
            releases_applied: 0
        }
    );
    let retry = send(&f.app, post_with("/body-panic", Some("body-panic"), "{}")).await;
    retry.assert_problem(StatusCode::CONFLICT, Problem::RESPONSE_NOT_STORED);
    assert_eq!(f.script.runs(), 1);
    assert_eq!(f.probe().await.status, StatusCode::OK);
}

// ---------------------------------------------------------------------------------------
// Guarantee 3: 5xx and too-large responses, detached or not.
// ---------------------------------------------------------------------------------------

/// The client hangs up, then the detached handler answers 500: the key is released once
/// and the retry runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_error_after_hang_up_releases_the_key_once() {
    let f = fixture(|builder| builder.max_detached(1));
    f.script.hold(true);
    let client = f.client(post_with("/error", Some("detached-500"), "{}"));
    f.script.started.notified().await;
    hang_up(client).await;
    f.script.gate.notify_one();
    f.shutdown_settles("after the detached 500").await;
    assert_eq!(
        f.ledger.of("detached-500"),
        Calls {
            completes: 0,
            completes_applied: 0,
            releases: 1,
            releases_applied: 1
        }
    );
    // The detached task uncounts itself just after the work ends.
    f.detached_drained().await;
    f.script.hold(false);
    let retry = send(&f.app, post_with("/error", Some("detached-500"), "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert!(!retry.is_replay());
    assert_eq!(body(&retry), "run 2");
    f.detached_drained().await;
}

/// A connected client gets its 500; then one hangs up while the release after a 500 is
/// on its way: released once either way, and the retry runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_error_release_survives_a_hang_up_and_happens_once() {
    let f = fixture(|builder| builder.max_detached(1));
    let first = send(&f.app, post_with("/error", Some("connected-500"), "{}")).await;
    assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(body(&first), "boom 1");
    f.shutdown_settles("after the 500").await;
    assert_eq!(
        f.ledger.of("connected-500"),
        Calls {
            completes: 0,
            completes_applied: 0,
            releases: 1,
            releases_applied: 1
        }
    );

    // A fresh script: the next run on /error is run 2, which succeeds; a separate app
    // for the second half, whose first run answers 500.
    let g = fixture(|builder| builder.max_detached(1));
    g.gates.release.close();
    let client = g.client(post_with("/error", Some("release-hang-up"), "{}"));
    g.gates.release.reached.notified().await;
    hang_up(client).await;
    assert_eq!(g.idem.shutdown(Duration::ZERO).await, 1);
    g.gates.release.open();
    g.shutdown_settles("after the release gate opened").await;
    assert_eq!(
        g.ledger.of("release-hang-up"),
        Calls {
            completes: 0,
            completes_applied: 0,
            releases: 1,
            releases_applied: 1
        }
    );
    // The detached task uncounts itself just after the work ends.
    g.detached_drained().await;
    let retry = send(&g.app, post_with("/error", Some("release-hang-up"), "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert_eq!(body(&retry), "run 2");
    g.detached_drained().await;
}

/// Too large to store, connected and detached: the key records "not stored" exactly once,
/// nothing is released, and the retry is told so without running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_response_is_recorded_not_stored_once_connected_or_detached() {
    let f = fixture(|builder| builder.max_detached(1).max_response_bytes(1024));

    let connected = send(&f.app, post_with("/big", Some("big-connected"), "{}")).await;
    assert_eq!(connected.status, StatusCode::CREATED);
    assert_eq!(connected.body.len(), 4096, "the client gets the whole body");
    f.shutdown_settles("after the connected too-large").await;
    assert_eq!(
        f.ledger.of("big-connected"),
        Calls {
            completes: 1,
            completes_applied: 1,
            releases: 0,
            releases_applied: 0
        }
    );
    send(&f.app, post_with("/big", Some("big-connected"), "{}"))
        .await
        .assert_problem(StatusCode::CONFLICT, Problem::RESPONSE_NOT_STORED);

    f.script.hold(true);
    let client = f.client(post_with("/big", Some("big-detached"), "{}"));
    f.script.started.notified().await;
    hang_up(client).await;
    f.script.gate.notify_one();
    f.shutdown_settles("after the detached too-large").await;
    assert_eq!(
        f.ledger.of("big-detached"),
        Calls {
            completes: 1,
            completes_applied: 1,
            releases: 0,
            releases_applied: 0
        }
    );
    // The detached task uncounts itself just after the work ends.
    f.detached_drained().await;
    f.script.hold(false);
    send(&f.app, post_with("/big", Some("big-detached"), "{}"))
        .await
        .assert_problem(StatusCode::CONFLICT, Problem::RESPONSE_NOT_STORED);
    assert_eq!(f.script.runs(), 2, "each key ran once, no retry ran");
    f.detached_drained().await;
}

/// A response with too many header names to replay (the path `store_response` now
/// reaches through its borrow): recorded "not stored" exactly once, connected or
/// detached; nothing released; the retry is told so without running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_header_names_is_recorded_not_stored_once_connected_or_detached() {
    let f = fixture(|builder| builder.max_detached(1));
    let connected = send(
        &f.app,
        post_with("/many-headers", Some("hdr-connected"), "{}"),
    )
    .await;
    assert_eq!(
        connected.status,
        StatusCode::CREATED,
        "{:?}",
        body(&connected)
    );
    assert_eq!(body(&connected), "run 1");
    f.shutdown_settles("after the connected many-headers").await;
    assert_eq!(
        f.ledger.of("hdr-connected"),
        Calls {
            completes: 1,
            completes_applied: 1,
            releases: 0,
            releases_applied: 0
        }
    );
    send(
        &f.app,
        post_with("/many-headers", Some("hdr-connected"), "{}"),
    )
    .await
    .assert_problem(StatusCode::CONFLICT, Problem::RESPONSE_NOT_STORED);

    f.script.hold(true);
    let client = f.client(post_with("/many-headers", Some("hdr-detached"), "{}"));
    f.script.started.notified().await;
    hang_up(client).await;
    f.script.gate.notify_one();
    f.shutdown_settles("after the detached many-headers").await;
    assert_eq!(
        f.ledger.of("hdr-detached"),
        Calls {
            completes: 1,
            completes_applied: 1,
            releases: 0,
            releases_applied: 0
        }
    );
    f.script.hold(false);
    // The detached task uncounts itself just after the work ends.
    f.detached_drained().await;
    send(
        &f.app,
        post_with("/many-headers", Some("hdr-detached"), "{}"),
    )
    .await
    .assert_problem(StatusCode::CONFLICT, Problem::RESPONSE_NOT_STORED);
    assert_eq!(f.script.runs(), 2, "each key ran once, no retry ran");
}

/// Many clients with keys of their own, each hanging up at a different moment (before its
/// claim, during it, mid-handler, or after its answer): afterwards shutdown settles,
/// every key is free or holds its one stored response, and a retry of each either
/// replays (the handler ran once, its response completed exactly once, nothing released)
/// or runs for the first time. No key is stuck in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hang_ups_at_every_moment_leave_every_key_run_at_most_once() {
    const CLIENTS: usize = 300;
    let f = fixture(|builder| builder.max_detached(10_000));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let name = format!("s{i}");
            f.client(post_with("/yieldy", Some(&name), &name))
        })
        .collect();
    let mut answered = vec![false; CLIENTS];
    for (i, client) in clients.into_iter().enumerate() {
        for _ in 0..(i % 11) {
            tokio::task::yield_now().await;
        }
        client.abort();
        match client.await {
            Ok(answer) => {
                assert_eq!(answer.status, StatusCode::CREATED, "s{i}: {answer:?}");
                answered[i] = true;
            }
            Err(error) => assert!(error.is_cancelled(), "s{i}: {error}"),
        }
    }
    f.shutdown_settles("after every client hung up or was answered")
        .await;

    let before: HashMap<String, usize> = f.script.per_body.lock().unwrap().clone();
    let mut detached_and_stored = 0;
    for (i, was_answered) in answered.iter().enumerate() {
        let name = format!("s{i}");
        let ran = before.get(&name).copied().unwrap_or(0);
        let calls = f.ledger.of(&name);
        assert!(ran <= 1, "{name} ran {ran} times before any retry");
        if ran == 1 {
            assert_eq!(
                (calls.completes, calls.completes_applied, calls.releases),
                (1, 1, 0),
                "{name}: a handler that ran must be completed exactly once, not released: {calls:?}"
            );
            if !was_answered {
                detached_and_stored += 1;
            }
        } else {
            assert!(!was_answered, "{name} answered without running");
            assert_eq!(calls.completes, 0, "{name}: {calls:?}");
            assert!(calls.releases <= 1, "{name}: released twice: {calls:?}");
        }
        let retry = send(&f.app, post_with("/yieldy", Some(&name), &name)).await;
        assert_eq!(retry.status, StatusCode::CREATED, "{name}: {retry:?}");
        assert_eq!(body(&retry), format!("ran {name}"));
        assert_eq!(
            retry.is_replay(),
            ran == 1,
            "{name}: ran {ran} before the retry; the retry replayed: {}",
            retry.is_replay()
        );
    }
    let after = f.script.per_body.lock().unwrap().clone();
    for i in 0..CLIENTS {
        let name = format!("s{i}");
        assert_eq!(after.get(&name).copied(), Some(1), "{name} ran once in all");
    }
    eprintln!(
        "hang_ups_at_every_moment: {} answered, {detached_and_stored} ran on detached and were stored, {} never ran before the retry",
        answered.iter().filter(|a| **a).count(),
        CLIENTS - before.len()
    );
}

// ---------------------------------------------------------------------------------------
// `once` also calls `to_the_end`.
// ---------------------------------------------------------------------------------------

/// A `once` caller dropped mid-operation: the operation runs on detached and its value is
/// stored, once; the next call replays it. Then an operation that panics after its
/// caller went away releases its key: the next call runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_caller_dropped_mid_operation_completes_detached() {
    let f = fixture(|builder| builder.max_detached(1));
    let runs = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(Notify::new());
    let gate = Arc::new(Notify::new());

    let call = {
        let (idem, runs, started, gate) =
            (f.idem.clone(), runs.clone(), started.clone(), gate.clone());
        tokio::spawn(async move {
            idem.once(OnceKey::new("detached-once").unwrap(), "input")
                .run(move || async move {
                    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                    started.notify_one();
                    gate.notified().await;
                    Ok::<usize, String>(40 + n)
                })
                .await
        })
    };
    started.notified().await;
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    f.probe()
        .await
        .assert_problem(StatusCode::SERVICE_UNAVAILABLE, Problem::OVERLOADED);
    gate.notify_one();
    f.shutdown_settles("after the detached once operation")
        .await;
    let calls = f.ledger.containing("detached-once");
    assert_eq!(
        (calls.completes, calls.completes_applied, calls.releases),
        (1, 1, 0),
        "{calls:?}"
    );
    // The detached task uncounts itself just after the work ends.
    f.detached_drained().await;
    let again = f
        .idem
        .once(OnceKey::new("detached-once").unwrap(), "input")
        .run_with_outcome({
            let runs = runs.clone();
            move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<usize, String>(0)
            }
        })
        .await
        .unwrap();
    assert!(again.is_replay());
    assert_eq!(again.into_inner(), 41);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    f.detached_drained().await;

    // A panic after the caller went away.
    let call = {
        let (idem, started, gate) = (f.idem.clone(), started.clone(), gate.clone());
        tokio::spawn(async move {
            idem.once(OnceKey::new("detached-once-panic").unwrap(), "input")
                .run(move || async move {
                    started.notify_one();
                    gate.notified().await;
                    if true {
                        panic!("test: the once operation panics");
                    }
                    Ok::<usize, String>(0)
                })
                .await
        })
    };
    started.notified().await;
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    gate.notify_one();
    f.shutdown_settles("after the detached once panic").await;
    let calls = f.ledger.containing("detached-once-panic");
    assert_eq!(
        (calls.completes, calls.releases, calls.releases_applied),
        (0, 1, 1),
        "{calls:?}"
    );
    // The detached task uncounts itself just after the work ends.
    f.detached_drained().await;
    let ran = f
        .idem
        .once(OnceKey::new("detached-once-panic").unwrap(), "input")
        .run_with_outcome(|| async { Ok::<usize, String>(7) })
        .await;
    match ran {
        Ok(outcome) => {
            assert!(!outcome.is_replay(), "the key was released: it runs");
            assert_eq!(outcome.into_inner(), 7);
        }
        Err(OnceError::InFlight) => panic!("the key stayed stuck in flight"),
        Err(other) => panic!("unexpected: {other:?}"),
    }
    f.detached_drained().await;
}

// ---------------------------------------------------------------------------------------
// Guarantee 4: tracing.
// ---------------------------------------------------------------------------------------

/// The handler resumed after its client hung up, and the storing of its response, are
/// both logged inside that request's `idem` span (with its key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_work_runs_in_the_requests_idem_span() {
    let f = fixture(|builder| builder.max_detached(1).log_keys(true));
    f.script.hold(true);
    let client = f.client(post_with("/ok", Some("traced-key"), "{}"));
    f.script.started.notified().await;
    hang_up(client).await;
    f.script.gate.notify_one();
    f.shutdown_settles("after the traced detached handler")
        .await;

    // The handler runs only here, so every "handler resumed" with this key's span is its.
    let resumed: Vec<_> = capture::with_message("handler resumed")
        .into_iter()
        .filter(|seen| seen.idem_key.as_deref() == Some("traced-key"))
        .collect();
    assert_eq!(
        resumed.len(),
        1,
        "the detached handler logs inside the request's idem span (key traced-key); all \"handler resumed\" events: {:?}",
        capture::with_message("handler resumed")
    );
    let stored: Vec<_> = capture::with_message("executed and stored")
        .into_iter()
        .filter(|seen| seen.idem_key.as_deref() == Some("traced-key"))
        .collect();
    assert_eq!(
        stored.len(),
        1,
        "storing the detached response logs inside the request's idem span; all: {:?}",
        capture::with_message("executed and stored")
    );
    let went_away: Vec<_> =
        capture::with_message("the caller went away; the work runs on in a task of its own")
            .into_iter()
            .filter(|seen| seen.idem_key.as_deref() == Some("traced-key"))
            .collect();
    eprintln!(
        "detach event inside the idem span for traced-key: {} (informational)",
        went_away.len()
    );
}

/// A memory store whose lease renewals are refused: the claim is lost while the work
/// runs. Says when the first renewal was asked for.
struct RenewalsRefused {
    inner: MemoryStore,
    renewed: Arc<Notify>,
}

impl Store for RenewalsRefused {
    fn begin<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        self.inner.begin(key, claim, lease)
    }

    fn renew<'a>(
        &'a self,
        _key: &'a str,
        _claim: &'a Bytes,
        _lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.renewed.notify_one();
        Box::pin(std::future::ready(Ok(false)))
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
        self.inner.release(key, claim)
    }
}

/// The lease's renewal logs in the `idem` span of the request whose claim it renews
/// (with its key), as the request's own lines do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_is_logged_in_the_requests_idem_span() {
    capture::install();
    let renewed = Arc::new(Notify::new());
    let store = RenewalsRefused {
        inner: MemoryStore::new(),
        renewed: renewed.clone(),
    };
    let idem = common::test_builder(Idempotency::builder().store(store))
        .lease(Duration::from_millis(300))
        .log_keys(true)
        .build();
    let script = Arc::new(Script::default());
    let app = routes(script.clone()).layer(idem.layer());
    script.hold(true);
    let client = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with("/ok", Some("renewed-key"), "{}")).await }
    });
    script.started.notified().await;
    renewed.notified().await;
    // The refusal is logged by the renewal once its answer is read; the work then ends.
    let lost = "lease lost while the work runs; its result will not be stored";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !capture::with_message(lost)
        .iter()
        .any(|seen| seen.idem_key.as_deref() == Some("renewed-key"))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no \"{lost}\" in the request's idem span; every one seen: {:?}",
            capture::with_message(lost)
        );
        tokio::task::yield_now().await;
    }
    script.gate.notify_one();
    let answer = client.await.unwrap();
    assert_eq!(answer.status, StatusCode::CREATED);
}
