//! The layer's own future (`IdempotencyFuture`: reading a keyed request's body with
//! `Collecting`, then calling the service), `Collecting` on response bodies, and the
//! memory store's direct path (a handle whose store is exactly a `MemoryStore`: the
//! default store, or one given with `builder().store(..)`), each attacked where it could
//! run a key twice, hand one client another's response, stick a key or lose a byte.
//!
//! Most tests run twice: `default_store` (no store given) and `given_store`
//! (`.store(MemoryStore::new())`, whose claim and entry counts the test can read).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use common::{Answer, send, test_builder, until};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use idem_runtime::store::{MemoryStore, Store};
use idem_runtime::{Idempotency, IdempotencyBuilder, Idempotent, Problem};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, Semaphore, mpsc};
use tower::ServiceExt;

// ---------------------------------------------------------------------------------------
// The app under test.
// ---------------------------------------------------------------------------------------

/// Which memory store path a handle takes.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// No store given: the builder's default `MemoryStore` (direct path).
    Default,
    /// `builder().store(MemoryStore)` (direct path), the store kept to read its counts.
    Given,
}

/// A handle on `mode`'s store, configured by `configure`; the store when the test holds it.
fn handle(
    mode: Mode,
    configure: impl FnOnce(IdempotencyBuilder) -> IdempotencyBuilder,
) -> (Idempotency, Option<MemoryStore>) {
    match mode {
        Mode::Default => (
            configure(test_builder(Idempotency::builder())).build(),
            None,
        ),
        Mode::Given => {
            let store = MemoryStore::new();
            let idem = configure(test_builder(Idempotency::builder().store(store.clone()))).build();
            (idem, Some(store))
        }
    }
}

/// The handlers' shared state: runs, and a gate `/held` waits at.
struct Script {
    runs: AtomicUsize,
    /// Runs of `/fail` and `/panic`, each counted apart: their first run fails.
    fails: AtomicUsize,
    panics: AtomicUsize,
    /// Notified (a permit kept) when `/held` starts.
    started: Notify,
    gate: Semaphore,
}

impl Script {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            runs: AtomicUsize::new(0),
            fails: AtomicUsize::new(0),
            panics: AtomicUsize::new(0),
            started: Notify::new(),
            gate: Semaphore::new(0),
        })
    }

    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    fn run(&self) -> usize {
        self.runs.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Lets every held handler through.
    fn open(&self) {
        self.gate.add_permits(10_000);
    }
}

type Shared = Arc<Script>;

/// 201 with the request body as received, and the run number.
async fn echo(idem: Idempotent, State(script): State<Shared>, body: Bytes) -> Response {
    idem.run(async move {
        let n = script.run();
        (StatusCode::CREATED, [("x-run", n.to_string())], body)
    })
    .await
}

/// Waits at the gate, then 201 `run {n}: {body}`.
async fn held(idem: Idempotent, State(script): State<Shared>, body: Bytes) -> Response {
    idem.run(async move {
        let n = script.run();
        script.started.notify_one();
        script.gate.acquire().await.unwrap().forget();
        let mut out = format!("run {n}: ").into_bytes();
        out.extend_from_slice(&body);
        (StatusCode::CREATED, [("x-run", n.to_string())], out)
    })
    .await
}

/// A response with headers of every kind and a binary body.
async fn headers(idem: Idempotent, State(script): State<Shared>, body: Bytes) -> Response {
    idem.run(async move {
        let n = script.run();
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            "application/octet-stream".parse().unwrap(),
        );
        headers.insert("x-run", n.to_string().parse().unwrap());
        for value in ["one", "two", "three"] {
            headers.append("x-multi", value.parse().unwrap());
        }
        headers.insert("x-empty", HeaderValue::from_static(""));
        headers.insert(
            "x-binary",
            HeaderValue::from_bytes(b"caf\xe9 \x80").unwrap(),
        );
        headers.insert(header::SET_COOKIE, "session=abc".parse().unwrap());
        headers.insert(
            header::DATE,
            "Tue, 24 Nov 2026 00:00:00 GMT".parse().unwrap(),
        );
        let mut out: Vec<u8> = (0..=255u8).cycle().take(700).collect();
        out.extend_from_slice(&body);
        (StatusCode::ACCEPTED, headers, out)
    })
    .await
}

/// First run 503 (not stored: the key is released), then 201.
async fn fail_once(idem: Idempotent, State(script): State<Shared>) -> Response {
    idem.run(async move {
        script.run();
        let n = script.fails.fetch_add(1, Ordering::SeqCst) + 1;
        if n == 1 {
            (StatusCode::SERVICE_UNAVAILABLE, "try again".to_owned())
        } else {
            (StatusCode::CREATED, format!("run {n}"))
        }
    })
    .await
}

/// First run panics, then 201.
async fn panic_once(idem: Idempotent, State(script): State<Shared>) -> Response {
    idem.run(async move {
        script.run();
        let n = script.panics.fetch_add(1, Ordering::SeqCst) + 1;
        assert!(n != 1, "first run panics");
        (StatusCode::CREATED, format!("run {n}"))
    })
    .await
}

/// A handler without `Idempotent`: reads the body it is given and answers it back, with
/// `x-body-error` when the body failed after what it answers.
async fn plain(body: Body) -> Response {
    let (bytes, error) = drain(body).await;
    let mut response = (StatusCode::OK, bytes).into_response();
    if error.is_some() {
        response
            .headers_mut()
            .insert("x-body-error", HeaderValue::from_static("1"));
    }
    response
}

/// A handler without `Idempotent` that says it started (`started`) before it reads its
/// body, then answers it back.
async fn stream_in(State(script): State<Shared>, body: Body) -> Response {
    script.started.notify_one();
    let (bytes, error) = drain(body).await;
    assert!(error.is_none());
    (StatusCode::OK, bytes).into_response()
}

/// A typed extractor after `Idempotent` that rejects a non-JSON content type.
async fn typed(idem: Idempotent, axum::Json(value): axum::Json<serde_json::Value>) -> Response {
    idem.run(async move { (StatusCode::CREATED, axum::Json(value)) })
        .await
}

fn number(body: &[u8]) -> usize {
    std::str::from_utf8(body).unwrap().trim().parse().unwrap()
}

/// 201 with exactly `N` bytes (N the request body), in one chunk.
async fn respond_sized(idem: Idempotent, State(script): State<Shared>, body: Bytes) -> Response {
    idem.run(async move {
        script.run();
        (StatusCode::CREATED, pattern(number(&body), 7))
    })
    .await
}

/// The chunks `/respond/chunks` streams: `N` chunks, chunk `i` of `i % 37` bytes, an empty
/// chunk after every third.
fn response_chunks(count: usize) -> Vec<Bytes> {
    let mut chunks = Vec::new();
    for i in 0..count {
        chunks.push(Bytes::from(pattern(i % 37, i)));
        if i % 3 == 0 {
            chunks.push(Bytes::new());
        }
    }
    chunks
}

fn joined(chunks: &[Bytes]) -> Vec<u8> {
    chunks.iter().flat_map(|c| c.iter().copied()).collect()
}

/// 201 streamed in `N` chunks, each after a pending poll.
async fn respond_chunks(idem: Idempotent, State(script): State<Shared>, body: Bytes) -> Response {
    idem.run(async move {
        script.run();
        let chunks = response_chunks(number(&body));
        (
            StatusCode::CREATED,
            Trickle::new(chunks.into_iter().map(Ok)).into_body(),
        )
    })
    .await
}

/// 201 with `N` bytes in 4 chunks, each after a pending poll, announcing its exact length.
async fn respond_declared(idem: Idempotent, State(script): State<Shared>, body: Bytes) -> Response {
    idem.run(async move {
        script.run();
        let n = number(&body);
        let data = pattern(n, 3);
        let chunks = split_even(&data, 4);
        let body = Trickle::new(chunks.into_iter().map(Ok)).exact(n as u64);
        (StatusCode::CREATED, body.into_body())
    })
    .await
}

/// 200 with `N` bytes in chunks of 100, then a body error.
async fn respond_broken(idem: Idempotent, State(script): State<Shared>, body: Bytes) -> Response {
    idem.run(async move {
        script.run();
        let data = pattern(number(&body), 11);
        let chunks = data.chunks(100).map(|c| Ok(Bytes::copy_from_slice(c)));
        let items: Vec<_> = chunks
            .chain(std::iter::once(Err(io::Error::other(
                "the response body broke",
            ))))
            .collect();
        (StatusCode::OK, Trickle::new(items).into_body())
    })
    .await
}

/// 201 streamed: `part one;`, then (once `/held`'s gate lets it) `part two`; says it
/// started (`started`) when the first part is read.
async fn respond_gated(idem: Idempotent, State(script): State<Shared>) -> Response {
    idem.run(async move {
        script.run();
        let chunks = futures_util::stream::unfold(0u8, move |step| {
            let script = script.clone();
            async move {
                match step {
                    0 => Some((Ok::<_, io::Error>(Bytes::from_static(b"part one;")), 1)),
                    1 => {
                        script.started.notify_one();
                        script.gate.acquire().await.unwrap().forget();
                        Some((Ok(Bytes::from_static(b"part two")), 2))
                    }
                    _ => None,
                }
            }
        });
        (StatusCode::CREATED, Body::from_stream(chunks))
    })
    .await
}

