//! the `idem_executions_in_flight` and `idem_executions_detached` gauges. A test
//! binary of its own, with a tiny global recorder; its tests run one at a time.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::Response;
use common::{Backend, Counters, app, post_with, send, until};
use idem_runtime::Idempotency;
use idem_runtime::store::MemoryStore;
use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};

/// A gauge that keeps the last value set.
#[derive(Default)]
struct Cell(AtomicU64);

impl GaugeFn for Cell {
    fn increment(&self, value: f64) {
        let _ = self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |old| {
                Some((f64::from_bits(old) + value).to_bits())
            });
    }

    fn decrement(&self, value: f64) {
        self.increment(-value);
    }

    fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::SeqCst);
    }
}

/// A counter.
#[derive(Default)]
struct Count(AtomicU64);

impl CounterFn for Count {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::SeqCst);
    }

    fn absolute(&self, value: u64) {
        self.0.fetch_max(value, Ordering::SeqCst);
    }
}

/// A histogram that counts what it records.
#[derive(Default)]
struct Recorded(AtomicU64);

impl HistogramFn for Recorded {
    fn record(&self, _: f64) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Keeps every gauge by name, and every counter and histogram by name and labels, as a
/// real exporter's registry does.
#[derive(Default)]
struct TestRecorder {
    gauges: Mutex<HashMap<String, Arc<Cell>>>,
    counters: Mutex<HashMap<String, Arc<Count>>>,
    histograms: Mutex<HashMap<String, Arc<Recorded>>>,
}

/// `name{label=value,...}`.
fn series(key: &Key) -> String {
    let labels: Vec<String> = key
        .labels()
        .map(|label| format!("{}={}", label.key(), label.value()))
        .collect();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

impl TestRecorder {
    fn counter(&self, series: &str) -> u64 {
        self.counters
            .lock()
            .unwrap()
            .get(series)
            .map_or(0, |count| count.0.load(Ordering::SeqCst))
    }

    fn recorded(&self, series: &str) -> u64 {
        self.histograms
            .lock()
            .unwrap()
            .get(series)
            .map_or(0, |recorded| recorded.0.load(Ordering::SeqCst))
    }

    fn gauge(&self, name: &str) -> f64 {
        self.gauges
            .lock()
            .unwrap()
            .get(name)
            .map_or(0.0, |cell| f64::from_bits(cell.0.load(Ordering::SeqCst)))
    }
}

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let count = self
            .counters
            .lock()
            .unwrap()
            .entry(series(key))
            .or_default()
            .clone();
        Counter::from_arc(count)
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        let cell = self
            .gauges
            .lock()
            .unwrap()
            .entry(key.name().to_owned())
            .or_default()
            .clone();
        Gauge::from_arc(cell)
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let recorded = self
            .histograms
            .lock()
            .unwrap()
            .entry(series(key))
            .or_default()
            .clone();
        Histogram::from_arc(recorded)
    }
}

fn recorder() -> &'static TestRecorder {
    static RECORDER: OnceLock<&'static TestRecorder> = OnceLock::new();
    RECORDER.get_or_init(|| {
        let recorder: &'static TestRecorder = Box::leak(Box::default());
        metrics::set_global_recorder(recorder).unwrap();
        recorder
    })
}

/// The tests of this binary share the global recorder: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Guards: `idem_executions_in_flight` is "executions holding a key in this process"
/// (README). With two handles in one process (say one per store, or one for `once` jobs
/// and one for HTTP), an execution of the first still holding its key counts 1.
///
/// Before the fix: every handle sets the process-wide gauge to its *own* count, so the second
/// handle finishing a request sets it to 0 while the first handle's execution still
/// holds its key (and a dashboard or a drain script reading the gauge sees no work).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_gauge_counts_every_handle_of_the_process() {
    let _serial = SERIAL.lock().await;
    let recorder = recorder();

    let first = Backend::memory().builder().await.build();
    let second = Backend::memory().builder().await.build();
    let first_counters = Arc::new(Counters::default());
    let first_app = app(&first, first_counters.clone());
    let second_app = app(&second, Arc::new(Counters::default()));

    // An execution of the first handle holds its key, waiting on its gate.
    let running = tokio::spawn({
        let first_app = first_app.clone();
        async move { send(&first_app, post_with("/gated", Some("held"), "")).await }
    });
    until(|| first_counters.runs() == 1).await;
    assert_eq!(recorder.gauge("idem_executions_in_flight"), 1.0);

    // The second handle runs one request to its end.
    let other = send(&second_app, post_with("/pay", Some("other"), "{}")).await;
    assert_eq!(other.status, StatusCode::CREATED);

    let shown = recorder.gauge("idem_executions_in_flight");
    first_counters.gate.notify_one();
    assert_eq!(running.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(
        shown, 1.0,
        "idem_executions_in_flight read {shown} while an execution of another handle still \
         held its key"
    );
}

