//! The protocol checks, each an `async fn(Backend)`, run on every store.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use axum::http::{StatusCode, header};
use bytes::Bytes;
use idem_runtime::{
    FingerprintMode, IdempotencyKey, Problem, Scope, ScopedKey, fingerprint::Fingerprint,
    record::FencingToken, record::Record,
};

use super::{Backend, Counters, app, post_with, send};

/// Guards: a retry gets the first response byte for byte, and the handler runs once.
pub async fn replay_is_byte_identical(backend: Backend) {
    let idem = backend.builder().await.build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());

    let first = send(&app, post_with("/pay", Some("\"key-1\""), "{\"amount\":5}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(!first.is_replay());
    let again = send(&app, post_with("/pay", Some("key-1"), "{\"amount\":5}")).await;

    assert_eq!(counters.runs(), 1, "the handler ran once");
    assert!(again.is_replay());
    assert_eq!(again.status, first.status);
    assert_eq!(again.body, first.body);
    for name in ["x-run", "content-type"] {
        assert_eq!(again.headers.get(name), first.headers.get(name), "{name}");
    }
    let multi: Vec<_> = again.headers.get_all("x-multi").iter().collect();
    assert_eq!(multi, ["one", "two"], "repeated headers keep their order");
    assert!(
        again.headers.get(header::SET_COOKIE).is_none(),
        "Set-Cookie is not replayed"
    );
    assert!(
        again.headers.get(header::DATE).is_none(),
        "Date is not replayed"
    );
    assert_eq!(backend.record_count().await, 1);
}

/// Guards: a key reused with another body or path is refused and changes nothing.
pub async fn different_request_same_key_is_422(backend: Backend) {
    let idem = backend.builder().await.build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());

    let first = send(&app, post_with("/pay", Some("k"), "{\"amount\":5}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let other_body = send(&app, post_with("/pay", Some("k"), "{\"amount\":6}")).await;
    other_body.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, Problem::KEY_REUSED);
    let other_path = send(&app, post_with("/pay/other", Some("k"), "{\"amount\":5}")).await;
    other_path.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, Problem::KEY_REUSED);
    assert_eq!(counters.runs(), 1, "nothing ran for the refused requests");

    let replay = send(&app, post_with("/pay", Some("k"), "{\"amount\":5}")).await;
    assert!(replay.is_replay(), "the record is unchanged");
    assert_eq!(replay.body, first.body);
}

/// Guards: 64 simultaneous requests with one key run the handler exactly once.
pub async fn concurrent_requests_run_once(backend: Backend) {
    let idem = backend.builder().await.build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());

    let mut tasks = Vec::new();
    for _ in 0..64 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            send(&app, post_with("/slow", Some("same"), "300")).await
        }));
    }
    let mut created = 0;
    let mut replayed = 0;
    let mut in_flight = 0;
    for task in tasks {
        let answer = task.await.expect("request task");
        match answer.status {
            StatusCode::CREATED if answer.is_replay() => replayed += 1,
            StatusCode::CREATED => created += 1,
            StatusCode::CONFLICT => {
                answer.assert_problem(StatusCode::CONFLICT, Problem::IN_FLIGHT);
                assert!(answer.headers.contains_key(header::RETRY_AFTER));
                in_flight += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(counters.runs(), 1, "exactly one execution");
    assert_eq!(created, 1, "one original response");
    assert_eq!(created + replayed + in_flight, 64);
    let after = send(&app, post_with("/slow", Some("same"), "300")).await;
    assert!(after.is_replay());
    assert_eq!(after.body, "slow run 1");
}

/// Guards: after the ttl the key is forgotten (real expiry, no mocked clock).
pub async fn key_expires_after_ttl(backend: Backend) {
    let idem = backend.builder().await.build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());

    let first = send(&app, post_with("/short", Some("ttl"), "")).await;
    assert_eq!(first.body, "run 1");
    let replay = send(&app, post_with("/short", Some("ttl"), "")).await;
    assert!(replay.is_replay());
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let fresh = send(&app, post_with("/short", Some("ttl"), "")).await;
    assert!(!fresh.is_replay());
    assert_eq!(fresh.body, "run 2");
    assert_eq!(counters.runs(), 2);
}

/// Sends one request to `path` that outlasts a 300 ms lease and, once it runs, probes its
/// key every 250 ms: every probe must be told the request is still in flight.
/// Returns the first request's answer, the app and its counters.
async fn outlast_the_lease(
    backend: &Backend,
    path: &'static str,
    body: &'static str,
    probes: usize,
) -> (super::Answer, axum::Router, Arc<Counters>) {
    let idem = backend
        .builder()
        .await
        .lease(Duration::from_millis(300))
        .build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with(path, Some("lease"), body)).await }
    });
    // The first request holds its claim once its handler runs; from then on the probes,
    // a little under a lease apart, span several leases.
    super::until(|| counters.runs() == 1).await;
    for _ in 0..probes {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let probe = send(&app, post_with(path, Some("lease"), body)).await;
        probe.assert_problem(StatusCode::CONFLICT, Problem::IN_FLIGHT);
    }
    let first = first.await.expect("first request");
    (first, app, counters)
}

