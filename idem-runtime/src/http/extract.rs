//! The extractors handlers use: [`Idempotent`] (what `#[idempotent]` generates) and
//! [`ScopedKey`].

use std::fmt;
use std::time::Duration;

use axum::extract::{FromRequestParts, OptionalFromRequestParts};
use axum::response::{IntoResponse, Response};
use http::request::Parts;

use futures_util::FutureExt;
use futures_util::future::{Either, lazy};
use tracing::Instrument;

use super::execute::first_execution;
use super::problem::Problem;
use super::replay;
use super::state::{BufferedBody, Found, RequestState};
use crate::config::{Idempotency, defaults};
use crate::fingerprint::Fingerprint;
use crate::key::{IDEMPOTENCY_KEY, ScopedKey};
use crate::metrics::Outcome;
use crate::protocol::{self, Begun, Guarding, Running, TransactionSlot, Turn};
use crate::store::BoxFuture;

/// [`defaults::TTL`] in seconds, the default of [`Idempotent`]'s `TTL_SECS`.
const DEFAULT_TTL_SECS: u64 = defaults::TTL.as_secs();

/// Makes one handler idempotent; this is what `#[idempotent]` writes for you.
///
/// Take it as an argument of the handler, after the extractors that authenticate the
/// request (it reads the key, the scope and the fingerprint, and claims nothing), and pass
/// the handler's work to [`run`](Self::run): that is where the key is claimed, a replay or
/// a refusal answered, or the work run. A request that an extractor rejects (a missing
/// token, malformed JSON) is rejected exactly as without idem and leaves its key unused.
/// `TTL_SECS` is how long the response is kept, in seconds (default
/// [`defaults::TTL`](crate::defaults::TTL), 24 h); with `REQUIRED`, a request
/// without a key gets `400` instead of running unprotected.
///
/// An extractor that authenticates may put a [`Principal`](crate::Principal) in the
/// request's extensions; taken after it, this guard scopes the key by that principal. A
/// keyed request without an identity is refused (`400` `scope-missing`) by `run`, once the
/// handler's other extractors have accepted it, so that one that authenticates refuses it
/// first; a malformed key, or a missing one with `REQUIRED`, is refused as this guard is
/// extracted, before the body is read.
///
/// The router must carry [`Idempotency::layer`]; without it this extractor answers `500`
/// with a problem naming the fix.
///
/// One guard protects a request. A second one (taken by hand inside `#[idempotent]`, say)
/// passes its work through when its `run` is awaited inside the first one's work; run
/// beside that work instead (`join!`, a `select!` that gives the first up, a task the
/// work spawns), it is refused with `500`
/// ([`Problem::GUARD_CONFLICT`](crate::Problem::GUARD_CONFLICT)) and its work does not
/// run; run after the first one's work ended, it claims the key and is answered as a
/// retry would be.
///
/// ```
/// use axum::{Json, Router, http::StatusCode, response::Response, routing::post};
/// use idem_runtime::{Idempotency, Idempotent};
///
/// // Keeps responses for one hour; a request without a key is refused with 400.
/// async fn create_order(idem: Idempotent<3600, true>, Json(order): Json<serde_json::Value>) -> Response {
///     idem.run(async move { (StatusCode::CREATED, Json(order)) }).await
/// }
///
/// let idem = Idempotency::builder().shared_scope(true).build();
/// let app: Router = Router::new().route("/orders", post(create_order)).layer(idem.layer());
/// ```
pub struct Idempotent<const TTL_SECS: u64 = DEFAULT_TTL_SECS, const REQUIRED: bool = false> {
    prepared: Option<Prepared>,
    key: Option<ScopedKey>,
    /// The database transaction the handler writes in, if it takes one from idem.
    transaction: TransactionSlot,
    /// A keyed request without an identity to scope it by, refused by `run`: after every
    /// other extractor of the handler accepted the request, so that the one that
    /// authenticates (last included, reading the body) refuses it first, as it would
    /// without idem.
    refusal: Option<Box<Unscoped>>,
}

/// A keyed request without an identity: what [`Idempotent::run`] answers instead of
/// running the work.
struct Unscoped {
    idem: Idempotency,
    path: Box<str>,
}

impl Unscoped {
    /// The refusal, counted and logged only now that it is the answer: an extractor after
    /// the guard (the app's authentication) refuses the request first.
    fn answer(self) -> Response {
        let Self { idem, path } = self;
        tracing::warn!(target: "idem", path = &*path, "keyed request without an identity to scope it by; answering 400 (see IdempotencyBuilder::scope, Principal, IdempotencyBuilder::shared_scope)");
        Uncounted::refusal(idem, Outcome::NoScope, Problem::scope_missing())
    }
}

