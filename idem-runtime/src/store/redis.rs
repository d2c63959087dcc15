//! The Redis (and Valkey) store.

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::Either;
use pin_project_lite::pin_project;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Client, Script};
use tokio::time::Sleep;

use super::contract::{BoxFuture, ConnectError, Store, StoreError};

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

// A completion applied twice (re-sent after a lost answer) finds its own record: success.
static COMPLETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local current = redis.call('GET', KEYS[1]) \
         if current == ARGV[1] then \
           redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) \
           return 1 \
         end \
         if current == ARGV[2] then \
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

/// A store on Redis or Valkey (7.0 or newer): one server, or a Redis Cluster.
///
/// Every step is one round trip: `begin` is a single `SET NX GET`, the others are Lua
/// scripts run by `EVALSHA` (loaded when the store connects, and again by itself after a
/// server restart). The connection is multiplexed and shared by all requests, and it
/// reconnects by itself after the server goes away.
///
/// On a cluster, one record is one key, so no step ever spans two hash slots; the cluster
/// client routes each step to the master that owns its key and follows resharding.
///
/// # Consistency under failover
///
/// Redis replicates asynchronously. If a master fails after acknowledging a fresh claim
/// but before a replica received it, the promoted replica does not know the key, and a
/// retry arriving in that window runs the handler a second time. idem cannot close this
/// window on its own (neither can any Redis-based lock). For effects in a database that
/// must never repeat, keep idem's records in that database and write in its transaction
/// (`PostgresStore` with `PgTransaction`, `SqliteStore` with `SqliteTransaction`), or keep
/// a business rule there that refuses the repeat (the example payments app's UNIQUE
/// constraint on `payments.order_id`). `WAIT`-based replication would narrow the window
/// at the cost of a round trip per request.
///
/// # A connection gone silent
///
/// A step on a connection that stops answering fails with [`StoreError::Timeout`], and
/// the connection stays in use: idem does not open another beside it, because a step
/// still queued on the old one could land after later steps sent on the new one (a claim
/// after its release, a completion after the renewal that followed it). The client
/// reconnects when the connection fails; one whose peer stopped acknowledging is failed by
/// the operating system's TCP retransmission limits. A peer that acknowledges and never
/// answers (a stopped process, a proxy that lost its backend) holds every keyed request
/// at `503` until it answers again or the connection closes.
///
/// # Eviction
///
/// A Redis that evicts keys under memory pressure can drop a claim while its handler runs
/// or a stored response before its TTL, and then run a request twice. Run idem on a
/// server with `maxmemory-policy noeviction` (the Redis default), or on an instance of its
/// own. [`connect`](RedisStoreBuilder::connect) reads the policy and refuses any other,
/// unless [`allow_eviction`](RedisStoreBuilder::allow_eviction) accepts the risk.
///
/// # Permissions
///
/// idem needs `SET`, `EVALSHA`, `EVAL` and `SCRIPT LOAD` on keys under its prefix, and
/// `INFO` to read the eviction policy. `connect` runs every protocol step once on a probe
/// key under the prefix and fails with the refused command named, rather than letting
/// every completion fail later.
///
/// ```no_run
/// # async fn demo() -> Result<(), idem_runtime::ConnectError> {
/// use idem_runtime::{Idempotency, store::RedisStore};
///
/// let store = RedisStore::builder("redis://127.0.0.1:6379")
///     .prefix("payments:idem:")
///     .connect()
///     .await?;
/// let idem = Idempotency::builder().store(store).build();
///
/// let cluster = RedisStore::cluster_builder(["redis://10.0.0.1:7000", "redis://10.0.0.2:7000"])
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    connection: Connection,
    prefix: Arc<str>,
    /// The longest value the server accepts (`proto-max-bulk-len`), read at connect and
    /// again when a long record's completion fails (an operator may lower it meanwhile).
    max_bulk: Arc<AtomicU64>,
    /// What bounds a whole step on one server, where the connection arms no timer per
    /// command; `None` on a cluster, whose client times each command.
    step_timeout: Option<Duration>,
}

