//! What happens on a first execution: the handler runs holding the key, and its response
//! is stored for the retries to come.

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::FutureExt;
use http::StatusCode;
use http::response::Parts;
use http_body::Body as _;
use tracing::Instrument;

use super::body::{Collected, Framing, collect_response, frame_whole, framed, of_unknown_length};
use super::problem::Problem;
use crate::local::expiry_ms;
use crate::protocol::{self, Completion, Execution, Fallback};
use crate::record::{Record, encode_completed};
use crate::store::BoxFuture;

/// Runs `handler` holding the key, then stores its response (or releases the key after a
/// `5xx` or a panic) and answers with it.
///
/// The work runs inside the request's own task (no hop to another task on the happy
/// path); if that task drops it before it ends (the client disconnected), the rest of the
/// work moves to a task of its own, so it still completes and its response is stored.
pub(crate) fn first_execution<F, R>(
    execution: Execution,
    handler: F,
    span: tracing::Span,
) -> impl Future<Output = Response> + Send
where
    F: Future<Output = R> + Send + 'static,
    R: IntoResponse + 'static,
{
    let detached = execution.idem().shared.detached.clone();
    // The handler's output is made into a response once its future is dropped, which a
    // panic of that drop does not undo (see `Running`); a panic of `into_response`
    // releases the key, as one of the handler's would.
    let finish = |execution, output: R| {
        let (parts, body) = output.into_response().into_parts();
        finish(execution, parts, body)
    };
    protocol::to_the_end(
        detached,
        execution.run_then(handler, finish).instrument(span),
    )
}

/// Stores the handler's response and answers with it, or with what replaces it. (Not an
/// `async fn`, which would hold the execution and the parts twice: as passed, and moved
/// into its body.)
#[allow(
    clippy::manual_async_fn,
    reason = "an `async fn` holds each argument twice: as passed, and moved into its body"
)]
fn finish(
    mut execution: Execution,
    mut parts: Parts,
    body: Body,
) -> impl Future<Output = Response> + Send {
    async move {
        match store_response(&mut execution, &mut parts, body).await {
            Answer::Body(body) => Response::from_parts(parts, body),
            Answer::Instead(instead) => instead,
        }
    }
}

/// What the client gets after its response is stored (or not).
enum Answer {
    /// The handler's response: its parts, with this body.
    Body(Body),
    /// This instead of the handler's response.
    Instead(Response),
}

