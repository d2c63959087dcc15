//! `PgTransaction` at its edges: used without `#[idempotent]`, a refusal after a failed
//! statement, a response streamed from the transaction, an unkeyed commit of an aborted
//! transaction.

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
use common::{PaymentsDb, post_with, send};
use idem_runtime::store::PgTransaction;
use idem_runtime::{Idempotency, idempotent};
use sqlx::AssertSqlSafe;

#[derive(Clone)]
struct App {
    table: String,
    runs: Arc<AtomicUsize>,
}

impl App {
    fn new(db: &PaymentsDb) -> Self {
        Self {
            table: db.table(),
            runs: Arc::default(),
        }
    }
}

async fn insert(tx: &PgTransaction, table: &str, note: &str) -> Result<(), sqlx::Error> {
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {table} (note) VALUES ($1)"
    )))
    .bind(note)
    .execute(&mut *tx.conn().await?)
    .await
    .map(|_| ())
}

// ---------------------------------------------------------------------------------------

/// No `#[idempotent]`: nothing would commit the transaction, so it refuses to be used.
async fn plain_pay(State(app): State<App>, tx: PgTransaction) -> Response {
    match insert(&tx, &app.table, "plain").await {
        Ok(()) => (StatusCode::CREATED, "paid").into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    }
}

/// Guards: a handler that takes `PgTransaction` without `#[idempotent]` never answers a
/// success for writes that are rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_transaction_without_idempotent_never_answers_success_for_lost_writes() {
    let db = PaymentsDb::new("tx_edge_plain").await;
    let idem = db.idem();
    let router = Router::new()
        .route("/pay", post(plain_pay))
        .with_state(App::new(&db))
        .layer(idem.layer());
    for key in [Some("k"), None] {
        let answer = send(&router, post_with("/pay", key, "")).await;
        assert_eq!(
            answer.status,
            StatusCode::INTERNAL_SERVER_ERROR,
            "key {key:?}: {:?}",
            String::from_utf8_lossy(&answer.body)
        );
        assert!(
            String::from_utf8_lossy(&answer.body).contains("#[idempotent]"),
            "the error names the fix: {:?}",
            String::from_utf8_lossy(&answer.body)
        );
    }
    assert!(db.notes().await.is_empty());
}

// ---------------------------------------------------------------------------------------

#[idempotent]
async fn pay_once(State(app): State<App>, tx: PgTransaction, body: String) -> Response {
    app.runs.fetch_add(1, Ordering::SeqCst);
    // The payment id is chosen by the client; a duplicate is a client error (409).
    let id: i32 = body.parse().unwrap();
    let inserted = sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {} (id, note) VALUES ($1, 'dup')",
        app.table
    )))
    .bind(id)
    .execute(&mut *tx.conn().await.unwrap())
    .await;
    match inserted {
        Ok(_) => (StatusCode::CREATED, "paid").into_response(),
        Err(error)
            if error
                .as_database_error()
                .is_some_and(|e| e.is_unique_violation()) =>
        {
            (StatusCode::CONFLICT, "payment already exists").into_response()
        }
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Guards: a handler whose statement fails (unique violation) and that answers a 4xx for
/// it gets that 4xx delivered and replayed, though PostgreSQL aborted its transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4xx_after_a_failed_statement_is_delivered_and_replayed() {
    let db = PaymentsDb::new("tx_edge_aborted").await;
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {} (id, note) VALUES (7, 'existing')",
        db.table()
    )))
    .execute(db.store.pool())
    .await
    .unwrap();
    let app = App::new(&db);
    let router = Router::new()
        .route("/pay", post(pay_once))
        .with_state(app.clone())
        .layer(db.idem().layer());
    let first = send(&router, post_with("/pay", Some("dup-7"), "7")).await;
    let retry = send(&router, post_with("/pay", Some("dup-7"), "7")).await;
    assert_eq!(
        (first.status, retry.status, app.runs.load(Ordering::SeqCst)),
        (StatusCode::CONFLICT, StatusCode::CONFLICT, 1),
        "the handler's 409 should be delivered and replayed; got first {:?} / retry {:?}",
        String::from_utf8_lossy(&first.body),
        String::from_utf8_lossy(&retry.body),
    );
}

// ---------------------------------------------------------------------------------------

