//! Holding a claim: its lease renewed beside the work, for as long as the work runs.
//!
//! Most work ends long before its lease needs renewing, so a claim costs no task and no
//! timer of its own: it joins the handle's registry of executions in flight (which a
//! shutdown waits for), and one renewal task per handle and runtime, running while a
//! claim made on that runtime is held, looks through the registry a few times per renewal
//! period and renews that runtime's claims that are due, each in a task of its own. A
//! claim is renewed on the runtime that runs its work, as its work is: a runtime that
//! stops being driven, or shuts down, holds up no other runtime's claims.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::runtime;
use tokio::time::{Instant, sleep};
use tracing::Instrument;

use super::step::{Step, later, store_step};
use crate::config::Idempotency;
use crate::in_flight::Entry;
use crate::key::ScopedKey;

/// How many times per renewal period the renewal task looks for claims that are due: a
/// claim is renewed at most this fraction of the period late.
const LOOKS_PER_PERIOD: u32 = 4;

/// A claim this process holds, renewed every third of its lease from the claim until the
/// keeper is dropped: the lease holds however long extractors, the work, a streamed result
/// or a completion retried after a store failure take.
pub(crate) struct LeaseKeeper {
    claim: Arc<HeldClaim>,
    /// Counts the execution in flight for as long as its claim is held, so that a
    /// shutdown waits for it, and lists the claim for the renewal task.
    _in_flight: Entry,
}

/// One claim in the registry of executions in flight.
pub(crate) struct HeldClaim {
    pub(crate) key: ScopedKey,
    /// The runtime the claim was made on, whose renewal task renews it.
    pub(crate) runtime: runtime::Id,
    token: Bytes,
    /// The execution's span, which the renewal's log lines belong to.
    span: tracing::Span,
    times: Mutex<LeaseTimes>,
    /// Set while a renewal of this claim runs, and for good once the lease is lost.
    renewing: AtomicBool,
    lost: AtomicBool,
    /// Set when the keeper is dropped: a renewal under way ends without a word.
    released: AtomicBool,
}

struct LeaseTimes {
    /// When the lease surely ends unless renewed: the start of the last renewal that
    /// succeeded, plus the lease.
    held_until: Instant,
    /// When the next renewal is due.
    next: Instant,
}

impl HeldClaim {
    fn times(&self) -> std::sync::MutexGuard<'_, LeaseTimes> {
        self.times.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a renewal is due at `now` and none runs; if so, the caller runs it.
    pub(crate) fn take_if_due(&self, now: Instant) -> bool {
        self.times().next <= now
            && self
                .renewing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }
}

impl LeaseKeeper {
    /// Starts renewing `claim` on `key`, held since `claimed_at`; the renewals log in
    /// `span`.
    pub(crate) fn start(
        idem: &Idempotency,
        key: &ScopedKey,
        claim: &Bytes,
        claimed_at: Instant,
        span: tracing::Span,
    ) -> Self {
        let lease = idem.settings().lease;
        let runtime = runtime::Handle::current();
        let held = Arc::new(HeldClaim {
            key: key.clone(),
            runtime: runtime.id(),
            token: claim.clone(),
            span,
            times: Mutex::new(LeaseTimes {
                held_until: later(claimed_at, lease),
                next: later(claimed_at, lease / 3),
            }),
            renewing: AtomicBool::new(false),
            lost: AtomicBool::new(false),
            released: AtomicBool::new(false),
        });
        let (entry, renewer) = idem.shared.in_flight.enter(held.clone());
        if let Some(generation) = renewer {
            let gone = RenewerGone {
                idem: idem.clone(),
                runtime: runtime.id(),
                generation,
            };
            runtime.spawn(renew_held(gone));
        }
        Self {
            claim: held,
            _in_flight: entry,
        }
    }

    /// Whether the lease may still be held.
    pub(crate) fn holds(&self) -> bool {
        !self.claim.lost.load(Ordering::Relaxed) && Instant::now() < self.claim.times().held_until
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.claim.released.store(true, Ordering::Relaxed);
    }
}

/// The handle's renewal task for the claims made on `task.runtime`, `task.generation` of
/// those started: it runs while such a claim is held and the registry still names it, and
/// renews each of them that is due. `task` is dropped with the task however it ends, its
/// runtime shutting down before it was ever polled included: the next claim on the
/// runtime starts another.
async fn renew_held(task: RenewerGone) {
    let (idem, runtime, generation) = (task.idem.clone(), task.runtime, task.generation);
    let look_every = idem.settings().lease / 3 / LOOKS_PER_PERIOD;
    loop {
        sleep(look_every).await;
        let Some(due) = idem
            .shared
            .in_flight
            .due(runtime, generation, Instant::now())
        else {
            return;
        };
        for claim in due {
            let span = claim.span.clone();
            let renewing = Renewing(Some(claim));
            tokio::spawn(renew(idem.clone(), renewing).instrument(span));
        }
    }
}

struct RenewerGone {
    idem: Idempotency,
    runtime: runtime::Id,
    generation: u64,
}

impl Drop for RenewerGone {
    fn drop(&mut self) {
        self.idem
            .shared
            .in_flight
            .renewer_gone(self.runtime, self.generation);
    }
}

/// Renews the claim `renewing` holds once, retrying a store failure until it answers or
/// the claim is let go. A renewal dropped before its answer, polled or not (its runtime
/// shutting down), leaves the claim due, for the next renewal task to take.
async fn renew(idem: Idempotency, mut renewing: Renewing) {
    let Some(claim) = renewing.0.clone() else {
        return;
    };
    let lease = idem.settings().lease;
    let period = lease / 3;
    let retry = period.min(Duration::from_millis(250));
    loop {
        if claim.released.load(Ordering::Relaxed) {
            return;
        }
        let started = Instant::now();
        let renewed = store_step(
            &idem,
            Step::Renew,
            idem.renew_call(claim.key.as_str(), &claim.token, lease),
        )
        .await;
        match renewed {
            Ok(true) => {
                let mut times = claim.times();
                times.held_until = later(started, lease);
                times.next = later(started, period);
                drop(times);
                return;
            }
            Ok(false) => {
                if !claim.released.load(Ordering::Relaxed) {
                    tracing::warn!(target: "idem", "lease lost while the work runs; its result will not be stored");
                    claim.lost.store(true, Ordering::Relaxed);
                }
                // Lost for good: never renewed again.
                renewing.0 = None;
                return;
            }
            Err(error) => {
                if claim.released.load(Ordering::Relaxed) {
                    return;
                }
                tracing::warn!(target: "idem", %error, "lease renewal failed; retrying");
                sleep(retry).await;
            }
        }
    }
}

/// Marks its claim as no longer renewing when dropped, unless the lease was lost.
struct Renewing(Option<Arc<HeldClaim>>);

impl Drop for Renewing {
    fn drop(&mut self) {
        if let Some(claim) = &self.0 {
            claim.renewing.store(false, Ordering::Release);
        }
    }
}
