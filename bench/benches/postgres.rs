//! PostgreSQL: whole requests through a Router on `PostgresStore`, each beside a floor of
//! the same handler making the raw statements itself on the same pool. Needs the
//! `postgres` feature and PostgreSQL at `IDEM_BENCH_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`); works in a schema of its own, dropped at
//! the end.
//!
//! `cargo bench -p idem-bench --features postgres --bench postgres`

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use criterion::{Criterion, criterion_group, criterion_main};
use idem_bench::in_process::request;
use idem_runtime::store::{PgTransaction, PostgresStore};
use idem_runtime::{Idempotency, idempotent};
use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, Connection};
use tower::ServiceExt;

/// The pool and the tables the handlers write to.
#[derive(Clone)]
struct Db {
    pool: PgPool,
    /// The floor's stand-in for idem's table.
    records: String,
    /// The business table.
    payments: String,
}

/// The floor of a keyed request: claim with `INSERT ... ON CONFLICT`, and in the same
/// statement read what is there on a replay (a replay must answer with the stored
/// response), complete with `UPDATE`: the statements idem's store makes, written by hand.
async fn floor(State(db): State<Db>, headers: HeaderMap, body: Bytes) -> (StatusCode, Bytes) {
    let key = headers
        .get("idempotency-key")
        .and_then(|key| key.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let stored: Option<Vec<u8>> = sqlx::query_scalar(AssertSqlSafe(format!(
        "WITH claimed AS ( \
            INSERT INTO {t} (key, value, expires_at) VALUES ($1, 'claim', now() + interval '1 minute') \
            ON CONFLICT (key) DO NOTHING RETURNING 1 \
         ) \
         SELECT value FROM {t} WHERE key = $1 AND NOT EXISTS (SELECT 1 FROM claimed)",
        t = db.records
    )))
    .bind(&key)
    .fetch_optional(&db.pool)
    .await
    .unwrap_or(None);
    if let Some(stored) = stored {
        return (StatusCode::CREATED, Bytes::from(stored));
    }
    let _ = sqlx::query(AssertSqlSafe(format!(
        "UPDATE {} SET value = $2, expires_at = now() + interval '1 day' WHERE key = $1 AND value = 'claim'",
        db.records
    )))
    .bind(&key)
    .bind(body.as_ref())
    .execute(&db.pool)
    .await;
    (StatusCode::CREATED, body)
}

#[idempotent]
async fn guarded(body: Bytes) -> (StatusCode, Bytes) {
    (StatusCode::CREATED, body)
}

/// The business write in a transaction of the handler's own.
async fn own_transaction(State(db): State<Db>, body: Bytes) -> (StatusCode, Bytes) {
    let mut tx = db.pool.begin().await.expect("begin");
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {} (body) VALUES ($1)",
        db.payments
    )))
    .bind(body.as_ref())
    .execute(&mut *tx)
    .await
    .expect("insert");
    tx.commit().await.expect("commit");
    (StatusCode::CREATED, body)
}

/// The same write in idem's transaction, which commits with the record.
#[idempotent]
async fn in_idem_transaction(
    State(db): State<Db>,
    tx: PgTransaction,
    body: Bytes,
) -> (StatusCode, Bytes) {
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {} (body) VALUES ($1)",
        db.payments
    )))
    .bind(body.as_ref())
    .execute(&mut *tx.conn().await.expect("connection"))
    .await
    .expect("insert");
    (StatusCode::CREATED, body)
}

fn postgres(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let url = std::env::var("IDEM_BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let schema = format!("idem_bench_{}", std::process::id());
    let (db, idem) = runtime.block_on(async {
        let mut admin = sqlx::PgConnection::connect(&url).await.expect("PostgreSQL");
        for statement in [
            format!("CREATE SCHEMA \"{schema}\""),
            format!("CREATE TABLE \"{schema}\".floor (key text COLLATE \"C\" PRIMARY KEY, value bytea NOT NULL, expires_at timestamptz NOT NULL)"),
            // The shape of idem's table: without the index on the expiry, expired rows
            // could only be found by reading the whole table.
            format!("CREATE INDEX ON \"{schema}\".floor (expires_at)"),
            format!("CREATE TABLE \"{schema}\".payments (id bigserial PRIMARY KEY, body bytea NOT NULL)"),
        ] {
            sqlx::query(AssertSqlSafe(statement)).execute(&mut admin).await.expect("set-up");
        }
        let store = PostgresStore::builder(url.as_str())
            .schema(schema.as_str())
            .connect()
            .await
            .expect("store");
        let db = Db {
            pool: store.pool().clone(),
            records: format!("\"{schema}\".floor"),
            payments: format!("\"{schema}\".payments"),
        };
        let idem = Idempotency::builder()
            .shared_scope(true)
            .store(store)
            .lease(Duration::from_secs(30))
            .build();
        (db, idem)
    });
    let app = Router::new()
        .route("/floor", post(floor))
        .route("/own-transaction", post(own_transaction))
        .with_state(db.clone())
        .merge(
            Router::new()
                .route("/idem", post(guarded))
                .route("/idem-transaction", post(in_idem_transaction))
                .with_state(db)
                .layer(idem.layer()),
        );
    let counter = AtomicU64::new(0);
    let fresh = || Some(format!("k-{}", counter.fetch_add(1, Ordering::Relaxed)));
    let mut group = c.benchmark_group("postgres");
    for (name, path) in [
        ("floor first execution", "/floor"),
        ("idem first execution", "/idem"),
        ("own transaction, no key", "/own-transaction"),
        ("idem transaction first execution", "/idem-transaction"),
    ] {
        group.bench_function(name, |b| {
            b.to_async(&runtime)
                .iter(|| app.clone().oneshot(request(path, fresh())))
        });
    }
    for path in ["/floor", "/idem"] {
        runtime
            .block_on(app.clone().oneshot(request(path, Some("hit".into()))))
            .expect("prime");
    }
    group.bench_function("floor replay", |b| {
        b.to_async(&runtime)
            .iter(|| app.clone().oneshot(request("/floor", Some("hit".into()))))
    });
    group.bench_function("idem replay", |b| {
        b.to_async(&runtime)
            .iter(|| app.clone().oneshot(request("/idem", Some("hit".into()))))
    });
    group.finish();
    runtime.block_on(async {
        let mut admin = sqlx::PgConnection::connect(&url).await.expect("PostgreSQL");
        sqlx::query(AssertSqlSafe(format!("DROP SCHEMA \"{schema}\" CASCADE")))
            .execute(&mut admin)
            .await
            .expect("drop the bench's schema");
    });
}

criterion_group!(benches, postgres);
criterion_main!(benches);
