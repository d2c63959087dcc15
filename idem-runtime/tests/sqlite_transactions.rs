//! Exactly-once with the database on SQLite: a handler (or a `once` operation) writes in
//! a `SqliteTransaction`, and idem commits the completed record in that same transaction,
//! under the fencing check, in a real database file.

#![cfg(feature = "sqlite")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use common::{NoRenewals, SqliteFile, post_with, send, until};
use idem_runtime::once::{OnceError, Outcome};
use idem_runtime::store::{SqliteStore, SqliteTransaction};
use idem_runtime::{Idempotency, OnceKey, Problem, idempotent};
use tokio::sync::Notify;

/// The test's database file, its idem store and a business table `payments (note)`.
struct Db {
    file: SqliteFile,
    store: SqliteStore,
}

impl Db {
    async fn new(test: &str) -> Self {
        Self::with(test, |builder| builder).await
    }

    async fn with(
        test: &str,
        configure: impl FnOnce(
            idem_runtime::store::SqliteStoreBuilder,
        ) -> idem_runtime::store::SqliteStoreBuilder,
    ) -> Self {
        let file = SqliteFile::create(test);
        let store = configure(SqliteStore::builder(file.url.as_str()))
            .connect()
            .await
            .unwrap();
        sqlx::query(
            "CREATE TABLE payments (id INTEGER PRIMARY KEY AUTOINCREMENT, note TEXT NOT NULL)",
        )
        .execute(store.pool())
        .await
        .unwrap();
        sqlx::query("CREATE TABLE tags (name TEXT PRIMARY KEY)")
            .execute(store.pool())
            .await
            .unwrap();
        sqlx::query("INSERT INTO tags VALUES ('taken')")
            .execute(store.pool())
            .await
            .unwrap();
        Self { file, store }
    }

    /// The notes of the committed payments, in order.
    async fn notes(&self) -> Vec<String> {
        sqlx::query_scalar("SELECT note FROM payments ORDER BY id")
            .fetch_all(self.store.pool())
            .await
            .unwrap()
    }

