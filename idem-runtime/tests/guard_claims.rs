//! Guards of one request, continued: a guard that claims the key without the request's
//! turn (after another guard's work ended, or beside one kept aside mid-claim) marks its
//! work as running, so that a guard in a task the work spawns is refused rather than
//! answered `409` by the key its own request holds (that `409` was stored as the key's
//! response); a guard's `run` future polled after it answered; nested guards after thread
//! hops inside the work.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use common::{Gated, Gates, post_with, send};
use idem_runtime::store::MemoryStore;
use idem_runtime::{Idempotency, Idempotent};

#[derive(Clone, Default)]
struct Runs {
    a: Arc<AtomicUsize>,
    c: Arc<AtomicUsize>,
}

/// First guard's work fails (500: key released); the handler then runs a second guard
/// (ENDED -> claims without the turn) whose work runs a third guard in a spawned task.
async fn retry_then_spawn(
    first: Idempotent,
    second: Idempotent,
    third: Idempotent,
    State(runs): State<Runs>,
    _body: String,
) -> Response {
    let a = runs.a.clone();
    let failed = first
        .run(async move {
            a.fetch_add(1, Ordering::SeqCst);
            (StatusCode::INTERNAL_SERVER_ERROR, "a failed")
        })
        .await;
    if failed.status() != StatusCode::INTERNAL_SERVER_ERROR {
        // A retry: the first guard was answered from the key's record.
        return failed;
    }
    let c = runs.c.clone();
    second
        .run(async move {
            tokio::spawn(third.run(async move {
                c.fetch_add(1, Ordering::SeqCst);
                (StatusCode::CREATED, "c done")
            }))
            .await
            .unwrap()
        })
        .await
}

/// First guard kept aside mid-claim (its begin lost, never polled again); the second guard
/// claims without the turn; its work runs a third guard in a spawned task.
async fn aside_then_spawn(
    first: Idempotent,
    second: Idempotent,
    third: Idempotent,
    State(runs): State<Runs>,
    _body: String,
) -> Response {
    let a = runs.a.clone();
    let first = first.run(async move {
        a.fetch_add(1, Ordering::SeqCst);
        (StatusCode::CREATED, "a done")
    });
    let mut first = std::pin::pin!(first);
    tokio::select! {
        biased;
        answer = &mut first => return answer,
        () = tokio::time::sleep(Duration::from_millis(20)) => {}
    }
    let c = runs.c.clone();
    second
        .run(async move {
            tokio::spawn(third.run(async move {
                c.fetch_add(1, Ordering::SeqCst);
                (StatusCode::CREATED, "c done")
            }))
            .await
            .unwrap()
        })
        .await
}

fn app(idem: &Idempotency, runs: &Runs) -> Router {
    Router::new()
        .route("/retry_then_spawn", post(retry_then_spawn))
        .route("/aside_then_spawn", post(aside_then_spawn))
        .with_state(runs.clone())
        .layer(idem.layer())
}

/// The same POST sent twice with `key`, each within 10 s: the first request, and its retry.
async fn send_twice(app: &Router, path: &str, key: &str) -> (common::Answer, common::Answer) {
    let once = || async {
        tokio::time::timeout(
            Duration::from_secs(10),
            send(app, post_with(path, Some(key), "{}")),
        )
        .await
        .expect("a request hung")
    };
    let first = once().await;
    (first, once().await)
}

/// Fails if `retry` replays a `409`: one from the request's own guard conflict, stored
/// for the key.
fn assert_no_stored_409(first: &common::Answer, retry: &common::Answer) {
    assert!(
        !(retry.is_replay() && retry.status == StatusCode::CONFLICT),
        "a 409 from the request's own guard conflict was stored for the key: first {} {:?}; retry {} replay={} {:?}",
        first.status,
        String::from_utf8_lossy(&first.body),
        retry.status,
        retry.is_replay(),
        String::from_utf8_lossy(&retry.body)
    );
}

/// Guards (a defect once shown): after a first guard's work answered `500`, a second
/// guard claims the key without the turn; a guard its work runs in a spawned task is
/// refused, never answered `409` by the key its own request holds and that `409` stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_spawned_from_work_claimed_after_an_ended_owner_never_stores_a_409() {
    let idem = Idempotency::builder().shared_scope(true).build();
    let runs = Runs::default();
    let app = app(&idem, &runs);
    let (first, retry) = send_twice(&app, "/retry_then_spawn", "ended-spawn-1").await;
    assert_no_stored_409(&first, &retry);
}

/// Guards (a defect once shown): as above, the second guard claiming without the turn
/// beside a first one kept aside mid-claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_spawned_from_work_claimed_beside_an_owner_kept_aside_never_stores_a_409() {
    let gates = Arc::new(Gates::default());
    let idem = Idempotency::builder()
        .shared_scope(true)
        .store(Gated::new(Arc::new(MemoryStore::new()), gates.clone()))
        .build();
    // The first guard's begin is lost: its claim stays under way while kept aside.
    gates.hang_begins.store(1, Ordering::SeqCst);
    let runs = Runs::default();
    let app = app(&idem, &runs);
    let (first, retry) = send_twice(&app, "/aside_then_spawn", "aside-spawn-1").await;
    assert_no_stored_409(&first, &retry);
}

