//! `Option<ScopedKey>` taken before the extractor that authenticates: refused, never run
//! without the key its database guard needs.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{Request, StatusCode};
use axum::{Router, routing::post};
use idem_runtime::{Idempotency, Principal, ScopedKey, idempotent};
use support::reply;

#[derive(Clone, Default)]
struct AppState {
    charges: Arc<AtomicUsize>,
    /// A UNIQUE column keyed by the handler's `ScopedKey`.
    unique: Arc<Mutex<HashSet<String>>>,
    crash_once: Arc<AtomicBool>,
}

/// API-key authentication (as in the crate docs' `Caller`): `x-api-key: user` makes the
/// user the principal; no `Authorization` header is involved.
struct Caller;

impl FromRequestParts<AppState> for Caller {
    type Rejection = StatusCode;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, StatusCode> {
        let user = parts
            .headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .ok_or(StatusCode::UNAUTHORIZED)?
            .to_owned();
        parts.extensions.insert(Principal::new(user));
        Ok(Self)
    }
}

/// The payments example's pattern (`Option<ScopedKey>` as a UNIQUE guard in the database),
/// with the key taken before authentication. The first attempt commits, then fails with
/// 503, so idem releases the key and the database guard must catch the retry.
#[idempotent(state = AppState)]
async fn charge(
    key: Option<ScopedKey>,
    _caller: Caller,
    State(state): State<AppState>,
    _body: String,
) -> (StatusCode, String) {
    let fresh = match &key {
        Some(key) => state.unique.lock().unwrap().insert(key.to_string()),
        None => true, // no key: nothing to guard by
    };
    if fresh {
        state.charges.fetch_add(1, Ordering::SeqCst);
    }
    if state.crash_once.swap(false, Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "crashed after commit".into(),
        );
    }
    (StatusCode::CREATED, format!("key={key:?}"))
}

/// Guards (lib.rs, "Handlers it accepts"): take `ScopedKey` after the extractor that
/// authenticates; "one taken before, naming another scope than idem's record, is refused
/// with 500 (`urn:idem:problem:scope-conflict`) rather than run".
///
/// `Option<ScopedKey>` taken before an authentication that needs no `Authorization`
/// header (an API-key header, a session cookie) finds no scope yet: it is `None`. Once,
/// nothing marked that, the guard saw no earlier key to compare with, and the handler ran
/// with its database guard silently off: the retry after a 5xx charged a second time.
#[tokio::test]
async fn option_scoped_key_before_authentication_is_refused() {
    let idem = Idempotency::in_memory();
    let state = AppState::default();
    state.crash_once.store(true, Ordering::SeqCst);
    let app = Router::new()
        .route("/charge", post(charge))
        .with_state(state.clone())
        .layer(idem.layer());
    let mut answers = Vec::new();
    for _ in 0..2 {
        let request = Request::post("/charge")
            .header("idempotency-key", "pay-1")
            .header("x-api-key", "alice")
            .body(Body::from("{}"))
            .unwrap();
        let answer = reply(&app, request).await;
        answers.push((
            answer.status,
            String::from_utf8_lossy(&answer.body).into_owned(),
        ));
    }
    for (status, body) in &answers {
        assert_eq!(*status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
        assert!(body.contains("scope-conflict"), "{body}");
    }
    assert!(
        state.charges.load(Ordering::SeqCst) == 0,
        "charged {} times under one key; answers: {answers:?}",
        state.charges.load(Ordering::SeqCst)
    );
}