    /// How many idem records (claims or completed) are live now.
    async fn live_records(&self) -> i64 {
        let now = i64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_millis(),
        )
        .unwrap();
        sqlx::query_scalar("SELECT count(*) FROM idem_records WHERE expires_at > ?1")
            .bind(now)
            .fetch_one(self.store.pool())
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

/// The handler's world: what it calls itself, and gates it may wait on.
#[derive(Clone)]
struct Payments {
    name: &'static str,
    runs: Arc<AtomicUsize>,
    started: Arc<Notify>,
    gate: Arc<Notify>,
}

impl Payments {
    fn new(name: &'static str) -> Self {
        Self {
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

async fn insert(tx: &SqliteTransaction, note: &str) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO payments (note) VALUES (?1)")
        .bind(note)
        .execute(&mut *tx.conn().await?)
        .await
        .map(drop)
}

/// Inserts a payment noted with the app's name, then answers as the body says: `fail` a
/// 500, `panic` a panic, `hold` waits for the gate after writing (holding SQLite's write
/// lock), `wait` waits for the gate before writing; any other body a 201.
#[idempotent]
async fn pay(State(app): State<Payments>, tx: SqliteTransaction, body: String) -> Response {
    app.runs.fetch_add(1, Ordering::SeqCst);
    if body == "wait" {
        app.started.notify_one();
        app.gate.notified().await;
    }
    if let Err(error) = insert(&tx, app.name).await {
        return (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response();
    }
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
/// and writes nothing more; without a key the transaction commits after the handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_commits_both_and_the_retry_replays() {
    let db = Db::new("tx_success").await;
    let app = Payments::new("A");
    let router = router(&db.idem(), app.clone());
    let first = send(&router, post_with("/pay", Some("k"), "ok")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(db.notes().await, ["A"]);
    assert_eq!(db.live_records().await, 1, "the record is committed");
    let retry = send(&router, post_with("/pay", Some("k"), "ok")).await;
    assert!(retry.is_replay());
    assert_eq!(retry.body, first.body);
    assert_eq!(db.notes().await, ["A"], "one payment");
    assert_eq!(app.runs(), 1);
    let unkeyed = send(&router, post_with("/pay", None, "ok")).await;
    assert_eq!(unkeyed.status, StatusCode::CREATED);
    assert_eq!(db.notes().await, ["A", "A"]);
}

/// Guards: a 5xx or a panic rolls the handler's writes back and releases the key: no
/// business row, and the retry runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_and_panics_roll_back_and_release() {
    let db = Db::new("tx_rollback").await;
    let app = Payments::new("A");
    let router = router(&db.idem(), app.clone());
    for _ in 0..2 {
        let failed = send(&router, post_with("/pay", Some("fails"), "fail")).await;
        assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
    assert_eq!(app.runs(), 2, "the key was released: the retry ran");
    assert!(db.notes().await.is_empty(), "nothing committed");
    send(&router, post_with("/pay", None, "fail")).await;
    assert!(db.notes().await.is_empty(), "unkeyed, a 5xx rolls back too");

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
    assert_eq!(db.live_records().await, 0, "every key was released");
    // The write lock went with each rollback: a payment after them commits.
    let paid = send(&router, post_with("/pay", Some("after"), "ok")).await;
    assert_eq!(paid.status, StatusCode::CREATED);
    assert_eq!(db.notes().await, ["A"]);
}

/// Guards: a stale executor (its lease run out before it wrote, the key taken over and
/// completed by another) fails the fencing check when it finishes: its transaction rolls
/// back, its writes never become visible, it answers 409, and exactly one payment exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_executor_rolls_back() {
    let db = Db::new("tx_stale").await;
    let stale_idem = Idempotency::builder()
        .shared_scope(true)
        .store(NoRenewals(db.store.clone()))
        .lease(Duration::from_millis(300))
        .build();
    let stale = Payments::new("stale");
    let stale_router = router(&stale_idem, stale.clone());
    let first = tokio::spawn({
        let router = stale_router.clone();
        async move { send(&router, post_with("/pay", Some("k"), "wait")).await }
    });
    stale.started.notified().await;

    let fresh = Payments::new("fresh");
    let fresh_router = router(&db.idem(), fresh.clone());
    // Released at once: this executor does not wait on the gate.
    fresh.gate.notify_one();
    let mut took_over = None;
    for _ in 0..200 {
        let answer = send(&fresh_router, post_with("/pay", Some("k"), "wait")).await;
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
    let retry = send(&stale_router, post_with("/pay", Some("k"), "wait")).await;
    assert!(retry.is_replay());
    assert_eq!(retry.body, "paid by fresh");
}

/// Guards: while a handler holds SQLite's write lock past its lease, its renewals cannot
/// be written and the lease lapses on the clock; no other executor can take the key over
/// meanwhile, so the handler's completion still commits (the fencing check asks for its
/// claim, not for an unexpired lease): one run, one payment, a 201 and its replay. A
/// retry sent meanwhile never runs the handler a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_lapsed_under_the_write_lock_still_commits_once() {
    let db = Db::new("tx_lapsed").await;
    let idem = Idempotency::builder()
        .shared_scope(true)
        .store(db.store.clone())
        .lease(Duration::from_millis(300))
        .build();
    let app = Payments::new("A");
    let router = router(&idem, app.clone());
    let first = tokio::spawn({
        let router = router.clone();
        async move { send(&router, post_with("/pay", Some("k"), "hold")).await }
    });
    app.started.notified().await;
    // Reads go on beside the writer (WAL): wait until the claim is no longer live.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while db.live_records().await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lease never lapsed under the write lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let retry = tokio::spawn({
        let router = router.clone();
        async move { send(&router, post_with("/pay", Some("k"), "hold")).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    app.gate.notify_one();
    let first = first.await.unwrap();
    // A retry that ran the handler (it must not) would wait here: let it through.
    app.gate.notify_one();
    assert_eq!(
        first.status,
        StatusCode::CREATED,
        "{:?}",
        String::from_utf8_lossy(&first.body)
    );
    assert_eq!(db.notes().await, ["A"]);
    let retry = retry.await.unwrap();
    assert!(
        retry.is_replay() || retry.status == StatusCode::SERVICE_UNAVAILABLE,
        "the retry waited for the lock, then replayed (or gave up): {} {:?}",
        retry.status,
        String::from_utf8_lossy(&retry.body)
    );
    let again = send(&router, post_with("/pay", Some("k"), "hold")).await;
    assert!(again.is_replay());
    assert_eq!(again.body, first.body);
    assert_eq!(app.runs(), 1, "one run");
    assert_eq!(db.notes().await, ["A"], "one payment");
}

/// Guards: 50 concurrent payments with one key make one payment; the others get 409 or
/// the replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_payments_make_one() {
    let db = Db::new("tx_concurrent").await;
    let app = Payments::new("A");
    let router = router(&db.idem(), app.clone());
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let router = router.clone();
            tokio::spawn(async move { send(&router, post_with("/pay", Some("one"), "ok")).await })
        })
        .collect();
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

/// Guards: an execution dropped after its business write and before the commit (its
/// runtime shut down, the handler's future and its transaction dropped with it) leaves
/// nothing: the write lock is given back, and once the lease runs out the retry runs
/// afresh and exactly one payment exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_execution_leaves_nothing() {
    let db = Db::new("tx_dropped").await;
    let lease = Duration::from_millis(500);
    let doomed = Payments::new("doomed");
    std::thread::spawn({
        let (url, doomed) = (db.file.url.clone(), doomed.clone());
        move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async {
                // A pool of this runtime's own: its connections go with it.
                let store = SqliteStore::connect(&url).await.unwrap();
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
    assert_eq!(doomed.runs(), 1);
    let app = Payments::new("after");
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
        "the dropped execution's write is gone"
    );
}

/// A handler that reads before it writes, each step on a signal of the test's.
#[derive(Clone, Default)]
struct Turn {
    name: &'static str,
    running: Arc<Notify>,
    go_read: Arc<Notify>,
    has_read: Arc<Notify>,
    go_write: Arc<Notify>,
}

/// Says it runs (its key claimed), then on the test's signals reads the payments, and
/// inserts one.
#[idempotent]
async fn read_then_write(State(turn): State<Turn>, tx: SqliteTransaction) -> Response {
    turn.running.notify_one();
    turn.go_read.notified().await;
    let counted = match tx.conn().await {
        Ok(mut conn) => {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM payments")
                .fetch_one(&mut *conn)
                .await
        }
        Err(error) => Err(error),
    };
    if let Err(error) = counted {
        return (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response();
    }
    turn.has_read.notify_one();
    turn.go_write.notified().await;
    match insert(&tx, turn.name).await {
        Ok(()) => (StatusCode::CREATED, format!("paid by {}", turn.name)).into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    }
}

/// Guards: two transactional handlers on different keys that each read before they
/// write both commit. The second waits for the first's write lock from its first
/// statement (`BEGIN IMMEDIATE`), rather than reading beside it and then failing to write
/// on a snapshot the first's commit made stale (`SQLITE_BUSY_SNAPSHOT`, which no busy
/// timeout waits out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactional_handlers_take_turns_and_both_commit() {
    let db = Db::new("tx_turns").await;
    let idem = db.idem();
    let (a, b) = (
        Turn {
            name: "A",
            ..Turn::default()
        },
        Turn {
            name: "B",
            ..Turn::default()
        },
    );
    let call = |turn: &Turn, key: &'static str| {
        let router = Router::new()
            .route("/pay", post(read_then_write))
            .with_state(turn.clone())
            .layer(idem.layer());
        tokio::spawn(async move { send(&router, post_with("/pay", Some(key), "")).await })
    };
    let (first, second) = (call(&a, "a"), call(&b, "b"));
    // Both keys claimed, neither transaction open yet.
    a.running.notified().await;
    b.running.notified().await;
    a.go_read.notify_one();
    a.has_read.notified().await;
    // The second opens its transaction while the first holds it: it may not read beside it.
    b.go_read.notify_one();
    let read_beside = tokio::time::timeout(Duration::from_millis(300), b.has_read.notified()).await;
    a.go_write.notify_one();
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    if read_beside.is_err() {
        b.has_read.notified().await;
    }
    b.go_write.notify_one();
    let second = second.await.unwrap();
    assert_eq!(
        second.status,
        StatusCode::CREATED,
        "{:?}",
        String::from_utf8_lossy(&second.body)
    );
    assert_eq!(db.notes().await, ["A", "B"]);
}

/// Inserts a payment, then a tag with `INSERT OR ROLLBACK` that conflicts (SQLite rolls
/// the whole transaction back), ignores that error and answers 201.
#[idempotent]
async fn careless(State(app): State<Payments>, tx: SqliteTransaction) -> Response {
    app.runs.fetch_add(1, Ordering::SeqCst);
    if let Err(error) = insert(&tx, "careless").await {
        return (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response();
    }
    let conflict = match tx.conn().await {
        Ok(mut conn) => {
            sqlx::query("INSERT OR ROLLBACK INTO tags VALUES ('taken')")
                .execute(&mut *conn)
                .await
        }
        Err(error) => Err(error),
    };
    assert!(conflict.is_err(), "the tag is taken");
    (StatusCode::CREATED, "paid").into_response()
}

/// Guards: a statement that makes SQLite roll the transaction back by itself (here an
/// `INSERT OR ROLLBACK` conflict the handler ignores) never yields a success for the
/// writes it undid: the record is not committed alone (no replayed 201 without the
/// payment), with or without a key; and the connection is left fit for the next
/// transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_sqlite_rolled_back_never_answers_success() {
    // One connection: the next transaction gets the very connection this one used.
    let db = Db::with("tx_auto_rollback", |builder| builder.max_connections(1)).await;
    let idem = db.idem();
    let app = Payments::new("A");
    let careless_router = Router::new()
        .route("/careless", post(careless))
        .with_state(app.clone())
        .layer(idem.layer());
    for attempt in 0..2 {
        let answer = send(&careless_router, post_with("/careless", Some("k"), "")).await;
        assert!(
            !answer.status.is_success(),
            "attempt {attempt}: {} {:?} for a payment SQLite rolled back",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        );
        assert!(db.notes().await.is_empty());
    }
    assert_eq!(
        app.runs(),
        2,
        "nothing was stored for the key: the retry ran"
    );
    let unkeyed = send(&careless_router, post_with("/careless", None, "")).await;
    assert!(
        !unkeyed.status.is_success(),
        "unkeyed: {} for a payment SQLite rolled back",
        unkeyed.status
    );
    assert!(db.notes().await.is_empty());

    let paid = send(
        &router(&idem, app.clone()),
        post_with("/pay", Some("next"), "ok"),
    )
    .await;
    assert_eq!(
        paid.status,
        StatusCode::CREATED,
        "{:?}",
        String::from_utf8_lossy(&paid.body)
    );
    assert_eq!(db.notes().await, ["A"]);
}

/// No `#[idempotent]`: nothing would commit the transaction, so it refuses to be used.
async fn plain_pay(tx: SqliteTransaction) -> Response {
    match insert(&tx, "plain").await {
        Ok(()) => (StatusCode::CREATED, "paid").into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    }
}

/// Guards: a handler that takes `SqliteTransaction` without `#[idempotent]` never answers
/// a success for writes that would be lost, and the error names the fix; a handle whose
/// store is not a `SqliteStore` answers a problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_idempotent_or_its_store_the_transaction_refuses() {
    let db = Db::new("tx_plain").await;
    let plain = Router::new()
        .route("/pay", post(plain_pay))
        .layer(db.idem().layer());
    for key in [Some("k"), None] {
        let answer = send(&plain, post_with("/pay", key, "")).await;
        assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(
            String::from_utf8_lossy(&answer.body).contains("#[idempotent]"),
            "the error names the fix: {:?}",
            String::from_utf8_lossy(&answer.body)
        );
    }
    assert!(db.notes().await.is_empty());

    let memory = router(&Idempotency::in_memory(), Payments::new("A"));
    let refused = send(&memory, post_with("/pay", Some("k"), "ok")).await;
    refused.assert_problem(StatusCode::INTERNAL_SERVER_ERROR, Problem::NO_TRANSACTION);
    assert!(
        refused.json()["detail"]
            .as_str()
            .unwrap()
            .contains("SqliteStore")
    );
}

/// Guards: `once` in a SQLite transaction: `Err` rolls the operation's writes back (the
/// next call runs), `Ok` commits them with the result (a later call replays without
/// writing); on a store that is not a `SqliteStore` nothing runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_commits_with_its_result() {
    let db = Db::new("tx_once").await;
    let idem = db.idem();
    let runs = Arc::new(AtomicUsize::new(0));
    let write = |note: &'static str, fail: bool| {
        let runs = runs.clone();
        move |tx: SqliteTransaction| async move {
            runs.fetch_add(1, Ordering::SeqCst);
            insert(&tx, note).await.map_err(|e| e.to_string())?;
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
    assert_eq!(runs.load(Ordering::SeqCst), 2);

    let memory = Idempotency::in_memory();
    let refused = memory
        .once(OnceKey::compose(["x"]), "in")
        .run_in_transaction(write("never", false))
        .await;
    assert!(
        matches!(refused, Err(OnceError::NoTransaction)),
        "{refused:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2, "nothing ran");
}

#[derive(Clone, Default)]
struct Holding {
    holding: Arc<Notify>,
    release: Arc<Notify>,
}

/// Writes, then holds the write lock until told to let go.
#[idempotent]
async fn hold_the_lock(State(hold): State<Holding>, tx: SqliteTransaction) -> Response {
    insert(&tx, "held").await.unwrap();
    hold.holding.notify_one();
    hold.release.notified().await;
    (StatusCode::CREATED, "held").into_response()
}

#[idempotent]
async fn plain_claim() -> Response {
    (StatusCode::CREATED, "plain").into_response()
}

/// Guards: while a `SqliteTransaction` holds the write lock, another key's claim waits
/// for it as long as the busy timeout allows (5 s by default; README), not only idem's
/// default 2 s store timeout, after which it was refused with `503`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_waits_for_the_write_lock_as_long_as_the_busy_timeout() {
    let db = Db::new("lock_wait").await;
    let idem = Idempotency::builder()
        .shared_scope(true)
        .store(db.store.clone())
        .build();
    let hold = Holding::default();
    let router = Router::new()
        .route("/hold", post(hold_the_lock))
        .route("/plain", post(plain_claim))
        .with_state(hold.clone())
        .layer(idem.layer());
    let held = tokio::spawn({
        let router = router.clone();
        async move { send(&router, post_with("/hold", Some("holds"), "")).await }
    });
    hold.holding.notified().await;
    let mut other = tokio::spawn({
        let router = router.clone();
        async move { send(&router, post_with("/plain", Some("waits"), "")).await }
    });
    let early = tokio::time::timeout(Duration::from_millis(2500), &mut other).await;
    assert!(
        early.is_err(),
        "answered while the lock was held, past 2 s: {:?}",
        early.map(|answer| answer.unwrap().status)
    );
    hold.release.notify_one();
    assert_eq!(other.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(held.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(db.notes().await, ["held"]);
}

/// Inserts a payment, then ends the transaction itself and begins another, as a helper
/// written for a plain connection might, and answers `201`.
#[idempotent]
async fn rolls_back_and_begins_again(
    State(app): State<Payments>,
    tx: SqliteTransaction,
) -> Response {
    app.runs.fetch_add(1, Ordering::SeqCst);
    insert(&tx, "gone").await.unwrap();
    let mut conn = tx.conn().await.unwrap();
    sqlx::query("ROLLBACK").execute(&mut *conn).await.unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut *conn)
        .await
        .unwrap();
    (StatusCode::CREATED, "paid").into_response()
}

/// Guards: work that rolls its transaction back and begins another never gets a success
/// stored for the writes it undid (SPEC §7): idem writes its record only in the
/// transaction it began, answers `503`, and the retry runs again; the connection stays fit
/// for the next transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_that_begins_its_transaction_again_never_gets_a_success_stored() {
    let db = Db::with("tx_begun_again", |builder| builder.max_connections(1)).await;
    let idem = db.idem();
    let app = Payments::new("A");
    let again = Router::new()
        .route("/again", post(rolls_back_and_begins_again))
        .with_state(app.clone())
        .layer(idem.layer());
    for attempt in 0..2 {
        let answer = send(&again, post_with("/again", Some("k"), "")).await;
        assert_eq!(
            answer.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "attempt {attempt}: {:?}",
            String::from_utf8_lossy(&answer.body)
        );
        assert!(db.notes().await.is_empty());
    }
    assert_eq!(
        app.runs(),
        2,
        "nothing was stored for the key: the retry ran"
    );
    let paid = send(
        &router(&idem, app.clone()),
        post_with("/pay", Some("next"), "ok"),
    )
    .await;
    assert_eq!(paid.status, StatusCode::CREATED);
    assert_eq!(db.notes().await, ["A"]);
}

/// Inserts a payment, then a tag with `INSERT OR ROLLBACK` that conflicts (SQLite rolls
/// the whole transaction back), and answers the error: `500`.
#[idempotent]
async fn conflict_then_500(State(app): State<Payments>, tx: SqliteTransaction) -> Response {
    app.runs.fetch_add(1, Ordering::SeqCst);
    insert(&tx, "lost").await.unwrap();
    let mut conn = tx.conn().await.unwrap();
    match sqlx::query("INSERT OR ROLLBACK INTO tags VALUES ('taken')")
        .execute(&mut *conn)
        .await
    {
        Ok(_) => (StatusCode::CREATED, "tagged").into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    }
}

/// Guards: after SQLite rolled a transaction back by itself and the work answered `5xx`,
/// the connection is fit for the next transaction (its `ROLLBACK` had nothing to end,
/// failed, and left the driver counting a transaction, so every later one on that
/// connection was refused): with or without a key, on a pool of one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_error_after_sqlite_rolled_back_leaves_the_connection_fit() {
    let db = Db::with("tx_poisoned", |builder| builder.max_connections(1)).await;
    let idem = db.idem();
    let app = Payments::new("A");
    let routes = Router::new()
        .route("/conflict", post(conflict_then_500))
        .with_state(app.clone())
        .layer(idem.layer());
    for key in [Some("k"), None] {
        let failed = send(&routes, post_with("/conflict", key, "")).await;
        assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR, "{key:?}");
        let paid = send(
            &router(&idem, app.clone()),
            post_with("/pay", Some(&format!("next-{key:?}")), "ok"),
        )
        .await;
        assert_eq!(
            paid.status,
            StatusCode::CREATED,
            "{key:?}: {:?}",
            String::from_utf8_lossy(&paid.body)
        );
    }
    assert_eq!(db.notes().await, ["A", "A"]);
}

