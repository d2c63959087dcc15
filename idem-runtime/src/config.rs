//! The [`Idempotency`] handle, its [`IdempotencyBuilder`], and every default in one place.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use http::HeaderName;
use http::request::Parts;

use crate::fingerprint::FingerprintMode;
use crate::in_flight::InFlight;
use crate::key::{LoggedKey, ScopedKey};
use crate::local::LocalTier;
use crate::metrics::Metrics;
use crate::scope::{Identity, Scope, ScopeRule};
use crate::store::{MemoryStore, Store};

/// Every default setting, each in its one home.
pub mod defaults {
    use std::time::Duration;

    /// How long a completed response is kept for replays: 24 hours.
    pub const TTL: Duration = Duration::from_secs(24 * 60 * 60);
    /// How long an execution holds its key without renewing it: 30 seconds.
    pub const LEASE: Duration = Duration::from_secs(30);
    /// Largest request body of a request with a key: 1 MiB.
    pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;
    /// Largest response body stored for replay: 1 MiB.
    pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
    /// Time allowed for one store step: 2 seconds.
    pub const STORE_TIMEOUT: Duration = Duration::from_secs(2);
    /// The `Retry-After` sent with `409` and `503`: 1 second.
    pub const RETRY_AFTER: Duration = Duration::from_secs(1);
    /// Executions that may run detached from clients that hung up: 256.
    pub const MAX_DETACHED: usize = 256;
    /// The longest any duration setting of the builder (lease, `Retry-After`, waits, the
    /// store timeout, the local tier's age) and any `once` ttl is taken to be; longer
    /// values are clamped to it. An `#[idempotent(ttl = ...)]` is taken as written, up to
    /// what Redis can count (about 292 million years); a `PostgresStore` or `SqliteStore`
    /// keeps a record at most a century.
    pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);
    /// How long a [`once`](crate::Idempotency::once) call waits for the same operation
    /// running elsewhere: 30 seconds.
    pub const ONCE_WAIT: Duration = Duration::from_secs(30);
    /// The shortest lease: shorter values are raised to it.
    pub const MIN_LEASE: Duration = Duration::from_millis(100);
}

/// A cheap-to-clone handle to idem's settings and store.
///
/// ```
/// use axum::{Router, routing::post};
/// use idem_runtime::{Idempotency, idempotent};
///
/// #[idempotent(ttl = "24h")]
/// async fn create_order(body: String) -> String {
///     format!("order for {body}")
/// }
///
/// let idem = Idempotency::in_memory();
/// let app: Router = Router::new()
///     .route("/orders", post(create_order))
///     .layer(idem.layer());
/// ```
#[derive(Clone)]
pub struct Idempotency {
    pub(crate) shared: Arc<Shared>,
}

/// What every clone of one handle shares.
pub(crate) struct Shared {
    pub(crate) store: Arc<dyn Store>,
    /// The same store, when it is a [`MemoryStore`]: its steps are then called directly,
    /// answered at once with no future boxed and no timeout armed.
    pub(crate) memory: Option<MemoryStore>,
    /// Whether the store bounds every step itself within the store timeout (a
    /// `RedisStore` on one server): its steps are then not timed a second time.
    pub(crate) store_bounds_steps: bool,
    pub(crate) settings: Settings,
    /// The local tier, when [`Settings::local_tier`] turns it on.
    pub(crate) local: Option<LocalTier>,
    /// Executions now running in tasks of their own, detached from clients that hung up.
    pub(crate) detached: Arc<AtomicUsize>,
    /// Executions holding a key in this process, detached or not.
    pub(crate) in_flight: Arc<InFlight>,
    /// Where the handle reports.
    pub(crate) metrics: Metrics,
}

