//! A handler in a generic `impl` whose argument names the impl's type parameter, which the
//! handler's `where` clause does not name: the attribute cannot tell it from a concrete
//! type, and its extractor check fails; the error names the fix (`ui/pass/impl_generics.rs`
//! applies it). Plain axum accepts the handler: it checks it once instantiated.

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
