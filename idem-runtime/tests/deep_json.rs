//! Regressions of "no panic": deeply nested JSON under `FingerprintMode::CanonicalJson`.
//! Alone in its file: the failure is a stack overflow that aborts the test process.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use axum::http::StatusCode;
use common::{Counters, app, post_with, send};
use idem_runtime::{FingerprintMode, Idempotency};

/// Guards (a defect once shown): a 100 KB body of nested arrays (well under the 1 MiB request limit) overflows
/// the stack while being canonicalized, aborting the whole process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_json_does_not_crash_the_process() {
    let idem = common::test_builder(Idempotency::builder())
        .fingerprint(FingerprintMode::CanonicalJson)
        .build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let depth = 50_000;
    let body = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    // Run it on a spawned task (a tokio worker thread, as a server would).
    let answer =
        tokio::spawn(async move { send(&app, post_with("/pay", Some("deep"), &body)).await })
            .await
            .unwrap();
    assert_eq!(answer.status, StatusCode::CREATED);
}
