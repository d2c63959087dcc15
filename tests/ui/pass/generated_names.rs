//! Items named like the attribute's generated bindings stay the user's inside the body, and
//! constants named like them do not turn the generated bindings into patterns.

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

#[allow(non_upper_case_globals)]
mod constants {
    use axum::http::HeaderMap;
    use idem_runtime::idempotent;

    pub(crate) const __idem_guard: u8 = 1;
    pub(crate) const __idem_last: u8 = 2;
    pub(crate) const __idem_body: u8 = 3;
    pub(crate) const __idem_work: u8 = 4;
    pub(crate) const __idem_arg0: u8 = 5;
    pub(crate) const __idem_arg1: u8 = 6;
    pub(crate) const __idem_output: u8 = 7;
    pub(crate) const __idem_value: u8 = 8;

    #[idempotent]
    pub(crate) async fn shadowed(headers: HeaderMap, body: String) -> Result<String, String> {
        let total = __idem_guard
            + __idem_last
            + __idem_body
            + __idem_work
            + __idem_arg0
            + __idem_arg1
            + __idem_output
            + __idem_value;
        Ok(format!("{} {body} {total}", headers.len()))
    }
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
        .route("/shadowed", post(constants::shadowed))
        .layer(idem.layer());
}