/// Guards: no store table may take the name of the table a `SqliteTransaction` marks
/// itself in (SQLite would find the mark first); any other name works with transactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_marks_table_name_is_refused_and_others_work() {
    let file = SqliteFile::create("tx_mark_name");
    let refused = SqliteStore::builder(file.url.as_str())
        .table("idem_open_transaction_mark")
        .connect()
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("checking the table's name"),
        "{refused}"
    );
    let db = Db::with("tx_table_idem_work", |builder| builder.table("idem_work")).await;
    let paid = send(
        &router(&db.idem(), Payments::new("A")),
        post_with("/pay", Some("k"), "ok"),
    )
    .await;
    assert_eq!(paid.status, StatusCode::CREATED);
    assert_eq!(db.notes().await, ["A"]);
}

/// Inserts a payment, then opens a savepoint of its own (`conn.begin()`, as a helper
/// written for a plain connection might) and inserts a tag there with `INSERT OR ROLLBACK`
/// that conflicts: SQLite rolls the whole transaction back, and the savepoint's rollback
/// finds nothing to end. Answers `500` where the body says `fail`, else `201`.
#[idempotent]
async fn conflict_in_a_savepoint(
    State(app): State<Payments>,
    tx: SqliteTransaction,
    body: String,
) -> Response {
    use sqlx::Connection;
    app.runs.fetch_add(1, Ordering::SeqCst);
    insert(&tx, "lost").await.unwrap();
    let mut conn = tx.conn().await.unwrap();
    let mut savepoint = conn.begin().await.unwrap();
    let conflict = sqlx::query("INSERT OR ROLLBACK INTO tags VALUES ('taken')")
        .execute(&mut *savepoint)
        .await;
    assert!(conflict.is_err(), "the tag is taken");
    let _ = savepoint.rollback().await;
    if body == "fail" {
        (StatusCode::INTERNAL_SERVER_ERROR, "the tag was taken").into_response()
    } else {
        (StatusCode::CREATED, "paid").into_response()
    }
}

