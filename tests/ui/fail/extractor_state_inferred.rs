// The state inferred from a `State<Db>` argument, or named by `state = ...`, is not the one
// `Admin` is an extractor for: the message says where the state came from.
use axum::extract::{FromRef, FromRequestParts, State};
use axum::http::{StatusCode, request::Parts};
use idem_runtime::idempotent;

#[derive(Clone)]
struct AppState {
    db: Db,
}

#[derive(Clone)]
struct Db;

impl FromRef<AppState> for Db {
    fn from_ref(state: &AppState) -> Self {
        state.db.clone()
    }
}

struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = StatusCode;

    async fn from_request_parts(_: &mut Parts, _: &AppState) -> Result<Self, StatusCode> {
        Ok(Admin)
    }
}

#[idempotent]
async fn inferred(State(_db): State<Db>, _admin: Admin, body: String) -> String {
    body
}

#[idempotent]
async fn inferred_last(State(_db): State<Db>, _admin: Admin) -> &'static str {
    "ok"
}

#[idempotent(state = Db)]
async fn named(_admin: Admin, body: String) -> String {
    body
}

fn main() {}
