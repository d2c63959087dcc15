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
    if let Some(copy) = config
        .local
        .as_ref()
        .and_then(|local| local.get(key.as_str()))
    {
        return Begun::Respond(completed(&key, &copy, &fingerprint));
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
        tracing::debug!(target: "idem", key = key.key().as_str(), "executing");
        execution.keeper = Some(LeaseKeeper::start(idem, &key, &claim));
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
    } else if idem.config.fail_open {
        tracing::warn!(target: "idem", key = key.key().as_str(), %error, "store failed; running unprotected (fail-open)");
        Begun::Unprotected
    } else {
        tracing::error!(target: "idem", key = key.key().as_str(), %error, "store failed; answering 503");
        Begun::Respond(Problem::store_unavailable(idem.config.retry_after_secs()).into_response())
    }
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
        let mut record = record;
        let mut outcome =
            store_completion(&self.idem, &self.key, &self.claim, self.ttl, record.clone()).await;
        if let Err(StoreError::RecordTooLarge { size, limit }) = outcome {
            tracing::warn!(target: "idem", key = self.key.key().as_str(), size, limit, "the store cannot keep this response; a retry will be told it was not stored");
            record = self.unstorable(status, body_len);
            outcome =
                store_completion(&self.idem, &self.key, &self.claim, self.ttl, record.clone())
                    .await;
            if outcome.is_ok() {
                return match outcome {
                    Ok(true) => Completion::NotStored,
                    _ => Completion::Lost,
                };
            }
        }
        match outcome {
            Ok(true) => Completion::Stored,
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
                    let mut delay = Duration::from_millis(100);
                    let mut attempts = 1u32;
                    loop {
                        sleep(delay).await;
                        attempts += 1;
                        match store_completion(&idem, &key, &claim, ttl, record.clone()).await {
                            Ok(true) => {
                                tracing::info!(target: "idem", key = key.key().as_str(), attempts, "response stored after retrying");
                                break;
                            }
                            Ok(false) => {
                                tracing::error!(target: "idem", key = key.key().as_str(), attempts, "the lease ran out before the response could be stored; a retry may run the handler again");
                                break;
                            }
                            Err(error) => {
                                if keeper.as_ref().is_none_or(|keeper| !keeper.holds()) {
                                    tracing::error!(target: "idem", key = key.key().as_str(), attempts, %error, "the response could not be stored before the lease ran out; a retry may run the handler again");
                                    break;
                                }
                                delay = (delay * 2).min(Duration::from_secs(2));
                            }
                        }
                    }
                    drop(keeper);
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
    lost: std::sync::atomic::AtomicBool,
}

impl LeaseKeeper {
    fn start(idem: &Idempotency, key: &ScopedKey, claim: &Bytes) -> Self {
        let config = &idem.config;
        let claimed_at = Instant::now();
        let state = Arc::new(LeaseState {
            held_until: std::sync::Mutex::new(later(claimed_at, config.lease)),
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

async fn release(idem: &Idempotency, key: &ScopedKey, claim: &Bytes) {
    let config = &idem.config;
    match timeout(
        config.store_timeout,
        config.store.release(key.as_str(), claim),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => {
            tracing::warn!(target: "idem", key = key.key().as_str(), %error, "releasing the key failed; it frees itself when the lease ends");
        }
        Err(_) => {
            tracing::warn!(target: "idem", key = key.key().as_str(), "releasing the key timed out; it frees itself when the lease ends");
        }
    }
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
