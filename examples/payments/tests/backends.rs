//! The payments app end to end, each scenario three times: on a SQLite file and on
//! PostgreSQL, each holding idem's records next to the payments (so a payment commits with
//! the record of its response), and on PostgreSQL with Redis as the idempotency store. The real router is served on a
//! loopback socket and spoken to over HTTP; rows are counted in the database itself.
//!
//! PostgreSQL (`IDEM_TEST_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/test`)
//! and Redis (`IDEM_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`) must be running:
//! the tests that need them fail, never skip, when they are not. Each test works in a
//! schema and under a Redis key prefix of its own and removes only those.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idem_client::IdempotentRetry;
use payments::client::{PayClient, demo, new_key};
use payments::{Config, Db, NewOrder, NewPayment, Order, Payment};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::Row;
use support::{Answer, Gate, PgSchema, Server};
use testkit::proxy::{Cut, losing_proxy};

#[derive(Clone, Copy, Debug)]
enum Backend {
    /// A SQLite file, idem's records in it.
    Sqlite,
    /// PostgreSQL, idem's records in it.
    Postgres,
    /// PostgreSQL, idem's records in Redis.
    PostgresRedis,
}

/// One test's database and idempotency store, removed when dropped.
struct Fixture {
    config: Config,
    db: Db,
    cleanup: Cleanup,
}

/// What a test created: removed when dropped, also when the test fails.
enum Cleanup {
    SqliteFile(PathBuf),
    Postgres {
        /// Dropped with the fixture.
        _schema: PgSchema,
        /// Redis' URL and the test's key prefix, where Redis is the idempotency store.
        redis: Option<(String, String)>,
    },
}

fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}_{nanos}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

impl Fixture {
    async fn new(backend: Backend, test: &str) -> Self {
        let mut config = Config::default();
        let cleanup = match backend {
            Backend::Sqlite => {
                let file =
                    std::env::temp_dir().join(format!("payments-{test}-{}.db", unique_suffix()));
                config.database_url = format!("sqlite://{}?mode=rwc", file.display());
                Cleanup::SqliteFile(file)
            }
            Backend::Postgres | Backend::PostgresRedis => {
                let redis = if let Backend::PostgresRedis = backend {
                    let redis_url = testkit::shared_redis_url();
                    // Fails the test, with the reason, when Redis is down.
                    testkit::redis_connection(&redis_url).await;
                    config.redis_url = Some(redis_url.clone());
                    config.redis_prefix = testkit::unique_prefix(test);
                    Some((redis_url, config.redis_prefix.clone()))
                } else {
                    None
                };
                let schema = PgSchema::new(test).await;
                config.database_url = schema.url();
                Cleanup::Postgres {
                    _schema: schema,
                    redis,
                }
            }
        };
        let db = Db::connect(&config.database_url).await.unwrap();
        Self {
            config,
            db,
            cleanup,
        }
    }

    /// The app as `payments::app` builds it from the config.
    async fn serve(&self) -> Server {
        Server::start(payments::app(&self.config).await.unwrap()).await
    }

    /// Makes the idempotency store forget every key, as an expired TTL or a flushed
    /// Redis would: the test's keys are deleted from Redis, or idem's rows from the
    /// database.
    async fn forget_idempotency_records(&self) {
        let forgotten = match &self.cleanup {
            Cleanup::Postgres {
                redis: Some((redis_url, redis_prefix)),
                ..
            } => delete_redis_keys(redis_url, redis_prefix).await,
            Cleanup::SqliteFile(_) | Cleanup::Postgres { redis: None, .. } => {
                let deleted = sqlx::query("DELETE FROM idem_records")
                    .execute(self.db.pool())
                    .await
                    .unwrap();
                usize::try_from(deleted.rows_affected()).unwrap()
            }
        };
        assert!(forgotten > 0, "the payment left a record to forget");
    }

    async fn payments_of(&self, order_id: &str) -> Vec<Payment> {
        sqlx::query(
            "SELECT id, order_id, amount_cents, currency, status, created_at \
             FROM payments WHERE order_id = $1",
        )
        .bind(order_id)
        .fetch_all(self.db.pool())
        .await
        .unwrap()
        .iter()
        .map(|row| Payment {
            id: row.get("id"),
            order_id: row.get("order_id"),
            amount_cents: row.get("amount_cents"),
            currency: row.get("currency"),
            status: row.get("status"),
            created_at: row.get("created_at"),
        })
        .collect()
    }

