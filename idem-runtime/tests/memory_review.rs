//! A hostile review of the memory store and the local tier: their bounds under every
//! combination of bounds, the expiry index against the LRU, the order of eviction, claims
//! in a full store, the local tier's answers and expiry, and the work one insert does
//! under a shard's lock.

#![allow(clippy::unwrap_used)]

mod common;

/// The sharded LRU map behind the memory store and the local tier, built into this test
/// from its source: whether its expiry index agrees with its LRU shows through the store
/// only in what it evicts, and the local tier replaces entries, which the store never
/// does.
#[allow(dead_code, unreachable_pub)]
#[path = "../src/sharded.rs"]
mod sharded;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use bytes::Bytes;
use common::{Counters, app, as_client, post_with, send};
use idem_runtime::store::{BoxFuture, MemoryStore, Store, StoreError};
use idem_runtime::{Idempotency, defaults};

const LEASE: Duration = Duration::from_secs(60);
const LONG: Duration = Duration::from_secs(3600);
/// The longest key the store is given: a 32-digit scope, a colon and a 255-character key.
const LONGEST_STORED_KEY: usize = 32 + 1 + 255;
/// What the memory store counts for an entry beyond its key and record (its private
/// `ENTRY_OVERHEAD`, in `src/store/memory.rs`).
const ENTRY_OVERHEAD: u64 = 300;

/// The memory store's steps are ready at once.
fn ready<T>(mut future: BoxFuture<'_, T>) -> T {
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut context) {
        std::task::Poll::Ready(value) => value,
        std::task::Poll::Pending => unreachable!("the memory store never waits"),
    }
}

/// A small deterministic generator (xorshift), so that a failure names its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A key of exactly `len` characters (at least the digits of `n`), unique by `n`.
fn key_of(n: u64, len: usize) -> String {
    let mut key = format!("{n}:");
    while key.len() < len {
        key.push('k');
    }
    key
}

/// Claims `key` (which must be free) and completes it with `record` for `ttl`; a record
/// the store refuses leaves the claim, which is released.
fn complete_new(
    store: &MemoryStore,
    key: &str,
    record: &Bytes,
    ttl: Duration,
) -> Result<bool, StoreError> {
    let claim = Bytes::from(format!("claim of {key}"));
    assert_eq!(
        ready(store.begin(key, &claim, LEASE)).unwrap(),
        None,
        "{key} is free"
    );
    let completed = ready(store.complete(key, &claim, record.clone(), ttl));
    if matches!(completed, Err(StoreError::RecordRefused { .. })) {
        assert!(ready(store.release(key, &claim)).unwrap());
    }
    completed
}

/// What a retry of `key` finds (the claim it takes on a miss is released at once).
fn found(store: &MemoryStore, key: &str) -> Option<Bytes> {
    let probe = Bytes::from_static(b"a retry's claim");
    let found = ready(store.begin(key, &probe, LEASE)).unwrap();
    if found.is_none() {
        assert!(ready(store.release(key, &probe)).unwrap());
    }
    found
}

// ---------------------------------------------------------------------------------------
// 1. Bounds.

/// Guards: for every combination of bounds `with_bounds` accepts (1 entry, counts around
/// a shard's 32-entry minimum and the 64 shards, count only, bytes only, `MIN_BYTES`,
/// around a shard's 16 MiB minimum, around `2^62`, `u64::MAX`), with keys of 1 to 288
/// characters (the longest a store is given) and records of every size up to a shard's
/// share and just over it: the store never holds more records than `max_entries` nor
/// weighs more than `max_bytes`, a record it accepts is found at once (never dropped by
/// its own insertion), it refuses only a record heavier than a shard's share (at least
/// `max_bytes / 64`), and nothing panics.
#[test]
fn bounds_hold_for_every_combination_of_bounds() {
    const ENTRIES: [u64; 14] = [
        1,
        2,
        31,
        32,
        33,
        63,
        64,
        65,
        100,
        2047,
        2048,
        2049,
        100_000,
        u64::MAX,
    ];
    const BYTES: [u64; 10] = [
        MemoryStore::MIN_BYTES,
        MemoryStore::MIN_BYTES + 1,
        4096,
        (16 << 20) - 1,
        16 << 20,
        (32 << 20) + 1,
        1 << 30,
        1 << 62,
        (1 << 62) + 1,
        u64::MAX,
    ];
    const OPS: u64 = 600;
    let big = Bytes::from(vec![b'r'; 17 << 20]);
    for max_entries in ENTRIES {
        for max_bytes in BYTES {
            let store = MemoryStore::with_bounds(max_entries, max_bytes).unwrap();
            let least_share = max_bytes.min(1 << 62) / 64;
            let mut rng = Rng(max_entries ^ max_bytes.rotate_left(17) | 1);
            let context = format!("with_bounds({max_entries}, {max_bytes})");
            for n in 0..OPS {
                let key_len = 1 + rng.below(LONGEST_STORED_KEY as u64) as usize;
                let key = key_of(n, key_len);
                let key_len = key.len() as u64;
                // Mostly small records; now and then one at a share's edge (the share is
                // the bound over 1, 2, 4, ... 64 shards), where that is not too large to
                // allocate.
                let shards = 1u64 << rng.below(7);
                let share = max_bytes.min(1 << 62) / shards;
                let size = if n % 50 == 49 && share <= 17 << 20 {
                    (share + rng.below(3)).saturating_sub(ENTRY_OVERHEAD + key_len + 1)
                } else {
                    rng.below(2000)
                };
                let record = big.slice(..usize::try_from(size).unwrap());
                let ttl = [LONG, defaults::MAX_DURATION, Duration::MAX][n as usize % 3];
                match complete_new(&store, &key, &record, ttl) {
                    Ok(true) => assert_eq!(
                        found(&store, &key).as_ref(),
                        Some(&record),
                        "{context}: record {n} ({key_len}-character key, {size} bytes) was accepted, then not found"
                    ),
                    Err(StoreError::RecordRefused { .. }) => assert!(
                        key_len + size + ENTRY_OVERHEAD > least_share,
                        "{context}: record {n} ({key_len}-character key, {size} bytes) refused, though lighter than any share ({least_share})"
                    ),
                    other => panic!("{context}: record {n}: {other:?}"),
                }
                if n < 100 || n % 7 == 0 || n == OPS - 1 {
                    assert!(
                        store.entry_count() <= max_entries,
                        "{context}: {} records after {n}",
                        store.entry_count()
                    );
                    assert!(
                        store.weighted_size() <= max_bytes,
                        "{context}: weighs {} after {n}",
                        store.weighted_size()
                    );
                    assert_eq!(store.claim_count(), 0, "{context}");
                }
            }
        }
    }
}

