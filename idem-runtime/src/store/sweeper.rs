//! The background sweep of the SQL stores: deletes expired rows at an interval until the
//! last clone of its store is dropped.

use std::future::Future;
use std::time::Duration;

use super::StoreError;

/// The background sweep; aborted when dropped.
pub(crate) struct Sweeper(tokio::task::JoinHandle<()>);

impl Sweeper {
    /// Runs `sweep` every `interval` on the current Tokio runtime. `sweep` must not hold
    /// the sweeper itself (the store's clone it captures has none), so that the last
    /// clone of the store going away is what stops it.
    pub(crate) fn start<F, Fut>(interval: Duration, mut sweep: F) -> Self
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<u64, StoreError>> + Send,
    {
        Self(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                match sweep().await {
                    Ok(0) => {}
                    Ok(deleted) => {
                        tracing::debug!(target: "idem", deleted, "swept expired rows");
                    }
                    Err(error) => {
                        tracing::warn!(target: "idem", %error, "sweeping expired rows failed; trying again at the next interval");
                    }
                }
            }
        }))
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        self.0.abort();
    }
}
