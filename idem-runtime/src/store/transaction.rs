//! What [`PgTransaction`](super::PgTransaction) and
//! [`SqliteTransaction`](super::SqliteTransaction) share: the public (sealed)
//! [`DatabaseTransaction`] the front doors are generic over, and the transaction itself,
//! generic over the store's sqlx database: opened on first use, refused where nothing
//! finishes it, completed under the fencing check or rolled back.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use sqlx::pool::PoolConnection;
use sqlx::{Database, Pool, SqlSafeStr, SqlStr};
use sqlx_core::transaction::{TransactionManager, begin_ansi_transaction_sql};
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};

use crate::protocol::{Committed, Transactional};
use crate::store::{BoxFuture, Store, StoreError};

/// A database transaction that idem hands to work and finishes itself, committing the
/// completed record in it: `PgTransaction` (feature `postgres`) or `SqliteTransaction`
/// (feature `sqlite`), in [`store`](crate::store).
///
/// [`Once::run_in_transaction`](crate::once::Once::run_in_transaction) is generic over
/// it: the operation's argument type says which (`|tx: SqliteTransaction| ...`), and the
/// handle's store must be that transaction's store. Sealed: only idem implements it.
pub trait DatabaseTransaction: sealed::OnStore {}

pub(crate) mod sealed {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use crate::protocol::Transactional;
    use crate::store::Store;

    /// How a front door builds the transaction on the handle's store.
    pub trait OnStore: Clone + Send + Sync + Sized + 'static {
        /// The type's name, for messages.
        const NAME: &'static str;
        /// The name of the store it needs.
        const STORE: &'static str;

        /// A transaction on `store`, opened when first used, if `store` is this type's
        /// store; `finished_by_idem` is set where a front door will finish it.
        fn on_store(store: &dyn Store, finished_by_idem: Arc<AtomicBool>) -> Option<Self>;

        /// The transaction, for the front door that finishes it.
        fn transactional(&self) -> Arc<dyn Transactional>;
    }
}

/// What a store gives its transaction: how to begin one, and the statements idem runs in
/// it. Implemented by the stores themselves.
pub(crate) trait Backend: Store + Clone {
    /// The store's sqlx database.
    type Db: Database;
    /// The public transaction type's name, for messages.
    const NAME: &'static str;
    /// The statement (or statements) that begin the work's transaction.
    const BEGIN: &'static str;

    /// The store's pool, which the work's connection comes from.
    fn pool(&self) -> &Pool<Self::Db>;

    /// Writes `record` over `claim` in the transaction, where the key still holds `claim`
    /// (fencing).
    fn fence<'a>(
        &'a self,
        connection: &'a mut <Self::Db as Database>::Connection,
        key: &'a str,
        claim: &'a [u8],
        record: &'a [u8],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Fenced, sqlx::Error>>;

    /// `Err` where the database has ended or aborted the transaction by itself, so that
    /// its writes cannot commit: asked before the commit of work that holds no key.
    fn check_open<'a>(
        &'a self,
        connection: &'a mut <Self::Db as Database>::Connection,
    ) -> BoxFuture<'a, Result<(), sqlx::Error>>;

    /// A driver error as a store error.
    fn error(&self, error: sqlx::Error) -> StoreError;

    /// Runs `statement` on `connection`, outside the driver's count of transactions.
    fn execute<'a>(
        &'a self,
        connection: &'a mut <Self::Db as Database>::Connection,
        statement: SqlStr,
    ) -> BoxFuture<'a, Result<(), sqlx::Error>>;

    /// Whether a failed `COMMIT` was answered by the database with a refusal that leaves
    /// nothing committed (a serialization failure, say), rather than failing without an
    /// answer. `false` where that cannot be told.
    fn commit_refused(&self, _error: &sqlx::Error) -> bool {
        false
    }
}

/// The driver's bookkeeping of transactions on a connection of `DB`.
type Manager<DB> = <DB as Database>::TransactionManager;

/// How many transactions and savepoints the driver counts open on `connection`: `1` in
/// the work's transaction, more inside savepoints the work opened (`conn.begin()`).
fn depth<DB: Database>(connection: &PoolConnection<DB>) -> usize {
    Manager::<DB>::get_transaction_depth(connection)
}

