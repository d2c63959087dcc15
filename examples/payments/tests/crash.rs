//! The app killed (SIGKILL) in the middle of a payment: after idem claimed the key, before
//! the handler touched the database. The first run is this test binary started again as a
//! child process that serves the app built from the library, as the `payments` binary
//! builds it, with its idempotency store behind a closed [`Gate`]: the payment waits
//! there, and the process is killed. The real `payments` binary is then started on the
//! same SQLite file; the client's retry with the same key must end in exactly one payment.
//!
//! Two stores: in memory, where the restart forgets the claim and the retry runs at once;
//! and a private `redis-server`, where the claim outlives the crash and the retry is told
//! `409` until the dead process's lease runs out, and then runs once. Both runs have a
//! short lease (`PAYMENTS_IDEM_LEASE_MS`) so that this happens within the test.

#![allow(clippy::unwrap_used)]

mod support;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use idem_runtime::http::PROBLEM_JSON;
use payments::{
    Config, DEFAULT_REDIS_PREFIX, Db, Item, NewOrder, NewPayment, ORDER_PAID, Order, Payment,
};
use reqwest::StatusCode;
use sqlx::{AnyConnection, AnyPool, Connection, PgConnection, Row};
use support::{Answer, Gate, PgSchema, TempDir};
use testkit::RedisServer;
use tracing_subscriber::EnvFilter;

/// The lease both runs of the app have (`PAYMENTS_IDEM_LEASE_MS`), short so that a
/// crashed claim frees itself within the test.
const LEASE_MS: i64 = 1_500;
/// The test that serves the app with its claims held; [`Run::Held`] runs only it.
const HELD_APP_TEST: &str = "serve_the_app_holding_every_claim";
/// Set in the environment of [`Run::Held`], so that [`HELD_APP_TEST`] serves.
const HELD_APP_VAR: &str = "PAYMENTS_CRASH_TEST_HELD_APP";
/// What [`HELD_APP_TEST`] prints when a payment waits at its gate: idem has claimed its
/// key, and the handler has not started.
const HELD: &str = "a payment claimed its key and is held before the handler";

/// Which program serves a run of the app.
#[derive(Clone, Copy, Debug)]
enum Run {
    /// This test binary, running only [`HELD_APP_TEST`]: the app with every claim held.
    Held,
    /// The real `payments` binary.
    Binary,
}

/// One run of the app in a process of its own, its output in a log file; killed when
/// dropped.
struct App {
    child: Child,
    url: String,
    log: PathBuf,
}

