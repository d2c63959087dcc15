//! The caller gets the server's real answer, byte for byte. Each case sends the
//! same POST through a plain reqwest client and through the middleware, to a raw HTTP/1.1
//! server that writes scripted bytes, and compares what each caller sees: status,
//! headers, `content_length()`, body bytes, trailers, and whether reading failed.

#![allow(clippy::unwrap_used)]

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use idem_client::{IdempotentRetry, ResponseExt};
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const LIMIT: usize = 4096;

/// One scripted answer: the raw bytes, and whether the server closes right after them
/// (a connection dropped mid-body) or waits for the client to close.
#[derive(Clone)]
struct Answer {
    bytes: Vec<u8>,
    close: bool,
}

struct Raw {
    url: String,
    /// Every request head the server read, in order.
    heads: Arc<Mutex<Vec<String>>>,
}

impl Raw {
    fn keys(&self) -> Vec<Option<String>> {
        self.heads
            .lock()
            .unwrap()
            .iter()
            .map(|head| {
                head.lines().find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("idempotency-key")
                        .then(|| value.trim().to_owned())
                })
            })
            .collect()
    }
}

/// A raw server: request `n` (over all connections) gets `answers[n]`, the last one
/// once they run out. The request head and body are read whole before answering, so
/// that a close never resets the connection under unread request bytes.
async fn raw(answers: Vec<Answer>) -> Raw {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    let count = Arc::new(AtomicUsize::new(0));
    let answers = Arc::new(answers);
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let seen = seen.clone();
            let count = count.clone();
            let answers = answers.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    // One request: head, then content-length bytes of body.
                    let head_end = loop {
                        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break at + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match socket.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                    let length: usize = head
                        .lines()
                        .find_map(|line| {
                            let (name, value) = line.split_once(':')?;
                            name.eq_ignore_ascii_case("content-length")
                                .then(|| value.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    while buf.len() < head_end + length {
                        let mut chunk = [0u8; 4096];
                        match socket.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..head_end + length);
                    seen.lock().unwrap().push(head);
                    let n = count.fetch_add(1, Ordering::SeqCst);
                    let answer = &answers[n.min(answers.len() - 1)];
                    if socket.write_all(&answer.bytes).await.is_err() {
                        return;
                    }
                    let _ = socket.flush().await;
                    if answer.close {
                        let _ = socket.shutdown().await;
                        return;
                    }
                }
            });
        }
    });
    Raw {
        url: format!("http://{addr}/pay"),
        heads,
    }
}

fn plain() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

fn middleware(retry: IdempotentRetry) -> ClientWithMiddleware {
    ClientBuilder::new(plain())
        .with(
            retry
                .backoff(
                    std::time::Duration::from_millis(1),
                    std::time::Duration::from_millis(5),
                )
                .deadline(std::time::Duration::from_secs(20)),
        )
        .build()
}

/// What a caller sees of a response.
#[derive(Debug, PartialEq)]
struct Seen {
    status: u16,
    version: http::Version,
    headers: Vec<(String, Vec<u8>)>,
    content_length: Option<u64>,
    body_len: usize,
    body: Vec<u8>,
    trailers: Option<Vec<(String, Vec<u8>)>>,
    body_failed: bool,
}

fn pairs(headers: &http::HeaderMap) -> Vec<(String, Vec<u8>)> {
    headers
        .iter()
        .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
        .collect()
}

async fn look(response: reqwest::Response) -> Seen {
    let content_length = response.content_length();
    let response: http::Response<reqwest::Body> = response.into();
    let (parts, mut body) = response.into_parts();
    let mut bytes = Vec::new();
    let mut trailers = None;
    let mut body_failed = false;
    loop {
        let frame = futures_util::future::poll_fn(|cx| {
            http_body::Body::poll_frame(Pin::new(&mut body), cx)
        })
        .await;
        match frame {
            None => break,
            Some(Err(_)) => {
                body_failed = true;
                break;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => bytes.extend_from_slice(&data),
                Err(frame) => {
                    if let Ok(map) = frame.into_trailers() {
                        trailers = Some(pairs(&map));
                    }
                }
            },
        }
    }
    Seen {
        status: parts.status.as_u16(),
        version: parts.version,
        headers: pairs(&parts.headers),
        content_length,
        body_len: bytes.len(),
        body: bytes,
        trailers,
        body_failed,
    }
}

fn body_of(len: usize) -> Vec<u8> {
    (0..len).map(|i| b'a' + (i % 26) as u8).collect()
}

