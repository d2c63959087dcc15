//! The SQLite store on a real database file: every protocol check, the store's steps
//! applied twice, concurrent claims, set-up failures named at connect, and the sweep.

#![cfg(feature = "sqlite")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::SqliteFile;
use common::checks::*;
use common::table_stores::{self, Swept, eventually_async};
use idem_runtime::ConnectError;
use idem_runtime::store::{SqliteStore, Store, StoreError};

on_sqlite!(
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

async fn store_in(file: &SqliteFile) -> SqliteStore {
    SqliteStore::connect(&file.url)
        .await
        .unwrap_or_else(|error| panic!("SQLite at {}: {error}", file.url))
}

fn now_ms() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

async fn live_rows(store: &SqliteStore) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {} WHERE expires_at > ?1",
        store.table()
    )))
    .bind(now_ms())
    .fetch_one(store.pool())
    .await
    .unwrap()
}

async fn all_rows(store: &SqliteStore) -> i64 {
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
    let file = SqliteFile::create("twice");
    table_stores::steps_applied_twice(Arc::new(store_in(&file).await)).await;
}

/// Guards: 64 concurrent `begin`s on one free key, and on one expired key, leave exactly
/// one winner, and every other caller is handed the winner's claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_begins_have_one_winner() {
    let file = SqliteFile::create("one_winner");
    table_stores::concurrent_begins_have_one_winner(Arc::new(store_in(&file).await)).await;
}

/// Guards: a missing table where idem may not create it, a table of another shape, or a
/// read-only database fails at connect with the step named, not on the first request; the
/// DDL a migration would ship makes a table the store accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_table_fails_at_connect() {
    let file = SqliteFile::create("wrong_table");
    let url = format!("{}?mode=rwc", file.url);
    let missing = SqliteStore::builder(url.as_str())
        .create_table(false)
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(&missing, ConnectError::Sqlite { step, .. } if step.contains("probing begin")),
        "{missing}"
    );
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::query("CREATE TABLE other_shape (key TEXT PRIMARY KEY, body TEXT)")
        .execute(&pool)
        .await
        .unwrap();
    let wrong = SqliteStore::from_pool(pool.clone())
        .table("other_shape")
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(wrong, ConnectError::Sqlite { .. }), "{wrong}");
    let builder = SqliteStore::from_pool(pool.clone())
        .table("migrated")
        .create_table(false);
    sqlx::raw_sql(sqlx::AssertSqlSafe(builder.migration_sql()))
        .execute(&pool)
        .await
        .unwrap();
    builder.connect().await.unwrap();

    let read_only = SqliteStore::builder(format!("{}?mode=ro", file.url))
        .table("migrated")
        .create_table(false)
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(&read_only, ConnectError::Sqlite { step, .. } if step.contains("begin")),
        "{read_only}"
    );
    assert!(read_only.to_string().contains("readonly"), "{read_only}");
}

/// Guards: the store's own pool runs in WAL mode (reads never wait for a writer) with a
/// busy timeout (a write waits for the one in progress), and creates the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn its_own_pool_is_in_wal_mode_with_a_busy_timeout() {
    let file = SqliteFile::create("pragmas");
    assert!(!file.path.exists());
    let store = SqliteStore::builder(file.url.as_str())
        .busy_timeout(Duration::from_millis(1500))
        .connect()
        .await
        .unwrap();
    assert!(file.path.exists(), "the file was created");
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    let timeout: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(timeout, 1500);
}

/// Guards: 10,000 records past their 1 s TTL are swept in bounded batches, the table
/// ends with only what is still live, and nothing within its TTL or lease is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_deletes_what_expired_and_nothing_else() {
    let file = SqliteFile::create("sweep");
    let store = Arc::new(store_in(&file).await);
    table_stores::sweep_deletes_what_expired_and_nothing_else(store).await;
}

impl Swept for SqliteStore {
    async fn all_rows(&self) -> i64 {
        all_rows(self).await
    }
    async fn live_rows(&self) -> i64 {
        live_rows(self).await
    }
    async fn delete_expired(&self, limit: u64) -> Result<u64, StoreError> {
        SqliteStore::delete_expired(self, limit).await
    }
    async fn sweep(&self, batch: u64) -> Result<u64, StoreError> {
        SqliteStore::sweep(self, batch).await
    }
}

/// Guards: `sweep_every` deletes expired rows in the background, and stops with the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_sweep() {
    let file = SqliteFile::create("background_sweep");
    let store = SqliteStore::builder(file.url.as_str())
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
    let swept = eventually_async(Duration::from_secs(5), || {
        let store = store.clone();
        async move { all_rows(&store).await == 1 }
    })
    .await;
    assert!(swept, "the expired claims were swept");
    assert_eq!(live_rows(&store).await, 1, "the held claim was not");
    let pool = store.pool().clone();
    drop(store);
    // With the store gone its sweeper stops: an expired row stays.
    sqlx::query("INSERT INTO idem_records VALUES ('late', x'00', 0)")
        .execute(&pool)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM idem_records")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 2, "no sweep ran after the store was dropped");
}
