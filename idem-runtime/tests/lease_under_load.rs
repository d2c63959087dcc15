//! Lease renewal under load and failure: long concurrent claims, detached work, a retried
//! completion, the shutdown wait racing the last execution, short-lived and per-core
//! runtimes, a lost lease.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use idem_runtime::once::{OnceError, Outcome};
use idem_runtime::store::{BoxFuture, MemoryStore, Store, StoreError};
use idem_runtime::{Idempotency, OnceKey};
use tokio::runtime::Runtime;

const LEASE: Duration = Duration::from_millis(100);

fn multi(workers: usize) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap()
}

fn current() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn key(name: &str) -> OnceKey {
    OnceKey::compose(["lease-load", name])
}

/// A retry now must find `name` in flight.
async fn assert_in_flight(idem: &Idempotency, name: &str) {
    let retry = idem
        .once(key(name), "in")
        .wait(Duration::ZERO)
        .run(|| async { Ok::<u32, String>(99) });
    let retry = tokio::time::timeout(Duration::from_secs(5), retry).await;
    assert!(
        matches!(retry, Ok(Err(OnceError::InFlight))),
        "{name}: the key is still held: {retry:?}"
    );
}

/// Guards: Many long claims at once on a multi-thread runtime, some in spawned tasks, some in
/// the block_on future itself: every key stays held for 8 leases and runs once.
#[test]
fn many_long_claims_on_a_multi_thread_runtime_run_once() {
    let rt = multi(2);
    let idem = rt.block_on(async {
        common::test_builder(Idempotency::builder())
            .lease(LEASE)
            .build()
    });
    let runs = Arc::new(AtomicUsize::new(0));
    let work = |runs: Arc<AtomicUsize>| {
        move || async move {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(LEASE * 8).await;
            Ok::<u32, String>(7)
        }
    };
    rt.block_on(async {
        let mut spawned = Vec::new();
        for i in 0..60 {
            let (idem, w) = (idem.clone(), work(runs.clone()));
            spawned.push(tokio::spawn(async move {
                idem.once(key(&format!("s{i}")), "in").run(w).await
            }));
        }
        let direct = async {
            let a = idem.once(key("d0"), "in").run(work(runs.clone()));
            let b = idem.once(key("d1"), "in").run(work(runs.clone()));
            let c = idem.once(key("d2"), "in").run(work(runs.clone()));
            tokio::join!(a, b, c)
        };
        let checks = async {
            common::until(|| runs.load(Ordering::SeqCst) == 63).await;
            tokio::time::sleep(LEASE * 4).await;
            for i in 0..60 {
                assert_in_flight(&idem, &format!("s{i}")).await;
            }
            for i in 0..3 {
                assert_in_flight(&idem, &format!("d{i}")).await;
            }
        };
        let (direct, ()) = tokio::join!(direct, checks);
        assert_eq!(direct.0.unwrap(), 7);
        for handle in spawned {
            assert_eq!(handle.await.unwrap().unwrap(), 7);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 63, "each key ran once");
    });
}

/// Guards: A caller that goes away (its task aborted): the work runs on, detached, its key held
/// the whole time, and its result stored for a retry.
#[test]
fn detached_work_keeps_its_key_and_stores_its_result() {
    let rt = multi(2);
    let idem = rt.block_on(async {
        common::test_builder(Idempotency::builder())
            .lease(LEASE)
            .build()
    });
    let runs = Arc::new(AtomicUsize::new(0));
    rt.block_on(async {
        let caller = tokio::spawn({
            let (idem, runs) = (idem.clone(), runs.clone());
            async move {
                idem.once(key("detached"), "in")
                    .run(|| async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(LEASE * 7).await;
                        Ok::<u32, String>(5)
                    })
                    .await
            }
        });
        common::until(|| runs.load(Ordering::SeqCst) == 1).await;
        caller.abort();
        tokio::time::sleep(LEASE * 4).await;
        assert_in_flight(&idem, "detached").await;
        tokio::time::sleep(LEASE * 5).await;
        let replay = idem
            .once(key("detached"), "in")
            .run_with_outcome(|| async { Ok::<u32, String>(99) })
            .await;
        assert_eq!(replay.unwrap(), Outcome::Replayed(5));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    });
}

