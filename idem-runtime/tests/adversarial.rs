//! Attacks on the one-execution and one-client promises: storms of concurrent requests
//! from several clients and instances, header quirks, nested layers, panics racing
//! retries. Each test states the attack it repels.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{OriginalUri, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::Response;
use axum::routing::post;
use common::{Answer, Backend, eventually, send};
use idem_runtime::{Idempotency, IdempotencyBuilder, Idempotent, Problem, ScopedKey};

#[derive(Default)]
struct Runs {
    per_key: Mutex<HashMap<String, usize>>,
    started: AtomicUsize,
}

impl Runs {
    fn of(&self, key: &str) -> usize {
        self.per_key
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.ends_with(&format!(":{key}")))
            .map(|(_, n)| *n)
            .sum()
    }
}

/// Echoes the request (body and the caller's token) after a few yields, counting runs per
/// scoped key.
async fn echo(idem: Idempotent, State(runs): State<Arc<Runs>>, request: Request) -> Response {
    let key = idem.key().map(ToString::to_string).unwrap_or_default();
    let who = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let path = request
        .extensions()
        .get::<OriginalUri>()
        .map(|u| u.0.path().to_owned())
        .unwrap_or_default();
    let body = axum::body::to_bytes(request.into_body(), usize::MAX)
        .await
        .unwrap();
    idem.run(async move {
        *runs.per_key.lock().unwrap().entry(key).or_default() += 1;
        runs.started.fetch_add(1, Ordering::SeqCst);
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        let reply = serde_json::json!({
            "who": who,
            "path": path,
            "body": String::from_utf8_lossy(&body),
        });
        (StatusCode::CREATED, axum::Json(reply))
    })
    .await
}

fn echo_app(idem: &Idempotency, runs: Arc<Runs>) -> axum::Router {
    axum::Router::new()
        .route("/echo", post(echo))
        .with_state(runs)
        .layer(idem.layer())
}

fn request(path: &str, key: &str, who: &str, body: &str) -> Request {
    Request::builder()
        .method(Method::POST)
        .uri(path)
        .header("idempotency-key", key)
        .header(header::AUTHORIZATION, who)
        .body(Body::from(body.to_owned()))
        .unwrap()
}

