//! The protocol behind every front door: claim a key or find what it holds, run the work
//! holding the claim with its lease renewed, then complete or release the claim under the
//! fencing check.
//!
//! Nothing here knows HTTP. A front door (the HTTP layer in [`crate::http`]) fingerprints
//! its request, calls [`begin`], runs its work through the [`Execution`] it gets, and
//! encodes its own result as the completed record; the records are opaque here but for
//! their head (see [`crate::record`]).
//!
//! One call to [`begin`] makes one store round trip in the common case and decides
//! between running the work, answering from what the key holds, and refusing.

mod detach;
pub(crate) mod lease;
mod running;
pub(crate) mod step;
#[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]
mod transaction;

use std::future::{Future, ready};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::Either;
use tokio::time::{Instant, sleep};
use tracing::Instrument;

pub(crate) use self::detach::to_the_end;
use self::lease::LeaseKeeper;
use self::step::{Step, later, store_step};
#[cfg_attr(
    not(any(feature = "postgres", feature = "sqlite")),
    allow(unused_imports)
)]
pub(crate) use self::transaction::{
    Committed, Guarding, Running, TransactionSlot, Transactional, Turn,
};
use crate::config::Idempotency;
use crate::fingerprint::Fingerprint;
use crate::in_flight::Settling;
use crate::key::ScopedKey;
use crate::record::{self, Kind};
use crate::store::{BoxFuture, StoreError};

/// What [`begin`] decided.
pub(crate) enum Begun {
    /// This caller holds the key: run the work.
    Execute(Execution),
    /// The work does not run; this is what the key holds, or why it cannot be claimed.
    Answer(Answer),
    /// The work does not run: the local tier holds the key's completed record, and the
    /// store was not asked.
    Local(Answer),
    /// The store failed and fail-open is on: run the work without protection, holding
    /// the guard's turn to finish the request's transaction, if it had one.
    Unprotected(Option<Turn>),
}

/// Why the work does not run.
#[derive(Debug)]
pub(crate) enum Answer {
    /// The key holds the completed record of this same request: replay it.
    Completed(Bytes),
    /// The same request ran under the key, but its result could not be stored; the
    /// record says what is known of it.
    NotStored(Bytes),
    /// The key holds a record of a different request.
    KeyReused,
    /// The same request is running under the key now.
    InFlight,
    /// Too much work runs detached from callers that went away; refused before the store.
    Overloaded,
    /// The store failed (or is full) and fail-open is off.
    Unavailable,
}

/// Claims `key` for a request with `fingerprint`, or finds what is already there. While
/// the same request runs under the key, waits up to `wait` for it to end before answering
/// that it is in flight. An execution writes in the transaction the work puts in
/// `transaction`, if it takes one: the completion is then written and committed in it.
///
/// A copy in the local tier, or too much detached work, is answered when `begin` is
/// called, before its future is polled; the claim is made from the first poll on, and a
/// future dropped before it claims nothing. The caller's span must be entered for both:
/// the lease's renewals log in the span current when the claim is answered.
///
/// The execution holds the guard's `turn` to finish the request's transaction, if it has
/// one: handed back when the execution ends without running the work, once a claim it
/// sent is released.
pub(crate) fn begin(
    idem: &Idempotency,
    key: ScopedKey,
    fingerprint: Fingerprint,
    ttl: Duration,
    wait: Option<Duration>,
    transaction: TransactionSlot,
    turn: Option<Turn>,
) -> impl Future<Output = Begun> + Send + use<> {
    let shared = &idem.shared;
    let settings = &shared.settings;
    if let Some(copy) = shared
        .local
        .as_ref()
        .and_then(|local| local.get(key.as_str()))
        && let Ok(Some(answer)) = classify(idem, &key, &fingerprint, copy, None)
    {
        return Either::Left(ready(Begun::Local(answer)));
    }
    if shared.detached.load(Ordering::Relaxed) >= settings.max_detached {
        tracing::warn!(target: "idem", limit = settings.max_detached, "too much detached work running; refusing");
        return Either::Left(ready(Begun::Answer(Answer::Overloaded)));
    }
    // Armed when the claim's future is first polled (never sent, a claim needs no release).
    let execution = Execution {
        idem: idem.clone(),
        key,
        claim: record::new_claim(fingerprint),
        fingerprint,
        ttl,
        armed: false,
        persist_release: true,
        claim_may_land: false,
        keeper: None,
        settling: Some(shared.in_flight.settling()),
        transaction,
        turn,
        stands_alone: false,
    };
    Either::Right(claim(execution, wait))
}

