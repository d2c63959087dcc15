//! Regressions of one execution with a Redis that refuses writes: at its `maxmemory`, or
//! refusing a bulk longer than its `proto-max-bulk-len`.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::post;
use common::{Backend, Counters, app, post_with, send};
use idem_runtime::{Idempotent, Problem};
use testkit::{RedisServer, redis_connection};

/// Fills the server with keys under `prefix` until it refuses even a small write (OOM);
/// returns the connection, whose buffers are part of the memory in use.
async fn fill_until_oom(url: &str, prefix: &str) -> redis::aio::MultiplexedConnection {
    let mut connection = redis_connection(url).await;
    let mut n = 0;
    for size in [64 * 1024, 4096, 256, 16] {
        let value = vec![b'f'; size];
        loop {
            n += 1;
            assert!(n < 10_000, "the server never reached its maxmemory");
            let set: redis::RedisResult<()> = redis::cmd("SET")
                .arg(format!("{prefix}fill:{n}"))
                .arg(&value)
                .query_async(&mut connection)
                .await;
            if let Err(error) = set {
                assert_eq!(error.code(), Some("OOM"), "{error}");
                break;
            }
        }
    }
    connection
}

/// Guards (a defect once shown): with fail-open on, a Redis at its `maxmemory` (`noeviction`, as idem requires)
/// refuses `SET NX GET` even where the key holds a completed record, and the retry of a
/// completed request runs the handler again (unlike a full memory store, answered 503).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_never_reruns_a_completed_key_on_a_full_redis() {
    let server =
        RedisServer::start_with(&["--maxmemory", "3mb", "--maxmemory-policy", "noeviction"]);
    let backend = Backend::redis_at(&server.url(), "full");
    let idem = backend.builder().await.fail_open(true).build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());

    let first = send(&app, post_with("/pay", Some("done"), "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let _filler = fill_until_oom(&server.url(), "other-app:").await;

    let retry = send(&app, post_with("/pay", Some("done"), "{}")).await;
    assert_eq!(
        counters.runs(),
        1,
        "the completed request ran again; the retry got {:?} {:?}",
        retry.status,
        String::from_utf8_lossy(&retry.body)
    );
}

/// A handler whose response is exactly the default 1 MiB response limit.
async fn mebibyte(idem: Idempotent, State(counters): State<Arc<Counters>>) -> Response {
    idem.run(async move {
        counters.runs.fetch_add(1, Ordering::SeqCst);
        (StatusCode::CREATED, "m".repeat(1024 * 1024))
    })
    .await
}

/// Guards (a defect once shown): a response within `max_response_bytes` whose record exceeds Redis'
/// `proto-max-bulk-len` (1 MiB) is never stored nor marked "not stored": the key stays
/// 409 for 30 s, then is let go and the retry runs the handler a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_over_the_redis_bulk_limit_never_runs_twice() {
    let server = RedisServer::start_with(&["--proto-max-bulk-len", "1mb"]);
    let backend = Backend::redis_at(&server.url(), "bulk");
    let idem = backend
        .builder()
        .await
        .lease(Duration::from_millis(300))
        .build();
    let counters = Arc::new(Counters::default());
    let app = axum::Router::new()
        .route("/mebibyte", post(mebibyte))
        .with_state(counters.clone())
        .layer(idem.layer());

    let first = send(&app, post_with("/mebibyte", Some("big"), "")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.body.len(), 1024 * 1024);

    // Retry as a client would (after 409 and 503) until the answer is final.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    let last = loop {
        let retry = send(&app, post_with("/mebibyte", Some("big"), "")).await;
        if retry.status.is_success() {
            break retry;
        }
        let kind = retry.json()["type"].as_str().map(str::to_owned);
        let again = kind.as_deref() == Some(Problem::IN_FLIGHT)
            || kind.as_deref() == Some(Problem::STORE_UNAVAILABLE);
        if !again || tokio::time::Instant::now() > deadline {
            break retry;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(
        counters.runs(),
        1,
        "the handler ran again; the retry got {:?}",
        last.status
    );
    last.assert_problem(StatusCode::CONFLICT, Problem::RESPONSE_NOT_STORED);
}
