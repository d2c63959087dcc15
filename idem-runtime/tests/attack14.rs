//! Attack 14: hostile review of `PgTransaction` and transactional completion.

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

struct Db {
    schema: PgSchema,
    store: PostgresStore,
}

impl Db {
    async fn new(test: &str) -> Self {
        let schema = PgSchema::create(test).await;
        let store = PostgresStore::builder(schema.url.as_str())
            .schema(schema.name.as_str())
            .connect()
            .await
            .unwrap();
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE \"{}\".payments (id serial PRIMARY KEY, note text NOT NULL)",
            schema.name
        )))
        .execute(store.pool())
        .await
        .unwrap();
        Self { schema, store }
    }

    fn table(&self) -> String {
        format!("\"{}\".payments", self.schema.name)
    }

    async fn notes(&self) -> Vec<String> {
        sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT note FROM {} ORDER BY id",
            self.table()
        )))
        .fetch_all(self.store.pool())
        .await
        .unwrap()
    }

    fn idem(&self) -> Idempotency {
        Idempotency::builder()
            .shared_scope(true)
            .store(self.store.clone())
            .build()
    }
}

#[derive(Clone)]
struct App {
    table: String,
    runs: Arc<AtomicUsize>,
}

impl App {
    fn new(db: &Db) -> Self {
        Self {
            table: db.table(),
            runs: Arc::default(),
        }
    }
}

async fn insert(tx: &PgTransaction, table: &str, note: &str) -> Result<(), sqlx::Error> {
    sqlx::query(AssertSqlSafe(format!("INSERT INTO {table} (note) VALUES ($1)")))
        .bind(note)
        .execute(&mut *tx.conn().await?)
        .await
        .map(|_| ())
}

// ---------------------------------------------------------------------------------------
// Finding 1: a handler taking `PgTransaction` without `#[idempotent]` answers 201 while
// its writes are silently rolled back.

/// No `#[idempotent]`: the extractor hands out a transaction that nobody commits.
async fn plain_pay(State(app): State<App>, tx: PgTransaction) -> Response {
    insert(&tx, &app.table, "plain").await.unwrap();
    (StatusCode::CREATED, "paid").into_response()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_transaction_without_idempotent_answers_success_for_lost_writes() {
    let db = Db::new("a14_plain").await;
    let idem = db.idem();
    let router = Router::new()
        .route("/pay", post(plain_pay))
        .with_state(App::new(&db))
        .layer(idem.layer());
    for key in [Some("k"), None] {
        let answer = send(&router, post_with("/pay", key, "")).await;
        if answer.status.is_success() {
            assert_eq!(
                db.notes().await,
                ["plain"],
                "the client got {} for a write that never committed (key {key:?})",
                answer.status
            );
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Finding 2: a handler whose statement fails (unique violation) and that answers a 4xx
// for it gets a 503 "store unavailable" instead, every time: its 4xx is never delivered
// nor stored, and every retry runs the handler again.

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
        Err(error) if error.as_database_error().is_some_and(|e| e.is_unique_violation()) => {
            (StatusCode::CONFLICT, "payment already exists").into_response()
        }
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4xx_after_a_failed_statement_is_turned_into_503_for_ever() {
    let db = Db::new("a14_aborted").await;
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

