//! Executions holding a key in this process, from the claim until the record is stored or
//! the key released, whether their caller waits or went away: what a shutdown waits for,
//! and names when it cannot wait longer, and whose leases the renewal task renews.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

use tokio::time::Instant;

use crate::key::ScopedKey;
use crate::metrics::Metrics;
use crate::protocol::lease::HeldClaim;

/// The executions now holding a key, each by its claim.
pub(crate) struct InFlight {
    metrics: Metrics,
    next: AtomicU64,
    running: Mutex<Running>,
    /// Woken when the last execution ends.
    idle: Notify,
}

#[derive(Default)]
struct Running {
    claims: HashMap<u64, Arc<HeldClaim>>,
    /// The generation of the renewal task that runs now, if one does.
    renewer: Option<u64>,
    /// How many renewal tasks were started.
    renewers_started: u64,
}

/// One execution in [`InFlight`], counted until dropped.
pub(crate) struct Entry {
    registry: Arc<InFlight>,
    id: u64,
}

impl InFlight {
    pub(crate) fn new(metrics: Metrics) -> Self {
        Self {
            metrics,
            next: AtomicU64::new(0),
            running: Mutex::new(Running::default()),
            idle: Notify::new(),
        }
    }

    /// Counts an execution holding `claim` until the entry is dropped. With the entry
    /// comes the generation of a renewal task for the caller to start, where none runs.
    pub(crate) fn enter(self: &Arc<Self>, claim: Arc<HeldClaim>) -> (Entry, Option<u64>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        running.claims.insert(id, claim);
        let renewer = running.renewer.is_none().then(|| {
            running.renewers_started += 1;
            running.renewer = Some(running.renewers_started);
            running.renewers_started
        });
        drop(running);
        self.metrics.execution_in_flight(true);
        let entry = Entry {
            registry: self.clone(),
            id,
        };
        (entry, renewer)
    }

    /// The claims whose renewal is due at `now`, each now marked as renewing, for the
    /// renewal task `generation`; `None` when that task is to end: no claim is held (the
    /// next claim starts another), or another task took its place.
    pub(crate) fn due(&self, generation: u64, now: Instant) -> Option<Vec<Arc<HeldClaim>>> {
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if running.renewer != Some(generation) {
            return None;
        }
        if running.claims.is_empty() {
            running.renewer = None;
            return None;
        }
        Some(
            running
                .claims
                .values()
                .filter(|claim| claim.take_if_due(now))
                .cloned()
                .collect(),
        )
    }

    /// Renewal task `generation` ended. Where it was the current one and claims are
    /// still held (its runtime shut down under it) and `replace`, the generation of the
    /// task the caller starts in its place; otherwise the next claim starts one.
    pub(crate) fn renewer_gone(&self, generation: u64, replace: bool) -> Option<u64> {
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if running.renewer != Some(generation) {
            return None;
        }
        if !replace || running.claims.is_empty() {
            running.renewer = None;
            return None;
        }
        running.renewers_started += 1;
        running.renewer = Some(running.renewers_started);
        running.renewer
    }

    /// How many executions hold a key now.
    pub(crate) fn count(&self) -> usize {
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .claims
            .len()
    }

    /// The keys of the executions running now.
    pub(crate) fn keys(&self) -> Vec<ScopedKey> {
        let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        running
            .claims
            .values()
            .map(|claim| claim.key.clone())
            .collect()
    }

    /// Returns once no execution holds a key.
    pub(crate) async fn idle(&self) {
        loop {
            // Registered before the count is read, so that the last execution ending in
            // between still wakes this.
            let ended = self.idle.notified();
            let mut ended = std::pin::pin!(ended);
            ended.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            ended.await;
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        let mut running = self
            .registry
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        running.claims.remove(&self.id);
        if running.claims.is_empty() {
            self.registry.idle.notify_waiters();
        }
        self.registry.metrics.execution_in_flight(false);
    }
}
