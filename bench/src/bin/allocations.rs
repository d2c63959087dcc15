//! Heap allocations per request on every row of the load test, counted exactly by dhat's
//! allocator (in testing mode: counts only, no profile written): the app of the load test
//! in process, one request after another on a current-thread runtime.
//!
//! `cargo run --release -p idem-bench --bin allocations [REDIS_URL] [N]`
//!
//! Requests are built before counting starts, so only what serving them allocates counts
//! (the request's own head and body are not). Redis rows need a server (default
//! `redis://127.0.0.1:6379`; keys under `bench:`).

use axum::body::Body;
use axum::http::{Method, Request};
use tower::ServiceExt;

#[global_allocator]
static ALLOCATOR: dhat::Alloc = dhat::Alloc;

/// The body of every request, as the load test sends it.
const BODY: &str = r#"{"amount":2500,"currency":"EUR"}"#;

fn request(path: &str, key: Option<String>) -> Request<Body> {
    let mut builder = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header("content-type", "application/json");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder.body(Body::from(BODY)).expect("request")
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let mut args = std::env::args().skip(1);
    let redis_url = args
        .next()
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned());
    let count: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(2000);
    let app = idem_bench::app(&redis_url).await.expect("Redis");
    let run = std::process::id();
    let rows: [(&str, &str, Option<&str>); 9] = [
        ("bare", "/bare", None),
        ("floor, 1 GET (replay floor)", "/floor/one", None),
        ("floor, 2 SET (first-execution floor)", "/floor/two", None),
        ("memory, first execution", "/memory", Some("miss")),
        ("memory, replay", "/memory", Some("hit")),
        ("redis, first execution", "/redis", Some("miss")),
        ("redis, replay", "/redis", Some("hit")),
        (
            "redis + local tier, first execution",
            "/local",
            Some("miss"),
        ),
        ("redis + local tier, replay", "/local", Some("hit")),
    ];
    println!("| row | allocations per request | bytes allocated per request |");
    println!("| --- | ---: | ---: |");
    for (name, path, kind) in rows {
        let key = |n: usize| match kind {
            None => None,
            Some("hit") => Some(format!("alloc-{run}-hit")),
            Some(_) => Some(format!("alloc-{run}-{path}-{n}")),
        };
        // Warm up: connections, caches, the key a replay finds.
        for n in 0..50 {
            let response = app.clone().oneshot(request(path, key(count + n))).await;
            assert!(response.expect("infallible").status().is_success());
        }
        if kind == Some("hit") {
            let response = app.clone().oneshot(request(path, key(0))).await;
            assert!(response.expect("infallible").status().is_success());
        }
        let requests: Vec<_> = (0..count).map(|n| request(path, key(n))).collect();
        let before = dhat::HeapStats::get();
        for request in requests {
            let response = app.clone().oneshot(request).await.expect("infallible");
            assert!(
                response.status().is_success(),
                "{name}: {}",
                response.status()
            );
            drop(response);
        }
        let after = dhat::HeapStats::get();
        #[allow(clippy::cast_precision_loss)]
        let per = |a: u64, b: u64| (a - b) as f64 / count as f64;
        println!(
            "| {name} | {:.1} | {:.0} |",
            per(after.total_blocks, before.total_blocks),
            per(after.total_bytes, before.total_bytes)
        );
    }
}
