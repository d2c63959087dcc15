//! `#[axum::debug_handler]` below the attribute checks the handler it becomes: with any
//! number of arguments, a `State` among them or last, and inside an `impl`.

#![deny(warnings)]

use axum::{Json, Router, extract::State, routing::post};
use idem_runtime::{Idempotency, idempotent};

#[derive(Clone)]
struct Db;

#[idempotent]
#[axum::debug_handler]
async fn ping() -> &'static str {
    "pong"
}

#[idempotent]
#[axum::debug_handler]
async fn state_last(State(_db): State<Db>) -> &'static str {
    "ok"
}

#[idempotent(ttl = "1h")]
#[axum::debug_handler]
async fn create(State(_db): State<Db>, Json(names): Json<Vec<String>>) -> Json<usize> {
    Json(names.len())
}

#[idempotent(state = Db)]
#[axum::debug_handler(state = Db)]
async fn named(body: String) -> String {
    body
}

fn main() {
    let idem = Idempotency::in_memory();
    let _app: Router = Router::new()
        .route("/ping", post(ping))
        .route("/state-last", post(state_last))
        .route("/create", post(create))
        .route("/named", post(named))
        .with_state(Db)
        .layer(idem.layer());
}
