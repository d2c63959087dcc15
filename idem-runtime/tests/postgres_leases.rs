//! Leases of executions that write in a `PgTransaction`: renewed while every connection of
//! the pool is held by such work, and a transaction the database refuses to commit (a
//! serialization failure) answered for what it is.

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
use common::{PaymentsDb, PgSchema, eventually, post_with, send};
use idem_runtime::store::{PgTransaction, PostgresStore};
use idem_runtime::{Idempotency, idempotent};
use sqlx::AssertSqlSafe;
use tokio::sync::watch;

/// A payment that writes its row, then waits for its gate before answering.
#[derive(Clone)]
struct Slow {
    table: String,
    name: &'static str,
    runs: Arc<AtomicUsize>,
    started: Arc<AtomicUsize>,
    gate: watch::Receiver<bool>,
    /// Set the transaction's isolation to `REPEATABLE READ` first.
    repeatable_read: bool,
}

impl Slow {
    fn new(db: &PaymentsDb, name: &'static str, gate: watch::Receiver<bool>) -> Self {
        Self {
            table: db.table(),
            name,
            runs: Arc::default(),
            started: Arc::default(),
            gate,
            repeatable_read: false,
        }
    }
}

#[idempotent]
async fn pay_slowly(State(app): State<Slow>, tx: PgTransaction) -> Response {
    app.runs.fetch_add(1, Ordering::SeqCst);
    {
        let mut conn = tx.conn().await.unwrap();
        if app.repeatable_read {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                .execute(&mut *conn)
                .await
                .unwrap();
        }
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (note) VALUES ($1)",
            app.table
        )))
        .bind(app.name)
        .execute(&mut *conn)
        .await
        .unwrap();
    }
    app.started.fetch_add(1, Ordering::SeqCst);
    app.gate.clone().wait_for(|open| *open).await.unwrap();
    (StatusCode::CREATED, format!("paid by {}", app.name)).into_response()
}

fn router(idem: &Idempotency, app: &Slow) -> Router {
    Router::new()
        .route("/pay", post(pay_slowly))
        .with_state(app.clone())
        .layer(idem.layer())
}

/// When the lease of the claim under the scoped key ending in `key` ends, in milliseconds
/// since the epoch, read from the table in `schema` through `pool`.
async fn lease_end_ms(pool: &sqlx::PgPool, schema: &str, key: &str) -> f64 {
    sqlx::query_scalar::<_, f64>(AssertSqlSafe(format!(
        "SELECT (extract(epoch FROM expires_at) * 1000)::float8 FROM \"{schema}\".idem_records WHERE key LIKE '%:' || $1"
    )))
    .bind(key)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Waits until the lease of `key` ends `by` later than it did when this was called.
async fn renewed_by(db: &PaymentsDb, key: &str, by: Duration) -> bool {
    renewed_in(db.store.pool(), &db.schema.name, key, by).await
}

/// [`renewed_by`], for the table in `schema`, read through `pool`.
async fn renewed_in(pool: &sqlx::PgPool, schema: &str, key: &str, by: Duration) -> bool {
    let first = lease_end_ms(pool, schema, key).await;
    for _ in 0..1000 {
        if lease_end_ms(pool, schema, key).await >= first + by.as_millis() as f64 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Guards: lease renewals never wait for a connection of the pool. With every one of its
/// connections held by a slow payment's transaction, each payment's lease is still
/// renewed, so a retry on another instance is told the payment runs (`409`) instead of
/// taking the key over and paying a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_full_of_transactions_never_stops_a_lease_renewal() {
    let db = PaymentsDb::new("pool_full").await;
    let pool_size = 4;
    let store = PostgresStore::builder(db.schema.url.as_str())
        .schema(db.schema.name.as_str())
        .max_connections(pool_size)
        .connect()
        .await
        .unwrap();
    let lease = Duration::from_millis(600);
    let first_idem = Idempotency::builder()
        .shared_scope(true)
        .store(store)
        .lease(lease)
        .build();
    let (open, gate) = watch::channel(false);
    let first = Slow::new(&db, "first", gate);
    let first_router = router(&first_idem, &first);
    let calls: Vec<_> = (0..pool_size)
        .map(|n| {
            let router = first_router.clone();
            tokio::spawn(async move {
                send(&router, post_with("/pay", Some(&format!("full-{n}")), "")).await
            })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(10), || first
            .started
            .load(Ordering::SeqCst)
            == pool_size as usize)
        .await,
        "every payment holds a connection"
    );
    // Three leases' worth of renewals while no connection of the pool is free.
    assert!(
        renewed_by(&db, "full-0", lease * 3).await,
        "the lease of a running payment was renewed while its pool was full"
    );

    // Another instance gets the client's retry of one of them.
    let (_open, opened) = watch::channel(true);
    let second = Slow::new(&db, "second", opened);
    let second_idem = Idempotency::builder()
        .shared_scope(true)
        .store(db.store.clone())
        .lease(lease)
        .build();
    let retry = send(
        &router(&second_idem, &second),
        post_with("/pay", Some("full-0"), ""),
    )
    .await;
    assert_eq!(
        (retry.status, second.runs.load(Ordering::SeqCst)),
        (StatusCode::CONFLICT, 0),
        "the retry found the payment running: {:?}",
        String::from_utf8_lossy(&retry.body)
    );
    open.send(true).unwrap();
    for call in calls {
        assert_eq!(call.await.unwrap().status, StatusCode::CREATED);
    }
    assert_eq!(db.notes().await, vec!["first"; pool_size as usize]);
}

/// Guards: work in a `REPEATABLE READ` transaction that outlives a lease renewal has its
/// fencing write refused by the database (the renewal changed the claim's row after the
/// work's snapshot). The client is told its writes were rolled back, not that the request
/// never ran, and the key is released at once: the retry pays, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_commit_is_answered_as_rolled_back_and_frees_the_key() {
    let db = PaymentsDb::new("refused_commit").await;
    let lease = Duration::from_millis(600);
    let idem = Idempotency::builder()
        .shared_scope(true)
        .store(db.store.clone())
        .lease(lease)
        .build();
    let (open, gate) = watch::channel(false);
    let mut app = Slow::new(&db, "rr", gate);
    app.repeatable_read = true;
    let router = router(&idem, &app);
    let call = tokio::spawn({
        let router = router.clone();
        async move { send(&router, post_with("/pay", Some("rr"), "")).await }
    });
    assert!(
        eventually(Duration::from_secs(10), || app
            .started
            .load(Ordering::SeqCst)
            == 1)
        .await
    );
    assert!(renewed_by(&db, "rr", lease / 10).await, "a renewal landed");
    open.send(true).unwrap();
    let answer = call.await.unwrap();
    let body = String::from_utf8_lossy(&answer.body).into_owned();
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("rolled back"), "{body}");
    assert!(!body.contains("not executed"), "{body}");
    assert!(answer.headers.contains_key("retry-after"), "{body}");
    assert!(db.notes().await.is_empty(), "nothing was kept");

    // The key is free at once: the retry runs (its gate is open), and pays once.
    let retry = send(&router, post_with("/pay", Some("rr"), "")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert_eq!(db.notes().await, ["rr"]);
    assert_eq!(app.runs.load(Ordering::SeqCst), 2);
}

/// A handler that counts its start, then waits for its gate.
#[idempotent]
async fn wait_for_gate(
    State((gate, started)): State<(watch::Receiver<bool>, Arc<AtomicUsize>)>,
) -> StatusCode {
    started.fetch_add(1, Ordering::SeqCst);
    gate.clone().wait_for(|open| *open).await.unwrap();
    StatusCode::CREATED
}

/// Guards: on an application's pool whose connections choose their schema as they
/// connect (`SET search_path` in `after_connect`, which the store's renewal connections
/// do not run), with no schema given to the store, the store connects, and leases are
/// renewed in the store's own table, the one its claims are in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_find_the_table_a_pool_chose_by_its_search_path() {
    renewals_in_the_pools_schema(false).await;
}

