//! Safe retries for callers of `Idempotency-Key` APIs (idem's, Stripe's, any other): a
//! [`reqwest-middleware`](reqwest_middleware) middleware.
//!
//! A network that fails after the server committed loses the response, not the effect:
//! the only safe retry repeats the same key, so that the server answers with the stored
//! response instead of charging twice. [`IdempotentRetry`] does that for every request:
//!
//! - A POST or PATCH without an `Idempotency-Key` gets a fresh UUID v4 key, sent as a
//!   Structured Field string; every retry of that one call carries the same key. A key the
//!   caller set (a composite business key, say) is sent as it is.
//! - Connection and timeout errors, a response lost mid-body, `409` in flight, `429`,
//!   `500`, `502`, `503` and `504` are retried with exponential backoff and full jitter,
//!   never sooner than the server's `Retry-After`, up to a number of attempts and a total
//!   deadline.
//! - `400`, `401`, `403`, `404`, `413` and `422` are a bug in the caller, not a transient
//!   fault: they are never retried and come back as a [`Rejected`] error, with the
//!   problem's type (`urn:idem:problem:key-reused` for a key used with another request).
//! - The response says whether the server replayed a stored one and how many attempts it
//!   took ([`ResponseExt`]); each retry is a `tracing` event.
//!
//! ```no_run
//! use idem_client::{IdempotentRetry, ResponseExt};
//! use reqwest_middleware::ClientBuilder;
//!
//! # async fn pay() -> Result<(), reqwest_middleware::Error> {
//! let client = ClientBuilder::new(reqwest::Client::new())
//!     .with(IdempotentRetry::default())
//!     .build();
//! let response = client
//!     .post("https://api.example.com/payments")
//!     .header("content-type", "application/json")
//!     .body(r#"{"order_id":"ord_1","amount_cents":1200}"#)
//!     .send()
//!     .await?;
//! println!("{} after {} attempts, replayed: {}", response.status(), response.attempts(), response.replayed());
//! # Ok(()) }
//! ```

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Extensions, HeaderValue, Method, StatusCode};
use reqwest::{Request, Response};
use reqwest_middleware::{Middleware, Next};
use retry_policies::policies::ExponentialBackoff;
use retry_policies::{Jitter, RetryDecision, RetryPolicy};

/// The request header that carries the key.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// The response header a server sets on a replayed response.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";
/// The problem type idem answers a key reused with another request with.
pub const KEY_REUSED: &str = "urn:idem:problem:key-reused";
/// The problem type idem answers a request with while the first one with its key runs.
pub const IN_FLIGHT: &str = "urn:idem:problem:in-flight";

/// The middleware: keys every non-idempotent request and retries it safely.
///
/// Defaults: 8 attempts, backoff from 100 ms to 5 s with full jitter, 30 s in all.
#[derive(Debug, Clone)]
pub struct IdempotentRetry {
    attempts: u32,
    min_delay: Duration,
    max_delay: Duration,
    deadline: Duration,
}

impl Default for IdempotentRetry {
    fn default() -> Self {
        Self {
            attempts: 8,
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            deadline: Duration::from_secs(30),
        }
    }
}

impl IdempotentRetry {
    /// Attempts in all, the first included (at least 1).
    #[must_use]
    pub fn attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    /// The backoff bounds: the first retry waits up to `min`, each further one up to twice
    /// as long, never more than `max` (full jitter: a random wait below the bound).
    #[must_use]
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_delay = min;
        self.max_delay = max.max(min);
        self
    }

    /// How long one call may take in all, retries and waits included. A retry that could
    /// not start before it is not made.
    #[must_use]
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    fn policy(&self) -> ExponentialBackoff {
        ExponentialBackoff::builder()
            .retry_bounds(self.min_delay, self.max_delay)
            .jitter(Jitter::Full)
            .build_with_max_retries(self.attempts - 1)
    }
}

