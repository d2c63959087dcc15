//! The embedded in-memory store.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::contract::{BoxFuture, Store, StoreError};
use crate::sharded::{Expiring, Hasher, LARGEST_BOUND, Recent, Shards};

/// An in-process store, bounded by entries and bytes, expiring by TTL.
///
/// Good for one instance and for tests. It is not shared between processes: behind a
/// load balancer, use [`RedisStore`](crate::store::RedisStore).
///
/// Claims (executions in flight) and completed records are held apart:
///
/// - A **claim** is never evicted: it stays until its execution completes or releases
///   it, or its lease runs out. Claims are bounded by count ([`MemoryStore::DEFAULT_MAX_CLAIMS`]);
///   when that many executions are in flight, a new one is refused with a store error
///   (the request is answered `503`, never run unprotected).
/// - **Completed records** live in [lru] maps bounded by entries and bytes. When the store
///   is full, the least recently used records are evicted before their TTL, and an
///   evicted key behaves like an unused one: size the bounds for the traffic of one TTL.
///   A new record is always admitted. Each live record evicted counts in the
///   `idem_memory_evictions_total` counter, and the first one logs a warning.
///
/// Keys are spread over shards (up to 64, each holding at least 16 MiB of the byte bound
/// and 32 of the entry bound, or the whole bounds if they are smaller), each a claim map
/// and a record map behind one lock: every step on a key is one short critical section.
/// The bounds are divided among the shards, so a store holds about, not exactly, its
/// bounds' worth of records (given exactly as many records as its entry bound, the default
/// store keeps all but a fraction of a percent, those of its fullest shards: leave some
/// headroom); a record heavier than one shard's share of the byte bound is
/// refused at completion, which idem records as a response that was not stored (a retry
/// is told so; the handler never runs again).
///
/// Expired records are never answered; they are dropped when a step reads them, by a
/// shard that needs room (it drops its expired records before it evicts a live one), or
/// by [`run_pending_tasks`](Self::run_pending_tasks). Nothing runs in the background.
#[derive(Clone)]
pub struct MemoryStore {
    shards: Arc<Shards<Shard>>,
    claims: Arc<AtomicUsize>,
    max_claims: usize,
    /// The byte bound of each shard's records, and so the heaviest record kept.
    shard_bytes: u64,
    /// The entry bound of each shard's records.
    shard_entries: usize,
    slot: u64,
    evictions: Arc<Evictions>,
}

/// How the store tells that it evicts live records: `idem_memory_evictions_total`, and one
/// warning the first time.
#[derive(Default)]
struct Evictions {
    /// Registered at the first eviction, with the recorder installed then.
    counter: OnceLock<metrics::Counter>,
    warned: AtomicBool,
}

impl Evictions {
    fn report(&self, evicted: usize) {
        self.counter
            .get_or_init(|| metrics::counter!("idem_memory_evictions_total"))
            .increment(evicted as u64);
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(target: "idem", "the memory store is full: it evicts records before their TTL, and a retry of an evicted key runs again; raise its bounds to hold one TTL of traffic (idem_memory_evictions_total counts evictions)");
        }
    }
}

/// The claims and records of the keys that hash to one shard: a step reads and writes
/// one key under the lock of its shard, which makes it atomic against every other step
/// on that key.
struct Shard {
    claims: HashMap<Arc<str>, Entry, Hasher>,
    records: Recent<Record>,
}

/// A claim: the claim's bytes, until its lease runs out.
#[derive(Clone)]
struct Entry {
    value: Bytes,
    expires_at: Instant,
}

impl Entry {
    fn is_live(&self, now: Instant) -> bool {
        self.expires_at > now
    }
}

/// A completed record, until its TTL runs out.
#[derive(Clone)]
struct Record {
    value: Bytes,
    expires_at: Instant,
    weight: u64,
}

impl Expiring for Record {
    fn weight(&self, _: &str) -> u64 {
        self.weight
    }

    fn expires_at(&self) -> Instant {
        self.expires_at
    }
}

/// Bytes an entry costs beyond its key and value: the map's bookkeeping, its expiry
/// index, the allocations behind the key and record, and allocator slack, as measured
/// with the `memory` benchmark and `tests/memory_review.rs`'s probe (resident growth per
/// entry minus key and record bytes: 17 to 42 bytes over 256 for keys of 33 to 288
/// bytes).
const ENTRY_OVERHEAD: u64 = 300;