fn routes(script: Shared) -> Router {
    Router::new()
        .route("/echo", post(echo))
        .route("/echo/other", post(echo))
        .route("/held", post(held))
        .route("/headers", post(headers))
        .route("/fail", post(fail_once))
        .route("/panic", post(panic_once))
        .route("/plain", post(plain))
        .route("/typed", post(typed))
        .route("/stream-in", post(stream_in))
        .route("/respond/sized", post(respond_sized))
        .route("/respond/chunks", post(respond_chunks))
        .route("/respond/declared", post(respond_declared))
        .route("/respond/broken", post(respond_broken))
        .route("/respond/gated", post(respond_gated))
        .with_state(script)
}

fn app(idem: &Idempotency, script: &Shared) -> Router {
    routes(script.clone()).layer(idem.layer())
}

// ---------------------------------------------------------------------------------------
// Bodies and requests.
// ---------------------------------------------------------------------------------------

/// `n` bytes of a pattern that differs by `seed`.
fn pattern(n: usize, seed: usize) -> Vec<u8> {
    (0..n).map(|i| ((i * 31 + seed * 7) % 251) as u8).collect()
}

fn split_even(data: &[u8], parts: usize) -> Vec<Bytes> {
    let size = data.len().div_ceil(parts).max(1);
    data.chunks(size).map(Bytes::copy_from_slice).collect()
}

/// A body that answers `Pending` (waking itself) before each frame, with an optional
/// exact size hint (true or not), noting whether it was ever polled.
struct Trickle {
    items: VecDeque<Result<Bytes, io::Error>>,
    yielded: bool,
    hint: Option<u64>,
    polled: Arc<AtomicBool>,
}

impl Trickle {
    fn new(items: impl IntoIterator<Item = Result<Bytes, io::Error>>) -> Self {
        Self {
            items: items.into_iter().collect(),
            yielded: false,
            hint: None,
            polled: Arc::new(AtomicBool::new(false)),
        }
    }

    fn of(chunks: &[Bytes]) -> Self {
        Self::new(chunks.iter().cloned().map(Ok))
    }

    fn exact(mut self, len: u64) -> Self {
        self.hint = Some(len);
        self
    }

    fn into_body(self) -> Body {
        Body::new(self)
    }
}

impl http_body::Body for Trickle {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.polled.store(true, Ordering::SeqCst);
        if !self.yielded {
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.yielded = false;
        Poll::Ready(self.items.pop_front().map(|item| item.map(Frame::data)))
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

/// A body streamed from `chunks` (no size hint).
fn chunked(chunks: &[Bytes]) -> Body {
    let items: Vec<Result<Bytes, io::Error>> = chunks.iter().cloned().map(Ok).collect();
    Body::from_stream(futures_util::stream::iter(items))
}

/// A body fed chunk by chunk through the sender; `waiting` is notified each time the
/// body is polled for its next chunk. Dropping the sender ends the body.
fn channel_body() -> (mpsc::UnboundedSender<Bytes>, Arc<Notify>, Body) {
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let waiting = Arc::new(Notify::new());
    let stream =
        futures_util::stream::unfold((rx, waiting.clone()), |(mut rx, waiting)| async move {
            waiting.notify_one();
            let chunk = rx.recv().await?;
            Some((Ok::<_, io::Error>(chunk), (rx, waiting)))
        });
    (tx, waiting, Body::from_stream(stream))
}

fn keyed(path: &str, key: &str, body: Body) -> Request {
    Request::builder()
        .method(Method::POST)
        .uri(path)
        .header("idempotency-key", key)
        .body(body)
        .unwrap()
}

fn keyed_bytes(path: &str, key: &str, body: impl Into<Bytes>) -> Request {
    keyed(path, key, Body::from(body.into()))
}

/// Reads a body to its end or its first error: the bytes before, and the error.
async fn drain(mut body: Body) -> (Vec<u8>, Option<String>) {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    out.extend_from_slice(&data);
                }
            }
            Err(error) => return (out, Some(error.to_string())),
        }
    }
    (out, None)
}

/// `send`, failing the test (rather than hanging it) if the answer does not come at once,
/// as when a request that should be refused runs a handler held at the gate.
async fn send_now(app: &Router, request: Request) -> Answer {
    tokio::time::timeout(Duration::from_secs(10), send(app, request))
        .await
        .expect("answered without running a held handler")
}

fn text(answer: &Answer) -> String {
    String::from_utf8_lossy(&answer.body).into_owned()
}

fn run_of(answer: &Answer) -> Option<String> {
    answer
        .headers
        .get("x-run")
        .map(|v| v.to_str().unwrap().to_owned())
}

/// With the store in hand: no claim is left.
fn assert_no_claims(store: &Option<MemoryStore>, after: &str) {
    if let Some(store) = store {
        assert_eq!(store.claim_count(), 0, "a claim is left after {after}");
    }
}

/// With the store in hand: no claim is left, once the detached work is done.
async fn no_claims_eventually(store: &Option<MemoryStore>) {
    if let Some(store) = store {
        until(|| store.claim_count() == 0).await;
    }
}

fn assert_entries(store: &Option<MemoryStore>, entries: u64, after: &str) {
    if let Some(store) = store {
        store.run_pending_tasks();
        assert_eq!(store.entry_count(), entries, "records held after {after}");
    }
}

/// Declares `default_store` and `given_store` tests for an `async fn(Mode)` check.
macro_rules! on_both_paths {
    ($($check:ident),* $(,)?) => {$(
        mod $check {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn default_store() {
                super::$check(super::Mode::Default).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn given_store() {
                super::$check(super::Mode::Given).await;
            }
        }
    )*};
}

// ---------------------------------------------------------------------------------------
// Guarantee: one execution per key under concurrency; retries replay byte for byte.
// ---------------------------------------------------------------------------------------

on_both_paths!(
    many_tasks_on_one_key_run_the_handler_once,
    many_tasks_on_many_keys_run_each_key_once,
    many_tasks_with_trickling_bodies_waiting_for_in_flight_all_get_one_response,
    replay_is_byte_for_byte,
);

/// 64 tasks send one request with one key at once: one runs (held at the gate until all
/// the others are answered `409 in flight`), every retry replays it byte for byte.
async fn many_tasks_on_one_key_run_the_handler_once(mode: Mode) {
    let (idem, store) = handle(mode, |b| b);
    let script = Script::new();
    let app = app(&idem, &script);
    let answered = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let app = app.clone();
            let answered = answered.clone();
            tokio::spawn(async move {
                let answer = send(&app, keyed_bytes("/held", "same", "same body")).await;
                answered.fetch_add(1, Ordering::SeqCst);
                answer
            })
        })
        .collect();
    until(|| answered.load(Ordering::SeqCst) == 63).await;
    assert_eq!(script.runs(), 1, "one execution while the key is held");
    if let Some(store) = &store {
        assert_eq!(store.claim_count(), 1, "the one execution holds one claim");
    }
    script.open();
    let mut original = None;
    let mut in_flight = 0;
    for task in tasks {
        let answer = task.await.unwrap();
        match answer.status {
            StatusCode::CREATED => {
                assert!(!answer.is_replay());
                assert!(original.replace(answer).is_none(), "two original responses");
            }
            StatusCode::CONFLICT => {
                answer.assert_problem(StatusCode::CONFLICT, Problem::IN_FLIGHT);
                in_flight += 1;
            }
            other => panic!("unexpected {other}: {answer:?}"),
        }
    }
    let original = original.expect("one original response");
    assert_eq!(text(&original), "run 1: same body");
    assert_eq!(in_flight, 63);
    for _ in 0..8 {
        let again = send(&app, keyed_bytes("/held", "same", "same body")).await;
        assert!(again.is_replay(), "{again:?}");
        assert_eq!(again.status, original.status);
        assert_eq!(again.body, original.body);
        assert_eq!(run_of(&again), run_of(&original));
    }
    assert_eq!(script.runs(), 1, "the handler ran once");
    assert_no_claims(&store, "every request on the key ended");
    assert_entries(&store, 1, "one key completed");
}

/// 240 tasks over 12 keys, bodies trickled or streamed in chunks: each key runs once,
/// every task gets its own key's response (or `409 in flight`), no claim is left.
async fn many_tasks_on_many_keys_run_each_key_once(mode: Mode) {
    let (idem, store) = handle(mode, |b| b);
    let script = Script::new();
    let app = app(&idem, &script);
    let tasks: Vec<_> = (0..240)
        .map(|i| {
            let app = app.clone();
            let key = i % 12;
            let data = pattern(50 + key * 40, key);
            let chunks = split_even(&data, 1 + i % 5);
            let body = if i % 2 == 0 {
                Trickle::of(&chunks).into_body()
            } else {
                chunked(&chunks)
            };
            tokio::spawn(async move {
                let answer = send(&app, keyed("/echo", &format!("key-{key}"), body)).await;
                (data, answer)
            })
        })
        .collect();
    let mut originals = 0;
    for task in tasks {
        let (data, answer) = task.await.unwrap();
        match answer.status {
            StatusCode::CREATED => {
                assert_eq!(answer.body, data, "a task got another key's response");
                if !answer.is_replay() {
                    originals += 1;
                }
            }
            StatusCode::CONFLICT => answer.assert_problem(StatusCode::CONFLICT, Problem::IN_FLIGHT),
            other => panic!("unexpected {other}: {answer:?}"),
        }
    }
    assert_eq!(script.runs(), 12, "each key ran once");
    assert_eq!(originals, 12);
    assert_no_claims(&store, "240 requests");
    assert_entries(&store, 12, "12 keys");
}

