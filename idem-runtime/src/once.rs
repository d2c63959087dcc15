//! `once`: the protocol's second front door, for any async operation. A job, a pipeline
//! step or a call to another service runs at most once per key, and every later call gets
//! the stored result.
//!
//! ```
//! use std::time::Duration;
//! use idem_runtime::{Idempotency, OnceKey};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize, PartialEq, Debug)]
//! struct Invoice {
//!     number: u32,
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let idem = Idempotency::in_memory();
//! let key = OnceKey::compose(["invoice", "cus_42", "2026-11"]);
//! let issue = || async { Ok::<_, std::io::Error>(Invoice { number: 7 }) };
//!
//! let first = idem.once(key.clone(), &"cus_42").ttl(Duration::from_secs(3600)).run(issue).await?;
//! // A retry, a second worker, a restarted job: the stored invoice, and `issue` does not run.
//! let again = idem.once(key, &"cus_42").run_with_outcome(issue).await?;
//! assert_eq!(first, Invoice { number: 7 });
//! assert!(again.is_replay());
//! # Ok(()) }
//! ```

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde::ser::Error as _;
use sha2::{Digest, Sha256};
use tracing::Instrument;

use crate::config::{Idempotency, defaults};
use crate::fingerprint::Fingerprint;
use crate::key::{IdempotencyKey, KeyError, ScopedKey};
use crate::local::expiry_ms;
use crate::protocol::{self, Answer, Begun, Execution, Fallback, TransactionSlot};
use crate::record::Record;
use crate::scope::Scope;

/// The key of a [`once`](Idempotency::once) operation: a valid idempotency key, in a
/// namespace of its own (never the key of an HTTP request).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct OnceKey(IdempotencyKey);

/// The longest part [`OnceKey::compose`] keeps as it is; a longer one is hashed.
const MAX_PLAIN_PART: usize = 64;

impl OnceKey {
    /// A key written as it is: visible ASCII (spaces allowed), 1 to 255 characters.
    ///
    /// ```
    /// use idem_runtime::OnceKey;
    ///
    /// assert!(OnceKey::new("nightly-report-2026-11-24").is_ok());
    /// assert_eq!(OnceKey::new(r#"say "hi" \ bye"#).unwrap().as_str(), r#"say "hi" \ bye"#);
    /// assert!(OnceKey::new("").is_err());
    /// assert!(OnceKey::new("tab\there").is_err());
    /// ```
    pub fn new(key: impl AsRef<str>) -> Result<Self, KeyError> {
        let key = key.as_ref();
        if let Some(position) = key.bytes().position(|b| b != b' ' && !b.is_ascii_graphic()) {
            return Err(KeyError::InvalidCharacter {
                byte: key.as_bytes()[position],
                position,
            });
        }
        // Written as a Structured Field string, so that every visible character, quotes
        // and backslashes included, is part of the key as it is.
        let quoted = format!("\"{}\"", key.replace('\\', "\\\\").replace('"', "\\\""));
        IdempotencyKey::parse(quoted.as_bytes()).map(Self)
    }