/// Bounds a [`MemoryStore`] cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BoundsError {
    /// The entry bound is zero.
    #[error("a memory store must hold at least 1 entry (got max_entries = 0)")]
    NoEntries,
    /// The byte bound cannot hold one record.
    #[error(
        "a memory store bound of {0} bytes cannot hold a record: the minimum is {min} bytes",
        min = MemoryStore::MIN_BYTES
    )]
    TooFewBytes(u64),
    /// The claim bound is zero.
    #[error("a memory store must hold at least 1 claim (got max_claims = 0)")]
    NoClaims,
}

impl MemoryStore {
    /// Default bound on completed records held.
    pub const DEFAULT_MAX_ENTRIES: u64 = 100_000;
    /// Default bound on the bytes of completed records (keys, records and overhead).
    pub const DEFAULT_MAX_BYTES: u64 = 256 * 1024 * 1024;
    /// Default bound on claims held at once: executions in flight.
    pub const DEFAULT_MAX_CLAIMS: usize = 10_000;
    /// The smallest byte bound a store accepts: room for one completed record of the
    /// longest key, a small response and the per-entry overhead.
    pub const MIN_BYTES: u64 = 1024;

    /// A store bounded by [`MemoryStore::DEFAULT_MAX_ENTRIES`], [`MemoryStore::DEFAULT_MAX_BYTES`] and
    /// [`MemoryStore::DEFAULT_MAX_CLAIMS`].
    pub fn new() -> Self {
        Self::build(
            Self::DEFAULT_MAX_ENTRIES,
            Self::DEFAULT_MAX_BYTES,
            Self::DEFAULT_MAX_CLAIMS,
        )
    }

    /// A store holding at most `max_entries` completed records and `max_bytes` bytes of
    /// them, whichever bound is reached first, and [`MemoryStore::DEFAULT_MAX_CLAIMS`] claims. Bytes
    /// count keys, records and a measured per-entry overhead, so that `max_bytes` tracks
    /// the resident memory the store adds.
    ///
    /// ```
    /// use idem_runtime::store::MemoryStore;
    ///
    /// let store = MemoryStore::with_bounds(10_000, 64 << 20)?;
    /// assert!(MemoryStore::with_bounds(10_000, MemoryStore::MIN_BYTES - 1).is_err());
    /// # Ok::<(), idem_runtime::store::BoundsError>(())
    /// ```
    pub fn with_bounds(max_entries: u64, max_bytes: u64) -> Result<Self, BoundsError> {
        Self::with_limits(max_entries, max_bytes, Self::DEFAULT_MAX_CLAIMS)
    }

    /// [`with_bounds`](Self::with_bounds), and at most `max_claims` executions in flight
    /// at once; one more is refused with a store error (`503`).
    pub fn with_limits(
        max_entries: u64,
        max_bytes: u64,
        max_claims: usize,
    ) -> Result<Self, BoundsError> {
        if max_entries == 0 {
            return Err(BoundsError::NoEntries);
        }
        if max_bytes < Self::MIN_BYTES {
            return Err(BoundsError::TooFewBytes(max_bytes));
        }
        if max_claims == 0 {
            return Err(BoundsError::NoClaims);
        }
        Ok(Self::build(max_entries, max_bytes, max_claims))
    }

    fn build(max_entries: u64, max_bytes: u64, max_claims: usize) -> Self {
        let max_bytes = max_bytes.min(LARGEST_BOUND);
        let shards = Shards::new(max_bytes, max_entries, || Shard {
            claims: HashMap::with_hasher(Hasher::default()),
            records: Recent::new(),
        });
        let shard_bytes = max_bytes / shards.count();
        let shard_entries = (max_entries / shards.count()).max(1);
        // Each record weighs at least one "slot" of its shard's bytes per entry, so the
        // shard's weight bound also bounds its entry count; the count is bounded as well,
        // exactly, since the slot is rounded down.
        let slot = (shard_bytes / shard_entries).max(1);
        Self {
            shard_bytes,
            shard_entries: usize::try_from(shard_entries).unwrap_or(usize::MAX),
            shards: Arc::new(shards),
            claims: Arc::new(AtomicUsize::new(0)),
            max_claims,
            slot,
            evictions: Arc::default(),
        }
    }

