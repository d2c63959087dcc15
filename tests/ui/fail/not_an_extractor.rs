use axum::{Json, Router, routing::post};
use idem_runtime::{Idempotency, idempotent};

struct Order {
    item: String,
}

#[idempotent]
async fn create(order_id: u64, Json(item): Json<String>) -> String {
    format!("{order_id}: {item}")
}

#[idempotent]
async fn create_last(order: Order) -> String {
    order.item
}

fn main() {
    let idem = Idempotency::in_memory();
    let _app: Router = Router::new()
        .route("/orders", post(create))
        .layer(idem.layer());
}
