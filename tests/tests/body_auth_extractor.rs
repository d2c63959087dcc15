//! An extractor that authenticates and reads the body (`FromRequest`, so the handler's
//! last argument): a request without credentials is refused by it, as without idem, not
//! by idem for want of an identity to scope its key by.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body;
use axum::extract::{FromRequest, Request as AxumRequest, State};
use axum::http::{Request, StatusCode, header};
use axum::{Router, routing::post};
use idem_runtime::{Idempotency, idempotent};
use support::reply;

#[derive(Clone, Default)]
struct App {
    runs: Arc<AtomicUsize>,
}

/// A caller with a bearer token `user.nonce`, and the body it signed. Refused with `401`
/// without one.
struct Signed(String, String);

impl<S: Send + Sync> FromRequest<S> for Signed {
    type Rejection = (StatusCode, &'static str);

    async fn from_request(request: AxumRequest, state: &S) -> Result<Self, Self::Rejection> {
        let user = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .and_then(|token| token.split_once('.'))
            .map(|(user, _nonce)| user.to_owned())
            .ok_or((StatusCode::UNAUTHORIZED, "unauthenticated"))?;
        let body = String::from_request(request, state)
            .await
            .map_err(|_| (StatusCode::BAD_REQUEST, "unreadable body"))?;
        Ok(Self(user, body))
    }
}

#[idempotent(required = true)]
async fn pay(State(app): State<App>, Signed(user, body): Signed) -> String {
    let run = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    format!("run {run}: {user} pays {body}")
}

async fn plain(Signed(user, _): Signed) -> String {
    user
}

fn request(path: &str, key: Option<&str>, token: Option<&str>) -> Request<Body> {
    let mut request = Request::post(path);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    request.body(Body::from("10 EUR")).unwrap()
}

/// Guards: without credentials, the answer is the extractor's `401`, not idem's `400`
/// for a request without an identity; nothing runs.
#[tokio::test]
async fn an_unauthenticated_request_is_refused_by_the_extractor_that_authenticates() {
    let idem = Idempotency::in_memory();
    let app = App::default();
    let router = Router::new()
        .route("/pay", post(pay))
        .route("/plain", post(plain))
        .with_state(app.clone())
        .layer(idem.layer());
    let without_idem = reply(&router, request("/plain", Some("k"), None)).await;
    assert_eq!(without_idem.status, StatusCode::UNAUTHORIZED);
    let answer = reply(&router, request("/pay", Some("k"), None)).await;
    assert_eq!(
        (answer.status, &answer.body),
        (without_idem.status, &without_idem.body),
        "refused as without idem"
    );
    assert_eq!(app.runs.load(Ordering::SeqCst), 0);
    // A key idem cannot take (malformed, or missing where required) is refused at once,
    // before a byte of the body is read, whoever sent it.
    for key in [Some("\"unterminated"), None] {
        let answer = reply(&router, request("/pay", key, None)).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "key {key:?}");
    }

    // Authenticated, the key is idem's as usual: run once, then replayed.
    let first = reply(&router, request("/pay", Some("k"), Some("alice.1"))).await;
    assert_eq!(first.status, StatusCode::OK);
    let again = reply(&router, request("/pay", Some("k"), Some("alice.1"))).await;
    assert!(again.replayed());
    assert_eq!(app.runs.load(Ordering::SeqCst), 1);
    // A malformed key, authenticated: idem's 400.
    let malformed = reply(
        &router,
        request("/pay", Some("\"unterminated"), Some("alice.1")),
    )
    .await;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST);
}
