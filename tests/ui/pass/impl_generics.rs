//! A handler in a generic `impl` whose arguments name the impl's type parameters: named in
//! the handler's `where` clause with the `Send + 'static` its work needs, they are known to
//! the attribute, which leaves their extractor checks to axum, as for the handler's own
//! type parameters.

#![deny(warnings)]

use std::fmt::Display;
use std::marker::PhantomData;

use axum::{Json, Router, extract::State, routing::post};
use idem_runtime::{Idempotency, idempotent};
use serde::de::DeserializeOwned;

struct Api<T, B>(PhantomData<(T, B)>);

impl<T: Display, B: DeserializeOwned + Display> Api<T, B> {
    #[idempotent]
    async fn describe(State(label): State<T>, Json(body): Json<B>) -> String
    where
        T: Send + 'static,
        B: Send + 'static,
    {
        format!("{label} {body}")
    }

    #[idempotent(state = T)]
    async fn prefixed(State(label): State<T>) -> String
    where
        T: Send + Sync + 'static,
    {
        Self::prefix(label)
    }

    fn prefix(label: T) -> String {
        format!("label {label}")
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
        .route("/describe", post(Api::<Label, String>::describe))
        .route("/prefixed", post(Api::<Label, String>::prefixed))
        .with_state(Label)
        .layer(idem.layer());
}