    async fn order_status(&self, order_id: &str) -> String {
        sqlx::query("SELECT status FROM orders WHERE id = $1")
            .bind(order_id)
            .fetch_one(self.db.pool())
            .await
            .unwrap()
            .get("status")
    }
}

async fn delete_redis_keys(url: &str, prefix: &str) -> usize {
    let mut connection = testkit::redis_connection(url).await;
    let keys = testkit::keys_under(&mut connection, prefix).await;
    for key in &keys {
        let _: i64 = redis::cmd("DEL")
            .arg(key)
            .query_async(&mut connection)
            .await
            .unwrap();
    }
    keys.len()
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        match self {
            Cleanup::SqliteFile(file) => {
                for suffix in ["", "-journal", "-wal", "-shm"] {
                    let mut path = file.clone().into_os_string();
                    path.push(suffix);
                    let _ = std::fs::remove_file(path);
                }
            }
            // The schema drops itself.
            Cleanup::Postgres {
                redis: Some((redis_url, redis_prefix)),
                ..
            } => {
                let (redis_url, redis_prefix) = (redis_url.clone(), redis_prefix.clone());
                // Async clean-up from `drop`, on a runtime of its own in a thread of its own.
                let cleaned = std::thread::spawn(move || {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap()
                        .block_on(delete_redis_keys(&redis_url, &redis_prefix))
                })
                .join();
                if cleaned.is_err() && !std::thread::panicking() {
                    panic!("removing the test's Redis keys failed");
                }
            }
            Cleanup::Postgres { redis: None, .. } => {}
        }
    }
}

async fn post(http: &reqwest::Client, url: &str, key: Option<&str>, body: &Value) -> Answer {
    let mut request = http.post(url).json(body);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    Answer::read(request.send().await.unwrap()).await.unwrap()
}

async fn create_order(http: &reqwest::Client, server: &Server) -> Order {
    let order = NewOrder {
        customer_id: "cus_42".into(),
        currency: "EUR".into(),
        items: vec![payments::Item {
            sku: "BOOK".into(),
            quantity: 2,
            unit_price_cents: 1250,
        }],
    };
    let answer = post(
        http,
        &format!("{}/orders", server.url),
        Some(&new_key()),
        &serde_json::to_value(order).unwrap(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::CREATED);
    answer.json()
}

fn payment_of(order: &Order) -> Value {
    serde_json::to_value(NewPayment {
        order_id: order.id.clone(),
        amount_cents: order.total_cents,
        currency: "EUR".into(),
    })
    .unwrap()
}

// ---- scenarios ----

async fn concurrent_payments_with_one_key(backend: Backend) {
    let fixture = Fixture::new(backend, "concurrent").await;
    let gate = Gate::new();
    let server =
        Server::start(support::app_behind(&gate, &fixture.config, fixture.db.clone()).await).await;
    let http = support::http();
    let order = create_order(&http, &server).await;
    let key = new_key();
    let body = payment_of(&order);
    let url = format!("{}/payments", server.url);

    // The first payment to claim the key waits at the gate, after the claim and before the
    // handler, so all 100 requests are in flight at once.
    gate.close();
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let (http, url, key, body) = (http.clone(), url.clone(), key.clone(), body.clone());
        requests.spawn(async move { post(&http, &url, Some(&key), &body).await });
    }
    let mut answers = Vec::new();
    while answers.len() < 99 {
        let next = tokio::time::timeout(Duration::from_secs(30), requests.join_next())
            .await
            .expect("99 requests are answered while the first one is held");
        answers.push(next.unwrap().unwrap());
    }
    tokio::time::timeout(Duration::from_secs(30), gate.held())
        .await
        .expect("the first payment is held at the gate");
    gate.open();
    answers.push(requests.join_next().await.unwrap().unwrap());
    let replay = post(&http, &url, Some(&key), &body).await;

    let originals: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.status == StatusCode::CREATED && !a.replayed)
        .collect();
    assert_eq!(originals.len(), 1, "exactly one request ran the payment");
    let original = &originals[0].body;
    for answer in answers.iter().chain([&replay]) {
        match answer.status {
            StatusCode::CREATED => assert_eq!(&answer.body, original, "a replay is byte for byte"),
            StatusCode::CONFLICT => {
                assert!(answer.retry_after.is_some(), "409 carries Retry-After");
                assert_eq!(answer.problem_type(), "urn:idem:problem:in-flight");
            }
            status => panic!("unexpected {status}: {}", answer.text()),
        }
    }
    let conflicts = answers.iter().filter(|a| a.status == StatusCode::CONFLICT);
    assert_eq!(
        conflicts.count(),
        99,
        "the others found the payment in flight"
    );
    assert!(
        replay.replayed && replay.status == StatusCode::CREATED,
        "a later retry is replayed"
    );
    let payment: Payment = originals[0].json();
    assert_eq!(fixture.payments_of(&order.id).await, vec![payment]);
    assert_eq!(fixture.order_status(&order.id).await, "paid");
}

