//! The tower layer: hands the [`Idempotency`] handle to handlers, checks the key of
//! requests that carry one and buffers their body, for the fingerprint.

use std::convert::Infallible;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use http::request::Parts;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::body::{Collected, Collecting, collect_bounded};
use super::extract::count_refusal;
use super::state::{BufferedBody, RequestState};
use crate::config::Idempotency;
use crate::key::IdempotencyKey;

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
/// handlers still read it as usual) so that the request can be fingerprinted. A keyed
/// request's trailer fields are not passed on: the handler reads its body without them.
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
    type Future = IdempotencyFuture<S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        request.extensions_mut().insert(self.idem.clone());
        let key = match IdempotencyKey::from_headers(request.headers()) {
            Ok(Some(key)) => key,
            Ok(None) => return IdempotencyFuture::calling(self.inner.call(request)),
            Err(error) => {
                request
                    .extensions_mut()
                    .insert(RequestState::invalid(error));
                return IdempotencyFuture::calling(self.inner.call(request));
            }
        };
        // The clone is not ready; the ready one is taken for this request (tower's rule).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let (parts, body) = request.into_parts();
        let limit = self.idem.settings().max_request_bytes;
        IdempotencyFuture {
            state: State::Reading {
                body: collect_bounded(body, limit),
                waiting: Some(Waiting { parts, key, inner }),
            },
        }
    }
}

pin_project! {
    /// The future of [`IdempotencyService`]: for a keyed request, reads its body (for the
    /// fingerprint), then calls the service it wraps; for any other, calls it at once.
    pub struct IdempotencyFuture<S: Service<Request>> {
        #[pin]
        state: State<S>,
    }
}

pin_project! {
    #[project = StateProjection]
    enum State<S: Service<Request>> {
        Reading {
            body: Collecting,
            // Taken when the body is read.
            waiting: Option<Waiting<S>>,
        },
        Calling {
            #[pin]
            call: S::Future,
        },
    }
}

/// What a keyed request's call waits for while its body is read.
struct Waiting<S> {
    parts: Parts,
    key: IdempotencyKey,
    inner: S,
}

impl<S: Service<Request>> IdempotencyFuture<S> {
    fn calling(call: S::Future) -> Self {
        Self {
            state: State::Calling { call },
        }
    }
}

impl<S> Future for IdempotencyFuture<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            let request = match state.as_mut().project() {
                StateProjection::Calling { call } => {
                    let Ok(mut response) = ready!(call.poll(cx));
                    count_refusal(&mut response);
                    return Poll::Ready(Ok(response));
                }
                StateProjection::Reading { body, waiting } => {
                    let collected = ready!(Pin::new(body).poll(cx));
                    let Some(Waiting {
                        mut parts,
                        key,
                        mut inner,
                    }) = waiting.take()
                    else {
                        // Polled again after it ended: there is nothing left to give.
                        return Poll::Pending;
                    };
                    let (buffered, body) = match collected {
                        Collected::Complete(bytes) => {
                            (BufferedBody::Complete(bytes.clone()), Body::from(bytes))
                        }
                        Collected::TooLarge { read, .. } => {
                            (BufferedBody::TooLarge, read.into_body())
                        }
                        // A request's trailers are dropped (`collect_bounded`): `Trailed`
                        // comes from responses only.
                        Collected::Failed(read) | Collected::Trailed { read, .. } => {
                            (BufferedBody::Failed, read.into_body())
                        }
                    };
                    parts.extensions.insert(RequestState::keyed(key, buffered));
                    inner.call(Request::from_parts(parts, body))
                }
            };
            state.set(State::Calling { call: request });
        }
    }
}

impl<S: Service<Request>> fmt::Debug for IdempotencyFuture<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Reading { .. } => "reading the body",
            State::Calling { .. } => "calling the service",
        };
        f.debug_struct("IdempotencyFuture")
            .field("state", &state)
            .finish()
    }
}