/// Every setting of a handle: what the builder fills in, and what the handle reads.
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) scope: ScopeRule,
    pub(crate) lease: Duration,
    pub(crate) max_request_bytes: usize,
    pub(crate) max_response_bytes: usize,
    pub(crate) fingerprint: FingerprintMode,
    pub(crate) store_server_errors: bool,
    pub(crate) headers: HeaderPolicy,
    pub(crate) fail_open: bool,
    pub(crate) retry_after: Duration,
    pub(crate) wait_for_in_flight: Option<Duration>,
    pub(crate) store_timeout: Duration,
    /// The local tier's size in bytes and the longest it keeps a copy.
    pub(crate) local_tier: Option<(u64, Duration)>,
    pub(crate) max_detached: usize,
    pub(crate) log_keys: bool,
    /// The secret of the logged key digests; drawn at random by `build` when not set.
    pub(crate) log_key_secret: Option<Arc<[u8]>>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            scope: ScopeRule::default(),
            lease: defaults::LEASE,
            max_request_bytes: defaults::MAX_REQUEST_BYTES,
            max_response_bytes: defaults::MAX_RESPONSE_BYTES,
            fingerprint: FingerprintMode::Exact,
            store_server_errors: false,
            headers: HeaderPolicy::default(),
            fail_open: false,
            retry_after: defaults::RETRY_AFTER,
            wait_for_in_flight: None,
            store_timeout: defaults::STORE_TIMEOUT,
            local_tier: None,
            max_detached: defaults::MAX_DETACHED,
            log_keys: true,
            log_key_secret: None,
        }
    }
}

impl Settings {
    /// `Retry-After` in whole seconds, rounded up, at least 1.
    pub(crate) fn retry_after_secs(&self) -> u64 {
        whole_seconds(self.retry_after)
    }

    /// The lease in whole seconds, rounded up, at least 1: how long a key whose outcome
    /// is unknown stays held.
    pub(crate) fn lease_secs(&self) -> u64 {
        whole_seconds(self.lease)
    }

    /// The secret of the key digests logged in place of keys, under `log_keys(false)`;
    /// `None` where keys are logged as sent.
    pub(crate) fn digest_secret(&self) -> Option<Arc<[u8]>> {
        if self.log_keys {
            return None;
        }
        Some(
            self.log_key_secret
                .clone()
                .unwrap_or_else(|| Arc::from(&[][..])),
        )
    }
}

/// `duration` in whole seconds, rounded up, at least 1.
fn whole_seconds(duration: Duration) -> u64 {
    let secs = duration.as_secs();
    if duration.subsec_nanos() > 0 {
        secs.saturating_add(1)
    } else {
        secs.max(1)
    }
}

impl Idempotency {
    /// A handle on a fresh [`MemoryStore`] with default settings: the embedded default,
    /// for one instance and for tests.
    pub fn in_memory() -> Self {
        Self::builder().build()
    }

    /// A handle on one Redis or Valkey server (7.0 or newer) with default settings.
    ///
    /// `url` is `redis://[user:password@]host:port[/db]`.
    #[cfg(feature = "redis")]
    pub async fn redis(url: &str) -> Result<Self, crate::store::ConnectError> {
        Ok(Self::builder()
            .store(crate::store::RedisStore::connect(url).await?)
            .build())
    }

    /// A handle on a Redis Cluster reached through any of `urls`, with default settings.
    /// See [`RedisStore`](crate::store::RedisStore) for what failover means for a fresh
    /// claim.
    #[cfg(feature = "redis")]
    pub async fn redis_cluster<I, U>(urls: I) -> Result<Self, crate::store::ConnectError>
    where
        I: IntoIterator<Item = U>,
        U: Into<String>,
    {
        let store = crate::store::RedisStore::cluster_builder(urls)
            .connect()
            .await?;
        Ok(Self::builder().store(store).build())
    }

    /// A handle on PostgreSQL with default settings, creating the store's table where it
    /// does not exist, and sweeping its expired rows every
    /// [`PostgresStore::DEFAULT_SWEEP_EVERY`](crate::store::PostgresStore::DEFAULT_SWEEP_EVERY)
    /// in the background (batched; several instances may all sweep), so that the table
    /// does not grow without bound. See [`PostgresStore`](crate::store::PostgresStore) for
    /// the table, and its builder for another interval or no background sweep.
    ///
    /// `url` is `postgres://user[:password]@host[:port]/database`.
    #[cfg(feature = "postgres")]
    pub async fn postgres(url: &str) -> Result<Self, crate::store::ConnectError> {
        let store = crate::store::PostgresStore::builder(url)
            .sweep_every(crate::store::PostgresStore::DEFAULT_SWEEP_EVERY)
            .connect()
            .await?;
        Ok(Self::builder().store(store).build())
    }

    /// Starts configuring a handle.
    pub fn builder() -> IdempotencyBuilder {
        IdempotencyBuilder {
            store: None,
            memory: None,
            step_bound: None,
            lock_wait: None,
            store_timeout_set: false,
            settings: Settings::default(),
        }
    }

    /// The store behind this handle.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }

    /// The scope a request belongs to under this handle's scope rule; `None` where the
    /// request carries no identity and no shared scope was opted in to (idem answers such
    /// a keyed request with a `400` problem).
    pub fn scope_of(&self, parts: &Parts) -> Option<Scope> {
        self.shared.settings.scope.scope_of(parts)
    }

    /// Drops this instance's local copy of the record under `key`, if the local tier is
    /// on; a replay or completion that read or wrote the record before this call keeps no
    /// copy after it. Other instances drop theirs when it expires or reaches its maximum
    /// age.
    pub fn forget_local(&self, key: &ScopedKey) {
        if let Some(local) = &self.shared.local {
            local.forget(key.as_str());
        }
    }

    /// The configured lease.
    pub fn lease(&self) -> Duration {
        self.shared.settings.lease
    }

    pub(crate) fn settings(&self) -> &Settings {
        &self.shared.settings
    }

    /// `key` as idem's logs show it: `raw` (what the client sent), or the digest of the
    /// scoped key under [`log_keys(false)`](IdempotencyBuilder::log_keys).
    pub(crate) fn logged_key<'a>(
        &self,
        raw: &'a dyn fmt::Display,
        key: &ScopedKey,
    ) -> LoggedKey<'a> {
        if self.shared.settings.log_keys {
            LoggedKey::Raw(raw)
        } else {
            let secret = self
                .shared
                .settings
                .log_key_secret
                .as_deref()
                .unwrap_or(&[]);
            LoggedKey::Digest(key.digest(secret))
        }
    }
}

impl fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.shared.settings;
        f.debug_struct("Idempotency")
            .field("scope", &s.scope)
            .field("lease", &s.lease)
            .field("max_request_bytes", &s.max_request_bytes)
            .field("max_response_bytes", &s.max_response_bytes)
            .field("fingerprint", &s.fingerprint)
            .field("store_server_errors", &s.store_server_errors)
            .field("fail_open", &s.fail_open)
            .field("log_keys", &s.log_keys)
            .finish_non_exhaustive()
    }
}

/// Configures an [`Idempotency`] handle; every setting has a default in [`defaults`].
#[must_use]
pub struct IdempotencyBuilder {
    store: Option<Arc<dyn Store>>,
    memory: Option<MemoryStore>,
    /// How long the store lets one step take, where it bounds its steps itself.
    step_bound: Option<Duration>,
    /// How long a step of the store may wait for a lock, which the store timeout must
    /// outlast unless one is set: a `SqliteStore`'s busy timeout.
    lock_wait: Option<Duration>,
    /// Whether [`store_timeout`](Self::store_timeout) was called.
    store_timeout_set: bool,
    settings: Settings,
}

impl IdempotencyBuilder {
    /// The store (default: a [`MemoryStore`] with its default bounds).
    pub fn store(mut self, store: impl Store) -> Self {
        let store_any = &store as &dyn std::any::Any;
        self.memory = store_any.downcast_ref::<MemoryStore>().cloned();
        self.step_bound = None;
        #[cfg(feature = "redis")]
        {
            self.step_bound = store_any
                .downcast_ref::<crate::store::RedisStore>()
                .and_then(crate::store::RedisStore::step_timeout);
        }
        self.lock_wait = lock_wait_of(&store);
        self.store = Some(Arc::new(store));
        self
    }

    /// A store already behind an `Arc`, to share it between handles.
    pub fn shared_store(mut self, store: Arc<dyn Store>) -> Self {
        self.memory = None;
        self.step_bound = None;
        self.lock_wait = lock_wait_of(&*store);
        self.store = Some(store);
        self
    }

    /// Scopes keys by a value derived from the request (tenant, API key, user id) instead
    /// of the default (a [`Principal`](crate::Principal) in the request's extensions,
    /// else a digest of the `Authorization` header). `None` means the request has no
    /// identity: a keyed request is then answered `400`, unless
    /// [`shared_scope`](Self::shared_scope) is on. Only a digest of the value is kept.
    ///
    /// ```
    /// use idem_runtime::Idempotency;
    ///
    /// let idem = Idempotency::builder()
    ///     .scope(|parts| parts.headers.get("x-tenant-id").map(|v| v.as_bytes().to_vec()))
    ///     .build();
    /// # drop(idem);
    /// ```
    pub fn scope<F, T>(mut self, rule: F) -> Self
    where
        F: Fn(&Parts) -> Option<T> + Send + Sync + 'static,
        T: AsRef<[u8]>,
    {
        self.settings.scope.identity =
            Identity::Custom(Arc::new(move |parts| rule(parts).map(Scope::of)));
        self
    }