impl App {
    /// Starts `run` on a free port over `database_url`, and waits until it answers
    /// `/healthz`.
    ///
    /// # Panics
    /// If it cannot be started, exits, or does not answer within 30 s.
    async fn start(dir: &Path, name: &str, run: Run, database_url: &str, store: &Store) -> Self {
        let addr = format!("127.0.0.1:{}", testkit::free_port());
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).unwrap();
        let mut command = match run {
            Run::Held => {
                let mut command = Command::new(std::env::current_exe().unwrap());
                command
                    .args([HELD_APP_TEST, "--exact", "--ignored", "--nocapture"])
                    .env(HELD_APP_VAR, "1");
                command
            }
            Run::Binary => {
                let mut command = Command::new(env!("CARGO_BIN_EXE_payments"));
                command.env_remove(HELD_APP_VAR);
                command
            }
        };
        command
            .current_dir(dir)
            .env("PAYMENTS_ADDR", &addr)
            .env("DATABASE_URL", database_url)
            .env("RUST_LOG", "payments=info,idem=info")
            .env("NO_COLOR", "1")
            .env("PAYMENTS_IDEM_LEASE_MS", LEASE_MS.to_string())
            .env_remove("REDIS_URL")
            .env_remove("PAYMENTS_IDEM_STORE")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        match store {
            Store::Memory => {
                command.env("PAYMENTS_IDEM_STORE", "memory");
            }
            Store::Database => {}
            Store::Redis(server) => {
                command.env("REDIS_URL", server.url());
            }
        }
        let child = command
            .spawn()
            .unwrap_or_else(|error| panic!("start {run:?}: {error}"));
        let mut app = Self {
            child,
            url: format!("http://{addr}"),
            log,
        };
        let http = support::http();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            app.assert_running();
            let health = http
                .get(format!("{}/healthz", app.url))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if health.is_ok_and(|response| response.status().is_success()) {
                return app;
            }
            assert!(
                Instant::now() < deadline,
                "payments ({name}) did not answer /healthz within 30 s; its log:\n{}",
                app.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!(
                "payments exited early ({status}); its log:\n{}",
                self.log_text()
            );
        }
    }

    /// Waits until the log shows `needle`.
    async fn wait_for_log(&mut self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log_text().contains(needle) {
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "payments did not log {needle:?} within 10 s; its log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: no shutdown, no clean-up, no response for requests in flight.
    fn crash(&mut self) {
        self.child.kill().unwrap();
        let status = self.child.wait().unwrap();
        assert!(!status.success(), "killed, not exited: {status}");
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn pay(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    request: &NewPayment,
) -> Result<Answer, reqwest::Error> {
    let response = http
        .post(format!("{url}/payments"))
        .header("idempotency-key", key)
        .json(request)
        .timeout(Duration::from_secs(90))
        .send()
        .await?;
    Answer::read(response).await
}

/// Retries the payment with the same key, with backoff, until it is settled (not `409`,
/// not `503`, not a transport error); at most 20 attempts or 15 s.
async fn pay_until_settled(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    request: &NewPayment,
) -> (Answer, u32) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut delay = Duration::from_millis(50);
    for attempt in 1..=20 {
        let result = pay(http, url, key, request).await;
        let last = attempt == 20 || Instant::now() >= deadline;
        match result {
            Ok(answer)
                if !matches!(
                    answer.status,
                    StatusCode::CONFLICT | StatusCode::SERVICE_UNAVAILABLE
                ) =>
            {
                return (answer, attempt);
            }
            Ok(answer) if last => panic!("the payment did not settle: {answer:?}"),
            Err(error) if last => panic!("the payment did not settle: {error}"),
            _ => {}
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
    unreachable!()
}

/// The payments rows of `order_id`: (id, idempotency key).
async fn payments_of(database_url: &str, order_id: &str) -> Vec<(String, Option<String>)> {
    sqlx::any::install_default_drivers();
    let pool = AnyPool::connect(database_url).await.unwrap();
    let rows = sqlx::query("SELECT id, idempotency_key FROM payments WHERE order_id = $1")
        .bind(order_id)
        .fetch_all(&pool)
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get("id"), row.get("idempotency_key")))
        .collect();
    pool.close().await;
    rows
}

/// Which store the app runs on in a scenario.
enum Store {
    Memory,
    /// idem's records in the app's database.
    Database,
    Redis(RedisServer),
}

/// Kill the app mid-payment, restart it, retry with the same key: one payment.
async fn crash_mid_payment_then_retry(store: Store) {
    let dir = TempDir::new("crash");
    let database_url = format!("sqlite://{}?mode=rwc", dir.0.join("p.db").display());
    let http = support::http();

    let mut first = App::start(&dir.0, "first", Run::Held, &database_url, &store).await;
    let (order, request) = new_order(&http, &first).await;
    let key = format!("crash-{}", uuid::Uuid::new_v4());

    // The payment claims its key and is held at the gate. (The order above has no key, so
    // nothing held it.)
    let in_flight = tokio::spawn({
        let (http, url, key, request) = (
            http.clone(),
            first.url.clone(),
            key.clone(),
            request.clone(),
        );
        async move { pay(&http, &url, &key, &request).await }
    });
    first.wait_for_log(HELD).await;
    let held = pay(&http, &first.url, &key, &request).await.unwrap();
    assert_eq!(
        held.status,
        StatusCode::CONFLICT,
        "the held payment holds its key: {held:?}"
    );
    assert_eq!(held.content_type, PROBLEM_JSON);
    assert!(held.retry_after.is_some(), "a 409 says when to retry");
    assert!(
        payments_of(&database_url, &order.id).await.is_empty(),
        "nothing is written while the payment is held"
    );

    // SIGKILL mid-payment: the client gets no answer, and nothing was written.
    first.crash();
    let lost = in_flight.await.unwrap();
    assert!(
        lost.is_err(),
        "the killed process answered the payment: {lost:?}"
    );
    assert!(
        payments_of(&database_url, &order.id).await.is_empty(),
        "the killed payment wrote nothing"
    );

    let second = App::start(&dir.0, "second", Run::Binary, &database_url, &store).await;
    if !matches!(store, Store::Memory) {
        // The claim outlived the crash: the retry is told to wait, and the key frees
        // itself only when the dead process's lease runs out.
        let early = pay(&http, &second.url, &key, &request).await.unwrap();
        assert_eq!(
            early.status,
            StatusCode::CONFLICT,
            "the crashed claim still holds the key: {early:?}"
        );
        assert_eq!(early.content_type, PROBLEM_JSON);
        assert!(early.retry_after.is_some(), "a 409 says when to retry");
    }
    if let Store::Redis(server) = &store {
        let mut redis = testkit::redis_connection(&server.url()).await;
        let claims: Vec<String> = testkit::keys_under(&mut redis, DEFAULT_REDIS_PREFIX)
            .await
            .into_iter()
            .filter(|k| k.ends_with(&format!(":{key}")))
            .collect();
        assert_eq!(claims.len(), 1, "one claim for the key: {claims:?}");
        let ttl_ms: i64 = redis::cmd("PTTL")
            .arg(&claims[0])
            .query_async(&mut redis)
            .await
            .unwrap();
        assert!(
            ttl_ms > 0 && ttl_ms <= LEASE_MS,
            "the crashed claim expires with its lease, in {ttl_ms} ms"
        );
    }

    // The retry with the same key runs the payment, once.
    let (answer, attempts) = pay_until_settled(&http, &second.url, &key, &request).await;
    assert_eq!(
        answer.status,
        StatusCode::CREATED,
        "the retry pays: {answer:?}"
    );
    assert!(!answer.replayed, "nothing was stored before the crash");
    let payment: Payment = answer.json();
    assert_eq!(payment.order_id, order.id);
    let rows = payments_of(&database_url, &order.id).await;
    assert_eq!(rows.len(), 1, "exactly one payment: {rows:?}");
    assert_eq!(rows[0].0, payment.id);
    assert!(
        rows[0]
            .1
            .as_deref()
            .is_some_and(|scoped| scoped.ends_with(&format!(":{key}"))),
        "the payment carries the client's key: {rows:?}"
    );
    let paid: Order = http
        .get(format!("{}/orders/{}", second.url, order.id))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(paid.status, ORDER_PAID);

    // And the key now replays that payment.
    let again = pay(&http, &second.url, &key, &request).await.unwrap();
    assert_eq!(again.status, StatusCode::CREATED, "{again:?}");
    assert!(again.replayed, "the second retry is a replay: {again:?}");
    let replayed: Payment = again.json();
    assert_eq!(replayed.id, payment.id);
    assert_eq!(payments_of(&database_url, &order.id).await.len(), 1);
    eprintln!(
        "crash: retry settled after {attempts} attempt(s), payment {}",
        payment.id
    );

    drop(second);
    drop(first);
    drop(store);
    drop(dir);
}

/// A payment whose process is SIGKILLed after idem claimed the key runs exactly once when
/// the client retries against the restarted app (in-memory store: the claim dies too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_killed_mid_flight_runs_once_after_restart_on_the_memory_store() {
    crash_mid_payment_then_retry(Store::Memory).await;
}

/// A payment whose process is SIGKILLed keeps its claim in the SQLite file (retries get
/// 409) until the lease ends, and then the retry with the same key runs it exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_killed_mid_flight_holds_its_claim_in_the_sqlite_file_until_the_lease_ends_then_runs_once()
 {
    crash_mid_payment_then_retry(Store::Database).await;
}

/// A payment whose process is SIGKILLed keeps its claim in Redis (retries get 409) until
/// the lease ends, and then the retry with the same key runs it exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_killed_mid_flight_holds_its_redis_claim_until_the_lease_ends_then_runs_once() {
    crash_mid_payment_then_retry(Store::Redis(RedisServer::start())).await;
}

