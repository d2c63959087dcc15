//! A protected response whose body ends in trailer fields (gRPC's `grpc-status`, a
//! checksum): the first client gets the handler's data and trailers exactly as it does
//! without a key, the handler runs once, and a retry is told the response was not stored
//! (`409`), never replayed without its trailers. An empty trailers frame carries nothing:
//! such a response is stored and replayed.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::post;
use bytes::Bytes;
use common::{Counters, post_with};
use http_body::Frame;
use http_body_util::BodyExt;
use idem_runtime::{Idempotency, Idempotent, Problem};
use tower::ServiceExt;

fn trailers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (n, v) in pairs {
        map.append(*n, HeaderValue::from_static(v));
    }
    map
}

#[derive(Clone, Copy)]
enum Shape {
    /// "ab", "cd", trailers.
    Plain,
    /// "ab", trailers, "cd".
    DataAfter,
    /// "ab", trailers, an error.
    ErrorAfter,
    /// trailers only.
    Only,
    /// 500 with "ab", trailers.
    ServerError,
    /// 600 bytes then trailers (over a 100-byte limit).
    Large,
    /// "ab", empty trailers, "cd".
    EmptyTrailers,
}

fn body_of(shape: Shape) -> (StatusCode, Body) {
    type F = Result<Frame<Bytes>, std::io::Error>;
    let t = || {
        Ok(Frame::trailers(trailers(&[
            ("grpc-status", "0"),
            ("x-sum", "abc"),
        ])))
    };
    let d = |s: &'static str| Ok(Frame::data(Bytes::from_static(s.as_bytes())));
    let (status, frames): (StatusCode, Vec<F>) = match shape {
        Shape::Plain => (StatusCode::CREATED, vec![d("ab"), d("cd"), t()]),
        Shape::DataAfter => (StatusCode::CREATED, vec![d("ab"), t(), d("cd")]),
        Shape::ErrorAfter => (
            StatusCode::CREATED,
            vec![
                d("ab"),
                t(),
                Err(std::io::Error::other("after the trailers")),
            ],
        ),
        Shape::Only => (StatusCode::OK, vec![t()]),
        Shape::ServerError => (StatusCode::INTERNAL_SERVER_ERROR, vec![d("ab"), t()]),
        Shape::Large => (
            StatusCode::CREATED,
            vec![Ok(Frame::data(Bytes::from(vec![b'x'; 600]))), t()],
        ),
        Shape::EmptyTrailers => (
            StatusCode::CREATED,
            vec![d("ab"), Ok(Frame::trailers(HeaderMap::new())), d("cd")],
        ),
    };
    (
        status,
        Body::new(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        ))),
    )
}

fn shape_of(path: &str) -> Shape {
    match path {
        "/t/plain" => Shape::Plain,
        "/t/after" => Shape::DataAfter,
        "/t/error" => Shape::ErrorAfter,
        "/t/only" => Shape::Only,
        "/t/500" => Shape::ServerError,
        "/t/large" => Shape::Large,
        _ => Shape::EmptyTrailers,
    }
}

async fn trailed(
    idem: Idempotent,
    State(counters): State<Arc<Counters>>,
    uri: axum::http::Uri,
) -> Response {
    let shape = shape_of(uri.path());
    idem.run(async move {
        counters.runs.fetch_add(1, Ordering::SeqCst);
        let (status, body) = body_of(shape);
        let mut r = Response::new(body);
        *r.status_mut() = status;
        r
    })
    .await
}

fn trailer_app(idem: &Idempotency, counters: Arc<Counters>) -> Router {
    let mut router = Router::new();
    for p in [
        "/t/plain", "/t/after", "/t/error", "/t/only", "/t/500", "/t/large", "/t/empty",
    ] {
        router = router.route(p, post(trailed));
    }
    router.with_state(counters).layer(idem.layer())
}

/// What a client sees of a response: status, data, trailers, or the body error.
#[derive(Debug, PartialEq)]
struct Seen {
    status: u16,
    data: Result<(Bytes, Option<HeaderMap>), String>,
}