    /// Puts every keyed request that carries no identity into one shared scope instead of
    /// refusing it (default `false`). Only for a single-tenant or internal service where
    /// every caller may see every other caller's responses: two clients sending the same
    /// key and request then get one response.
    pub fn shared_scope(mut self, shared: bool) -> Self {
        self.settings.scope.shared = shared;
        self
    }

    /// Whether the host a request was sent to (`Host`, or the URI's authority) is part of
    /// its scope (default `true`): with the same credentials and key, requests to two
    /// hosts (two tenants of one deployment) never share a response. Turn it off where one
    /// client reaches one service under several host names and may retry through another.
    pub fn scope_by_host(mut self, by_host: bool) -> Self {
        self.settings.scope.by_host = by_host;
        self
    }

    /// How many executions may run detached from clients that hung up (default
    /// [`MAX_DETACHED`](defaults::MAX_DETACHED)). A handler whose client disconnects is never cancelled:
    /// it runs to the end in a task of its own, outside the app's own concurrency limits.
    /// While this many are running, new keyed requests are refused with `503` and
    /// `Retry-After`, so clients that hang up cannot pile up unbounded work. (A request
    /// admitted just before the bound was reached may still detach: the bound is exceeded
    /// by at most the requests in flight at that moment.) At least 1: a `0` is taken as 1.
    pub fn max_detached(mut self, max: usize) -> Self {
        self.settings.max_detached = max.max(1);
        self
    }

