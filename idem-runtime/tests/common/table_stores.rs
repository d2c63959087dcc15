//! The checks every store with a table runs (`PostgresStore`, `SqliteStore`) on the store
//! itself: each step applied twice, concurrent claims of one key, and the sweep of the
//! same 10,000 expired records around the same live ones that must survive.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use idem_runtime::store::{Store, StoreError};

/// A store with a table of rows and a sweep, as the checks see it.
pub trait Swept: Store {
    /// Every row of the table, expired or not.
    fn all_rows(&self) -> impl Future<Output = i64> + Send;
    /// The rows whose lease or TTL has not run out.
    fn live_rows(&self) -> impl Future<Output = i64> + Send;
    /// One bounded batch of the sweep.
    fn delete_expired(&self, limit: u64) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// The whole sweep.
    fn sweep(&self, batch: u64) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// Polls `condition` (an async query) every 20 ms for up to `limit`; whether it held.
pub async fn eventually_async<F, Fut>(limit: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// 10,000 records past their 1 s TTL are swept in bounded batches, the table ends with
/// only what is still live, and nothing within its TTL or lease is deleted.
pub async fn sweep_deletes_what_expired_and_nothing_else<S: Swept>(store: Arc<S>) {
    let write = |prefix: &'static str, count: usize, ttl: Duration, complete: bool| {
        let store = store.clone();
        futures_util::stream::iter(0..count)
            .map(move |n| {
                let store = store.clone();
                async move {
                    let key = format!("{prefix}-{n}");
                    let claim = Bytes::from(format!("claim {n}"));
                    // A record's claim holds long enough to be completed however busy the
                    // machine is; the record then lives `ttl`.
                    let lease = if complete {
                        Duration::from_secs(600)
                    } else {
                        ttl
                    };
                    assert_eq!(store.begin(&key, &claim, lease).await.unwrap(), None);
                    if complete {
                        let record = Bytes::from(format!("record {n}"));
                        assert!(store.complete(&key, &claim, record, ttl).await.unwrap());
                    }
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<()>>()
    };
    let written = Instant::now();
    write("short", 10_000, Duration::from_secs(1), true).await;
    eprintln!("10,000 records written in {:?}", written.elapsed());
    write("kept", 100, Duration::from_secs(3600), true).await;
    write("claim", 10, Duration::from_secs(3600), false).await;
    assert_eq!(store.all_rows().await, 10_110);

    // Real expiry: wait until the short records' TTL has run out on the clock.
    assert!(
        eventually_async(Duration::from_secs(30), || {
            let store = store.clone();
            async move { store.live_rows().await == 110 }
        })
        .await,
        "expired rows count as absent"
    );
    let freed = store
        .begin(
            "short-7",
            &Bytes::from_static(b"new claim"),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(
        freed, None,
        "an expired record frees its key before any sweep"
    );

    assert_eq!(
        store.delete_expired(500).await.unwrap(),
        500,
        "one bounded batch"
    );
    let swept = Instant::now();
    let deleted = store.sweep(1000).await.unwrap();
    eprintln!("swept {deleted} rows in {:?}", swept.elapsed());
    assert_eq!(deleted, 10_000 - 1 - 500);
    assert_eq!(store.all_rows().await, 111, "only live rows are left");
    for n in 0..100 {
        let found = store
            .begin(
                &format!("kept-{n}"),
                &Bytes::from_static(b"x"),
                Duration::from_secs(1),
            )
            .await
            .unwrap();
        assert_eq!(found, Some(Bytes::from(format!("record {n}"))), "kept-{n}");
    }
    for n in 0..10 {
        assert!(
            store
                .renew(
                    &format!("claim-{n}"),
                    &Bytes::from(format!("claim {n}")),
                    Duration::from_secs(60)
                )
                .await
                .unwrap(),
            "claim-{n} is still held"
        );
    }
    assert_eq!(store.sweep(1000).await.unwrap(), 0, "nothing left to sweep");
}

/// each step applied twice (re-sent after a lost answer) answers as the trait
/// says: `begin` finds its own claim, `complete` finds its record, `release` finds nothing.
pub async fn steps_applied_twice<S: Store>(store: Arc<S>) {
    let (claim, record) = (Bytes::from_static(b"claim"), Bytes::from_static(b"record"));
    let lease = Duration::from_secs(10);

    assert_eq!(store.begin("k", &claim, lease).await.unwrap(), None);
    assert_eq!(
        store.begin("k", &claim, lease).await.unwrap(),
        Some(claim.clone()),
        "a begin applied twice finds its own claim"
    );
    assert!(store.renew("k", &claim, lease).await.unwrap());
    assert!(store.renew("k", &claim, lease).await.unwrap());
    assert!(
        store
            .complete("k", &claim, record.clone(), lease)
            .await
            .unwrap()
    );
    assert!(
        store
            .complete("k", &claim, record.clone(), lease)
            .await
            .unwrap(),
        "a complete applied twice finds its record"
    );
    assert!(!store.renew("k", &claim, lease).await.unwrap());
    assert!(
        !store.release("k", &claim).await.unwrap(),
        "a completed key is not released by its claim"
    );
    assert_eq!(
        store
            .begin("k", &Bytes::from_static(b"other"), lease)
            .await
            .unwrap(),
        Some(record)
    );

    assert_eq!(store.begin("r", &claim, lease).await.unwrap(), None);
    assert!(store.release("r", &claim).await.unwrap());
    assert!(
        !store.release("r", &claim).await.unwrap(),
        "a release applied twice finds nothing"
    );
    assert_eq!(
        store.begin("r", &claim, lease).await.unwrap(),
        None,
        "released is free"
    );

    // An expired claim is absent to every step: not renewed, not completed, and taken over.
    let short = Bytes::from_static(b"short");
    assert_eq!(
        store
            .begin("e", &short, Duration::from_millis(50))
            .await
            .unwrap(),
        None
    );
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert!(!store.renew("e", &short, lease).await.unwrap());
    assert!(
        !store
            .complete("e", &short, Bytes::from_static(b"late"), lease)
            .await
            .unwrap()
    );
    assert!(
        !store.release("e", &short).await.unwrap(),
        "an expired claim is not released as live"
    );
    assert_eq!(store.begin("e", &claim, lease).await.unwrap(), None);
}

/// 64 concurrent `begin`s on one free key, and on one expired key, leave exactly
/// one winner, and every other caller is handed the winner's claim.
pub async fn concurrent_begins_have_one_winner<S: Store>(store: Arc<S>) {
    let dead = Bytes::from_static(b"dead executor");
    assert_eq!(
        store
            .begin("expired", &dead, Duration::from_millis(1))
            .await
            .unwrap(),
        None
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    for key in ["fresh", "expired"] {
        let answers: Vec<_> = futures_util::future::join_all((0..64).map(|n| {
            let store = store.clone();
            async move {
                let claim = Bytes::from(format!("claim {n}"));
                let found = store.begin(key, &claim, Duration::from_secs(10)).await;
                (claim, found.unwrap())
            }
        }))
        .await;
        let winners: Vec<_> = answers
            .iter()
            .filter(|(_, found)| found.is_none())
            .collect();
        assert_eq!(winners.len(), 1, "{key}: exactly one claim taken");
        let winner = &winners[0].0;
        for (_, found) in answers.iter().filter(|(_, found)| found.is_some()) {
            assert_eq!(
                found.as_ref(),
                Some(winner),
                "{key}: the others see the winner"
            );
        }
    }
}
