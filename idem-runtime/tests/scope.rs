//! Regressions of the one-client promise through scope collisions.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use common::{Counters, post_with, send};
use idem_runtime::{Idempotency, Principal};

/// Auth middleware of the kind the docs show: a valid `Bearer user.nonce` token resolves
/// to `Principal::new(user)`; anything else passes through without a principal.
async fn resolve_user(mut request: Request, next: Next) -> Response {
    let user = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .and_then(|token| token.split_once('.'))
        .map(|(user, _nonce)| user.to_owned());
    if let Some(user) = user {
        request.extensions_mut().insert(Principal::new(user));
    }
    next.run(request).await
}

fn with_auth(key: &str, authorization: &str) -> Request {
    let mut request = post_with("/pay", Some(key), "{\"amount\":5}");
    request
        .headers_mut()
        .insert(header::AUTHORIZATION, authorization.parse().unwrap());
    request
}

/// Guards (a defect once shown): an unauthenticated client sending `Authorization: <victim's user id>` lands in
/// the victim principal's scope and is served the victim's stored response.
#[tokio::test]
async fn authorization_value_equal_to_a_principal_id_shares_its_scope() {
    let idem = Idempotency::in_memory();
    let counters = Arc::new(Counters::default());
    let app = common::routes(counters.clone())
        .layer(idem.layer())
        .layer(middleware::from_fn(resolve_user));

    let victim = send(&app, with_auth("order-1", "Bearer alice.secret-token")).await;
    assert_eq!(victim.status, StatusCode::CREATED);
    // No valid token: the middleware sets no principal; idem falls back to the digest of
    // the Authorization header, which is `Scope::of("alice")`, alice's principal scope.
    let attacker = send(&app, with_auth("order-1", "alice")).await;
    assert!(
        !attacker.is_replay(),
        "a client without alice's token got alice's stored response: {:?}",
        String::from_utf8_lossy(&attacker.body)
    );
}
