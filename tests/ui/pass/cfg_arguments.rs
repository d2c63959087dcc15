//! `#[cfg]` on arguments, the last included: an argument configured out is not taken, and
//! the guard shares the slot of the last argument left.

#![deny(warnings)]

use axum::http::{HeaderMap, Method};
use axum::{Router, routing::post};
use idem_runtime::{Idempotency, idempotent};

#[idempotent]
async fn last_off(headers: HeaderMap, #[cfg(any())] body: NotAType) -> String {
    headers.len().to_string()
}

#[idempotent]
async fn last_on(#[cfg(any())] _gone: NotAType, #[cfg(all())] body: String) -> String {
    body
}

#[idempotent]
async fn middle_off(method: Method, #[cfg(any())] _gone: NotAType, body: String) -> String {
    format!("{method} {body}")
}

#[idempotent]
async fn trailing(
    #[cfg(all())] method: Method,
    #[cfg(all())] headers: HeaderMap,
    #[cfg(any())] body: NotAType,
) -> String {
    format!("{method} {}", headers.len())
}

#[idempotent]
async fn only_off(#[cfg(any())] body: NotAType) -> &'static str {
    "nothing taken"
}

#[idempotent]
async fn lint_attribute(#[allow(unused_variables)] method: Method, body: String) -> String {
    body
}

fn main() {
    let idem = Idempotency::in_memory();
    let _app: Router = Router::new()
        .route("/last-off", post(last_off))
        .route("/last-on", post(last_on))
        .route("/middle-off", post(middle_off))
        .route("/trailing", post(trailing))
        .route("/only-off", post(only_off))
        .route("/lint", post(lint_attribute))
        .layer(idem.layer());
}
