//! `#[axum::debug_handler]` above the attribute checks the handler as written.

use axum::http::StatusCode;
use axum::{Json, Router, extract::State, routing::post};
use idem_runtime::{Idempotency, idempotent};

#[derive(Clone)]
struct Db;

#[axum::debug_handler]
#[idempotent(ttl = "2h")]
async fn create(State(_db): State<Db>, Json(names): Json<Vec<String>>) -> (StatusCode, Json<usize>) {
    (StatusCode::CREATED, Json(names.len()))
}

#[axum::debug_handler]
#[idempotent]
async fn echo(body: String) -> String {
    body
}

fn main() {
    let idem = Idempotency::in_memory();
    let _app: Router = Router::new()
        .route("/create", post(create))
        .route("/echo", post(echo))
        .with_state(Db)
        .layer(idem.layer());
}
