//! A bounded fault-and-load soak of the real payments router: forty clients pay forty
//! orders, each with its own `Idempotency-Key`, and keep re-sending the same request
//! while a private `redis-server` (the idempotency store) is killed and restarted twice.
//!
//! A killed Redis comes back empty: every record it held is gone, so a retry after the
//! restart runs the handler again and the UNIQUE constraint on `payments.order_id` is what
//! keeps each order paid at most once (the retry is told `409`, "order already paid").
//! The soak proves that end to end: no order is ever paid twice, every answer is a success
//! or a problem the client can act on (`409`, `422`, `503`), and every key ends with its
//! one payment once the store is back: answered `201`, or `409` "already paid" where Redis
//! forgot the record of a payment the key made. (With idem's records in the app's own
//! database, the record commits with the payment and cannot be lost alone; see `crash.rs`.)
//!
//! It finishes in a few seconds and prints its counts to stderr, past the test harness's
//! capture, so that CI logs show them.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use idem_runtime::store::RedisStore;
use idem_runtime::{Idempotency, http::PROBLEM_JSON};
use payments::{AppState, Db, Item, NewOrder, NewPayment, Order, Payment};
use reqwest::StatusCode;
use sqlx::Row;
use support::{Answer, Server, TempDir};
use testkit::RedisServer;

/// Orders, keys and client tasks: one of each per client.
const CLIENTS: usize = 40;
/// Client `i` sends its first payment `i * STAGGER` after the storm starts, so that first
/// attempts land before, during and between the outages.
const STAGGER: Duration = Duration::from_millis(90);
/// What the killer does, and when (after the storm starts).
const SCHEDULE: [(Duration, Fault); 4] = [
    (Duration::from_millis(500), Fault::Kill),
    (Duration::from_millis(1500), Fault::Restart),
    (Duration::from_millis(2500), Fault::Kill),
    (Duration::from_millis(3500), Fault::Restart),
];
/// Requests one client may send during the storm.
const MAX_ATTEMPTS: u32 = 150;
/// The longest a client sleeps between attempts, whatever `Retry-After` says.
const MAX_BACKOFF: Duration = Duration::from_millis(200);
/// How long one HTTP request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The whole test, set-up to clean-up.
const DEADLINE: Duration = Duration::from_secs(50);

#[derive(Clone, Copy, Debug)]
enum Fault {
    Kill,
    Restart,
}

impl Answer {
    /// The payment in a `201`, checked to pay `order_id`.
    fn payment(&self, order_id: &str) -> Payment {
        let payment: Payment = self.json();
        assert_eq!(payment.order_id, order_id, "a 201 for another order");
        payment
    }

    /// An answer worth retrying soon: the store was unreachable, or the key was held
    /// by a request in flight (idem's `409`, not the app's "order already paid").
    fn transient(&self) -> bool {
        self.status == StatusCode::SERVICE_UNAVAILABLE
            || (self.status == StatusCode::CONFLICT && !self.text().contains("order-already-paid"))
    }

    /// What is wrong with this answer under the soak's rules, if anything: only success,
    /// `409`, `422` and `503` may happen, and every non-success is a problem document.
    fn violation(&self) -> Option<String> {
        let allowed = self.status.is_success()
            || matches!(
                self.status,
                StatusCode::CONFLICT
                    | StatusCode::UNPROCESSABLE_ENTITY
                    | StatusCode::SERVICE_UNAVAILABLE
            );
        let problem = self.status.is_success() || self.content_type == PROBLEM_JSON;
        (!allowed || !problem).then(|| {
            format!(
                "{} (content-type {:?}): {}",
                self.status,
                self.content_type,
                self.text()
            )
        })
    }
}

async fn send(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    body: &NewPayment,
) -> Result<Answer, reqwest::Error> {
    let response = http
        .post(format!("{url}/payments"))
        .header("idempotency-key", key)
        .json(body)
        .send()
        .await?;
    Answer::read(response).await
}

/// What one client saw.
#[derive(Default)]
struct Log {
    answers: Vec<Answer>,
    /// Transport failures (no HTTP answer at all).
    errors: Vec<String>,
}

/// A small xorshift generator for jitter; the soak needs spread, not secrecy.
struct Jitter(u64);

impl Jitter {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// A duration in `[low, high)`.
    fn between(&mut self, low: Duration, high: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let span = u64::try_from((high - low).as_micros()).unwrap().max(1);
        low + Duration::from_micros(self.0 % span)
    }
}

