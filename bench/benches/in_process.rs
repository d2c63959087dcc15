//! In-process costs: key parsing, fingerprinting, record encoding, and whole requests
//! through a Router (bare, memory miss, memory hit, local-tier hit).

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::routing::post;
use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use idem_runtime::{Fingerprint, FingerprintMode, Idempotency, IdempotencyKey, idempotent};
use tower::ServiceExt;

const BODY: &str = r#"{"order_id":"ord_8e03978e","amount_cents":2500,"currency":"EUR"}"#;

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

async fn bare(body: Bytes) -> (StatusCode, Bytes) {
    (StatusCode::CREATED, body)
}

#[idempotent]
async fn guarded(body: Bytes) -> (StatusCode, Bytes) {
    (StatusCode::CREATED, body)
}

fn request(path: &str, key: Option<String>) -> Request<Body> {
    let mut builder = Request::builder().method(Method::POST).uri(path);
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder.body(Body::from(BODY)).expect("request")
}

fn requests(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let memory = Idempotency::in_memory();
    let local = Idempotency::builder()
        .local_tier(64 * 1024 * 1024, std::time::Duration::from_secs(60))
        .build();
    let app = Router::new()
        .route("/bare", post(bare))
        .merge(
            Router::new()
                .route("/memory", post(guarded))
                .layer(memory.layer()),
        )
        .merge(
            Router::new()
                .route("/local", post(guarded))
                .layer(local.layer()),
        );
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
