//! A one-line handler body in a crate that denies warnings: the generated async block
//! takes the body's statements, not the body as a block (`unused_braces`).

#![deny(warnings)]

use axum::{Router, routing::post};
use idem_runtime::{Idempotency, idempotent};

#[idempotent]
async fn echo(body: String) -> String { body }

fn main() {
    let idem = Idempotency::in_memory();
    let _app: Router = Router::new()
        .route("/echo", post(echo))
        .layer(idem.layer());
}
