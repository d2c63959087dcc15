//! `State<T>` arguments, alone and before a body extractor; the router state is inferred.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::{Json, Router, extract::State, routing::post};
use idem_runtime::{Idempotency, idempotent};

#[derive(Clone, Default)]
struct AppState {
    next_id: Arc<AtomicU64>,
}

#[idempotent(ttl = "1h", required = true)]
async fn create(State(state): State<AppState>, Json(name): Json<String>) -> Json<(u64, String)> {
    Json((state.next_id.fetch_add(1, Ordering::SeqCst), name))
}

#[idempotent]
async fn bump(State(state): State<AppState>) -> String {
    state.next_id.fetch_add(1, Ordering::SeqCst).to_string()
}

fn main() {
    let idem = Idempotency::in_memory();
    let _app: Router = Router::new()
        .route("/things", post(create))
        .route("/bump", post(bump))
        .with_state(AppState::default())
        .layer(idem.layer());
}
