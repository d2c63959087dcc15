//! Attack: an authenticating extractor taken as the handler's last argument. The guard is
//! extracted inside the last argument's tuple slot, *before* that extractor, so it scopes
//! the key before the `Principal` exists and it rejects before authentication does.
//! A handler whose only argument authenticates cannot follow the README's advice
//! ("put the extractor that authenticates anywhere but last"): it is first and last.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{Request, StatusCode, header};
use axum::{Router, routing::post};
use idem_runtime::{Idempotency, Principal, idempotent};
use support::{Reply, reply};

#[derive(Clone, Default)]
struct AppState {
    runs: Arc<AtomicUsize>,
}

/// A caller with a bearer token `user.nonce` (or an `x-api-key: user`); its user becomes
/// the request's principal. Requests without credentials are refused with 401.
/// It carries the app's run counter, so that the handler needs no other argument.
struct Caller(String, Arc<AtomicUsize>);

impl FromRequestParts<AppState> for Caller {
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let user = if let Some(token) = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
        {
            token
                .split_once('.')
                .ok_or((StatusCode::UNAUTHORIZED, "bad token"))?
                .0
        } else {
            parts
                .headers
                .get("x-api-key")
                .and_then(|value| value.to_str().ok())
                .ok_or((StatusCode::UNAUTHORIZED, "no token"))?
        }
        .to_owned();
        parts.extensions.insert(Principal::new(user.as_bytes()));
        Ok(Self(user, state.runs.clone()))
    }
}

/// A body-less action whose only extractor authenticates: first and last at once, so the
/// README's "anywhere but last (in a handler without a body, first)" cannot be followed.
#[idempotent(state = AppState)]
async fn cancel(Caller(user, runs): Caller) -> String {
    let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
    format!("run {run} for {user}")
}

async fn cancel_plain(Caller(user, _): Caller) -> String {
    user
}

fn app(idem: &Idempotency, state: &AppState) -> Router {
    Router::new()
        .route("/cancel", post(cancel))
        .route("/plain", post(cancel_plain))
        .with_state(state.clone())
        .layer(idem.layer())
}

async fn send(app: &Router, path: &str, auth: Option<(&str, &str)>, key: &str) -> Reply {
    let mut request = Request::post(path).header("idempotency-key", key);
    if let Some((name, value)) = auth {
        request = request.header(name, value);
    }
    reply(app, request.body(Body::empty()).unwrap()).await
}

/// SPEC §2.2: scoped by the principal, "a refreshed token must not turn a retry into a new
/// request". The guard scoped the key before `Caller` put the principal in, by the raw
/// `Authorization` header: the retry with a refreshed token runs the handler again.
#[tokio::test]
async fn a_refreshed_token_runs_the_handler_twice() {
    let idem = Idempotency::in_memory();
    let state = AppState::default();
    let app = app(&idem, &state);
    let first = send(
        &app,
        "/cancel",
        Some(("authorization", "Bearer alice.t1")),
        "k",
    )
    .await;
    assert_eq!(first.status, StatusCode::OK);
    let retry = send(
        &app,
        "/cancel",
        Some(("authorization", "Bearer alice.t2")),
        "k",
    )
    .await;
    assert!(
        retry.replayed(),
        "same principal, same key: expected a replay, got {:?} {:?}",
        retry.status,
        retry.body
    );
    assert_eq!(
        state.runs.load(Ordering::SeqCst),
        1,
        "the handler ran twice for one key"
    );
}

/// SPEC §1: "a request they reject is rejected exactly as without idem". Without
/// credentials the plain handler answers 401; the guard answers first.
#[tokio::test]
async fn an_unauthenticated_request_is_not_rejected_as_without_idem() {
    let idem = Idempotency::in_memory();
    let state = AppState::default();
    let app = app(&idem, &state);
    let plain = send(&app, "/plain", None, "k").await;
    assert_eq!(plain.status, StatusCode::UNAUTHORIZED);
    let guarded = send(&app, "/cancel", None, "k").await;
    assert_eq!(
        (guarded.status, guarded.body.clone()),
        (plain.status, plain.body),
        "rejected by idem instead of by the auth extractor"
    );
}

/// SPEC §2.2: "one client can never see ... another client's response under the same
/// key". With a shared scope opted in for anonymous callers, a principal put in by the
/// last-argument extractor is never seen: bob gets alice's response.
#[tokio::test]
async fn another_principal_gets_the_first_ones_response() {
    let idem = Idempotency::builder().shared_scope(true).build();
    let state = AppState::default();
    let app = app(&idem, &state);
    let alice = send(&app, "/cancel", Some(("x-api-key", "alice")), "k").await;
    assert_eq!(alice.body, "run 1 for alice");
    let bob = send(&app, "/cancel", Some(("x-api-key", "bob")), "k").await;
    assert!(
        !bob.replayed(),
        "bob was replayed alice's response: {:?}",
        bob.body
    );
    assert_eq!(bob.body, "run 2 for bob");
}
