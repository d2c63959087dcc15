//! The idempotency store going away and coming back, under the real app router:
//! `GET /healthz` follows it (`503` while Redis is down, `200` once it is back), and a
//! Redis restart costs no request.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use payments::{Config, NewOrder, Order};
use reqwest::StatusCode;
use serde_json::json;
use support::{Answer, Server, TempDir};
use testkit::RedisServer;

/// Polls `/healthz` until it answers `want`, for at most 10 s; returns that answer.
async fn health_becomes(http: &reqwest::Client, url: &str, want: StatusCode) -> Answer {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = Answer::read(
            http.get(format!("{url}/healthz"))
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .unwrap(),
        )
        .await
        .unwrap();
        if answer.status == want {
            return answer;
        }
        assert!(
            Instant::now() < deadline,
            "/healthz did not answer {want} within 10 s: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Guards: `/healthz` is `503` while the idempotency store is down and `200` after it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_503_while_redis_is_down() {
    let mut redis = RedisServer::start();
    let dir = TempDir::new("health");
    let config = Config {
        database_url: format!("sqlite://{}?mode=rwc", dir.0.join("p.db").display()),
        redis_url: Some(redis.url()),
        ..Config::default()
    };
    let server = Server::start(payments::app(&config).await.unwrap()).await;
    let http = reqwest::Client::new();

    let up = health_becomes(&http, &server.url, StatusCode::OK).await;
    assert_eq!(up.status, StatusCode::OK);

    redis.kill();
    let down = health_becomes(&http, &server.url, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(
        down.problem_type(),
        "urn:payments:problem:store-unavailable"
    );
    assert!(down.retry_after.is_some(), "a 503 says when to retry");

    redis.restart();
    health_becomes(&http, &server.url, StatusCode::OK).await;
}

/// Guards: after each of three restarts of the app's Redis, the very first request (no
/// probe before it) and the ones after it answer as if nothing happened: `201`, then its
/// replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_costs_no_request() {
    let mut redis = RedisServer::start();
    let dir = TempDir::new("restart");
    let config = Config {
        database_url: format!("sqlite://{}?mode=rwc", dir.0.join("p.db").display()),
        redis_url: Some(redis.url()),
        ..Config::default()
    };
    let server = Server::start(payments::app(&config).await.unwrap()).await;
    let request: NewOrder = serde_json::from_value(json!({
        "customer_id": "cus_restart",
        "currency": "EUR",
        "items": [{ "sku": "LAMP", "quantity": 1, "unit_price_cents": 4200 }],
    }))
    .unwrap();
    let post = |key: String| {
        let (url, request) = (server.url.clone(), request.clone());
        async move {
            let response = support::http()
                .post(format!("{url}/orders"))
                .header("idempotency-key", key)
                .json(&request)
                .send()
                .await
                .unwrap();
            Answer::read(response).await.unwrap()
        }
    };
    for round in 0..4 {
        if round > 0 {
            redis.restart();
        }
        for n in 0..2 {
            let key = format!("restart-{round}-{n}");
            let first = post(key.clone()).await;
            assert_eq!(
                first.status,
                StatusCode::CREATED,
                "round {round}: {first:?}"
            );
            assert!(!first.replayed, "round {round}");
            let again = post(key).await;
            assert_eq!(
                again.status,
                StatusCode::CREATED,
                "round {round}: {again:?}"
            );
            assert!(again.replayed, "round {round}");
            assert_eq!(again.json::<Order>().id, first.json::<Order>().id);
        }
    }
}
