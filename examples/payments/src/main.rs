//! `cargo run -p payments`: serves the example payments app.
//!
//! Configured by the environment: `PAYMENTS_ADDR` (default `127.0.0.1:3000`),
//! `DATABASE_URL` (default `sqlite://payments.db?mode=rwc`; `postgres://...` for
//! PostgreSQL), `REDIS_URL` (default: idem's records in the database itself;
//! `PAYMENTS_IDEM_STORE=memory` keeps them in memory instead),
//! `PAYMENTS_SHUTDOWN_DEADLINE_MS` and `RUST_LOG`. SIGTERM or ctrl-c shuts it down
//! gracefully: payments in flight end (and are stored) first, within the deadline.

use std::process::ExitCode;

use payments::{Config, StartupError};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("payments=info,idem=info")),
        )
        .init();
    match serve().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "payments stopped");
            ExitCode::FAILURE
        }
    }
}

async fn serve() -> Result<(), StartupError> {
    let config = Config::from_env()?;
    let (app, idem) = payments::app_with_idempotency(&config).await?;
    let listener = tokio::net::TcpListener::bind(config.addr).await?;
    tracing::info!(
        url = %format!("http://{}", listener.local_addr()?),
        database = %payments::loggable_database_url(&config.database_url),
        idempotency_store = config.idempotency_store_name(),
        "payments listening"
    );
    payments::serve(listener, app, idem, &config, payments::shutdown_signal()).await
}
