//! What the memory store and the local tier are built of: maps spread over shards, each
//! behind its own lock, and in each shard a least-recently-used map bounded by weight.
//!
//! Nothing runs in the background: an entry carries its own deadline, a read drops an
//! entry past it, and an insert that takes its shard over its bound drops expired
//! entries (soonest expired first, where the map keeps an index of expiries), then the
//! least recently used, until the shard is back within its bound. An insert is always
//! admitted.

use std::collections::BTreeSet;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

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
        self.of_hash(self.hasher.hash_one(key))
    }

    /// The shard of a key whose hash, by [`hash`](Self::hash), is `hash`, locked.
    pub(crate) fn of_hash(&self, hash: u64) -> MutexGuard<'_, T> {
        lock(&self.shards[(hash as usize) & (self.shards.len() - 1)])
    }

    /// The hash of `key` that picks its shard: its low bits do, the rest are free for
    /// the caller's own use.
    pub(crate) fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
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
    entries: LruCache<Arc<str>, V, Hasher>,
    weight: u64,
    /// Every entry's expiry and key, soonest first: what a shard over its bound drops
    /// first, if it has expired. The key is the one the entry holds, not a copy. `None`
    /// for a map that evicts the least recently used first, expired or not.
    expiries: Option<BTreeSet<(Instant, Arc<str>)>>,
}

impl<V: Expiring> Recent<V> {
    /// A map that drops expired entries before it evicts a live one: for entries that
    /// cannot be had again once evicted (the memory store's records).
    pub(crate) fn new() -> Self {
        Self {
            entries: LruCache::unbounded_with_hasher(Hasher::default()),
            weight: 0,
            expiries: Some(BTreeSet::new()),
        }
    }

    /// A map that evicts the least recently used entry first, expired or not, and keeps
    /// no index of expiries: for copies of what is kept elsewhere (the local tier's),
    /// where an eviction costs a read of the original.
    pub(crate) fn without_expiry_index() -> Self {
        Self {
            expiries: None,
            ..Self::new()
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
            self.forget(key, &entry);
        }
    }

    fn forget(&mut self, key: Arc<str>, entry: &V) {
        self.weight -= entry.weight(&key);
        if let Some(expiries) = &mut self.expiries {
            expiries.remove(&(entry.expires_at(), key));
        }
    }

    /// Keeps `entry` under `key`; then, while the total weight is over `bound` or the
    /// count over `max_len`, drops the entry that expires first if it has expired, else
    /// the least recently used one. `entry` itself stays if it weighs no more than
    /// `bound` (at most [`LARGEST_BOUND`]) and `max_len` is at least 1. Answers how many
    /// live entries were evicted to make room.
    pub(crate) fn keep(&mut self, key: &str, entry: V, bound: u64, max_len: usize) -> usize {
        self.keep_shared(Arc::from(key), entry, bound, max_len)
    }

    /// [`keep`](Self::keep), under a key already shared.
    pub(crate) fn keep_shared(
        &mut self,
        key: Arc<str>,
        entry: V,
        bound: u64,
        max_len: usize,
    ) -> usize {
        self.weight += entry.weight(&key);
        match &mut self.expiries {
            None => {
                if let Some((key, replaced)) = self.entries.push(key, entry) {
                    self.weight -= replaced.weight(&key);
                }
            }
            Some(expiries) => {
                let expires_at = entry.expires_at();
                // An entry replaced keeps its key in the map: its index entry, which holds
                // that key, moves to the new expiry (taken out first, as it may equal the
                // new one).
                let indexed = match self.entries.push(key.clone(), entry) {
                    None => key,
                    Some((key, replaced)) => {
                        self.weight -= replaced.weight(&key);
                        expiries
                            .take(&(replaced.expires_at(), key.clone()))
                            .map_or(key, |(_, held)| held)
                    }
                };
                expiries.insert((expires_at, indexed));
            }
        }
        self.shrink_to(bound, max_len)
    }

    /// Drops entries while the total weight is over `bound` or the count over `max_len`:
    /// the one that expires first if it has expired, else the least recently used. Answers
    /// how many live entries it evicted.
    fn shrink_to(&mut self, bound: u64, max_len: usize) -> usize {
        let mut now = None;
        let mut evicted_live = 0;
        while self.weight > bound || self.entries.len() > max_len {
            let now = *now.get_or_insert_with(Instant::now);
            let expired = self.expiries.is_some() && self.remove_first_expired(now);
            if !expired {
                match self.entries.pop_lru() {
                    Some((key, evicted)) => {
                        evicted_live += usize::from(evicted.is_live(now));
                        self.forget(key, &evicted);
                    }
                    None => break,
                }
            }
        }
        evicted_live
    }

    /// Drops the entry that expires first, if it expired at `now`; whether it did (never,
    /// without an index of expiries).
    fn remove_first_expired(&mut self, now: Instant) -> bool {
        let Some(expiries) = &mut self.expiries else {
            return false;
        };
        match expiries.first() {
            Some((at, _)) if *at <= now => {}
            _ => return false,
        }
        if let Some((_, key)) = expiries.pop_first()
            && let Some(entry) = self.entries.pop(&*key)
        {
            self.weight -= entry.weight(&key);
        }
        true
    }

    /// Drops every entry expired at `now`.
    pub(crate) fn remove_expired(&mut self, now: Instant) {
        while self.remove_first_expired(now) {}
    }
}
