//! Safe retries for callers of `Idempotency-Key` APIs (idem's, Stripe's, any other): a
//! [`reqwest-middleware`](reqwest_middleware) middleware.
//!
//! A network that fails after the server committed loses the response, not the effect:
//! the only safe retry repeats the same key, so that the server answers with the stored
//! response instead of charging twice. [`IdempotentRetry`] does that for every request:
//!
//! - A request whose method is not idempotent (POST, PATCH, and any method RFC 9110 does
//!   not define as idempotent, such as WebDAV's `LOCK`) without an `Idempotency-Key` gets
//!   a fresh UUID v4 key, sent as a Structured Field string; every retry of that one call
//!   carries the same key. A key the caller set (a composite business key, say) is sent
//!   as it is.
//! - Connection and timeout errors, a response lost mid-body, `408` (a server's own
//!   request timeout: idem runs the work on and stores its response for the retry), `409`
//!   in flight, `429`, `500`, `502`, `503` and `504` are retried with exponential backoff and full jitter,
//!   never sooner than the server's `Retry-After`, up to a number of attempts and a total
//!   deadline. A replayed response (`Idempotent-Replayed: true`: the server's stored
//!   answer, which no retry changes) is never retried. A keyed request's response is read
//!   whole (up to [`max_read_bytes`](IdempotentRetry::max_read_bytes), 1 MiB by default)
//!   before it is handed over, so that one lost mid-body is retried; a longer one, and any
//!   other response (a `GET`'s download, say), is handed over as it arrives, and a body
//!   lost there is the caller's error to see.
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

/// The longest backoff bound: a day.
const MAX_BACKOFF: Duration = Duration::from_secs(86_400);

/// The middleware: keys every non-idempotent request and retries it safely.
///
/// Defaults: 8 attempts, backoff from 100 ms to 5 s with full jitter, 30 s in all.
#[derive(Debug, Clone)]
pub struct IdempotentRetry {
    attempts: u32,
    min_delay: Duration,
    max_delay: Duration,
    deadline: Duration,
    full_jitter: bool,
    max_read_bytes: usize,
}

impl Default for IdempotentRetry {
    fn default() -> Self {
        Self {
            attempts: 8,
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            deadline: Duration::from_secs(30),
            full_jitter: true,
            max_read_bytes: Self::DEFAULT_MAX_READ_BYTES,
        }
    }
}

impl IdempotentRetry {
    /// How much of a response body is read before the response is judged or handed over
    /// by default: 1 MiB, the most an idem server stores by default.
    pub const DEFAULT_MAX_READ_BYTES: usize = 1024 * 1024;

    /// How much of a response body the middleware reads into memory: a keyed request's
    /// response (read whole, so that a body lost mid-way is retried), a refusal's or a
    /// `409`'s problem document. A longer body is not buffered past it: the response is
    /// handed over as it streams (a body lost after that is the caller's error to see),
    /// and a `409` that long is not idem's "in flight". At least 1 KiB.
    #[must_use]
    pub fn max_read_bytes(mut self, bytes: usize) -> Self {
        self.max_read_bytes = bytes.max(1024);
        self
    }

    /// Attempts in all, the first included (at least 1).
    #[must_use]
    pub fn attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    /// The backoff bounds: the first retry waits up to `min`, each further one up to twice
    /// as long, never more than `max` (full jitter: a random wait below the bound). Both
    /// are held to at most a day.
    #[must_use]
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_delay = min.min(MAX_BACKOFF);
        self.max_delay = max.clamp(self.min_delay, MAX_BACKOFF);
        self
    }

    /// How long one call may take in all, retries and waits included. A retry that could
    /// not start before it is not made.
    #[must_use]
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Full jitter (on by default): each wait is drawn at random below its bound, so that
    /// clients that failed together do not retry together. Off, each wait is its bound
    /// exactly (`min`, then twice that, and so on up to `max`).
    #[must_use]
    pub fn full_jitter(mut self, on: bool) -> Self {
        self.full_jitter = on;
        self
    }

    fn policy(&self) -> ExponentialBackoff {
        ExponentialBackoff::builder()
            .retry_bounds(self.min_delay, self.max_delay)
            .jitter(if self.full_jitter {
                Jitter::Full
            } else {
                Jitter::None
            })
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
    /// Every attempt failed, or the deadline came first. The effect may or may not have
    /// happened: to find out, call again with the same [`key`](ClientError::GaveUp::key).
    #[error("gave up after {attempts} attempts in {elapsed:?}: {last}")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// How long they took, waits included.
        elapsed: Duration,
        /// The last failure.
        last: String,
        /// The `Idempotency-Key` every attempt carried (`None` for a request without one,
        /// such as a GET). Sending it again continues the same logical call.
        key: Option<String>,
    },
}