/// The first run of [`crash_mid_payment_then_retry`]: the app as the `payments` binary
/// serves it, configured by the same environment, with its idempotency store behind a
/// closed [`Gate`], so every request that claims a key is held there. [`App::start`] runs
/// it in a child process ([`Run::Held`]); run any other way, it returns at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of the crash tests, which start it themselves"]
async fn serve_the_app_holding_every_claim() {
    if std::env::var_os(HELD_APP_VAR).is_none() {
        return;
    }
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::from_default_env())
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    let config = Config::from_env().unwrap();
    let db = Db::connect(&config.database_url).await.unwrap();
    let gate = Gate::new();
    gate.close();
    let app = support::app_behind(&gate, &config, db).await;
    let listener = tokio::net::TcpListener::bind(config.addr).await.unwrap();
    tokio::spawn(async move {
        gate.held().await;
        eprintln!("{HELD}");
    });
    axum::serve(listener, app).await.unwrap();
}

/// An order of 42.00 EUR, created on `app` without a key.
async fn new_order(http: &reqwest::Client, app: &App) -> (Order, NewPayment) {
    let response = http
        .post(format!("{}/orders", app.url))
        .json(&NewOrder {
            customer_id: "cus_crash".into(),
            currency: "EUR".into(),
            items: vec![Item {
                sku: "LAMP".into(),
                quantity: 1,
                unit_price_cents: 4_200,
            }],
        })
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let order: Order = response.json().await.unwrap();
    let payment = NewPayment {
        order_id: order.id.clone(),
        amount_cents: order.total_cents,
        currency: "EUR".into(),
    };
    (order, payment)
}