/// 32 tasks on one key, with bodies that arrive in 6 chunks after pending polls, and
/// `wait_for_in_flight`: all get the one response, exactly one of them not a replay.
async fn many_tasks_with_trickling_bodies_waiting_for_in_flight_all_get_one_response(mode: Mode) {
    let (idem, store) = handle(mode, |b| b.wait_for_in_flight(Duration::from_secs(20)));
    let script = Script::new();
    let app = app(&idem, &script);
    let data = pattern(3000, 1);
    let chunks = split_even(&data, 6);
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let app = app.clone();
            let body = Trickle::of(&chunks).into_body();
            tokio::spawn(async move { send(&app, keyed("/held", "trickle", body)).await })
        })
        .collect();
    script.started.notified().await;
    script.open();
    let mut expected = b"run 1: ".to_vec();
    expected.extend_from_slice(&data);
    let mut originals = 0;
    for task in tasks {
        let answer = task.await.unwrap();
        assert_eq!(answer.status, StatusCode::CREATED, "{answer:?}");
        assert_eq!(answer.body, expected, "the whole body, as sent, once");
        if !answer.is_replay() {
            originals += 1;
        }
    }
    assert_eq!(originals, 1);
    assert_eq!(script.runs(), 1);
    assert_no_claims(&store, "all waiters were answered");
}

/// A response with repeated, empty and non-UTF-8 header values and a binary body is
/// replayed with the same status, body and kept headers in order; `Set-Cookie` and
/// `Date` are not replayed.
async fn replay_is_byte_for_byte(mode: Mode) {
    let (idem, store) = handle(mode, |b| b);
    let script = Script::new();
    let app = app(&idem, &script);
    let first = send(&app, keyed_bytes("/headers", "h", "payload")).await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    let again = send(&app, keyed_bytes("/headers", "h", "payload")).await;
    assert!(again.is_replay(), "{again:?}");
    assert_eq!(again.status, first.status);
    assert_eq!(again.body, first.body);
    for name in ["content-type", "x-run", "x-empty", "x-binary"] {
        assert_eq!(again.headers.get(name), first.headers.get(name), "{name}");
    }
    let multi: Vec<_> = again.headers.get_all("x-multi").iter().collect();
    assert_eq!(multi, ["one", "two", "three"]);
    assert!(again.headers.get(header::SET_COOKIE).is_none());
    assert!(again.headers.get(header::DATE).is_none());
    assert_eq!(script.runs(), 1);
    assert_no_claims(&store, "a replay");
    assert_entries(&store, 1, "one key completed");
}

// ---------------------------------------------------------------------------------------
// Guarantee: a different request with the same key gets 422, never another's response.
// ---------------------------------------------------------------------------------------

on_both_paths!(
    a_different_request_on_a_used_key_is_422,
    racing_different_requests_on_one_key_never_get_each_others_response,
);

async fn a_different_request_on_a_used_key_is_422(mode: Mode) {
    let (idem, store) = handle(mode, |b| b);
    let script = Script::new();
    let app = app(&idem, &script);
    let first = send(&app, keyed_bytes("/echo", "k", "{\"amount\":5}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let cases = [
        keyed_bytes("/echo", "k", "{\"amount\":6}"),
        keyed_bytes("/echo", "k", "{\"amount\":5} "),
        keyed_bytes("/echo", "k", ""),
        keyed_bytes("/echo/other", "k", "{\"amount\":5}"),
        keyed_bytes("/echo?x=1", "k", "{\"amount\":5}"),
    ];
    for request in cases {
        let answer = send(&app, request).await;
        answer.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, Problem::KEY_REUSED);
    }
    assert_eq!(script.runs(), 1, "nothing ran for the refused requests");
    let replay = send(
        &app,
        keyed(
            "/echo",
            "k",
            chunked(&[Bytes::from("{\"amount\""), Bytes::from(":5}")]),
        ),
    )
    .await;
    assert!(replay.is_replay());
    assert_eq!(replay.body, first.body);
    assert_no_claims(&store, "refused requests");
    assert_entries(&store, 1, "one key completed");
}

/// 24 tasks send body A and 24 body B with one key, at once. One runs; the other
/// request's senders are refused 422, never given its response, during and after.
async fn racing_different_requests_on_one_key_never_get_each_others_response(mode: Mode) {
    let (idem, store) = handle(mode, |b| b);
    let script = Script::new();
    let app = app(&idem, &script);
    let answered = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..48)
        .map(|i| {
            let app = app.clone();
            let answered = answered.clone();
            let body = if i % 2 == 0 { "body A" } else { "body B" };
            tokio::spawn(async move {
                let answer = send(&app, keyed_bytes("/held", "contested", body)).await;
                answered.fetch_add(1, Ordering::SeqCst);
                (body, answer)
            })
        })
        .collect();
    until(|| answered.load(Ordering::SeqCst) == 47).await;
    script.open();
    let mut winner = None;
    let mut outcomes = Vec::new();
    for task in tasks {
        let (body, answer) = task.await.unwrap();
        if answer.status == StatusCode::CREATED {
            assert!(!answer.is_replay());
            assert_eq!(
                text(&answer),
                format!("run 1: {body}"),
                "a sender got another's response"
            );
            assert!(winner.replace(body).is_none(), "two executions");
        } else {
            outcomes.push((body, answer));
        }
    }
    let winner = winner.expect("one execution");
    for (body, answer) in outcomes {
        if body == winner {
            answer.assert_problem(StatusCode::CONFLICT, Problem::IN_FLIGHT);
        } else {
            answer.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, Problem::KEY_REUSED);
        }
    }
    let loser = if winner == "body A" {
        "body B"
    } else {
        "body A"
    };
    let replay = send(&app, keyed_bytes("/held", "contested", winner)).await;
    assert!(replay.is_replay());
    assert_eq!(text(&replay), format!("run 1: {winner}"));
    send_now(&app, keyed_bytes("/held", "contested", loser))
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY, Problem::KEY_REUSED);
    assert_eq!(script.runs(), 1);
    assert_no_claims(&store, "the race");
}

// ---------------------------------------------------------------------------------------
// Guarantee: request bodies are read whole, bounded, and handed on as sent.
// ---------------------------------------------------------------------------------------

on_both_paths!(
    unkeyed_and_malformed_key_requests_are_not_buffered,
    chunked_request_body_is_read_whole_and_fingerprinted_as_one,
    request_body_over_the_limit_is_413_and_claims_nothing,
    request_body_over_the_limit_reaches_a_plain_handler_byte_for_byte,
    request_body_that_fails_midway_is_400_and_claims_nothing,
    request_body_that_fails_reaches_a_plain_handler_as_its_prefix_then_the_error,
    empty_request_bodies_are_fingerprinted_and_replayed,
    announced_length_over_the_limit_is_413_without_reading_the_body,
    slowly_arriving_request_body_is_read_in_full_before_anything_is_claimed,
    request_bodies_split_every_way_around_the_limit,
    content_length_over_the_limit_over_http_is_413_before_the_body_is_sent,
    chunked_request_sent_slowly_over_http_is_read_whole,
);

/// A request without a key, or with a malformed one, goes straight to its handler: the
/// handler starts while the body is still arriving, and reads all of it.
async fn unkeyed_and_malformed_key_requests_are_not_buffered(mode: Mode) {
    let (idem, store) = handle(mode, |b| b.max_request_bytes(10));
    let script = Script::new();
    let app = app(&idem, &script);
    for key in [None, Some("bad key with spaces")] {
        let (tx, _waiting, body) = channel_body();
        let mut request = Request::builder()
            .method(Method::POST)
            .uri("/stream-in")
            .body(body)
            .unwrap();
        if let Some(key) = key {
            request
                .headers_mut()
                .insert("idempotency-key", HeaderValue::from_static(key));
        }
        let client = tokio::spawn({
            let app = app.clone();
            async move { send(&app, request).await }
        });
        tx.send(Bytes::from(vec![b'a'; 100])).unwrap();
        // The handler runs before the body ends (over the keyed limit, too).
        script.started.notified().await;
        tx.send(Bytes::from(vec![b'b'; 100])).unwrap();
        drop(tx);
        let answer = client.await.unwrap();
        assert_eq!(answer.status, StatusCode::OK, "{key:?}");
        assert_eq!(answer.body.len(), 200, "{key:?}");
        assert_eq!(&answer.body[..100], &[b'a'; 100][..]);
        assert_eq!(&answer.body[100..], &[b'b'; 100][..]);
    }
    assert_no_claims(&store, "unkeyed requests");
    assert_entries(&store, 0, "unkeyed requests");
}

