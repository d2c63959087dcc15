//! A handler without arguments: the guard is its only extractor.

use axum::{Router, routing::post};
use idem_runtime::{Idempotency, idempotent};

#[idempotent]
async fn ping() -> &'static str {
    "pong"
}

fn main() {
    let idem = Idempotency::in_memory();
    let _app: Router = Router::new().route("/ping", post(ping)).layer(idem.layer());
}