/// The smallest `proto-max-bulk-len` Redis takes (1 MiB): a shorter record fits any server.
const SMALLEST_MAX_BULK: u64 = 1 << 20;

/// Redis' default `proto-max-bulk-len`, assumed where the server does not say.
const DEFAULT_MAX_BULK: u64 = 512 * 1024 * 1024;

#[derive(Clone)]
enum Connection {
    Server(ConnectionManager),
    Cluster(ClusterConnection),
}

/// Connects to one server: one attempt first, within `connection_timeout`, so that an
/// error no retry mends (a wrong password, a refused TLS handshake) is reported as it is,
/// then the connection idem keeps, within `connection_timeout` again, the client's own
/// retries included.
///
/// The connection is never replaced by idem, only by the client after an error: a step
/// sent on it may still land after its timeout, and idem's late releases of a claim, and
/// its reading of a completion that timed out, rely on every later step landing after it.
/// A connection whose peer goes silent without an error stays in use until TCP gives it
/// up (see [`RedisStore`]).
async fn connect_server(
    client: Client,
    config: ConnectionManagerConfig,
    connection_timeout: Duration,
) -> redis::RedisResult<ConnectionManager> {
    let attempt = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(connection_timeout))
        .set_response_timeout(Some(connection_timeout));
    drop(
        client
            .get_multiplexed_async_connection_with_config(&attempt)
            .await?,
    );
    tokio::time::timeout(
        connection_timeout,
        ConnectionManager::new_with_config(client, config),
    )
    .await
    .unwrap_or_else(|elapsed| Err(std::io::Error::from(elapsed).into()))
}

/// Sets up a [`RedisStore`].
#[derive(Debug, Clone)]
#[must_use]
pub struct RedisStoreBuilder {
    nodes: Nodes,
    prefix: String,
    response_timeout: Duration,
    connection_timeout: Duration,
    allow_eviction: bool,
    #[cfg(feature = "tls")]
    root_certificate: Option<Vec<u8>>,
}

#[derive(Debug, Clone)]
enum Nodes {
    Server(String),
    Cluster(Vec<String>),
}

impl RedisStoreBuilder {
    /// The prefix of every key idem writes (default [`RedisStore::DEFAULT_PREFIX`]), so that several
    /// applications can share one server.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long one step may take before it fails with [`StoreError::Timeout`] (default
    /// 2 s): on one server, the whole step, its resend on a new connection after a dropped
    /// one and a script reload included; on a cluster, each command the step sends.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// How long connecting may take (default 2 s).
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// Accepts a server whose `maxmemory-policy` may evict idem's keys (default `false`:
    /// [`connect`](Self::connect) refuses it). An evicted claim or record lets a request
    /// run twice; accept this only where a second guard (a UNIQUE constraint) catches it.
    /// A warning is logged at connect.
    pub fn allow_eviction(mut self, allow: bool) -> Self {
        self.allow_eviction = allow;
        self
    }

