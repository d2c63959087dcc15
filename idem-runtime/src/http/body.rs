//! Bounded buffering of request and response bodies.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body::{Body as _, Frame, SizeHint};

/// A body read up to a limit.
pub(crate) enum Collected {
    /// The whole body, within the limit.
    Complete(Bytes),
    /// More than the limit: what was read, and the rest still to be read.
    TooLarge { read: PrefixedBody, seen: u64 },
    /// Reading failed: what was read, then the error, for a reader that wants to see it.
    Failed(PrefixedBody),
    /// The body ended in trailer fields, which [`collect_response`] does not drop: what
    /// was read, then the trailers and whatever follows them, and how many bytes were read.
    Trailed { read: PrefixedBody, seen: u64 },
}

/// Reads `body` to its end while it stays within `limit` bytes. Trailers are not kept.
pub(crate) fn collect_bounded(body: Body, limit: usize) -> Collecting {
    Collecting {
        body,
        limit,
        keep_trailers: false,
        started: false,
        first: None,
        more: VecDeque::new(),
        seen: 0,
    }
}

/// [`collect_bounded`] for a response: a body that ends in trailer fields is answered
/// [`Collected::Trailed`], so that its trailers reach the client.
pub(crate) fn collect_response(body: Body, limit: usize) -> Collecting {
    Collecting {
        keep_trailers: true,
        ..collect_bounded(body, limit)
    }
}

/// A body being read up to a limit; made by [`collect_bounded`]. A named future (no
/// `async` block), so that the layer's own future can hold it without a box.
pub(crate) struct Collecting {
    body: Body,
    limit: usize,
    /// Whether a trailers frame ends the reading ([`Collected::Trailed`]) instead of being
    /// dropped.
    keep_trailers: bool,
    /// Whether the body's size hint was checked against the limit.
    started: bool,
    /// Most bodies arrive in one chunk: it is kept as it is, with no copy and no queue.
    first: Option<Bytes>,
    more: VecDeque<Bytes>,
    seen: usize,
}

impl Collecting {
    /// The chunks read so far, in order, taken out.
    fn take_read(&mut self) -> VecDeque<Bytes> {
        let mut read = std::mem::take(&mut self.more);
        if let Some(first) = self.first.take() {
            read.push_front(first);
        }
        read
    }

    /// What was read and the rest of the body, taken out: the body is left empty.
    fn take_prefixed(&mut self) -> PrefixedBody {
        let read = self.take_read();
        PrefixedBody::new(read, std::mem::take(&mut self.body))
    }

    /// What was read, `trailers`, and the rest of the body, taken out.
    fn take_trailed(&mut self, trailers: HeaderMap) -> PrefixedBody {
        let mut read = self.take_prefixed();
        read.trailers = Some(Box::new(trailers));
        read
    }

    /// The whole body, read within the limit.
    fn complete(&mut self) -> Bytes {
        let Some(first) = self.first.take() else {
            return Bytes::new();
        };
        if self.more.is_empty() {
            return first;
        }
        let mut joined = BytesMut::with_capacity(self.seen);
        joined.extend_from_slice(&first);
        for chunk in self.more.drain(..) {
            joined.extend_from_slice(&chunk);
        }
        joined.freeze()
    }
}

impl Future for Collecting {
    type Output = Collected;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Collected> {
        let this = &mut *self;
        if !this.started {
            this.started = true;
            let announced = this.body.size_hint().lower();
            if announced > this.limit as u64 {
                return Poll::Ready(Collected::TooLarge {
                    read: this.take_prefixed(),
                    seen: announced,
                });
            }
        }
        loop {
            let frame = match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                None => return Poll::Ready(Collected::Complete(this.complete())),
                Some(Ok(frame)) => frame,
                Some(Err(error)) => {
                    let read = this.take_read();
                    let failing = Body::from_stream(futures_util::stream::once(async move {
                        Err::<Bytes, axum::Error>(error)
                    }));
                    return Poll::Ready(Collected::Failed(PrefixedBody::new(read, failing)));
                }
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => match frame.into_trailers() {
                    // An empty trailers frame carries nothing to lose.
                    Ok(trailers) if this.keep_trailers && !trailers.is_empty() => {
                        return Poll::Ready(Collected::Trailed {
                            read: this.take_trailed(trailers),
                            seen: this.seen as u64,
                        });
                    }
                    _ => continue,
                },
            };
            if data.is_empty() {
                continue;
            }
            this.seen += data.len();
            match this.first {
                None => this.first = Some(data),
                Some(_) => this.more.push_back(data),
            }
            if this.seen > this.limit {
                return Poll::Ready(Collected::TooLarge {
                    read: this.take_prefixed(),
                    seen: this.seen as u64,
                });
            }
        }
    }
}

