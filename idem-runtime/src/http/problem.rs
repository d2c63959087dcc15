//! RFC 9457 problem details: every response idem itself produces.

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

use crate::key::KeyError;

/// The media type of problem responses.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// A problem response (RFC 9457): `type`, `title`, `status` and a `detail` telling the
/// client what to do, sent as `application/problem+json`.
///
/// Each kind of problem idem produces has a stable `type` URI (`urn:idem:problem:...`),
/// listed as the constants of this type, so clients can branch on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    status: StatusCode,
    kind: &'static str,
    title: &'static str,
    detail: String,
    retry_after: Option<u64>,
}

impl Problem {
    /// `type` of a request without a key on an endpoint that requires one (400).
    pub const KEY_MISSING: &'static str = "urn:idem:problem:key-missing";
    /// `type` of a malformed, too long or repeated key (400).
    pub const KEY_INVALID: &'static str = "urn:idem:problem:key-invalid";
    /// `type` of a request body over the limit (413).
    pub const BODY_TOO_LARGE: &'static str = "urn:idem:problem:body-too-large";
    /// `type` of a request body that could not be read (400).
    pub const BODY_UNREADABLE: &'static str = "urn:idem:problem:body-unreadable";
    /// `type` of a key reused with a different request (422).
    pub const KEY_REUSED: &'static str = "urn:idem:problem:key-reused";
    /// `type` of a key whose first request is still running (409, with `Retry-After`).
    pub const IN_FLIGHT: &'static str = "urn:idem:problem:in-flight";
    /// `type` of a key whose request ran and whose response was not stored: too large to
    /// store, or its body failed while it was read (`409` on a retry; `502` to the request
    /// whose body failed).
    pub const RESPONSE_NOT_STORED: &'static str = "urn:idem:problem:response-not-stored";
    /// `type` of a store that failed or could not be reached (503, with `Retry-After`).
    pub const STORE_UNAVAILABLE: &'static str = "urn:idem:problem:store-unavailable";
    /// `type` of a handler served without `idem.layer()` (500).
    pub const LAYER_MISSING: &'static str = "urn:idem:problem:layer-missing";
    /// A handler takes a database transaction from idem, but idem's store cannot give one.
    pub const NO_TRANSACTION: &'static str = "urn:idem:problem:no-transaction";
    /// `type` of a keyed request that carries nothing identifying its client (400).
    pub const SCOPE_MISSING: &'static str = "urn:idem:problem:scope-missing";
    /// `type` of a handler that took `ScopedKey` before the extractor that authenticates
    /// the request, so that its key and idem's record name different scopes (500).
    pub const SCOPE_CONFLICT: &'static str = "urn:idem:problem:scope-conflict";
    /// `type` of a guard run while another guard of the same request runs its work,
    /// outside that work: beside it, or in a task it spawned (500).
    pub const GUARD_CONFLICT: &'static str = "urn:idem:problem:guard-conflict";
    /// `type` of a keyed request refused because too much work detached from clients that
    /// hung up is still running (503, with `Retry-After`).
    pub const OVERLOADED: &'static str = "urn:idem:problem:overloaded";

    pub(crate) fn scope_missing() -> Self {
        Self::new_internal(
            StatusCode::BAD_REQUEST,
            Self::SCOPE_MISSING,
            "Idempotency-Key without an identity",
            "This request carries an Idempotency-Key but nothing identifies the client it belongs to, so its response could be replayed to another client; nothing was executed. Send the request with your credentials (an Authorization header). For the service: scope keys by the authenticated user (insert idem_runtime::Principal into the request extensions in your auth middleware), set a scope rule with IdempotencyBuilder::scope, or, for a single-tenant service, opt in to one shared scope with IdempotencyBuilder::shared_scope(true).".into(),
        )
    }

    pub(crate) fn scope_conflict() -> Self {
        Self::new_internal(
            StatusCode::INTERNAL_SERVER_ERROR,
            Self::SCOPE_CONFLICT,
            "Idempotency scope conflict",
            "This handler read its idempotency key before authenticating the request, so the key it sees and the key idem records belong to different scopes; nothing was executed. For the service: take `ScopedKey` after the extractor that puts the `Principal` in.".into(),
        )
    }

    pub(crate) fn guard_conflict() -> Self {
        Self::new_internal(
            StatusCode::INTERNAL_SERVER_ERROR,
            Self::GUARD_CONFLICT,
            "Idempotency guard conflict",
            "This request's handler ran a second idempotency guard while another one's work was running outside it, or after that work was given up before it ended (dropped, or a panic caught); nothing was executed by the second. For the service: run one guard per request, or run the second inside the first one's work (awaited there, not in a task it spawns).".into(),
        )
    }

