//! The SQLite store.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::{AssertSqlSafe, SqlSafeStr, SqlStr};

use super::contract::{BoxFuture, ConnectError, Store, StoreError};
use super::sweeper::Sweeper;

mod transaction;

pub use self::transaction::SqliteTransaction;

/// A store on SQLite, in one table of one database file.
///
/// Each protocol step runs on a connection of the store's pool, in process: a replay, a
/// `422` or a `409` is one read; a first execution is a read and a claim, then a
/// completion. SQLite serialises writers, so every step is one statement (a `begin` that
/// finds no live row asks once more when a concurrent claim got there first).
///
/// # When to choose it
///
/// For an application that runs on **one host** and keeps its data in a SQLite file (the
/// set-up the example payments app starts with, with nothing to install): idem's
/// records go in the same file, and [`SqliteTransaction`] commits them with the handler's
/// writes. Several processes on that host may share the file. It is **not** for several
/// instances on different machines: SQLite's locks do not hold over a network file
/// system, and each machine would see its own file; choose `PostgresStore` (feature
/// `postgres`) or `RedisStore` (feature `redis`) there.
///
/// SQLite lets one connection write at a time. Steps are short statements, but a
/// [`SqliteTransaction`] holds the write lock from its first statement to its commit:
/// while one runs, every other claim and completion (of any key) waits for it, up to the
/// busy timeout.
///
/// # Time
///
/// Leases and TTLs are milliseconds since the Unix epoch, read from this host's clock in
/// Rust and bound to each statement. Every process that opens the file runs on this host
/// and so reads the same clock; each statement compares against one instant; and no SQLite
/// date function is needed (the millisecond one, `unixepoch('subsec')`, is recent).
///
/// # The table
///
/// [`connect`](SqliteStoreBuilder::connect) creates it unless it exists (turn that off
/// with [`create_table(false)`](SqliteStoreBuilder::create_table) and ship
/// [`migration_sql`](SqliteStoreBuilder::migration_sql) in your own migrations). With the
/// default name it is:
///
/// ```sql
/// CREATE TABLE IF NOT EXISTS "idem_records" (
///     key        TEXT NOT NULL PRIMARY KEY,  -- the scoped key
///     value      BLOB NOT NULL,              -- an encoded claim or completed record
///     expires_at INTEGER NOT NULL            -- end of the lease or TTL, ms since the Unix epoch
/// );
/// CREATE INDEX IF NOT EXISTS "idem_records_expires_at" ON "idem_records" (expires_at);
/// ```
///
/// # Expiry and sweeping
///
/// A row whose `expires_at` has passed is treated as absent by every step: an expired
/// claim (a dead executor's) frees its key, an expired record is forgotten. Nothing
/// deletes such rows by itself: [`sweep_every`](SqliteStoreBuilder::sweep_every) runs a
/// background task that deletes them in batches, or call [`sweep`](SqliteStore::sweep)
/// (or [`delete_expired`](SqliteStore::delete_expired), one batch) on your schedule. A
/// sweep deletes only rows that have expired. Without sweeping, correctness holds, but
/// the file grows.
///
/// # Connections
///
/// [`builder`](SqliteStore::builder) opens a pool of its own (8 connections by default),
/// creating the file where it does not exist (unless told not to create the table), with
/// the [WAL](https://www.sqlite.org/wal.html) journal mode, so that reads (replays, `409`s)
/// never wait for a writer, and a busy timeout (5 s by default), so that a write waits for
/// the one in progress rather than failing at once.
///
/// A pool given to [`from_pool`](SqliteStore::from_pool) is used as it is: open it with
/// [`journal_mode(SqliteJournalMode::Wal)`](sqlx::sqlite::SqliteConnectOptions::journal_mode)
/// and a [`busy_timeout`](sqlx::sqlite::SqliteConnectOptions::busy_timeout) longer than
/// your transactional handlers hold the write lock (sqlx's default is 5 s).
/// [`connect`](SqliteStoreBuilder::connect) logs a warning where the database is not in
/// WAL mode.
///
/// ```no_run
/// # async fn demo() -> Result<(), idem_runtime::ConnectError> {
/// use std::time::Duration;
/// use idem_runtime::{Idempotency, store::SqliteStore};
///
/// let store = SqliteStore::builder("sqlite://app.db")
///     .sweep_every(Duration::from_secs(60))
///     .connect()
///     .await?;
/// let idem = Idempotency::builder().store(store).build();
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    statements: Arc<Statements>,
    /// How long a statement waits for another connection's write lock: the pool's busy
    /// timeout, which idem's store timeout must outlast.
    busy_timeout: Duration,
    /// Stops the background sweep when the last clone goes.
    sweeper: Option<Arc<Sweeper>>,
}