async fn lost_response_then_retries(backend: Backend) {
    let fixture = Fixture::new(backend, "lost-response").await;
    let server = fixture.serve().await;
    let client = PayClient::new(&server.url)
        .unwrap()
        .with_retry(
            IdempotentRetry::default()
                .attempts(10)
                .backoff(Duration::from_millis(20), Duration::from_millis(500)),
        )
        .unwrap();

    let report = demo(&client).await.unwrap();

    assert!(report.one_payment(), "{report}");
    assert_eq!(report.retried.value.id, report.again.value.id);
    assert!(report.again.replayed, "the second retry is a replay");
    assert_eq!(
        fixture.payments_of(&report.order.id).await,
        vec![report.fetched.clone()]
    );
    assert_eq!(fixture.order_status(&report.order.id).await, "paid");
}

/// Guards: the connection reset after the app committed the payment (its response lost on
/// the way): the client's own retry carries the same key, gets the stored payment, and one
/// payment exists.
async fn reset_after_commit_is_replayed_by_the_client(backend: Backend) {
    let fixture = Fixture::new(backend, "reset-after-commit").await;
    let server = fixture.serve().await;
    let direct = PayClient::new(&server.url).unwrap();
    let order = direct
        .create_order(
            &NewOrder {
                customer_id: "cus_reset".into(),
                items: vec![payments::Item {
                    sku: "sku-1".into(),
                    quantity: 1,
                    unit_price_cents: 1200,
                }],
                currency: "EUR".into(),
            },
            &new_key(),
        )
        .await
        .unwrap()
        .value;
    let proxy = losing_proxy(&server.url, Cut::Reset).await;
    let client = PayClient::new(&proxy)
        .unwrap()
        .with_retry(
            IdempotentRetry::default()
                .backoff(Duration::from_millis(20), Duration::from_millis(200)),
        )
        .unwrap();
    let paid = client
        .pay(
            &NewPayment {
                order_id: order.id.clone(),
                amount_cents: 1200,
                currency: "EUR".into(),
            },
            &new_key(),
        )
        .await
        .unwrap();
    assert_eq!(paid.attempts, 2, "the reset attempt, then the retry");
    assert!(paid.replayed, "the retry got the stored payment");
    assert_eq!(fixture.payments_of(&order.id).await, vec![paid.value]);
}

async fn same_key_different_amount(backend: Backend) {
    let fixture = Fixture::new(backend, "different-amount").await;
    let server = fixture.serve().await;
    let http = support::http();
    let order = create_order(&http, &server).await;
    let key = new_key();
    let url = format!("{}/payments", server.url);
    let first = post(&http, &url, Some(&key), &payment_of(&order)).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let before = fixture.payments_of(&order.id).await;

    let mut changed = payment_of(&order);
    changed["amount_cents"] = json!(order.total_cents - 1);
    let refused = post(&http, &url, Some(&key), &changed).await;

    assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(refused.problem_type(), "urn:idem:problem:key-reused");
    assert_eq!(
        fixture.payments_of(&order.id).await,
        before,
        "no row changed"
    );
    assert_eq!(before, vec![first.json::<Payment>()]);
}

