//! What an operator asks of a running handle: whether its store answers, and to let the
//! work in flight end before the process does.

use crate::config::Idempotency;
use crate::protocol::step::{Call, Step, store_step};
use crate::store::StoreError;

impl Idempotency {
    /// Whether the store answers now, within the [store timeout](crate::IdempotencyBuilder::store_timeout):
    /// for a readiness probe. While it fails, keyed requests are answered `503` (or run
    /// unprotected with [`fail_open`](crate::IdempotencyBuilder::fail_open)), so a load
    /// balancer should send them elsewhere.
    ///
    /// Asks [`Store::ping`](crate::store::Store::ping): on Redis a write of a short-lived
    /// probe key (`SET ... PX 1000`), so that a server that answers but takes no claim (a
    /// read-only replica) is not ready.
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
        store_step(self, Step::Ping, Call::Pending(self.store().ping())).await
    }
}

impl Idempotency {
    /// Waits, up to `within`, until no execution holds a key in this process: call it
    /// after the server stopped accepting requests (after `axum::serve(..)
    /// .with_graceful_shutdown(..)` returned), so that a deploy never cuts a payment
    /// halfway.
    ///
    /// It waits for every execution from its claim until its response is stored (or its
    /// key released): those whose client is still connected, those whose client hung up
    /// (they run on detached from it), and completions retried after a store failure. It
    /// also waits for claims sent and not yet answered (a request waiting for a key in
    /// flight, with [`wait_for_in_flight`](crate::IdempotencyBuilder::wait_for_in_flight),
    /// counts as one until it is answered: it may yet claim the key and run), and for
    /// releases under way (of a claim whose caller went away before its answer, or of a
    /// key after a failure); not for the background retries of a release the store
    /// refused, or of a claim whose answer timed out, which their leases end anyway.
    /// Executions still running at the deadline are logged, each by its key (a digest
    /// with [`log_keys(false)`](crate::IdempotencyBuilder::log_keys)), claims and releases
    /// still on their way by their number, and all are left alone: nothing stores a half
    /// result for them, and their claims free themselves when their leases run out, so a
    /// retry then runs them again.
    ///
    /// Returns how many executions, unanswered claims and releases were still under way at
    /// the deadline (`0`: all ended).
    ///
    /// ```no_run
    /// # async fn sigterm() {}
    /// # async fn demo(app: axum::Router, idem: idem_runtime::Idempotency) -> std::io::Result<()> {
    /// use std::time::Duration;
    ///
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    /// axum::serve(listener, app)
    ///     .with_graceful_shutdown(sigterm()) // SIGTERM or ctrl-c
    ///     .await?;
    /// let unfinished = idem.shutdown(Duration::from_secs(20)).await;
    /// if unfinished > 0 {
    ///     eprintln!("{unfinished} executions left to their leases");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn shutdown(&self, within: std::time::Duration) -> usize {
        let in_flight = &self.shared.in_flight;
        let under_way = in_flight.under_way();
        if under_way == 0 {
            return 0;
        }
        let running = in_flight.count();
        let unsettled = under_way.saturating_sub(running);
        tracing::info!(target: "idem", running, unsettled, "waiting for executions in flight, and claims or releases on their way, before shutting down");
        if tokio::time::timeout(within, in_flight.idle()).await.is_ok() {
            tracing::info!(target: "idem", "every execution in flight ended");
            return 0;
        }
        // As the logs show keys (a digest with `log_keys(false)`), in order.
        let keys = in_flight.keys();
        let unsettled = in_flight.under_way().saturating_sub(keys.len());
        let mut keys: Vec<String> = keys
            .iter()
            .map(|key| self.logged_key(key.key(), key).to_string())
            .collect();
        keys.sort();
        for key in &keys {
            tracing::warn!(target: "idem", key = %key, "still running at the shutdown deadline; nothing is stored for it, and its claim frees itself when its lease runs out");
        }
        if unsettled > 0 {
            tracing::warn!(target: "idem", unsettled, "claims unanswered or releases under way at the shutdown deadline; their keys free themselves when their leases run out");
        }
        keys.len() + unsettled
    }
}
