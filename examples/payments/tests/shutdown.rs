//! SIGTERM in the middle of a payment whose client already hung up: the process stops
//! accepting, waits for the payment to be stored, and only then exits; the retry against
//! the restarted app (Redis outlives the process) replays it.
//!
//! The first run is this test binary started again as a child process that serves the
//! app through [`payments::serve`], as the `payments` binary does, with its idempotency
//! store behind a closed [`Gate`] that holds completions: the handler has run, and its
//! response waits to be stored until the test writes a line to the child's stdin.

#![allow(clippy::unwrap_used)]

mod support;

use std::fs::File;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use payments::{AppState, Config, Db, Item, NewOrder, NewPayment, Order, Payment};
use reqwest::StatusCode;
use sqlx::{AnyPool, Row};
use support::{Answer, Gate, TempDir};
use testkit::RedisServer;
use tracing_subscriber::EnvFilter;

/// The test that serves the app with its completions held; [`App::start_held`] runs it.
const HELD_APP_TEST: &str = "serve_the_app_holding_every_completion";
/// Set in the environment of the held run, so that [`HELD_APP_TEST`] serves.
const HELD_APP_VAR: &str = "PAYMENTS_SHUTDOWN_TEST_HELD_APP";
/// What [`HELD_APP_TEST`] prints when a payment's completion waits at its gate.
const HELD: &str = "a payment ran and waits to be stored";
/// What idem logs when a caller goes away and its work runs on.
const DETACHED: &str = "the caller went away";
/// The lease of both runs, short so that nothing here waits long for one.
const LEASE_MS: u64 = 1_500;

/// One run of the app in a process of its own, its output in a log file; killed when
/// dropped.
struct App {
    child: Child,
    stdin: Option<ChildStdin>,
    url: String,
    log: PathBuf,
}

impl App {
    /// The app with its completions held ([`HELD_APP_TEST`]).
    async fn start_held(dir: &Path, database_url: &str, redis_url: &str, deadline_ms: u64) -> Self {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args([HELD_APP_TEST, "--exact", "--ignored", "--nocapture"])
            .env(HELD_APP_VAR, "1")
            .env("PAYMENTS_SHUTDOWN_DEADLINE_MS", deadline_ms.to_string());
        Self::start(command, dir, "held", database_url, redis_url).await
    }

    /// The real `payments` binary, with `env` set beside the test's own variables.
    async fn start_binary(
        dir: &Path,
        database_url: &str,
        redis_url: &str,
        env: &[(&str, &str)],
    ) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_payments"));
        command.env_remove(HELD_APP_VAR).envs(env.iter().copied());
        Self::start(command, dir, "binary", database_url, redis_url).await
    }

    async fn start(
        mut command: Command,
        dir: &Path,
        name: &str,
        database_url: &str,
        redis_url: &str,
    ) -> Self {
        let addr = format!("127.0.0.1:{}", testkit::free_port());
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).unwrap();
        let mut child = command
            .current_dir(dir)
            .env("PAYMENTS_ADDR", &addr)
            .env("DATABASE_URL", database_url)
            .env("REDIS_URL", redis_url)
            .env("RUST_LOG", "payments=info,idem=debug")
            .env("NO_COLOR", "1")
            .env("PAYMENTS_IDEM_LEASE_MS", LEASE_MS.to_string())
            .stdin(Stdio::piped())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let mut app = Self {
            child,
            stdin,
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

    /// Waits until the log shows `needle`, the process still running.
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

    fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM: {status}");
    }

    /// Opens the gate of the held run.
    fn open_gate(&mut self) {
        let mut stdin = self.stdin.take().unwrap();
        writeln!(stdin, "open").unwrap();
    }

    /// Waits up to `limit` for the process to exit, and returns how long it took.
    async fn exits_within(&mut self, limit: Duration) -> Duration {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "{status}; its log:\n{}", self.log_text());
                return started.elapsed();
            }
            assert!(
                started.elapsed() < limit,
                "payments did not exit within {limit:?}; its log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn pay(url: &str, key: &str, request: &NewPayment) -> Answer {
    let response = support::http()
        .post(format!("{url}/payments"))
        .header("idempotency-key", key)
        .json(request)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap();
    Answer::read(response).await.unwrap()
}

