//! Requests through the router in one thread, for `valgrind --tool=callgrind`, whose
//! instruction counts do not depend on how busy the machine is.
//!
//! `valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/instructions ROW N`
//! with ROW one of `bare`, `memory-miss`, `memory-hit`, `local-hit`. Run it with two
//! values of N: the difference of the totals divided by the difference of N is the cost
//! of one request, without start-up.

use axum::http::StatusCode;
use idem_bench::in_process::{request, router};
use tower::ServiceExt;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let row = args.next().unwrap_or_else(|| "memory-miss".to_owned());
    let count: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(1000);
    let app = router();
    for (path, key) in [("/memory", "hit"), ("/local", "hit")] {
        let primed = app.clone().oneshot(request(path, Some(key.into()))).await;
        assert_eq!(primed.map(|r| r.status()).ok(), Some(StatusCode::CREATED));
    }
    for n in 0..count {
        let request = match row.as_str() {
            "bare" => request("/bare", None),
            "memory-miss" => request("/memory", Some(format!("miss-{n}"))),
            "memory-hit" => request("/memory", Some("hit".into())),
            _ => request("/local", Some("hit".into())),
        };
        let response = app.clone().oneshot(request).await.expect("infallible");
        assert!(response.status().is_success());
    }
}
