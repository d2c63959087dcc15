//! `#[idempotent]` handlers served by a real axum `Router`, on the in-memory store and on
//! the Redis server at 127.0.0.1:6379. The Redis tests need that server: without it they
//! fail, they do not skip.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Request, StatusCode, header};
use axum::{Json, Router, routing::post};
use http_body_util::BodyExt;
use idem_runtime::store::RedisStore;
use idem_runtime::{
    Idempotency, Problem, Scope, http::IDEMPOTENT_REPLAYED, http::PROBLEM_JSON, idempotent,
};
use serde_json::{Value, json};
use tower::ServiceExt;

const REDIS_URL: &str = "redis://127.0.0.1:6379";

/// How many times the handlers of one router ran.
type Calls = Arc<AtomicUsize>;

/// Kept for 1 h 30 min; answers 201 with a header and a body that differ on every run.
#[idempotent(ttl = "1h30m")]
async fn create_order(
    State(calls): State<Calls>,
    Json(order): Json<Value>,
) -> (StatusCode, [(&'static str, String); 1], Json<Value>) {
    let number = calls.fetch_add(1, Ordering::SeqCst) + 1;
    (
        StatusCode::CREATED,
        [("x-order-number", number.to_string())],
        Json(json!({ "order": number, "item": order["item"] })),
    )
}

/// Refuses requests without a key.
#[idempotent(required = true)]
async fn charge(State(calls): State<Calls>, amount: String) -> String {
    calls.fetch_add(1, Ordering::SeqCst);
    format!("charged {amount}")
}

/// Every option left at its default.
#[idempotent]
async fn note(State(calls): State<Calls>, text: String) -> String {
    calls.fetch_add(1, Ordering::SeqCst);
    text
}

/// Its last argument is configured out: the guard takes the slot of the one before.
#[idempotent]
async fn configured(State(calls): State<Calls>, #[cfg(any())] _gone: NotAType) -> String {
    let number = calls.fetch_add(1, Ordering::SeqCst) + 1;
    format!("run {number}")
}

fn routes(calls: &Calls) -> Router {
    Router::new()
        .route("/orders", post(create_order))
        .route("/charges", post(charge))
        .route("/notes", post(note))
        .route("/configured", post(configured))
        .with_state(calls.clone())
}

fn app(idem: &Idempotency, calls: &Calls) -> Router {
    routes(calls).layer(idem.layer())
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

async fn send(app: &Router, path: &str, key: Option<&str>, body: &str) -> Reply {
    let mut request = Request::post(path).header(header::CONTENT_TYPE, "application/json");
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let request = request
        .body(Body::from(body.to_owned()))
        .expect("a valid request");
    let response = app
        .clone()
        .oneshot(request)
        .await
        .expect("routers are infallible");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("a readable body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// The in-memory handle of these tests: their requests carry no credentials, so they use
/// one shared scope.
fn in_memory() -> Idempotency {
    Idempotency::builder().shared_scope(true).build()
}

/// A store under a prefix of its own on the shared Redis server, so tests never see each
/// other's keys; `cleanup` deletes only that prefix.
struct Redis {
    prefix: String,
    connection: redis::aio::MultiplexedConnection,
}

impl Redis {
    async fn connect(test: &str) -> (Self, Idempotency) {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("a clock after 1970")
            .as_nanos();
        let prefix = format!("idem-test:{test}:{}:{nanos}:", std::process::id());
        let store = RedisStore::builder(REDIS_URL)
            .prefix(prefix.clone())
            .connect()
            .await
            .expect("these tests need Redis at 127.0.0.1:6379");
        let connection = redis::Client::open(REDIS_URL)
            .expect("a valid Redis URL")
            .get_multiplexed_async_connection()
            .await
            .expect("these tests need Redis at 127.0.0.1:6379");
        let idem = Idempotency::builder()
            .store(store)
            .shared_scope(true)
            .build();
        (Self { prefix, connection }, idem)
    }

    /// The Redis key of an idempotency key sent without `Authorization`.
    fn key_of(&self, key: &str) -> String {
        format!("{}{}:{key}", self.prefix, Scope::anonymous().to_hex())
    }

    async fn pttl(&mut self, key: &str) -> i64 {
        redis::cmd("PTTL")
            .arg(self.key_of(key))
            .query_async(&mut self.connection)
            .await
            .expect("PTTL answers")
    }

    async fn cleanup(mut self) {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query_async(&mut self.connection)
            .await
            .expect("KEYS answers");
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL")
                .arg(keys)
                .query_async(&mut self.connection)
                .await
                .expect("DEL answers");
        }
    }
}

async fn first_call_runs_and_retry_replays(idem: Idempotency) {
    let calls = Calls::default();
    let app = app(&idem, &calls);
    let first = send(&app, "/orders", Some("order-1"), r#"{"item":"book"}"#).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.json(), json!({ "order": 1, "item": "book" }));
    assert_eq!(first.header(IDEMPOTENT_REPLAYED), None);
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let retry = send(&app, "/orders", Some("order-1"), r#"{"item":"book"}"#).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the retry must not run the handler"
    );
    assert_eq!(retry.status, first.status);
    assert_eq!(retry.body, first.body);
    assert_eq!(retry.header(IDEMPOTENT_REPLAYED), Some("true"));
    let mut replayed_headers = retry.headers.clone();
    replayed_headers.remove(IDEMPOTENT_REPLAYED);
    assert_eq!(replayed_headers, first.headers);

    let other = send(&app, "/orders", Some("order-2"), r#"{"item":"book"}"#).await;
    assert_eq!(other.json(), json!({ "order": 2, "item": "book" }));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "a new key runs the handler"
    );
}

async fn same_key_with_another_body_is_refused(idem: Idempotency) {
    let calls = Calls::default();
    let app = app(&idem, &calls);
    let first = send(&app, "/orders", Some("order-1"), r#"{"item":"book"}"#).await;
    assert_eq!(first.status, StatusCode::CREATED);

    let reused = send(&app, "/orders", Some("order-1"), r#"{"item":"lamp"}"#).await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reused.header("content-type"), Some(PROBLEM_JSON));
    assert_eq!(reused.json()["type"], Problem::KEY_REUSED);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

async fn required_key_is_enforced(idem: Idempotency) {
    let calls = Calls::default();
    let app = app(&idem, &calls);
    let missing = send(&app, "/charges", None, "10 EUR").await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert_eq!(missing.header("content-type"), Some(PROBLEM_JSON));
    assert_eq!(missing.json()["type"], Problem::KEY_MISSING);
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    let keyed = send(&app, "/charges", Some("charge-1"), "10 EUR").await;
    assert_eq!(keyed.status, StatusCode::OK);
    assert_eq!(&keyed.body[..], b"charged 10 EUR");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

async fn requests_without_a_key_run_unprotected(idem: Idempotency) {
    let calls = Calls::default();
    let app = app(&idem, &calls);
    for _ in 0..2 {
        let reply = send(&app, "/notes", None, "hello").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.header(IDEMPOTENT_REPLAYED), None);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn memory_first_call_runs_and_retry_replays() {
    first_call_runs_and_retry_replays(in_memory()).await;
}

#[tokio::test]
async fn redis_first_call_runs_and_retry_replays() {
    let (redis, idem) = Redis::connect("replay").await;
    first_call_runs_and_retry_replays(idem).await;
    redis.cleanup().await;
}

#[tokio::test]
async fn memory_same_key_with_another_body_is_refused() {
    same_key_with_another_body_is_refused(in_memory()).await;
}

#[tokio::test]
async fn redis_same_key_with_another_body_is_refused() {
    let (redis, idem) = Redis::connect("reused").await;
    same_key_with_another_body_is_refused(idem).await;
    redis.cleanup().await;
}

#[tokio::test]
async fn memory_required_key_is_enforced() {
    required_key_is_enforced(in_memory()).await;
}

#[tokio::test]
async fn redis_required_key_is_enforced() {
    let (redis, idem) = Redis::connect("required").await;
    required_key_is_enforced(idem).await;
    redis.cleanup().await;
}

#[tokio::test]
async fn memory_requests_without_a_key_run_unprotected() {
    requests_without_a_key_run_unprotected(in_memory()).await;
}

#[tokio::test]
async fn redis_requests_without_a_key_run_unprotected() {
    let (redis, idem) = Redis::connect("unprotected").await;
    requests_without_a_key_run_unprotected(idem).await;
    redis.cleanup().await;
}

#[tokio::test]
async fn redis_keeps_the_response_for_the_attribute_ttl() {
    let (mut redis, idem) = Redis::connect("ttl").await;
    let app = app(&idem, &Calls::default());
    send(&app, "/orders", Some("order-1"), r#"{"item":"book"}"#).await;
    send(&app, "/notes", Some("note-1"), "hello").await;

    let ninety_minutes = 90 * 60 * 1000;
    let order_ttl = redis.pttl("order-1").await;
    assert!(
        (ninety_minutes - 10_000..=ninety_minutes).contains(&order_ttl),
        "`ttl = \"1h30m\"` stored with PTTL {order_ttl} ms"
    );
    let day = 24 * 60 * 60 * 1000;
    let note_ttl = redis.pttl("note-1").await;
    assert!(
        (day - 10_000..=day).contains(&note_ttl),
        "the default ttl stored with PTTL {note_ttl} ms"
    );
    redis.cleanup().await;
}

#[tokio::test]
async fn a_handler_served_without_the_layer_names_the_fix() {
    let calls = Calls::default();
    let app = routes(&calls);
    for key in [Some("order-1"), None] {
        let reply = send(&app, "/orders", key, r#"{"item":"book"}"#).await;
        assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(reply.header("content-type"), Some(PROBLEM_JSON));
        let detail = reply.json()["detail"].as_str().map(str::to_owned);
        assert!(
            detail
                .as_deref()
                .is_some_and(|detail| detail.contains(".layer(idem.layer())")),
            "{detail:?}"
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_handler_whose_last_argument_is_configured_out_keeps_the_guard() {
    let calls = Calls::default();
    let app = app(&in_memory(), &calls);
    let first = send(&app, "/configured", Some("cfg-1"), "").await;
    let retry = send(&app, "/configured", Some("cfg-1"), "").await;
    assert_eq!(&first.body[..], b"run 1");
    assert_eq!(retry.body, first.body);
    assert_eq!(retry.header(IDEMPOTENT_REPLAYED), Some("true"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