/// [`begin`]'s store round trips: `execution` claims its key, or finds what it holds.
/// Everything the claim needs is read from the execution, which its future holds once
/// (an `async fn` would hold each argument twice: as passed, and moved into its body).
#[allow(
    clippy::manual_async_fn,
    reason = "an `async fn` holds each argument twice: as passed, and moved into its body"
)]
fn claim(mut execution: Execution, wait: Option<Duration>) -> impl Future<Output = Begun> + Send {
    async move {
        // Armed before the store call: if this future is dropped after the store applied the
        // claim but before the answer arrived, dropping the execution releases the claim.
        execution.armed = true;
        let wait_until = wait.map(|max| later(Instant::now(), max));
        let mut backoff = Duration::from_millis(20);
        // Once this request has seen the key in flight, a store failure never runs it
        // unprotected (fail-open): the other request may still be running.
        let mut seen_in_flight = false;
        loop {
            // Dropped before its answer, the claim may still be applied after a release
            // sent then (a statement in flight on another connection).
            execution.claim_may_land = true;
            let Execution {
                idem,
                key,
                claim,
                fingerprint,
                ..
            } = &execution;
            let lease = idem.settings().lease;
            // The lease runs from when the claim is sent, not from when its answer arrives.
            let sent_at = Instant::now();
            let forgets = execution.local_forgets();
            let found = match store_step(
                idem,
                Step::Begin,
                idem.begin_call(key.as_str(), claim, lease),
            )
            .await
            {
                Ok(found) => found,
                Err(error) => {
                    let answer = store_failed(idem, &error, seen_in_flight);
                    execution.claim_failed(&error);
                    return execution.unprotected_with_turn(answer);
                }
            };
            // The store may hand back this request's own claim: a `begin` applied twice
            // because a client library re-sent it after losing the answer.
            if let Some(found) = found.filter(|found| found != claim) {
                {
                    let classified = classify(idem, key, fingerprint, found, Some(forgets));
                    execution.disarm();
                    match classified {
                        Ok(Some(answer)) => return Begun::Answer(answer),
                        Ok(None) => seen_in_flight = true,
                        // A record is there that this build cannot read (written by a newer
                        // version, or damaged): the key was used, so running the request,
                        // fail-open or not, could run it a second time.
                        Err(error) => {
                            tracing::error!(target: "idem", %error, "the record under the key does not read; refusing");
                            return Begun::Answer(Answer::Unavailable);
                        }
                    }
                }
                if let Some(until) = wait_until
                    && Instant::now() + backoff < until
                {
                    // Boxed: only a request waiting for another needs room for a timer.
                    Box::pin(sleep(backoff)).await;
                    execution.armed = true;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                    continue;
                }
                tracing::info!(target: "idem", "in flight");
                return Begun::Answer(Answer::InFlight);
            }
            // An answer that took half the lease or more may describe a claim that has lapsed
            // since and been taken over: confirm it with a renewal before running anything.
            let mut held_from = sent_at;
            if sent_at.elapsed() >= lease / 2 {
                let renewed_at = Instant::now();
                let renewed = store_step(
                    idem,
                    Step::Renew,
                    idem.renew_call(key.as_str(), claim, lease),
                )
                .await;
                match renewed {
                    Ok(true) if renewed_at.elapsed() < lease / 2 => held_from = renewed_at,
                    Ok(true) => {
                        tracing::warn!(target: "idem", "the store answers too slowly to hold a lease; refusing");
                        execution.release().await;
                        return Begun::Answer(Answer::Unavailable);
                    }
                    Ok(false) => {
                        tracing::warn!(target: "idem", "the claim lapsed before its answer arrived; answering in flight");
                        execution.disarm();
                        return Begun::Answer(Answer::InFlight);
                    }
                    // The store failed: answered as a store failure, and never run
                    // unprotected (fail-open), as the claim may still be held.
                    Err(error) => {
                        tracing::warn!(target: "idem", %error, "the store failed to confirm a claim answered late; refusing");
                        execution.release_once();
                        return Begun::Answer(Answer::Unavailable);
                    }
                }
            }
            tracing::debug!(target: "idem", "executing");
            let keeper = LeaseKeeper::start(idem, key, claim, held_from, tracing::Span::current());
            execution.keeper = Some(keeper);
            execution.settling = None;
            execution.claim_may_land = false;
            return Begun::Execute(execution);
        }
    }
}