    /// Joins `parts` (a user, an action, a digest of the input, ...) into one key that is
    /// always valid, whatever the parts hold, and never the same for two different lists:
    /// each part is written with its length (so `["a:b", "c"]` and `["a", "b:c"]` differ),
    /// and a part that is long or not printable ASCII is replaced by its SHA-256.
    ///
    /// ```
    /// use idem_runtime::OnceKey;
    ///
    /// assert_ne!(OnceKey::compose(["a:b", "c"]), OnceKey::compose(["a", "b:c"]));
    /// let key = OnceKey::compose(["report", "ünïcode\n", &"x".repeat(10_000)]);
    /// assert!(key.as_str().len() <= 255);
    /// ```
    pub fn compose<I, P>(parts: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: AsRef<[u8]>,
    {
        let mut key = String::new();
        for part in parts {
            let part = part.as_ref();
            if !key.is_empty() {
                key.push('/');
            }
            if part.len() <= MAX_PLAIN_PART && part.iter().all(u8::is_ascii_graphic) {
                // Printable ASCII only, so the bytes are a `str`.
                key.push_str(&format!("{}:", part.len()));
                key.push_str(&String::from_utf8_lossy(part));
            } else {
                key.push_str("h:");
                key.push_str(&hex(&Sha256::digest(part)[..16]));
            }
        }
        if key.is_empty() {
            key.push_str("0parts");
        }
        if key.len() > IdempotencyKey::MAX_LEN {
            key = format!("H:{}", hex(&Sha256::digest(key.as_bytes())));
        }
        Self(IdempotencyKey::from_valid(&key))
    }

    /// The key.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    fn scoped(&self) -> ScopedKey {
        ScopedKey::new(Scope::of_once(), self.0.clone())
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

impl fmt::Debug for OnceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("OnceKey").field(&self.as_str()).finish()
    }
}

impl fmt::Display for OnceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a [`once`](Idempotency::once) call gave no value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OnceError<E> {
    /// The operation ran and failed (or, with errors stored, failed on an earlier run).
    #[error("the operation failed: {0}")]
    Operation(E),
    /// The key was used before with another input: nothing ran.
    #[error("the once key was already used with a different input")]
    KeyReused,
    /// The operation runs under this key now, elsewhere, and did not end within the wait.
    #[error("the operation runs under this key already; try again later")]
    InFlight,
    /// The operation ran under this key, but its result could not be stored: too large
    /// for the store, or not written as JSON that reads back as its type (a non-finite
    /// float, which JSON writes as `null`).
    #[error("the operation already ran under this key, and its result was not stored")]
    NotStored,
    /// The store failed or is full: nothing ran.
    #[error("the idempotency store is unavailable; nothing ran")]
    Unavailable,
    /// Too much work runs detached from callers that went away: nothing ran.
    #[error("too much detached work is running; nothing ran")]
    Overloaded,
    /// The operation wrote in a transaction that did not commit, or may not have (its key
    /// was taken over after its lease ran out, or the database did not confirm the
    /// commit): its result is not returned. Call again with the same key: the call gets
    /// the stored result, or runs the operation once its lease has run out.
    #[error("the operation's transaction did not commit; call again with the same key")]
    NotCommitted,
    /// `Once::run_in_transaction` (feature `postgres` or `sqlite`) needs the handle's
    /// store to be the store of the operation's transaction (a `PostgresStore` for a
    /// `PgTransaction`, a `SqliteStore` for a `SqliteTransaction`): nothing ran.
    #[error(
        "running in a transaction needs the idempotency store to be that transaction's store (PostgresStore for PgTransaction, SqliteStore for SqliteTransaction)"
    )]
    NoTransaction,
    /// The input or the result cannot be written as JSON, or holds a non-finite float
    /// (NaN, an infinity), which JSON writes as `null`: an input that does is refused
    /// before anything runs, as `Some(f64::NAN)` and `None` would be one input.
    #[error("cannot serialize the {what} as JSON: {source}")]
    Serialize {
        /// "input" or "result".
        what: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The stored result cannot be read as the type asked for (another type stored under
    /// the same key, or a changed type).
    #[error("the stored result cannot be read as this type: {0}")]
    Deserialize(#[source] serde_json::Error),
    /// An earlier run failed with this error, stored by
    /// [`run_storing_errors`](Once::run_storing_errors): the operation did not run in this
    /// call.
    #[error("the operation failed on an earlier run: {0}")]
    Replayed(E),
    /// An earlier run failed and its error was stored (by
    /// [`run_storing_errors`](Once::run_storing_errors)); read it with that method.
    #[error(
        "the operation failed on an earlier run and its error is stored; read it with `run_storing_errors`"
    )]
    StoredFailure,
}