async fn payment_count(database_url: &str, order_id: &str) -> i64 {
    sqlx::any::install_default_drivers();
    let pool = AnyPool::connect(database_url).await.unwrap();
    let count = sqlx::query("SELECT COUNT(*) AS n FROM payments WHERE order_id = $1")
        .bind(order_id)
        .fetch_one(&pool)
        .await
        .unwrap()
        .get("n");
    pool.close().await;
    count
}

/// Starts the held app, creates an order and sends its payment; hangs up once the payment
/// ran and waits to be stored, and returns once idem has detached it.
async fn a_payment_detached_mid_completion(
    dir: &Path,
    database_url: &str,
    redis_url: &str,
    deadline_ms: u64,
) -> (App, String, NewPayment, Order) {
    let mut app = App::start_held(dir, database_url, redis_url, deadline_ms).await;
    let order: Order = support::http()
        .post(format!("{}/orders", app.url))
        .json(&NewOrder {
            customer_id: "cus_shutdown".into(),
            currency: "EUR".into(),
            items: vec![Item {
                sku: "LAMP".into(),
                quantity: 1,
                unit_price_cents: 4_200,
            }],
        })
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = format!("shutdown-{}", uuid::Uuid::new_v4());
    let request = NewPayment {
        order_id: order.id.clone(),
        amount_cents: order.total_cents,
        currency: "EUR".into(),
    };
    let client = tokio::spawn({
        let (url, key, request) = (app.url.clone(), key.clone(), request.clone());
        async move { pay(&url, &key, &request).await }
    });
    app.wait_for_log(HELD).await;
    client.abort();
    assert!(client.await.unwrap_err().is_cancelled());
    app.wait_for_log(DETACHED).await;
    (app, key, request, order)
}

/// Guards: SIGTERM waits for a detached payment to be stored before the process exits,
/// and the retry after the restart replays it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_for_a_detached_payment_to_be_stored() {
    let redis = RedisServer::start();
    let dir = TempDir::new("shutdown");
    let database_url = format!("sqlite://{}?mode=rwc", dir.0.join("p.db").display());
    let (mut held, key, request, order) =
        a_payment_detached_mid_completion(&dir.0, &database_url, &redis.url(), 20_000).await;
    assert_eq!(
        payment_count(&database_url, &order.id).await,
        1,
        "the handler ran"
    );

    held.terminate();
    held.wait_for_log("waiting for executions in flight").await;
    held.assert_running();
    held.open_gate();
    held.exits_within(Duration::from_secs(15)).await;
    let log = held.log_text();
    assert!(log.contains("every execution in flight ended"), "{log}");

    let second = App::start_binary(&dir.0, &database_url, &redis.url(), &[]).await;
    let retry = pay(&second.url, &key, &request).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert!(
        retry.replayed,
        "the payment was stored before the exit: {retry:?}"
    );
    let payment: Payment = retry.json();
    assert_eq!(payment.order_id, order.id);
    assert_eq!(payment_count(&database_url, &order.id).await, 1);
}

