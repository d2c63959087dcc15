//! Review: `#[cfg_attr(true, cfg(false))]` on the last argument configures it out
//! (`cfg(true)`/`cfg(false)` are stable since 1.88). The attribute cannot parse the literal
//! predicate as a `Meta`, counts the argument as always present, and gives the guard's
//! slot to an argument that does not exist.

#![deny(warnings)]

use axum::{Json, Router, routing::post};
use idem_runtime::{Idempotency, idempotent};

#[idempotent]
async fn create(body: String, #[cfg_attr(true, cfg(false))] _extra: Json<u32>) -> String {
    body.to_uppercase()
}

fn main() {
    let idem = Idempotency::in_memory();
    let _app: Router = Router::new()
        .route("/create", post(create))
        .layer(idem.layer());
}
