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
use axum::routing::{any, post};
use idem_client::{ClientError, IdempotentRetry, ResponseExt, client_error, rejection};
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use testkit::proxy::{Cut, losing_proxy};
use tokio::net::TcpListener;

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
                .route("/pay", any(scripted))
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

/// Guards: the waits between attempts grow: without jitter each is its bound, doubling
/// from the first.
#[tokio::test]
async fn backoff_grows_between_attempts() {
    let script = Script::new(&[(503, &[], "busy"), (503, &[], "busy"), (500, &[], "oops")]);
    let url = script.serve().await;
    let response = client(
        IdempotentRetry::default()
            .backoff(Duration::from_millis(100), Duration::from_secs(2))
            .full_jitter(false),
    )
    .post(format!("{url}/pay"))
    .body("{}")
    .send()
    .await
    .unwrap();
    assert_eq!(response.attempts(), 4);
    let arrivals: Vec<Instant> = script.seen.lock().unwrap().iter().map(|s| s.1).collect();
    let gaps: Vec<Duration> = arrivals.windows(2).map(|w| w[1] - w[0]).collect();
    for (gap, bound) in gaps.iter().zip([100, 200, 400]) {
        assert!(*gap >= Duration::from_millis(bound), "{gaps:?}");
    }
    assert!(gaps[0] < gaps[1] && gaps[1] < gaps[2], "growing: {gaps:?}");
}

/// Guards: a deadline shorter than the backoff stops the call in time, naming the
/// attempts and the key, and an attempt that hangs is cut at the deadline too.
#[tokio::test]
async fn the_deadline_bounds_backoff_and_hung_attempts() {
    let busy: Canned = (503, &[], "busy");
    let script = Script::new(&[busy; 5]);
    let url = script.serve().await;
    let started = Instant::now();
    let error = client(
        IdempotentRetry::default()
            .backoff(Duration::from_secs(5), Duration::from_secs(5))
            .full_jitter(false)
            .deadline(Duration::from_millis(300)),
    )
    .post(format!("{url}/pay"))
    .body("{}")
    .send()
    .await
    .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let Some(gave_up @ ClientError::GaveUp { attempts: 1, .. }) = client_error(&error) else {
        panic!("expected GaveUp after 1 attempt: {error}");
    };
    assert_eq!(
        gave_up.key(),
        script.keys()[0].as_deref(),
        "the key to retry with"
    );

    async fn hangs() -> StatusCode {
        std::future::pending().await
    }
    let url = serve(Router::new().route("/pay", post(hangs))).await;
    let started = Instant::now();
    let error = client(quick().deadline(Duration::from_millis(300)))
        .post(format!("{url}/pay"))
        .body("{}")
        .send()
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(
        matches!(client_error(&error), Some(ClientError::GaveUp { .. })),
        "{error}"
    );
}

