//! Real failures: a killed Redis, a dropped connection; and store round trips counted on
//! a private Redis server.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::http::{StatusCode, header};
use common::{Backend, Counters, app, eventually, post_with, send};
use idem_runtime::store::StoreError;
use idem_runtime::{Idempotency, Problem};
use testkit::{Monitor, RedisServer, redis_connection};
use tokio::io::AsyncWriteExt;

/// Guards the round-trip floor: 1 for a replay, a 422 and a 409; 2 for a first execution.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_round_trips_are_the_floor() {
    let server = RedisServer::start();
    let backend = Backend::redis_at(&server.url(), "round-trips");
    let idem = backend.builder().await.build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let mut admin = redis_connection(&server.url()).await;
    let monitor = Monitor::start(server.port());
    monitor.client_commands(&mut admin).await;

    // Round trips are the commands the store sends, as the server's MONITOR sees them
    // (commands run inside a Lua script are not round trips and are left out).
    let mut measure = async |request: Option<axum::extract::Request>| {
        let answer = match request {
            Some(request) => Some(send(&app, request).await),
            None => None,
        };
        let calls = monitor.client_commands(&mut admin).await;
        (answer.unwrap_or_else(common::Answer::empty), calls)
    };

    let (first, calls) = measure(Some(post_with("/pay", Some("rt"), "{}"))).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(calls, ["set", "evalsha"], "first execution");

    let (replay, calls) = measure(Some(post_with("/pay", Some("rt"), "{}"))).await;
    assert!(replay.is_replay());
    assert_eq!(calls, ["set"], "replay");

    let (reused, calls) = measure(Some(post_with("/pay", Some("rt"), "{\"x\":1}"))).await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(calls, ["set"], "422");

    let gated = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with("/gated", Some("gate"), "")).await }
    });
    assert!(
        eventually(Duration::from_secs(5), || counters.runs() == 2).await,
        "the gated handler started"
    );
    let (_, before) = measure(None).await;
    assert_eq!(before, ["set"], "the gated request claimed its key");
    let (busy, calls) = measure(Some(post_with("/gated", Some("gate"), ""))).await;
    assert_eq!(busy.status, StatusCode::CONFLICT);
    assert_eq!(calls, ["set"], "409");
    counters.gate.notify_one();
    assert_eq!(
        gated.await.expect("gated request").status,
        StatusCode::CREATED
    );
}

/// Guards: with Redis down, requests fail closed (503, nothing runs); after Redis comes
/// back, the same handle recovers by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_closed_then_recovers() {
    let mut server = RedisServer::start();
    let backend = Backend::redis_at(&server.url(), "redis-down");
    let idem = backend
        .builder()
        .await
        .store_timeout(Duration::from_millis(500))
        .build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    assert_eq!(
        send(&app, post_with("/pay", Some("before"), "{}"))
            .await
            .status,
        StatusCode::CREATED
    );

    server.kill();
    for attempt in 0..3 {
        let down = send(&app, post_with("/pay", Some("during"), "{}")).await;
        down.assert_problem(StatusCode::SERVICE_UNAVAILABLE, Problem::STORE_UNAVAILABLE);
        assert!(
            down.headers.contains_key(header::RETRY_AFTER),
            "attempt {attempt}"
        );
    }
    assert_eq!(
        counters.runs(),
        1,
        "the handler did not run while Redis was down"
    );

    server.restart();
    let mut recovered = None;
    for _ in 0..100 {
        let answer = send(&app, post_with("/pay", Some("during"), "{}")).await;
        if answer.status != StatusCode::SERVICE_UNAVAILABLE {
            recovered = Some(answer);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recovered = recovered.expect("the handle reconnected within 10 s");
    assert_eq!(recovered.status, StatusCode::CREATED);
    assert_eq!(counters.runs(), 2);
    let replay = send(&app, post_with("/pay", Some("during"), "{}")).await;
    assert!(replay.is_replay());
}

/// Guards: fail-open mode runs the handler when the store is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_runs_unprotected() {
    let mut server = RedisServer::start();
    let backend = Backend::redis_at(&server.url(), "fail-open");
    let idem = backend
        .builder()
        .await
        .fail_open(true)
        .store_timeout(Duration::from_millis(500))
        .build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    server.kill();
    let answer = send(&app, post_with("/pay", Some("open"), "{}")).await;
    assert_eq!(answer.status, StatusCode::CREATED);
    assert_eq!(counters.runs(), 1);
}

