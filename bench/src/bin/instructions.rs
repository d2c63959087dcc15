//! Requests through the router in one thread, for `valgrind --tool=callgrind`, whose
//! instruction counts do not depend on how busy the machine is.
//!
//! `valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/instructions ROW N`
//! with ROW one of `bare`, `memory-miss`, `memory-hit`, `local-hit`, or, on the load
//! test's app with a Redis at `IDEM_REDIS` (default `redis://127.0.0.1:6379`, keys under
//! `bench:`), `redis-miss`, `redis-hit`, `local-miss` (a Redis first execution with the
//! local tier on), `floor-one` (bare + 1 `GET`) and `floor-two`
//! (bare + 2 `SET`). Run it with two values of N: the difference of the totals divided by
//! the difference of N is the cost of one request, without start-up. Under valgrind the
//! Redis rows count this process only, not the server.
//!
//! `IDEM_PREFILL=N` first serves N memory first executions of keys of their own, so that
//! the rows run against a memory store that is full (at its default bound of 100,000
//! records, each new record evicts one) and a heap shaped by it, as in a long load test.

use axum::body::Body;
use axum::http::{HeaderValue, Request, StatusCode, header};
use idem_bench::in_process::{request, router};
use tower::ServiceExt;

/// The rows served by the load test's app, on Redis.
const ON_REDIS: [&str; 5] = [
    "redis-miss",
    "redis-hit",
    "local-miss",
    "floor-one",
    "floor-two",
];

/// `request`, as JSON: the load test's app reads its body as such.
fn json(mut request: Request<Body>) -> Request<Body> {
    request.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    request
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let row = args.next().unwrap_or_else(|| "memory-miss".to_owned());
    let count: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(1000);
    let run = std::process::id();
    let on_redis = ON_REDIS.contains(&row.as_str());
    let app = if on_redis {
        let url = std::env::var("IDEM_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        idem_bench::app(&url).await.expect("Redis")
    } else {
        router()
    };
    let primes = if on_redis {
        vec![json(request("/redis", Some(format!("instr-{run}-hit"))))]
    } else {
        vec![
            request("/memory", Some("hit".into())),
            request("/local", Some("hit".into())),
        ]
    };
    let prefill: u64 = std::env::var("IDEM_PREFILL")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    for n in 0..prefill {
        let filled = app
            .clone()
            .oneshot(request("/memory", Some(format!("fill-{n}"))))
            .await;
        assert_eq!(filled.map(|r| r.status()).ok(), Some(StatusCode::CREATED));
    }
    for primed in primes {
        let primed = app.clone().oneshot(primed).await;
        assert_eq!(primed.map(|r| r.status()).ok(), Some(StatusCode::CREATED));
    }
    for n in 0..count {
        let request = match row.as_str() {
            "bare" => request("/bare", None),
            "memory-miss" => request("/memory", Some(format!("miss-{n}"))),
            "memory-hit" => request("/memory", Some("hit".into())),
            "local-hit" => request("/local", Some("hit".into())),
            "redis-miss" => json(request("/redis", Some(format!("instr-{run}-miss-{n}")))),
            "redis-hit" => json(request("/redis", Some(format!("instr-{run}-hit")))),
            "local-miss" => json(request("/local", Some(format!("instr-{run}-miss-{n}")))),
            "floor-one" => json(request("/floor/one", None)),
            "floor-two" => json(request("/floor/two", None)),
            other => panic!("no row {other}"),
        };
        let response = app.clone().oneshot(request).await.expect("infallible");
        assert!(response.status().is_success());
    }
}
