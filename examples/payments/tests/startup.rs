//! The payments app at start-up: database URLs it cannot serve are refused.

#![allow(clippy::unwrap_used)]

use axum::body::Body;
use axum::http::{Request, StatusCode};
use payments::Config;
use tower::ServiceExt;

async fn post(router: &axum::Router, path: &str, key: &str, body: &str) -> (StatusCode, String) {
    let request = Request::builder()
        .method("POST")
        .uri(path)
        .header("authorization", "Bearer sk_test_demo")
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(Body::from(body.to_owned()))
        .unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// Guards: `DATABASE_URL=sqlite::memory:` (where the app's pool and idem's store would
/// each open a database of their own, every order failing with 500) is refused at start,
/// or, where it starts, takes orders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_memory_database_url_either_refuses_to_start_or_takes_orders() {
    let config = Config {
        database_url: "sqlite::memory:".to_owned(),
        ..Config::default()
    };
    let Ok(router) = payments::app(&config).await else {
        // Refusing the URL at startup, with a clear error, would be fine.
        return;
    };
    let (status, body) = post(
        &router,
        "/orders",
        "attack-memory-order",
        r#"{"customer_id":"cus_1","items":[{"sku":"a","quantity":1,"unit_price_cents":100}]}"#,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}
