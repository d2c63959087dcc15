//! The Redis (and Valkey) store.

use std::fmt;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};

use super::{BoxFuture, Store, StoreError};

/// The prefix put before every key unless another is chosen.
pub const DEFAULT_PREFIX: &str = "idem:";

// `begin` needs no script: `SET key claim NX GET PX lease` (Redis 7.0+, Valkey) creates the
// claim only where nothing is stored and returns what was there, in one atomic command.

static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then \
           return redis.call('PEXPIRE', KEYS[1], ARGV[2]) \
         end \
         return 0",
    )
});

static COMPLETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then \
           redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) \
           return 1 \
         end \
         return 0",
    )
});

static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then \
           return redis.call('DEL', KEYS[1]) \
         end \
         return 0",
    )
});

/// A store on one Redis or Valkey server (7.0 or newer).
///
/// Every step is one round trip: `begin` is a single `SET NX GET`, the others are Lua
/// scripts run by `EVALSHA` (loaded when the store connects, and again by itself after a
/// server restart). The connection is multiplexed and shared by all requests, and it
/// reconnects by itself after the server goes away.
///
/// ```no_run
/// # async fn demo() -> Result<(), idem_runtime::Error> {
/// use idem_runtime::{Idempotency, store::RedisStore};
///
/// let store = RedisStore::builder("redis://127.0.0.1:6379")
///     .prefix("payments:idem:")
///     .connect()
///     .await?;
/// let idem = Idempotency::builder().store(store).build();
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    connection: ConnectionManager,
    prefix: Arc<str>,
}

/// Sets up a [`RedisStore`].
#[derive(Debug, Clone)]
#[must_use]
pub struct RedisStoreBuilder {
    url: String,
    prefix: String,
    response_timeout: Duration,
    connection_timeout: Duration,
}

impl RedisStoreBuilder {
    /// The prefix of every key idem writes (default [`DEFAULT_PREFIX`]), so that several
    /// applications can share one server.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long one command may take before it fails (default 2 s).
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// How long connecting may take (default 2 s).
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// Connects, checks that the server answers, and loads the scripts.
    pub async fn connect(self) -> Result<RedisStore, crate::Error> {
        let client = Client::open(self.url.as_str()).map_err(crate::Error::Redis)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(self.response_timeout))
            .set_connection_timeout(Some(self.connection_timeout))
            .set_max_delay(Duration::from_secs(2));
        let mut connection = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(crate::Error::Redis)?;
        for script in [&*RENEW, &*COMPLETE, &*RELEASE] {
            script
                .prepare_invoke()
                .load_async(&mut connection)
                .await
                .map_err(crate::Error::Redis)?;
        }
        Ok(RedisStore {
            connection,
            prefix: self.prefix.into(),
        })
    }
}

impl RedisStore {
    /// Connects to `url` (`redis://[user:password@]host:port[/db]`, or `rediss://` for TLS
    /// where the `tls` feature is on) with the default settings.
    pub async fn connect(url: &str) -> Result<Self, crate::Error> {
        Self::builder(url).connect().await
    }

    /// Starts configuring a store for `url`.
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder {
            url: url.into(),
            prefix: DEFAULT_PREFIX.to_owned(),
            response_timeout: Duration::from_secs(2),
            connection_timeout: Duration::from_secs(2),
        }
    }

    /// The full Redis key of an idem key.
    pub fn redis_key(&self, key: &str) -> String {
        let mut out = String::with_capacity(self.prefix.len() + key.len());
        out.push_str(&self.prefix);
        out.push_str(key);
        out
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl Store for RedisStore {
    fn begin<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            redis::cmd("SET")
                .arg(self.redis_key(key))
                .arg(claim.as_ref())
                .arg("NX")
                .arg("GET")
                .arg("PX")
                .arg(millis(lease))
                .query_async::<Option<Bytes>>(&mut connection)
                .await
                .map_err(StoreError::backend)
        })
    }

    fn renew<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            RENEW
                .key(self.redis_key(key))
                .arg(claim.as_ref())
                .arg(millis(lease))
                .invoke_async::<bool>(&mut connection)
                .await
                .map_err(StoreError::backend)
        })
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        record: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            COMPLETE
                .key(self.redis_key(key))
                .arg(claim.as_ref())
                .arg(record.as_ref())
                .arg(millis(ttl))
                .invoke_async::<bool>(&mut connection)
                .await
                .map_err(StoreError::backend)
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            RELEASE
                .key(self.redis_key(key))
                .arg(claim.as_ref())
                .invoke_async::<bool>(&mut connection)
                .await
                .map_err(StoreError::backend)
        })
    }
}
