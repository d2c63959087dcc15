//! Handlers in `impl` blocks: `Self` and the impl's generic parameters in the body and the
//! signature, with `return` and `?`.

#![deny(warnings)]

use std::marker::PhantomData;

use axum::http::StatusCode;
use axum::{Router, extract::State, routing::post};
use idem_runtime::{Idempotency, idempotent};

#[derive(Clone)]
struct AppState {
    prefix: String,
}

struct Orders;

impl Orders {
    fn prefix() -> &'static str {
        "order"
    }

    #[idempotent]
    async fn create(body: String) -> String {
        format!("{}-{body}", Self::prefix())
    }

    #[idempotent(ttl = "1h")]
    async fn fallible(State(state): State<AppState>, body: String) -> Result<String, StatusCode> {
        if body.is_empty() {
            return Err(StatusCode::BAD_REQUEST);
        }
        let amount: u32 = body.parse().map_err(|_| StatusCode::UNPROCESSABLE_ENTITY)?;
        Ok(format!("{}{}-{amount}", state.prefix, Self::prefix()))
    }
}

impl AppState {
    #[idempotent(required = true)]
    async fn describe(State(state): State<Self>) -> String {
        state.prefix
    }
}

trait Kind {
    const KIND: &'static str;
}

struct Refund;

impl Kind for Refund {
    const KIND: &'static str = "refund";
}

struct Handlers<T>(PhantomData<T>);

impl<T: Kind> Handlers<T> {
    #[idempotent]
    async fn create(State(state): State<AppState>, body: String) -> String {
        format!("{}{}-{body}", state.prefix, T::KIND)
    }
}

fn main() {
    let idem = Idempotency::in_memory();
    let _app: Router = Router::new()
        .route("/orders", post(Orders::create))
        .route("/orders/fallible", post(Orders::fallible))
        .route("/describe", post(AppState::describe))
        .route("/refunds", post(Handlers::<Refund>::create))
        .with_state(AppState {
            prefix: "p-".into(),
        })
        .layer(idem.layer());
}
