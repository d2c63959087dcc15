//! The sweep checks every store with a table runs (`PostgresStore`, `SqliteStore`): the
//! same 10,000 expired records, the same live ones that must survive.

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
                    assert_eq!(store.begin(&key, &claim, ttl).await.unwrap(), None);
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
