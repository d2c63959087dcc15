//! What idem's extractors share on one request: the scoped key as read before and after
//! authentication, two guards on one request, the transaction slot and its "finished by
//! idem" flag, and the replay that decodes a record straight into the response's header
//! map (damaged records and responses with many header values included).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use common::{Answer, read, send};
use idem_runtime::store::{BoxFuture, MemoryStore, Store, StoreError};
use idem_runtime::{
    HeaderPolicy, Idempotency, Idempotent, Principal, Problem, ScopedKey, idempotent,
};
use tokio::sync::Notify;
use tower::ServiceExt;

// ---------------------------------------------------------------------------------------
// The app: an authentication extractor, handlers that take the key in every order.

/// `x-api-key: user` (no `Authorization` header involved) or `Authorization: Bearer
/// user.nonce` (a refreshed token keeps the user); the user becomes the principal.
struct Caller;

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = StatusCode;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, StatusCode> {
        let user = if let Some(user) = parts.headers.get("x-api-key") {
            user.to_str()
                .map_err(|_| StatusCode::UNAUTHORIZED)?
                .to_owned()
        } else {
            let token = parts
                .headers
                .get(header::AUTHORIZATION)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.strip_prefix("Bearer "))
                .ok_or(StatusCode::UNAUTHORIZED)?;
            let (user, _nonce) = token.split_once('.').ok_or(StatusCode::UNAUTHORIZED)?;
            user.to_owned()
        };
        parts.extensions.insert(Principal::new(user));
        Ok(Self)
    }
}

/// Counts each route's effects, and holds gated work until the test lets it go.
#[derive(Clone, Default)]
struct Effects {
    runs: Arc<Mutex<HashMap<&'static str, usize>>>,
    started: Arc<Notify>,
    gate: Arc<Notify>,
    give_up: Arc<Notify>,
}

impl Effects {
    fn runs(&self, route: &str) -> usize {
        self.runs.lock().unwrap().get(route).copied().unwrap_or(0)
    }

    /// The effect: counted, answered with the keys the handler and its guard saw.
    fn effect(&self, route: &'static str, handler: String, guard: String) -> Response {
        let run = {
            let mut runs = self.runs.lock().unwrap();
            let run = runs.entry(route).or_default();
            *run += 1;
            *run
        };
        let body = serde_json::json!({ "handler": handler, "guard": guard, "run": run });
        (StatusCode::CREATED, axum::Json(body)).into_response()
    }
}

fn describe(key: Option<&ScopedKey>) -> String {
    key.map_or_else(|| "none".to_owned(), |key| key.as_str().to_owned())
}

/// A second guard, taken by hand beside `#[idempotent]` (which refuses an argument it can
/// see is an `Idempotent`, not one behind an alias).
type Guard = Idempotent;

async fn key_before(
    key: ScopedKey,
    _caller: Caller,
    State(effects): State<Effects>,
    idem: Idempotent,
    _body: String,
) -> Response {
    let guard = describe(idem.key());
    idem.run(async move { effects.effect("key_before", describe(Some(&key)), guard) })
        .await
}

async fn opt_before(
    key: Option<ScopedKey>,
    _caller: Caller,
    State(effects): State<Effects>,
    idem: Idempotent,
    _body: String,
) -> Response {
    let guard = describe(idem.key());
    idem.run(async move { effects.effect("opt_before", describe(key.as_ref()), guard) })
        .await
}

async fn opt_before_required(
    key: Option<ScopedKey>,
    _caller: Caller,
    State(effects): State<Effects>,
    idem: Idempotent<60, true>,
    _body: String,
) -> Response {
    let guard = describe(idem.key());
    idem.run(async move { effects.effect("opt_before_required", describe(key.as_ref()), guard) })
        .await
}

/// Both forms: `Option<ScopedKey>` before authentication, `ScopedKey` after it.
async fn opt_then_key(
    early: Option<ScopedKey>,
    _caller: Caller,
    _late: ScopedKey,
    State(effects): State<Effects>,
    idem: Idempotent,
    _body: String,
) -> Response {
    let guard = describe(idem.key());
    idem.run(async move { effects.effect("opt_then_key", describe(early.as_ref()), guard) })
        .await
}

/// Two guards, authentication between them.
async fn guard_auth_guard(
    outer: Idempotent,
    _caller: Caller,
    State(effects): State<Effects>,
    inner: Idempotent,
    _body: String,
) -> Response {
    let guard = describe(outer.key());
    let handler = describe(inner.key());
    outer
        .run(async move {
            inner
                .run(async move { effects.effect("guard_auth_guard", handler, guard) })
                .await
        })
        .await
}

#[idempotent]
async fn macro_opt_before(
    key: Option<ScopedKey>,
    _caller: Caller,
    extra: Guard,
    State(effects): State<Effects>,
    _body: String,
) -> Response {
    let guard = describe(extra.key());
    extra
        .run(async move { effects.effect("macro_opt_before", describe(key.as_ref()), guard) })
        .await
}

#[idempotent]
async fn macro_key_before(
    key: ScopedKey,
    extra: Guard,
    _caller: Caller,
    State(effects): State<Effects>,
    _body: String,
) -> Response {
    let guard = describe(extra.key());
    extra
        .run(async move { effects.effect("macro_key_before", describe(Some(&key)), guard) })
        .await
}

async fn key_after(
    _caller: Caller,
    key: ScopedKey,
    State(effects): State<Effects>,
    idem: Idempotent,
    _body: String,
) -> Response {
    let guard = describe(idem.key());
    idem.run(async move { effects.effect("key_after", describe(Some(&key)), guard) })
        .await
}

async fn opt_after(
    _caller: Caller,
    key: Option<ScopedKey>,
    State(effects): State<Effects>,
    idem: Idempotent,
    _body: String,
) -> Response {
    let guard = describe(idem.key());
    idem.run(async move { effects.effect("opt_after", describe(key.as_ref()), guard) })
        .await
}

