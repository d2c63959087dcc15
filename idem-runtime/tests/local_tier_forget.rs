//! Attacks on `forget_local` racing replays and completions, and on the local tier staying
//! useful beside forgets of other keys.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use bytes::Bytes;
use common::{Counters, Gate, app, as_client, post_with, send, test_builder, until};
use idem_runtime::store::{BoxFuture, Store, StoreError};
use idem_runtime::{Idempotency, IdempotencyKey, Scope, ScopedKey};

struct Entry {
    value: Bytes,
    until: Instant,
    completed: bool,
}

/// An in-memory store an operator can delete from by hand, with gates after a `begin`
/// that found a completed record and after a `complete` was applied.
#[derive(Default)]
struct HandStore {
    map: Mutex<HashMap<String, Entry>>,
    begins: AtomicUsize,
    completed_answer: Gate,
    after_complete: Gate,
    /// Delay of each begin's answer, in microseconds.
    delay_us: AtomicUsize,
}

impl HandStore {
    fn delete_completed(&self, key: &str) -> bool {
        let mut map = self.map.lock().unwrap();
        let now = Instant::now();
        if map.get(key).is_some_and(|e| e.completed && e.until > now) {
            map.remove(key);
            true
        } else {
            false
        }
    }
    fn has_completed(&self, key: &str) -> bool {
        let now = Instant::now();
        self.map
            .lock()
            .unwrap()
            .get(key)
            .is_some_and(|e| e.completed && e.until > now)
    }
    fn begins(&self) -> usize {
        self.begins.load(Ordering::SeqCst)
    }
}

struct Shared(Arc<HandStore>);

impl Store for Shared {
    fn begin<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        Box::pin(async move {
            let s = &self.0;
            let (found, completed) = {
                let mut map = s.map.lock().unwrap();
                let now = Instant::now();
                match map.get(key) {
                    Some(e) if e.until > now => (Some(e.value.clone()), e.completed),
                    _ => {
                        map.insert(
                            key.to_owned(),
                            Entry {
                                value: claim.clone(),
                                until: now + lease,
                                completed: false,
                            },
                        );
                        (None, false)
                    }
                }
            };
            s.begins.fetch_add(1, Ordering::SeqCst);
            let delay = s.delay_us.load(Ordering::SeqCst);
            if delay > 0 {
                tokio::time::sleep(Duration::from_micros(delay as u64)).await;
            }
            if completed {
                s.completed_answer.pass().await;
            }
            Ok(found)
        })
    }
    fn renew<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut map = self.0.map.lock().unwrap();
            let now = Instant::now();
            match map.get_mut(key) {
                Some(e) if e.until > now && e.value == *claim => {
                    e.until = now + lease;
                    Ok(true)
                }
                _ => Ok(false),
            }
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
            let done = {
                let mut map = self.0.map.lock().unwrap();
                let now = Instant::now();
                match map.get_mut(key) {
                    Some(e) if e.until > now && e.value == *claim => {
                        *e = Entry {
                            value: record,
                            until: now + ttl,
                            completed: true,
                        };
                        true
                    }
                    _ => false,
                }
            };
            self.0.after_complete.pass().await;
            Ok(done)
        })
    }
    fn release<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut map = self.0.map.lock().unwrap();
            if map.get(key).is_some_and(|e| e.value == *claim) {
                map.remove(key);
                Ok(true)
            } else {
                Ok(false)
            }
        })
    }
}

fn scoped(key: &str) -> ScopedKey {
    ScopedKey::new(
        Scope::anonymous(),
        IdempotencyKey::parse(key.as_bytes()).unwrap(),
    )
}

fn setup(
    max_age: Duration,
    wait: Option<Duration>,
) -> (Arc<HandStore>, Idempotency, axum::Router, Arc<Counters>) {
    let store = Arc::new(HandStore::default());
    let mut builder = test_builder(Idempotency::builder().store(Shared(store.clone())))
        .local_tier(1024 * 1024, max_age);
    if let Some(wait) = wait {
        builder = builder.wait_for_in_flight(wait);
    }
    let idem = builder.build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    (store, idem, app, counters)
}

/// Sends `request`, a replay that the store answers: the tier copies what the store read
/// (a first execution leaves no copy).
async fn copy_from_the_store(
    store: &HandStore,
    app: &axum::Router,
    request: axum::extract::Request,
) {
    let begins = store.begins();
    assert!(send(app, request).await.is_replay());
    assert_eq!(store.begins(), begins + 1, "the replay read the store");
}

fn run_of(answer: &common::Answer) -> usize {
    answer.headers["x-run"].to_str().unwrap().parse().unwrap()
}

