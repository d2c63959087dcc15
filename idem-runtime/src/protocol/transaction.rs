//! Work that writes in a database transaction of its own store: the completed record is
//! written in that transaction, under the fencing check, and commits with the work's
//! writes, or both roll back. The front door sees only a [`TransactionSlot`]; a store
//! that can do this fills it (see `store::PgTransaction` and `store::SqliteTransaction`).

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use pin_project_lite::pin_project;
use tokio::sync::Notify;

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
    ///
    /// `fenced` is called once the record is written under the fencing check, before the
    /// commit: from then on the transaction holds the key's row, and the lease needs no
    /// renewal (one would wait for that row until the commit ends).
    fn complete<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        record: Bytes,
        ttl: Duration,
        stands_alone: bool,
        fenced: &'a mut (dyn FnMut() + Send),
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
    /// Which guard of the request finishes the transaction: none yet ([`FREE`]), one
    /// whose claim is under way ([`CLAIMING`]: handed back if it never runs its work), or
    /// one whose work runs ([`RUNNING`]), ran ([`ENDED`]), or runs on without its caller
    /// ([`GIVEN_UP`]), for good.
    owner: AtomicU8,
    /// Woken when a guard whose claim was under way keeps the transaction or hands it
    /// back, once a guard waits for that (`awaited`: most requests have one guard, and
    /// never pay for a wake-up).
    owner_settled: Notify,
    awaited: AtomicBool,
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

    /// What a guard of the request does with its work, as its `run` starts:
    ///
    /// - while no guard holds the request's turn, it takes it: it claims the key, and the
    ///   first guard whose work runs finishes the request's transaction;
    /// - started while this thread polls another guard's work (see
    ///   [`inside_work`](Self::inside_work)), it passes its work through, under that
    ///   one's key;
    /// - while another guard's work runs outside this one (beside it, or in a task the
    ///   work spawned, which idem cannot tell apart), or ran on after its caller gave it
    ///   up, it is refused: neither passing through (its work would run beside or after
    ///   the other's, unprotected) nor claiming (it would find the key held by its own
    ///   request, and a work it runs in would store that answer);
    /// - once another guard's work ended, it claims the key without the turn, and
    ///   finishes no transaction: it is answered as a retry would be;
    /// - while another guard's claim is under way, it waits to know
    ///   ([`settled`](Self::settled)) if the request holds a transaction, and claims the
    ///   key without the turn if not.
    pub(crate) fn guarding(&self) -> Guarding {
        match self
            .0
            .owner
            .compare_exchange(FREE, CLAIMING, Ordering::SeqCst, Ordering::SeqCst)
        {
            // Free: no guard's work runs, so none is polled here.
            Ok(_) => Guarding::Turn(Turn(self.clone())),
            Err(_) if self.inside_work() => Guarding::PassThrough,
            Err(RUNNING) => Guarding::Refuse { given_up: false },
            Err(GIVEN_UP) => Guarding::Refuse { given_up: true },
            Err(ENDED) => Guarding::Claim,
            // Without a transaction to finish, there is nothing to wait for.
            Err(_) if !self.is_filled() => Guarding::Claim,
            Err(_) => Guarding::Wait,
        }
    }

    /// [`guarding`](Self::guarding), once no other guard's claim is under way. A claim
    /// given up on settles once it is released; one whose future is kept without being
    /// polled never does, and the caller bounds the wait.
    pub(crate) async fn settled(&self) -> Guarding {
        loop {
            let settled = self.0.owner_settled.notified();
            let mut settled = std::pin::pin!(settled);
            settled.as_mut().enable();
            // With the owner's store and load, sequentially consistent: either this reads
            // the turn settled, or the guard that settles it reads that this one waits.
            self.0.awaited.store(true, Ordering::SeqCst);
            match self.guarding() {
                Guarding::Wait => settled.await,
                guarding => return guarding,
            }
        }
    }

    /// Whether this thread is polling the work of a guard of this request: a guard
    /// started there (one taken by hand inside the work of `#[idempotent]`) runs its work
    /// as it is, under the key the outer guard holds.
    pub(crate) fn inside_work(&self) -> bool {
        POLLING_WORK.get() == Arc::as_ptr(&self.0).cast()
    }

    /// `work`, polled as the work of a guard of this request (see
    /// [`inside_work`](Self::inside_work)).
    pub(crate) fn around_work<F>(&self, work: F) -> AroundWork<F> {
        AroundWork {
            work,
            slot: self.clone(),
        }
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

/// No guard of the request holds the turn to finish its transaction.
const FREE: u8 = 0;
/// A guard holds the turn while its claim is under way.
const CLAIMING: u8 = 1;
/// A guard's work runs holding the turn, its caller waiting for it.
const RUNNING: u8 = 2;
/// A guard's work ran holding the turn, and ended.
const ENDED: u8 = 3;
/// A guard's work runs holding the turn (or ran), its caller gone: it runs on in a task of
/// its own.
const GIVEN_UP: u8 = 4;

/// What a guard does with its work (see [`TransactionSlot::guarding`]).
pub(crate) enum Guarding {
    /// Claims the key holding the request's turn.
    Turn(Turn),
    /// Runs the work as it is, under another guard's key.
    PassThrough,
    /// Claims the key without the turn.
    Claim,
    /// Waits for another guard's claim to settle.
    Wait,
    /// Does not run its work: another guard's work runs outside it, or was given up
    /// before it ended (`given_up`: its caller went away, or it panicked), and may run on.
    Refuse { given_up: bool },
}

/// A guard's turn to finish the request's transaction while its claim is under way (see
/// [`TransactionSlot::guarding`]). Dropped, it is handed back for the next guard.
pub(crate) struct Turn(TransactionSlot);

impl Turn {
    /// The guard's work runs: the turn is its for good (see
    /// [`TransactionSlot::work_runs`]).
    pub(crate) fn run(self) -> Running {
        self.0.work_runs()
    }
}

impl TransactionSlot {
    /// A guard's work runs, holding the request's turn or not: the request's other guards
    /// are refused until the returned [`Running`] [ends](Running::end) (dropped before,
    /// its caller gave the work up), and no other guard takes the turn after.
    pub(crate) fn work_runs(&self) -> Running {
        let slot = &self.0;
        slot.owner.store(RUNNING, Ordering::SeqCst);
        slot.settled();
        Running {
            slot: self.clone(),
            ended: false,
        }
    }
}

/// A guard's work running, its caller waiting for it.
pub(crate) struct Running {
    slot: TransactionSlot,
    ended: bool,
}

impl Running {
    /// The guard's work ended, and its caller has its answer.
    pub(crate) fn end(mut self) {
        self.ended = true;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let slot = &self.slot.0;
        let state = if self.ended { ENDED } else { GIVEN_UP };
        slot.owner.store(state, Ordering::SeqCst);
        slot.settled();
    }
}

impl Slot {
    /// Wakes the guards waiting for the turn to settle, if any waits.
    fn settled(&self) {
        if self.awaited.load(Ordering::SeqCst) {
            self.owner_settled.notify_waiters();
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        // Not run: handed back, for the next guard.
        let slot = &self.0.0;
        if slot
            .owner
            .compare_exchange(CLAIMING, FREE, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            slot.settled();
        }
    }
}

thread_local! {
    /// The slot of the request whose guard's work this thread is polling, if any.
    static POLLING_WORK: Cell<*const ()> = const { Cell::new(std::ptr::null()) };
}

pin_project! {
    /// A guard's work, marked as such while it is polled.
    pub(crate) struct AroundWork<F> {
        #[pin]
        work: F,
        slot: TransactionSlot,
    }
}

impl<F: Future> Future for AroundWork<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        /// Puts the mark back as it was, however the poll ends (a panic included).
        struct Restore(*const ());
        impl Drop for Restore {
            fn drop(&mut self) {
                POLLING_WORK.set(self.0);
            }
        }
        let this = self.project();
        let _restore = Restore(POLLING_WORK.replace(Arc::as_ptr(&this.slot.0).cast()));
        this.work.poll(cx)
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
