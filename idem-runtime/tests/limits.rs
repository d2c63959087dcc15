//! Regressions of bounds: the detached-work bound and the memory store's claim bound.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use common::{Counters, app, eventually, post_with, send};
use idem_runtime::Idempotency;
use idem_runtime::store::MemoryStore;

/// Guards (a defect once shown): `max_detached(0)` ("no detached work") refuses every keyed request with 503,
/// even with nothing detached at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_detached_zero_still_serves_keyed_requests() {
    let idem = common::test_builder(Idempotency::builder())
        .max_detached(0)
        .build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let answer = send(&app, post_with("/pay", Some("k"), "{}")).await;
    assert_eq!(
        answer.status,
        StatusCode::CREATED,
        "nothing is detached, yet: {:?}",
        String::from_utf8_lossy(&answer.body)
    );
}

/// Guards (a defect once shown): with the memory store's claims full and fail-open on, one key runs its handler
/// twice at once (the docs promise a full claim map is answered 503, never run unprotected).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_claim_map_never_runs_a_key_twice_with_fail_open() {
    let store = MemoryStore::with_limits(1000, 1 << 20, 1).unwrap();
    let idem = common::test_builder(Idempotency::builder().store(store))
        .fail_open(true)
        .build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());

    // Another key holds the only claim.
    let holder = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with("/gated", Some("holder"), "")).await }
    });
    assert!(eventually(Duration::from_secs(10), || counters.runs() == 1).await);

    // Two tries of one key, concurrently.
    let tries: Vec<_> = (0..2)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { send(&app, post_with("/gated", Some("victim"), "")).await })
        })
        .collect();
    eventually(Duration::from_secs(3), || {
        counters.runs() == 3 || tries.iter().all(tokio::task::JoinHandle::is_finished)
    })
    .await;
    let ran = counters.runs() - 1;
    counters.gate.notify_waiters();
    counters.gate.notify_one();
    let _ = holder.await;
    for t in tries {
        let _ = t.await;
    }
    assert!(ran <= 1, "key `victim` ran {ran} times at once");
}

/// Guards (a defect once shown): a memory store whose byte bound per entry exceeds 4 GiB (one entry, 8 GiB)
/// refuses every record as too large, so no response is ever stored for replay.
#[tokio::test]
async fn memory_store_with_a_large_per_entry_bound_stores_records() {
    use bytes::Bytes;
    use idem_runtime::store::Store;
    let store = MemoryStore::with_bounds(1, 8 << 30).unwrap();
    let lease = Duration::from_secs(30);
    let claim = Bytes::from_static(b"claim");
    assert_eq!(store.begin("k", &claim, lease).await.unwrap(), None);
    let stored = store
        .complete("k", &claim, Bytes::from_static(b"small record"), lease)
        .await;
    assert!(matches!(stored, Ok(true)), "{stored:?}");
}

/// Guards: a malformed key is refused with `400` before the body is read: a client that
/// sends a bad key with a large (here: endless) body is answered at once, and not one
/// byte of its body is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_key_is_refused_before_the_body_is_read() {
    use std::sync::atomic::{AtomicBool, Ordering};

    let idem = common::test_builder(Idempotency::builder()).build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let polled = Arc::new(AtomicBool::new(false));
    let endless = futures_util::stream::repeat_with({
        let polled = polled.clone();
        move || {
            polled.store(true, Ordering::SeqCst);
            Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; 64 * 1024]))
        }
    });
    let request = axum::http::Request::post("/pay")
        .header("idempotency-key", "bad key with spaces")
        .header("content-type", "application/json")
        .body(axum::body::Body::from_stream(endless))
        .unwrap();
    let answer = send(&app, request).await;
    answer.assert_problem(StatusCode::BAD_REQUEST, idem_runtime::Problem::KEY_INVALID);
    assert!(
        !polled.load(Ordering::SeqCst),
        "the body was read before the key was checked"
    );
    assert_eq!(counters.runs(), 0, "the handler did not run");
}

/// Guards (a defect once shown): a response with more than 65,535 header values was stored
/// with only its first 65,535, so its retry got a different response than the first try.
/// Held: the retry replays every value, in order, and the handler runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_with_more_than_65535_header_values_replays_every_one() {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::extract::State;
    use axum::http::{HeaderMap, HeaderValue};
    use axum::routing::post;

    const VALUES: usize = 70_000;

    async fn many_values(
        idem: idem_runtime::Idempotent,
        State(runs): State<Arc<AtomicUsize>>,
    ) -> axum::response::Response {
        idem.run(async move {
            runs.fetch_add(1, Ordering::SeqCst);
            let mut headers = HeaderMap::new();
            for n in 0..VALUES {
                headers.append("x-n", HeaderValue::from(n));
            }
            headers.insert("x-last", HeaderValue::from_static("end"));
            (headers, "many")
        })
        .await
    }

    let idem = common::test_builder(Idempotency::builder()).build();
    let runs = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new()
        .route("/many", post(many_values))
        .with_state(runs.clone())
        .layer(idem.layer());
    let first = send(&app, post_with("/many", Some("many-1"), "")).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.headers.get_all("x-n").iter().count(), VALUES);

    let retry = send(&app, post_with("/many", Some("many-1"), "")).await;
    assert!(
        retry.is_replay(),
        "{} {:?} runs {} x-n {}",
        retry.status,
        String::from_utf8_lossy(&retry.body),
        runs.load(Ordering::SeqCst),
        retry.headers.get_all("x-n").iter().count()
    );
    let replayed: Vec<_> = retry.headers.get_all("x-n").iter().collect();
    let sent: Vec<_> = first.headers.get_all("x-n").iter().collect();
    assert_eq!(replayed.len(), VALUES, "values replayed");
    assert!(
        replayed == sent,
        "the replayed values differ from the first response's"
    );
    assert_eq!(retry.headers.get("x-last").unwrap(), "end");
    assert_eq!(retry.body, first.body);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
