//! A handler in a generic `impl` whose argument names the impl's type parameter: axum
//! accepts `Api::<Label>::describe` (it checks `Send`, `'static` and `Clone` once the
//! handler is instantiated), as it does for a generic function.

#![deny(warnings)]

use std::fmt::Display;
use std::marker::PhantomData;

use axum::{Router, extract::State, routing::post};
use idem_runtime::{Idempotency, idempotent};

struct Api<T>(PhantomData<T>);

impl<T: Display> Api<T> {
    #[idempotent]
    async fn describe(State(label): State<T>) -> String {
        label.to_string()
    }
}

#[derive(Clone)]
struct Label;

impl Display for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("label")
    }
}

fn main() {
    let idem = Idempotency::in_memory();
    let _app: Router = Router::new()
        .route("/describe", post(Api::<Label>::describe))
        .with_state(Label)
        .layer(idem.layer());
}
