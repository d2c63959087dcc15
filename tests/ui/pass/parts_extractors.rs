//! Extractors that read the head of the request, before a body extractor.

use std::collections::HashMap;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, Query};
use axum::http::HeaderMap;
use axum::{Json, Router, routing::post};
use idem_runtime::{Idempotency, idempotent};
use serde::Deserialize;

#[derive(Clone)]
struct Tenant(&'static str);

#[derive(Deserialize)]
struct Page {
    dry_run: Option<bool>,
}

#[idempotent(ttl = "10m")]
async fn update(
    Path((account, item)): Path<(u32, String)>,
    Query(page): Query<Page>,
    headers: HeaderMap,
    Extension(tenant): Extension<Tenant>,
    Json(fields): Json<HashMap<String, String>>,
) -> String {
    format!(
        "{} {account}/{item} dry_run={:?} agent={:?} fields={}",
        tenant.0,
        page.dry_run,
        headers.get("user-agent"),
        fields.len()
    )
}

#[idempotent]
async fn optional(
    account: Option<Path<u32>>,
    tenant: Option<Extension<Tenant>>,
    body: Result<Json<Vec<u32>>, JsonRejection>,
) -> String {
    format!("{} {} {}", account.is_some(), tenant.is_some(), body.is_ok())
}

fn main() {
    let idem = Idempotency::in_memory();
    let _app: Router = Router::new()
        .route("/accounts/{account}/items/{item}", post(update))
        .route("/optional/{account}", post(optional))
        .layer(Extension(Tenant("acme")))
        .layer(idem.layer());
}
