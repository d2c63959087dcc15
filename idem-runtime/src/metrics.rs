//! What idem reports through the [`metrics`] facade; the application installs an exporter
//! (Prometheus, StatsD, ...), and without one every call here does nothing.
//!
//! | name | kind | labels |
//! | --- | --- | --- |
//! | `idem_requests_total` | counter | `outcome` |
//! | `idem_store_seconds` | histogram | `step`: `begin`, `renew`, `complete`, `release`, `ping` |
//! | `idem_executions_in_flight` | gauge | |
//! | `idem_executions_detached` | gauge | |
//!
//! Labels take a handful of fixed values each: never a key, a scope or a path.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::protocol::Answer;
use crate::store::{BoxFuture, Store, StoreError};

/// How idem answered a keyed request: the `outcome` of `idem_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The handler ran holding the key.
    Executed,
    /// A stored response was replayed from the store.
    Replayed,
    /// A stored response was replayed from the local tier, without a store round trip.
    LocalHit,
    /// The request ran before, but its response could not be stored (`409`).
    NotStored,
    /// The same request is running (`409`).
    InFlight,
    /// The key was used for a different request (`422`).
    KeyReused,
    /// The key is malformed, repeated, or missing where required (`400`).
    BadKey,
    /// The body is over the limit (`413`).
    BodyTooLarge,
    /// The body could not be read to its end (`400`).
    BadBody,
    /// Nothing identifies the client to scope the key by (`400`).
    NoScope,
    /// The store failed or is full (`503`).
    StoreError,
    /// Too much detached work is running (`503`).
    Overloaded,
    /// The store failed and fail-open ran the handler unprotected.
    FailOpen,
}

impl Outcome {
    /// The outcome of a request answered from the local tier: a hit when it replays, else
    /// what the answer is (a key reused, say).
    pub(crate) fn of_local(answer: &Answer) -> Self {
        match answer {
            Answer::Completed(_) => Self::LocalHit,
            other => Self::of(other),
        }
    }

    /// The outcome of a request answered from what the store holds.
    pub(crate) fn of(answer: &Answer) -> Self {
        match answer {
            Answer::Completed(_) => Self::Replayed,
            Answer::NotStored(_) => Self::NotStored,
            Answer::KeyReused => Self::KeyReused,
            Answer::InFlight => Self::InFlight,
            Answer::Overloaded => Self::Overloaded,
            Answer::Unavailable => Self::StoreError,
        }
    }
}

/// Counts one keyed request under `outcome`.
///
/// Each label is written as a literal, so that the facade builds every key once, in a
/// static, instead of on each call.
pub(crate) fn request(outcome: Outcome) {
    macro_rules! count {
        ($label:literal) => {
            ::metrics::counter!("idem_requests_total", "outcome" => $label).increment(1)
        };
    }
    match outcome {
        Outcome::Executed => count!("executed"),
        Outcome::Replayed => count!("replayed"),
        Outcome::LocalHit => count!("local_hit"),
        Outcome::NotStored => count!("not_stored"),
        Outcome::InFlight => count!("in_flight"),
        Outcome::KeyReused => count!("key_reused"),
        Outcome::BadKey => count!("bad_key"),
        Outcome::BodyTooLarge => count!("body_too_large"),
        Outcome::BadBody => count!("bad_body"),
        Outcome::NoScope => count!("no_scope"),
        Outcome::StoreError => count!("store_error"),
        Outcome::Overloaded => count!("overloaded"),
        Outcome::FailOpen => count!("fail_open"),
    }
}

/// Moves `idem_executions_in_flight` by one, up when an execution starts holding a key,
/// down when it ends. Counted in steps rather than set, so that the gauge is the sum over
/// every handle of the process.
pub(crate) fn execution_in_flight(started: bool) {
    step(::metrics::gauge!("idem_executions_in_flight"), started);
}

/// Moves `idem_executions_detached` by one, up when work moves to a task of its own, down
/// when that work ends.
pub(crate) fn execution_detached(started: bool) {
    step(::metrics::gauge!("idem_executions_detached"), started);
}

fn step(gauge: ::metrics::Gauge, up: bool) {
    if up {
        gauge.increment(1.0);
    } else {
        gauge.decrement(1.0);
    }
}

/// A store whose every step is timed into `idem_store_seconds`: what a handle holds.
pub(crate) struct Measured(pub(crate) Arc<dyn Store>);

/// Records the time of one step when dropped: when it answers, or when it is given up
/// (a timeout).
struct Timed {
    step: Step,
    started: Instant,
}

/// The `step` label of `idem_store_seconds`.
#[derive(Clone, Copy)]
enum Step {
    Begin,
    Renew,
    Complete,
    Release,
    Ping,
}

impl Timed {
    fn start(step: Step) -> Self {
        Self {
            step,
            started: Instant::now(),
        }
    }
}

impl Drop for Timed {
    fn drop(&mut self) {
        let seconds = self.started.elapsed().as_secs_f64();
        // Literal labels: the facade builds each key once (see `request`).
        macro_rules! record {
            ($label:literal) => {
                ::metrics::histogram!("idem_store_seconds", "step" => $label).record(seconds)
            };
        }
        match self.step {
            Step::Begin => record!("begin"),
            Step::Renew => record!("renew"),
            Step::Complete => record!("complete"),
            Step::Release => record!("release"),
            Step::Ping => record!("ping"),
        }
    }
}

impl Store for Measured {
    fn begin<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        Box::pin(async move {
            let _timed = Timed::start(Step::Begin);
            self.0.begin(key, claim, lease).await
        })
    }

    fn renew<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let _timed = Timed::start(Step::Renew);
            self.0.renew(key, claim, lease).await
        })
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        record: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let _timed = Timed::start(Step::Complete);
            self.0.complete(key, claim, record, ttl).await
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let _timed = Timed::start(Step::Release);
            self.0.release(key, claim).await
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let _timed = Timed::start(Step::Ping);
            self.0.ping().await
        })
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        self.0.as_any()
    }
}
