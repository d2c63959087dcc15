//! Secrets never leave the request: not into Redis, not into the logs. A test binary of
//! its own, so that its global log subscriber sees every event.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use common::{Backend, Counters, app, as_client, send};
use testkit::{keys_under, redis_connection};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Guards: the `Authorization` value never appears in Redis keys, stored records or logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_never_leaves_the_request() {
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer({
            let logs = logs.clone();
            move || logs.clone()
        })
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let backend = Backend::redis("secrets");
    let idem = backend.builder().await.build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let secret = "s3cr3t-t0ken-value";
    assert_eq!(
        send(&app, as_client(secret, "k", "{}")).await.status,
        StatusCode::CREATED
    );
    assert!(send(&app, as_client(secret, "k", "{}")).await.is_replay());
    assert_eq!(
        send(&app, as_client(secret, "k", "{\"other\":1}"))
            .await
            .status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(
        send(&app, as_client(secret, "\"\"", "{}")).await.status,
        StatusCode::BAD_REQUEST
    );

    let Backend::Redis { url, prefix } = &backend else {
        unreachable!()
    };
    let mut connection = redis_connection(url).await;
    let keys = keys_under(&mut connection, prefix).await;
    assert_eq!(keys.len(), 1);
    for key in keys {
        assert!(!key.contains(secret), "key {key}");
        let value: Vec<u8> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut connection)
            .await
            .unwrap();
        assert!(
            !String::from_utf8_lossy(&value).contains(secret),
            "stored record holds the secret"
        );
    }
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("replayed"), "the log capture works: {logs}");
    assert!(!logs.contains(secret), "logs hold the secret: {logs}");
}