/// A memory store whose `complete` fails while `failing` is set, `fails_after` after it
/// was called.
struct FailingCompletes {
    inner: MemoryStore,
    failing: Arc<AtomicBool>,
    fails_after: Duration,
}

impl Store for FailingCompletes {
    fn begin<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        self.inner.begin(key, claim, lease)
    }
    fn renew<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.inner.renew(key, claim, lease)
    }
    fn complete<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        record: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        if self.failing.load(Ordering::SeqCst) {
            let fails_after = self.fails_after;
            return Box::pin(async move {
                tokio::time::sleep(fails_after).await;
                Err(StoreError::backend(std::io::Error::other("down")))
            });
        }
        self.inner.complete(key, claim, record, ttl)
    }
    fn release<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.inner.release(key, claim)
    }
}

/// Guards: A completion retried after a store failure keeps the key held (renewed) until it is
/// stored, and a shutdown waits for it.
#[test]
fn a_completion_retried_keeps_its_key_and_is_waited_for() {
    a_completion_retried_is_stored_once_the_store_takes_it(Duration::ZERO);
}

/// Guards: a completion that fails slowly, while the lease's renewals land, is retried
/// like any other: the store being down for completes is no refusal of the record, so
/// the result is stored and replayed once the store takes it, not recorded as "not
/// stored".
#[test]
fn a_completion_failing_while_renewals_land_is_stored_once_the_store_takes_it() {
    a_completion_retried_is_stored_once_the_store_takes_it(LEASE / 2);
}

fn a_completion_retried_is_stored_once_the_store_takes_it(fails_after: Duration) {
    let rt = multi(2);
    let failing = Arc::new(AtomicBool::new(true));
    let idem = rt.block_on(async {
        let store: Arc<dyn Store> = Arc::new(FailingCompletes {
            inner: MemoryStore::new(),
            failing: failing.clone(),
            fails_after,
        });
        common::test_builder(Idempotency::builder().shared_store(store))
            .lease(LEASE)
            .build()
    });
    let runs = Arc::new(AtomicUsize::new(0));
    rt.block_on(async {
        let first = {
            let runs = runs.clone();
            idem.once(key("retried"), "in")
                .run(|| async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<u32, String>(3)
                })
                .await
        };
        // The completion failed; what the caller got is beside the point.
        let _ = first;
        tokio::time::sleep(LEASE * 6).await;
        assert_in_flight(&idem, "retried").await;
        let shutdown = tokio::spawn({
            let idem = idem.clone();
            async move { idem.shutdown(Duration::from_secs(10)).await }
        });
        tokio::time::sleep(LEASE * 2).await;
        assert!(
            !shutdown.is_finished(),
            "shutdown waits for the retried completion"
        );
        failing.store(false, Ordering::SeqCst);
        let started = Instant::now();
        assert_eq!(shutdown.await.unwrap(), 0);
        assert!(started.elapsed() < Duration::from_secs(5));
        let replay = idem
            .once(key("retried"), "in")
            .run_with_outcome(|| async { Ok::<u32, String>(99) })
            .await;
        assert_eq!(replay.unwrap(), Outcome::Replayed(3));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    });
}

/// Guards: The shutdown wait returns as soon as the last execution ends, however close to the
/// count read it ends.
#[test]
fn shutdown_returns_when_the_last_execution_ends_even_racing_it() {
    let rt = multi(2);
    let idem = rt.block_on(async {
        common::test_builder(Idempotency::builder())
            .lease(LEASE)
            .build()
    });
    rt.block_on(async {
        for i in 0..300u64 {
            let work = tokio::spawn({
                let idem = idem.clone();
                async move {
                    idem.once(key(&format!("race{i}")), "in")
                        .run(move || async move {
                            // Ends right about when the shutdown reads the count.
                            for _ in 0..(i % 7) {
                                tokio::task::yield_now().await;
                            }
                            Ok::<u64, String>(i)
                        })
                        .await
                }
            });
            for _ in 0..(i % 5) {
                tokio::task::yield_now().await;
            }
            let started = Instant::now();
            let left = idem.shutdown(Duration::from_secs(3)).await;
            assert_eq!(left, 0, "iteration {i}");
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "iteration {i}: the shutdown wait took {:?}",
                started.elapsed()
            );
            work.await.unwrap().unwrap();
        }
    });
}

