//! a `5xx` whose body streams from the handler's `PgTransaction`.

#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use common::{PgSchema, post_with, send};
use idem_runtime::store::{PgTransaction, PostgresStore};
use idem_runtime::{Idempotency, idempotent};
use sqlx::AssertSqlSafe;

#[derive(Clone)]
struct App {
    table: String,
    runs: Arc<AtomicUsize>,
}

/// An export that fails part way and says so with a `503` whose body streams the rows
/// read so far from its transaction (the same shape as the `export` handler of
/// `transaction_edges.rs`, with an error status).
#[idempotent]
async fn export(State(app): State<App>, tx: PgTransaction) -> Response {
    app.runs.fetch_add(1, Ordering::SeqCst);
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {} (note) VALUES ('export')",
        app.table
    )))
    .execute(&mut *tx.conn().await.unwrap())
    .await
    .unwrap();
    let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(1);
    let table = app.table.clone();
    let streaming = Arc::new(tokio::sync::Notify::new());
    let started = streaming.clone();
    tokio::spawn(async move {
        let mut conn = tx.conn().await.unwrap();
        started.notify_one();
        for n in 0..64 {
            let row: String = sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT repeat('x', 64) || $1::text /* {table} */"
            )))
            .bind(n.to_string())
            .fetch_one(&mut *conn)
            .await
            .unwrap();
            if sender.send(Bytes::from(row)).await.is_err() {
                return;
            }
        }
    });
    // The stream has started reading when the handler answers.
    streaming.notified().await;
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        let chunk = receiver.recv().await?;
        Some((Ok::<_, std::convert::Infallible>(chunk), receiver))
    });
    (StatusCode::SERVICE_UNAVAILABLE, Body::from_stream(stream)).into_response()
}

/// Guards: like a success streamed from the transaction (README: "the request ends
/// after the store timeout with a `503` and nothing committed"), a `5xx` streamed from it
/// ends in bounded time, its writes rolled back and its key released, so that the retry
/// runs again.
///
/// Before the fix: the `5xx` path (`store_response` -> `Execution::release` ->
/// `TransactionSlot::roll_back` -> `PgTransaction::rollback`) waits, without the store
/// timeout, for the transaction's lock, which the streaming task holds while it waits for
/// the body to be read; the body is only handed out after the release. Deadlock: the
/// request never ends, and its lease keeper, still alive, renews the claim for ever, so
/// every retry is answered `409` for ever (and `shutdown` never sees it end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_streamed_from_the_transaction_ends_and_releases_the_key() {
    let schema = PgSchema::create("guard_tx_5xx_stream").await;
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
        .store_timeout(Duration::from_secs(1))
        .lease(Duration::from_millis(600))
        .build();
    let app = App {
        table,
        runs: Arc::default(),
    };
    let router = Router::new()
        .route("/export", post(export))
        .with_state(app.clone())
        .layer(idem.layer());

    let first = tokio::time::timeout(
        Duration::from_secs(6),
        send(&router, post_with("/export", Some("exp-5xx"), "")),
    )
    .await;
    // A retry well after the store timeout and many leases.
    let retry = tokio::time::timeout(
        Duration::from_secs(6),
        send(&router, post_with("/export", Some("exp-5xx"), "")),
    )
    .await;

    // Free the stuck transaction so the schema can be dropped.
    sqlx::query(AssertSqlSafe(format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE state LIKE 'idle in transaction%' AND query LIKE '%{}%' \
         AND pid <> pg_backend_pid()",
        schema.name
    )))
    .execute(store.pool())
    .await
    .unwrap();

    let retried = retry.as_ref().map(|retry| {
        (
            retry.status,
            String::from_utf8_lossy(&retry.body).into_owned(),
        )
    });
    let first = first.unwrap_or_else(|_| {
        panic!(
            "the first request (a 503 streamed from its transaction) never ended; \
             the retry 6 s later (10 leases) got {retried:?}"
        )
    });
    assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE);
    let retry = retry.expect("the retry never ended");
    assert_eq!(
        app.runs.load(Ordering::SeqCst),
        2,
        "the 5xx released the key, so the retry runs again; it answered {} {:?}",
        retry.status,
        String::from_utf8_lossy(&retry.body)
    );
}
