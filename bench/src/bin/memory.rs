//! Resident memory of the memory store.
//!
//! `cargo run --release -p idem-bench --bin memory -- bound` inserts 1,000,000 distinct
//! keys into a store bounded to 64 MiB and reports resident memory as it goes;
//! `-- per-entry` stores 100,000 completed records of 1 KiB and reports resident bytes
//! per record.

use std::time::Duration;

use bytes::Bytes;
use idem_runtime::store::{MemoryStore, Store};
use idem_runtime::{
    FingerprintMode, fingerprint::Fingerprint, record::FencingToken, record::Record,
    record::StoredResponse,
};

fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn completed(fingerprint: Fingerprint, body_len: usize) -> Bytes {
    Record::Completed(StoredResponse {
        fingerprint,
        status: http::StatusCode::CREATED,
        headers: vec![(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        )],
        body: Bytes::from(vec![b'x'; body_len]),
        expires_at_ms: u64::MAX,
    })
    .encode()
}

async fn fill(store: &MemoryStore, keys: u64, body_len: usize, report_every: u64) {
    let ttl = Duration::from_secs(3600);
    for n in 0..keys {
        let key = format!("{:032x}:key-{n}", n);
        let fingerprint = Fingerprint::of(
            &FingerprintMode::Exact,
            &http::Method::POST,
            "/p",
            key.as_bytes(),
        );
        let claim = Record::InProgress {
            fingerprint,
            token: FencingToken::generate(),
        }
        .encode();
        let found = store.begin(&key, &claim, ttl).await.expect("memory store");
        assert!(found.is_none(), "every key is distinct");
        let done = store
            .complete(&key, &claim, completed(fingerprint, body_len), ttl)
            .await
            .expect("memory store");
        assert!(done);
        if (n + 1) % report_every == 0 {
            store.run_pending_tasks();
            println!(
                "{:>9} keys inserted: {:>8} held, weighted {:>7.1} MiB, resident {:>7.1} MiB",
                n + 1,
                store.entry_count(),
                mib(store.weighted_size()),
                mib(resident_bytes())
            );
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mode = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "bound".to_owned());
    let before = resident_bytes();
    println!("resident before: {:.1} MiB", mib(before));
    match mode.as_str() {
        "bound" => {
            let max_bytes = 64 * 1024 * 1024;
            let store = MemoryStore::with_bounds(1_000_000, max_bytes).expect("bounds");
            fill(&store, 1_000_000, 100, 100_000).await;
            store.run_pending_tasks();
            println!(
                "bound {:.0} MiB: {} entries held, weighted {:.1} MiB, resident growth {:.1} MiB",
                mib(max_bytes),
                store.entry_count(),
                mib(store.weighted_size()),
                mib(resident_bytes() - before)
            );
        }
        _ => {
            let store = MemoryStore::with_bounds(200_000, 1 << 30).expect("bounds");
            fill(&store, 100_000, 1024, 25_000).await;
            store.run_pending_tasks();
            let grown = resident_bytes() - before;
            println!(
                "100k records of 1 KiB: resident growth {:.1} MiB = {:.0} bytes per record ({:.2}x the body)",
                mib(grown),
                grown as f64 / 100_000.0,
                grown as f64 / 100_000.0 / 1024.0
            );
        }
    }
}
