//! Fixtures shared by the payments tests: temporary directories, the router served on a
//! loopback socket, a gate that holds payments right after idem claimed their key,
//! authenticated clients and the answers they read.

#![allow(dead_code, unreachable_pub)]

use std::borrow::Cow;
use std::fmt;
use std::path::PathBuf;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use bytes::Bytes;
use idem_runtime::defaults;
use idem_runtime::http::PROBLEM_JSON;
use idem_runtime::store::{BoxFuture, Store, StoreError};
use payments::{AppState, Config, Db};
use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use sqlx::Connection as _;
use tokio::sync::watch;

/// An empty directory of the test's own, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!(
            "payments-{name}-{}-{nanos}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The router on a loopback socket; stops when dropped.
pub struct Server {
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub async fn start(router: Router) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let url = format!("http://{}", listener.local_addr().expect("local address"));
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.expect("serve");
        });
        Self { url, task }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Holds keyed requests at the point where idem has claimed their key and the handler has
/// not started yet, so a test can look at (or kill) the app while a payment is in flight.
///
/// Open, it lets everything through. Closed, every request that claims a key waits in the
/// store step of its claim until the gate opens (at most [`HOLD_LIMIT`]); its claim is
/// renewed meanwhile, as the lease of a running handler is. Requests that find the key
/// taken are answered at once, as usual.
#[derive(Clone)]
pub struct Gate(Arc<GateState>);

struct GateState {
    closed: watch::Sender<bool>,
    held: watch::Sender<usize>,
}

/// The longest a closed [`Gate`] holds a request.
pub const HOLD_LIMIT: Duration = Duration::from_secs(60);

impl Gate {
    /// An open gate.
    pub fn new() -> Self {
        Self(Arc::new(GateState {
            closed: watch::Sender::new(false),
            held: watch::Sender::new(0),
        }))
    }

    /// Holds the requests that claim a key from now on.
    pub fn close(&self) {
        self.0.closed.send_replace(true);
    }

    /// Lets the held requests, and every later one, through.
    pub fn open(&self) {
        self.0.closed.send_replace(false);
    }

    /// Waits until the gate holds (or has held) a request.
    pub async fn held(&self) {
        let mut held = self.0.held.subscribe();
        // The sender lives in `self`, so the channel cannot close while this waits.
        let _ = held.wait_for(|&count| count > 0).await;
    }

    /// `store` with its claims held by this gate.
    pub fn guard(&self, store: Arc<dyn Store>) -> GatedStore {
        GatedStore {
            inner: store,
            gate: self.clone(),
            holds_completions: false,
        }
    }

    /// `store` with its completions held by this gate instead: the handler has run, and
    /// its response is not stored yet.
    pub fn guard_completions(&self, store: Arc<dyn Store>) -> GatedStore {
        GatedStore {
            inner: store,
            gate: self.clone(),
            holds_completions: true,
        }
    }

    async fn hold(&self, inner: &dyn Store, key: &str, claim: &Bytes, lease: Duration) {
        let mut closed = self.0.closed.subscribe();
        let is_closed = *closed.borrow_and_update();
        if !is_closed {
            return;
        }
        self.0.held.send_modify(|count| *count += 1);
        // The guard `wait_for` answers with is not `Send`: drop it inside.
        let opened = async { closed.wait_for(|&closed| !closed).await.map(drop) };
        let mut opened = pin!(tokio::time::timeout(HOLD_LIMIT, opened));
        loop {
            tokio::select! {
                _ = &mut opened => return,
                () = tokio::time::sleep(lease / 3) => {
                    // A claim that cannot be kept shows when idem confirms it after the hold.
                    let _ = inner.renew(key, claim, lease).await;
                }
            }
        }
    }
}

/// A [`Store`] whose successful claims (or completions) wait at a [`Gate`]; made by
/// [`Gate::guard`] and [`Gate::guard_completions`].
pub struct GatedStore {
    inner: Arc<dyn Store>,
    gate: Gate,
    holds_completions: bool,
}

impl Store for GatedStore {
    fn begin<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        Box::pin(async move {
            let found = self.inner.begin(key, claim, lease).await?;
            if found.is_none() && !self.holds_completions {
                self.gate.hold(&*self.inner, key, claim, lease).await;
            }
            Ok(found)
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
            if self.holds_completions {
                // idem renews the lease meanwhile, as for any completion under way.
                self.gate
                    .hold(&*self.inner, key, claim, defaults::LEASE)
                    .await;
            }
            self.inner.complete(key, claim, record, ttl).await
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.inner.release(key, claim)
    }

    // The app writes in a transaction of the store's own database where there is one.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        self.inner.as_any()
    }
}

/// The app as [`payments::app`] builds it from `config`, over `db`, with its idempotency
/// store behind `gate`.
///
/// # Panics
/// If the idempotency store cannot be reached.
pub async fn app_behind(gate: &Gate, config: &Config, db: Db) -> Router {
    let store = payments::idempotency_store(config)
        .await
        .expect("the idempotency store");
    let idem = payments::idempotency_settings(config)
        .shared_store(Arc::new(gate.guard(store)))
        // A held claim is a store step that lasts as long as the hold.
        .store_timeout(HOLD_LIMIT + defaults::STORE_TIMEOUT)
        .build();
    payments::authenticated_router(AppState::new(db), &idem, config.api_keys.clone())
}