/// Guards: A handle shared by 200 short-lived current-thread runtimes, each making one quick
/// claim: a long claim afterwards, on a fresh current-thread runtime and on a
/// multi-thread one, is still renewed.
#[test]
fn many_short_lived_runtimes_leave_later_claims_renewed() {
    let idem = current().block_on(async {
        common::test_builder(Idempotency::builder())
            .lease(LEASE)
            .build()
    });
    for i in 0..200 {
        let rt = current();
        let quick = rt.block_on(
            idem.once(key(&format!("quick{i}")), "in")
                .run(|| async { Ok::<u32, String>(1) }),
        );
        assert_eq!(quick.unwrap(), 1);
        drop(rt);
    }
    for rt in [current(), multi(1)] {
        rt.block_on(async {
            let name = format!("long-after-{:?}", tokio::runtime::Handle::current().id());
            let runs = Arc::new(AtomicUsize::new(0));
            let long = {
                let runs = runs.clone();
                idem.once(key(&name), "in").run(|| async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(LEASE * 8).await;
                    Ok::<u32, String>(2)
                })
            };
            let check = async {
                common::until(|| runs.load(Ordering::SeqCst) == 1).await;
                tokio::time::sleep(LEASE * 4).await;
                assert_in_flight(&idem, &name).await;
            };
            let (long, ()) = tokio::join!(long, check);
            assert_eq!(long.unwrap(), 2);
        });
    }
}

/// Guards: The same on a multi-thread runtime, one per claim, each dropped right after.
#[test]
fn many_short_lived_multi_thread_runtimes_leave_later_claims_renewed() {
    let idem = current().block_on(async {
        common::test_builder(Idempotency::builder())
            .lease(LEASE)
            .build()
    });
    for i in 0..50 {
        let rt = multi(1);
        let quick = rt.block_on(
            idem.once(key(&format!("mquick{i}")), "in")
                .run(|| async { Ok::<u32, String>(1) }),
        );
        assert_eq!(quick.unwrap(), 1);
        drop(rt);
    }
    let rt = multi(2);
    rt.block_on(async {
        let runs = Arc::new(AtomicUsize::new(0));
        let long = {
            let runs = runs.clone();
            idem.once(key("mlong"), "in").run(|| async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(LEASE * 8).await;
                Ok::<u32, String>(2)
            })
        };
        let check = async {
            common::until(|| runs.load(Ordering::SeqCst) == 1).await;
            tokio::time::sleep(LEASE * 4).await;
            assert_in_flight(&idem, "mlong").await;
        };
        let (long, ()) = tokio::join!(long, check);
        assert_eq!(long.unwrap(), 2);
    });
}

/// A memory store that, on a renewal, lets the claim go and says so: the lease is lost.
struct LosesLeases(MemoryStore);

impl Store for LosesLeases {
    fn begin<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        self.0.begin(key, claim, lease)
    }
    fn renew<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        _: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            self.0.release(key, claim).await?;
            Ok(false)
        })
    }
    fn complete<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        record: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.0.complete(key, claim, record, ttl)
    }
    fn release<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.0.release(key, claim)
    }
}

