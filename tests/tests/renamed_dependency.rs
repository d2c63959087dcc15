//! A crate that depends on idem-runtime under another name (`idem`), where
//! `::idem_runtime` does not resolve, builds its handlers with `crate = "idem"`, and they
//! run, replay and refuse as any other.

mod support;

use std::sync::atomic::Ordering;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use idem_runtime::Idempotency;
use idem_tests_renamed_dependency::{Runs, app};
use support::reply;

fn post(path: &str, key: Option<&str>, body: &'static str) -> Request<Body> {
    let mut request = Request::post(path);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request.body(Body::from(body)).expect("a valid request")
}

#[tokio::test]
async fn handlers_of_a_renamed_dependency_run_once_per_key() {
    let idem = Idempotency::builder().shared_scope(true).build();
    let runs = Runs::default();
    let app = app(&idem, runs.clone());

    let first = reply(&app, post("/create", Some("k-1"), "book")).await;
    let retry = reply(&app, post("/create", Some("k-1"), "book")).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(&first.body[..], b"run 1: book");
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    let missing = reply(&app, post("/required", None, "")).await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
}
