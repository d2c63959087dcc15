//! Review: a handler in a generic `impl` whose `impl Trait` return type names the impl's
//! type parameter (not named in a `where` clause). It compiled before b8f46c5; the nested
//! `fn __idem_traits_..<T0: Shown<S>>() {}` cannot name the outer `S` (E0401).

#![deny(warnings)]

use std::marker::PhantomData;

use axum::{Router, extract::State, response::IntoResponse, routing::post};
use idem_runtime::{Idempotency, idempotent};

trait Shown<S> {}
impl<S> Shown<S> for String {}

struct Api<S>(PhantomData<S>);

impl<S: Clone + Send + Sync + 'static> Api<S> {
    #[idempotent]
    async fn shown(State(_state): State<S>, body: String) -> impl IntoResponse + Shown<S> {
        body.to_uppercase()
    }
}

#[derive(Clone)]
struct AppState;

fn main() {
    let idem = Idempotency::in_memory();
    let _app: Router = Router::new()
        .route("/shown", post(Api::<AppState>::shown))
        .with_state(AppState)
        .layer(idem.layer());
}
