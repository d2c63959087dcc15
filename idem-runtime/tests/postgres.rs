//! The PostgreSQL store on the real server: every protocol check, the round trips each
//! request costs on the wire, the store's steps applied twice, and the sweep.

#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use bytes::Bytes;
use common::checks::*;
use common::table_stores::{self, Swept};
use common::{Backend, Counters, PgSchema, app, post_with, send};
use idem_runtime::store::{PostgresStore, Store, StoreError};
use idem_runtime::{ConnectError, Idempotency, Problem};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

on_postgres!(
    replay_is_byte_identical,
    different_request_same_key_is_422,
    concurrent_requests_run_once,
    key_expires_after_ttl,
    slow_handler_keeps_its_lease,
    dead_owner_frees_key_after_lease,
    stale_executor_cannot_overwrite,
    server_error_releases_key,
    panic_releases_key,
    bad_input_is_refused,
    scopes_are_isolated,
    oversized_response_is_never_rerun,
    waiting_for_in_flight_replays,
    rejected_extractor_releases_key,
    slow_body_keeps_its_lease,
    failed_body_is_a_problem_not_a_rerun,
    nested_routes_are_told_apart,
);

async fn store_in(schema: &PgSchema) -> PostgresStore {
    PostgresStore::builder(schema.url.as_str())
        .schema(schema.name.as_str())
        .connect()
        .await
        .unwrap_or_else(|error| panic!("PostgreSQL at {} must be running: {error}", schema.url))
}

async fn live_rows(store: &PostgresStore) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {} WHERE expires_at > now()",
        store.table()
    )))
    .fetch_one(store.pool())
    .await
    .unwrap()
}

async fn all_rows(store: &PostgresStore) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {}",
        store.table()
    )))
    .fetch_one(store.pool())
    .await
    .unwrap()
}

/// Guards: each step applied twice (re-sent after a lost answer) answers as the trait
/// says: `begin` finds its own claim, `complete` finds its record, `release` finds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_applied_twice() {
    let schema = PgSchema::create("twice").await;
    table_stores::steps_applied_twice(Arc::new(store_in(&schema).await)).await;
}

/// Guards: 64 concurrent `begin`s on one free key, and on one expired key, leave exactly
/// one winner, and every other caller is handed the winner's claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_begins_have_one_winner() {
    let schema = PgSchema::create("one_winner").await;
    table_stores::concurrent_begins_have_one_winner(Arc::new(store_in(&schema).await)).await;
}

/// Guards: a table of another shape, or none where idem may not create it, fails at
/// connect with the step named, not on the first request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_table_fails_at_connect() {
    let schema = PgSchema::create("wrong_table").await;
    let missing = PostgresStore::builder(schema.url.as_str())
        .schema(schema.name.as_str())
        .create_table(false)
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(missing, ConnectError::Postgres { step, .. } if step.contains("probing begin")),
        "{missing}"
    );
    let pool = sqlx::PgPool::connect(&schema.url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE \"{}\".other_shape (key TEXT PRIMARY KEY, body TEXT)",
        schema.name
    )))
    .execute(&pool)
    .await
    .unwrap();
    let wrong = PostgresStore::from_pool(pool.clone())
        .schema(schema.name.as_str())
        .table("other_shape")
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(wrong, ConnectError::Postgres { .. }), "{wrong}");
    // The DDL a migration would ship creates a table the store accepts.
    let builder = PostgresStore::from_pool(pool.clone())
        .schema(schema.name.as_str())
        .table("migrated")
        .create_table(false);
    sqlx::raw_sql(sqlx::AssertSqlSafe(builder.migration_sql()))
        .execute(&pool)
        .await
        .unwrap();
    builder.connect().await.unwrap();
}

/// Guards: a user who may read the table but not write it fails at connect, with the
/// step named, rather than answering `503` to every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_who_cannot_write_fails_at_connect() {
    let schema = PgSchema::create("read_only").await;
    let table = store_in(&schema).await.table().to_owned();
    let role = schema.name.replacen("idem_test_", "idem_ro_", 1);
    let admin = sqlx::PgPool::connect(&schema.url).await.unwrap();
    for sql in [
        format!("CREATE ROLE \"{role}\" LOGIN"),
        format!("GRANT USAGE ON SCHEMA \"{}\" TO \"{role}\"", schema.name),
        format!("GRANT SELECT ON {table} TO \"{role}\""),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&admin)
            .await
            .unwrap();
    }
    let (scheme, rest) = schema.url.split_once("://").unwrap();
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let refused = PostgresStore::builder(format!("{scheme}://{role}@{host}"))
        .schema(schema.name.as_str())
        .create_table(false)
        .connect()
        .await;
    // The role goes before any assertion can fail.
    for sql in [
        format!("DROP OWNED BY \"{role}\""),
        format!("DROP ROLE \"{role}\""),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&admin)
            .await
            .unwrap();
    }
    let error = refused.unwrap_err();
    assert!(
        matches!(&error, ConnectError::Postgres { step, .. } if step.contains("begin")),
        "{error}"
    );
    assert!(error.to_string().contains("permission denied"), "{error}");
}

