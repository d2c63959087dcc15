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

/// Guards: a server that lost idem's scripts (`SCRIPT FLUSH`, a failover to a replica that
/// never loaded them) has them loaded again by the step that finds them missing, and the
/// step is then applied: a completion stores its record (the retry is a replay), a release
/// frees its key (the retry runs again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_load_the_scripts_a_server_lost() {
    let server = RedisServer::start();
    let backend = Backend::redis_at(&server.url(), "flushed");
    let idem = backend.builder().await.build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let client = redis::Client::open(server.url()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    let flush = || redis::cmd("SCRIPT").arg("FLUSH").to_owned();

    let _: () = flush().query_async(&mut admin).await.unwrap();
    // The app's first run answers 503 on `/fail`: its key is released.
    let failed = send(&app, common::post_with("/fail", Some("flushed-fail"), "{}")).await;
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    let _: () = flush().query_async(&mut admin).await.unwrap();
    let retried = send(&app, common::post_with("/fail", Some("flushed-fail"), "{}")).await;
    assert_eq!(
        retried.status,
        StatusCode::CREATED,
        "the released key runs again"
    );

    let _: () = flush().query_async(&mut admin).await.unwrap();
    let first = send(&app, as_client("t", "flushed-pay", "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let again = send(&app, as_client("t", "flushed-pay", "{}")).await;
    assert!(again.is_replay(), "the completion was stored");
    assert_eq!(
        counters.runs(),
        3,
        "the failed key ran twice, the paid one once"
    );
}
