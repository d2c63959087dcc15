use axum::extract::FromRequestParts;
use axum::http::{StatusCode, request::Parts};
use idem_runtime::idempotent;

#[derive(Clone)]
struct AppState {
    admin_key: String,
}

struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = StatusCode;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, StatusCode> {
        match parts.headers.get("x-admin-key") {
            Some(key) if key.as_bytes() == state.admin_key.as_bytes() => Ok(Admin),
            _ => Err(StatusCode::FORBIDDEN),
        }
    }
}

#[idempotent]
async fn reset(_admin: Admin, body: String) -> String {
    body
}

fn main() {}