/// Protocol messages counted on the wire between the store and the server.
#[derive(Default)]
struct Wire {
    /// `Sync`: each ends one round trip (the client waits for `ReadyForQuery`).
    syncs: AtomicUsize,
    /// `Execute`: one statement run.
    executes: AtomicUsize,
    /// `Parse`: a statement prepared.
    parses: AtomicUsize,
    /// `Query`: a simple-protocol statement, one round trip of its own.
    queries: AtomicUsize,
}

impl Wire {
    fn snapshot(&self) -> [usize; 4] {
        [
            self.syncs.load(Ordering::SeqCst),
            self.executes.load(Ordering::SeqCst),
            self.parses.load(Ordering::SeqCst),
            self.queries.load(Ordering::SeqCst),
        ]
    }

    fn count(&self, kind: u8) {
        let counter = match kind {
            b'S' => &self.syncs,
            b'E' => &self.executes,
            b'P' => &self.parses,
            b'Q' => &self.queries,
            _ => return,
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }
}

/// A TCP proxy to `upstream` that reads the frontend half of the PostgreSQL protocol
/// (v3, no TLS) and counts its messages by type. Returns the proxy's port.
async fn counting_proxy(upstream: String, wire: Arc<Wire>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = TcpStream::connect(&upstream).await.unwrap();
            let (mut client_read, client_write) = client.into_split();
            let (server_read, mut server_write) = server.into_split();
            tokio::spawn(async move {
                let (mut server_read, mut client_write) = (server_read, client_write);
                let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
            });
            let wire = wire.clone();
            tokio::spawn(async move {
                // The startup message has no type byte; every later one has.
                let mut typed = false;
                loop {
                    let mut kind = [0u8; 1];
                    if typed {
                        if client_read.read_exact(&mut kind).await.is_err() {
                            return;
                        }
                        wire.count(kind[0]);
                    }
                    let mut length = [0u8; 4];
                    if client_read.read_exact(&mut length).await.is_err() {
                        return;
                    }
                    let mut body =
                        vec![0u8; (u32::from_be_bytes(length) as usize).saturating_sub(4)];
                    if client_read.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let mut message = Vec::with_capacity(5 + body.len());
                    if typed {
                        message.extend_from_slice(&kind);
                    }
                    message.extend_from_slice(&length);
                    message.extend_from_slice(&body);
                    if server_write.write_all(&message).await.is_err() {
                        return;
                    }
                    typed = true;
                }
            });
        }
    });
    port
}

/// `url` with its `host:port` replaced by the proxy's, and TLS off (the proxy reads
/// plain messages).
fn through(url: &str, port: u16) -> (String, String) {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (user, rest) = rest.rsplit_once('@').map_or(("", rest), |(u, r)| (u, r));
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let upstream = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:5432")
    };
    let at = if user.is_empty() { "" } else { "@" };
    let separator = if path.contains('?') { '&' } else { '?' };
    (
        format!("{scheme}://{user}{at}127.0.0.1:{port}/{path}{separator}sslmode=disable"),
        upstream,
    )
}

