//! Handlers as a user writes them, checked by `cargo clippy --all-targets -- -D warnings`
//! with `clippy::pedantic` on: the attribute's expansion adds no warning to the user's
//! crate (a bound added in a second place, an underscore binding used, an unreachable
//! statement, a `let` returned at once).

#![warn(clippy::pedantic)]

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::{Json, Router, extract::State, routing::post};
use idem_runtime::{Idempotency, idempotent};
use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Clone)]
struct AppState;

/// A type parameter bounded where it is declared.
#[idempotent]
async fn inline_bound<T: Serialize + DeserializeOwned>(Json(value): Json<T>) -> Json<T> {
    Json(value)
}

/// A type parameter bounded in a `where` clause.
#[idempotent]
async fn where_bound<T>(Json(value): Json<T>) -> Json<T>
where
    T: Serialize + DeserializeOwned,
{
    Json(value)
}

/// `return`, `?` and an unused state.
#[idempotent(ttl = "1h")]
async fn fallible(State(_state): State<AppState>, body: String) -> Result<String, StatusCode> {
    if body.is_empty() {
        return Err(StatusCode::BAD_REQUEST);
    }
    let amount: u32 = body.parse().map_err(|_| StatusCode::BAD_REQUEST)?;
    Ok(amount.to_string())
}

/// An opaque return type, its trait imported for it alone.
#[idempotent]
async fn opaque(headers: HeaderMap) -> impl IntoResponse {
    (StatusCode::CREATED, headers.len().to_string())
}

/// An opaque type inside the return type, with `?`.
#[idempotent]
async fn opaque_ok(body: String) -> Result<impl IntoResponse + Send, StatusCode> {
    let amount: u32 = body.parse().map_err(|_| StatusCode::BAD_REQUEST)?;
    Ok((StatusCode::CREATED, amount.to_string()))
}

/// An argument configured out, and one kept.
#[idempotent]
async fn configured(#[cfg(not(test))] _gone: String, #[cfg(test)] body: String) -> String {
    body
}

/// An argument bound to `_`, kept to the end as in any `async fn`.
#[idempotent]
async fn ignored(_: HeaderMap, body: String) -> String {
    body
}

/// Nothing taken, nothing returned.
#[idempotent(required = true)]
async fn nothing() {}

struct Orders;

impl Orders {
    fn prefix() -> &'static str {
        "order-"
    }

    /// `Self` in the body.
    #[idempotent]
    async fn create(body: String) -> String {
        format!("{}{body}", Self::prefix())
    }
}

#[test]
fn every_handler_routes() {
    let idem = Idempotency::in_memory();
    let _app: Router = Router::new()
        .route("/inline", post(inline_bound::<serde_json::Value>))
        .route("/where", post(where_bound::<serde_json::Value>))
        .route("/fallible", post(fallible))
        .route("/opaque", post(opaque))
        .route("/opaque-ok", post(opaque_ok))
        .route("/configured", post(configured))
        .route("/ignored", post(ignored))
        .route("/nothing", post(nothing))
        .route("/orders", post(Orders::create))
        .with_state(AppState)
        .layer(idem.layer());
}
