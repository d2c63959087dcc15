//! Inner attributes at the top of a handler's body (`#![allow(..)]`), valid in any `fn`.

#![deny(warnings)]

use axum::{Router, routing::post};
use idem_runtime::{Idempotency, idempotent};

#[idempotent]
async fn handler(body: String) -> String {
    #![allow(unused_variables)]
    let unused = 1;
    body
}

fn main() {
    let idem = Idempotency::in_memory();
    let _app: Router = Router::new()
        .route("/", post(handler))
        .layer(idem.layer());
}
