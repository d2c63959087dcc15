//! `GET /metrics` after a scripted sequence shows exactly what happened: idem's request
//! outcomes and its store steps. A test binary of its own: the recorder is process-wide.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;

use payments::{AppState, Config, Db, NewOrder};
use reqwest::StatusCode;
use serde_json::json;
use support::{Answer, Gate, Server, TempDir};
use testkit::RedisServer;

fn order(customer: &str) -> NewOrder {
    serde_json::from_value(json!({
        "customer_id": customer,
        "currency": "EUR",
        "items": [{ "sku": "LAMP", "quantity": 1, "unit_price_cents": 4200 }],
    }))
    .unwrap()
}

async fn post_order(url: &str, key: &str, request: &NewOrder) -> Answer {
    let response = support::http()
        .post(format!("{url}/orders"))
        .header("idempotency-key", key)
        .json(request)
        .send()
        .await
        .unwrap();
    Answer::read(response).await.unwrap()
}

/// The value of the sample `name` in Prometheus' text format, 0 where it is absent.
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .map_or(0.0, |value| value.trim().parse().unwrap())
}

/// Guards: every outcome and every store step of a scripted sequence is counted exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_every_outcome_and_store_step() {
    let mut redis = RedisServer::start();
    let dir = TempDir::new("metrics");
    let config = Config {
        database_url: format!("sqlite://{}?mode=rwc", dir.0.join("p.db").display()),
        redis_url: Some(redis.url()),
        ..Config::default()
    };
    let db = Db::connect(&config.database_url).await.unwrap();
    let gate = Gate::new();
    let store = payments::idempotency_store(&config).await.unwrap();
    let idem = payments::idempotency_settings(&config)
        .shared_store(Arc::new(gate.guard(store)))
        .build();
    let router = payments::with_metrics(payments::authenticated_router(
        AppState::new(db),
        &idem,
        config.api_keys.clone(),
    ));
    let server = Server::start(router).await;
    let url = server.url.as_str();

    // One execution, three replays, one key reused with another body, one bad key.
    assert_eq!(
        post_order(url, "m-1", &order("cus_1")).await.status,
        StatusCode::CREATED
    );
    for _ in 0..3 {
        assert!(post_order(url, "m-1", &order("cus_1")).await.replayed);
    }
    let reused = post_order(url, "m-1", &order("cus_other")).await;
    assert_eq!(
        reused.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{reused:?}"
    );
    let bad = post_order(url, "\"unterminated", &order("cus_1")).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{bad:?}");

    // A second execution, held after its claim while the same key is sent again: 409.
    gate.close();
    let held = tokio::spawn({
        let url = url.to_owned();
        async move { post_order(&url, "m-2", &order("cus_2")).await }
    });
    gate.held().await;
    let in_flight = post_order(url, "m-2", &order("cus_2")).await;
    assert_eq!(in_flight.status, StatusCode::CONFLICT, "{in_flight:?}");
    gate.open();
    assert_eq!(held.await.unwrap().status, StatusCode::CREATED);

    // The store goes away: 503.
    redis.kill();
    let down = post_order(url, "m-3", &order("cus_3")).await;
    assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE, "{down:?}");

    let metrics = support::http()
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let outcome = |outcome: &str| {
        sample(
            &metrics,
            &format!("idem_requests_total{{outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(outcome("executed"), 2.0, "{metrics}");
    assert_eq!(outcome("replayed"), 3.0, "{metrics}");
    assert_eq!(outcome("in_flight"), 1.0, "{metrics}");
    assert_eq!(outcome("key_reused"), 1.0, "{metrics}");
    assert_eq!(outcome("bad_key"), 1.0, "{metrics}");
    assert_eq!(outcome("store_error"), 1.0, "{metrics}");
    for never in ["fail_open", "local_hit", "body_too_large", "overloaded"] {
        assert_eq!(outcome(never), 0.0, "{never}: {metrics}");
    }
    let steps = |step: &str| {
        sample(
            &metrics,
            &format!("idem_store_seconds_count{{step=\"{step}\"}}"),
        )
    };
    // Every keyed request but the bad key begins: 2 + 3 + 1 + 1 + 1.
    assert_eq!(steps("begin"), 8.0, "{metrics}");
    assert_eq!(steps("complete"), 2.0, "{metrics}");
    assert_eq!(steps("release"), 0.0, "{metrics}");
    assert_eq!(
        sample(
            &metrics,
            "idem_store_seconds_bucket{step=\"begin\",le=\"+Inf\"}"
        ),
        8.0,
        "store latencies are histograms: {metrics}"
    );
    assert_eq!(
        sample(&metrics, "idem_executions_in_flight"),
        0.0,
        "{metrics}"
    );
}