/// The SQL of every step, for one table. `now` is always bound, in milliseconds.
struct Statements {
    table: String,
    migration: String,
    /// `?1` key, `?2` now: the live value.
    read: SqlStr,
    /// `?1` key, `?2` claim, `?3` expiry, `?4` now: a row when the claim was taken.
    claim: SqlStr,
    /// `?1` key, `?2` claim, `?3` expiry, `?4` now.
    renew: SqlStr,
    /// `?1` key, `?2` claim, `?3` record, `?4` expiry, `?5` now.
    complete: SqlStr,
    /// `?1` key, `?2` record, `?3` now: whether the key holds the record.
    holds: SqlStr,
    /// `?1` key, `?2` claim, `?3` record, `?4` expiry.
    complete_in_transaction: SqlStr,
    /// `?1` key, `?2` claim, `?3` now: a row, saying whether it was live, when deleted.
    release: SqlStr,
    /// `?1` now, `?2` limit.
    delete_expired: SqlStr,
}

impl Statements {
    fn new(table: &str) -> Self {
        let t = &quote(table);
        let index = quote(&format!("{table}_expires_at"));
        let migration = format!(
            "CREATE TABLE IF NOT EXISTS {t} (\n    \
                key        TEXT NOT NULL PRIMARY KEY,\n    \
                value      BLOB NOT NULL,\n    \
                expires_at INTEGER NOT NULL\n\
            );\n\
            CREATE INDEX IF NOT EXISTS {index} ON {t} (expires_at);\n"
        );
        let read = format!("SELECT value FROM {t} WHERE key = ?1 AND expires_at > ?2");
        // Inserts the claim, or writes it over an expired row; a live row is left as it
        // is, and then no row comes back.
        let claim = format!(
            "INSERT INTO {t} AS r (key, value, expires_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at \
             WHERE r.expires_at <= ?4 \
             RETURNING 1"
        );
        let renew = format!(
            "UPDATE {t} SET expires_at = ?3 WHERE key = ?1 AND value = ?2 AND expires_at > ?4"
        );
        let complete = format!(
            "UPDATE {t} SET value = ?3, expires_at = ?4 \
             WHERE key = ?1 AND value = ?2 AND expires_at > ?5"
        );
        let holds = format!(
            "SELECT EXISTS (SELECT 1 FROM {t} WHERE key = ?1 AND value = ?2 AND expires_at > ?3)"
        );
        // In the work's own transaction, which holds SQLite's write lock: only the claim
        // itself counts, not whether its lease is still unexpired. While the work held the
        // lock, no other executor could take the key over (that is a write), but its own
        // renewals could not be written either: a lease that lapsed on the clock
        // meanwhile, with the claim still in place, must not fence the work out.
        let complete_in_transaction =
            format!("UPDATE {t} SET value = ?3, expires_at = ?4 WHERE key = ?1 AND value = ?2");
        // An expired claim of this executor is deleted too (it is garbage), but only a live
        // one counts as released.
        let release =
            format!("DELETE FROM {t} WHERE key = ?1 AND value = ?2 RETURNING expires_at > ?3");
        let delete_expired = format!(
            "DELETE FROM {t} WHERE key IN ( \
                SELECT key FROM {t} WHERE expires_at <= ?1 LIMIT ?2 \
             )"
        );
        let sql = |text: String| AssertSqlSafe(text).into_sql_str();
        Self {
            table: t.clone(),
            migration,
            read: sql(read),
            claim: sql(claim),
            renew: sql(renew),
            complete: sql(complete),
            holds: sql(holds),
            complete_in_transaction: sql(complete_in_transaction),
            release: sql(release),
            delete_expired: sql(delete_expired),
        }
    }
}

