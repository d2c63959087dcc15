//! Guards of one request that writes in its `PgTransaction`: the guard whose work runs
//! finishes the transaction, and no other guard commits or rolls it back under that work
//! (regressions of defects once shown).

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
use bytes::Bytes;
use common::{Gated, Gates, PaymentsDb, post_with, read, send, send_past_in_flight};
use idem_runtime::store::{BoxFuture, PgTransaction, PostgresStore, Store, StoreError};
use idem_runtime::{Idempotency, Idempotent};
use sqlx::AssertSqlSafe;
use tokio::sync::Notify;

/// The PostgreSQL store, whose first `begin` fails (an outage: fail-open runs the work
/// unprotected) and whose second finds the store full (refused, `503`).
struct Outage {
    inner: PostgresStore,
    begins: AtomicUsize,
}

impl Store for Outage {
    fn begin<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        match self.begins.fetch_add(1, Ordering::SeqCst) {
            0 => Box::pin(async { Err(StoreError::backend("connection reset")) }),
            1 => Box::pin(async { Err(StoreError::Full("too many claims".into())) }),
            _ => self.inner.begin(key, claim, lease),
        }
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
        self.inner.release(key, claim)
    }
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        self.inner.as_any()
    }
}

#[derive(Clone)]
struct Payments {
    table: String,
    wrote: Arc<Notify>,
    second_done: Arc<Notify>,
}

/// Two guards side by side (`join!`), the work writing in the request's `PgTransaction`.
/// The first guard's work writes, then ends once the second guard has answered; the
/// second guard is started once the first one's work has written.
async fn joined(
    first: Idempotent,
    second: Idempotent,
    tx: PgTransaction,
    State(app): State<Payments>,
    _body: String,
) -> Response {
    let first_work = {
        let (app, tx) = (app.clone(), tx.clone());
        async move {
            let mut conn = match tx.conn().await {
                Ok(conn) => conn,
                Err(error) => return (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
            };
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {} (note) VALUES ('first')",
                app.table
            )))
            .execute(&mut *conn)
            .await
            .unwrap();
            drop(conn);
            app.wrote.notify_one();
            app.second_done.notified().await;
            (StatusCode::CREATED, "paid (first guard)".to_owned())
        }
    };
    let second_work = async move { (StatusCode::CREATED, "paid (second guard)".to_owned()) };
    let second = {
        let app = app.clone();
        async move {
            app.wrote.notified().await;
            let answer = second.run(second_work).await;
            app.second_done.notify_one();
            answer
        }
    };
    let (first, second) = tokio::join!(first.run(first_work), second);
    let (first, second) = (read(first).await, read(second).await);
    let body = serde_json::json!({
        "first": [first.status.as_u16(), String::from_utf8_lossy(&first.body)],
        "second": [second.status.as_u16(), String::from_utf8_lossy(&second.body)],
    });
    (StatusCode::OK, axum::Json(body)).into_response()
}

/// Guards (a defect once shown): the first guard runs its work unprotected (fail-open) in
/// the request's transaction; the second, started while that work runs, passes its work
/// through and never rolls the transaction back under it (it did, and the client was
/// told `201` for a payment that was not in the database).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fail_open_guards_writes_are_never_rolled_back_by_another_guard() {
    let db = PaymentsDb::new("attack_turns_pg").await;
    let idem = Idempotency::builder()
        .shared_scope(true)
        .fail_open(true)
        .store(Outage {
            inner: db.store.clone(),
            begins: AtomicUsize::new(0),
        })
        .build();
    let app = Payments {
        table: db.table(),
        wrote: Arc::default(),
        second_done: Arc::default(),
    };
    let router: Router = Router::new()
        .route("/joined", post(joined))
        .with_state(app)
        .layer(idem.layer());
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        send(&router, post_with("/joined", Some("fo-1"), "{}")),
    )
    .await
    .expect("the request answers");
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    let answers: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    let notes = db.notes().await;
    if answers["first"][0] == 201 {
        assert_eq!(
            notes,
            ["first"],
            "the first guard answered 201 for its write, which is not committed: {answers}"
        );
    }
}

#[derive(Clone)]
struct Aside {
    table: String,
    give_up: Arc<Notify>,
}

/// With `x-give-up`, the first guard's claim is sent, then the handler moves on to the
/// second guard when the test says so, keeping the first one's future without polling
/// it; without, the first guard runs the work.
async fn kept_aside(
    first: Idempotent,
    second: Idempotent,
    tx: PgTransaction,
    State(app): State<Aside>,
    headers: axum::http::HeaderMap,
    _body: String,
) -> Response {
    let work = |app: Aside, tx: PgTransaction| async move {
        let mut conn = match tx.conn().await {
            Ok(conn) => conn,
            Err(error) => return (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
        };
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (note) VALUES ('paid')",
            app.table
        )))
        .execute(&mut *conn)
        .await
        .unwrap();
        (StatusCode::CREATED, "paid".to_owned())
    };
    let first = first.run(work(app.clone(), tx.clone()));
    if !headers.contains_key("x-give-up") {
        return first.await;
    }
    let mut first = std::pin::pin!(first);
    tokio::select! {
        biased;
        answer = &mut first => return answer,
        () = app.give_up.notified() => {}
    }
    second.run(work(app, tx)).await
}

