//! Exactly-once with the database: a handler (or a `once` operation) writes in a
//! `PgTransaction`, and idem commits the completed record in that same transaction, under
//! the fencing check, on the real PostgreSQL.

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
use common::{NoRenewals, PaymentsDb, post_with, send, until};
use idem_runtime::once::{OnceError, Outcome};
use idem_runtime::store::{PgTransaction, PostgresStore};
use idem_runtime::{Idempotency, OnceKey, Problem, idempotent};
use sqlx::AssertSqlSafe;
use tokio::sync::Notify;

/// The handler's world: where it writes, what it calls itself, and a gate it may wait on.
#[derive(Clone)]
struct Payments {
    table: String,
    name: &'static str,
    runs: Arc<AtomicUsize>,
    started: Arc<Notify>,
    gate: Arc<Notify>,
}

impl Payments {
    fn new(db: &PaymentsDb, name: &'static str) -> Self {
        Self {
            table: db.table(),
            name,
            runs: Arc::default(),
            started: Arc::default(),
            gate: Arc::default(),
        }
    }

    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
}

/// Inserts a payment noted with the app's name, then answers as the body says: `fail`
/// a 500, `panic` a panic, `hold` waits for the gate first.
#[idempotent]
async fn pay(State(app): State<Payments>, tx: PgTransaction, body: String) -> Response {
    app.runs.fetch_add(1, Ordering::SeqCst);
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {} (note) VALUES ($1)",
        app.table
    )))
    .bind(app.name)
    .execute(&mut *tx.conn().await.unwrap())
    .await
    .unwrap();
    match body.as_str() {
        "fail" => (StatusCode::INTERNAL_SERVER_ERROR, "the card network failed").into_response(),
        "panic" => panic!("the handler broke after writing"),
        "hold" => {
            app.started.notify_one();
            app.gate.notified().await;
            (StatusCode::CREATED, format!("paid by {}", app.name)).into_response()
        }
        _ => (StatusCode::CREATED, format!("paid by {}", app.name)).into_response(),
    }
}

fn router(idem: &Idempotency, app: Payments) -> Router {
    Router::new()
        .route("/pay", post(pay))
        .with_state(app)
        .layer(idem.layer())
}

/// Guards: success commits the business row and the record together; the retry replays
/// and writes nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_commits_both_and_the_retry_replays() {
    let db = PaymentsDb::new("tx_success").await;
    let app = Payments::new(&db, "A");
    let router = router(&db.idem(), app.clone());
    let first = send(&router, post_with("/pay", Some("k"), "ok")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(db.notes().await, ["A"]);
    let retry = send(&router, post_with("/pay", Some("k"), "ok")).await;
    assert!(retry.is_replay());
    assert_eq!(retry.body, first.body);
    assert_eq!(db.notes().await, ["A"], "one payment");
    assert_eq!(app.runs(), 1);
    // Without a key the handler runs unprotected, and its transaction commits all the same.
    let unkeyed = send(&router, post_with("/pay", None, "ok")).await;
    assert_eq!(unkeyed.status, StatusCode::CREATED);
    assert_eq!(db.notes().await, ["A", "A"]);
}

/// Guards: a 5xx or a panic rolls the handler's writes back and releases the key: no
/// business row, and the retry runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_and_panics_roll_back_and_release() {
    let db = PaymentsDb::new("tx_rollback").await;
    let app = Payments::new(&db, "A");
    let router = router(&db.idem(), app.clone());
    for _ in 0..2 {
        let failed = send(&router, post_with("/pay", Some("fails"), "fail")).await;
        assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
    assert_eq!(app.runs(), 2, "the key was released: the retry ran");
    assert!(db.notes().await.is_empty(), "nothing committed");
    // Unkeyed, a 5xx rolls back too.
    send(&router, post_with("/pay", None, "fail")).await;
    assert!(db.notes().await.is_empty());

    for run in 4..=5 {
        let panicked = tokio::spawn({
            let router = router.clone();
            async move { send(&router, post_with("/pay", Some("panics"), "panic")).await }
        })
        .await;
        assert!(panicked.unwrap_err().is_panic());
        assert_eq!(app.runs(), run, "the key was released: the retry ran");
    }
    assert!(db.notes().await.is_empty(), "nothing committed");
}

/// Guards: a stale executor (its lease run out, the key taken over and completed by
/// another) fails the fencing check when it finishes: its transaction rolls back, its
/// writes never become visible, it answers 409, and exactly one payment exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_executor_rolls_back() {
    let db = PaymentsDb::new("tx_stale").await;
    let stale_idem = Idempotency::builder()
        .shared_scope(true)
        .store(NoRenewals(db.store.clone()))
        .lease(Duration::from_millis(300))
        .build();
    let stale = Payments::new(&db, "stale");
    let stale_router = router(&stale_idem, stale.clone());
    let first = tokio::spawn({
        let router = stale_router.clone();
        async move { send(&router, post_with("/pay", Some("k"), "hold")).await }
    });
    stale.started.notified().await;

    let fresh = Payments::new(&db, "fresh");
    let fresh_router = router(&db.idem(), fresh.clone());
    // Released at once: this executor does not wait on the gate.
    fresh.gate.notify_one();
    let mut took_over = None;
    for _ in 0..200 {
        let answer = send(&fresh_router, post_with("/pay", Some("k"), "hold")).await;
        if answer.status == StatusCode::CREATED {
            took_over = Some(answer);
            break;
        }
        answer.assert_problem(StatusCode::CONFLICT, Problem::IN_FLIGHT);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took_over = took_over.expect("the lease ran out and the key was taken over");
    assert_eq!(took_over.body, "paid by fresh");

    stale.gate.notify_one();
    let stale_answer = first.await.unwrap();
    stale_answer.assert_problem(StatusCode::CONFLICT, Problem::IN_FLIGHT);
    assert_eq!(
        db.notes().await,
        ["fresh"],
        "the stale writes never became visible"
    );
    let retry = send(&stale_router, post_with("/pay", Some("k"), "hold")).await;
    assert!(retry.is_replay());
    assert_eq!(retry.body, "paid by fresh");
}

