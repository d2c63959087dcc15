//! What an operator asks of a running handle: whether its store answers.

use crate::config::Idempotency;
use crate::store::StoreError;

impl Idempotency {
    /// Whether the store answers now, within the [store timeout](crate::IdempotencyBuilder::store_timeout):
    /// for a readiness probe. While it fails, keyed requests are answered `503` (or run
    /// unprotected with [`fail_open`](crate::IdempotencyBuilder::fail_open)), so a load
    /// balancer should send them elsewhere.
    ///
    /// Asks [`Store::ping`](crate::store::Store::ping): `PING` on Redis.
    ///
    /// ```
    /// use axum::{Extension, http::StatusCode, routing::get, Router};
    /// use idem_runtime::Idempotency;
    ///
    /// async fn ready(Extension(idem): Extension<Idempotency>) -> StatusCode {
    ///     match idem.ready().await {
    ///         Ok(()) => StatusCode::OK,
    ///         Err(_) => StatusCode::SERVICE_UNAVAILABLE,
    ///     }
    /// }
    ///
    /// let idem = Idempotency::in_memory();
    /// // The layer puts the handle in every request's extensions.
    /// let app: Router = Router::new().route("/ready", get(ready)).layer(idem.layer());
    /// ```
    pub async fn ready(&self) -> Result<(), StoreError> {
        let timeout = self.settings().store_timeout;
        tokio::time::timeout(timeout, self.store().ping())
            .await
            .unwrap_or(Err(StoreError::Timeout(timeout)))
    }
}
