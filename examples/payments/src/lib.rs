//! The example payments app of idem: orders and payments behind `#[idempotent]`, each
//! payment committed with the record of its response.
//!
//! | route | does |
//! | --- | --- |
//! | `POST /orders` | creates a pending order (`#[idempotent(ttl = "24h")]`) |
//! | `POST /payments` | captures the payment of an order and marks it paid (`#[idempotent(ttl = "24h")]`) |
//! | `GET /orders/{id}`, `GET /payments/{id}` | read them back |
//! | `GET /healthz` | `200` while the database and the idempotency store answer, else `503` |
//! | `GET /metrics` | idem's metrics, for Prometheus |
//!
//! A retry with the same `Idempotency-Key` gets the stored response. Out of the box idem
//! keeps its records in the app's own database, and a payment is written in idem's
//! transaction ([`idem_runtime::store::PgTransaction`] on PostgreSQL,
//! [`idem_runtime::store::SqliteTransaction`] on SQLite): the payment and
//! the record of its response commit together, so a crash before the commit leaves
//! neither (the retry pays afresh) and a crash after it leaves both (the retry replays).
//! With `REDIS_URL` (or `PAYMENTS_IDEM_STORE=memory`) the records live elsewhere and the
//! payment commits in a transaction of the app's own. Whatever the store, the UNIQUE
//! constraint on `payments.order_id` stops a second payment of one order (`409`), also
//! when a store has forgotten a key. Every error is an RFC 9457 problem.
//!
//! A body the app refuses for its shape (malformed JSON, a missing field, a value such as
//! an unknown currency or a negative amount) is answered before idem claims the key, so
//! nothing is stored under it and the corrected request can be sent with the same key.
//! What needs the database (the order exists, the amount is its total, it is unpaid) is
//! checked by the handler, and that answer is stored like any other.
//!
//! The router is built here so tests can serve the real thing:
//!
//! ```no_run
//! # async fn demo() -> Result<(), payments::StartupError> {
//! let config = payments::Config::from_env()?;
//! let router = payments::app(&config).await?;
//! let listener = tokio::net::TcpListener::bind(config.addr).await?;
//! axum::serve(listener, router).await?;
//! # Ok(()) }
//! ```
//!
//! [`client`] holds the retrying client that `pay-client` runs.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::{get, post};
use idem_runtime::store::{MemoryStore, PostgresStore, RedisStore, SqliteStore, Store};
use idem_runtime::{Idempotency, IdempotencyBuilder};
use tower_http::timeout::{RequestBodyTimeoutLayer, TimeoutLayer};

mod auth;
pub mod client;
mod db;
mod error;
mod model;
mod routes;
mod tx;

pub use crate::auth::{ApiKeys, DEMO_API_KEYS};
pub use crate::db::Db;
pub use crate::error::ApiError;
pub use crate::model::{
    DEFAULT_CURRENCY, ISO_4217, Item, NewOrder, NewPayment, ORDER_PAID, ORDER_PENDING, Order,
    PAYMENT_CAPTURED, Payment,
};

/// Where the app listens unless `PAYMENTS_ADDR` says otherwise.
pub const DEFAULT_ADDR: &str = "127.0.0.1:3000";
/// The database unless `DATABASE_URL` says otherwise: `payments.db` in the working
/// directory, created if missing.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://payments.db?mode=rwc";
/// How long a client may take to send a request's headers, unless
/// `PAYMENTS_HEADER_READ_TIMEOUT_MS` says otherwise.
pub const DEFAULT_HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a request body may stall, unless `PAYMENTS_BODY_TIMEOUT_MS` says otherwise.
pub const DEFAULT_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a request may take, unless `PAYMENTS_REQUEST_TIMEOUT_MS` says otherwise.
pub const DEFAULT_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a shutdown may take unless `PAYMENTS_SHUTDOWN_DEADLINE_MS` says otherwise.
pub const DEFAULT_SHUTDOWN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(20);
/// The prefix of the app's keys in Redis.
pub const DEFAULT_REDIS_PREFIX: &str = "payments:idem:";