impl ClientError {
    /// The `Idempotency-Key` the call's attempts carried, as sent.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Rejected(rejected) => rejected.key.as_deref(),
            Self::GaveUp { key, .. } => key.as_deref(),
        }
    }
}

/// A request the server refused, and that a retry would not change.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status}{}: {detail}", problem_type.as_deref().map(|kind| format!(" ({kind})")).unwrap_or_default())]
#[non_exhaustive]
pub struct Rejected {
    /// The status.
    pub status: StatusCode,
    /// The problem's `type`, when the body is a problem document.
    pub problem_type: Option<String>,
    /// The problem's `detail`, else the body as text.
    pub detail: String,
    /// Attempts made (the refused one included).
    pub attempts: u32,
    /// The `Idempotency-Key` the request carried, as sent.
    pub key: Option<String>,
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
    /// The `Idempotency-Key` the call carried, as sent (generated or the caller's own).
    fn idempotency_key(&self) -> Option<&str>;
}

/// What the middleware knows of a call, kept in its response's extensions.
#[derive(Debug, Clone)]
struct CallInfo {
    attempts: u32,
    key: Option<String>,
}

impl ResponseExt for Response {
    fn attempts(&self) -> u32 {
        self.extensions()
            .get::<CallInfo>()
            .map_or(1, |info| info.attempts)
    }

    fn replayed(&self) -> bool {
        is_replayed(self.headers())
    }

    fn idempotency_key(&self) -> Option<&str> {
        self.extensions().get::<CallInfo>()?.key.as_deref()
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
    /// Not worth another attempt (the request cannot be built or sent as it is).
    Fatal(reqwest_middleware::Error),
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
        let key = request
            .headers()
            .get(IDEMPOTENCY_KEY)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
        // A response to a keyed request is read whole before it is judged, so that a body
        // lost half-way is retried with the same key rather than handed over broken.
        let read_whole = key.is_some();
        let policy = self.policy();
        let started = SystemTime::now();
        let clock = tokio::time::Instant::now();
        let deadline = clock
            .checked_add(self.deadline)
            .unwrap_or_else(|| clock + Duration::from_secs(100 * 365 * 24 * 3600));
        let mut attempts = 0u32;
        let mut original = Some(request);
        loop {
            attempts += 1;
            // A body that cannot be cloned (a stream) can be sent once only.
            let (this_try, resendable) = match original.as_ref().and_then(Request::try_clone) {
                Some(copy) => (copy, true),
                None => match original.take() {
                    Some(request) => (request, false),
                    // Not reached: a request that cannot be cloned is tried once.
                    None => {
                        return Err(reqwest_middleware::Error::middleware(ClientError::GaveUp {
                            attempts: attempts - 1,
                            elapsed: clock.elapsed(),
                            last: "the request body is a stream and cannot be sent again".into(),
                            key,
                        }));
                    }
                },
            };
            // The deadline covers the whole attempt: sending, the head and the body.
            let attempt = async {
                let result = next.clone().run(this_try, extensions).await;
                judge(
                    result,
                    attempts,
                    key.as_deref(),
                    read_whole,
                    self.max_read_bytes,
                )
                .await
            };
            let outcome = match tokio::time::timeout_at(deadline, attempt).await {
                Ok(outcome) => outcome,
                Err(_) => Attempt::Retry {
                    why: format!("no answer within the deadline of {:?}", self.deadline),
                    retry_after: None,
                },
            };
            let gave_up = |last: String| {
                reqwest_middleware::Error::middleware(ClientError::GaveUp {
                    attempts,
                    elapsed: clock.elapsed(),
                    last,
                    key: key.clone(),
                })
            };
            let (why, retry_after) = match outcome {
                Attempt::Done(mut response) => {
                    response.extensions_mut().insert(CallInfo {
                        attempts,
                        key: key.clone(),
                    });
                    return Ok(response);
                }
                Attempt::Rejected(rejected) => {
                    return Err(reqwest_middleware::Error::middleware(
                        ClientError::Rejected(rejected),
                    ));
                }
                Attempt::Fatal(error) => return Err(error),
                Attempt::Retry { why, .. } if !resendable => {
                    return Err(gave_up(format!(
                        "{why}; the request body is a stream and cannot be sent again"
                    )));
                }
                Attempt::Retry { why, retry_after } => (why, retry_after),
            };
            let RetryDecision::Retry { execute_after } = policy.should_retry(started, attempts - 1)
            else {
                return Err(gave_up(why));
            };
            let backoff = execute_after
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            let wait = backoff.max(retry_after.unwrap_or_default());
            if tokio::time::Instant::now()
                .checked_add(wait)
                .is_none_or(|at| at >= deadline)
            {
                return Err(gave_up(format!(
                    "{why}; the next attempt would start after the deadline"
                )));
            }
            tracing::info!(target: "idem_client", attempt = attempts, wait_ms = wait.as_millis() as u64, reason = %why, "retrying with the same idempotency key");
            tokio::time::sleep(wait).await;
        }
    }
}