/// Guards: renewal keeps the key of a handler that runs longer than its lease.
pub async fn slow_handler_keeps_its_lease(backend: Backend) {
    let (first, app, counters) = outlast_the_lease(&backend, "/slow", "1200", 4).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(
        counters.runs(),
        1,
        "no second execution while the first held its lease"
    );
    let replay = send(&app, post_with("/slow", Some("lease"), "1200")).await;
    assert!(replay.is_replay());
}

fn claim_for(path: &str, body: &str) -> Bytes {
    Record::InProgress {
        fingerprint: Fingerprint::of(
            &FingerprintMode::Exact,
            &axum::http::Method::POST,
            path,
            body.as_bytes(),
        ),
        token: FencingToken::generate(),
    }
    .encode()
}

fn anonymous_key(key: &str) -> ScopedKey {
    ScopedKey::new(
        Scope::anonymous(),
        IdempotencyKey::parse(key.as_bytes()).expect("valid key"),
    )
}

/// Guards: a claim whose owner died (never completed, never renewed) frees the key once
/// its lease runs out, and not before.
pub async fn dead_owner_frees_key_after_lease(backend: Backend) {
    let idem = backend.builder().await.build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let key = anonymous_key("orphan");
    let claim = claim_for("/pay", "{}");
    let found = idem
        .store()
        .begin(key.as_str(), &claim, Duration::from_millis(400))
        .await
        .expect("store answers");
    assert!(found.is_none(), "the dead executor held the key");

    let blocked = send(&app, post_with("/pay", Some("orphan"), "{}")).await;
    blocked.assert_problem(StatusCode::CONFLICT, Problem::IN_FLIGHT);
    assert_eq!(counters.runs(), 0);

    tokio::time::sleep(Duration::from_millis(600)).await;
    let freed = send(&app, post_with("/pay", Some("orphan"), "{}")).await;
    assert_eq!(freed.status, StatusCode::CREATED);
    assert!(!freed.is_replay());
    assert_eq!(counters.runs(), 1);
}

/// Guards: fencing — an executor whose lease was taken over cannot overwrite the record.
pub async fn stale_executor_cannot_overwrite(backend: Backend) {
    let idem = backend.builder().await.build();
    let store = idem.store();
    let key = anonymous_key("fenced");
    let stale = claim_for("/pay", "{}");
    let fresh = claim_for("/pay", "{}");
    assert!(
        store
            .begin(key.as_str(), &stale, Duration::from_millis(200))
            .await
            .unwrap()
            .is_none()
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(
        store
            .begin(key.as_str(), &fresh, Duration::from_secs(10))
            .await
            .unwrap()
            .is_none(),
        "the lease ran out, so a new executor takes over"
    );

    assert!(
        !store
            .renew(key.as_str(), &stale, Duration::from_secs(10))
            .await
            .unwrap(),
        "the stale executor cannot renew"
    );
    let newer = Bytes::from_static(b"newer record");
    assert!(
        store
            .complete(key.as_str(), &fresh, newer.clone(), Duration::from_secs(10))
            .await
            .unwrap()
    );
    let older = Bytes::from_static(b"stale record");
    assert!(
        !store
            .complete(key.as_str(), &stale, older, Duration::from_secs(10))
            .await
            .unwrap(),
        "the stale executor cannot complete"
    );
    assert!(
        !store.release(key.as_str(), &stale).await.unwrap(),
        "nor release"
    );
    let kept = store
        .begin(key.as_str(), &stale, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(kept, Some(newer), "the newer record is intact");
}

/// Guards: a 5xx is not stored; the key is released and the retry runs again.
pub async fn server_error_releases_key(backend: Backend) {
    let idem = backend.builder().await.build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let first = send(&app, post_with("/fail", Some("5xx"), "")).await;
    assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(first.body, "try again");
    let retry = send(&app, post_with("/fail", Some("5xx"), "")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(!retry.is_replay());
    assert_eq!(counters.runs(), 2);
    let replay = send(&app, post_with("/fail", Some("5xx"), "")).await;
    assert!(replay.is_replay());
    assert_eq!(replay.body, "run 2");
}

/// Guards: a handler panic releases the key (and still panics); the retry runs again.
pub async fn panic_releases_key(backend: Backend) {
    let idem = backend.builder().await.build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let panicked = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with("/panic", Some("boom"), "")).await }
    })
    .await;
    assert!(
        panicked
            .expect_err("the panic reaches the caller")
            .is_panic()
    );
    let retry = send(&app, post_with("/panic", Some("boom"), "")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(retry.body, "run 2");
    assert_eq!(counters.runs(), 2);
}

