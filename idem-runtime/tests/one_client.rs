//! Regressions of the one-client promise: a request never receives a response that was
//! not its own, never skips the 422 check, and never floods or crashes the process.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::post;
use common::{Counters, app, post_with, send};
use idem_runtime::{
    FingerprintMode, Idempotency, Idempotent, Principal, Problem, fingerprint::Fingerprint,
};
use tokio::sync::Notify;

fn with_header(mut request: Request, name: header::HeaderName, value: &str) -> Request {
    request.headers_mut().insert(name, value.parse().unwrap());
    request
}

/// Guards: two clients without `Authorization` (session cookies) never share a scope:
/// by default a keyed request with no identity is refused, saying how to scope.
#[tokio::test]
async fn clients_without_identity_are_not_put_in_one_scope() {
    let idem = Idempotency::in_memory();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let a = with_header(
        post_with("/pay", Some("k"), "{}"),
        header::COOKIE,
        "session=a",
    );
    let b = with_header(
        post_with("/pay", Some("k"), "{}"),
        header::COOKIE,
        "session=b",
    );
    let first = send(&app, a).await;
    let second = send(&app, b).await;
    assert!(!second.is_replay(), "client B got client A's response");
    first.assert_problem(StatusCode::BAD_REQUEST, Problem::SCOPE_MISSING);
    second.assert_problem(StatusCode::BAD_REQUEST, Problem::SCOPE_MISSING);
    assert!(
        first.json()["detail"]
            .as_str()
            .unwrap()
            .contains("Authorization")
    );
    assert_eq!(counters.runs(), 0);

    // Unkeyed requests still run unprotected.
    assert_eq!(
        send(&app, post_with("/pay", None, "{}")).await.status,
        StatusCode::CREATED
    );

    // A single-tenant service opts in to one shared scope.
    let shared = Idempotency::builder().shared_scope(true).build();
    let counters = Arc::new(Counters::default());
    let app = app_with(&shared, counters.clone());
    let first = send(&app, post_with("/pay", Some("k"), "{}")).await;
    let again = send(&app, post_with("/pay", Some("k"), "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(again.is_replay());
    assert_eq!(counters.runs(), 1);
}

/// Guards: an `Authorization` header without credentials (empty, or a scheme's name
/// alone) is no identity: every client that sends it sends the same bytes, so as a scope
/// it would hand one client's stored response to another.
#[tokio::test]
async fn an_authorization_without_credentials_is_no_identity() {
    let idem = Idempotency::in_memory();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    for blank in ["", "Bearer", "bearer "] {
        let request = || {
            with_header(
                post_with("/pay", Some("blank"), "{}"),
                header::AUTHORIZATION,
                blank,
            )
        };
        let first = send(&app, request()).await;
        let second = send(&app, request()).await;
        assert!(
            !second.is_replay(),
            "a client sending {blank:?} got another's response"
        );
        first.assert_problem(StatusCode::BAD_REQUEST, Problem::SCOPE_MISSING);
        second.assert_problem(StatusCode::BAD_REQUEST, Problem::SCOPE_MISSING);
    }
    assert_eq!(counters.runs(), 0);
}

fn app_with(idem: &Idempotency, counters: Arc<Counters>) -> axum::Router {
    app(idem, counters)
}

/// Auth middleware resolving a short-lived token (`Bearer user.nonce`) to its user.
async fn resolve_user(mut request: Request, next: Next) -> Response {
    let user = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .and_then(|token| token.split_once('.'))
        .map(|(user, _nonce)| user.to_owned());
    if let Some(user) = user {
        request.extensions_mut().insert(Principal::new(user));
    }
    next.run(request).await
}

/// Guards: scoped by the principal the auth middleware resolved, a refreshed token is
/// the same client: its retry replays instead of charging again.
#[tokio::test]
async fn a_refreshed_token_keeps_the_scope_of_its_principal() {
    let idem = Idempotency::in_memory();
    let counters = Arc::new(Counters::default());
    let app = common::routes(counters.clone())
        .layer(idem.layer())
        .layer(middleware::from_fn(resolve_user));
    let bearer = |token: &str| {
        with_header(
            post_with("/pay", Some("charge"), "{\"amount\":5}"),
            header::AUTHORIZATION,
            &format!("Bearer {token}"),
        )
    };
    let first = send(&app, bearer("alice.token-1")).await;
    let retry = send(&app, bearer("alice.token-2")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(retry.is_replay(), "the refreshed token's retry is a replay");
    assert_eq!(counters.runs(), 1, "charged once");
    let other_user = send(&app, bearer("bob.token-1")).await;
    assert!(
        !other_user.is_replay(),
        "another principal has a scope of its own"
    );
    assert_eq!(counters.runs(), 2);
}

fn canonical(body: &str) -> Fingerprint {
    Fingerprint::of(
        &FingerprintMode::CanonicalJson,
        &Method::POST,
        "/t",
        body.as_bytes(),
    )
}

/// Guards: canonical JSON compares numbers exactly: neighbouring 64-bit ids and long
/// decimals differ; the same number written two ways does not.
#[test]
fn canonical_json_numbers_are_exact() {
    assert_ne!(
        canonical(r#"{"to_account":9007199254740993}"#),
        canonical(r#"{"to_account":9007199254740992}"#)
    );
    assert_ne!(
        canonical(r#"{"id":18446744073709551615}"#),
        canonical(r#"{"id":18446744073709551614}"#)
    );
    assert_ne!(
        canonical(r#"{"id":-9223372036854775808}"#),
        canonical(r#"{"id":-9223372036854775807}"#)
    );
    assert_ne!(
        canonical(r#"{"amount":0.10000000000000000001}"#),
        canonical(r#"{"amount":0.10000000000000000002}"#)
    );
    assert_ne!(
        canonical(r#"{"amount":123456789012345678901234567890}"#),
        canonical(r#"{"amount":123456789012345678901234567891}"#)
    );
    assert_eq!(
        canonical(r#"{"a":1.50,"b":2}"#),
        canonical(r#"{ "b": 2, "a": 1.5 }"#)
    );
    assert_eq!(canonical(r#"{"a":100}"#), canonical(r#"{"a":1e2}"#));
    assert_eq!(canonical(r#"{"a":0}"#), canonical(r#"{"a":-0.0}"#));
    assert_ne!(canonical(r#"{"a":[1,2]}"#), canonical(r#"{"a":[2,1]}"#));
    assert_ne!(canonical(r#"{"a":"1"}"#), canonical(r#"{"a":1}"#));

    let fields = FingerprintMode::json_fields(["/to_account"]).unwrap();
    let of = |body: &str| Fingerprint::of(&fields, &Method::POST, "/t", body.as_bytes());
    assert_ne!(
        of(r#"{"to_account":9007199254740993,"note":"a"}"#),
        of(r#"{"to_account":9007199254740992,"note":"a"}"#)
    );
    assert_eq!(
        of(r#"{"to_account":9007199254740993,"note":"a"}"#),
        of(r#"{"note":"b","to_account":9007199254740993}"#)
    );
}

/// Guards: a JSON pointer without its leading `/` is refused when the mode is built,
/// with the pointer named, instead of matching every body.
#[test]
fn json_field_pointers_are_checked() {
    let error = FingerprintMode::json_fields(["/currency", "amount_cents"]).unwrap_err();
    assert!(error.to_string().contains("amount_cents"), "{error}");
    assert!(FingerprintMode::json_fields(["/items/0/sku", "", "/a~1b"]).is_ok());
    assert!(FingerprintMode::json_fields(["/bad~2escape"]).is_err());
    let fields = FingerprintMode::json_fields(["/amount_cents"]).unwrap();
    let of = |body: &str| Fingerprint::of(&fields, &Method::POST, "/t", body.as_bytes());
    assert_ne!(of(r#"{"amount_cents":1}"#), of(r#"{"amount_cents":2}"#));
}

/// Guards: the host is part of the scope: with the same credentials, key, path and body,
/// one tenant's host never gets another's stored response.
#[tokio::test]
async fn another_host_never_gets_the_stored_response() {
    let idem = Idempotency::in_memory();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let on = |host: &str| {
        let request = common::as_client("shared-admin-token", "k", "{}");
        with_header(request, header::HOST, host)
    };
    let a = send(&app, on("tenant-a.example.com")).await;
    let b = send(&app, on("tenant-b.example.com")).await;
    assert_eq!(a.status, StatusCode::CREATED);
    assert!(!b.is_replay(), "tenant B got tenant A's response");
    assert_eq!(b.status, StatusCode::CREATED);
    assert_eq!(counters.runs(), 2);
    let a_again = send(&app, on("TENANT-A.example.com")).await;
    assert!(a_again.is_replay(), "host names compare without case");
}

struct Running {
    now: AtomicUsize,
    most: AtomicUsize,
    started: AtomicUsize,
    gate: Notify,
}

async fn hold(idem: Idempotent, State(running): State<Arc<Running>>) -> Response {
    idem.run(async move {
        let now = running.now.fetch_add(1, Ordering::SeqCst) + 1;
        running.most.fetch_max(now, Ordering::SeqCst);
        running.started.fetch_add(1, Ordering::SeqCst);
        running.gate.notified().await;
        running.now.fetch_sub(1, Ordering::SeqCst);
        StatusCode::CREATED
    })
    .await
}

/// Guards: work detached from clients that hung up is bounded: past the bound, new keyed
/// requests are refused with 503 and Retry-After; nothing already running is cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_work_is_bounded() {
    let idem = Idempotency::builder()
        .shared_scope(true)
        .max_detached(4)
        .build();
    let running = Arc::new(Running {
        now: AtomicUsize::new(0),
        most: AtomicUsize::new(0),
        started: AtomicUsize::new(0),
        gate: Notify::new(),
    });
    let app = axum::Router::new()
        .route("/hold", post(hold))
        .with_state(running.clone())
        .layer(idem.layer());
    let mut refused = 0;
    for n in 0..50 {
        let before = running.started.load(Ordering::SeqCst);
        let request = post_with("/hold", Some(&format!("hang-up-{n}")), "");
        let mut answer = Box::pin(send(&app, request));
        // The client hangs up once its handler has started.
        tokio::select! {
            answer = &mut answer => {
                answer.assert_problem(StatusCode::SERVICE_UNAVAILABLE, Problem::OVERLOADED);
                assert!(answer.headers.contains_key(header::RETRY_AFTER));
                refused += 1;
            }
            () = async {
                while running.started.load(Ordering::SeqCst) == before {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            } => drop(answer),
        }
    }
    assert_eq!(
        running.most.load(Ordering::SeqCst),
        4,
        "at most 4 detached at once"
    );
    assert_eq!(refused, 46);
    // Nothing was cancelled: the detached handlers finish once released.
    running.gate.notify_waiters();
    common::until(|| running.now.load(Ordering::SeqCst) == 0).await;
    assert_eq!(running.started.load(Ordering::SeqCst), 4);
    // With the detached work done, keyed requests run again.
    let fresh = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with("/hold", Some("after"), "")).await }
    });
    while running.started.load(Ordering::SeqCst) < 5 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    running.gate.notify_waiters();
    assert_eq!(fresh.await.unwrap().status, StatusCode::CREATED);
}

/// Guards: every duration setting accepts any value; none panics on a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_durations_never_panic() {
    let idem = Idempotency::builder()
        .shared_scope(true)
        .lease(Duration::MAX)
        .retry_after(Duration::MAX)
        .store_timeout(Duration::MAX)
        .wait_for_in_flight(Duration::MAX)
        .local_tier(1 << 20, Duration::MAX)
        .build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let first = send(&app, post_with("/pay", Some("max"), "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let replay = send(&app, post_with("/pay", Some("max"), "{}")).await;
    assert!(replay.is_replay());

    let no_wait = Idempotency::builder()
        .shared_scope(true)
        .retry_after(Duration::MAX)
        .lease(Duration::MAX)
        .build();
    let counters = Arc::new(Counters::default());
    let app = app_with(&no_wait, counters.clone());
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with("/gated", Some("g"), "")).await }
    });
    while counters.runs() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let busy = send(&app, post_with("/gated", Some("g"), "")).await;
    busy.assert_problem(StatusCode::CONFLICT, Problem::IN_FLIGHT);
    let retry_after: u64 = busy.headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    counters.gate.notify_one();
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
}

/// Guards: an unauthenticated client sending `Authorization: <victim's user id>` never
/// lands in the scope of the principal of that id (each source of identity hashes in a
/// domain of its own).
#[tokio::test]
async fn an_authorization_value_never_reaches_a_principals_scope() {
    let idem = Idempotency::in_memory();
    let counters = Arc::new(Counters::default());
    let app = common::routes(counters.clone())
        .layer(idem.layer())
        .layer(middleware::from_fn(resolve_user));
    let with_auth = |authorization: &str| {
        with_header(
            post_with("/pay", Some("order-1"), "{\"amount\":5}"),
            header::AUTHORIZATION,
            authorization,
        )
    };
    let victim = send(&app, with_auth("Bearer alice.secret-token")).await;
    assert_eq!(victim.status, StatusCode::CREATED);
    // No valid token: no principal; idem falls back to the `Authorization` digest.
    let attacker = send(&app, with_auth("alice")).await;
    assert!(
        !attacker.is_replay(),
        "a client without alice's token got alice's stored response: {:?}",
        String::from_utf8_lossy(&attacker.body)
    );
}