/// A 201 answer must echo the very request it answers.
fn assert_own(answer: &Answer, who: &str, body: &str) {
    if answer.status == StatusCode::CREATED {
        let json = answer.json();
        assert_eq!(json["who"], who, "another client's response");
        assert_eq!(json["body"], body, "another request's response");
    } else {
        assert!(
            [StatusCode::CONFLICT, StatusCode::UNPROCESSABLE_ENTITY].contains(&answer.status),
            "unexpected {} {:?}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        );
    }
}

async fn instances(backend: &Backend, local: bool) -> Vec<Idempotency> {
    let mut out = Vec::new();
    for _ in 0..2 {
        let builder: IdempotencyBuilder = backend.builder().await;
        let builder = if local {
            builder.local_tier(8 << 20, Duration::from_secs(60))
        } else {
            builder
        };
        out.push(builder.lease(Duration::from_secs(3)).build());
    }
    out
}

/// Attack: two instances (local tier on and off), two clients, two bodies, one key, 48
/// concurrent requests per round, a third of them dropped at a random point (during the
/// body, `begin`, the handler or the completion). Held: one run per (client, key), and
/// every 201 echoes its own client and body.
async fn storm(backend: Backend, local: bool) {
    let apps: Vec<_> = {
        let runs = Arc::new(Runs::default());
        let idems = instances(&backend, local).await;
        let apps: Vec<_> = idems.iter().map(|i| echo_app(i, runs.clone())).collect();
        for round in 0..12 {
            let key = format!("storm-{local}-{round}");
            let mut tasks = Vec::new();
            for n in 0..48usize {
                let app = apps[n % 2].clone();
                let who = if n % 3 == 0 {
                    "Bearer alice"
                } else {
                    "Bearer bob"
                };
                let body = if n % 4 < 2 {
                    "{\"amount\":1}"
                } else {
                    "{\"amount\":2}"
                };
                let drop_after =
                    (n % 3 == 1).then(|| Duration::from_micros((n as u64 * 397) % 20_000));
                let key = key.clone();
                tasks.push(tokio::spawn(async move {
                    let sending = send(&app, request("/echo", &key, who, body));
                    let answer = match drop_after {
                        Some(after) => tokio::time::timeout(after, sending).await.ok(),
                        None => Some(sending.await),
                    };
                    (who, body, answer)
                }));
            }
            for task in tasks {
                let (who, body, answer) = task.await.unwrap();
                if let Some(answer) = answer {
                    assert_own(&answer, who, body);
                }
            }
            // Settle: every detached run completes; then each client's retry replays.
            for who in ["Bearer alice", "Bearer bob"] {
                let mut settled = None;
                for _ in 0..400 {
                    let answer =
                        send(&apps[0], request("/echo", &key, who, "{\"amount\":1}")).await;
                    if answer.status != StatusCode::CONFLICT {
                        settled = Some(answer);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let settled = settled.expect("the key settles");
                if settled.status == StatusCode::CREATED {
                    assert_own(&settled, who, "{\"amount\":1}");
                }
            }
            let per_client: Vec<usize> = {
                let map = runs.per_key.lock().unwrap();
                map.iter()
                    .filter(|(k, _)| k.ends_with(&format!(":{key}")))
                    .map(|(_, n)| *n)
                    .collect()
            };
            assert!(
                per_client.iter().all(|n| *n == 1),
                "round {round}: runs per client {per_client:?}"
            );
            assert_eq!(runs.of(&key), 2, "one run per client");
        }
        apps
    };
    drop(apps);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_memory() {
    let backend = Backend::memory();
    storm(backend.clone(), false).await;
    storm(backend, true).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_redis() {
    storm(Backend::redis("storm"), false).await;
    storm(Backend::redis("storm-local"), true).await;
}

/// Attack: header quirks. Two fields, a field plus a comma list, quoted vs bare, OWS.
/// Held: repeated fields are refused with 400 before any run; `"k"` and `k` name one key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_quirks() {
    let idem = common::test_builder(Idempotency::builder()).build();
    let runs = Arc::new(Runs::default());
    let app = echo_app(&idem, runs.clone());
    let mut two = request("/echo", "a", "Bearer x", "{}");
    two.headers_mut()
        .append("Idempotency-Key", "b".parse().unwrap());
    send(&app, two)
        .await
        .assert_problem(StatusCode::BAD_REQUEST, Problem::KEY_INVALID);
    let same = send(&app, request("/echo", "a", "Bearer x", "{}")).await;
    assert_eq!(same.status, StatusCode::CREATED);
    let quoted = send(&app, request("/echo", "\t\"a\" ", "Bearer x", "{}")).await;
    assert!(quoted.is_replay());
    send(&app, request("/echo", "a, b", "Bearer x", "{}"))
        .await
        .assert_problem(StatusCode::BAD_REQUEST, Problem::KEY_INVALID);
    assert_eq!(runs.started.load(Ordering::SeqCst), 1);
}

/// Attack: a router nested in another, each with its own layer (different handles, and an
/// outer request limit smaller than the body). Held: the inner handle's guard protects
/// the request with the whole body; a retry replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_layers_of_two_handles() {
    let outer = common::test_builder(Idempotency::builder())
        .max_request_bytes(4)
        .build();
    let inner = common::test_builder(Idempotency::builder()).build();
    let runs = Arc::new(Runs::default());
    let app = axum::Router::new()
        .nest("/v1", echo_app(&inner, runs.clone()))
        .layer(outer.layer());
    let first = send(
        &app,
        request("/v1/echo", "n", "Bearer x", "{\"amount\":123}"),
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.json()["path"], "/v1/echo");
    let again = send(
        &app,
        request("/v1/echo", "n", "Bearer x", "{\"amount\":123}"),
    )
    .await;
    assert!(again.is_replay());
    let other = send(
        &app,
        request("/v1/echo", "n", "Bearer x", "{\"amount\":124}"),
    )
    .await;
    other.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, Problem::KEY_REUSED);
    assert_eq!(runs.started.load(Ordering::SeqCst), 1);
}

/// Attack: `ScopedKey` and `Option<ScopedKey>` with a malformed key, and a handler using
/// only `ScopedKey`. Held: the guard answers 400 before the body; `ScopedKey` alone
/// answers 400 too, saying what the key lacks as a guard would: malformed, unscoped (no
/// identity), or missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_key_with_scoped_key_extractors() {
    async fn only_scoped(key: ScopedKey, body: String) -> String {
        format!("{key} {body}")
    }
    let idem = common::test_builder(Idempotency::builder()).build();
    let app = axum::Router::new()
        .route("/scoped", post(only_scoped))
        .layer(idem.layer());
    let answer = send(&app, request("/scoped", "bad key", "Bearer x", "{}")).await;
    answer.assert_problem(StatusCode::BAD_REQUEST, Problem::KEY_INVALID);

    // Scoped by the `Authorization` header (the default): a request without one.
    let by_authorization = Idempotency::builder().build();
    let app = axum::Router::new()
        .route("/scoped", post(only_scoped))
        .layer(by_authorization.layer());
    let mut anonymous = request("/scoped", "k1", "", "{}");
    anonymous.headers_mut().remove(header::AUTHORIZATION);
    let answer = send(&app, anonymous).await;
    answer.assert_problem(StatusCode::BAD_REQUEST, Problem::SCOPE_MISSING);
    let mut unkeyed = request("/scoped", "k1", "Bearer x", "{}");
    unkeyed.headers_mut().remove("idempotency-key");
    let answer = send(&app, unkeyed).await;
    answer.assert_problem(StatusCode::BAD_REQUEST, Problem::KEY_MISSING);

    // Without the layer.
    let app = axum::Router::new().route("/scoped", post(only_scoped));
    let answer = send(&app, request("/scoped", "k1", "Bearer x", "{}")).await;
    answer.assert_problem(StatusCode::INTERNAL_SERVER_ERROR, Problem::LAYER_MISSING);
}

/// Attack: the handle handed to handlers with `Extension(idem)` instead of `idem.layer()`.
/// Held: a keyed request is answered `500` `layer-missing` by the guard and by
/// `ScopedKey`, never run unprotected (a retry would run it again); an unkeyed one runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handle_given_as_an_extension_is_no_layer() {
    #[idem_runtime::idempotent]
    async fn pay(State(runs): State<Arc<AtomicUsize>>) -> (StatusCode, String) {
        let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
        (StatusCode::CREATED, format!("run {n}"))
    }
    async fn only_scoped(key: ScopedKey) -> String {
        key.to_string()
    }
    let idem = common::test_builder(Idempotency::builder()).build();
    let runs = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new()
        .route("/pay", post(pay))
        .route("/scoped", post(only_scoped))
        .with_state(runs.clone())
        .layer(axum::Extension(idem));
    for path in ["/pay", "/pay", "/scoped"] {
        let answer = send(&app, request(path, "k1", "Bearer x", "{}")).await;
        answer.assert_problem(StatusCode::INTERNAL_SERVER_ERROR, Problem::LAYER_MISSING);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0, "nothing ran unprotected");
    let mut unkeyed = request("/pay", "k1", "Bearer x", "{}");
    unkeyed.headers_mut().remove("idempotency-key");
    assert_eq!(send(&app, unkeyed).await.status, StatusCode::CREATED);
}