/// The API key the app accepts out of the box (`PAYMENTS_API_KEYS` unset).
pub const DEMO_API_KEY: &str = "sk_test_demo";

/// An HTTP client that authenticates with [`DEMO_API_KEY`] on every request.
pub fn http() -> reqwest::Client {
    http_as(DEMO_API_KEY)
}

/// An HTTP client that authenticates with `api_key` on every request.
pub fn http_as(api_key: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .default_headers(auth_headers(api_key))
        .build()
        .expect("an HTTP client")
}

/// `Authorization: Bearer <api_key>`, as default headers of a client.
pub fn auth_headers(api_key: &str) -> reqwest::header::HeaderMap {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {api_key}").parse().expect("a header value"),
    );
    headers
}

/// An HTTP answer as a client sees it: the status, the headers idem and the app set, and
/// the whole body.
pub struct Answer {
    pub status: StatusCode,
    /// `Idempotent-Replayed: true`: idem answered with a stored response.
    pub replayed: bool,
    pub content_type: String,
    /// `Retry-After`, in whole seconds.
    pub retry_after: Option<Duration>,
    pub body: Vec<u8>,
}

impl Answer {
    /// Reads `response` to the end of its body.
    pub async fn read(response: reqwest::Response) -> Result<Self, reqwest::Error> {
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned)
        };
        let replayed = header("idempotent-replayed").as_deref() == Some("true");
        let content_type = header("content-type").unwrap_or_default();
        let retry_after = header("retry-after")
            .and_then(|secs| secs.parse().ok())
            .map(Duration::from_secs);
        Ok(Self {
            status: response.status(),
            replayed,
            content_type,
            retry_after,
            body: response.bytes().await?.to_vec(),
        })
    }

    /// The body as text, for messages.
    pub fn text(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.body)
    }

    /// The body as JSON.
    ///
    /// # Panics
    /// If it is not a `T`, with the status and the body in the message.
    pub fn json<T: DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|error| panic!("{error}: {} {}", self.status, self.text()))
    }

    /// The `type` of a problem answer, checked to be an RFC 9457 problem of its status.
    ///
    /// # Panics
    /// If the answer is not such a problem.
    pub fn problem_type(&self) -> String {
        assert_eq!(self.content_type, PROBLEM_JSON, "{self:?}");
        let problem: serde_json::Value = self.json();
        assert_eq!(problem["status"], self.status.as_u16(), "{self:?}");
        assert!(
            problem["title"].is_string() && problem["detail"].is_string(),
            "{self:?}"
        );
        problem["type"]
            .as_str()
            .unwrap_or_else(|| panic!("a problem without a type: {self:?}"))
            .to_owned()
    }
}

impl fmt::Debug for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Answer")
            .field("status", &self.status)
            .field("replayed", &self.replayed)
            .field("content_type", &self.content_type)
            .field("retry_after", &self.retry_after)
            .field("body", &self.text())
            .finish()
    }
}

/// A schema of the test's own on the shared PostgreSQL server, dropped when dropped.
pub struct PgSchema {
    admin_url: String,
    /// The schema's name.
    pub name: String,
}

impl PgSchema {
    /// # Panics
    /// When PostgreSQL is not running: the test fails, it does not skip.
    pub async fn new(test: &str) -> Self {
        let admin_url = std::env::var("IDEM_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let test: String = test
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let name = format!(
            "payments_{test}_{}",
            uuid::Uuid::new_v4().simple().to_string().get(..12).unwrap()
        );
        let schema = Self { admin_url, name };
        schema
            .admin(&format!("CREATE SCHEMA {}", schema.name))
            .await;
        schema
    }

    /// The database URL that works in this schema.
    pub fn url(&self) -> String {
        let separator = if self.admin_url.contains('?') {
            '&'
        } else {
            '?'
        };
        format!(
            "{}{separator}options=-csearch_path%3D{}",
            self.admin_url, self.name
        )
    }

    /// Runs `statement` (one or more, `;`-separated) as the admin user.
    pub async fn admin(&self, statement: &str) {
        let mut admin = sqlx::PgConnection::connect(&self.admin_url)
            .await
            .unwrap_or_else(|error| {
                panic!(
                    "PostgreSQL at {} must be running for this test: {error}",
                    self.admin_url
                )
            });
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement.to_owned()))
            .execute(&mut admin)
            .await
            .unwrap();
        admin.close().await.unwrap();
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let statement = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name);
        let admin_url = self.admin_url.clone();
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    let mut admin = sqlx::PgConnection::connect(&admin_url).await.unwrap();
                    sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
                        .execute(&mut admin)
                        .await
                        .unwrap();
                });
        })
        .join();
        if dropped.is_err() && !std::thread::panicking() {
            panic!("dropping schema {} failed", self.name);
        }
    }
}