impl<E> OnceError<E> {
    /// Whether this is the stored error of an earlier run ([`OnceError::Replayed`]), not
    /// a failure of this call.
    pub fn is_replay(&self) -> bool {
        matches!(self, Self::Replayed(_))
    }

    /// The operation's own error, from this call ([`OnceError::Operation`]) or stored by
    /// an earlier one ([`OnceError::Replayed`]).
    pub fn operation_error(&self) -> Option<&E> {
        match self {
            Self::Operation(error) | Self::Replayed(error) => Some(error),
            _ => None,
        }
    }
}

/// What a [`once`](Idempotency::once) call returned: the value of a run that happened now,
/// or of one stored earlier.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Outcome<T> {
    /// The operation ran in this call.
    Ran(T),
    /// The operation did not run: this is the stored result of an earlier run.
    Replayed(T),
}

impl<T> Outcome<T> {
    /// Whether the value is a stored one, from an earlier run.
    pub fn is_replay(&self) -> bool {
        matches!(self, Self::Replayed(_))
    }

    /// The value, however it was obtained.
    pub fn into_inner(self) -> T {
        match self {
            Self::Ran(value) | Self::Replayed(value) => value,
        }
    }
}

/// One [`once`](Idempotency::once) call, configured and ready to [`run`](Self::run).
#[must_use = "a once call does nothing until `run`"]
pub struct Once {
    idem: Idempotency,
    key: OnceKey,
    input: Result<Fingerprint, serde_json::Error>,
    ttl: Duration,
    wait: Option<Duration>,
}

impl Idempotency {
    /// Runs an async operation at most once per `key`, and gives every later call its
    /// stored result. `input` is what the operation works on: its canonical JSON is
    /// fingerprinted, and the same key with another input is refused
    /// ([`OnceError::KeyReused`]): inputs are compared by their JSON, so two values your
    /// type writes alike are one input. An input holding a non-finite float (which JSON
    /// writes as `null`) is refused with [`OnceError::Serialize`], nothing run.
    ///
    /// The same protocol as for HTTP requests, on the same store: one claim with a
    /// renewed lease, completion under the fencing check. A call while the operation
    /// runs elsewhere waits for its result (up to [`defaults::ONCE_WAIT`]; see
    /// [`Once::wait`]). `Ok` results are stored for the ttl (default
    /// [`defaults::TTL`]); errors are not (the next call runs again) unless
    /// [`Once::run_storing_errors`] is used. A panic releases the key. A caller that
    /// drops the call does not cancel the operation: it runs to the end in a task of its
    /// own and its result is stored.
    ///
    /// That task, the lease's renewals, and a completion retried after the store failed
    /// (the call has its value already) run on the caller's Tokio runtime. A runtime
    /// dropped while they run ends them as a crash would: the result is not stored, the
    /// key frees itself when its lease runs out, and a later call runs the operation
    /// again. Before dropping a runtime made for a few calls (a `block_on` in synchronous
    /// code), await [`shutdown`](Idempotency::shutdown) on it: it returns once they have
    /// ended.
    pub fn once<I: Serialize + ?Sized>(&self, key: OnceKey, input: &I) -> Once {
        // JSON writes a non-finite float as `null`: `Some(f64::NAN)` and `None` would be
        // one input.
        let input = crate::finite::check(input)
            .map_err(serde_json::Error::custom)
            .and_then(|()| serde_json::to_vec(input))
            .map(|json| Fingerprint::of_input(&json));
        Once {
            idem: self.clone(),
            key,
            input,
            ttl: defaults::TTL,
            wait: Some(defaults::ONCE_WAIT),
        }
    }
}

impl Once {
    /// The shortest ttl: one second. Calls waiting for a run look for its result at most
    /// half a second apart, so a result kept for less could expire before a waiter sees
    /// it, and that waiter would run the operation again.
    pub const MIN_TTL: Duration = Duration::from_secs(1);