/// One client: waits for its turn, then sends its payment with its one key again and
/// again, as a client does that never learns whether it was charged, until the storm is
/// over. Every fourth attempt sends two copies at once, so that requests also race each
/// other on the key. Sleeps between attempts honour `Retry-After` up to [`MAX_BACKOFF`].
async fn client(
    index: usize,
    http: reqwest::Client,
    url: String,
    key: String,
    request: NewPayment,
    start: tokio::time::Instant,
    storm_over: Arc<AtomicBool>,
) -> Log {
    let mut jitter = Jitter::new(index as u64 + 1);
    let mut log = Log::default();
    tokio::time::sleep_until(start + STAGGER * u32::try_from(index).unwrap()).await;
    for attempt in 1..=MAX_ATTEMPTS {
        let results = if attempt % 4 == 0 {
            let (a, b) = tokio::join!(
                send(&http, &url, &key, &request),
                send(&http, &url, &key, &request)
            );
            vec![a, b]
        } else {
            vec![send(&http, &url, &key, &request).await]
        };
        let mut backoff = jitter.between(Duration::from_millis(40), Duration::from_millis(120));
        for result in results {
            match result {
                Ok(answer) => {
                    if let Some(after) = answer.retry_after {
                        let cap = after.clamp(Duration::from_millis(60), MAX_BACKOFF);
                        backoff = jitter.between(Duration::from_millis(50), cap);
                    }
                    log.answers.push(answer);
                }
                Err(error) => log.errors.push(error.to_string()),
            }
        }
        if storm_over.load(Ordering::Acquire) {
            break;
        }
        tokio::time::sleep(backoff).await;
    }
    log
}

