//! The SQLite store at its edges: an in-memory database, a stored 5xx, a claim that
//! lands after its begin timed out.

#![cfg(feature = "sqlite")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use common::{post_with, send};
use idem_runtime::store::{BoxFuture, SqliteStore, SqliteTransaction, Store, StoreError};
use idem_runtime::{Idempotency, idempotent};
use tokio::sync::Notify;

/// Gates a handler holding SQLite's write lock.
#[derive(Clone, Default)]
struct Gates {
    wrote: Arc<Notify>,
    release: Arc<Notify>,
}

/// Writes a payment in idem's transaction; with body `hold`, then waits for the test's
/// gate while holding the write lock.
#[idempotent]
async fn pay(State(gates): State<Gates>, tx: SqliteTransaction, body: String) -> Response {
    let written = async {
        let mut conn = tx.conn().await?;
        sqlx::query("INSERT INTO payments (note) VALUES (?1)")
            .bind(&body)
            .execute(&mut *conn)
            .await
    }
    .await;
    if let Err(error) = written {
        return (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response();
    }
    if body == "hold" {
        gates.wrote.notify_one();
        gates.release.notified().await;
    }
    (StatusCode::CREATED, format!("paid {body}")).into_response()
}

/// Writes nothing: only idem's steps touch the database.
#[idempotent]
async fn plain(body: String) -> Response {
    (StatusCode::CREATED, format!("done {body}")).into_response()
}

async fn router_on(store: &SqliteStore, gates: Gates) -> Router {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS payments (id INTEGER PRIMARY KEY AUTOINCREMENT, note TEXT NOT NULL)",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let idem = Idempotency::builder()
        .shared_scope(true)
        .store(store.clone())
        .build();
    Router::new()
        .route("/pay", post(pay))
        .route("/plain", post(plain))
        .with_state(gates)
        .layer(idem.layer())
}

/// Guards: an in-memory `SqliteStore` (`sqlite::memory:`) makes a request on another key
/// wait while a transactional handler holds the write lock, and then run, as on a file
/// (its connections shared one cache, whose locks fail at once with `SQLITE_LOCKED`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_memory_store_waits_for_the_writer_instead_of_failing() {
    let store = SqliteStore::connect("sqlite::memory:").await.unwrap();
    let gates = Gates::default();
    let router = router_on(&store, gates.clone()).await;
    let holder = tokio::spawn({
        let router = router.clone();
        async move { send(&router, post_with("/pay", Some("a"), "hold")).await }
    });
    gates.wrote.notified().await;
    // The other request should wait for the lock (5 s busy timeout); let the holder go
    // once it has answered, or after a moment if it is waiting as it should.
    let other = tokio::spawn({
        let router = router.clone();
        async move { send(&router, post_with("/plain", Some("b"), "b")).await }
    });
    let release = {
        let gates = gates.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            gates.release.notify_one();
        })
    };
    let other = other.await.unwrap();
    release.await.unwrap();
    let holder = holder.await.unwrap();
    assert_eq!(holder.status, StatusCode::CREATED);
    assert_eq!(
        other.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&other.body)
    );
}

/// Writes a payment in idem's transaction, then fails with a 500.
#[idempotent]
async fn pay_then_fail(tx: SqliteTransaction) -> Response {
    let written = async {
        let mut conn = tx.conn().await?;
        sqlx::query("INSERT INTO payments (note) VALUES ('half-done')")
            .execute(&mut *conn)
            .await
    }
    .await;
    if let Err(error) = written {
        return (StatusCode::BAD_GATEWAY, error.to_string()).into_response();
    }
    (StatusCode::INTERNAL_SERVER_ERROR, "the card network failed").into_response()
}