/// How the app is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen address (`PAYMENTS_ADDR`, default [`DEFAULT_ADDR`]).
    pub addr: SocketAddr,
    /// `sqlite://...` or `postgres://...` (`DATABASE_URL`, default [`DEFAULT_DATABASE_URL`]).
    pub database_url: String,
    /// The idempotency store: Redis at this URL (`REDIS_URL`), else
    /// [`idempotency_store_kind`](Self::idempotency_store_kind).
    pub redis_url: Option<String>,
    /// The idempotency store when `REDIS_URL` is not set (`PAYMENTS_IDEM_STORE`:
    /// `database`, the default, or `memory`).
    pub idempotency_store_kind: StoreKind,
    /// The prefix of the app's Redis keys (default [`DEFAULT_REDIS_PREFIX`]).
    pub redis_prefix: String,
    /// How long a payment in progress holds its key between renewals
    /// (`PAYMENTS_IDEM_LEASE_MS`, default idem's [`idem_runtime::defaults::LEASE`]): after a
    /// crash, the key is free again within one lease.
    pub lease: std::time::Duration,
    /// How long a client may take to send a request's headers
    /// (`PAYMENTS_HEADER_READ_TIMEOUT_MS`, default [`DEFAULT_HEADER_READ_TIMEOUT`]); a
    /// slower one has its connection closed, so stalled clients cannot pile up
    /// connections.
    pub header_read_timeout: std::time::Duration,
    /// How long a client may pause while sending a request body
    /// (`PAYMENTS_BODY_TIMEOUT_MS`, default [`DEFAULT_BODY_TIMEOUT`]); a body that stalls
    /// longer fails, and the request is answered `400` without running.
    pub body_timeout: std::time::Duration,
    /// How long a request may take in all (`PAYMENTS_REQUEST_TIMEOUT_MS`, default
    /// [`DEFAULT_REQUEST_TIMEOUT`]); after it the client gets `408`. A payment whose
    /// client got `408` is not cancelled: idem runs it to the end and stores its
    /// response, which the retry gets.
    pub request_timeout: std::time::Duration,
    /// How long a shutdown (SIGTERM, ctrl-c) may take, from the signal
    /// (`PAYMENTS_SHUTDOWN_DEADLINE_MS`, default [`DEFAULT_SHUTDOWN_DEADLINE`]): requests
    /// still open and payments still running (also those whose client hung up) get this
    /// long to end. Keep it below the orchestrator's own grace period (Kubernetes: 30 s).
    pub shutdown_deadline: std::time::Duration,
    /// The API keys the app accepts and the account each belongs to
    /// (`PAYMENTS_API_KEYS`, `key=account` pairs separated by commas; default
    /// [`DEMO_API_KEYS`]).
    pub api_keys: ApiKeys,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 3000)),
            database_url: DEFAULT_DATABASE_URL.to_owned(),
            redis_url: None,
            idempotency_store_kind: StoreKind::Database,
            redis_prefix: DEFAULT_REDIS_PREFIX.to_owned(),
            lease: idem_runtime::defaults::LEASE,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            shutdown_deadline: DEFAULT_SHUTDOWN_DEADLINE,
            api_keys: ApiKeys::demo(),
        }
    }
}