    /// Trusts this root certificate (PEM) for `rediss://` connections instead of the
    /// Web PKI roots: for servers with certificates of a private CA.
    #[cfg(feature = "tls")]
    pub fn root_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.root_certificate = Some(pem.into());
        self
    }

    #[cfg(feature = "tls")]
    fn certificates(&self) -> Option<redis::TlsCertificates> {
        // rustls needs a process-wide crypto provider; installing it twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        self.root_certificate
            .as_ref()
            .map(|root| redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root.clone()),
            })
    }

    #[cfg(feature = "tls")]
    fn client(&self, url: &str) -> redis::RedisResult<Client> {
        match self.certificates() {
            Some(certificates) => Client::build_with_tls(url, certificates),
            None => Client::open(url),
        }
    }

    #[cfg(not(feature = "tls"))]
    fn client(&self, url: &str) -> redis::RedisResult<Client> {
        Client::open(url)
    }

    /// Connects, checks that the server keeps idem's keys (its eviction policy), loads
    /// the scripts and runs every protocol step once on a probe key, so that a server or
    /// user that refuses one fails here, with the command named.
    pub async fn connect(self) -> Result<RedisStore, ConnectError> {
        let mut connection = match &self.nodes {
            Nodes::Server(url) => {
                let client = self.client(url).map_err(ConnectError::Redis)?;
                // No timer per command: the store bounds each step as a whole.
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(None)
                    .set_connection_timeout(Some(self.connection_timeout))
                    .set_max_delay(Duration::from_secs(2));
                Connection::Server(
                    connect_server(client, config, self.connection_timeout)
                        .await
                        .map_err(ConnectError::Redis)?,
                )
            }
            Nodes::Cluster(urls) => {
                #[allow(unused_mut)]
                let mut builder = ClusterClient::builder(urls.iter().map(String::as_str))
                    .connection_timeout(self.connection_timeout)
                    .response_timeout(self.response_timeout);
                #[cfg(feature = "tls")]
                if let Some(certificates) = self.certificates() {
                    builder = builder.certs(certificates);
                }
                let client = builder.build().map_err(ConnectError::Redis)?;
                Connection::Cluster(
                    client
                        .get_async_connection()
                        .await
                        .map_err(ConnectError::Redis)?,
                )
            }
        };
        let step_timeout = match connection {
            Connection::Server(_) => Some(self.response_timeout),
            Connection::Cluster(_) => None,
        };
        for script in [&*RENEW, &*COMPLETE, &*RELEASE] {
            let load = script.prepare_invoke();
            let loading = async {
                match &mut connection {
                    Connection::Server(c) => load.load_async(c).await,
                    Connection::Cluster(c) => load.load_async(c).await,
                }
            };
            let loaded = match step_timeout {
                Some(limit) => tokio::time::timeout(limit, loading)
                    .await
                    .unwrap_or_else(|elapsed| Err(std::io::Error::from(elapsed).into())),
                None => loading.await,
            };
            loaded.map_err(ConnectError::Redis)?;
        }
        let store = RedisStore {
            connection,
            prefix: self.prefix.into(),
            max_bulk: Arc::new(AtomicU64::new(DEFAULT_MAX_BULK)),
            step_timeout,
        };
        let limit = store.read_max_bulk().await.unwrap_or(DEFAULT_MAX_BULK);
        store.max_bulk.store(limit, Ordering::Relaxed);
        store.check_eviction(self.allow_eviction).await?;
        store.probe().await?;
        Ok(store)
    }
}

impl RedisStore {
    /// The prefix put before every key unless another is chosen.
    pub const DEFAULT_PREFIX: &str = "idem:";

    /// Connects to one server at `url` with the default settings:
    /// `redis://[user:password@]host:port[/db]`, or `rediss://...` for TLS with the `tls`
    /// feature of this crate. A password in the URL authenticates (`AUTH`); a server that
    /// requires one refuses a URL without it with an error that says so.
    pub async fn connect(url: &str) -> Result<Self, ConnectError> {
        Self::builder(url).connect().await
    }