/// Guards: A lease the store says is gone: the work's result is not stored, and a later call
/// (here, one that overlaps the lost work) is the one whose result is kept.
#[test]
fn a_lost_lease_keeps_the_result_from_being_stored() {
    for rt in [current(), multi(2)] {
        let idem = rt.block_on(async {
            let store: Arc<dyn Store> = Arc::new(LosesLeases(MemoryStore::new()));
            common::test_builder(Idempotency::builder().shared_store(store))
                .lease(LEASE)
                .build()
        });
        rt.block_on(async {
            let first = tokio::spawn({
                let idem = idem.clone();
                async move {
                    idem.once(key("lost"), "in")
                        .run(|| async {
                            tokio::time::sleep(LEASE * 4).await;
                            Ok::<u32, String>(1)
                        })
                        .await
                }
            });
            tokio::time::sleep(LEASE).await;
            let second = idem
                .once(key("lost"), "in")
                .wait(Duration::ZERO)
                .run(|| async { Ok::<u32, String>(2) })
                .await;
            assert_eq!(second.unwrap(), 2, "the lost key was free to take");
            // The caller still gets what its work returned; the store keeps the other.
            assert_eq!(first.await.unwrap().unwrap(), 1);
            let replay = idem
                .once(key("lost"), "in")
                .run_with_outcome(|| async { Ok::<u32, String>(3) })
                .await;
            assert_eq!(replay.unwrap(), Outcome::Replayed(2));
        });
    }
}

/// Guards: Eight threads, each with a current-thread runtime of its own, sharing one handle and
/// each running long claims in spawned tasks and in its block_on future at once.
#[test]
fn thread_per_core_runtimes_each_renew_their_claims() {
    let idem = current().block_on(async {
        common::test_builder(Idempotency::builder())
            .lease(LEASE)
            .build()
    });
    let runs = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (idem, runs) = (idem.clone(), runs.clone());
            std::thread::spawn(move || {
                let rt = current();
                rt.block_on(async {
                    let mut tasks = Vec::new();
                    for i in 0..5 {
                        let (idem, runs) = (idem.clone(), runs.clone());
                        tasks.push(tokio::spawn(async move {
                            idem.once(key(&format!("t{t}-{i}")), "in")
                                .run(|| async move {
                                    runs.fetch_add(1, Ordering::SeqCst);
                                    tokio::time::sleep(LEASE * 8).await;
                                    Ok::<u32, String>(1)
                                })
                                .await
                        }));
                    }
                    let direct = idem.once(key(&format!("t{t}-direct")), "in").run(|| {
                        let runs = runs.clone();
                        async move {
                            runs.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(LEASE * 8).await;
                            Ok::<u32, String>(1)
                        }
                    });
                    let check = async {
                        tokio::time::sleep(LEASE * 5).await;
                        for i in 0..5 {
                            assert_in_flight(&idem, &format!("t{t}-{i}")).await;
                        }
                        assert_in_flight(&idem, &format!("t{t}-direct")).await;
                    };
                    let (direct, ()) = tokio::join!(direct, check);
                    direct.unwrap();
                    for task in tasks {
                        task.await.unwrap().unwrap();
                    }
                });
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    assert_eq!(runs.load(Ordering::SeqCst), 48);
}

/// Guards: what `once`'s docs advise for a runtime made for a few calls. The first
/// call's completion fails and is retried in a task on that runtime; `shutdown` awaited
/// on it before it is dropped returns once the retry stored the result, and a call on a
/// later runtime, past the lease, is answered from it.
#[test]
fn a_completion_retried_on_a_runtime_made_for_one_call_is_stored_before_shutdown_returns() {
    let failing = Arc::new(AtomicBool::new(true));
    let store: Arc<dyn Store> = Arc::new(FailingCompletes {
        inner: MemoryStore::new(),
        failing: failing.clone(),
        fails_after: Duration::ZERO,
    });
    let idem = current().block_on(async {
        common::test_builder(Idempotency::builder().shared_store(store))
            .lease(LEASE)
            .build()
    });
    let runs = Arc::new(AtomicUsize::new(0));
    let rt = current();
    let first = rt.block_on({
        let runs = runs.clone();
        idem.once(key("one-call-runtime"), "in")
            .run_with_outcome(move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<u32, String>(5)
            })
    });
    assert_eq!(first.unwrap(), Outcome::Ran(5));
    failing.store(false, Ordering::SeqCst);
    assert_eq!(rt.block_on(idem.shutdown(Duration::from_secs(10))), 0);
    drop(rt);
    // Past the lease: only a stored result answers now.
    std::thread::sleep(LEASE * 2);
    let again = current().block_on(
        idem.once(key("one-call-runtime"), "in")
            .run_with_outcome(|| async { Ok::<u32, String>(99) }),
    );
    assert_eq!(again.unwrap(), Outcome::Replayed(5));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
