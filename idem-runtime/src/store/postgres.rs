//! The PostgreSQL store.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, Executor, Row, SqlSafeStr, SqlStr};

use super::contract::{BoxFuture, ConnectError, Store, StoreError};
use super::sweeper::Sweeper;

mod transaction;

pub use self::transaction::PgTransaction;

/// A store on PostgreSQL (9.5 or newer: `ON CONFLICT`, `SKIP LOCKED`), in one table.
///
/// Every protocol step is one statement, hence one round trip on a connection of the
/// pool (statements are prepared once per connection and cached by sqlx): **1** for a
/// replay, a `422` or a `409`, **2** for a first execution. The one exception is a race:
/// a `begin` that loses a claim of the same key to a transaction that committed after its
/// snapshot sees neither its own claim nor the winner's row, and asks once more. Time is
/// the database's clock (`now()`), so instances whose clocks disagree still agree on
/// which leases and records have run out.
///
/// # When to choose it
///
/// For a team that runs PostgreSQL and no Redis, with any number of application
/// instances on one database: the database is already backed up, replicated and watched.
/// Each claim and completion is a row write (a replay only reads), so a step costs what a
/// small indexed write costs on that server, more than a Redis command; where Redis is
/// already there and the request rate is high, `RedisStore` (feature
/// `redis`) is the lighter store. Unlike Redis, a committed claim survives a failover to a
/// synchronous replica.
///
/// # The table
///
/// [`connect`](PostgresStoreBuilder::connect) creates it unless it exists (turn that off
/// with [`create_table(false)`](PostgresStoreBuilder::create_table) and ship
/// [`migration_sql`](PostgresStoreBuilder::migration_sql) in your own migrations). With the
/// default name it is:
///
/// ```sql
/// CREATE TABLE IF NOT EXISTS "idem_records" (
///     key        TEXT COLLATE "C" PRIMARY KEY,  -- the scoped key
///     value      BYTEA NOT NULL,                -- an encoded claim or completed record
///     expires_at TIMESTAMPTZ NOT NULL           -- end of the claim's lease, or of the record's TTL
/// );
/// CREATE INDEX IF NOT EXISTS "idem_records_expires_at" ON "idem_records" (expires_at);
/// ```
///
/// The DDL runs in a transaction under an advisory lock, so instances that start together
/// do not trip over each other. The user idem connects as needs `SELECT`, `INSERT`,
/// `UPDATE` and `DELETE` on the table (and `CREATE` on its schema, where idem creates it).
///
/// # Expiry and sweeping
///
/// A row whose `expires_at` has passed is treated as absent by every step: an expired
/// claim (a dead executor's) frees its key, an expired record is forgotten. PostgreSQL
/// does not delete such rows by itself, so something must sweep them:
///
/// - [`sweep_every`](PostgresStoreBuilder::sweep_every) runs a background task on the
///   Tokio runtime that deletes expired rows in batches at that interval; it stops when
///   the last clone of the store is dropped. Several instances may all sweep: batches skip
///   rows another sweeper holds (`FOR UPDATE SKIP LOCKED`).
/// - Or schedule it yourself (a cron job, a maintenance task) with
///   [`sweep`](PostgresStore::sweep) or one batch at a time with
///   [`delete_expired`](PostgresStore::delete_expired).
///
/// A sweep deletes only rows that have expired; a claim in flight or a record within its
/// TTL is never touched. Without sweeping, correctness holds, but the table grows.
///
/// # Connections
///
/// [`builder`](PostgresStore::builder) opens a pool of its own (10 connections by default).
/// Its connections are checked with a ping only after 30 s idle, not before every use
/// (sqlx's default), which would add a round trip before every step.
/// [`from_pool`](PostgresStore::from_pool) shares an application's pool instead; set
/// [`test_before_acquire(false)`](sqlx::pool::PoolOptions::test_before_acquire) on it
/// for the same one round trip per step. (sqlx also pings each connection as it goes
/// back to the pool: after the step has its answer, off the request's path.)
///
/// Lease renewals run on connections of their own
/// ([`RENEWAL_CONNECTIONS`](PostgresStore::RENEWAL_CONNECTIONS), opened on the pool's
/// connect options): handlers holding every connection of the pool in their
/// [`PgTransaction`](crate::store::PgTransaction)s, or an application's own queries on a
/// shared pool, never keep a running execution's lease from being renewed, so its key is
/// never taken over while it runs. Count them in the server's `max_connections`. They do
/// not run a shared pool's `after_connect`: every statement names the table's schema (the
/// one given, else the one the pool found the table in when the store connected), and
/// they take the connect options the pool had then (credentials rotated later with
/// `set_connect_options` are not theirs), with a `lock_timeout` of 2 s: a renewal that
/// meets a row lock held longer fails and is tried again at its next turn, rather than
/// holding its connection from every other lease.
///
/// ```no_run
/// # async fn demo() -> Result<(), idem_runtime::ConnectError> {
/// use std::time::Duration;
/// use idem_runtime::{Idempotency, store::PostgresStore};
///
/// let store = PostgresStore::builder("postgres://app@db.internal/payments")
///     .schema("idem")
///     .sweep_every(Duration::from_secs(60))
///     .connect()
///     .await?;
/// let idem = Idempotency::builder().store(store).build();
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// The renewals' own connections, apart from `pool`.
    renewals: PgPool,
    statements: Arc<Statements>,
    /// Stops the background sweep when the last clone goes.
    sweeper: Option<Arc<Sweeper>>,
}

