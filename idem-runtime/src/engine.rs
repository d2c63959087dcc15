//! The protocol engine: begin, execute with lease renewal, complete or release.
//!
//! One request with a key goes through [`begin`], which makes exactly one store round
//! trip and decides between replaying, refusing and executing. An execution then runs the
//! handler in its own task (so a client that disconnects does not cancel it), renews its
//! lease while the handler runs, and ends in one `complete` or `release` round trip.

use std::panic::{AssertUnwindSafe, resume_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderValue, Response as HttpResponse};
use tokio::time::{Instant, sleep, sleep_until, timeout};

use crate::body::{Collected, collect_bounded};
use crate::extract::ScopedKey;
use crate::fingerprint::Fingerprint;
use crate::idempotency::Idempotency;
use crate::local::expiry_ms;
use crate::problem::Problem;
use crate::record::{FencingToken, Record, StoredResponse, encode_completed};
use crate::store::StoreError;

/// The header added to every replayed response.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// What [`begin`] decided.
pub(crate) enum Begun {
    /// This request holds the key: run the handler.
    Execute(Execution),
    /// Answer with this response (a replay or a problem); the handler does not run.
    Respond(Response),
    /// The store failed and fail-open is on: run the handler without protection.
    Unprotected,
}

/// Claims `key` for a request with `fingerprint`, or finds what is already there.
pub(crate) async fn begin(
    idem: &Idempotency,
    key: ScopedKey,
    fingerprint: Fingerprint,
    ttl: Duration,
) -> Begun {
    let config = &idem.config;
    if let Some(response) = local_replay(idem, &key, &fingerprint) {
        return Begun::Respond(response);
    }
    if config.detached.load(Ordering::Relaxed) >= config.max_detached {
        tracing::warn!(target: "idem", key = key.key().as_str(), limit = config.max_detached, "too much detached work running; answering 503");
        return Begun::Respond(Problem::overloaded(config.retry_after_secs()).into_response());
    }
    let claim = Record::InProgress {
        fingerprint,
        token: FencingToken::generate(),
    }
    .encode();
    // Armed before the store call: if this future is dropped after the store applied the
    // claim but before the answer arrived, dropping the execution releases the claim.
    let mut execution = Execution {
        idem: idem.clone(),
        key: key.clone(),
        claim: claim.clone(),
        fingerprint,
        ttl,
        armed: true,
        keeper: None,
    };
    let wait_until = config
        .wait_for_in_flight
        .map(|max| later(Instant::now(), max));
    let mut backoff = Duration::from_millis(20);
    // Once this request has seen the key in flight, a store failure never runs it
    // unprotected (fail-open): the other request may still be running.
    let mut seen_in_flight = false;
    loop {
        // The lease runs from when the claim is sent, not from when its answer arrives.
        let sent_at = Instant::now();
        let answer = timeout(
            config.store_timeout,
            config.store.begin(key.as_str(), &claim, config.lease),
        )
        .await
        .unwrap_or(Err(StoreError::Timeout(config.store_timeout)));
        let found = match answer {
            Ok(found) => found,
            Err(error) => return store_failed(idem, &key, &error, seen_in_flight),
        };
        // The store may hand back this request's own claim: a `begin` applied twice
        // because a client library re-sent it after losing the answer.
        match found {
            None => {}
            Some(found) if found == claim => {}
            Some(found) => {
                execution.armed = false;
                match answer_found(idem, &key, &fingerprint, &found) {
                    Found::Respond(response) => return Begun::Respond(response),
                    Found::Failed(error) => {
                        return store_failed(idem, &key, &error, seen_in_flight);
                    }
                    Found::InFlight => {}
                }
                seen_in_flight = true;
                if let Some(until) = wait_until
                    && Instant::now() + backoff < until
                {
                    sleep(backoff).await;
                    execution.armed = true;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                    continue;
                }
                tracing::info!(target: "idem", key = key.key().as_str(), "in flight; answering 409");
                return Begun::Respond(
                    Problem::in_flight(config.retry_after_secs()).into_response(),
                );
            }
        }
        // An answer that took half the lease or more may describe a claim that has lapsed
        // since and been taken over: confirm it with a renewal before running anything.
        let mut held_from = sent_at;
        if sent_at.elapsed() >= config.lease / 2 {
            let renewed_at = Instant::now();
            match store_step(
                config,
                config.store.renew(key.as_str(), &claim, config.lease),
            )
            .await
            {
                Ok(true) if renewed_at.elapsed() < config.lease / 2 => held_from = renewed_at,
                Ok(true) => {
                    tracing::warn!(target: "idem", key = key.key().as_str(), "the store answers too slowly to hold a lease; answering 503");
                    release(idem, &key, &claim).await;
                    execution.armed = false;
                    return Begun::Respond(
                        Problem::store_unavailable(config.retry_after_secs()).into_response(),
                    );
                }
                Ok(false) => {
                    tracing::warn!(target: "idem", key = key.key().as_str(), "the claim lapsed before its answer arrived; answering 409");
                    execution.armed = false;
                    return Begun::Respond(
                        Problem::in_flight(config.retry_after_secs()).into_response(),
                    );
                }
                Err(error) => return store_failed(idem, &key, &error, true),
            }
        }
        tracing::debug!(target: "idem", key = key.key().as_str(), "executing");
        execution.keeper = Some(LeaseKeeper::start(idem, &key, &claim, held_from));
        return Begun::Execute(execution);
    }
}