    pub(crate) fn overloaded(retry_after: u64) -> Self {
        let mut problem = Self::new_internal(
            StatusCode::SERVICE_UNAVAILABLE,
            Self::OVERLOADED,
            "Too much work in flight",
            format!(
                "The service is finishing too many requests whose clients hung up, so this request was not executed. Retry with the same key after {retry_after} second(s)."
            ),
        );
        problem.retry_after = Some(retry_after);
        problem
    }

    pub(crate) fn key_missing() -> Self {
        Self::new_internal(
            StatusCode::BAD_REQUEST,
            Self::KEY_MISSING,
            "Idempotency-Key required",
            "This endpoint requires an Idempotency-Key header. Send a unique value (such as a UUID) and reuse it when you retry the same request.".into(),
        )
    }

    pub(crate) fn key_invalid(error: &KeyError) -> Self {
        Self::new_internal(
            StatusCode::BAD_REQUEST,
            Self::KEY_INVALID,
            "Invalid Idempotency-Key",
            format!("{error}."),
        )
    }

    pub(crate) fn body_too_large(limit: usize) -> Self {
        Self::new_internal(
            StatusCode::PAYLOAD_TOO_LARGE,
            Self::BODY_TOO_LARGE,
            "Request body too large",
            format!(
                "The request body is larger than the {limit} bytes accepted for idempotent requests. Nothing was executed."
            ),
        )
    }

    pub(crate) fn body_unreadable() -> Self {
        Self::new_internal(
            StatusCode::BAD_REQUEST,
            Self::BODY_UNREADABLE,
            "Request body unreadable",
            "The request body could not be read to the end. Nothing was executed; send the request again.".into(),
        )
    }

    pub(crate) fn key_reused() -> Self {
        Self::new_internal(
            StatusCode::UNPROCESSABLE_ENTITY,
            Self::KEY_REUSED,
            "Idempotency-Key reused",
            "This Idempotency-Key was already used with a different request (method, path or body). Use a new key for a new request; nothing was executed.".into(),
        )
    }

    pub(crate) fn in_flight(retry_after: u64) -> Self {
        let mut problem = Self::new_internal(
            StatusCode::CONFLICT,
            Self::IN_FLIGHT,
            "Request in progress",
            format!(
                "A request with this Idempotency-Key is still being processed. Retry with the same key after {retry_after} second(s) to receive its response."
            ),
        );
        problem.retry_after = Some(retry_after);
        problem
    }

    pub(crate) fn response_not_stored(status: StatusCode, body_len: u64) -> Self {
        Self::new_internal(
            StatusCode::CONFLICT,
            Self::RESPONSE_NOT_STORED,
            "Response not stored",
            format!(
                "A request with this Idempotency-Key was already executed and answered {}, but its response could not be stored for replay (a body of {body_len} bytes or more, more header names than a replay can carry, trailer fields, or a transfer coding other than chunked). It will not be executed again; look up its result instead of retrying.",
                status.as_u16()
            ),
        )
    }

    pub(crate) fn response_lost(status: StatusCode) -> Self {
        Self::new_internal(
            StatusCode::BAD_GATEWAY,
            Self::RESPONSE_NOT_STORED,
            "Response lost",
            format!(
                "The request was executed (status {}), but its response body failed while it was being read, so it could not be sent or stored. It will not be executed again; look up its result instead of retrying.",
                status.as_u16()
            ),
        )
    }

    pub(crate) fn superseded(retry_after: u64) -> Self {
        let mut problem = Self::new_internal(
            StatusCode::CONFLICT,
            Self::IN_FLIGHT,
            "Request taken over",
            format!(
                "This execution held its Idempotency-Key past its lease and another execution took the key over; this one's database writes were rolled back. Retry with the same key after {retry_after} second(s) to receive the response."
            ),
        );
        problem.retry_after = Some(retry_after);
        problem
    }

    /// A keyed request whose transaction's commit was not confirmed: its key is held until
    /// its lease (`lease_secs`) runs out, when a retry gets the stored response or runs.
    pub(crate) fn commit_failed(lease_secs: u64) -> Self {
        let mut problem = Self::new_internal(
            StatusCode::SERVICE_UNAVAILABLE,
            Self::STORE_UNAVAILABLE,
            "Outcome unknown",
            format!(
                "The database did not confirm the commit of this request's writes, so whether they happened is unknown. Retry with the same key after {lease_secs} second(s), once the key's lease has run out: the retry gets the stored response or runs the request again."
            ),
        );
        problem.retry_after = Some(lease_secs);
        problem
    }