/// Guards: a request that cannot be sent as it is (a URL scheme reqwest refuses) fails at
/// once, untried again.
#[tokio::test]
async fn requests_that_cannot_be_sent_are_not_retried() {
    let started = Instant::now();
    let error =
        client(IdempotentRetry::default().backoff(Duration::from_secs(1), Duration::from_secs(1)))
            .post("ftp://127.0.0.1/pay")
            .body("{}")
            .send()
            .await
            .unwrap_err();
    assert!(
        client_error(&error).is_none(),
        "reqwest's own error: {error}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

/// Guards: a response that was read to be judged comes back as the server sent it: its
/// URL, status, headers and body; and it names the key the call carried.
#[tokio::test]
async fn judged_responses_keep_their_url_and_name_the_key() {
    let script = Script::new(&[(503, &[], "busy")]);
    let url = script.serve().await;
    let response = client(quick())
        .post(format!("{url}/pay"))
        .header("idempotency-key", "\"order-7\"")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.url().as_str(), format!("{url}/pay"));
    assert_eq!(response.idempotency_key(), Some("\"order-7\""));
    assert_eq!(response.attempts(), 2);
    assert_eq!(response.text().await.unwrap(), "paid");
}

/// Guards: a body that can be sent once only (a stream) is still judged: a refusal is a
/// typed rejection, and a failure is not retried.
#[tokio::test]
async fn stream_bodies_are_sent_once_and_judged() {
    let script = Script::new(&[(
        422,
        &[PROBLEM],
        r#"{"type":"urn:idem:problem:key-reused","detail":"reused"}"#,
    )]);
    let url = script.serve().await;
    let stream = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"{}"))]);
    let error = client(quick())
        .post(format!("{url}/pay"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap_err();
    assert!(
        rejection(&error).is_some_and(|r| r.is_key_reused()),
        "{error}"
    );

    let script = Script::new(&[(503, &[], "busy")]);
    let url = script.serve().await;
    let stream = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"{}"))]);
    let error = client(quick())
        .post(format!("{url}/pay"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap_err();
    assert!(
        matches!(
            client_error(&error),
            Some(ClientError::GaveUp { attempts: 1, .. })
        ),
        "{error}"
    );
    assert_eq!(script.keys().len(), 1, "sent once");
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

/// Guards: a connection reset or closed after the server committed (no response at all),
/// and a response lost half-way through its body: the retry carries the same key, gets the
/// stored response, and one payment exists.
#[tokio::test]
async fn a_lost_response_is_replayed_not_paid_twice() {
    for keep in [Cut::Reset, Cut::Closed, Cut::MidBody] {
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

// ---------------------------------------------------------------------------------------
// Edge cases that failed before their fixes.
// ---------------------------------------------------------------------------------------

/// What a raw server does after writing its scripted bytes.
#[derive(Clone, Copy)]
enum After {
    /// Keeps the connection open and silent for ever.
    Hang,
    /// Closes the connection.
    Close,
}

/// A raw HTTP/1.1 server: reads each request head, counts it, writes `response` (a raw
/// status line, headers and possibly truncated body) and then hangs or closes.
async fn raw_server(response: &'static [u8], after: After) -> (String, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = requests.clone();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                counter.fetch_add(1, Ordering::SeqCst);
                let _ = socket.write_all(response).await;
                let _ = socket.flush().await;
                match after {
                    After::Hang => {
                        std::future::pending::<()>().await;
                        drop(socket);
                    }
                    After::Close => drop(socket),
                }
            });
        }
    });
    (format!("http://{addr}"), requests)
}

/// Guards: a body that stalls mid-way is cut at the deadline (the attempt, head and body, is bounded).
#[tokio::test]
async fn a_body_that_stalls_mid_way_is_bounded_by_the_deadline() {
    let (url, _) = raw_server(
        b"HTTP/1.1 201 Created\r\ncontent-length: 100\r\n\r\n{\"partial\":",
        After::Hang,
    )
    .await;
    let call = client(quick().deadline(Duration::from_millis(300)))
        .post(format!("{url}/pay"))
        .body("{}")
        .send();
    let bounded = tokio::time::timeout(Duration::from_secs(5), call).await;
    assert!(
        bounded.is_ok(),
        "the call was still running 5 s after its 300 ms deadline (stalled mid-body)"
    );
}

/// Guards: a 422 whose body is cut short is still a typed rejection, sent once.
#[tokio::test]
async fn a_422_with_a_body_cut_short_is_never_retried() {
    let (url, requests) = raw_server(
        b"HTTP/1.1 422 Unprocessable Entity\r\ncontent-type: application/problem+json\r\ncontent-length: 200\r\n\r\n{\"type\":\"urn:idem:problem:key-reused\"",
        After::Close,
    )
    .await;
    let error = client(quick())
        .post(format!("{url}/pay"))
        .body("{}")
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        requests.load(Ordering::SeqCst),
        1,
        "a 422 was sent again; the call ended with: {error}"
    );
    assert!(rejection(&error).is_some(), "not typed Rejected: {error}");
}

/// Guards: a `Retry-After` longer than an hour is honoured as given: past the deadline, the call gives up at once.
#[tokio::test]
async fn a_long_retry_after_is_never_cut_short() {
    let script = Script::new(&[(503, &[("retry-after", "7200")], "come back in two hours")]);
    let url = script.serve().await;
    let call = client(quick().deadline(Duration::from_secs(7000)))
        .post(format!("{url}/pay"))
        .body("{}")
        .send();
    let answered = tokio::time::timeout(Duration::from_secs(3), call).await;
    let Ok(result) = answered else {
        panic!(
            "still waiting after 3 s: the client plans a retry before the server's Retry-After of 7200 s (it clamps it to 3600 s)"
        );
    };
    assert!(
        matches!(
            result.as_ref().map_err(client_error),
            Err(Some(ClientError::GaveUp { attempts: 1, .. }))
        ),
        "{result:?}"
    );
}