/// Attack 1a: the first execution's completion is written, then the operator deletes the
/// record and forgets: no copy may survive. (A completion no longer copies its record to
/// the tier at all; this guards against that copy coming back without the forget check.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_racing_a_first_completion_leaves_no_copy() {
    let (store, idem, app, counters) = setup(Duration::from_secs(60), None);
    let key = scoped("c1");
    store.after_complete.close();
    let reached = store.after_complete.reached.notified();
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with("/pay", Some("c1"), "{}")).await }
    });
    reached.await;
    assert!(store.delete_completed(key.as_str()));
    idem.forget_local(&key);
    store.after_complete.open();
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    let after = send(&app, post_with("/pay", Some("c1"), "{}")).await;
    assert!(
        !after.is_replay(),
        "a deleted record was replayed from a copy kept after forget_local"
    );
    assert_eq!(counters.runs(), 2);
}

/// Attack 1b: a request waiting for a key in flight (`wait_for_in_flight`) reads the
/// completed record on a later turn of its loop; the operator deletes and forgets while
/// that answer is on its way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_racing_the_wait_for_in_flight_loop_leaves_no_copy() {
    let (store, idem, app, counters) =
        setup(Duration::from_secs(60), Some(Duration::from_secs(10)));
    let key = scoped("w1");
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with("/gated", Some("w1"), "")).await }
    });
    until(|| counters.runs() == 1).await;
    let begins = store.begins();
    let waiter = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with("/gated", Some("w1"), "")).await }
    });
    // The waiter saw the key in flight at least once.
    until(|| store.begins() > begins).await;
    store.completed_answer.close();
    let reached = store.completed_answer.reached.notified();
    counters.gate.notify_one();
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    reached.await;
    assert!(store.delete_completed(key.as_str()));
    idem.forget_local(&key);
    store.completed_answer.open();
    let waited = waiter.await.unwrap();
    assert!(
        waited.is_replay(),
        "answered from what it read: {:?}",
        waited.status
    );
    let after = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with("/gated", Some("w1"), "")).await }
    });
    until(|| counters.runs() >= 2 || after.is_finished()).await;
    counters.gate.notify_one();
    let after = after.await.unwrap();
    assert!(
        !after.is_replay(),
        "the deleted record was replayed from a copy kept after forget_local"
    );
    assert_eq!(counters.runs(), 2);
}

/// Attack 1c: many tasks replaying and re-running one key while the operator deletes
/// and forgets it again and again; right after each forget, a request is never answered
/// with a record that existed before the deletion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_replays_and_forgets_never_answer_a_deleted_record() {
    let (store, idem, app, counters) = setup(Duration::from_secs(60), None);
    let key = scoped("hot");
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let app = app.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let answer = send(&app, post_with("/pay", Some("hot"), "{}")).await;
                assert!(
                    matches!(answer.status, StatusCode::CREATED | StatusCode::CONFLICT),
                    "{:?}",
                    answer.status
                );
                tokio::task::yield_now().await;
            }
        }));
    }
    for round in 0..300 {
        until(|| store.has_completed(key.as_str())).await;
        let runs_before = counters.runs();
        if !store.delete_completed(key.as_str()) {
            continue;
        }
        idem.forget_local(&key);
        let check = send(&app, post_with("/pay", Some("hot"), "{}")).await;
        if check.status == StatusCode::CREATED && check.is_replay() {
            assert!(
                run_of(&check) > runs_before,
                "round {round}: run {} (deleted before the forget, runs were {runs_before}) replayed after forget_local",
                run_of(&check)
            );
        }
    }
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.unwrap();
    }
}

/// Attack 2a: a forget of another key while a replay's read is on its way costs that
/// replay its copy (the counter is global), but the next one must be kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forget_of_another_key_costs_at_most_one_store_read() {
    let (store, idem, app, counters) = setup(Duration::from_secs(60), None);
    let first = send(&app, post_with("/pay", Some("a"), "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    copy_from_the_store(&store, &app, post_with("/pay", Some("a"), "{}")).await;
    let begins = store.begins();
    assert!(
        send(&app, post_with("/pay", Some("a"), "{}"))
            .await
            .is_replay()
    );
    assert_eq!(store.begins(), begins, "the copy answers");
    idem.forget_local(&scoped("a"));
    store.completed_answer.close();
    let reached = store.completed_answer.reached.notified();
    let replay = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with("/pay", Some("a"), "{}")).await }
    });
    reached.await;
    idem.forget_local(&scoped("unrelated"));
    store.completed_answer.open();
    assert!(replay.await.unwrap().is_replay());
    assert!(
        send(&app, post_with("/pay", Some("a"), "{}"))
            .await
            .is_replay()
    );
    let begins = store.begins();
    for _ in 0..5 {
        let again = send(&app, post_with("/pay", Some("a"), "{}")).await;
        assert!(again.is_replay());
        assert_eq!(again.body, first.body);
    }
    assert_eq!(
        store.begins(),
        begins,
        "copies of `a` kept again after the unrelated forget"
    );
    assert_eq!(counters.runs(), 1);
}

