//! Every option, in every accepted form.

use axum::{Router, extract::State, routing::post};
use idem_runtime::{Idempotency, idempotent};

#[derive(Clone)]
struct AppState;

#[idempotent(ttl = "90s")]
async fn seconds() {}

#[idempotent(ttl = "15m", required = false)]
async fn minutes() {}

#[idempotent(ttl = "1h30m", required = true)]
async fn combined() {}

#[idempotent(ttl = "1d 12h")]
async fn spaced() {}

#[idempotent(required = true, ttl = "7d", state = AppState)]
async fn all(State(_state): State<AppState>) {}

#[idempotent(state = crate::AppState,)]
async fn trailing_comma(State(_state): State<AppState>) {}

fn main() {
    let idem = Idempotency::in_memory();
    let _app: Router = Router::new()
        .route("/s", post(seconds))
        .route("/m", post(minutes))
        .route("/c", post(combined))
        .route("/sp", post(spaced))
        .route("/all", post(all))
        .route("/tc", post(trailing_comma))
        .with_state(AppState)
        .layer(idem.layer());
}
