//! What `log_keys(false)` logs instead of the key. A test binary of its own, so
//! that its global log subscriber sees every event.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use common::{Backend, Counters, app, post_with, send};
use idem_runtime::{IdempotencyKey, Scope, ScopedKey};

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

/// Guards: with `log_keys(false)` the logs do not hold what clients sent ("a key may
/// carry an order number or an e-mail address", `IdempotencyBuilder::log_keys`): whoever
/// reads the logs cannot tell which key a request carried.
///
/// Before the fix: the logged `sha256:` digest was the unkeyed SHA-256 of the scoped key, and the
/// scope is itself an unkeyed hash of a public or guessable value (the shared scope,
/// `Scope::of(tenant)`, a `Principal` id). Anyone with the logs and the library recovers a
/// low-entropy key (an order number, an e-mail address) by hashing candidates: here the
/// key `order-4711` comes back out of the log after at most 10 000 guesses, in
/// milliseconds. (Only keys scoped by an `Authorization` header the reader does not know
/// resist.) A keyed digest (HMAC under a secret of the deployment, or of the process)
/// would not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logged_digest_does_not_give_the_key_back() {
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

    let idem = Backend::memory().builder().await.log_keys(false).build();
    let router = app(&idem, Arc::new(Counters::default()));
    let sent = send(&router, post_with("/pay", Some("order-4711"), "{}")).await;
    assert_eq!(sent.status, StatusCode::CREATED);

    let logged = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(!logged.contains("order-4711"), "the raw key is not logged");
    let digest = logged
        .split("key=key-digest:")
        .nth(1)
        .map(|rest| {
            rest.chars()
                .take_while(char::is_ascii_hexdigit)
                .collect::<String>()
        })
        .expect("the log shows a digest");

    // Whoever reads the log guesses order numbers.
    let recovered = (0..10_000).map(|n| format!("order-{n}")).find(|guess| {
        let key = IdempotencyKey::parse(guess.as_bytes()).unwrap();
        ScopedKey::new(Scope::anonymous(), key).digest(b"") == digest
    });
    assert_eq!(
        recovered, None,
        "the key was recovered from the logged digest key-digest:{digest}"
    );
}
