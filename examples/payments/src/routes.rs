//! The HTTP handlers.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use idem_runtime::{Idempotency, ScopedKey, idempotent};
use serde_json::{Value, json};

use crate::AppState;
use crate::error::{ApiError, ApiJson};
use crate::model::{NewOrder, NewPayment, Order, Payment};
use crate::tx::Tx;

/// `POST /orders`: creates a pending order.
#[idempotent(ttl = "24h")]
pub(crate) async fn create_order(
    State(state): State<AppState>,
    key: Option<ScopedKey>,
    tx: Tx,
    ApiJson(request): ApiJson<NewOrder>,
) -> Result<(StatusCode, Json<Order>), ApiError> {
    let total_cents = request.total_cents().map_err(ApiError::Invalid)?;
    let key = key.as_ref().map(ScopedKey::as_str);
    let order = state
        .db
        .create_order(&tx, &request, total_cents, key)
        .await?;
    tracing::info!(order_id = %order.id, total_cents, "order created");
    Ok((StatusCode::CREATED, Json(order)))
}

/// `POST /payments`: captures the payment of an order.
#[idempotent(ttl = "24h")]
pub(crate) async fn create_payment(
    State(state): State<AppState>,
    key: Option<ScopedKey>,
    tx: Tx,
    ApiJson(request): ApiJson<NewPayment>,
) -> Result<(StatusCode, Json<Payment>), ApiError> {
    let key = key.as_ref().map(ScopedKey::as_str);
    let payment = state.db.pay(&tx, &request, key).await?;
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

/// `GET /healthz`: 200 while the database and the idempotency store answer, 503 while
/// either does not (a payment could not be taken then).
pub(crate) async fn healthz(
    State(state): State<AppState>,
    Extension(idem): Extension<Idempotency>,
) -> Result<Json<Value>, ApiError> {
    state.db.ping().await?;
    idem.ready().await.map_err(ApiError::StoreUnavailable)?;
    Ok(Json(json!({ "status": "ok" })))
}