    /// How long the result is kept (default [`defaults::TTL`], at most
    /// [`defaults::MAX_DURATION`], at least [`Once::MIN_TTL`]).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.clamp(Self::MIN_TTL, defaults::MAX_DURATION);
        self
    }

    /// How long a call waits for the operation running under the same key elsewhere
    /// (default [`defaults::ONCE_WAIT`]); past it the call answers
    /// [`OnceError::InFlight`].
    pub fn wait(mut self, max: Duration) -> Self {
        self.wait = Some(max.min(defaults::MAX_DURATION));
        self
    }

    /// Answers [`OnceError::InFlight`] at once while the operation runs elsewhere, instead
    /// of waiting for its result.
    pub fn no_wait(mut self) -> Self {
        self.wait = None;
        self
    }

    /// Runs `operation` unless a result is stored under the key, and returns the value.
    /// An `Err` is returned as [`OnceError::Operation`] and not stored.
    pub async fn run<T, E, F, Fut>(self, operation: F) -> Result<T, OnceError<E>>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        E: Send + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        self.run_with_outcome(operation)
            .await
            .map(Outcome::into_inner)
    }

    /// As [`run`](Self::run), telling a fresh run from a replay.
    pub async fn run_with_outcome<T, E, F, Fut>(
        self,
        operation: F,
    ) -> Result<Outcome<T>, OnceError<E>>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        E: Send + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        self.execute(operation, ErrorsNotStored, TransactionSlot::default())
            .await
    }

    /// As [`run_with_outcome`](Self::run_with_outcome), with the operation writing in a
    /// transaction of the store's own database (feature `postgres` or `sqlite`): the
    /// stored result commits in that transaction, with the operation's writes, under the
    /// fencing check; an `Err` or a panic rolls them back and releases the key. The
    /// operation's argument says which transaction: a `PgTransaction` on a
    /// `PostgresStore`, a `SqliteTransaction` on a `SqliteStore` (see
    /// [`DatabaseTransaction`](crate::store::DatabaseTransaction), and each type for
    /// what this guarantees); name its type where the closure does not
    /// (`|tx: SqliteTransaction| ...`). An `Err` is never stored here.
    /// [`OnceError::NotCommitted`] when the commit did not happen (or may not have);
    /// [`OnceError::NoTransaction`] when the handle's store is not the transaction's.
    ///
    /// ```no_run
    /// # #[cfg(feature = "sqlite")]
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use idem_runtime::{Idempotency, OnceKey, store::{SqliteStore, SqliteTransaction}};
    ///
    /// let idem = Idempotency::builder()
    ///     .store(SqliteStore::connect("sqlite://app.db").await?)
    ///     .build();
    /// let invoice = idem
    ///     .once(OnceKey::compose(["invoice", "cus_42", "2026-11"]), &"cus_42")
    ///     .run_in_transaction(|tx: SqliteTransaction| async move {
    ///         let mut conn = tx.conn().await?;
    ///         sqlx::query("INSERT INTO invoices (customer) VALUES ('cus_42')")
    ///             .execute(&mut *conn)
    ///             .await?;
    ///         Ok::<_, sqlx::Error>(7)
    ///     })
    ///     .await?;
    /// # drop(invoice);
    /// # Ok(()) }
    /// ```
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    pub async fn run_in_transaction<T, E, F, Fut, Tx>(
        self,
        operation: F,
    ) -> Result<Outcome<T>, OnceError<E>>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        E: Send + 'static,
        F: FnOnce(Tx) -> Fut,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        Tx: crate::store::DatabaseTransaction,
    {
        let slot = TransactionSlot::default();
        let Some(transaction) = Tx::on_store(self.idem.store().as_ref(), slot.finish_flag()) else {
            return Err(OnceError::NoTransaction);
        };
        slot.finished_by_idem();
        slot.fill(transaction.transactional());
        self.execute(move || operation(transaction), ErrorsNotStored, slot)
            .await
    }

    /// As [`run_with_outcome`](Self::run_with_outcome), but an `Err` is stored too: every
    /// later call gets the same error as [`OnceError::Replayed`], and the operation does
    /// not run again.
    pub async fn run_storing_errors<T, E, F, Fut>(
        self,
        operation: F,
    ) -> Result<Outcome<T>, OnceError<E>>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        E: Serialize + DeserializeOwned + Send + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        self.execute(operation, ErrorsStored, TransactionSlot::default())
            .await
    }

    async fn execute<T, E, F, Fut, P>(
        self,
        operation: F,
        errors: P,
        transaction: TransactionSlot,
    ) -> Result<Outcome<T>, OnceError<E>>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        E: Send + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        P: ErrorPolicy<E>,
    {
        let fingerprint = self.input.map_err(|source| OnceError::Serialize {
            what: "input",
            source,
        })?;
        let scoped = self.key.scoped();
        let span = tracing::info_span!(target: "idem", "idem_once", key = %self.idem.logged_key(&self.key, &scoped));
        // `begin` answers from the local tier, or refuses, before its future is first
        // polled: those logs belong to the span too.
        let begun = span
            .in_scope(|| {
                protocol::begin(
                    &self.idem,
                    scoped,
                    fingerprint,
                    self.ttl,
                    self.wait,
                    transaction,
                    None,
                )
            })
            .instrument(span.clone())
            .await;
        match begun {
            Begun::Execute(execution) => {
                let detached = self.idem.shared.detached.clone();
                let work = operation();
                let finish = move |execution, result| first_run(execution, result, errors);
                protocol::to_the_end(detached, execution.run_then(work, finish).instrument(span))
                    .await
            }
            Begun::Answer(answer) | Begun::Local(answer) => stored(answer, &errors),
            Begun::Unprotected(_) => Err(OnceError::Unavailable),
        }
    }
}

