//! The local tier: an opt-in, in-process cache of completed records, so that a replay
//! is served without a store round trip.
//!
//! A completed record never changes until it expires, so a copy of it stays correct as
//! long as it is dropped no later than the record itself. Each copy carries the record's
//! own expiry (stored in the record as wall-clock time) and is dropped at that moment or
//! after `max_age`, whichever comes first. Claims, completions and everything that is not
//! a completed record still go to the shared store.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use moka::sync::Cache;

/// A fast hasher, seeded at random per process so that keys chosen by clients cannot be
/// aimed at one bucket.
type Hasher = foldhash::quality::RandomState;

use crate::record::StoredResponse;

#[derive(Clone)]
struct Copy {
    response: Arc<StoredResponse>,
    dropped_at: Instant,
}

struct Lifetime;

impl moka::Expiry<String, Copy> for Lifetime {
    fn expire_after_create(&self, _: &String, copy: &Copy, now: Instant) -> Option<Duration> {
        Some(copy.dropped_at.saturating_duration_since(now))
    }
}

/// The bounded cache behind the local tier.
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
                let response = &copy.response;
                let headers: usize = response
                    .headers
                    .iter()
                    .map(|(n, v)| n.as_str().len() + v.len() + 32)
                    .sum();
                let bytes = key.len() + headers + response.body.len() + 128;
                u32::try_from(bytes).unwrap_or(u32::MAX)
            })
            .expire_after(Lifetime)
            .build_with_hasher(Hasher::default());
        Self { cache, max_age }
    }

    /// A live copy of the record under `key`.
    pub(crate) fn get(&self, key: &str) -> Option<Arc<StoredResponse>> {
        self.cache
            .get(key)
            .filter(|copy| copy.dropped_at > Instant::now())
            .map(|copy| copy.response)
    }

    /// Keeps a copy of a completed record until it expires or `max_age` passes.
    pub(crate) fn insert(&self, key: &str, response: Arc<StoredResponse>) {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let remaining = Duration::from_millis(response.expires_at_ms.saturating_sub(now_ms));
        let keep = remaining.min(self.max_age);
        if keep.is_zero() {
            return;
        }
        let dropped_at = Instant::now() + keep;
        self.cache.insert(
            key.to_owned(),
            Copy {
                response,
                dropped_at,
            },
        );
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
