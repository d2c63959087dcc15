//! In-process costs: key parsing, fingerprinting, record encoding, and whole requests
//! through a Router (bare, memory miss, memory hit, local-tier hit).

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::Method;
use criterion::{Criterion, criterion_group, criterion_main};
use idem_bench::in_process::{BODY, request, router};
use idem_runtime::{FingerprintMode, IdempotencyKey, fingerprint::Fingerprint};
use tower::ServiceExt;

fn parsing(c: &mut Criterion) {
    c.bench_function("key/parse quoted uuid", |b| {
        b.iter(|| IdempotencyKey::parse(black_box(b"\"8e03978e-40d5-43e8-bc93-6894a57f9324\"")))
    });
    c.bench_function("fingerprint/exact 64 B body", |b| {
        b.iter(|| {
            Fingerprint::of(
                &FingerprintMode::Exact,
                &Method::POST,
                black_box("/payments"),
                black_box(BODY.as_bytes()),
            )
        })
    });
    c.bench_function("fingerprint/canonical json 64 B body", |b| {
        b.iter(|| {
            Fingerprint::of(
                &FingerprintMode::CanonicalJson,
                &Method::POST,
                black_box("/payments"),
                black_box(BODY.as_bytes()),
            )
        })
    });
}

fn requests(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let app = router();
    let counter = AtomicU64::new(0);
    let mut group = c.benchmark_group("request");
    group.bench_function("bare", |b| {
        b.to_async(&runtime)
            .iter(|| app.clone().oneshot(request("/bare", None)))
    });
    group.bench_function("memory miss", |b| {
        b.to_async(&runtime).iter(|| {
            let key = format!("miss-{}", counter.fetch_add(1, Ordering::Relaxed));
            app.clone().oneshot(request("/memory", Some(key)))
        })
    });
    runtime
        .block_on(app.clone().oneshot(request("/memory", Some("hit".into()))))
        .expect("prime");
    group.bench_function("memory hit", |b| {
        b.to_async(&runtime)
            .iter(|| app.clone().oneshot(request("/memory", Some("hit".into()))))
    });
    runtime
        .block_on(app.clone().oneshot(request("/local", Some("hit".into()))))
        .expect("prime");
    group.bench_function("local-tier hit", |b| {
        b.to_async(&runtime)
            .iter(|| app.clone().oneshot(request("/local", Some("hit".into()))))
    });
    group.finish();
}

criterion_group!(benches, parsing, requests);
criterion_main!(benches);
