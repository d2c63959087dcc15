//! Authentication before replays, and `ScopedKey` before authentication: a local-tier
//! replay waits for every extractor, and a handler whose `ScopedKey` and idem's record
//! would name different scopes is refused instead of run.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{Request, StatusCode, header};
use axum::{Router, routing::post};
use idem_runtime::{Idempotency, Principal, ScopedKey, idempotent};
use support::{Reply, reply};

#[derive(Clone, Default)]
struct AppState {
    runs: Arc<AtomicUsize>,
    revoked: Arc<Mutex<Vec<String>>>,
    /// A UNIQUE column keyed by the handler's `ScopedKey`.
    charges: Arc<Mutex<HashSet<String>>>,
    crash_once: Arc<AtomicBool>,
}

/// Bearer `user.nonce` (a refreshed token keeps the user) or `x-api-key: user`; the user
/// becomes the principal. Revoked tokens and requests without credentials get 401.
struct Caller;

impl FromRequestParts<AppState> for Caller {
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if let Some(key) = parts.headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
            parts.extensions.insert(Principal::new(key));
            return Ok(Self);
        }
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or((StatusCode::UNAUTHORIZED, "no token"))?;
        if state.revoked.lock().unwrap().iter().any(|r| r == token) {
            return Err((StatusCode::UNAUTHORIZED, "revoked token"));
        }
        let (user, _) = token
            .split_once('.')
            .ok_or((StatusCode::UNAUTHORIZED, "bad token"))?;
        parts.extensions.insert(Principal::new(user));
        Ok(Self)
    }
}

/// A body-less handler whose authentication is its last argument (DELETE-like).
#[idempotent(state = AppState)]
async fn cancel(State(state): State<AppState>, _caller: Caller) -> (StatusCode, String) {
    let run = state.runs.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::CREATED, format!("cancelled, run {run}"))
}

/// `ScopedKey` taken before authentication, used as a UNIQUE guard in the database. The
/// first attempt "commits" then fails with 503 (so idem releases the key).
#[idempotent(state = AppState)]
async fn charge(
    key: ScopedKey,
    _caller: Caller,
    State(state): State<AppState>,
    _body: String,
) -> (StatusCode, String) {
    let fresh = state.charges.lock().unwrap().insert(key.to_string());
    if fresh {
        state.runs.fetch_add(1, Ordering::SeqCst);
    }
    if state.crash_once.swap(false, Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "crashed after commit".into(),
        );
    }
    (StatusCode::CREATED, format!("fresh={fresh}"))
}

/// Same handler with `ScopedKey` after authentication.
#[idempotent(state = AppState)]
async fn charge_after(
    _caller: Caller,
    key: ScopedKey,
    State(_state): State<AppState>,
    _body: String,
) -> String {
    key.to_string()
}

/// Same with `ScopedKey` first.
#[idempotent(state = AppState)]
async fn charge_before(
    key: ScopedKey,
    _caller: Caller,
    State(_state): State<AppState>,
    _body: String,
) -> String {
    key.to_string()
}

fn app(idem: &Idempotency, state: &AppState) -> Router {
    Router::new()
        .route("/cancel", post(cancel))
        .route("/charge", post(charge))
        .route("/after", post(charge_after))
        .route("/before", post(charge_before))
        .with_state(state.clone())
        .layer(idem.layer())
}

async fn send(app: &Router, path: &str, auth: &[(&str, String)], key: &str) -> Reply {
    let mut request = Request::post(path).header("idempotency-key", key);
    for (name, value) in auth {
        request = request.header(*name, value.as_str());
    }
    reply(app, request.body(Body::from("{}")).unwrap()).await
}

fn bearer(token: &str) -> Vec<(&'static str, String)> {
    vec![("authorization", format!("Bearer {token}"))]
}

/// Guards: a local-tier replay is answered only after every extractor: a revoked token
/// gets 401, never the stored response.
#[tokio::test]
async fn a_revoked_token_gets_no_local_replay() {
    let idem = Idempotency::builder()
        .local_tier(1 << 20, Duration::from_secs(60))
        .build();
    let state = AppState::default();
    let app = app(&idem, &state);
    let first = send(&app, "/cancel", &bearer("alice.t1"), "r1").await;
    assert_eq!(first.status, StatusCode::CREATED);
    // Read from the store, the record is copied to the local tier.
    let replay = send(&app, "/cancel", &bearer("alice.t1"), "r1").await;
    assert!(replay.replayed());
    state.revoked.lock().unwrap().push("alice.t1".into());
    let revoked = send(&app, "/cancel", &bearer("alice.t1"), "r1").await;
    assert_eq!(
        revoked.status,
        StatusCode::UNAUTHORIZED,
        "revoked token answered {:?} replayed={} {:?}",
        revoked.status,
        revoked.replayed(),
        revoked.body
    );
}

/// Guards: `ScopedKey` taken after authentication names the principal's scope, the one
/// idem records; taken before it (another scope), the request is refused, not run.
#[tokio::test]
async fn scoped_key_before_authentication_is_refused() {
    let idem = Idempotency::in_memory();
    let state = AppState::default();
    let app = app(&idem, &state);
    let after = send(&app, "/after", &bearer("alice.t1"), "s1").await;
    assert_eq!(after.status, StatusCode::OK);
    let refreshed = send(&app, "/after", &bearer("alice.t2"), "s1").await;
    assert!(refreshed.replayed(), "the same principal's retry replays");
    let before = send(&app, "/before", &bearer("alice.t1"), "s2").await;
    assert_eq!(before.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        String::from_utf8_lossy(&before.body).contains(idem_runtime::Problem::SCOPE_CONFLICT),
        "{:?}",
        before.body
    );
}

/// Guards: a database guard keyed by a `ScopedKey` taken before authentication (the
/// token's scope, not the principal's) would miss a retry with a refreshed token and
/// charge twice; such a handler is refused before it charges anything.
#[tokio::test]
async fn a_database_guard_on_the_wrong_scope_never_charges() {
    let idem = Idempotency::in_memory();
    let state = AppState::default();
    state.crash_once.store(true, Ordering::SeqCst);
    let app = app(&idem, &state);
    for token in ["alice.t1", "alice.t2"] {
        let answer = send(&app, "/charge", &bearer(token), "pay-1").await;
        assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
    assert_eq!(state.runs.load(Ordering::SeqCst), 0, "nothing was charged");
}