/// A refusal counted only if it is what the client gets. An extractor's refusal may not
/// be: a handler that takes `Result<ScopedKey, _>` goes on without it, and one refused by
/// a guard's `run` may be refused first by an extractor after the guard. So the refusal
/// carries this in its extensions, and [`IdempotencyLayer`](super::IdempotencyLayer)
/// counts it when the response leaves the route ([`count_refusal`]).
#[derive(Clone)]
struct Uncounted {
    idem: Idempotency,
    outcome: Outcome,
}

impl Uncounted {
    /// `problem`'s response, to be counted under `outcome` if it is the answer.
    fn refusal(idem: Idempotency, outcome: Outcome, problem: Problem) -> Response {
        let mut response = problem.into_response();
        response.extensions_mut().insert(Self { idem, outcome });
        response
    }
}

/// Counts the refusal `response` carries, if any, now that it is the route's answer, and
/// takes the mark off.
pub(super) fn count_refusal(response: &mut Response) {
    if let Some(Uncounted { idem, outcome }) = response.extensions_mut().remove() {
        idem.shared.metrics.request(outcome);
    }
}

/// A keyed request ready to be claimed.
struct Prepared {
    idem: Idempotency,
    key: ScopedKey,
    fingerprint: Fingerprint,
}

impl<const TTL_SECS: u64, const REQUIRED: bool> Idempotent<TTL_SECS, REQUIRED> {
    const TTL: Duration = {
        assert!(
            TTL_SECS > 0,
            "Idempotent<TTL_SECS>: the ttl must be at least one second"
        );
        Duration::from_secs(TTL_SECS)
    };

    /// Claims the key and runs the handler's work, or answers without running it: the
    /// stored response on a retry ([`IDEMPOTENT_REPLAYED`](crate::http::IDEMPOTENT_REPLAYED)),
    /// `422` for the key reused with another request, `409` while the first request still
    /// runs.
    ///
    /// The work runs to the end even if the client disconnects (it then continues in a
    /// task of its own), and its response is stored, so the retry gets the replay. The
    /// lease is renewed from the claim on. A `5xx` response or a panic releases the key
    /// (the panic is then resumed), so a retry runs again.
    pub fn run<F, R>(self, work: F) -> impl Future<Output = Response>
    where
        F: Future<Output = R> + Send + 'static,
        R: IntoResponse + 'static,
    {
        // Nothing happens until the future is first polled: one dropped before leaves the
        // request's guards and transaction as they were. `lazy` and `flatten`, not an
        // `async fn`, which would hold the guard and the work beside the future that runs
        // them, in the box axum makes of every request's handler.
        // Fused: polled again after it answered, it waits rather than panics.
        lazy(move |_| self.start(work)).flatten().fuse()
    }