/// The work's connection, in the transaction idem began on it. Held as the pool's
/// connection, not as a driver `Transaction`, so that idem can tell the connection's
/// state after the work and put it right (or close it) before the pool hands it on.
struct Work<B: Backend> {
    store: B,
    /// The runtime the transaction began on, which `drop` ends it on (wherever the last
    /// handle on it is dropped).
    runtime: tokio::runtime::Handle,
    /// Taken only by `drop`, to end the transaction in a task of its own.
    connection: Option<PoolConnection<B::Db>>,
    /// Set once the connection is in no transaction, in the database and in the driver's
    /// count (or is to be closed).
    ended: bool,
}

impl<B: Backend> Drop for Work<B> {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let Some(mut connection) = self.connection.take() else {
            return;
        };
        // Dropped before idem ended the transaction: the work's future or idem's
        // completion was dropped (a client gone from a request without a key, a deadline
        // of the work's own, the runtime shutting down), maybe while a statement was on
        // the wire, even idem's `BEGIN`, whose reply the driver has not counted yet. End
        // everything in a task of its own, after that reply, on the runtime the
        // transaction began on (wherever this last handle is dropped), entered so that
        // the connection still goes back to its pool where the task cannot run.
        let store = self.store.clone();
        let _entered = self.runtime.enter();
        self.runtime.spawn(async move {
            // A `COMMIT` or `ROLLBACK` whose reply was dropped leaves the SQLite driver
            // skipping the next rollback it is asked to start (it expects the dropped
            // `Transaction`'s own): this is that one, so that the next transaction on the
            // connection is rolled back when dropped. Elsewhere, a first rollback.
            Manager::<B::Db>::start_rollback(&mut connection);
            end_everything(&store, &mut connection).await;
        });
    }
}

impl<B: Backend> Work<B> {
    /// Begins the work's transaction on a connection of `store`'s pool.
    async fn begin(store: &B) -> Result<Self, sqlx::Error> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| sqlx::Error::Protocol("a transaction begins on a Tokio runtime".into()))?;
        let connection = store.pool().acquire().await?;
        // Until its `BEGIN` is answered, the connection counts as in a transaction.
        let mut work = Self {
            store: store.clone(),
            runtime,
            connection: Some(connection),
            ended: false,
        };
        let Some(connection) = work.connection.as_mut() else {
            return Err(gone());
        };
        if let Err(error) = Manager::<B::Db>::begin(connection, Some(B::BEGIN.into_sql_str())).await
        {
            // Of several statements, the one that failed may follow one that began a
            // transaction the driver does not count (and so would not roll back).
            end_everything(&work.store, connection).await;
            work.ended = true;
            return Err(error);
        }
        Ok(work)
    }

    /// The connection, until `drop` hands it to the task that ends its transaction.
    fn connection(&mut self) -> Result<&mut PoolConnection<B::Db>, sqlx::Error> {
        self.connection.as_mut().ok_or_else(gone)
    }

    /// Commits the transaction; on an error, rolls back what is left of it.
    async fn commit(mut self) -> Result<(), sqlx::Error> {
        let connection = self.connection()?;
        match Manager::<B::Db>::commit(connection).await {
            Ok(()) if depth(connection) == 0 => {
                self.ended = true;
                Ok(())
            }
            // Only a savepoint was released (not seen: the count is checked before the
            // commit): what is left is rolled back, and the commit never reported made.
            Ok(()) => {
                self.roll_back().await;
                Err(sqlx::Error::Protocol(
                    "the commit found the work inside a savepoint of its own".into(),
                ))
            }
            Err(error) => {
                self.roll_back().await;
                Err(error)
            }
        }
    }

    /// Rolls the transaction back, with whatever else is open on the connection, so that
    /// it goes back to the pool in no transaction.
    async fn roll_back(mut self) {
        if let Some(connection) = self.connection.as_mut() {
            let ended =
                Manager::<B::Db>::rollback(connection).await.is_ok() && depth(connection) == 0;
            if !ended {
                end_everything(&self.store, connection).await;
            }
        }
        self.ended = true;
    }
}

