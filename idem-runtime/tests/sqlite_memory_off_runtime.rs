//! The last handle of a `SqliteTransaction` whose work was given up (a client gone from
//! a request without a key), dropped on a plain thread the handler gave a clone to while
//! the runtime lives on: nothing panics, and the in-memory database survives.

#![cfg(feature = "sqlite")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use common::{post_with, send};
use idem_runtime::store::{SqliteStore, SqliteTransaction};
use idem_runtime::{Idempotency, idempotent};
use tokio::sync::Notify;

#[derive(Clone)]
struct App {
    started: Arc<Notify>,
    /// Where the handler leaves a clone of its transaction (for a worker thread).
    handed: Arc<Mutex<Option<std::sync::mpsc::Sender<SqliteTransaction>>>>,
}

/// Writes, hands a clone of its transaction to a plain thread (a sync worker, a rayon
/// pool), then waits (for an outside call).
#[idempotent]
async fn writes_and_waits(State(app): State<App>, tx: SqliteTransaction) -> Response {
    sqlx::query("INSERT INTO payments (note) VALUES ('pending')")
        .execute(&mut *tx.conn().await.unwrap())
        .await
        .unwrap();
    if let Some(sender) = app.handed.lock().unwrap().take() {
        sender.send(tx.clone()).unwrap();
    }
    app.started.notify_one();
    std::future::pending::<()>().await;
    (StatusCode::CREATED, "never").into_response()
}

async fn memory_store() -> SqliteStore {
    let store = SqliteStore::connect("sqlite::memory:").await.unwrap();
    sqlx::query("CREATE TABLE payments (id INTEGER PRIMARY KEY AUTOINCREMENT, note TEXT NOT NULL)")
        .execute(store.pool())
        .await
        .unwrap();
    store
}

fn routes(store: &SqliteStore, app: App) -> Router {
    let idem = Idempotency::builder()
        .shared_scope(true)
        .store(store.clone())
        .build();
    Router::new()
        .route("/hold", post(writes_and_waits))
        .with_state(app)
        .layer(idem.layer())
}

/// Guards: a clone of the work's transaction, dropped on a plain thread after the client
/// went away, ends the transaction on the runtime it began on (closing the connection
/// there, which is all an in-memory database is, lost the database, and sqlx panicked
/// for want of a runtime).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_clone_dropped_off_the_runtime_keeps_the_memory_database() {
    let store = memory_store().await;
    let (sender, receiver) = std::sync::mpsc::channel::<SqliteTransaction>();
    let app = App {
        started: Arc::default(),
        handed: Arc::new(Mutex::new(Some(sender))),
    };
    let routes = routes(&store, app.clone());
    let (drop_now, wait_for_it) = std::sync::mpsc::channel::<()>();
    let worker = std::thread::spawn(move || {
        let clone = receiver.recv().unwrap();
        wait_for_it.recv().unwrap();
        drop(clone);
    });

    let started = app.started.notified();
    let request = tokio::spawn({
        let routes = routes.clone();
        async move { send(&routes, post_with("/hold", None, "")).await }
    });
    started.await;
    request.abort();
    assert!(request.await.unwrap_err().is_cancelled());
    drop_now.send(()).unwrap();
    let joined = tokio::task::spawn_blocking(move || worker.join())
        .await
        .unwrap();
    let panicked = joined.err().map(|panic| {
        panic
            .downcast_ref::<&str>()
            .map(ToString::to_string)
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default()
    });

    let tables: Result<i64, String> = sqlx::query_scalar("SELECT count(*) FROM payments")
        .fetch_one(store.pool())
        .await
        .map_err(|error| error.to_string());
    assert_eq!(
        (panicked, tables),
        (None, Ok(0)),
        "dropping the cancelled work's last SqliteTransaction off the runtime: (panic on that \
         thread, the in-memory database's payments afterwards)"
    );
}
