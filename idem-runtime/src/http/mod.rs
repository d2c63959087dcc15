//! The HTTP front door: the tower layer, the extractors handlers take, and the responses
//! idem answers with.
//!
//! A request with an `Idempotency-Key` meets idem three times:
//! 1. [`IdempotencyLayer`] reads and checks the key, and buffers the body (up to the limit)
//!    for the fingerprint; a request without the header passes through untouched.
//! 2. [`Idempotent`], extracted with the handler's own arguments,
//!    scopes the key and fingerprints the request; it claims nothing.
//! 3. [`Idempotent::run`] hands the request to the
//!    protocol and then either runs the handler as the first execution
//!    (its response stored), or answers without running it: a replay of the stored
//!    response, or a [`Problem`].

mod body;
mod execute;
mod extract;
mod layer;
mod problem;
mod replay;
mod state;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
mod transaction;

pub use self::extract::Idempotent;
pub use self::layer::{IdempotencyFuture, IdempotencyLayer, IdempotencyService};
pub use self::problem::{PROBLEM_JSON, Problem};
pub use crate::key::IDEMPOTENCY_KEY;

/// The header added to every replayed response: `Idempotent-Replayed: true`.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";