/// Guards: on the wire, a replay, a 422 and a 409 each cost one statement, and a first
/// execution two, with every statement prepared once per connection and reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_on_the_wire() {
    let schema = PgSchema::create("round_trips").await;
    let wire = Arc::new(Wire::default());
    let (_, upstream) = through(&schema.url, 0);
    let port = counting_proxy(upstream, wire.clone()).await;
    let (url, _) = through(&schema.url, port);
    // One connection, so that what it prepared is what the next request finds.
    let store = PostgresStore::builder(url)
        .schema(schema.name.as_str())
        .max_connections(1)
        .connect()
        .await
        .unwrap();
    let idem = common::test_builder(Idempotency::builder().store(store)).build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());

    // Waits out the spawned returns of connections to the pool (sqlx pings them): the
    // counts must hold still for 100 ms before they are read.
    let settled = || async {
        let mut last = wire.snapshot();
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = wire.snapshot();
            if now == last {
                return now;
            }
            last = now;
        }
    };
    let gated = |key: &'static str| {
        let app = app.clone();
        tokio::spawn(async move { send(&app, post_with("/gated", Some(key), "")).await })
    };
    // Warm-up: every statement prepared on the one connection.
    let warm = gated("warm-gated");
    common::until(|| counters.runs() == 1).await;
    send(&app, post_with("/gated", Some("warm-gated"), "")).await;
    counters.gate.notify_one();
    warm.await.unwrap();
    send(&app, post_with("/pay", Some("warm"), "{}")).await;
    send(&app, post_with("/pay", Some("warm"), "{}")).await;
    send(&app, post_with("/pay", Some("warm"), "{\"other\":1}")).await;

    let mut measured = Vec::new();
    let mut measure = |name: &'static str, before: [usize; 4], after: [usize; 4]| {
        let delta: Vec<usize> = before.iter().zip(after).map(|(b, a)| a - b).collect();
        measured.push((name, delta[0], delta[1], delta[2], delta[3]));
        (delta[0], delta[1], delta[2], delta[3])
    };

    let before = settled().await;
    let first = send(&app, post_with("/pay", Some("measured"), "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let first = measure("first execution", before, settled().await);

    let before = settled().await;
    let replay = send(&app, post_with("/pay", Some("measured"), "{}")).await;
    assert!(replay.is_replay());
    let replay = measure("replay", before, settled().await);

    let before = settled().await;
    let reused = send(&app, post_with("/pay", Some("measured"), "{\"other\":1}")).await;
    reused.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, Problem::KEY_REUSED);
    let reused = measure("422", before, settled().await);

    let running = gated("running");
    common::until(|| counters.runs() == 3).await;
    let before = settled().await;
    let conflict = send(&app, post_with("/gated", Some("running"), "")).await;
    conflict.assert_problem(StatusCode::CONFLICT, Problem::IN_FLIGHT);
    let conflict = measure("409", before, settled().await);
    counters.gate.notify_one();
    running.await.unwrap();

    eprintln!("(request, syncs, executes, parses, simple queries): {measured:?}");
    // Statements: the protocol's floor. Each is one Bind/Execute/Sync on a prepared
    // statement; sqlx adds one bare Sync (a ping) when the connection goes back to the
    // pool, after the answer, off the request's path.
    assert_eq!(first, (4, 2, 0, 0), "first execution: begin and complete");
    assert_eq!(replay, (2, 1, 0, 0), "replay: begin");
    assert_eq!(reused, (2, 1, 0, 0), "422: begin");
    assert_eq!(conflict, (2, 1, 0, 0), "409: begin");
}

/// Guards: 10,000 records past their 1 s TTL are swept in bounded batches, the table
/// ends with only what is still live, and nothing within its TTL or lease is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_deletes_what_expired_and_nothing_else() {
    let schema = PgSchema::create("sweep").await;
    let store = Arc::new(store_in(&schema).await);
    table_stores::sweep_deletes_what_expired_and_nothing_else(store).await;
}

impl Swept for PostgresStore {
    async fn all_rows(&self) -> i64 {
        all_rows(self).await
    }
    async fn live_rows(&self) -> i64 {
        live_rows(self).await
    }
    async fn delete_expired(&self, limit: u64) -> Result<u64, StoreError> {
        PostgresStore::delete_expired(self, limit).await
    }
    async fn sweep(&self, batch: u64) -> Result<u64, StoreError> {
        PostgresStore::sweep(self, batch).await
    }
}

/// Guards: `sweep_every` deletes expired rows in the background, and stops with the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_sweep() {
    let schema = PgSchema::create("background_sweep").await;
    let store = PostgresStore::builder(schema.url.as_str())
        .schema(schema.name.as_str())
        .sweep_every(Duration::from_millis(100))
        .sweep_batch(7)
        .connect()
        .await
        .unwrap();
    let lease = Duration::from_millis(200);
    for n in 0..50 {
        store
            .begin(&format!("k{n}"), &Bytes::from_static(b"claim"), lease)
            .await
            .unwrap();
    }
    store
        .begin(
            "held",
            &Bytes::from_static(b"claim"),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while all_rows(&store).await > 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(all_rows(&store).await, 1, "the expired claims were swept");
    assert_eq!(live_rows(&store).await, 1, "the held claim was not");
    let pool = store.pool().clone();
    drop(store);
    // With the store gone its sweeper stops: an expired row stays.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO \"{}\".idem_records VALUES ('late', 'x', now())",
        schema.name
    )))
    .execute(&pool)
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let left: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM \"{}\".idem_records",
        schema.name
    )))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(left, 2, "no sweep ran after the store was dropped");
}

/// Guards: `Idempotency::postgres` is the whole setup for one database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_one_line_handle() {
    let schema = PgSchema::create("one_line").await;
    let separator = if schema.url.contains('?') { '&' } else { '?' };
    // The schema as the connection's search path: the table lands there.
    let url = format!(
        "{}{separator}options=-csearch_path%3D{}",
        schema.url, schema.name
    );
    let idem = Idempotency::postgres(&url).await.unwrap();
    // It sweeps expired rows in the background, so that the table does not grow forever.
    let store = idem
        .store()
        .as_any()
        .and_then(|any| any.downcast_ref::<PostgresStore>())
        .expect("a PostgresStore");
    assert!(format!("{store:?}").contains("sweeping: true"), "{store:?}");
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let first = send(&app, common::as_client("token", "one-line", "{}")).await;
    let again = send(&app, common::as_client("token", "one-line", "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(again.is_replay());
    assert_eq!(counters.runs(), 1);
    let backend = Backend::postgres(&schema);
    assert_eq!(backend.record_count().await, 1);
}
