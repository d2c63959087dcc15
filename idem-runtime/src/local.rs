//! The local tier: an opt-in, in-process cache of completed records read from the store,
//! so that later replays are served without a store round trip.
//!
//! A completed record never changes until it expires, so a copy of it stays correct as
//! long as it is dropped no later than the record itself. Each copy is dropped at the
//! record's own expiry (stored in the record as wall-clock time) or after `max_age`,
//! whichever comes first. Claims, completions and everything that is not a completed
//! record still go to the shared store.
//!
//! [`forget`](LocalTier::forget) drops a copy at once (the record was deleted by hand). A
//! copy of what the store answered before a `forget` is not kept after it: each copy is
//! kept only if no `forget` of its key (or of a key that hashes alike, one in
//! [`FORGET_SLOTS`]) came between the store's read and the copy.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::sharded::{Expiring, LARGEST_BOUND, Recent, Shards};

/// How many counts of forgets the tier keeps, each for the keys that hash to it: forgets
/// of other keys, however many, rarely stop a copy from being kept.
const FORGET_SLOTS: usize = 256;

#[derive(Clone)]
struct Copy {
    record: Bytes,
    dropped_at: Instant,
}

/// What a copy takes beyond its key and record: the key's and the record's allocations,
/// the LRU node and its slot in the hash table. Measured (`tests/local_tier_memory.rs`):
/// about 230 to 250 bytes with an index of expiries, which the tier no longer keeps.
pub(crate) const COPY_OVERHEAD: u64 = 256;

impl Expiring for Copy {
    /// Its key, its record and the map's bookkeeping.
    fn weight(&self, key: &str) -> u64 {
        (key.len() + self.record.len()) as u64 + COPY_OVERHEAD
    }

    fn expires_at(&self) -> Instant {
        self.dropped_at
    }
}

/// The bounded map behind the local tier, of encoded completed records.
#[derive(Clone)]
pub(crate) struct LocalTier {
    copies: Arc<Shards<Recent<Copy>>>,
    /// The byte bound of each shard.
    shard_bytes: u64,
    max_age: Duration,
    /// How many times a copy was forgotten, by a hash of its key.
    forgets: Arc<[AtomicU64]>,
}