/// Guards: a `Retry-After` in seconds too large for any clock (delay-seconds is any run of
/// digits) is a wait past every deadline, never ignored: the call gives up at once
/// instead of retrying within milliseconds.
#[tokio::test]
async fn a_retry_after_past_any_clock_is_never_ignored() {
    let script = Script::new(&[(
        503,
        &[("retry-after", "18446744073709551616")],
        "down for good",
    )]);
    let url = script.serve().await;
    let result = client(quick().attempts(3))
        .post(format!("{url}/pay"))
        .body("{}")
        .send()
        .await;
    assert!(
        matches!(
            result.as_ref().map_err(client_error),
            Err(Some(ClientError::GaveUp { attempts: 1, .. }))
        ),
        "{result:?}"
    );
}

/// An HTTP-date `seconds` from now (RFC 9110 IMF-fixdate).
fn http_date_in(seconds: u64) -> String {
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + seconds;
    let (days, rem) = (at / 86_400, at % 86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil from days (Howard Hinnant).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{weekday}, {d:02} {} {year} {h:02}:{m:02}:{s:02} GMT",
        months[(month - 1) as usize]
    )
}

/// Guards: the HTTP-date form of `Retry-After` (RFC 9110) is honoured.
#[tokio::test]
async fn an_http_date_retry_after_is_honoured() {
    let date: &'static str = Box::leak(http_date_in(3600).into_boxed_str());
    let headers: &'static [(&'static str, &'static str)] =
        Box::leak(vec![("retry-after", date)].into_boxed_slice());
    let script = Script::new(&[(503, headers, "maintenance for an hour")]);
    let url = script.serve().await;
    let started = Instant::now();
    let result = client(quick())
        .post(format!("{url}/pay"))
        .body("{}")
        .send()
        .await;
    let arrivals = script.keys().len();
    assert_eq!(
        arrivals,
        1,
        "Retry-After: {date} was ignored: sent again {:?} later ({result:?})",
        started.elapsed()
    );
}

/// Guards: huge backoff bounds (`Duration::MAX`) never panic.
#[tokio::test]
async fn huge_backoff_bounds_never_panic() {
    let script = Script::new(&[(503, &[], "busy")]);
    let url = script.serve().await;
    let call = tokio::spawn(async move {
        let retry = IdempotentRetry::default()
            .backoff(Duration::MAX, Duration::MAX)
            .full_jitter(false)
            .deadline(Duration::from_millis(500));
        client(retry)
            .post(format!("{url}/pay"))
            .body("{}")
            .send()
            .await
            .map(|response| response.status())
            .map_err(|error| error.to_string())
    });
    let joined = call.await;
    assert!(
        !joined.as_ref().is_err_and(tokio::task::JoinError::is_panic),
        "the middleware panicked: {joined:?}"
    );
}

