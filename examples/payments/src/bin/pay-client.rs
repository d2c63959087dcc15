//! `cargo run -p payments --bin pay-client`: pays an order over a network that loses the
//! first response, retrying with the same `Idempotency-Key`, and shows that exactly one
//! payment exists. Talks to `PAYMENTS_URL` (default `http://127.0.0.1:3000`) with the API
//! key `PAYMENTS_API_KEY` (default the demo key `sk_test_demo`).

use std::process::ExitCode;

use payments::client::{PayClient, demo};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("payments=info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let url = std::env::var("PAYMENTS_URL")
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| "http://127.0.0.1:3000".to_owned());
    let api_key = std::env::var("PAYMENTS_API_KEY")
        .ok()
        .filter(|key| !key.is_empty());
    let report = match PayClient::new(&url) {
        Ok(client) => {
            let client = match api_key {
                Some(key) => client.with_api_key(key),
                None => client,
            };
            demo(&client).await
        }
        Err(error) => Err(error),
    };
    match report {
        Ok(report) => {
            println!("{report}");
            if report.one_payment() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("pay-client: {error} (is the app running? `cargo run -p payments`)");
            ExitCode::FAILURE
        }
    }
}
