//! Items named like the attribute's generated bindings stay the user's inside the body.

#![deny(warnings)]

use axum::{Router, routing::post};
use idem_runtime::{Idempotency, idempotent};

fn __idem_output() -> u32 {
    1
}

fn __idem_inner() -> u32 {
    2
}

fn __idem_guard() -> u32 {
    3
}

fn __idem_work() -> u32 {
    4
}

fn __idem_arg0() -> u32 {
    5
}

fn __idem_last() -> u32 {
    6
}

mod __idem_private {
    pub(crate) fn __idem_body() -> u32 {
        7
    }
}

#[idempotent]
async fn sum(body: String) -> String {
    let total = __idem_output()
        + __idem_inner()
        + __idem_guard()
        + __idem_work()
        + __idem_arg0()
        + __idem_last()
        + __idem_private::__idem_body();
    format!("{body}{total}")
}

// Arguments named like the generated ones.
#[idempotent]
async fn named(__idem_arg0: axum::http::HeaderMap, __idem_last: String) -> String {
    format!("{} {__idem_last}", __idem_arg0.len())
}

fn main() {
    let idem = Idempotency::in_memory();
    let _app: Router = Router::new()
        .route("/sum", post(sum))
        .route("/named", post(named))
        .layer(idem.layer());
}