/// A body in 40 chunks (empty ones among them) reaches the handler whole, and is one
/// request: sent again in one chunk or trickled it replays; one byte changed is 422.
async fn chunked_request_body_is_read_whole_and_fingerprinted_as_one(mode: Mode) {
    let (idem, store) = handle(mode, |b| b);
    let script = Script::new();
    let app = app(&idem, &script);
    let data = pattern(5000, 2);
    let mut chunks = Vec::new();
    for (i, part) in data.chunks(125).enumerate() {
        chunks.push(Bytes::copy_from_slice(part));
        if i % 4 == 0 {
            chunks.push(Bytes::new());
        }
    }
    let first = send(&app, keyed("/echo", "chunks", chunked(&chunks))).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.body, data, "the handler read the body as sent");
    let whole = send(&app, keyed_bytes("/echo", "chunks", data.clone())).await;
    assert!(whole.is_replay(), "one chunk: {whole:?}");
    assert_eq!(whole.body, data);
    let trickled = send(
        &app,
        keyed(
            "/echo",
            "chunks",
            Trickle::of(&split_even(&data, 7)).into_body(),
        ),
    )
    .await;
    assert!(trickled.is_replay(), "seven chunks: {trickled:?}");
    let mut changed = data.clone();
    *changed.last_mut().unwrap() ^= 1;
    send(
        &app,
        keyed("/echo", "chunks", chunked(&split_even(&changed, 3))),
    )
    .await
    .assert_problem(StatusCode::UNPROCESSABLE_ENTITY, Problem::KEY_REUSED);
    assert_eq!(script.runs(), 1);
    assert_no_claims(&store, "chunked requests");
}

/// With a 64-byte limit: 65 bytes in one chunk (with a length), in chunks (without), or
/// trickled, are answered `413` and nothing runs or is claimed; the key stays free, and
/// 64 bytes are accepted.
async fn request_body_over_the_limit_is_413_and_claims_nothing(mode: Mode) {
    let (idem, store) = handle(mode, |b| b.max_request_bytes(64));
    let script = Script::new();
    let app = app(&idem, &script);
    let over = pattern(65, 4);
    let bodies: Vec<(&str, Body)> = vec![
        ("one chunk", Body::from(over.clone())),
        ("chunks of 10", chunked(&split_even(&over, 7))),
        (
            "64 then 1",
            chunked(&[
                Bytes::copy_from_slice(&over[..64]),
                Bytes::copy_from_slice(&over[64..]),
            ]),
        ),
        (
            "trickled 1000",
            Trickle::of(&split_even(&pattern(1000, 4), 10)).into_body(),
        ),
        ("a megabyte", chunked(&[Bytes::from(vec![b'x'; 1 << 20])])),
    ];
    for (what, body) in bodies {
        let answer = send(&app, keyed("/echo", "limit", body)).await;
        answer.assert_problem(StatusCode::PAYLOAD_TOO_LARGE, Problem::BODY_TOO_LARGE);
        assert!(text(&answer).contains("64"), "{what}: {}", text(&answer));
        assert_eq!(script.runs(), 0, "{what}: the handler ran");
        assert_no_claims(&store, what);
        assert_entries(&store, 0, what);
    }
    let at_limit = pattern(64, 4);
    let answer = send(
        &app,
        keyed("/echo", "limit", chunked(&split_even(&at_limit, 5))),
    )
    .await;
    assert_eq!(
        answer.status,
        StatusCode::CREATED,
        "the key was left free: {answer:?}"
    );
    assert!(!answer.is_replay());
    assert_eq!(answer.body, at_limit);
    assert_eq!(script.runs(), 1);
    // The stored record is not disturbed by an oversized retry.
    send(&app, keyed_bytes("/echo", "limit", over))
        .await
        .assert_problem(StatusCode::PAYLOAD_TOO_LARGE, Problem::BODY_TOO_LARGE);
    let replay = send(&app, keyed_bytes("/echo", "limit", at_limit.clone())).await;
    assert!(replay.is_replay());
    assert_eq!(replay.body, at_limit);
    assert_no_claims(&store, "the accepted request");
}

/// A keyed request over the limit to a handler without `Idempotent` gets every byte, in
/// order: read in chunks, trickled, with a true or a false length announced.
async fn request_body_over_the_limit_reaches_a_plain_handler_byte_for_byte(mode: Mode) {
    let (idem, store) = handle(mode, |b| b.max_request_bytes(100));
    let script = Script::new();
    let app = app(&idem, &script);
    let data = pattern(10_000, 5);
    let bodies: Vec<(&str, Body)> = vec![
        (
            "chunks of 33",
            chunked(
                &data
                    .chunks(33)
                    .map(Bytes::copy_from_slice)
                    .collect::<Vec<_>>(),
            ),
        ),
        ("trickled", Trickle::of(&split_even(&data, 9)).into_body()),
        (
            "announced",
            Trickle::of(&split_even(&data, 9)).exact(10_000).into_body(),
        ),
        (
            "understated",
            Trickle::of(&split_even(&data, 9)).exact(50).into_body(),
        ),
        ("one chunk", Body::from(data.clone())),
        (
            "just over",
            chunked(&[
                Bytes::copy_from_slice(&data[..100]),
                Bytes::copy_from_slice(&data[100..101]),
            ]),
        ),
    ];
    for (what, body) in bodies {
        let expected = if what == "just over" {
            &data[..101]
        } else {
            &data[..]
        };
        let answer = send(&app, keyed("/plain", &format!("plain-{what}"), body)).await;
        assert_eq!(answer.status, StatusCode::OK, "{what}");
        assert!(answer.headers.get("x-body-error").is_none(), "{what}");
        assert_eq!(
            answer.body.len(),
            expected.len(),
            "{what}: bytes lost or added"
        );
        assert_eq!(answer.body, expected, "{what}: bytes reordered");
    }
    assert_no_claims(&store, "plain requests");
}

/// `chunks`, then a body error.
fn failing_items(chunks: &[&'static str]) -> Vec<Result<Bytes, io::Error>> {
    chunks
        .iter()
        .map(|c| Ok(Bytes::from_static(c.as_bytes())))
        .chain(std::iter::once(Err(io::Error::other(
            "the client's body broke",
        ))))
        .collect()
}

/// A body that fails after two chunks, or at once, is answered `400` and nothing runs
/// or is claimed; a retry with the body whole runs. One that fails after passing the
/// limit is `413`.
async fn request_body_that_fails_midway_is_400_and_claims_nothing(mode: Mode) {
    let (idem, store) = handle(mode, |b| b.max_request_bytes(100));
    let script = Script::new();
    let app = app(&idem, &script);
    for (what, chunks) in [
        ("after two chunks", &["abc", "def"][..]),
        ("at once", &[][..]),
        ("after an empty chunk", &["", "abc"][..]),
    ] {
        let streamed = Body::from_stream(futures_util::stream::iter(failing_items(chunks)));
        let trickled = Trickle::new(failing_items(chunks)).into_body();
        for body in [streamed, trickled] {
            let answer = send(&app, keyed("/echo", "broken", body)).await;
            answer.assert_problem(StatusCode::BAD_REQUEST, Problem::BODY_UNREADABLE);
            assert_eq!(script.runs(), 0, "{what}: the handler ran");
            assert_no_claims(&store, what);
        }
    }
    let over_then_error: Vec<Result<Bytes, io::Error>> = vec![
        Ok(Bytes::from(vec![b'a'; 101])),
        Err(io::Error::other("broke after the limit")),
    ];
    send(
        &app,
        keyed("/echo", "broken", Trickle::new(over_then_error).into_body()),
    )
    .await
    .assert_problem(StatusCode::PAYLOAD_TOO_LARGE, Problem::BODY_TOO_LARGE);
    assert_eq!(script.runs(), 0);
    let whole = send(&app, keyed_bytes("/echo", "broken", "abcdef")).await;
    assert_eq!(
        whole.status,
        StatusCode::CREATED,
        "the key was left free: {whole:?}"
    );
    assert!(!whole.is_replay());
    assert_eq!(text(&whole), "abcdef");
    assert_eq!(script.runs(), 1);
    assert_no_claims(&store, "the whole retry");
}

/// A keyed request whose body fails, to a handler without `Idempotent`: the handler reads
/// the chunks before the failure, in order, then the failure.
async fn request_body_that_fails_reaches_a_plain_handler_as_its_prefix_then_the_error(mode: Mode) {
    let (idem, _store) = handle(mode, |b| b.max_request_bytes(1000));
    let script = Script::new();
    let app = app(&idem, &script);
    for (what, body) in [
        (
            "streamed",
            Body::from_stream(futures_util::stream::iter(vec![
                Ok(Bytes::from_static(b"abc")),
                Ok(Bytes::new()),
                Ok(Bytes::from_static(b"def")),
                Ok(Bytes::from_static(b"ghi")),
                Err(io::Error::other("broke")),
                Ok(Bytes::from_static(b"never")),
            ])),
        ),
        (
            "trickled",
            Trickle::new(vec![
                Ok(Bytes::from_static(b"abc")),
                Ok(Bytes::from_static(b"def")),
                Ok(Bytes::from_static(b"ghi")),
                Err(io::Error::other("broke")),
            ])
            .into_body(),
        ),
    ] {
        let answer = send(&app, keyed("/plain", &format!("p-{what}"), body)).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(text(&answer), "abcdefghi", "{what}");
        assert!(
            answer.headers.contains_key("x-body-error"),
            "{what}: the failure was lost"
        );
    }
}

/// An empty body is a request like any other: replayed when sent again as nothing (or
/// as empty chunks), 422 with one byte; with a limit of 0 it is accepted, one byte is not.
async fn empty_request_bodies_are_fingerprinted_and_replayed(mode: Mode) {
    let (idem, store) = handle(mode, |b| b.max_request_bytes(0));
    let script = Script::new();
    let app = app(&idem, &script);
    let first = send(&app, keyed("/echo", "empty", Body::empty())).await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    assert!(first.body.is_empty());
    let empties = send(
        &app,
        keyed("/echo", "empty", chunked(&[Bytes::new(), Bytes::new()])),
    )
    .await;
    assert!(empties.is_replay(), "{empties:?}");
    let trickled = send(
        &app,
        keyed("/echo", "empty", Trickle::new(vec![]).exact(0).into_body()),
    )
    .await;
    assert!(trickled.is_replay(), "{trickled:?}");
    send(&app, keyed_bytes("/echo", "empty", "x"))
        .await
        .assert_problem(StatusCode::PAYLOAD_TOO_LARGE, Problem::BODY_TOO_LARGE);
    send(&app, keyed_bytes("/echo", "other-empty", "x"))
        .await
        .assert_problem(StatusCode::PAYLOAD_TOO_LARGE, Problem::BODY_TOO_LARGE);
    assert_eq!(script.runs(), 1);
    assert_no_claims(&store, "empty bodies");

    let (idem, store) = handle(mode, |b| b);
    let app = self::app(&idem, &script);
    let first = send(&app, keyed("/echo", "e", Body::empty())).await;
    assert_eq!(first.status, StatusCode::CREATED);
    send(&app, keyed_bytes("/echo", "e", "x"))
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY, Problem::KEY_REUSED);
    assert_no_claims(&store, "empty bodies");
}

