//! A small app with idempotent handlers written by hand, served on either store.

#![allow(dead_code, unreachable_pub)]

pub mod checks;
pub mod table_stores;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::BodyExt;
#[cfg(feature = "postgres")]
use idem_runtime::store::PostgresStore;
#[cfg(feature = "redis")]
use idem_runtime::store::RedisStore;
#[cfg(feature = "sqlite")]
use idem_runtime::store::SqliteStore;
use idem_runtime::store::{BoxFuture, MemoryStore, Store, StoreError};
use idem_runtime::{Idempotency, IdempotencyBuilder, Idempotent};
use tokio::sync::Notify;
use tower::ServiceExt;

/// Which store a test runs on.
#[derive(Clone)]
pub enum Backend {
    Memory(MemoryStore),
    #[cfg(feature = "redis")]
    Redis {
        url: String,
        prefix: String,
    },
    #[cfg(feature = "redis")]
    Cluster {
        urls: Vec<String>,
        prefix: String,
    },
    /// The shared PostgreSQL, in a schema of the test's own (see [`PgSchema`]).
    #[cfg(feature = "postgres")]
    Postgres {
        url: String,
        schema: String,
    },
    /// A SQLite file of the test's own (see [`SqliteFile`]).
    #[cfg(feature = "sqlite")]
    Sqlite {
        url: String,
    },
}

impl Backend {
    pub fn memory() -> Self {
        Self::Memory(MemoryStore::new())
    }

    #[cfg(feature = "redis")]
    pub fn redis(test: &str) -> Self {
        Self::redis_at(&testkit::shared_redis_url(), test)
    }

    #[cfg(feature = "redis")]
    pub fn redis_at(url: &str, test: &str) -> Self {
        Self::Redis {
            url: url.to_owned(),
            prefix: testkit::unique_prefix(test),
        }
    }

    /// The store in `schema`, which the test created and drops.
    #[cfg(feature = "postgres")]
    pub fn postgres(schema: &PgSchema) -> Self {
        Self::Postgres {
            url: schema.url.clone(),
            schema: schema.name.clone(),
        }
    }

    /// The store in `file`, which the test created and deletes.
    #[cfg(feature = "sqlite")]
    pub fn sqlite(file: &SqliteFile) -> Self {
        Self::Sqlite {
            url: file.url.clone(),
        }
    }

    /// A builder already holding this backend's store.
    pub async fn builder(&self) -> IdempotencyBuilder {
        // Each store given as itself, as an application gives it: a `MemoryStore`'s steps
        // are then called directly, not through `Store`.
        let builder = Idempotency::builder();
        let builder = match self {
            Self::Memory(store) => builder.store(store.clone()),
            #[cfg(feature = "redis")]
            Self::Redis { url, prefix } => builder.store(
                RedisStore::builder(url.as_str())
                    .prefix(prefix.as_str())
                    .connect()
                    .await
                    .unwrap_or_else(|error| panic!("Redis at {url} must be running: {error}")),
            ),
            #[cfg(feature = "redis")]
            Self::Cluster { urls, prefix } => builder.store(
                RedisStore::cluster_builder(urls.clone())
                    .prefix(prefix.as_str())
                    .connect()
                    .await
                    .unwrap_or_else(|error| panic!("the Redis Cluster must be up: {error}")),
            ),
            #[cfg(feature = "postgres")]
            Self::Postgres { url, schema } => builder.store(
                PostgresStore::builder(url.as_str())
                    .schema(schema.as_str())
                    .connect()
                    .await
                    .unwrap_or_else(|error| panic!("PostgreSQL at {url} must be running: {error}")),
            ),
            #[cfg(feature = "sqlite")]
            Self::Sqlite { url } => builder.store(
                SqliteStore::connect(url)
                    .await
                    .unwrap_or_else(|error| panic!("SQLite at {url}: {error}")),
            ),
        };
        test_builder(builder)
    }