/// Guards: the same where the connections' default schema (before `after_connect`) holds
/// a table of the same name, another store's: renewals never go there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_never_go_to_a_table_of_the_same_name_elsewhere() {
    renewals_in_the_pools_schema(true).await;
}

async fn renewals_in_the_pools_schema(another_table_by_default: bool) {
    let schema = PgSchema::create("search_path").await;
    let other = PgSchema::create("search_path_other").await;
    let mut options: sqlx::postgres::PgConnectOptions = schema.url.parse().unwrap();
    if another_table_by_default {
        PostgresStore::builder(other.url.as_str())
            .schema(other.name.as_str())
            .connect()
            .await
            .unwrap();
        options = options.options([("search_path", format!("\"{}\"", other.name))]);
    }
    let name = schema.name.clone();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .after_connect(move |connection, _| {
            let name = name.clone();
            Box::pin(async move {
                sqlx::query(AssertSqlSafe(format!("SET search_path TO \"{name}\"")))
                    .execute(connection)
                    .await
                    .map(drop)
            })
        })
        .connect_with(options)
        .await
        .unwrap();
    let store = PostgresStore::from_pool(pool.clone())
        .connect()
        .await
        .unwrap();
    let lease = Duration::from_millis(600);
    let idem = Idempotency::builder()
        .shared_scope(true)
        .store(store)
        .lease(lease)
        .build();
    let (open, gate) = watch::channel(false);
    let started = Arc::new(AtomicUsize::new(0));
    let router = Router::new()
        .route("/pay", post(wait_for_gate))
        .with_state((gate, started.clone()))
        .layer(idem.layer());
    let call = tokio::spawn({
        let router = router.clone();
        async move { send(&router, post_with("/pay", Some("path"), "")).await }
    });
    assert!(
        eventually(Duration::from_secs(10), || started.load(Ordering::SeqCst)
            == 1)
        .await,
        "the request holds its key"
    );
    assert!(
        renewed_in(&pool, &schema.name, "path", lease * 2).await,
        "the lease in the store's table was renewed"
    );
    open.send(true).unwrap();
    assert_eq!(call.await.unwrap().status, StatusCode::CREATED);
    let again = send(&router, post_with("/pay", Some("path"), "")).await;
    assert!(again.is_replay(), "{again:?}");
}
