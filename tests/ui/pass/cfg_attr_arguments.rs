//! `#[cfg_attr(.., cfg(..))]` on arguments configures them as `#[cfg]` does: the last
//! argument configured out, or kept, nested `cfg_attr`, and a `cfg_attr` that carries other
//! attributes too.

#![deny(warnings)]

use axum::http::{HeaderMap, Method};
use axum::{Router, routing::post};
use idem_runtime::{Idempotency, idempotent};

#[idempotent]
async fn last_off(headers: HeaderMap, #[cfg_attr(all(), cfg(any()))] body: NotAType) -> String {
    headers.len().to_string()
}

#[idempotent]
async fn last_kept(headers: HeaderMap, #[cfg_attr(any(), cfg(any()))] body: String) -> String {
    format!("{} {body}", headers.len())
}

#[idempotent]
async fn nested(
    method: Method,
    #[cfg_attr(all(), cfg_attr(all(), cfg(any())))] body: NotAType,
) -> String {
    method.to_string()
}

#[idempotent]
async fn with_others(
    #[cfg_attr(all(), allow(unused_variables), cfg(all()))] method: Method,
    #[cfg_attr(all(), allow(unused_variables), cfg(any()))] body: NotAType,
) -> &'static str {
    "method only"
}

fn main() {
    let idem = Idempotency::in_memory();
    let _app: Router = Router::new()
        .route("/last-off", post(last_off))
        .route("/last-kept", post(last_kept))
        .route("/nested", post(nested))
        .route("/with-others", post(with_others))
        .layer(idem.layer());
}
