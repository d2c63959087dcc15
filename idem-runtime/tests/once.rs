//! `once`: an async operation run at most once per key, on the memory store, the shared
//! Redis, a Redis Cluster of the test's own, (feature `postgres`) the shared PostgreSQL and
//! (feature `sqlite`) a SQLite file of each test's own.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Backend, until};
use idem_runtime::once::{OnceError, Outcome};
use idem_runtime::{Idempotency, OnceKey};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Artifact {
    id: usize,
    name: String,
}

/// An operation that counts its runs and, while `gate` is set, waits on it.
#[derive(Default)]
struct Operation {
    runs: AtomicUsize,
    gate: Notify,
}

impl Operation {
    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    /// A run that ends at once with artifact number `n` (its run count).
    fn artifact(
        self: &Arc<Self>,
    ) -> impl Future<Output = Result<Artifact, String>> + Send + 'static {
        let this = self.clone();
        async move {
            let id = this.runs.fetch_add(1, Ordering::SeqCst) + 1;
            Ok(Artifact {
                id,
                name: format!("artifact {id}"),
            })
        }
    }

    /// A run that waits for the gate before it ends.
    fn gated(self: &Arc<Self>) -> impl Future<Output = Result<Artifact, String>> + Send + 'static {
        let this = self.clone();
        async move {
            let id = this.runs.fetch_add(1, Ordering::SeqCst) + 1;
            this.gate.notified().await;
            Ok(Artifact {
                id,
                name: format!("artifact {id}"),
            })
        }
    }
}

fn key(name: &str) -> OnceKey {
    OnceKey::compose(["test", name])
}

/// Guards: 64 concurrent calls with one key run the operation once, and all 64 get its
/// value; a later call replays it, and says so, without running.
async fn concurrent_calls_run_once(backend: Backend) {
    let idem = backend.builder().await.build();
    let operation = Arc::new(Operation::default());
    let calls: Vec<_> = (0..64)
        .map(|_| {
            let (idem, operation) = (idem.clone(), operation.clone());
            tokio::spawn(async move {
                idem.once(key("concurrent"), "build 42")
                    .run(|| operation.gated())
                    .await
            })
        })
        .collect();
    until(|| operation.runs() == 1).await;
    // Everyone else now waits on the claim; let the one run end.
    operation.gate.notify_waiters();
    operation.gate.notify_one();
    let mut values = Vec::new();
    for call in calls {
        values.push(call.await.unwrap().unwrap());
    }
    assert_eq!(operation.runs(), 1, "the operation ran once");
    assert!(values.iter().all(|value| *value == values[0]), "{values:?}");

    let later = idem
        .once(key("concurrent"), "build 42")
        .run_with_outcome(|| operation.artifact())
        .await
        .unwrap();
    assert_eq!(later, Outcome::Replayed(values[0].clone()));
    assert!(later.is_replay());
    assert_eq!(operation.runs(), 1, "a replay runs nothing");
}

/// Guards: the same key with another input is refused, and nothing runs.
async fn another_input_is_key_reused(backend: Backend) {
    let idem = backend.builder().await.build();
    let operation = Arc::new(Operation::default());
    let first = idem
        .once(key("reuse"), &("cus_1", 100))
        .run_with_outcome(|| operation.artifact())
        .await
        .unwrap();
    assert!(!first.is_replay());
    let other = idem
        .once(key("reuse"), &("cus_1", 200))
        .run(|| operation.artifact())
        .await;
    assert!(matches!(other, Err(OnceError::KeyReused)), "{other:?}");
    assert_eq!(operation.runs(), 1);
}

/// Guards: after the ttl the key is forgotten and the operation runs afresh (a real wait).
async fn the_result_expires_with_its_ttl(backend: Backend) {
    let idem = backend.builder().await.build();
    let operation = Arc::new(Operation::default());
    let call = || {
        idem.once(key("ttl"), "input")
            .ttl(Duration::from_secs(1))
            .run_with_outcome(|| operation.artifact())
    };
    assert!(!call().await.unwrap().is_replay());
    assert!(call().await.unwrap().is_replay());
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let fresh = call().await.unwrap();
    assert_eq!(
        fresh,
        Outcome::Ran(Artifact {
            id: 2,
            name: "artifact 2".into()
        })
    );
}