    /// A keyed request whose transaction was rolled back (the fencing write or the commit
    /// refused by the database): nothing was kept, and the key is released.
    pub(crate) fn rolled_back(retry_after: u64) -> Self {
        let mut problem = Self::new_internal(
            StatusCode::SERVICE_UNAVAILABLE,
            Self::STORE_UNAVAILABLE,
            "Writes rolled back",
            format!(
                "The database refused to commit this request's writes with its idempotency record (a serialization failure, a deadlock or a constraint checked at commit), so they were rolled back and nothing was kept. Retry with the same key after {retry_after} second(s): the retry runs the request again."
            ),
        );
        problem.retry_after = Some(retry_after);
        problem
    }

    /// A request without a key whose transaction's commit was not confirmed. No
    /// `Retry-After`: nothing guards a retry, which could apply the writes twice.
    pub(crate) fn unkeyed_commit_failed() -> Self {
        Self::new_internal(
            StatusCode::SERVICE_UNAVAILABLE,
            Self::STORE_UNAVAILABLE,
            "Outcome unknown",
            "The database did not confirm the commit of this request's writes, so whether they happened is unknown. The request carried no Idempotency-Key: check whether its effect happened before sending it again, or send it with a key.".into(),
        )
    }

    pub(crate) fn store_unavailable(retry_after: u64) -> Self {
        let mut problem = Self::new_internal(
            StatusCode::SERVICE_UNAVAILABLE,
            Self::STORE_UNAVAILABLE,
            "Idempotency store unavailable",
            format!(
                "The idempotency store could not be reached, so the request was not executed. Retry with the same key after {retry_after} second(s)."
            ),
        );
        problem.retry_after = Some(retry_after);
        problem
    }

    pub(crate) fn layer_missing() -> Self {
        Self::new_internal(
            StatusCode::INTERNAL_SERVER_ERROR,
            Self::LAYER_MISSING,
            "Idempotency layer missing",
            "This handler is #[idempotent] but the router has no idempotency layer: add `.layer(idem.layer())` to the Router that serves it.".into(),
        )
    }

    #[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]
    pub(crate) fn no_transaction(detail: &str) -> Self {
        Self::new_internal(
            StatusCode::INTERNAL_SERVER_ERROR,
            Self::NO_TRANSACTION,
            "No database transaction",
            detail.into(),
        )
    }

    /// A problem of the application's own, so that its errors read like idem's:
    /// `kind` is the `type` URI, `title` a short summary, `detail` what to do.
    ///
    /// ```
    /// use axum::http::StatusCode;
    /// use idem_runtime::Problem;
    ///
    /// let problem = Problem::new(
    ///     StatusCode::NOT_FOUND,
    ///     "urn:payments:problem:order-not-found",
    ///     "Order not found",
    ///     "No order has this id; create the order first.",
    /// );
    /// assert_eq!(problem.status(), StatusCode::NOT_FOUND);
    /// ```
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            status,
            kind,
            title,
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// Adds a `Retry-After` header of `seconds` to the response.
    #[must_use]
    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    fn new_internal(
        status: StatusCode,
        kind: &'static str,
        title: &'static str,
        detail: String,
    ) -> Self {
        Self {
            status,
            kind,
            title,
            detail,
            retry_after: None,
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The `type` URI, one of the constants of [`Problem`].
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// The human-readable explanation.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    fn to_json(&self) -> String {
        #[derive(serde::Serialize)]
        struct Body<'a> {
            #[serde(rename = "type")]
            kind: &'a str,
            title: &'a str,
            status: u16,
            detail: &'a str,
        }
        serde_json::to_string(&Body {
            kind: self.kind,
            title: self.title,
            status: self.status.as_u16(),
            detail: &self.detail,
        })
        .unwrap_or_default()
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut response = Response::new(Body::from(self.to_json()));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_body_has_the_rfc_9457_members() {
        let problem = Problem::in_flight(2);
        let response = problem.clone().into_response();
        assert_eq!(response.status(), StatusCode::CONFLICT);
        assert_eq!(response.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        let json: serde_json::Value = serde_json::from_str(&problem.to_json()).unwrap();
        assert_eq!(json["type"], Problem::IN_FLIGHT);
        assert_eq!(json["status"], 409);
        assert_eq!(json["title"], "Request in progress");
        assert!(json["detail"].as_str().unwrap().contains("Retry"));
    }

    #[test]
    fn an_unconfirmed_commit_says_when_to_retry_only_under_a_key() {
        let keyed = Problem::commit_failed(30).into_response();
        assert_eq!(keyed.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(keyed.headers()[header::RETRY_AFTER], "30");
        let unkeyed = Problem::unkeyed_commit_failed().into_response();
        assert_eq!(unkeyed.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(unkeyed.headers().get(header::RETRY_AFTER).is_none());
    }
}
