//! The local tier: an opt-in, in-process cache of completed records, so that a replay
//! is served without a store round trip.
//!
//! A completed record never changes until it expires, so a copy of it stays correct as
//! long as it is dropped no later than the record itself. Each copy is dropped at the
//! record's own expiry (stored in the record as wall-clock time) or after `max_age`,
//! whichever comes first. Claims, completions and everything that is not a completed
//! record still go to the shared store.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use moka::sync::Cache;

/// A fast hasher, seeded at random per process so that keys chosen by clients cannot be
/// aimed at one bucket.
type Hasher = foldhash::quality::RandomState;

#[derive(Clone)]
struct Copy {
    record: Bytes,
    dropped_at: Instant,
}

struct Lifetime;

impl moka::Expiry<String, Copy> for Lifetime {
    fn expire_after_create(&self, _: &String, copy: &Copy, now: Instant) -> Option<Duration> {
        Some(copy.dropped_at.saturating_duration_since(now))
    }
}

/// The bounded cache behind the local tier, of encoded completed records.
#[derive(Clone)]
pub(crate) struct LocalTier {
    cache: Cache<String, Copy, Hasher>,
    max_age: Duration,
}

impl LocalTier {
    pub(crate) fn new(max_bytes: u64, max_age: Duration) -> Self {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|key: &String, copy: &Copy| {
                let bytes = key.len() + copy.record.len() + 128;
                u32::try_from(bytes).unwrap_or(u32::MAX)
            })
            .expire_after(Lifetime)
            .build_with_hasher(Hasher::default());
        Self { cache, max_age }
    }

    /// A live copy of the completed record under `key`.
    pub(crate) fn get(&self, key: &str) -> Option<Bytes> {
        self.cache
            .get(key)
            .filter(|copy| copy.dropped_at > Instant::now())
            .map(|copy| copy.record)
    }

    /// Keeps a copy of a completed record, which expires at `expires_at_ms`, until then
    /// or until `max_age` passes.
    pub(crate) fn insert(&self, key: &str, record: Bytes, expires_at_ms: u64) {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let remaining = Duration::from_millis(expires_at_ms.saturating_sub(now_ms));
        let keep = remaining.min(self.max_age);
        if keep.is_zero() {
            return;
        }
        let dropped_at = Instant::now() + keep;
        self.cache
            .insert(key.to_owned(), Copy { record, dropped_at });
    }

    pub(crate) fn forget(&self, key: &str) {
        self.cache.invalidate(key);
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