/// What a record found under the key means for this request.
enum Found {
    Respond(Response),
    Failed(StoreError),
    InFlight,
}

fn answer_found(
    idem: &Idempotency,
    key: &ScopedKey,
    fingerprint: &Fingerprint,
    found: &Bytes,
) -> Found {
    let record = match Record::decode(found) {
        Ok(record) => record,
        Err(error) => return Found::Failed(StoreError::backend(error)),
    };
    if *record.fingerprint() != *fingerprint {
        tracing::warn!(target: "idem", key = key.key().as_str(), "key reused with a different request");
        return Found::Respond(Problem::key_reused().into_response());
    }
    match record {
        Record::Completed(stored) => {
            let stored = Arc::new(stored);
            if let Some(local) = &idem.config.local {
                local.insert(key.as_str(), stored.clone());
            }
            Found::Respond(completed(key, &stored, fingerprint))
        }
        Record::Unstorable {
            status, body_len, ..
        } => {
            tracing::info!(target: "idem", key = key.key().as_str(), "already executed; its response was not stored");
            Found::Respond(Problem::response_not_stored(status, body_len).into_response())
        }
        Record::InProgress { .. } => Found::InFlight,
    }
}

/// The answer when the store fails during `begin`. A request that has seen the key in
/// flight answers `409` whatever the mode: running it unprotected could run it beside the
/// request it saw.
fn store_failed(
    idem: &Idempotency,
    key: &ScopedKey,
    error: &StoreError,
    seen_in_flight: bool,
) -> Begun {
    if seen_in_flight {
        tracing::warn!(target: "idem", key = key.key().as_str(), %error, "store failed while waiting for a request in flight; answering 409");
        Begun::Respond(Problem::in_flight(idem.config.retry_after_secs()).into_response())
    } else if matches!(error, StoreError::Full(_)) {
        tracing::warn!(target: "idem", key = key.key().as_str(), %error, "store full; answering 503");
        Begun::Respond(Problem::store_unavailable(idem.config.retry_after_secs()).into_response())
    } else if idem.config.fail_open {
        tracing::warn!(target: "idem", key = key.key().as_str(), %error, "store failed; running unprotected (fail-open)");
        Begun::Unprotected
    } else {
        tracing::error!(target: "idem", key = key.key().as_str(), %error, "store failed; answering 503");
        Begun::Respond(Problem::store_unavailable(idem.config.retry_after_secs()).into_response())
    }
}