/// What a record found under the key means for this request: an answer, or `None` for a
/// request in flight. The one place where the stored fingerprint meets the new one.
/// `from_store` is `Some` for a record the store answered, with the local tier's count of
/// forgets read before the store was asked: a completed one is copied to the tier.
fn classify(
    idem: &Idempotency,
    key: &ScopedKey,
    fingerprint: &Fingerprint,
    found: Bytes,
    from_store: Option<u64>,
) -> Result<Option<Answer>, StoreError> {
    let head = record::head(&found).map_err(StoreError::backend)?;
    if head.fingerprint != *fingerprint {
        tracing::warn!(target: "idem", "key reused with a different request");
        return Ok(Some(Answer::KeyReused));
    }
    match head.kind {
        Kind::InProgress => Ok(None),
        Kind::Completed => {
            if let (Some(local), Some(forgets), Some(expires_at_ms)) =
                (&idem.shared.local, from_store, head.expires_at_ms)
            {
                // A copy of its own, not a clone: a clone's shared header would live as
                // long as the copy (see `kept_copy`).
                local.insert(key.as_str(), kept_copy(&found), expires_at_ms, forgets);
            }
            Ok(Some(Answer::Completed(found)))
        }
        Kind::NotStored => {
            tracing::info!(target: "idem", "already executed; its result was not stored");
            Ok(Some(Answer::NotStored(found)))
        }
    }
}

/// The answer when the store fails during `begin`. A request that has seen the key in
/// flight is told so whatever the mode: running it unprotected could run it beside the
/// request it saw.
fn store_failed(idem: &Idempotency, error: &StoreError, seen_in_flight: bool) -> Begun {
    if seen_in_flight || matches!(error, StoreError::Contended(_)) {
        tracing::warn!(target: "idem", %error, "store failed while the key is in flight; answering in flight");
        Begun::Answer(Answer::InFlight)
    } else if matches!(error, StoreError::Full(_) | StoreError::Occupied(_)) {
        tracing::warn!(target: "idem", %error, "store full, or the key holds a foreign value; refusing");
        Begun::Answer(Answer::Unavailable)
    } else if idem.settings().fail_open {
        tracing::warn!(target: "idem", %error, "store failed; running unprotected (fail-open)");
        Begun::Unprotected(None)
    } else {
        tracing::error!(target: "idem", %error, "store failed; refusing");
        Begun::Answer(Answer::Unavailable)
    }
}

/// One execution holding a key. Dropping it without finishing releases the key.
pub(crate) struct Execution {
    idem: Idempotency,
    key: ScopedKey,
    claim: Bytes,
    fingerprint: Fingerprint,
    ttl: Duration,
    armed: bool,
    /// Whether a release the store does not take is retried until the lease ends. Not
    /// after a `begin` the store failed: the claim is then most likely not there, and one
    /// retrying task per refused request would pile up for as long as the outage lasts.
    persist_release: bool,
    /// The claim's `begin` timed out, or has not answered yet: it may still be applied,
    /// after its release.
    claim_may_land: bool,
    /// Renews the lease from the moment of the claim until the execution ends.
    keeper: Option<LeaseKeeper>,
    /// Counts the key as not settled for a shutdown while no keeper does: until the claim
    /// is answered, and while the key is released.
    settling: Option<Settling>,
    /// The transaction the work writes in, if it takes one: the completion is written
    /// and committed in it.
    transaction: TransactionSlot,
    /// The guard's turn to finish the request's transaction, until its work runs (see
    /// [`TransactionSlot::turn`]). Dropped after the release of a claim this execution
    /// sent and did not run the work under: until then, another guard of the request
    /// would find the key held.
    turn: Option<Turn>,
    /// Whether the result holds without the work's writes (a refusal).
    stands_alone: bool,
}

