//! API-key authentication: `Authorization: Bearer <key>` resolves to an account, which
//! scopes idempotency keys ([`idem_runtime::Principal`]).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use idem_runtime::Principal;
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// The keys the app accepts when `PAYMENTS_API_KEYS` is unset: two demo accounts, so the
/// README's curl lines work with no set-up. Set `PAYMENTS_API_KEYS` anywhere real.
pub const DEMO_API_KEYS: &[(&str, &str)] = &[
    ("sk_test_demo", "acct_demo"),
    ("sk_test_other", "acct_other"),
];

/// API keys and the account each belongs to. Keys are held as SHA-256 digests, so a
/// lookup takes the same time however much of a guessed key is right.
#[derive(Clone)]
pub struct ApiKeys(Arc<HashMap<[u8; 32], String>>);

impl ApiKeys {
    /// The [`DEMO_API_KEYS`].
    pub fn demo() -> Self {
        Self::from_pairs(DEMO_API_KEYS.iter().map(|&(key, account)| (key, account)))
    }

    /// `key=account` pairs separated by commas; `None` if any pair is malformed or empty.
    pub fn parse(list: &str) -> Option<Self> {
        let pairs: Option<Vec<(&str, &str)>> = list
            .split(',')
            .map(|pair| {
                let (key, account) = pair.trim().split_once('=')?;
                (!key.is_empty() && !account.is_empty()).then_some((key, account))
            })
            .collect();
        Some(Self::from_pairs(pairs?))
    }

    /// These `(key, account)` pairs.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self(Arc::new(
            pairs
                .into_iter()
                .map(|(key, account)| (digest(key), account.to_owned()))
                .collect(),
        ))
    }

    fn account(&self, key: &str) -> Option<&str> {
        self.0.get(&digest(key)).map(String::as_str)
    }
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.0.len())
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// `router` with every request but `GET /healthz` authenticated; the account becomes the
/// request's [`Principal`], so one account's keys never meet another's.
pub(crate) fn protect(router: Router, keys: ApiKeys) -> Router {
    router.layer(middleware::from_fn_with_state(keys, authenticate))
}

async fn authenticate(State(keys): State<ApiKeys>, mut request: Request, next: Next) -> Response {
    if request.uri().path() == "/healthz" {
        return next.run(request).await;
    }
    let account = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .and_then(|key| keys.account(key.trim()))
        .map(str::to_owned);
    let Some(account) = account else {
        return ApiError::Unauthenticated.into_response();
    };
    request.extensions_mut().insert(Principal::new(&account));
    next.run(request).await
}