    /// How many records this backend holds for the test.
    pub async fn record_count(&self) -> usize {
        match self {
            Self::Memory(store) => {
                store.run_pending_tasks();
                usize::try_from(store.entry_count()).unwrap_or(usize::MAX) + store.claim_count()
            }
            #[cfg(feature = "redis")]
            Self::Redis { url, prefix } => {
                let mut connection = testkit::redis_connection(url).await;
                testkit::keys_under(&mut connection, prefix).await.len()
            }
            #[cfg(feature = "redis")]
            Self::Cluster { urls, prefix } => {
                let mut count = 0;
                for url in urls {
                    let mut connection = testkit::redis_connection(url).await;
                    count += testkit::keys_under(&mut connection, prefix).await.len();
                }
                count
            }
            #[cfg(feature = "postgres")]
            Self::Postgres { url, schema } => {
                use sqlx::Connection;
                let mut connection = sqlx::PgConnection::connect(url)
                    .await
                    .unwrap_or_else(|error| panic!("PostgreSQL at {url} must be running: {error}"));
                let count: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT count(*) FROM \"{schema}\".idem_records WHERE expires_at > now()"
                )))
                .fetch_one(&mut connection)
                .await
                .expect("count the live rows");
                usize::try_from(count).unwrap_or(usize::MAX)
            }
            #[cfg(feature = "sqlite")]
            Self::Sqlite { url } => {
                use sqlx::Connection;
                let mut connection = sqlx::SqliteConnection::connect(url)
                    .await
                    .unwrap_or_else(|error| panic!("SQLite at {url}: {error}"));
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("a clock after 1970")
                    .as_millis();
                let count: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM idem_records WHERE expires_at > ?1")
                        .bind(i64::try_from(now).expect("a clock before 292 million AD"))
                        .fetch_one(&mut connection)
                        .await
                        .expect("count the live rows");
                usize::try_from(count).unwrap_or(usize::MAX)
            }
        }
    }
}

/// A SQLite database file of one test's own, in a directory of its own under the system's
/// temporary directory, deleted with the directory when this value is dropped.
#[cfg(feature = "sqlite")]
pub struct SqliteFile {
    pub dir: std::path::PathBuf,
    pub path: std::path::PathBuf,
    /// `sqlite://<path>`, for `SqliteStore::connect`.
    pub url: String,
}

#[cfg(feature = "sqlite")]
impl SqliteFile {
    pub fn create(test: &str) -> Self {
        let dir = std::env::temp_dir()
            .join(testkit::unique_prefix(&format!("idem-sqlite-{test}")).replace(':', "-"));
        std::fs::create_dir_all(&dir).expect("create the test's directory");
        let path = dir.join("idem.db");
        let url = format!("sqlite://{}", path.display());
        Self { dir, path, url }
    }
}

#[cfg(feature = "sqlite")]
impl Drop for SqliteFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The PostgreSQL every test may share: `IDEM_TEST_POSTGRES_URL`, or the local default.
/// Tests write only in a schema of their own ([`PgSchema`]) there.
#[cfg(feature = "postgres")]
pub fn shared_postgres_url() -> String {
    std::env::var("IDEM_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A schema of one test's own on the shared PostgreSQL: created with a name no other
/// test, run or process uses, dropped (with all it holds) when this value is dropped,
/// also when the test fails. A server that cannot be reached fails the test.
#[cfg(feature = "postgres")]
pub struct PgSchema {
    pub url: String,
    pub name: String,
}

#[cfg(feature = "postgres")]
impl PgSchema {
    pub async fn create(test: &str) -> Self {
        use sqlx::Connection;
        let url = shared_postgres_url();
        let unique = testkit::unique_prefix("");
        let digits: String = unique.chars().filter(char::is_ascii_digit).collect();
        let test: String = test
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(24)
            .collect();
        // Identifiers are at most 63 bytes: keep the unique tail.
        let tail = &digits[digits.len().saturating_sub(28)..];
        let name = format!("idem_test_{test}_{tail}");
        let mut connection = sqlx::PgConnection::connect(&url)
            .await
            .unwrap_or_else(|error| {
                panic!(
                    "PostgreSQL at {url} must be running (or set IDEM_TEST_POSTGRES_URL): {error}"
                )
            });
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA \"{name}\"")))
            .execute(&mut connection)
            .await
            .expect("create the test's schema");
        Self { url, name }
    }
}

/// A test's schema, its idem store, and a business table `payments (note)` that
/// handlers write in with `PgTransaction`.
#[cfg(feature = "postgres")]
pub struct PaymentsDb {
    pub schema: PgSchema,
    pub store: PostgresStore,
}