/// A body announcing (an exact size hint, as a `Content-Length` gives) more than the limit
/// is refused `413` before one byte is read; one understating its length is refused once
/// its bytes pass the limit.
async fn announced_length_over_the_limit_is_413_without_reading_the_body(mode: Mode) {
    let (idem, store) = handle(mode, |b| b.max_request_bytes(100));
    let script = Script::new();
    let app = app(&idem, &script);
    let announced = Trickle::of(&split_even(&pattern(1000, 6), 4)).exact(1000);
    let polled = announced.polled.clone();
    let answer = send(&app, keyed("/echo", "announced", announced.into_body())).await;
    answer.assert_problem(StatusCode::PAYLOAD_TOO_LARGE, Problem::BODY_TOO_LARGE);
    assert!(
        !polled.load(Ordering::SeqCst),
        "the body was read though its length was over the limit"
    );
    let just_over = Trickle::of(&[Bytes::from(vec![1u8; 100])]).exact(101);
    send(&app, keyed("/echo", "announced", just_over.into_body()))
        .await
        .assert_problem(StatusCode::PAYLOAD_TOO_LARGE, Problem::BODY_TOO_LARGE);
    let understated = Trickle::of(&split_even(&pattern(1000, 6), 4)).exact(10);
    send(&app, keyed("/echo", "announced", understated.into_body()))
        .await
        .assert_problem(StatusCode::PAYLOAD_TOO_LARGE, Problem::BODY_TOO_LARGE);
    assert_eq!(script.runs(), 0);
    assert_no_claims(&store, "announced lengths");
    let at_limit = Trickle::of(&split_even(&pattern(100, 6), 3)).exact(100);
    let answer = send(&app, keyed("/echo", "announced", at_limit.into_body())).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{answer:?}");
    assert_eq!(answer.body, pattern(100, 6));
}

/// A body fed chunk by chunk: while it is incomplete, nothing runs and nothing is
/// claimed; the handler then reads it exactly as sent.
async fn slowly_arriving_request_body_is_read_in_full_before_anything_is_claimed(mode: Mode) {
    let (idem, store) = handle(mode, |b| b);
    let script = Script::new();
    let app = app(&idem, &script);
    let (tx, waiting, body) = channel_body();
    let client = tokio::spawn({
        let app = app.clone();
        async move { send(&app, keyed("/echo", "slow", body)).await }
    });
    let chunks: Vec<Bytes> = (0..5)
        .map(|i| Bytes::from(pattern(10 + i * 50, i)))
        .collect();
    for chunk in &chunks {
        waiting.notified().await;
        assert_eq!(script.runs(), 0, "the handler ran before the body was read");
        assert_no_claims(&store, "part of a body");
        tx.send(chunk.clone()).unwrap();
    }
    waiting.notified().await;
    drop(tx);
    let answer = client.await.unwrap();
    assert_eq!(answer.status, StatusCode::CREATED);
    assert_eq!(
        answer.body,
        joined(&chunks),
        "the handler read the body as sent"
    );
    let replay = send(&app, keyed_bytes("/echo", "slow", joined(&chunks))).await;
    assert!(replay.is_replay());
    assert_eq!(script.runs(), 1);
    assert_no_claims(&store, "a slow body");
}

/// Deterministic random bodies around a limit of 200, split at random into chunks (empty
/// ones among them), streamed or trickled, with or without their true length announced:
/// within the limit they run once and echo exactly; over it they are 413; to a plain
/// handler they always arrive whole.
async fn request_bodies_split_every_way_around_the_limit(mode: Mode) {
    const LIMIT: usize = 200;
    let (idem, store) = handle(mode, |b| b.max_request_bytes(LIMIT));
    let script = Script::new();
    let app = app(&idem, &script);
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move |bound: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % bound as u64) as usize
    };
    let mut expected_runs = 0;
    for case in 0..300 {
        let len = match case % 6 {
            0 => 0,
            1 => LIMIT - 1,
            2 => LIMIT,
            3 => LIMIT + 1,
            4 => next(LIMIT * 3),
            _ => next(LIMIT + 3),
        };
        let data = pattern(len, case);
        let mut chunks = Vec::new();
        let mut at = 0;
        while at < len {
            if next(4) == 0 {
                chunks.push(Bytes::new());
            }
            let size = (1 + next(90)).min(len - at);
            chunks.push(Bytes::copy_from_slice(&data[at..at + size]));
            at += size;
        }
        let body = |style: usize| match style {
            0 => chunked(&chunks),
            1 => Trickle::of(&chunks).into_body(),
            _ => Trickle::of(&chunks).exact(len as u64).into_body(),
        };
        let style = next(3);
        let key = format!("case-{case}");
        let answer = send(&app, keyed("/echo", &key, body(style))).await;
        if len <= LIMIT {
            expected_runs += 1;
            assert_eq!(
                answer.status,
                StatusCode::CREATED,
                "case {case} ({len} bytes, style {style}): {answer:?}"
            );
            assert_eq!(
                answer.body, data,
                "case {case} ({len} bytes, style {style})"
            );
            let replay = send(&app, keyed("/echo", &key, body(next(3)))).await;
            assert!(replay.is_replay(), "case {case}: {replay:?}");
            assert_eq!(replay.body, data);
        } else {
            answer.assert_problem(StatusCode::PAYLOAD_TOO_LARGE, Problem::BODY_TOO_LARGE);
        }
        let plain = send(&app, keyed("/plain", &key, body(next(3)))).await;
        assert_eq!(
            plain.body, data,
            "case {case}: a plain handler's body ({len} bytes)"
        );
        assert_eq!(script.runs(), expected_runs, "case {case}");
    }
    assert_no_claims(&store, "300 cases");
}

/// Serves `app` on a local port.
async fn serve(app: Router) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, server)
}

/// Writes `head` (and then `chunks`, flushed one by one) on a new connection; reads the
/// whole answer (the request asks to close).
async fn exchange(addr: std::net::SocketAddr, head: &str, chunks: &[&[u8]]) -> Vec<u8> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.flush().await.unwrap();
    for chunk in chunks {
        tokio::task::yield_now().await;
        stream.write_all(chunk).await.unwrap();
        stream.flush().await.unwrap();
    }
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("the server answered in time")
        .unwrap();
    answer
}

/// Over real HTTP/1.1: a keyed request announcing `Content-Length: 100000` over a limit of
/// 1000 is answered `413` although not one byte of its body was sent.
async fn content_length_over_the_limit_over_http_is_413_before_the_body_is_sent(mode: Mode) {
    let (idem, store) = handle(mode, |b| b.max_request_bytes(1000));
    let script = Script::new();
    let (addr, server) = serve(app(&idem, &script)).await;
    let answer = exchange(
        addr,
        "POST /echo HTTP/1.1\r\nhost: test\r\nidempotency-key: cl\r\ncontent-length: 100000\r\nconnection: close\r\n\r\n",
        &[],
    )
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains(Problem::BODY_TOO_LARGE), "{answer}");
    assert_eq!(script.runs(), 0);
    assert_no_claims(&store, "an announced length over the limit");
    server.abort();
}

