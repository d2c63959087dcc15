//! The example app's connection timeouts: a client that sends half a request and stalls
//! has its connection closed (headers) or its request refused (body) within the timeout.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use payments::Config;
use support::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TIMEOUT: Duration = Duration::from_millis(300);

/// Serves the app as the binary does (through [`payments::serve`]) with short timeouts;
/// returns its address, and the sender that stops it.
async fn serve(dir: &TempDir) -> (String, tokio::sync::oneshot::Sender<()>) {
    let config = Config {
        database_url: format!("sqlite://{}?mode=rwc", dir.0.join("p.db").display()),
        header_read_timeout: TIMEOUT,
        body_timeout: TIMEOUT,
        ..Config::default()
    };
    let (router, idem) = payments::app_with_idempotency(&config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let stopped = async move {
            let _ = stopped.await;
        };
        payments::serve(listener, router, idem, &config, stopped)
            .await
            .unwrap();
    });
    (addr, stop)
}

/// Reads until the server closes the connection; what it sent, and when it closed.
async fn read_to_close(stream: &mut TcpStream, started: Instant) -> (String, Duration) {
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the connection is still open after 10 s");
    (
        String::from_utf8_lossy(&answer).into_owned(),
        started.elapsed(),
    )
}

/// Guards: half a request head, then silence: the connection is closed within the header
/// read timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stalling_in_the_headers_is_disconnected() {
    let dir = TempDir::new("header-timeout");
    let (addr, _stop) = serve(&dir).await;
    let mut stream = TcpStream::connect(&addr).await.unwrap();
    let started = Instant::now();
    stream
        .write_all(b"POST /orders HTTP/1.1\r\nHost: payments\r\nAuthor")
        .await
        .unwrap();
    let (_, closed_after) = read_to_close(&mut stream, started).await;
    assert!(
        closed_after >= TIMEOUT - Duration::from_millis(50) && closed_after < TIMEOUT * 5,
        "closed after {closed_after:?}"
    );
}

/// Guards: a keyed payment whose body stalls is refused within the body timeout, and
/// nothing runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stalling_in_the_body_is_refused() {
    let dir = TempDir::new("body-timeout");
    let (addr, _stop) = serve(&dir).await;
    let mut stream = TcpStream::connect(&addr).await.unwrap();
    let started = Instant::now();
    stream
        .write_all(
            format!(
                "POST /orders HTTP/1.1\r\nHost: payments\r\nAuthorization: Bearer {}\r\n\
                 Idempotency-Key: stall-1\r\nContent-Type: application/json\r\n\
                 Content-Length: 100\r\n\r\n{{\"customer_id\":",
                support::DEMO_API_KEY
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let (answer, answered_after) = read_to_close(&mut stream, started).await;
    assert!(
        answer.starts_with("HTTP/1.1 400"),
        "the stalled body is refused: {answer}"
    );
    assert!(
        answer.contains("urn:idem:problem:body-unreadable"),
        "{answer}"
    );
    assert!(
        answered_after < TIMEOUT * 5,
        "answered after {answered_after:?}"
    );
}