/// Chunks already read (and trailers read after them), followed by the rest of the body
/// they came from.
pub(crate) struct PrefixedBody {
    prefix: VecDeque<Bytes>,
    /// Boxed: a rare field, which would otherwise make every future holding a body larger.
    trailers: Option<Box<HeaderMap>>,
    rest: Body,
}

impl PrefixedBody {
    fn new(prefix: VecDeque<Bytes>, rest: Body) -> Self {
        Self {
            prefix,
            trailers: None,
            rest,
        }
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
        if let Some(trailers) = self.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(*trailers))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.trailers.is_none() && self.rest.is_end_stream()
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

/// Whether a `Transfer-Encoding` value names a coding other than `chunked`.
fn codes(value: &HeaderValue) -> bool {
    value.to_str().map_or(true, |codings| {
        codings
            .split(',')
            .map(str::trim)
            .any(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case("chunked"))
    })
}

/// How a body read whole goes out.
pub(crate) enum Framing {
    /// With its length.
    Whole,
    /// As a stream of unknown length, under the handler's own headers: a declared
    /// `Content-Length` longer than the body, which the server then fails as it fails
    /// such a stream of the handler's, instead of sending a head its body contradicts.
    AsStream,
    /// As a stream, under a transfer coding other than `chunked`: the bytes are coded,
    /// and only that header says so, so they go out under it as the handler sent them,
    /// and are not stored.
    Coded,
}

/// Makes the framing headers of a body read whole agree with it, as the server would
/// have framed the handler's stream: `Transfer-Encoding: chunked` goes (the body goes out
/// with its length), and a declared `Content-Length` shorter than the body cuts it there,
/// as the server cuts a stream. A transfer coding other than `chunked` changes nothing.
pub(crate) fn frame_whole(
    status: StatusCode,
    headers: &mut HeaderMap,
    bytes: &mut Bytes,
) -> Framing {
    let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter();
    if let Some(first) = codings.next() {
        if codes(first) || codings.any(codes) {
            return Framing::Coded;
        }
        headers.remove(header::TRANSFER_ENCODING);
    }
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    let declared = match (lengths.next(), lengths.next()) {
        (Some(only), None) => only
            .to_str()
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok()),
        _ => None,
    };
    match declared {
        Some(declared) if declared < bytes.len() as u64 => {
            bytes.truncate(usize::try_from(declared).unwrap_or(bytes.len()));
            Framing::Whole
        }
        // A `304` sends no body: its length is the representation's.
        Some(declared) if declared > bytes.len() as u64 && status != StatusCode::NOT_MODIFIED => {
            Framing::AsStream
        }
        _ => Framing::Whole,
    }
}

/// `bytes` as a body whose length the server is not told.
pub(crate) fn of_unknown_length(bytes: Bytes) -> Body {
    Body::from_stream(futures_util::stream::once(std::future::ready(Ok::<
        _,
        std::convert::Infallible,
    >(bytes))))
}

/// `bytes` as `framing` sends it.
pub(crate) fn framed(bytes: Bytes, framing: &Framing) -> Body {
    match framing {
        Framing::Whole => Body::from(bytes),
        Framing::AsStream | Framing::Coded => of_unknown_length(bytes),
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

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

    /// A body of `chunks`, then a trailers frame of `trailers`.
    fn trailed(chunks: &[&'static str], trailers: &[(&'static str, &'static str)]) -> Body {
        let mut map = HeaderMap::new();
        for (name, value) in trailers {
            map.insert(*name, HeaderValue::from_static(value));
        }
        let frames = chunks
            .iter()
            .map(|chunk| Frame::data(Bytes::from_static(chunk.as_bytes())))
            .chain(std::iter::once(Frame::trailers(map)))
            .map(Ok::<_, std::io::Error>)
            .collect::<Vec<_>>();
        Body::new(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )))
    }

    #[tokio::test]
    async fn a_response_keeps_its_trailers_after_what_was_read() {
        let body = trailed(&["ab", "cd"], &[("grpc-status", "0")]);
        let Collected::Trailed { read, seen } = collect_response(body, 100).await else {
            panic!("expected the trailers kept");
        };
        assert_eq!(seen, 4);
        let sent = read.into_body().collect().await.unwrap();
        assert_eq!(sent.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(sent.to_bytes(), "abcd");
    }

    #[tokio::test]
    async fn empty_trailers_and_a_request_s_trailers_are_dropped() {
        let Collected::Complete(bytes) = collect_response(trailed(&["ab"], &[]), 100).await else {
            panic!("an empty trailers frame carries nothing");
        };
        assert_eq!(bytes, "ab");
        let body = trailed(&["ab"], &[("x-checksum", "1")]);
        let Collected::Complete(bytes) = collect_bounded(body, 100).await else {
            panic!("a request's trailers are dropped");
        };
        assert_eq!(bytes, "ab");
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