/// Over real HTTP/1.1: a chunked body written a chunk at a time is read whole, and a
/// retry of the same bytes replays it.
async fn chunked_request_sent_slowly_over_http_is_read_whole(mode: Mode) {
    let (idem, store) = handle(mode, |b| b);
    let script = Script::new();
    let app = app(&idem, &script);
    let (addr, server) = serve(app.clone()).await;
    let parts: Vec<Vec<u8>> = (0..6)
        .map(|i| format!("part {i} {};", "x".repeat(i * 100)).into_bytes())
        .collect();
    let mut wire: Vec<Vec<u8>> = parts
        .iter()
        .map(|p| {
            let mut chunk = format!("{:x}\r\n", p.len()).into_bytes();
            chunk.extend_from_slice(p);
            chunk.extend_from_slice(b"\r\n");
            chunk
        })
        .collect();
    wire.push(b"0\r\n\r\n".to_vec());
    let wire: Vec<&[u8]> = wire.iter().map(Vec::as_slice).collect();
    let answer = exchange(
        addr,
        "POST /echo HTTP/1.1\r\nhost: test\r\nidempotency-key: te\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n",
        &wire,
    )
    .await;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    let body: Vec<u8> = parts.concat();
    let sent_body = String::from_utf8(body.clone()).unwrap();
    assert!(
        answer.ends_with(&format!("\r\n\r\n{sent_body}")),
        "{answer}"
    );
    // The host is part of the key's scope: the retry names the same one.
    let mut retry = keyed_bytes("/echo", "te", body);
    retry
        .headers_mut()
        .insert(header::HOST, HeaderValue::from_static("test"));
    let replay = send(&app, retry).await;
    assert!(replay.is_replay(), "{replay:?}");
    assert_eq!(text(&replay), sent_body);
    assert_eq!(script.runs(), 1);
    assert_no_claims(&store, "a chunked request");
    server.abort();
}

// ---------------------------------------------------------------------------------------
// Guarantee: response bodies over the limit, streamed and failing behave as before.
// ---------------------------------------------------------------------------------------

on_both_paths!(
    response_at_the_limit_is_stored_and_one_byte_more_is_not,
    streamed_response_is_replayed_byte_for_byte,
    streamed_response_over_the_limit_reaches_the_client_whole_and_never_reruns,
    response_announcing_a_length_over_the_limit_reaches_the_client_whole,
    failing_response_body_is_502_and_never_reruns,
    response_failing_after_the_limit_gives_the_client_its_bytes_then_the_error,
);

async fn response_at_the_limit_is_stored_and_one_byte_more_is_not(mode: Mode) {
    let (idem, store) = handle(mode, |b| b.max_response_bytes(1000));
    let script = Script::new();
    let app = app(&idem, &script);
    let at = send(&app, keyed_bytes("/respond/sized", "at", "1000")).await;
    assert_eq!(at.status, StatusCode::CREATED);
    assert_eq!(at.body, pattern(1000, 7));
    let replay = send(&app, keyed_bytes("/respond/sized", "at", "1000")).await;
    assert!(replay.is_replay(), "{replay:?}");
    assert_eq!(replay.body, at.body);
    let over = send(&app, keyed_bytes("/respond/sized", "over", "1001")).await;
    assert_eq!(over.status, StatusCode::CREATED);
    assert_eq!(
        over.body,
        pattern(1001, 7),
        "the client gets the whole response"
    );
    let retry = send(&app, keyed_bytes("/respond/sized", "over", "1001")).await;
    retry.assert_problem(StatusCode::CONFLICT, Problem::RESPONSE_NOT_STORED);
    assert_eq!(script.runs(), 2);
    assert_no_claims(&store, "sized responses");
    assert_entries(&store, 2, "two keys completed");
}

async fn streamed_response_is_replayed_byte_for_byte(mode: Mode) {
    let (idem, store) = handle(mode, |b| b.max_response_bytes(100_000));
    let script = Script::new();
    let app = app(&idem, &script);
    let expected = joined(&response_chunks(200));
    let first = send(&app, keyed_bytes("/respond/chunks", "chunks", "200")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.body, expected);
    let replay = send(&app, keyed_bytes("/respond/chunks", "chunks", "200")).await;
    assert!(replay.is_replay());
    assert_eq!(replay.body, expected);
    assert_eq!(script.runs(), 1);
    assert_no_claims(&store, "a streamed response");
}

async fn streamed_response_over_the_limit_reaches_the_client_whole_and_never_reruns(mode: Mode) {
    let (idem, store) = handle(mode, |b| b.max_response_bytes(1000));
    let script = Script::new();
    let app = app(&idem, &script);
    let expected = joined(&response_chunks(200));
    assert!(expected.len() > 1000);
    let first = send(&app, keyed_bytes("/respond/chunks", "big-stream", "200")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.body.len(), expected.len(), "bytes lost or added");
    assert_eq!(first.body, expected, "bytes reordered");
    let retry = send(&app, keyed_bytes("/respond/chunks", "big-stream", "200")).await;
    retry.assert_problem(StatusCode::CONFLICT, Problem::RESPONSE_NOT_STORED);
    assert!(retry.json()["detail"].as_str().unwrap().contains("201"));
    assert_eq!(script.runs(), 1);
    assert_no_claims(&store, "a streamed response over the limit");
}

async fn response_announcing_a_length_over_the_limit_reaches_the_client_whole(mode: Mode) {
    let (idem, store) = handle(mode, |b| b.max_response_bytes(1000));
    let script = Script::new();
    let app = app(&idem, &script);
    let first = send(&app, keyed_bytes("/respond/declared", "declared", "5000")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.body, pattern(5000, 3));
    let retry = send(&app, keyed_bytes("/respond/declared", "declared", "5000")).await;
    retry.assert_problem(StatusCode::CONFLICT, Problem::RESPONSE_NOT_STORED);
    let small = send(
        &app,
        keyed_bytes("/respond/declared", "declared-small", "900"),
    )
    .await;
    assert_eq!(small.body, pattern(900, 3));
    let replay = send(
        &app,
        keyed_bytes("/respond/declared", "declared-small", "900"),
    )
    .await;
    assert!(replay.is_replay());
    assert_eq!(replay.body, pattern(900, 3));
    assert_eq!(script.runs(), 2);
    assert_no_claims(&store, "announced responses");
}

async fn failing_response_body_is_502_and_never_reruns(mode: Mode) {
    let (idem, store) = handle(mode, |b| b.max_response_bytes(1000));
    let script = Script::new();
    let app = app(&idem, &script);
    let first = send(&app, keyed_bytes("/respond/broken", "broken", "350")).await;
    first.assert_problem(StatusCode::BAD_GATEWAY, Problem::RESPONSE_NOT_STORED);
    let retry = send(&app, keyed_bytes("/respond/broken", "broken", "350")).await;
    retry.assert_problem(StatusCode::CONFLICT, Problem::RESPONSE_NOT_STORED);
    assert_eq!(script.runs(), 1);
    assert_no_claims(&store, "a failing response");
}

