//! `crate = ".."` names the path the expansion reaches idem through, here a re-export.

#![deny(warnings)]

mod facade {
    pub(crate) use idem_runtime as inner;
}

use axum::{Router, extract::State, routing::post};

#[derive(Clone)]
struct Db;

#[facade::inner::idempotent(crate = "crate::facade::inner", ttl = "1h")]
async fn create(State(_db): State<Db>, body: String) -> String {
    body
}

#[facade::inner::idempotent(required = true, crate = "crate::facade::inner")]
async fn required() -> &'static str {
    "ok"
}

fn main() {
    let idem = facade::inner::Idempotency::in_memory();
    let _app: Router = Router::new()
        .route("/create", post(create))
        .route("/required", post(required))
        .with_state(Db)
        .layer(idem.layer());
}
