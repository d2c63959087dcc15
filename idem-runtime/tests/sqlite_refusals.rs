//! `SqliteTransaction` where SQLite refuses idem's own statements: a `BEGIN` whose later
//! statement fails leaves no transaction open on the pooled connection, and a `COMMIT`
//! SQLite refuses (nothing committed) releases the key instead of leaving it claimed for
//! the whole lease.

#![cfg(feature = "sqlite")]
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use common::{SqliteFile, post_with, send};
use idem_runtime::store::{SqliteStore, SqliteTransaction};
use idem_runtime::{Idempotency, idempotent};
use sqlx::Connection as _;
use sqlx::sqlite::SqliteConnectOptions;

#[idempotent]
async fn pay(tx: SqliteTransaction) -> Response {
    match tx.conn().await {
        Ok(mut conn) => {
            let _ = sqlx::query("INSERT INTO payments (note) VALUES ('paid')")
                .execute(&mut *conn)
                .await;
            (StatusCode::CREATED, "paid").into_response()
        }
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    }
}

/// (driver counts a transaction, SQLite has one open) on the pooled connection.
async fn connection_state(store: &SqliteStore) -> (bool, bool) {
    let mut conn = store.pool().acquire().await.unwrap();
    let counted = conn.is_in_transaction();
    let open = sqlx::raw_sql("BEGIN").execute(&mut *conn).await.is_err();
    if !open {
        sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await.unwrap();
    }
    (counted, open)
}

/// Guards: a `BEGIN` whose statement after `BEGIN IMMEDIATE` fails (here the mark's
/// insert, refused by a trigger of the application's) leaves no transaction open on the
/// pooled connection: it went back to the pool holding the file's write lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_begin_that_fails_half_way_leaves_no_transaction_open() {
    let file = SqliteFile::create("begin_fails");
    let store = SqliteStore::builder(file.url.as_str())
        .max_connections(1)
        .connect()
        .await
        .unwrap();
    sqlx::query("CREATE TABLE payments (id INTEGER PRIMARY KEY AUTOINCREMENT, note TEXT NOT NULL)")
        .execute(store.pool())
        .await
        .unwrap();
    sqlx::raw_sql(
        "CREATE TEMP TABLE IF NOT EXISTS idem_open_transaction_mark (open INTEGER); \
         CREATE TEMP TRIGGER app_refuses BEFORE INSERT ON idem_open_transaction_mark \
         BEGIN SELECT RAISE(ABORT, 'mark refused'); END;",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let idem = Idempotency::builder()
        .shared_scope(true)
        .store(store.clone())
        .build();
    let routes = Router::new().route("/pay", post(pay)).layer(idem.layer());

    let answer = send(&routes, post_with("/pay", None, "")).await;
    let state = connection_state(&store).await;

    // Another connection to the file tries to write, with a short busy timeout.
    let options: SqliteConnectOptions = file.url.parse().unwrap();
    let mut other =
        sqlx::SqliteConnection::connect_with(&options.busy_timeout(Duration::from_millis(500)))
            .await
            .unwrap();
    let outside = sqlx::query("INSERT INTO payments (note) VALUES ('outside')")
        .execute(&mut other)
        .await
        .map(drop)
        .map_err(|error| error.to_string());
    drop(other);
    store.pool().close().await;

    assert_eq!(
        (state, outside),
        ((false, false), Ok(())),
        "after a request whose tx.conn() failed in idem's BEGIN (answered {} {:?}): \
         ((driver counts a transaction, SQLite has one open) on the pooled connection, \
         a write from another connection)",
        answer.status,
        String::from_utf8_lossy(&answer.body)
    );
}

/// Writes a child whose parent does not exist: the deferred key is checked at `COMMIT`.
#[idempotent]
async fn pay_orphan(tx: SqliteTransaction) -> Response {
    let mut conn = match tx.conn().await {
        Ok(conn) => conn,
        Err(error) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response();
        }
    };
    match sqlx::query("INSERT INTO children (parent) VALUES (42)")
        .execute(&mut *conn)
        .await
    {
        Ok(_) => (StatusCode::CREATED, "paid").into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    }
}

/// Guards: a `COMMIT` SQLite refuses (a deferred foreign key left violated), after which
/// idem rolls back, releases the key: the client's retry is not refused as in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_commit_releases_the_key() {
    let file = SqliteFile::create("commit_refused");
    let store = SqliteStore::builder(file.url.as_str())
        .max_connections(1)
        .connect()
        .await
        .unwrap();
    sqlx::raw_sql(
        "CREATE TABLE parents (id INTEGER PRIMARY KEY); \
         CREATE TABLE children (parent INTEGER REFERENCES parents(id) DEFERRABLE INITIALLY DEFERRED);",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(fk, 1, "foreign keys enforced on the store's connections");
    let idem = Idempotency::builder()
        .shared_scope(true)
        .lease(Duration::from_secs(20))
        .store(store.clone())
        .build();
    let routes = Router::new()
        .route("/pay", post(pay_orphan))
        .layer(idem.layer());

    let first = send(&routes, post_with("/pay", Some("k"), "")).await;
    let children: i64 = sqlx::query_scalar("SELECT count(*) FROM children")
        .fetch_one(store.pool())
        .await
        .unwrap();
    // The retry a client makes at once.
    let retry = send(&routes, post_with("/pay", Some("k"), "")).await;
    store.pool().close().await;
    assert_eq!(children, 0, "nothing committed");
    assert_ne!(
        retry.status,
        StatusCode::CONFLICT,
        "first answered {} {:?}; nothing was committed (children: {children}) yet the retry is \
         refused as in flight: {:?} (the key stays claimed for the whole lease)",
        first.status,
        String::from_utf8_lossy(&first.body),
        String::from_utf8_lossy(&retry.body)
    );
}
