//! The local tier: replays served from process memory, correct across instances.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use common::{Backend, Counters, app, post_with, send};
use testkit::{Monitor, RedisServer, keys_under, redis_connection};

/// Guards: with the local tier, a first execution leaves no copy (the instance's first
/// replay reads the shared store once); later replays and a 422 on the completed key cost
/// no store round trip; another instance's first replay reads the store once, then serves
/// locally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_skip_the_store() {
    let server = RedisServer::start();
    let backend = Backend::redis_at(&server.url(), "local-tier");
    let instance = |backend: Backend| async move {
        backend
            .builder()
            .await
            .local_tier(16 * 1024 * 1024, Duration::from_secs(60))
            .build()
    };
    let counters = Arc::new(Counters::default());
    let first_app = app(&instance(backend.clone()).await, counters.clone());
    let second_app = app(&instance(backend.clone()).await, counters.clone());
    let mut admin = redis_connection(&server.url()).await;
    let monitor = Monitor::start(server.port());
    monitor.client_commands(&mut admin).await;

    let first = send(&first_app, post_with("/pay", Some("local"), "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(
        monitor.client_commands(&mut admin).await,
        ["set", "evalsha"]
    );

    let replay = send(&first_app, post_with("/pay", Some("local"), "{}")).await;
    assert!(replay.is_replay());
    assert_eq!(replay.body, first.body);
    assert_eq!(
        monitor.client_commands(&mut admin).await,
        ["set"],
        "the first execution left no copy: its first replay read the store once"
    );
    for _ in 0..3 {
        let replay = send(&first_app, post_with("/pay", Some("local"), "{}")).await;
        assert!(replay.is_replay());
        assert_eq!(replay.body, first.body);
    }
    let reused = send(&first_app, post_with("/pay", Some("local"), "{\"x\":1}")).await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        monitor.client_commands(&mut admin).await,
        Vec::<String>::new(),
        "later replays and the 422 were answered locally"
    );

    let elsewhere = send(&second_app, post_with("/pay", Some("local"), "{}")).await;
    assert!(elsewhere.is_replay());
    assert_eq!(elsewhere.body, first.body);
    let again = send(&second_app, post_with("/pay", Some("local"), "{}")).await;
    assert!(again.is_replay());
    assert_eq!(
        monitor.client_commands(&mut admin).await,
        ["set"],
        "the second instance read the shared store once"
    );
    assert_eq!(counters.runs(), 1);
}

/// Guards: a local copy is dropped when its record expires, so the key runs afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_copies_expire_with_the_record() {
    for backend in [Backend::memory(), Backend::redis("local-expiry")] {
        let idem = backend
            .builder()
            .await
            .local_tier(1024 * 1024, Duration::from_secs(60))
            .build();
        let counters = Arc::new(Counters::default());
        let app = app(&idem, counters.clone());
        assert_eq!(
            send(&app, post_with("/short", Some("t"), "")).await.body,
            "run 1"
        );
        assert!(
            send(&app, post_with("/short", Some("t"), ""))
                .await
                .is_replay()
        );
        tokio::time::sleep(Duration::from_millis(1300)).await;
        let fresh = send(&app, post_with("/short", Some("t"), "")).await;
        assert!(!fresh.is_replay());
        assert_eq!(fresh.body, "run 2");
    }
}

/// Guards: a record deleted by hand from Redis stops being replayed locally within
/// `max_age`, and at once after `forget_local`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_eviction_takes_effect_within_max_age() {
    let backend = Backend::redis("local-evict");
    let idem = backend
        .builder()
        .await
        .local_tier(1024 * 1024, Duration::from_millis(400))
        .build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let Backend::Redis { url, prefix } = &backend else {
        unreachable!()
    };
    let mut connection = redis_connection(url).await;
    let delete_all = async |connection: &mut redis::aio::MultiplexedConnection| {
        for key in keys_under(connection, prefix).await {
            let _: i64 = redis::cmd("DEL")
                .arg(key)
                .query_async(connection)
                .await
                .unwrap();
        }
    };

    assert_eq!(
        send(&app, post_with("/pay", Some("e"), "{}")).await.status,
        StatusCode::CREATED
    );
    // Read from the store, the record is copied to the local tier.
    assert!(
        send(&app, post_with("/pay", Some("e"), "{}"))
            .await
            .is_replay()
    );
    delete_all(&mut connection).await;
    assert!(
        send(&app, post_with("/pay", Some("e"), "{}"))
            .await
            .is_replay(),
        "the local copy still answers"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rerun = send(&app, post_with("/pay", Some("e"), "{}")).await;
    assert!(!rerun.is_replay(), "after max_age the deletion is seen");
    assert_eq!(counters.runs(), 2);
    assert!(
        send(&app, post_with("/pay", Some("e"), "{}"))
            .await
            .is_replay(),
        "copied again from the store"
    );

    delete_all(&mut connection).await;
    let key = idem_runtime::ScopedKey::new(
        idem_runtime::Scope::anonymous(),
        idem_runtime::IdempotencyKey::parse(b"e").unwrap(),
    );
    idem.forget_local(&key);
    let rerun = send(&app, post_with("/pay", Some("e"), "{}")).await;
    assert!(!rerun.is_replay(), "forget_local drops the copy at once");
    assert_eq!(counters.runs(), 3);
}

/// Guards (a defect once shown): a retry whose store read found the record before an
/// operator deleted it and called `forget_local`, and which copied it to the local tier
/// after, restored the copy: the deleted record was replayed from it for up to `max_age`.
/// Held: that retry is answered from what it read, keeps no copy, and the next request
/// sees the deletion and runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_local_racing_a_replay_leaves_no_copy() {
    use common::{Gated, Gates};
    use idem_runtime::Idempotency;
    use idem_runtime::store::RedisStore;

    let url = testkit::shared_redis_url();
    let prefix = testkit::unique_prefix("local-race");
    let store = RedisStore::builder(url.as_str())
        .prefix(prefix.as_str())
        .connect()
        .await
        .unwrap_or_else(|error| panic!("Redis at {url} must be running: {error}"));
    let gates = Arc::new(Gates::default());
    let idem = common::test_builder(
        Idempotency::builder().store(Gated::new(Arc::new(store), gates.clone())),
    )
    .local_tier(1024 * 1024, Duration::from_secs(60))
    .build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let key = idem_runtime::ScopedKey::new(
        idem_runtime::Scope::anonymous(),
        idem_runtime::IdempotencyKey::parse(b"race").unwrap(),
    );
    let mut connection = redis_connection(&url).await;

    let first = send(&app, post_with("/pay", Some("race"), "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    // The completion's own copy goes; the next request reads the record from Redis.
    idem.forget_local(&key);
    gates.answer.close();
    let answered = gates.answer.reached.notified();
    let retry = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with("/pay", Some("race"), "{}")).await }
    });
    answered.await;
    // The operator deletes the record and drops this instance's copy, while the retry's
    // answer (the record) is on its way.
    for stored in keys_under(&mut connection, &prefix).await {
        let _: i64 = redis::cmd("DEL")
            .arg(stored)
            .query_async(&mut connection)
            .await
            .unwrap();
    }
    idem.forget_local(&key);
    gates.answer.open();
    assert!(
        retry.await.unwrap().is_replay(),
        "answered from what it read"
    );

    let after = send(&app, post_with("/pay", Some("race"), "{}")).await;
    assert!(
        !after.is_replay(),
        "the deleted record was replayed from a copy kept after forget_local"
    );
    assert_eq!(after.status, StatusCode::CREATED);
    assert_eq!(counters.runs(), 2);
}