/// Attack: a panic, then a storm of retries racing with the release. Held: exactly one
/// retry runs, the rest get 409 or its replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_then_retry_storm() {
    async fn boom(idem: Idempotent, State(runs): State<Arc<Runs>>) -> Response {
        idem.run(async move {
            let n = runs.started.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(n != 1, "the first run panics");
            (StatusCode::CREATED, format!("run {n}"))
        })
        .await
    }
    let idem = common::test_builder(Idempotency::builder()).build();
    let runs = Arc::new(Runs::default());
    let app = axum::Router::new()
        .route("/boom", post(boom))
        .with_state(runs.clone())
        .layer(idem.layer());
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request("/boom", "p", "Bearer x", "")).await }
    });
    common::until(|| runs.started.load(Ordering::SeqCst) == 1).await;
    let mut retries = Vec::new();
    for _ in 0..32 {
        let app = app.clone();
        retries.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            // Bounded in time, not in tries: on a loaded machine the release can take a
            // while, and every retry must see it.
            let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
            while tokio::time::Instant::now() < give_up {
                let answer = send(&app, request("/boom", "p", "Bearer x", "")).await;
                let done = answer.status == StatusCode::CREATED;
                answers.push(answer);
                if done {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            answers
        }));
    }
    assert!(first.await.unwrap_err().is_panic());
    let mut originals = 0;
    for retry in retries {
        for answer in retry.await.unwrap() {
            match answer.status {
                StatusCode::CREATED if answer.is_replay() => assert_eq!(answer.body, "run 2"),
                StatusCode::CREATED => originals += 1,
                StatusCode::CONFLICT => {}
                other => panic!("unexpected {other}"),
            }
        }
    }
    assert_eq!(originals, 1);
    assert_eq!(runs.started.load(Ordering::SeqCst), 2);
    assert!(eventually(Duration::from_secs(1), || true).await);
}