/// The answer from this process's local tier, where it holds the key's completed record:
/// no store round trip, and nothing claimed.
fn local_replay(
    idem: &Idempotency,
    key: &ScopedKey,
    fingerprint: &Fingerprint,
) -> Option<Response> {
    let copy = idem.config.local.as_ref()?.get(key.as_str())?;
    Some(completed(key, &copy, fingerprint))
}

/// The answer to a request whose key holds a completed response: the replay, or `422`.
fn completed(key: &ScopedKey, stored: &StoredResponse, fingerprint: &Fingerprint) -> Response {
    if stored.fingerprint != *fingerprint {
        tracing::warn!(target: "idem", key = key.key().as_str(), "key reused with a different request");
        return Problem::key_reused().into_response();
    }
    tracing::info!(target: "idem", key = key.key().as_str(), status = stored.status.as_u16(), "replayed");
    replay(stored)
}

/// A stored response as the client receives it on a replay.
pub(crate) fn replay(stored: &StoredResponse) -> Response {
    let mut response = HttpResponse::new(Body::from(stored.body.clone()));
    *response.status_mut() = stored.status;
    let headers = response.headers_mut();
    headers.reserve(stored.headers.len() + 1);
    for (name, value) in &stored.headers {
        headers.append(name, value.clone());
    }
    headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    response
}

/// One execution holding a key. Dropping it without finishing releases the key (for
/// example when a later extractor rejects the request before the handler runs).
pub(crate) struct Execution {
    idem: Idempotency,
    key: ScopedKey,
    claim: Bytes,
    fingerprint: Fingerprint,
    ttl: Duration,
    armed: bool,
    /// Renews the lease from the moment of the claim until the execution ends.
    keeper: Option<LeaseKeeper>,
}

impl Execution {
    /// Runs `handler` to completion, stores or releases, and answers.
    ///
    /// The work runs inside the request's own task (no hop to another task on the happy
    /// path); if that task drops it before it finishes (the client disconnected), the
    /// rest of the work is moved to a task of its own, so it still completes and its
    /// response is stored.
    pub(crate) async fn run<F, R>(self, handler: F) -> Response
    where
        F: Future<Output = R> + Send + 'static,
        R: IntoResponse + 'static,
    {
        let detached = self.idem.config.detached.clone();
        let mut work = Detaching {
            work: Some(Box::pin(self.drive(handler))),
            detached,
        };
        let response = std::future::poll_fn(|cx| match work.work.as_mut() {
            Some(future) => future.as_mut().poll(cx),
            None => std::task::Poll::Ready(Problem::store_unavailable(1).into_response()),
        })
        .await;
        work.work = None;
        response
    }

    async fn drive<F, R>(mut self, handler: F) -> Response
    where
        F: Future<Output = R> + Send + 'static,
        R: IntoResponse + 'static,
    {
        let handler = AssertUnwindSafe(async move { handler.await.into_response() }).catch_unwind();
        match handler.await {
            Ok(response) => self.finish(response).await,
            Err(panic) => {
                tracing::warn!(target: "idem", key = self.key.key().as_str(), "handler panicked; releasing the key");
                self.release().await;
                resume_unwind(panic)
            }
        }
    }

