//! What the memory store and the local tier are built of: maps spread over shards, each
//! behind its own lock, and in each shard a least-recently-used map bounded by weight.
//!
//! Nothing runs in the background: an entry carries its own deadline, a read drops an
//! entry past it, and an insert that takes its shard over its bound first drops the
//! shard's expired entries (at most once a second), then evicts the least recently used
//! until the shard is back within its bound. An insert is always admitted.

use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use lru::LruCache;

/// A fast hasher, seeded at random per process so that keys chosen by clients cannot be
/// aimed at one bucket.
pub(crate) type Hasher = foldhash::quality::RandomState;

/// The most shards a map has, and the least bytes and entries of its bounds a shard holds
/// (unless the whole bound is smaller): the heaviest entry a map takes is one shard's
/// share, and a shard of a few entries would evict long before the map is full.
const MAX_SHARDS: usize = 64;
const MIN_SHARD_BYTES: u64 = 16 * 1024 * 1024;
const MIN_SHARD_ENTRIES: u64 = 32;

/// The largest byte bound a map keeps to: larger ones are taken as this, so that a
/// shard's weight (its bound plus one entry at most) never overflows.
pub(crate) const LARGEST_BOUND: u64 = 1 << 62;

/// How often at most a shard over its bound looks for expired entries to drop before it
/// evicts live ones.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// `T`s spread over shards by key, each behind a lock.
pub(crate) struct Shards<T> {
    shards: Box<[Mutex<T>]>,
    hasher: Hasher,
}

impl<T> Shards<T> {
    /// As many shards as bounds of `max_bytes` and `max_entries` allow (a power of two),
    /// each made by `shard`.
    pub(crate) fn new(max_bytes: u64, max_entries: u64, shard: impl Fn() -> T) -> Self {
        let mut count = MAX_SHARDS;
        while count > 1
            && (max_bytes / (count as u64) < MIN_SHARD_BYTES
                || max_entries / (count as u64) < MIN_SHARD_ENTRIES)
        {
            count /= 2;
        }
        Self {
            shards: (0..count).map(|_| Mutex::new(shard())).collect(),
            hasher: Hasher::default(),
        }
    }

    /// How many shards there are.
    pub(crate) fn count(&self) -> u64 {
        self.shards.len() as u64
    }

    /// The shard of `key`, locked.
    pub(crate) fn of(&self, key: &str) -> MutexGuard<'_, T> {
        let index = (self.hasher.hash_one(key) as usize) & (self.shards.len() - 1);
        lock(&self.shards[index])
    }

    /// Every shard, locked one after the other.
    pub(crate) fn each(&self) -> impl Iterator<Item = MutexGuard<'_, T>> {
        self.shards.iter().map(lock)
    }
}

fn lock<T>(shard: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every step leaves a shard consistent before it can panic, so a poisoned lock guards
    // a consistent shard.
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An entry of a [`Recent`] map.
pub(crate) trait Expiring: Clone {
    /// What the entry under `key` weighs against the bound.
    fn weight(&self, key: &str) -> u64;
    /// When the entry expires: it is answered until then.
    fn expires_at(&self) -> Instant;

    /// Whether the entry is still to be answered at `now`.
    fn is_live(&self, now: Instant) -> bool {
        self.expires_at() > now
    }
}

/// Entries by key, the least recently used evicted first once their total weight passes
/// the bound given to [`keep`](Self::keep).
pub(crate) struct Recent<V> {
    entries: LruCache<String, V, Hasher>,
    weight: u64,
    /// No entry expires before this (it may be earlier than the first that does).
    earliest_expiry: Option<Instant>,
    swept_at: Instant,
}

impl<V: Expiring> Recent<V> {
    pub(crate) fn new() -> Self {
        Self {
            entries: LruCache::unbounded_with_hasher(Hasher::default()),
            weight: 0,
            earliest_expiry: None,
            swept_at: Instant::now(),
        }
    }

    /// Entries held, counting expired ones not yet dropped.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Their total weight.
    pub(crate) fn weight(&self) -> u64 {
        self.weight
    }

    /// The live entry under `key`, now the most recently used; an expired one is dropped.
    pub(crate) fn live(&mut self, key: &str, now: Instant) -> Option<&V> {
        if self.entries.peek(key)?.is_live(now) {
            return self.entries.get(key);
        }
        self.remove(key);
        None
    }

    /// Drops the entry under `key`, if any.
    pub(crate) fn remove(&mut self, key: &str) {
        if let Some((key, entry)) = self.entries.pop_entry(key) {
            self.weight -= entry.weight(&key);
        }
    }

    /// Keeps `entry` under `key`; if that takes the total weight over `bound` or the
    /// count over `max_len`, drops the expired entries (unless that was done less than
    /// [`SWEEP_EVERY`] ago), then evicts the least recently used entries until both are
    /// within their bounds. `entry` itself stays if it weighs no more than `bound` (at
    /// most [`LARGEST_BOUND`]) and `max_len` is at least 1.
    pub(crate) fn keep(&mut self, key: &str, entry: V, bound: u64, max_len: usize) {
        let expires_at = entry.expires_at();
        self.earliest_expiry = Some(
            self.earliest_expiry
                .map_or(expires_at, |e| e.min(expires_at)),
        );
        self.weight += entry.weight(key);
        if let Some(replaced) = self.entries.put(key.to_owned(), entry) {
            self.weight -= replaced.weight(key);
        }
        let over = |this: &Self| this.weight > bound || this.entries.len() > max_len;
        if over(self) {
            let now = Instant::now();
            let due = self.earliest_expiry.is_some_and(|earliest| earliest <= now)
                && now.duration_since(self.swept_at) >= SWEEP_EVERY;
            if due {
                self.remove_expired(now);
            }
        }
        while over(self) {
            match self.entries.pop_lru() {
                Some((key, evicted)) => self.weight -= evicted.weight(&key),
                None => break,
            }
        }
    }

    /// Drops every entry expired at `now`.
    pub(crate) fn remove_expired(&mut self, now: Instant) {
        let mut expired = Vec::new();
        let mut earliest: Option<Instant> = None;
        for (key, entry) in &self.entries {
            if entry.is_live(now) {
                let at = entry.expires_at();
                earliest = Some(earliest.map_or(at, |e| e.min(at)));
            } else {
                expired.push(key.clone());
            }
        }
        for key in expired {
            self.remove(&key);
        }
        self.earliest_expiry = earliest;
        self.swept_at = now;
    }
}
