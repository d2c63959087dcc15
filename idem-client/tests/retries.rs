//! idem-client against real sockets: a server of the test's own that fails on purpose, and
//! an idem-protected server behind a proxy that loses responses after the server committed.

#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use idem_client::{ClientError, IdempotentRetry, ResponseExt, client_error, rejection};
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A client with short backoffs, so that the tests run quickly.
fn client(retry: IdempotentRetry) -> ClientWithMiddleware {
    ClientBuilder::new(reqwest::Client::new())
        .with(retry)
        .build()
}

fn quick() -> IdempotentRetry {
    IdempotentRetry::default().backoff(Duration::from_millis(10), Duration::from_millis(50))
}

async fn serve(app: Router) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

/// One scripted answer: status, headers, body.
type Canned = (u16, &'static [(&'static str, &'static str)], &'static str);
/// The key a request carried, and when it arrived.
type Seen = (Option<String>, Instant);

/// A server that answers each request with the next scripted answer (then `201`), and
/// records the key and arrival time of every request.
#[derive(Clone, Default)]
struct Script {
    answers: Arc<Mutex<VecDeque<Canned>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Script {
    fn new(answers: &[Canned]) -> Self {
        let script = Self::default();
        script
            .answers
            .lock()
            .unwrap()
            .extend(answers.iter().copied());
        script
    }

    async fn serve(&self) -> String {
        serve(
            Router::new()
                .route("/pay", post(scripted))
                .with_state(self.clone()),
        )
        .await
    }

    fn keys(&self) -> Vec<Option<String>> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(key, _)| key.clone())
            .collect()
    }
}

async fn scripted(State(script): State<Script>, headers: HeaderMap) -> Response {
    let key = headers
        .get("idempotency-key")
        .map(|value| value.to_str().unwrap().to_owned());
    script.seen.lock().unwrap().push((key, Instant::now()));
    let next = script.answers.lock().unwrap().pop_front();
    match next {
        Some((status, headers, body)) => {
            let mut response = (StatusCode::from_u16(status).unwrap(), body).into_response();
            for &(name, value) in headers {
                response.headers_mut().insert(name, value.parse().unwrap());
            }
            response
        }
        None => (StatusCode::CREATED, "paid").into_response(),
    }
}

const PROBLEM: (&str, &str) = ("content-type", "application/problem+json");

/// Guards: 409 with `Retry-After: 1`, then success: the client waited at least a second
/// and sent the same key both times.
#[tokio::test]
async fn in_flight_is_retried_after_retry_after() {
    let script = Script::new(&[(
        409,
        &[PROBLEM, ("retry-after", "1")],
        r#"{"type":"urn:idem:problem:in-flight","title":"in flight","status":409}"#,
    )]);
    let url = script.serve().await;
    let started = Instant::now();
    let response = client(quick())
        .post(format!("{url}/pay"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.attempts(), 2);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited {:?}",
        started.elapsed()
    );
    let keys = script.keys();
    assert_eq!(keys.len(), 2);
    assert!(keys[0].is_some() && keys[0] == keys[1], "{keys:?}");
}