/// Guards: `idem_executions_detached` is the number of executions running on after
/// their client hung up, and returns to 0 once none does.
///
/// Before the fix: `Detaching::drop` and `Counted::drop` change the count (`fetch_add` /
/// `fetch_sub`) and then set the gauge to the value they read, unsynchronised: two
/// executions detaching (or ending) at once on two worker threads set their values in
/// either order, so the gauge misses some (seen: 62 with 64 detached). The same race on
/// the way down can leave it above 0 for good with nothing detached. Run in rounds of
/// many clients hanging up at once (it shows within a few hundred rounds, a few seconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_gauge_matches_the_detached_work() {
    let _serial = SERIAL.lock().await;
    let recorder = recorder();
    const ROUNDS: usize = 1000;
    const REQUESTS: usize = 64;
    for round in 0..ROUNDS {
        let idem = Backend::memory()
            .builder()
            .await
            .max_detached(10_000)
            .build();
        let counters = Arc::new(Counters::default());
        let router = app(&idem, counters.clone());
        let clients: Vec<_> = (0..REQUESTS)
            .map(|n| {
                let router = router.clone();
                tokio::spawn(async move {
                    send(
                        &router,
                        post_with("/gated", Some(&format!("r{round}-{n}")), ""),
                    )
                    .await
                })
            })
            .collect();
        until(|| counters.runs() == REQUESTS).await;
        // Every client hangs up at once: the executions move to tasks of their own.
        for client in &clients {
            client.abort();
        }
        for client in clients {
            let _ = client.await;
        }
        let detached = recorder.gauge("idem_executions_detached");
        // Released at once, they end together on both worker threads.
        counters.gate.notify_waiters();
        until(|| counters.finished() == REQUESTS).await;
        assert_eq!(idem.shutdown(Duration::from_secs(5)).await, 0);
        let settled = common::eventually(Duration::from_secs(1), || {
            recorder.gauge("idem_executions_detached") == 0.0
        })
        .await;
        assert!(
            settled,
            "round {round}: idem_executions_detached stuck at {} with no detached work left",
            recorder.gauge("idem_executions_detached")
        );
        assert_eq!(
            detached, REQUESTS as f64,
            "round {round}: idem_executions_detached read {detached} with {REQUESTS} executions \
             detached from their hung-up clients"
        );
    }
}

