//! A fresh checkout runs the app with the README's one command: the real `payments`
//! binary, started with no configuration but a port in an empty directory, creates its
//! SQLite database there and serves `pay-client`, which pays exactly once.

#![allow(clippy::unwrap_used)]

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::{AnyPool, Row};
use support::TempDir;

/// The app's process, killed when dropped.
struct App(Child);

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_binary_starts_with_no_set_up_and_the_client_pays_once() {
    let dir = TempDir::new("bin");
    let addr = format!("127.0.0.1:{}", testkit::free_port());
    let mut app = App(Command::new(env!("CARGO_BIN_EXE_payments"))
        .current_dir(&dir.0)
        .env("PAYMENTS_ADDR", &addr)
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .stdout(Stdio::null())
        .spawn()
        .unwrap());
    let url = format!("http://{addr}");
    let http = support::http();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = app.0.try_wait().unwrap() {
            panic!("payments exited early: {status}");
        }
        let health = http.get(format!("{url}/healthz")).send().await;
        if health.is_ok_and(|response| response.status().is_success()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "payments did not answer /healthz within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let client = Command::new(env!("CARGO_BIN_EXE_pay-client"))
        .env("PAYMENTS_URL", &url)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&client.stdout);
    assert!(
        client.status.success(),
        "pay-client failed: {stdout}{}",
        String::from_utf8_lossy(&client.stderr)
    );
    assert!(stdout.contains("exactly one payment exists"), "{stdout}");

    let database = dir.0.join("payments.db");
    assert!(
        database.exists(),
        "the default database is payments.db in the working directory"
    );
    sqlx::any::install_default_drivers();
    let pool = AnyPool::connect(&format!("sqlite://{}", database.display()))
        .await
        .unwrap();
    let payments: i64 = sqlx::query("SELECT COUNT(*) AS n FROM payments")
        .fetch_one(&pool)
        .await
        .unwrap()
        .get("n");
    assert_eq!(payments, 1);
    pool.close().await;
}
