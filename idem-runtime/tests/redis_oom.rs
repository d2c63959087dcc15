//! Regressions of "no stuck keys": a completion Redis refuses for good.

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
use testkit::RedisServer;

/// A handler whose response (900 KB) is within the default 1 MiB response limit.
async fn report(idem: Idempotent, State(counters): State<Arc<Counters>>) -> Response {
    idem.run(async move {
        counters.runs.fetch_add(1, Ordering::SeqCst);
        (StatusCode::CREATED, "r".repeat(900 * 1024))
    })
    .await
}

/// Guards (a defect once shown): on a `noeviction` Redis (the configuration idem requires) whose `maxmemory`
/// cannot take one response, the key stays claimed (409) forever after the handler
/// finished: `complete` fails with OOM on every background retry while `renew` succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_refused_by_redis_does_not_hold_the_key_forever() {
    // Room for idem's keys and connection buffers, not for one more 900 KB write.
    let server =
        RedisServer::start_with(&["--maxmemory", "2500kb", "--maxmemory-policy", "noeviction"]);
    let backend = Backend::redis_at(&server.url(), "oom");
    let idem = backend
        .builder()
        .await
        .lease(Duration::from_millis(300))
        .build();
    let counters = Arc::new(Counters::default());
    let app = axum::Router::new()
        .route("/report", post(report))
        .with_state(counters.clone())
        .layer(idem.layer());

    let first = send(&app, post_with("/report", Some("big"), "")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(counters.runs(), 1);

    // Nothing runs the key any more. Within 20 leases (and well past the 2 s retry
    // backoff cap) a retry must get something other than "still in flight".
    let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
    let mut last;
    loop {
        last = send(&app, post_with("/report", Some("big"), "")).await;
        let in_flight =
            last.status == StatusCode::CONFLICT && last.json()["type"] == Problem::IN_FLIGHT;
        if !in_flight || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(counters.runs(), 1, "the handler ran again");
    last.assert_problem(StatusCode::CONFLICT, Problem::RESPONSE_NOT_STORED);
}
