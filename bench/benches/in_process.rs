//! In-process costs: key parsing, fingerprinting, record encoding, and whole requests
//! through a Router (bare, memory miss, memory hit, local-tier hit), and `once` calls on
//! the memory store and on a private Redis, beside a bare call and raw Redis round trips.

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

/// The operation every `once` benchmark runs: a small value, at once.
async fn issue() -> Result<Vec<u32>, std::convert::Infallible> {
    Ok(vec![7, 42, 2026])
}

fn once(c: &mut Criterion) {
    use idem_runtime::store::RedisStore;
    use idem_runtime::{Idempotency, OnceKey};

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let server = testkit::RedisServer::start();
    let memory = Idempotency::in_memory();
    let redis = runtime.block_on(async {
        let store = RedisStore::builder(server.url())
            .prefix(testkit::unique_prefix("bench-once"))
            .connect()
            .await
            .expect("private Redis");
        Idempotency::builder().store(store).build()
    });
    let raw = runtime.block_on(testkit::redis_connection(&server.url()));
    let counter = AtomicU64::new(0);
    let fresh = || {
        OnceKey::compose([
            "bench",
            &counter.fetch_add(1, Ordering::Relaxed).to_string(),
        ])
    };
    let hit = OnceKey::compose(["bench", "hit"]);
    let mut group = c.benchmark_group("once");
    group.bench_function("bare call", |b| b.to_async(&runtime).iter(issue));
    for (name, idem) in [("memory", &memory), ("redis", &redis)] {
        group.bench_function(format!("{name} first run"), |b| {
            b.to_async(&runtime)
                .iter(|| idem.once(fresh(), "input").run(issue))
        });
        runtime
            .block_on(idem.once(hit.clone(), "input").run(issue))
            .expect("prime");
        group.bench_function(format!("{name} replay"), |b| {
            b.to_async(&runtime)
                .iter(|| idem.once(hit.clone(), "input").run(issue))
        });
    }
    group.bench_function("raw redis: 1 round trip (GET)", |b| {
        b.to_async(&runtime).iter(|| {
            let mut raw = raw.clone();
            async move {
                let value: Option<Vec<u8>> = redis::cmd("GET")
                    .arg("bench:raw")
                    .query_async(&mut raw)
                    .await
                    .expect("GET");
                value
            }
        })
    });
    group.bench_function("raw redis: 2 round trips (GET, GET)", |b| {
        b.to_async(&runtime).iter(|| {
            let mut raw = raw.clone();
            async move {
                for _ in 0..2 {
                    let _: Option<Vec<u8>> = redis::cmd("GET")
                        .arg("bench:raw")
                        .query_async(&mut raw)
                        .await
                        .expect("GET");
                }
            }
        })
    });
    group.finish();
}

/// Whole requests with a Prometheus recorder (the example app's) and without: what the
/// metrics cost per request. The recorder is local to the benchmark's thread, where the
/// current-thread runtime runs the request to its end.
fn with_metrics(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let counter = AtomicU64::new(0);
    let mut group = c.benchmark_group("metrics");
    for (label, recorded) in [("without", false), ("with recorder", true)] {
        let app = router();
        // idem resolves its metrics on its first report, under the recorder installed then.
        let prime =
            || runtime.block_on(app.clone().oneshot(request("/memory", Some("hit".into()))));
        if recorded {
            metrics::with_local_recorder(&recorder, prime).expect("prime");
        } else {
            prime().expect("prime");
        }
        let run = |request| runtime.block_on(app.clone().oneshot(request));
        group.bench_function(format!("memory hit, {label}"), |b| {
            b.iter(|| run(request("/memory", Some("hit".into()))))
        });
        group.bench_function(format!("memory miss, {label}"), |b| {
            b.iter(|| {
                let key = format!("metrics-miss-{}", counter.fetch_add(1, Ordering::Relaxed));
                run(request("/memory", Some(key)))
            })
        });
        // Fold the histogram samples into their buckets, as a scrape does.
        handle.run_upkeep();
    }
    group.finish();
}

criterion_group!(benches, parsing, requests, once, with_metrics);
criterion_main!(benches);
