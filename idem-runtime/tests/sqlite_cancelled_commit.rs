//! A request without a key whose commit (or rollback) is dropped while SQLite runs it
//! leaves its pooled connection fit: the driver then skips the next rollback it is asked
//! to start (the dropped transaction's own, it expects), so idem starts that one, and
//! the next transaction dropped on the connection (an application's error path) is rolled
//! back rather than left open, holding the write lock, with every later commit on it only
//! a savepoint's release.

#![cfg(feature = "sqlite")]
#![allow(clippy::unwrap_used)]

mod common;

use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use common::{GiveUpAfter, SqliteFile, post_with, send};
use idem_runtime::store::{SqliteStore, SqliteTransaction};
use idem_runtime::{Idempotency, idempotent};
use sqlx::Connection as _;

#[idempotent]
async fn pay(tx: SqliteTransaction) -> Response {
    let mut conn = match tx.conn().await {
        Ok(conn) => conn,
        Err(error) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response();
        }
    };
    match sqlx::query("INSERT INTO payments (note) VALUES ('unkeyed')")
        .execute(&mut *conn)
        .await
    {
        Ok(_) => (StatusCode::CREATED, "paid").into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    }
}

/// Inserts a payment and answers `500`: idem rolls the work back.
#[idempotent]
async fn pay_then_fail(tx: SqliteTransaction) -> Response {
    let mut conn = match tx.conn().await {
        Ok(conn) => conn,
        Err(error) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response();
        }
    };
    let _ = sqlx::query("INSERT INTO payments (note) VALUES ('failed')")
        .execute(&mut *conn)
        .await;
    (StatusCode::INTERNAL_SERVER_ERROR, "failed").into_response()
}

async fn count(file: &SqliteFile, note: &str) -> i64 {
    let mut other = sqlx::SqliteConnection::connect(&file.url).await.unwrap();
    sqlx::query_scalar("SELECT count(*) FROM payments WHERE note = ?1")
        .bind(note)
        .fetch_one(&mut other)
        .await
        .unwrap()
}

/// What an application does on the store's pool after the request: a transaction given
/// up on an error path (dropped, so sqlx rolls it back), then one it commits. Returns
/// whether the committed write is visible to another connection.
async fn application_round(store: &SqliteStore, file: &SqliteFile, round: usize) -> bool {
    {
        let mut abandoned = store.pool().begin().await.unwrap();
        sqlx::query("INSERT INTO payments (note) VALUES ('abandoned')")
            .execute(&mut *abandoned)
            .await
            .unwrap();
        drop(abandoned);
    }
    let note = format!("committed {round}");
    let mut kept = store.pool().begin().await.unwrap();
    sqlx::query("INSERT INTO payments (note) VALUES (?1)")
        .bind(&note)
        .execute(&mut *kept)
        .await
        .unwrap();
    kept.commit().await.unwrap();
    count(file, &note).await == 1
}

/// The pooled connection's state as the driver and SQLite see it, without touching the
/// driver's transaction commands: (driver counts a transaction, SQLite has one open).
async fn connection_state(store: &SqliteStore) -> (bool, bool) {
    let mut conn = store.pool().acquire().await.unwrap();
    let counted = conn.is_in_transaction();
    let open = sqlx::raw_sql("BEGIN").execute(&mut *conn).await.is_err();
    if !open {
        sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await.unwrap();
    }
    (counted, open)
}

/// Sends unkeyed requests to `path` given up after 1, 2, 3... polls until one finishes,
/// 30 times over; after each, an application's round on the store's pool must commit.
async fn sweep(path: &'static str, test: &str) {
    let file = SqliteFile::create(test);
    let store = SqliteStore::builder(file.url.as_str())
        .max_connections(1)
        .connect()
        .await
        .unwrap();
    sqlx::query("CREATE TABLE payments (id INTEGER PRIMARY KEY AUTOINCREMENT, note TEXT NOT NULL)")
        .execute(store.pool())
        .await
        .unwrap();
    let idem = Idempotency::builder()
        .shared_scope(true)
        .store(store.clone())
        .build();
    let routes = Router::new()
        .route("/pay", post(pay))
        .route("/fail", post(pay_then_fail))
        .layer(idem.layer());

    let mut lost = None;
    let mut round = 0;
    'rounds: for _ in 0..30 {
        for left in 1..400 {
            round += 1;
            let answer = GiveUpAfter {
                inner: Box::pin(send(&routes, post_with(path, None, ""))),
                left,
            }
            .await;
            let finished = answer.is_some();
            let before = connection_state(&store).await;
            if !application_round(&store, &file, round).await {
                lost = Some((left, round, before));
                break 'rounds;
            }
            if finished {
                break;
            }
        }
    }
    let abandoned = count(&file, "abandoned").await;
    // Let the file go: close the pool (and the transaction left open on it).
    store.pool().close().await;
    assert_eq!(
        lost, None,
        "after a request on {path} given up after N polls (N, round, (driver counted a \
         transaction, SQLite had one open) before the application's round): an application's \
         `pool.begin()` ... `commit()` returned Ok but its write is not in the database \
         (the dropped transaction before it was never rolled back); rows 'abandoned' seen \
         by another connection: {abandoned}"
    );
}

/// Guards: the unkeyed commit given up while SQLite runs its `COMMIT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_unkeyed_commit_leaves_the_pool_fit() {
    sweep("/pay", "cancelled_commit").await;
}

/// Guards: the rollback after a `5xx` given up while SQLite runs its `ROLLBACK`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_unkeyed_rollback_leaves_the_pool_fit() {
    sweep("/fail", "cancelled_rollback").await;
}
