//! The two helpers every protocol step shares: a store call bounded by its timeout, and
//! a deadline that never overflows.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::Idempotency;
pub(crate) use crate::metrics::Step;
use crate::store::StoreError;

/// One store step, failed with [`StoreError::Timeout`] when it does not answer in time,
/// and timed into `idem_store_seconds` under `step`.
pub(crate) async fn store_step<T>(
    idem: &Idempotency,
    step: Step,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let timeout = idem.settings().store_timeout;
    let started = Instant::now();
    let answer = tokio::time::timeout(timeout, call)
        .await
        .unwrap_or(Err(StoreError::Timeout(timeout)));
    idem.shared.metrics.store_step(step, started.elapsed());
    answer
}

/// `at + after`, or far in the future where that overflows.
pub(crate) fn later(at: Instant, after: Duration) -> Instant {
    at.checked_add(after)
        .unwrap_or_else(|| at + Duration::from_secs(100 * 365 * 24 * 3600))
}
