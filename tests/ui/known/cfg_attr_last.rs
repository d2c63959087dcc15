//! `#[cfg_attr(.., cfg(..))]` on the last argument configures it out, as `#[cfg]` does.

#![deny(warnings)]

use axum::http::HeaderMap;
use axum::{Router, routing::post};
use idem_runtime::{Idempotency, idempotent};

#[idempotent]
async fn last_off(headers: HeaderMap, #[cfg_attr(all(), cfg(any()))] body: NotAType) -> String {
    headers.len().to_string()
}

fn main() {
    let idem = Idempotency::in_memory();
    let _app: Router = Router::new()
        .route("/last-off", post(last_off))
        .layer(idem.layer());
}