#[cfg(feature = "postgres")]
impl PaymentsDb {
    pub async fn new(test: &str) -> Self {
        let schema = PgSchema::create(test).await;
        let store = PostgresStore::builder(schema.url.as_str())
            .schema(schema.name.as_str())
            .connect()
            .await
            .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE \"{}\".payments (id serial PRIMARY KEY, note text NOT NULL)",
            schema.name
        )))
        .execute(store.pool())
        .await
        .unwrap();
        Self { schema, store }
    }

    /// The business table's qualified name.
    pub fn table(&self) -> String {
        format!("\"{}\".payments", self.schema.name)
    }

    /// The notes of the committed payments, in order.
    pub async fn notes(&self) -> Vec<String> {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT note FROM {} ORDER BY id",
            self.table()
        )))
        .fetch_all(self.store.pool())
        .await
        .unwrap()
    }

    /// A handle on this store, every key in the shared scope.
    pub fn idem(&self) -> Idempotency {
        Idempotency::builder()
            .shared_scope(true)
            .store(self.store.clone())
            .build()
    }
}

#[cfg(feature = "postgres")]
impl Drop for PgSchema {
    fn drop(&mut self) {
        let (url, name) = (self.url.clone(), self.name.clone());
        // Drop runs inside the test's runtime: drop the schema from a runtime of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                use sqlx::Connection;
                let mut connection = sqlx::PgConnection::connect(&url).await?;
                // A connection the test left in a transaction holding the schema's locks
                // (a regression) fails the drop instead of hanging the run.
                sqlx::query("SET lock_timeout = '30s'")
                    .execute(&mut connection)
                    .await?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP SCHEMA IF EXISTS \"{name}\" CASCADE"
                )))
                .execute(&mut connection)
                .await
                .map(drop)
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) && !std::thread::panicking() {
            panic!(
                "could not drop the test's schema {}: {dropped:?}",
                self.name
            );
        }
    }
}

/// Shared state of the test app: execution counters and a gate slow handlers wait on.
#[derive(Default)]
pub struct Counters {
    pub runs: AtomicUsize,
    pub finished: AtomicUsize,
    pub gate: Notify,
}

impl Counters {
    pub fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    pub fn finished(&self) -> usize {
        self.finished.load(Ordering::SeqCst)
    }
}

pub type AppState = Arc<Counters>;

async fn pay(idem: Idempotent, State(counters): State<AppState>, body: String) -> Response {
    idem.run(async move {
        let n = counters.runs.fetch_add(1, Ordering::SeqCst) + 1;
        counters.finished.fetch_add(1, Ordering::SeqCst);
        let mut headers = HeaderMap::new();
        headers.insert("x-run", n.to_string().parse().unwrap());
        headers.append("x-multi", "one".parse().unwrap());
        headers.append("x-multi", "two".parse().unwrap());
        headers.insert(header::SET_COOKIE, "session=abc".parse().unwrap());
        headers.insert(
            header::DATE,
            "Tue, 24 Nov 2026 00:00:00 GMT".parse().unwrap(),
        );
        (
            StatusCode::CREATED,
            headers,
            Json(serde_json::json!({ "payment": n, "request": body })),
        )
    })
    .await
}

async fn slow(idem: Idempotent, State(counters): State<AppState>, body: String) -> Response {
    idem.run(async move {
        let n = counters.runs.fetch_add(1, Ordering::SeqCst) + 1;
        let millis: u64 = body.trim().parse().unwrap_or(200);
        tokio::time::sleep(Duration::from_millis(millis)).await;
        counters.finished.fetch_add(1, Ordering::SeqCst);
        (StatusCode::CREATED, format!("slow run {n}"))
    })
    .await
}

async fn gated(idem: Idempotent, State(counters): State<AppState>) -> Response {
    idem.run(async move {
        let n = counters.runs.fetch_add(1, Ordering::SeqCst) + 1;
        counters.gate.notified().await;
        counters.finished.fetch_add(1, Ordering::SeqCst);
        (StatusCode::CREATED, format!("gated run {n}"))
    })
    .await
}