/// `name` as a quoted SQL identifier.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The largest string or blob SQLite keeps by default (`SQLITE_MAX_LENGTH`), less room
/// for the rest of the row.
const MAX_RECORD_BYTES: u64 = 1_000_000_000 - (1 << 20);

/// SQLite's result code for a string or blob over its length limit.
const SQLITE_TOOBIG: &str = "18";

/// Where the store's connections come from.
#[derive(Clone)]
enum Source {
    Url(String),
    Pool(SqlitePool),
}

/// Sets up a [`SqliteStore`].
#[derive(Clone)]
#[must_use]
pub struct SqliteStoreBuilder {
    source: Source,
    table: String,
    create_table: bool,
    max_connections: u32,
    busy_timeout: Duration,
    sweep_every: Option<Duration>,
    sweep_batch: u64,
}

impl SqliteStoreBuilder {
    /// The table's name (default [`SqliteStore::DEFAULT_TABLE`]), so that several
    /// applications can share one file.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// Whether [`connect`](Self::connect) creates the table and its index where they do
    /// not exist (default `true`), and the database file where it does not exist (for a
    /// URL). Turn it off where migrations are yours to run: ship
    /// [`migration_sql`](Self::migration_sql) in them.
    pub fn create_table(mut self, create: bool) -> Self {
        self.create_table = create;
        self
    }

    /// The most connections the store's own pool opens (default 8). Ignored for a pool
    /// given to [`SqliteStore::from_pool`].
    pub fn max_connections(mut self, max: u32) -> Self {
        self.max_connections = max.max(1);
        self
    }

    /// How long a statement waits for another connection's write lock before it fails
    /// (default 5 s), and how long the store waits for a free connection. Longer than a
    /// [`SqliteTransaction`] holds the lock. For a pool given to
    /// [`SqliteStore::from_pool`], say what its connections' busy timeout is (sqlx's
    /// default is 5 s): the pool is not changed.
    ///
    /// A handle built on this store without a
    /// [`store_timeout`](crate::IdempotencyBuilder::store_timeout) of its own waits for a
    /// step this long and one second more, so that a claim waits for a transaction
    /// holding the lock, as the busy timeout allows, rather than being refused with `503`
    /// after the default 2 s.
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// Deletes expired rows in the background every `interval` (default: never; see
    /// [`SqliteStore::sweep`]). The task runs on the Tokio runtime that connects the
    /// store and stops when the last clone of the store is dropped. A sweep that fails is
    /// logged and tried again at the next interval.
    pub fn sweep_every(mut self, interval: Duration) -> Self {
        self.sweep_every = Some(interval.max(Duration::from_millis(10)));
        self
    }

    /// Rows one sweep batch deletes at most (default [`SqliteStore::DEFAULT_SWEEP_BATCH`]):
    /// each batch holds the write lock for one short statement.
    pub fn sweep_batch(mut self, batch: u64) -> Self {
        self.sweep_batch = batch.max(1);
        self
    }

    /// The DDL that creates the table and its index where they do not exist (shown in
    /// [`SqliteStore`'s documentation](SqliteStore#the-table)), with this builder's
    /// table: for your own migrations, with [`create_table(false)`](Self::create_table).
    ///
    /// ```
    /// use idem_runtime::store::SqliteStore;
    ///
    /// let sql = SqliteStore::builder("sqlite://app.db").table("idem").migration_sql();
    /// assert!(sql.starts_with("CREATE TABLE IF NOT EXISTS \"idem\" ("));
    /// ```
    pub fn migration_sql(&self) -> String {
        Statements::new(&self.table).migration
    }