/// Guards: `idem_requests_total{outcome}` says how idem answered: a key reused with a
/// different request (`422`) counts under `outcome="key_reused"`, and `local_hit` counts
/// "replayed from the local tier" (README).
///
/// Before the fix: with the local tier on, a reused key whose first response sits in the local
/// tier is refused from there (`Begun::Local(Answer::KeyReused)`) and counted as
/// `local_hit`: the dashboard shows a replay, and no `key_reused`, for a `422`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_reused_refused_from_the_local_tier_counts_as_key_reused() {
    let _serial = SERIAL.lock().await;
    let recorder = recorder();
    let idem = Backend::memory()
        .builder()
        .await
        .local_tier(1 << 20, Duration::from_secs(60))
        .build();
    let router = app(&idem, Arc::new(Counters::default()));
    let reused = "idem_requests_total{outcome=key_reused}";
    let local = "idem_requests_total{outcome=local_hit}";
    let (reused_before, local_before) = (recorder.counter(reused), recorder.counter(local));

    let first = send(
        &router,
        post_with("/pay", Some("lt-reuse"), r#"{"amount":1}"#),
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED);
    // Read from the store, the record is copied to the local tier.
    let replay = send(
        &router,
        post_with("/pay", Some("lt-reuse"), r#"{"amount":1}"#),
    )
    .await;
    assert!(replay.is_replay());
    let other = send(
        &router,
        post_with("/pay", Some("lt-reuse"), r#"{"amount":999}"#),
    )
    .await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);

    let counted = (
        recorder.counter(reused) - reused_before,
        recorder.counter(local) - local_before,
    );
    assert_eq!(
        counted,
        (1, 0),
        "(key_reused, local_hit) counted for one 422 answered from the local tier"
    );
}

#[idem_runtime::idempotent]
async fn without_scoped_key(body: String) -> String {
    body
}

/// A handler that looks at its `ScopedKey` and goes on whatever it found.
async fn looks_at_its_key(
    key: Result<idem_runtime::ScopedKey, axum::response::Response>,
    guard: idem_runtime::Idempotent,
) -> axum::response::Response {
    let _found = key.is_ok();
    guard.run(async { (StatusCode::CREATED, "ran") }).await
}

/// Guards: a keyed request without an identity that the guard refuses (in `run`, after
/// the handler's extractors) counts once under `outcome="no_scope"`, as the guard is
/// extracted; a `ScopedKey` taken as a `Result` beside it counts nothing of its own, so a
/// request is never counted twice, nor counted as refused when it ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_without_an_identity_counts_as_no_scope() {
    let _serial = SERIAL.lock().await;
    let recorder = recorder();
    let idem = Idempotency::in_memory();
    let router = axum::Router::new()
        .route("/plain", axum::routing::post(without_scoped_key))
        .route("/looks", axum::routing::post(looks_at_its_key))
        .layer(idem.layer());
    let no_scope = "idem_requests_total{outcome=no_scope}";
    for path in ["/plain", "/looks"] {
        let before = recorder.counter(no_scope);
        let answer = send(&router, post_with(path, Some("anonymous"), "{}")).await;
        answer.assert_problem(
            StatusCode::BAD_REQUEST,
            idem_runtime::Problem::SCOPE_MISSING,
        );
        assert_eq!(
            recorder.counter(no_scope) - before,
            1,
            "{path}: counted once"
        );
    }
    let bad_key = "idem_requests_total{outcome=bad_key}";
    let before = recorder.counter(bad_key);
    let ran = send(&router, post_with("/looks", None, "{}")).await;
    assert_eq!(ran.status, StatusCode::CREATED);
    assert_eq!(
        recorder.counter(bad_key) - before,
        0,
        "a request without a key that ran is not counted as refused"
    );
}

/// A handler whose only idem argument is its `ScopedKey`.
async fn only_its_key(key: idem_runtime::ScopedKey) -> String {
    key.to_string()
}

/// The app's authentication, taken after the guard: refuses a request without `x-user`.
struct SignedIn;

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for SignedIn {
    type Rejection = StatusCode;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, StatusCode> {
        if parts.headers.contains_key("x-user") {
            Ok(Self)
        } else {
            Err(StatusCode::UNAUTHORIZED)
        }
    }
}

/// A guard before the app's authentication.
async fn guard_then_sign_in(guard: idem_runtime::Idempotent, _user: SignedIn) -> Response {
    guard.run(async { (StatusCode::CREATED, "ran") }).await
}

/// Guards: a refusal counts once, when it is the answer. A handler that takes only
/// `ScopedKey` counts its refusals (`bad_key` for a missing or malformed key, `no_scope`
/// without an identity); a request that the app's authentication refuses with `401`
/// after the guard counts nothing as refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_counts_when_it_is_the_answer() {
    let _serial = SERIAL.lock().await;
    let recorder = recorder();
    let idem = Idempotency::in_memory();
    let router = axum::Router::new()
        .route("/key", axum::routing::post(only_its_key))
        .route("/signed", axum::routing::post(guard_then_sign_in))
        .layer(idem.layer());
    let no_scope = "idem_requests_total{outcome=no_scope}";
    let bad_key = "idem_requests_total{outcome=bad_key}";
    let counts = || (recorder.counter(no_scope), recorder.counter(bad_key));

    let too_long = "k".repeat(idem_runtime::IdempotencyKey::MAX_LEN + 1);
    let cases = [
        (
            Some("anonymous"),
            idem_runtime::Problem::SCOPE_MISSING,
            (1, 0),
        ),
        (
            Some(too_long.as_str()),
            idem_runtime::Problem::KEY_INVALID,
            (0, 1),
        ),
        (None, idem_runtime::Problem::KEY_MISSING, (0, 1)),
    ];
    for (key, problem, counted) in cases {
        let before = counts();
        let answer = send(&router, post_with("/key", key, "{}")).await;
        answer.assert_problem(StatusCode::BAD_REQUEST, problem);
        let after = counts();
        assert_eq!(
            (after.0 - before.0, after.1 - before.1),
            counted,
            "/key with {key:?}: (no_scope, bad_key) counted"
        );
    }

    let before = counts();
    let answer = send(&router, post_with("/signed", Some("anonymous"), "{}")).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        counts(),
        before,
        "a request the app's authentication refused is not counted as refused by idem"
    );
    let mut signed_in = post_with("/signed", Some("anonymous"), "{}");
    signed_in
        .headers_mut()
        .insert("x-user", axum::http::HeaderValue::from_static("ada"));
    let answer = send(&router, signed_in).await;
    answer.assert_problem(
        StatusCode::BAD_REQUEST,
        idem_runtime::Problem::SCOPE_MISSING,
    );
    let after = counts();
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (1, 0),
        "a signed-in request without an identity idem can scope by counts as no_scope once"
    );
}