#[idempotent]
async fn export(State(app): State<App>, tx: PgTransaction) -> Response {
    app.runs.fetch_add(1, Ordering::SeqCst);
    insert(&tx, &app.table, "export").await.unwrap();
    let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(1);
    let table = app.table.clone();
    tokio::spawn(async move {
        let mut conn = tx.conn().await.unwrap();
        // Rows read from the transaction, streamed as they come.
        for n in 0..64 {
            let row: String = sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT repeat('x', 1024) || $1::text /* {} */",
                table
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
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        let chunk = receiver.recv().await?;
        Some((Ok::<_, std::convert::Infallible>(chunk), receiver))
    });
    (StatusCode::OK, Body::from_stream(stream)).into_response()
}

/// Guards: a response streamed from the transaction's connection (a cursor fed into a
/// channel body) and larger than `max_response_bytes` cannot commit while the stream holds
/// the transaction. The request still ends (within the store timeout), never with a
/// success for writes that did not commit, and the export commits at most once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_streamed_from_the_transaction_ends_and_commits_at_most_once() {
    let db = PaymentsDb::new("tx_edge_stream").await;
    let idem = Idempotency::builder()
        .shared_scope(true)
        .store(db.store.clone())
        .max_response_bytes(4096)
        .lease(Duration::from_millis(600))
        .build();
    let app = App::new(&db);
    let router = Router::new()
        .route("/export", post(export))
        .with_state(app.clone())
        .layer(idem.layer());
    let first = tokio::time::timeout(
        Duration::from_secs(5),
        send(&router, post_with("/export", Some("exp"), "")),
    )
    .await;
    let retry = tokio::time::timeout(
        Duration::from_secs(5),
        send(&router, post_with("/export", Some("exp"), "")),
    )
    .await;
    // Free the stuck transaction so the schema can be dropped (else the test never ends).
    sqlx::query(AssertSqlSafe(format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE state = 'idle in transaction' AND query LIKE '%{}%' AND pid <> pg_backend_pid()",
        db.schema.name
    )))
    .execute(db.store.pool())
    .await
    .unwrap();
    let (first, retry) = (
        first.expect("the first request ended"),
        retry.expect("the retry ended"),
    );
    let exports = db.notes().await;
    assert!(exports.len() <= 1, "committed twice: {exports:?}");
    if first.status.is_success() {
        assert_eq!(
            exports,
            ["export"],
            "a success for an export that did not commit"
        );
    }
    assert!(
        !retry.status.is_success() || exports == ["export"],
        "the retry answered {} with no committed export",
        retry.status
    );
}

// ---------------------------------------------------------------------------------------

async fn lenient_pay(tx: &PgTransaction, table: &str) -> Response {
    insert(tx, table, "payment").await.unwrap();
    // An optional extra the handler does not insist on (a duplicate tag is fine).
    let _ = sqlx::query("SELECT 1/0")
        .execute(&mut *tx.conn().await.unwrap())
        .await;
    (StatusCode::CREATED, "paid").into_response()
}

#[idempotent]
async fn lenient(State(app): State<App>, tx: PgTransaction) -> Response {
    lenient_pay(&tx, &app.table).await
}

/// Guards: the COMMIT of a transaction PostgreSQL aborted is a rollback; with or without a
/// key, the client never gets a success for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commit_of_an_aborted_transaction_never_answers_success() {
    let db = PaymentsDb::new("tx_edge_unkeyed_abort").await;
    let router = Router::new()
        .route("/pay", post(lenient))
        .with_state(App::new(&db))
        .layer(db.idem().layer());
    let keyed = send(&router, post_with("/pay", Some("k"), "")).await;
    assert_ne!(
        keyed.status,
        StatusCode::CREATED,
        "keyed: no success for undone writes"
    );
    let unkeyed = send(&router, post_with("/pay", None, "")).await;
    if unkeyed.status == StatusCode::CREATED {
        assert_eq!(
            db.notes().await,
            ["payment"],
            "unkeyed: 201 for a payment that never committed"
        );
    }
}

/// Writes after its guard's `run` answered, through the request's transaction.
async fn writes_after_run(
    State(app): State<App>,
    guard: idem_runtime::Idempotent,
    tx: PgTransaction,
) -> Response {
    let answer = guard.run(async { (StatusCode::CREATED, "paid") }).await;
    if let Ok(mut conn) = tx.conn().await {
        app.runs.fetch_add(1, Ordering::SeqCst);
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (note) VALUES ('after the answer')",
            app.table
        )))
        .execute(&mut *conn)
        .await
        .unwrap();
    }
    answer.into_response()
}

/// Guards: once a guard refused a keyed request without an identity, the request's
/// transaction is finished, as after a replay: `conn()` errs, rather than opening a
/// transaction nothing would commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_is_finished_once_a_request_without_identity_is_refused() {
    let db = PaymentsDb::new("refused_unscoped").await;
    let app = App::new(&db);
    let idem = Idempotency::builder().store(db.store.clone()).build();
    let router = Router::new()
        .route("/pay", post(writes_after_run))
        .with_state(app.clone())
        .layer(idem.layer());
    let refused = send(&router, post_with("/pay", Some("anonymous"), "")).await;
    refused.assert_problem(
        StatusCode::BAD_REQUEST,
        idem_runtime::Problem::SCOPE_MISSING,
    );
    assert_eq!(
        app.runs.load(Ordering::SeqCst),
        0,
        "conn() opened a transaction after the refusal"
    );
    assert!(db.notes().await.is_empty());
}