/// What happens after a first run: the operation ran holding the key, and its result is
/// stored (an error only when errors are stored; otherwise the key is released).
#[allow(
    clippy::manual_async_fn,
    reason = "an `async fn` holds each argument twice: as passed, and moved into its body"
)]
fn first_run<T, E, P>(
    mut execution: Execution,
    result: Result<T, E>,
    errors: P,
) -> impl Future<Output = Result<Outcome<T>, OnceError<E>>>
where
    T: Serialize + DeserializeOwned,
    P: ErrorPolicy<E>,
{
    // Not an `async fn`, which would hold the execution and the result twice.
    async move {
        let (ok, json) = match &result {
            Ok(value) => (true, to_json_read_back(value)),
            Err(error) => match errors.encode(error) {
                Some(json) => (false, json),
                None => {
                    tracing::debug!(target: "idem", "the operation failed; releasing the key");
                    execution.release().await;
                    return result.map(Outcome::Ran).map_err(OnceError::Operation);
                }
            },
        };
        let fingerprint = *execution.fingerprint();
        let json = match json {
            Ok(json) => Bytes::from(json),
            Err(error) => {
                // The operation ran: releasing the key would let the next call run it again.
                // The key records that it ran, without its result.
                tracing::error!(target: "idem", %error, "the result cannot be written as JSON that reads back as its type; later calls will be told it was not stored");
                let transactional = execution.in_transaction();
                let not_stored = Record::ValueNotStored {
                    fingerprint,
                    len: 0,
                }
                .encode();
                let completion = execution.complete(not_stored, Fallback::None).await;
                if transactional && completion.undone() {
                    return Err(OnceError::NotCommitted);
                }
                return result.map(Outcome::Ran).map_err(OnceError::Operation);
            }
        };
        let fallback = Fallback::Value {
            len: json.len() as u64,
        };
        let record = Record::Value {
            fingerprint,
            expires_at_ms: expiry_ms(execution.ttl()),
            ok,
            json,
        }
        .encode();
        let transactional = execution.in_transaction();
        let completion = execution.complete(record, fallback).await;
        if transactional && completion.undone() {
            return Err(OnceError::NotCommitted);
        }
        result.map(Outcome::Ran).map_err(OnceError::Operation)
    }
}

