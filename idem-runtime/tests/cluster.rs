//! The same protocol on a 3-master Redis Cluster of the test's own.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

mod common;

use common::Backend;
use common::checks::*;
use testkit::{RedisCluster, keys_under, redis_connection};

/// Guards: replay, 422, 409 and expiry behave on a cluster as on one server, and records
/// spread over all three masters (one record is one key: no cross-slot step exists).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_on_a_three_master_cluster() {
    let cluster = RedisCluster::start(3);
    let on_cluster = |test: &str| Backend::Cluster {
        urls: cluster.urls(),
        prefix: testkit::unique_prefix(test),
    };
    replay_is_byte_identical(on_cluster("replay")).await;
    different_request_same_key_is_422(on_cluster("422")).await;
    concurrent_requests_run_once(on_cluster("409")).await;
    key_expires_after_ttl(on_cluster("expiry")).await;
    stale_executor_cannot_overwrite(on_cluster("fencing")).await;
    server_error_releases_key(on_cluster("5xx")).await;

    // Many keys land on every master.
    let spread = on_cluster("spread");
    let Backend::Cluster { prefix, .. } = &spread else {
        unreachable!()
    };
    let prefix = prefix.clone();
    many_keys(spread, 60).await;
    let mut per_node = Vec::new();
    for url in cluster.urls() {
        let mut connection = redis_connection(&url).await;
        per_node.push(keys_under(&mut connection, &prefix).await.len());
    }
    assert_eq!(
        per_node.iter().sum::<usize>(),
        60,
        "every record is stored once"
    );
    assert!(
        per_node.iter().all(|&n| n > 0),
        "records land on all three masters: {per_node:?}"
    );
}

/// Busies a server for 600 ms, so commands sent meanwhile queue in their sockets.
const BUSY_600_MS: &str = "local start = redis.call('TIME') \
    while true do \
      local now = redis.call('TIME') \
      if (now[1] - start[1]) * 1000000 + (now[2] - start[2]) > 600000 then break end \
    end \
    return 1";

/// Guards: a `SET NX GET` that the cluster client re-sends because its connection was
/// killed after the command applied and before the reply arrived is this request's own
/// claim: the request runs, once, instead of answering 409 to itself and sticking the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_resent_after_a_lost_reply_is_its_own() {
    use axum::http::StatusCode;
    use common::{Counters, app, post_with, send};

    let cluster = RedisCluster::start(3);
    let backend = Backend::Cluster {
        urls: cluster.urls(),
        prefix: testkit::unique_prefix("resent"),
    };
    let idem = backend.builder().await.build();
    let counters = std::sync::Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    // Opens the application's connection to every master.
    for n in 0..30 {
        send(&app, post_with("/pay", Some(&format!("warm-{n}")), "{}")).await;
    }
    let warm = counters.runs();

    for attempt in 0..3 {
        let mut blockers = Vec::new();
        let mut killers = Vec::new();
        for url in cluster.urls() {
            let mut blocker = redis_connection(&url).await;
            let mut probe = redis_connection(&url).await;
            killers.push(redis_connection(&url).await);
            blockers.push(tokio::spawn(async move {
                let _: redis::RedisResult<i64> = redis::cmd("EVAL")
                    .arg(BUSY_600_MS)
                    .arg(0)
                    .query_async(&mut blocker)
                    .await;
            }));
            // The server answers BUSY once the script runs.
            loop {
                let ping: redis::RedisResult<String> =
                    redis::cmd("PING").query_async(&mut probe).await;
                if ping.is_err() {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
        let key = format!("resent-{attempt}");
        let request = tokio::spawn({
            let app = app.clone();
            let key = key.clone();
            async move { send(&app, post_with("/pay", Some(&key), "{}")).await }
        });
        // Queued behind the request's command: closes the application's connections
        // after its `SET` applies and before the reply is read.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let kills: Vec<_> = killers
            .into_iter()
            .map(|mut killer| {
                tokio::spawn(async move {
                    let _: redis::RedisResult<i64> = redis::cmd("CLIENT")
                        .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"][..])
                        .query_async(&mut killer)
                        .await;
                })
            })
            .collect();
        let first = request.await.expect("the request");
        for blocker in blockers {
            let _ = blocker.await;
        }
        // Every kill has run before the next attempt opens its connections, so that a
        // late one cannot cut those.
        for kill in kills {
            let _ = kill.await;
        }
        assert_eq!(
            first.status,
            StatusCode::CREATED,
            "attempt {attempt}: {:?}",
            String::from_utf8_lossy(&first.body)
        );
        let retry = send(&app, post_with("/pay", Some(&key), "{}")).await;
        assert!(retry.is_replay(), "attempt {attempt}: the key is settled");
    }
    assert_eq!(counters.runs() - warm, 3, "each key ran once");
}
