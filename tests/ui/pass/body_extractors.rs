//! Every kind of body extractor as the last argument.

use axum::body::Bytes;
use axum::extract::{Form, Request};
use axum::http::HeaderMap;
use axum::{Json, Router, routing::post};
use idem_runtime::{Idempotency, idempotent};
use serde::Deserialize;

#[derive(Deserialize)]
struct Signup {
    email: String,
}

#[idempotent]
async fn form(Form(signup): Form<Signup>) -> String {
    signup.email
}

#[idempotent]
async fn bytes(headers: HeaderMap, body: Bytes) -> String {
    format!("{} bytes, {} headers", body.len(), headers.len())
}

#[idempotent]
async fn text(body: String) -> String {
    body
}

#[idempotent]
async fn json(Json(value): Json<serde_json::Value>) -> Json<serde_json::Value> {
    Json(value)
}

#[idempotent]
async fn whole_request(request: Request) -> String {
    request.uri().to_string()
}

fn main() {
    let idem = Idempotency::in_memory();
    let _app: Router = Router::new()
        .route("/form", post(form))
        .route("/bytes", post(bytes))
        .route("/text", post(text))
        .route("/json", post(json))
        .route("/request", post(whole_request))
        .layer(idem.layer());
}
