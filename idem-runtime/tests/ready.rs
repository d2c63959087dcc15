//! `Idempotency::ready()` on a Redis that answers `PING` but takes no claim.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use axum::http::StatusCode;
use common::{Backend, Counters, app, post_with, send};
use testkit::RedisServer;

/// Guards: `ready()` is what a readiness probe answers with ("`Ok` when it [the store]
/// can take steps now", `Store::ping`); while every keyed request is refused with `503`
/// because the store cannot take a claim, `ready()` must fail too, so that the load
/// balancer sends the traffic elsewhere.
///
/// Before the fix: on a Redis that has become a read-only replica (after a failover, or an
/// endpoint pointing at a replica; a `MISCONF` server that stopped writes behaves the
/// same), `PING` still answers, so `ready()` is `Ok` while every payment is refused with
/// `503` (`READONLY You can't write against a read only replica`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_fails_while_the_store_refuses_every_claim() {
    let server = RedisServer::start();
    let backend = Backend::redis_at(&server.url(), "guard_ready");
    let idem = backend.builder().await.build();
    let router = app(&idem, Arc::new(Counters::default()));
    assert!(idem.ready().await.is_ok(), "a healthy store is ready");
    assert_eq!(
        send(&router, post_with("/pay", Some("before"), "{}"))
            .await
            .status,
        StatusCode::CREATED
    );

    // The server becomes a replica (of a master that is not there): it answers reads and
    // PING, and refuses every write.
    let unreachable_master = testkit::free_port();
    let mut admin = testkit::redis_connection(&server.url()).await;
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(unreachable_master)
        .query_async(&mut admin)
        .await
        .unwrap();

    let refused = send(&router, post_with("/pay", Some("after"), "{}")).await;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the precondition: the read-only store refuses the claim: {:?}",
        String::from_utf8_lossy(&refused.body)
    );
    let ready = idem.ready().await;
    assert!(
        ready.is_err(),
        "ready() answered Ok while every keyed request is refused with 503 ({:?})",
        String::from_utf8_lossy(&refused.body)
    );
}

/// Guards: as above, for the PostgreSQL store: while every claim is refused because the
/// database takes no writes, `ready()` fails.
///
/// Before the fix: `PostgresStore::ping` is `SELECT 1`, which a read-only server answers (a hot
/// standby after a failover, or here a session set read-only, as a standby's are): `ready()`
/// is `Ok` while every keyed request is refused with `503` ("cannot execute ... in a
/// read-only transaction").
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_ready_fails_while_the_database_takes_no_writes() {
    use idem_runtime::store::PostgresStore;
    use sqlx::postgres::PgPoolOptions;

    let schema = common::PgSchema::create("guard_ready_pg").await;
    // One connection, so that what is set on it holds for every step of the store.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&schema.url)
        .await
        .unwrap();
    let store = PostgresStore::from_pool(pool.clone())
        .schema(schema.name.as_str())
        .connect()
        .await
        .unwrap();
    let idem = common::test_builder(idem_runtime::Idempotency::builder().store(store)).build();
    let router = app(&idem, Arc::new(Counters::default()));
    assert!(idem.ready().await.is_ok(), "a healthy store is ready");
    assert_eq!(
        send(&router, post_with("/pay", Some("before"), "{}"))
            .await
            .status,
        StatusCode::CREATED
    );

    // The database now takes reads only, as a standby does.
    sqlx::query("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        .execute(&pool)
        .await
        .unwrap();

    let refused = send(&router, post_with("/pay", Some("after"), "{}")).await;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the precondition: the read-only database refuses the claim: {:?}",
        String::from_utf8_lossy(&refused.body)
    );
    let ready = idem.ready().await;
    assert!(
        ready.is_err(),
        "ready() answered Ok while every keyed request is refused with 503 ({:?})",
        String::from_utf8_lossy(&refused.body)
    );
}
