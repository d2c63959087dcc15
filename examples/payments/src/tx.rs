//! The transaction a request writes in: idem's, where idem's records live in the app's
//! database (PostgreSQL or SQLite), so that the payment and the record of its response commit together; else the
//! app's own.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::response::Response;
use idem_runtime::Idempotency;
use idem_runtime::store::{PgTransaction, PostgresStore, SqliteStore, SqliteTransaction};
use sqlx::{Any, AnyPool, PgConnection, SqliteConnection};
use tokio::sync::MappedMutexGuard;

use crate::AppState;

/// Where a handler's writes go.
pub(crate) enum Tx {
    /// idem's transaction on the PostgreSQL database that holds both the app's tables
    /// and idem's records: idem commits it with the response's record, under the check
    /// that the key is still this request's, or rolls both back.
    Postgres(PgTransaction),
    /// The same on the SQLite file that holds both. SQLite has one writer at a time: the
    /// transaction takes the file's write lock with its first statement and holds it
    /// until idem commits.
    Sqlite(SqliteTransaction),
    /// A transaction of the app's own, committed as soon as the writes are done: idem's
    /// records live elsewhere (Redis, memory), so a crash between that commit and the
    /// record leaves a payment whose retry is refused by `payments.order_id`'s UNIQUE
    /// constraint (`409`), never charged twice.
    Own(AnyPool),
}

impl FromRequestParts<AppState> for Tx {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        // The app makes a `PostgresStore` or a `SqliteStore` only on its own database (see
        // `crate::idempotency_store`): where idem's store is one, the two are the same.
        let store = parts
            .extensions
            .get::<Idempotency>()
            .and_then(|idem| idem.store().as_any());
        if store.is_some_and(<dyn std::any::Any>::is::<PostgresStore>) {
            return PgTransaction::from_request_parts(parts, state)
                .await
                .map(Self::Postgres);
        }
        if store.is_some_and(<dyn std::any::Any>::is::<SqliteStore>) {
            return SqliteTransaction::from_request_parts(parts, state)
                .await
                .map(Self::Sqlite);
        }
        Ok(Self::Own(state.db.pool().clone()))
    }
}

impl Tx {
    /// Opens the transaction for writing.
    pub(crate) async fn writes(&self) -> Result<Writes<'_>, sqlx::Error> {
        Ok(match self {
            Self::Postgres(tx) => Writes::Postgres(tx.conn().await?),
            Self::Sqlite(tx) => Writes::Sqlite(tx.conn().await?),
            Self::Own(pool) => Writes::Own(pool.begin().await?),
        })
    }
}

/// An open [`Tx`], written with [`execute!`](crate::tx::execute).
pub(crate) enum Writes<'t> {
    Postgres(MappedMutexGuard<'t, PgConnection>),
    Sqlite(MappedMutexGuard<'t, SqliteConnection>),
    Own(sqlx::Transaction<'static, Any>),
}

impl Writes<'_> {
    /// The writes are done: the app's own transaction commits now; idem's commits when
    /// the handler has returned, with the response's record.
    pub(crate) async fn done(self) -> Result<(), sqlx::Error> {
        match self {
            Self::Postgres(_) | Self::Sqlite(_) => Ok(()),
            Self::Own(tx) => tx.commit().await,
        }
    }
}

/// Runs one statement with its bound values in a [`Writes`], whichever database it is on.
macro_rules! execute {
    ($writes:expr, $sql:expr $(, $bind:expr)* $(,)?) => {
        match &mut $writes {
            $crate::tx::Writes::Postgres(conn) => {
                sqlx::query($sql)$(.bind($bind))*.execute(&mut **conn).await.map(drop)
            }
            $crate::tx::Writes::Sqlite(conn) => {
                sqlx::query($sql)$(.bind($bind))*.execute(&mut **conn).await.map(drop)
            }
            $crate::tx::Writes::Own(tx) => {
                sqlx::query($sql)$(.bind($bind))*.execute(&mut **tx).await.map(drop)
            }
        }
    };
}
pub(crate) use execute;
