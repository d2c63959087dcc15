//! A metrics recorder that panics (an exporter's bug) while idem moves work whose client
//! went away to a task of its own: the work still runs to its end, is never run again,
//! and is not counted as detached for good. A test binary of its own: its recorder is
//! global.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use common::{Backend, post_with, send_past_in_flight, until};
use idem_runtime::idempotent;
use metrics::{
    Counter, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use tokio::sync::Notify;

/// A gauge whose every move panics (an exporter's bug, a poisoned lock in it).
struct Panicking;

impl GaugeFn for Panicking {
    fn increment(&self, _: f64) {
        panic!("the recorder panicked on idem_executions_detached");
    }
    fn decrement(&self, _: f64) {
        panic!("the recorder panicked on idem_executions_detached");
    }
    fn set(&self, _: f64) {
        panic!("the recorder panicked on idem_executions_detached");
    }
}

/// A recorder that panics on `idem_executions_detached` only.
struct PanicsOnDetached;

impl Recorder for PanicsOnDetached {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        Counter::noop()
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        if key.name() == "idem_executions_detached" {
            Gauge::from_arc(Arc::new(Panicking))
        } else {
            Gauge::noop()
        }
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

fn install() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| metrics::set_global_recorder(PanicsOnDetached).unwrap());
}

#[derive(Default)]
struct Charge {
    runs: AtomicUsize,
    /// Set once idem waits for the rest of the response body.
    reading: AtomicBool,
    /// Lets the body end.
    gate: Notify,
}

#[idempotent]
async fn charge_streaming(State(charge): State<Arc<Charge>>) -> (StatusCode, Body) {
    // Only the first run's body waits for the gate.
    let first = charge.runs.fetch_add(1, Ordering::SeqCst) == 0;
    let stream = futures_util::stream::unfold(0u8, move |step| {
        let charge = charge.clone();
        async move {
            match step {
                0 => Some((
                    Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"charged")),
                    1,
                )),
                _ => {
                    if first {
                        charge.reading.store(true, Ordering::SeqCst);
                        charge.gate.notified().await;
                    }
                    None
                }
            }
        }
    });
    (StatusCode::CREATED, Body::from_stream(stream))
}

/// Serves `/charge` on `idem`, sends a request with `key` whose client hangs up once the
/// handler returned and idem reads its body, then lets the body end.
async fn hang_up_while_the_body_is_read(
    idem: &idem_runtime::Idempotency,
    key: &'static str,
) -> (Router, Arc<Charge>) {
    install();
    let charge = Arc::new(Charge::default());
    let app = Router::new()
        .route("/charge", post(charge_streaming))
        .with_state(charge.clone())
        .layer(idem.layer());
    let first = tokio::spawn({
        let app = app.clone();
        async move { common::send(&app, post_with("/charge", Some(key), "")).await }
    });
    // The handler returned; idem is reading the rest of its body.
    until(|| charge.reading.load(Ordering::SeqCst)).await;
    assert_eq!(charge.runs.load(Ordering::SeqCst), 1);
    first.abort();
    let _ = first.await;
    // The body may end now, for work that moved on.
    charge.gate.notify_one();
    (app, charge)
}

/// Guards: the handler returned `201` and idem reads its streamed body when the client
/// hangs up; moving the work to its task, idem reports it to the recorder, which panics.
/// The work runs on, and the retry does not charge again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_after_the_handler_returned_never_reruns_it() {
    let idem = Backend::memory().builder().await.build();
    let (app, charge) = hang_up_while_the_body_is_read(&idem, "gone").await;
    let retry = send_past_in_flight(&app, || post_with("/charge", Some("gone"), "")).await;
    assert_eq!(
        charge.runs.load(Ordering::SeqCst),
        1,
        "the handler ran again after it had returned (retry answered {retry:?})"
    );
}

/// Guards: the same panic leaves no detached work counted for good: with
/// `max_detached(1)`, a new key's request is served once the work has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_panic_leaves_no_phantom_detached_work() {
    let idem = Backend::memory().builder().await.max_detached(1).build();
    let (app, _charge) = hang_up_while_the_body_is_read(&idem, "first").await;
    // The detached work ends; until it does, a new key is refused `503` overloaded, as
    // `max_detached(1)` says. A client retrying gets through.
    let mut fresh = common::send(&app, post_with("/charge", Some("fresh"), "")).await;
    for _ in 0..200 {
        if fresh.status != StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        fresh = common::send(&app, post_with("/charge", Some("fresh"), "")).await;
    }
    assert_eq!(
        fresh.status,
        StatusCode::CREATED,
        "a new request refused after the panic: {fresh:?}"
    );
}