async fn fail(idem: Idempotent, State(counters): State<AppState>) -> Response {
    idem.run(async move {
        let n = counters.runs.fetch_add(1, Ordering::SeqCst) + 1;
        if n == 1 {
            (StatusCode::SERVICE_UNAVAILABLE, "try again".to_owned())
        } else {
            (StatusCode::CREATED, format!("run {n}"))
        }
    })
    .await
}

async fn panics(idem: Idempotent, State(counters): State<AppState>) -> Response {
    idem.run(async move {
        let n = counters.runs.fetch_add(1, Ordering::SeqCst) + 1;
        assert!(n != 1, "first run panics");
        (StatusCode::CREATED, format!("run {n}"))
    })
    .await
}

async fn big(idem: Idempotent, State(counters): State<AppState>) -> Response {
    idem.run(async move {
        counters.runs.fetch_add(1, Ordering::SeqCst);
        (StatusCode::CREATED, "x".repeat(4096))
    })
    .await
}

async fn short_ttl(idem: Idempotent<1>, State(counters): State<AppState>) -> Response {
    idem.run(async move {
        let n = counters.runs.fetch_add(1, Ordering::SeqCst) + 1;
        (StatusCode::CREATED, format!("run {n}"))
    })
    .await
}

async fn required(idem: Idempotent<60, true>, State(counters): State<AppState>) -> Response {
    idem.run(async move {
        counters.runs.fetch_add(1, Ordering::SeqCst);
        StatusCode::CREATED
    })
    .await
}

async fn stream(idem: Idempotent, State(counters): State<AppState>, body: String) -> Response {
    idem.run(async move {
        let n = counters.runs.fetch_add(1, Ordering::SeqCst) + 1;
        let millis: u64 = body.trim().parse().unwrap_or(200);
        let chunks = futures_util::stream::unfold(0u8, move |step| async move {
            match step {
                0 => Some((
                    Ok::<_, std::io::Error>(bytes::Bytes::from(format!("stream run {n}: "))),
                    1,
                )),
                1 => {
                    tokio::time::sleep(Duration::from_millis(millis)).await;
                    Some((Ok(bytes::Bytes::from_static(b"done")), 2))
                }
                _ => None,
            }
        });
        (StatusCode::CREATED, Body::from_stream(chunks))
    })
    .await
}

async fn broken(idem: Idempotent, State(counters): State<AppState>) -> Response {
    idem.run(async move {
        counters.runs.fetch_add(1, Ordering::SeqCst);
        let chunks = futures_util::stream::iter([
            Ok(bytes::Bytes::from_static(b"partial")),
            Err(std::io::Error::other("the body broke")),
        ]);
        (StatusCode::OK, Body::from_stream(chunks))
    })
    .await
}

/// The routes, without the layer.
pub fn routes(counters: AppState) -> Router {
    Router::new()
        .route("/pay", post(pay))
        .route("/pay/other", post(pay))
        .route("/slow", post(slow))
        .route("/gated", post(gated))
        .route("/fail", post(fail))
        .route("/panic", post(panics))
        .route("/big", post(big))
        .route("/short", post(short_ttl))
        .route("/required", post(required))
        .route("/stream", post(stream))
        .route("/broken", post(broken))
        .with_state(counters)
}

pub fn app(idem: &Idempotency, counters: AppState) -> Router {
    routes(counters).layer(idem.layer())
}

/// A POST request with an optional key.
pub fn post_with(path: &str, key: Option<&str>, body: &str) -> Request {
    let mut builder = Request::builder().method(Method::POST).uri(path);
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder.body(Body::from(body.to_owned())).unwrap()
}

/// A POST to `/pay` with a key, as the client holding `token` (`Authorization: Bearer`).
pub fn as_client(token: &str, key: &str, body: &str) -> Request {
    let mut request = post_with("/pay", Some(key), body);
    request.headers_mut().insert(
        header::AUTHORIZATION,
        format!("Bearer {token}").parse().expect("header value"),
    );
    request
}

/// A response with its body read.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: bytes::Bytes,
}