impl Config {
    /// Reads `PAYMENTS_ADDR`, `DATABASE_URL`, `REDIS_URL`, `PAYMENTS_IDEM_STORE`,
    /// `PAYMENTS_API_KEYS`,
    /// `PAYMENTS_IDEM_LEASE_MS`, `PAYMENTS_HEADER_READ_TIMEOUT_MS`,
    /// `PAYMENTS_BODY_TIMEOUT_MS`, `PAYMENTS_REQUEST_TIMEOUT_MS` and
    /// `PAYMENTS_SHUTDOWN_DEADLINE_MS`; unset or empty variables keep the defaults.
    pub fn from_env() -> Result<Self, StartupError> {
        let var = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
        let mut config = Self::default();
        if let Some(addr) = var("PAYMENTS_ADDR") {
            config.addr = addr
                .parse()
                .map_err(|source| StartupError::Addr { addr, source })?;
        }
        if let Some(url) = var("DATABASE_URL") {
            config.database_url = url;
        }
        config.redis_url = var("REDIS_URL");
        if let Some(kind) = var("PAYMENTS_IDEM_STORE") {
            config.idempotency_store_kind = match kind.as_str() {
                "database" => StoreKind::Database,
                "memory" => StoreKind::Memory,
                _ => return Err(StartupError::StoreKind { kind }),
            };
        }
        if let Some(keys) = var("PAYMENTS_API_KEYS") {
            config.api_keys = ApiKeys::parse(&keys).ok_or(StartupError::ApiKeys)?;
        }
        if let Some(lease) = var("PAYMENTS_IDEM_LEASE_MS") {
            let millis = lease
                .parse::<u64>()
                .ok()
                .filter(|&ms| ms >= 100)
                .ok_or(StartupError::Lease { lease })?;
            config.lease = std::time::Duration::from_millis(millis);
        }
        let millis = |name: &'static str| -> Result<Option<std::time::Duration>, StartupError> {
            var(name)
                .map(|value| {
                    value
                        .parse::<u64>()
                        .map(std::time::Duration::from_millis)
                        .map_err(|_| StartupError::Millis { name, value })
                })
                .transpose()
        };
        if let Some(timeout) = millis("PAYMENTS_HEADER_READ_TIMEOUT_MS")? {
            config.header_read_timeout = timeout;
        }
        if let Some(timeout) = millis("PAYMENTS_BODY_TIMEOUT_MS")? {
            config.body_timeout = timeout;
        }
        if let Some(timeout) = millis("PAYMENTS_REQUEST_TIMEOUT_MS")? {
            config.request_timeout = timeout;
        }
        if let Some(deadline) = millis("PAYMENTS_SHUTDOWN_DEADLINE_MS")? {
            config.shutdown_deadline = deadline;
        }
        Ok(config)
    }
}

/// Where idem keeps its records when `REDIS_URL` is not set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreKind {
    /// In the app's own database (a table `idem_records` next to `payments`), so that a
    /// payment and the record of its response commit in one transaction: a crash can
    /// never leave one without the other.
    Database,
    /// In the process' memory: one instance only, forgotten on restart.
    Memory,
}

impl Config {
    /// What the idempotency store is, for the logs.
    pub fn idempotency_store_name(&self) -> &'static str {
        match (&self.redis_url, self.idempotency_store_kind) {
            (Some(_), _) => "redis",
            (None, StoreKind::Memory) => "memory",
            (None, StoreKind::Database) => "database",
        }
    }
}

/// Why the app could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartupError {
    /// `PAYMENTS_ADDR` is not a socket address.
    #[error("PAYMENTS_ADDR={addr:?} is not an address like 127.0.0.1:3000")]
    Addr {
        /// The value given.
        addr: String,
        /// Why it does not parse.
        source: std::net::AddrParseError,
    },
    /// `PAYMENTS_IDEM_STORE` is neither `database` nor `memory`.
    #[error("PAYMENTS_IDEM_STORE={kind:?} is neither `database` nor `memory`")]
    StoreKind {
        /// The value given.
        kind: String,
    },
    /// `PAYMENTS_IDEM_LEASE_MS` is not a whole number of milliseconds of at least 100.
    #[error("PAYMENTS_IDEM_LEASE_MS={lease:?} is not a number of milliseconds (at least 100)")]
    Lease {
        /// The value given.
        lease: String,
    },
    /// A timeout or deadline variable is not a whole number of milliseconds.
    #[error("{name}={value:?} is not a number of milliseconds")]
    Millis {
        /// The variable.
        name: &'static str,
        /// The value given.
        value: String,
    },
    /// `PAYMENTS_API_KEYS` is not a list of `key=account` pairs.
    #[error(
        "PAYMENTS_API_KEYS must be `key=account` pairs separated by commas, such as `sk_live_1=acct_1,sk_live_2=acct_2`"
    )]
    ApiKeys,
    /// `DATABASE_URL` names an in-memory SQLite database while idem's records are to be
    /// kept in the database.
    #[error(
        "DATABASE_URL names an in-memory SQLite database, which idem's records cannot share with the payments (each pool opens one of its own): use a file (the default, sqlite://payments.db?mode=rwc), or PAYMENTS_IDEM_STORE=memory"
    )]
    InMemoryDatabase,
    /// The database could not be opened or migrated.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The idempotency store could not be reached or set up.
    #[error("idempotency store: {0}")]
    Redis(#[from] idem_runtime::ConnectError),
    /// Listening or serving failed.
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
}

