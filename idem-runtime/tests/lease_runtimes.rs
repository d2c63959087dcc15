//! Lease renewals with a handle shared by several runtimes: each claim is renewed on the
//! runtime that runs its work, whatever the others do.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use idem_runtime::once::{OnceError, Outcome};
use idem_runtime::store::{BoxFuture, MemoryStore, Store, StoreError};
use idem_runtime::{Idempotency, OnceKey};
use tokio::runtime::Runtime;
use tokio::sync::Notify;

fn multi() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// Runs a long work on `busy` under `key`, waits past several leases, and checks that a
/// retry finds the key in flight and that the work ran once.
fn long_work_keeps_its_key(busy: &Runtime, idem: &Idempotency, key: &'static str, lease: Duration) {
    let runs = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Notify::new());
    let gated = {
        let (runs, gate) = (runs.clone(), gate.clone());
        move || async move {
            runs.fetch_add(1, Ordering::SeqCst);
            gate.notified().await;
            Ok::<u32, String>(7)
        }
    };
    let held = busy.spawn({
        let (idem, gated) = (idem.clone(), gated.clone());
        async move {
            idem.once(OnceKey::compose(["lease-runtimes", key]), "in")
                .run_with_outcome(gated)
                .await
        }
    });
    busy.block_on(common::until(|| runs.load(Ordering::SeqCst) == 1));
    busy.block_on(async {
        tokio::time::sleep(lease * 4).await;
        let retry = idem
            .once(OnceKey::compose(["lease-runtimes", key]), "in")
            .wait(Duration::ZERO)
            .run(gated);
        let retry = tokio::time::timeout(Duration::from_secs(5), retry).await;
        let ran = runs.load(Ordering::SeqCst);
        gate.notify_waiters();
        gate.notify_one();
        assert!(
            matches!(retry, Ok(Err(OnceError::InFlight))),
            "the key is still held: {retry:?}"
        );
        assert_eq!(ran, 1, "the work ran once");
        assert_eq!(held.await.unwrap().unwrap(), Outcome::Ran(7));
    });
}

/// Guards: a claim's lease is renewed for as long as its work runs. A handle used first
/// from a current-thread runtime (a `block_on` at start-up, a
/// `#[tokio::test]`, one worker of a thread-per-core server) that is then left idle, not
/// dropped: a later claim on another runtime must still be renewed.
#[test]
fn an_idle_runtime_that_made_the_first_claim_leaves_later_claims_renewed() {
    let lease = Duration::from_millis(300);
    let idle = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let busy = multi();
    let idem = busy.block_on(async {
        common::test_builder(Idempotency::builder())
            .lease(lease)
            .build()
    });
    // A quick call, done before the block_on returns.
    let quick = idle.block_on(
        idem.once(OnceKey::compose(["lease-runtimes", "quick"]), "in")
            .run(|| async { Ok::<u32, String>(1) }),
    );
    assert_eq!(quick.unwrap(), 1);

    long_work_keeps_its_key(&busy, &idem, "idle-first", lease);
    drop(idle);
}

/// A memory store whose renewals of keys containing `slow` take `delay` to answer.
struct SlowRenewals {
    inner: Arc<dyn Store>,
    delay: Duration,
    slow_pending: Arc<AtomicUsize>,
}

impl Store for SlowRenewals {
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
        Box::pin(async move {
            if key.contains("slow") {
                self.slow_pending.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(self.delay).await;
                self.slow_pending.fetch_sub(1, Ordering::SeqCst);
            }
            self.inner.renew(key, claim, lease).await
        })
    }
    fn complete<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        record: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
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

/// Guards: a claim's lease is renewed for as long as its work runs. A runtime that shuts
/// down while a renewal of another runtime's claim is under way (the store answers
/// renewals in 60 ms of a 300 ms lease): that claim goes on being renewed.
#[test]
fn a_runtime_shutting_down_mid_renewal_leaves_the_claims_of_another_renewed() {
    let lease = Duration::from_millis(300);
    let first = multi();
    let busy = multi();
    let slow_pending = Arc::new(AtomicUsize::new(0));
    let idem = busy.block_on(async {
        let store: Arc<dyn Store> = Arc::new(SlowRenewals {
            inner: Arc::new(MemoryStore::new()),
            delay: Duration::from_millis(60),
            slow_pending: slow_pending.clone(),
        });
        common::test_builder(Idempotency::builder().shared_store(store))
            .lease(lease)
            .build()
    });
    let first_started = Arc::new(AtomicUsize::new(0));
    first.spawn({
        let (idem, started) = (idem.clone(), first_started.clone());
        async move {
            idem.once(OnceKey::compose(["lease-runtimes", "first"]), "in")
                .run(|| async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    std::future::pending::<Result<u32, String>>().await
                })
                .await
        }
    });
    busy.block_on(common::until(|| first_started.load(Ordering::SeqCst) == 1));

    let runs = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Notify::new());
    let gated = {
        let (runs, gate) = (runs.clone(), gate.clone());
        move || async move {
            runs.fetch_add(1, Ordering::SeqCst);
            gate.notified().await;
            Ok::<u32, String>(7)
        }
    };
    let held = busy.spawn({
        let (idem, gated) = (idem.clone(), gated.clone());
        async move {
            idem.once(OnceKey::compose(["lease-runtimes", "slow"]), "in")
                .run_with_outcome(gated)
                .await
        }
    });
    busy.block_on(common::until(|| runs.load(Ordering::SeqCst) == 1));
    // Shut the first runtime down while a renewal of the slow claim runs on it.
    busy.block_on(common::until(|| slow_pending.load(Ordering::SeqCst) > 0));
    drop(first);

    busy.block_on(async {
        tokio::time::sleep(lease * 4).await;
        let retry = idem
            .once(OnceKey::compose(["lease-runtimes", "slow"]), "in")
            .wait(Duration::ZERO)
            .run(gated);
        let retry = tokio::time::timeout(Duration::from_secs(5), retry).await;
        let ran = runs.load(Ordering::SeqCst);
        gate.notify_waiters();
        gate.notify_one();
        assert!(
            matches!(retry, Ok(Err(OnceError::InFlight))),
            "the key is still held: {retry:?}"
        );
        assert_eq!(ran, 1, "the work ran once");
        assert_eq!(held.await.unwrap().unwrap(), Outcome::Ran(7));
    });
}