/// How many rows of idem's table hold `key`.
async fn records_of(database_url: &str, key: &str) -> usize {
    sqlx::any::install_default_drivers();
    let mut connection = AnyConnection::connect(database_url).await.unwrap();
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM idem_records WHERE key LIKE $1")
        .bind(format!("%:{key}"))
        .fetch_one(&mut connection)
        .await
        .unwrap();
    usize::try_from(count).unwrap()
}

/// Guards: the real `payments` binary on PostgreSQL (idem's records in the same database),
/// SIGKILLed after its payment INSERT and before the transaction commits: nothing of the
/// payment survives, the key's claim frees itself with its lease, and the retry after the
/// restart runs the payment once, afresh (`201`, not a replay).
///
/// The kill point is reached without any hook in the app: the test holds the order's row
/// lock, so the payment's `UPDATE orders`, which follows its INSERT in the same
/// transaction, waits; PostgreSQL shows that wait in `pg_stat_activity`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_killed_between_its_insert_and_its_commit_on_postgres_leaves_nothing_and_the_retry_pays_once()
 {
    let dir = TempDir::new("kill-before-commit");
    let schema = PgSchema::new("kill_before_commit").await;
    let database_url = schema.url();
    let http = support::http();
    let mut first = App::start(
        &dir.0,
        "first",
        Run::Binary,
        &database_url,
        &Store::Database,
    )
    .await;
    let (order, request) = new_order(&http, &first).await;
    let key = format!("kill-{}", uuid::Uuid::new_v4());

    let mut blocker = PgConnection::connect(&database_url).await.unwrap();
    let mut lock = blocker.begin().await.unwrap();
    sqlx::query(
        // Not FOR UPDATE: the INSERT's foreign-key check (FOR KEY SHARE) must pass.
        "SELECT id FROM orders WHERE id = $1 FOR NO KEY UPDATE",
    )
    .bind(&order.id)
    .execute(&mut *lock)
    .await
    .unwrap();
    let in_flight = tokio::spawn({
        let (http, url, key, request) = (
            http.clone(),
            first.url.clone(),
            key.clone(),
            request.clone(),
        );
        async move { pay(&http, &url, &key, &request).await }
    });
    // The payment's transaction has inserted its row and waits for the order's lock.
    let mut watcher = PgConnection::connect(&database_url).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE wait_event_type = 'Lock' AND query LIKE 'UPDATE orders%' AND datname = current_database()",
        )
        .fetch_one(&mut watcher)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        first.assert_running();
        assert!(
            Instant::now() < deadline,
            "the payment never reached its UPDATE; log:\n{}",
            first.log_text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        records_of(&database_url, &key).await,
        1,
        "the key is claimed"
    );

    first.crash();
    assert!(
        in_flight.await.unwrap().is_err(),
        "the killed process answered"
    );
    lock.rollback().await.unwrap();
    assert!(
        payments_of(&database_url, &order.id).await.is_empty(),
        "the uncommitted payment is gone with the process"
    );

    let second = App::start(
        &dir.0,
        "second",
        Run::Binary,
        &database_url,
        &Store::Database,
    )
    .await;
    let early = pay(&http, &second.url, &key, &request).await.unwrap();
    assert_eq!(
        early.status,
        StatusCode::CONFLICT,
        "the dead process's claim holds the key until its lease ends: {early:?}"
    );
    let (answer, attempts) = pay_until_settled(&http, &second.url, &key, &request).await;
    assert_eq!(
        answer.status,
        StatusCode::CREATED,
        "the retry pays: {answer:?}"
    );
    assert!(!answer.replayed, "nothing was stored before the crash");
    let payment: Payment = answer.json();
    let rows = payments_of(&database_url, &order.id).await;
    assert_eq!(rows.len(), 1, "exactly one payment: {rows:?}");
    assert_eq!(rows[0].0, payment.id);
    let again = pay(&http, &second.url, &key, &request).await.unwrap();
    assert!(again.replayed, "then the key replays: {again:?}");
    assert_eq!(again.json::<Payment>().id, payment.id);
    assert_eq!(payments_of(&database_url, &order.id).await.len(), 1);
    eprintln!("kill before commit: the retry settled after {attempts} attempt(s)");
    drop((second, first, watcher, blocker, dir, schema));
}