/// What the handlers share: the database.
#[derive(Debug, Clone)]
pub struct AppState {
    pub(crate) db: Db,
}

impl AppState {
    /// State over `db`.
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.db
    }
}

/// Connects the database (running its migrations) and the idempotency store, and builds
/// the router.
pub async fn app(config: &Config) -> Result<Router, StartupError> {
    Ok(app_with_idempotency(config).await?.0)
}

/// [`app`], and the idempotency handle it serves with, for [`serve`] to drain.
pub async fn app_with_idempotency(config: &Config) -> Result<(Router, Idempotency), StartupError> {
    // Before idem reports anything: it reports to the recorder installed then.
    prometheus();
    let db = Db::connect(&config.database_url).await?;
    let idem = idempotency(config).await?;
    let router = authenticated_router(AppState::new(db), &idem, config.api_keys.clone())
        // Outside idem's layer, which reads the body of a keyed request before the
        // handler: a stalled body fails there, and the request runs nothing.
        .layer(RequestBodyTimeoutLayer::new(config.body_timeout))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            config.request_timeout,
        ));
    Ok((with_metrics(router), idem))
}

/// `router` with `GET /metrics`: what idem (and anything else in the process) reports
/// through the `metrics` facade, in Prometheus' text format. The route is outside the
/// router's layers, so it needs no API key; serve it where only your scraper reaches it.
///
/// The first call installs the process-wide Prometheus recorder.
pub fn with_metrics(router: Router) -> Router {
    let handle = prometheus().clone();
    router.route("/metrics", get(move || std::future::ready(handle.render())))
}

/// The process-wide Prometheus recorder, installed on first use. Store latencies are
/// histograms with buckets from 0.5 ms to 2.5 s.
fn prometheus() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = metrics_exporter_prometheus::PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full("idem_store_seconds".into()),
                &[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ],
            )
            .expect("the buckets are not empty");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed; /metrics shows nothing");
        }
        // Histogram samples wait in a buffer until they are folded into the buckets: a
        // scrape does it, and this does it between scrapes, so that the buffer stays small
        // when nobody scrapes.
        let upkeep = handle.clone();
        std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(5));
                    upkeep.run_upkeep();
                }
            })
            .expect("a thread can be started");
        handle
    })
}

/// Serves `router` on `listener` until `stop` resolves, then shuts down within the
/// config's [`shutdown_deadline`](Config::shutdown_deadline), counted from `stop`: the
/// server stops accepting connections and waits for the requests still open, then
/// `idem` waits for payments still running, also those whose client hung up
/// ([`Idempotency::shutdown`]). A payment still running at the deadline is logged by its
/// key and left to its lease: nothing half-done is stored for it.
///
/// Connections are served by hyper with the config's
/// [`header_read_timeout`](Config::header_read_timeout) (`axum::serve` sets none).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    idem: Idempotency,
    config: &Config,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartupError> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::server::graceful::GracefulShutdown;
    use tower::ServiceExt;

    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout);
    let connections = GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let router = router.clone();
        let service =
            hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                router.clone().oneshot(request.map(axum::body::Body::new))
            });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = connections.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    let deadline = tokio::time::Instant::now() + config.shutdown_deadline;
    drop(listener);
    if tokio::time::timeout_at(deadline, connections.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open at the shutdown deadline; closing them");
    }
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    let unfinished = idem.shutdown(left).await;
    if unfinished > 0 {
        tracing::warn!(
            unfinished,
            "payments still running at the shutdown deadline are left to their leases"
        );
    }
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or ctrl-c (SIGINT), logging that the app shuts down.
pub async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
    tracing::info!("shutting down");
}

