//! Safe retries for non-idempotent axum endpoints, with the `Idempotency-Key` header.
//!
//! A client that retries a payment must never charge twice. With idem, the first request
//! carrying a key runs and its response is stored; a retry with the same key gets the
//! stored response byte for byte (plus `Idempotent-Replayed: true`); the same key with a
//! different request is refused with `422`, and a retry that arrives while the first
//! request still runs gets `409` with `Retry-After`.
//!
//! ```
//! use axum::{Json, Router, http::StatusCode, routing::post};
//! use idem_runtime::{Idempotency, idempotent};
//! use serde_json::{Value, json};
//!
//! #[idempotent(ttl = "24h")]
//! async fn create_payment(Json(request): Json<Value>) -> (StatusCode, Json<Value>) {
//!     // Charge once.
//!     (StatusCode::CREATED, Json(json!({ "id": "pay_1", "amount": request["amount"] })))
//! }
//!
//! # async fn serve() -> Result<(), idem_runtime::ConnectError> {
//! let idem = Idempotency::in_memory(); // or Idempotency::redis("redis://127.0.0.1:6379").await?
//! let app: Router = Router::new()
//!     .route("/payments", post(create_payment))
//!     .layer(idem.layer());
//! # Ok(()) }
//! ```
//!
//! # How a request is handled
//!
//! 1. The layer ([`http::IdempotencyLayer`]) reads the key from `Idempotency-Key`
//!    ([`IdempotencyKey`]): a quoted Structured Field string or a bare token. A bad key
//!    answers `400` before the body is read; no key runs the handler unprotected, or
//!    answers `400` with `required = true`. For a keyed request it buffers the body, up to
//!    the limit.
//! 2. The handler's own extractors run, authentication included. A request they reject is
//!    answered exactly as without idem and leaves its key unused.
//! 3. The guard ([`Idempotent`]) namespaces the key by a [`Scope`]: the [`Principal`]
//!    your authentication put in the request's extensions (recommended), else a digest of
//!    `Authorization`, and the host. A keyed request with no identity is refused, unless
//!    one shared scope was opted in to. One client never sees or blocks another's
//!    response. It fingerprints the request
//!    ([`Fingerprint`](fingerprint::Fingerprint)): method, path and query, body.
//! 4. [`Idempotent::run`] makes one store round trip that claims the key or returns what
//!    is there: a completed response is replayed, a different fingerprint answers `422`,
//!    a request in flight `409`.
//! 5. The first execution runs the handler with its lease renewed, so a slow handler keeps
//!    its key and a disconnecting client does not cancel it; then one round trip stores
//!    the response for the `ttl`, fenced by the execution's token. A `5xx` or a panic
//!    releases the key instead, so a retry runs again.
//!
//! Every response idem produces itself is an RFC 9457 [`Problem`].
//!
//! # Reading the source
//!
//! The folders follow the architecture:
//!
//! - `protocol/`: the protocol every front door runs, with no HTTP in it: `begin` (claim
//!   the key or find what it holds; the one place where a stored fingerprint meets the new
//!   one), `Execution` (the lease kept beside the work, then `complete` or `release` under
//!   the fencing check), and work that outlives a caller that went away.
//! - [`once`]: the second front door, for any async operation.
//! - `http/`: the HTTP front door. What happens on a **first execution** is
//!   `first_execution` in `http/execute.rs`; what happens on a **replay** is `replay` in
//!   `http/replay.rs`, beside `answer`, which turns every other outcome into a problem.
//! - [`store`]: the [`Store`](store::Store) trait (four atomic steps) and the stores.
//! - [`record`]: the versioned encoding of what a store holds under a key.
//! - `config.rs`: the [`Idempotency`] handle, its builder, and every default ([`defaults`]).
//!
//! # Stores
//!
//! [`MemoryStore`](store::MemoryStore) is the embedded default, for one instance.
//! [`RedisStore`](store::RedisStore) (cargo feature `redis`, on by default) shares keys
//! between instances behind a load balancer, as does `PostgresStore` (cargo feature
//! `postgres`) for a team with PostgreSQL and no Redis. `SqliteStore` (cargo feature
//! `sqlite`) keeps the records in the SQLite file of an application on one host. Any other
//! backend can implement [`Store`](store::Store).
//!
//! # Without the macro
//!
//! `#[idempotent]` only rewrites the handler to take an [`Idempotent`] extractor beside its
//! last argument and pass its body to [`Idempotent::run`]; the same can be written by hand.

mod config;
pub mod fingerprint;
mod finite;
pub mod http;
mod in_flight;
mod key;
mod local;
mod metrics;
pub mod once;
mod ops;
mod protocol;
pub mod record;
mod scope;
mod sharded;
pub mod store;

