//! Executions holding a key in this process, from the claim until the record is stored or
//! the key released, whether their caller waits or went away: what a shutdown waits for,
//! and names when it cannot wait longer, and whose leases the renewal task renews. Beside
//! them, the keys not yet settled without a claim held: a claim sent and not answered
//! yet, a release under way.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::runtime;
use tokio::sync::Notify;

use tokio::time::Instant;

use crate::key::ScopedKey;
use crate::metrics::Metrics;
use crate::protocol::lease::HeldClaim;
use crate::sharded::Hasher;

/// The executions now holding a key, each by its claim.
pub(crate) struct InFlight {
    metrics: Metrics,
    next: AtomicU64,
    running: Mutex<Running>,
    /// How many [`Entry`]s and [`Settling`]s there are, in one count: a key passing from
    /// one to the other (a claim answered becoming an execution, an execution ending in a
    /// release) is counted by both for a moment, and so is never read as neither.
    under_way: AtomicUsize,
    /// Set while a shutdown waits: only then does the last one under way wake it.
    awaited: AtomicBool,
    /// Woken when the last execution ends, or the last key settles.
    idle: Notify,
}

#[derive(Default)]
struct Running {
    /// By the entry's number, which no client chooses: hashed with the fast hasher.
    claims: HashMap<u64, Arc<HeldClaim>, Hasher>,
    /// The renewal tasks that run now: one per runtime claims were made on, each by its
    /// generation.
    renewers: Vec<(runtime::Id, u64)>,
    /// How many renewal tasks were started.
    renewers_started: u64,
}

/// One execution in [`InFlight`], counted until dropped.
pub(crate) struct Entry {
    registry: Arc<InFlight>,
    id: u64,
}

/// A key of this process not yet settled, while no [`Entry`] counts it: its claim sent
/// and unanswered, or its release under way. Counted until dropped, without a lock.
pub(crate) struct Settling {
    registry: Arc<InFlight>,
}

impl Drop for Settling {
    fn drop(&mut self) {
        self.registry.settled();
    }
}

impl InFlight {
    pub(crate) fn new(metrics: Metrics) -> Self {
        Self {
            metrics,
            next: AtomicU64::new(0),
            running: Mutex::new(Running::default()),
            under_way: AtomicUsize::new(0),
            awaited: AtomicBool::new(false),
            idle: Notify::new(),
        }
    }

    /// Counts an execution holding `claim` until the entry is dropped. With the entry
    /// comes the generation of a renewal task for the caller to start on the claim's
    /// runtime, where none runs there.
    pub(crate) fn enter(self: &Arc<Self>, claim: Arc<HeldClaim>) -> (Entry, Option<u64>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.under_way.fetch_add(1, Ordering::SeqCst);
        let runtime = claim.runtime;
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        running.claims.insert(id, claim);
        let renewer = (!running.renewers.iter().any(|(on, _)| *on == runtime)).then(|| {
            running.renewers_started += 1;
            let generation = running.renewers_started;
            running.renewers.push((runtime, generation));
            generation
        });
        drop(running);
        self.metrics.execution_in_flight(true);
        let entry = Entry {
            registry: self.clone(),
            id,
        };
        (entry, renewer)
    }

    /// The claims made on `runtime` whose renewal is due at `now`, each now marked as
    /// renewing, for that runtime's renewal task `generation`; `None` when that task is to
    /// end: no claim made on its runtime is held (the next one starts another), or another
    /// task took its place.
    pub(crate) fn due(
        &self,
        runtime: runtime::Id,
        generation: u64,
        now: Instant,
    ) -> Option<Vec<Arc<HeldClaim>>> {
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if !running.renewers.contains(&(runtime, generation)) {
            return None;
        }
        if !running
            .claims
            .values()
            .any(|claim| claim.runtime == runtime)
        {
            running
                .renewers
                .retain(|renewer| *renewer != (runtime, generation));
            return None;
        }
        Some(
            running
                .claims
                .values()
                .filter(|claim| claim.runtime == runtime && claim.take_if_due(now))
                .cloned()
                .collect(),
        )
    }

    /// `runtime`'s renewal task `generation` ended (its runtime may have shut down): the
    /// next claim made on that runtime starts another.
    pub(crate) fn renewer_gone(&self, runtime: runtime::Id, generation: u64) {
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        running
            .renewers
            .retain(|renewer| *renewer != (runtime, generation));
    }

