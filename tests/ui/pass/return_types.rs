//! Return types: anything `IntoResponse`, with `return` and `?` in the body, and bodies
//! that never reach their end.

#![deny(warnings)]

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router, routing::post};
use idem_runtime::{Idempotency, idempotent};
use serde::Serialize;

#[derive(Serialize)]
struct Receipt {
    id: u32,
}

enum AppError {
    Invalid,
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        StatusCode::UNPROCESSABLE_ENTITY.into_response()
    }
}

fn parse(body: &str) -> Result<u32, AppError> {
    body.trim().parse().map_err(|_| AppError::Invalid)
}

#[idempotent]
async fn opaque(body: String) -> impl IntoResponse {
    if body.is_empty() {
        return (StatusCode::BAD_REQUEST, "empty");
    }
    (StatusCode::OK, "ok")
}

#[idempotent]
async fn json(body: String) -> Json<Receipt> {
    Json(Receipt { id: body.len() as u32 })
}

#[idempotent]
async fn created(body: String) -> (StatusCode, Json<Receipt>) {
    (StatusCode::CREATED, Json(Receipt { id: body.len() as u32 }))
}

#[idempotent]
async fn fallible(body: String) -> Result<(StatusCode, Json<Receipt>), AppError> {
    let id = parse(&body)?;
    Ok((StatusCode::CREATED, Json(Receipt { id })))
}

#[idempotent]
async fn opaque_fallible(body: String) -> Result<impl IntoResponse, AppError> {
    let id = parse(&body)?;
    Ok((StatusCode::CREATED, Json(Receipt { id })))
}

#[idempotent]
async fn early(body: String) -> String {
    return body;
}

#[idempotent]
async fn unfinished(_body: String) -> Json<Receipt> {
    unimplemented!("not yet")
}

#[idempotent]
async fn response(body: String) -> Response {
    body.into_response()
}

#[idempotent]
async fn nothing() {}

fn main() {
    let idem = Idempotency::in_memory();
    let _app: Router = Router::new()
        .route("/opaque", post(opaque))
        .route("/json", post(json))
        .route("/created", post(created))
        .route("/fallible", post(fallible))
        .route("/opaque-fallible", post(opaque_fallible))
        .route("/early", post(early))
        .route("/unfinished", post(unfinished))
        .route("/response", post(response))
        .route("/nothing", post(nothing))
        .layer(idem.layer());
}