/// Waits until the app's store answers again after the last restart: a payment for an
/// order that does not exist gets `404` only once idem has claimed its (fresh) key, and
/// `503` while the store is unreachable. Returns how many probes it took.
async fn wait_for_store(http: &reqwest::Client, url: &str) -> u32 {
    let probe = NewPayment {
        order_id: "ord_probe_that_does_not_exist".into(),
        amount_cents: 1,
        currency: "EUR".into(),
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    for probes in 1.. {
        let key = format!("probe-{}", uuid::Uuid::new_v4());
        let answer = send(http, url, &key, &probe).await.unwrap();
        match answer.status {
            StatusCode::NOT_FOUND => return probes,
            StatusCode::SERVICE_UNAVAILABLE => {}
            other => panic!("probe got {other}: {}", answer.text()),
        }
        assert!(
            Instant::now() < deadline,
            "the store did not come back within 15 s of the last restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    unreachable!()
}

/// Kills and restarts `redis` on the [`SCHEDULE`], counted from `start`; blocking.
fn storm(mut redis: RedisServer, start: Instant) -> RedisServer {
    for (at, fault) in SCHEDULE {
        if let Some(wait) = (start + at).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        match fault {
            Fault::Kill => redis.kill(),
            Fault::Restart => redis.restart(),
        }
    }
    redis
}

/// Redis killed and restarted under load never makes a payment happen twice, never
/// yields an answer a client cannot act on, and every key converges to its one payment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_stay_exactly_once_while_redis_is_killed_and_restarted() {
    tokio::time::timeout(DEADLINE, soak())
        .await
        .expect("the soak must finish within its deadline");
}

async fn soak() {
    let began = Instant::now();
    let redis = RedisServer::start();
    let prefix = testkit::unique_prefix("payments-faults");
    let dir = TempDir::new("faults");
    let db = Db::connect(&format!(
        "sqlite://{}?mode=rwc",
        dir.0.join("p.db").display()
    ))
    .await
    .unwrap();
    // Short timeouts: a dead store answers 503 quickly instead of holding requests.
    let store = RedisStore::builder(redis.url())
        .prefix(prefix.as_str())
        .response_timeout(Duration::from_millis(300))
        .connection_timeout(Duration::from_millis(300))
        .connect()
        .await
        .unwrap();
    let idem = Idempotency::builder()
        .store(store)
        .store_timeout(Duration::from_millis(500))
        .lease(Duration::from_secs(2))
        .build();
    let server = Server::start(payments::authenticated_router(
        AppState::new(db.clone()),
        &idem,
        payments::ApiKeys::demo(),
    ))
    .await;
    let http = reqwest::Client::builder()
        .default_headers(support::auth_headers(support::DEMO_API_KEY))
        .timeout(REQUEST_TIMEOUT)
        .build()
        .unwrap();

    // The orders, up front, while Redis is healthy.
    let mut orders = Vec::with_capacity(CLIENTS);
    for index in 0..CLIENTS {
        let new_order = NewOrder {
            customer_id: format!("cus_soak_{index}"),
            currency: "EUR".into(),
            items: vec![Item {
                sku: "SOCK".into(),
                quantity: 1 + i64::try_from(index % 3).unwrap(),
                unit_price_cents: 250 + i64::try_from(index).unwrap(),
            }],
        };
        let response = http
            .post(format!("{}/orders", server.url))
            .header("idempotency-key", format!("order-{}", uuid::Uuid::new_v4()))
            .json(&new_order)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        orders.push(response.json::<Order>().await.unwrap());
    }

    // The storm: clients pay and re-send while the killer kills and restarts Redis.
    let keys: Vec<String> = (0..CLIENTS)
        .map(|index| format!("soak-{index}-{}", uuid::Uuid::new_v4()))
        .collect();
    let requests: Vec<NewPayment> = orders
        .iter()
        .map(|order| NewPayment {
            order_id: order.id.clone(),
            amount_cents: order.total_cents,
            currency: "EUR".into(),
        })
        .collect();
    let storm_over = Arc::new(AtomicBool::new(false));
    let start = tokio::time::Instant::now();
    let killer = tokio::task::spawn_blocking({
        let storm_over = storm_over.clone();
        move || {
            let redis = storm(redis, start.into_std());
            storm_over.store(true, Ordering::Release);
            redis
        }
    });
    let clients: Vec<_> = (0..CLIENTS)
        .map(|index| {
            tokio::spawn(client(
                index,
                http.clone(),
                server.url.clone(),
                keys[index].clone(),
                requests[index].clone(),
                start,
                storm_over.clone(),
            ))
        })
        .collect();
    let redis = killer.await.unwrap();
    let mut logs = Vec::with_capacity(CLIENTS);
    for task in clients {
        logs.push(task.await.unwrap());
    }
    let storm_took = start.elapsed();

    // After the last restart: the store answers again, and every key, sent once more,
    // gets its payment, or "already paid" where Redis forgot the record of its payment.
    let probes = wait_for_store(&http, &server.url).await;
    let mut converge_retries = 0_u32;
    let mut final_answers = Vec::with_capacity(CLIENTS);
    for index in 0..CLIENTS {
        let mut answer = send(&http, &server.url, &keys[index], &requests[index])
            .await
            .unwrap();
        // A claim left by a request whose completion was lost frees itself within the
        // lease; allow that much, and count it. (The app's own 409, "order already paid",
        // is final: it means the key lost its payment.)
        let deadline = Instant::now() + Duration::from_secs(5);
        while answer.transient() && Instant::now() < deadline {
            converge_retries += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let retry = send(&http, &server.url, &keys[index], &requests[index])
                .await
                .unwrap();
            logs[index]
                .answers
                .push(std::mem::replace(&mut answer, retry));
        }
        final_answers.push(answer);
    }

    // Tally and check every answer.
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    let (mut replayed, mut forgotten, mut requests_sent) = (0_usize, 0_usize, 0_usize);
    let mut violations = Vec::new();
    let mut errors = Vec::new();
    let mut paid_with: Vec<BTreeSet<String>> = Vec::with_capacity(CLIENTS);
    for (index, (log, last)) in logs.iter().zip(&final_answers).enumerate() {
        let order_id = &orders[index].id;
        let mut ids = BTreeSet::new();
        let mut seen_201 = false;
        for answer in log.answers.iter().chain(std::iter::once(last)) {
            requests_sent += 1;
            *by_status.entry(answer.status.as_u16()).or_default() += 1;
            if let Some(violation) = answer.violation() {
                violations.push(format!("key {}: {violation}", keys[index]));
            }
            if answer.status == StatusCode::CREATED {
                ids.insert(answer.payment(order_id).id);
                if answer.replayed {
                    replayed += 1;
                }
                seen_201 = true;
            } else if seen_201 && answer.text().contains("order-already-paid") {
                // After its 201, the key's record was lost with Redis: the retry ran
                // again and the order's one payment refused it.
                forgotten += 1;
            }
        }
        errors.extend(
            log.errors
                .iter()
                .map(|e| format!("key {}: {e}", keys[index])),
        );
        paid_with.push(ids);
    }

    // The database: exactly one payment per order, one per key, the one the client saw.
    let rows = sqlx::query("SELECT id, order_id, idempotency_key FROM payments")
        .fetch_all(db.pool())
        .await
        .unwrap();
    let mut per_order: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut per_key: BTreeMap<String, usize> = BTreeMap::new();
    for row in &rows {
        let key: Option<String> = row.get("idempotency_key");
        let key = key.expect("every soak payment carries its key");
        *per_key.entry(key.clone()).or_default() += 1;
        per_order
            .entry(row.get("order_id"))
            .or_default()
            .push((row.get("id"), key));
    }
    let max_per_order = per_order.values().map(Vec::len).max().unwrap_or(0);
    let max_per_key = per_key.values().copied().max().unwrap_or(0);
    let count = |status: u16| by_status.get(&status).copied().unwrap_or(0);
    let summary = format!(
        "soak: {CLIENTS} keys, {requests_sent} requests: 201={} replayed={replayed} \
         refused-after-forgotten={forgotten} 409={} 422={} 503={} other={} transport-errors={}; \
         redis killed+restarted {}x; storm {:.1} s, store back after {probes} probe(s), \
         converge retries={converge_retries}; payment rows={} (max per order {max_per_order}, \
         max per key {max_per_key}); {:.1} s in all",
        count(201),
        count(409),
        count(422),
        count(503),
        by_status
            .iter()
            .filter(|(status, _)| ![201, 409, 422, 503].contains(*status))
            .map(|(_, n)| n)
            .sum::<usize>(),
        errors.len(),
        SCHEDULE.len() / 2,
        storm_took.as_secs_f64(),
        rows.len(),
        began.elapsed().as_secs_f64(),
    );
    // Past libtest's capture, so that a passing run in CI still shows the counts.
    let _ = writeln!(std::io::stderr(), "{summary}");

    assert!(
        violations.is_empty(),
        "{} answers broke the rules, e.g. {:?}",
        violations.len(),
        &violations[..violations.len().min(5)]
    );
    assert!(
        errors.is_empty(),
        "{} requests got no HTTP answer, e.g. {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    for (index, answer) in final_answers.iter().enumerate() {
        let paid_here = per_order.get(&orders[index].id).is_some_and(|paid| {
            paid.iter()
                .any(|(_, scoped)| scoped.ends_with(&format!(":{}", keys[index])))
        });
        assert!(
            answer.status == StatusCode::CREATED
                || (answer.text().contains("order-already-paid") && paid_here),
            "key {} did not converge: {} {}",
            keys[index],
            answer.status,
            answer.text()
        );
        // At most one: a key whose record Redis lost before its client read the 201
        // may have seen none, only "already paid".
        assert!(
            paid_with[index].len() <= 1,
            "key {} saw different payments: {:?}",
            keys[index],
            paid_with[index]
        );
    }
    assert_eq!(max_per_order, 1, "an order was paid twice: {per_order:?}");
    assert_eq!(max_per_key, 1, "a key paid twice: {per_key:?}");
    assert_eq!(rows.len(), CLIENTS, "one payment row per order");
    for (index, order) in orders.iter().enumerate() {
        let paid = per_order
            .get(&order.id)
            .unwrap_or_else(|| panic!("order {} was never paid", order.id));
        let (payment_id, scoped_key) = &paid[0];
        assert!(
            paid_with[index].is_empty() || paid_with[index].contains(payment_id),
            "the client saw another payment than {payment_id}"
        );
        assert!(
            scoped_key.ends_with(&format!(":{}", keys[index])),
            "order {} was paid under {scoped_key}, not its client's key",
            order.id
        );
    }
    let unpaid: i64 = sqlx::query("SELECT COUNT(*) AS n FROM orders WHERE status <> 'paid'")
        .fetch_one(db.pool())
        .await
        .unwrap()
        .get("n");
    assert_eq!(unpaid, 0, "every order ends paid");
    // The soak must actually have hit the faults it is about.
    assert!(
        count(503) > 0,
        "no request met the dead store: the storm missed"
    );
    assert!(
        forgotten > 0,
        "no key met its forgotten record after Redis came back empty: the storm missed"
    );

    // Clean up: this test's keys (the private server dies with `redis` anyway), then the
    // server and the database file.
    let mut connection = testkit::redis_connection(&redis.url()).await;
    for key in testkit::keys_under(&mut connection, &prefix).await {
        let _: i64 = redis::cmd("DEL")
            .arg(&key)
            .query_async(&mut connection)
            .await
            .unwrap();
    }
    drop(server);
    db.pool().close().await;
    drop(redis);
    drop(dir);
}