/// Attack 2b: an operator cleaning up other keys at a steady pace (one forget a
/// millisecond) while the store answers in 2 ms: a copy of an untouched key should still
/// be kept at some point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_forgets_of_other_keys_do_not_disable_the_tier() {
    let (store, idem, app, _counters) = setup(Duration::from_secs(60), None);
    assert_eq!(
        send(&app, post_with("/pay", Some("steady"), "{}"))
            .await
            .status,
        StatusCode::CREATED
    );
    idem.forget_local(&scoped("steady"));
    store.delay_us.store(2000, Ordering::SeqCst);
    let stop = Arc::new(AtomicBool::new(false));
    let cleaner = tokio::spawn({
        let idem = idem.clone();
        let stop = stop.clone();
        async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                idem.forget_local(&scoped(&format!("other-{n}")));
                n += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    });
    let mut store_reads = 0;
    let mut local = false;
    for _ in 0..100 {
        let begins = store.begins();
        assert!(
            send(&app, post_with("/pay", Some("steady"), "{}"))
                .await
                .is_replay()
        );
        if store.begins() == begins {
            local = true;
            break;
        }
        store_reads += 1;
    }
    stop.store(true, Ordering::SeqCst);
    cleaner.await.unwrap();
    assert!(
        local,
        "{store_reads} replays of an untouched key all read the store: forgets of other keys kept every copy out"
    );
}

/// Attack 2c: no copy answered past its record's expiry, nor past `max_age`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_end_with_their_record_and_max_age() {
    let (store, _idem, app, counters) = setup(Duration::from_secs(60), None);
    let first = send(&app, post_with("/short", Some("exp"), "")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    copy_from_the_store(&store, &app, post_with("/short", Some("exp"), "")).await;
    let begins = store.begins();
    assert!(
        send(&app, post_with("/short", Some("exp"), ""))
            .await
            .is_replay()
    );
    assert_eq!(store.begins(), begins, "served locally");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let after = send(&app, post_with("/short", Some("exp"), "")).await;
    assert!(
        !after.is_replay(),
        "a copy answered after its record expired"
    );
    assert_eq!(counters.runs(), 2);

    let (store, _idem, app, _counters) = setup(Duration::from_millis(150), None);
    assert_eq!(
        send(&app, post_with("/pay", Some("age"), "{}"))
            .await
            .status,
        StatusCode::CREATED
    );
    copy_from_the_store(&store, &app, post_with("/pay", Some("age"), "{}")).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    let begins = store.begins();
    assert!(
        send(&app, post_with("/pay", Some("age"), "{}"))
            .await
            .is_replay()
    );
    assert_eq!(store.begins(), begins + 1, "a copy answered past max_age");
}

/// Attack 3: two clients with one key each get their own response, also once their
/// copies sit in the tier, and a forget of one scope's key leaves the other's copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_are_not_crossed_by_the_tier() {
    let (store, idem, app, counters) = setup(Duration::from_secs(60), None);
    let a = send(&app, as_client("token-a", "same", "{}")).await;
    let b = send(&app, as_client("token-b", "same", "{}")).await;
    assert_eq!(a.status, StatusCode::CREATED);
    assert_eq!(b.status, StatusCode::CREATED);
    assert!(!b.is_replay(), "client b got client a's response");
    assert_ne!(a.body, b.body);
    assert_eq!(counters.runs(), 2);
    copy_from_the_store(&store, &app, as_client("token-a", "same", "{}")).await;
    copy_from_the_store(&store, &app, as_client("token-b", "same", "{}")).await;
    let begins = store.begins();
    for _ in 0..3 {
        assert_eq!(
            send(&app, as_client("token-a", "same", "{}")).await.body,
            a.body
        );
        assert_eq!(
            send(&app, as_client("token-b", "same", "{}")).await.body,
            b.body
        );
    }
    assert_eq!(store.begins(), begins, "both served locally");
    // The anonymous (shared) scope's key is another key again.
    idem.forget_local(&scoped("same"));
    let anon = send(&app, post_with("/pay", Some("same"), "{}")).await;
    assert!(!anon.is_replay());
    assert_eq!(
        send(&app, as_client("token-a", "same", "{}")).await.body,
        a.body
    );
    assert_eq!(store.begins(), begins + 1);
}
