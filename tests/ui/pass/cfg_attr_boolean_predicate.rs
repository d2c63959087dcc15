//! `#[cfg_attr(true, cfg(false))]` on the last argument configures it out (`cfg(true)` and
//! `cfg(false)` are stable since Rust 1.88): the literal predicate is read as one, and the
//! guard shares the slot of the argument before.

#![deny(warnings)]

use axum::{Router, routing::post};
use idem_runtime::{Idempotency, idempotent};

#[idempotent]
async fn create(body: String, #[cfg_attr(true, cfg(false))] _extra: axum::Json<u32>) -> String {
    body.to_uppercase()
}

fn main() {
    let idem = Idempotency::in_memory();
    let _app: Router = Router::new()
        .route("/create", post(create))
        .layer(idem.layer());
}
