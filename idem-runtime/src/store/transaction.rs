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
use sqlx::Database;
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

/// What a store gives its transaction: how to open one, and the statements idem runs in
/// it. Implemented by the stores themselves.
pub(crate) trait Backend: Store + Clone {
    /// The store's sqlx database.
    type Db: Database;
    /// The public transaction type's name, for messages.
    const NAME: &'static str;

    /// Opens a transaction on a connection of the store's pool.
    fn open(&self) -> BoxFuture<'_, Result<sqlx::Transaction<'static, Self::Db>, sqlx::Error>>;

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

    /// Whether a failed `COMMIT` was answered by the database with a refusal that leaves
    /// nothing committed (a serialization failure, say), rather than failing without an
    /// answer. `false` where that cannot be told.
    fn commit_refused(&self, _error: &sqlx::Error) -> bool {
        false
    }

    /// Readies the connection for its `ROLLBACK`, which must succeed for the driver to
    /// count the transaction as ended (a connection it still counts in one refuses every
    /// later transaction). Nothing by default.
    fn before_rollback<'a>(
        &'a self,
        _connection: &'a mut <Self::Db as Database>::Connection,
    ) -> BoxFuture<'a, ()> {
        Box::pin(std::future::ready(()))
    }
}

/// Rolls `transaction` back, readied by the store first.
async fn roll_back<B: Backend>(store: &B, mut transaction: sqlx::Transaction<'static, B::Db>) {
    store.before_rollback(&mut transaction).await;
    let _ = transaction.rollback().await;
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
    state: Mutex<State<B::Db>>,
    /// Set when a front door of idem will finish the transaction.
    finished_by_idem: Arc<AtomicBool>,
}

/// Where the transaction stands. It is opened by the first query, so that work that
/// never writes (a replay, a refusal) costs the database nothing.
enum State<DB: Database> {
    NotStarted,
    Open(sqlx::Transaction<'static, DB>),
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
            *state = State::Open(self.store.open().await?);
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

    /// Ends the transaction's use: what it was. Waits for work that still holds the
    /// connection.
    async fn finish(&self) -> State<B::Db> {
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
            let mut transaction = match self.finish().await {
                State::Open(transaction) => transaction,
                // The work wrote nothing: the plain completion is all there is to commit.
                State::NotStarted => return self.complete_alone(key, claim, record, ttl).await,
                State::Finished => {
                    return Committed::RolledBack(StoreError::backend(
                        "the work's transaction was already finished",
                    ));
                }
            };
            let written = self
                .store
                .fence(&mut transaction, key, claim, &record, ttl)
                .await;
            match written {
                Ok(Fenced::Written) => {
                    fenced();
                    match transaction.commit().await {
                        Ok(()) => Committed::Yes,
                        // Refused: nothing committed, and the claim is still this execution's.
                        Err(error) if self.store.commit_refused(&error) => {
                            Committed::RolledBack(self.store.error(error))
                        }
                        Err(error) => Committed::Unknown(self.store.error(error)),
                    }
                }
                Ok(Fenced::NotHeld) => {
                    roll_back(&self.store, transaction).await;
                    Committed::Superseded
                }
                // None of the work's writes can commit. A refusal holds without them.
                Ok(Fenced::Aborted(_)) if stands_alone => {
                    roll_back(&self.store, transaction).await;
                    self.complete_alone(key, claim, record, ttl).await
                }
                Ok(Fenced::Aborted(error)) => {
                    roll_back(&self.store, transaction).await;
                    Committed::RolledBack(error)
                }
                Err(error) => {
                    roll_back(&self.store, transaction).await;
                    Committed::RolledBack(self.store.error(error))
                }
            }
        })
    }

    fn commit(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            match self.finish().await {
                State::Open(mut transaction) => {
                    // Lost writes are never reported as committed: a transaction the
                    // database ended or aborted by itself is rolled back and reported.
                    if let Err(error) = self.store.check_open(&mut transaction).await {
                        roll_back(&self.store, transaction).await;
                        return Err(self.store.error(error));
                    }
                    transaction
                        .commit()
                        .await
                        .map_err(|error| self.store.error(error))
                }
                State::NotStarted | State::Finished => Ok(()),
            }
        })
    }

    fn rollback(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let State::Open(transaction) = self.finish().await {
                roll_back(&self.store, transaction).await;
            }
        })
    }
}

impl<B: Backend> fmt::Debug for Shared<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct(B::NAME).finish_non_exhaustive()
    }
}
