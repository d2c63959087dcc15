//! What a request holds while its work runs: the work's future once (in the box axum makes
//! of the handler's future, and in the one idem moves the running work into), not once per
//! layer of idem around it.
//!
//! Heap bytes are counted by dhat's allocator, from inside the work while it runs, against
//! what was live before the request was sent.

#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::response::Response;
use axum::routing::post;
use idem_runtime::{Idempotency, Idempotent, OnceKey, idempotent};
use tower::ServiceExt;

#[global_allocator]
static ALLOCATOR: dhat::Alloc = dhat::Alloc;

/// What each piece of work holds across an `await`: its future is at least this large.
const HELD: usize = 64 * 1024;

/// Bytes a request may hold beyond its work's future: idem's and axum's own state.
const OVERHEAD: usize = 16 * 1024;

/// Heap bytes live while the last piece of work ran.
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// Work whose future holds `HELD` bytes across an `await`, and notes the live heap then.
async fn work() -> String {
    let held = [1u8; HELD];
    tokio::task::yield_now().await;
    LIVE.store(dhat::HeapStats::get().curr_bytes, Ordering::SeqCst);
    held.iter().filter(|byte| **byte == 1).count().to_string()
}

/// A guard taken by hand.
async fn by_hand(idem: Idempotent) -> Response {
    idem.run(work()).await
}

/// The attribute, as users write it.
#[idempotent]
async fn attributed() -> String {
    work().await
}

/// The live heap while the work of `request` ran, over what was live before it was sent.
async fn held_by(app: &Router, request: Request<Body>) -> usize {
    let before = dhat::HeapStats::get().curr_bytes;
    let response = app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    LIVE.load(Ordering::SeqCst).saturating_sub(before)
}

fn keyed(path: &str, key: &str) -> Request<Body> {
    Request::post(path)
        .header("idempotency-key", key)
        .body(Body::empty())
        .unwrap()
}

/// Guards: a first execution holds the work's future at most twice (the box axum makes of
/// the handler's future keeps room for it; the running work is moved into a box of its
/// own), whether the guard is taken by hand or written by the attribute; a `once`
/// operation's future is held once. Each was held three to six times over before.
#[test]
fn a_request_holds_its_work_once_per_box() {
    let _profiler = dhat::Profiler::builder().testing().build();
    // An unoptimized build moves large futures through the stack more than once.
    std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(measure)
        .unwrap()
        .join()
        .unwrap();
}

fn measure() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // One scope for every client: these requests carry no principal.
        let idem = Idempotency::builder().shared_scope(true).build();
        let app = Router::new()
            .route("/by-hand", post(by_hand))
            .route("/attributed", post(attributed))
            .layer(idem.layer());
        for path in ["/by-hand", "/attributed"] {
            // The first request of each route warms what axum and idem set up once.
            held_by(&app, keyed(path, &format!("{path}-warm-up"))).await;
            let held = held_by(&app, keyed(path, &format!("{path}-first"))).await;
            assert!(
                held <= 2 * HELD + OVERHEAD,
                "{path}: {held} bytes held while the work ran, for a work of {HELD}"
            );
            eprintln!("{path}: {held} bytes held while a work of {HELD} ran");
        }

        let once = |name: &'static str| {
            let idem = idem.clone();
            async move {
                let before = dhat::HeapStats::get().curr_bytes;
                let ran = idem
                    .once(OnceKey::compose(["memory", name]), &())
                    .run(|| async { Ok::<_, Infallible>(work().await) })
                    .await
                    .unwrap();
                assert_eq!(ran, HELD.to_string());
                LIVE.load(Ordering::SeqCst).saturating_sub(before)
            }
        };
        once("warm-up").await;
        let held = once("first").await;
        assert!(
            held <= HELD + OVERHEAD,
            "once: {held} bytes held while the work ran, for a work of {HELD}"
        );
        eprintln!("once: {held} bytes held while a work of {HELD} ran");
    });
}
