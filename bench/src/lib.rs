//! The benchmark app: one handler served bare, beside its floors (the handler plus the
//! raw Redis commands idem cannot avoid) and under `#[idempotent]` on each store.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use idem_runtime::store::RedisStore;
use idem_runtime::{Idempotency, idempotent};
use redis::aio::ConnectionManager;
use serde_json::{Value, json};

pub mod wrk;

/// What the handlers share: a counter, the first-execution floors' count of keys, and a
/// plain Redis connection for the floors.
#[derive(Clone)]
pub struct Bench {
    counter: Arc<AtomicU64>,
    floor_keys: Arc<AtomicU64>,
    redis: ConnectionManager,
}

impl Bench {
    /// A key no floor request used before, in this process or an earlier one on the same
    /// Redis: as an idem first execution, each floor request claims a key that is not
    /// there and writes its record. (Read from `counter`, which `work` moves only after
    /// the first command, requests in flight together shared a key, and most claims found
    /// one there: a floor doing less than a first execution.)
    fn fresh_floor_key(&self, prefix: &str) -> String {
        let n = self.floor_keys.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}{}:{n}", std::process::id())
    }
}

/// The work every row does: count, and answer a small JSON body.
fn work(bench: &Bench, request: &Value) -> (StatusCode, Json<Value>) {
    let n = bench.counter.fetch_add(1, Ordering::Relaxed);
    (
        StatusCode::CREATED,
        Json(json!({ "id": n, "status": "captured", "amount": request["amount"] })),
    )
}

async fn bare(State(bench): State<Bench>, Json(request): Json<Value>) -> (StatusCode, Json<Value>) {
    work(&bench, &request)
}

async fn floor_one(
    State(bench): State<Bench>,
    Json(request): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let mut redis = bench.redis.clone();
    let _: Option<Vec<u8>> = redis::cmd("GET")
        .arg("bench:floor")
        .query_async(&mut redis)
        .await
        .unwrap_or_default();
    work(&bench, &request)
}

async fn floor_two(
    State(bench): State<Bench>,
    Json(request): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let mut redis = bench.redis.clone();
    let key = bench.fresh_floor_key("bench:floor:");
    let _: Option<Vec<u8>> = redis::cmd("SET")
        .arg(&key)
        .arg("claim")
        .arg("NX")
        .arg("GET")
        .arg("PX")
        .arg(30_000)
        .query_async(&mut redis)
        .await
        .unwrap_or_default();
    let response = work(&bench, &request);
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(response.1.to_string())
        .arg("PX")
        .arg(RECORD_TTL_MS)
        .query_async(&mut redis)
        .await
        .unwrap_or_default();
    response
}

/// How long the first-execution floors keep what they write: the ttl of
/// [`idempotent_handler`]'s records, so that no row's keys expire, and keep Redis
/// busy, during a load test's later rows.
const RECORD_TTL_MS: u64 = 600_000;

/// The compare-and-set a Redis store's completion runs (`RedisStore`'s script, word for
/// word): on Redis 7 a conditional write needs a script, which costs the server more
/// than the plain `SET` of [`floor_two`].
const COMPLETE: &str = "local current = redis.call('GET', KEYS[1]) \
     if current == ARGV[1] then \
       redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) \
       return 1 \
     end \
     if current == ARGV[2] then \
       return 1 \
     end \
     return 0";

/// [`floor_two`] with its second command the completion's script: what a first
/// execution on Redis 7 sends at the least.
async fn floor_script(
    State(bench): State<Bench>,
    Json(request): Json<Value>,
) -> (StatusCode, Json<Value>) {
    static SCRIPT: std::sync::LazyLock<redis::Script> =
        std::sync::LazyLock::new(|| redis::Script::new(COMPLETE));
    let mut redis = bench.redis.clone();
    let key = bench.fresh_floor_key("bench:floor:script:");
    let _: Option<Vec<u8>> = redis::cmd("SET")
        .arg(&key)
        .arg("claim")
        .arg("NX")
        .arg("GET")
        .arg("PX")
        .arg(30_000)
        .query_async(&mut redis)
        .await
        .unwrap_or_default();
    let response = work(&bench, &request);
    let _: i64 = SCRIPT
        .key(&key)
        .arg("claim")
        .arg(response.1.to_string())
        .arg(RECORD_TTL_MS)
        .invoke_async(&mut redis)
        .await
        .unwrap_or_default();
    response
}

#[idempotent(ttl = "10m")]
async fn idempotent_handler(
    State(bench): State<Bench>,
    Json(request): Json<Value>,
) -> (StatusCode, Json<Value>) {
    work(&bench, &request)
}

