//! The contract between the protocol and a store: the [`Store`] trait, its future type and
//! its errors. Stores implement it; nothing here knows any store.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;

/// A boxed, sendable future: what [`Store`] methods return, so the trait stays object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The storage protocol behind idem: four atomic steps on one key.
///
/// Every step must be safe to apply twice, because a client library may re-send a command
/// whose answer was lost: a `begin` that finds `claim` itself returns it (idem knows its
/// own claim), a repeated `renew` extends again, a repeated `complete` finds `record` and
/// reports success, a repeated `release` finds nothing and reports `false`.
///
/// `claim` is the encoded in-progress record of one execution; it holds a unique fencing
/// token, so "the stored value equals `claim`" means "this executor still holds the lease".
/// Keys arrive already namespaced by scope; a store may add its own prefix.
///
/// The trait is object-safe: idem holds stores as `Arc<dyn Store>`.
///
/// ```
/// use idem_runtime::store::{BoxFuture, Store, StoreError};
/// use bytes::Bytes;
/// use std::time::Duration;
///
/// /// A store that refuses everything, to show the shape of an implementation.
/// struct Down;
///
/// impl Store for Down {
///     fn begin<'a>(&'a self, _: &'a str, _: &'a Bytes, _: Duration) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
///         Box::pin(async { Err(StoreError::backend("no backend")) })
///     }
///     fn renew<'a>(&'a self, _: &'a str, _: &'a Bytes, _: Duration) -> BoxFuture<'a, Result<bool, StoreError>> {
///         Box::pin(async { Err(StoreError::backend("no backend")) })
///     }
///     fn complete<'a>(&'a self, _: &'a str, _: &'a Bytes, _: Bytes, _: Duration) -> BoxFuture<'a, Result<bool, StoreError>> {
///         Box::pin(async { Err(StoreError::backend("no backend")) })
///     }
///     fn release<'a>(&'a self, _: &'a str, _: &'a Bytes) -> BoxFuture<'a, Result<bool, StoreError>> {
///         Box::pin(async { Err(StoreError::backend("no backend")) })
///     }
/// }
///
/// let idem = idem_runtime::Idempotency::builder().store(Down).build();
/// # drop(idem);
/// ```
pub trait Store: Send + Sync + 'static {
    /// If `key` holds nothing, stores `claim` for `lease` and returns `None`; otherwise
    /// returns the stored value unchanged. Atomic.
    fn begin<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>>;

    /// If `key` still holds `claim`, extends its life to `lease` from now and returns
    /// `true`; otherwise changes nothing and returns `false`. Atomic.
    fn renew<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// If `key` still holds `claim`, replaces it with `record` for `ttl` and returns `true`;
    /// if it already holds `record` (this step applied before, its answer lost), returns
    /// `true`; otherwise changes nothing and returns `false` (fencing). Atomic. A store that
    /// cannot keep `record` answers [`StoreError::RecordRefused`] and leaves the claim.
    fn complete<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        record: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// If `key` still holds `claim`, deletes it and returns `true`; otherwise changes
    /// nothing and returns `false`. Atomic.
    fn release<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// The store as `Any`, for a front door that works with one store type only (a
    /// transaction of the store's own database). `None` by default; a wrapping store may
    /// return its inner store's.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }

    /// Whether the store answers: `Ok` when it can take steps now. What
    /// [`Idempotency::ready`](crate::Idempotency::ready) asks, for a readiness probe.
    ///
    /// The default renews a claim that no key holds, which changes nothing; a store
    /// with a cheaper or surer question answers that instead (Redis writes a short-lived
    /// probe key, which a read-only replica refuses).
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        static PROBE_CLAIM: Bytes = Bytes::from_static(b"idem readiness probe");
        Box::pin(async move {
            self.renew("__idem_ready_probe", &PROBE_CLAIM, Duration::from_millis(1))
                .await
                .map(drop)
        })
    }
}

/// A store step that failed; idem answers `503` (or runs unprotected in fail-open mode).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend failed or could not be reached.
    #[error("idempotency store failed: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The backend did not answer in time.
    #[error("idempotency store did not answer within {0:?}")]
    Timeout(Duration),
    /// The store holds as many executions in flight as it may: the request is refused with
    /// `503`, even in fail-open mode (running it unprotected could run a key twice).
    #[error("idempotency store is full: {0}")]
    Full(String),
    /// `begin` found the key changing under it on every attempt (other executions
    /// claiming and releasing it between its read and its write): the key is busy. idem
    /// answers as it does to a key in flight (`409`), never runs the work unprotected.
    #[error("the key kept changing under concurrent claims: {0}")]
    Contended(String),
    /// The key holds something that is not idem's and that the store cannot even read as
    /// a value (on Redis, another type of value under idem's key): the key is taken. idem
    /// answers `503`, even in fail-open mode (the key may have been used).
    #[error("the key holds something that is not an idempotency record: {0}")]
    Occupied(String),
    /// `complete` refused a record the store cannot keep (it would be evicted at once).
    /// The claim is left in place; idem then completes the key with a small record that
    /// says the response was not stored, so a retry never runs the handler again.
    #[error("idempotency store cannot keep a record of {size} bytes: {reason}")]
    RecordRefused {
        /// The record's size.
        size: u64,
        /// Why the store cannot keep it (its bound, its memory limit).
        reason: String,
    },
}

impl StoreError {
    /// Wraps any backend error.
    pub fn backend(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Backend(error.into())
    }
}

/// Why a store could not be set up (its server unreachable, or unfit for idem).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The Redis URL is invalid or the server could not be reached.
    #[cfg(feature = "redis")]
    #[error("cannot connect to Redis: {0}")]
    Redis(#[source] ::redis::RedisError),
    /// The server may evict idem's keys, which could run a request twice.
    #[cfg(feature = "redis")]
    #[error(
        "Redis evicts keys under maxmemory-policy `{policy}`: it could drop a claim in flight or a stored response and run a request twice; \
         set `maxmemory-policy noeviction` (or give idem an instance of its own), or accept the risk with `RedisStoreBuilder::allow_eviction(true)`"
    )]
    RedisEvicts {
        /// The server's `maxmemory-policy`.
        policy: String,
    },
    /// The server (or the user idem connects as) refused a command the protocol needs.
    #[cfg(feature = "redis")]
    #[error(
        "Redis refused idem's {step} step: {source}; idem needs SET, EVALSHA, EVAL and SCRIPT LOAD on keys under its prefix, and INFO"
    )]
    RedisRefused {
        /// The step and the command it sends.
        step: &'static str,
        /// What the server answered.
        #[source]
        source: StoreError,
    },
    /// PostgreSQL could not be reached, or refused a step of the store's setup (creating
    /// the table, or a protocol step run once on a probe key).
    #[cfg(feature = "postgres")]
    #[error("PostgreSQL failed while {step}: {source}")]
    Postgres {
        /// The setup step that failed, with the SQL it sends.
        step: &'static str,
        /// What went wrong: most often a [`sqlx::Error`] (downcast it to read a
        /// database error's code).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// SQLite could not open the database, or refused a step of the store's setup
    /// (creating the table, or a protocol step run once on a probe key).
    #[cfg(feature = "sqlite")]
    #[error("SQLite failed while {step}: {source}")]
    Sqlite {
        /// The setup step that failed, with the SQL it sends.
        step: &'static str,
        /// What went wrong: most often a [`sqlx::Error`] (downcast it to read a
        /// database error's code).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}
