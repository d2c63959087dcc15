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

