//! The same protocol on a 3-master Redis Cluster of the test's own.

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
