//! A handler whose `where` clause bounds a concrete type (or `Self`) that is not `Send`:
//! the attribute adds no `Send + 'static` to a name it cannot tell from a type parameter.

#![deny(warnings)]

use std::rc::Rc;

use axum::{Router, routing::post};
use idem_runtime::{Idempotency, idempotent};

/// Per-thread defaults, not `Send`; only a value built from it crosses the await.
struct Local(Rc<u32>);

impl Default for Local {
    fn default() -> Self {
        Local(Rc::new(1))
    }
}

#[idempotent]
async fn concrete(body: String) -> String
where
    Local: Default,
{
    let tag = *Local::default().0;
    format!("{tag} {body}")
}

struct Handlers(Rc<u32>);

impl Handlers {
    #[idempotent]
    async fn in_impl(body: String) -> String
    where
        Self: Sized,
    {
        body
    }
}

fn main() {
    let _ = Handlers(Rc::new(0)).0;
    let idem = Idempotency::in_memory();
    let _app: Router = Router::new()
        .route("/concrete", post(concrete))
        .route("/in-impl", post(Handlers::in_impl))
        .layer(idem.layer());
}