/// The key taken after the guard.
async fn key_after_guard(
    _caller: Caller,
    State(effects): State<Effects>,
    idem: Idempotent,
    key: ScopedKey,
    _body: String,
) -> Response {
    let guard = describe(idem.key());
    idem.run(async move { effects.effect("key_after_guard", describe(Some(&key)), guard) })
        .await
}

#[idempotent]
async fn macro_key_after(
    _caller: Caller,
    key: Option<ScopedKey>,
    extra: Guard,
    State(effects): State<Effects>,
    _body: String,
) -> Response {
    let guard = describe(extra.key());
    extra
        .run(async move { effects.effect("macro_key_after", describe(key.as_ref()), guard) })
        .await
}

/// Two guards; the one extracted first is dropped, the second runs the work.
async fn first_guard_dropped(
    first: Idempotent,
    second: Idempotent,
    State(effects): State<Effects>,
    _body: String,
) -> Response {
    drop(first);
    let guard = describe(second.key());
    second
        .run(async move { effects.effect("first_guard_dropped", "-".into(), guard) })
        .await
}

/// As `first_guard_dropped`, with the first guard's `run` called and its future dropped
/// before it was polled.
async fn first_run_dropped(
    first: Idempotent,
    second: Idempotent,
    State(effects): State<Effects>,
    _body: String,
) -> Response {
    let unpolled = first.run(async { StatusCode::IM_A_TEAPOT });
    drop(unpolled);
    let guard = describe(second.key());
    second
        .run(async move { effects.effect("first_run_dropped", "-".into(), guard) })
        .await
}

/// Two guards: the first one's `run` is given up on by the handler (a timeout, a
/// `select!`) when the test says so, and the handler falls back to the second with the
/// same work.
async fn first_given_up(
    first: Idempotent,
    second: Idempotent,
    State(effects): State<Effects>,
    _body: String,
) -> Response {
    // The first run waits for the gate; any other ends at once.
    let work = |effects: Effects| async move {
        let answer = effects.effect("first_given_up", "-".into(), "-".into());
        if effects.runs("first_given_up") == 1 {
            effects.started.notify_one();
            effects.gate.notified().await;
        }
        answer
    };
    tokio::select! {
        biased;
        answer = first.run(work(effects.clone())) => return answer,
        () = effects.give_up.notified() => {}
    }
    second.run(work(effects)).await
}

/// Two guards run side by side, each with the same work.
async fn guards_joined(
    first: Idempotent,
    second: Idempotent,
    State(effects): State<Effects>,
    _body: String,
) -> Response {
    let work =
        |effects: Effects| async move { effects.effect("guards_joined", "-".into(), "-".into()) };
    let (first, second) = tokio::join!(first.run(work(effects.clone())), second.run(work(effects)));
    let (first, second) = (read(first).await, read(second).await);
    let body = serde_json::json!({
        "first": [first.status.as_u16(), first.is_replay(), String::from_utf8_lossy(&first.body)],
        "second": [second.status.as_u16(), second.is_replay(), String::from_utf8_lossy(&second.body)],
    });
    (StatusCode::OK, axum::Json(body)).into_response()
}

/// `#[idempotent]` with a guard of its own inside; the work waits for the test's gate.
#[idempotent]
async fn doubled_gated(extra: Guard, State(effects): State<Effects>, _body: String) -> Response {
    let guard = describe(extra.key());
    extra
        .run(async move {
            let answer = effects.effect("doubled_gated", "-".into(), guard);
            effects.started.notify_one();
            effects.gate.notified().await;
            answer
        })
        .await
}

const SCOPE_ROUTES: &[&str] = &[
    "key_before",
    "opt_before",
    "opt_before_required",
    "guard_auth_guard",
    "macro_opt_before",
    "macro_key_before",
];

const AFTER_ROUTES: &[&str] = &[
    "key_after",
    "opt_after",
    "key_after_guard",
    "macro_key_after",
];

fn app(idem: &Idempotency, effects: &Effects) -> Router {
    Router::new()
        .route("/key_before", post(key_before))
        .route("/opt_before", post(opt_before))
        .route("/opt_before_required", post(opt_before_required))
        .route("/opt_then_key", post(opt_then_key))
        .route("/guard_auth_guard", post(guard_auth_guard))
        .route("/macro_opt_before", post(macro_opt_before))
        .route("/macro_key_before", post(macro_key_before))
        .route("/key_after", post(key_after))
        .route("/opt_after", post(opt_after))
        .route("/key_after_guard", post(key_after_guard))
        .route("/macro_key_after", post(macro_key_after))
        .route("/first_guard_dropped", post(first_guard_dropped))
        .route("/first_run_dropped", post(first_run_dropped))
        .route("/doubled_gated", post(doubled_gated))
        .route("/first_given_up", post(first_given_up))
        .route("/guards_joined", post(guards_joined))
        .with_state(effects.clone())
        .layer(idem.layer())
}

