//! [`SqliteTransaction`]: the work's writes and idem's completed record in one SQLite
//! transaction.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use sqlx::{SqlStr, Sqlite, SqliteConnection};
use tokio::sync::MappedMutexGuard;

use super::{SqliteStore, expiry_after};
use crate::protocol::Transactional;
use crate::store::transaction::{Backend, DatabaseTransaction, Fenced, Shared, sealed};
use crate::store::{BoxFuture, Store, StoreError};

/// A transaction on the database file of the [`SqliteStore`] that holds the key, which
/// idem commits together with the completed record, or rolls back with it: what
/// `PgTransaction` (feature `postgres`) is on PostgreSQL, on SQLite.
///
/// Take it as an argument of an `#[idempotent]` handler (or get it as the argument of
/// [`Once::run_in_transaction`](crate::once::Once::run_in_transaction)), write the
/// business rows through [`conn`](Self::conn), and return: idem then writes the
/// response's record in this transaction, checks that the key is still this execution's
/// (fencing), and commits both. So, for writes in this file:
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
/// # One writer at a time
///
/// The first [`conn`](Self::conn) opens the transaction with `BEGIN IMMEDIATE`: it takes
/// SQLite's write lock at once and holds it until idem commits or rolls back, so the
/// work's later writes and the completion never fail on a lock another connection took
/// meanwhile. On SQLite, transactional handlers therefore run **one at a time** while
/// they write (a second one's first `conn()` waits for the lock, up to the busy
/// timeout), and every other write to the file, other keys' claims and completions
/// included, waits too, and so do the lease renewals of every other execution: keep the
/// time between the first `conn()` and the return well under the lease (a transaction
/// that holds the lock for longer can let another execution's lease lapse, as a store
/// outage that long would). Do the slow part (a call to another service) before the
/// first `conn()`, and write through `conn()` only: a write on another connection of the
/// same file, from inside the handler, waits for the handler's own lock.
///
/// Reads on other connections (replays, `409`s) go on in WAL mode. The renewals of this
/// execution's own lease are writes, so they wait and may fail while the work holds the
/// lock, and the lease may lapse on the clock. That never runs the key twice: no other
/// executor can take the key over while the lock is held (taking it over is a write), and
/// the completion's fencing check asks only that the key still holds this execution's
/// claim, not that its lease be unexpired.
///
/// A failed statement does not end a SQLite transaction, and the work may go on from
/// it. A few errors do end it (a full disk, an I/O error, an `INSERT OR ROLLBACK`
/// conflict): idem then finds no transaction to commit, rolls back and never reports the
/// result as done; statements run after such an error commit on their own, outside any
/// transaction, so stop at the first error.
///
/// Savepoints of the work's own (`conn.begin()` on the connection) work as on any
/// connection: one rolled back undoes only its writes. Work that returns inside one, or
/// whose savepoint outlived a transaction SQLite ended, gets no record written: its writes
/// roll back, the key is released, and the connection goes back to the pool in no
/// transaction.
///
/// ```no_run
/// use axum::http::StatusCode;
/// use idem_runtime::{idempotent, store::SqliteTransaction};
///
/// #[idempotent]
/// async fn pay(tx: SqliteTransaction, body: String) -> Result<StatusCode, StatusCode> {
///     let mut conn = tx.conn().await.map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
///     sqlx::query("INSERT INTO payments (body) VALUES (?1)")
///         .bind(&body)
///         .execute(&mut *conn)
///         .await
///         .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
///     Ok(StatusCode::CREATED)
/// }
/// ```
#[derive(Clone)]
pub struct SqliteTransaction(Arc<Shared<SqliteStore>>);

impl SqliteTransaction {
    /// The transaction's connection, to run queries on (`.execute(&mut *conn)`); the
    /// first call opens the transaction and takes the write lock. Hold it only while
    /// querying: idem takes the transaction back when the work returns. An error outside
    /// the work that `#[idempotent]` (or `Idempotent::run`) runs, since nothing would
    /// commit it there; once idem has finished the transaction; when the pool has no
    /// connection to give; or when the lock is not free within the busy timeout.
    pub async fn conn(&self) -> Result<MappedMutexGuard<'_, SqliteConnection>, sqlx::Error> {
        self.0.conn().await
    }
}

impl fmt::Debug for SqliteTransaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl DatabaseTransaction for SqliteTransaction {}

impl sealed::OnStore for SqliteTransaction {
    const NAME: &'static str = "SqliteTransaction";
    const STORE: &'static str = "SqliteStore";

    fn on_store(store: &dyn Store, finished_by_idem: Arc<AtomicBool>) -> Option<Self> {
        let store = store.as_any()?.downcast_ref::<SqliteStore>()?;
        Some(Self(Shared::new(store, finished_by_idem)))
    }

