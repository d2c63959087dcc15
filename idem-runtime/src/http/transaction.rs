//! The handler's database transaction, taken as an extractor (feature `postgres`): its
//! writes commit with the response's record, or roll back with it.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Response};
use http::request::Parts;

use super::extract::transaction_slot;
use super::problem::Problem;
use crate::config::Idempotency;
use crate::store::{PgTransaction, PostgresStore};

impl<S: Send + Sync> FromRequestParts<S> for PgTransaction {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Response> {
        let Some(idem) = parts.extensions.get::<Idempotency>().cloned() else {
            tracing::error!(target: "idem", "`PgTransaction` taken by a handler served without the idempotency layer: add `.layer(idem.layer())` to the Router");
            return Err(Problem::layer_missing().into_response());
        };
        let Some(store) = idem
            .store()
            .as_any()
            .and_then(|store| store.downcast_ref::<PostgresStore>())
        else {
            let detail = "This handler writes in a database transaction that idem commits with the response, which needs idem's store to be a PostgresStore on that database.";
            tracing::error!(target: "idem", "`PgTransaction` needs the idempotency handle's store to be a `PostgresStore`");
            return Err(Problem::no_transaction(detail).into_response());
        };
        let slot = transaction_slot(parts);
        let transaction = PgTransaction::new(store, slot.finish_flag());
        if !slot.fill(Arc::new(transaction.clone())) {
            let detail = "This handler takes more than one `PgTransaction`; a request writes in one transaction.";
            tracing::error!(target: "idem", "`PgTransaction` taken twice by one handler");
            return Err(Problem::no_transaction(detail).into_response());
        }
        Ok(transaction)
    }
}