#[derive(Clone, Copy, Debug)]
enum Auth<'a> {
    Bearer(&'a str),
    ApiKey(&'a str),
    Nobody,
}

fn request(path: &str, auth: Auth<'_>, key: Option<&str>) -> Request {
    let mut builder = axum::http::Request::post(path).header(header::HOST, "api.example");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder = match auth {
        Auth::Bearer(token) => builder.header(header::AUTHORIZATION, format!("Bearer {token}")),
        Auth::ApiKey(user) => builder.header("x-api-key", user),
        Auth::Nobody => builder,
    };
    builder.body(Body::from("{}")).unwrap()
}

fn problem_type(answer: &Answer) -> String {
    serde_json::from_slice::<serde_json::Value>(&answer.body)
        .ok()
        .and_then(|json| json["type"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn text(answer: &Answer) -> String {
    String::from_utf8_lossy(&answer.body).into_owned()
}

/// A memory store that records every key `begin` is asked about and, with `corrupt`,
/// stores that function of a completed response's record in its place.
#[derive(Clone, Default)]
struct Watched {
    inner: MemoryStore,
    begun: Arc<Mutex<Vec<String>>>,
    corrupt: Option<Corruption>,
}

/// What a completed record becomes in the store.
type Corruption = fn(&[u8]) -> Vec<u8>;

impl Store for Watched {
    fn begin<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        self.begun.lock().unwrap().push(key.to_owned());
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
        let record = match self.corrupt {
            // Kind 2: a completed response.
            Some(corrupt) if record.get(5) == Some(&2) => Bytes::from(corrupt(&record)),
            _ => record,
        };
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

// ---------------------------------------------------------------------------------------
// 1. Scope conflict.

/// Attack: the key taken (as `ScopedKey`, `Option<ScopedKey>`, or by a first guard)
/// before the extractor that authenticates, in every handler form, with bearer tokens
/// (a scope before authentication: the token's) and API keys (none, or the shared one),
/// on handles with and without a shared scope, each request sent twice. Held: never run;
/// the guard answers 500 `scope-conflict`, except where no scope exists before
/// authentication and `ScopedKey` (or the first guard) refuses with a 4xx problem.
#[tokio::test]
async fn the_key_taken_before_authentication_never_runs() {
    let mut failures = Vec::new();
    for shared in [false, true] {
        let idem = Idempotency::builder().shared_scope(shared).build();
        let effects = Effects::default();
        let app = app(&idem, &effects);
        for route in SCOPE_ROUTES {
            for (n, auth) in [Auth::Bearer("alice.t1"), Auth::ApiKey("alice")]
                .into_iter()
                .enumerate()
            {
                for attempt in 0..2 {
                    let key = format!("before-{route}-{n}");
                    let answer = send(&app, request(&format!("/{route}"), auth, Some(&key))).await;
                    let kind = problem_type(&answer);
                    let conflict = answer.status == StatusCode::INTERNAL_SERVER_ERROR
                        && kind == Problem::SCOPE_CONFLICT;
                    // Where nothing gives a scope before authentication (an API key, no
                    // shared scope), `ScopedKey` or a first guard refuses on its own.
                    let early = !shared
                        && matches!(auth, Auth::ApiKey(_))
                        && matches!(
                            *route,
                            "key_before" | "macro_key_before" | "guard_auth_guard"
                        );
                    let refused =
                        early && answer.status.is_client_error() && kind.starts_with("urn:idem");
                    if !(conflict || refused) {
                        failures.push(format!(
                            "shared={shared} /{route} {auth:?} attempt {attempt}: {} {}",
                            answer.status,
                            text(&answer)
                        ));
                    }
                }
                if effects.runs(route) != 0 {
                    failures.push(format!(
                        "shared={shared} /{route} {auth:?}: ran {} times",
                        effects.runs(route)
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Attack: `Option<ScopedKey>` read before authentication (an API key, no shared scope:
/// it reads `None`, and the request is marked), then `ScopedKey` after it, which scopes the
/// key by the principal, then the guard. The handler holds `None` for the key its database
/// guard needs, as in `tests/option_scoped_key.rs`, which the guard must refuse.
#[tokio::test]
async fn option_read_as_none_then_scoped_key_after_authentication_is_refused() {
    let idem = Idempotency::in_memory();
    let effects = Effects::default();
    let app = app(&idem, &effects);
    let answer = send(
        &app,
        request("/opt_then_key", Auth::ApiKey("alice"), Some("opt-then-key")),
    )
    .await;
    assert!(
        answer.status == StatusCode::INTERNAL_SERVER_ERROR
            && problem_type(&answer) == Problem::SCOPE_CONFLICT,
        "the handler's Option<ScopedKey> was read before authentication (None), yet the request \
         was not refused: {} {} (runs {})",
        answer.status,
        text(&answer),
        effects.runs("opt_then_key")
    );
    assert_eq!(effects.runs("opt_then_key"), 0);
}

/// Attack: key-less and malformed-key requests on every route where the key is taken
/// before authentication. Held: a malformed key never runs; a key-less request runs
/// unprotected only where nothing requires a key, once per request.
#[tokio::test]
async fn keyless_and_malformed_keys_before_authentication() {
    let idem = Idempotency::in_memory();
    let effects = Effects::default();
    let app = app(&idem, &effects);
    let malformed = "x".repeat(300);
    let mut failures = Vec::new();
    for route in SCOPE_ROUTES {
        let answer = send(
            &app,
            request(
                &format!("/{route}"),
                Auth::ApiKey("alice"),
                Some(&malformed),
            ),
        )
        .await;
        if !answer.status.is_client_error() || effects.runs(route) != 0 {
            failures.push(format!(
                "/{route} malformed key: {} {} runs {}",
                answer.status,
                text(&answer),
                effects.runs(route)
            ));
        }
        let keyless = send(
            &app,
            request(&format!("/{route}"), Auth::ApiKey("alice"), None),
        )
        .await;
        let may_run = matches!(
            *route,
            "opt_before" | "guard_auth_guard" | "macro_opt_before"
        );
        let ok = if may_run {
            keyless.status == StatusCode::CREATED && effects.runs(route) == 1
        } else {
            keyless.status.is_client_error() && effects.runs(route) == 0
        };
        if !ok {
            failures.push(format!(
                "/{route} no key: {} {} runs {}",
                keyless.status,
                text(&keyless),
                effects.runs(route)
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Attack: the key taken after authentication, before or after the guard, as
/// `ScopedKey` or `Option<ScopedKey>`, beside a second guard. Held: the handler's key,
/// the guard's and the one idem claims in the store are one; a refreshed token of the
/// same user replays; another user runs under a key of their own.
#[tokio::test]
async fn the_key_taken_after_authentication_is_the_recorded_key() {
    let store = Watched::default();
    let idem = Idempotency::builder().store(store.clone()).build();
    let effects = Effects::default();
    let app = app(&idem, &effects);
    let mut failures = Vec::new();
    for route in AFTER_ROUTES {
        let path = format!("/{route}");
        let key = format!("after-{route}");
        store.begun.lock().unwrap().clear();
        let first = send(&app, request(&path, Auth::Bearer("alice.t1"), Some(&key))).await;
        let json = first.json();
        let begun = store.begun.lock().unwrap().clone();
        if first.status != StatusCode::CREATED
            || json["handler"] != json["guard"]
            || begun.len() != 1
            || json["handler"] != begun[0].as_str()
            || !begun[0].ends_with(&format!(":{key}"))
        {
            failures.push(format!("{path}: {} {json} begun {begun:?}", first.status));
        }
        let refreshed = send(&app, request(&path, Auth::Bearer("alice.t2"), Some(&key))).await;
        if !refreshed.is_replay() || refreshed.body != first.body {
            failures.push(format!("{path}: refreshed token {}", text(&refreshed)));
        }
        let bob = send(&app, request(&path, Auth::ApiKey("bob"), Some(&key))).await;
        if bob.is_replay() || bob.json()["handler"] == json["handler"] {
            failures.push(format!("{path}: bob got {}", text(&bob)));
        }
        if effects.runs(route) != 2 {
            failures.push(format!("{path}: ran {} times", effects.runs(route)));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---------------------------------------------------------------------------------------
// 2. Two guards on one request.

/// Attack: `#[idempotent]` with a second guard of its own inside, eight concurrent
/// requests under one key while the first runs, then retries. Held: one run; the others
/// are told it is in flight or replay it; one record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_guards_run_the_work_once_under_concurrency() {
    let store = MemoryStore::new();
    let idem = Idempotency::builder()
        .shared_scope(true)
        .store(store.clone())
        .build();
    let effects = Effects::default();
    let app = app(&idem, &effects);
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request("/doubled_gated", Auth::Nobody, Some("d-1"))).await }
    });
    effects.started.notified().await;
    let concurrent: Vec<_> = (0..8)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                send(&app, request("/doubled_gated", Auth::Nobody, Some("d-1"))).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for answer in concurrent {
        answers.push(answer.await.unwrap());
    }
    effects.gate.notify_one();
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED, "{}", text(&first));
    for answer in &answers {
        answer.assert_problem(StatusCode::CONFLICT, Problem::IN_FLIGHT);
    }
    for _ in 0..3 {
        let retry = send(&app, request("/doubled_gated", Auth::Nobody, Some("d-1"))).await;
        assert!(retry.is_replay(), "{}", text(&retry));
        assert_eq!(retry.body, first.body);
    }
    assert_eq!(effects.runs("doubled_gated"), 1);
    store.run_pending_tasks();
    assert_eq!(store.claim_count(), 0, "no claim sticks");
}

/// Attack: two guards where the one extracted first is dropped and the second runs the
/// work: the second is then the first to run, and must protect it.
#[tokio::test]
async fn the_second_guard_protects_when_the_first_is_dropped() {
    let idem = Idempotency::builder().shared_scope(true).build();
    let effects = Effects::default();
    let app = app(&idem, &effects);
    let first = send(
        &app,
        request("/first_guard_dropped", Auth::Nobody, Some("g-1")),
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED);
    for _ in 0..3 {
        let retry = send(
            &app,
            request("/first_guard_dropped", Auth::Nobody, Some("g-1")),
        )
        .await;
        assert!(retry.is_replay(), "{}", text(&retry));
    }
    assert_eq!(effects.runs("first_guard_dropped"), 1);
}

/// Attack (a defect once shown): a guard whose `run` future is dropped before its first
/// poll takes nothing from the request: the second guard protects the work.
#[tokio::test]
async fn the_second_guard_protects_when_the_first_runs_future_is_dropped_unpolled() {
    let idem = Idempotency::builder().shared_scope(true).build();
    let effects = Effects::default();
    let app = app(&idem, &effects);
    let first = send(
        &app,
        request("/first_run_dropped", Auth::Nobody, Some("u-1")),
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED);
    for _ in 0..3 {
        let retry = send(
            &app,
            request("/first_run_dropped", Auth::Nobody, Some("u-1")),
        )
        .await;
        assert!(retry.is_replay(), "{}", text(&retry));
    }
    assert_eq!(effects.runs("first_run_dropped"), 1);
}

/// Attack (a defect once shown): a guard whose `run` future is polled, sends its claim and
/// is dropped before the claim is answered (here the claim is lost on its way) takes
/// nothing from the request: the second guard protects the work, and a retry replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_second_guard_protects_when_the_first_runs_future_is_dropped_mid_claim() {
    let store = MemoryStore::new();
    let gates = Arc::new(common::Gates::default());
    gates
        .hang_begins
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let idem = Idempotency::builder()
        .shared_scope(true)
        .store(common::Gated::new(Arc::new(store.clone()), gates.clone()))
        .build();
    let effects = Effects::default();
    let app = app(&idem, &effects);
    let request = || request("/first_given_up", Auth::Nobody, Some("m-1"));
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request()).await }
    });
    // The first guard's claim never answers: the handler gives up on it.
    effects.give_up.notify_one();
    effects.started.notified().await;
    effects.gate.notify_one();
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED, "{}", text(&first));
    for _ in 0..3 {
        let retry = send(&app, request()).await;
        assert!(retry.is_replay(), "{}", text(&retry));
        assert_eq!(retry.body, first.body);
    }
    assert_eq!(effects.runs("first_given_up"), 1);
}

/// Attack (a defect once shown): a guard given up on while its work runs leaves the work
/// running to the end (it holds the key); the second guard must not run it again beside
/// it. It is refused (`500`, a guard conflict), and the retry replays the first run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_guard_never_runs_the_work_beside_a_first_given_up_mid_work() {
    let store = MemoryStore::new();
    let idem = Idempotency::builder()
        .shared_scope(true)
        .store(store.clone())
        .build();
    let effects = Effects::default();
    let app = app(&idem, &effects);
    let request = || request("/first_given_up", Auth::Nobody, Some("w-1"));
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request()).await }
    });
    // The first guard's work runs; the handler gives up on it and tries the second.
    effects.started.notified().await;
    effects.give_up.notify_one();
    let first = first.await.unwrap();
    first.assert_problem(StatusCode::INTERNAL_SERVER_ERROR, Problem::GUARD_CONFLICT);
    assert_eq!(effects.runs("first_given_up"), 1);
    // The first run, on in a task of its own, ends and stores its response.
    effects.gate.notify_one();
    common::until(|| {
        store.run_pending_tasks();
        store.claim_count() == 0
    })
    .await;
    for _ in 0..3 {
        let retry = send(&app, request()).await;
        assert!(retry.is_replay(), "{}", text(&retry));
        assert_eq!(retry.status, StatusCode::CREATED);
    }
    assert_eq!(effects.runs("first_given_up"), 1);
}

/// Attack (a defect once shown): two guards of one request run side by side: the work
/// runs once, the other guard answers with its replay, and retries replay both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_guards_side_by_side_run_the_work_once() {
    let idem = Idempotency::builder().shared_scope(true).build();
    let effects = Effects::default();
    let app = app(&idem, &effects);
    let mut answers = Vec::new();
    for _ in 0..4 {
        let answer = send(&app, request("/guards_joined", Auth::Nobody, Some("j-1"))).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", text(&answer));
        answers.push(answer.json());
    }
    assert_eq!(effects.runs("guards_joined"), 1, "{answers:#?}");
    let ran = &answers[0]["first"];
    assert_eq!(ran[0], 201, "{answers:#?}");
    for answer in &answers {
        for guard in ["first", "second"] {
            assert_eq!(answer[guard][0], 201, "{answers:#?}");
            assert_eq!(
                answer[guard][2], ran[2],
                "one response for every guard: {answers:#?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// 4. Replay byte for byte, and records that do not read.

async fn many_headers(idem: Idempotent, State(effects): State<Effects>) -> Response {
    idem.run(async move {
        effects.effect("many_headers", String::new(), String::new());
        let mut headers = HeaderMap::new();
        headers.append(header::SET_COOKIE, HeaderValue::from_static("a=1; Path=/"));
        headers.append("x-multi", HeaderValue::from_static("one"));
        headers.append(
            header::SET_COOKIE,
            HeaderValue::from_static("b=2; HttpOnly"),
        );
        headers.append("x-multi", HeaderValue::from_static("two"));
        headers.append("x-empty", HeaderValue::from_static(""));
        headers.append(
            "x-bytes",
            HeaderValue::from_bytes(b"\x80\xff\ttab \x7e").unwrap(),
        );
        headers.append("x-multi", HeaderValue::from_static("three"));
        // The handler's own mark: the replay must carry exactly one, `true`.
        headers.append("idempotent-replayed", HeaderValue::from_static("false"));
        headers.append("idempotent-replayed", HeaderValue::from_static("maybe"));
        headers.append(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-raw"),
        );
        let body: Vec<u8> = (0..=255u8).chain([0, 0, 13, 10]).collect();
        (StatusCode::from_u16(299).unwrap(), headers, body)
    })
    .await
}

/// The header list as sent, without idem's mark.
fn listed(headers: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    headers
        .iter()
        .filter(|(name, _)| name.as_str() != "idempotent-replayed")
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}

/// Attack: repeated `set-cookie`, a multi-valued header interleaved with others, empty
/// and non-ASCII values, the handler's own `Idempotent-Replayed` (twice), an unusual
/// status and a binary body; replayed from the store and from the local tier. Held: the
/// same status, headers in order and body; exactly one `Idempotent-Replayed: true`.
#[tokio::test]
async fn a_replay_is_byte_for_byte_with_repeated_headers() {
    for local in [false, true] {
        let mut builder = Idempotency::builder()
            .shared_scope(true)
            .replay_headers(HeaderPolicy::all());
        if local {
            builder = builder.local_tier(1 << 20, Duration::from_secs(60));
        }
        let idem = builder.build();
        let effects = Effects::default();
        let app = Router::new()
            .route("/h", post(many_headers))
            .with_state(effects.clone())
            .layer(idem.layer());
        let first = send(&app, request("/h", Auth::Nobody, Some("h-1"))).await;
        assert_eq!(first.status.as_u16(), 299);
        for _ in 0..2 {
            let replay = send(&app, request("/h", Auth::Nobody, Some("h-1"))).await;
            assert_eq!(replay.status, first.status, "local={local}");
            assert_eq!(replay.body, first.body, "local={local}");
            assert_eq!(
                listed(&replay.headers),
                listed(&first.headers),
                "local={local}"
            );
            let marks: Vec<_> = replay
                .headers
                .get_all("idempotent-replayed")
                .iter()
                .collect();
            assert_eq!(marks, ["true"], "local={local}");
            assert_eq!(replay.headers.get_all(header::SET_COOKIE).iter().count(), 2);
        }
        assert_eq!(effects.runs("many_headers"), 1);
    }
}

/// Magic, version, kind, fingerprint and expiry of a completed record: what the protocol
/// reads before it answers a replay.
const HEAD: usize = 4 + 1 + 1 + 32 + 8;

fn with_tail(record: &[u8], tail: &[u8]) -> Vec<u8> {
    let mut out = record[..HEAD].to_vec();
    out.extend_from_slice(tail);
    out
}

fn huge_count(record: &[u8]) -> Vec<u8> {
    with_tail(record, &[0, 200, 0xff, 0xff])
}
fn count_past_max_size(record: &[u8]) -> Vec<u8> {
    with_tail(record, &[0, 200, 0x60, 0x00])
}
fn one_header_missing(record: &[u8]) -> Vec<u8> {
    with_tail(record, &[0, 200, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0])
}
fn bad_header_name(record: &[u8]) -> Vec<u8> {
    with_tail(
        record,
        &[
            0, 200, 0, 1, 0, 3, b'a', b' ', b'b', 0, 0, 0, 1, b'x', 0, 0, 0, 0, 0, 0, 0, 0,
        ],
    )
}
fn bad_header_value(record: &[u8]) -> Vec<u8> {
    with_tail(
        record,
        &[
            0, 200, 0, 1, 0, 1, b'x', 0, 0, 0, 1, b'\n', 0, 0, 0, 0, 0, 0, 0, 0,
        ],
    )
}
fn value_past_the_end(record: &[u8]) -> Vec<u8> {
    with_tail(
        record,
        &[0, 200, 0, 1, 0, 1, b'x', 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0],
    )
}
fn body_past_the_end(record: &[u8]) -> Vec<u8> {
    with_tail(
        record,
        &[0, 200, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    )
}
fn bad_status(record: &[u8]) -> Vec<u8> {
    with_tail(record, &[0x03, 0xe8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
}
fn trailing_bytes(record: &[u8]) -> Vec<u8> {
    let mut out = record.to_vec();
    out.push(0);
    out
}
fn cut_short(record: &[u8]) -> Vec<u8> {
    record[..record.len() - 1].to_vec()
}
fn unknown_kind(record: &[u8]) -> Vec<u8> {
    let mut out = record.to_vec();
    out[5] = 9;
    out
}
fn foreign(record: &[u8]) -> Vec<u8> {
    let mut out = record.to_vec();
    out[0] = b'X';
    out
}

async fn plain(idem: Idempotent, State(effects): State<Effects>) -> Response {
    idem.run(async move {
        effects.effect("plain", String::new(), String::new());
        ([("x-one", "1"), ("x-two", "2")], "stored body")
    })
    .await
}

/// Attack: completed records that do not read (a header count far past the headers that
/// follow, past what a header map can hold, invalid names and values, lengths past the
/// end, an invalid status, trailing or missing bytes, an unknown kind, foreign bytes).
/// Held: the retry gets a 503 problem; nothing panics; the handler ran once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_does_not_read_is_a_503_never_a_panic() {
    let cases: &[(&str, Corruption)] = &[
        ("header count 65535, no headers", huge_count),
        ("header count 24576, no headers", count_past_max_size),
        ("one header counted, none there", one_header_missing),
        ("invalid header name", bad_header_name),
        ("invalid header value", bad_header_value),
        ("header value past the end", value_past_the_end),
        ("body past the end", body_past_the_end),
        ("status 1000", bad_status),
        ("trailing byte", trailing_bytes),
        ("last byte cut", cut_short),
        ("unknown kind", unknown_kind),
        ("foreign bytes", foreign),
    ];
    let mut failures = Vec::new();
    for (name, corrupt) in cases {
        let idem = Idempotency::builder()
            .shared_scope(true)
            .store(Watched {
                corrupt: Some(*corrupt),
                ..Watched::default()
            })
            .build();
        let effects = Effects::default();
        let app = Router::new()
            .route("/p", post(plain))
            .with_state(effects.clone())
            .layer(idem.layer());
        let first = send(&app, request("/p", Auth::Nobody, Some("c-1"))).await;
        assert_eq!(first.status, StatusCode::OK, "{name}: {}", text(&first));
        let retry = tokio::spawn({
            let app = app.clone();
            async move {
                read(
                    app.oneshot(request("/p", Auth::Nobody, Some("c-1")))
                        .await
                        .unwrap(),
                )
                .await
            }
        })
        .await;
        match retry {
            Err(error) if error.is_panic() => {
                let panic = error.into_panic();
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                failures.push(format!("{name}: the retry panicked: {message}"));
            }
            Err(error) => failures.push(format!("{name}: {error}")),
            Ok(retry) => {
                if retry.status != StatusCode::SERVICE_UNAVAILABLE
                    || problem_type(&retry) != Problem::STORE_UNAVAILABLE
                    || effects.runs("plain") != 1
                {
                    failures.push(format!(
                        "{name}: {} {} runs {}",
                        retry.status,
                        text(&retry),
                        effects.runs("plain")
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

async fn header_flood(idem: Idempotent, State(effects): State<Effects>) -> Response {
    idem.run(async move {
        effects.effect("header_flood", String::new(), String::new());
        let mut headers = HeaderMap::new();
        for _ in 0..25_000 {
            headers.append("x-n", HeaderValue::from_static("1"));
        }
        (headers, "flood")
    })
    .await
}

/// Attack: a handler's response with 25,000 values of one header (a header map holds
/// them: one entry, many values), stored whole (about 250 KB). Held: the retry gets the
/// replay or a problem, never a panic, and the handler does not run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_with_many_header_values_replays_without_a_panic() {
    let idem = Idempotency::builder().shared_scope(true).build();
    let effects = Effects::default();
    let app = Router::new()
        .route("/f", post(header_flood))
        .with_state(effects.clone())
        .layer(idem.layer());
    let first = send(&app, request("/f", Auth::Nobody, Some("f-1"))).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.headers.get_all("x-n").iter().count(), 25_000);
    let retry = tokio::spawn({
        let app = app.clone();
        async move {
            read(
                app.oneshot(request("/f", Auth::Nobody, Some("f-1")))
                    .await
                    .unwrap(),
            )
            .await
        }
    })
    .await;
    let retry = match retry {
        Ok(retry) => retry,
        Err(error) => {
            let panicked = error.is_panic();
            let message = if panicked {
                let panic = error.into_panic();
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default()
            } else {
                error.to_string()
            };
            panic!("the retry of a stored response panicked (panic={panicked}): {message}");
        }
    };
    assert!(
        retry.is_replay() || retry.status.is_server_error(),
        "{}",
        text(&retry)
    );
    assert_eq!(effects.runs("header_flood"), 1);
}

// ---------------------------------------------------------------------------------------
// 3. Transactions, on PostgreSQL.

#[cfg(feature = "postgres")]
mod postgres {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use axum::Router;
    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    use axum::routing::post;
    use idem_runtime::once::{OnceError, Outcome};
    use idem_runtime::store::PgTransaction;
    use idem_runtime::{Idempotent, OnceKey, Problem};
    use sqlx::AssertSqlSafe;
    use tokio::sync::Notify;

    use super::common::{PaymentsDb, post_with, send};

    #[derive(Clone)]
    struct App {
        table: String,
        runs: Arc<AtomicUsize>,
    }

    impl App {
        fn runs(&self) -> usize {
            self.runs.load(Ordering::SeqCst)
        }
    }

    /// Writes the request's body as a note; a body `fail` answers 500 after writing.
    async fn write(app: &App, tx: &PgTransaction, note: &str) -> Response {
        app.runs.fetch_add(1, Ordering::SeqCst);
        let conn = tx.conn().await;
        let Ok(mut conn) = conn else {
            return (StatusCode::SERVICE_UNAVAILABLE, "no transaction").into_response();
        };
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (note) VALUES ($1)",
            app.table
        )))
        .bind(note)
        .execute(&mut *conn)
        .await
        .unwrap();
        if note == "fail" {
            return (StatusCode::INTERNAL_SERVER_ERROR, "failed after writing").into_response();
        }
        (StatusCode::CREATED, format!("wrote {note}")).into_response()
    }

    async fn tx_after(
        idem: Idempotent,
        tx: PgTransaction,
        State(app): State<App>,
        body: String,
    ) -> Response {
        idem.run(async move { write(&app, &tx, &body).await }).await
    }

    async fn tx_before(
        tx: PgTransaction,
        idem: Idempotent,
        State(app): State<App>,
        body: String,
    ) -> Response {
        idem.run(async move { write(&app, &tx, &body).await }).await
    }

    /// Two guards around the transaction: the outer one protects, the inner one runs its
    /// work as it is.
    async fn tx_between(
        outer: Idempotent,
        tx: PgTransaction,
        inner: Idempotent,
        State(app): State<App>,
        body: String,
    ) -> Response {
        outer
            .run(async move {
                inner
                    .run(async move { write(&app, &tx, &body).await })
                    .await
            })
            .await
    }

    async fn tx_twice(
        idem: Idempotent,
        tx: PgTransaction,
        _again: PgTransaction,
        State(app): State<App>,
        body: String,
    ) -> Response {
        idem.run(async move { write(&app, &tx, &body).await }).await
    }

    /// Two guards: with `x-give-up`, the first is polled once (its claim sent) and given
    /// up on, then the second runs the same work; without, the first runs it.
    async fn tx_fallback(
        first: Idempotent,
        second: Idempotent,
        tx: PgTransaction,
        State(app): State<App>,
        headers: axum::http::HeaderMap,
        body: String,
    ) -> Response {
        let work = |app: App, tx: PgTransaction, body: String| async move {
            write(&app, &tx, &body).await
        };
        let first = first.run(work(app.clone(), tx.clone(), body.clone()));
        if !headers.contains_key("x-give-up") {
            return first.await;
        }
        if let Ok(answer) = tokio::time::timeout(Duration::ZERO, first).await {
            return answer;
        }
        second.run(work(app, tx, body)).await
    }

    /// The guard is dropped without `run`: nothing will commit the transaction.
    async fn tx_not_run(
        idem: Idempotent,
        tx: PgTransaction,
        State(app): State<App>,
        body: String,
    ) -> Response {
        drop(idem);
        write(&app, &tx, &body).await
    }

    async fn setup(test: &str) -> (PaymentsDb, App, Router) {
        let db = PaymentsDb::new(test).await;
        let app = App {
            table: db.table(),
            runs: Arc::default(),
        };
        let router = Router::new()
            .route("/after", post(tx_after))
            .route("/before", post(tx_before))
            .route("/between", post(tx_between))
            .route("/twice", post(tx_twice))
            .route("/not_run", post(tx_not_run))
            .route("/fallback", post(tx_fallback))
            .with_state(app.clone())
            .layer(db.idem().layer());
        (db, app, router)
    }

    /// Attack (a defect once shown): the first of two guards given up on after its claim
    /// was sent, the second running the same work in the request's transaction. Whatever
    /// the timing, every `201` is written, nothing is written twice, and the client's
    /// retries (told `409` while the given-up claim is still held, or `500` where the
    /// first guard's work started and runs on) soon end in the one result: the given-up
    /// claim is released when it lands, not left to its lease.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_guard_given_up_mid_claim_never_doubles_or_loses_the_write() {
        let (db, _app, router) = setup("rs_tx_fallback").await;
        for round in 0..5 {
            let body = format!("fallback {round}");
            let key = format!("f-{round}");
            let mut answers = Vec::new();
            let mut give_up = true;
            // Up to 5 s of retries, 20 ms apart; a lease is 30 s.
            for _ in 0..250 {
                let mut request = post_with("/fallback", Some(&key), &body);
                if give_up {
                    request
                        .headers_mut()
                        .insert("x-give-up", "1".parse().unwrap());
                }
                give_up = false;
                let answer = send(&router, request).await;
                let replay = answer.is_replay();
                answers.push((answer.status.as_u16(), replay));
                if answer.status == StatusCode::CREATED {
                    assert_eq!(answer.body, format!("wrote {body}"), "{answers:?}");
                    let notes = db.notes().await;
                    assert_eq!(
                        notes.iter().filter(|note| **note == body).count(),
                        1,
                        "{notes:?} after {answers:?}"
                    );
                    if replay {
                        break;
                    }
                } else {
                    // The key in flight, or (the first guard's work started within its
                    // one poll, and runs on) the second guard refused beside it.
                    if answer.status == StatusCode::CONFLICT {
                        answer.assert_problem(StatusCode::CONFLICT, Problem::IN_FLIGHT);
                    } else {
                        answer.assert_problem(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            Problem::GUARD_CONFLICT,
                        );
                    }
                    // The client's back-off before its retry.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            assert_eq!(answers.last(), Some(&(201, true)), "{answers:?}");
        }
    }

    /// `PgTransaction` taken after the guard, before it, and between two guards: idem
    /// commits it with the record (the retry replays, nothing more is written), rolls it
    /// back on a 500 (and the key is released), and commits it on a key-less request.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transaction_beside_hand_written_guards_is_finished_by_idem() {
        let (db, app, router) = setup("rs_tx_guards").await;
        let mut expected = Vec::new();
        for route in ["after", "before", "between"] {
            let path = format!("/{route}");
            let key = format!("k-{route}");
            let first = send(&router, post_with(&path, Some(&key), route)).await;
            assert_eq!(first.status, StatusCode::CREATED, "{path}: {first:?}");
            expected.push(route.to_owned());
            let retry = send(&router, post_with(&path, Some(&key), route)).await;
            assert!(retry.is_replay(), "{path}: {retry:?}");
            assert_eq!(retry.body, first.body, "{path}");
            assert_eq!(db.notes().await, expected, "after {path}");

            let fail_key = format!("f-{route}");
            let failed = send(&router, post_with(&path, Some(&fail_key), "fail")).await;
            assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR, "{path}");
            let again = send(&router, post_with(&path, Some(&fail_key), "fail")).await;
            assert!(!again.is_replay(), "{path}: the key was released");
            assert_eq!(db.notes().await, expected, "{path}: the 500s rolled back");

            let note = format!("{route}-keyless");
            let keyless = send(&router, post_with(&path, None, &note)).await;
            assert_eq!(keyless.status, StatusCode::CREATED, "{path}: {keyless:?}");
            expected.push(note);
            assert_eq!(db.notes().await, expected, "after {path} without a key");
        }
        // Per route: the first run, two failed runs, the key-less run.
        assert_eq!(app.runs(), 3 * 4);
    }

    /// Two `PgTransaction`s in one handler: a problem, nothing written, the key not
    /// used up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transaction_taken_twice_is_a_problem() {
        let (db, app, router) = setup("rs_tx_twice").await;
        for _ in 0..2 {
            let answer = send(&router, post_with("/twice", Some("t-1"), "twice")).await;
            answer.assert_problem(StatusCode::INTERNAL_SERVER_ERROR, Problem::NO_TRANSACTION);
        }
        assert_eq!(app.runs(), 0);
        assert!(db.notes().await.is_empty());
        let other = send(&router, post_with("/after", Some("t-1"), "twice")).await;
        assert_eq!(
            other.status,
            StatusCode::CREATED,
            "the key was never claimed: {other:?}"
        );
    }

    /// A guard taken, then dropped without `run`: nothing finishes the transaction, so it
    /// refuses to be used; the handler is never told its write succeeded when the write
    /// is rolled back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transaction_beside_a_guard_never_run_loses_no_write() {
        let (db, _app, router) = setup("rs_tx_not_run").await;
        let answer = send(&router, post_with("/not_run", Some("n-1"), "not-run")).await;
        let notes = db.notes().await;
        assert!(
            answer.status != StatusCode::CREATED || notes == ["not-run"],
            "answered {} {:?} but the table holds {notes:?}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        );
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "refused");
        assert!(notes.is_empty());
    }

    /// `once(..).run_in_transaction`, four calls under one key while the first holds its
    /// transaction open: one run and one write; the others are told it is in flight, and
    /// a call after it gets its stored result.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn once_in_a_transaction_runs_once_under_concurrency() {
        let db = PaymentsDb::new("rs_once_tx").await;
        let idem = db.idem();
        let table = db.table();
        let started = Arc::new(Notify::new());
        let gate = Arc::new(Notify::new());
        let runs = Arc::new(AtomicUsize::new(0));
        let call = |hold: bool| {
            let (idem, table) = (idem.clone(), table.clone());
            let (started, gate, runs) = (started.clone(), gate.clone(), runs.clone());
            async move {
                idem.once(OnceKey::compose(["rs", "1"]), "in")
                    .no_wait()
                    .run_in_transaction(move |tx: PgTransaction| async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        sqlx::query(AssertSqlSafe(format!(
                            "INSERT INTO {table} (note) VALUES ('once')"
                        )))
                        .execute(&mut *tx.conn().await.map_err(|e| e.to_string())?)
                        .await
                        .map_err(|e| e.to_string())?;
                        if hold {
                            started.notify_one();
                            gate.notified().await;
                        }
                        Ok::<_, String>("done".to_owned())
                    })
                    .await
            }
        };
        let first = tokio::spawn(call(true));
        started.notified().await;
        let others = futures_util::future::join_all((0..3).map(|_| call(false))).await;
        for other in others {
            assert!(matches!(other, Err(OnceError::InFlight)), "{other:?}");
        }
        gate.notify_one();
        assert_eq!(
            first.await.unwrap().unwrap(),
            Outcome::Ran("done".to_owned())
        );
        let later = call(false).await.unwrap();
        assert_eq!(later, Outcome::Replayed("done".to_owned()));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(db.notes().await, ["once"]);
    }
}