/// What to store instead of a result the store refuses: a record that says the work ran
/// without it. Described, not encoded: a store almost always takes the result.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Fallback {
    /// A response that answered `status` with a body of `body_len` bytes.
    Response {
        status: http::StatusCode,
        body_len: u64,
    },
    /// A `once` result of `len` bytes of JSON.
    Value { len: u64 },
    /// Nothing: the record is the fallback already.
    None,
}

/// How a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Completion {
    /// The result is stored for replay.
    Stored,
    /// The key records that the work ran, without its result.
    NotStored,
    /// The claim was gone (fencing): nothing was stored.
    Lost,
    /// The store failed; the completion is retried in the background.
    Pending,
    /// The work's transaction was rolled back, its writes with it, and the key released:
    /// nothing happened, and a retry runs the work again.
    RolledBack,
    /// The commit of the work's transaction failed without saying whether it happened;
    /// the key is left to its lease, after which a retry finds the record or runs again.
    Unknown,
}

impl Completion {
    /// Whether the work's own writes may not have happened (its transaction did not
    /// commit, or may not have), so that its result must not be handed out as done.
    pub(crate) fn undone(self) -> bool {
        matches!(self, Self::Lost | Self::RolledBack | Self::Unknown)
    }
}

impl Execution {
    /// The handle this execution runs under.
    pub(crate) fn idem(&self) -> &Idempotency {
        &self.idem
    }

