//! Regressions of "no stuck keys": a completion Redis refuses for good.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::post;
use common::{Backend, Counters, post_with, send};
use idem_runtime::{Idempotent, Problem};
use testkit::RedisServer;

/// A handler whose response (900 KB) is within the default 1 MiB response limit.
async fn report(idem: Idempotent, State(counters): State<Arc<Counters>>) -> Response {
    idem.run(async move {
        counters.runs.fetch_add(1, Ordering::SeqCst);
        (StatusCode::CREATED, "r".repeat(900 * 1024))
    })
    .await
}

/// Guards (a defect once shown): on a `noeviction` Redis (the configuration idem requires) whose `maxmemory`
/// cannot take one response, the key stays claimed (409) forever after the handler
/// finished: `complete` fails with OOM on every background retry while `renew` succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_refused_by_redis_does_not_hold_the_key_forever() {
    // Room for idem's keys and connection buffers, not for one more 900 KB write.
    let server =
        RedisServer::start_with(&["--maxmemory", "2500kb", "--maxmemory-policy", "noeviction"]);
    let backend = Backend::redis_at(&server.url(), "oom");
    let idem = backend
        .builder()
        .await
        .lease(Duration::from_millis(300))
        .build();
    let counters = Arc::new(Counters::default());
    let app = axum::Router::new()
        .route("/report", post(report))
        .with_state(counters.clone())
        .layer(idem.layer());

    let first = send(&app, post_with("/report", Some("big"), "")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(counters.runs(), 1);

    // Nothing runs the key any more. Within 20 leases (and well past the 2 s retry
    // backoff cap) a retry must get something other than "still in flight".
    let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
    let mut last;
    loop {
        last = send(&app, post_with("/report", Some("big"), "")).await;
        let in_flight =
            last.status == StatusCode::CONFLICT && last.json()["type"] == Problem::IN_FLIGHT;
        if !in_flight || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(counters.runs(), 1, "the handler ran again");
    last.assert_problem(StatusCode::CONFLICT, Problem::RESPONSE_NOT_STORED);
}

/// Guards: a result longer than a `proto-max-bulk-len` lowered after idem connected (an
/// operator's `CONFIG SET`) is refused for good, never retried until the lease runs out:
/// later calls get `NotStored`, and the operation does not run again (SPEC §2.6, README
/// `once`). Redis answers such a write with a protocol error and closes the connection,
/// which idem took for an outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_over_a_lowered_bulk_limit_is_not_stored_and_never_run_again() {
    use idem_runtime::OnceKey;
    use idem_runtime::once::OnceError;

    let server = RedisServer::start();
    let store = idem_runtime::store::RedisStore::builder(server.url())
        .prefix("bulk-lowered:")
        .connect()
        .await
        .unwrap();
    let idem = idem_runtime::Idempotency::builder()
        .store(store)
        .lease(Duration::from_secs(2))
        .build();
    let mut admin = testkit::redis_connection(&server.url()).await;
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("proto-max-bulk-len")
        .arg("1mb")
        .query_async(&mut admin)
        .await
        .unwrap();

    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let operation = || {
        let runs = runs.clone();
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, String>("r".repeat(2 << 20))
        }
    };
    let key = OnceKey::compose(["bulk", "lowered"]);
    let first = idem.once(key.clone(), "in").run(operation).await.unwrap();
    assert_eq!(first.len(), 2 << 20, "the caller gets its result");
    let again = idem.once(key.clone(), "in").no_wait().run(operation).await;
    assert!(matches!(again, Err(OnceError::NotStored)), "{again:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the operation ran once");

    // Raised again, the limit takes a long result anew: stored and replayed.
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("proto-max-bulk-len")
        .arg("512mb")
        .query_async(&mut admin)
        .await
        .unwrap();
    let raised = OnceKey::compose(["bulk", "raised"]);
    idem.once(raised.clone(), "in")
        .run(operation)
        .await
        .unwrap();
    let replayed = idem.once(raised, "in").no_wait().run(operation).await;
    let replayed = replayed.map(|value| value.len());
    assert!(matches!(replayed, Ok(2_097_152)), "{replayed:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 2, "the raised key ran once");
}