    /// Completed records currently held, counting expired ones not yet dropped.
    pub fn entry_count(&self) -> u64 {
        self.shards
            .each()
            .map(|shard| shard.records.len() as u64)
            .sum()
    }

    /// Claims currently held: executions in flight (and claims whose lease ran out and
    /// that no step has looked at since).
    pub fn claim_count(&self) -> usize {
        self.claims.load(Ordering::Relaxed)
    }

    /// The total weight of completed records: bytes of keys, records and per-entry
    /// overhead, or the per-entry minimum where that is larger; expired records not yet
    /// dropped count.
    pub fn weighted_size(&self) -> u64 {
        self.shards.each().map(|shard| shard.records.weight()).sum()
    }

    /// Drops every expired record and claim now. Evictions need no call: a full store
    /// evicts as it admits a record.
    pub fn run_pending_tasks(&self) {
        let now = Instant::now();
        for mut shard in self.shards.each() {
            shard.records.remove_expired(now);
        }
        self.sweep_expired_claims();
    }

    /// The live claim under `key`, dropping one whose lease ran out.
    fn live_claim<'s>(&self, shard: &'s mut Shard, key: &str, now: Instant) -> Option<&'s Entry> {
        if shard
            .claims
            .get(key)
            .is_some_and(|entry| !entry.is_live(now))
        {
            shard.claims.remove(key);
            self.claims.fetch_sub(1, Ordering::Relaxed);
        }
        shard.claims.get(key)
    }

    /// Drops every claim whose lease ran out, one shard at a time.
    fn sweep_expired_claims(&self) {
        let now = Instant::now();
        for mut shard in self.shards.each() {
            let before = shard.claims.len();
            shard.claims.retain(|_, entry| entry.is_live(now));
            self.claims
                .fetch_sub(before - shard.claims.len(), Ordering::Relaxed);
        }
    }

    fn try_claim(&self, key: &str, claim: &Bytes, lease: Duration) -> ClaimAttempt {
        let now = Instant::now();
        let mut shard = self.shards.of(key);
        if let Some(existing) = shard.records.live(key, now) {
            return ClaimAttempt::Found(existing.value.clone());
        }
        if let Some(existing) = self.live_claim(&mut shard, key, now) {
            return ClaimAttempt::Found(existing.value.clone());
        }
        // Checked and counted in one step: claims on other shards count at the same time.
        let counted = self
            .claims
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                (held < self.max_claims).then_some(held + 1)
            });
        if counted.is_err() {
            return ClaimAttempt::Full;
        }
        shard.claims.insert(
            Arc::from(key),
            Entry {
                value: claim.clone(),
                expires_at: deadline(now, lease),
            },
        );
        ClaimAttempt::Taken
    }
}

enum ClaimAttempt {
    Taken,
    Found(Bytes),
    Full,
}

fn weight(key: &str, value: &Bytes, slot: u64) -> u64 {
    (key.len() as u64 + value.len() as u64 + ENTRY_OVERHEAD).max(slot)
}

/// `now + after`, capped far in the future instead of overflowing. `now` is read before
/// the shard's lock is taken: a deadline is never later than it would be read after.
fn deadline(now: Instant, after: Duration) -> Instant {
    now.checked_add(after)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(now)
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.entry_count())
            .field("weighted_size", &self.weighted_size())
            .field("claims", &self.claim_count())
            .finish()
    }
}

/// The store's steps, answered at once: what its [`Store`] methods answer, and what the
/// protocol calls directly on a handle whose store is a `MemoryStore`, with no future to
/// box and no timeout to arm.
impl MemoryStore {
    pub(crate) fn begin_now(
        &self,
        key: &str,
        claim: &Bytes,
        lease: Duration,
    ) -> Result<Option<Bytes>, StoreError> {
        match self.try_claim(key, claim, lease) {
            ClaimAttempt::Taken => Ok(None),
            ClaimAttempt::Found(existing) => Ok(Some(existing)),
            ClaimAttempt::Full => {
                self.sweep_expired_claims();
                match self.try_claim(key, claim, lease) {
                    ClaimAttempt::Taken => Ok(None),
                    ClaimAttempt::Found(existing) => Ok(Some(existing)),
                    ClaimAttempt::Full => Err(StoreError::Full(format!(
                        "the memory store holds its maximum of {} executions in flight",
                        self.max_claims
                    ))),
                }
            }
        }
    }