    /// Starts configuring a store on one server at `url`.
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        Self::builder_for(Nodes::Server(url.into()))
    }

    /// Starts configuring a store on a Redis Cluster reached through any of `urls`.
    pub fn cluster_builder<I, U>(urls: I) -> RedisStoreBuilder
    where
        I: IntoIterator<Item = U>,
        U: Into<String>,
    {
        Self::builder_for(Nodes::Cluster(urls.into_iter().map(Into::into).collect()))
    }

    fn builder_for(nodes: Nodes) -> RedisStoreBuilder {
        RedisStoreBuilder {
            nodes,
            prefix: RedisStore::DEFAULT_PREFIX.to_owned(),
            response_timeout: Duration::from_secs(2),
            connection_timeout: Duration::from_secs(2),
            allow_eviction: false,
            #[cfg(feature = "tls")]
            root_certificate: None,
        }
    }

    /// An idem key under the prefix, to write into a command.
    fn store_key<'a>(&'a self, key: &'a str) -> StoreKey<'a> {
        StoreKey {
            prefix: &self.prefix,
            key,
        }
    }

    /// The full Redis key of an idem key.
    pub fn redis_key(&self, key: &str) -> String {
        let mut out = String::with_capacity(self.prefix.len() + key.len());
        out.push_str(&self.prefix);
        out.push_str(key);
        out
    }

    /// Whether this store talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.connection, Connection::Cluster(_))
    }

    /// Refuses a server (every node of a cluster) whose eviction policy can drop keys.
    async fn check_eviction(&self, allow: bool) -> Result<(), ConnectError> {
        let info: Result<redis::Value, StoreError> = self
            .bounded(self.run(Command::Plain(redis::cmd("INFO").arg("memory").to_owned())))
            .await;
        let mut policies = Vec::new();
        match info {
            Ok(value) => collect_policies(&value, &mut policies),
            Err(error) if allow => {
                tracing::warn!(target: "idem", %error, "could not read Redis' eviction policy (INFO); accepted by allow_eviction");
                return Ok(());
            }
            Err(error) => {
                return Err(ConnectError::RedisRefused {
                    step: "INFO memory (reading maxmemory-policy)",
                    source: error,
                });
            }
        }
        let Some(policy) = policies.into_iter().find(|policy| policy != "noeviction") else {
            return Ok(());
        };
        if allow {
            tracing::warn!(target: "idem", policy, "Redis may evict idem's keys; a request may run twice (accepted by allow_eviction)");
            Ok(())
        } else {
            Err(ConnectError::RedisEvicts { policy })
        }
    }

    /// The server's `proto-max-bulk-len` (the smallest over a cluster's nodes); `None`
    /// where `CONFIG GET` is not allowed or fails.
    async fn read_max_bulk(&self) -> Option<u64> {
        let answer: Result<redis::Value, StoreError> = self
            .bounded(
                self.run(Command::Plain(
                    redis::cmd("CONFIG")
                        .arg("GET")
                        .arg("proto-max-bulk-len")
                        .to_owned(),
                )),
            )
            .await;
        let mut numbers = Vec::new();
        if let Ok(value) = answer {
            collect_numbers(&value, &mut numbers);
        }
        numbers.into_iter().min()
    }

    /// Reads the server's `proto-max-bulk-len` again, keeps it, and refuses `record` if
    /// it is over it; where the limit cannot be read, over `known`. `None` where the
    /// record fits, or no limit is known.
    async fn over_the_limit_now(&self, record: &Bytes, known: Option<u64>) -> Option<StoreError> {
        let limit = match self.read_max_bulk().await {
            Some(limit) => {
                self.max_bulk.store(limit, Ordering::Relaxed);
                limit
            }
            None => known?,
        };
        (record.len() as u64 > limit).then(|| StoreError::RecordRefused {
            size: record.len() as u64,
            reason: format!("over the server's proto-max-bulk-len of {limit} bytes"),
        })
    }

    /// Runs begin, renew, release and complete once on a probe key, and leaves nothing.
    async fn probe(&self) -> Result<(), ConnectError> {
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(|error| ConnectError::RedisRefused {
            step: "probe",
            source: StoreError::backend(error.to_string()),
        })?;
        let key = format!("__probe:{:016x}", u64::from_le_bytes(nonce));
        let claim = Bytes::from_static(b"idem probe claim");
        let record = Bytes::from_static(b"idem probe record");
        let lease = Duration::from_secs(10);
        let refused = |step| move |source| ConnectError::RedisRefused { step, source };
        self.begin(&key, &claim, lease)
            .await
            .map_err(refused("begin (SET NX GET PX)"))?;
        self.renew(&key, &claim, lease)
            .await
            .map_err(refused("renew (EVALSHA)"))?;
        self.release(&key, &claim)
            .await
            .map_err(refused("release (EVALSHA)"))?;
        self.begin(&key, &claim, lease)
            .await
            .map_err(refused("begin (SET NX GET PX)"))?;
        self.complete(&key, &claim, record.clone(), lease)
            .await
            .map_err(refused("complete (EVALSHA)"))?;
        // The probe record goes the way a claim does: released when it holds this value.
        self.release(&key, &record)
            .await
            .map_err(refused("release (EVALSHA)"))?;
        Ok(())
    }

    /// What bounds each step of this store, where it bounds them itself (one server): the
    /// protocol then arms no second timer for the same step.
    pub(crate) fn step_timeout(&self) -> Option<Duration> {
        self.step_timeout
    }

    /// `step`, failed with [`StoreError::Timeout`] when it outlives the response timeout
    /// (on one server; a cluster's client times each command itself).
    fn bounded<T>(
        &self,
        step: impl Future<Output = Result<T, StoreError>>,
    ) -> impl Future<Output = Result<T, StoreError>> {
        match self.step_timeout {
            None => Either::Left(step),
            Some(limit) => Either::Right(Bounded {
                step,
                limit,
                timer: None,
            }),
        }
    }

    /// What a `begin` the server refused to write finds under `key`: the record there, or,
    /// for a key that holds nothing, [`StoreError::Full`] at the server's `maxmemory`
    /// (`OOM`) and a backend error otherwise (a read-only replica, a failed save).
    async fn read_refused_claim(
        &self,
        key: StoreKey<'_>,
        refusal: redis::RedisError,
    ) -> Result<Option<Bytes>, StoreError> {
        let found: Option<Bytes> = self
            .run_raw(Command::Plain(redis::cmd("GET").arg(key).to_owned()))
            .await
            .map_err(begin_error)?;
        match found {
            Some(found) => Ok(Some(found)),
            None if refusal.code() == Some("OOM") => Err(StoreError::Full(format!(
                "Redis is at its maxmemory and cannot take a new claim: {refusal}"
            ))),
            None => Err(StoreError::backend(refusal)),
        }
    }

    async fn run<T: redis::FromRedisValue>(&self, command: Command) -> Result<T, StoreError> {
        self.run_raw(command).await.map_err(StoreError::backend)
    }

    /// Sends `command`; a command that failed because the connection was found dead (the
    /// server restarted, a proxy cut it) is sent once more, on the connection the client
    /// opened in its place, so that a restart costs no request.
    ///
    /// Safe for every step, even where the first send reached the server and only its
    /// answer was lost, because each step may be applied twice ([`Store`]): a `begin`
    /// applied already finds its own claim, which the protocol takes as the claim made; a
    /// `complete` finds its own record and reports success; a `renew` extends again; a
    /// `release` finds nothing. A timeout is not retried: the answer may still come, and
    /// the step's time is spent.
    async fn run_raw<T: redis::FromRedisValue>(&self, command: Command) -> redis::RedisResult<T> {
        match self.send(&command).await {
            Err(error) if error.is_connection_dropped() => {
                tracing::debug!(target: "idem", %error, "the Redis connection was dead; sending the command again on a new one");
                self.send(&command).await
            }
            result => result,
        }
    }

    async fn send<T: redis::FromRedisValue>(&self, command: &Command) -> redis::RedisResult<T> {
        match &self.connection {
            Connection::Server(c) => command.run(&mut c.clone()).await,
            Connection::Cluster(c) => command.run(&mut c.clone()).await,
        }
    }
}