/// Guards: a `5xx` rolls the handler's writes back also when it is stored
/// (`store_server_errors(true)`): a failure is never answered and replayed while the
/// payment it reports as failed exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_error_never_commits_the_handlers_writes_even_when_stored() {
    let file = common::SqliteFile::create("attack_5xx_stored");
    let store = SqliteStore::connect(&file.url).await.unwrap();
    sqlx::query("CREATE TABLE payments (id INTEGER PRIMARY KEY AUTOINCREMENT, note TEXT NOT NULL)")
        .execute(store.pool())
        .await
        .unwrap();
    let idem = Idempotency::builder()
        .shared_scope(true)
        .store_server_errors(true)
        .store(store.clone())
        .build();
    let router = Router::new()
        .route("/pay", post(pay_then_fail))
        .layer(idem.layer());
    let failed = send(&router, post_with("/pay", Some("k"), "")).await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    let retry = send(&router, post_with("/pay", Some("k"), "")).await;
    assert_eq!(retry.status, StatusCode::INTERNAL_SERVER_ERROR);
    let committed: i64 = sqlx::query_scalar("SELECT count(*) FROM payments")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(
        committed, 0,
        "a 5xx answered (and replayed) while the handler's writes were committed"
    );
}

/// The store, telling the test when a `release` ends (answered, or given up by idem's
/// store timeout).
struct WatchedReleases {
    inner: SqliteStore,
    released: Arc<Notify>,
}

/// Notifies when dropped: when the release future ends, however it ends.
struct OnDrop(Arc<Notify>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

impl Store for WatchedReleases {
    fn begin<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        self.inner.begin(key, claim, lease)
    }

    fn renew<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.inner.renew(key, claim, lease)
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        record: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.inner.complete(key, claim, record, ttl)
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let guard = OnDrop(self.released.clone());
        Box::pin(async move {
            let _guard = guard;
            self.inner.release(key, claim).await
        })
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(&self.inner)
    }
}

/// Guards: a claim whose `begin` timed out while waiting for SQLite's write lock, and
/// that SQLite applied once the lock freed (after idem had answered 503 and released
/// nothing), is released once it lands: the retry runs within seconds, not after a lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_lands_after_its_begin_timed_out_is_released() {
    let file = common::SqliteFile::create("attack_late_claim");
    let store = SqliteStore::builder(file.url.as_str())
        .max_connections(2)
        .connect()
        .await
        .unwrap();
    sqlx::query("CREATE TABLE payments (id INTEGER PRIMARY KEY AUTOINCREMENT, note TEXT NOT NULL)")
        .execute(store.pool())
        .await
        .unwrap();
    let released = Arc::new(Notify::new());
    let idem = Idempotency::builder()
        .shared_scope(true)
        .store_timeout(Duration::from_millis(300))
        .store(WatchedReleases {
            inner: store.clone(),
            released: released.clone(),
        })
        .build();
    let gates = Gates::default();
    let router = Router::new()
        .route("/pay", post(pay))
        .route("/plain", post(plain))
        .with_state(gates.clone())
        .layer(idem.layer());

    // A transactional handler holds the write lock (well under its 30 s lease).
    let holder = tokio::spawn({
        let router = router.clone();
        async move { send(&router, post_with("/pay", Some("a"), "hold")).await }
    });
    gates.wrote.notified().await;

    // Another key's claim waits for the lock past the store timeout: 503.
    let refused = send(&router, post_with("/plain", Some("b"), "b")).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    // idem tried to release the claim it may have made, and gave up.
    released.notified().await;

    gates.release.notify_one();
    assert_eq!(holder.await.unwrap().status, StatusCode::CREATED);
    // Both connections back in the pool: whatever SQLite still ran has run.
    let first = store.pool().acquire().await.unwrap();
    let second = store.pool().acquire().await.unwrap();
    drop((first, second));

    // idem keeps releasing the claim that landed late: the key frees itself within its
    // release back-off (seconds), not after the 30 s lease.
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    let retry = loop {
        let retry = send(&router, post_with("/plain", Some("b"), "b")).await;
        if retry.status != StatusCode::CONFLICT || std::time::Instant::now() > deadline {
            break retry;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        retry.status,
        StatusCode::CREATED,
        "the retry of a request refused with 503 is refused as in flight though nothing runs: {}",
        String::from_utf8_lossy(&retry.body)
    );
}
