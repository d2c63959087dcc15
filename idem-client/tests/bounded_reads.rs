//! No unbounded buffering: the server streams a body without end and counts what the
//! client pulled; the call settles, with the server's answer, before it pulled `LIMIT`
//! bytes (the middleware reads at most `max_read_bytes`; the rest is socket buffers).

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::Response;
use axum::routing::any;
use idem_client::IdempotentRetry;
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// Bytes of one response the client may pull before the test calls it unbounded.
const LIMIT: usize = 128 << 20;
const CHUNK: usize = 64 << 10;

fn client() -> ClientWithMiddleware {
    ClientBuilder::new(reqwest::Client::new())
        .with(
            IdempotentRetry::default()
                .backoff(Duration::from_millis(5), Duration::from_millis(20))
                .deadline(Duration::from_secs(60)),
        )
        .build()
}

#[derive(Clone)]
struct Endless {
    status: u16,
    content_type: &'static str,
    prefix: &'static str,
    /// Set once one response's body went past `LIMIT`.
    over: Arc<Notify>,
}

async fn endless(State(endless): State<Endless>) -> Response {
    let over = endless.over.clone();
    let prefix = Bytes::from_static(endless.prefix.as_bytes());
    let filler = Bytes::from(vec![b'x'; CHUNK]);
    let stream = futures_util::stream::unfold(0usize, move |pulled| {
        let chunk = if pulled == 0 {
            prefix.clone()
        } else {
            filler.clone()
        };
        let pulled = pulled + chunk.len();
        if pulled > LIMIT {
            over.notify_one();
        }
        async move { Some((Ok::<_, std::io::Error>(chunk), pulled)) }
    });
    Response::builder()
        .status(endless.status)
        .header("content-type", endless.content_type)
        .body(Body::from_stream(stream))
        .unwrap()
}

async fn serve(endless: Endless) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/r", any(endless_handler))
        .with_state(endless);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

async fn endless_handler(state: State<Endless>) -> Response {
    endless(state).await
}

fn endless_answer(status: u16, content_type: &'static str, prefix: &'static str) -> Endless {
    Endless {
        status,
        content_type,
        prefix,
        over: Arc::new(Notify::new()),
    }
}

/// Runs `call` until it settles or the server has streamed `LIMIT` bytes into one
/// response; the latter fails the test.
async fn assert_bounded<F, T>(what: &str, endless: &Endless, call: F) -> T
where
    F: std::future::Future<Output = T>,
{
    tokio::select! {
        result = call => result,
        () = endless.over.notified() => {
            panic!(
                "{what}: the client pulled more than {} MiB of one response body into memory and was still reading",
                LIMIT >> 20
            );
        }
    }
}

/// A keyed POST answered `409` problem+json with an endless `detail`: handed over as it
/// streams (idem's "in flight" is never that long).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_409_with_an_endless_body_is_not_buffered_whole() {
    let endless = endless_answer(
        409,
        "application/problem+json",
        r#"{"type":"urn:example:edit-conflict","title":"conflict","detail":""#,
    );
    let url = serve(endless.clone()).await;
    let call = async {
        client()
            .post(format!("{url}/r"))
            .body("{}")
            .send()
            .await
            .map(|response| response.status())
    };
    let status = assert_bounded("keyed POST, 409", &endless, call).await;
    assert_eq!(status.unwrap(), 409);
}

/// A plain GET answered `404` with an endless body (a proxy's error page, a misrouted
/// download): refused, with the start of the body as its detail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_404_to_a_get_with_an_endless_body_is_not_buffered_whole() {
    let endless = endless_answer(404, "text/html", "<html>not found");
    let url = serve(endless.clone()).await;
    let call = async {
        client()
            .get(format!("{url}/r"))
            .send()
            .await
            .map(|response| response.status())
    };
    let refused = assert_bounded("GET, 404", &endless, call)
        .await
        .unwrap_err();
    let rejected = idem_client::rejection(&refused).unwrap();
    assert_eq!(rejected.status, 404);
    assert!(
        rejected.detail.starts_with("<html>not found"),
        "{}",
        rejected.detail
    );
    assert!(
        rejected.detail.len() < 9 * 1024,
        "a detail of {} bytes: only the start of a body over the limit is kept",
        rejected.detail.len()
    );
}

/// An unkeyed PUT answered `409` (an edit conflict: never in flight without a key) with
/// an endless body: handed over as it streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_409_to_an_unkeyed_put_is_not_buffered_whole() {
    let endless = endless_answer(409, "application/json", r#"{"error":""#);
    let url = serve(endless.clone()).await;
    let call = async {
        client()
            .put(format!("{url}/r"))
            .body("{}")
            .send()
            .await
            .map(|response| response.status())
    };
    let status = assert_bounded("unkeyed PUT, 409", &endless, call).await;
    assert_eq!(status.unwrap(), 409);
}

/// A keyed POST answered `200` with a streamed body (an export): past `max_read_bytes`,
/// handed over as it streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_stream_to_a_post_is_not_buffered_whole() {
    let endless = endless_answer(200, "text/event-stream", "data: first\n\n");
    let url = serve(endless.clone()).await;
    let call = async { client().post(format!("{url}/r")).body("{}").send().await };
    let mut response = assert_bounded("keyed POST, 200 stream", &endless, call)
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The body from its first byte, then on as it streams.
    let first = response.chunk().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: first\n\nxxx"));
    let next = response.chunk().await.unwrap().unwrap();
    assert!(next.iter().all(|&byte| byte == b'x'));
}

/// A GET answered `200` with the same endless body is handed over as it arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_stream_to_a_get_is_handed_over() {
    let endless = endless_answer(200, "text/event-stream", "data: first\n\n");
    let url = serve(endless.clone()).await;
    let call = async {
        client()
            .get(format!("{url}/r"))
            .send()
            .await
            .map(|response| response.status())
    };
    let status = assert_bounded("GET, 200 stream", &endless, call).await;
    assert_eq!(status.unwrap(), 200);
}