/// Guards: 503 twice then success, and 500 once then success: retried, one key.
#[tokio::test]
async fn server_errors_are_retried_with_one_key() {
    let script = Script::new(&[(503, &[], "busy"), (503, &[], "busy")]);
    let url = script.serve().await;
    let response = client(quick())
        .post(format!("{url}/pay"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.attempts(), 3);
    assert_eq!(response.text().await.unwrap(), "paid");
    let keys = script.keys();
    assert!(
        keys.iter().all(|key| key.is_some() && *key == keys[0]),
        "{keys:?}"
    );

    let script = Script::new(&[(500, &[], "oops")]);
    let url = script.serve().await;
    let response = client(quick())
        .post(format!("{url}/pay"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.attempts(), 2);
}

/// Guards: 422 key reuse and 400 come back at once (one attempt) as typed errors.
#[tokio::test]
async fn caller_errors_are_not_retried() {
    let script = Script::new(&[(
        422,
        &[PROBLEM],
        r#"{"type":"urn:idem:problem:key-reused","title":"Idempotency-Key reused","status":422,"detail":"the key was used with another request"}"#,
    )]);
    let url = script.serve().await;
    let error = client(quick())
        .post(format!("{url}/pay"))
        .body("{}")
        .send()
        .await
        .unwrap_err();
    let rejected = rejection(&error).expect("a rejection");
    assert!(rejected.is_key_reused(), "{rejected:?}");
    assert_eq!(rejected.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(rejected.detail, "the key was used with another request");
    assert_eq!(rejected.attempts, 1);
    assert_eq!(script.keys().len(), 1, "sent once");

    let script = Script::new(&[(400, &[], "bad amount")]);
    let url = script.serve().await;
    let error = client(quick())
        .post(format!("{url}/pay"))
        .body("{}")
        .send()
        .await
        .unwrap_err();
    let rejected = rejection(&error).expect("a rejection");
    assert_eq!(rejected.status, StatusCode::BAD_REQUEST);
    assert!(!rejected.is_key_reused());
    assert_eq!(rejected.detail, "bad amount");
    assert_eq!(script.keys().len(), 1, "sent once");
}

/// Guards: a total deadline shorter than the server's `Retry-After` stops in time, with an
/// error naming the attempts.
#[tokio::test]
async fn the_deadline_stops_retries_in_time() {
    let busy: Canned = (503, &[("retry-after", "2")], "busy");
    let script = Script::new(&[busy; 5]);
    let url = script.serve().await;
    let started = Instant::now();
    let error = client(quick().deadline(Duration::from_millis(500)))
        .post(format!("{url}/pay"))
        .body("{}")
        .send()
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    match client_error(&error) {
        Some(ClientError::GaveUp { attempts, .. }) => assert_eq!(*attempts, 1),
        other => panic!("expected GaveUp, got {other:?}"),
    }
    assert!(error.to_string().contains("1 attempts"), "{error}");
}

/// Guards: a caller's own key is sent unchanged; a generated one is a UUID v4 as an
/// sf-string; a GET gets no key.
#[tokio::test]
async fn keys_are_generated_or_kept() {
    let script = Script::default();
    let url = script.serve().await;
    let http = client(quick());
    http.post(format!("{url}/pay"))
        .header("idempotency-key", "\"order-42:pay\"")
        .body("{}")
        .send()
        .await
        .unwrap();
    http.post(format!("{url}/pay"))
        .body("{}")
        .send()
        .await
        .unwrap();
    let keys = script.keys();
    assert_eq!(keys[0].as_deref(), Some("\"order-42:pay\""));
    let generated = keys[1].as_deref().unwrap();
    let uuid = generated
        .strip_prefix('"')
        .and_then(|key| key.strip_suffix('"'))
        .expect("an sf-string");
    let parsed = uuid::Uuid::parse_str(uuid).expect("a UUID");
    assert_eq!(parsed.get_version_num(), 4);
    assert_ne!(keys[0], keys[1]);
}

/// An idem-protected payment endpoint that counts the payments it makes.
async fn payments_server() -> (String, Arc<AtomicUsize>) {
    let payments = Arc::new(AtomicUsize::new(0));
    let idem = idem_runtime::Idempotency::builder()
        .shared_scope(true)
        .build();
    #[idem_runtime::idempotent]
    async fn pay(State(payments): State<Arc<AtomicUsize>>, body: Bytes) -> (StatusCode, String) {
        let n = payments.fetch_add(1, Ordering::SeqCst) + 1;
        (
            StatusCode::CREATED,
            format!("payment {n} of {} bytes", body.len()),
        )
    }
    let app = Router::new()
        .route("/pay", post(pay))
        .with_state(payments.clone())
        .layer(idem.layer());
    (serve(app).await, payments)
}

/// How much of the first response the proxy passes on.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// Nothing: the connection closes after the server answered.
    Everything,
    /// The head and the first bytes of the body.
    MidBody,
}

/// A proxy in front of `upstream` that loses the first response after the server sent
/// it, as `cut` says, then closes the client's connection. Later connections pass through
/// whole.
async fn losing_proxy(upstream: &str, cut: Cut) -> String {
    let upstream = upstream.trim_start_matches("http://").to_owned();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut first = true;
        loop {
            let (mut client, _) = listener.accept().await.unwrap();
            let mut server = TcpStream::connect(&upstream).await.unwrap();
            if !std::mem::take(&mut first) {
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
                continue;
            }
            tokio::spawn(async move {
                let (mut client_read, mut client_write) = client.split();
                let (mut server_read, mut server_write) = server.split();
                let forward = tokio::io::copy(&mut client_read, &mut server_write);
                let lose = async {
                    // The whole response, so the server has committed and answered.
                    let mut response = vec![0; 64 * 1024];
                    let mut read = 0;
                    while read < 20 || !response[..read].windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = server_read.read(&mut response[read..]).await.unwrap();
                        if n == 0 {
                            break;
                        }
                        read += n;
                    }
                    let head = response[..read]
                        .windows(4)
                        .position(|w| w == b"\r\n\r\n")
                        .map_or(read, |at| at + 4);
                    let keep = match cut {
                        Cut::Everything => 0,
                        Cut::MidBody => (head + 3).min(read - 1),
                    };
                    client_write.write_all(&response[..keep]).await.unwrap();
                    client_write.shutdown().await.ok();
                };
                tokio::select! {
                    _ = forward => {}
                    () = lose => {}
                }
            });
        }
    });
    format!("http://{addr}")
}

/// Guards: a connection lost after the server committed (no response at all), and a
/// response lost half-way through its body: the retry carries the same key, gets the
/// stored response, and one payment exists.
#[tokio::test]
async fn a_lost_response_is_replayed_not_paid_twice() {
    for keep in [Cut::Everything, Cut::MidBody] {
        let (upstream, payments) = payments_server().await;
        let url = losing_proxy(&upstream, keep).await;
        let response = client(quick())
            .post(format!("{url}/pay"))
            .body("{\"amount\":1200}")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED, "{keep:?}");
        assert_eq!(response.attempts(), 2, "{keep:?}");
        assert!(
            response.replayed(),
            "the retry got the stored response ({keep:?})"
        );
        assert_eq!(response.text().await.unwrap(), "payment 1 of 15 bytes");
        assert_eq!(payments.load(Ordering::SeqCst), 1, "one payment ({keep:?})");
    }
}
