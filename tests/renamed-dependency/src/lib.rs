//! Handlers of a crate that depends on `idem-runtime` renamed to `idem`, so that
//! `::idem_runtime` does not resolve here: the attribute reaches idem through
//! `crate = "idem"`. The `renamed_dependency` test of `idem-tests` serves them.

use axum::extract::State;
use axum::{Router, routing::post};
use idem::{Idempotency, idempotent};

/// How many times [`create`] ran.
pub type Runs = std::sync::Arc<std::sync::atomic::AtomicUsize>;

/// Counts its runs; kept for an hour.
#[idempotent(crate = "idem", ttl = "1h")]
pub async fn create(State(runs): State<Runs>, body: String) -> String {
    let run = runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
    format!("run {run}: {body}")
}

/// Refuses a request without a key, with the default ttl.
#[idem::idempotent(required = true, crate = "idem")]
pub async fn required() -> &'static str {
    "ok"
}

/// The two handlers behind `idem`'s layer.
pub fn app(idem: &Idempotency, runs: Runs) -> Router {
    Router::new()
        .route("/create", post(create))
        .route("/required", post(required))
        .with_state(runs)
        .layer(idem.layer())
}