    fn transactional(&self) -> Arc<dyn Transactional> {
        self.0.clone()
    }
}

/// SQLite's primary result codes for a busy database and a violated constraint.
const SQLITE_BUSY: i32 = 5;
const SQLITE_CONSTRAINT: i32 = 19;

/// The table, in each connection's own `temp` schema, where a `SqliteTransaction` marks
/// itself; no store table may take its name (SQLite looks in `temp` first).
pub(crate) const MARK_TABLE: &str = "idem_open_transaction_mark";

/// How a `SqliteTransaction` begins: with a row in [`MARK_TABLE`], written in the
/// transaction, which [`still_open`] takes back. A row left by a transaction the work
/// committed itself is cleared first, outside it.
const WORK_OPEN: &str = "CREATE TEMP TABLE IF NOT EXISTS idem_open_transaction_mark (open INTEGER); \
    DELETE FROM temp.idem_open_transaction_mark; \
    BEGIN IMMEDIATE; \
    INSERT INTO temp.idem_open_transaction_mark VALUES (1)";

/// Whether the connection is still in the transaction [`WORK_OPEN`] began. SQLite ends a
/// transaction by itself on a few errors (`SQLITE_FULL`, an I/O error, `INSERT OR
/// ROLLBACK`), or the work may have sent `COMMIT` or `ROLLBACK` (and `BEGIN` again); then
/// a write would commit alone, or with none of the work's.
///
/// A deferred `BEGIN` tells whether any transaction is open: SQLite refuses it inside one,
/// and outside one it starts a transaction that takes no lock, for the caller to roll
/// back. Inside one, the row `WORK_OPEN` wrote tells whether it is the work's: a rollback
/// took it back. Taken now, so that a commit leaves none. (Work that committed itself and
/// began again still finds the row its commit kept: the record then commits beside writes
/// that stand, which is all that can be done for them.)
async fn still_open(connection: &mut SqliteConnection) -> bool {
    if sqlx::query("BEGIN").execute(&mut *connection).await.is_ok() {
        return false;
    }
    sqlx::query("DELETE FROM temp.idem_open_transaction_mark")
        .execute(connection)
        .await
        .is_ok_and(|done| done.rows_affected() > 0)
}

impl Backend for SqliteStore {
    type Db = Sqlite;
    const NAME: &'static str = "SqliteTransaction";

    // The write lock from the first statement: the work's later writes and the
    // completion never meet a lock taken by another connection meanwhile (a deferred
    // transaction that read first fails there with SQLITE_BUSY, whatever the timeout).
    const BEGIN: &'static str = WORK_OPEN;

    fn pool(&self) -> &sqlx::SqlitePool {
        &self.pool
    }

    fn fence<'a>(
        &'a self,
        connection: &'a mut SqliteConnection,
        key: &'a str,
        claim: &'a [u8],
        record: &'a [u8],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Fenced, sqlx::Error>> {
        Box::pin(async move {
            if !still_open(connection).await {
                return Ok(Fenced::Aborted(StoreError::backend(
                    "SQLite ended the work's transaction before its completion (a statement failed with a rollback, or the work ended it)",
                )));
            }
            let done = sqlx::query(self.statements.complete_in_transaction.clone())
                .bind(key)
                .bind(claim)
                .bind(record)
                .bind(expiry_after(ttl))
                .execute(connection)
                .await?;
            Ok(if done.rows_affected() == 1 {
                Fenced::Written
            } else {
                Fenced::NotHeld
            })
        })
    }

    fn check_open<'a>(
        &'a self,
        connection: &'a mut SqliteConnection,
    ) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        Box::pin(async move {
            if still_open(connection).await {
                Ok(())
            } else {
                Err(sqlx::Error::Protocol(
                    "SQLite ended the work's transaction before its commit (a statement failed with a rollback, or the work ended it)".into(),
                ))
            }
        })
    }

    fn execute<'a>(
        &'a self,
        connection: &'a mut SqliteConnection,
        statement: SqlStr,
    ) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        Box::pin(async move { sqlx::raw_sql(statement).execute(connection).await.map(drop) })
    }

    fn error(&self, error: sqlx::Error) -> StoreError {
        SqliteStore::error(self, error)
    }

    fn commit_refused(&self, error: &sqlx::Error) -> bool {
        // SQLite answers a `COMMIT` it cannot make with the transaction still open (a
        // deferred foreign key left violated, a lock it could not get), which idem then
        // rolls back: nothing of it is committed.
        error
            .as_database_error()
            .and_then(|error| error.code())
            .and_then(|code| code.parse::<i32>().ok())
            .is_some_and(|code| matches!(code & 0xff, SQLITE_BUSY | SQLITE_CONSTRAINT))
    }
}