/// Attack: Redis (AOF, fsync always) killed while the handler runs, retries hammering the
/// key during the outage and after the restart. Held: one run; the completion retried in
/// the background lands once Redis is back, and the retries then replay it.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_handler() {
    use common::Counters;
    let mut server =
        testkit::RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let backend = Backend::redis_at(&server.url(), "kill-mid-handler");
    let idem = backend
        .builder()
        .await
        .lease(Duration::from_secs(5))
        .store_timeout(Duration::from_millis(300))
        .local_tier(1 << 20, Duration::from_secs(60))
        .build();
    let counters = Arc::new(Counters::default());
    let app = common::app(&idem, counters.clone());
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, common::post_with("/gated", Some("kill"), "")).await }
    });
    common::until(|| counters.runs() == 1).await;
    server.kill();
    counters.gate.notify_one();
    let first = first.await.unwrap();
    assert_eq!(
        first.status,
        StatusCode::CREATED,
        "the client gets its response"
    );
    let mut during = Vec::new();
    for _ in 0..10 {
        during.push(
            send(&app, common::post_with("/gated", Some("kill"), ""))
                .await
                .status,
        );
    }
    assert!(
        during
            .iter()
            .all(|s| *s == StatusCode::SERVICE_UNAVAILABLE || *s == StatusCode::CONFLICT),
        "{during:?}"
    );
    server.restart();
    let mut answer = None;
    for _ in 0..500 {
        let retry = send(&app, common::post_with("/gated", Some("kill"), "")).await;
        if retry.status == StatusCode::CREATED {
            answer = Some(retry);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let answer = answer.expect("the key settles");
    assert!(answer.is_replay(), "{:?}", answer.body);
    assert_eq!(answer.body, first.body);
    assert_eq!(counters.runs(), 1);
}

/// Attack: the caller catches the handler's panic (as `CatchPanicLayer` does) and drops
/// the request future afterwards. Held: the work is not polled again (no second panic),
/// the key is released, the retry runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caught_panic_is_never_polled_again() {
    use futures_util::FutureExt;
    static PANICS: AtomicUsize = AtomicUsize::new(0);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if info.to_string().contains("resumed after") {
            PANICS.fetch_add(1, Ordering::SeqCst);
        }
        previous(info);
    }));
    let idem = common::test_builder(Idempotency::builder()).build();
    let counters = Arc::new(common::Counters::default());
    let app = common::app(&idem, counters.clone());
    let caught =
        std::panic::AssertUnwindSafe(send(&app, common::post_with("/panic", Some("c"), "")))
            .catch_unwind()
            .await;
    assert!(caught.is_err());
    // Nothing should happen here: give a wrongly detached future the time to be polled.
    let _ = eventually(Duration::from_millis(200), || {
        PANICS.load(Ordering::SeqCst) > 0
    })
    .await;
    let retry = send(&app, common::post_with("/panic", Some("c"), "")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(counters.runs(), 2);
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        0,
        "no future polled after it panicked"
    );
}
