//! The handler's own extractors run before idem claims or replays: authentication rejects
//! exactly as without idem, and a request rejected for its shape never uses up its key.
//! On the in-memory store and on the Redis server at 127.0.0.1:6379.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{Request, StatusCode, header};
use axum::response::Response;
use axum::{Json, Router, routing::post};
use idem_runtime::store::RedisStore;
use idem_runtime::{Idempotency, Idempotent, Principal, idempotent};
use serde_json::{Value, json};
use support::{Reply, reply};

#[derive(Clone, Default)]
struct AppState {
    runs: Arc<AtomicUsize>,
    revoked: Arc<std::sync::Mutex<Vec<String>>>,
}

/// A caller with a valid bearer token `user.nonce`; its user becomes the request's
/// principal. Revoked tokens and requests without one are refused with 401.
struct Caller;

impl FromRequestParts<AppState> for Caller {
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or((StatusCode::UNAUTHORIZED, "no token"))?;
        if state
            .revoked
            .lock()
            .unwrap()
            .iter()
            .any(|revoked| revoked == token)
        {
            return Err((StatusCode::UNAUTHORIZED, "revoked token"));
        }
        let (user, _nonce) = token
            .split_once('.')
            .ok_or((StatusCode::UNAUTHORIZED, "bad token"))?;
        parts.extensions.insert(Principal::new(user));
        Ok(Self)
    }
}

#[idempotent(state = AppState)]
async fn pay(
    _caller: Caller,
    State(state): State<AppState>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let run = state.runs.fetch_add(1, Ordering::SeqCst) + 1;
    (
        StatusCode::CREATED,
        Json(json!({ "run": run, "amount": body["amount"] })),
    )
}

/// The same handler without idem: what a rejection looks like.
async fn pay_plain(
    _caller: Caller,
    State(_state): State<AppState>,
    Json(_body): Json<Value>,
) -> StatusCode {
    StatusCode::CREATED
}

/// Two guards on one request, one run inside the other (the attribute refuses a guard
/// beside it at compile time; written by hand, nothing stops it): the second must not
/// block the first.
async fn doubled(
    outer: Idempotent,
    inner: Idempotent,
    State(state): State<AppState>,
    body: String,
) -> Response {
    outer
        .run(async move {
            inner
                .run(async move {
                    let run = state.runs.fetch_add(1, Ordering::SeqCst) + 1;
                    format!("run {run}: {body}")
                })
                .await
        })
        .await
}

fn app(idem: &Idempotency, state: &AppState) -> Router {
    Router::new()
        .route("/pay", post(pay))
        .route("/plain", post(pay_plain))
        .route("/doubled", post(doubled))
        .with_state(state.clone())
        .layer(idem.layer())
}

async fn send(app: &Router, path: &str, token: Option<&str>, key: &str, body: &str) -> Reply {
    let mut request = Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .header("idempotency-key", key);
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    reply(
        app,
        request
            .body(Body::from(body.to_owned()))
            .expect("a request"),
    )
    .await
}

async fn on_redis(test: &str) -> Idempotency {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    let store = RedisStore::builder("redis://127.0.0.1:6379")
        .prefix(format!("idem-test:{test}:{}:{nanos}:", std::process::id()))
        .connect()
        .await
        .expect("these tests need Redis at 127.0.0.1:6379");
    Idempotency::builder().store(store).build()
}

/// Guards: authentication runs before any replay: a request without a token, or with a
/// revoked one, gets what the handler answers without idem, never the stored response,
/// and never a 422 that would tell it the key exists.
async fn authentication_runs_before_replay(idem: Idempotency) {
    let state = AppState::default();
    let app = app(&idem, &state);
    let body = r#"{"amount":5}"#;
    let first = send(&app, "/pay", Some("alice.t1"), "k", body).await;
    assert_eq!(first.status, StatusCode::CREATED);

    let plain = send(&app, "/plain", None, "k", body).await;
    for (token, other_body) in [(None, body), (None, r#"{"amount":6}"#)] {
        let anonymous = send(&app, "/pay", token, "k", other_body).await;
        assert_eq!(anonymous.status, plain.status, "rejected as without idem");
        assert_eq!(anonymous.body, plain.body);
        assert!(!anonymous.replayed());
    }
    state.revoked.lock().unwrap().push("alice.t1".into());
    let revoked = send(&app, "/pay", Some("alice.t1"), "k", body).await;
    assert_eq!(revoked.status, StatusCode::UNAUTHORIZED);
    assert_eq!(revoked.body, "revoked token");

    let refreshed = send(&app, "/pay", Some("alice.t2"), "k", body).await;
    assert!(
        refreshed.replayed(),
        "the same user with a fresh token gets the replay"
    );
    assert_eq!(refreshed.body, first.body);
    assert_eq!(state.runs.load(Ordering::SeqCst), 1);
}

/// Guards: a request rejected for its body (malformed JSON) never uses up its key: the
/// corrected request sent at once with the same key runs.
async fn a_rejected_body_does_not_use_up_the_key(idem: Idempotency) {
    let state = AppState::default();
    let app = app(&idem, &state);
    for attempt in 0..20 {
        let key = format!("fix-{attempt}");
        let broken = send(&app, "/pay", Some("bob.t1"), &key, r#"{"amount":"#).await;
        assert_eq!(broken.status, StatusCode::BAD_REQUEST);
        let fixed = send(&app, "/pay", Some("bob.t1"), &key, r#"{"amount":7}"#).await;
        assert_eq!(
            fixed.status,
            StatusCode::CREATED,
            "attempt {attempt}: {:?}",
            fixed.body
        );
    }
    assert_eq!(state.runs.load(Ordering::SeqCst), 20);
}

/// Guards: a second guard on one handler does not lock the first out: the handler runs
/// once and its retry replays.
async fn a_second_guard_does_not_block(idem: Idempotency) {
    let state = AppState::default();
    let app = app(&idem, &state);
    let first = send(&app, "/doubled", Some("carol.t1"), "d", "x").await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    let again = send(&app, "/doubled", Some("carol.t1"), "d", "x").await;
    assert!(again.replayed());
    assert_eq!(again.body, first.body);
    assert_eq!(state.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn memory_authentication_runs_before_replay() {
    authentication_runs_before_replay(Idempotency::in_memory()).await;
}

#[tokio::test]
async fn redis_authentication_runs_before_replay() {
    authentication_runs_before_replay(on_redis("auth-first").await).await;
}

#[tokio::test]
async fn memory_a_rejected_body_does_not_use_up_the_key() {
    a_rejected_body_does_not_use_up_the_key(Idempotency::in_memory()).await;
}

#[tokio::test]
async fn redis_a_rejected_body_does_not_use_up_the_key() {
    a_rejected_body_does_not_use_up_the_key(on_redis("rejected-body").await).await;
}

#[tokio::test]
async fn memory_a_second_guard_does_not_block() {
    a_second_guard_does_not_block(Idempotency::in_memory()).await;
}

#[tokio::test]
async fn redis_a_second_guard_does_not_block() {
    a_second_guard_does_not_block(on_redis("second-guard").await).await;
}