    /// Counts a key not yet settled until the [`Settling`] is dropped.
    pub(crate) fn settling(self: &Arc<Self>) -> Settling {
        self.under_way.fetch_add(1, Ordering::SeqCst);
        Settling {
            registry: self.clone(),
        }
    }

    /// How many executions hold a key now.
    pub(crate) fn count(&self) -> usize {
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .claims
            .len()
    }

    /// How many executions hold a key, and keys are not settled (claims unanswered,
    /// releases under way), now; one key may be counted twice for a moment. Zero only at a
    /// moment when nothing was under way: one read, which no other read can interleave.
    pub(crate) fn under_way(&self) -> usize {
        self.under_way.load(Ordering::SeqCst)
    }

    /// One execution or unsettled key is no longer under way.
    fn settled(&self) {
        // With `idle`'s store and load, sequentially consistent: either it reads this
        // decrement or this reads that it waits.
        if self.under_way.fetch_sub(1, Ordering::SeqCst) == 1 && self.awaited.load(Ordering::SeqCst)
        {
            self.idle.notify_waiters();
        }
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

    /// Returns once no execution holds a key and every key is settled.
    pub(crate) async fn idle(&self) {
        self.awaited.store(true, Ordering::SeqCst);
        loop {
            // Registered before the counts are read, so that the last execution ending in
            // between still wakes this.
            let ended = self.idle.notified();
            let mut ended = std::pin::pin!(ended);
            ended.as_mut().enable();
            if self.under_way() == 0 {
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
        drop(running);
        self.registry.settled();
        self.registry.metrics.execution_in_flight(false);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use tokio::time::Instant;

    use crate::protocol::lease::LeaseKeeper;
    use crate::{Idempotency, IdempotencyKey, OnceKey, Scope, ScopedKey};

    fn hold(idem: &Idempotency, name: &str) -> LeaseKeeper {
        let key = ScopedKey::new(
            Scope::anonymous(),
            IdempotencyKey::parse(name.as_bytes()).unwrap(),
        );
        LeaseKeeper::start(
            idem,
            &key,
            &Bytes::from_static(b"claim"),
            Instant::now(),
            tracing::Span::none(),
        )
    }

    /// Guards: a shutdown never reads "nothing under way" while something is. One
    /// execution runs; the next key's claim is sent, the first execution ends, and the
    /// claim turns into an execution. A shutdown's read at any moment between those steps
    /// (its thread may be descheduled between any two of them) counts one of them.
    #[tokio::test]
    async fn a_claim_turning_into_an_execution_while_a_shutdown_reads_is_counted() {
        let idem = Idempotency::in_memory();
        let in_flight = &idem.shared.in_flight;
        let first = hold(&idem, "first");
        assert_eq!(idem.shutdown(Duration::ZERO).await, 1);
        let claim = in_flight.settling();
        assert_eq!(idem.shutdown(Duration::ZERO).await, 2);
        drop(first);
        assert_eq!(
            idem.shutdown(Duration::ZERO).await,
            1,
            "the claim is counted"
        );
        let next = hold(&idem, "next");
        assert_eq!(idem.shutdown(Duration::ZERO).await, 2);
        drop(claim);
        assert_eq!(
            idem.shutdown(Duration::ZERO).await,
            1,
            "the execution is counted"
        );
        drop(next);
        assert_eq!(idem.shutdown(Duration::ZERO).await, 0);
    }

    /// Guards: no unbounded growth. A handle shared by 200 short-lived current-thread
    /// runtimes, each making one quick claim and dropped before its renewal task was ever
    /// polled: no renewal task runs any more, so the registry lists none.
    #[test]
    fn short_lived_runtimes_leave_no_renewer_entries() {
        let idem = Idempotency::in_memory();
        for i in 0..200 {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let quick = rt.block_on(
                idem.once(OnceKey::compose(["in-flight", &i.to_string()]), "in")
                    .run(|| async { Ok::<u32, String>(1) }),
            );
            assert_eq!(quick.unwrap(), 1);
            drop(rt);
        }
        let running = idem.shared.in_flight.running.lock().unwrap();
        assert_eq!(running.claims.len(), 0);
        assert_eq!(
            running.renewers.len(),
            0,
            "renewer entries left for runtimes that are gone"
        );
    }
}