/// The error for a connection already handed to the task that ends its transaction,
/// which only `drop` does.
fn gone() -> sqlx::Error {
    sqlx::Error::Protocol("the work's connection was already given up".into())
}

/// Ends every transaction and savepoint on the work's connection, in the database and in
/// the driver's count, where the two disagree: the database ended the transaction by
/// itself (SQLite's `INSERT OR ROLLBACK`, a full disk), the work ended or began one, or a
/// savepoint of the work's outlived its transaction. The driver's rollback at each depth
/// ends a savepoint of its own naming, or at depth 1 the transaction, and fails where
/// there is none (leaving its count as it was): each is opened first where missing, then
/// rolled back, down to none. A connection that still cannot be put right is closed, not
/// handed to the next caller.
async fn end_everything<B: Backend>(store: &B, connection: &mut PoolConnection<B::Db>) {
    let _ = store.execute(connection, "ROLLBACK".into_sql_str()).await;
    for _ in 0..=depth(connection) {
        let level = depth(connection);
        if level == 0 {
            return;
        }
        // Refused inside a transaction, harmlessly.
        let _ = store
            .execute(connection, begin_ansi_transaction_sql(0))
            .await;
        if level > 1 {
            let _ = store
                .execute(connection, begin_ansi_transaction_sql(level - 1))
                .await;
        }
        if Manager::<B::Db>::rollback(connection).await.is_err() {
            break;
        }
    }
    if depth(connection) != 0 {
        tracing::error!(target: "idem", "a connection could not be brought out of the work's transaction: closing it");
        connection.close_on_drop();
    }
}

/// What the fencing write in the work's transaction found.
pub(crate) enum Fenced {
    /// The record is written over the claim; the commit makes both visible.
    Written,
    /// The key no longer holds the claim: another execution took it over.
    NotHeld,
    /// The database ended or aborted the transaction before it (the work went on from a
    /// statement that failed): none of the work's writes can commit.
    Aborted(StoreError),
}

/// The transaction of a store `B`, shared by the work (which queries through
/// [`conn`](Self::conn)) and the front door that finishes it.
pub(crate) struct Shared<B: Backend> {
    store: B,
    state: Mutex<State<B>>,
    /// Set when a front door of idem will finish the transaction.
    finished_by_idem: Arc<AtomicBool>,
}

/// Where the transaction stands. It is opened by the first query, so that work that
/// never writes (a replay, a refusal) costs the database nothing.
enum State<B: Backend> {
    NotStarted,
    Open(Work<B>),
    Finished,
}

impl<B: Backend> Shared<B> {
    /// A transaction on `store`'s pool, opened when first used.
    pub(crate) fn new(store: &B, finished_by_idem: Arc<AtomicBool>) -> Arc<Self> {
        Arc::new(Self {
            store: store.clone(),
            state: Mutex::new(State::NotStarted),
            finished_by_idem,
        })
    }

    /// The transaction's connection; the first call opens the transaction. An error
    /// before a front door of idem runs the work (`Idempotent::run`, `once`: the one that
    /// finishes the transaction), once idem has finished it, or when the database gives
    /// no transaction.
    pub(crate) async fn conn(
        &self,
    ) -> Result<MappedMutexGuard<'_, <B::Db as Database>::Connection>, sqlx::Error> {
        if !self.finished_by_idem.load(Ordering::Acquire) {
            tracing::error!(target: "idem", "`{}` used outside the work of `#[idempotent]` or `Idempotent::run`: nothing would commit it", B::NAME);
            return Err(sqlx::Error::Protocol(format!(
                "a {} is committed by #[idempotent] (or Idempotent::run) and is used in the work they run; used anywhere else, its writes would be lost",
                B::NAME
            )));
        }
        let mut state = self.state.lock().await;
        if let State::NotStarted = *state {
            *state = State::Open(Work::begin(&self.store).await?);
        }
        MutexGuard::try_map(state, |state| match state {
            State::Open(work) => work.connection.as_deref_mut(),
            State::NotStarted | State::Finished => None,
        })
        .map_err(|_| {
            sqlx::Error::Protocol(
                "idem has already committed or rolled back this transaction".into(),
            )
        })
    }

    /// Ends the transaction's use: what it was. Waits for work that still holds the
    /// connection.
    async fn finish(&self) -> State<B> {
        std::mem::replace(&mut *self.state.lock().await, State::Finished)
    }

    /// The plain completion, outside any transaction of the work's.
    async fn complete_alone(
        &self,
        key: &str,
        claim: &Bytes,
        record: Bytes,
        ttl: Duration,
    ) -> Committed {
        match self.store.complete(key, claim, record, ttl).await {
            Ok(true) => Committed::Yes,
            Ok(false) => Committed::Superseded,
            Err(error) => Committed::Unknown(error),
        }
    }
}