/// Stores the handler's response, given as its parts and body, under the key, and says
/// what the client gets. Borrows the execution and the parts, so that the future it makes
/// holds no second copy of either.
async fn store_response(execution: &mut Execution, parts: &mut Parts, body: Body) -> Answer {
    let idem = execution.idem().clone();
    let settings = idem.settings();
    if parts.status.is_server_error() && !settings.store_server_errors {
        tracing::info!(target: "idem", status = parts.status.as_u16(), "server error; releasing the key so a retry runs again");
        execution.release().await;
        return Answer::Body(body);
    }
    if parts.status.is_server_error() {
        // Stored (`store_server_errors`), a failure still undoes the work's writes: the
        // record of the 5xx commits alone.
        execution.discard_writes().await;
    }
    execution.result_stands_alone(parts.status.is_client_error());
    // Buffering a streamed body is part of the work: the lease stays renewed meanwhile.
    // The server frames a stream of unknown length otherwise than a body of known
    // length: the first answer goes out as the handler's did.
    //
    // A body that panics (its size hint, its stream, or its drop once read) has failed, as
    // one that errs: the handler ran all the same, and a panic here must not release its
    // key. Everything the body does while idem holds it happens inside this catch.
    let limit = settings.max_response_bytes;
    let reading = async move {
        let streamed = body.size_hint().exact().is_none();
        // The reader, and the body it holds, are dropped within this poll.
        let collected = collect_response(body, limit).await;
        (streamed, collected)
    };
    let Ok((streamed, collected)) = std::panic::AssertUnwindSafe(reading).catch_unwind().await
    else {
        tracing::error!(target: "idem", "the response body panicked as it was read; a retry will be told the response was not stored");
        return complete_not_stored(execution, parts.status, 0, None).await;
    };
    let (bytes, framing) = match collected {
        Collected::Complete(mut bytes) => {
            // The body is whole now, and goes out with its length: the framing the
            // handler chose for a stream must agree with it (a head that contradicts its
            // body is refused by the server, which closes the connection with nothing
            // sent).
            let framing = frame_whole(parts.status, &mut parts.headers, &mut bytes);
            if let Framing::Coded = framing {
                tracing::warn!(target: "idem", "response with a transfer coding other than chunked; sent as it is, not stored: a retry will be told it was not stored and not run again");
                let len = bytes.len() as u64;
                let body = of_unknown_length(bytes);
                return complete_not_stored(execution, parts.status, len, Some(body)).await;
            }
            // A replay adds its mark, and the body's length where the headers give none:
            // a header map without room for both could not be replayed.
            if parts.headers.try_reserve(2).is_ok() {
                (bytes, framing)
            } else {
                tracing::warn!(target: "idem", names = parts.headers.keys_len(), "response has too many header names to replay; a retry will be told it was not stored and not run again");
                let len = bytes.len() as u64;
                let body = framed(bytes, &framing);
                return complete_not_stored(execution, parts.status, len, Some(body)).await;
            }
        }
        Collected::TooLarge { read, seen } => {
            tracing::warn!(target: "idem", limit = settings.max_response_bytes, "response too large to store; a retry will be told so and not run again");
            let body = Some(read.into_body());
            return complete_not_stored(execution, parts.status, seen, body).await;
        }
        Collected::Trailed { read, seen } => {
            // A record holds no trailer fields: the client gets them, a retry is told.
            tracing::warn!(target: "idem", "response with trailer fields; sent as it is, not stored: a retry will be told it was not stored and not run again");
            let body = Some(read.into_body());
            return complete_not_stored(execution, parts.status, seen, body).await;
        }
        Collected::Failed(read) => {
            // What was read, and the error: dropped here, where a panic of its drop is the
            // body's to answer for, not the client's.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(read))).is_err() {
                tracing::error!(target: "idem", "the response body's error panicked as it was dropped");
            }
            tracing::warn!(target: "idem", "response body failed; a retry will be told the response was not stored");
            return complete_not_stored(execution, parts.status, 0, None).await;
        }
    };
    // A field the response's `Connection` names is hop-by-hop too (RFC 9110 §7.6.1),
    // left out with `Connection` itself.
    let hop_by_hop = if settings.headers.keeps(&http::header::CONNECTION) {
        Vec::new()
    } else {
        connection_options(&parts.headers)
    };
    let kept = || {
        parts.headers.iter().filter(|(name, _)| {
            settings.headers.keeps(name)
                && !hop_by_hop
                    .iter()
                    .any(|option| option.eq_ignore_ascii_case(name.as_str().as_bytes()))
        })
    };
    let record = encode_completed(
        execution.fingerprint(),
        expiry_ms(execution.ttl()),
        parts.status,
        kept,
        &bytes,
    );
    let fallback = Fallback::Response {
        status: parts.status,
        body_len: bytes.len() as u64,
    };
    let transactional = execution.in_transaction();
    let completion = execution.complete(record, fallback).await;
    if let Some(problem) = undone(transactional, completion, execution) {
        return Answer::Instead(problem);
    }
    tracing::debug!(target: "idem", status = parts.status.as_u16(), "executed and stored");
    if streamed {
        Answer::Body(of_unknown_length(bytes))
    } else {
        Answer::Body(framed(bytes, &framing))
    }
}

/// Records that the request ran and answered `status` with a body of `body_len` bytes,
/// which was not stored, and answers `body` (with none, that the response was lost);
/// or the problem to answer instead, where the record could not be made (see
/// [`undone`]). Borrows the execution, and is boxed: a response that cannot be stored is
/// rare, and [`store_response`]'s future holds no room for this one.
fn complete_not_stored(
    execution: &mut Execution,
    status: StatusCode,
    body_len: u64,
    body: Option<Body>,
) -> BoxFuture<'_, Answer> {
    Box::pin(async move {
        let record = not_stored(execution, status, body_len);
        let transactional = execution.in_transaction();
        let completion = execution.complete(record, Fallback::None).await;
        match (undone(transactional, completion, execution), body) {
            (Some(problem), _) => Answer::Instead(problem),
            (None, Some(body)) => Answer::Body(body),
            (None, None) => Answer::Instead(Problem::response_lost(status).into_response()),
        }
    })
}

/// The record saying the request ran and answered `status` with a body of `body_len`
/// bytes, which was not stored.
fn not_stored(execution: &Execution, status: StatusCode, body_len: u64) -> Bytes {
    Record::Unstorable {
        fingerprint: *execution.fingerprint(),
        status,
        body_len,
    }
    .encode()
}

/// The answer instead of the handler's response when the handler wrote in a transaction
/// that did not commit (or may not have): its response describes writes that are not
/// there, and must not reach the client as done.
fn undone(transactional: bool, completion: Completion, execution: &Execution) -> Option<Response> {
    if !transactional || !completion.undone() {
        return None;
    }
    let retry_after = execution.idem().settings().retry_after_secs();
    let problem = match completion {
        Completion::Lost => Problem::superseded(retry_after),
        Completion::Unknown => Problem::commit_failed(execution.idem().settings().lease_secs()),
        _ => Problem::rolled_back(retry_after),
    };
    Some(problem.into_response())
}

/// The field names a response's `Connection` header lists (its connection options), as
/// bytes: a value with a byte outside ASCII still names the others.
fn connection_options(headers: &http::HeaderMap) -> Vec<&[u8]> {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&byte| byte == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|option| !option.is_empty())
        .collect()
}