/// Guards (a defect once shown): a guard's `run` future polled again after it answered
/// waits; it panicked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guards_run_future_polled_after_completion_does_not_panic() {
    async fn handler(idem: Idempotent, _body: String) -> Response {
        let fut = idem.run(async { (StatusCode::CREATED, "done") });
        let mut fut = Box::pin(fut);
        let answer = (&mut fut).await;
        let again = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            futures_util::FutureExt::now_or_never(&mut fut)
        }));
        match again {
            Ok(_) => answer,
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                (StatusCode::IM_A_TEAPOT, format!("panicked: {msg}")).into_response()
            }
        }
    }
    let idem = Idempotency::builder().shared_scope(true).build();
    let app = Router::new().route("/p", post(handler)).layer(idem.layer());
    for key in [Some("polled-again-1"), None] {
        let answer = send(&app, post_with("/p", key, "{}")).await;
        assert_ne!(
            answer.status,
            StatusCode::IM_A_TEAPOT,
            "key {key:?}: {:?}",
            String::from_utf8_lossy(&answer.body)
        );
    }
}

/// A guard inside another's work, reached after a thread hop.
async fn hops(
    outer: Idempotent,
    inner: Idempotent,
    State(runs): State<Runs>,
    axum::extract::Path(how): axum::extract::Path<String>,
    _body: String,
) -> Response {
    let c = runs.c.clone();
    let work = async move {
        c.fetch_add(1, Ordering::SeqCst);
        (StatusCode::CREATED, "inner done")
    };
    outer
        .run(async move {
            match how.as_str() {
                "block_in_place" => tokio::task::block_in_place(|| {
                    tokio::runtime::Handle::current().block_on(inner.run(work))
                }),
                "spawn_blocking" => {
                    let h = tokio::runtime::Handle::current();
                    tokio::task::spawn_blocking(move || h.block_on(inner.run(work)))
                        .await
                        .unwrap()
                }
                "futures_unordered" => {
                    use futures_util::StreamExt;
                    let mut set = futures_util::stream::FuturesUnordered::new();
                    set.push(inner.run(work));
                    set.next().await.unwrap()
                }
                "local_set" => tokio::task::block_in_place(|| {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    let local = tokio::task::LocalSet::new();
                    local.block_on(&rt, async move {
                        tokio::task::spawn_local(inner.run(work)).await.unwrap()
                    })
                }),
                "runtime" => tokio::task::block_in_place(|| {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    rt.block_on(inner.run(work))
                }),
                _ => unreachable!(),
            }
        })
        .await
}

/// Guards: a guard run inside another's work after a thread hop (`block_in_place`,
/// `spawn_blocking`, `FuturesUnordered`, a `LocalSet`, a runtime of its own) runs its
/// work at most once, and never gets a `4xx` stored for the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_guards_after_thread_hops_never_run_twice_nor_store_a_4xx() {
    let idem = Idempotency::builder().shared_scope(true).build();
    let runs = Runs::default();
    let app = Router::new()
        .route("/hop/{how}", post(hops))
        .with_state(runs.clone())
        .layer(idem.layer());
    for how in [
        "block_in_place",
        "spawn_blocking",
        "futures_unordered",
        "local_set",
        "runtime",
    ] {
        let before = runs.c.load(Ordering::SeqCst);
        let key = format!("hop-{how}");
        let a = send(&app, post_with(&format!("/hop/{how}"), Some(&key), "{}")).await;
        let b = send(&app, post_with(&format!("/hop/{how}"), Some(&key), "{}")).await;
        let ran = runs.c.load(Ordering::SeqCst) - before;
        eprintln!(
            "{how}: first {} {:?} | retry {} replay={} {:?} | inner ran {ran}",
            a.status,
            String::from_utf8_lossy(&a.body),
            b.status,
            b.is_replay(),
            String::from_utf8_lossy(&b.body)
        );
        assert!(
            !(b.is_replay() && b.status.is_client_error()),
            "{how}: 4xx stored"
        );
        assert!(ran <= 1, "{how}: ran {ran}");
    }
}

/// Guards: a guard after a first one whose work panicked (the handler caught it) never
/// hangs, runs nothing, and is answered `500` `guard-conflict` saying the first one's
/// work was given up; nothing is stored for the key (no `4xx` replayed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_after_a_caught_panic_never_hangs_nor_stores_a_4xx() {
    async fn handler(
        first: Idempotent,
        second: Idempotent,
        State(runs): State<Runs>,
        _body: String,
    ) -> Response {
        use futures_util::FutureExt;
        let r = std::panic::AssertUnwindSafe(first.run(async {
            panic!("work panics");
            #[allow(unreachable_code)]
            StatusCode::OK
        }))
        .catch_unwind()
        .await;
        assert!(r.is_err());
        let c = runs.c.clone();
        second
            .run(async move {
                c.fetch_add(1, Ordering::SeqCst);
                (StatusCode::CREATED, "second")
            })
            .await
    }
    let idem = Idempotency::builder().shared_scope(true).build();
    let runs = Runs::default();
    let app = Router::new()
        .route("/p", post(handler))
        .with_state(runs.clone())
        .layer(idem.layer());
    let a = tokio::time::timeout(
        Duration::from_secs(10),
        send(&app, post_with("/p", Some("panic-1"), "{}")),
    )
    .await
    .expect("hung");
    assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
    let problem: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(problem["type"], idem_runtime::Problem::GUARD_CONFLICT);
    assert!(
        problem["detail"].as_str().unwrap().contains("given up"),
        "{problem}"
    );
    assert_eq!(
        runs.c.load(Ordering::SeqCst),
        0,
        "the second guard ran nothing"
    );
    let b = send(&app, post_with("/p", Some("panic-1"), "{}")).await;
    assert!(!(b.is_replay() && b.status.is_client_error()), "{b:?}");
    assert_eq!(runs.c.load(Ordering::SeqCst), 0);
}