/// Whether a request with `method` may change state again when it is sent again: every
/// method but those RFC 9110 (§9.2.2) defines as idempotent. POST and PATCH, and any
/// extension method (`LOCK`, an API's own `CHARGE`), of which nothing is known.
fn needs_key(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Whether a failed send may go through on another attempt: the connection, a timeout,
/// the request or response in transit. A request that cannot be built, a redirect loop or
/// another middleware's error will fail the same way again.
fn transient(error: &reqwest_middleware::Error) -> bool {
    match error {
        reqwest_middleware::Error::Reqwest(error) => {
            !(error.is_builder() || error.is_redirect() || error.is_status())
                && (error.is_connect()
                    || error.is_timeout()
                    || error.is_request()
                    || error.is_body()
                    || error.is_decode())
        }
        reqwest_middleware::Error::Middleware(_) => false,
    }
}

/// Decides what an attempt's result means. The body is read (up to `limit` bytes) only
/// where it decides (a refusal's problem type, a 409) or where `read_whole` asks for it.
async fn judge(
    result: reqwest_middleware::Result<Response>,
    attempts: u32,
    key: Option<&str>,
    read_whole: bool,
    limit: usize,
) -> Attempt {
    let response = match result {
        Ok(response) => response,
        Err(error) if transient(&error) => {
            return Attempt::Retry {
                why: error_chain(&error),
                retry_after: None,
            };
        }
        Err(error) => return Attempt::Fatal(error),
    };
    let status = response.status();
    let retry_after = retry_after(&response);
    let decides = matches!(status.as_u16(), 400 | 401 | 403 | 404 | 409 | 413 | 422);
    // A replayed response is the server's stored answer: another attempt gets it again.
    let retryable = matches!(status.as_u16(), 408 | 429 | 500 | 502 | 503 | 504)
        && !is_replayed(response.headers());
    if retryable {
        return Attempt::Retry {
            why: format!("the server answered {status}"),
            retry_after,
        };
    }
    if !decides && !read_whole {
        return Attempt::Done(response);
    }
    let refused = matches!(status.as_u16(), 400 | 401 | 403 | 404 | 413 | 422);
    let (head, body) = match read_up_to(response, limit).await {
        Ok((head, body)) if body.rest.is_none() => (head, body),
        // Longer than anything judged here: a refusal with the start of its explanation,
        // anything else (a `409` that long is no "in flight" of idem's) as it streams.
        Ok((head, body)) => {
            return if refused {
                let start = &body.start[..body.start.len().min(DETAIL_BYTES)];
                Attempt::Rejected(Rejected {
                    status,
                    problem_type: None,
                    detail: format!(
                        "{} (the rest of a body over {limit} bytes was not read)",
                        String::from_utf8_lossy(start)
                    ),
                    attempts,
                    key: key.map(str::to_owned),
                })
            } else {
                Attempt::Done(head.with_body(body))
            };
        }
        // A refusal stays a refusal whether or not its explanation arrived whole.
        Err(error) if refused => {
            return Attempt::Rejected(Rejected {
                status,
                problem_type: None,
                detail: format!("(the response body was lost: {})", error_chain(&error)),
                attempts,
                key: key.map(str::to_owned),
            });
        }
        Err(error) => {
            return Attempt::Retry {
                why: format!("the response body was lost: {}", error_chain(&error)),
                retry_after: None,
            };
        }
    };
    let problem_type = || problem_field(&body.start, "type");
    match status.as_u16() {
        400 | 401 | 403 | 404 | 413 | 422 => Attempt::Rejected(Rejected {
            status,
            problem_type: problem_type(),
            detail: problem_field(&body.start, "detail")
                .unwrap_or_else(|| String::from_utf8_lossy(&body.start).into_owned()),
            attempts,
            key: key.map(str::to_owned),
        }),
        // A 409 other than "in flight" (idem's "response not stored", a stored business
        // conflict replayed, an edit conflict to a request without a key) is the server's
        // answer, and will not change.
        409 if !in_flight(key.is_some(), &head.headers, problem_type()) => {
            Attempt::Done(head.with_body(body))
        }
        409 => Attempt::Retry {
            why: format!("the server answered {status}"),
            retry_after,
        },
        _ => Attempt::Done(head.with_body(body)),
    }
}

/// A response's head, kept while its body is read.
struct Head {
    status: StatusCode,
    version: http::Version,
    headers: http::HeaderMap,
    extensions: Extensions,
    url: reqwest::Url,
}

impl Head {
    /// The response again, with `body`: status, headers, URL and extensions as they were.
    fn with_body(self, body: Read) -> Response {
        use reqwest::ResponseBuilderExt;
        let mut response = http::Response::builder()
            .status(self.status)
            .version(self.version)
            .url(self.url)
            .body(reqwest::Body::wrap(body))
            .unwrap_or_default();
        *response.headers_mut() = self.headers;
        response.extensions_mut().extend(self.extensions);
        Response::from(response)
    }
}

/// How much of a refusal's body over the read limit its `detail` keeps.
const DETAIL_BYTES: usize = 8 * 1024;

/// A response body read up to a limit, to be handed over again as it came: its bytes read
/// so far, then what follows (the rest unread, or the trailers of a body read whole).
struct Read {
    /// The body read so far: all of it, or its first bytes past the limit.
    start: Bytes,
    /// What follows, unread: `None` where the body was read whole.
    rest: Option<reqwest::Body>,
    /// The trailers of a body read whole, if it ended with some.
    trailers: Option<http::HeaderMap>,
    /// Whether the server's framing gave the body's length (`Content-Length`), so that the
    /// body handed over tells its length as the original did, and no other.
    sized: bool,
}

/// The response split into its head and its body, read whole where it is no longer than
/// `limit` bytes.
async fn read_up_to(mut response: Response, limit: usize) -> Result<(Head, Read), reqwest::Error> {
    use http_body::Body as _;
    use http_body_util::BodyExt as _;
    let head = Head {
        status: response.status(),
        version: response.version(),
        headers: std::mem::take(response.headers_mut()),
        extensions: std::mem::take(response.extensions_mut()),
        url: response.url().clone(),
    };
    let mut body = http::Response::<reqwest::Body>::from(response).into_body();
    let sized = body.size_hint().exact().is_some();
    let mut start = bytes::BytesMut::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = match frame?.into_data() {
            Ok(data) => {
                start.extend_from_slice(&data);
                if start.len() > limit {
                    let read = Read {
                        start: start.freeze(),
                        rest: Some(body),
                        trailers: None,
                        sized,
                    };
                    return Ok((head, read));
                }
                continue;
            }
            Err(frame) => frame,
        };
        if let Ok(more) = frame.into_trailers() {
            trailers
                .get_or_insert_with(http::HeaderMap::new)
                .extend(more);
        }
    }
    let read = Read {
        start: start.freeze(),
        rest: None,
        trailers,
        sized,
    };
    Ok((head, read))
}

