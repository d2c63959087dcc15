//! Executions holding a key in this process, from the claim until the record is stored or
//! the key released, whether their caller waits or went away: what a shutdown waits for,
//! and names when it cannot wait longer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

use crate::key::ScopedKey;
use crate::metrics::Metrics;

/// The executions now holding a key, each by its key.
pub(crate) struct InFlight {
    metrics: Metrics,
    next: AtomicU64,
    running: Mutex<HashMap<u64, ScopedKey>>,
    count: watch::Sender<usize>,
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
            running: Mutex::new(HashMap::new()),
            count: watch::Sender::new(0),
        }
    }

    /// Counts an execution of `key` until the entry is dropped.
    pub(crate) fn enter(self: &Arc<Self>, key: ScopedKey) -> Entry {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        running.insert(id, key);
        self.count.send_replace(running.len());
        self.metrics.execution_in_flight(true);
        Entry {
            registry: self.clone(),
            id,
        }
    }

    /// How many executions hold a key now.
    pub(crate) fn count(&self) -> usize {
        *self.count.borrow()
    }

    /// The keys of the executions running now.
    pub(crate) fn keys(&self) -> Vec<ScopedKey> {
        let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        running.values().cloned().collect()
    }

    /// Returns once no execution holds a key.
    pub(crate) async fn idle(&self) {
        let mut count = self.count.subscribe();
        // The sender lives in `self`, so the channel cannot close while this waits.
        let _ = count.wait_for(|&count| count == 0).await;
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        let mut running = self
            .registry
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        running.remove(&self.id);
        self.registry.count.send_replace(running.len());
        self.registry.metrics.execution_in_flight(false);
    }
}
