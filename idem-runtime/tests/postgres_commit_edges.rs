//! `PgTransaction` at its commit: work that ends the transaction itself, and commits that
//! wait for a lock while other executions' leases must still be renewed.

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
use common::{PaymentsDb, eventually, post_with, send, until};
use idem_runtime::store::{PgTransaction, PostgresStore};
use idem_runtime::{Idempotency, idempotent};
use sqlx::{AssertSqlSafe, Connection as _};

#[derive(Clone)]
struct Payments {
    table: String,
    ending: &'static str,
}

/// Writes a payment, then ends the transaction itself (`COMMIT` or `ROLLBACK` through
/// its connection, as a helper written for a plain connection might) and answers `201`.
#[idempotent]
async fn pay_and_end(State(app): State<Payments>, tx: PgTransaction) -> Response {
    let mut conn = tx.conn().await.unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {} (note) VALUES ('paid')",
        app.table
    )))
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query(app.ending).execute(&mut *conn).await.unwrap();
    (StatusCode::CREATED, "paid").into_response()
}

/// Guards: work that ends its own transaction never gets its response stored as a
/// success beside writes that are not there (SPEC §7: the writes and the record commit
/// together or not at all). idem's fencing write would run in autocommit there and commit
/// alone; it is refused, the request is answered `503`, and the key is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_that_ends_its_transaction_never_gets_a_success_stored() {
    let db = PaymentsDb::new("commit_edges_ended").await;
    let router = Router::new()
        .route("/pay", post(pay_and_end))
        .with_state(Payments {
            table: db.table(),
            ending: "ROLLBACK",
        })
        .layer(db.idem().layer());

    let first = send(&router, post_with("/pay", Some("ended"), "")).await;
    first.assert_problem(
        StatusCode::SERVICE_UNAVAILABLE,
        idem_runtime::Problem::STORE_UNAVAILABLE,
    );
    assert!(
        db.notes().await.is_empty(),
        "the work rolled its write back"
    );
    let retry = send(&router, post_with("/pay", Some("ended"), "")).await;
    assert!(
        !retry.is_replay(),
        "no success stored without the payment: the retry ran again ({})",
        retry.status
    );
}

#[derive(Clone)]
struct Orders {
    table: String,
    slow_runs: Arc<AtomicUsize>,
    gate: Arc<tokio::sync::Semaphore>,
}

/// Inserts order `body` (a unique column checked at commit) and answers `201`.
#[idempotent]
async fn order(State(app): State<Orders>, tx: PgTransaction, body: String) -> Response {
    let id: i32 = body.parse().unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {} (order_id) VALUES ($1)",
        app.table
    )))
    .bind(id)
    .execute(&mut *tx.conn().await.unwrap())
    .await
    .unwrap();
    (StatusCode::CREATED, "ordered").into_response()
}

/// A slow payment without a transaction: counts its run, then waits for the gate.
#[idempotent]
async fn slow_payment(State(app): State<Orders>) -> Response {
    app.slow_runs.fetch_add(1, Ordering::SeqCst);
    let _permit = app.gate.acquire().await.unwrap();
    (StatusCode::CREATED, "paid").into_response()
}

