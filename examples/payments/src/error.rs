//! What can go wrong, as RFC 9457 problem responses, and the JSON extractor that reports
//! a bad body the same way.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use idem_runtime::http::PROBLEM_JSON;
use serde::Serialize;

/// An error a handler answers with, as `application/problem+json`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The body is not the JSON the endpoint expects (400, 415 or 422).
    #[error("{detail}")]
    BadBody {
        /// The status axum chose for the rejection.
        status: StatusCode,
        /// What is wrong.
        detail: String,
    },
    /// The request is well-formed but its values are not acceptable (422).
    #[error("{0}")]
    Invalid(String),
    /// No order with this id (404).
    #[error("no order with id {0:?}")]
    OrderNotFound(String),
    /// No payment with this id (404).
    #[error("no payment with id {0:?}")]
    PaymentNotFound(String),
    /// The payment amount is not the order's total (422).
    #[error("amount {amount_cents} does not match the order total {total_cents}")]
    AmountMismatch {
        /// What the order costs.
        total_cents: i64,
        /// What the request offered.
        amount_cents: i64,
    },
    /// The payment's currency is not the order's (422).
    #[error("currency {payment} does not match the order's {order}")]
    CurrencyMismatch {
        /// The order's currency.
        order: String,
        /// What the request offered.
        payment: String,
    },
    /// The API key is missing or unknown (401).
    #[error("unauthenticated")]
    Unauthenticated,
    /// The order was already paid under another idempotency key (409).
    #[error("order {0:?} is already paid")]
    AlreadyPaid(String),
    /// The database holds a different request under this idempotency key (422).
    #[error("the idempotency key was already used for a different request")]
    KeyReused,
    /// The database failed (503 when it cannot be reached, 500 otherwise).
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl ApiError {
    fn problem(&self) -> Problem {
        match self {
            Self::BadBody { status, detail } => Problem {
                kind: "urn:payments:problem:bad-body",
                title: "Request body not accepted",
                status: *status,
                detail: detail.clone(),
            },
            Self::Invalid(detail) => Problem {
                kind: "urn:payments:problem:invalid-request",
                title: "Invalid request",
                status: StatusCode::UNPROCESSABLE_ENTITY,
                detail: detail.clone(),
            },
            Self::OrderNotFound(id) => Problem {
                kind: "urn:payments:problem:order-not-found",
                title: "Order not found",
                status: StatusCode::NOT_FOUND,
                detail: format!("There is no order with id {id:?}. Create it with POST /orders first."),
            },
            Self::PaymentNotFound(id) => Problem {
                kind: "urn:payments:problem:payment-not-found",
                title: "Payment not found",
                status: StatusCode::NOT_FOUND,
                detail: format!("There is no payment with id {id:?}."),
            },
            Self::AmountMismatch {
                total_cents,
                amount_cents,
            } => Problem {
                kind: "urn:payments:problem:amount-mismatch",
                title: "Amount does not match the order",
                status: StatusCode::UNPROCESSABLE_ENTITY,
                detail: format!(
                    "The order totals {total_cents} cents but the payment offers {amount_cents}. Pay exactly the order total; nothing was charged."
                ),
            },
            Self::CurrencyMismatch { order, payment } => Problem {
                kind: "urn:payments:problem:currency-mismatch",
                title: "Currency does not match the order",
                status: StatusCode::UNPROCESSABLE_ENTITY,
                detail: format!(
                    "The order is priced in {order} but the payment is in {payment}. Pay in the order's currency; nothing was charged."
                ),
            },
            Self::Unauthenticated => Problem {
                kind: "urn:payments:problem:unauthenticated",
                title: "API key required",
                status: StatusCode::UNAUTHORIZED,
                detail: "Send your API key as `Authorization: Bearer <key>`. Out of the box the app accepts `sk_test_demo`.".into(),
            },
            Self::AlreadyPaid(id) => Problem {
                kind: "urn:payments:problem:order-already-paid",
                title: "Order already paid",
                status: StatusCode::CONFLICT,
                detail: format!(
                    "Order {id:?} was already paid by a request with another Idempotency-Key. Nothing was charged; look the order up instead of paying again."
                ),
            },
            Self::KeyReused => Problem {
                kind: "urn:payments:problem:key-reused",
                title: "Idempotency-Key reused",
                status: StatusCode::UNPROCESSABLE_ENTITY,
                detail: "This Idempotency-Key already created a different record. Use a new key for a new request; nothing was changed.".into(),
            },
            Self::Database(error) if is_unavailable(error) => Problem {
                kind: "urn:payments:problem:database-unavailable",
                title: "Database unavailable",
                status: StatusCode::SERVICE_UNAVAILABLE,
                detail: "The database could not be reached; nothing was changed. Retry with the same Idempotency-Key.".into(),
            },
            Self::Database(_) => Problem {
                kind: "urn:payments:problem:internal",
                title: "Internal error",
                status: StatusCode::INTERNAL_SERVER_ERROR,
                detail: "The request failed inside the server. Retry with the same Idempotency-Key.".into(),
            },
        }
    }
}

fn is_unavailable(error: &sqlx::Error) -> bool {
    matches!(
        error,
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed
    )
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = self.problem();
        if problem.status.is_server_error() {
            tracing::error!(error = %self, status = problem.status.as_u16(), "request failed");
        }
        problem.into_response()
    }
}

/// An RFC 9457 problem body.
#[derive(Serialize)]
struct Problem {
    #[serde(rename = "type")]
    kind: &'static str,
    title: &'static str,
    #[serde(serialize_with = "status_code")]
    status: StatusCode,
    detail: String,
}

fn status_code<S: serde::Serializer>(
    status: &StatusCode,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_u16(status.as_u16())
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// `axum::Json`, but a body it cannot read is answered with a problem response.
#[derive(Debug)]
pub(crate) struct ApiJson<T>(pub(crate) T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    axum::Json<T>: FromRequest<S, Rejection = JsonRejection>,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(request, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::BadBody {
                status: rejection.status(),
                detail: rejection.body_text(),
            }),
        }
    }
}