/// The SQL of every step, for one table.
struct Statements {
    table: String,
    migration: String,
    begin: SqlStr,
    renew: SqlStr,
    complete: SqlStr,
    complete_in_transaction: SqlStr,
    release: SqlStr,
    delete_expired: SqlStr,
}

impl Statements {
    fn new(schema: Option<&str>, table: &str) -> Self {
        let qualified = match schema {
            Some(schema) => format!("{}.{}", quote(schema), quote(table)),
            None => quote(table),
        };
        let t = &qualified;
        let index = quote(&format!("{table}_expires_at"));
        let migration = format!(
            "CREATE TABLE IF NOT EXISTS {t} (\n    \
                key        TEXT COLLATE \"C\" PRIMARY KEY,\n    \
                value      BYTEA NOT NULL,\n    \
                expires_at TIMESTAMPTZ NOT NULL\n\
            );\n\
            CREATE INDEX IF NOT EXISTS {index} ON {t} (expires_at);\n"
        );
        // The live row is read from the statement's snapshot; where there is none, the
        // claim is inserted, or written over an expired row under its row lock. A row
        // another transaction committed after the snapshot makes the insert conflict and
        // the snapshot miss it: no row comes back, and `begin` asks again.
        let begin = format!(
            "WITH live AS ( \
                SELECT value FROM {t} WHERE key = $1 AND expires_at > now() \
             ), claimed AS ( \
                INSERT INTO {t} AS r (key, value, expires_at) \
                SELECT $1, $2, now() + $3::bigint * interval '1 millisecond' \
                WHERE NOT EXISTS (SELECT 1 FROM live) \
                ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at \
                WHERE r.expires_at <= now() \
                RETURNING 1 \
             ) \
             SELECT value, false AS claimed FROM live \
             UNION ALL \
             SELECT NULL, true FROM claimed"
        );
        let renew = format!(
            "UPDATE {t} SET expires_at = now() + $3::bigint * interval '1 millisecond' \
             WHERE key = $1 AND value = $2 AND expires_at > now()"
        );
        // Applied twice (re-sent after a lost answer), the second finds the record: true.
        let complete = format!(
            "WITH completed AS ( \
                UPDATE {t} SET value = $3, expires_at = now() + $4::bigint * interval '1 millisecond' \
                WHERE key = $1 AND value = $2 AND expires_at > now() \
                RETURNING 1 \
             ) \
             SELECT EXISTS (SELECT 1 FROM completed) \
                 OR EXISTS (SELECT 1 FROM {t} WHERE key = $1 AND value = $3 AND expires_at > now())"
        );
        // In the work's own transaction: its clock, not the transaction's start, and only
        // the claim itself counts (a lapsed lease nobody took over still fences right).
        // Written only inside the transaction the work wrote in (marked at its `BEGIN`,
        // `WORK_OPEN`): one the work ended itself (a `COMMIT` or `ROLLBACK` sent through its
        // connection) leaves the connection in autocommit, where the record would commit
        // at once, alone.
        let complete_in_transaction = format!(
            "WITH fenced AS ( \
                UPDATE {t} SET value = $3, expires_at = clock_timestamp() + $4::bigint * interval '1 millisecond' \
                WHERE key = $1 AND value = $2 AND {WORK_IS_OPEN} \
                RETURNING 1 \
             ) \
             SELECT {WORK_IS_OPEN}, EXISTS (SELECT 1 FROM fenced)"
        );
        // An expired claim of this executor is deleted too (it is garbage), but only a live
        // one counts as released.
        let release =
            format!("DELETE FROM {t} WHERE key = $1 AND value = $2 RETURNING expires_at > now()");
        let delete_expired = format!(
            "DELETE FROM {t} WHERE key IN ( \
                SELECT key FROM {t} WHERE expires_at <= now() LIMIT $1 FOR UPDATE SKIP LOCKED \
             ) AND expires_at <= now()"
        );
        let sql = |text: String| AssertSqlSafe(text).into_sql_str();
        Self {
            table: qualified,
            migration,
            begin: sql(begin),
            renew: sql(renew),
            complete: sql(complete),
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

/// How long a pooled connection may sit idle before it is pinged on its next use.
/// The longest a lease renewal waits for a row lock before it fails (and is tried again
/// at its next turn), in PostgreSQL's units.
const RENEWAL_LOCK_TIMEOUT: &str = "2s";

/// How a `PgTransaction` begins: with a mark that lasts as long as the transaction, which
/// idem's completion looks for ([`WORK_IS_OPEN`]), so that it never writes outside it.
pub(crate) const WORK_OPEN: &str = "BEGIN; SET LOCAL idem.work = 'open'";

/// Whether the statement runs in the transaction [`WORK_OPEN`] began: `false` once the
/// work ended it itself, and in any transaction after that.
pub(crate) const WORK_IS_OPEN: &str =
    "coalesce(current_setting('idem.work', true) = 'open', false)";

const IDLE_CHECK: Duration = Duration::from_secs(30);

/// A pool of at most `max` connections, each pinged only after [`IDLE_CHECK`] idle.
fn pool_options(max: u32, acquire_timeout: Duration) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(acquire_timeout)
        .test_before_acquire(false)
        .before_acquire(|connection, meta| {
            Box::pin(async move {
                if meta.idle_for >= IDLE_CHECK {
                    connection.ping().await?;
                }
                Ok(true)
            })
        })
}

/// The largest value PostgreSQL keeps in one field (1 GiB), less room for the message.
const MAX_RECORD_BYTES: u64 = (1 << 30) - (1 << 20);

/// Where the store's connections come from.
#[derive(Clone)]
enum Source {
    Url(String),
    Pool(PgPool),
}

/// Sets up a [`PostgresStore`].
#[derive(Clone)]
#[must_use]
pub struct PostgresStoreBuilder {
    source: Source,
    schema: Option<String>,
    table: String,
    create_table: bool,
    max_connections: u32,
    connect_timeout: Duration,
    sweep_every: Option<Duration>,
    sweep_batch: u64,
}

impl PostgresStoreBuilder {
    /// The schema of the table (default: none, so PostgreSQL's `search_path` decides,
    /// usually `public`). The schema must exist.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// The table's name (default [`PostgresStore::DEFAULT_TABLE`]), so several
    /// applications can share one database.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// Whether [`connect`](Self::connect) creates the table and its index where they do
    /// not exist (default `true`). Turn it off where migrations are yours to run: ship
    /// [`migration_sql`](Self::migration_sql) in them.
    pub fn create_table(mut self, create: bool) -> Self {
        self.create_table = create;
        self
    }

    /// The most connections the store's own pool opens (default 10). Ignored for a pool
    /// given to [`PostgresStore::from_pool`].
    pub fn max_connections(mut self, max: u32) -> Self {
        self.max_connections = max.max(1);
        self
    }

    /// How long opening a connection, or waiting for a free one, may take (default 2 s).
    /// Ignored for a pool given to [`PostgresStore::from_pool`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Deletes expired rows in the background every `interval` (default: never; see
    /// [`PostgresStore::sweep`]). The task runs on the Tokio runtime that connects the
    /// store and stops when the last clone of the store is dropped. A sweep that fails is
    /// logged and tried again at the next interval.
    pub fn sweep_every(mut self, interval: Duration) -> Self {
        self.sweep_every = Some(interval.max(Duration::from_millis(10)));
        self
    }

    /// Rows one sweep batch deletes at most (default [`PostgresStore::DEFAULT_SWEEP_BATCH`]):
    /// small batches hold few row locks and keep each statement short.
    pub fn sweep_batch(mut self, batch: u64) -> Self {
        self.sweep_batch = batch.max(1);
        self
    }

    /// The DDL that creates the table and its index where they do not exist (shown in
    /// [`PostgresStore`'s documentation](PostgresStore#the-table)), with this builder's
    /// schema and table: for your own migrations, with
    /// [`create_table(false)`](Self::create_table).
    ///
    /// ```
    /// use idem_runtime::store::PostgresStore;
    ///
    /// let sql = PostgresStore::builder("postgres://localhost/app")
    ///     .schema("idem")
    ///     .migration_sql();
    /// assert!(sql.starts_with("CREATE TABLE IF NOT EXISTS \"idem\".\"idem_records\" ("));
    /// ```
    pub fn migration_sql(&self) -> String {
        Statements::new(self.schema.as_deref(), &self.table).migration
    }

    /// Opens the pool (for a URL), creates the table unless told not to, and runs every
    /// step once on a probe key (leaving nothing), so that a missing table, a table of
    /// another shape or a missing permission fails here, with the step named, rather than
    /// on the first request.
    pub async fn connect(self) -> Result<PostgresStore, ConnectError> {
        let failed = |step| {
            move |source: sqlx::Error| ConnectError::Postgres {
                step,
                source: Box::new(source),
            }
        };
        let pool = match self.source {
            Source::Pool(pool) => pool,
            Source::Url(url) => {
                let options =
                    PgConnectOptions::from_str(&url).map_err(failed("parsing the URL"))?;
                pool_options(self.max_connections, self.connect_timeout)
                    .connect_with(options)
                    .await
                    .map_err(failed("connecting"))?
            }
        };
        // Connected by the probe's renewal, below. A renewal never waits long for a row
        // lock (another executor's claim under way holds one for a moment): one that did
        // would keep one of the few renewal connections from every other lease.
        let renewal_options = (*pool.connect_options())
            .clone()
            .options([("lock_timeout", RENEWAL_LOCK_TIMEOUT)]);
        let renewals = pool_options(PostgresStore::RENEWAL_CONNECTIONS, self.connect_timeout)
            .connect_lazy_with(renewal_options);
        let statements = Arc::new(Statements::new(self.schema.as_deref(), &self.table));
        let mut store = PostgresStore {
            pool,
            renewals,
            statements,
            sweeper: None,
        };
        if self.create_table {
            store.migrate().await?;
        }
        if self.schema.is_none() {
            // The pool's connections may choose their schema as they connect (a
            // `search_path` set in `after_connect`), which the renewal connections do not:
            // every statement names the schema the pool finds the table in.
            let schema = store.schema_of_table(&self.table).await?;
            if let Some(schema) = schema {
                store.statements = Arc::new(Statements::new(Some(&schema), &self.table));
            }
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

impl PostgresStore {
    /// The table's name unless another is chosen.
    pub const DEFAULT_TABLE: &str = "idem_records";

    /// Rows one sweep batch deletes at most unless another size is chosen.
    pub const DEFAULT_SWEEP_BATCH: u64 = 1000;

    /// Connections the store opens for lease renewals, beside its pool (see
    /// "Connections" above).
    pub const RENEWAL_CONNECTIONS: u32 = 2;

    /// How often [`Idempotency::postgres`](crate::Idempotency::postgres) sweeps expired
    /// rows: every minute. A store built by hand sweeps only when asked
    /// ([`sweep_every`](PostgresStoreBuilder::sweep_every)).
    pub const DEFAULT_SWEEP_EVERY: Duration = Duration::from_secs(60);

    /// Connects to `url` (`postgres://user[:password]@host[:port]/database[?options]`)
    /// with the default settings, creating the table where it does not exist.
    pub async fn connect(url: &str) -> Result<Self, ConnectError> {
        Self::builder(url).connect().await
    }

    /// Starts configuring a store with a pool of its own on `url`.
    pub fn builder(url: impl Into<String>) -> PostgresStoreBuilder {
        Self::builder_for(Source::Url(url.into()))
    }

    /// Starts configuring a store on an application's pool (shared with its queries).
    pub fn from_pool(pool: PgPool) -> PostgresStoreBuilder {
        Self::builder_for(Source::Pool(pool))
    }

    fn builder_for(source: Source) -> PostgresStoreBuilder {
        PostgresStoreBuilder {
            source,
            schema: None,
            table: Self::DEFAULT_TABLE.to_owned(),
            create_table: true,
            max_connections: 10,
            connect_timeout: Duration::from_secs(2),
            sweep_every: None,
            sweep_batch: Self::DEFAULT_SWEEP_BATCH,
        }
    }

    /// The pool the store runs on.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The table, quoted and qualified by its schema: the one given, else the one the
    /// pool's connections found it in when the store connected.
    pub fn table(&self) -> &str {
        &self.statements.table
    }

    /// Creates the table and its index where they do not exist, in one transaction
    /// under an advisory lock (concurrent `CREATE ... IF NOT EXISTS` can otherwise fail).
    /// [`connect`](PostgresStoreBuilder::connect) runs it unless told not to.
    pub async fn migrate(&self) -> Result<(), ConnectError> {
        let failed = |source: sqlx::Error| ConnectError::Postgres {
            step: "creating the table",
            source: Box::new(source),
        };
        let mut transaction = self.pool.begin().await.map_err(failed)?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("idem migration {}", self.statements.table))
            .execute(&mut *transaction)
            .await
            .map_err(failed)?;
        transaction
            .execute(AssertSqlSafe(self.statements.migration.clone()))
            .await
            .map_err(failed)?;
        transaction.commit().await.map_err(failed)
    }

    /// The schema the pool's connections find `table` in, if they find it.
    async fn schema_of_table(&self, table: &str) -> Result<Option<String>, ConnectError> {
        sqlx::query_scalar::<_, String>(
            "SELECT n.nspname::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid = to_regclass($1)",
        )
        .bind(quote(table))
        .fetch_optional(&self.pool)
        .await
        .map_err(|source| ConnectError::Postgres {
            step: "finding the table's schema",
            source: Box::new(source),
        })
    }

    /// Runs every step once on a probe key, and leaves nothing: a missing table, a table
    /// of another shape or a missing permission fails here, with the step named.
    async fn probe(&self) -> Result<(), ConnectError> {
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(|error| ConnectError::Postgres {
            step: "probing (random key)",
            source: error.to_string().into(),
        })?;
        let key = format!("__probe:{:016x}", u64::from_le_bytes(nonce));
        let claim = Bytes::from_static(b"idem probe claim");
        let record = Bytes::from_static(b"idem probe record");
        let lease = Duration::from_secs(10);
        let refused = |step| {
            move |error: StoreError| ConnectError::Postgres {
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
        let renewed = self
            .renew(&key, &claim, lease)
            .await
            .map_err(refused("probing renew (UPDATE)"))?;
        if !renewed {
            return Err(ConnectError::Postgres {
                step: "probing renew (UPDATE)",
                source: "the renewal connections did not find the claim the pool just made: they reach another table"
                    .into(),
            });
        }
        self.complete(&key, &claim, record.clone(), lease)
            .await
            .map_err(refused("probing complete (UPDATE)"))?;
        // The probe record goes the way a claim does: deleted where it holds this value.
        self.release(&key, &record)
            .await
            .map_err(refused("probing release (DELETE)"))?;
        self.delete_expired(0).await.map_err(refused(
            "probing the sweep (DELETE ... FOR UPDATE SKIP LOCKED)",
        ))?;
        Ok(())
    }

    /// Deletes at most `limit` expired rows (claims whose lease ran out, records past
    /// their TTL) in one statement and returns how many it deleted. Rows in flight or
    /// within their TTL are never deleted; rows another sweeper holds are skipped.
    pub async fn delete_expired(&self, limit: u64) -> Result<u64, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let done = sqlx::query(self.statements.delete_expired.clone())
            .bind(limit)
            .execute(&self.pool)
            .await
            .map_err(|error| self.error(error))?;
        Ok(done.rows_affected())
    }

    /// Deletes every expired row, `batch` rows per statement, until a batch comes back
    /// short; returns how many it deleted. Schedule it (or use
    /// [`sweep_every`](PostgresStoreBuilder::sweep_every)) so the table does not grow
    /// without bound.
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

    /// Extends the lease of `claim` under `key`, through a connection of `pool`: whether
    /// the key still held it.
    async fn renew_on(
        &self,
        pool: &PgPool,
        key: &str,
        claim: &Bytes,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(self.statements.renew.clone())
            .bind(key)
            .bind(claim.as_ref())
            .bind(millis(lease))
            .execute(pool)
            .await
            .map_err(|error| self.error(error))?;
        Ok(done.rows_affected() == 1)
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

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.statements.table)
            .field("sweeping", &self.sweeper.is_some())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for PostgresStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may carry a password.
        f.debug_struct("PostgresStoreBuilder")
            .field("schema", &self.schema)
            .field("table", &self.table)
            .field("create_table", &self.create_table)
            .field("max_connections", &self.max_connections)
            .field("sweep_every", &self.sweep_every)
            .field("sweep_batch", &self.sweep_batch)
            .finish_non_exhaustive()
    }
}

/// Milliseconds for an interval, capped at a century so `now() + lease` never overflows.
fn millis(duration: Duration) -> i64 {
    const MAX: i64 = 100 * 365 * 24 * 3600 * 1000;
    i64::try_from(duration.as_millis()).map_or(MAX, |ms| ms.clamp(1, MAX))
}

/// How often `begin` asks again when a concurrent claim hid from its snapshot.
const BEGIN_ATTEMPTS: usize = 5;

impl Store for PostgresStore {
    fn begin<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        Box::pin(async move {
            for _ in 0..BEGIN_ATTEMPTS {
                let row = sqlx::query(self.statements.begin.clone())
                    .bind(key)
                    .bind(claim.as_ref())
                    .bind(millis(lease))
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|error| self.error(error))?;
                let Some(row) = row else { continue };
                let claimed: bool = row.try_get(1).map_err(StoreError::backend)?;
                if claimed {
                    return Ok(None);
                }
                let value: Vec<u8> = row.try_get(0).map_err(StoreError::backend)?;
                return Ok(Some(Bytes::from(value)));
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
        // On connections of their own: a pool full of transactions or of the application's
        // queries never holds a renewal back.
        Box::pin(self.renew_on(&self.renewals, key, claim, lease))
    }

    /// Whether the pool's connections, where claims are made, take writes now: an
    /// `UPDATE` that matches no row.
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        static PROBE_CLAIM: Bytes = Bytes::from_static(b"idem readiness probe");
        Box::pin(async move {
            self.renew_on(
                &self.pool,
                "__idem_ready_probe",
                &PROBE_CLAIM,
                Duration::from_millis(1),
            )
            .await
            .map(drop)
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
                    reason: format!(
                        "over the {MAX_RECORD_BYTES} bytes PostgreSQL keeps in one field"
                    ),
                });
            }
            sqlx::query_scalar::<_, bool>(self.statements.complete.clone())
                .bind(key)
                .bind(claim.as_ref())
                .bind(record.as_ref())
                .bind(millis(ttl))
                .fetch_one(&self.pool)
                .await
                .map_err(
                    |error| match error.as_database_error().and_then(|e| e.code()) {
                        // program_limit_exceeded: a row too large, for good.
                        Some(code) if code == "54000" => StoreError::RecordRefused {
                            size,
                            reason: error.to_string(),
                        },
                        _ => self.error(error),
                    },
                )
        })
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
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
                .fetch_optional(&self.pool)
                .await
                .map_err(|error| self.error(error))?;
            Ok(live.unwrap_or(false))
        })
    }
}