async fn see(router: &Router, path: &str, key: Option<&str>) -> (Seen, HeaderMap) {
    let response = router
        .clone()
        .oneshot(post_with(path, key, ""))
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let data = match body.collect().await {
        Ok(c) => {
            let t = c.trailers().cloned();
            Ok((c.to_bytes(), t))
        }
        Err(e) => Err(e.to_string()),
    };
    (
        Seen {
            status: parts.status.as_u16(),
            data,
        },
        parts.headers,
    )
}

async fn trailers_case(
    path: &str,
    limit: Option<usize>,
    store_5xx: bool,
) -> (Seen, Seen, Seen, usize) {
    let mut b = Idempotency::builder().shared_scope(true);
    if let Some(limit) = limit {
        b = b.max_response_bytes(limit);
    }
    if store_5xx {
        b = b.store_server_errors(true);
    }
    let idem = b.build();
    let counters = Arc::new(Counters::default());
    let router = trailer_app(&idem, counters.clone());
    let (control, _) = see(&router, path, None).await;
    let runs_before = counters.runs();
    let (first, _) = see(&router, path, Some("k")).await;
    let (retry, _) = see(&router, path, Some("k")).await;
    (control, first, retry, counters.runs() - runs_before)
}

fn is_not_stored(seen: &Seen) -> bool {
    seen.status == 409
        && seen
            .data
            .as_ref()
            .is_ok_and(|(b, _)| String::from_utf8_lossy(b).contains(Problem::RESPONSE_NOT_STORED))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_reach_the_first_client_and_the_retry_is_told() {
    let mut report = Vec::new();
    for path in ["/t/plain", "/t/after", "/t/only", "/t/large"] {
        let limit = (path == "/t/large").then_some(100);
        let (control, first, retry, runs) = trailers_case(path, limit, false).await;
        if first != control {
            report.push(format!("{path}: first {first:?} != control {control:?}"));
        }
        if !is_not_stored(&retry) {
            report.push(format!("{path}: retry {retry:?}"));
        }
        if runs != 1 {
            report.push(format!("{path}: ran {runs} times"));
        }
    }
    assert!(report.is_empty(), "{report:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_then_an_error_and_empty_trailers() {
    let (control, first, retry, runs) = trailers_case("/t/error", None, false).await;
    assert_eq!(first.status, control.status);
    assert!(first.data.is_err(), "{first:?}");
    assert_eq!(runs, 1);
    assert_eq!(retry.status, 409, "{retry:?}");
    // An empty trailers frame is dropped: the response is stored whole and replayed.
    let (control, first, retry, runs) = trailers_case("/t/empty", None, false).await;
    assert_eq!(
        first.data.as_ref().unwrap().0,
        control.data.as_ref().unwrap().0
    );
    assert_eq!(runs, 1);
    assert_eq!(retry.status, 201, "{retry:?}");
    assert_eq!(
        retry.data.as_ref().unwrap().0,
        control.data.as_ref().unwrap().0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_with_trailers() {
    // Released (default): the first client gets the trailers, the retry runs again.
    let (control, first, retry, runs) = trailers_case("/t/500", None, false).await;
    assert_eq!(first, control);
    assert_eq!(retry, control);
    assert_eq!(runs, 2);
    // Stored 5xx: not stored, the retry is told.
    let (control, first, retry, runs) = trailers_case("/t/500", None, true).await;
    assert_eq!(first, control);
    assert!(is_not_stored(&retry), "{retry:?}");
    assert_eq!(runs, 1);
}

/// On Redis as on the memory store.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_on_redis() {
    let store = idem_runtime::store::RedisStore::builder(testkit::shared_redis_url())
        .prefix(testkit::unique_prefix("trailers"))
        .connect()
        .await
        .unwrap();
    let idem = Idempotency::builder()
        .store(store)
        .shared_scope(true)
        .build();
    let counters = Arc::new(Counters::default());
    let router = trailer_app(&idem, counters.clone());
    let (control, _) = see(&router, "/t/plain", None).await;
    let (first, _) = see(&router, "/t/plain", Some("k")).await;
    let (retry, _) = see(&router, "/t/plain", Some("k")).await;
    assert_eq!(first, control);
    assert!(is_not_stored(&retry), "{retry:?}");
    assert_eq!(counters.runs(), 2);
}
