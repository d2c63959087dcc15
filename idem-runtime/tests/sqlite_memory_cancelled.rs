//! An in-memory SQLite store never loses its database because idem closed the work's
//! connection (the only connection, which is all the database is).

#![cfg(feature = "sqlite")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use common::{post_with, send};
use idem_runtime::store::{SqliteStore, SqliteTransaction};
use idem_runtime::{Idempotency, idempotent};
use sqlx::Connection as _;
use tokio::sync::Notify;

#[derive(Clone)]
struct Hold {
    started: Arc<Notify>,
    /// Forget the savepoint (leak it) instead of holding it across the await.
    leak: bool,
}

/// Writes a payment, opens a savepoint of its own (`conn.begin()`), writes in it, and then
/// waits (for an outside call, say) while still inside the savepoint.
#[idempotent]
async fn waits_inside_a_savepoint(State(hold): State<Hold>, tx: SqliteTransaction) -> Response {
    let mut conn = tx.conn().await.unwrap();
    sqlx::query("INSERT INTO payments (note) VALUES ('outer')")
        .execute(&mut *conn)
        .await
        .unwrap();
    let mut savepoint = conn.begin().await.unwrap();
    sqlx::query("INSERT INTO payments (note) VALUES ('inner')")
        .execute(&mut *savepoint)
        .await
        .unwrap();
    if hold.leak {
        std::mem::forget(savepoint);
        hold.started.notify_one();
        std::future::pending::<()>().await;
    } else {
        hold.started.notify_one();
        std::future::pending::<()>().await;
        drop(savepoint);
    }
    (StatusCode::CREATED, "never").into_response()
}

#[idempotent]
async fn pay(tx: SqliteTransaction) -> Response {
    let mut conn = tx.conn().await.unwrap();
    match sqlx::query("INSERT INTO payments (note) VALUES ('next')")
        .execute(&mut *conn)
        .await
    {
        Ok(_) => (StatusCode::CREATED, "paid").into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    }
}

async fn memory_store() -> SqliteStore {
    let store = SqliteStore::connect("sqlite::memory:").await.unwrap();
    sqlx::query("CREATE TABLE payments (id INTEGER PRIMARY KEY AUTOINCREMENT, note TEXT NOT NULL)")
        .execute(store.pool())
        .await
        .unwrap();
    store
}

async fn cancel_inside_savepoint(leak: bool) {
    let store = memory_store().await;
    let idem = Idempotency::builder()
        .shared_scope(true)
        .store(store.clone())
        .build();
    let hold = Hold {
        started: Arc::default(),
        leak,
    };
    let routes = Router::new()
        .route("/hold", post(waits_inside_a_savepoint))
        .route("/pay", post(pay))
        .with_state(hold.clone())
        .layer(idem.layer());

    // A request without a key: its work is not detached, a client that goes away drops it.
    let started = hold.started.notified();
    let request = tokio::spawn({
        let routes = routes.clone();
        async move { send(&routes, post_with("/hold", None, "")).await }
    });
    started.await;
    request.abort();
    assert!(request.await.unwrap_err().is_cancelled());

    // The in-memory database must still be there: its table, and idem's.
    let tables: Result<i64, _> = sqlx::query_scalar("SELECT count(*) FROM payments")
        .fetch_one(store.pool())
        .await;
    assert_eq!(
        tables.as_ref().map_err(ToString::to_string),
        Ok(&0),
        "the in-memory database was lost after a cancelled request (leak = {leak})"
    );
    let paid = send(&routes, post_with("/pay", Some("after"), "")).await;
    assert_eq!(
        paid.status,
        StatusCode::CREATED,
        "{:?}",
        String::from_utf8_lossy(&paid.body)
    );
}

/// Guards: a client that goes away while the handler (no key) waits inside a savepoint of
/// its own leaves the in-memory database as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_request_inside_a_savepoint_keeps_the_memory_database() {
    cancel_inside_savepoint(false).await;
}

/// Same, where the work forgot its savepoint before waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_request_with_a_leaked_savepoint_keeps_the_memory_database() {
    cancel_inside_savepoint(true).await;
}
