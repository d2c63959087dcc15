//! `Idempotency::shutdown` and the `idem_executions_in_flight` gauge against a
//! `PgTransaction` completion that has not committed yet.

#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use common::{PgSchema, post_with, send};
use idem_runtime::store::{PgTransaction, PostgresStore};
use idem_runtime::{Idempotency, idempotent};
use sqlx::{AssertSqlSafe, Connection};
use tokio::sync::Notify;

#[derive(Clone)]
struct App {
    table: String,
    entered: Arc<Notify>,
    gate: Arc<Notify>,
}

#[idempotent]
async fn pay(State(app): State<App>, tx: PgTransaction) -> Response {
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {} (note) VALUES ('paid')",
        app.table
    )))
    .execute(&mut *tx.conn().await.unwrap())
    .await
    .unwrap();
    app.entered.notify_one();
    app.gate.notified().await;
    (StatusCode::CREATED, "paid").into_response()
}

/// Guards: `shutdown(within)` "waits for every execution holding a key in this process
/// ... until its response is stored". An execution whose handler returned and whose
/// `PgTransaction` is committing (here its record UPDATE waits on a row lock, as it would
/// behind a slow disk, synchronous replication or a lock held by another session) has
/// not stored its response yet: `shutdown(300 ms)` must wait, and report it as still
/// running (1) at the deadline.
///
/// Before the fix: `Execution::complete_in` drops the `LeaseKeeper` (which holds the in-flight
/// entry) *before* the commit, so `shutdown` returns 0 at once ("every execution in
/// flight ended") while the commit is still pending; a process that exits then loses the
/// payment the client is about to be told happened, and the in-flight gauge reads 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_a_transactional_completion_that_is_still_committing() {
    let schema = PgSchema::create("guard_shutdown_tx").await;
    let store = PostgresStore::builder(schema.url.as_str())
        .schema(schema.name.as_str())
        .connect()
        .await
        .unwrap();
    let table = format!("\"{}\".payments", schema.name);
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE {table} (id serial PRIMARY KEY, note text NOT NULL)"
    )))
    .execute(store.pool())
    .await
    .unwrap();
    let idem = Idempotency::builder()
        .shared_scope(true)
        .store(store.clone())
        .store_timeout(Duration::from_secs(10))
        .build();
    let app = App {
        table: table.clone(),
        entered: Arc::new(Notify::new()),
        gate: Arc::new(Notify::new()),
    };
    let router = Router::new()
        .route("/pay", post(pay))
        .with_state(app.clone())
        .layer(idem.layer());

    let request = tokio::spawn({
        let router = router.clone();
        async move { send(&router, post_with("/pay", Some("sd-tx-1"), "")).await }
    });
    app.entered.notified().await;

    // Another session holds the key's record row: the completion's UPDATE will wait on it.
    let mut locker = sqlx::PgConnection::connect(&schema.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "SELECT 1 FROM \"{}\".idem_records FOR UPDATE",
        schema.name
    )))
    .execute(&mut locker)
    .await
    .unwrap();
    app.gate.notify_one();

    // Wait until the completion is really blocked on the row lock.
    let probe = format!("%{}%idem_records%", schema.name);
    let mut blocked = false;
    for _ in 0..2000 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE wait_event_type = 'Lock' AND query LIKE $1 AND pid <> pg_backend_pid()",
        )
        .bind(&probe)
        .fetch_one(store.pool())
        .await
        .unwrap();
        if waiting > 0 {
            blocked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(blocked, "the completion never reached the row lock");

    let started = std::time::Instant::now();
    let unfinished = idem.shutdown(Duration::from_millis(300)).await;
    let waited = started.elapsed();
    let request_ended = request.is_finished();

    // Let the completion through and the test end cleanly.
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    let answer = request.await.unwrap();
    assert_eq!(answer.status, StatusCode::CREATED);

    assert!(
        !request_ended,
        "the test's precondition: the request was still committing"
    );
    assert_eq!(
        unfinished, 1,
        "shutdown reported {unfinished} executions unfinished after waiting {waited:?}, while \
         one was still committing its transaction (its response not stored)"
    );
}