    /// Opens the pool (for a URL), creates the table unless told not to, and runs every
    /// step once on a probe key (leaving nothing), so that a missing table, a table of
    /// another shape or a read-only file fails here, with the step named, rather than on
    /// the first request.
    pub async fn connect(self) -> Result<SqliteStore, ConnectError> {
        let failed = |step| {
            move |source: sqlx::Error| ConnectError::Sqlite {
                step,
                source: Box::new(source),
            }
        };
        // The table a `SqliteTransaction` marks itself in, in each connection's `temp`
        // schema, which SQLite searches first: a store table of that name would be hidden.
        if self.table.eq_ignore_ascii_case(transaction::MARK_TABLE) {
            return Err(failed("checking the table's name")(sqlx::Error::Configuration(
                format!("{:?} is the name of idem's own transaction mark; choose another table name", self.table).into(),
            )));
        }
        let pool = match self.source {
            Source::Pool(pool) => pool,
            Source::Url(url) => {
                let mut options = SqliteConnectOptions::from_str(&url)
                    .map_err(failed("parsing the URL"))?
                    .journal_mode(SqliteJournalMode::Wal)
                    .busy_timeout(self.busy_timeout);
                if self.create_table {
                    options = options.create_if_missing(true);
                }
                let pool = SqlitePoolOptions::new()
                    .acquire_timeout(self.busy_timeout)
                    // A connection to a file in this process does not go stale.
                    .test_before_acquire(false);
                // An in-memory database lives as long as a connection to it, and its
                // connections share one cache, whose locks fail at once instead of
                // waiting: one connection, kept open, on which steps take turns (waiting
                // for it as they would for the file's lock).
                let pool = if is_in_memory(&url) {
                    pool.max_connections(1)
                        .min_connections(1)
                        .idle_timeout(None)
                        .max_lifetime(None)
                } else {
                    pool.max_connections(self.max_connections)
                };
                pool.connect_with(options)
                    .await
                    .map_err(failed("opening the database"))?
            }
        };
        let statements = Arc::new(Statements::new(&self.table));
        let mut store = SqliteStore {
            pool,
            statements,
            busy_timeout: self.busy_timeout,
            sweeper: None,
        };
        if self.create_table {
            store.migrate().await?;
        }
        store.probe().await?;
        if let Some(interval) = self.sweep_every {
            // The task holds the pool and the statements, not the sweeper: the last
            // clone of the store going away is what stops it.
            let sweeping = store.clone();
            let batch = self.sweep_batch;
            store.sweeper = Some(Arc::new(Sweeper::start(interval, move || {
                let store = sweeping.clone();
                async move { store.sweep(batch).await }
            })));
        }
        Ok(store)
    }
}

/// Whether `url` names an in-memory database (`sqlite::memory:`, `mode=memory`).
fn is_in_memory(url: &str) -> bool {
    url.contains(":memory:") || url.contains("mode=memory")
}

impl SqliteStore {
    /// The table's name unless another is chosen.
    pub const DEFAULT_TABLE: &str = "idem_records";

    /// How long a statement waits for another connection's write lock
    /// ([`SqliteStoreBuilder::busy_timeout`]).
    pub(crate) fn busy_timeout(&self) -> Duration {
        self.busy_timeout
    }

    /// Rows one sweep batch deletes at most unless another size is chosen.
    pub const DEFAULT_SWEEP_BATCH: u64 = 1000;

    /// Opens `url` (`sqlite://path/to/file.db`, `sqlite::memory:`) with the default
    /// settings, creating the file and the table where they do not exist. An in-memory
    /// database is kept on one connection, open for the store's life, so every step takes
    /// its turn on it.
    pub async fn connect(url: &str) -> Result<Self, ConnectError> {
        Self::builder(url).connect().await
    }

    /// Starts configuring a store with a pool of its own on `url`.
    pub fn builder(url: impl Into<String>) -> SqliteStoreBuilder {
        Self::builder_for(Source::Url(url.into()))
    }

    /// Starts configuring a store on an application's pool (shared with its queries):
    /// see [Connections](SqliteStore#connections) for the options it should have.
    pub fn from_pool(pool: SqlitePool) -> SqliteStoreBuilder {
        Self::builder_for(Source::Pool(pool))
    }

