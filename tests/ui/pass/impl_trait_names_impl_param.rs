//! A handler in a generic `impl` whose `impl Trait` return type names the impl's type
//! parameter (not named in a `where` clause): the trait is kept used without a nested
//! `fn`, which could not name the parameter.

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
