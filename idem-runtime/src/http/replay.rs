//! What happens when the handler does not run: a replay of the stored response, or a
//! problem saying why.

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderName, HeaderValue};

use super::body::{frame_whole, framed};
use super::problem::Problem;
use crate::config::Idempotency;
use crate::key::ScopedKey;
use crate::protocol::Answer;
use crate::record::{self, Record, RecordError};

/// [`IDEMPOTENT_REPLAYED`](super::IDEMPOTENT_REPLAYED), made once.
const REPLAYED: HeaderName = HeaderName::from_static(super::IDEMPOTENT_REPLAYED);

/// The response to a request whose handler does not run.
pub(crate) fn answer(idem: &Idempotency, key: &ScopedKey, answer: Answer) -> Response {
    let retry_after = idem.settings().retry_after_secs();
    let problem = match answer {
        Answer::Completed(record) => match replay(&record) {
            Ok(response) => {
                tracing::info!(target: "idem", status = response.status().as_u16(), "replayed");
                return response;
            }
            Err(error) => {
                tracing::error!(target: "idem", %error, "the stored response cannot be read; answering 503");
                idem.forget_local(key);
                Problem::store_unavailable(retry_after)
            }
        },
        Answer::NotStored(record) => match Record::decode(&record) {
            Ok(Record::Unstorable {
                status, body_len, ..
            }) => Problem::response_not_stored(status, body_len),
            _ => {
                tracing::error!(target: "idem", "the record of a response not stored cannot be read; answering 503");
                Problem::store_unavailable(retry_after)
            }
        },
        Answer::KeyReused => Problem::key_reused(),
        Answer::InFlight => Problem::in_flight(retry_after),
        Answer::Overloaded => Problem::overloaded(retry_after),
        Answer::Unavailable => Problem::store_unavailable(retry_after),
    };
    problem.into_response()
}

/// What happens on a replay: the stored response as the client receives it again, its
/// status, kept headers and body byte for byte, plus `Idempotent-Replayed: true`.
pub(crate) fn replay(record: &Bytes) -> Result<Response, RecordError> {
    let (status, mut headers, mut body) = record::decode_response(record)?;
    // The body goes out whole, with its length: a record stored before idem made the
    // handler's framing agree with its body (a `Transfer-Encoding` kept by
    // `HeaderPolicy::all()`, a `Content-Length` the body contradicts) is made to agree now.
    let framing = frame_whole(status, &mut headers, &mut body);
    let body = framed(body, &framing);
    // Room for the mark and the body's length, which the server adds where the headers
    // give none (made by the decoding already; refused here for a map past its largest
    // size): idem stores no response without it, so a record lacking it is damaged.
    headers.try_reserve(2).map_err(|_| RecordError::Malformed)?;
    headers.insert(REPLAYED, HeaderValue::from_static("true"));
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Ok(response)
}
