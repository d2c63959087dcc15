//! `log_keys(false)` keeps raw keys out of idem's logs and spans. A test binary of its own,
//! so that its global log subscriber sees every event.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;
use common::{Backend, Counters, app, as_client, send};
use idem_runtime::{OnceKey, ScopedKey, idempotent};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn take(&self) -> String {
        String::from_utf8(std::mem::take(&mut *self.0.lock().unwrap())).unwrap()
    }
}

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const KEY: &str = "order-4711-jane@example.com";
const SECRET: &str = "s3cr3t-t0ken-value";

/// A handler whose arguments its own span records (`Debug`), as
/// `#[tracing::instrument]` does.
#[tracing::instrument]
#[idempotent]
async fn noted(key: ScopedKey, body: String) -> StatusCode {
    tracing::info!("noting the payment");
    StatusCode::CREATED
}

/// Runs an execution, a replay, one by a handler that logs its arguments and a `once` call with the known key under `log_keys`, and
/// returns what was logged at TRACE.
async fn logged(logs: &Captured, log_keys: bool) -> String {
    logs.take();
    let idem = Backend::memory().builder().await.log_keys(log_keys).build();
    let app = app(&idem, Arc::new(Counters::default()));
    assert_eq!(
        send(&app, as_client(SECRET, KEY, "{}")).await.status,
        StatusCode::CREATED
    );
    assert!(send(&app, as_client(SECRET, KEY, "{}")).await.is_replay());
    let instrumented = Router::new().route("/pay", post(noted)).layer(idem.layer());
    let answer = send(&instrumented, as_client(SECRET, "noted-4711", "{}")).await;
    assert_eq!(answer.status, StatusCode::CREATED);
    let ran = idem
        .once(OnceKey::compose(["once", KEY]), &1)
        .run(|| async { Ok::<_, std::convert::Infallible>(2) })
        .await
        .unwrap();
    assert_eq!(ran, 2);
    logs.take()
}

/// Guards: with `log_keys(false)` neither the key nor `Authorization` is logged, only the
/// digest; by default the span carries the key as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_keys_false_logs_digests_only() {
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer({
            let logs = logs.clone();
            move || logs.clone()
        })
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let shown = logged(&logs, true).await;
    assert!(shown.contains("replayed"), "the log capture works: {shown}");
    assert!(
        shown.contains("noted-4711"),
        "by default a handler's own span shows the key: {shown}"
    );
    assert!(
        shown.contains(KEY),
        "by default the span shows the key: {shown}"
    );
    assert!(!shown.contains(SECRET), "logs hold the credential: {shown}");

    let hidden = logged(&logs, false).await;
    assert!(
        hidden.contains("replayed"),
        "the log capture works: {hidden}"
    );
    assert!(!hidden.contains(KEY), "logs hold the key: {hidden}");
    assert!(
        !hidden.contains("4711"),
        "logs hold part of the key: {hidden}"
    );
    assert!(
        !hidden.contains(SECRET),
        "logs hold the credential: {hidden}"
    );
    assert!(
        hidden.contains("key=key-digest:"),
        "the span carries a digest instead: {hidden}"
    );
    assert!(
        hidden.contains("noting the payment") && hidden.contains("ScopedKey(key-digest:"),
        "a handler's own span shows the digest: {hidden}"
    );
}