/// Polls the boolean `query` on `pool` until it holds, for up to 10 s.
async fn poll_until(pool: &sqlx::PgPool, query: &str) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        let holds: bool = sqlx::query_scalar(AssertSqlSafe(query.to_owned()))
            .fetch_one(pool)
            .await
            .unwrap();
        if holds {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Guards: commits that wait for a lock (a unique constraint checked at commit, against
/// another session's uncommitted rows) never stop the leases of other executions from
/// being renewed. Renewing the waiting executions' own leases would wait for the rows
/// their fencing writes locked, and hold the store's few renewal connections meanwhile;
/// a slow payment's lease then lapsed, and a retry on another instance paid again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_waiting_for_a_lock_never_stop_other_leases_from_being_renewed() {
    let db = PaymentsDb::new("commit_edges_waiting").await;
    let schema = db.schema.name.clone();
    let table = format!("\"{schema}\".orders");
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE {table} (order_id int, \
         CONSTRAINT orders_once UNIQUE (order_id) DEFERRABLE INITIALLY DEFERRED)"
    )))
    .execute(db.store.pool())
    .await
    .unwrap();
    let lease = Duration::from_millis(600);
    let instance = |store: PostgresStore| {
        Idempotency::builder()
            .shared_scope(true)
            .store(store)
            .lease(lease)
            .build()
    };
    let second_store = PostgresStore::builder(db.schema.url.as_str())
        .schema(schema.as_str())
        .connect()
        .await
        .unwrap();
    let app = Orders {
        table: table.clone(),
        slow_runs: Arc::default(),
        gate: Arc::new(tokio::sync::Semaphore::new(0)),
    };
    let router = |idem: Idempotency| {
        Router::new()
            .route("/order", post(order))
            .route("/slow", post(slow_payment))
            .with_state(app.clone())
            .layer(idem.layer())
    };
    let (first, second) = (
        router(instance(db.store.clone())),
        router(instance(second_store)),
    );

    // Another session holds order ids 1 and 2, uncommitted.
    let mut other = sqlx::PgConnection::connect(&db.schema.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut other).await.unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {table} (order_id) VALUES (1), (2)"
    )))
    .execute(&mut other)
    .await
    .unwrap();

    let slow = tokio::spawn({
        let first = first.clone();
        async move { send(&first, post_with("/slow", Some("slow-pay"), "")).await }
    });
    until(|| app.slow_runs.load(Ordering::SeqCst) == 1).await;
    let orders: Vec<_> = ["1", "2"]
        .map(|id| {
            let first = first.clone();
            tokio::spawn(async move {
                send(
                    &first,
                    post_with("/order", Some(&format!("order-{id}")), id),
                )
                .await
            })
        })
        .into();
    let waiting = "SELECT count(*) >= 2 FROM pg_stat_activity \
                   WHERE query = 'COMMIT' AND wait_event_type = 'Lock'";
    assert!(
        poll_until(db.store.pool(), waiting).await,
        "both orders' commits wait"
    );

    // While they wait, the slow payment's lease is renewed: well past where it stood.
    let expiry = format!(
        "SELECT expires_at::text FROM \"{schema}\".idem_records WHERE key LIKE '%:slow-pay'"
    );
    let stood: String = sqlx::query_scalar(AssertSqlSafe(expiry))
        .fetch_one(db.store.pool())
        .await
        .unwrap();
    let renewed = format!(
        "SELECT expires_at > '{stood}'::timestamptz + interval '1 second' \
         FROM \"{schema}\".idem_records WHERE key LIKE '%:slow-pay'"
    );
    let kept = poll_until(db.store.pool(), &renewed).await;

    let retry = tokio::spawn({
        let second = second.clone();
        async move { send(&second, post_with("/slow", Some("slow-pay"), "")).await }
    });
    let ran_twice = eventually(Duration::from_secs(3), || {
        app.slow_runs.load(Ordering::SeqCst) >= 2 || retry.is_finished()
    })
    .await
        && app.slow_runs.load(Ordering::SeqCst) >= 2;

    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    app.gate.add_permits(100);
    let retried = retry.await.unwrap();
    assert_eq!(slow.await.unwrap().status, StatusCode::CREATED);
    for order in orders {
        order.await.unwrap();
    }
    assert!(
        kept,
        "the slow payment's lease was renewed while the commits waited"
    );
    assert!(!ran_twice, "the slow payment ran twice");
    assert_eq!(
        retried.status,
        StatusCode::CONFLICT,
        "the retry is told it runs"
    );
}

