//! Bounded buffering of request and response bodies.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;

/// A body read up to a limit.
pub(crate) enum Collected {
    /// The whole body, within the limit.
    Complete(Bytes),
    /// More than the limit: what was read, and the rest still to be read.
    TooLarge { read: PrefixedBody, seen: u64 },
    /// Reading failed: what was read, then the error, for a reader that wants to see it.
    Failed(PrefixedBody),
}

/// Reads `body` to its end while it stays within `limit` bytes. Trailers are not kept.
pub(crate) async fn collect_bounded(mut body: Body, limit: usize) -> Collected {
    if body.size_hint().lower() > limit as u64 {
        let seen = body.size_hint().lower();
        return Collected::TooLarge {
            read: PrefixedBody::new(VecDeque::new(), body),
            seen,
        };
    }
    // Most bodies arrive in one chunk: it is kept as it is, with no copy and no queue.
    let mut first: Option<Bytes> = None;
    let mut more: VecDeque<Bytes> = VecDeque::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(error) => {
                more.extend(first.take());
                more.rotate_right(1);
                let failing = Body::from_stream(futures_util::stream::once(async move {
                    Err::<Bytes, axum::Error>(error)
                }));
                return Collected::Failed(PrefixedBody::new(more, failing));
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        seen += data.len();
        match first {
            None => first = Some(data),
            Some(_) => more.push_back(data),
        }
        if seen > limit {
            more.extend(first.take());
            more.rotate_right(1);
            return Collected::TooLarge {
                read: PrefixedBody::new(more, body),
                seen: seen as u64,
            };
        }
    }
    let Some(first) = first else {
        return Collected::Complete(Bytes::new());
    };
    if more.is_empty() {
        return Collected::Complete(first);
    }
    let mut joined = BytesMut::with_capacity(seen);
    joined.extend_from_slice(&first);
    for chunk in more {
        joined.extend_from_slice(&chunk);
    }
    Collected::Complete(joined.freeze())
}

/// Chunks already read, followed by the rest of the body they came from.
pub(crate) struct PrefixedBody {
    prefix: VecDeque<Bytes>,
    rest: Body,
}

impl PrefixedBody {
    fn new(prefix: VecDeque<Bytes>, rest: Body) -> Self {
        Self { prefix, rest }
    }

    pub(crate) fn into_body(self) -> Body {
        Body::new(self)
    }
}

impl http_body::Body for PrefixedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if let Some(chunk) = self.prefix.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let read: u64 = self.prefix.iter().map(|chunk| chunk.len() as u64).sum();
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        if let Some(upper) = rest.upper().and_then(|upper| upper.checked_add(read)) {
            hint.set_upper(upper);
        }
        hint.set_lower(rest.lower().saturating_add(read));
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunked(chunks: &[&'static str]) -> Body {
        let stream = futures_util::stream::iter(
            chunks
                .iter()
                .map(|chunk| Ok::<_, std::io::Error>(Bytes::from_static(chunk.as_bytes())))
                .collect::<Vec<_>>(),
        );
        Body::from_stream(stream)
    }

    #[tokio::test]
    async fn joins_chunks_within_the_limit() {
        let Collected::Complete(bytes) = collect_bounded(chunked(&["ab", "cd", "e"]), 5).await
        else {
            panic!("expected the whole body");
        };
        assert_eq!(bytes, "abcde");
    }

    #[tokio::test]
    async fn over_the_limit_keeps_every_byte_for_the_reader() {
        let Collected::TooLarge { read, seen } =
            collect_bounded(chunked(&["ab", "cd", "ef"]), 3).await
        else {
            panic!("expected too large");
        };
        assert_eq!(seen, 4);
        let all = read.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(all, "abcdef");
    }

    #[tokio::test]
    async fn a_known_length_over_the_limit_is_refused_before_reading() {
        let Collected::TooLarge { read, seen } = collect_bounded(Body::from("0123456789"), 3).await
        else {
            panic!("expected too large");
        };
        assert_eq!(seen, 10);
        assert_eq!(
            read.into_body().collect().await.unwrap().to_bytes(),
            "0123456789"
        );
    }
}