/// Guards: a key whose record the idempotency store forgot (an expired TTL, a flushed
/// Redis) never pays its order again: the retry is refused by the UNIQUE constraint on
/// `payments.order_id`, and the one payment stays.
async fn a_forgotten_key_never_pays_twice(backend: Backend) {
    let fixture = Fixture::new(backend, "forgotten-key").await;
    let server = fixture.serve().await;
    let http = support::http();
    let order = create_order(&http, &server).await;
    let key = new_key();
    let url = format!("{}/payments", server.url);
    let first = post(&http, &url, Some(&key), &payment_of(&order)).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let original: Payment = first.json();

    fixture.forget_idempotency_records().await;
    let retried = post(&http, &url, Some(&key), &payment_of(&order)).await;

    assert_eq!(retried.status, StatusCode::CONFLICT, "{retried:?}");
    assert_eq!(
        retried.problem_type(),
        "urn:payments:problem:order-already-paid"
    );
    assert_eq!(fixture.payments_of(&order.id).await, vec![original.clone()]);

    // Nor can another key.
    let other = post(&http, &url, Some(&new_key()), &payment_of(&order)).await;
    assert_eq!(other.status, StatusCode::CONFLICT);
    assert_eq!(
        other.problem_type(),
        "urn:payments:problem:order-already-paid"
    );
    assert_eq!(fixture.payments_of(&order.id).await, vec![original]);
    assert_eq!(fixture.order_status(&order.id).await, "paid");
}

/// Guards: a body refused for its shape or its values leaves its key unused, so the
/// corrected request under the same key runs (nothing refused is stored for replay).
async fn refused_bodies_leave_the_key_unused(backend: Backend) {
    let fixture = Fixture::new(backend, "refused-bodies").await;
    let server = fixture.serve().await;
    let http = support::http();
    let payments = format!("{}/payments", server.url);
    let orders = format!("{}/orders", server.url);

    let order = create_order(&http, &server).await;
    let key = new_key();
    let broken = http
        .post(&payments)
        .header("idempotency-key", &key)
        .header("content-type", "application/json")
        .body(r#"{"order_id": "ord_"#)
        .send()
        .await
        .unwrap();
    let broken = Answer::read(broken).await.unwrap();
    assert_eq!(broken.status, StatusCode::BAD_REQUEST, "broken JSON");
    assert_eq!(broken.problem_type(), "urn:payments:problem:bad-body");
    let missing = post(
        &http,
        &payments,
        Some(&key),
        &json!({ "order_id": order.id }),
    )
    .await;
    assert_eq!(
        missing.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "missing fields"
    );
    assert_eq!(missing.problem_type(), "urn:payments:problem:bad-body");
    let paid = post(&http, &payments, Some(&key), &payment_of(&order)).await;
    assert_eq!(
        paid.status,
        StatusCode::CREATED,
        "corrected after broken JSON"
    );
    assert!(!paid.replayed);

    let key = new_key();
    let item = json!({ "sku": "A", "quantity": 1, "unit_price_cents": 100 });
    for (body, reason) in [
        (json!({ "customer_id": "cus_1", "items": [] }), "no items"),
        (
            json!({ "customer_id": "cus_1", "currency": "ABC", "items": [item] }),
            "unknown currency",
        ),
        (
            json!({ "customer_id": "cus\u{0}1", "items": [item] }),
            "NUL in customer_id",
        ),
        (
            json!({ "customer_id": "cus_1", "items": [{ "sku": "A", "quantity": 0, "unit_price_cents": 100 }] }),
            "zero quantity",
        ),
    ] {
        let refused = post(&http, &orders, Some(&key), &body).await;
        assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY, "{reason}");
        assert_eq!(
            refused.problem_type(),
            "urn:payments:problem:invalid-request",
            "{reason}"
        );
    }
    let created = post(
        &http,
        &orders,
        Some(&key),
        &json!({ "customer_id": "cus_1", "items": [item] }),
    )
    .await;
    assert_eq!(
        created.status,
        StatusCode::CREATED,
        "order corrected after refusals"
    );
    let order: Order = created.json();

    let key = new_key();
    let mut unknown_currency = payment_of(&order);
    unknown_currency["currency"] = json!("ABC");
    let mut negative = payment_of(&order);
    negative["amount_cents"] = json!(-1);
    let mut nul = payment_of(&order);
    nul["order_id"] = json!(format!("{}\u{0}", order.id));
    for (body, reason) in [
        (unknown_currency, "unknown currency"),
        (negative, "negative amount"),
        (nul, "NUL in order_id"),
    ] {
        let refused = post(&http, &payments, Some(&key), &body).await;
        assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY, "{reason}");
        assert_eq!(
            refused.problem_type(),
            "urn:payments:problem:invalid-request",
            "{reason}"
        );
    }
    let paid = post(&http, &payments, Some(&key), &payment_of(&order)).await;
    assert_eq!(
        paid.status,
        StatusCode::CREATED,
        "payment corrected after refusals"
    );
    assert_eq!(
        fixture.payments_of(&order.id).await,
        vec![paid.json::<Payment>()]
    );
}