impl Answer {
    pub fn empty() -> Self {
        Self {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: bytes::Bytes::new(),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| {
            panic!(
                "body is not JSON: {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn is_replay(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }

    /// Asserts a problem response of `status` and `kind`.
    pub fn assert_problem(&self, status: StatusCode, kind: &str) {
        assert_eq!(
            self.status,
            status,
            "body: {:?}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(
            self.headers[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let json = self.json();
        assert_eq!(json["type"], kind);
        assert_eq!(json["status"], status.as_u16());
        assert!(json["title"].is_string());
        assert!(!json["detail"].as_str().unwrap_or_default().is_empty());
    }
}

pub async fn read(response: Response) -> Answer {
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.expect("read body").to_bytes(),
    }
}

pub async fn send(app: &Router, request: Request) -> Answer {
    read(app.clone().oneshot(request).await.expect("infallible")).await
}

/// Sends the request `make` builds, again after a 10 ms back-off while it is answered
/// `409` (a run of the key still ending), up to 200 times: a client retrying.
pub async fn send_past_in_flight(app: &Router, make: impl Fn() -> Request) -> Answer {
    let mut answer = send(app, make()).await;
    for _ in 0..200 {
        if answer.status != StatusCode::CONFLICT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        answer = send(app, make()).await;
    }
    answer
}

pub async fn send_response(app: &Router, request: Request) -> Response {
    app.clone().oneshot(request).await.expect("infallible")
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let mut response = Response::new(Body::from(self.body));
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers;
        response
    }
}

/// Declares one test per store for an `async fn(Backend)` check.
#[macro_export]
macro_rules! on_both_stores {
    ($($check:ident),* $(,)?) => {$(
        mod $check {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                super::$check($crate::common::Backend::memory()).await;
            }

            #[cfg(feature = "redis")]
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                super::$check($crate::common::Backend::redis(stringify!($check))).await;
            }
        }
    )*};
}

/// Declares one test on PostgreSQL per `async fn(Backend)` check, each in a schema of its
/// own, in a module `on_postgres`.
#[cfg(feature = "postgres")]
#[macro_export]
macro_rules! on_postgres {
    ($($check:ident),* $(,)?) => {
        mod on_postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    let schema = $crate::common::PgSchema::create(stringify!($check)).await;
                    super::$check($crate::common::Backend::postgres(&schema)).await;
                }
            )*
        }
    };
}

/// Declares one test on SQLite per `async fn(Backend)` check, each on a file of its own,
/// in a module `on_sqlite`.
#[cfg(feature = "sqlite")]
#[macro_export]
macro_rules! on_sqlite {
    ($($check:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    let file = $crate::common::SqliteFile::create(stringify!($check));
                    super::$check($crate::common::Backend::sqlite(&file)).await;
                }
            )*
        }
    };
}

/// A gate a store step waits at while it is closed, and says it reached.
#[derive(Default)]
pub struct Gate {
    closed: std::sync::atomic::AtomicBool,
    /// Notified (a permit kept) each time a step stops at the closed gate.
    pub reached: Notify,
    opened: Notify,
}

impl Gate {
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    pub fn open(&self) {
        self.closed.store(false, Ordering::SeqCst);
        self.opened.notify_waiters();
    }

    pub async fn pass(&self) {
        let opened = self.opened.notified();
        let mut opened = std::pin::pin!(opened);
        opened.as_mut().enable();
        if self.closed.load(Ordering::SeqCst) {
            self.reached.notify_one();
            opened.await;
        }
    }
}

/// A store with hooks on its steps (see [`Gates`]), each gate open until closed.
pub struct Gated {
    inner: Arc<dyn Store>,
    gates: Arc<Gates>,
}

impl Gated {
    pub fn new(inner: Arc<dyn Store>, gates: Arc<Gates>) -> Self {
        Self { inner, gates }
    }
}

/// What a [`Gated`] store does to each step.
pub struct Gates {
    /// After a `begin` is applied, before its answer.
    pub answer: Gate,
    /// Before a `complete` is applied.
    pub complete: Gate,
    /// Before a `release` is applied.
    pub release: Gate,
    /// This many `begin`s never answer, and are never applied (a command lost on its way).
    pub hang_begins: AtomicUsize,
    /// This many `begin`s fail with a backend error, not applied.
    pub fail_begins: AtomicUsize,
    /// `begin`s answered so far.
    pub begins_answered: AtomicUsize,
    /// With `paced`, each `begin` says it was sent (`entered`), then waits for a permit.
    pub paced: std::sync::atomic::AtomicBool,
    pub entered: Notify,
    pub permits: tokio::sync::Semaphore,
}