    /// [`run`](Self::run), from its first poll: the future that answers the request.
    fn start<F, R>(self, work: F) -> impl Future<Output = Response>
    where
        F: Future<Output = R> + Send + 'static,
        R: IntoResponse + 'static,
    {
        let request = self.transaction;
        // From here idem finishes the transaction, whatever the answer: a transaction
        // beside a guard whose `run` is never called refuses to be used.
        request.finished_by_idem();
        if let Some(refusal) = self.refusal {
            // Boxed, as the wait below: on a refusal's path only. The request's
            // transaction is finished as after any answer given without the work: one the
            // handler opens afterwards would be committed by nothing.
            let refused: BoxFuture<'static, Response> = Box::pin(async move {
                let within = refusal.idem.settings().store_timeout;
                request.roll_back(within).await;
                refusal.answer()
            });
            return Either::Left(Either::Right(refused));
        }
        let Some(prepared) = self.prepared else {
            return Either::Left(Either::Left(unkeyed(work, request)));
        };
        // Every guard of the request shares its slot, which says what this one does: claim
        // the key (the first whose work runs finishes the request's transaction), pass its
        // work through under another guard's key (inside that one's work), be refused
        // (beside another's running work), or wait while another's claim is under way.
        match request.guarding() {
            Guarding::Wait => {
                // Boxed: two guards of one request claiming at once is rare. Bounded: a
                // guard whose future is kept without being polled never settles its claim.
                let settings = prepared.idem.settings();
                let within = settings.store_timeout.saturating_mul(2);
                let retry_after = settings.retry_after_secs();
                let waiting: BoxFuture<'static, Response> = Box::pin(async move {
                    match tokio::time::timeout(within, request.settled()).await {
                        Ok(guarding) => Self::guarded(prepared, request, guarding, work).await,
                        Err(_) => {
                            tracing::error!(target: "idem", "another guard of this request holds its claim unanswered (is its `run` future kept without being polled?); answering 503");
                            Problem::store_unavailable(retry_after).into_response()
                        }
                    }
                });
                Either::Left(Either::Right(waiting))
            }
            guarding => Either::Right(Self::guarded(prepared, request, guarding, work)),
        }
    }

    /// A keyed request's guard, as [`TransactionSlot::guarding`] decided.
    fn guarded<F, R>(
        prepared: Prepared,
        request: TransactionSlot,
        guarding: Guarding,
        work: F,
    ) -> impl Future<Output = Response> + Send + 'static
    where
        F: Future<Output = R> + Send + 'static,
        R: IntoResponse + 'static,
    {
        let turn = match guarding {
            Guarding::PassThrough => {
                return Either::Left(Either::Left(work.map(IntoResponse::into_response)));
            }
            Guarding::Refuse { given_up } => {
                if given_up {
                    tracing::error!(target: "idem", "a second guard of this request ran after the first one's work was given up before it ended (its future dropped, or a panic caught); answering 500 without running its work");
                } else {
                    tracing::error!(target: "idem", "a second guard of this request ran while the first one's work runs, outside that work (beside it, or in a task it spawned); answering 500 without running its work");
                }
                let refused = Problem::guard_conflict().into_response();
                return Either::Left(Either::Right(std::future::ready(refused)));
            }
            Guarding::Turn(turn) => Some(turn),
            // `Wait` is settled by the caller; were it not, claiming is the safe answer.
            Guarding::Claim | Guarding::Wait => None,
        };
        Either::Right(Self::keyed(prepared, request, turn, work))
    }

    /// A keyed request's guard, from its claim on. With the `turn`, it finishes the
    /// request's transaction (the execution holds the turn until the work runs); without
    /// it, another guard's work ran under the turn, and this one finishes none.
    fn keyed<F, R>(
        prepared: Prepared,
        request: TransactionSlot,
        turn: Option<Turn>,
        work: F,
    ) -> impl Future<Output = Response> + Send + 'static
    where
        F: Future<Output = R> + Send + 'static,
        R: IntoResponse + 'static,
    {
        let Prepared {
            idem,
            key,
            fingerprint,
        } = prepared;
        let transaction = match &turn {
            Some(_) => request.clone(),
            None => TransactionSlot::default(),
        };
        let span =
            tracing::info_span!(target: "idem", "idem", key = %idem.logged_key(key.key(), &key));
        // `begin` answers from the local tier, or refuses, when called: in the span too.
        let begin = span.in_scope(|| {
            protocol::begin(
                &idem,
                key.clone(),
                fingerprint,
                Self::TTL,
                idem.settings().wait_for_in_flight,
                transaction.clone(),
                turn,
            )
        });
        // `then`, not an `async` block, which would hold the claim's future twice.
        let guard = Guard {
            idem,
            key,
            transaction,
            request,
        };
        let keyed = begin.then(move |begun| after_begin(begun, guard, work));
        keyed.instrument(span)
    }

    /// The key this request runs under, if it carried one.
    pub fn key(&self) -> Option<&ScopedKey> {
        self.key.as_ref()
    }

    /// Whether the request carried a valid key, so that [`run`](Self::run) claims it
    /// (unless the store fails in fail-open mode).
    pub fn is_protected(&self) -> bool {
        self.prepared.is_some()
    }

    fn unprotected(key: Option<ScopedKey>, transaction: TransactionSlot) -> Self {
        Self {
            prepared: None,
            key,
            transaction,
            refusal: None,
        }
    }

    /// A guard whose `run` refuses a keyed request without an identity, without running
    /// the work. Counted when that refusal is the answer: a `ScopedKey` argument after
    /// the guard, or the app's authentication, may refuse the request first.
    fn unscoped(idem: Idempotency, path: &str, transaction: TransactionSlot) -> Self {
        Self {
            refusal: Some(Box::new(Unscoped {
                idem,
                path: path.into(),
            })),
            ..Self::unprotected(None, transaction)
        }
    }
}