/// Why a call was not answered with a response.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server refused the request for good (`400`, `401`, `403`, `404`, `413`,
    /// `422`); it was not retried.
    #[error(transparent)]
    Rejected(#[from] Rejected),
    /// Every attempt failed, or the deadline came first.
    #[error("gave up after {attempts} attempts in {elapsed:?}: {last}")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// How long they took, waits included.
        elapsed: Duration,
        /// The last failure.
        last: String,
    },
}

/// A request the server refused, and that a retry would not change.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status}{}: {detail}", problem_type.as_deref().map(|kind| format!(" ({kind})")).unwrap_or_default())]
pub struct Rejected {
    /// The status.
    pub status: StatusCode,
    /// The problem's `type`, when the body is a problem document.
    pub problem_type: Option<String>,
    /// The problem's `detail`, else the body as text.
    pub detail: String,
    /// Attempts made (the refused one included).
    pub attempts: u32,
}

impl Rejected {
    /// Whether the key was already used with a different request (`422` key reuse).
    pub fn is_key_reused(&self) -> bool {
        self.problem_type.as_deref() == Some(KEY_REUSED)
    }
}

/// The client error behind a middleware error, if idem-client raised it.
pub fn client_error(error: &reqwest_middleware::Error) -> Option<&ClientError> {
    match error {
        reqwest_middleware::Error::Middleware(error) => error.downcast_ref::<ClientError>(),
        reqwest_middleware::Error::Reqwest(_) => None,
    }
}

/// The rejection behind a middleware error, if the server refused the request for good.
pub fn rejection(error: &reqwest_middleware::Error) -> Option<&Rejected> {
    match client_error(error)? {
        ClientError::Rejected(rejected) => Some(rejected),
        ClientError::GaveUp { .. } => None,
    }
}

/// What idem-client adds to a response.
pub trait ResponseExt {
    /// How many attempts the call took (1 when the first one succeeded).
    fn attempts(&self) -> u32;
    /// Whether the server replayed a stored response (`Idempotent-Replayed: true`).
    fn replayed(&self) -> bool;
}

/// The attempts a response took, kept in its extensions.
#[derive(Debug, Clone, Copy)]
struct Attempts(u32);

impl ResponseExt for Response {
    fn attempts(&self) -> u32 {
        self.extensions().get::<Attempts>().map_or(1, |a| a.0)
    }

    fn replayed(&self) -> bool {
        self.headers()
            .get(IDEMPOTENT_REPLAYED)
            .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"true"))
    }
}

/// A fresh key: a UUID v4 as a Structured Field string.
pub fn new_key() -> String {
    format!("\"{}\"", uuid::Uuid::new_v4())
}

/// What one attempt came to.
enum Attempt {
    /// Give this to the caller.
    Done(Response),
    /// Refused for good.
    Rejected(Rejected),
    /// Try again, not before `retry_after`.
    Retry {
        why: String,
        retry_after: Option<Duration>,
    },
}