    /// How long an execution holds its key between renewals (default 30 s, at least
    /// 100 ms, at most [`MAX_DURATION`](defaults::MAX_DURATION)). The lease is renewed every third of it from the
    /// claim until the response is stored (at most a twelfth of it late), so a slow handler
    /// never loses its key; after a crash the key is free again within one lease. The
    /// renewals run in one task per handle and tokio runtime, on the runtime that runs the
    /// work, and only while that runtime has work holding a key.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.settings.lease = lease.clamp(defaults::MIN_LEASE, defaults::MAX_DURATION);
        self
    }

    /// Largest request body accepted on a request with a key (default 1 MiB); larger
    /// ones get `413` and nothing runs.
    pub fn max_request_bytes(mut self, limit: usize) -> Self {
        self.settings.max_request_bytes = limit;
        self
    }

    /// Largest response body stored for replay (default 1 MiB). A larger response is
    /// still sent to the client, and the key remembers that the request ran: a retry
    /// gets a `409` problem saying the response was not stored, never a second execution.
    pub fn max_response_bytes(mut self, limit: usize) -> Self {
        self.settings.max_response_bytes = limit;
        self
    }

    /// Which parts of the body count towards the request fingerprint (default: every byte).
    pub fn fingerprint(mut self, mode: FingerprintMode) -> Self {
        self.settings.fingerprint = mode;
        self
    }

    /// Whether `5xx` responses are stored and replayed like others (default `false`: a
    /// `5xx` or a panic releases the key so that a retry runs again).
    pub fn store_server_errors(mut self, store: bool) -> Self {
        self.settings.store_server_errors = store;
        self
    }

    /// Which response headers are stored and replayed (default: all but hop-by-hop
    /// headers, `Date` and `Set-Cookie`).
    pub fn replay_headers(mut self, policy: HeaderPolicy) -> Self {
        self.settings.headers = policy;
        self
    }

    /// When the store fails: `false` (the default) answers `503` and runs nothing; `true`
    /// runs the handler unprotected and logs a warning. Either way a key the store answers
    /// for with a record this build cannot read (a newer version's) answers `503`: the key
    /// was used, and running it could run it twice.
    pub fn fail_open(mut self, fail_open: bool) -> Self {
        self.settings.fail_open = fail_open;
        self
    }

    /// The `Retry-After` sent with `409` and `503` (default 1 s, rounded up to seconds).
    /// Clamped to [`MAX_DURATION`](defaults::MAX_DURATION).
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.settings.retry_after = after.min(defaults::MAX_DURATION);
        self
    }

    /// Instead of answering `409` at once, waits up to `max` for a request in flight with
    /// the same key to finish, and replays its response (default: off). Clamped to
    /// [`MAX_DURATION`](defaults::MAX_DURATION).
    pub fn wait_for_in_flight(mut self, max: Duration) -> Self {
        self.settings.wait_for_in_flight = Some(max.min(defaults::MAX_DURATION));
        self
    }

    /// Time allowed for one store step before it counts as a failure (default 2 s,
    /// clamped to [`MAX_DURATION`](defaults::MAX_DURATION)). On a `SqliteStore` the
    /// default is its busy timeout and one second more, so that a step waits for the
    /// write lock (a `SqliteTransaction` holds it until its commit) as long as SQLite
    /// lets it, rather than being refused with `503` first. A [`MemoryStore`]'s steps
    /// answer at once and are not timed out. A `RedisStore` on one server bounds each step
    /// by its own response timeout; where that is no longer than this one, idem arms no
    /// second timer for the step.
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.settings.store_timeout = timeout.min(defaults::MAX_DURATION);
        self.store_timeout_set = true;
        self
    }

    /// Turns on the local tier: completed records this process reads from the shared
    /// store are also kept in it (at most `max_bytes`), so that later replays are
    /// answered without a store round trip. Claims and completions still go to the shared
    /// store, so the protocol stays correct across instances.
    ///
    /// A first execution leaves no copy: most keys are never replayed, and copies of
    /// them would only churn the process's heap (on glibc's malloc, a full tier of them
    /// slowed every route of a benchmarked process by a fifth). An instance's first replay
    /// of a key reads the store once, its later replays do not.
    ///
    /// A completed record never changes until it expires, and each local copy is dropped
    /// when the record expires (the record carries its expiry time) or after `max_age`,
    /// whichever is sooner. Clocks of instances should agree to well within `max_age`.
    /// A record deleted by hand from the shared store is still replayed by instances that
    /// hold a copy, for at most `max_age`; [`Idempotency::forget_local`] drops the copy at
    /// once on one instance.
    pub fn local_tier(mut self, max_bytes: u64, max_age: Duration) -> Self {
        self.settings.local_tier = Some((max_bytes, max_age.min(defaults::MAX_DURATION)));
        self
    }

    /// Whether idem's logs and spans show idempotency keys as clients sent them (default
    /// `true`: the per-request span carries `key`). With `false` they show `key-digest:`
    /// and a keyed digest of the scoped key instead ([`ScopedKey::digest`] under
    /// [`log_key_secret`](Self::log_key_secret)): enough to follow one key through the
    /// logs, without the logs holding what clients sent (a key may carry an order number
    /// or an e-mail address), nor letting their reader get a key back by hashing guesses.
    /// idem never logs `Authorization` or other credentials either way.
    ///
    /// ```
    /// let idem = idem_runtime::Idempotency::builder().log_keys(false).build();
    /// # drop(idem);
    /// ```
    pub fn log_keys(mut self, log_keys: bool) -> Self {
        self.settings.log_keys = log_keys;
        self
    }

    /// The secret of the key digests logged under [`log_keys(false)`](Self::log_keys).
    /// Give every instance the same one (from your secret store) to follow a key across
    /// instances and restarts, and to find a key's digest with [`ScopedKey::digest`].
    /// Default: 32 random bytes drawn when the handle is built, so digests match within
    /// one handle only.
    ///
    /// ```
    /// let idem = idem_runtime::Idempotency::builder()
    ///     .log_keys(false)
    ///     .log_key_secret(b"from the secret store")
    ///     .build();
    /// # drop(idem);
    /// ```
    pub fn log_key_secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        self.settings.log_key_secret = Some(Arc::from(secret.as_ref()));
        self
    }

    /// Builds the handle.
    pub fn build(self) -> Idempotency {
        let metrics = Metrics::default();
        let mut settings = self.settings;
        if let Some(wait) = self.lock_wait.filter(|_| !self.store_timeout_set) {
            // A step waiting for the lock as long as the store lets it, and then some.
            let outlasting = wait
                .saturating_add(Duration::from_secs(1))
                .min(defaults::MAX_DURATION);
            settings.store_timeout = settings.store_timeout.max(outlasting);
        }
        if settings.log_key_secret.is_none() {
            settings.log_key_secret = Some(random_secret());
        }
        let local = settings
            .local_tier
            .map(|(max_bytes, max_age)| LocalTier::new(max_bytes, max_age));
        let (store, memory) = match self.store {
            Some(store) => (store, self.memory),
            None => {
                let memory = MemoryStore::new();
                (Arc::new(memory.clone()) as Arc<dyn Store>, Some(memory))
            }
        };
        let store_bounds_steps = self
            .step_bound
            .is_some_and(|bound| bound <= settings.store_timeout);
        Idempotency {
            shared: Arc::new(Shared {
                store,
                memory,
                store_bounds_steps,
                settings,
                local,
                detached: Arc::new(AtomicUsize::new(0)),
                in_flight: Arc::new(InFlight::new(metrics.clone())),
                metrics,
            }),
        }
    }
}