/// `value` as JSON, if it holds no non-finite float (serde_json writes one as `null`,
/// which reads back as `None`, or not at all) and reads back as `T`: what a replay will
/// read. A result stored that no replay reads would answer every later call with an
/// error for the key's whole TTL. Read back once, and dropped.
///
/// The operation has run: a panic in the value's own `Serialize` or `Deserialize` is
/// caught here and taken as a value that cannot be stored, for a panic past this point
/// would release the key and let the next call run the operation again.
fn to_json_read_back<T: Serialize + DeserializeOwned>(
    value: &T,
) -> Result<Vec<u8>, serde_json::Error> {
    let written = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        crate::finite::check(value).map_err(serde_json::Error::custom)?;
        let json = serde_json::to_vec(value)?;
        serde_json::from_slice::<T>(&json)?;
        Ok(json)
    }));
    written.unwrap_or_else(|_| {
        Err(serde_json::Error::custom(
            "writing it as JSON, or reading that back, panicked",
        ))
    })
}

/// What happens on a replay, or any other answer: the stored result, or why there is none.
fn stored<T, E, P>(answer: Answer, errors: &P) -> Result<Outcome<T>, OnceError<E>>
where
    T: DeserializeOwned,
    P: ErrorPolicy<E>,
{
    match answer {
        Answer::Completed(record) => match Record::decode(&record) {
            Ok(Record::Value { ok: true, json, .. }) => serde_json::from_slice(&json)
                .map(Outcome::Replayed)
                .map_err(OnceError::Deserialize),
            Ok(Record::Value {
                ok: false, json, ..
            }) => match errors.decode(&json) {
                Some(error) => Err(OnceError::Replayed(error.map_err(OnceError::Deserialize)?)),
                None => Err(OnceError::StoredFailure),
            },
            // A record of another front door, or one that does not read: never mistaken
            // for a result.
            _ => {
                tracing::error!(target: "idem", "the record under a once key is not a stored result");
                Err(OnceError::Unavailable)
            }
        },
        Answer::NotStored(_) => Err(OnceError::NotStored),
        Answer::KeyReused => Err(OnceError::KeyReused),
        Answer::InFlight => Err(OnceError::InFlight),
        Answer::Overloaded => Err(OnceError::Overloaded),
        Answer::Unavailable => Err(OnceError::Unavailable),
    }
}

/// Whether errors are stored, and how they are written and read.
trait ErrorPolicy<E>: Send + 'static {
    /// The error as JSON, when errors are stored.
    fn encode(&self, error: &E) -> Option<Result<Vec<u8>, serde_json::Error>>;
    /// A stored error, when errors are stored.
    fn decode(&self, json: &[u8]) -> Option<Result<E, serde_json::Error>>;
}

/// `run` and `run_with_outcome`: an error releases the key.
struct ErrorsNotStored;

impl<E> ErrorPolicy<E> for ErrorsNotStored {
    fn encode(&self, _: &E) -> Option<Result<Vec<u8>, serde_json::Error>> {
        None
    }

    fn decode(&self, _: &[u8]) -> Option<Result<E, serde_json::Error>> {
        None
    }
}

/// `run_storing_errors`: an error is stored like a value.
struct ErrorsStored;

impl<E: Serialize + DeserializeOwned> ErrorPolicy<E> for ErrorsStored {
    fn encode(&self, error: &E) -> Option<Result<Vec<u8>, serde_json::Error>> {
        Some(to_json_read_back(error))
    }

    fn decode(&self, json: &[u8]) -> Option<Result<E, serde_json::Error>> {
        Some(serde_json::from_slice(json))
    }
}
