//! Where records live: the [`Store`] trait and its implementations.
//!
//! A store is a small, atomic key-value protocol over encoded records. The engine owns the
//! logic (what a record means, when to replay); a store only has to make each of the four
//! steps below atomic. Each step is one round trip in the stores idem ships.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;

pub mod memory;
pub mod redis;

pub use self::memory::MemoryStore;
pub use self::redis::RedisStore;

/// A boxed, sendable future: what [`Store`] methods return, so the trait stays object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The storage protocol behind idem: four atomic steps on one key.
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
    /// otherwise changes nothing and returns `false` (fencing). Atomic.
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
}

impl StoreError {
    /// Wraps any backend error.
    pub fn backend(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Backend(error.into())
    }
}