macro_rules! on_every_backend {
    ($($scenario:ident: $sqlite:ident, $postgres:ident, $postgres_redis:ident;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $sqlite() {
            $scenario(Backend::Sqlite).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $postgres() {
            $scenario(Backend::Postgres).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $postgres_redis() {
            $scenario(Backend::PostgresRedis).await;
        }
    )*};
}

/// Guards: hostile or careless input never reaches the database as a charge or a 500:
/// an unknown currency, a currency other than the order's, and NUL characters are 422s
/// on both databases, and nothing is charged.
async fn hostile_input_is_refused(backend: Backend) {
    let fixture = Fixture::new(backend, "hostile").await;
    let server = fixture.serve().await;
    let http = support::http();
    let order = create_order(&http, &server).await;
    assert_eq!(
        order.currency, "EUR",
        "an order without a currency is in EUR"
    );
    let payments = format!("{}/payments", server.url);
    for (currency, reason) in [
        ("XXX", "not a currency"),
        ("ABC", "not ISO 4217"),
        ("USD", "not the order's"),
    ] {
        let mut body = payment_of(&order);
        body["currency"] = json!(currency);
        let answer = post(&http, &payments, Some(&new_key()), &body).await;
        assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY, "{reason}");
        assert!(answer.content_type.contains("problem+json"), "{reason}");
    }
    let mut nul = payment_of(&order);
    nul["order_id"] = json!(format!("{}\u{0}", order.id));
    let answer = post(&http, &payments, Some(&new_key()), &nul).await;
    assert_eq!(
        answer.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "NUL in order_id"
    );
    assert!(
        fixture.payments_of(&order.id).await.is_empty(),
        "nothing was charged"
    );

    let orders = format!("{}/orders", server.url);
    for body in [
        json!({ "customer_id": "cus\u{0}1", "items": [{ "sku": "A", "quantity": 1, "unit_price_cents": 1 }] }),
        json!({ "customer_id": "cus_1", "items": [{ "sku": "A\u{0}", "quantity": 1, "unit_price_cents": 1 }] }),
        json!({ "customer_id": "cus_1", "currency": "XXX", "items": [{ "sku": "A", "quantity": 1, "unit_price_cents": 1 }] }),
    ] {
        let answer = post(&http, &orders, Some(&new_key()), &body).await;
        assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    }
    let usd = json!({ "customer_id": "cus_1", "currency": "USD", "items": [{ "sku": "A", "quantity": 2, "unit_price_cents": 5 }] });
    let usd: Order = post(&http, &orders, Some(&new_key()), &usd).await.json();
    let mut in_eur = payment_of(&usd);
    in_eur["currency"] = json!("EUR");
    let refused = post(&http, &payments, Some(&new_key()), &in_eur).await;
    assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY);
    let mut in_usd = payment_of(&usd);
    in_usd["currency"] = json!("USD");
    let paid = post(&http, &payments, Some(&new_key()), &in_usd).await;
    assert_eq!(paid.status, StatusCode::CREATED);
}

/// Guards: idempotency keys are scoped by the API key's account: a request without
/// credentials is refused (401) before anything runs, and two accounts sending the same
/// key and body each get their own order.
async fn keys_are_scoped_by_account(backend: Backend) {
    let fixture = Fixture::new(backend, "scoped").await;
    let server = fixture.serve().await;
    let orders = format!("{}/orders", server.url);
    let body = json!({ "customer_id": "cus_1", "items": [{ "sku": "A", "quantity": 1, "unit_price_cents": 100 }] });
    let anonymous = post(&reqwest::Client::new(), &orders, Some("same-key"), &body).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    let a = post(&support::http(), &orders, Some("same-key"), &body).await;
    let b = post(
        &support::http_as("sk_test_other"),
        &orders,
        Some("same-key"),
        &body,
    )
    .await;
    assert_eq!(a.status, StatusCode::CREATED);
    assert_eq!(b.status, StatusCode::CREATED);
    assert!(!b.replayed, "account B got account A's response");
    assert_ne!(a.json::<Order>().id, b.json::<Order>().id);
    let a_again = post(&support::http(), &orders, Some("same-key"), &body).await;
    assert!(a_again.replayed);
}

