//! A client that pays safely: one `Idempotency-Key` per payment, reused on every retry,
//! with exponential backoff and jitter. `pay-client` runs [`demo`].
//!
//! ```no_run
//! # async fn run() -> Result<(), payments::client::ClientError> {
//! use payments::client::{PayClient, demo};
//!
//! let client = PayClient::new("http://127.0.0.1:3000")?;
//! let report = demo(&client).await?;
//! assert!(report.one_payment());
//! println!("{report}");
//! # Ok(()) }
//! ```

use std::fmt;
use std::time::Duration;

use idem_client::{ClientError as RetryError, IdempotentRetry, ResponseExt, client_error};
use idem_runtime::http::IDEMPOTENCY_KEY;
use reqwest::{StatusCode, Url};
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::AsyncWriteExt;

use crate::model::{Item, NewOrder, NewPayment, ORDER_PAID, Order, Payment};

/// How long one attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong on the client side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The base URL is not an `http://` URL.
    #[error("{0:?} is not an http:// URL")]
    Url(String),
    /// The server refused the request, and retrying would not help.
    #[error("{method} {path} answered {status}: {body}")]
    Refused {
        /// The method.
        method: &'static str,
        /// The path.
        path: String,
        /// The status.
        status: StatusCode,
        /// The body, usually a problem document.
        body: String,
    },
    /// Every attempt failed; the last failure is given.
    #[error("{path}: gave up after {attempts} attempts; last: {last}")]
    GaveUp {
        /// The path.
        path: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// The connection failed.
    #[error("{0}")]
    Http(#[from] reqwest::Error),
    /// The connection failed (while sending the request whose response is lost).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The client's middleware failed.
    #[error("{0}")]
    Middleware(reqwest_middleware::Error),
}

impl ClientError {
    /// What idem-client's error means for a call of `method path`.
    fn from_middleware(method: &'static str, path: &str, error: reqwest_middleware::Error) -> Self {
        match client_error(&error) {
            Some(RetryError::Rejected(rejected)) => Self::Refused {
                method,
                path: path.to_owned(),
                status: rejected.status,
                body: rejected.to_string(),
            },
            Some(RetryError::GaveUp { attempts, last, .. }) => Self::GaveUp {
                path: path.to_owned(),
                attempts: *attempts,
                last: last.clone(),
            },
            _ => Self::Middleware(error),
        }
    }
}

/// A successful answer.
#[derive(Debug, Clone)]
pub struct Answer<T> {
    /// The body.
    pub value: T,
    /// Whether the server replayed a stored response (`Idempotent-Replayed: true`).
    pub replayed: bool,
    /// How many attempts it took.
    pub attempts: u32,
}

/// A client of the payments app.
#[derive(Debug, Clone)]
pub struct PayClient {
    base: Url,
    http: ClientWithMiddleware,
    api_key: String,
}

impl PayClient {
    /// A client of the app at `base_url` (such as `http://127.0.0.1:3000`), retrying with
    /// idem-client's defaults.
    pub fn new(base_url: &str) -> Result<Self, ClientError> {
        let base = Url::parse(base_url)
            .ok()
            .filter(|url| url.scheme() == "http" && url.host_str().is_some())
            .ok_or_else(|| ClientError::Url(base_url.to_owned()))?;
        Ok(Self {
            base,
            http: retrying(IdempotentRetry::default())?,
            api_key: crate::DEMO_API_KEYS[0].0.to_owned(),
        })
    }

    /// Authenticates with `api_key` (default the first of [`crate::DEMO_API_KEYS`]).
    #[must_use]
    pub fn with_api_key(mut self, api_key: impl Into<String>) -> Self {
        self.api_key = api_key.into();
        self
    }

    /// Retries as `retry` says.
    pub fn with_retry(mut self, retry: IdempotentRetry) -> Result<Self, ClientError> {
        self.http = retrying(retry)?;
        Ok(self)
    }

    /// `POST /orders` under `key`, retried.
    pub async fn create_order(
        &self,
        order: &NewOrder,
        key: &str,
    ) -> Result<Answer<Order>, ClientError> {
        self.post("/orders", order, key).await
    }

    /// `POST /payments` under `key`, retried.
    pub async fn pay(
        &self,
        payment: &NewPayment,
        key: &str,
    ) -> Result<Answer<Payment>, ClientError> {
        self.post("/payments", payment, key).await
    }

    /// `GET /orders/{id}`.
    pub async fn order(&self, id: &str) -> Result<Order, ClientError> {
        self.get(&format!("/orders/{id}")).await
    }

    /// `GET /payments/{id}`.
    pub async fn payment(&self, id: &str) -> Result<Payment, ClientError> {
        self.get(&format!("/payments/{id}")).await
    }

    /// Sends `POST path` under `key` and loses the response, as a flaky network would:
    /// the request is written in full, and once the answer starts to arrive the
    /// connection is closed without reading a byte of it.
    pub async fn post_and_lose_response(
        &self,
        path: &str,
        body: &impl Serialize,
        key: &str,
    ) -> Result<(), ClientError> {
        let url = self.url(path);
        let body = serde_json::to_vec(body).map_err(std::io::Error::other)?;
        let host = url.host_str().unwrap_or("127.0.0.1");
        let port = url.port_or_known_default().unwrap_or(80);
        let ip_or_name = host.trim_start_matches('[').trim_end_matches(']');
        let mut stream = tokio::net::TcpStream::connect((ip_or_name, port)).await?;
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\n{IDEMPOTENCY_KEY}: \"{key}\"\r\nContent-Length: {}\r\n\r\n",
            url.path(),
            self.api_key,
            body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        stream.flush().await?;
        // Bounded: if no answer comes, the retry sorts it out all the same.
        let _ = tokio::time::timeout(ATTEMPT_TIMEOUT, stream.readable()).await;
        tracing::info!(%key, "first response lost on purpose");
        Ok(())
    }

    fn url(&self, path: &str) -> Url {
        let mut url = self.base.clone();
        let joined = format!("{}{path}", self.base.path().trim_end_matches('/'));
        url.set_path(&joined);
        url
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let response = self
            .http
            .get(self.url(path))
            .bearer_auth(&self.api_key)
            .send()
            .await
            .map_err(|error| ClientError::from_middleware("GET", path, error))?;
        if !response.status().is_success() {
            return Err(ClientError::Refused {
                method: "GET",
                path: path.to_owned(),
                status: response.status(),
                body: response.text().await.unwrap_or_default(),
            });
        }
        Ok(response.json().await?)
    }

    /// Posts `body` under `key`: idem-client retries it with the same key until it gets
    /// an answer worth keeping.
    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
        key: &str,
    ) -> Result<Answer<T>, ClientError> {
        let body = serde_json::to_vec(body).map_err(std::io::Error::other)?;
        let response = self
            .http
            .post(self.url(path))
            .bearer_auth(&self.api_key)
            .header(&IDEMPOTENCY_KEY, format!("\"{key}\""))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|error| ClientError::from_middleware("POST", path, error))?;
        if !response.status().is_success() {
            return Err(ClientError::Refused {
                method: "POST",
                path: path.to_owned(),
                status: response.status(),
                body: response.text().await.unwrap_or_default(),
            });
        }
        let (replayed, attempts) = (response.replayed(), response.attempts());
        Ok(Answer {
            value: response.json().await?,
            replayed,
            attempts,
        })
    }
}

