//! The HTTP handlers.

use std::path::Path as FsPath;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use idem_runtime::{ScopedKey, idempotent};
use serde_json::{Value, json};

use crate::AppState;
use crate::error::{ApiError, ApiJson};
use crate::model::{NewOrder, NewPayment, Order, Payment};

/// `POST /orders`: creates a pending order.
#[idempotent(ttl = "24h")]
pub(crate) async fn create_order(
    State(state): State<AppState>,
    key: Option<ScopedKey>,
    ApiJson(request): ApiJson<NewOrder>,
) -> Result<(StatusCode, Json<Order>), ApiError> {
    let total_cents = request.total_cents().map_err(ApiError::Invalid)?;
    let key = key.as_ref().map(ScopedKey::as_str);
    let order = state.db.create_order(&request, total_cents, key).await?;
    tracing::info!(order_id = %order.id, total_cents, "order created");
    Ok((StatusCode::CREATED, Json(order)))
}

/// `POST /payments`: captures the payment of an order.
#[idempotent(ttl = "24h")]
pub(crate) async fn create_payment(
    State(state): State<AppState>,
    key: Option<ScopedKey>,
    ApiJson(request): ApiJson<NewPayment>,
) -> Result<(StatusCode, Json<Payment>), ApiError> {
    if let Some(file) = &state.test_pause_file {
        pause_while_exists(file).await;
    }
    let key = key.as_ref().map(ScopedKey::as_str);
    let payment = state.db.pay(&request, key).await?;
    tracing::info!(payment_id = %payment.id, order_id = %payment.order_id, amount_cents = payment.amount_cents, "payment captured");
    Ok((StatusCode::CREATED, Json(payment)))
}

/// `GET /orders/{id}`.
pub(crate) async fn get_order(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Order>, ApiError> {
    if id.chars().any(char::is_control) {
        return Err(ApiError::OrderNotFound(id));
    }
    match state.db.order(&id).await? {
        Some(order) => Ok(Json(order)),
        None => Err(ApiError::OrderNotFound(id)),
    }
}

/// `GET /payments/{id}`.
pub(crate) async fn get_payment(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Payment>, ApiError> {
    if id.chars().any(char::is_control) {
        return Err(ApiError::PaymentNotFound(id));
    }
    match state.db.payment(&id).await? {
        Some(payment) => Ok(Json(payment)),
        None => Err(ApiError::PaymentNotFound(id)),
    }
}

/// `GET /healthz`: 200 while the database answers.
pub(crate) async fn healthz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    state.db.ping().await?;
    Ok(Json(json!({ "status": "ok" })))
}

/// Test hook (`PAYMENTS_TEST_PAUSE_FILE`): holds a payment before it touches the database
/// until `file` is deleted, at most a minute, so that a fault test can kill the process
/// while a payment is in flight. Polls every 20 ms.
async fn pause_while_exists(file: &FsPath) {
    const POLL: Duration = Duration::from_millis(20);
    const LIMIT: Duration = Duration::from_secs(60);
    let deadline = tokio::time::Instant::now() + LIMIT;
    tracing::warn!(file = %file.display(), "test hook: payment paused until the file is deleted");
    while file.try_exists().unwrap_or(false) {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(file = %file.display(), "test hook: pause gave up after a minute");
            return;
        }
        tokio::time::sleep(POLL).await;
    }
    tracing::info!("test hook: payment resumed");
}