fn with_length(status: &str, extra: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/octet-stream\r\n{extra}content-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

fn chunked(status: &str, body: &[u8], chunk: usize, trailers: &str) -> Vec<u8> {
    let announce = if trailers.is_empty() {
        String::new()
    } else {
        "trailer: x-checksum\r\n".to_owned()
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/octet-stream\r\n{announce}transfer-encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for piece in body.chunks(chunk.max(1)) {
        out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n");
    out.extend_from_slice(trailers.as_bytes());
    out.extend_from_slice(b"\r\n");
    out
}

/// Sends one POST plainly and one through the middleware to a server answering `bytes`
/// every time; both callers must see the same thing.
async fn compare(bytes: Vec<u8>) -> Seen {
    let server = raw(vec![Answer {
        bytes,
        close: false,
    }])
    .await;
    let direct = plain().post(&server.url).body("{}").send().await.unwrap();
    let direct = look(direct).await;
    let through = middleware(IdempotentRetry::default().max_read_bytes(LIMIT))
        .post(&server.url)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(through.attempts(), 1);
    let through = look(through).await;
    assert!(
        !direct.body_failed,
        "the plain client failed to read: {direct:?}"
    );
    let short = |seen: &Seen| {
        format!(
            "status {} content_length {:?} body {} bytes, trailers {:?}, failed {}, headers {:?}",
            seen.status,
            seen.content_length,
            seen.body_len,
            seen.trailers,
            seen.body_failed,
            seen.headers
                .iter()
                .map(|(n, v)| format!("{n}: {}", String::from_utf8_lossy(v)))
                .collect::<Vec<_>>()
        )
    };
    assert!(
        direct == through,
        "the middleware changed the answer\n  plain reqwest: {}\n  idem-client:   {}",
        short(&direct),
        short(&through)
    );
    direct
}

// --- Content-Length bodies --------------------------------------------------------------

#[tokio::test]
async fn content_length_small_body() {
    compare(with_length("200 OK", "", &body_of(10))).await;
}

#[tokio::test]
async fn content_length_body_exactly_at_the_limit() {
    compare(with_length("201 Created", "", &body_of(LIMIT))).await;
}

#[tokio::test]
async fn content_length_body_one_byte_over_the_limit() {
    compare(with_length("201 Created", "", &body_of(LIMIT + 1))).await;
}

#[tokio::test]
async fn content_length_body_far_over_the_limit() {
    compare(with_length("200 OK", "", &body_of(3 << 20))).await;
}

#[tokio::test]
async fn content_length_empty_body() {
    compare(with_length("201 Created", "", b"")).await;
}

#[tokio::test]
async fn a_204_without_body() {
    compare(b"HTTP/1.1 204 No Content\r\nx-a: 1\r\n\r\n".to_vec()).await;
}

#[tokio::test]
async fn replayed_500_with_content_length_is_exact() {
    compare(with_length(
        "500 Internal Server Error",
        "idempotent-replayed: true\r\n",
        &body_of(100),
    ))
    .await;
}

#[tokio::test]
async fn replayed_409_over_the_limit_is_exact() {
    compare(with_length(
        "409 Conflict",
        "idempotent-replayed: true\r\n",
        &body_of(LIMIT * 3),
    ))
    .await;
}

// --- chunked bodies ---------------------------------------------------------------------

#[tokio::test]
async fn chunked_small_body() {
    compare(chunked("200 OK", &body_of(10), 3, "")).await;
}

#[tokio::test]
async fn chunked_body_exactly_at_the_limit() {
    compare(chunked("200 OK", &body_of(LIMIT), 1000, "")).await;
}

#[tokio::test]
async fn chunked_body_over_the_limit() {
    compare(chunked("200 OK", &body_of(LIMIT * 5 + 7), 1000, "")).await;
}

#[tokio::test]
async fn chunked_empty_body() {
    compare(chunked("200 OK", b"", 1, "")).await;
}

// --- HTTP/1.1 trailers ------------------------------------------------------------------

/// Only the trailers are compared here (`chunked_small_body` covers `content_length()`).
#[tokio::test]
async fn trailers_of_a_small_chunked_body() {
    let server = raw(vec![Answer {
        bytes: chunked("200 OK", &body_of(100), 40, "x-checksum: abc123\r\n"),
        close: false,
    }])
    .await;
    let direct = look(plain().post(&server.url).body("{}").send().await.unwrap()).await;
    assert_eq!(
        direct.trailers,
        Some(vec![("x-checksum".to_owned(), b"abc123".to_vec())]),
        "baseline: reqwest delivers trailers"
    );
    let through = middleware(IdempotentRetry::default().max_read_bytes(LIMIT))
        .post(&server.url)
        .body("{}")
        .send()
        .await
        .unwrap();
    let through = look(through).await;
    assert_eq!(through.body, direct.body);
    assert_eq!(
        through.trailers, direct.trailers,
        "the trailers of a keyed response read whole were dropped"
    );
}

#[tokio::test]
async fn trailers_of_a_chunked_body_over_the_limit() {
    let seen = compare(chunked(
        "200 OK",
        &body_of(LIMIT * 3),
        1000,
        "x-checksum: abc123\r\n",
    ))
    .await;
    assert!(
        seen.trailers.is_some(),
        "baseline: reqwest delivers trailers"
    );
}

// --- a connection dropped mid-body ------------------------------------------------------

fn cut(total: usize, sent: usize) -> Answer {
    let full = with_length("201 Created", "", &body_of(total));
    let head = full.len() - total;
    Answer {
        bytes: full[..head + sent].to_vec(),
        close: true,
    }
}

fn whole(total: usize) -> Answer {
    Answer {
        bytes: with_length("201 Created", "", &body_of(total)),
        close: false,
    }
}

async fn call(server: &Raw, retry: IdempotentRetry) -> Seen {
    let response = middleware(retry)
        .post(&server.url)
        .body("{}")
        .send()
        .await
        .unwrap();
    look(response).await
}

fn one_key(server: &Raw, attempts: usize) {
    let keys = server.keys();
    assert_eq!(keys.len(), attempts, "requests the server saw: {keys:?}");
    assert!(keys[0].is_some(), "the POST carried no key");
    assert!(keys.iter().all(|key| key == &keys[0]), "keys: {keys:?}");
}

#[tokio::test]
async fn dropped_before_the_limit_is_retried_with_the_same_key() {
    let server = raw(vec![cut(LIMIT * 2, LIMIT / 2), whole(LIMIT * 2)]).await;
    let seen = call(&server, IdempotentRetry::default().max_read_bytes(LIMIT)).await;
    assert!(!seen.body_failed);
    assert_eq!(seen.body, body_of(LIMIT * 2));
    one_key(&server, 2);
}

#[tokio::test]
async fn dropped_exactly_at_the_limit_is_retried_with_the_same_key() {
    let server = raw(vec![cut(LIMIT * 2, LIMIT), whole(LIMIT * 2)]).await;
    let seen = call(&server, IdempotentRetry::default().max_read_bytes(LIMIT)).await;
    assert!(!seen.body_failed);
    assert_eq!(seen.body, body_of(LIMIT * 2));
    one_key(&server, 2);
}

#[tokio::test]
async fn dropped_one_byte_past_the_limit_is_the_callers_error() {
    let server = raw(vec![cut(LIMIT * 2, LIMIT + 1), whole(LIMIT * 2)]).await;
    let seen = call(&server, IdempotentRetry::default().max_read_bytes(LIMIT)).await;
    assert!(
        seen.body_failed,
        "the caller saw no error: {} bytes",
        seen.body_len
    );
    assert_eq!(seen.body, body_of(LIMIT * 2)[..LIMIT + 1]);
    one_key(&server, 1);
}

#[tokio::test]
async fn dropped_far_past_the_limit_is_the_callers_error() {
    let server = raw(vec![cut(LIMIT * 20, LIMIT * 10), whole(LIMIT * 20)]).await;
    let seen = call(&server, IdempotentRetry::default().max_read_bytes(LIMIT)).await;
    assert!(seen.body_failed);
    assert_eq!(seen.body, body_of(LIMIT * 20)[..LIMIT * 10]);
    one_key(&server, 1);
}

#[tokio::test]
async fn max_read_bytes_zero_means_one_kib() {
    let server = raw(vec![cut(4000, 1025), whole(4000)]).await;
    let seen = call(&server, IdempotentRetry::default().max_read_bytes(0)).await;
    assert!(seen.body_failed);
    one_key(&server, 1);
    let server = raw(vec![cut(4000, 1024), whole(4000)]).await;
    let seen = call(&server, IdempotentRetry::default().max_read_bytes(0)).await;
    assert!(!seen.body_failed);
    assert_eq!(seen.body, body_of(4000));
    one_key(&server, 2);
}

#[tokio::test]
async fn max_read_bytes_usize_max_reads_whole_without_panic() {
    let server = raw(vec![cut(3 << 20, 2 << 20), whole(3 << 20)]).await;
    let seen = call(
        &server,
        IdempotentRetry::default().max_read_bytes(usize::MAX),
    )
    .await;
    assert!(!seen.body_failed);
    assert_eq!(seen.body, body_of(3 << 20));
    one_key(&server, 2);
}

// --- 409 ------------------------------------------------------------------------------

#[tokio::test]
async fn in_flight_409_is_retried_and_the_replayed_409_handed_back_exactly() {
    let in_flight = br#"{"type":"urn:idem:problem:in-flight","title":"in flight"}"#;
    let stored = body_of(300);
    let server = raw(vec![
        Answer {
            bytes: with_length("409 Conflict", "", in_flight)
                .into_iter()
                .collect::<Vec<u8>>()
                .replacen_content_type("application/problem+json"),
            close: false,
        },
        Answer {
            bytes: with_length("409 Conflict", "idempotent-replayed: true\r\n", &stored),
            close: false,
        },
    ])
    .await;
    let response = middleware(IdempotentRetry::default().max_read_bytes(LIMIT))
        .post(&server.url)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.attempts(), 2);
    let seen = look(response).await;
    assert_eq!(seen.status, 409);
    assert_eq!(seen.body, stored);
    assert_eq!(seen.content_length, Some(300));
    one_key(&server, 2);
}

trait ContentType {
    fn replacen_content_type(self, to: &str) -> Vec<u8>;
}

impl ContentType for Vec<u8> {
    fn replacen_content_type(self, to: &str) -> Vec<u8> {
        String::from_utf8(self)
            .unwrap()
            .replacen("application/octet-stream", to, 1)
            .into_bytes()
    }
}
