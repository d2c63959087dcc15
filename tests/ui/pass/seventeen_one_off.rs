//! Seventeen parameters, one configured out: sixteen arguments, as axum accepts.

#![deny(warnings)]

use axum::http::{HeaderMap, Method, Uri, Version};
use axum::{Router, routing::post};
use idem_runtime::{Idempotency, idempotent};

#[idempotent]
#[allow(clippy::too_many_arguments)]
async fn handler(
    _a: Method,
    _b: Uri,
    _c: Version,
    _d: HeaderMap,
    _e: Method,
    _f: Uri,
    _g: Version,
    _h: HeaderMap,
    _i: Method,
    _j: Uri,
    _k: Version,
    _l: HeaderMap,
    _m: Method,
    _n: Uri,
    _o: Version,
    #[cfg(any())] _gone: HeaderMap,
    body: String,
) -> String {
    body
}

fn main() {
    let idem = Idempotency::in_memory();
    let _app: Router = Router::new()
        .route("/", post(handler))
        .layer(idem.layer());
}
