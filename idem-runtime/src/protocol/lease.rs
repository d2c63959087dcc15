//! Holding a claim: its lease renewed beside the work, for as long as the work runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::{Instant, sleep_until};
use tracing::Instrument;

use super::step::{Step, later, store_step};
use crate::config::Idempotency;
use crate::in_flight::Entry;
use crate::key::ScopedKey;

/// Renews a claim's lease every third of it, from the claim until it is dropped, in a
/// task of its own: the lease holds however long extractors, the work, a streamed result
/// or a completion retried after a store failure take.
pub(crate) struct LeaseKeeper {
    _stop: oneshot::Sender<()>,
    state: Arc<LeaseState>,
    /// Counts the execution in flight for as long as its claim is held, so that a
    /// shutdown waits for it.
    _in_flight: Entry,
}

struct LeaseState {
    /// When the lease surely ends unless renewed: the start of the last renewal that
    /// succeeded, plus the lease.
    held_until: Mutex<Instant>,
    /// When the last renewal that succeeded started.
    renewed_at: Mutex<Option<Instant>>,
    lost: AtomicBool,
}

impl LeaseKeeper {
    /// Starts renewing `claim`, held since `claimed_at`.
    pub(crate) fn start(
        idem: &Idempotency,
        key: &ScopedKey,
        claim: &Bytes,
        claimed_at: Instant,
    ) -> Self {
        let lease = idem.settings().lease;
        let state = Arc::new(LeaseState {
            held_until: Mutex::new(later(claimed_at, lease)),
            renewed_at: Mutex::new(None),
            lost: AtomicBool::new(false),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let renewing = renew_until_stopped(
            idem.clone(),
            key.clone(),
            claim.clone(),
            claimed_at,
            state.clone(),
            stopped,
        );
        tokio::spawn(renewing.in_current_span());
        Self {
            _stop: stop,
            state,
            _in_flight: idem.shared.in_flight.enter(key.clone()),
        }
    }

    /// Whether a renewal that started after `at` succeeded: the store answers.
    pub(crate) fn renewed_since(&self, at: Instant) -> bool {
        self.state
            .renewed_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|renewed| renewed > at)
    }

    /// Whether the lease may still be held.
    pub(crate) fn holds(&self) -> bool {
        !self.state.lost.load(Ordering::Relaxed)
            && Instant::now()
                < *self
                    .state
                    .held_until
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
    }
}

async fn renew_until_stopped(
    idem: Idempotency,
    key: ScopedKey,
    claim: Bytes,
    claimed_at: Instant,
    state: Arc<LeaseState>,
    stopped: oneshot::Receiver<()>,
) {
    let mut stopped = std::pin::pin!(stopped);
    let lease = idem.settings().lease;
    let period = lease / 3;
    let retry = period.min(Duration::from_millis(250));
    let mut next = later(claimed_at, period);
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            () = sleep_until(next) => {}
        }
        let started = Instant::now();
        let renewed = tokio::select! {
            _ = &mut stopped => return,
            renewed = store_step(&idem, Step::Renew, idem.store().renew(key.as_str(), &claim, lease)) => renewed,
        };
        match renewed {
            Ok(true) => {
                *state
                    .held_until
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = later(started, lease);
                *state
                    .renewed_at
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(started);
                next = later(started, period);
            }
            Ok(false) => {
                tracing::warn!(target: "idem", "lease lost while the work runs; its result will not be stored");
                state.lost.store(true, Ordering::Relaxed);
                return;
            }
            Err(error) => {
                tracing::warn!(target: "idem", %error, "lease renewal failed; retrying");
                next = later(Instant::now(), retry);
            }
        }
    }
}