/// The routes of every row, on a Redis at `redis_url` (keys under `bench:`).
///
/// # Errors
/// If Redis cannot be reached.
pub async fn app(redis_url: &str) -> Result<Router, idem_runtime::ConnectError> {
    let client = redis::Client::open(redis_url).map_err(idem_runtime::ConnectError::Redis)?;
    let redis = ConnectionManager::new(client)
        .await
        .map_err(idem_runtime::ConnectError::Redis)?;
    // The replay floor reads a value as large as a stored response of this handler.
    let mut setup = redis.clone();
    let stored_size = vec![b'r'; 160];
    let () = redis::cmd("SET")
        .arg("bench:floor")
        .arg(stored_size)
        .query_async(&mut setup)
        .await
        .map_err(idem_runtime::ConnectError::Redis)?;
    let bench = Bench {
        counter: Arc::new(AtomicU64::new(0)),
        floor_keys: Arc::new(AtomicU64::new(0)),
        redis,
    };
    let memory = Idempotency::builder().shared_scope(true).build();
    let on_redis = |prefix: &'static str| async move {
        RedisStore::builder(redis_url)
            .prefix(prefix)
            .connect()
            .await
    };
    let redis_idem = Idempotency::builder()
        .shared_scope(true)
        .store(on_redis("bench:idem:").await?)
        .build();
    let local_idem = Idempotency::builder()
        .shared_scope(true)
        .store(on_redis("bench:local:").await?)
        .local_tier(64 * 1024 * 1024, Duration::from_secs(60))
        .build();
    let plain = Router::new()
        .route("/bare", post(bare))
        .route("/floor/one", post(floor_one))
        .route("/floor/two", post(floor_two))
        .route("/floor/script", post(floor_script));
    let guarded = |idem: &Idempotency, path: &str| {
        Router::new()
            .route(path, post(idempotent_handler))
            .layer(idem.layer())
    };
    Ok(plain
        .merge(guarded(&memory, "/memory"))
        .merge(guarded(&redis_idem, "/redis"))
        .merge(guarded(&local_idem, "/local"))
        .with_state(bench))
}

/// Every row of [`app`] served on loopback, on a runtime of two workers, beside a private
/// `redis-server`: what the load test drives, and what `serve` keeps up for profiling.
pub struct Served {
    // Dropped first: the server stops before its Redis does.
    _runtime: tokio::runtime::Runtime,
    /// Where the rows are served.
    pub address: std::net::SocketAddr,
    /// The private Redis, stopped when this is dropped.
    pub redis: testkit::RedisServer,
}

impl Served {
    /// Starts a `redis-server` and serves every row beside it.
    ///
    /// # Errors
    /// If the runtime cannot be built, Redis cannot be reached or no port is free.
    pub fn start() -> Result<Self, Box<dyn std::error::Error>> {
        let redis = testkit::RedisServer::start();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let app = runtime.block_on(app(&redis.url()))?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let address = listener.local_addr()?;
        runtime.spawn(async move { axum::serve(listener, app).await });
        Ok(Self {
            _runtime: runtime,
            address,
            redis,
        })
    }
}

/// The in-process router of the criterion benchmarks and the instruction counts: one
/// handler bare, under `#[idempotent]` on the memory store, and with the local tier.
pub mod in_process {
    use std::time::Duration;

    use axum::Router;
    use axum::body::{Body, Bytes};
    use axum::http::{Method, Request, StatusCode};
    use axum::routing::post;
    use idem_runtime::{Idempotency, idempotent};

    /// The request body of every benchmark request.
    pub const BODY: &str = r#"{"order_id":"ord_8e03978e","amount_cents":2500,"currency":"EUR"}"#;

    async fn bare(body: Bytes) -> (StatusCode, Bytes) {
        (StatusCode::CREATED, body)
    }

    #[idempotent]
    async fn guarded(body: Bytes) -> (StatusCode, Bytes) {
        (StatusCode::CREATED, body)
    }

    /// `/bare`, `/memory` (memory store) and `/local` (memory store and local tier).
    pub fn router() -> Router {
        let memory = Idempotency::builder().shared_scope(true).build();
        let local = Idempotency::builder()
            .shared_scope(true)
            .local_tier(64 * 1024 * 1024, Duration::from_secs(60))
            .build();
        Router::new()
            .route("/bare", post(bare))
            .merge(
                Router::new()
                    .route("/memory", post(guarded))
                    .layer(memory.layer()),
            )
            .merge(
                Router::new()
                    .route("/local", post(guarded))
                    .layer(local.layer()),
            )
            // As `axum::serve` does for each connection: every handler is made into its
            // route, layers applied, once here rather than again for each request.
            .with_state(())
    }

    /// A POST of [`BODY`] to `path`, with `key` as its `Idempotency-Key`.
    ///
    /// # Panics
    /// Never for the paths and keys the benchmarks use.
    pub fn request(path: &str, key: Option<String>) -> Request<Body> {
        let mut builder = Request::builder().method(Method::POST).uri(path);
        if let Some(key) = key {
            builder = builder.header("idempotency-key", key);
        }
        builder.body(Body::from(BODY)).expect("request")
    }
}