    pub(crate) fn renew_now(
        &self,
        key: &str,
        claim: &Bytes,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut shard = self.shards.of(key);
        let renewed = match self.live_claim(&mut shard, key, now) {
            Some(current) if current.value == *claim => {
                if let Some(entry) = shard.claims.get_mut(key) {
                    entry.expires_at = deadline(now, lease);
                }
                true
            }
            _ => false,
        };
        Ok(renewed)
    }

    pub(crate) fn complete_now(
        &self,
        key: &str,
        claim: &Bytes,
        record: Bytes,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut shard = self.shards.of(key);
        match self.live_claim(&mut shard, key, now) {
            Some(current) if current.value == *claim => {
                let weight = weight(key, &record, self.slot);
                if weight > self.shard_bytes {
                    return Err(StoreError::RecordRefused {
                        size: record.len() as u64,
                        reason: format!(
                            "with its key and overhead it weighs {weight} bytes, over the {} bytes of the store's bound one key's share holds",
                            self.shard_bytes
                        ),
                    });
                }
                let record = Record {
                    value: record,
                    expires_at: deadline(now, ttl),
                    weight,
                };
                // The record is kept under the claim's own copy of the key.
                let key = shard
                    .claims
                    .remove_entry(key)
                    .map_or_else(|| Arc::from(key), |(key, _)| key);
                self.claims.fetch_sub(1, Ordering::Relaxed);
                let evicted =
                    shard
                        .records
                        .keep_shared(key, record, self.shard_bytes, self.shard_entries);
                drop(shard);
                if evicted > 0 {
                    self.evictions.report(evicted);
                }
                Ok(true)
            }
            Some(_) => Ok(false),
            // Applied already (a step sent twice): the record is there.
            None => Ok(shard
                .records
                .live(key, now)
                .is_some_and(|stored| stored.value == record)),
        }
    }

    pub(crate) fn release_now(&self, key: &str, claim: &Bytes) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut shard = self.shards.of(key);
        let released = match self.live_claim(&mut shard, key, now) {
            Some(current) if current.value == *claim => {
                shard.claims.remove(key);
                self.claims.fetch_sub(1, Ordering::Relaxed);
                true
            }
            _ => false,
        };
        Ok(released)
    }
}