/// The real `payments` binary on `database_url` (idem's records in the same database),
/// SIGKILLed once its payment has committed, its client never reading the answer: after
/// the restart the retry with the same key replays the stored payment; one row.
///
/// The commit is seen as it happens, from outside: the payment's row becomes visible to
/// another connection only once its transaction commits. The payment goes out on a raw
/// socket that is never read, so the response is lost whether or not the process wrote
/// it before it died.
async fn killed_after_commit_then_retried(dir: &TempDir, database_url: &str) {
    use tokio::io::AsyncWriteExt as _;

    let http = support::http();
    let mut first = App::start(&dir.0, "first", Run::Binary, database_url, &Store::Database).await;
    let (order, request) = new_order(&http, &first).await;
    let key = format!("kill-{}", uuid::Uuid::new_v4());

    let body = serde_json::to_vec(&request).unwrap();
    let host = first.url.trim_start_matches("http://").to_owned();
    let mut socket = tokio::net::TcpStream::connect(&host).await.unwrap();
    let head = format!(
        "POST /payments HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {}\r\n\
         idempotency-key: {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        support::DEMO_API_KEY,
        body.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(&body).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let rows = loop {
        let rows = payments_of(database_url, &order.id).await;
        if !rows.is_empty() {
            break rows;
        }
        first.assert_running();
        assert!(
            Instant::now() < deadline,
            "the payment did not commit within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    first.crash();
    drop(socket);

    assert_eq!(rows.len(), 1, "the payment committed: {rows:?}");
    assert_eq!(records_of(database_url, &key).await, 1, "with its record");

    let second = App::start(
        &dir.0,
        "second",
        Run::Binary,
        database_url,
        &Store::Database,
    )
    .await;
    let retried = pay(&http, &second.url, &key, &request).await.unwrap();
    assert_eq!(retried.status, StatusCode::CREATED, "{retried:?}");
    assert!(
        retried.replayed,
        "the retry gets the stored payment: {retried:?}"
    );
    assert_eq!(retried.json::<Payment>().id, rows[0].0);
    assert_eq!(
        payments_of(database_url, &order.id).await.len(),
        1,
        "one payment"
    );
    drop((second, first));
}

/// Guards: the real `payments` binary on PostgreSQL, SIGKILLed after its commit and before
/// its client read the answer: the retry after the restart replays the payment; one row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_killed_after_its_commit_on_postgres_replays_the_payment_after_restart() {
    let dir = TempDir::new("kill-after-commit");
    let schema = PgSchema::new("kill_after_commit").await;
    killed_after_commit_then_retried(&dir, &schema.url()).await;
}

/// Guards: the same on the SQLite file (the app's default): the retry after the restart
/// replays the payment; one row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_killed_after_its_commit_on_sqlite_replays_the_payment_after_restart() {
    let dir = TempDir::new("kill-after-commit-sqlite");
    let database_url = format!("sqlite://{}?mode=rwc", dir.0.join("p.db").display());
    killed_after_commit_then_retried(&dir, &database_url).await;
}
