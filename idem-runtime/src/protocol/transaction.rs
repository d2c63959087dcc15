//! Work that writes in a database transaction of its own store: the completed record is
//! written in that transaction, under the fencing check, and commits with the work's
//! writes, or both roll back. The front door sees only a [`TransactionSlot`]; a store
//! that can do this fills it (see `store::PgTransaction` and `store::SqliteTransaction`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use bytes::Bytes;

use crate::store::{BoxFuture, StoreError};

/// How the completion of work in a transaction ended (`pub` for [`Transactional`]).
#[cfg_attr(
    not(any(feature = "postgres", feature = "sqlite")),
    allow(unreachable_pub)
)]
pub enum Committed {
    /// The record and the work's writes are committed together.
    Yes,
    /// The claim was no longer this execution's (fencing): everything was rolled back.
    Superseded,
    /// Nothing was committed, and the claim is still this execution's.
    RolledBack(StoreError),
    /// The commit failed without saying whether it happened.
    Unknown(StoreError),
}

/// A transaction the work writes in, which idem finishes. `pub` in this private module
/// (not nameable outside the crate): the sealed `store::DatabaseTransaction` hands it out.
#[cfg_attr(
    not(any(feature = "postgres", feature = "sqlite")),
    allow(unreachable_pub)
)]
pub trait Transactional: Send + Sync {
    /// Stores `record` under `key` if `claim` still holds it, then commits the work's
    /// writes with it; or rolls everything back.
    ///
    /// With `stands_alone` (a refusal, such as a `4xx`, whose record holds without the
    /// work's writes), a transaction the database has aborted is rolled back and the record
    /// stored on its own.
    fn complete<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        record: Bytes,
        ttl: Duration,
        stands_alone: bool,
    ) -> BoxFuture<'a, Committed>;

    /// Commits the work's writes alone (work that holds no key).
    fn commit(&self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Rolls the work's writes back.
    fn rollback(&self) -> BoxFuture<'_, ()>;
}

/// Where a front door finds the transaction its work took, if it took one. Shared by
/// everything that handles one request or call, whichever comes first.
#[derive(Clone, Default)]
pub(crate) struct TransactionSlot(Arc<Slot>);

#[derive(Default)]
struct Slot {
    transaction: Mutex<Option<Arc<dyn Transactional>>>,
    /// Taken by the first guard of a request that runs its work: that one protects it
    /// and finishes the transaction.
    guarded: AtomicBool,
    /// The flag a transaction handed out through this slot checks before it is used,
    /// made when the first one is handed out. Not in `Slot` itself: the transaction it
    /// is given to sits in this slot.
    finish: OnceLock<Arc<AtomicBool>>,
}

impl TransactionSlot {
    /// Puts the work's transaction in. `false` when one is there already: a request or
    /// call writes in one transaction.
    pub(crate) fn fill(&self, transaction: Arc<dyn Transactional>) -> bool {
        let mut slot = self.lock();
        if slot.is_some() {
            return false;
        }
        *slot = Some(transaction);
        true
    }

    /// `true` for the first caller only: the guard that protects the work and finishes
    /// its transaction.
    pub(crate) fn first_guard(&self) -> bool {
        !self.0.guarded.swap(true, Ordering::AcqRel)
    }

    /// The flag the work's transaction checks before it is used: set by
    /// [`finished_by_idem`](Self::finished_by_idem). A transaction handed out where
    /// nothing runs the work through a front door refuses to be used, rather than lose
    /// its writes.
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    pub(crate) fn finish_flag(&self) -> Arc<AtomicBool> {
        self.0.finish.get_or_init(Arc::default).clone()
    }

    /// Says that a front door now runs the work and will finish its transaction (commit
    /// it or roll it back). Called after the transaction is handed out.
    pub(crate) fn finished_by_idem(&self) {
        if let Some(flag) = self.0.finish.get() {
            flag.store(true, Ordering::Release);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Arc<dyn Transactional>>> {
        self.0
            .transaction
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the work took a transaction.
    pub(crate) fn is_filled(&self) -> bool {
        self.lock().is_some()
    }

    /// Takes the transaction out, if the work took one.
    pub(crate) fn take(&self) -> Option<Arc<dyn Transactional>> {
        self.lock().take()
    }

    /// Commits the work's writes when `keep`, else rolls them back; for work that ran
    /// without a key. `Err` when the commit failed, or did not end `within` (the work may
    /// still hold the transaction: a body streamed from it); then nothing commits it.
    pub(crate) async fn finish_unkeyed(
        &self,
        keep: bool,
        within: Duration,
    ) -> Result<(), StoreError> {
        let Some(transaction) = self.take() else {
            return Ok(());
        };
        if keep {
            tokio::time::timeout(within, transaction.commit())
                .await
                .unwrap_or(Err(StoreError::Timeout(within)))
        } else {
            roll_back_within(transaction.as_ref(), within).await;
            Ok(())
        }
    }

    /// Rolls back what the work wrote, if it took a transaction. Waits at most `within`
    /// for the work to give the transaction back (a body streamed from it may hold it):
    /// past that, it rolls back when the work lets go of it, since nothing can commit it
    /// any more.
    pub(crate) async fn roll_back(&self, within: Duration) {
        if let Some(transaction) = self.take() {
            roll_back_within(transaction.as_ref(), within).await;
        }
    }
}

async fn roll_back_within(transaction: &dyn Transactional, within: Duration) {
    if tokio::time::timeout(within, transaction.rollback())
        .await
        .is_err()
    {
        tracing::warn!(target: "idem", "the work still holds its transaction; it rolls back when the work lets go of it");
    }
}