    /// The fingerprint of the request that holds the key.
    pub(crate) fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }

    /// How long the completed record is kept.
    pub(crate) fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Says whether the result holds without the work's writes (a refusal, such as a
    /// `4xx`): then a transaction the database aborted does not keep it from being stored.
    pub(crate) fn result_stands_alone(&mut self, stands_alone: bool) {
        self.stands_alone = stands_alone;
    }

    /// Rolls back the writes the work made in its transaction, if it took one, keeping
    /// the claim: the result is then stored on its own.
    ///
    /// Boxed, as [`release`](Self::release) is: only a stored `5xx` discards.
    pub(crate) fn discard_writes(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(
            self.transaction
                .roll_back(self.idem.settings().store_timeout),
        )
    }

    /// The guard's turn to finish the request's transaction, taken out as its work is
    /// about to run.
    pub(crate) fn take_turn(&mut self) -> Option<Turn> {
        self.turn.take()
    }

    /// `answer`, with the guard's turn if it runs the work unprotected (fail-open): that
    /// work writes in the request's transaction, which no other guard may then finish.
    fn unprotected_with_turn(&mut self, answer: Begun) -> Begun {
        match answer {
            Begun::Unprotected(_) => Begun::Unprotected(self.turn.take()),
            answer => answer,
        }
    }

    /// Whether the work took a transaction of its own (whose commit the completion is).
    pub(crate) fn in_transaction(&self) -> bool {
        self.transaction.is_filled()
    }

    /// The record saying the work ran without its result, as `fallback` describes it.
    fn not_stored(&self, fallback: Fallback) -> Option<Bytes> {
        let fingerprint = self.fingerprint;
        let record = match fallback {
            Fallback::None => return None,
            Fallback::Response { status, body_len } => record::Record::Unstorable {
                fingerprint,
                status,
                body_len,
            },
            Fallback::Value { len } => record::Record::ValueNotStored { fingerprint, len },
        };
        Some(record.encode())
    }

    /// Stores `record` if the key still holds this execution's claim. A record the store
    /// cannot keep is replaced by the `fallback`'s, which says the work ran without its
    /// result (encoded only then). A store failure is retried in the background, the lease
    /// still renewed, so that a retry is answered rather than run again.
    pub(crate) async fn complete(&mut self, record: Bytes, fallback: Fallback) -> Completion {
        if let Some(transaction) = self.transaction.take() {
            // Boxed: work in a transaction of its own is rare enough that every other
            // execution's future should not hold room for its commit.
            return Box::pin(self.complete_in(transaction, record)).await;
        }
        self.armed = false;
        let mut record = record;
        let mut stored_whole = true;
        let mut outcome = self.store(kept_copy(&record)).await;
        if let Err(error @ StoreError::RecordRefused { .. }) = &outcome {
            tracing::warn!(target: "idem", %error, "the store cannot keep this result; a retry will be told it was not stored");
            if let Some(not_stored) = self.not_stored(fallback) {
                record = not_stored;
                stored_whole = false;
                outcome = self.store(record.clone()).await;
            }
        }
        match outcome {
            Ok(true) if stored_whole => Completion::Stored,
            Ok(true) => Completion::NotStored,
            Ok(false) => {
                tracing::warn!(target: "idem", "lease was lost before completion (fencing); result not stored");
                Completion::Lost
            }
            Err(error) => {
                tracing::warn!(target: "idem", %error, "storing the result failed; retrying in the background while the lease is held");
                let not_stored = if stored_whole {
                    self.not_stored(fallback)
                } else {
                    None
                };
                let retrying = retry_completion(
                    self.idem.clone(),
                    self.key.clone(),
                    self.claim.clone(),
                    self.ttl,
                    record,
                    not_stored,
                    self.keeper.take(),
                );
                tokio::spawn(retrying.in_current_span());
                Completion::Pending
            }
        }
    }

    /// Writes `record` in the work's own transaction under the fencing check and commits
    /// both. The lease is renewed until the record's row is written: the transaction may
    /// still be in use by the work (a task it spawned, a streamed body), and until then
    /// another executor could take an expired claim over. From then on the transaction
    /// holds the row (a takeover waits for the commit, then finds the record), and a
    /// renewal would only wait for that row, holding one of the store's few renewal
    /// connections while the commit waits (for a lock, a deferred constraint). The
    /// execution counts as in flight until the outcome settles, so that a shutdown waits
    /// for the commit.
    async fn complete_in(
        &mut self,
        transaction: Arc<dyn Transactional>,
        record: Bytes,
    ) -> Completion {
        let in_flight = &self.idem.shared.in_flight;
        let mut renewing = self.keeper.take();
        // Counted for a shutdown from before the keeper goes until the outcome settles: a
        // rollback still releases the key.
        let mut settling = None;
        let mut fenced = || {
            settling = Some(in_flight.settling());
            renewing = None;
        };
        // Bounded: work that still holds the transaction (a response body streaming from
        // it, say) must not hold the request for ever.
        let timeout = self.idem.settings().store_timeout;
        let completing = transaction.complete(
            self.key.as_str(),
            &self.claim,
            record,
            self.ttl,
            self.stands_alone,
            &mut fenced,
        );
        let committed = tokio::time::timeout(timeout, completing)
            .await
            .unwrap_or(Committed::Unknown(StoreError::Timeout(timeout)));
        self.settling = settling.or_else(|| Some(in_flight.settling()));
        drop(renewing);
        let completion = match committed {
            Committed::Yes => {
                self.armed = false;
                Completion::Stored
            }
            Committed::Superseded => {
                self.armed = false;
                tracing::warn!(target: "idem", "another execution took the key over (fencing); this one's writes were rolled back");
                Completion::Lost
            }
            Committed::RolledBack(error) => {
                tracing::warn!(target: "idem", %error, "the work's transaction could not take its result and was rolled back; releasing the key");
                self.release().await;
                Completion::RolledBack
            }
            Committed::Unknown(error) => {
                self.armed = false;
                tracing::error!(target: "idem", %error, "the commit of the work's transaction failed without an answer; the key is left to its lease");
                Completion::Unknown
            }
        };
        self.settling = None;
        completion
    }

    /// Gives the key up, so that a retry runs the work again, and rolls back the work's
    /// transaction if it took one. The execution stays armed until the release is done:
    /// a caller dropped meanwhile still releases, from `Drop`.
    ///
    /// Boxed: a release follows a failure (a panic, a `5xx`, a rollback), and the futures
    /// of every execution that ends well should not hold room for one.
    pub(crate) fn release(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.transaction
                .roll_back(self.idem.settings().store_timeout)
                .await;
            if self.settling.is_none() {
                self.settling = Some(self.idem.shared.in_flight.settling());
            }
            self.keeper = None;
            release(&self.idem, &self.key, &self.claim, self.persist_release).await;
            self.armed = false;
            self.settling = None;
        })
    }

    /// The claim's `begin` failed with `error`, and may have been applied before: `Drop`
    /// releases it once, not until the store takes the release (the claim is most likely
    /// not there). A claim that timed out may also land later (a statement waiting for a
    /// lock, a command still queued): then `Drop` keeps releasing it until the store takes
    /// the release or the lease has run out.
    fn claim_failed(&mut self, error: &StoreError) {
        self.persist_release = false;
        self.claim_may_land = matches!(error, StoreError::Timeout(_));
    }

    /// A release on `Drop` is tried once, not retried until the store takes it.
    fn release_once(&mut self) {
        self.persist_release = false;
        self.claim_may_land = false;
    }

    /// Nothing is released on `Drop`: the key does not hold this execution's claim.
    fn disarm(&mut self) {
        self.armed = false;
    }

    /// The local tier's count of forgets, read before the store is asked for the key.
    fn local_forgets(&self) -> u64 {
        self.idem
            .shared
            .local
            .as_ref()
            .map_or(0, |local| local.forgets(self.key.as_str()))
    }

    fn store(&self, record: Bytes) -> impl Future<Output = Result<bool, StoreError>> + '_ {
        store_completion(&self.idem, &self.key, &self.claim, self.ttl, record)
    }
}