/// Guards: an `Err` is not stored (the next call runs again), unless errors are stored;
/// a stored error comes back as a replay, and the operation does not run again.
async fn errors_are_stored_only_when_asked(backend: Backend) {
    let idem = backend.builder().await.build();
    let runs = Arc::new(AtomicUsize::new(0));
    let fails = |runs: Arc<AtomicUsize>| async move {
        runs.fetch_add(1, Ordering::SeqCst);
        Err::<Artifact, String>("card declined".to_owned())
    };
    let failed = idem
        .once(key("not-stored"), "in")
        .run(|| fails(runs.clone()))
        .await;
    assert!(
        matches!(&failed, Err(OnceError::Operation(e)) if e == "card declined"),
        "{failed:?}"
    );
    let operation = Arc::new(Operation::default());
    let then = idem
        .once(key("not-stored"), "in")
        .run_with_outcome(|| operation.artifact())
        .await
        .unwrap();
    assert!(
        !then.is_replay(),
        "the error was not stored, so the operation ran again"
    );
    assert_eq!(operation.runs(), 1);

    // Opted in: Err, then a call whose operation would succeed gets the stored error.
    let stored = idem
        .once(key("stored"), "in")
        .run_storing_errors(|| fails(runs.clone()))
        .await;
    assert!(
        matches!(&stored, Err(e @ OnceError::Operation(_)) if !e.is_replay()),
        "{stored:?}"
    );
    let again = idem
        .once(key("stored"), "in")
        .run_storing_errors(|| operation.artifact())
        .await;
    assert!(
        matches!(&again, Err(e @ OnceError::Replayed(msg)) if e.is_replay() && msg == "card declined"),
        "{again:?}"
    );
    assert_eq!(
        again.unwrap_err().operation_error().map(String::as_str),
        Some("card declined")
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2, "one failing run per key");
    assert_eq!(
        operation.runs(),
        1,
        "the stored error was replayed, not re-run"
    );
    let plain = idem
        .once(key("stored"), "in")
        .run(|| operation.artifact())
        .await;
    assert!(matches!(plain, Err(OnceError::StoredFailure)), "{plain:?}");
    assert_eq!(operation.runs(), 1, "nothing ran for the plain call either");
}

/// A result that cannot be written as JSON (a map with non-string keys).
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Unwritable(std::collections::HashMap<(u8, u8), u8>);