    fn builder_for(source: Source) -> SqliteStoreBuilder {
        SqliteStoreBuilder {
            source,
            table: Self::DEFAULT_TABLE.to_owned(),
            create_table: true,
            max_connections: 8,
            busy_timeout: Duration::from_secs(5),
            sweep_every: None,
            sweep_batch: Self::DEFAULT_SWEEP_BATCH,
        }
    }

    /// The pool the store runs on.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The table, quoted.
    pub fn table(&self) -> &str {
        &self.statements.table
    }

    /// Creates the table and its index where they do not exist, in one transaction.
    /// [`connect`](SqliteStoreBuilder::connect) runs it unless told not to.
    pub async fn migrate(&self) -> Result<(), ConnectError> {
        let failed = |source: sqlx::Error| ConnectError::Sqlite {
            step: "creating the table",
            source: Box::new(source),
        };
        let mut transaction = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(failed)?;
        sqlx::raw_sql(AssertSqlSafe(self.statements.migration.clone()))
            .execute(&mut *transaction)
            .await
            .map_err(failed)?;
        transaction.commit().await.map_err(failed)
    }

    /// Runs every step once on a probe key, and leaves nothing: a missing table, a table
    /// of another shape or a read-only file fails here, with the step named.
    async fn probe(&self) -> Result<(), ConnectError> {
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(|error| ConnectError::Sqlite {
            step: "probing (random key)",
            source: error.to_string().into(),
        })?;
        let key = format!("__probe:{:016x}", u64::from_le_bytes(nonce));
        let claim = Bytes::from_static(b"idem probe claim");
        let record = Bytes::from_static(b"idem probe record");
        let lease = Duration::from_secs(10);
        let refused = |step| {
            move |error: StoreError| ConnectError::Sqlite {
                step,
                source: match error {
                    StoreError::Backend(source) => source,
                    other => Box::new(other),
                },
            }
        };
        self.begin(&key, &claim, lease).await.map_err(refused(
            "probing begin (SELECT, INSERT ... ON CONFLICT DO UPDATE)",
        ))?;
        self.renew(&key, &claim, lease)
            .await
            .map_err(refused("probing renew (UPDATE)"))?;
        self.complete(&key, &claim, record.clone(), lease)
            .await
            .map_err(refused("probing complete (UPDATE)"))?;
        // The probe record goes the way a claim does: deleted where it holds this value.
        self.release(&key, &record)
            .await
            .map_err(refused("probing release (DELETE)"))?;
        self.delete_expired(0)
            .await
            .map_err(refused("probing the sweep (DELETE)"))?;
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&self.pool)
            .await
            .map_err(|source| ConnectError::Sqlite {
                step: "reading the journal mode (PRAGMA journal_mode)",
                source: Box::new(source),
            })?;
        if !mode.eq_ignore_ascii_case("wal") && !mode.eq_ignore_ascii_case("memory") {
            tracing::warn!(target: "idem", journal_mode = %mode, "the SQLite database is not in WAL mode: replays wait while a transactional handler writes; open the pool with `journal_mode(SqliteJournalMode::Wal)`");
        }
        Ok(())
    }

    /// Deletes at most `limit` expired rows (claims whose lease ran out, records past
    /// their TTL) in one statement and returns how many it deleted. Rows in flight or
    /// within their TTL are never deleted.
    pub async fn delete_expired(&self, limit: u64) -> Result<u64, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let done = sqlx::query(self.statements.delete_expired.clone())
            .bind(now_ms())
            .bind(limit)
            .execute(&self.pool)
            .await
            .map_err(|error| self.error(error))?;
        Ok(done.rows_affected())
    }

    /// Deletes every expired row, `batch` rows per statement, until a batch comes back
    /// short; returns how many it deleted. Schedule it (or use
    /// [`sweep_every`](SqliteStoreBuilder::sweep_every)) so the table does not grow
    /// without bound. Other writers get the lock between batches.
    pub async fn sweep(&self, batch: u64) -> Result<u64, StoreError> {
        let batch = batch.max(1);
        let mut total = 0;
        loop {
            let deleted = self.delete_expired(batch).await?;
            total += deleted;
            if deleted < batch {
                return Ok(total);
            }
        }
    }

    fn error(&self, error: sqlx::Error) -> StoreError {
        match error {
            sqlx::Error::PoolTimedOut => {
                StoreError::Timeout(self.pool.options().get_acquire_timeout())
            }
            error => StoreError::backend(error),
        }
    }
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("table", &self.statements.table)
            .field("sweeping", &self.sweeper.is_some())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for SqliteStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStoreBuilder")
            .field("table", &self.table)
            .field("create_table", &self.create_table)
            .field("max_connections", &self.max_connections)
            .field("busy_timeout", &self.busy_timeout)
            .field("sweep_every", &self.sweep_every)
            .field("sweep_batch", &self.sweep_batch)
            .finish_non_exhaustive()
    }
}