/// Guards: 100 concurrent payments with one key make one payment; the others get 409 or
/// the replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_payments_make_one() {
    let db = PaymentsDb::new("tx_concurrent").await;
    let app = Payments::new(&db, "A");
    let router = router(&db.idem(), app.clone());
    let mut calls = Vec::new();
    for _ in 0..100 {
        let router = router.clone();
        calls.push(tokio::spawn(async move {
            send(&router, post_with("/pay", Some("one"), "ok")).await
        }));
    }
    let mut created = 0;
    for call in calls {
        let answer = call.await.unwrap();
        match answer.status {
            StatusCode::CREATED => created += 1,
            StatusCode::CONFLICT => answer.assert_problem(StatusCode::CONFLICT, Problem::IN_FLIGHT),
            other => panic!("unexpected {other}: {answer:?}"),
        }
    }
    assert!(created >= 1);
    assert_eq!(app.runs(), 1);
    assert_eq!(db.notes().await, ["A"]);
}

/// Guards: a process that dies after its business write and before the commit (its
/// runtime shut down: the connection and the transaction go with it) leaves nothing: once
/// its lease runs out, the retry runs afresh and exactly one payment exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_the_commit_leaves_nothing() {
    let db = PaymentsDb::new("tx_crash").await;
    let lease = Duration::from_millis(500);
    let doomed = Payments::new(&db, "doomed");
    std::thread::spawn({
        let (url, schema, doomed) = (
            db.schema.url.clone(),
            db.schema.name.clone(),
            doomed.clone(),
        );
        move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async {
                // A pool of this process's own: its connections die with it.
                let store = PostgresStore::builder(url.as_str())
                    .schema(schema.as_str())
                    .connect()
                    .await
                    .unwrap();
                let idem = Idempotency::builder()
                    .shared_scope(true)
                    .store(store)
                    .lease(lease)
                    .build();
                let router = router(&idem, doomed.clone());
                let _call = tokio::spawn(async move {
                    send(&router, post_with("/pay", Some("k"), "hold")).await
                });
                doomed.started.notified().await;
            });
            runtime.shutdown_background();
        }
    })
    .join()
    .unwrap();
    let app = Payments::new(&db, "after");
    app.gate.notify_one();
    let idem = Idempotency::builder()
        .shared_scope(true)
        .store(db.store.clone())
        .lease(lease)
        .wait_for_in_flight(lease * 6)
        .build();
    let router = router(&idem, app.clone());
    let retry = send(&router, post_with("/pay", Some("k"), "hold")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert!(!retry.is_replay(), "ran afresh");
    until(|| app.runs() == 1).await;
    assert_eq!(
        db.notes().await,
        ["after"],
        "the dead executor's write is gone"
    );
}

/// Guards: `once` in a transaction: `Ok` commits the operation's writes with its result
/// (a later call replays without writing), `Err` rolls them back and the next call runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_commits_with_its_result() {
    let db = PaymentsDb::new("tx_once").await;
    let idem = db.idem();
    let table = db.table();
    let write = |note: &'static str, fail: bool| {
        let table = table.clone();
        move |tx: PgTransaction| async move {
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {table} (note) VALUES ($1)"
            )))
            .bind(note)
            .execute(&mut *tx.conn().await.map_err(|e| e.to_string())?)
            .await
            .map_err(|e| e.to_string())?;
            if fail {
                Err("declined".to_owned())
            } else {
                Ok(note.to_owned())
            }
        }
    };
    let key = OnceKey::compose(["invoice", "7"]);
    let failed = idem
        .once(key.clone(), "in")
        .run_in_transaction(write("first", true))
        .await;
    assert!(matches!(failed, Err(OnceError::Operation(ref e)) if e == "declined"));
    assert!(
        db.notes().await.is_empty(),
        "the failed run's write rolled back"
    );
    let ran = idem
        .once(key.clone(), "in")
        .run_in_transaction(write("second", false))
        .await
        .unwrap();
    assert_eq!(ran, Outcome::Ran("second".to_owned()));
    let replayed = idem
        .once(key, "in")
        .run_in_transaction(write("third", false))
        .await
        .unwrap();
    assert_eq!(replayed, Outcome::Replayed("second".to_owned()));
    assert_eq!(db.notes().await, ["second"]);

    let memory = Idempotency::in_memory();
    let refused = memory
        .once(OnceKey::compose(["x"]), "in")
        .run_in_transaction(write("never", false))
        .await;
    assert!(
        matches!(refused, Err(OnceError::NoTransaction)),
        "{refused:?}"
    );
}
