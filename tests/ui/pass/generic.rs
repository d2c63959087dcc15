//! A generic handler, instantiated where it is routed, as axum allows.

use axum::{Json, Router, extract::State, routing::post};
use idem_runtime::{Idempotency, idempotent};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

#[derive(Serialize, Deserialize)]
struct Order {
    item: String,
}

#[derive(Serialize, Deserialize)]
struct Refund {
    order: u64,
}

trait Resource: Serialize + DeserializeOwned {
    const KIND: &'static str;
}

impl Resource for Order {
    const KIND: &'static str = "order";
}

impl Resource for Refund {
    const KIND: &'static str = "refund";
}

#[idempotent(ttl = "1d")]
async fn create<T>(Json(resource): Json<T>) -> Json<(&'static str, T)>
where
    T: Resource,
{
    Json((T::KIND, resource))
}

#[idempotent]
async fn limited<const MAX: usize>(body: String) -> String {
    body.chars().take(MAX).collect()
}

// `State<T>` needs `T: Clone`, which axum checks once `describe::<Label>` is routed.
#[idempotent]
async fn describe<T: std::fmt::Display>(State(label): State<T>) -> String {
    label.to_string()
}

#[derive(Clone)]
struct Label;

impl std::fmt::Display for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("label")
    }
}

fn main() {
    let idem = Idempotency::in_memory();
    let _app: Router = Router::new()
        .route("/orders", post(create::<Order>))
        .route("/refunds", post(create::<Refund>))
        .route("/short", post(limited::<8>))
        .route("/describe", post(describe::<Label>))
        .with_state(Label)
        .layer(idem.layer());
}
