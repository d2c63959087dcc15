//! What can go wrong, as RFC 9457 problem responses, and the JSON extractor that refuses
//! a bad body the same way before the handler runs.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use idem_runtime::Problem;

use crate::model::Validate;

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
    /// The database already holds a row this idempotency key created, and the idempotency
    /// store has forgotten the key's response (409).
    #[error("the idempotency key already created an order")]
    KeyUsed,
    /// The database failed (503 when it cannot be reached, 500 otherwise).
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The idempotency store does not answer (503).
    #[error("{0}")]
    StoreUnavailable(idem_runtime::store::StoreError),
}

impl ApiError {
    fn problem(&self) -> Problem {
        match self {
            Self::BadBody { status, detail } => Problem::new(
                *status,
                "urn:payments:problem:bad-body",
                "Request body not accepted",
                detail.clone(),
            ),
            Self::Invalid(detail) => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "urn:payments:problem:invalid-request",
                "Invalid request",
                detail.clone(),
            ),
            Self::OrderNotFound(id) => Problem::new(
                StatusCode::NOT_FOUND,
                "urn:payments:problem:order-not-found",
                "Order not found",
                format!("There is no order with id {id:?}. Create it with POST /orders first."),
            ),
            Self::PaymentNotFound(id) => Problem::new(
                StatusCode::NOT_FOUND,
                "urn:payments:problem:payment-not-found",
                "Payment not found",
                format!("There is no payment with id {id:?}."),
            ),
            Self::AmountMismatch {
                total_cents,
                amount_cents,
            } => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "urn:payments:problem:amount-mismatch",
                "Amount does not match the order",
                format!(
                    "The order totals {total_cents} cents but the payment offers {amount_cents}. Pay exactly the order total; nothing was charged."
                ),
            ),
            Self::CurrencyMismatch { order, payment } => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "urn:payments:problem:currency-mismatch",
                "Currency does not match the order",
                format!(
                    "The order is priced in {order} but the payment is in {payment}. Pay in the order's currency; nothing was charged."
                ),
            ),
            Self::Unauthenticated => Problem::new(
                StatusCode::UNAUTHORIZED,
                "urn:payments:problem:unauthenticated",
                "API key required",
                "Send your API key as `Authorization: Bearer <key>`. Out of the box the app accepts `sk_test_demo`.",
            ),
            Self::AlreadyPaid(id) => Problem::new(
                StatusCode::CONFLICT,
                "urn:payments:problem:order-already-paid",
                "Order already paid",
                format!(
                    "Order {id:?} was already paid by a request with another Idempotency-Key. Nothing was charged; look the order up instead of paying again."
                ),
            ),
            Self::KeyUsed => Problem::new(
                StatusCode::CONFLICT,
                "urn:payments:problem:key-used",
                "Idempotency-Key already used",
                "This Idempotency-Key already created an order, and its response is no longer stored. Nothing was created; look your orders up instead of creating it again.",
            ),
            Self::Database(error) if is_unavailable(error) => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "urn:payments:problem:database-unavailable",
                "Database unavailable",
                "The database could not be reached; nothing was changed. Retry with the same Idempotency-Key.",
            )
            .with_retry_after(1),
            Self::StoreUnavailable(_) => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "urn:payments:problem:store-unavailable",
                "Idempotency store unavailable",
                "The idempotency store does not answer, so payments cannot be taken now. Retry later.",
            )
            .with_retry_after(1),
            Self::Database(_) => Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "urn:payments:problem:internal",
                "Internal error",
                "The request failed inside the server. Retry with the same Idempotency-Key.",
            ),
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
        if problem.status().is_server_error() {
            tracing::error!(error = %self, status = problem.status().as_u16(), "request failed");
        }
        problem.into_response()
    }
}

/// The JSON body of a request, deserialised and then [validated](Validate): a body that
/// does not parse, or whose values are refused, is answered with a problem response
/// before the handler runs. An `#[idempotent]` handler claims its key only once every
/// extractor succeeded, so a refused body leaves the key unused and the corrected request
/// may be sent again under it.
#[derive(Debug)]
pub(crate) struct ApiJson<T>(pub(crate) T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: Validate,
    axum::Json<T>: FromRequest<S, Rejection = JsonRejection>,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(request, state).await {
            Ok(axum::Json(value)) => {
                value.validate().map_err(ApiError::Invalid)?;
                Ok(Self(value))
            }
            Err(rejection) => Err(ApiError::BadBody {
                status: rejection.status(),
                detail: rejection.body_text(),
            }),
        }
    }
}