impl Default for Gates {
    fn default() -> Self {
        Self {
            answer: Gate::default(),
            complete: Gate::default(),
            release: Gate::default(),
            hang_begins: AtomicUsize::new(0),
            fail_begins: AtomicUsize::new(0),
            begins_answered: AtomicUsize::new(0),
            paced: std::sync::atomic::AtomicBool::new(false),
            entered: Notify::new(),
            permits: tokio::sync::Semaphore::new(0),
        }
    }
}

fn take_one(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

impl Store for Gated {
    fn begin<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        Box::pin(async move {
            let gates = &self.gates;
            if take_one(&gates.hang_begins) {
                std::future::pending::<()>().await;
            }
            if take_one(&gates.fail_begins) {
                return Err(StoreError::backend("begin refused by the test"));
            }
            if gates.paced.load(Ordering::SeqCst) {
                gates.entered.notify_one();
                gates.permits.acquire().await.expect("open").forget();
            }
            let found = self.inner.begin(key, claim, lease).await;
            gates.answer.pass().await;
            gates.begins_answered.fetch_add(1, Ordering::SeqCst);
            found
        })
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
        Box::pin(async move {
            self.gates.complete.pass().await;
            self.inner.complete(key, claim, record, ttl).await
        })
    }
    fn release<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            self.gates.release.pass().await;
            self.inner.release(key, claim).await
        })
    }
    /// The inner store's: a database store's transactions write through it, ungated.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        self.inner.as_any()
    }
}

/// A store whose `begin` is applied at once but answered some time later: a slow network,
/// a busy server, or a reply on its way when the caller gives up.
pub struct SlowAnswers(Arc<dyn Store>, Duration);

impl SlowAnswers {
    pub fn new(inner: Arc<dyn Store>, delay: Duration) -> Self {
        Self(inner, delay)
    }
}

impl Store for SlowAnswers {
    fn begin<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        Box::pin(async move {
            let found = self.0.begin(key, claim, lease).await;
            tokio::time::sleep(self.1).await;
            found
        })
    }
    fn renew<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.0.renew(key, claim, lease)
    }
    fn complete<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        record: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.0.complete(key, claim, record, ttl)
    }
    fn release<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.0.release(key, claim)
    }
}

/// Polls `condition` every 5 ms for up to `limit`; returns whether it held.
pub async fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    condition()
}

/// Waits (up to 10 s, else fails the test) until `condition` holds.
pub async fn until(condition: impl FnMut() -> bool) {
    assert!(
        eventually(Duration::from_secs(10), condition).await,
        "the awaited event did not happen"
    );
}

/// The builder every test starts from: `builder` with the test defaults. Test requests
/// carry no credentials unless a test gives them, so tests opt in to one shared scope.
pub fn test_builder(builder: IdempotencyBuilder) -> IdempotencyBuilder {
    builder.shared_scope(true)
}

/// A store whose lease renewals never arrive, as for an executor cut off from the
/// database: its lease runs out while its handler still runs.
pub struct NoRenewals<S>(pub S);

impl<S: Store> Store for NoRenewals<S> {
    fn begin<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        self.0.begin(key, claim, lease)
    }

    fn renew<'a>(
        &'a self,
        _: &'a str,
        _: &'a Bytes,
        _: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async { Err(StoreError::backend("the renewal was lost")) })
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        record: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.0.complete(key, claim, record, ttl)
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.0.release(key, claim)
    }

    // A transaction of the inner store's database is found through the wrapper.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        self.0.as_any()
    }
}

/// Polls a future at most `left` times, then gives it up (drops it): what a `select!`
/// against a deadline, or a client gone away, does to a request or a `tx.conn()` that is
/// slow to come. `None` where it was given up.
pub struct GiveUpAfter<F> {
    pub inner: std::pin::Pin<Box<F>>,
    pub left: usize,
}

impl<F: std::future::Future> std::future::Future for GiveUpAfter<F> {
    type Output = Option<F::Output>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        self.left -= 1;
        match self.inner.as_mut().poll(cx) {
            std::task::Poll::Ready(output) => std::task::Poll::Ready(Some(output)),
            std::task::Poll::Pending => {
                cx.waker().wake_by_ref();
                std::task::Poll::Pending
            }
        }
    }
}