impl Store for MemoryStore {
    fn begin<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        Box::pin(std::future::ready(self.begin_now(key, claim, lease)))
    }

    fn renew<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(std::future::ready(self.renew_now(key, claim, lease)))
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        record: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(std::future::ready(
            self.complete_now(key, claim, record, ttl),
        ))
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(std::future::ready(self.release_now(key, claim)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards: a full store admits every new claim (a refused claim would let a second
    /// request run), however often the entries already there were read.
    #[tokio::test]
    async fn a_full_store_admits_new_claims() {
        let store = MemoryStore::with_bounds(50, 1 << 30).unwrap();
        let lease = Duration::from_secs(60);
        for n in 0..50 {
            let key = format!("old-{n}");
            let value = Bytes::from(format!("value-{n}"));
            store.begin(&key, &value, lease).await.unwrap();
            for _ in 0..5 {
                assert!(store.begin(&key, &value, lease).await.unwrap().is_some());
            }
        }
        store.run_pending_tasks();
        for n in 0..50 {
            let key = format!("new-{n}");
            let claim = Bytes::from(format!("claim-{n}"));
            assert_eq!(store.begin(&key, &claim, lease).await.unwrap(), None);
            store.run_pending_tasks();
            let other = Bytes::from_static(b"second request");
            assert_eq!(
                store.begin(&key, &other, lease).await.unwrap(),
                Some(claim),
                "claim {n} was kept"
            );
        }
    }

    async fn complete_new(store: &MemoryStore, key: &str) {
        let claim = Bytes::from(format!("claim of {key}"));
        let lease = Duration::from_secs(60);
        assert_eq!(store.begin(key, &claim, lease).await.unwrap(), None);
        let record = Bytes::from(format!("record of {key}"));
        assert!(store.complete(key, &claim, record, lease).await.unwrap());
    }

    async fn replayed(store: &MemoryStore, key: &str) -> bool {
        let other = Bytes::from_static(b"a retry");
        let found = store
            .begin(key, &other, Duration::from_secs(60))
            .await
            .unwrap();
        found == Some(Bytes::from(format!("record of {key}")))
    }

    /// Guards: a full store keeps each new record for about as many later completions as
    /// it holds records (in order of completion), not for a small fraction of them, and
    /// not less when every record it holds was replayed since; a key evicted early would
    /// run its handler again on a retry.
    #[tokio::test]
    async fn a_full_store_keeps_new_records_for_its_whole_bound() {
        const BOUND: usize = 100_000;
        for replays in [0, 2] {
            let store = MemoryStore::with_bounds(BOUND as u64, 1 << 30).unwrap();
            for n in 0..BOUND {
                complete_new(&store, &format!("old-{n}")).await;
            }
            for _ in 0..replays {
                for n in 0..BOUND {
                    // Those the store still holds (the bound is divided among shards, and
                    // a shard that drew more keys than its share let its oldest go).
                    replayed(&store, &format!("old-{n}")).await;
                }
            }
            for round in 0..2 {
                for n in 0..BOUND / 2 {
                    complete_new(&store, &format!("new-{round}-{n}")).await;
                }
                let mut kept = 0;
                for n in 0..BOUND / 2 {
                    kept += usize::from(replayed(&store, &format!("new-{round}-{n}")).await);
                }
                assert_eq!(
                    kept,
                    BOUND / 2,
                    "the newest half of a full store's records are kept (old records replayed {replays} times, round {round})"
                );
            }
            assert!(store.entry_count() <= BOUND as u64);
        }
    }

    /// Guards: a record the store accepts at completion is kept (a cache drops silently
    /// what it cannot hold), and one heavier is refused with an error.
    #[tokio::test]
    async fn the_heaviest_record_accepted_is_kept() {
        let store = MemoryStore::with_bounds(10, 64 << 20).unwrap();
        let lease = Duration::from_secs(60);
        let key = "heavy";
        let heaviest = store.shard_bytes - ENTRY_OVERHEAD - key.len() as u64;
        let claim = Bytes::from_static(b"claim");
        store.begin(key, &claim, lease).await.unwrap();
        let record = Bytes::from(vec![b'r'; usize::try_from(heaviest).unwrap()]);
        assert!(
            store
                .complete(key, &claim, record.clone(), lease)
                .await
                .unwrap()
        );
        let retry = Bytes::from_static(b"retry");
        let found = store.begin(key, &retry, lease).await.unwrap();
        assert!(found == Some(record), "the heaviest record is kept");

        let key = "heavier";
        store.begin(key, &claim, lease).await.unwrap();
        let record = Bytes::from(vec![b'r'; usize::try_from(heaviest).unwrap() + 1]);
        let refused = store.complete(key, &claim, record, lease).await;
        assert!(
            matches!(refused, Err(StoreError::RecordRefused { .. })),
            "{refused:?}"
        );
    }

    /// Guards: a store accepts the bounds it is built with and then stores a small record
    /// under them: with fewer entries than shards (10 entries, 1 GiB) every record must
    /// not weigh more than one shard's share, or every response goes unstored.
    #[tokio::test]
    async fn a_store_of_few_entries_and_many_bytes_stores_a_small_record() {
        let store = MemoryStore::with_bounds(10, 1 << 30).unwrap();
        let lease = Duration::from_secs(60);
        let claim = Bytes::from_static(b"claim");
        assert_eq!(store.begin("k", &claim, lease).await.unwrap(), None);
        let stored = store
            .complete("k", &claim, Bytes::from_static(b"small record"), lease)
            .await;
        assert!(matches!(stored, Ok(true)), "a 12-byte record: {stored:?}");
    }

    /// Guards: a store bounded at 100 records keeps the 50 it was given (half its bound),
    /// so none of their keys runs again on a retry; sharding must not shrink the bound to
    /// one record per shard.
    #[tokio::test]
    async fn a_store_keeps_half_its_entry_bound_when_entries_are_few() {
        let store = MemoryStore::with_bounds(100, 1 << 30).unwrap();
        for n in 0..50 {
            complete_new(&store, &format!("key-{n}")).await;
        }
        let mut kept = 0;
        for n in 0..50 {
            kept += usize::from(replayed(&store, &format!("key-{n}")).await);
        }
        assert_eq!(kept, 50, "records kept of 50 in a store bounded at 100");
    }

    /// Guards: `with_bounds(max_entries, ..)` holds at most `max_entries` completed records
    /// (here one shard, so no division among shards excuses more).
    #[tokio::test]
    async fn a_store_holds_no_more_records_than_its_entry_bound() {
        let store = MemoryStore::with_bounds(1000, 300_999).unwrap();
        let lease = Duration::from_secs(60);
        for n in 0..1100 {
            let key = format!("k{n}");
            let claim = Bytes::from_static(b"c");
            assert_eq!(store.begin(&key, &claim, lease).await.unwrap(), None);
            assert!(
                store
                    .complete(&key, &claim, Bytes::from_static(b"r"), lease)
                    .await
                    .unwrap()
            );
        }
        assert!(
            store.entry_count() <= 1000,
            "a store bounded at 1000 records holds {}",
            store.entry_count()
        );
    }

    /// Guards: many tasks beginning one key at once, on many threads, while the winner
    /// completes and a sweep runs: exactly one claim is taken per key, and every other
    /// begin finds the claim or the record, never nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_key_begun_by_many_tasks_is_claimed_once() {
        let store = MemoryStore::with_bounds(64, MemoryStore::MIN_BYTES * 64).unwrap();
        for round in 0..200 {
            let key = format!("race-{round}");
            let tasks: Vec<_> = (0..16)
                .map(|task| {
                    let store = store.clone();
                    let key = key.clone();
                    tokio::spawn(async move {
                        let claim = Bytes::from(format!("claim {task}"));
                        let lease = Duration::from_secs(60);
                        let found = store.begin(&key, &claim, lease).await.unwrap();
                        if found.is_none() {
                            store.run_pending_tasks();
                            assert!(
                                store
                                    .complete(&key, &claim, Bytes::from_static(b"done"), lease)
                                    .await
                                    .unwrap()
                            );
                        }
                        found.is_none()
                    })
                })
                .collect();
            let mut taken = 0;
            for task in tasks {
                taken += usize::from(task.await.unwrap());
            }
            assert_eq!(taken, 1, "round {round}: claims taken");
        }
        assert_eq!(store.claim_count(), 0);
    }

    /// Guards: the claim bound is a bound: beginning keys of different shards at once on
    /// two threads never holds more claims than `max_claims` (a check then an add, each
    /// atomic alone, let both pass).
    #[test]
    fn concurrent_claims_never_pass_the_claim_bound() {
        use std::sync::Barrier;
        for round in 0..20_000 {
            let store = MemoryStore::with_limits(1000, 64 << 20, 1).unwrap();
            let barrier = Arc::new(Barrier::new(2));
            let threads: Vec<_> = (0..2)
                .map(|n| {
                    let store = store.clone();
                    let barrier = barrier.clone();
                    std::thread::spawn(move || {
                        let claim = Bytes::from_static(b"claim");
                        let key = format!("key-{round}-{n}");
                        barrier.wait();
                        let lease = Duration::from_secs(60);
                        futures_executor(store.begin(&key, &claim, lease))
                    })
                })
                .collect();
            let taken = threads
                .into_iter()
                .map(|thread| thread.join().unwrap())
                .filter(|found| matches!(found, Ok(None)))
                .count();
            assert!(
                taken <= 1 && store.claim_count() <= 1,
                "round {round}: {taken} claims taken, {} held, bound 1",
                store.claim_count()
            );
        }
    }

    /// The memory store's steps are ready at once.
    fn futures_executor<T>(future: BoxFuture<'_, T>) -> T {
        let waker = std::task::Waker::noop();
        let mut context = std::task::Context::from_waker(waker);
        let mut future = future;
        match future.as_mut().poll(&mut context) {
            std::task::Poll::Ready(value) => value,
            std::task::Poll::Pending => unreachable!("the memory store never waits"),
        }
    }
}