    async fn finish(mut self, response: Response) -> Response {
        let config = self.idem.config.clone();
        let (parts, body) = response.into_parts();
        if parts.status.is_server_error() && !config.store_server_errors {
            tracing::info!(target: "idem", key = self.key.key().as_str(), status = parts.status.as_u16(), "server error; releasing the key so a retry runs again");
            self.release().await;
            return Response::from_parts(parts, body);
        }
        // Buffering a streamed body is part of the work: the lease stays renewed meanwhile.
        match collect_bounded(body, config.max_response_bytes).await {
            Collected::Complete(bytes) => {
                let kept: Vec<_> = parts
                    .headers
                    .iter()
                    .filter(|(name, _)| config.headers.keeps(name))
                    .collect();
                let expires_at_ms = expiry_ms(self.ttl);
                let record = encode_completed(
                    &self.fingerprint,
                    expires_at_ms,
                    parts.status,
                    &kept,
                    &bytes,
                );
                let stored = self
                    .complete(record, parts.status, bytes.len() as u64)
                    .await;
                if stored == Completion::Stored
                    && let Some(local) = &config.local
                {
                    let copy = StoredResponse {
                        fingerprint: self.fingerprint,
                        status: parts.status,
                        headers: kept
                            .into_iter()
                            .map(|(n, v)| (n.clone(), v.clone()))
                            .collect(),
                        body: bytes.clone(),
                        expires_at_ms,
                    };
                    local.insert(self.key.as_str(), Arc::new(copy));
                }
                tracing::debug!(target: "idem", key = self.key.key().as_str(), status = parts.status.as_u16(), "executed and stored");
                Response::from_parts(parts, Body::from(bytes))
            }
            Collected::TooLarge { read, seen } => {
                tracing::warn!(target: "idem", key = self.key.key().as_str(), limit = config.max_response_bytes, "response too large to store; a retry will be told so and not run again");
                let record = self.unstorable(parts.status, seen);
                self.complete(record, parts.status, seen).await;
                Response::from_parts(parts, read.into_body())
            }
            Collected::Failed(_) => {
                tracing::warn!(target: "idem", key = self.key.key().as_str(), "response body failed; a retry will be told the response was not stored");
                let record = self.unstorable(parts.status, 0);
                self.complete(record, parts.status, 0).await;
                Problem::response_lost(parts.status).into_response()
            }
        }
    }

    fn unstorable(&self, status: http::StatusCode, body_len: u64) -> Bytes {
        Record::Unstorable {
            fingerprint: self.fingerprint,
            status,
            body_len,
        }
        .encode()
    }

    /// Stores `record` if the key still holds this execution's claim. A record the store
    /// cannot keep is replaced by one saying the response was not stored. A store failure
    /// is retried in the background, the lease still renewed, so that a retry replays
    /// rather than runs again.
    async fn complete(
        &mut self,
        record: Bytes,
        status: http::StatusCode,
        body_len: u64,
    ) -> Completion {
        self.armed = false;
        let unstorable = self.unstorable(status, body_len);
        let mut record = record;
        let mut stored_whole = true;
        let mut outcome =
            store_completion(&self.idem, &self.key, &self.claim, self.ttl, record.clone()).await;
        if let Err(error @ StoreError::RecordRefused { .. }) = &outcome {
            tracing::warn!(target: "idem", key = self.key.key().as_str(), %error, "the store cannot keep this response; a retry will be told it was not stored");
            record = unstorable.clone();
            stored_whole = false;
            outcome =
                store_completion(&self.idem, &self.key, &self.claim, self.ttl, record.clone())
                    .await;
        }
        match outcome {
            Ok(true) if stored_whole => Completion::Stored,
            Ok(true) => Completion::NotStored,
            Ok(false) => {
                tracing::warn!(target: "idem", key = self.key.key().as_str(), "lease was lost before completion (fencing); response not stored");
                Completion::Lost
            }
            Err(error) => {
                tracing::warn!(target: "idem", key = self.key.key().as_str(), %error, "storing the response failed; retrying in the background while the lease is held");
                let (idem, key, claim, ttl) = (
                    self.idem.clone(),
                    self.key.clone(),
                    self.claim.clone(),
                    self.ttl,
                );
                let keeper = self.keeper.take();
                tokio::spawn(async move {
                    retry_completion(&idem, &key, &claim, ttl, record, unstorable, keeper).await;
                });
                Completion::Pending
            }
        }
    }

    async fn release(&mut self) {
        self.armed = false;
        self.keeper = None;
        release(&self.idem, &self.key, &self.claim).await;
    }
}

/// How long a completion is retried in the background after the store failed, at most.
/// The lease is renewed meanwhile, so the key stays held; past this the key is let go
/// (its lease runs out) rather than held for ever by a store that refuses every write.
const COMPLETION_RETRY_LIMIT: Duration = Duration::from_secs(30);