/// A response that passes the limit then fails: the client gets the bytes before the
/// failure, in order, then the failure; a retry is told the response was not stored.
async fn response_failing_after_the_limit_gives_the_client_its_bytes_then_the_error(mode: Mode) {
    let (idem, store) = handle(mode, |b| b.max_response_bytes(1000));
    let script = Script::new();
    let app = app(&idem, &script);
    let response = app
        .clone()
        .oneshot(keyed_bytes("/respond/broken", "broken-big", "1500"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (bytes, error) = drain(response.into_body()).await;
    assert_eq!(bytes, pattern(1500, 11), "the bytes before the failure");
    assert!(error.is_some(), "the failure reaches the client");
    let retry = send(&app, keyed_bytes("/respond/broken", "broken-big", "1500")).await;
    retry.assert_problem(StatusCode::CONFLICT, Problem::RESPONSE_NOT_STORED);
    assert_eq!(script.runs(), 1);
    assert_no_claims(&store, "a response failing after the limit");
}

// ---------------------------------------------------------------------------------------
// Guarantee: hang-ups.
// ---------------------------------------------------------------------------------------

on_both_paths!(
    hang_up_while_the_body_is_read_claims_nothing_and_the_retry_runs,
    request_future_dropped_before_its_body_ends_leaves_no_trace,
    hang_up_mid_handler_completes_detached_and_the_retry_replays,
    hang_up_while_the_response_is_collected_stores_it_whole,
);

/// The client hangs up while idem collects the handler's streamed response: the
/// collection goes on detached, the whole response is stored, and the retry replays it.
async fn hang_up_while_the_response_is_collected_stores_it_whole(mode: Mode) {
    let (idem, store) = handle(mode, |b| b);
    let script = Script::new();
    let app = app(&idem, &script);
    let client = tokio::spawn({
        let app = app.clone();
        async move { send(&app, keyed_bytes("/respond/gated", "mid-body", "")).await }
    });
    script.started.notified().await;
    client.abort();
    assert!(client.await.unwrap_err().is_cancelled());
    send_now(&app, keyed_bytes("/respond/gated", "mid-body", ""))
        .await
        .assert_problem(StatusCode::CONFLICT, Problem::IN_FLIGHT);
    script.open();
    assert_eq!(idem.shutdown(Duration::from_secs(10)).await, 0);
    no_claims_eventually(&store).await;
    let retry = send(&app, keyed_bytes("/respond/gated", "mid-body", "")).await;
    assert!(retry.is_replay(), "{retry:?}");
    assert_eq!(text(&retry), "part one;part two");
    assert_eq!(script.runs(), 1);
}

/// The client hangs up (its task aborted) while the layer reads its body: the body is
/// dropped, nothing ran, nothing is claimed or stored, and the retry runs.
async fn hang_up_while_the_body_is_read_claims_nothing_and_the_retry_runs(mode: Mode) {
    let (idem, store) = handle(mode, |b| b);
    let script = Script::new();
    let app = app(&idem, &script);
    let (tx, waiting, body) = channel_body();
    let client = tokio::spawn({
        let app = app.clone();
        async move { send(&app, keyed("/echo", "gone", body)).await }
    });
    waiting.notified().await;
    tx.send(Bytes::from_static(b"first half;")).unwrap();
    waiting.notified().await;
    client.abort();
    assert!(client.await.unwrap_err().is_cancelled());
    tokio::time::timeout(Duration::from_secs(10), tx.closed())
        .await
        .expect("the body was dropped with the request");
    assert_eq!(script.runs(), 0);
    assert_no_claims(&store, "a hang-up while the body was read");
    assert_entries(&store, 0, "a hang-up while the body was read");
    assert_eq!(
        idem.shutdown(Duration::ZERO).await,
        0,
        "nothing is left under way"
    );
    let retry = send(&app, keyed_bytes("/echo", "gone", "first half;second half")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert!(!retry.is_replay());
    assert_eq!(text(&retry), "first half;second half");
    assert_eq!(script.runs(), 1);
}

/// The request's future is polled once (the layer now waits for the body) and dropped:
/// the body goes with it at once and the key stays free.
async fn request_future_dropped_before_its_body_ends_leaves_no_trace(mode: Mode) {
    let (idem, store) = handle(mode, |b| b);
    let script = Script::new();
    let app = app(&idem, &script);
    for round in 0..3 {
        let (tx, waiting, body) = channel_body();
        tx.send(Bytes::from(pattern(100, round))).unwrap();
        let mut future = Box::pin(app.clone().oneshot(keyed("/echo", "dropped", body)));
        let first = std::future::poll_fn(|cx| Poll::Ready(future.as_mut().poll(cx))).await;
        assert!(first.is_pending(), "round {round}");
        // The layer polled the body for its second chunk.
        tokio::time::timeout(Duration::from_secs(10), waiting.notified())
            .await
            .expect("the body was read");
        drop(future);
        assert!(
            tx.is_closed(),
            "round {round}: the body outlived its request"
        );
        assert_eq!(script.runs(), 0);
        assert_no_claims(&store, "a dropped request");
    }
    let retry = send(&app, keyed_bytes("/echo", "dropped", "whole")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert!(!retry.is_replay());
}

/// The client hangs up while its handler runs: the work goes on detached, its response is
/// stored, its claim let go, and the retry replays it without running again.
async fn hang_up_mid_handler_completes_detached_and_the_retry_replays(mode: Mode) {
    let (idem, store) = handle(mode, |b| b);
    let script = Script::new();
    let app = app(&idem, &script);
    let client = tokio::spawn({
        let app = app.clone();
        async move { send(&app, keyed_bytes("/held", "detached", "work")).await }
    });
    script.started.notified().await;
    client.abort();
    assert!(client.await.unwrap_err().is_cancelled());
    send_now(&app, keyed_bytes("/held", "detached", "work"))
        .await
        .assert_problem(StatusCode::CONFLICT, Problem::IN_FLIGHT);
    script.open();
    assert_eq!(
        idem.shutdown(Duration::from_secs(10)).await,
        0,
        "the detached work settled"
    );
    no_claims_eventually(&store).await;
    let retry = send(&app, keyed_bytes("/held", "detached", "work")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert!(retry.is_replay(), "{retry:?}");
    assert_eq!(text(&retry), "run 1: work");
    assert_eq!(script.runs(), 1);
    assert_entries(&store, 1, "the detached work");
}

// ---------------------------------------------------------------------------------------
// Guarantee: panics release the key.
// ---------------------------------------------------------------------------------------

on_both_paths!(
    handler_panic_releases_the_key_and_the_retry_runs,
    server_error_releases_the_key_and_the_retry_runs,
    rejected_extractor_releases_the_key_at_once,
);

/// A 5xx is not stored: the key is released before the answer, and the retry runs.
async fn server_error_releases_the_key_and_the_retry_runs(mode: Mode) {
    let (idem, store) = handle(mode, |b| b);
    let script = Script::new();
    let app = app(&idem, &script);
    let first = send(&app, keyed_bytes("/fail", "5xx", "")).await;
    assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(text(&first), "try again");
    assert_no_claims(&store, "a 5xx");
    let retry = send(&app, keyed_bytes("/fail", "5xx", "")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert!(!retry.is_replay());
    let replay = send(&app, keyed_bytes("/fail", "5xx", "")).await;
    assert!(replay.is_replay());
    assert_eq!(text(&replay), "run 2");
    assert_eq!(script.runs(), 2);
    assert_no_claims(&store, "a 5xx and its retry");
}

/// An extractor after `Idempotent` rejects the request: the key is released before the
/// rejection is answered, so a corrected retry runs at once.
async fn rejected_extractor_releases_the_key_at_once(mode: Mode) {
    let (idem, store) = handle(mode, |b| b);
    let script = Script::new();
    let app = app(&idem, &script);
    let mut rejected = keyed_bytes("/typed", "typed", "{\"a\":1}");
    rejected
        .headers_mut()
        .insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
    assert_eq!(
        send(&app, rejected).await.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    assert_no_claims(&store, "a rejection");
    let mut corrected = keyed_bytes("/typed", "typed", "{\"a\":1}");
    corrected
        .headers_mut()
        .insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
    let answer = send(&app, corrected).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{answer:?}");
    assert_eq!(answer.json(), serde_json::json!({"a": 1}));
}

async fn handler_panic_releases_the_key_and_the_retry_runs(mode: Mode) {
    let (idem, store) = handle(mode, |b| b);
    let script = Script::new();
    let app = app(&idem, &script);
    let panicked = tokio::spawn({
        let app = app.clone();
        async move { send(&app, keyed_bytes("/panic", "boom", "")).await }
    })
    .await;
    assert!(
        panicked
            .expect_err("the panic reaches the caller")
            .is_panic()
    );
    no_claims_eventually(&store).await;
    let retry = send(&app, keyed_bytes("/panic", "boom", "")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert_eq!(text(&retry), "run 2");
    let replay = send(&app, keyed_bytes("/panic", "boom", "")).await;
    assert!(replay.is_replay());
    assert_eq!(text(&replay), "run 2");
    assert_eq!(script.runs(), 2);
    assert_no_claims(&store, "a panic and its retry");
}

// ---------------------------------------------------------------------------------------
// Guarantee: the memory store's bounds (direct path).
// ---------------------------------------------------------------------------------------

/// Every outcome gives its claim back: a stored response, a replay, 422, 5xx, a panic,
/// 413, 400 on a failing body, an extractor's rejection, 409 in flight, a hang-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_return_to_zero_after_every_outcome() {
    let (idem, store) = handle(Mode::Given, |b| b.max_request_bytes(100));
    let store = store.unwrap();
    let script = Script::new();
    let app = app(&idem, &script);
    let check = |after: &str| assert_eq!(store.claim_count(), 0, "after {after}");

    assert_eq!(
        send(&app, keyed_bytes("/echo", "ok", "1")).await.status,
        StatusCode::CREATED
    );
    check("a stored response");
    assert!(
        send(&app, keyed_bytes("/echo", "ok", "1"))
            .await
            .is_replay()
    );
    check("a replay");
    send(&app, keyed_bytes("/echo", "ok", "2"))
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY, Problem::KEY_REUSED);
    check("a 422");
    assert_eq!(
        send(&app, keyed_bytes("/fail", "5xx", "")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    check("a 5xx");
    let _ = tokio::spawn({
        let app = app.clone();
        async move { send(&app, keyed_bytes("/panic", "panic", "")).await }
    })
    .await;
    until(|| store.claim_count() == 0).await;
    send(&app, keyed_bytes("/echo", "big", vec![0u8; 101]))
        .await
        .assert_problem(StatusCode::PAYLOAD_TOO_LARGE, Problem::BODY_TOO_LARGE);
    check("a 413");
    let failing = Body::from_stream(futures_util::stream::iter(vec![
        Ok(Bytes::from_static(b"x")),
        Err(io::Error::other("broke")),
    ]));
    send(&app, keyed("/echo", "bad-body", failing))
        .await
        .assert_problem(StatusCode::BAD_REQUEST, Problem::BODY_UNREADABLE);
    check("a 400");
    let mut rejected = keyed_bytes("/typed", "typed", "{}");
    rejected
        .headers_mut()
        .insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
    assert_eq!(
        send(&app, rejected).await.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    check("an extractor's rejection");

    let holder = tokio::spawn({
        let app = app.clone();
        async move { send(&app, keyed_bytes("/held", "held", "")).await }
    });
    script.started.notified().await;
    assert_eq!(store.claim_count(), 1, "one execution in flight");
    send_now(&app, keyed_bytes("/held", "held", ""))
        .await
        .assert_problem(StatusCode::CONFLICT, Problem::IN_FLIGHT);
    assert_eq!(store.claim_count(), 1, "a 409 takes no claim");
    script.open();
    assert_eq!(holder.await.unwrap().status, StatusCode::CREATED);
    check("a held execution");

    let (tx, waiting, body) = channel_body();
    let client = tokio::spawn({
        let app = app.clone();
        async move { send(&app, keyed("/echo", "hung-up", body)).await }
    });
    waiting.notified().await;
    client.abort();
    let _ = client.await;
    drop(tx);
    check("a hang-up");
    store.run_pending_tasks();
    // Only `ok` and `held` completed; every other key was released or never claimed.
    assert_eq!(store.entry_count(), 2, "records: `ok` and `held`");
}

/// A store of 40 records holds at most 40 after 300 keys ran; the latest is replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_count_stays_within_its_bound_on_the_direct_path() {
    let store = MemoryStore::with_bounds(40, 1 << 20).unwrap();
    let idem = test_builder(Idempotency::builder().store(store.clone())).build();
    let script = Script::new();
    let app = app(&idem, &script);
    for n in 0..300 {
        let answer = send(
            &app,
            keyed_bytes("/echo", &format!("key-{n}"), n.to_string()),
        )
        .await;
        assert_eq!(answer.status, StatusCode::CREATED, "key {n}: {answer:?}");
        assert!(
            store.entry_count() <= 40,
            "{} records after key {n}",
            store.entry_count()
        );
        assert_eq!(store.claim_count(), 0);
    }
    let latest = send(&app, keyed_bytes("/echo", "key-299", "299")).await;
    assert!(latest.is_replay());
    assert_eq!(text(&latest), "299");
    assert_eq!(script.runs(), 300);
}

/// A claim bound of 2, both held by executors that died (claims taken through the trait
/// with a 1.5 s lease): a new key is refused 503, then admitted once they expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_claim_map_admits_claims_once_dead_claims_expire() {
    let store = MemoryStore::with_limits(1000, 1 << 20, 2).unwrap();
    let idem = test_builder(Idempotency::builder().store(store.clone())).build();
    let script = Script::new();
    let app = app(&idem, &script);
    let lease = Duration::from_millis(1500);
    for key in ["dead-1", "dead-2"] {
        let claim = Bytes::from(format!("claim of {key}"));
        assert_eq!(store.begin(key, &claim, lease).await.unwrap(), None);
    }
    assert_eq!(store.claim_count(), 2);
    let refused = send(&app, keyed_bytes("/echo", "fresh", "x")).await;
    refused.assert_problem(StatusCode::SERVICE_UNAVAILABLE, Problem::STORE_UNAVAILABLE);
    assert_eq!(script.runs(), 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let admitted = loop {
        let answer = send(&app, keyed_bytes("/echo", "fresh", "x")).await;
        if answer.status != StatusCode::SERVICE_UNAVAILABLE {
            break answer;
        }
        assert!(tokio::time::Instant::now() < deadline, "never admitted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(admitted.status, StatusCode::CREATED, "{admitted:?}");
    assert!(!admitted.is_replay());
    assert_eq!(script.runs(), 1);
    assert_eq!(
        store.claim_count(),
        0,
        "the dead claims were dropped and the live one completed"
    );
}

/// A claim bound of 2, both held by live executions: a third key is refused 503 (never
/// run), and admitted once they finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_claim_map_admits_claims_once_executions_finish() {
    let store = MemoryStore::with_limits(1000, 1 << 20, 2).unwrap();
    let idem = test_builder(Idempotency::builder().store(store.clone())).build();
    let script = Script::new();
    let app = app(&idem, &script);
    let holders: Vec<_> = ["one", "two"]
        .into_iter()
        .map(|key| {
            let app = app.clone();
            tokio::spawn(async move { send(&app, keyed_bytes("/held", key, key)).await })
        })
        .collect();
    until(|| script.runs() == 2).await;
    assert_eq!(store.claim_count(), 2);
    send(&app, keyed_bytes("/echo", "third", "x"))
        .await
        .assert_problem(StatusCode::SERVICE_UNAVAILABLE, Problem::STORE_UNAVAILABLE);
    assert_eq!(script.runs(), 2, "the refused key did not run");
    script.open();
    for holder in holders {
        assert_eq!(holder.await.unwrap().status, StatusCode::CREATED);
    }
    assert_eq!(store.claim_count(), 0);
    let third = send(&app, keyed_bytes("/echo", "third", "x")).await;
    assert_eq!(third.status, StatusCode::CREATED, "{third:?}");
    assert_eq!(store.claim_count(), 0);
    store.run_pending_tasks();
    assert_eq!(store.entry_count(), 3);
}

/// `.store(a)` then `.shared_store(b)`: every step goes to `b`; the reverse order, to `a`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_store_given_to_the_builder_takes_every_step() {
    let script = Script::new();
    let (a, b) = (MemoryStore::new(), MemoryStore::new());
    let idem = test_builder(
        Idempotency::builder()
            .store(a.clone())
            .shared_store(Arc::new(b.clone())),
    )
    .build();
    let app = app(&idem, &script);
    assert_eq!(
        send(&app, keyed_bytes("/echo", "k", "1")).await.status,
        StatusCode::CREATED
    );
    assert!(send(&app, keyed_bytes("/echo", "k", "1")).await.is_replay());
    assert_eq!(
        (a.entry_count(), b.entry_count()),
        (0, 1),
        "store then shared_store"
    );

    let (a, b) = (MemoryStore::new(), MemoryStore::new());
    let idem = test_builder(
        Idempotency::builder()
            .shared_store(Arc::new(b.clone()))
            .store(a.clone()),
    )
    .build();
    let app = self::app(&idem, &script);
    assert_eq!(
        send(&app, keyed_bytes("/echo", "k", "1")).await.status,
        StatusCode::CREATED
    );
    assert!(send(&app, keyed_bytes("/echo", "k", "1")).await.is_replay());
    assert_eq!(
        (a.entry_count(), b.entry_count()),
        (1, 0),
        "shared_store then store"
    );
    // What the handle's `store()` answers is the store the steps went to.
    let claim = Bytes::from_static(b"probe");
    let found = idem
        .store()
        .begin("unrelated", &claim, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(found, None);
    assert_eq!(
        a.claim_count(),
        1,
        "`Idempotency::store()` is the given store"
    );
}

// ---------------------------------------------------------------------------------------
// The lease on the direct path.
// ---------------------------------------------------------------------------------------

on_both_paths!(a_held_key_outlives_its_lease_on_the_direct_path);

/// A 600 ms lease, a handler held for three of them: the renewals (direct calls) keep the
/// key, so every probe is told `409 in flight`, and the response is replayed after.
async fn a_held_key_outlives_its_lease_on_the_direct_path(mode: Mode) {
    let (idem, store) = handle(mode, |b| b.lease(Duration::from_millis(600)));
    let script = Script::new();
    let app = app(&idem, &script);
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, keyed_bytes("/held", "lease", "x")).await }
    });
    script.started.notified().await;
    for _ in 0..4 {
        // Time passes, over several leases: this sleep is the thing under test.
        tokio::time::sleep(Duration::from_millis(450)).await;
        send_now(&app, keyed_bytes("/held", "lease", "x"))
            .await
            .assert_problem(StatusCode::CONFLICT, Problem::IN_FLIGHT);
    }
    script.open();
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    let replay = send(&app, keyed_bytes("/held", "lease", "x")).await;
    assert!(replay.is_replay());
    assert_eq!(replay.body, first.body);
    assert_eq!(script.runs(), 1);
    assert_no_claims(&store, "a renewed execution");
}

// ---------------------------------------------------------------------------------------
// The layer over a bare tower service.
// ---------------------------------------------------------------------------------------

/// The layer over a `service_fn` (no axum `Router`): its future is the public, `Send`
/// `IdempotencyFuture`; a keyed request's body, chunked, reaches the service whole; an
/// unkeyed one as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layer_over_a_bare_service_hands_it_the_whole_body() {
    use std::convert::Infallible;

    use tower::{Layer, Service};

    fn assert_send<T: Send>(_: &T) {}

    let idem = Idempotency::in_memory();
    let inner = tower::service_fn(|request: Request| async move {
        let (bytes, error) = drain(request.into_body()).await;
        assert!(error.is_none());
        Ok::<_, Infallible>((StatusCode::OK, bytes).into_response())
    });
    let mut service = idem.layer().layer(inner);
    let data = pattern(3000, 9);
    for key in [Some("bare"), None] {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri("/bare")
            .body(Trickle::of(&split_even(&data, 11)).into_body())
            .unwrap();
        if let Some(key) = key {
            request
                .headers_mut()
                .insert("idempotency-key", HeaderValue::from_static(key));
        }
        let future: idem_runtime::http::IdempotencyFuture<_> =
            service.ready().await.unwrap().call(request);
        assert_send(&future);
        assert!(format!("{future:?}").contains("IdempotencyFuture"));
        let answer = common::read(future.await.unwrap()).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.body, data, "key {key:?}");
    }
}
