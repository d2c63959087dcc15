//! The handler ran: a panic after it returned (its future's drop, its response body's
//! stream) never releases its key, so a retry never runs it again.

#![allow(clippy::unwrap_used)]

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::post;
use common::{Backend, post_with, send};
use futures_util::StreamExt;
use idem_runtime::{Idempotent, Problem, idempotent};

/// A handler's work written as a future by hand, whose `Drop` panics once it has
/// returned its response.
struct PanicsWhenDroppedAfterReturning {
    runs: Arc<AtomicUsize>,
    returned: bool,
}

impl Future for PanicsWhenDroppedAfterReturning {
    type Output = (StatusCode, &'static str);

    fn poll(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        self.returned = true;
        Poll::Ready((StatusCode::CREATED, "charged"))
    }
}

impl Drop for PanicsWhenDroppedAfterReturning {
    fn drop(&mut self) {
        if self.returned && !std::thread::panicking() {
            panic!("the drop of a handler's work that returned");
        }
    }
}

async fn charge_by_hand(State(runs): State<Arc<AtomicUsize>>, idem: Idempotent) -> Response {
    idem.run(PanicsWhenDroppedAfterReturning {
        runs,
        returned: false,
    })
    .await
}

/// Guards: the work returned `201`; its future's drop then panicked. The client gets the
/// `201`, and the retry its replay.
async fn a_work_whose_drop_panics_after_returning_is_not_run_again(backend: Backend) {
    let idem = backend.builder().await.build();
    let runs = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/charge", post(charge_by_hand))
        .with_state(runs.clone())
        .layer(idem.layer());
    let first = send(&app, post_with("/charge", Some("drop"), "")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.body, "charged");
    let retry = send(&app, post_with("/charge", Some("drop"), "")).await;
    assert!(retry.is_replay(), "{retry:?}");
    assert_eq!(retry.body, "charged");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the charge ran once");
}

#[idempotent]
async fn charge_with_a_panicking_body(State(runs): State<Arc<AtomicUsize>>) -> (StatusCode, Body) {
    runs.fetch_add(1, Ordering::SeqCst);
    let stream = futures_util::stream::iter([false, true]).map(|panics| {
        assert!(!panics, "the body's stream panicked");
        Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"charged "))
    });
    (StatusCode::CREATED, Body::from_stream(stream))
}

/// Guards: a response body whose stream panics is a body that failed, as one that errs:
/// the client is told its response was lost, a retry that it was not stored, and the
/// handler does not run again.
async fn a_body_that_panics_is_a_problem_not_a_rerun(backend: Backend) {
    let idem = backend.builder().await.build();
    let runs = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/charge", post(charge_with_a_panicking_body))
        .with_state(runs.clone())
        .layer(idem.layer());
    let first = send(&app, post_with("/charge", Some("body"), "")).await;
    first.assert_problem(StatusCode::BAD_GATEWAY, Problem::RESPONSE_NOT_STORED);
    let retry = send(&app, post_with("/charge", Some("body"), "")).await;
    retry.assert_problem(StatusCode::CONFLICT, Problem::RESPONSE_NOT_STORED);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the charge ran once");
}

/// A body stream that yields one chunk, ends, and panics as it is dropped.
struct EndsThenPanicsOnDrop {
    sent: bool,
}

impl futures_util::Stream for EndsThenPanicsOnDrop {
    type Item = Result<bytes::Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.sent {
            return Poll::Ready(None);
        }
        self.sent = true;
        Poll::Ready(Some(Ok(bytes::Bytes::from_static(b"charged"))))
    }
}

impl Drop for EndsThenPanicsOnDrop {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            panic!("the body's stream panicked as it was dropped");
        }
    }
}

/// A body whose size hint, the first thing idem asks of it, panics.
struct HintPanics;

impl http_body::Body for HintPanics {
    type Data = bytes::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, std::io::Error>>> {
        Poll::Ready(None)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        panic!("the body's size hint panicked")
    }
}

#[idempotent]
async fn charge_with_a_body_panicking_as_dropped(
    State(runs): State<Arc<AtomicUsize>>,
) -> (StatusCode, Body) {
    runs.fetch_add(1, Ordering::SeqCst);
    let body = Body::from_stream(EndsThenPanicsOnDrop { sent: false });
    (StatusCode::CREATED, body)
}

#[idempotent]
async fn charge_with_a_panicking_size_hint(
    State(runs): State<Arc<AtomicUsize>>,
) -> (StatusCode, Body) {
    runs.fetch_add(1, Ordering::SeqCst);
    (StatusCode::CREATED, Body::new(HintPanics))
}

/// Guards: a body that panics anywhere while idem holds it (its size hint, its drop once
/// read) is a body that failed, as above.
async fn a_body_panicking_before_or_after_its_stream_is_not_run_again(backend: Backend) {
    let idem = backend.builder().await.build();
    let runs = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/dropped", post(charge_with_a_body_panicking_as_dropped))
        .route("/hint", post(charge_with_a_panicking_size_hint))
        .with_state(runs.clone())
        .layer(idem.layer());
    for path in ["/dropped", "/hint"] {
        let first = send(&app, post_with(path, Some(path), "")).await;
        first.assert_problem(StatusCode::BAD_GATEWAY, Problem::RESPONSE_NOT_STORED);
        let retry = send(&app, post_with(path, Some(path), "")).await;
        retry.assert_problem(StatusCode::CONFLICT, Problem::RESPONSE_NOT_STORED);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2, "each charge ran once");
}

on_both_stores!(
    a_work_whose_drop_panics_after_returning_is_not_run_again,
    a_body_that_panics_is_a_problem_not_a_rerun,
    a_body_panicking_before_or_after_its_stream_is_not_run_again,
);
