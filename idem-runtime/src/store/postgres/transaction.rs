//! [`PgTransaction`]: the work's writes and idem's completed record in one PostgreSQL
//! transaction.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use sqlx::{AssertSqlSafe, PgConnection, Postgres, SqlStr};
use tokio::sync::MappedMutexGuard;

use super::{PostgresStore, WORK_IS_OPEN, WORK_OPEN, millis};
use crate::protocol::Transactional;
use crate::store::transaction::{Backend, DatabaseTransaction, Fenced, Shared, sealed};
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
/// At `REPEATABLE READ` or `SERIALIZABLE`, a lease renewal committed after the
/// transaction's snapshot makes the fencing write a serialization failure: the writes roll
/// back, the key is released, and the request is answered `503` (a retry runs it again).
/// The first renewal comes a third of the lease after the claim (10 s with the default
/// 30 s lease): keep such work shorter, or raise the lease
/// ([`lease`](crate::IdempotencyBuilder::lease)). A commit the database refuses (a
/// serialization failure at `COMMIT`, a deferred constraint) is answered the same way.
///
/// Without a key (a request that sent none), the transaction commits after the handler
/// unless it answered a `5xx`. Effects outside the database (an e-mail, a call to a card
/// network) are not covered: give those their own idempotency key (`once`, or
/// `idem-client` toward the other service).
///
/// Only idem finishes it: a handler taking it without `#[idempotent]` (or
/// [`Idempotent::run`](crate::Idempotent::run)) has its writes rolled back. Work that
/// ends it itself (a `COMMIT` or `ROLLBACK` sent through [`conn`](Self::conn)) gets no
/// record written: the request is answered as for a refused commit, and what such a
/// `COMMIT` wrote stands, so a retry runs the work again.
///
/// Savepoints of the work's own (`conn.begin()` on the connection, as a helper written for
/// a plain connection does) work as on any connection: one rolled back undoes only its
/// writes. Work that returns inside one (neither committed nor rolled back) gets no record
/// written either: its writes roll back, and the request is answered as above.
/// sqlx counts savepoints itself: a `begin()` refused in a transaction a failed statement
/// aborted, or given up before its answer (a deadline of the work's around it), rolls
/// back a level it did not open, and what sqlx then ends as the work's savepoint is the
/// whole transaction, as a `ROLLBACK` would: idem answers `503` (writes rolled back), but
/// what the work wrote after that was committed on its own. Stop at the first error, and
/// put no deadline around `begin()`.
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
pub struct PgTransaction(Arc<Shared<PostgresStore>>);

impl PgTransaction {
    /// The transaction's connection, to run queries on (`.execute(&mut *conn)`); the
    /// first call opens the transaction. Hold it only while querying: idem takes the
    /// transaction back when the work returns. An error outside the work that
    /// `#[idempotent]` (or `Idempotent::run`) runs, since nothing would commit it there;
    /// once idem has finished the transaction; or when the pool has no connection to give.
    pub async fn conn(&self) -> Result<MappedMutexGuard<'_, PgConnection>, sqlx::Error> {
        self.0.conn().await
    }
}

impl fmt::Debug for PgTransaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl DatabaseTransaction for PgTransaction {}

impl sealed::OnStore for PgTransaction {
    const NAME: &'static str = "PgTransaction";
    const STORE: &'static str = "PostgresStore";

    fn on_store(store: &dyn Store, finished_by_idem: Arc<AtomicBool>) -> Option<Self> {
        let store = store.as_any()?.downcast_ref::<PostgresStore>()?;
        Some(Self(Shared::new(store, finished_by_idem)))
    }

    fn transactional(&self) -> Arc<dyn Transactional> {
        self.0.clone()
    }
}

impl Backend for PostgresStore {
    type Db = Postgres;
    const NAME: &'static str = "PgTransaction";

    const BEGIN: &'static str = WORK_OPEN;

    fn pool(&self) -> &sqlx::PgPool {
        &self.pool
    }

    fn fence<'a>(
        &'a self,
        connection: &'a mut PgConnection,
        key: &'a str,
        claim: &'a [u8],
        record: &'a [u8],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Fenced, sqlx::Error>> {
        Box::pin(async move {
            // Locks the record's row until the commit: no other executor can take the
            // key over meanwhile.
            let written: Result<(bool, bool), _> =
                sqlx::query_as(self.statements.complete_in_transaction.clone())
                    .bind(key)
                    .bind(claim)
                    .bind(record)
                    .bind(millis(ttl))
                    .fetch_one(connection)
                    .await;
            match written {
                Ok((false, _)) => Ok(Fenced::Aborted(StoreError::backend(
                    "the work ended its transaction itself (a COMMIT or ROLLBACK sent through PgTransaction::conn); idem cannot commit its writes with the record",
                ))),
                Ok((true, true)) => Ok(Fenced::Written),
                Ok((true, false)) => Ok(Fenced::NotHeld),
                // The work ignored a failed statement, so the database aborted the
                // transaction: none of its writes can commit.
                Err(error) if is_aborted(&error) => Ok(Fenced::Aborted(self.error(error))),
                Err(error) => Err(error),
            }
        })
    }

    fn check_open<'a>(
        &'a self,
        connection: &'a mut PgConnection,
    ) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        // PostgreSQL answers COMMIT of an aborted transaction with a rollback, and COMMIT
        // outside one (the work ended it) with a warning, not an error: ask first. Any
        // statement fails in an aborted transaction; outside the work's, the mark its
        // `BEGIN` set is gone.
        Box::pin(async move {
            let open: bool = sqlx::query_scalar(AssertSqlSafe(format!("SELECT {WORK_IS_OPEN}")))
                .fetch_one(connection)
                .await?;
            if open {
                Ok(())
            } else {
                Err(sqlx::Error::Protocol(
                    "the work ended its transaction itself (a COMMIT or ROLLBACK sent through PgTransaction::conn) before idem's commit".into(),
                ))
            }
        })
    }

    fn execute<'a>(
        &'a self,
        connection: &'a mut PgConnection,
        statement: SqlStr,
    ) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        Box::pin(async move { sqlx::raw_sql(statement).execute(connection).await.map(drop) })
    }

    fn error(&self, error: sqlx::Error) -> StoreError {
        PostgresStore::error(self, error)
    }

    fn commit_refused(&self, error: &sqlx::Error) -> bool {
        // PostgreSQL rolls back a transaction whose COMMIT it answers with one of these:
        // a serialization failure (40001), a constraint checked at commit (40002, and
        // class 23 for deferred constraints), a deadlock (40P01).
        error
            .as_database_error()
            .and_then(|error| error.code())
            .is_some_and(|code| {
                matches!(code.as_ref(), "40001" | "40002" | "40P01") || code.starts_with("23")
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