/// Guards: a result that cannot be stored never lets the operation run a second time:
/// the caller gets its value, and later calls are told it ran without a stored result.
async fn an_unwritable_result_is_not_run_again(backend: Backend) {
    let idem = backend.builder().await.build();
    let runs = Arc::new(AtomicUsize::new(0));
    let operation = |runs: Arc<AtomicUsize>| async move {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, String>(Unwritable([((1, 2), 3)].into_iter().collect()))
    };
    let first = idem
        .once(key("unwritable"), "in")
        .run_with_outcome(|| operation(runs.clone()))
        .await
        .unwrap();
    assert!(!first.is_replay());
    let second = idem
        .once(key("unwritable"), "in")
        .run(|| operation(runs.clone()))
        .await;
    assert!(matches!(second, Err(OnceError::NotStored)), "{second:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A result that serde_json writes but cannot read back: a non-finite float is written
/// as `null`, which is not an `f64`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Quote {
    id: u32,
    rate: f64,
}

/// Guards: a result, or a stored error, whose JSON does not read back as its type is
/// treated as one that cannot be written: the caller gets its value, and later calls are
/// told it ran without a stored result (not a deserialization error for the key's whole
/// TTL), and the operation never runs again.
async fn a_result_that_does_not_read_back_is_not_stored(backend: Backend) {
    let idem = backend.builder().await.build();
    let runs = Arc::new(AtomicUsize::new(0));
    let quote = |runs: Arc<AtomicUsize>| async move {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, String>(Quote {
            id: 7,
            rate: f64::INFINITY,
        })
    };
    let first = idem
        .once(key("non-finite"), "in")
        .run_with_outcome(|| quote(runs.clone()))
        .await
        .unwrap();
    assert!(!first.is_replay());
    assert_eq!(
        first.into_inner().rate,
        f64::INFINITY,
        "the caller gets its value"
    );
    let second = idem
        .once(key("non-finite"), "in")
        .run(|| quote(runs.clone()))
        .await;
    assert!(matches!(second, Err(OnceError::NotStored)), "{second:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // The same for an error stored by `run_storing_errors`.
    let failures = Arc::new(AtomicUsize::new(0));
    let fails = |failures: Arc<AtomicUsize>| async move {
        failures.fetch_add(1, Ordering::SeqCst);
        Err::<Artifact, _>(Quote {
            id: 8,
            rate: f64::NAN,
        })
    };
    let first = idem
        .once(key("non-finite-error"), "in")
        .run_storing_errors(|| fails(failures.clone()))
        .await;
    assert!(
        matches!(&first, Err(OnceError::Operation(quote)) if quote.rate.is_nan()),
        "{first:?}"
    );
    let second = idem
        .once(key("non-finite-error"), "in")
        .run_storing_errors(|| fails(failures.clone()))
        .await;
    assert!(matches!(second, Err(OnceError::NotStored)), "{second:?}");
    assert_eq!(failures.load(Ordering::SeqCst), 1);
}

/// Guards: a result JSON writes as another value (`Some(f64::INFINITY)` is written as
/// `null`, which reads back as `None`) is not stored, so no later call is handed a value
/// the operation never returned: they are told it ran without a stored result.
async fn a_result_json_would_change_is_not_stored(backend: Backend) {
    let idem = backend.builder().await.build();
    let runs = Arc::new(AtomicUsize::new(0));
    let rate = |runs: Arc<AtomicUsize>| async move {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<Option<f64>, String>(Some(f64::INFINITY))
    };
    let first = idem
        .once(key("changed"), "in")
        .run(|| rate(runs.clone()))
        .await
        .unwrap();
    assert_eq!(first, Some(f64::INFINITY), "the caller gets its value");
    let second = idem
        .once(key("changed"), "in")
        .run(|| rate(runs.clone()))
        .await;
    assert!(matches!(second, Err(OnceError::NotStored)), "{second:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Guards: a result that reads back exactly is stored and replayed as it was returned,
/// whatever its maps' iteration order.
async fn a_result_that_reads_back_exactly_is_replayed(backend: Backend) {
    let idem = backend.builder().await.build();
    let runs = Arc::new(AtomicUsize::new(0));
    let balances = |runs: Arc<AtomicUsize>| async move {
        runs.fetch_add(1, Ordering::SeqCst);
        let balances: std::collections::HashMap<String, Option<u64>> = (0..40)
            .map(|n| (format!("acct-{n}"), (n % 3 != 0).then_some(n)))
            .collect();
        Ok::<_, String>(balances)
    };
    let first = idem
        .once(key("exact"), "in")
        .run(|| balances(runs.clone()))
        .await
        .unwrap();
    let again = idem
        .once(key("exact"), "in")
        .run_with_outcome(|| balances(runs.clone()))
        .await
        .unwrap();
    assert!(again.is_replay());
    assert_eq!(again.into_inner(), first);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A result whose own `Deserialize` panics (a bug in the application's type).
#[derive(Debug, Clone, PartialEq, Serialize)]
struct Fragile(u32);

impl<'de> Deserialize<'de> for Fragile {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        panic!("a Deserialize with a bug")
    }
}

/// Guards: the operation has run when its result is written and read back; a panic in
/// the result's own `Serialize` or `Deserialize` there is taken as a result that cannot
/// be stored, never as a failure that releases the key and runs the operation again.
async fn a_result_whose_read_back_panics_is_not_run_again(backend: Backend) {
    let idem = backend.builder().await.build();
    let runs = Arc::new(AtomicUsize::new(0));
    let charge = |runs: Arc<AtomicUsize>| async move {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, String>(Fragile(1200))
    };
    let first = idem
        .once(key("fragile"), "in")
        .run(|| charge(runs.clone()))
        .await;
    assert_eq!(first.unwrap(), Fragile(1200), "the caller gets its value");
    let second = idem
        .once(key("fragile"), "in")
        .run(|| charge(runs.clone()))
        .await;
    assert!(matches!(second, Err(OnceError::NotStored)), "{second:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the charge ran once");
}

/// An operation written as a future by hand, whose `Drop` panics once it has returned its
/// value (a bug in the application's future, or in a combinator it uses).
struct PanicsWhenDroppedAfterReturning {
    runs: Arc<AtomicUsize>,
    returned: bool,
}

impl std::future::Future for PanicsWhenDroppedAfterReturning {
    type Output = Result<u32, String>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        self.returned = true;
        std::task::Poll::Ready(Ok(42))
    }
}

impl Drop for PanicsWhenDroppedAfterReturning {
    fn drop(&mut self) {
        if self.returned && !std::thread::panicking() {
            panic!("the drop of an operation that returned");
        }
    }
}

/// Guards: an operation that returned has run, whatever its future does when it is
/// dropped: a panic there never releases the key, so the next call is answered with the
/// value the operation returned, and it never runs again.
async fn a_returned_operation_whose_drop_panics_is_not_run_again(backend: Backend) {
    let idem = backend.builder().await.build();
    let runs = Arc::new(AtomicUsize::new(0));
    let first = idem
        .once(key("drop-panics"), "in")
        .run(|| PanicsWhenDroppedAfterReturning {
            runs: runs.clone(),
            returned: false,
        })
        .await;
    assert_eq!(first.unwrap(), 42, "the caller gets the value returned");
    let second = idem
        .once(key("drop-panics"), "in")
        .run_with_outcome({
            let runs = runs.clone();
            || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<u32, String>(7)
            }
        })
        .await
        .unwrap();
    assert!(second.is_replay(), "{second:?}");
    assert_eq!(second.into_inner(), 42);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the operation ran once");
}

/// Guards: a float result is replayed as the very number the operation returned, not one
/// a unit in the last place away (about one computed amount in ten is, when JSON's
/// shortest text is read back without exact parsing).
async fn float_results_are_replayed_exactly(backend: Backend) {
    let idem = backend.builder().await.build();
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut changed = Vec::new();
    for n in 0..300_u32 {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let amount = (state >> 11) as f64 / (1_u64 << 53) as f64 * 10_000.0 * 1.0725;
        let rate = amount as f32 / 7.0;
        let call = || async move { Ok::<(f64, f32), String>((amount, rate)) };
        let name = format!("float-{n}");
        let ran = idem.once(key(&name), &n).run(call).await.unwrap();
        assert_eq!(ran, (amount, rate));
        let replay = idem
            .once(key(&name), &n)
            .run_with_outcome(|| async { Ok::<(f64, f32), String>((-1.0, -1.0)) })
            .await
            .unwrap();
        assert!(replay.is_replay(), "{replay:?}");
        let (replayed, replayed_rate) = replay.into_inner();
        if replayed.to_bits() != amount.to_bits() || replayed_rate.to_bits() != rate.to_bits() {
            changed.push(((amount, rate), (replayed, replayed_rate)));
        }
    }
    assert!(
        changed.is_empty(),
        "{} of 300 replays handed back numbers the operation never returned, e.g. {:?}",
        changed.len(),
        changed[0]
    );
}

/// Guards: two inputs JSON would write alike (`Some(f64::NAN)` and `None`, both `null`)
/// are never taken for one: an input holding a non-finite float is refused before
/// anything runs, so a call with another input is never answered with this one's result.
async fn an_input_json_would_change_is_refused(backend: Backend) {
    let idem = backend.builder().await.build();
    let runs = Arc::new(AtomicUsize::new(0));
    let charge = |runs: Arc<AtomicUsize>| async move {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, String>("charged".to_owned())
    };
    let refused = idem
        .once(key("input"), &Some(f64::NAN))
        .run(|| charge(runs.clone()))
        .await;
    assert!(
        matches!(&refused, Err(OnceError::Serialize { what: "input", .. })),
        "{refused:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0, "nothing ran");
    let none: Option<f64> = None;
    let ran = idem
        .once(key("input"), &none)
        .run(|| charge(runs.clone()))
        .await;
    assert_eq!(ran.unwrap(), "charged");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Guards: a caller whose process dies mid-operation (its runtime shut down: no release,
/// no renewal) holds the key only until its lease runs out; then the next call runs.
async fn a_vanished_caller_frees_the_key_after_its_lease(backend: Backend) {
    let lease = Duration::from_millis(800);
    let started = Arc::new(AtomicUsize::new(0));
    let doomed = std::thread::spawn({
        let (backend, started) = (backend.clone(), started.clone());
        move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async {
                let idem = backend.builder().await.lease(lease).build();
                let counter = started.clone();
                let call = tokio::spawn(async move {
                    idem.once(key("vanished"), "in")
                        .run(|| async move {
                            counter.fetch_add(1, Ordering::SeqCst);
                            std::future::pending::<Result<u8, String>>().await
                        })
                        .await
                });
                until(|| started.load(Ordering::SeqCst) == 1).await;
                drop(call);
            });
            // Every task of this runtime is dropped here, as in a killed process.
            runtime.shutdown_background();
        }
    });
    doomed.join().unwrap();
    let gone_at = tokio::time::Instant::now();
    let idem = backend.builder().await.lease(lease).build();
    let held = idem
        .once(key("vanished"), "in")
        .no_wait()
        .run(|| async { Ok::<u8, String>(2) })
        .await;
    assert!(matches!(held, Err(OnceError::InFlight)), "{held:?}");
    let after = idem
        .once(key("vanished"), "in")
        .wait(lease * 4)
        .run_with_outcome(|| async { Ok::<u8, String>(2) })
        .await
        .unwrap();
    assert_eq!(
        after,
        Outcome::Ran(2),
        "the next call ran once the lease ran out"
    );
    assert!(gone_at.elapsed() < lease * 4, "freed within a few leases");
}

/// Guards: a panic releases the key (the next call runs), and a caller that drops its call
/// neither cancels the operation nor leaves the key held: the operation ends, its result
/// is stored, and the next call replays it.
async fn panics_release_and_drops_do_not_cancel(backend: Backend) {
    let idem = backend
        .builder()
        .await
        .lease(Duration::from_secs(2))
        .build();
    let panicked = tokio::spawn({
        let idem = idem.clone();
        async move {
            idem.once(key("panic"), "in")
                .run(|| async {
                    if true {
                        panic!("the operation broke")
                    } else {
                        Ok::<u8, String>(1)
                    }
                })
                .await
        }
    })
    .await;
    assert!(panicked.unwrap_err().is_panic());
    let operation = Arc::new(Operation::default());
    let after = idem
        .once(key("panic"), "in")
        .run_with_outcome(|| operation.artifact())
        .await
        .unwrap();
    assert!(!after.is_replay(), "the panic released the key");

    let dropped = tokio::spawn({
        let (idem, operation) = (idem.clone(), operation.clone());
        async move {
            idem.once(key("dropped"), "in")
                .run(|| operation.gated())
                .await
        }
    });
    until(|| operation.runs() == 2).await;
    dropped.abort();
    assert!(dropped.await.unwrap_err().is_cancelled());
    operation.gate.notify_one();
    let replay = idem
        .once(key("dropped"), "in")
        .run_with_outcome(|| operation.artifact())
        .await
        .unwrap();
    assert_eq!(
        replay,
        Outcome::Replayed(Artifact {
            id: 2,
            name: "artifact 2".into()
        })
    );
    assert_eq!(
        operation.runs(),
        2,
        "the dropped call's operation ran once, to its end"
    );
}

/// Guards: with `no_wait`, a call while the operation runs is told so at once.
async fn no_wait_answers_in_flight(backend: Backend) {
    let idem = backend.builder().await.build();
    let operation = Arc::new(Operation::default());
    let first = tokio::spawn({
        let (idem, operation) = (idem.clone(), operation.clone());
        async move {
            idem.once(key("no-wait"), "in")
                .run(|| operation.gated())
                .await
        }
    });
    until(|| operation.runs() == 1).await;
    let second = idem
        .once(key("no-wait"), "in")
        .no_wait()
        .run(|| operation.artifact())
        .await;
    assert!(matches!(second, Err(OnceError::InFlight)), "{second:?}");
    operation.gate.notify_one();
    assert_eq!(first.await.unwrap().unwrap().id, 1);
    assert_eq!(operation.runs(), 1);
}

on_both_stores!(
    concurrent_calls_run_once,
    another_input_is_key_reused,
    the_result_expires_with_its_ttl,
    errors_are_stored_only_when_asked,
    panics_release_and_drops_do_not_cancel,
    no_wait_answers_in_flight,
    an_unwritable_result_is_not_run_again,
    a_result_that_does_not_read_back_is_not_stored,
    a_result_json_would_change_is_not_stored,
    a_result_that_reads_back_exactly_is_replayed,
    a_result_whose_read_back_panics_is_not_run_again,
    a_returned_operation_whose_drop_panics_is_not_run_again,
    float_results_are_replayed_exactly,
    an_input_json_would_change_is_refused,
    a_vanished_caller_frees_the_key_after_its_lease,
);

#[cfg(feature = "postgres")]
on_postgres!(
    concurrent_calls_run_once,
    another_input_is_key_reused,
    the_result_expires_with_its_ttl,
    errors_are_stored_only_when_asked,
    panics_release_and_drops_do_not_cancel,
    no_wait_answers_in_flight,
    an_unwritable_result_is_not_run_again,
    a_result_that_does_not_read_back_is_not_stored,
    a_result_json_would_change_is_not_stored,
    a_result_that_reads_back_exactly_is_replayed,
    a_result_whose_read_back_panics_is_not_run_again,
    a_returned_operation_whose_drop_panics_is_not_run_again,
    float_results_are_replayed_exactly,
    an_input_json_would_change_is_refused,
    a_vanished_caller_frees_the_key_after_its_lease,
);

#[cfg(feature = "sqlite")]
on_sqlite!(
    concurrent_calls_run_once,
    another_input_is_key_reused,
    the_result_expires_with_its_ttl,
    errors_are_stored_only_when_asked,
    panics_release_and_drops_do_not_cancel,
    no_wait_answers_in_flight,
    an_unwritable_result_is_not_run_again,
    a_result_that_does_not_read_back_is_not_stored,
    a_result_json_would_change_is_not_stored,
    a_result_that_reads_back_exactly_is_replayed,
    a_result_whose_read_back_panics_is_not_run_again,
    a_returned_operation_whose_drop_panics_is_not_run_again,
    float_results_are_replayed_exactly,
    an_input_json_would_change_is_refused,
    a_vanished_caller_frees_the_key_after_its_lease,
);

/// Guards: the same on a 3-master Redis Cluster.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_on_a_three_master_cluster() {
    let cluster = testkit::RedisCluster::start(3);
    let on_cluster = |test: &str| Backend::Cluster {
        urls: cluster.urls(),
        prefix: testkit::unique_prefix(test),
    };
    concurrent_calls_run_once(on_cluster("once-concurrent")).await;
    another_input_is_key_reused(on_cluster("once-reuse")).await;
    the_result_expires_with_its_ttl(on_cluster("once-ttl")).await;
    errors_are_stored_only_when_asked(on_cluster("once-errors")).await;
    panics_release_and_drops_do_not_cancel(on_cluster("once-panic")).await;
    a_vanished_caller_frees_the_key_after_its_lease(on_cluster("once-vanished")).await;
}

/// Guards: a once key and an HTTP request's key never share a record, whatever they say.
#[tokio::test]
async fn once_keys_live_apart_from_request_keys() {
    let idem = Idempotency::builder().shared_scope(true).build();
    let value = idem
        .once(OnceKey::new("order-1").unwrap(), "in")
        .run(|| async { Ok::<_, String>(1u8) })
        .await
        .unwrap();
    assert_eq!(value, 1);
    let request_key = idem_runtime::ScopedKey::new(
        idem_runtime::Scope::anonymous(),
        idem_runtime::IdempotencyKey::parse(b"order-1").unwrap(),
    );
    assert!(
        idem.store()
            .begin(
                request_key.as_str(),
                &bytes::Bytes::from_static(b"claim"),
                Duration::from_secs(1)
            )
            .await
            .unwrap()
            .is_none(),
        "the request key is free"
    );
}

/// Guards: a result heavier than the memory store's share for its key (17 MiB, with 4
/// shards of 16 MiB under a 64 MiB bound) is returned to its caller, and later calls are
/// told it ran without a stored result: never run again, never stuck.
#[tokio::test]
async fn a_result_the_store_cannot_keep_is_not_run_again() {
    let store = idem_runtime::store::MemoryStore::with_bounds(100_000, 64 << 20).unwrap();
    let idem = Idempotency::builder()
        .store(store.clone())
        .shared_scope(true)
        .build();
    let runs = Arc::new(AtomicUsize::new(0));
    let operation = |runs: Arc<AtomicUsize>| async move {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, String>("h".repeat(17 << 20))
    };
    let first = idem
        .once(key("heavy"), "in")
        .run(|| operation(runs.clone()))
        .await
        .unwrap();
    assert_eq!(first.len(), 17 << 20);
    for _ in 0..3 {
        let again = idem
            .once(key("heavy"), "in")
            .run(|| operation(runs.clone()))
            .await;
        assert!(matches!(again, Err(OnceError::NotStored)), "{again:?}");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(store.claim_count(), 0);
    assert_eq!(store.entry_count(), 1, "the not-stored marker");
}

proptest! {
    /// Guards: distinct part lists never compose to one key, and every key is valid.
    #[test]
    fn composed_keys_are_distinct_and_valid(
        a in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..80), 0..5),
        b in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..80), 0..5),
    ) {
        let (ka, kb) = (OnceKey::compose(&a), OnceKey::compose(&b));
        for key in [&ka, &kb] {
            let parsed = idem_runtime::IdempotencyKey::parse(key.as_str().as_bytes());
            prop_assert!(parsed.is_ok(), "{key:?} is not a valid key");
            let parsed = parsed.unwrap();
            prop_assert_eq!(parsed.as_str(), key.as_str());
        }
        if a != b {
            prop_assert_ne!(ka, kb);
        }
    }

    /// Guards: parts that differ only in where a separator falls give different keys.
    #[test]
    fn separators_inside_parts_never_join_two_lists(left in "[a-z:/]{0,10}", right in "[a-z:/]{0,10}", cut in 0usize..10) {
        let joined = format!("{left}{right}");
        let cut = cut.min(joined.len());
        let (x, y) = joined.split_at(cut);
        if (x, y) != (left.as_str(), right.as_str()) {
            prop_assert_ne!(OnceKey::compose([x, y]), OnceKey::compose([left.as_str(), right.as_str()]));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Edge cases that failed before their fixes.
// ---------------------------------------------------------------------------------------

/// An input whose JSON repeats a name: a field and a flattened map that holds the same
/// name (serde does not stop it).
#[derive(Serialize)]
struct Charge {
    amount: u64,
    #[serde(flatten)]
    extra: std::collections::BTreeMap<String, u64>,
}

/// Guards: an input whose JSON repeats a name is never taken for another input (KeyReused, not a replay).
#[tokio::test]
async fn inputs_with_repeated_names_are_not_mistaken_for_others() {
    let idem = Idempotency::in_memory();
    let key = OnceKey::compose(["attack", "repeated-names"]);
    let first = Charge {
        amount: 1,
        extra: [("amount".to_owned(), 500)].into_iter().collect(),
    };
    let other = Charge {
        amount: 500,
        extra: Default::default(),
    };
    assert_ne!(
        serde_json::to_string(&first).unwrap(),
        serde_json::to_string(&other).unwrap(),
        "two different inputs"
    );
    let ran = idem
        .once(key.clone(), &first)
        .run(|| async { Ok::<_, String>("charged for input 1".to_owned()) })
        .await
        .unwrap();
    assert_eq!(ran, "charged for input 1");
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    let second = idem
        .once(key, &other)
        .run_with_outcome(|| async move {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok::<_, String>("charged for input 2".to_owned())
        })
        .await;
    assert!(
        matches!(second, Err(OnceError::KeyReused)),
        "a different input under the same key got {second:?}"
    );
}

/// Guards: calls waiting for a run get its value, even with a ttl shorter than their poll interval (clamped to `Once::MIN_TTL`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_get_the_value_of_the_run_they_waited_for() {
    let idem = Idempotency::in_memory();
    let operation = Arc::new(Operation::default());
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let (idem, operation) = (idem.clone(), operation.clone());
            tokio::spawn(async move {
                idem.once(key("short-ttl"), "build 7")
                    .ttl(Duration::from_millis(100))
                    .run(|| operation.gated())
                    .await
            })
        })
        .collect();
    until(|| operation.runs() == 1).await;
    // The operation takes a while (as real ones do): the waiters' polls space out.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    operation.gate.notify_one();
    // Any re-run waits on the gate too: let each one end.
    let waker = tokio::spawn({
        let operation = operation.clone();
        async move {
            loop {
                operation.gate.notify_one();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let mut values = Vec::new();
    for call in calls {
        values.push(call.await.unwrap().unwrap());
    }
    waker.abort();
    assert_eq!(
        operation.runs(),
        1,
        "8 concurrent calls ran the operation {} times; values: {:?}",
        operation.runs(),
        values.iter().map(|v| v.id).collect::<Vec<_>>()
    );
}