/// Retries storing `record` after a store failure, while the lease holds. A store that
/// refuses the record for good gets `unstorable` instead (a retry is told the response was
/// not stored, and never runs the handler again).
async fn retry_completion(
    idem: &Idempotency,
    key: &ScopedKey,
    claim: &Bytes,
    ttl: Duration,
    mut record: Bytes,
    unstorable: Bytes,
    keeper: Option<LeaseKeeper>,
) {
    let give_up = later(Instant::now(), COMPLETION_RETRY_LIMIT);
    let mut delay = Duration::from_millis(100);
    let mut attempts = 1u32;
    loop {
        sleep(delay).await;
        attempts += 1;
        let attempted_at = Instant::now();
        match store_completion(idem, key, claim, ttl, record.clone()).await {
            Ok(true) => {
                tracing::info!(target: "idem", key = key.key().as_str(), attempts, "response stored after retrying");
                break;
            }
            Ok(false) => {
                tracing::error!(target: "idem", key = key.key().as_str(), attempts, "the lease ran out before the response could be stored; a retry may run the handler again");
                break;
            }
            Err(StoreError::RecordRefused { .. }) if record != unstorable => {
                record = unstorable.clone();
                delay = Duration::ZERO;
            }
            Err(error) => {
                let holds = keeper.as_ref().is_some_and(LeaseKeeper::holds);
                // The store renews the lease but refuses this record: it will not take
                // it, so the key records that the request ran, without its response.
                if record != unstorable
                    && keeper
                        .as_ref()
                        .is_some_and(|keeper| keeper.renewed_since(attempted_at))
                {
                    tracing::warn!(target: "idem", key = key.key().as_str(), %error, "the store renews the lease but refuses the response; a retry will be told it was not stored");
                    record = unstorable.clone();
                    delay = Duration::ZERO;
                    continue;
                }
                if !holds || Instant::now() >= give_up {
                    tracing::error!(target: "idem", key = key.key().as_str(), attempts, %error, "the response could not be stored; the key is let go when its lease runs out, and a retry may run the handler again");
                    break;
                }
                delay = (delay * 2).clamp(Duration::from_millis(100), Duration::from_secs(2));
            }
        }
    }
    drop(keeper);
}

/// How a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Completion {
    /// The response is stored for replay.
    Stored,
    /// The key records that the request ran, without its response.
    NotStored,
    /// The claim was gone (fencing): nothing was stored.
    Lost,
    /// The store failed; the completion is retried in the background.
    Pending,
}

/// Renews a claim's lease every third of it, from the claim until it is dropped, in a
/// task of its own: the lease holds however long extractors, the handler, a streamed
/// body or a completion retried after a store failure take.
pub(crate) struct LeaseKeeper {
    _stop: tokio::sync::oneshot::Sender<()>,
    state: Arc<LeaseState>,
}

struct LeaseState {
    /// When the lease surely ends unless renewed: the start of the last renewal that
    /// succeeded, plus the lease.
    held_until: std::sync::Mutex<Instant>,
    /// When the last renewal that succeeded started.
    renewed_at: std::sync::Mutex<Option<Instant>>,
    lost: std::sync::atomic::AtomicBool,
}