/// Guards: the weight and count of a store return to exactly zero once every record it
/// held has expired (records accepted, refused, evicted for room, dropped as expired by an
/// insert, by a read and by `run_pending_tasks`), under many bounds: no underflow, no
/// weight left behind by a record that is gone.
#[test]
fn weight_returns_to_zero_when_every_record_has_expired() {
    for (max_entries, max_bytes) in [
        (1, MemoryStore::MIN_BYTES),
        (7, 8 * 1024),
        (40, 64 * 1024),
        (u64::MAX, 64 * 1024),
        (100, u64::MAX),
        (5000, 1 << 30),
    ] {
        let store = MemoryStore::with_bounds(max_entries, max_bytes).unwrap();
        let mut rng = Rng(max_entries.wrapping_mul(31) ^ max_bytes);
        let big = Bytes::from(vec![b'r'; 3000]);
        let mut keys = Vec::new();
        for n in 0..3000u64 {
            let key = key_of(n, 1 + rng.below(LONGEST_STORED_KEY as u64) as usize);
            let record = big.slice(..rng.below(3000) as usize);
            // Expired at once, or shortly; both kinds evict each other.
            let ttl = [Duration::ZERO, Duration::from_millis(40)][n as usize % 2];
            let _ = complete_new(&store, &key, &record, ttl);
            keys.push(key);
            if n % 3 == 0 {
                // A read of an earlier key: an expired record is dropped by it.
                let _ = found(&store, &keys[rng.below(n + 1) as usize]);
            }
        }
        std::thread::sleep(Duration::from_millis(60));
        store.run_pending_tasks();
        assert_eq!(
            (
                store.entry_count(),
                store.weighted_size(),
                store.claim_count()
            ),
            (0, 0, 0),
            "with_bounds({max_entries}, {max_bytes}) after every record expired: entries, weight, claims"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 2. The expiry index against the LRU, on the map itself.

#[derive(Clone, Debug)]
struct Item {
    weight: u64,
    expires_at: Instant,
}

impl sharded::Expiring for Item {
    fn weight(&self, _: &str) -> u64 {
        self.weight
    }

    fn expires_at(&self) -> Instant {
        self.expires_at
    }
}

fn item(weight: u64, expires_at: Instant) -> Item {
    Item { weight, expires_at }
}

fn past(base: Instant, millis: u64) -> Instant {
    base.checked_sub(Duration::from_secs(60) + Duration::from_millis(millis))
        .unwrap()
}

fn future(base: Instant, millis: u64) -> Instant {
    base + Duration::from_secs(3600) + Duration::from_millis(millis)
}

/// Guards: an entry replaced under its key by one that expires at the same instant stays
/// in the expiry index: once expired, `remove_expired` drops it, and a map over its bound
/// drops it before it evicts a live entry. (The local tier replaces copies under a key;
/// two copies of one record dropped at the same instant have the same expiry.)
#[test]
fn an_entry_replaced_with_the_same_expiry_stays_in_the_expiry_index() {
    let base = Instant::now();
    let expired = past(base, 0);

    let mut map = sharded::Recent::new();
    map.keep("a", item(10, expired), 1000, 10);
    map.keep("a", item(10, expired), 1000, 10);
    map.remove_expired(Instant::now());
    let after_sweep = (map.len(), map.weight());

    let mut map = sharded::Recent::new();
    map.keep("live-1", item(10, future(base, 0)), 1000, 2);
    map.keep("expired", item(10, expired), 1000, 2);
    map.keep("expired", item(10, expired), 1000, 2);
    map.keep("live-2", item(10, future(base, 1)), 1000, 2);
    let live_1 = map.live("live-1", Instant::now()).is_some();

    assert_eq!(
        (after_sweep, live_1),
        ((0, 0), true),
        "(entries and weight left after remove_expired, whether the live entry survived an \
         insert into a map of 2 holding an expired entry)"
    );
}

/// One step on a [`sharded::Recent`] map, and the same step on a plain model of it.
#[derive(Debug, Clone, Copy)]
enum Op {
    Keep { key: u64, weight: u64, expiry: u64 },
    Live { key: u64 },
    Remove { key: u64 },
    RemoveExpired,
}

/// What the map should hold: keys least recently used first, with weight and expiry.
#[derive(Default)]
struct Model {
    entries: Vec<(String, u64, Instant)>,
}

impl Model {
    fn weight(&self) -> u64 {
        self.entries.iter().map(|(_, weight, _)| weight).sum()
    }

    fn position(&self, key: &str) -> Option<usize> {
        self.entries.iter().position(|(k, _, _)| k == key)
    }

    fn keep(&mut self, key: &str, weight: u64, at: Instant, bound: u64, max_len: usize) {
        if let Some(i) = self.position(key) {
            self.entries.remove(i);
        }
        self.entries.push((key.to_owned(), weight, at));
        let now = Instant::now();
        while self.weight() > bound || self.entries.len() > max_len {
            let first_expired = self
                .entries
                .iter()
                .enumerate()
                .filter(|(_, (_, _, at))| *at <= now)
                .min_by(|(_, a), (_, b)| (a.2, &a.0).cmp(&(b.2, &b.0)))
                .map(|(i, _)| i);
            self.entries.remove(first_expired.unwrap_or(0));
        }
    }

    fn live(&mut self, key: &str, now: Instant) -> bool {
        let Some(i) = self.position(key) else {
            return false;
        };
        let entry = self.entries.remove(i);
        if entry.2 > now {
            self.entries.push(entry);
            true
        } else {
            false
        }
    }
}

/// Runs 300 seeded interleavings of keep, live, remove and remove_expired on maps bounded
/// by weight, by count or both, against the model; returns each disagreement with the
/// number of steps it took. With `shared_expiries`, keeps draw from five expiries (two
/// long past, three far ahead), so that a replacement often keeps its key's expiry;
/// otherwise every keep has an expiry of its own.
fn disagreements(shared_expiries: bool) -> Vec<(usize, String)> {
    let base = Instant::now();
    let pool = [
        past(base, 1),
        past(base, 0),
        future(base, 0),
        future(base, 1),
        base + defaults::MAX_DURATION,
    ];
    let mut failures = Vec::new();
    for seed in 1..=300u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let bound = [30, 100, 1000, u64::MAX][seed as usize % 4];
        let max_len = [3, 8, usize::MAX][seed as usize % 3];
        let mut map = sharded::Recent::new();
        let mut model = Model::default();
        let mut ops = Vec::new();
        let mut failed = None;
        for step in 0..200u64 {
            let op = match rng.below(10) {
                0..=5 => Op::Keep {
                    key: rng.below(8),
                    weight: 1 + rng.below(20),
                    expiry: rng.below(pool.len() as u64),
                },
                6 | 7 => Op::Live { key: rng.below(8) },
                8 => Op::Remove { key: rng.below(8) },
                _ => Op::RemoveExpired,
            };
            ops.push(op);
            let now = Instant::now();
            match op {
                Op::Keep {
                    key,
                    weight,
                    expiry,
                } => {
                    let at = if shared_expiries {
                        pool[expiry as usize]
                    } else if expiry < 2 {
                        past(base, 10 + step)
                    } else {
                        future(base, 10 + step)
                    };
                    let key = format!("k{key}");
                    map.keep(&key, item(weight, at), bound, max_len);
                    model.keep(&key, weight, at, bound, max_len);
                }
                Op::Live { key } => {
                    let key = format!("k{key}");
                    let (got, want) = (map.live(&key, now).is_some(), model.live(&key, now));
                    if got != want {
                        failed = Some(format!("live({key}) is {got}, the model says {want}"));
                    }
                }
                Op::Remove { key } => {
                    let key = format!("k{key}");
                    map.remove(&key);
                    if let Some(i) = model.position(&key) {
                        model.entries.remove(i);
                    }
                }
                Op::RemoveExpired => {
                    map.remove_expired(now);
                    model.entries.retain(|(_, _, at)| *at > now);
                }
            }
            if failed.is_none()
                && (map.len(), map.weight()) != (model.entries.len(), model.weight())
            {
                failed = Some(format!(
                    "the map holds {} entries weighing {}, the model {} weighing {}",
                    map.len(),
                    map.weight(),
                    model.entries.len(),
                    model.weight()
                ));
            }
            if let Some(failed) = failed.take() {
                failures.push((
                    ops.len(),
                    format!(
                        "seed {seed} (bound {bound}, max_len {max_len}), after step {step}: {failed}; ops {ops:?}"
                    ),
                ));
                break;
            }
        }
        for key in 0..8 {
            map.remove(&format!("k{key}"));
        }
        if (map.len(), map.weight()) != (0, 0) {
            failures.push((
                usize::MAX,
                format!(
                    "seed {seed}: after removing every key, {} entries weighing {}",
                    map.len(),
                    map.weight()
                ),
            ));
        }
    }
    failures.sort();
    failures
}

/// Guards (and checks the model): with an expiry of its own for every keep, the map
/// holds exactly what the model of "drop the entry that expired first, else the least
/// recently used" holds, through any interleaving of keep (new keys and replacements),
/// live, remove and remove_expired, and nothing once every key is removed.
#[test]
fn the_expiry_index_and_the_lru_agree_when_expiries_differ() {
    let failures = disagreements(false);
    assert!(
        failures.is_empty(),
        "{} of 300 seeds disagree with the model; the shortest: {}",
        failures.len(),
        failures.first().map_or("", |failure| failure.1.as_str())
    );
}

/// Guards: the same, when replacements may keep their key's expiry (two copies of one
/// record, or two records completed at the same instant): every LRU entry keeps exactly
/// one entry in the expiry index, so an expired entry is dropped by `remove_expired` and
/// before any live one, and the map agrees with the model at every step.
#[test]
fn the_expiry_index_and_the_lru_always_agree() {
    let failures = disagreements(true);
    assert!(
        failures.is_empty(),
        "{} of 300 seeds disagree with the model; the shortest: {}",
        failures.len(),
        failures.first().map_or("", |failure| failure.1.as_str())
    );
}

// ---------------------------------------------------------------------------------------
// 3. Eviction order, through the store.

/// What a one-shard store with `max_entries` and `max_bytes` should hold, and why.
struct StoreModel {
    shard_bytes: u64,
    shard_entries: usize,
    slot: u64,
    /// Keys least recently used first: weight, whether expired, order of expiry.
    entries: Vec<(String, u64, bool, u64)>,
}

impl StoreModel {
    /// Valid only where the store has one shard: fewer than 64 entries, or less than
    /// 32 MiB.
    fn new(max_entries: u64, max_bytes: u64) -> Self {
        assert!(max_entries < 64 || max_bytes < 32 << 20);
        let shard_bytes = max_bytes.min(1 << 62);
        let shard_entries = max_entries;
        Self {
            shard_bytes,
            shard_entries: usize::try_from(shard_entries).unwrap_or(usize::MAX),
            slot: (shard_bytes / shard_entries).max(1),
            entries: Vec::new(),
        }
    }

    fn weight_of(&self, key: &str, size: u64) -> u64 {
        (key.len() as u64 + size + ENTRY_OVERHEAD).max(self.slot)
    }

    fn weight(&self) -> u64 {
        self.entries.iter().map(|entry| entry.1).sum()
    }

    fn keep(&mut self, key: &str, weight: u64, expired: bool, order: u64) {
        self.entries.push((key.to_owned(), weight, expired, order));
        while self.weight() > self.shard_bytes || self.entries.len() > self.shard_entries {
            let first_expired = self
                .entries
                .iter()
                .enumerate()
                .filter(|(_, entry)| entry.2)
                .min_by_key(|(_, entry)| entry.3)
                .map(|(i, _)| i);
            self.entries.remove(first_expired.unwrap_or(0));
        }
    }

    /// A retry of `key`: a live record is now the most recently used, an expired one gone.
    fn read(&mut self, key: &str) -> bool {
        let Some(i) = self.entries.iter().position(|entry| entry.0 == key) else {
            return false;
        };
        let entry = self.entries.remove(i);
        if entry.2 {
            false
        } else {
            self.entries.push(entry);
            true
        }
    }
}

/// Guards: a one-shard store, whatever its bounds (1 entry, count only, bytes only,
/// `MIN_BYTES`), holds exactly what "drop the record that expired first, else the least
/// recently used, while over a bound" holds, through any interleaving of completions
/// (records expired at once, TTLs of an hour, a year (`MAX_DURATION`) and
/// `Duration::MAX`), retries that refresh a record, retries of evicted or expired keys,
/// and `run_pending_tasks`: the same records, weight and count, the newest record always
/// kept, a live record evicted only while no expired one is left to drop.
#[test]
fn a_one_shard_store_evicts_exactly_as_its_rule_says() {
    let mut failures = Vec::new();
    for (case, (max_entries, max_bytes)) in [
        (1, MemoryStore::MIN_BYTES),
        (1, u64::MAX),
        (2, 4096),
        (5, 1 << 30),
        (40, 64 * 1024),
        (63, u64::MAX),
        (u64::MAX, 16 * 1024),
        (1000, 300_999),
        (50, 10_000),
    ]
    .into_iter()
    .enumerate()
    {
        for seed in 1..=4u64 {
            let store = MemoryStore::with_bounds(max_entries, max_bytes).unwrap();
            let mut model = StoreModel::new(max_entries, max_bytes);
            let big = Bytes::from(vec![b'r'; 1 << 20]);
            let mut rng = Rng((case as u64 + 1) * 7919 + seed);
            let mut completed = 0u64;
            let context = format!("with_bounds({max_entries}, {max_bytes}), seed {seed}");
            for step in 0..400 {
                match rng.below(10) {
                    0..=5 => {
                        let n = completed;
                        completed += 1;
                        let key = key_of(n, 1 + rng.below(LONGEST_STORED_KEY as u64) as usize);
                        let size = match rng.below(4) {
                            0 => model.slot.saturating_sub(ENTRY_OVERHEAD + key.len() as u64),
                            1 => (model.shard_bytes + rng.below(3))
                                .saturating_sub(ENTRY_OVERHEAD + key.len() as u64 + 1),
                            _ => rng.below(500),
                        }
                        .min(1 << 20);
                        let expired = rng.below(3) == 0;
                        let ttl = if expired {
                            Duration::ZERO
                        } else {
                            [LONG, defaults::MAX_DURATION, Duration::MAX][rng.below(3) as usize]
                        };
                        let record = big.slice(..size as usize);
                        let weight = model.weight_of(&key, size);
                        let completed = complete_new(&store, &key, &record, ttl);
                        match completed {
                            Ok(true) if weight <= model.shard_bytes => {
                                model.keep(&key, weight, expired, n);
                            }
                            Err(StoreError::RecordRefused { .. }) if weight > model.shard_bytes => {
                            }
                            other => {
                                failures.push(format!(
                                    "{context}, step {step}: a record weighing {weight} (share {}) completed as {other:?}",
                                    model.shard_bytes
                                ));
                                break;
                            }
                        }
                    }
                    6..=8 => {
                        if completed == 0 {
                            continue;
                        }
                        let n = rng.below(completed);
                        // Find the key of record n: any key starting "n:".
                        let prefix = format!("{n}:");
                        let key = model
                            .entries
                            .iter()
                            .find(|entry| entry.0.starts_with(&prefix))
                            .map_or_else(|| key_of(n, 1), |entry| entry.0.clone());
                        let want = model.read(&key);
                        let got = found(&store, &key).is_some();
                        if got != want {
                            failures.push(format!(
                                "{context}, step {step}: a retry of record {n} found it: {got}, the rule says {want}"
                            ));
                            break;
                        }
                    }
                    _ => {
                        store.run_pending_tasks();
                        model.entries.retain(|entry| !entry.2);
                    }
                }
                let held = (store.entry_count(), store.weighted_size());
                let want = (model.entries.len() as u64, model.weight());
                if held != want {
                    failures.push(format!(
                        "{context}, step {step}: the store holds (records, weight) {held:?}, the rule {want:?}"
                    ));
                    break;
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} runs disagree: {failures:#?}",
        failures.len()
    );
}

/// Guards: in a full one-shard store, a live record is evicted only when the shard is
/// over its bound, and then only the least recently used: of 10 records, the 5 replayed
/// since stay, the oldest of the others goes, and a record completed after the store
/// filled up is kept.
#[test]
fn a_full_store_evicts_only_its_least_recently_used_record() {
    let store = MemoryStore::with_bounds(10, 1 << 30).unwrap();
    let record = Bytes::from_static(b"record");
    for n in 0..10 {
        assert!(complete_new(&store, &format!("k{n}"), &record, LONG).unwrap());
    }
    for n in 0..5 {
        assert!(found(&store, &format!("k{n}")).is_some());
    }
    assert!(complete_new(&store, "new", &record, LONG).unwrap());
    let kept: Vec<_> = (0..10)
        .map(|n| format!("k{n}"))
        .chain(["new".to_owned()])
        .filter(|key| found(&store, key).is_some())
        .collect();
    assert_eq!(
        kept,
        ["k0", "k1", "k2", "k3", "k4", "k6", "k7", "k8", "k9", "new"]
    );
}

/// Guards: records that expired (one at the instant of its completion, others of a short
/// TTL, completed between and after long-lived ones, and more recently used than them)
/// are all dropped before one live record of a full store is evicted; records whose TTL
/// is `Duration::MAX` or `MAX_DURATION` count as live and do not panic.
#[test]
fn expired_records_of_any_ttl_go_before_any_live_one() {
    let store = MemoryStore::with_bounds(8, 1 << 30).unwrap();
    let record = Bytes::from_static(b"record");
    let short = Duration::from_millis(50);
    let plan = [
        ("live-0", Duration::MAX),
        ("short-0", short),
        ("live-1", defaults::MAX_DURATION),
        ("now-0", Duration::ZERO),
        ("short-1", short),
        ("live-2", LONG),
        ("short-2", short),
        ("now-1", Duration::ZERO),
    ];
    for (key, ttl) in plan {
        assert!(complete_new(&store, key, &record, ttl).unwrap());
    }
    // The short-lived ones are the most recently used when they expire.
    for key in ["short-0", "short-1", "short-2"] {
        assert!(found(&store, key).is_some());
    }
    std::thread::sleep(short + Duration::from_millis(20));
    for n in 0..5 {
        assert!(complete_new(&store, &format!("new-{n}"), &record, LONG).unwrap());
    }
    let kept: Vec<_> = ["live-0", "live-1", "live-2"]
        .into_iter()
        .map(str::to_owned)
        .chain((0..5).map(|n| format!("new-{n}")))
        .filter(|key| found(&store, key).is_none())
        .collect();
    assert_eq!(
        (kept, store.entry_count()),
        (Vec::<String>::new(), 8),
        "(live records evicted, records held)"
    );
}

/// Guards: a store built with the default bounds (`MemoryStore::new()`: 100,000 records)
/// that is given exactly as many records as its bound keeps all but a fraction of a
/// percent of them (its bounds are divided among its shards, and the fullest shards
/// evict first, as its documentation says), and holds no more than its bound.
#[test]
fn a_store_given_as_many_records_as_its_bound_keeps_nearly_all() {
    let store = MemoryStore::new();
    let bound = MemoryStore::DEFAULT_MAX_ENTRIES;
    let record = Bytes::from_static(b"a small response");
    for n in 0..bound {
        assert!(complete_new(&store, &format!("key-{n}"), &record, LONG).unwrap());
    }
    let held = store.entry_count();
    let lost = (0..bound)
        .filter(|n| found(&store, &format!("key-{n}")).is_none())
        .count() as u64;
    assert!(
        lost * 100 < bound && held == bound - lost,
        "{lost} of the {bound} keys completed would run again on a retry, {held} records held, in a store bounded at {bound} records"
    );
}

// ---------------------------------------------------------------------------------------
// 4. Claims.

/// Guards: claims held while the store fills up with records many times over (1 record
/// and `MIN_BYTES`, a small one-shard store, a sharded one) are never evicted: each is
/// still found by a retry (in flight), renewed, and its completion is stored and found,
/// also a record of a whole share's weight; the claim bound holds throughout and one claim
/// more is refused with `Full`, never taken.
#[test]
fn claims_outlive_a_store_filled_with_records() {
    for (max_entries, max_bytes) in [
        (1, MemoryStore::MIN_BYTES),
        (40, 64 * 1024),
        (2048, 1 << 30),
    ] {
        let store = MemoryStore::with_limits(max_entries, max_bytes, 8).unwrap();
        let context = format!("with_limits({max_entries}, {max_bytes}, 8)");
        let held: Vec<_> = (0..7)
            .map(|n| {
                let key = key_of(n, LONGEST_STORED_KEY);
                let claim = Bytes::from(format!("held claim {n}"));
                assert_eq!(ready(store.begin(&key, &claim, LEASE)).unwrap(), None);
                (key, claim)
            })
            .collect();
        let small = Bytes::from_static(b"r");
        for n in 0..(3 * max_entries).min(6000) {
            assert!(
                complete_new(&store, &format!("filler-{n}"), &small, LONG).unwrap(),
                "{context}"
            );
            assert!(store.claim_count() <= 8, "{context}");
        }
        // The eighth claim fills the bound; a ninth is refused.
        let eighth = Bytes::from_static(b"eighth");
        assert_eq!(ready(store.begin("eighth", &eighth, LEASE)).unwrap(), None);
        let ninth = ready(store.begin("ninth", &eighth, LEASE));
        assert!(
            matches!(ninth, Err(StoreError::Full(_))),
            "{context}: {ninth:?}"
        );
        assert!(ready(store.release("eighth", &eighth)).unwrap());

        // The heaviest record one shard's share takes, under the longest key.
        let share = max_bytes / if max_entries == 2048 { 64 } else { 1 };
        for (n, (key, claim)) in held.iter().enumerate() {
            assert_eq!(
                found(&store, key).as_ref(),
                Some(claim),
                "{context}: claim {n} is still held"
            );
            assert!(ready(store.renew(key, claim, LEASE)).unwrap(), "{context}");
            let size = if n == 0 {
                share - ENTRY_OVERHEAD - key.len() as u64
            } else {
                10
            };
            let record = Bytes::from(vec![b'c'; size as usize]);
            assert!(
                ready(store.complete(key, claim, record.clone(), LONG)).unwrap(),
                "{context}: claim {n} completes"
            );
            assert_eq!(
                found(&store, key).as_ref(),
                Some(&record),
                "{context}: claim {n}'s record is kept"
            );
        }
        assert_eq!(store.claim_count(), 0, "{context}");
        assert!(store.entry_count() <= max_entries, "{context}");
    }
}

/// Guards: claims whose lease ran out make room for new ones under the claim bound (a
/// full claim map is swept before a new claim is refused), and a stale execution's
/// completion is then refused (fencing), never stored over the newer claim.
#[test]
fn lapsed_claims_make_room_and_never_complete() {
    let store = MemoryStore::with_limits(10, 1 << 20, 2).unwrap();
    let short = Duration::from_millis(30);
    let (a, b) = (Bytes::from_static(b"a"), Bytes::from_static(b"b"));
    assert_eq!(ready(store.begin("a", &a, short)).unwrap(), None);
    assert_eq!(ready(store.begin("b", &b, short)).unwrap(), None);
    let c = Bytes::from_static(b"c");
    assert!(matches!(
        ready(store.begin("c", &c, LEASE)),
        Err(StoreError::Full(_))
    ));
    std::thread::sleep(short + Duration::from_millis(20));
    assert_eq!(ready(store.begin("c", &c, LEASE)).unwrap(), None);
    assert_eq!(ready(store.begin("a", &c, LEASE)).unwrap(), None);
    assert_eq!(store.claim_count(), 2);
    let stale = ready(store.complete("a", &a, Bytes::from_static(b"stale"), LONG)).unwrap();
    assert!(!stale, "a stale execution completed over a newer claim");
    assert_eq!(found(&store, "a"), Some(c));
}

// ---------------------------------------------------------------------------------------
// 5. The local tier.

/// A memory store that answers a completion some time after applying it, as a store
/// across a network does (the local copy is made when the answer arrives).
#[derive(Clone)]
struct Distant {
    inner: MemoryStore,
    delay: Duration,
}

impl Store for Distant {
    fn begin<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        self.inner.begin(key, claim, lease)
    }

    fn renew<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.inner.renew(key, claim, lease)
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        record: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let applied = ready(self.inner.complete(key, claim, record, ttl));
        let until = Instant::now() + self.delay;
        while Instant::now() < until {
            std::hint::spin_loop();
        }
        Box::pin(std::future::ready(applied))
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.inner.release(key, claim)
    }
}

/// Guards: a local copy is never answered after its record expired in the store. Sixteen
/// instances, each with its own store (which answers a completion 0.5 ms after applying
/// it) and local tier, complete a key with a 1 s TTL; as soon as a store has dropped the
/// record as expired, a retry is sent: it must run afresh, not replay the local copy.
#[tokio::test]
async fn a_local_copy_is_never_replayed_after_its_record_expired() {
    const INSTANCES: usize = 16;
    let instances: Vec<_> = (0..INSTANCES)
        .map(|_| {
            let store = MemoryStore::with_bounds(10, 1 << 20).unwrap();
            let distant = Distant {
                inner: store.clone(),
                delay: Duration::from_micros(500),
            };
            let idem = common::test_builder(Idempotency::builder().store(distant))
                .local_tier(1 << 20, Duration::from_secs(60))
                .build();
            let counters = Arc::new(Counters::default());
            (store, app(&idem, counters))
        })
        .collect();
    for (_, app) in &instances {
        let first = send(app, post_with("/short", Some("k"), "")).await;
        assert_eq!(
            (first.status, &first.body[..]),
            (StatusCode::CREATED, &b"run 1"[..])
        );
        let replay = send(app, post_with("/short", Some("k"), "")).await;
        assert!(replay.is_replay());
    }
    let mut outcomes = [None; INSTANCES];
    let deadline = Instant::now() + Duration::from_secs(3);
    while outcomes.iter().any(Option::is_none) && Instant::now() < deadline {
        for (i, (store, app)) in instances.iter().enumerate() {
            if outcomes[i].is_some() {
                continue;
            }
            store.run_pending_tasks();
            if store.entry_count() == 0 {
                let retry = send(app, post_with("/short", Some("k"), "")).await;
                outcomes[i] = Some(retry.is_replay());
            }
        }
    }
    let replayed_after_expiry = outcomes
        .iter()
        .filter(|outcome| **outcome == Some(true))
        .count();
    assert_eq!(
        (
            replayed_after_expiry,
            outcomes.iter().filter(|o| o.is_none()).count()
        ),
        (0, 0),
        "(instances that replayed a local copy after the store dropped its expired record, instances whose record never expired) of {INSTANCES}"
    );
}

/// Guards: the local tier answers only the request and the client it holds a copy for:
/// the same key with another body is a 422 (never the copy), the same key from another
/// client (another scope) runs afresh for that client, and each client's retry then
/// replays its own response, never the other's.
#[tokio::test]
async fn the_local_tier_answers_only_its_own_request_and_client() {
    let store = MemoryStore::with_bounds(100, 1 << 20).unwrap();
    let idem = Idempotency::builder()
        .store(store)
        .local_tier(1 << 20, Duration::from_secs(60))
        .build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let key = "k".repeat(255);

    let first = send(&app, as_client("alice", &key, "{\"a\":1}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let replay = send(&app, as_client("alice", &key, "{\"a\":1}")).await;
    assert!(replay.is_replay());
    assert_eq!(replay.body, first.body);

    let other_body = send(&app, as_client("alice", &key, "{\"a\":2}")).await;
    assert_eq!(other_body.status, StatusCode::UNPROCESSABLE_ENTITY);

    let bob = send(&app, as_client("bob", &key, "{\"a\":1}")).await;
    assert_eq!(bob.status, StatusCode::CREATED);
    assert!(!bob.is_replay(), "another client was answered alice's copy");
    assert_ne!(bob.body, first.body);
    let bob_again = send(&app, as_client("bob", &key, "{\"a\":1}")).await;
    let alice_again = send(&app, as_client("alice", &key, "{\"a\":1}")).await;
    assert_eq!(
        (
            bob_again.is_replay(),
            &bob_again.body,
            alice_again.is_replay(),
            &alice_again.body
        ),
        (true, &bob.body, true, &first.body)
    );
    assert_eq!(counters.runs(), 2);
}

// ---------------------------------------------------------------------------------------
// 6. Work under a shard's lock.

/// Guards: a small completion into a shard full of expired records drops only as many of
/// them as it needs room for (one), not every expired record under the shard's lock; and
/// the records stay droppable by `run_pending_tasks`.
#[test]
fn one_completion_drops_only_the_expired_records_it_needs_room_for() {
    // One shard (under 32 MiB), bounded by bytes only.
    let store = MemoryStore::with_bounds(u64::MAX, 8 << 20).unwrap();
    let small = Bytes::from_static(b"r");
    let mut n = 0u64;
    // Fill it with records expired at once until the shard evicts.
    loop {
        let before = store.entry_count();
        complete_new(&store, &format!("expired-{n}"), &small, Duration::ZERO).unwrap();
        n += 1;
        if store.entry_count() <= before {
            break;
        }
    }
    let full = store.entry_count();
    assert!(full > 10_000, "{full}");
    let started = Instant::now();
    assert!(complete_new(&store, "live", &small, LONG).unwrap());
    let took = started.elapsed();
    assert_eq!(
        full - store.entry_count() + 1,
        1,
        "records one completion dropped from a full shard of {full} expired records (in {took:?})"
    );
    store.run_pending_tasks();
    assert_eq!(store.entry_count(), 1);
}

/// Fills `store` with records of `record` under keys `{prefix}-{n}` until it evicts;
/// returns how many it holds then.
fn fill(store: &MemoryStore, prefix: &str, record: &Bytes) -> u64 {
    for n in 0.. {
        let before = store.entry_count();
        complete_new(store, &format!("{prefix}-{n}"), record, LONG).unwrap();
        if store.entry_count() <= before {
            break;
        }
    }
    store.entry_count()
}

/// Guards: a heavy completion into a full shard evicts only as many records as it needs
/// room for, one at a time, never more: in the default store (`MemoryStore::new()`, whose
/// records weigh at least one slot of 16 MiB / 6250) a 1 MiB response (the default
/// `max_response_bytes`) evicts at most 1 MiB / slot + 1 records; in a store bounded by
/// bytes only (16 MiB, one shard) full of small records, a 1 MiB and a nearly 16 MiB one
/// leave the shard less than one small record under its bound.
#[test]
fn one_heavy_completion_evicts_only_what_it_needs_room_for() {
    let small = Bytes::from_static(b"r");
    let heavy = Bytes::from(vec![b'h'; defaults::MAX_RESPONSE_BYTES]);

    let store = MemoryStore::new();
    for n in 0..MemoryStore::DEFAULT_MAX_ENTRIES {
        complete_new(&store, &format!("small-{n}"), &small, LONG).unwrap();
    }
    let full = store.entry_count();
    assert!(complete_new(&store, "heavy", &heavy, LONG).unwrap());
    let slot = (16 << 20) / (MemoryStore::DEFAULT_MAX_ENTRIES / 16);
    let evicted = full + 1 - store.entry_count();
    assert!(
        evicted <= defaults::MAX_RESPONSE_BYTES as u64 / slot + 2,
        "a 1 MiB response evicted {evicted} records of the default store"
    );

    let bound = 16 << 20;
    let heaviest = Bytes::from(vec![b'h'; (16 << 20) - 1024]);
    for (n, record) in [heavy, heaviest].iter().enumerate() {
        let store = MemoryStore::with_bounds(u64::MAX, bound).unwrap();
        let full = fill(&store, "small", &small);
        let started = Instant::now();
        assert!(complete_new(&store, &format!("heavy-{n}"), record, LONG).unwrap());
        let took = started.elapsed();
        let evicted = full + 1 - store.entry_count();
        // Small records weigh at most 11 + 1 bytes and the overhead.
        assert!(
            store.weighted_size() + 12 + ENTRY_OVERHEAD > bound && evicted > 0,
            "a {}-byte record evicted {evicted} records (in {took:?}), leaving {} bytes of {bound}",
            record.len(),
            store.weighted_size()
        );
    }
}

// ---------------------------------------------------------------------------------------
// 7. Memory: the byte bound against what the store really holds.

/// Resident memory of this process, in bytes.
#[cfg(target_os = "linux")]
fn resident() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .unwrap();
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|kib| kib.parse().ok())
        .unwrap();
    kib * 1024
}

const PROBE_BOUND: u64 = 32 << 20;
const PROBE_KEY_LEN: &str = "IDEM_MEMORY_REVIEW_KEY_LEN";

/// Fills a store bounded at 32 MiB (bytes only) with records of 64 bytes under keys of
/// `IDEM_MEMORY_REVIEW_KEY_LEN` characters, and prints how far resident memory grew; then
/// how much a set of (`Instant`, key) pairs for as many keys (an expiry index alone)
/// takes. Run in a process of its own by
/// [`a_full_store_stays_within_its_byte_bound_in_memory`].
#[cfg(target_os = "linux")]
#[test]
#[ignore = "a probe run in a process of its own by a_full_store_stays_within_its_byte_bound_in_memory"]
fn resident_memory_probe() {
    let key_len: usize = std::env::var(PROBE_KEY_LEN)
        .ok()
        .and_then(|len| len.parse().ok())
        .unwrap_or(LONGEST_STORED_KEY);
    let record_len = 64;
    let per_entry = key_len as u64 + record_len + ENTRY_OVERHEAD;
    let fits = PROBE_BOUND / per_entry;
    let store = MemoryStore::with_bounds(u64::MAX, PROBE_BOUND).unwrap();
    let before = resident();
    for n in 0..fits * 3 / 2 {
        let record = Bytes::from(vec![b'r'; record_len as usize]);
        complete_new(&store, &key_of(n, key_len), &record, LONG).unwrap();
    }
    let grown = resident() - before;
    let entries = store.entry_count();
    println!(
        "PROBE store_growth={grown} weighted={} entries={entries}",
        store.weighted_size()
    );
    let before = resident();
    let now = Instant::now();
    let index: BTreeSet<(Instant, String)> = (0..entries)
        .map(|n| (now + Duration::from_nanos(n), key_of(n, key_len)))
        .collect();
    let index_grown = resident() - before;
    println!("PROBE index_growth={index_grown}");
    std::hint::black_box((&store, &index));
}

/// Guards: a full store's records take no more memory than its byte bound says
/// ("`max_bytes` tracks the resident memory the store adds"; 10% allowed), with the
/// longest keys a store is given (288 characters: scope, colon, 255-character key) and
/// with the keys of UUIDs (69): measured as the growth of resident memory in a process of
/// its own.
#[cfg(target_os = "linux")]
#[test]
fn a_full_store_stays_within_its_byte_bound_in_memory() {
    let mut over = Vec::new();
    for key_len in [LONGEST_STORED_KEY, 32 + 1 + 36] {
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "resident_memory_probe",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(PROBE_KEY_LEN, key_len.to_string())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "the probe failed: {stdout}");
        let value = |name: &str| -> u64 {
            stdout
                .split_whitespace()
                .find_map(|word| word.strip_prefix(&format!("{name}=")).map(str::to_owned))
                .and_then(|value| value.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in {stdout}"))
        };
        let (grown, weighted, entries, index) = (
            value("store_growth"),
            value("weighted"),
            value("entries"),
            value("index_growth"),
        );
        if grown > PROBE_BOUND + PROBE_BOUND / 10 {
            over.push(format!(
                "{key_len}-character keys: {entries} records weighing {weighted} grew resident memory by {grown} bytes ({:.2}x the bound; {} bytes a record against {} counted); an expiry index alone of as many keys takes {index} bytes ({} a record)",
                grown as f64 / PROBE_BOUND as f64,
                grown / entries,
                weighted / entries,
                index / entries
            ));
        }
    }
    assert!(
        over.is_empty(),
        "a store bounded at {PROBE_BOUND} bytes takes more: {over:#?}"
    );
}
