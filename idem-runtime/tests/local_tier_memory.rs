//! The local tier's byte bound against the memory its copies really take: a full tier's
//! resident memory, measured in a process of its own.

#![allow(clippy::unwrap_used)]

/// The sharded map and the local tier, built into this test from their sources: the tier
/// is not public, and only it shows what one copy costs.
#[allow(dead_code, unreachable_pub)]
#[path = "../src/sharded.rs"]
mod sharded;

#[allow(dead_code, unreachable_pub, unused_imports)]
#[path = "../src/local.rs"]
mod local;

use std::time::Duration;

use bytes::Bytes;

const PROBE_BOUND: u64 = 32 << 20;
const PROBE_KEY_LEN: &str = "IDEM_LOCAL_TIER_KEY_LEN";

/// Resident memory of this process, in bytes.
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

fn key_of(n: u64, len: usize) -> String {
    let mut key = format!("{n}:");
    while key.len() < len {
        key.push('k');
    }
    key
}

/// Fills a tier bounded at 32 MiB with copies of 160-byte records (a small response)
/// under keys of `IDEM_LOCAL_TIER_KEY_LEN` characters, half again as many as fit, and
/// prints how far resident memory grew. Run in a process of its own by
/// [`a_full_local_tier_stays_within_its_byte_bound_in_memory`].
#[test]
#[ignore = "a probe run in a process of its own by a_full_local_tier_stays_within_its_byte_bound_in_memory"]
fn local_tier_memory_probe() {
    let key_len: usize = std::env::var(PROBE_KEY_LEN)
        .ok()
        .and_then(|len| len.parse().ok())
        .unwrap_or(288);
    let record_len = 160;
    let fits = PROBE_BOUND / (key_len as u64 + record_len + local::COPY_OVERHEAD);
    let tier = local::LocalTier::new(PROBE_BOUND, Duration::from_secs(3600));
    let expires = local::expiry_ms(Duration::from_secs(3600));
    let before = resident();
    for n in 0..fits * 3 / 2 {
        let key = key_of(n, key_len);
        let record = Bytes::from(vec![b'r'; record_len as usize]);
        tier.insert(&key, record, expires, tier.forgets(&key));
    }
    let grown = resident() - before;
    println!("PROBE growth={grown} fits={fits}");
    std::hint::black_box(&tier);
}

/// Guards: a full local tier takes no more memory than its byte bound says (10% allowed),
/// with the longest keys idem stores (288 characters) and with the keys of UUIDs (69).
#[test]
fn a_full_local_tier_stays_within_its_byte_bound_in_memory() {
    let mut over = Vec::new();
    for key_len in [288, 32 + 1 + 36] {
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "local_tier_memory_probe",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(PROBE_KEY_LEN, key_len.to_string())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "the probe failed: {stdout}");
        let grown: u64 = stdout
            .split_whitespace()
            .find_map(|word| word.strip_prefix("growth="))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no growth in {stdout}"));
        println!(
            "{key_len}-character keys: {grown} bytes, {:.3}x the bound",
            grown as f64 / PROBE_BOUND as f64
        );
        if grown > PROBE_BOUND + PROBE_BOUND / 10 {
            over.push(format!(
                "{key_len}-character keys: resident memory grew by {grown} bytes ({:.2}x the bound)",
                grown as f64 / PROBE_BOUND as f64
            ));
        }
    }
    assert!(over.is_empty(), "{over:#?}");
}
