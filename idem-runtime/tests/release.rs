//! Regressions of "no stuck keys": a release that fails while Redis is briefly down.

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
use common::{Backend, Counters, post_with, send};
use idem_runtime::{Idempotent, Problem};
use testkit::{RedisServer, redis_connection};

/// The first run waits for the gate, then panics; later runs succeed.
async fn boom(idem: Idempotent, State(counters): State<Arc<Counters>>) -> Response {
    idem.run(async move {
        let n = counters.runs.fetch_add(1, Ordering::SeqCst) + 1;
        if n == 1 {
            counters.gate.notified().await;
            panic!("first run panics");
        }
        (StatusCode::CREATED, format!("run {n}"))
    })
    .await
}

/// Guards (a defect once shown): when the release after a handler panic fails (Redis restarting, its data kept
/// by AOF), the key stays claimed for the whole lease though nothing runs it: the retry
/// gets 409 instead of running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_release_does_not_hold_the_key_for_a_lease() {
    let mut server = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let backend = Backend::redis_at(&server.url(), "release");
    let Backend::Redis { prefix, .. } = &backend else {
        unreachable!()
    };
    let prefix = prefix.clone();
    let idem = backend
        .builder()
        .await
        .lease(Duration::from_secs(30))
        .store_timeout(Duration::from_millis(500))
        .build();
    let counters = Arc::new(Counters::default());
    let app = axum::Router::new()
        .route("/boom", post(boom))
        .with_state(counters.clone())
        .layer(idem.layer());

    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with("/boom", Some("k"), "")).await }
    });
    common::until(|| counters.runs() > 0).await;
    server.kill();
    counters.gate.notify_one();
    assert!(first.await.is_err(), "the first run panicked");
    server.restart();
    let mut admin = redis_connection(&server.url()).await;
    let keys = testkit::keys_under(&mut admin, &prefix).await;
    assert_eq!(keys.len(), 1, "the claim survived the restart: {keys:?}");

    // Nothing runs the key. Retry (after 503s while idem reconnects) for 10 s.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let retry = loop {
        let retry = send(&app, post_with("/boom", Some("k"), "")).await;
        let in_flight =
            retry.status == StatusCode::CONFLICT && retry.json()["type"] == Problem::IN_FLIGHT;
        let again = retry.status == StatusCode::SERVICE_UNAVAILABLE || in_flight;
        if !again || tokio::time::Instant::now() > deadline {
            break retry;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        retry.status,
        StatusCode::CREATED,
        "10 s after the panic, with Redis back, the retry got {:?}",
        String::from_utf8_lossy(&retry.body)
    );
}