/// Guards (a defect once shown): a guard whose claim is under way, kept without being
/// polled, makes the next guard of a request that holds a transaction wait for it (it
/// may yet run its work in that transaction), but not for ever: after twice the store
/// timeout, the request is answered `503` and nothing is written. The key is free again
/// once the first guard's future is dropped, and the next request pays once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_kept_aside_mid_claim_holds_the_next_one_only_for_a_while() {
    let db = PaymentsDb::new("guard_turns_aside").await;
    let gates = Arc::new(Gates::default());
    let idem = Idempotency::builder()
        .shared_scope(true)
        .store_timeout(Duration::from_millis(300))
        .store(Gated::new(Arc::new(db.store.clone()), gates.clone()))
        .build();
    let app = Aside {
        table: db.table(),
        give_up: Arc::default(),
    };
    let router: Router = Router::new()
        .route("/aside", post(kept_aside))
        .with_state(app.clone())
        .layer(idem.layer());
    // The first guard's claim is applied, its answer held back.
    gates.answer.close();
    let mut request = post_with("/aside", Some("aside-1"), "{}");
    request
        .headers_mut()
        .insert("x-give-up", "1".parse().unwrap());
    let answering = tokio::spawn({
        let router = router.clone();
        async move { send(&router, request).await }
    });
    gates.answer.reached.notified().await;
    app.give_up.notify_one();
    let answer = tokio::time::timeout(Duration::from_secs(10), answering)
        .await
        .expect("the request answers")
        .unwrap();
    answer.assert_problem(
        StatusCode::SERVICE_UNAVAILABLE,
        idem_runtime::Problem::STORE_UNAVAILABLE,
    );
    assert!(db.notes().await.is_empty());
    gates.answer.open();
    let mut answers = Vec::new();
    // Up to 5 s of retries, 20 ms apart, while the dropped claim is released.
    for _ in 0..250 {
        let answer = send(&router, post_with("/aside", Some("aside-1"), "{}")).await;
        answers.push(answer.status);
        if answer.status == StatusCode::CREATED {
            break;
        }
        answer.assert_problem(StatusCode::CONFLICT, idem_runtime::Problem::IN_FLIGHT);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(answers.last(), Some(&StatusCode::CREATED), "{answers:?}");
    assert_eq!(db.notes().await, ["paid"]);
}

#[derive(Clone)]
struct Failing {
    table: String,
    started: Arc<Notify>,
    hold: Arc<Notify>,
    runs: Arc<AtomicUsize>,
}

async fn write(tx: &PgTransaction, table: &str, note: &str) -> Result<(), String> {
    let mut conn = tx.conn().await.map_err(|e| e.to_string())?;
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {table} (note) VALUES ('{note}')"
    )))
    .execute(&mut *conn)
    .await
    .map_err(|e| e.to_string())?;
    Ok(())
}

/// The first guard's work writes; on its first run it then pauses and fails (`500`), and
/// the handler, seeing it started, keeps its future aside and falls back to the second
/// guard, whose work would write and answer `201`.
async fn aside_then_failing(
    first: Idempotent,
    second: Idempotent,
    tx: PgTransaction,
    State(app): State<Failing>,
    _body: String,
) -> Response {
    let first_work = {
        let (app, tx) = (app.clone(), tx.clone());
        async move {
            if let Err(e) = write(&tx, &app.table, "first").await {
                return (StatusCode::INTERNAL_SERVER_ERROR, e);
            }
            // The first run pauses until the test lets it fail; later ones pay.
            if app.runs.fetch_add(1, Ordering::SeqCst) > 0 {
                return (StatusCode::CREATED, "paid (first guard)".to_owned());
            }
            app.started.notify_one();
            app.hold.notified().await;
            (StatusCode::INTERNAL_SERVER_ERROR, "first failed".to_owned())
        }
    };
    let first = first.run(first_work);
    let mut first = std::pin::pin!(first);
    tokio::select! {
        biased;
        answer = &mut first => return answer,
        () = app.started.notified() => {}
    }
    let second_work = async move {
        match write(&tx, &app.table, "second").await {
            Ok(()) => (StatusCode::CREATED, "paid (second guard)".to_owned()),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e),
        }
    };
    second.run(second_work).await
}

/// Guards (a defect once shown): a guard beside another's work kept aside mid-work is
/// refused, and writes nothing in the request's transaction (its work ran and answered
/// `201` for a write the other's `500` then rolled back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_beside_a_kept_aside_owner_writes_nothing() {
    let db = PaymentsDb::new("guard_turns_failing").await;
    let app = Failing {
        table: db.table(),
        started: Arc::default(),
        hold: Arc::default(),
        runs: Arc::default(),
    };
    let router: Router = Router::new()
        .route("/aside", post(aside_then_failing))
        .with_state(app.clone())
        .layer(db.idem().layer());
    let answer = send(&router, post_with("/aside", Some("pg-aside-1"), "{}")).await;
    answer.assert_problem(
        StatusCode::INTERNAL_SERVER_ERROR,
        idem_runtime::Problem::GUARD_CONFLICT,
    );
    // The first guard's work, on in a task of its own, fails: its write rolls back and
    // the key is released.
    app.hold.notify_one();
    // The client retries while the first run ends.
    let retry =
        send_past_in_flight(&router, || post_with("/aside", Some("pg-aside-1"), "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert_eq!(retry.body, "paid (first guard)");
    assert_eq!(
        db.notes().await,
        ["first"],
        "one write, by the run that answered 201"
    );
}