impl<B: Backend> Transactional for Shared<B> {
    fn complete<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        record: Bytes,
        ttl: Duration,
        stands_alone: bool,
        fenced: &'a mut (dyn FnMut() + Send),
    ) -> BoxFuture<'a, Committed> {
        Box::pin(async move {
            let mut work = match self.finish().await {
                State::Open(work) => work,
                // The work wrote nothing: the plain completion is all there is to commit.
                State::NotStarted => return self.complete_alone(key, claim, record, ttl).await,
                State::Finished => {
                    return Committed::RolledBack(StoreError::backend(
                        "the work's transaction was already finished",
                    ));
                }
            };
            let written = match work.connection() {
                Ok(connection) => self
                    .store
                    .fence(connection, key, claim, &record, ttl)
                    .await
                    .map(|fenced| match fenced {
                        // After the fencing write's round trip, the driver has run what
                        // the work left queued (a dropped savepoint's rollback): its count
                        // is current. Inside a savepoint, the commit would only release it.
                        Fenced::Written if depth(connection) != 1 => Fenced::Aborted(left_open()),
                        fenced => fenced,
                    }),
                Err(error) => Err(error),
            };
            match written {
                Ok(Fenced::Written) => {
                    fenced();
                    match work.commit().await {
                        Ok(()) => Committed::Yes,
                        // Refused: nothing committed, and the claim is still this execution's.
                        Err(error) if self.store.commit_refused(&error) => {
                            Committed::RolledBack(self.store.error(error))
                        }
                        Err(error) => Committed::Unknown(self.store.error(error)),
                    }
                }
                Ok(Fenced::NotHeld) => {
                    work.roll_back().await;
                    Committed::Superseded
                }
                // None of the work's writes can commit. A refusal holds without them.
                Ok(Fenced::Aborted(_)) if stands_alone => {
                    work.roll_back().await;
                    self.complete_alone(key, claim, record, ttl).await
                }
                Ok(Fenced::Aborted(error)) => {
                    work.roll_back().await;
                    Committed::RolledBack(error)
                }
                Err(error) => {
                    work.roll_back().await;
                    Committed::RolledBack(self.store.error(error))
                }
            }
        })
    }

    fn commit(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            match self.finish().await {
                State::Open(mut work) => {
                    // Lost writes are never reported as committed: a transaction the
                    // database ended or aborted by itself is rolled back and reported.
                    let open = match work.connection() {
                        Ok(connection) => match self.store.check_open(connection).await {
                            Ok(()) if depth(connection) != 1 => Err(left_open()),
                            Ok(()) => Ok(()),
                            Err(error) => Err(self.store.error(error)),
                        },
                        Err(error) => Err(self.store.error(error)),
                    };
                    if let Err(error) = open {
                        work.roll_back().await;
                        return Err(error);
                    }
                    work.commit().await.map_err(|error| self.store.error(error))
                }
                State::NotStarted | State::Finished => Ok(()),
            }
        })
    }

    fn rollback(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let State::Open(work) = self.finish().await {
                work.roll_back().await;
            }
        })
    }
}

/// Why work still inside a savepoint of its own at its return is not committed.
fn left_open() -> StoreError {
    StoreError::backend(
        "the work returned inside a savepoint of its own (one it opened with `begin()` and neither committed nor rolled back, or whose rollback failed): its writes are rolled back",
    )
}

impl<B: Backend> fmt::Debug for Shared<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct(B::NAME).finish_non_exhaustive()
    }
}
