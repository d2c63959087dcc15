//! A crate that forbids lints rather than denying them: the attribute's expansion must not
//! `allow` what the crate forbids.

#![forbid(unused_imports, unreachable_code)]

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

fn main() {
    let idem = Idempotency::in_memory();
    let _app: Router = Router::new()
        .route("/opaque", post(opaque))
        .route("/fallible", post(fallible))
        .layer(idem.layer());
}
