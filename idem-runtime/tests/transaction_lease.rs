//! the lease of an execution whose `PgTransaction` completion waits for the
//! transaction (a task the handler spawned still uses it).

#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use common::{PgSchema, post_with, send};
use idem_runtime::store::{PgTransaction, PostgresStore};
use idem_runtime::{Idempotency, idempotent};
use sqlx::AssertSqlSafe;
use tokio::sync::Notify;

#[derive(Clone)]
struct App {
    table: String,
    runs: Arc<AtomicUsize>,
}

#[idempotent]
async fn pay(State(app): State<App>, tx: PgTransaction) -> Response {
    app.runs.fetch_add(1, Ordering::SeqCst);
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {} (note) VALUES ('paid')",
        app.table
    )))
    .execute(&mut *tx.conn().await.unwrap())
    .await
    .unwrap();
    // Follow-up work on the same transaction (an audit row, a cursor) goes on in a task
    // of its own for a moment after the handler answers.
    let held = Arc::new(Notify::new());
    tokio::spawn({
        let (tx, held) = (tx.clone(), held.clone());
        async move {
            let mut conn = tx.conn().await.unwrap();
            held.notify_one();
            let _ = sqlx::query("SELECT pg_sleep(2)").execute(&mut *conn).await;
        }
    });
    held.notified().await;
    (StatusCode::CREATED, "paid").into_response()
}

/// Guards: the lease of an execution is renewed "however long extractors, the work, a
/// streamed result or a completion ... take": while the first request is alive and
/// completing (its transaction still in use, its record not written), a retry with the
/// same key is answered `409` and the handler does not run a second time.
///
/// Before the fix: `Execution::complete_in` drops the `LeaseKeeper` before it even gets the
/// transaction back (`finish()` waits for the spawned task, up to the store timeout), so
/// the lease lapses while the first execution is alive; the retry claims the key and runs
/// the handler again (two runs), and the first request then fails the fencing check and
/// answers `409` for a payment whose handler completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_waiting_for_its_transaction_keeps_its_lease() {
    let schema = PgSchema::create("guard_tx_lease").await;
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
        .lease(Duration::from_millis(300))
        .store_timeout(Duration::from_secs(5))
        .build();
    let app = App {
        table,
        runs: Arc::default(),
    };
    let router = Router::new()
        .route("/pay", post(pay))
        .with_state(app.clone())
        .layer(idem.layer());

    let first = tokio::spawn({
        let router = router.clone();
        async move { send(&router, post_with("/pay", Some("lease-tx"), "")).await }
    });
    common::until(|| app.runs.load(Ordering::SeqCst) == 1).await;

    // Give the lease every chance to lapse (it must not while the first request lives),
    // staying well inside the 2 s the spawned task holds the transaction.
    let live_claim = format!(
        "SELECT count(*) FROM \"{}\".idem_records WHERE expires_at > now()",
        schema.name
    );
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1200);
    while tokio::time::Instant::now() < deadline {
        let live: i64 = sqlx::query_scalar(AssertSqlSafe(live_claim.clone()))
            .fetch_one(store.pool())
            .await
            .unwrap();
        if live == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !first.is_finished(),
        "the first request is still completing"
    );

    let retry = send(&router, post_with("/pay", Some("lease-tx"), "")).await;
    let first = first.await.unwrap();
    let runs = app.runs.load(Ordering::SeqCst);
    assert_eq!(
        runs,
        1,
        "the handler ran {runs} times for one key while its first execution was alive; \
         first answered {} {:?}, the retry {} {:?}",
        first.status,
        String::from_utf8_lossy(&first.body),
        retry.status,
        String::from_utf8_lossy(&retry.body),
    );
}