/// Whether another connection to the file can write now, within a short busy timeout:
/// no transaction is left holding SQLite's write lock.
async fn file_is_writable(db: &Db) -> Result<(), sqlx::Error> {
    use sqlx::ConnectOptions;
    let mut other = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&db.file.path)
        .busy_timeout(Duration::from_millis(500))
        .connect()
        .await?;
    sqlx::query("INSERT INTO tags VALUES (?1)")
        .bind(format!("other-{}", db.notes().await.len()))
        .execute(&mut other)
        .await
        .map(drop)
}

/// Guards: work whose own savepoint outlived the transaction SQLite rolled back by itself
/// never gets a success stored, and leaves no transaction open on the pooled connection:
/// the next payment on it commits, and another connection can write (a transaction left
/// open there kept the write lock, lost every later write on that connection, and refused
/// every later `SqliteTransaction` on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_savepoint_sqlite_rolled_back_leaves_no_transaction_open() {
    let db = Db::with("tx_savepoint_lost", |builder| builder.max_connections(1)).await;
    let idem = db.idem();
    let app = Payments::new("A");
    let routes = Router::new()
        .route("/savepoint", post(conflict_in_a_savepoint))
        .with_state(app.clone())
        .layer(idem.layer());
    let mut expected = Vec::new();
    for (body, key) in [("ok", Some("k1")), ("fail", Some("k2")), ("ok", None)] {
        let answer = send(&routes, post_with("/savepoint", key, body)).await;
        assert!(
            !answer.status.is_success(),
            "{body} {key:?}: {} {:?} for a payment SQLite rolled back",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        );
        assert_eq!(db.notes().await, expected, "{body} {key:?}");
        file_is_writable(&db)
            .await
            .unwrap_or_else(|error| panic!("{body} {key:?}: the file stays locked: {error}"));
        let paid = send(
            &router(&idem, Payments::new("A")),
            post_with("/pay", Some(&format!("next-{body}-{key:?}")), "ok"),
        )
        .await;
        assert_eq!(
            paid.status,
            StatusCode::CREATED,
            "{body} {key:?}: {:?}",
            String::from_utf8_lossy(&paid.body)
        );
        expected.push("A".to_owned());
        assert_eq!(db.notes().await, expected, "{body} {key:?}");
    }
    let again = send(&routes, post_with("/savepoint", Some("k1"), "ok")).await;
    assert!(!again.status.is_success(), "k1 again: {}", again.status);
    assert_eq!(app.runs(), 4, "nothing was stored for k1: its retry ran");
}