/// 32 random bytes; where the system has no randomness to give, the clock and the
/// process id, still unknown to whoever reads only the logs.
fn random_secret() -> Arc<[u8]> {
    let mut secret = [0u8; 32];
    if getrandom::fill(&mut secret).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        secret[..16].copy_from_slice(&nanos.to_be_bytes());
        secret[16..20].copy_from_slice(&std::process::id().to_be_bytes());
    }
    Arc::from(secret.as_slice())
}

/// Which response headers are stored and replayed.
///
/// The default leaves out hop-by-hop headers (`Connection`, `Keep-Alive`,
/// `Proxy-Authenticate`, `Proxy-Authorization`, `TE`, `Trailer`, `Transfer-Encoding`,
/// `Upgrade`, and any header the response's `Connection` names), `Date` and `Set-Cookie`.
///
/// `Transfer-Encoding` is never stored, whatever the policy: idem reads a protected
/// response's body whole and replays it with its length, which a `Transfer-Encoding`
/// would contradict. A response with a transfer coding other than `chunked` (`gzip`) is
/// sent as the handler framed it and not stored (a retry is told so, `409`, and does not
/// run again): compress with `Content-Encoding`, which is stored like any other header.
/// A `Content-Length` shorter than the body cuts it there, first and on replays, as the
/// server cuts a stream. A response whose body ends in trailer fields (gRPC's
/// `grpc-status`, a checksum) is sent with them as the handler sent it, and not stored:
/// a record holds no trailers, so a retry is told so (`409`) and does not run again.
///
/// ```
/// use idem_runtime::HeaderPolicy;
///
/// let policy = HeaderPolicy::default().exclude("x-request-id").include("set-cookie");
/// assert!(!policy.keeps(&"x-request-id".parse().unwrap()));
/// assert!(policy.keeps(&"set-cookie".parse().unwrap()));
/// ```
#[derive(Debug, Clone)]
pub struct HeaderPolicy {
    excluded: Vec<HeaderName>,
}

impl Default for HeaderPolicy {
    fn default() -> Self {
        use http::header;
        Self {
            excluded: vec![
                header::CONNECTION,
                HeaderName::from_static("keep-alive"),
                header::PROXY_AUTHENTICATE,
                header::PROXY_AUTHORIZATION,
                header::TE,
                header::TRAILER,
                header::TRANSFER_ENCODING,
                header::UPGRADE,
                HeaderName::from_static("proxy-connection"),
                header::DATE,
                header::SET_COOKIE,
            ],
        }
    }
}

impl HeaderPolicy {
    /// A policy that stores every header (but `Transfer-Encoding`, see above).
    pub fn all() -> Self {
        Self {
            excluded: Vec::new(),
        }
    }

    /// Leaves `name` out of stored responses (an invalid header name is ignored).
    pub fn exclude(mut self, name: &str) -> Self {
        if let Ok(name) = HeaderName::from_bytes(name.as_bytes())
            && !self.excluded.contains(&name)
        {
            self.excluded.push(name);
        }
        self
    }

    /// Stores `name` even if the default leaves it out.
    pub fn include(mut self, name: &str) -> Self {
        if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
            self.excluded.retain(|excluded| *excluded != name);
        }
        self
    }

    /// Whether a header of this name is stored.
    pub fn keeps(&self, name: &HeaderName) -> bool {
        !self.excluded.contains(name)
    }
}

/// How long a step of `store` may wait for a lock: a `SqliteStore`'s busy timeout.
fn lock_wait_of(store: &dyn Store) -> Option<Duration> {
    #[cfg(feature = "sqlite")]
    {
        store
            .as_any()?
            .downcast_ref::<crate::store::SqliteStore>()
            .map(crate::store::SqliteStore::busy_timeout)
    }
    #[cfg(not(feature = "sqlite"))]
    {
        let _ = store;
        None
    }
}
