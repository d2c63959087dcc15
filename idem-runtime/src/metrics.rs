//! What idem reports through the [`metrics`] facade; the application installs an exporter
//! (Prometheus, StatsD, ...), and without one every call here does nothing.
//!
//! | name | kind | labels |
//! | --- | --- | --- |
//! | `idem_requests_total` | counter | `outcome` |
//! | `idem_store_seconds` | histogram | `step`: `begin`, `renew`, `complete`, `release`, `ping` |
//! | `idem_executions_in_flight` | gauge | |
//! | `idem_executions_detached` | gauge | |
//! | `idem_memory_evictions_total` | counter | |
//!
//! Labels take a handful of fixed values each: never a key, a scope or a path.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};

use crate::protocol::Answer;

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

/// The number of [`Outcome`]s.
const OUTCOMES: usize = Outcome::FailOpen as usize + 1;

/// The `step` label of `idem_store_seconds`: which store call is timed.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Step {
    Begin,
    Renew,
    Complete,
    Release,
    Ping,
}

/// The number of [`Step`]s.
const STEPS: usize = Step::Ping as usize + 1;

/// The handles a handle of idem reports through, resolved once, on its first report (a
/// request, usually, by when the application has installed its recorder): each report is
/// then an atomic operation on a handle, with no lookup of its name.
#[derive(Clone, Default)]
pub(crate) struct Metrics(Arc<OnceLock<Handles>>);

struct Handles {
    requests: [Counter; OUTCOMES],
    store: [Histogram; STEPS],
    in_flight: Gauge,
}

impl Handles {
    /// The handles of the recorder installed now (the thread's local one, else the
    /// global one); no-ops where there is none.
    fn register() -> Self {
        // Each label is a literal, so that the facade builds every key in a static.
        macro_rules! requests {
            ($($label:literal),*) => {
                [$(::metrics::counter!("idem_requests_total", "outcome" => $label)),*]
            };
        }
        macro_rules! store {
            ($($label:literal),*) => {
                [$(::metrics::histogram!("idem_store_seconds", "step" => $label)),*]
            };
        }
        // In the order of the variants of `Outcome` and `Step`.
        Self {
            requests: requests!(
                "executed",
                "replayed",
                "local_hit",
                "not_stored",
                "in_flight",
                "key_reused",
                "bad_key",
                "body_too_large",
                "bad_body",
                "no_scope",
                "store_error",
                "overloaded",
                "fail_open"
            ),
            store: store!("begin", "renew", "complete", "release", "ping"),
            in_flight: ::metrics::gauge!("idem_executions_in_flight"),
        }
    }
}

impl Metrics {
    fn handles(&self) -> &Handles {
        self.0.get_or_init(Handles::register)
    }

    /// Counts one keyed request under `outcome`.
    pub(crate) fn request(&self, outcome: Outcome) {
        self.handles().requests[outcome as usize].increment(1);
    }

    /// Records how long one store `step` took (or waited before it was given up).
    pub(crate) fn store_step(&self, step: Step, took: Duration) {
        self.handles().store[step as usize].record(took.as_secs_f64());
    }

    /// Moves `idem_executions_in_flight` by one, up when an execution starts holding a
    /// key, down when it ends. Counted in steps rather than set, so that the gauge is the
    /// sum over every handle of the process.
    pub(crate) fn execution_in_flight(&self, started: bool) {
        step(&self.handles().in_flight, started);
    }
}

/// Moves `idem_executions_detached` by one, up when work moves to a task of its own, down
/// when that work ends.
pub(crate) fn execution_detached(started: bool) {
    step(&::metrics::gauge!("idem_executions_detached"), started);
}

fn step(gauge: &Gauge, up: bool) {
    if up {
        gauge.increment(1.0);
    } else {
        gauge.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};

    use metrics::{Key, KeyName, Metadata, Recorder, SharedString, Unit};

    use super::*;

    /// Counts each counter by its `outcome` label, and each histogram's samples by `step`.
    #[derive(Default)]
    struct ByLabel(Mutex<HashMap<String, Arc<AtomicU64>>>);

    impl ByLabel {
        fn handle(&self, key: &Key) -> Arc<AtomicU64> {
            let label = key.labels().map(|label| label.value().to_owned()).collect();
            self.0.lock().unwrap().entry(label).or_default().clone()
        }

        fn count(&self, label: &str) -> u64 {
            self.0
                .lock()
                .unwrap()
                .get(label)
                .map_or(0, |count| count.load(Ordering::Relaxed))
        }
    }

    /// A histogram that counts its samples.
    struct Samples(Arc<AtomicU64>);

    impl metrics::HistogramFn for Samples {
        fn record(&self, _: f64) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    impl Recorder for ByLabel {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            Counter::from_arc(self.handle(key))
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::from_arc(Arc::new(Samples(self.handle(key))))
        }
    }

    /// Guards: each outcome and each step reports under its own label, so that no count
    /// lands under another's name.
    #[test]
    fn every_outcome_and_step_reports_under_its_label() {
        let recorder = ByLabel::default();
        let metrics = Metrics::default();
        // The first report resolves the handles, under the recorder installed then.
        ::metrics::with_local_recorder(&recorder, || metrics.request(Outcome::Executed));
        assert_eq!(recorder.count("executed"), 1);
        let outcomes = [
            (Outcome::Executed, "executed"),
            (Outcome::Replayed, "replayed"),
            (Outcome::LocalHit, "local_hit"),
            (Outcome::NotStored, "not_stored"),
            (Outcome::InFlight, "in_flight"),
            (Outcome::KeyReused, "key_reused"),
            (Outcome::BadKey, "bad_key"),
            (Outcome::BodyTooLarge, "body_too_large"),
            (Outcome::BadBody, "bad_body"),
            (Outcome::NoScope, "no_scope"),
            (Outcome::StoreError, "store_error"),
            (Outcome::Overloaded, "overloaded"),
            (Outcome::FailOpen, "fail_open"),
        ];
        assert_eq!(outcomes.len(), OUTCOMES);
        for (times, (outcome, _)) in (1..).zip(outcomes) {
            let times = if outcome == Outcome::Executed {
                times - 1
            } else {
                times
            };
            for _ in 0..times {
                metrics.request(outcome);
            }
        }
        for (times, (_, label)) in (1..).zip(outcomes) {
            assert_eq!(recorder.count(label), times, "{label}");
        }
        let steps = [
            (Step::Begin, "begin"),
            (Step::Renew, "renew"),
            (Step::Complete, "complete"),
            (Step::Release, "release"),
            (Step::Ping, "ping"),
        ];
        assert_eq!(steps.len(), STEPS);
        for (times, (step, _)) in (1..).zip(steps) {
            for _ in 0..times {
                metrics.store_step(step, Duration::from_millis(1));
            }
        }
        for (times, (_, label)) in (1..).zip(steps) {
            assert_eq!(recorder.count(label), times, "{label}");
        }
    }
}
