//! A replayed response (`Idempotent-Replayed: true`) is the server's stored, final answer
//! to the key. Retrying it can only replay it again: the caller gets it.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use idem_client::{IdempotentRetry, ResponseExt, client_error};
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use std::time::Duration;
use tokio::net::TcpListener;

fn client() -> ClientWithMiddleware {
    ClientBuilder::new(reqwest::Client::new())
        .with(
            IdempotentRetry::default()
                .backoff(Duration::from_millis(5), Duration::from_millis(20))
                .deadline(Duration::from_secs(20)),
        )
        .build()
}

async fn serve(app: Router) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

/// A real idem server (default settings) whose handler answers `429` for a business
/// reason (a card's daily limit). idem stores every non-5xx response, so every retry
/// of the key replays the stored `429` with `Idempotent-Replayed: true`. The caller
/// must be handed that answer, not have it retried away into `GaveUp`.
#[tokio::test]
async fn a_stored_429_replayed_by_idem_is_handed_back() {
    let runs = Arc::new(AtomicUsize::new(0));
    let idem = idem_runtime::Idempotency::builder()
        .shared_scope(true)
        .build();
    #[idem_runtime::idempotent]
    async fn pay(State(runs): State<Arc<AtomicUsize>>) -> (StatusCode, String) {
        runs.fetch_add(1, Ordering::SeqCst);
        (
            StatusCode::TOO_MANY_REQUESTS,
            r#"{"error":"card_velocity_exceeded"}"#.to_owned(),
        )
    }
    let app = Router::new()
        .route("/pay", post(pay))
        .with_state(runs.clone())
        .layer(idem.layer());
    let url = serve(app).await;
    let result = client().post(format!("{url}/pay")).body("{}").send().await;
    assert_eq!(runs.load(Ordering::SeqCst), 1, "idem ran the handler once");
    let response = match result {
        Ok(response) => response,
        Err(error) => panic!(
            "the stored 429 (replayed by idem) was retried away: {error} / {:?}",
            client_error(&error)
        ),
    };
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        response.attempts(),
        2,
        "the first answer, then its replay, handed back"
    );
}

/// A real idem server with `store_server_errors(true)`: the handler's `500` is stored
/// and replayed for the key. Every retry gets the same replay; the caller must get it.
#[tokio::test]
async fn a_stored_500_replayed_by_idem_is_handed_back() {
    let runs = Arc::new(AtomicUsize::new(0));
    let idem = idem_runtime::Idempotency::builder()
        .shared_scope(true)
        .store_server_errors(true)
        .build();
    #[idem_runtime::idempotent]
    async fn pay(State(runs): State<Arc<AtomicUsize>>) -> (StatusCode, String) {
        runs.fetch_add(1, Ordering::SeqCst);
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "ledger write failed; payment state recorded as failed".to_owned(),
        )
    }
    let app = Router::new()
        .route("/pay", post(pay))
        .with_state(runs.clone())
        .layer(idem.layer());
    let url = serve(app).await;
    let result = client().post(format!("{url}/pay")).body("{}").send().await;
    assert_eq!(runs.load(Ordering::SeqCst), 1, "idem ran the handler once");
    let response = match result {
        Ok(response) => response,
        Err(error) => panic!(
            "the stored 500 (replayed by idem) was retried away: {error} / {:?}",
            client_error(&error)
        ),
    };
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(response.attempts(), 2, "the first answer, then its replay");
}

/// Scripted: each retryable status, marked `Idempotent-Replayed: true` from the first
/// answer on. A replay is final: it must come back after one attempt.
#[tokio::test]
async fn replayed_retryable_statuses_are_final() {
    let mut failures = Vec::new();
    for status in [408u16, 429, 500, 502, 503, 504] {
        let hits = Arc::new(AtomicUsize::new(0));
        async fn replay(State((hits, status)): State<(Arc<AtomicUsize>, u16)>) -> Response {
            hits.fetch_add(1, Ordering::SeqCst);
            let mut response =
                (StatusCode::from_u16(status).unwrap(), "stored answer").into_response();
            response
                .headers_mut()
                .insert("idempotent-replayed", "true".parse().unwrap());
            response
        }
        let url = serve(
            Router::new()
                .route("/pay", any(replay))
                .with_state((hits.clone(), status)),
        )
        .await;
        let result = client().post(format!("{url}/pay")).body("{}").send().await;
        let sent = hits.load(Ordering::SeqCst);
        match result {
            Ok(response) if response.status().as_u16() == status && sent == 1 => {}
            Ok(response) => failures.push(format!(
                "{status}: got {} after {sent} sends",
                response.status()
            )),
            Err(error) => failures.push(format!("{status}: sent {sent} times, then {error}")),
        }
    }
    assert!(
        failures.is_empty(),
        "replayed answers retried away:\n{}",
        failures.join("\n")
    );
}