/// Guards: a renewal that meets a row lock held for long (here another session's
/// `SELECT .. FOR UPDATE` on the claim's row) gives up within the renewals' lock timeout
/// (2 s), rather than holding one of the store's two renewal connections for as long as
/// the lock lasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_never_waits_long_for_a_row_lock() {
    let db = PaymentsDb::new("commit_edges_lock_timeout").await;
    let schema = db.schema.name.clone();
    let idem = Idempotency::builder()
        .shared_scope(true)
        .store(db.store.clone())
        .lease(Duration::from_millis(600))
        .build();
    let app = Orders {
        table: String::new(),
        slow_runs: Arc::default(),
        gate: Arc::new(tokio::sync::Semaphore::new(0)),
    };
    let router = Router::new()
        .route("/slow", post(slow_payment))
        .with_state(app.clone())
        .layer(idem.layer());
    let slow = tokio::spawn({
        let router = router.clone();
        async move { send(&router, post_with("/slow", Some("locked"), "")).await }
    });
    until(|| app.slow_runs.load(Ordering::SeqCst) == 1).await;

    let mut other = sqlx::PgConnection::connect(&db.schema.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut other).await.unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "SELECT 1 FROM \"{schema}\".idem_records WHERE key LIKE '%:locked' FOR UPDATE"
    )))
    .execute(&mut other)
    .await
    .unwrap();
    let renewals_waiting = |older_than: &str| {
        format!(
            "SELECT count(*) > 0 FROM pg_stat_activity \
             WHERE query LIKE 'UPDATE \"{schema}\".\"idem_records\" SET expires_at%' \
             AND wait_event_type = 'Lock' AND query_start < now() - interval '{older_than}'"
        )
    };
    assert!(
        poll_until(db.store.pool(), &renewals_waiting("0 seconds")).await,
        "a renewal waits for the lock"
    );
    // Past the lock timeout and a margin, no renewal has waited that long.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut waited_long = false;
    while tokio::time::Instant::now() < deadline && !waited_long {
        waited_long = sqlx::query_scalar(AssertSqlSafe(renewals_waiting("3 seconds")))
            .fetch_one(db.store.pool())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    app.gate.add_permits(1);
    slow.await.unwrap();
    assert!(!waited_long, "a renewal waited for the row lock past 3 s");
}

/// Writes `outer`, then `inner` in a savepoint of its own (`conn.begin()`), which it rolls
/// back where the body says `undo`, and leaves open (forgotten, never ended) where it says
/// `leak`; answers `201`.
#[idempotent]
async fn pay_in_a_savepoint(
    State(app): State<Payments>,
    tx: PgTransaction,
    body: String,
) -> Response {
    let mut conn = tx.conn().await.unwrap();
    let insert = |note: &str| {
        AssertSqlSafe(format!(
            "INSERT INTO {} (note) VALUES ('{note}')",
            app.table
        ))
    };
    sqlx::query(insert("outer"))
        .execute(&mut *conn)
        .await
        .unwrap();
    let mut savepoint = conn.begin().await.unwrap();
    sqlx::query(insert("inner"))
        .execute(&mut *savepoint)
        .await
        .unwrap();
    if body == "leak" {
        std::mem::forget(savepoint);
    } else {
        savepoint.rollback().await.unwrap();
    }
    (StatusCode::CREATED, "paid").into_response()
}

/// Guards: a savepoint the work rolls back undoes only its own writes; work that returns
/// inside a savepoint of its own never gets a success stored (idem's commit would only
/// have released the savepoint, and left the transaction open on the pooled connection,
/// its writes never committed): `503`, nothing written, the key free for the retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn savepoints_of_the_work_commit_only_when_ended() {
    let db = PaymentsDb::new("commit_edges_savepoint").await;
    let router = Router::new()
        .route("/pay", post(pay_in_a_savepoint))
        .with_state(Payments {
            table: db.table(),
            ending: "",
        })
        .layer(db.idem().layer());

    let leaked = send(&router, post_with("/pay", Some("leak"), "leak")).await;
    leaked.assert_problem(
        StatusCode::SERVICE_UNAVAILABLE,
        idem_runtime::Problem::STORE_UNAVAILABLE,
    );
    assert!(db.notes().await.is_empty(), "{:?}", db.notes().await);

    for attempt in 0..2 {
        let paid = send(&router, post_with("/pay", Some("undo"), "undo")).await;
        assert_eq!(paid.status, StatusCode::CREATED, "attempt {attempt}");
        assert_eq!(paid.is_replay(), attempt == 1);
    }
    assert_eq!(db.notes().await, ["outer"]);
}