/// One protocol step, ready to send on either kind of connection.
enum Command {
    Plain(redis::Cmd),
    /// An `EVALSHA` of `script`, which loads the script where the server lacks it (after a
    /// restart) and sends the command again.
    Script {
        script: &'static Script,
        command: redis::Cmd,
    },
}

impl Command {
    /// `EVALSHA` of `script` on `key` with `args`, its arguments written once, into a
    /// command sized for them.
    fn script(script: &'static Script, key: StoreKey<'_>, args: &[ScriptArg<'_>]) -> Self {
        let data = 7
            + script.get_hash().len()
            + 1
            + key.len()
            + args.iter().map(ScriptArg::len).sum::<usize>();
        let mut command = redis::Cmd::with_capacity(4 + args.len(), data);
        command
            .arg("EVALSHA")
            .arg(script.get_hash())
            .arg(1)
            .arg(key);
        for arg in args {
            match arg {
                ScriptArg::Bytes(bytes) => command.arg(*bytes),
                ScriptArg::Millis(millis) => command.arg(*millis),
            };
        }
        Self::Script { script, command }
    }

    async fn run<C, T>(&self, connection: &mut C) -> redis::RedisResult<T>
    where
        C: redis::aio::ConnectionLike + Send,
        T: redis::FromRedisValue,
    {
        match self {
            Self::Plain(command) => command.query_async(connection).await,
            Self::Script { script, command } => match command.query_async(connection).await {
                Err(error)
                    if error.kind()
                        == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    script.load_async(connection).await?;
                    command.query_async(connection).await
                }
                answer => answer,
            },
        }
    }
}

