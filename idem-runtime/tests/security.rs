//! Scopes hold against hostile keys, secrets never leave the request, and Redis
//! authentication works through the URL.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use axum::http::StatusCode;
use common::{Answer, Backend, Counters, app, as_client, send};
use idem_runtime::store::RedisStore;
use idem_runtime::{IdempotencyKey, Scope, ScopedKey};
use testkit::RedisServer;

fn hostile_keys(alice_key: &str) -> Vec<String> {
    let (parts, ()) = axum::http::Request::builder()
        .header("authorization", "Bearer alice")
        .body(())
        .unwrap()
        .into_parts();
    let alice_scope = idem_runtime::Idempotency::in_memory()
        .scope_of(&parts)
        .expect("alice has a scope")
        .to_hex();
    vec![
        alice_key.to_owned(),
        format!("{alice_scope}:{alice_key}"),
        format!("\"{alice_scope}:{alice_key} \""),
        format!(":{alice_key}"),
        "*".to_owned(),
        "?".to_owned(),
        "{slot}".to_owned(),
        "\"a key with spaces\"".to_owned(),
        "~".repeat(255),
    ]
}

/// Guards: keys with `:`, `{`, `}`, `*`, `?`, spaces, 255 characters, or spelling out
/// another scope's stored key never reach that scope's record; each is a fresh key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_keys_never_cross_scopes() {
    for backend in [Backend::memory(), Backend::redis("hostile-keys")] {
        let idem = backend.builder().await.build();
        let counters = Arc::new(Counters::default());
        let app = app(&idem, counters.clone());
        let keys = hostile_keys("order-1");
        let mut alice = Vec::new();
        for key in &keys {
            let answer = send(&app, as_client("alice", key, "{\"who\":\"alice\"}")).await;
            assert_eq!(answer.status, StatusCode::CREATED, "alice, key {key:?}");
            alice.push(answer);
        }
        let runs = counters.runs();
        for (key, alice_answer) in keys.iter().zip(&alice) {
            let bob = send(&app, as_client("bob", key, "{\"who\":\"bob\"}")).await;
            assert_eq!(
                bob.status,
                StatusCode::CREATED,
                "bob, key {key:?}: no 422, no replay"
            );
            assert!(!bob.is_replay());
            assert_ne!(bob.body, alice_answer.body);
        }
        assert_eq!(counters.runs(), runs + keys.len(), "every bob request ran");
        // Each of alice's keys still replays to alice alone.
        for (key, alice_answer) in keys.iter().zip(&alice) {
            let again = send(&app, as_client("alice", key, "{\"who\":\"alice\"}")).await;
            assert!(again.is_replay());
            assert_eq!(again.body, alice_answer.body);
        }
    }
}

/// Guards: for another scope, a used key answers exactly like a never-used one (no oracle).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn used_key_in_another_scope_looks_fresh() {
    let backend = Backend::redis("no-oracle");
    let idem = backend.builder().await.build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    send(&app, as_client("alice", "used", "{}")).await;

    let shape = |answer: &Answer| {
        let mut names: Vec<_> = answer
            .headers
            .keys()
            .map(|n| n.as_str().to_owned())
            .collect();
        names.sort();
        (answer.status, names, answer.json()["request"].clone())
    };
    let used = send(&app, as_client("bob", "used", "{}")).await;
    let fresh = send(&app, as_client("bob", "never-used", "{}")).await;
    assert_eq!(shape(&used), shape(&fresh));
    assert!(!used.is_replay() && !fresh.is_replay());
}

/// Guards: a password in the URL authenticates; without it, connecting fails with an
/// error that says authentication is required.
#[tokio::test]
async fn redis_password_in_the_url() {
    let server = RedisServer::start_with(&["--requirepass", "hunter2"]);
    let url = format!("redis://:hunter2@127.0.0.1:{}", server.port());
    let store = RedisStore::connect(&url)
        .await
        .expect("the password authenticates");
    let key = ScopedKey::new(Scope::anonymous(), IdempotencyKey::parse(b"k").unwrap());
    let claim = bytes::Bytes::from_static(b"claim");
    let found = idem_runtime::store::Store::begin(
        &store,
        key.as_str(),
        &claim,
        std::time::Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert!(found.is_none());

    let error = RedisStore::connect(&server.url())
        .await
        .expect_err("no password: refused");
    let message = error.to_string();
    println!("without the password: {message}");
    assert!(message.contains("cannot connect to Redis"), "{message}");
    assert!(message.to_lowercase().contains("auth"), "{message}");

    let wrong = RedisStore::connect(&format!("redis://:wrong@127.0.0.1:{}", server.port()))
        .await
        .expect_err("a wrong password is refused");
    assert!(
        wrong.to_string().to_lowercase().contains("pass")
            || wrong.to_string().to_lowercase().contains("auth"),
        "{wrong}"
    );
}