/// Now, in milliseconds since the Unix epoch (see [`SqliteStore`]'s "Time").
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
        })
}

/// `duration` from now, in milliseconds since the Unix epoch; at least a millisecond
/// ahead, at most a century.
fn expiry_after(duration: Duration) -> i64 {
    const MAX: i64 = 100 * 365 * 24 * 3600 * 1000;
    let millis = i64::try_from(duration.as_millis()).map_or(MAX, |ms| ms.clamp(1, MAX));
    now_ms().saturating_add(millis)
}

/// How often `begin` asks again when a concurrent claim got in between its read and its
/// claim.
const BEGIN_ATTEMPTS: usize = 5;

impl Store for SqliteStore {
    fn begin<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        Box::pin(async move {
            for _ in 0..BEGIN_ATTEMPTS {
                // A read first: a replay, a 422 or a 409 takes no write lock.
                let live = sqlx::query_scalar::<_, Vec<u8>>(self.statements.read.clone())
                    .bind(key)
                    .bind(now_ms())
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|error| self.error(error))?;
                if let Some(value) = live {
                    return Ok(Some(Bytes::from(value)));
                }
                let claimed = sqlx::query(self.statements.claim.clone())
                    .bind(key)
                    .bind(claim.as_ref())
                    .bind(expiry_after(lease))
                    .bind(now_ms())
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|error| self.error(error))?;
                if claimed.is_some() {
                    return Ok(None);
                }
                // A live row appeared since the read: read it.
            }
            Err(StoreError::Contended(format!(
                "no answer after {BEGIN_ATTEMPTS} attempts"
            )))
        })
    }

    fn renew<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let done = sqlx::query(self.statements.renew.clone())
                .bind(key)
                .bind(claim.as_ref())
                .bind(expiry_after(lease))
                .bind(now_ms())
                .execute(&self.pool)
                .await
                .map_err(|error| self.error(error))?;
            Ok(done.rows_affected() == 1)
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
            let size = record.len() as u64;
            if size > MAX_RECORD_BYTES {
                return Err(StoreError::RecordRefused {
                    size,
                    reason: format!("over the {MAX_RECORD_BYTES} bytes SQLite keeps in one value"),
                });
            }
            let done = sqlx::query(self.statements.complete.clone())
                .bind(key)
                .bind(claim.as_ref())
                .bind(record.as_ref())
                .bind(expiry_after(ttl))
                .bind(now_ms())
                .execute(&self.pool)
                .await
                .map_err(
                    |error| match error.as_database_error().and_then(|e| e.code()) {
                        Some(code) if code == SQLITE_TOOBIG => StoreError::RecordRefused {
                            size,
                            reason: error.to_string(),
                        },
                        _ => self.error(error),
                    },
                )?;
            if done.rows_affected() == 1 {
                return Ok(true);
            }
            // Applied twice (re-sent after a lost answer), the second finds the record.
            sqlx::query_scalar::<_, bool>(self.statements.holds.clone())
                .bind(key)
                .bind(record.as_ref())
                .bind(now_ms())
                .fetch_one(&self.pool)
                .await
                .map_err(|error| self.error(error))
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let live = sqlx::query_scalar::<_, bool>(self.statements.release.clone())
                .bind(key)
                .bind(claim.as_ref())
                .bind(now_ms())
                .fetch_optional(&self.pool)
                .await
                .map_err(|error| self.error(error))?;
            Ok(live.unwrap_or(false))
        })
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}
