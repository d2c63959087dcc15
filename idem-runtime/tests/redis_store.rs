//! The Redis store's own checks: what `connect` refuses (an evicting server, a user that
//! may not run scripts, an untrusted TLS certificate), and a store that fails while a
//! request waits on another.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;
use common::{Backend, Counters, app, post_with, send, until};
use idem_runtime::store::{BoxFuture, RedisStore, Store, StoreError};
use idem_runtime::{Idempotency, Problem};
use testkit::{RedisServer, redis_connection};
use tokio::sync::Notify;

/// Guards: a Redis that may evict keys is refused when the store connects, unless the
/// application opts in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_that_evicts_is_refused() {
    let server =
        RedisServer::start_with(&["--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru"]);
    let error = RedisStore::connect(&server.url()).await.unwrap_err();
    let message = error.to_string();
    assert!(message.contains("allkeys-lru"), "{message}");
    assert!(message.contains("noeviction"), "{message}");
    RedisStore::builder(server.url())
        .allow_eviction(true)
        .connect()
        .await
        .expect("an explicit opt-in accepts it");

    let volatile =
        RedisServer::start_with(&["--maxmemory", "2mb", "--maxmemory-policy", "volatile-ttl"]);
    assert!(RedisStore::connect(&volatile.url()).await.is_err());
    let fine = RedisServer::start_with(&["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"]);
    RedisStore::connect(&fine.url())
        .await
        .expect("noeviction is accepted");
}

/// Guards: a request that has seen the key in flight answers 409 when the store then
/// fails, even with fail-open on: it never runs the handler beside the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_never_runs_a_key_seen_in_flight() {
    let mut server = RedisServer::start();
    let backend = Backend::redis_at(&server.url(), "fail-open-wait");
    let seen = Arc::new(Notify::new());
    let store: Arc<dyn Store> = Arc::new(ReportsInFlight {
        inner: backend.builder().await.build().store().clone(),
        seen: seen.clone(),
    });
    let idem = common::test_builder(Idempotency::builder().shared_store(store))
        .fail_open(true)
        .wait_for_in_flight(Duration::from_secs(10))
        .store_timeout(Duration::from_millis(300))
        .build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());

    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with("/gated", Some("seen"), "")).await }
    });
    until(|| counters.runs() == 1).await;
    let waiter = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with("/gated", Some("seen"), "")).await }
    });
    seen.notified().await;
    server.kill();
    let waiter = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter is answered, not run")
        .unwrap();
    waiter.assert_problem(StatusCode::CONFLICT, Problem::IN_FLIGHT);
    assert_eq!(counters.runs(), 1, "the waiter did not run the handler");
    counters.gate.notify_one();
    first.await.unwrap();
    assert_eq!(counters.runs(), 1);
}

/// Tells the test when a `begin` found a claim of another request.
struct ReportsInFlight {
    inner: Arc<dyn Store>,
    seen: Arc<Notify>,
}

impl Store for ReportsInFlight {
    fn begin<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        Box::pin(async move {
            let found = self.inner.begin(key, claim, lease).await?;
            if found.is_some() {
                self.seen.notify_one();
            }
            Ok(found)
        })
    }
    fn renew<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.inner.renew(key, claim, lease)
    }
    fn complete<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        record: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.inner.complete(key, claim, record, ttl)
    }
    fn release<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.inner.release(key, claim)
    }
}

/// Guards: a Redis user that may not run scripts is refused when the store connects,
/// with the missing permission named, instead of re-running every handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_user_without_scripts_is_refused() {
    let server = RedisServer::start();
    let mut admin = redis_connection(&server.url()).await;
    let _: () = redis::cmd("ACL")
        .arg(
            &[
                "SETUSER",
                "noscripts",
                "on",
                ">secret",
                "~*",
                "+@all",
                "-evalsha",
                "-eval",
            ][..],
        )
        .query_async(&mut admin)
        .await
        .unwrap();
    let url = format!("redis://noscripts:secret@127.0.0.1:{}", server.port());
    let error = RedisStore::connect(&url).await.unwrap_err();
    let message = error.to_string();
    assert!(message.to_lowercase().contains("evalsha"), "{message}");
    assert!(
        message.contains("NOPERM") || message.contains("permission"),
        "{message}"
    );
}

/// Guards: a `rediss://` URL with a password connects over TLS and runs the protocol;
/// without trusting the CA, or over plain `redis://`, connecting fails.
#[cfg(feature = "tls")]
#[tokio::test]
async fn tls_with_a_private_ca() {
    use idem_runtime::{IdempotencyKey, Scope, ScopedKey};

    let (server, ca) = RedisServer::start_tls();
    let url = format!("rediss://127.0.0.1:{}", server.port());
    let store = RedisStore::builder(url.as_str())
        .root_certificate(ca)
        .prefix(testkit::unique_prefix("tls"))
        .connect()
        .await
        .expect("TLS with the private CA trusted");
    let key = ScopedKey::new(
        Scope::anonymous(),
        IdempotencyKey::parse(b"tls").expect("key"),
    );
    let claim = bytes::Bytes::from_static(b"claim");
    let lease = Duration::from_secs(5);
    assert_eq!(
        store
            .begin(key.as_str(), &claim, lease)
            .await
            .expect("begin"),
        None
    );
    assert_eq!(
        store
            .begin(key.as_str(), &claim, lease)
            .await
            .expect("begin"),
        Some(claim.clone()),
        "the claim was stored over TLS"
    );
    assert!(store.release(key.as_str(), &claim).await.expect("release"));

    let untrusted = RedisStore::builder(url.as_str())
        .connection_timeout(Duration::from_secs(1))
        .connect()
        .await;
    assert!(
        untrusted.is_err(),
        "a certificate of an unknown CA is refused"
    );

    let plain = RedisStore::builder(format!("redis://127.0.0.1:{}", server.port()))
        .connection_timeout(Duration::from_secs(1))
        .response_timeout(Duration::from_secs(1))
        .connect()
        .await;
    assert!(plain.is_err(), "plain text to a TLS port fails");
}
