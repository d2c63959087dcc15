//! A Redis restart costs no request: the first request after it finds the connection dead,
//! and the store sends its step again on the new one.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use axum::http::StatusCode;
use common::{Backend, Counters, app, as_client, send};
use testkit::RedisServer;

/// Guards: after each of three restarts of Redis, the first request and every later one
/// answers 201 or its replay, never 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_request_after_a_redis_restart_is_served() {
    let mut server = RedisServer::start();
    let backend = Backend::redis_at(&server.url(), "restart");
    let idem = backend.builder().await.build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());

    for round in 0..4 {
        if round > 0 {
            server.restart();
        }
        for request in 0..3 {
            let key = format!("restart-{round}-{request}");
            let first = send(&app, as_client("t", &key, "{}")).await;
            assert_eq!(
                first.status,
                StatusCode::CREATED,
                "round {round}, request {request}: {:?}",
                String::from_utf8_lossy(&first.body)
            );
            assert!(!first.is_replay());
            let again = send(&app, as_client("t", &key, "{}")).await;
            assert_eq!(again.status, StatusCode::CREATED, "round {round}");
            assert!(again.is_replay(), "round {round}, request {request}");
        }
    }
    assert_eq!(counters.runs(), 12, "each key ran once");
}