/// Guards: a request whose method RFC 9110 does not define as idempotent (an extension
/// method such as WebDAV's `LOCK`) gets a key, and its retry carries the same one: sent
/// again without one, a server would act on it twice. The idempotent methods get none.
#[tokio::test]
async fn every_method_that_is_not_idempotent_gets_a_key() {
    let lock = reqwest::Method::from_bytes(b"LOCK").unwrap();
    let script = Script::new(&[(503, &[], "busy")]);
    let url = script.serve().await;
    let response = client(quick())
        .request(lock, format!("{url}/pay"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.attempts(), 2);
    let keys = script.keys();
    assert!(
        keys.len() == 2 && keys[0].is_some() && keys[0] == keys[1],
        "LOCK sent twice under one key: {keys:?}"
    );

    let script = Script::default();
    let url = script.serve().await;
    let http = client(quick());
    for method in [
        reqwest::Method::GET,
        reqwest::Method::PUT,
        reqwest::Method::DELETE,
        reqwest::Method::OPTIONS,
    ] {
        http.request(method, format!("{url}/pay"))
            .send()
            .await
            .unwrap();
    }
    assert_eq!(
        script.keys(),
        [None, None, None, None],
        "idempotent methods"
    );
}

/// Guards: a `409` to a request without a key is the server's answer (an edit conflict),
/// handed back at once with its body: such a request is never "in flight".
#[tokio::test]
async fn a_409_to_a_request_without_a_key_is_the_servers_answer() {
    let script = Script::new(&[(
        409,
        &[("content-type", "application/json")],
        r#"{"error":"the document changed meanwhile"}"#,
    )]);
    let url = script.serve().await;
    let response = client(quick())
        .put(format!("{url}/pay"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    assert_eq!(response.attempts(), 1);
    assert_eq!(
        response.text().await.unwrap(),
        r#"{"error":"the document changed meanwhile"}"#
    );
    assert_eq!(script.keys(), [None], "sent once");
}

/// What `tower_http::timeout::TimeoutLayer` outside `idem.layer()` does (the README's
/// production timeouts): past its deadline the handler's future is dropped and the client
/// gets `408`. Here the handler then goes on: it waits for that `408` to be sent.
async fn timing_out(
    State(gate): State<Arc<tokio::sync::Notify>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match tokio::time::timeout(Duration::from_millis(100), next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            gate.notify_one();
            StatusCode::REQUEST_TIMEOUT.into_response()
        }
    }
}

/// Guards: a `408` from the server's request timeout is retried with the same key. idem
/// runs the timed-out payment on and stores its response; the retry gets it, and one
/// payment is made.
#[tokio::test]
async fn a_408_is_retried_and_gets_the_stored_response() {
    #[derive(Clone)]
    struct Shop {
        gate: Arc<tokio::sync::Notify>,
        payments: Arc<AtomicUsize>,
    }
    #[idem_runtime::idempotent]
    async fn pay(State(shop): State<Shop>) -> (StatusCode, String) {
        shop.gate.notified().await;
        let n = shop.payments.fetch_add(1, Ordering::SeqCst) + 1;
        (StatusCode::CREATED, format!("payment {n}"))
    }
    let shop = Shop {
        gate: Arc::new(tokio::sync::Notify::new()),
        payments: Arc::new(AtomicUsize::new(0)),
    };
    let idem = idem_runtime::Idempotency::builder()
        .shared_scope(true)
        .build();
    let app = Router::new()
        .route("/pay", post(pay))
        .with_state(shop.clone())
        .layer(idem.layer())
        .layer(axum::middleware::from_fn_with_state(
            shop.gate.clone(),
            timing_out,
        ));
    let url = serve(app).await;
    let response = client(quick())
        .post(format!("{url}/pay"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert!(response.attempts() >= 2, "{}", response.attempts());
    assert!(response.replayed(), "the retry got the stored response");
    assert_eq!(response.text().await.unwrap(), "payment 1");
    assert_eq!(shop.payments.load(Ordering::SeqCst), 1, "one payment");
}

/// Guards: a keyed `409` that is not "in flight" is the server's answer, handed back at
/// once: a stored business conflict replayed (`Idempotent-Replayed: true`), and a problem
/// document without a type (`about:blank`). A keyed `409` in another API's own body may
/// still be in flight (Stripe's), and is retried.
#[tokio::test]
async fn a_keyed_409_that_is_not_in_flight_is_the_servers_answer() {
    let answers: [(Canned, u32); 4] = [
        (
            (
                409,
                &[
                    ("content-type", "application/json"),
                    ("idempotent-replayed", "true"),
                ],
                r#"{"error":"order ord_1 already exists"}"#,
            ),
            1,
        ),
        ((409, &[PROBLEM], r#"{"title":"conflict","status":409}"#), 1),
        (
            (
                409,
                &[("content-type", "application/json")],
                r#"{"error":{"type":"idempotency_error"}}"#,
            ),
            2,
        ),
        (
            (
                409,
                &[("content-type", "application/json")],
                r#"{"type":"error","message":"a request with this key is in progress"}"#,
            ),
            2,
        ),
    ];
    for (answer, attempts) in answers {
        let script = Script::new(&[answer]);
        let url = script.serve().await;
        let response = client(quick())
            .post(format!("{url}/pay"))
            .body("{}")
            .send()
            .await
            .unwrap();
        let expected = if attempts == 1 {
            StatusCode::CONFLICT
        } else {
            StatusCode::CREATED
        };
        assert_eq!(response.status(), expected, "{answer:?}");
        assert_eq!(response.attempts(), attempts, "{answer:?}");
        if attempts == 1 {
            assert_eq!(response.text().await.unwrap(), answer.2);
        }
    }
}
