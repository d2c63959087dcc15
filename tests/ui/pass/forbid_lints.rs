//! A crate that forbids lints rather than denying them: the attribute's expansion must not
//! `allow` what the crate forbids, and an import used only in an `impl Trait` return type
//! stays used.

#![forbid(warnings, unused, unreachable_code)]

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Router, routing::post};
use idem_runtime::{Idempotency, idempotent};

#[idempotent]
async fn opaque(body: String) -> impl IntoResponse {
    (StatusCode::CREATED, body)
}

#[idempotent]
async fn fallible(body: String) -> Result<String, StatusCode> {
    if body.is_empty() {
        return Err(StatusCode::BAD_REQUEST);
    }
    Ok(body)
}

#[idempotent]
async fn nested_opaque(body: String) -> Result<impl IntoResponse + Send, StatusCode> {
    if body.is_empty() {
        return Err(StatusCode::BAD_REQUEST);
    }
    Ok((StatusCode::CREATED, body))
}

fn main() {
    let idem = Idempotency::in_memory();
    let _app: Router = Router::new()
        .route("/opaque", post(opaque))
        .route("/fallible", post(fallible))
        .route("/nested-opaque", post(nested_opaque))
        .layer(idem.layer());
}
