//! Fixtures shared by the payments tests: temporary directories and the router served on
//! a loopback socket.

#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;

/// An empty directory of the test's own, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!(
            "payments-{name}-{}-{nanos}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The router on a loopback socket; stops when dropped.
pub struct Server {
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub async fn start(router: Router) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let url = format!("http://{}", listener.local_addr().expect("local address"));
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.expect("serve");
        });
        Self { url, task }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The API key the app accepts out of the box (`PAYMENTS_API_KEYS` unset).
pub const DEMO_API_KEY: &str = "sk_test_demo";

/// An HTTP client that authenticates with [`DEMO_API_KEY`] on every request.
pub fn http() -> reqwest::Client {
    http_as(DEMO_API_KEY)
}

/// An HTTP client that authenticates with `api_key` on every request.
pub fn http_as(api_key: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .default_headers(auth_headers(api_key))
        .build()
        .expect("an HTTP client")
}

/// `Authorization: Bearer <api_key>`, as default headers of a client.
pub fn auth_headers(api_key: &str) -> reqwest::header::HeaderMap {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {api_key}").parse().expect("a header value"),
    );
    headers
}
