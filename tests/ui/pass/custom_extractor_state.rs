//! A user's own extractor that needs the router state, with the state named by the
//! `state` option or by a `State<AppState>` argument.

use axum::extract::{FromRef, FromRequestParts, State};
use axum::http::{StatusCode, request::Parts};
use axum::{Router, routing::post};
use idem_runtime::{Idempotency, idempotent};

#[derive(Clone)]
struct AppState {
    api_keys: Vec<String>,
    greeting: Greeting,
}

#[derive(Clone)]
struct Greeting(String);

impl FromRef<AppState> for Greeting {
    fn from_ref(state: &AppState) -> Self {
        state.greeting.clone()
    }
}

struct Caller(String);

impl FromRequestParts<AppState> for Caller {
    type Rejection = StatusCode;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, StatusCode> {
        let key = parts.headers.get("x-api-key").and_then(|v| v.to_str().ok());
        match key {
            Some(key) if state.api_keys.iter().any(|known| known == key) => Ok(Self(key.into())),
            _ => Err(StatusCode::UNAUTHORIZED),
        }
    }
}

#[idempotent(state = AppState)]
async fn named(caller: Caller, body: String) -> String {
    format!("{}: {body}", caller.0)
}

#[idempotent]
async fn inferred(State(state): State<AppState>, caller: Caller) -> String {
    format!("{} {}", state.greeting.0, caller.0)
}

// A substate argument does not name the router's state; the option does.
#[idempotent(state = AppState)]
async fn substate(State(greeting): State<Greeting>, caller: Caller) -> String {
    format!("{} {}", greeting.0, caller.0)
}

fn main() {
    let idem = Idempotency::in_memory();
    let state = AppState {
        api_keys: vec!["k1".into()],
        greeting: Greeting("hello".into()),
    };
    let _app: Router = Router::new()
        .route("/named", post(named))
        .route("/inferred", post(inferred))
        .route("/substate", post(substate))
        .with_state(state)
        .layer(idem.layer());
}