/// A keyed request's guard while its claim is under way.
struct Guard {
    idem: Idempotency,
    key: ScopedKey,
    /// The transaction this guard finishes: the request's with the `turn`, else none.
    transaction: TransactionSlot,
    /// The request's slot, shared by all its guards.
    request: TransactionSlot,
}

/// What a keyed request does once [`protocol::begin`] has decided: runs the work holding
/// the key, answers without running it, or runs it unprotected (fail-open).
fn after_begin<F, R>(begun: Begun, guard: Guard, work: F) -> impl Future<Output = Response>
where
    F: Future<Output = R> + Send + 'static,
    R: IntoResponse + 'static,
{
    let Guard {
        idem,
        key,
        transaction,
        request,
    } = guard;
    let metrics = &idem.shared.metrics;
    let answer = match begun {
        Begun::Execute(mut execution) => {
            metrics.request(Outcome::Executed);
            // The request's other guards are refused while this one's work runs outside
            // them; the work itself moves on without its caller, if it must.
            // With the turn or without (another guard's claim was under way, or its work
            // ended): either way a guard started beside this work must be refused.
            let running = match execution.take_turn() {
                Some(turn) => turn.run(),
                None => request.work_runs(),
            };
            // The request's span, entered around every poll of the caller's future.
            let work = request.around_work(work);
            let execution = first_execution(execution, work, tracing::Span::current());
            return Either::Left(Either::Left(while_running(execution, running)));
        }
        Begun::Answer(answer) => {
            metrics.request(Outcome::of(&answer));
            answer
        }
        Begun::Local(answer) => {
            metrics.request(Outcome::of_local(&answer));
            answer
        }
        Begun::Unprotected(turn) => {
            metrics.request(Outcome::FailOpen);
            let running = turn.map_or_else(|| request.work_runs(), Turn::run);
            let work = unkeyed(request.around_work(work), transaction);
            return Either::Right(while_running(work, running));
        }
    };
    Either::Left(Either::Right(async move {
        transaction.roll_back(idem.settings().store_timeout).await;
        replay::answer(&idem, &key, answer)
    }))
}

/// `work`, holding `running` until it ends (or is dropped: its caller gave it up).
fn while_running<O>(work: impl Future<Output = O>, running: Running) -> impl Future<Output = O> {
    work.map(move |output| {
        running.end();
        output
    })
}

/// Runs work that holds no key; a transaction it took commits after it, unless it
/// answered a server error.
fn unkeyed<F, R>(work: F, transaction: TransactionSlot) -> impl Future<Output = Response>
where
    F: Future<Output = R>,
    R: IntoResponse,
{
    // `map` and `then`, not an `async fn`, which would hold the work twice.
    let finish = move |response: Response| async move {
        let keep = !response.status().is_server_error();
        match transaction
            .finish_unkeyed(keep, defaults::STORE_TIMEOUT)
            .await
        {
            Ok(()) => response,
            Err(error) => {
                tracing::error!(target: "idem", %error, "committing the handler's transaction failed; answering 503");
                Problem::unkeyed_commit_failed().into_response()
            }
        }
    };
    work.map(IntoResponse::into_response).then(finish)
}

impl<const TTL_SECS: u64, const REQUIRED: bool> fmt::Debug for Idempotent<TTL_SECS, REQUIRED> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotent")
            .field("ttl_secs", &TTL_SECS)
            .field("required", &REQUIRED)
            .field("key", &self.key)
            .field("protected", &self.prepared.is_some())
            .finish()
    }
}

impl<S, const TTL_SECS: u64, const REQUIRED: bool> FromRequestParts<S>
    for Idempotent<TTL_SECS, REQUIRED>