/// An argument of a script step.
enum ScriptArg<'a> {
    Bytes(&'a [u8]),
    Millis(u64),
}

impl ScriptArg<'_> {
    /// At most the bytes the argument takes in the command.
    fn len(&self) -> usize {
        match self {
            Self::Bytes(bytes) => bytes.len(),
            Self::Millis(_) => 20,
        }
    }
}

/// An idem key under the store's prefix, written into a command as one argument with no
/// string made for it.
#[derive(Clone, Copy)]
struct StoreKey<'a> {
    prefix: &'a str,
    key: &'a str,
}

impl StoreKey<'_> {
    fn len(&self) -> usize {
        self.prefix.len() + self.key.len()
    }
}

impl redis::ToRedisArgs for StoreKey<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        use std::io::Write;
        let mut arg = out.writer_for_next_arg();
        // Writes into a command's buffer, which never fails.
        let _ = arg.write_all(self.prefix.as_bytes());
        let _ = arg.write_all(self.key.as_bytes());
    }
}

impl redis::ToSingleRedisArg for StoreKey<'_> {}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("cluster", &self.is_cluster())
            .finish_non_exhaustive()
    }
}

/// Every `maxmemory_policy:` value in an `INFO` answer (one per node of a cluster).
fn collect_policies(value: &redis::Value, out: &mut Vec<String>) {
    match value {
        redis::Value::BulkString(bytes) => {
            collect_policy_lines(&String::from_utf8_lossy(bytes), out)
        }
        redis::Value::VerbatimString { text, .. } | redis::Value::SimpleString(text) => {
            collect_policy_lines(text, out);
        }
        redis::Value::Array(values) | redis::Value::Set(values) => {
            values.iter().for_each(|value| collect_policies(value, out));
        }
        redis::Value::Map(pairs) => pairs.iter().for_each(|(key, value)| {
            collect_policies(key, out);
            collect_policies(value, out);
        }),
        _ => {}
    }
}

/// Every number in a `CONFIG GET` answer (one pair per node of a cluster).
fn collect_numbers(value: &redis::Value, out: &mut Vec<u64>) {
    match value {
        redis::Value::BulkString(bytes) => {
            out.extend(
                std::str::from_utf8(bytes)
                    .ok()
                    .and_then(|text| text.parse::<u64>().ok()),
            );
        }
        redis::Value::SimpleString(text) => out.extend(text.parse::<u64>().ok()),
        redis::Value::Int(number) => out.extend(u64::try_from(*number).ok()),
        redis::Value::Array(values) | redis::Value::Set(values) => {
            values.iter().for_each(|value| collect_numbers(value, out));
        }
        redis::Value::Map(pairs) => pairs.iter().for_each(|(key, value)| {
            collect_numbers(key, out);
            collect_numbers(value, out);
        }),
        _ => {}
    }
}

fn collect_policy_lines(text: &str, out: &mut Vec<String>) {
    out.extend(
        text.lines()
            .filter_map(|line| line.trim().strip_prefix("maxmemory_policy:"))
            .map(str::to_owned),
    );
}

/// A `begin`'s error: another type of value under the key (a hash, a list) is not idem's,
/// and not free either.
fn begin_error(error: redis::RedisError) -> StoreError {
    if error.code() == Some("WRONGTYPE") {
        StoreError::Occupied(error.to_string())
    } else {
        StoreError::backend(error)
    }
}

/// Milliseconds for `PX`/`PEXPIRE`, which take a positive signed 64-bit number.
fn millis(duration: Duration) -> u64 {
    const MAX: u64 = i64::MAX as u64 / 2;
    u64::try_from(duration.as_millis()).map_or(MAX, |ms| ms.clamp(1, MAX))
}