/// Makes an axum handler idempotent: the first request carrying an `Idempotency-Key`
/// runs it and its response is stored; a retry with the same key gets that response
/// again, byte for byte, with `Idempotent-Replayed: true`, and the handler does not run.
///
/// Put it on the `async fn` you route, with any extractors and any return type that
/// implements `IntoResponse`; route it as usual and add [`Idempotency::layer`] to the
/// router.
///
/// ```
/// use axum::extract::State;
/// use axum::http::StatusCode;
/// use axum::response::{IntoResponse, Response};
/// use axum::{Json, Router, routing::post};
/// use idem_runtime::{Idempotency, idempotent};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Clone)]
/// struct Db;
///
/// #[derive(Deserialize)]
/// struct NewPayment {
///     amount: u64,
/// }
///
/// #[derive(Serialize)]
/// struct Payment {
///     id: String,
///     amount: u64,
/// }
///
/// enum AppError {
///     Declined,
/// }
///
/// impl IntoResponse for AppError {
///     fn into_response(self) -> Response {
///         (StatusCode::PAYMENT_REQUIRED, "card declined").into_response()
///     }
/// }
///
/// /// Charges the card once per idempotency key.
/// #[idempotent(ttl = "24h")]
/// pub async fn create_payment(
///     State(_db): State<Db>,
///     Json(request): Json<NewPayment>,
/// ) -> Result<(StatusCode, Json<Payment>), AppError> {
///     if request.amount == 0 {
///         return Err(AppError::Declined);
///     }
///     Ok((StatusCode::CREATED, Json(Payment { id: "pay_1".into(), amount: request.amount })))
/// }
///
/// let idem = Idempotency::in_memory();
/// let app: Router = Router::new()
///     .route("/payments", post(create_payment))
///     .with_state(Db)
///     .layer(idem.layer());
/// ```
///
/// # Options
///
/// Every option is optional and may be given once; anything else is a compile error that
/// lists the accepted ones.
///
/// ## `ttl = "24h"`
///
/// How long the response is kept for replays; after it the key is forgotten and runs the
/// handler afresh. A whole number and a unit (`s`, `m`, `h`, `d`), or several units
/// largest first: `"90s"`, `"15m"`, `"1h30m"`, `"1d 12h"`, `"7d"`. Default: 24 hours.
///
/// ```
/// # use idem_runtime::idempotent;
/// #[idempotent(ttl = "1h30m")]
/// async fn create_order(body: String) -> String {
///     body
/// }
/// ```
///
/// The value is checked when the handler compiles: zero, a malformed value or one longer
/// than Redis can count (about 292 million years) is an error on the literal. A
/// `PostgresStore` or `SqliteStore` keeps a record at most a century.
///
/// ```compile_fail
/// # use idem_runtime::idempotent;
/// #[idempotent(ttl = "0s")] // error: ttl "0s" is zero
/// async fn create_order(body: String) -> String {
///     body
/// }
/// ```
///
/// ## `required = true`
///
/// A request without `Idempotency-Key` is answered `400` with a problem body, and the
/// handler does not run. Default `false`: such a request runs unprotected, as with Stripe.
///
/// ```
/// # use idem_runtime::idempotent;
/// #[idempotent(required = true)]
/// async fn transfer(body: String) -> String {
///     body
/// }
/// ```
///
/// ## `state = AppState`
///
/// The router's state type. The attribute checks at compile time that every argument is
/// an extractor for that state, and reports a wrong one on its type. Without the option
/// the state is taken from a `State<T>` argument, or is `()` where there is none; name it
/// when an extractor of your own needs the state and the handler takes no `State<AppState>`
/// (or takes only a substate through `FromRef`). The error says which state it checked
/// against and where that came from: the option, a `State<T>` argument, or none.
///
/// ```
/// use axum::extract::FromRequestParts;
/// use axum::http::{StatusCode, request::Parts};
/// use axum::{Router, routing::post};
/// use idem_runtime::{Idempotency, idempotent};
///
/// #[derive(Clone)]
/// struct AppState {
///     api_key: String,
/// }
///
/// /// A caller that sent the right API key.
/// struct Caller;
///
/// impl FromRequestParts<AppState> for Caller {
///     type Rejection = StatusCode;
///
///     async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, StatusCode> {
///         match parts.headers.get("x-api-key") {
///             Some(key) if key.as_bytes() == state.api_key.as_bytes() => Ok(Caller),
///             _ => Err(StatusCode::UNAUTHORIZED),
///         }
///     }
/// }
///
/// #[idempotent(state = AppState)]
/// async fn create_order(_caller: Caller, body: String) -> String {
///     body
/// }
///
/// let idem = Idempotency::in_memory();
/// let app: Router = Router::new()
///     .route("/orders", post(create_order))
///     .with_state(AppState { api_key: "secret".into() })
///     .layer(idem.layer());
/// ```
///
/// Without `state = AppState`, `Caller` is reported as no extractor for state `()`:
///
/// ```compile_fail,E0277
/// # use axum::extract::FromRequestParts;
/// # use axum::http::{StatusCode, request::Parts};
/// # use idem_runtime::idempotent;
/// # #[derive(Clone)]
/// # struct AppState;
/// # struct Caller;
/// # impl FromRequestParts<AppState> for Caller {
/// #     type Rejection = StatusCode;
/// #     async fn from_request_parts(_: &mut Parts, _: &AppState) -> Result<Self, StatusCode> {
/// #         Ok(Caller)
/// #     }
/// # }
/// #[idempotent]
/// async fn create_order(_caller: Caller, body: String) -> String {
///     body
/// }
/// ```
///
/// ## `crate = "idem"`
///
/// The path the expansion reaches this crate by, where it is not `::idem_runtime`: when
/// `Cargo.toml` renames the dependency, or when idem comes through a re-export of another
/// crate. Like serde's and tokio's `crate` option, it takes the path in a string.
///
/// ```toml
/// [dependencies]
/// idem = { package = "idem-runtime", version = "0.2" }
/// ```
///
/// ```
/// # use idem_runtime as idem;
/// #[idem::idempotent(crate = "idem", ttl = "1h")]
/// async fn create_order(body: String) -> String {
///     body
/// }
/// ```
///
/// Without it, a renamed dependency fails with `E0433` (``cannot find `idem_runtime` ``).
///
/// # Handlers it accepts
///
/// - Any extractors, up to axum's 16, each an extractor for the router's state; only the
///   last may read the body (`Json`, `Form`, `String`, `Bytes`, ...). An argument may
///   carry `#[cfg(..)]`; the last one compiled in shares its slot with the guard. Every one of them,
///   authentication included, runs before idem claims the key or replays: a request they
///   reject is answered exactly as without idem, and leaves its key unused (a corrected
///   retry with the same key runs). An extractor may put a [`Principal`] in the request's
///   extensions to scope the key by the user it authenticated.
/// - The guard shares the slot of the handler's **last** argument and is extracted just
///   before it. Put the extractor that authenticates anywhere but last (in a handler
///   without a body: `async fn cancel(caller: Caller, State(db): State<Db>)`), and take
///   [`ScopedKey`] after it: one taken before, naming another scope than idem's record, is
///   refused with `500` (`urn:idem:problem:scope-conflict`) rather than run.
/// - Any return type that implements `IntoResponse`, including `impl IntoResponse` and
///   `Result<T, E>`; `return` and `?` work as usual.
/// - `pub` and doc comments, other attributes, and generic handlers (each type parameter
///   gets `Send + 'static`, as the work runs in a task of its own).
/// - Associated functions in an `impl` block, using `Self` and the impl's generic
///   parameters: the body runs in the handler itself, not in a function of its own.
/// - `#[axum::debug_handler]` below `#[idempotent]` checks the handler axum is given, with
///   any number of arguments (the state of a `State<T>` argument, or of `state = ...`, is
///   passed on to it); above, it checks the handler as you wrote it, and works for
///   handlers that take at least one argument.
///
/// - `#[tracing::instrument]` above or below `#[idempotent]`: either way it sees the
///   handler as written, its arguments for `skip` and `fields`, its return type for `err`
///   and `ret` (below, the attribute moves it above itself).
///
/// Not: a method taking `self`, or a function that is not `async`.
///
/// The handler's work runs in a task of its own, so a client that disconnects does not
/// cancel it; see [`Idempotent::run`]. Served without [`Idempotency::layer`], the handler
/// answers `500` with a problem naming the missing `.layer(idem.layer())`.
///
/// # Testing an annotated handler
///
/// The attribute changes the function's signature (its last argument shares a slot with
/// the guard, and it returns `Response`), so it cannot be called directly in a unit test.
/// Test it through a `Router` with the layer (`tower::ServiceExt::oneshot`), or keep the
/// business logic in a plain function that the handler calls and test that.
pub use idem_macros::idempotent;

pub use crate::config::{HeaderPolicy, Idempotency, IdempotencyBuilder, defaults};
pub use crate::fingerprint::FingerprintMode;
pub use crate::http::{Idempotent, Problem};
pub use crate::key::{IdempotencyKey, KeyError, ScopedKey};
pub use crate::once::OnceKey;
pub use crate::scope::{Principal, Scope};
pub use crate::store::ConnectError;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;
