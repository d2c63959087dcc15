//! The handler's database transaction, taken as an extractor (feature `postgres` or
//! `sqlite`): its writes commit with the response's record, or roll back with it.

use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Response};
use http::request::Parts;

use super::problem::Problem;
use super::state::RequestState;
use crate::config::Idempotency;
use crate::store::DatabaseTransaction;

/// The transaction `T` on the store of the request's idempotency handle, put in the
/// request's slot for the guard to finish; a problem where the handle's store is not
/// `T`'s, or the handler takes a second transaction.
// The rejection is the response an extractor answers with, as `FromRequestParts` has it.
#[allow(clippy::result_large_err)]
fn extract<T: DatabaseTransaction>(parts: &mut Parts) -> Result<T, Response> {
    let Some(idem) = parts.extensions.get::<Idempotency>().cloned() else {
        tracing::error!(target: "idem", "`{}` taken by a handler served without the idempotency layer: add `.layer(idem.layer())` to the Router", T::NAME);
        return Err(Problem::layer_missing().into_response());
    };
    let slot = RequestState::of(&mut parts.extensions).transaction_slot();
    let Some(transaction) = T::on_store(idem.store().as_ref(), slot.finish_flag()) else {
        let detail = format!(
            "This handler writes in a database transaction that idem commits with the response, which needs idem's store to be a {} on that database.",
            T::STORE
        );
        tracing::error!(target: "idem", "`{}` needs the idempotency handle's store to be a `{}`", T::NAME, T::STORE);
        return Err(Problem::no_transaction(&detail).into_response());
    };
    if !slot.fill(transaction.transactional()) {
        let detail = format!(
            "This handler takes more than one `{}`; a request writes in one transaction.",
            T::NAME
        );
        tracing::error!(target: "idem", "`{}` taken twice by one handler", T::NAME);
        return Err(Problem::no_transaction(&detail).into_response());
    }
    Ok(transaction)
}

#[cfg(feature = "postgres")]
impl<S: Send + Sync> FromRequestParts<S> for crate::store::PgTransaction {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Response> {
        extract(parts)
    }
}

#[cfg(feature = "sqlite")]
impl<S: Send + Sync> FromRequestParts<S> for crate::store::SqliteTransaction {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Response> {
        extract(parts)
    }
}