/// Inserts a payment, then a tag in a savepoint of its own that it rolls back (or, where
/// the body says `leak`, leaves open: forgotten, never ended), and answers `201`.
#[idempotent]
async fn undoes_a_savepoint(
    State(app): State<Payments>,
    tx: SqliteTransaction,
    body: String,
) -> Response {
    use sqlx::Connection;
    app.runs.fetch_add(1, Ordering::SeqCst);
    insert(&tx, app.name).await.unwrap();
    let mut conn = tx.conn().await.unwrap();
    let mut savepoint = conn.begin().await.unwrap();
    sqlx::query("INSERT INTO tags VALUES ('undone')")
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

/// Guards: a savepoint the work opens and rolls back itself undoes only its own writes:
/// the payment and the record commit, the retry replays. Work that returns inside a
/// savepoint of its own gets no success stored (idem's commit would only have released
/// the savepoint and left the transaction open, holding the write lock): `503`, nothing
/// written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_savepoint_of_the_work_undoes_only_its_writes() {
    let db = Db::with("tx_savepoint", |builder| builder.max_connections(1)).await;
    let app = Payments::new("A");
    let routes = Router::new()
        .route("/savepoint", post(undoes_a_savepoint))
        .with_state(app.clone())
        .layer(db.idem().layer());
    let leaked = send(&routes, post_with("/savepoint", Some("leak"), "leak")).await;
    assert_eq!(
        leaked.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{:?}",
        String::from_utf8_lossy(&leaked.body)
    );
    assert!(db.notes().await.is_empty());
    file_is_writable(&db).await.unwrap();
    for _ in 0..2 {
        let answer = send(&routes, post_with("/savepoint", Some("k"), "")).await;
        assert_eq!(answer.status, StatusCode::CREATED);
    }
    assert_eq!(app.runs(), 2);
    assert_eq!(db.notes().await, ["A"]);
    let undone: i64 = sqlx::query_scalar("SELECT count(*) FROM tags WHERE name = 'undone'")
        .fetch_one(db.store.pool())
        .await
        .unwrap();
    assert_eq!(undone, 0);
    file_is_writable(&db).await.unwrap();
}
