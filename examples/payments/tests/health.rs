//! `GET /healthz` follows the idempotency store: `503` while Redis is down, `200` once it
//! is back, under the real app router.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use payments::Config;
use reqwest::StatusCode;
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