impl Drop for Execution {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (idem, key, claim) = (self.idem.clone(), self.key.clone(), self.claim.clone());
            let settling = self
                .settling
                .take()
                .unwrap_or_else(|| idem.shared.in_flight.settling());
            // Handed back once the claim is released, not before.
            let turn = self.turn.take();
            if self.claim_may_land
                && let Some(slot) = LateRelease::take()
            {
                runtime.spawn(
                    async move {
                        let _slot = slot;
                        release_late_claim(&idem, &key, &claim, settling, turn).await;
                    }
                    .in_current_span(),
                );
                return;
            }
            let persist = self.persist_release;
            runtime.spawn(
                async move {
                    let _settling = settling;
                    release(&idem, &key, &claim, persist).await;
                    drop(turn);
                }
                .in_current_span(),
            );
        }
    }
}

/// The largest record [`kept_copy`] copies.
const COPIED_RECORD: usize = 4096;

/// `record`, for a store that may keep it for its TTL while the caller keeps its own.
///
/// A small record is copied. A clone of bytes made from a `Vec` allocates a small shared
/// header, which would live as long as the stored record. Interleaved with each
/// request's short-lived blocks, those headers leave the heap in small free pieces, and
/// every later allocation that misses its thread cache walks them. In a load test of
/// memory first executions, glibc's free-list walks fell from 6–9 % of the server's
/// time to under 1 %. The copy is one allocation too, so it costs no more than the
/// header. A large record is shared: its copy would cost more than the header, and
/// large blocks come from other bins.
fn kept_copy(record: &Bytes) -> Bytes {
    if record.len() <= COPIED_RECORD {
        Bytes::copy_from_slice(record)
    } else {
        record.clone()
    }
}

/// How long a completion is retried in the background after the store failed, at most.
/// The lease is renewed meanwhile, so the key stays held; past this the key is let go
/// (its lease runs out) rather than held for ever by a store that refuses every write.
const COMPLETION_RETRY_LIMIT: Duration = Duration::from_secs(30);

/// Retries storing `record` after a store failure, while the lease holds. A store that
/// refuses the record for good gets `not_stored` instead, where there is one and it was
/// not tried yet (a retry is told the result was not stored, and never runs the work
/// again).
async fn retry_completion(
    idem: Idempotency,
    key: ScopedKey,
    claim: Bytes,
    ttl: Duration,
    mut record: Bytes,
    mut not_stored: Option<Bytes>,
    keeper: Option<LeaseKeeper>,
) {
    let give_up = later(Instant::now(), COMPLETION_RETRY_LIMIT);
    let mut delay = Duration::from_millis(100);
    let mut attempts = 1u32;
    loop {
        sleep(delay).await;
        attempts += 1;
        match store_completion(&idem, &key, &claim, ttl, record.clone()).await {
            Ok(true) => {
                tracing::info!(target: "idem", attempts, "result stored after retrying");
                break;
            }
            Ok(false) => {
                tracing::error!(target: "idem", attempts, "the lease ran out before the result could be stored; a retry may run the work again");
                break;
            }
            Err(StoreError::RecordRefused { .. }) if not_stored.is_some() => {
                record = not_stored.take().unwrap_or(record);
                delay = Duration::ZERO;
            }
            // Any other error may pass (the store down for completes, a timeout): the
            // record is tried again, never taken for refused.
            Err(error) => {
                let holds = keeper.as_ref().is_some_and(LeaseKeeper::holds);
                if !holds || Instant::now() >= give_up {
                    tracing::error!(target: "idem", attempts, %error, "the result could not be stored; the key is let go when its lease runs out, and a retry may run the work again");
                    break;
                }
                delay = (delay * 2).clamp(Duration::from_millis(100), Duration::from_secs(2));
            }
        }
    }
    drop(keeper);
}