/// Guards: a record the store holds but this build cannot read (one written by a newer
/// version during a rolling deploy, or damaged) means the key was used: even in
/// fail-open mode the handler does not run again; the request is answered `503`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_never_runs_a_key_whose_record_does_not_read() {
    let server = RedisServer::start();
    let backend = Backend::redis_at(&server.url(), "fail-open-unreadable");
    let idem = backend.builder().await.fail_open(true).build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let first = send(&app, post_with("/pay", Some("unreadable"), "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);

    // The record as a later format version would write it.
    let mut admin = redis_connection(&server.url()).await;
    let names: Vec<String> = redis::cmd("KEYS")
        .arg("*unreadable")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(names.len(), 1, "{names:?}");
    let mut record: Vec<u8> = redis::cmd("GET")
        .arg(&names[0])
        .query_async(&mut admin)
        .await
        .unwrap();
    record[4] = record[4].wrapping_add(1);
    let () = redis::cmd("SET")
        .arg(&names[0])
        .arg(record)
        .query_async(&mut admin)
        .await
        .unwrap();

    let retry = send(&app, post_with("/pay", Some("unreadable"), "{}")).await;
    retry.assert_problem(StatusCode::SERVICE_UNAVAILABLE, Problem::STORE_UNAVAILABLE);
    assert_eq!(counters.runs(), 1, "the handler ran once");
}

/// Guards: another type of value under a key's name (a hash some other code wrote under
/// idem's prefix) means the key is taken: even in fail-open mode the handler does not run
/// again; the request is answered `503`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_never_runs_a_key_holding_another_type_of_value() {
    let server = RedisServer::start();
    let backend = Backend::redis_at(&server.url(), "fail-open-wrongtype");
    let idem = backend.builder().await.fail_open(true).build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let first = send(&app, post_with("/pay", Some("hashed"), "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);

    let mut admin = redis_connection(&server.url()).await;
    let names: Vec<String> = redis::cmd("KEYS")
        .arg("*hashed")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(names.len(), 1, "{names:?}");
    let () = redis::cmd("DEL")
        .arg(&names[0])
        .query_async::<i64>(&mut admin)
        .await
        .map(drop)
        .unwrap();
    let () = redis::cmd("HSET")
        .arg(&names[0])
        .arg("field")
        .arg("value")
        .query_async::<i64>(&mut admin)
        .await
        .map(drop)
        .unwrap();

    let retry = send(&app, post_with("/pay", Some("hashed"), "{}")).await;
    retry.assert_problem(StatusCode::SERVICE_UNAVAILABLE, Problem::STORE_UNAVAILABLE);
    assert_eq!(counters.runs(), 1, "the handler ran once");

    // At its `maxmemory` the server refuses the claim before it looks at the key's type,
    // and the read that follows finds the other type: refused all the same.
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1")
        .query_async(&mut admin)
        .await
        .unwrap();
    let full = send(&app, post_with("/pay", Some("hashed"), "{}")).await;
    full.assert_problem(StatusCode::SERVICE_UNAVAILABLE, Problem::STORE_UNAVAILABLE);
    assert_eq!(counters.runs(), 1, "the handler ran once, the server full");
}

/// Guards: a server that refuses writes but serves reads (a master demoted to a replica
/// by a failover the client did not follow) still replays a completed key, in fail-open
/// mode too: the refused claim reads the key before anything runs unprotected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_server_replays_a_completed_key_even_fail_open() {
    let server = RedisServer::start();
    let backend = Backend::redis_at(&server.url(), "read-only");
    let idem = backend.builder().await.fail_open(true).build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let first = send(&app, post_with("/pay", Some("demoted"), "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);

    // A replica of a master that cannot be reached keeps its data and serves reads.
    let mut admin = redis_connection(&server.url()).await;
    let () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(1)
        .query_async(&mut admin)
        .await
        .unwrap();
    let retry = send(&app, post_with("/pay", Some("demoted"), "{}")).await;
    let () = redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(retry.is_replay(), "{retry:?}");
    assert_eq!(retry.body, first.body);
    assert_eq!(counters.runs(), 1, "the handler ran once");
}

on_both_stores!(disconnected_client_still_gets_replay);

/// Guards: a client that drops its connection mid-request does not cancel the handler;
/// the work completes, is stored, and the retry gets the replay.
async fn disconnected_client_still_gets_replay(backend: Backend) {
    let idem = backend.builder().await.build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let server = tokio::spawn(axum::serve(listener, app.clone()).into_future());

    let mut client = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    client
        .write_all(
            b"POST /slow HTTP/1.1\r\nhost: test\r\nidempotency-key: gone\r\ncontent-length: 3\r\n\r\n500",
        )
        .await
        .expect("send request");
    assert!(
        eventually(Duration::from_secs(5), || counters.runs() == 1).await,
        "the handler started"
    );
    drop(client);
    assert_eq!(
        counters.finished(),
        0,
        "the client left before the handler finished"
    );

    assert!(
        eventually(Duration::from_secs(5), || counters.finished() == 1).await,
        "the handler ran to completion after the client left"
    );
    let mut retry = None;
    for _ in 0..100 {
        let mut request = post_with("/slow", Some("gone"), "500");
        // The same host as the first request: the host is part of the scope.
        request
            .headers_mut()
            .insert(header::HOST, "test".parse().unwrap());
        let answer = send(&app, request).await;
        if answer.status != StatusCode::CONFLICT {
            retry = Some(answer);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let retry = retry.expect("the response was stored");
    assert!(retry.is_replay());
    assert_eq!(retry.body, "slow run 1");
    assert_eq!(counters.runs(), 1);
    server.abort();
}

/// Guards the round-trip floor of `once`: 1 for a replay and for another input, 2 for a
/// first run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_round_trips_are_the_floor() {
    use idem_runtime::OnceKey;

    let server = RedisServer::start();
    let backend = Backend::redis_at(&server.url(), "once-round-trips");
    let idem = backend.builder().await.build();
    let mut admin = redis_connection(&server.url()).await;
    let monitor = Monitor::start(server.port());
    monitor.client_commands(&mut admin).await;
    let call = |input: &'static str| {
        idem.once(OnceKey::compose(["report", "2026-11"]), input)
            .run_with_outcome(|| async { Ok::<_, String>(vec![1u8, 2, 3]) })
    };

    let first = call("in").await.unwrap();
    assert!(!first.is_replay());
    assert_eq!(
        monitor.client_commands(&mut admin).await,
        ["set", "evalsha"],
        "first run"
    );
    let replay = call("in").await.unwrap();
    assert!(replay.is_replay());
    assert_eq!(monitor.client_commands(&mut admin).await, ["set"], "replay");
    let reused = call("other").await;
    assert!(reused.is_err());
    assert_eq!(
        monitor.client_commands(&mut admin).await,
        ["set"],
        "another input"
    );
}

/// A store whose `begin` reports the key as contended (changing under every attempt).
struct Contended;

impl idem_runtime::store::Store for Contended {
    fn begin<'a>(
        &'a self,
        _: &'a str,
        _: &'a bytes::Bytes,
        _: Duration,
    ) -> idem_runtime::store::BoxFuture<'a, Result<Option<bytes::Bytes>, StoreError>> {
        Box::pin(async { Err(StoreError::Contended("five attempts".into())) })
    }
    fn renew<'a>(
        &'a self,
        _: &'a str,
        _: &'a bytes::Bytes,
        _: Duration,
    ) -> idem_runtime::store::BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async { Ok(false) })
    }
    fn complete<'a>(
        &'a self,
        _: &'a str,
        _: &'a bytes::Bytes,
        _: bytes::Bytes,
        _: Duration,
    ) -> idem_runtime::store::BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async { Ok(false) })
    }
    fn release<'a>(
        &'a self,
        _: &'a str,
        _: &'a bytes::Bytes,
    ) -> idem_runtime::store::BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async { Ok(false) })
    }
}

/// Guards: a key the store reports as contended (other executions claiming and releasing
/// it between `begin`'s read and write) is answered as in flight, even in fail-open mode:
/// never run beside the key's holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contended_key_is_in_flight_even_with_fail_open() {
    let idem = Idempotency::builder()
        .shared_scope(true)
        .fail_open(true)
        .store(Contended)
        .build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let answer = send(&app, post_with("/pay", Some("busy"), "{}")).await;
    assert_eq!(answer.status, StatusCode::CONFLICT);
    assert_eq!(counters.runs(), 0, "the work never runs beside the holder");
}