impl http_body::Body for Read {
    type Data = Bytes;
    type Error = reqwest::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, reqwest::Error>>> {
        use std::task::Poll;
        if !self.start.is_empty() {
            let start = std::mem::take(&mut self.start);
            return Poll::Ready(Some(Ok(http_body::Frame::data(start))));
        }
        if let Some(rest) = self.rest.as_mut() {
            return std::pin::Pin::new(rest).poll_frame(cx);
        }
        Poll::Ready(
            self.trailers
                .take()
                .map(|trailers| Ok(http_body::Frame::trailers(trailers))),
        )
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let start = self.start.len() as u64;
        let Some(rest) = &self.rest else {
            if self.sized {
                return http_body::SizeHint::with_exact(start);
            }
            let mut hint = http_body::SizeHint::new();
            hint.set_lower(start);
            return hint;
        };
        let mut hint = rest.size_hint();
        // The upper bound first: a lower bound above the upper one is refused.
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper.saturating_add(start));
        }
        hint.set_lower(hint.lower().saturating_add(start));
        hint
    }
}

/// `Retry-After`, in seconds or as an HTTP date (RFC 9110), as the wait from now.
fn retry_after(response: &Response) -> Option<Duration> {
    let value = response.headers().get(reqwest::header::RETRY_AFTER)?;
    let value = value.to_str().ok()?.trim();
    // delay-seconds is any run of digits: one too large for a `u64` is a wait past every
    // deadline, not a value to ignore.
    if !value.is_empty() && value.bytes().all(|byte| byte.is_ascii_digit()) {
        return Some(value.parse().map_or(Duration::MAX, Duration::from_secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or_default())
}

/// Whether the server replayed a stored response (`Idempotent-Replayed: true`).
fn is_replayed(headers: &http::HeaderMap) -> bool {
    headers
        .get(IDEMPOTENT_REPLAYED)
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"true"))
}

/// Whether a `409` says that the same key's first request still runs: never to a request
/// without a key, nor in a replayed response; in a problem document
/// (`application/problem+json`), only under idem's type (one without a type is
/// `about:blank`, RFC 9457); in any other body (another API's own, Stripe's, whatever
/// fields it has) it may be.
fn in_flight(keyed: bool, headers: &http::HeaderMap, problem_type: Option<String>) -> bool {
    if !keyed || is_replayed(headers) {
        return false;
    }
    let problem = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|kind| {
            kind.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/problem+json")
        });
    !problem || problem_type.as_deref() == Some(IN_FLIGHT)
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
