//! Review: a one-line handler body in a crate that denies warnings. The body block becomes
//! the tail expression of the generated `async move { .. }`, where rustc's
//! `unused_braces` lint reports it ("unnecessary braces around block return value").

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