/// A reqwest client that retries as `retry` says, each attempt bounded in time.
fn retrying(retry: IdempotentRetry) -> Result<ClientWithMiddleware, ClientError> {
    let http = reqwest::Client::builder()
        .timeout(ATTEMPT_TIMEOUT)
        .build()?;
    Ok(ClientBuilder::new(http).with(retry).build())
}

/// A fresh idempotency key: a random UUID.
pub fn new_key() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// What [`demo`] saw.
#[derive(Debug, Clone)]
pub struct Demo {
    /// The order as created.
    pub order: Order,
    /// The key of the payment.
    pub key: String,
    /// The answer to the retry after the lost response.
    pub retried: Answer<Payment>,
    /// The answer to one more retry with the same key.
    pub again: Answer<Payment>,
    /// `GET /payments/{id}` afterwards.
    pub fetched: Payment,
    /// `GET /orders/{id}` afterwards.
    pub order_after: Order,
}

impl Demo {
    /// Whether every answer names the same payment and the order is paid: the order was
    /// charged exactly once.
    pub fn one_payment(&self) -> bool {
        self.retried.value == self.again.value
            && self.fetched == self.retried.value
            && self.order_after.status == ORDER_PAID
    }
}

impl fmt::Display for Demo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        writeln!(
            f,
            "order    {} for {} cents",
            self.order.id, self.order.total_cents
        )?;
        writeln!(f, "key      {}", self.key)?;
        writeln!(f, "attempt  1: response lost on purpose")?;
        writeln!(
            f,
            "retry    payment {} after {} attempt(s), replayed: {}",
            self.retried.value.id,
            self.retried.attempts,
            yes_no(self.retried.replayed)
        )?;
        writeln!(
            f,
            "again    payment {}, replayed: {}",
            self.again.value.id,
            yes_no(self.again.replayed)
        )?;
        writeln!(
            f,
            "lookup   payment {} {}, order {}",
            self.fetched.id, self.fetched.status, self.order_after.status
        )?;
        if self.one_payment() {
            write!(
                f,
                "exactly one payment exists for order {}: {}",
                self.order.id, self.fetched.id
            )
        } else {
            write!(f, "MORE THAN ONE PAYMENT or an unpaid order: see above")
        }
    }
}

/// Creates an order, pays it with a fresh key while losing the first response, retries
/// with the same key (backoff and jitter) and once more, and reads both back.
pub async fn demo(client: &PayClient) -> Result<Demo, ClientError> {
    let new_order = NewOrder {
        customer_id: "cus_demo".into(),
        currency: crate::DEFAULT_CURRENCY.into(),
        items: vec![
            Item {
                sku: "BOOK-RUST".into(),
                quantity: 2,
                unit_price_cents: 1250,
            },
            Item {
                sku: "MUG-FERRIS".into(),
                quantity: 1,
                unit_price_cents: 900,
            },
        ],
    };
    let order = client.create_order(&new_order, &new_key()).await?.value;
    let key = new_key();
    let payment = NewPayment {
        order_id: order.id.clone(),
        amount_cents: order.total_cents,
        currency: "EUR".into(),
    };
    client
        .post_and_lose_response("/payments", &payment, &key)
        .await?;
    let retried = client.pay(&payment, &key).await?;
    let again = client.pay(&payment, &key).await?;
    let fetched = client.payment(&retried.value.id).await?;
    let order_after = client.order(&order.id).await?;
    Ok(Demo {
        order,
        key,
        retried,
        again,
        fetched,
        order_after,
    })
}