pin_project! {
    /// A store step failed with [`StoreError::Timeout`] once it has waited `limit` for its
    /// answer. The timer is armed when the step first waits, on the runtime polling it: a
    /// step made and awaited later is timed from then, and making one needs no runtime.
    /// (An `async fn` around `tokio::time::timeout` would hold the step twice, before and
    /// inside the timeout, doubling what each step boxes.)
    struct Bounded<F> {
        #[pin]
        step: F,
        limit: Duration,
        #[pin]
        timer: Option<Sleep>,
    }
}

impl<T, F: Future<Output = Result<T, StoreError>>> Future for Bounded<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(answer) = this.step.poll(cx) {
            return Poll::Ready(answer);
        }
        if this.timer.is_none() {
            this.timer.set(Some(tokio::time::sleep(*this.limit)));
        }
        let timer = this.timer.as_pin_mut();
        match timer.map(|timer| super::poll_timer(timer, cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Err(StoreError::Timeout(*this.limit))),
            _ => Poll::Pending,
        }
    }
}

impl Store for RedisStore {
    fn begin<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        Box::pin(self.bounded(async move {
            let key = self.store_key(key);
            let mut command = redis::Cmd::with_capacity(7, 3 + key.len() + claim.len() + 7 + 20);
            command
                .arg("SET")
                .arg(key)
                .arg(claim.as_ref())
                .arg("NX")
                .arg("GET")
                .arg("PX")
                .arg(millis(lease));
            match self.run_raw(Command::Plain(command)).await {
                Ok(found) => Ok(found),
                // A server that refuses writes (at its `maxmemory`, a read-only replica
                // after a failover, a failed save) refuses the `SET` even where the key
                // holds a record: read it, so a completed request is replayed, never run
                // again (fail-open or not). Boxed: every other claim's future should not
                // hold room for this read.
                Err(error) if matches!(error.code(), Some("OOM" | "READONLY" | "MISCONF")) => {
                    Box::pin(self.read_refused_claim(key, error)).await
                }
                Err(error) => Err(begin_error(error)),
            }
        }))
    }

    fn renew<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(self.bounded(async move {
            let args = [ScriptArg::Bytes(claim), ScriptArg::Millis(millis(lease))];
            self.run(Command::script(&RENEW, self.store_key(key), &args))
                .await
        }))
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        record: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(self.bounded(async move {
            // Over the limit last read; an operator may have raised it since.
            let known = self.max_bulk.load(Ordering::Relaxed);
            if record.len() as u64 > known
                && let Some(refused) = self.over_the_limit_now(&record, Some(known)).await
            {
                return Err(refused);
            }
            let args = [
                ScriptArg::Bytes(claim),
                ScriptArg::Bytes(&record),
                ScriptArg::Millis(millis(ttl)),
            ];
            let command = Command::script(&COMPLETE, self.store_key(key), &args);
            // A server at its `maxmemory` (under `noeviction`) refuses the write for good:
            // idem then records a small "not stored" marker instead.
            let error = match self.run_raw(command).await {
                Ok(done) => return Ok(done),
                Err(error) if error.code() == Some("OOM") => {
                    return Err(StoreError::RecordRefused {
                        size: record.len() as u64,
                        reason: error.to_string(),
                    });
                }
                Err(error) => error,
            };
            // A server whose limit was lowered since it was read refuses a longer value
            // with a protocol error, and closes the connection: retried, it would fail the
            // same way until the lease ran out. Its limit, read again, tells.
            if record.len() as u64 > SMALLEST_MAX_BULK
                && let Some(refused) = self.over_the_limit_now(&record, None).await
            {
                return Err(refused);
            }
            Err(StoreError::backend(error))
        }))
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(self.bounded(async move {
            let args = [ScriptArg::Bytes(claim)];
            self.run(Command::script(&RELEASE, self.store_key(key), &args))
                .await
        }))
    }

    /// A write, not a `PING`: a server that answers but takes no claim (a read-only
    /// replica after a failover, `MISCONF` after a failed save) is not ready.
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.bounded(async move {
            let mut probe = redis::cmd("SET");
            probe
                .arg(self.redis_key("__ready"))
                .arg(b"1")
                .arg("PX")
                .arg(1_000);
            self.run::<redis::Value>(Command::Plain(probe))
                .await
                .map(drop)
        }))
    }
}