on_every_backend! {
    reset_after_commit_is_replayed_by_the_client:
        reset_after_commit_is_replayed_by_the_client_on_sqlite,
        reset_after_commit_is_replayed_by_the_client_on_postgres,
        reset_after_commit_is_replayed_by_the_client_on_postgres_with_redis;
    refused_bodies_leave_the_key_unused:
        refused_bodies_leave_the_key_unused_on_sqlite,
        refused_bodies_leave_the_key_unused_on_postgres,
        refused_bodies_leave_the_key_unused_on_postgres_with_redis;
    hostile_input_is_refused:
        hostile_input_is_refused_on_sqlite,
        hostile_input_is_refused_on_postgres,
        hostile_input_is_refused_on_postgres_with_redis;
    keys_are_scoped_by_account:
        keys_are_scoped_by_account_on_sqlite,
        keys_are_scoped_by_account_on_postgres,
        keys_are_scoped_by_account_on_postgres_with_redis;
    concurrent_payments_with_one_key:
        hundred_concurrent_payments_with_one_key_make_one_payment_on_sqlite,
        hundred_concurrent_payments_with_one_key_make_one_payment_on_postgres,
        hundred_concurrent_payments_with_one_key_make_one_payment_on_postgres_with_redis;
    lost_response_then_retries:
        a_lost_response_and_retries_end_with_one_payment_on_sqlite,
        a_lost_response_and_retries_end_with_one_payment_on_postgres,
        a_lost_response_and_retries_end_with_one_payment_on_postgres_with_redis;
    same_key_different_amount:
        same_key_with_another_amount_is_refused_and_changes_nothing_on_sqlite,
        same_key_with_another_amount_is_refused_and_changes_nothing_on_postgres,
        same_key_with_another_amount_is_refused_and_changes_nothing_on_postgres_with_redis;
    a_forgotten_key_never_pays_twice:
        a_key_whose_record_was_forgotten_never_pays_twice_on_sqlite,
        a_key_whose_record_was_forgotten_never_pays_twice_on_postgres,
        a_key_whose_record_was_forgotten_never_pays_twice_on_postgres_with_redis;
}

#[tokio::test]
async fn bad_requests_are_problems() {
    let fixture = Fixture::new(Backend::Sqlite, "bad-requests").await;
    let server = fixture.serve().await;
    let http = support::http();
    let orders = format!("{}/orders", server.url);
    let item = |quantity: i64, unit_price_cents: i64| json!({ "customer_id": "cus_1", "items": [{ "sku": "A", "quantity": quantity, "unit_price_cents": unit_price_cents }] });
    for (body, reason) in [
        (json!({ "customer_id": "cus_1", "items": [] }), "no items"),
        (item(0, 100), "zero quantity"),
        (item(-1, 100), "negative quantity"),
        (item(1, -1), "negative price"),
        (item(i64::MAX, 2), "overflowing total"),
    ] {
        let answer = post(&http, &orders, None, &body).await;
        assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY, "{reason}");
        assert_eq!(
            answer.problem_type(),
            "urn:payments:problem:invalid-request",
            "{reason}"
        );
    }
    let missing_field = post(&http, &orders, None, &json!({ "items": [] })).await;
    assert_eq!(missing_field.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        missing_field.problem_type(),
        "urn:payments:problem:bad-body"
    );

    let order = create_order(&http, &server).await;
    let payments = format!("{}/payments", server.url);
    let mut unknown = payment_of(&order);
    unknown["order_id"] = json!("ord_missing");
    let answer = post(&http, &payments, Some(&new_key()), &unknown).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(
        answer.problem_type(),
        "urn:payments:problem:order-not-found"
    );

    let mut short = payment_of(&order);
    short["amount_cents"] = json!(order.total_cents - 1);
    let answer = post(&http, &payments, Some(&new_key()), &short).await;
    assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        answer.problem_type(),
        "urn:payments:problem:amount-mismatch"
    );
    assert!(fixture.payments_of(&order.id).await.is_empty());

    let fetched: Order = serde_json::from_slice(
        &http
            .get(format!("{}/orders/{}", server.url, order.id))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(fetched, order, "GET returns the order as created");
    let missing = http
        .get(format!("{}/payments/pay_missing", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
}
