//! The embedded in-memory store.

use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::sync::Cache;

/// A fast hasher, seeded at random per process so that keys chosen by clients cannot be
/// aimed at one bucket.
type Hasher = foldhash::quality::RandomState;

use super::{BoxFuture, Store, StoreError};

/// Default bound on entries.
pub const DEFAULT_MAX_ENTRIES: u64 = 100_000;
/// Default bound on stored bytes (keys and records).
pub const DEFAULT_MAX_BYTES: u64 = 256 * 1024 * 1024;

/// An in-process store on a [moka] cache, bounded by entries and bytes, expiring by TTL.
///
/// Good for one instance and for tests. It is not shared between processes: behind a
/// load balancer, use [`RedisStore`](super::RedisStore). When full, the cache evicts the
/// least useful entries; an evicted key behaves like an unused one.
#[derive(Clone)]
pub struct MemoryStore {
    cache: Cache<String, Entry, Hasher>,
    locks: std::sync::Arc<[std::sync::Mutex<()>; LOCK_SHARDS]>,
    shard_hasher: Hasher,
}

/// Each step reads and then writes one key under the lock of the key's shard, which
/// makes the step atomic against every other step at the price of two plain cache
/// operations (cheaper than the cache's own per-key compute).
const LOCK_SHARDS: usize = 64;

#[derive(Clone)]
struct Entry {
    value: Bytes,
    expires_at: Instant,
}

struct Lifetime;

impl moka::Expiry<String, Entry> for Lifetime {
    fn expire_after_create(&self, _: &String, entry: &Entry, now: Instant) -> Option<Duration> {
        Some(entry.expires_at.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _: &String,
        entry: &Entry,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.expires_at.saturating_duration_since(now))
    }
}

/// Bytes an entry costs beyond its key and value: the cache's bookkeeping, the
/// allocations behind the key and record, and allocator slack, as measured with the
/// `memory` benchmark (resident growth per entry minus key and record bytes).
const ENTRY_OVERHEAD: u64 = 640;

impl MemoryStore {
    /// A store bounded by [`DEFAULT_MAX_ENTRIES`] and [`DEFAULT_MAX_BYTES`].
    pub fn new() -> Self {
        Self::with_bounds(DEFAULT_MAX_ENTRIES, DEFAULT_MAX_BYTES)
    }

    /// A store holding at most `max_entries` entries and `max_bytes` bytes, whichever
    /// bound is reached first. Bytes count keys, records and a measured per-entry
    /// overhead, so that `max_bytes` tracks the resident memory the store adds.
    pub fn with_bounds(max_entries: u64, max_bytes: u64) -> Self {
        let max_entries = max_entries.max(1);
        let max_bytes = max_bytes.max(ENTRY_OVERHEAD);
        // Each entry weighs at least one "slot" of max_bytes / max_entries, so the total
        // weight bound keeps both the entry count and the byte count in bounds.
        let slot = (max_bytes / max_entries).max(1);
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(move |key: &String, entry: &Entry| {
                let bytes = key.len() as u64 + entry.value.len() as u64 + ENTRY_OVERHEAD;
                u32::try_from(bytes.max(slot)).unwrap_or(u32::MAX)
            })
            .expire_after(Lifetime)
            // LRU, not TinyLFU: TinyLFU may refuse to admit a new entry when the cache is
            // full, and a refused claim would let a second request run the handler.
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .build_with_hasher(Hasher::default());
        Self {
            cache,
            locks: std::sync::Arc::new(std::array::from_fn(|_| std::sync::Mutex::new(()))),
            shard_hasher: Hasher::default(),
        }
    }

    fn lock(&self, key: &str) -> std::sync::MutexGuard<'_, ()> {
        use std::hash::BuildHasher;
        let shard = self.shard_hasher.hash_one(key) as usize % LOCK_SHARDS;
        // The lock guards no data, so a poisoned one is as good as a healthy one.
        self.locks[shard]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Entries currently held (approximate while evictions are pending).
    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }

    /// The total weight held: bytes of keys, records and per-entry overhead, or the
    /// per-entry minimum where that is larger (approximate while evictions are pending).
    pub fn weighted_size(&self) -> u64 {
        self.cache.weighted_size()
    }

    /// Applies pending evictions and expirations now (they otherwise run in the background).
    pub fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks();
    }

    fn live(&self, key: &str) -> Option<Entry> {
        self.cache
            .get(key)
            .filter(|entry| entry.expires_at > Instant::now())
    }

    fn compare_and<F>(&self, key: &str, claim: &Bytes, next: F) -> bool
    where
        F: FnOnce() -> Option<Entry>,
    {
        let _shard = self.lock(key);
        match self.live(key) {
            Some(current) if current.value == *claim => {
                match next() {
                    Some(entry) => self.cache.insert(key.to_owned(), entry),
                    None => self.cache.invalidate(key),
                }
                true
            }
            _ => false,
        }
    }
}

/// `now + after`, capped far in the future instead of overflowing.
fn deadline(after: Duration) -> Instant {
    let now = Instant::now();
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
            .field("entries", &self.cache.entry_count())
            .field("weighted_size", &self.cache.weighted_size())
            .finish()
    }
}

impl Store for MemoryStore {
    fn begin<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        // A record already there is returned without the lock: reading it is atomic.
        if let Some(existing) = self.live(key) {
            return Box::pin(std::future::ready(Ok(Some(existing.value))));
        }
        let existing = {
            let _shard = self.lock(key);
            match self.live(key) {
                Some(existing) => Some(existing.value),
                None => {
                    let entry = Entry {
                        value: claim.clone(),
                        expires_at: deadline(lease),
                    };
                    self.cache.insert(key.to_owned(), entry);
                    None
                }
            }
        };
        Box::pin(std::future::ready(Ok(existing)))
    }

    fn renew<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let renewed = self.compare_and(key, claim, || {
            Some(Entry {
                value: claim.clone(),
                expires_at: deadline(lease),
            })
        });
        Box::pin(std::future::ready(Ok(renewed)))
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        record: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let completed = self.compare_and(key, claim, || {
            Some(Entry {
                value: record,
                expires_at: deadline(ttl),
            })
        });
        Box::pin(std::future::ready(Ok(completed)))
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let released = self.compare_and(key, claim, || None);
        Box::pin(std::future::ready(Ok(released)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards: a full store admits every new claim (a refused claim would let a second
    /// request run), however often the entries already there were read.
    #[tokio::test]
    async fn a_full_store_admits_new_claims() {
        let store = MemoryStore::with_bounds(50, 1 << 30);
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
}