/// Guards: `idem_store_seconds{step}` times every store step (README, metrics), on the
/// memory store too, whose steps idem calls directly rather than through a future: a first
/// execution's claim and completion, a replay's lookup, a server error's release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_stores_steps_are_timed() {
    let _serial = SERIAL.lock().await;
    let recorder = recorder();
    let by_default = Idempotency::builder().shared_scope(true).build();
    let given = Idempotency::builder()
        .shared_scope(true)
        .store(MemoryStore::new())
        .build();
    for (name, idem) in [("default store", by_default), ("MemoryStore given", given)] {
        let router = app(&idem, Arc::new(Counters::default()));
        let steps = ["begin", "complete", "release"]
            .map(|step| format!("idem_store_seconds{{step={step}}}"));
        let before = steps.clone().map(|step| recorder.recorded(&step));
        let key = format!("timed-{}", name.len());
        // The app's first run answers 503 on `/fail`.
        let failed = send(
            &router,
            post_with("/fail", Some(&format!("{key}-fail")), "{}"),
        )
        .await;
        assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE, "{name}");
        let first = send(&router, post_with("/pay", Some(&key), r#"{"amount":1}"#)).await;
        assert_eq!(first.status, StatusCode::CREATED, "{name}");
        let replay = send(&router, post_with("/pay", Some(&key), r#"{"amount":1}"#)).await;
        assert_eq!(replay.status, StatusCode::CREATED, "{name}");
        let counted: Vec<u64> = steps
            .iter()
            .zip(before)
            .map(|(step, before)| recorder.recorded(step) - before)
            .collect();
        assert_eq!(
            counted,
            [3, 1, 1],
            "{name}: (begin, complete, release) steps timed for a first execution, a replay and a 503"
        );
    }
}

/// Guards: a full memory store counts each live record it evicts before its TTL in
/// `idem_memory_evictions_total` (README, metrics): an evicted key runs again on a retry,
/// which an operator must be able to see.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_memory_store_counts_its_evictions() {
    let _serial = SERIAL.lock().await;
    let recorder = recorder();
    let evictions = || recorder.counter("idem_memory_evictions_total{}");
    let idem = Idempotency::builder()
        .shared_scope(true)
        .store(MemoryStore::with_bounds(4, 64 << 20).unwrap())
        .build();
    let counters = Arc::new(Counters::default());
    let router = app(&idem, counters.clone());
    let before = evictions();
    for n in 0..4 {
        let first = send(&router, post_with("/pay", Some(&format!("kept-{n}")), "{}")).await;
        assert_eq!(first.status, StatusCode::CREATED);
    }
    assert_eq!(evictions() - before, 0, "four records fit a store of four");
    for n in 0..3 {
        let first = send(&router, post_with("/pay", Some(&format!("more-{n}")), "{}")).await;
        assert_eq!(first.status, StatusCode::CREATED);
    }
    assert_eq!(
        evictions() - before,
        3,
        "each record past the bound evicts one"
    );
    // The evicted key runs again: what the counter warns of.
    let again = send(&router, post_with("/pay", Some("kept-0"), "{}")).await;
    assert!(!again.is_replay());
    assert_eq!(counters.runs(), 8);
}