/// The idempotency handle the config asks for: [`idempotency_settings`] over
/// [`idempotency_store`].
pub async fn idempotency(config: &Config) -> Result<Idempotency, StartupError> {
    let store = idempotency_store(config).await?;
    Ok(idempotency_settings(config).shared_store(store).build())
}

/// idem as the app configures it (its [`lease`](Config::lease)), without a store yet:
/// give it one with `store` or `shared_store`, for example one that wraps
/// [`idempotency_store`] to watch its steps.
pub fn idempotency_settings(config: &Config) -> IdempotencyBuilder {
    Idempotency::builder().lease(config.lease)
}

/// The idempotency store the config asks for: Redis at `redis_url` under `redis_prefix`
/// when the URL is set; else the app's database (a table `idem_records`, swept of expired
/// records every minute), or a fresh in-memory store.
pub async fn idempotency_store(config: &Config) -> Result<Arc<dyn Store>, StartupError> {
    if let Some(url) = &config.redis_url {
        let store = RedisStore::builder(url.as_str())
            .prefix(config.redis_prefix.as_str())
            .connect()
            .await?;
        return Ok(Arc::new(store));
    }
    if config.idempotency_store_kind == StoreKind::Memory {
        return Ok(Arc::new(MemoryStore::new()));
    }
    if config.database_url.starts_with("postgres") {
        let store = PostgresStore::builder(config.database_url.as_str())
            .sweep_every(SWEEP_EVERY)
            .connect()
            .await?;
        return Ok(Arc::new(store));
    }
    let url = config.database_url.as_str();
    if url.contains(":memory:") || url.contains("mode=memory") {
        // Each pool would open a database of its own: idem's records could not commit
        // with the payments.
        return Err(StartupError::InMemoryDatabase);
    }
    let store = SqliteStore::builder(url)
        .sweep_every(SWEEP_EVERY)
        .connect()
        .await?;
    Ok(Arc::new(store))
}

/// How often the database store deletes expired records.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// The database URL as it may be logged: scheme, host, port and database only. User
/// names, passwords and every query parameter (`password=...`, `sslpassword=...`) are
/// left out.
pub fn loggable_database_url(url: &str) -> String {
    let Ok(parsed) = url::Url::parse(url) else {
        return "(unparsable database URL)".to_owned();
    };
    let mut shown = format!("{}://", parsed.scheme());
    if let Some(host) = parsed.host_str() {
        shown.push_str(host);
    }
    if let Some(port) = parsed.port() {
        shown.push_str(&format!(":{port}"));
    }
    shown.push_str(parsed.path());
    shown
}

/// The routes over `state`, protected by `idem`, without authentication: requests must
/// carry their own identity for idem to scope their keys ([`authenticated_router`] is
/// what [`app`] serves).
pub fn router(state: AppState, idem: &Idempotency) -> Router {
    Router::new()
        .route("/orders", post(routes::create_order))
        .route("/orders/{id}", get(routes::get_order))
        .route("/payments", post(routes::create_payment))
        .route("/payments/{id}", get(routes::get_payment))
        .route("/healthz", get(routes::healthz))
        .with_state(state)
        .layer(idem.layer())
}

/// [`router`] behind API-key authentication with `keys`, as [`app`] serves it.
pub fn authenticated_router(state: AppState, idem: &Idempotency, keys: ApiKeys) -> Router {
    auth::protect(router(state, idem), keys)
}
