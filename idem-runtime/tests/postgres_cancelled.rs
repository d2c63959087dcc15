//! `PgTransaction`: the connection idem owns goes back to the pool in no transaction,
//! whatever the work does with `conn()` (including giving up on it), and a PostgreSQL
//! transaction recovered through a savepoint commits with its record.

#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use common::{GiveUpAfter, PaymentsDb, PgSchema, post_with, send};
use idem_runtime::store::{PgTransaction, PostgresStore};
use idem_runtime::{Idempotency, idempotent};
use sqlx::{AssertSqlSafe, Connection as _};

#[derive(Clone)]
struct Polls(Arc<AtomicUsize>);

/// Asks for the transaction's connection, but gives up on it after a few polls (a
/// deadline of the handler's own) and answers `503`, writing nothing.
#[idempotent]
async fn gives_up_on_the_connection(State(polls): State<Polls>, tx: PgTransaction) -> Response {
    let left = polls.0.load(Ordering::SeqCst);
    let got = GiveUpAfter {
        inner: Box::pin(tx.conn()),
        left,
    }
    .await;
    match got {
        Some(Ok(_conn)) => (StatusCode::OK, "got the connection in time").into_response(),
        Some(Err(error)) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "gave up waiting").into_response(),
    }
}

/// A handler that writes nothing of its own.
#[idempotent]
async fn plain() -> Response {
    (StatusCode::CREATED, "done").into_response()
}

/// Whether the store's (only) pooled connection is inside the transaction a
/// `PgTransaction` begins (its `SET LOCAL idem.work = 'open'` still in force).
async fn pooled_connection_in_work_transaction(store: &PostgresStore) -> bool {
    let mut conn = store.pool().acquire().await.unwrap();
    let open: Option<String> = sqlx::query_scalar("SELECT current_setting('idem.work', true)")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    open.as_deref() == Some("open")
}

/// Guards: work that gives up on `tx.conn()` while idem's `BEGIN` is on the wire leaves
/// the pooled connection in no transaction. Here it is left inside the work's `BEGIN`:
/// every later statement of the store on that connection (claims, records) runs in a
/// transaction nothing commits, invisible to every other connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn giving_up_on_conn_leaves_no_transaction_open() {
    let schema = PgSchema::create("giveup").await;
    let store = PostgresStore::builder(schema.url.as_str())
        .schema(schema.name.as_str())
        .max_connections(1)
        .connect()
        .await
        .unwrap();
    let idem = Idempotency::builder()
        .shared_scope(true)
        .store(store.clone())
        .build();
    let polls = Polls(Arc::default());
    let routes = Router::new()
        .route("/giveup", post(gives_up_on_the_connection))
        .route("/plain", post(plain))
        .with_state(polls.clone())
        .layer(idem.layer());

    let mut left_open_at = None;
    'rounds: for _round in 0..50 {
        for left in 1..=6 {
            polls.0.store(left, Ordering::SeqCst);
            let answer = send(&routes, post_with("/giveup", None, "")).await;
            if answer.status == StatusCode::OK {
                // Got the connection in time: more polls get it too.
                break;
            }
            if pooled_connection_in_work_transaction(&store).await {
                left_open_at = Some((left, answer.status));
                break 'rounds;
            }
        }
    }

    // What it costs: a keyed request answered 201 whose record no other connection (no
    // other replica) can see.
    let done = send(&routes, post_with("/plain", Some("seen"), "")).await;
    assert_eq!(done.status, StatusCode::CREATED);
    let mut other = sqlx::PgConnection::connect(&schema.url).await.unwrap();
    let records: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM \"{}\".idem_records",
        schema.name
    )))
    .fetch_one(&mut other)
    .await
    .unwrap();
    // Let the schema go: close the pool (and a transaction left open on it) first.
    drop(routes);
    drop(idem);
    store.pool().close().await;

    assert_eq!(
        left_open_at, None,
        "the pooled connection was left inside the work's transaction after the work gave up on conn() (polls, answer); then a keyed request was answered {} and other connections see {records} idem records",
        done.status
    );
    assert_eq!(
        records, 1,
        "the record of a request answered 201 is not visible outside the poisoned connection"
    );
}

#[derive(Clone)]
struct Payments {
    table: String,
    runs: Arc<AtomicUsize>,
}

/// Writes a payment, then in a savepoint a statement that fails (aborting the
/// transaction on PostgreSQL), rolls the savepoint back (which recovers the
/// transaction), writes a second payment, and answers `201`.
#[idempotent]
async fn recovers_through_a_savepoint(State(app): State<Payments>, tx: PgTransaction) -> Response {
    app.runs.fetch_add(1, Ordering::SeqCst);
    let mut conn = tx.conn().await.unwrap();
    let insert = |note: &str| {
        AssertSqlSafe(format!(
            "INSERT INTO {} (note) VALUES ('{note}')",
            app.table
        ))
    };
    sqlx::query(insert("before"))
        .execute(&mut *conn)
        .await
        .unwrap();
    {
        let mut savepoint = conn.begin().await.unwrap();
        sqlx::query(insert("undone"))
            .execute(&mut *savepoint)
            .await
            .unwrap();
        let failed = sqlx::query("SELECT 1/0").execute(&mut *savepoint).await;
        assert!(failed.is_err());
        savepoint.rollback().await.unwrap();
    }
    sqlx::query(insert("after"))
        .execute(&mut *conn)
        .await
        .unwrap();
    (StatusCode::CREATED, "paid").into_response()
}

/// Guards: the recovery PostgreSQL allows (rolling back to a savepoint from before the
/// failed statement) commits the work's writes with its record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_recovered_through_a_savepoint_commits() {
    let db = PaymentsDb::new("recover").await;
    let app = Payments {
        table: db.table(),
        runs: Arc::default(),
    };
    let routes = Router::new()
        .route("/pay", post(recovers_through_a_savepoint))
        .with_state(app.clone())
        .layer(db.idem().layer());
    let first = send(&routes, post_with("/pay", Some("k"), "")).await;
    let notes = db.notes().await;
    let second = send(&routes, post_with("/pay", Some("k"), "")).await;
    let unkeyed = send(&routes, post_with("/pay", None, "")).await;
    assert_eq!(
        (first.status, notes.clone()),
        (
            StatusCode::CREATED,
            vec!["before".to_owned(), "after".to_owned()]
        ),
        "{:?}",
        String::from_utf8_lossy(&first.body)
    );
    assert_eq!(second.status, StatusCode::CREATED);
    assert_eq!(
        app.runs.load(Ordering::SeqCst),
        2,
        "replayed, then the unkeyed one ran"
    );
    assert_eq!(unkeyed.status, StatusCode::CREATED);
    assert_eq!(db.notes().await, ["before", "after", "before", "after"]);
}
