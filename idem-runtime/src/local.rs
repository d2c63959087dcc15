//! The local tier: an opt-in, in-process cache of completed records, so that a replay
//! is served without a store round trip.
//!
//! A completed record never changes until it expires, so a copy of it stays correct as
//! long as it is dropped no later than the record itself. Each copy is dropped at the
//! record's own expiry (stored in the record as wall-clock time) or after `max_age`,
//! whichever comes first. Claims, completions and everything that is not a completed
//! record still go to the shared store.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use std::sync::Arc;

use bytes::Bytes;

use crate::sharded::{Expiring, LARGEST_BOUND, Recent, Shards};

#[derive(Clone)]
struct Copy {
    record: Bytes,
    dropped_at: Instant,
}

impl Expiring for Copy {
    /// Its key, its record and the map's bookkeeping.
    fn weight(&self, key: &str) -> u64 {
        (key.len() + self.record.len()) as u64 + 128
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
}

impl LocalTier {
    pub(crate) fn new(max_bytes: u64, max_age: Duration) -> Self {
        let max_bytes = max_bytes.min(LARGEST_BOUND);
        let copies = Shards::new(max_bytes, u64::MAX, Recent::new);
        Self {
            shard_bytes: max_bytes / copies.count(),
            copies: Arc::new(copies),
            max_age,
        }
    }

    /// A live copy of the completed record under `key`.
    pub(crate) fn get(&self, key: &str) -> Option<Bytes> {
        let mut shard = self.copies.of(key);
        shard
            .live(key, Instant::now())
            .map(|copy| copy.record.clone())
    }

    /// Keeps a copy of a completed record, which expires at `expires_at_ms`, until then
    /// or until `max_age` passes.
    pub(crate) fn insert(&self, key: &str, record: Bytes, expires_at_ms: u64) {
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
            self.copies
                .of(key)
                .keep(key, copy, self.shard_bytes, usize::MAX);
        }
    }

    pub(crate) fn forget(&self, key: &str) {
        self.copies.of(key).remove(key);
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
        zero.insert("k", Bytes::from_static(b"record"), far);
        assert_eq!(zero.get("k"), None);

        let tier = LocalTier::new(64 * 1024, Duration::from_secs(60));
        for n in 0..10_000 {
            let record = Bytes::from(vec![b'r'; n % 700]);
            tier.insert(&format!("k{}", n % 3000), record, far);
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
        tier.insert("k", Bytes::from_static(b"first"), far);
        tier.insert("k", Bytes::from_static(b"second, longer"), far);
        assert_eq!(tier.get("k"), Some(Bytes::from_static(b"second, longer")));
        tier.forget("k");
        assert_eq!(tier.get("k"), None);
        assert_eq!(total_weight(&tier), 0);

        let short = LocalTier::new(64 * 1024, Duration::from_millis(50));
        short.insert("k", Bytes::from_static(b"record"), far);
        assert!(short.get("k").is_some());
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(short.get("k"), None, "a copy past max_age");
        let expired = LocalTier::new(64 * 1024, Duration::from_secs(60));
        expired.insert(
            "k",
            Bytes::from_static(b"record"),
            expiry_ms(Duration::ZERO),
        );
        assert_eq!(expired.get("k"), None, "a copy of an expired record");
    }
}