impl LeaseKeeper {
    fn start(idem: &Idempotency, key: &ScopedKey, claim: &Bytes, claimed_at: Instant) -> Self {
        let config = &idem.config;
        let state = Arc::new(LeaseState {
            held_until: std::sync::Mutex::new(later(claimed_at, config.lease)),
            renewed_at: std::sync::Mutex::new(None),
            lost: std::sync::atomic::AtomicBool::new(false),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (idem, key, claim, shared) = (idem.clone(), key.clone(), claim.clone(), state.clone());
        tokio::spawn(async move {
            let mut stopped = std::pin::pin!(stopped);
            let config = &idem.config;
            let period = config.lease / 3;
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
                    renewed = timeout(
                        config.store_timeout,
                        config.store.renew(key.as_str(), &claim, config.lease),
                    ) => renewed.unwrap_or(Err(StoreError::Timeout(config.store_timeout))),
                };
                match renewed {
                    Ok(true) => {
                        *shared
                            .held_until
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) =
                            later(started, config.lease);
                        *shared
                            .renewed_at
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(started);
                        next = later(started, period);
                    }
                    Ok(false) => {
                        tracing::warn!(target: "idem", key = key.key().as_str(), "lease lost while the request runs; its response will not be stored");
                        shared
                            .lost
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                        return;
                    }
                    Err(error) => {
                        tracing::warn!(target: "idem", key = key.key().as_str(), %error, "lease renewal failed; retrying");
                        next = later(Instant::now(), retry);
                    }
                }
            }
        });
        Self { _stop: stop, state }
    }

    /// Whether a renewal that started after `at` succeeded: the store answers.
    fn renewed_since(&self, at: Instant) -> bool {
        self.state
            .renewed_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|renewed| renewed > at)
    }

    /// Whether the lease may still be held.
    fn holds(&self) -> bool {
        !self.state.lost.load(std::sync::atomic::Ordering::Relaxed)
            && Instant::now()
                < *self
                    .state
                    .held_until
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// `at + after`, or far in the future where that overflows.
fn later(at: Instant, after: Duration) -> Instant {
    at.checked_add(after)
        .unwrap_or_else(|| at + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// Unfinished work that moves to a task of its own when dropped, counted in `detached`
/// while it runs there.
struct Detaching {
    work: Option<std::pin::Pin<Box<dyn Future<Output = Response> + Send>>>,
    detached: Arc<AtomicUsize>,
}

impl Drop for Detaching {
    fn drop(&mut self) {
        // While unwinding from a handler panic the work has already released its key and
        // must not be polled again.
        if std::thread::panicking() {
            return;
        }
        if let Some(work) = self.work.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            self.detached.fetch_add(1, Ordering::Relaxed);
            let counted = Counted(self.detached.clone());
            runtime.spawn(async move {
                let _counted = counted;
                work.await
            });
        }
    }
}

/// One detached execution, uncounted when it ends (however it ends).
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One store step, failed with [`StoreError::Timeout`] when it does not answer in time.
async fn store_step<T>(
    config: &crate::idempotency::Config,
    step: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    timeout(config.store_timeout, step)
        .await
        .unwrap_or(Err(StoreError::Timeout(config.store_timeout)))
}

async fn store_completion(
    idem: &Idempotency,
    key: &ScopedKey,
    claim: &Bytes,
    ttl: Duration,
    record: Bytes,
) -> Result<bool, StoreError> {
    let config = &idem.config;
    timeout(
        config.store_timeout,
        config.store.complete(key.as_str(), claim, record, ttl),
    )
    .await
    .unwrap_or(Err(StoreError::Timeout(config.store_timeout)))
}

/// Releases the claim. A release the store does not take is retried in the background
/// until it is taken or the lease has run out anyway, so a store that comes back frees the
/// key at once rather than after a whole lease.
async fn release(idem: &Idempotency, key: &ScopedKey, claim: &Bytes) {
    let config = &idem.config;
    let started = Instant::now();
    let Err(error) = store_step(config, config.store.release(key.as_str(), claim)).await else {
        return;
    };
    tracing::warn!(target: "idem", key = key.key().as_str(), %error, "releasing the key failed; retrying until its lease ends");
    let (idem, key, claim) = (idem.clone(), key.clone(), claim.clone());
    tokio::spawn(async move {
        let config = &idem.config;
        let lease_ends = later(started, config.lease);
        let mut delay = Duration::from_millis(100);
        while Instant::now() + delay < lease_ends {
            sleep(delay).await;
            if store_step(config, config.store.release(key.as_str(), &claim))
                .await
                .is_ok()
            {
                tracing::info!(target: "idem", key = key.key().as_str(), "key released after retrying");
                return;
            }
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    });
}

impl Drop for Execution {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let idem = self.idem.clone();
            let key = self.key.clone();
            let claim = self.claim.clone();
            runtime.spawn(async move { release(&idem, &key, &claim).await });
        }
    }
}
