//! `#[tracing::instrument]` above or below the attribute sees the handler as written: its
//! arguments for `skip`, its return type for `err` and `ret`.

#![deny(warnings)]

use std::fmt;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Router, extract::State, routing::post};
use idem_runtime::{Idempotency, idempotent};

#[derive(Clone)]
struct AppState;

#[derive(Debug)]
struct AppError;

impl fmt::Display for AppError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("empty body")
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        StatusCode::UNPROCESSABLE_ENTITY.into_response()
    }
}

#[tracing::instrument(skip(state), err)]
#[idempotent(ttl = "1h")]
async fn above(State(state): State<AppState>, body: String) -> Result<String, AppError> {
    let AppState = state;
    if body.is_empty() {
        return Err(AppError);
    }
    Ok(body)
}

#[idempotent(ttl = "1h")]
#[tracing::instrument(skip(state), err)]
async fn below(State(state): State<AppState>, body: String) -> Result<String, AppError> {
    let AppState = state;
    if body.is_empty() {
        return Err(AppError);
    }
    Ok(body)
}

#[idempotent]
#[tracing::instrument(level = "debug", ret)]
async fn ret(body: String) -> String {
    body
}

fn main() {
    let idem = Idempotency::in_memory();
    let _app: Router = Router::new()
        .route("/above", post(above))
        .route("/below", post(below))
        .route("/ret", post(ret))
        .with_state(AppState)
        .layer(idem.layer());
}
