//! Axum's limit of 16 arguments stays available: the guard does not take a slot.

use axum::http::{HeaderMap, Method, Uri, Version};
use axum::{Router, routing::post};
use idem_runtime::{Idempotency, idempotent};

#[idempotent]
#[allow(clippy::too_many_arguments)]
async fn many(
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
    body: String,
) -> String {
    body
}

fn main() {
    let idem = Idempotency::in_memory();
    let _app: Router = Router::new().route("/many", post(many)).layer(idem.layer());
}
