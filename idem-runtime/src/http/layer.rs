//! The tower layer: hands the [`Idempotency`] handle to handlers, checks the key of
//! requests that carry one and buffers their body, for the fingerprint.

use std::convert::Infallible;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use tower_layer::Layer;
use tower_service::Service;

use super::body::{Collected, collect_bounded};
use super::state::{BufferedBody, RequestState};
use crate::config::Idempotency;
use crate::key::IdempotencyKey;
use crate::store::BoxFuture;

impl Idempotency {
    /// The tower layer that makes this handle available to `#[idempotent]` handlers.
    /// Add it to the `Router` that serves them: `.layer(idem.layer())`.
    pub fn layer(&self) -> IdempotencyLayer {
        IdempotencyLayer { idem: self.clone() }
    }
}

/// Makes an [`Idempotency`] handle available to the handlers it wraps; made by
/// [`Idempotency::layer`].
///
/// Requests without an `Idempotency-Key` header pass through untouched. For those with
/// one, the key is checked first (a malformed key is refused by the handler's guard
/// without the body being read); then the body is read up to the request limit (once;
/// handlers still read it as usual) so that the request can be fingerprinted.
#[derive(Debug, Clone)]
pub struct IdempotencyLayer {
    idem: Idempotency,
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyService {
            inner,
            idem: self.idem.clone(),
        }
    }
}

/// The service made by [`IdempotencyLayer`].
#[derive(Debug, Clone)]
pub struct IdempotencyService<S> {
    inner: S,
    idem: Idempotency,
}

impl<S> Service<Request> for IdempotencyService<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        request.extensions_mut().insert(self.idem.clone());
        let key = match IdempotencyKey::from_headers(request.headers()) {
            Ok(Some(key)) => key,
            Ok(None) => return Box::pin(self.inner.call(request)),
            Err(error) => {
                request
                    .extensions_mut()
                    .insert(RequestState::invalid(error));
                return Box::pin(self.inner.call(request));
            }
        };
        // The clone is not ready; the ready one is taken for this request (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let limit = self.idem.settings().max_request_bytes;
        Box::pin(async move {
            let (mut parts, body) = request.into_parts();
            let (buffered, body) = match collect_bounded(body, limit).await {
                Collected::Complete(bytes) => {
                    (BufferedBody::Complete(bytes.clone()), Body::from(bytes))
                }
                Collected::TooLarge { read, .. } => (BufferedBody::TooLarge, read.into_body()),
                Collected::Failed(read) => (BufferedBody::Failed, read.into_body()),
            };
            parts.extensions.insert(RequestState::keyed(key, buffered));
            inner.call(Request::from_parts(parts, body)).await
        })
    }
}