/// Stores `record` under `key` if `claim` still holds it: the completion step. A plain
/// function, so that its callers' futures hold the step's future and nothing around it.
fn store_completion<'a>(
    idem: &'a Idempotency,
    key: &'a ScopedKey,
    claim: &'a Bytes,
    ttl: Duration,
    record: Bytes,
) -> impl Future<Output = Result<bool, StoreError>> + 'a {
    store_step(
        idem,
        Step::Complete,
        idem.complete_call(key.as_str(), claim, record, ttl),
    )
}

/// One of the [`LateRelease::MAX`] releases of late claims that may run at once in the
/// process; past that (an outage timing out every claim), a timed-out claim is released
/// once, as any failed one, and left to its lease.
struct LateRelease;

/// How many [`LateRelease`]s are held now.
static LATE_RELEASES: AtomicUsize = AtomicUsize::new(0);

impl LateRelease {
    const MAX: usize = 1024;

    fn take() -> Option<Self> {
        LATE_RELEASES
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |running| {
                (running < Self::MAX).then_some(running + 1)
            })
            .ok()
            .map(|_| Self)
    }
}

impl Drop for LateRelease {
    fn drop(&mut self) {
        LATE_RELEASES.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Releases a claim whose `begin` timed out or went unanswered, and so may be applied by
/// the store after any release sent now: releases until one finds the claim and deletes
/// it, or until a lease has passed (a claim that landed has run out by then). Backs off
/// from 100 ms to 2 s between attempts. A shutdown waits for the first attempt
/// (`settling`), not for the rest: the claim most likely never landed, and they could
/// only end with the lease. The request's other guards wait for it too (`turn`).
async fn release_late_claim(
    idem: &Idempotency,
    key: &ScopedKey,
    claim: &Bytes,
    settling: Settling,
    turn: Option<Turn>,
) {
    let gone_by = later(Instant::now(), idem.settings().lease);
    let mut delay = Duration::from_millis(100);
    let release = || store_step(idem, Step::Release, idem.release_call(key.as_str(), claim));
    let mut released = release().await;
    drop(settling);
    drop(turn);
    loop {
        if let Ok(true) = released {
            tracing::info!(target: "idem", "released a claim that landed after its begin timed out");
            return;
        }
        if Instant::now() + delay >= gone_by {
            return;
        }
        sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
        released = release().await;
    }
}

/// Releases the claim. With `persist`, a release the store does not take is retried in
/// the background until it is taken or the lease has run out anyway, so a store that comes
/// back frees the key at once rather than after a whole lease.
async fn release(idem: &Idempotency, key: &ScopedKey, claim: &Bytes, persist: bool) {
    let started = Instant::now();
    let Err(error) = store_step(idem, Step::Release, idem.release_call(key.as_str(), claim)).await
    else {
        return;
    };
    if !persist {
        tracing::warn!(target: "idem", %error, "releasing the key failed; its lease frees it");
        return;
    }
    // Retried in the background until the lease ends; a shutdown does not wait for that
    // (the store refused the release once, and the lease frees the key anyway).
    tracing::warn!(target: "idem", %error, "releasing the key failed; retrying until its lease ends");
    let (idem, key, claim) = (idem.clone(), key.clone(), claim.clone());
    let retrying = async move {
        let lease_ends = later(started, idem.settings().lease);
        let mut delay = Duration::from_millis(100);
        while Instant::now() + delay < lease_ends {
            sleep(delay).await;
            if store_step(
                &idem,
                Step::Release,
                idem.release_call(key.as_str(), &claim),
            )
            .await
            .is_ok()
            {
                tracing::info!(target: "idem", "key released after retrying");
                return;
            }
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    };
    tokio::spawn(retrying.in_current_span());
}