impl LocalTier {
    pub(crate) fn new(max_bytes: u64, max_age: Duration) -> Self {
        let max_bytes = max_bytes.min(LARGEST_BOUND);
        // Least recently used first, expired or not: a copy evicted early costs one read
        // of the store, and no index of expiries is kept for every copy.
        let copies = Shards::new(max_bytes, u64::MAX, Recent::without_expiry_index);
        Self {
            shard_bytes: max_bytes / copies.count(),
            copies: Arc::new(copies),
            max_age,
            forgets: (0..FORGET_SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The count of forgets of the keys whose hash is `hash`, by
    /// [`Shards::hash`]: its high bits pick the count, as its low bits pick the shard.
    fn forgets_of(&self, hash: u64) -> &AtomicU64 {
        &self.forgets[((hash >> 32) as usize) % FORGET_SLOTS]
    }

    /// What [`insert`](Self::insert) is given for `key`, read before the store is asked
    /// for the record to copy.
    pub(crate) fn forgets(&self, key: &str) -> u64 {
        self.forgets_of(self.copies.hash(key))
            .load(Ordering::SeqCst)
    }

    /// A live copy of the completed record under `key`.
    pub(crate) fn get(&self, key: &str) -> Option<Bytes> {
        let mut shard = self.copies.of(key);
        shard
            .live(key, Instant::now())
            .map(|copy| copy.record.clone())
    }

    /// Keeps a copy of a completed record, which expires at `expires_at_ms`, until then
    /// or until `max_age` passes; not if a copy was forgotten since [`forgets`](Self::forgets)
    /// read `forgets` (before the store was asked for the record).
    pub(crate) fn insert(&self, key: &str, record: Bytes, expires_at_ms: u64, forgets: u64) {
        // Not rounded to the millisecond: a copy kept up to a millisecond longer than the
        // time its record has left could be replayed after the store dropped the record.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let remaining = Duration::from_millis(expires_at_ms).saturating_sub(now);
        let keep = remaining.min(self.max_age);
        if keep.is_zero() {
            return;
        }
        let dropped_at = Instant::now() + keep;
        let copy = Copy { record, dropped_at };
        // A copy heavier than its shard's bound would only evict the others to be dropped.
        if copy.weight(key) <= self.shard_bytes {
            let hash = self.copies.hash(key);
            let mut shard = self.copies.of_hash(hash);
            // Read under the shard's lock, which `forget` takes after counting: either
            // this sees its count, or its removal comes after this copy.
            if self.forgets_of(hash).load(Ordering::SeqCst) == forgets {
                shard.keep(key, copy, self.shard_bytes, usize::MAX);
            }
        }
    }

    /// Drops the copy under `key`, and any copy of what the store answered before.
    pub(crate) fn forget(&self, key: &str) {
        let hash = self.copies.hash(key);
        self.forgets_of(hash).fetch_add(1, Ordering::SeqCst);
        self.copies.of_hash(hash).remove(key);
    }
}

/// Milliseconds since the Unix epoch at `after` from now.
pub(crate) fn expiry_ms(after: Duration) -> u64 {
    SystemTime::now()
        .checked_add(after)
        .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
        .map_or(u64::MAX, |d| {
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total_weight(tier: &LocalTier) -> u64 {
        tier.copies.each().map(|shard| shard.weight()).sum()
    }

    /// Guards: the local tier stays within its byte bound (also a zero bound, which keeps
    /// nothing and does not panic), keeps its weight exact when a copy is replaced under
    /// its key or forgotten, and never answers a copy after `forget` or past `max_age`.
    #[test]
    fn the_local_tier_stays_bounded_and_forgets() {
        let far = expiry_ms(Duration::from_secs(3600));
        let zero = LocalTier::new(0, Duration::from_secs(60));
        zero.insert("k", Bytes::from_static(b"record"), far, 0);
        assert_eq!(zero.get("k"), None);

        let tier = LocalTier::new(64 * 1024, Duration::from_secs(60));
        for n in 0..10_000 {
            let record = Bytes::from(vec![b'r'; n % 700]);
            tier.insert(&format!("k{}", n % 3000), record, far, 0);
            assert!(total_weight(&tier) <= 64 * 1024, "after {n}");
        }
        for n in 0..3000 {
            tier.forget(&format!("k{n}"));
        }
        assert_eq!(
            total_weight(&tier),
            0,
            "weight after every copy is forgotten"
        );
        let forgets = tier.forgets("k");
        tier.insert("k", Bytes::from_static(b"first"), far, forgets);
        tier.insert("k", Bytes::from_static(b"second, longer"), far, forgets);
        assert_eq!(tier.get("k"), Some(Bytes::from_static(b"second, longer")));
        tier.forget("k");
        assert_eq!(tier.get("k"), None);
        assert_eq!(total_weight(&tier), 0);

        let short = LocalTier::new(64 * 1024, Duration::from_millis(50));
        short.insert("k", Bytes::from_static(b"record"), far, 0);
        assert!(short.get("k").is_some());
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(short.get("k"), None, "a copy past max_age");
        let expired = LocalTier::new(64 * 1024, Duration::from_secs(60));
        expired.insert(
            "k",
            Bytes::from_static(b"record"),
            expiry_ms(Duration::ZERO),
            0,
        );
        assert_eq!(expired.get("k"), None, "a copy of an expired record");
    }

    /// Guards (a defect once shown): a copy of what the store answered before a `forget`
    /// of its key is not kept after it; one read after it is.
    #[test]
    fn a_copy_read_before_a_forget_is_not_kept() {
        let far = expiry_ms(Duration::from_secs(3600));
        let tier = LocalTier::new(64 * 1024, Duration::from_secs(60));
        let read = tier.forgets("k");
        tier.forget("k");
        tier.insert("k", Bytes::from_static(b"deleted"), far, read);
        assert_eq!(tier.get("k"), None);
        tier.insert(
            "k",
            Bytes::from_static(b"read after"),
            far,
            tier.forgets("k"),
        );
        assert_eq!(tier.get("k"), Some(Bytes::from_static(b"read after")));
    }
}