/// Guards: each malformed input gets its status and a problem body, and writes nothing.
pub async fn bad_input_is_refused(backend: Backend) {
    let idem = backend.builder().await.max_request_bytes(16).build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let long = "a".repeat(256);
    let cases: Vec<(Vec<&[u8]>, &str, StatusCode, &str)> = vec![
        (
            vec![b""],
            "{}",
            StatusCode::BAD_REQUEST,
            Problem::KEY_INVALID,
        ),
        (
            vec![b"\"\""],
            "{}",
            StatusCode::BAD_REQUEST,
            Problem::KEY_INVALID,
        ),
        (
            vec![long.as_bytes()],
            "{}",
            StatusCode::BAD_REQUEST,
            Problem::KEY_INVALID,
        ),
        (
            vec!["clé".as_bytes()],
            "{}",
            StatusCode::BAD_REQUEST,
            Problem::KEY_INVALID,
        ),
        (
            vec![b"a\tb"],
            "{}",
            StatusCode::BAD_REQUEST,
            Problem::KEY_INVALID,
        ),
        (
            vec![b"\"unterminated"],
            "{}",
            StatusCode::BAD_REQUEST,
            Problem::KEY_INVALID,
        ),
        (
            vec![b"\"bad\\escape\""],
            "{}",
            StatusCode::BAD_REQUEST,
            Problem::KEY_INVALID,
        ),
        (
            vec![b"one", b"two"],
            "{}",
            StatusCode::BAD_REQUEST,
            Problem::KEY_INVALID,
        ),
        (
            vec![b"ok"],
            "{\"far\":\"too long a body\"}",
            StatusCode::PAYLOAD_TOO_LARGE,
            Problem::BODY_TOO_LARGE,
        ),
    ];
    for (keys, body, status, kind) in cases {
        let mut request = post_with("/pay", None, body);
        for key in &keys {
            request.headers_mut().append(
                "idempotency-key",
                axum::http::HeaderValue::from_bytes(key).expect("header value"),
            );
        }
        let answer = send(&app, request).await;
        answer.assert_problem(status, kind);
    }
    let missing = send(&app, post_with("/required", None, "")).await;
    missing.assert_problem(StatusCode::BAD_REQUEST, Problem::KEY_MISSING);
    assert_eq!(counters.runs(), 0, "nothing ran");
    assert_eq!(backend.record_count().await, 0, "no record was written");
    let unprotected = send(&app, post_with("/pay", None, "{}")).await;
    assert_eq!(
        unprotected.status,
        StatusCode::CREATED,
        "no key: runs unprotected"
    );
    assert_eq!(backend.record_count().await, 0);
}

/// Guards: the same key under two `Authorization` values is two unrelated keys.
pub async fn scopes_are_isolated(backend: Backend) {
    let idem = backend.builder().await.build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let as_user = |user: &str, body: &str| {
        let mut request = post_with("/pay", Some("shared-key"), body);
        request.headers_mut().insert(
            header::AUTHORIZATION,
            format!("Bearer {user}").parse().unwrap(),
        );
        request
    };
    let alice = send(&app, as_user("alice", "{\"a\":1}")).await;
    let bob = send(&app, as_user("bob", "{\"b\":2}")).await;
    assert_eq!(alice.status, StatusCode::CREATED);
    assert_eq!(
        bob.status,
        StatusCode::CREATED,
        "no 422: bob's key is a fresh key"
    );
    assert!(!bob.is_replay(), "bob never sees alice's response");
    assert_ne!(alice.body, bob.body);
    assert_eq!(counters.runs(), 2);
    let alice_again = send(&app, as_user("alice", "{\"a\":1}")).await;
    assert_eq!(alice_again.body, alice.body);
    let anonymous = send(&app, post_with("/pay", Some("shared-key"), "{\"c\":3}")).await;
    assert_eq!(anonymous.status, StatusCode::CREATED);
    assert!(!anonymous.is_replay());
}

