//! [`PgTransaction`]: the work's writes and idem's completed record in one PostgreSQL
//! transaction.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use sqlx::{PgConnection, Postgres};
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};

use super::{PostgresStore, millis};
use crate::protocol::{Committed, Transactional};
use crate::store::{BoxFuture, Store, StoreError};

/// A transaction on the database of the [`PostgresStore`] that holds the key, which idem
/// commits together with the completed record, or rolls back with it.
///
/// Take it as an argument of an `#[idempotent]` handler (or get it as the argument of
/// [`Once::run_in_transaction`](crate::once::Once::run_in_transaction)), write the
/// business rows through [`conn`](Self::conn), and return: idem then writes the
/// response's record in this transaction, checks that the key is still this execution's
/// (fencing), and commits both. So, for writes in this database:
///
/// - a crash before the commit leaves nothing: the key's lease runs out and a retry runs
///   the work cleanly;
/// - a crash after the commit leaves both: a retry gets the stored response;
/// - an executor whose lease was taken over fails the fencing check: its transaction
///   rolls back, so its writes never become visible, and it answers `409`;
/// - a `5xx`, an `Err` of `once`, or a panic rolls the writes back and releases the key.
///
/// Without a key (a request that sent none), the transaction commits after the handler
/// unless it answered a `5xx`. Effects outside the database (an e-mail, a call to a card
/// network) are not covered: give those their own idempotency key (`once`, or
/// `idem-client` toward the other service).
///
/// Only idem finishes it: a handler taking it without `#[idempotent]` (or
/// [`Idempotent::run`](crate::Idempotent::run)) has its writes rolled back.
///
/// ```no_run
/// use axum::http::StatusCode;
/// use idem_runtime::{idempotent, store::PgTransaction};
///
/// #[idempotent]
/// async fn pay(tx: PgTransaction, body: String) -> Result<StatusCode, StatusCode> {
///     let mut conn = tx.conn().await.map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
///     sqlx::query("INSERT INTO payments (body) VALUES ($1)")
///         .bind(&body)
///         .execute(&mut *conn)
///         .await
///         .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
///     Ok(StatusCode::CREATED)
/// }
/// ```
#[derive(Clone)]
pub struct PgTransaction(Arc<Inner>);

struct Inner {
    store: PostgresStore,
    state: Mutex<State>,
    /// Set when a front door of idem will finish the transaction.
    finished_by_idem: Arc<AtomicBool>,
}

/// Where the transaction stands. It is opened by the first query, so that work that
/// never writes (a replay, a refusal) costs the database nothing.
enum State {
    NotStarted,
    Open(sqlx::Transaction<'static, Postgres>),
    Finished,
}

impl PgTransaction {
    /// A transaction on `store`'s pool, opened when first used.
    pub(crate) fn new(store: &PostgresStore, finished_by_idem: Arc<AtomicBool>) -> Self {
        Self(Arc::new(Inner {
            store: store.clone(),
            state: Mutex::new(State::NotStarted),
            finished_by_idem,
        }))
    }

    /// The transaction's connection, to run queries on (`.execute(&mut *conn)`); the
    /// first call opens the transaction. Hold it only while querying: idem takes the
    /// transaction back when the work returns. An error once idem has finished the
    /// transaction, or when the pool has no connection to give.
    pub async fn conn(&self) -> Result<MappedMutexGuard<'_, PgConnection>, sqlx::Error> {
        if !self.0.finished_by_idem.load(Ordering::Acquire) {
            tracing::error!(target: "idem", "`PgTransaction` used in a handler without `#[idempotent]`: nothing would commit it");
            return Err(sqlx::Error::Protocol(
                "a PgTransaction is committed by #[idempotent] (or Idempotent::run); this handler has neither, so its writes would be lost".into(),
            ));
        }
        let mut state = self.0.state.lock().await;
        if let State::NotStarted = *state {
            *state = State::Open(self.0.store.pool.begin().await?);
        }
        MutexGuard::try_map(state, |state| match state {
            State::Open(transaction) => Some(&mut **transaction),
            State::NotStarted | State::Finished => None,
        })
        .map_err(|_| {
            sqlx::Error::Protocol(
                "idem has already committed or rolled back this transaction".into(),
            )
        })
    }

    /// Ends the transaction's use: what it was.
    async fn finish(&self) -> State {
        std::mem::replace(&mut *self.0.state.lock().await, State::Finished)
    }
}

impl fmt::Debug for PgTransaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTransaction").finish_non_exhaustive()
    }
}

impl Transactional for PgTransaction {
    fn complete<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        record: Bytes,
        ttl: Duration,
        stands_alone: bool,
    ) -> BoxFuture<'a, Committed> {
        Box::pin(async move {
            let store = &self.0.store;
            let mut transaction = match self.finish().await {
                State::Open(transaction) => transaction,
                // The work wrote nothing: the plain completion is all there is to commit.
                State::NotStarted => {
                    return match store.complete(key, claim, record, ttl).await {
                        Ok(true) => Committed::Yes,
                        Ok(false) => Committed::Superseded,
                        Err(error) => Committed::Unknown(error),
                    };
                }
                State::Finished => {
                    return Committed::RolledBack(StoreError::backend(
                        "the work's transaction was already finished",
                    ));
                }
            };
            // Locks the record's row until the commit: no other executor can take the
            // key over meanwhile.
            let written = sqlx::query(store.statements.complete_in_transaction.clone())
                .bind(key)
                .bind(claim.as_ref())
                .bind(record.as_ref())
                .bind(millis(ttl))
                .execute(&mut *transaction)
                .await;
            match written {
                Ok(done) if done.rows_affected() == 1 => match transaction.commit().await {
                    Ok(()) => Committed::Yes,
                    Err(error) => Committed::Unknown(store.error(error)),
                },
                Ok(_) => {
                    let _ = transaction.rollback().await;
                    Committed::Superseded
                }
                // The work ignored a failed statement, so the database aborted the
                // transaction: none of its writes can commit. A refusal holds without them.
                Err(error) if stands_alone && is_aborted(&error) => {
                    let _ = transaction.rollback().await;
                    match store.complete(key, claim, record, ttl).await {
                        Ok(true) => Committed::Yes,
                        Ok(false) => Committed::Superseded,
                        Err(error) => Committed::Unknown(error),
                    }
                }
                Err(error) => {
                    let _ = transaction.rollback().await;
                    Committed::RolledBack(store.error(error))
                }
            }
        })
    }

    fn commit(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            match self.finish().await {
                State::Open(mut transaction) => {
                    // PostgreSQL answers COMMIT of an aborted transaction with a rollback,
                    // not an error: ask first, so that lost writes are never reported as
                    // committed.
                    if let Err(error) = sqlx::query("SELECT 1").execute(&mut *transaction).await {
                        let _ = transaction.rollback().await;
                        return Err(self.0.store.error(error));
                    }
                    transaction
                        .commit()
                        .await
                        .map_err(|error| self.0.store.error(error))
                }
                State::NotStarted | State::Finished => Ok(()),
            }
        })
    }

    fn rollback(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let State::Open(transaction) = self.finish().await {
                let _ = transaction.rollback().await;
            }
        })
    }
}

/// Whether `error` says the transaction was aborted by an earlier failed statement
/// (SQLSTATE 25P02, `in_failed_sql_transaction`).
fn is_aborted(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|error| error.code())
        .is_some_and(|code| code == "25P02")
}