where
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Response> {
        let Some(idem) = parts.extensions.get::<Idempotency>().cloned() else {
            return Err(layer_missing(parts));
        };
        let settings = idem.settings();
        let state = RequestState::of(&mut parts.extensions);
        let transaction = state.transaction_slot();
        let body = match state.found() {
            Found::Keyed(body) => body,
            // Refused at once, before the handler's body extractor reads a byte: a request
            // idem cannot take is not worth reading.
            Found::Invalid(error) => {
                let problem = Problem::key_invalid(&error);
                return Err(Uncounted::refusal(idem, Outcome::BadKey, problem));
            }
            // The layer marks every request that carries the header: without the mark,
            // the handle came another way (an `Extension`) and the key would go unread.
            Found::None if parts.headers.contains_key(&IDEMPOTENCY_KEY) => {
                return Err(layer_missing(parts));
            }
            Found::None if REQUIRED => {
                return Err(Uncounted::refusal(
                    idem,
                    Outcome::BadKey,
                    Problem::key_missing(),
                ));
            }
            Found::None => return Ok(Self::unprotected(None, transaction)),
        };
        let fingerprint = match body {
            BufferedBody::Complete(body) => {
                // Behind `Router::nest` the URI is shortened; the original one tells two
                // nested copies of a route apart.
                let uri = parts
                    .extensions
                    .get::<axum::extract::OriginalUri>()
                    .map_or(&parts.uri, |original| &original.0);
                let path = uri
                    .path_and_query()
                    .map_or_else(|| uri.path(), |pq| pq.as_str());
                let content_type = parts
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .map(http::HeaderValue::as_bytes);
                Fingerprint::of_request(
                    &settings.fingerprint,
                    &parts.method,
                    path,
                    content_type,
                    &body,
                )
            }
            BufferedBody::TooLarge => {
                let problem = Problem::body_too_large(settings.max_request_bytes);
                return Err(Uncounted::refusal(idem, Outcome::BodyTooLarge, problem));
            }
            BufferedBody::Failed => {
                let problem = Problem::body_unreadable();
                return Err(Uncounted::refusal(idem, Outcome::BadBody, problem));
            }
        };
        let Some(scope) = settings.scope.scope_of(parts) else {
            return Ok(Self::unscoped(idem, parts.uri.path(), transaction));
        };
        // A `ScopedKey` taken by an earlier argument, before the extractor that put the
        // principal in, names another scope than this record: a database guard keyed by it
        // would not catch a retry. Refuse loudly rather than run on two identities.
        let Ok(key) = RequestState::of(&mut parts.extensions)
            .scope_for_guard(scope, settings.digest_secret())
        else {
            tracing::error!(target: "idem", path = parts.uri.path(), "`ScopedKey` was extracted before the extractor that authenticates the request; take it after that extractor");
            return Err(Problem::scope_conflict().into_response());
        };
        Ok(Self {
            prepared: Some(Prepared {
                idem,
                key: key.clone(),
                fingerprint,
            }),
            key: Some(key),
            transaction,
            refusal: None,
        })
    }
}

/// The answer to a request served without the idempotency layer.
fn layer_missing(parts: &Parts) -> Response {
    tracing::error!(
        target: "idem",
        path = parts.uri.path(),
        "#[idempotent] handler or `ScopedKey` served without the idempotency layer: add `.layer(idem.layer())` to the Router"
    );
    Problem::layer_missing().into_response()
}

/// The request's scoped key: the one a guard or an earlier extractor already found, else
/// found the same way. Take it after the extractor that authenticates the request: one
/// taken before it, where the two scopes differ, makes the guard answer `500` rather than
/// run on two identities. A keyed request read without a scope is marked for the guard.
fn scoped_key_of(parts: &mut Parts) -> Option<ScopedKey> {
    let state = parts.extensions.get::<RequestState>()?;
    if let Some(key) = state.scoped() {
        return Some(key.clone());
    }
    if !state.needs_scope() {
        return None;
    }
    let idem = parts.extensions.get::<Idempotency>()?;
    let (scope, digest_secret) = (idem.scope_of(parts), idem.settings().digest_secret());
    RequestState::of(&mut parts.extensions).read_scoped(scope, digest_secret)
}

impl<S: Send + Sync> FromRequestParts<S> for ScopedKey {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Response> {
        if let Some(key) = scoped_key_of(parts) {
            return Ok(key);
        }
        // Refused as a guard would refuse the request: for what the key lacks.
        let found = parts
            .extensions
            .get::<RequestState>()
            .map(RequestState::found);
        let Some(idem) = parts
            .extensions
            .get::<Idempotency>()
            .cloned()
            // A key the layer did not mark: the handle came another way (an `Extension`).
            .filter(|_| {
                !(matches!(found, None | Some(Found::None))
                    && parts.headers.contains_key(&IDEMPOTENCY_KEY))
            })
        else {
            return Err(layer_missing(parts));
        };
        let (outcome, problem) = match found {
            Some(Found::Invalid(error)) => (Outcome::BadKey, Problem::key_invalid(&error)),
            Some(Found::Keyed(_)) => (Outcome::NoScope, Problem::scope_missing()),
            Some(Found::None) | None => (Outcome::BadKey, Problem::key_missing()),
        };
        // Counted if it is the answer: a handler may take `Result<ScopedKey, _>` and go on.
        Err(Uncounted::refusal(idem, outcome, problem))
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for ScopedKey {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(scoped_key_of(parts))
    }
}