#[async_trait::async_trait]
impl Middleware for IdempotentRetry {
    async fn handle(
        &self,
        mut request: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        if needs_key(request.method()) && !request.headers().contains_key(IDEMPOTENCY_KEY) {
            let key =
                HeaderValue::from_str(&new_key()).map_err(reqwest_middleware::Error::middleware)?;
            request.headers_mut().insert(IDEMPOTENCY_KEY, key);
        }
        let policy = self.policy();
        let started = SystemTime::now();
        let clock = tokio::time::Instant::now();
        let deadline = clock + self.deadline;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            // A body that cannot be cloned (a stream) can be sent once only.
            let Some(this_try) = request.try_clone() else {
                let mut response = next.run(request, extensions).await?;
                response.extensions_mut().insert(Attempts(attempts));
                return Ok(response);
            };
            let outcome = judge(next.clone().run(this_try, extensions).await, attempts).await;
            let (why, retry_after) = match outcome {
                Attempt::Done(mut response) => {
                    response.extensions_mut().insert(Attempts(attempts));
                    return Ok(response);
                }
                Attempt::Rejected(rejected) => {
                    return Err(reqwest_middleware::Error::middleware(
                        ClientError::Rejected(rejected),
                    ));
                }
                Attempt::Retry { why, retry_after } => (why, retry_after),
            };
            let gave_up = |last: String| {
                reqwest_middleware::Error::middleware(ClientError::GaveUp {
                    attempts,
                    elapsed: clock.elapsed(),
                    last,
                })
            };
            let RetryDecision::Retry { execute_after } = policy.should_retry(started, attempts - 1)
            else {
                return Err(gave_up(why));
            };
            let backoff = execute_after
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            let wait = backoff.max(retry_after.unwrap_or_default());
            if tokio::time::Instant::now() + wait >= deadline {
                return Err(gave_up(format!(
                    "{why}; the next attempt would start after the deadline"
                )));
            }
            tracing::info!(target: "idem_client", attempt = attempts, wait_ms = wait.as_millis() as u64, reason = %why, "retrying with the same idempotency key");
            tokio::time::sleep(wait).await;
        }
    }
}

/// POST and PATCH change state and are not idempotent by themselves.
fn needs_key(method: &Method) -> bool {
    *method == Method::POST || *method == Method::PATCH
}

/// Decides what an attempt's result means. A response to a keyed request is read whole
/// here, so that a body lost half-way is retried like a lost connection.
async fn judge(result: reqwest_middleware::Result<Response>, attempts: u32) -> Attempt {
    let response = match result {
        Ok(response) => response,
        Err(error) => {
            return Attempt::Retry {
                why: error_chain(&error),
                retry_after: None,
            };
        }
    };
    let status = response.status();
    let retry_after = retry_after(&response);
    let (head, body) = match read_whole(response).await {
        Ok(read) => read,
        Err(error) => {
            return Attempt::Retry {
                why: format!("the response body was lost: {}", error_chain(&error)),
                retry_after: None,
            };
        }
    };
    let problem_type = || problem_field(&body, "type");
    match status.as_u16() {
        400 | 401 | 403 | 404 | 413 | 422 => Attempt::Rejected(Rejected {
            status,
            problem_type: problem_type(),
            detail: problem_field(&body, "detail")
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned()),
            attempts,
        }),
        // A 409 other than "in flight" (idem's "response not stored") will not change.
        409 if problem_type().is_some_and(|kind| kind != IN_FLIGHT) => {
            Attempt::Done(rebuild(head, body))
        }
        409 | 429 | 500 | 502 | 503 | 504 => Attempt::Retry {
            why: format!("the server answered {status}"),
            retry_after,
        },
        _ => Attempt::Done(rebuild(head, body)),
    }
}

/// The response split into its head and its whole body.
async fn read_whole(response: Response) -> Result<(http::response::Parts, Bytes), reqwest::Error> {
    let mut head = http::Response::new(());
    *head.status_mut() = response.status();
    *head.version_mut() = response.version();
    *head.headers_mut() = response.headers().clone();
    let (parts, ()) = head.into_parts();
    let body = response.bytes().await?;
    Ok((parts, body))
}

fn rebuild(head: http::response::Parts, body: Bytes) -> Response {
    Response::from(http::Response::from_parts(head, body))
}

/// `Retry-After` in seconds (the HTTP-date form is not used by idem and is ignored).
fn retry_after(response: &Response) -> Option<Duration> {
    let value = response.headers().get(reqwest::header::RETRY_AFTER)?;
    let seconds: u64 = value.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(seconds.min(3600)))
}

/// A string field of a JSON problem document.
fn problem_field(body: &[u8], field: &str) -> Option<String> {
    let document: serde_json::Value = serde_json::from_slice(body).ok()?;
    document.get(field)?.as_str().map(str::to_owned)
}

/// An error with its sources, on one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
