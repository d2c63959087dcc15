//! `rediss://` through the URL: TLS to Redis, with the server's private CA trusted.

use std::time::Duration;

use idem_runtime::store::{RedisStore, Store};
use idem_runtime::{IdempotencyKey, Scope, ScopedKey};
use testkit::RedisServer;

/// Guards: a `rediss://` URL with a password connects over TLS and runs the protocol;
/// without trusting the CA, or over plain `redis://`, connecting fails.
#[tokio::test]
async fn tls_with_a_private_ca() {
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