/// Guards: a response too large to store is sent once and never causes a second run.
pub async fn oversized_response_is_never_rerun(backend: Backend) {
    let idem = backend.builder().await.max_response_bytes(1024).build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let first = send(&app, post_with("/big", Some("big"), "")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.body.len(), 4096, "the client gets the whole body");
    let retry = send(&app, post_with("/big", Some("big"), "")).await;
    retry.assert_problem(StatusCode::CONFLICT, Problem::RESPONSE_NOT_STORED);
    assert!(retry.json()["detail"].as_str().unwrap().contains("201"));
    assert_eq!(counters.runs(), 1);
}

/// Guards: with wait_for_in_flight, a retry waits for the first request and replays it.
pub async fn waiting_for_in_flight_replays(backend: Backend) {
    let idem = backend
        .builder()
        .await
        .wait_for_in_flight(Duration::from_secs(5))
        .build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with("/slow", Some("wait"), "300")).await }
    });
    super::until(|| counters.runs() == 1).await;
    let second = send(&app, post_with("/slow", Some("wait"), "300")).await;
    let first = first.await.expect("first request");
    assert!(second.is_replay(), "the waiting request got the replay");
    assert_eq!(second.body, first.body);
    assert_eq!(counters.runs(), 1);
}

/// Guards: when an extractor after `Idempotent` rejects, the key is released at once
/// rather than blocking retries for a whole lease.
pub async fn rejected_extractor_releases_key(backend: Backend) {
    use axum::Json;
    use axum::response::{IntoResponse, Response};
    use axum::routing::post;
    use idem_runtime::Idempotent;
    async fn typed(idem: Idempotent, Json(value): Json<serde_json::Value>) -> Response {
        idem.run(async move { (StatusCode::CREATED, Json(value)).into_response() })
            .await
    }
    let idem = backend.builder().await.build();
    let app = axum::Router::new()
        .route("/typed", post(typed))
        .layer(idem.layer());
    let mut request = post_with("/typed", Some("json"), "{}");
    request
        .headers_mut()
        .insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
    let rejected = send(&app, request).await;
    assert_eq!(rejected.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // The release is awaited before the rejection is answered: nothing is left to wait for.
    assert_eq!(backend.record_count().await, 0, "the claim was released");
}

/// Stores `count` distinct keys, each executed once.
pub async fn many_keys(backend: Backend, count: usize) {
    let idem = backend.builder().await.build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    for n in 0..count {
        let key = format!("key-{n}");
        let answer = send(&app, post_with("/pay", Some(&key), "{}")).await;
        assert_eq!(answer.status, StatusCode::CREATED);
    }
    assert_eq!(counters.runs(), count);
    assert_eq!(backend.record_count().await, count);
}

/// Guards: a streamed body slower than the lease keeps the key held while it is read.
pub async fn slow_body_keeps_its_lease(backend: Backend) {
    let (first, app, counters) = outlast_the_lease(&backend, "/stream", "1000", 3).await;
    assert_eq!(first.body, "stream run 1: done");
    assert_eq!(counters.runs(), 1);
    let replay = send(&app, post_with("/stream", Some("lease"), "1000")).await;
    assert!(replay.is_replay());
    assert_eq!(replay.body, first.body);
}

/// Guards: a response body that fails is answered with a problem, never a truncated
/// success, and the request is not run again.
pub async fn failed_body_is_a_problem_not_a_rerun(backend: Backend) {
    let idem = backend.builder().await.build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let first = send(&app, post_with("/broken", Some("broken"), "")).await;
    first.assert_problem(StatusCode::BAD_GATEWAY, Problem::RESPONSE_NOT_STORED);
    let retry = send(&app, post_with("/broken", Some("broken"), "")).await;
    retry.assert_problem(StatusCode::CONFLICT, Problem::RESPONSE_NOT_STORED);
    assert_eq!(counters.runs(), 1);
}

/// Guards: two nested copies of a route under one layer are different requests.
pub async fn nested_routes_are_told_apart(backend: Backend) {
    let idem = backend.builder().await.build();
    let counters = Arc::new(Counters::default());
    let app = axum::Router::new()
        .nest("/eu", super::routes(counters.clone()))
        .nest("/us", super::routes(counters.clone()))
        .layer(idem.layer());
    let eu = send(&app, post_with("/eu/pay", Some("region"), "{}")).await;
    assert_eq!(eu.status, StatusCode::CREATED);
    let us = send(&app, post_with("/us/pay", Some("region"), "{}")).await;
    us.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, Problem::KEY_REUSED);
    assert_eq!(counters.runs(), 1);
}
