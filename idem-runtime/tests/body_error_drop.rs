//! A failing response body whose error panics as it is dropped: idem holds that error
//! once the body is read, and drops it where the panic is caught, so the client still gets
//! its `502`.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use common::{Backend, post_with, send};
use idem_runtime::{Problem, idempotent};

/// A body's error whose drop panics.
#[derive(Debug)]
struct PanicsWhenDropped;

impl std::fmt::Display for PanicsWhenDropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the upstream went away")
    }
}

impl std::error::Error for PanicsWhenDropped {}

impl Drop for PanicsWhenDropped {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            panic!("the body's error panicked as it was dropped");
        }
    }
}

#[idempotent]
async fn charge_with_a_failing_body(State(runs): State<Arc<AtomicUsize>>) -> (StatusCode, Body) {
    runs.fetch_add(1, Ordering::SeqCst);
    let stream = futures_util::stream::iter([
        Ok(bytes::Bytes::from_static(b"charged ")),
        Err(PanicsWhenDropped),
    ]);
    (StatusCode::CREATED, Body::from_stream(stream))
}

/// The client of a body that panics as idem holds it is told `502` response-not-stored
/// (as for a body whose own drop panics, `panics_after_the_handler.rs`); the retry `409`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_body_whose_error_panics_when_dropped_is_answered_502() {
    let idem = Backend::memory().builder().await.build();
    let runs = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/charge", post(charge_with_a_failing_body))
        .with_state(runs.clone())
        .layer(idem.layer());
    // The first request in a task of its own, as a server runs it: a panic there is a
    // connection closed with no answer.
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with("/charge", Some("error-drop"), "")).await }
    })
    .await;
    let retry = send(&app, post_with("/charge", Some("error-drop"), "")).await;
    retry.assert_problem(StatusCode::CONFLICT, Problem::RESPONSE_NOT_STORED);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the charge ran once");
    let first = match first {
        Ok(first) => first,
        Err(error) => {
            panic!("the client got no answer at all (the panic reached the server): {error:?}")
        }
    };
    first.assert_problem(StatusCode::BAD_GATEWAY, Problem::RESPONSE_NOT_STORED);
}