/// Guards: a payment still running at the shutdown deadline does not hold the process;
/// it is logged by its key and left to its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_at_the_deadline_naming_the_payment_left_running() {
    let redis = RedisServer::start();
    let dir = TempDir::new("shutdown-deadline");
    let database_url = format!("sqlite://{}?mode=rwc", dir.0.join("p.db").display());
    let (mut held, key, request, order) =
        a_payment_detached_mid_completion(&dir.0, &database_url, &redis.url(), 500).await;

    held.terminate();
    let took = held.exits_within(Duration::from_secs(10)).await;
    assert!(took < Duration::from_secs(5), "exited after {took:?}");
    let log = held.log_text();
    let left = log
        .lines()
        .find(|line| line.contains("still running at the shutdown deadline"))
        .unwrap_or_else(|| panic!("no payment named as left running: {log}"));
    assert!(left.contains(&key), "{left}");

    // The claim was left to its lease: the retry against the restarted app answers 409
    // while it holds, then runs the payment again. The payment had committed in the app's
    // own transaction (Redis holds idem's records, so the two cannot commit together):
    // the order's one-payment rule refuses the second charge.
    let second = App::start_binary(&dir.0, &database_url, &redis.url(), &[]).await;
    let gave_up = Instant::now() + Duration::from_secs(20);
    let retry = loop {
        let answer = pay(&second.url, &key, &request).await;
        if answer.status != StatusCode::CONFLICT || Instant::now() > gave_up {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(LEASE_MS / 10)).await;
    };
    assert_eq!(retry.status, StatusCode::CONFLICT, "{retry:?}");
    assert_eq!(
        retry.problem_type(),
        "urn:payments:problem:order-already-paid",
        "{retry:?}"
    );
    assert_eq!(
        payment_count(&database_url, &order.id).await,
        1,
        "one payment for the order, whatever ran"
    );
}

/// The held run of the tests above: the app as the `payments` binary serves it, through
/// [`payments::serve`], with its completions held at a closed [`Gate`] until a line
/// arrives on stdin. Run any other way, it returns at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of the shutdown tests, which start it themselves"]
async fn serve_the_app_holding_every_completion() {
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
    let store = payments::idempotency_store(&config).await.unwrap();
    let idem = payments::idempotency_settings(&config)
        .shared_store(Arc::new(gate.guard_completions(store)))
        .store_timeout(support::HOLD_LIMIT + idem_runtime::defaults::STORE_TIMEOUT)
        .build();
    let app = payments::authenticated_router(AppState::new(db), &idem, config.api_keys.clone());
    tokio::spawn({
        let gate = gate.clone();
        async move {
            gate.held().await;
            eprintln!("{HELD}");
        }
    });
    std::thread::spawn({
        let gate = gate.clone();
        move || {
            let mut line = String::new();
            let _ = std::io::stdin().lock().read_line(&mut line);
            gate.open();
        }
    });
    let listener = tokio::net::TcpListener::bind(config.addr).await.unwrap();
    payments::serve(listener, app, idem, &config, payments::shutdown_signal())
        .await
        .unwrap();
}

/// Guards: a client that sent half a request and stalls does not hold a SIGTERMed process
/// past its shutdown deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_stalled_client_exits_within_the_deadline() {
    let redis = RedisServer::start();
    let dir = TempDir::new("shutdown-stalled");
    let database_url = format!("sqlite://{}?mode=rwc", dir.0.join("p.db").display());
    let mut app = App::start_binary(
        &dir.0,
        &database_url,
        &redis.url(),
        &[
            ("PAYMENTS_SHUTDOWN_DEADLINE_MS", "500"),
            ("PAYMENTS_HEADER_READ_TIMEOUT_MS", "60000"),
            ("PAYMENTS_BODY_TIMEOUT_MS", "60000"),
        ],
    )
    .await;
    let addr = app.url.trim_start_matches("http://").to_owned();
    let mut stalled = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /orders HTTP/1.1\r\nHost: payments\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{",
        support::DEMO_API_KEY
    );
    tokio::io::AsyncWriteExt::write_all(&mut stalled, head.as_bytes())
        .await
        .unwrap();
    // The handler reads the body, which never comes: the request stays open.
    app.terminate();
    let took = app.exits_within(Duration::from_secs(10)).await;
    assert!(took < Duration::from_secs(3), "exited after {took:?}");
    drop(stalled);
}
