//! `pub` handlers in a module, with doc comments, lint attributes and
//! `#[axum::debug_handler]` below the attribute.

mod handlers {
    use axum::{Json, extract::State};
    use idem_runtime::idempotent;

    #[derive(Clone)]
    pub struct Db;

    /// Creates an order once per idempotency key.
    ///
    /// Retries with the same key get the same order.
    #[idempotent(ttl = "24h")]
    #[axum::debug_handler]
    #[allow(clippy::unused_async)]
    pub async fn create_order(State(_db): State<Db>, Json(order): Json<Vec<String>>) -> Json<usize> {
        Json(order.len())
    }

    /// Cancels an order.
    #[idempotent(required = true)]
    #[axum::debug_handler(state = Db)]
    pub(crate) async fn cancel_order(body: String) -> String {
        body
    }
}

use axum::{Router, routing::post};
use idem_runtime::Idempotency;

fn main() {
    let idem = Idempotency::in_memory();
    let _app: Router = Router::new()
        .route("/orders", post(handlers::create_order))
        .route("/orders/cancel", post(handlers::cancel_order))
        .with_state(handlers::Db)
        .layer(idem.layer());
}
