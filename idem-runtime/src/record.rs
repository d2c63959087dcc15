//! The record stored under each key, and its versioned binary encoding.
//!
//! Layout (all integers big-endian):
//!
//! ```text
//! "idem" | version: u8 | kind: u8 | fingerprint: [u8; 32] | kind-specific part
//! kind 1, in progress: fencing token [u8; 16]
//! kind 2, completed:   expires_at_ms u64 | status u16 | header count u16
//!                      | (name_len u16, name, value_len u32, value)*
//!                      | body_len u64 | body
//! kind 3, unstorable:  status u16 | body length u64
//! kind 4, value:       expires_at_ms u64 | outcome u8 (0 ok, 1 err) | json_len u64 | JSON
//! kind 5, value not stored: length of the value u64
//! kind 6, completed, 65,535 header values or more: as kind 2, with a u32 header count
//! ```
//!
//! Kind 6 leaves every response with fewer header values a kind 2 record, byte for byte
//! what earlier builds write and read (an earlier build answers `503` to a kind 6).
//!
//! Kinds 2, 3 and 6 are written by the HTTP front door, kinds 4 and 5 by
//! [`once`](crate::Idempotency::once): each front door reads only its own, so a stored
//! response and a stored value are never mistaken for each other.
//!
//! An in-progress record is compared byte for byte by the stores' compare-and-set steps,
//! so its encoding is the claim itself: whoever holds those exact bytes holds the lease.
//!
//! The protocol reads only a record's head: its kind, the fingerprint of its
//! request and, for a completed one, its expiry. The rest belongs to the front door that
//! wrote it (the HTTP layer stores a response).

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::fingerprint::Fingerprint;

const MAGIC: &[u8; 4] = b"idem";
const VERSION: u8 = 1;
const HEADER_LEN: usize = 4 + 1 + 1 + 32;

const KIND_IN_PROGRESS: u8 = 1;
const KIND_COMPLETED: u8 = 2;
const KIND_UNSTORABLE: u8 = 3;
const KIND_VALUE: u8 = 4;
const KIND_VALUE_NOT_STORED: u8 = 5;
const KIND_COMPLETED_WIDE: u8 = 6;

/// A fencing token: unique to one execution of one key.
///
/// Completing or releasing a key succeeds only while the stored record still carries the
/// token of the executor, so a stale executor whose lease ran out can never overwrite the
/// record of the one that took over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FencingToken(pub(crate) [u8; 16]);

impl FencingToken {
    /// A token never handed out before by this process, and unpredictable across processes.
    pub fn generate() -> Self {
        use std::sync::OnceLock;
        use std::sync::atomic::{AtomicU64, Ordering};
        static SEED: OnceLock<[u8; 8]> = OnceLock::new();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let seed = SEED.get_or_init(|| {
            let mut seed = [0; 8];
            if getrandom::fill(&mut seed).is_err() {
                // No OS randomness: fall back to the clock and process id, still distinct per process.
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                seed = (nanos ^ u64::from(std::process::id()).rotate_left(32)).to_be_bytes();
            }
            seed
        });
        let count = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut token = [0; 16];
        token[..8].copy_from_slice(seed);
        token[8..].copy_from_slice(&count.to_be_bytes());
        Self(token)
    }
}

/// The kinds of record, as the protocol sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A claim: an execution holds the key.
    InProgress,
    /// The work ran and its result is stored for replay.
    Completed,
    /// The work ran, but its result could not be stored.
    NotStored,
}

/// What the protocol needs of a record, read without decoding the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head {
    pub(crate) kind: Kind,
    /// The fingerprint of the request the record belongs to.
    pub(crate) fingerprint: Fingerprint,
    /// When a completed record expires, in milliseconds since the Unix epoch.
    pub(crate) expires_at_ms: Option<u64>,
}

/// Reads the head of an encoded record.
pub(crate) fn head(bytes: &[u8]) -> Result<Head, RecordError> {
    if bytes.len() < 6 || &bytes[..4] != MAGIC {
        return Err(RecordError::Foreign);
    }
    if bytes[4] != VERSION {
        return Err(RecordError::UnsupportedVersion(bytes[4]));
    }
    let kind = match bytes[5] {
        KIND_IN_PROGRESS => Kind::InProgress,
        KIND_COMPLETED | KIND_COMPLETED_WIDE => Kind::Completed,
        KIND_UNSTORABLE | KIND_VALUE_NOT_STORED => Kind::NotStored,
        KIND_VALUE => Kind::Completed,
        other => return Err(RecordError::UnknownKind(other)),
    };
    let mut fingerprint = [0; 32];
    fingerprint.copy_from_slice(bytes.get(6..HEADER_LEN).ok_or(RecordError::Malformed)?);
    let expires_at_ms = match kind {
        Kind::Completed => {
            let raw = bytes
                .get(HEADER_LEN..HEADER_LEN + 8)
                .ok_or(RecordError::Malformed)?;
            let mut expiry = [0; 8];
            expiry.copy_from_slice(raw);
            Some(u64::from_be_bytes(expiry))
        }
        Kind::InProgress | Kind::NotStored => None,
    };
    Ok(Head {
        kind,
        fingerprint: Fingerprint(fingerprint),
        expires_at_ms,
    })
}

/// The claim of one execution: an in-progress record with a fresh fencing token.
///
/// Encoded as [`Record::InProgress`] is, into one allocation that its clones share (the
/// execution, its lease and the store each hold one).
pub(crate) fn new_claim(fingerprint: Fingerprint) -> Bytes {
    let mut claim = [0; HEADER_LEN + 16];
    let (head_bytes, token) = claim.split_at_mut(HEADER_LEN);
    head_bytes.copy_from_slice(&head_of(KIND_IN_PROGRESS, &fingerprint));
    token.copy_from_slice(&FencingToken::generate().0);
    Bytes::from_owner(claim)
}

/// What a store holds under one key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Record {
    /// A request is executing under the key.
    InProgress {
        /// Fingerprint of the executing request.
        fingerprint: Fingerprint,
        /// Token of the executor that holds the lease.
        token: FencingToken,
    },
    /// The request completed and its response is stored for replay.
    Completed(StoredResponse),
    /// The request completed, but its response was too large to store.
    Unstorable {
        /// Fingerprint of the request that completed.
        fingerprint: Fingerprint,
        /// The status it answered with.
        status: StatusCode,
        /// The size of the body that did not fit, in bytes (at least this many).
        body_len: u64,
    },
    /// A [`once`](crate::Idempotency::once) operation completed and its result is stored.
    Value {
        /// Fingerprint of the operation's input.
        fingerprint: Fingerprint,
        /// When the record expires, in milliseconds since the Unix epoch.
        expires_at_ms: u64,
        /// Whether the operation succeeded (`Ok`) or failed with an error that was stored.
        ok: bool,
        /// The result, as JSON.
        json: Bytes,
    },
    /// A [`once`](crate::Idempotency::once) operation completed, but its result could not
    /// be stored.
    ValueNotStored {
        /// Fingerprint of the operation's input.
        fingerprint: Fingerprint,
        /// The size of the result that did not fit, in bytes.
        len: u64,
    },
}

/// A completed response, as stored and replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// Fingerprint of the request that produced it.
    pub fingerprint: Fingerprint,
    /// Response status.
    pub status: StatusCode,
    /// Response headers kept by the header policy, in order.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Response body.
    pub body: Bytes,
    /// When the record expires, in milliseconds since the Unix epoch (wall clock of the
    /// instance that stored it).
    pub expires_at_ms: u64,
}

/// Why bytes under an idem key could not be read as a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The value does not start with idem's marker: something else wrote to this key.
    #[error("the stored value is not an idem record (foreign data under an idem key)")]
    Foreign,
    /// The record was written by a different version of idem.
    #[error("the stored record has format version {0}, this idem reads version {VERSION}")]
    UnsupportedVersion(u8),
    /// The record kind is unknown.
    #[error("the stored record has unknown kind {0}")]
    UnknownKind(u8),
    /// The record ends early or has trailing bytes.
    #[error("the stored record is truncated or malformed")]
    Malformed,
}

impl Record {
    /// The fingerprint of the request this record belongs to.
    pub fn fingerprint(&self) -> &Fingerprint {
        match self {
            Self::InProgress { fingerprint, .. }
            | Self::Unstorable { fingerprint, .. }
            | Self::Value { fingerprint, .. }
            | Self::ValueNotStored { fingerprint, .. } => fingerprint,
            Self::Completed(response) => &response.fingerprint,
        }
    }

    /// Encodes the record.
    pub fn encode(&self) -> Bytes {
        match self {
            Self::InProgress { fingerprint, token } => {
                let mut out = start(KIND_IN_PROGRESS, fingerprint, 16);
                out.put_slice(&token.0);
                out.freeze()
            }
            Self::Completed(response) => encode_completed(
                &response.fingerprint,
                response.expires_at_ms,
                response.status,
                || response.headers.iter().map(|(n, v)| (n, v)),
                &response.body,
            ),
            Self::Unstorable {
                fingerprint,
                status,
                body_len,
            } => {
                let mut out = start(KIND_UNSTORABLE, fingerprint, 10);
                out.put_u16(status.as_u16());
                out.put_u64(*body_len);
                out.freeze()
            }
            Self::Value {
                fingerprint,
                expires_at_ms,
                ok,
                json,
            } => {
                let mut out = start(KIND_VALUE, fingerprint, 17 + json.len());
                out.put_u64(*expires_at_ms);
                out.put_u8(u8::from(!*ok));
                out.put_u64(json.len() as u64);
                out.put_slice(json);
                out.freeze()
            }
            Self::ValueNotStored { fingerprint, len } => {
                let mut out = start(KIND_VALUE_NOT_STORED, fingerprint, 8);
                out.put_u64(*len);
                out.freeze()
            }
        }
    }

    /// Decodes a record; the body of a completed record shares `bytes`' memory.
    pub fn decode(bytes: &Bytes) -> Result<Self, RecordError> {
        let (kind, fingerprint, mut reader) = open(bytes)?;
        let record = match kind {
            KIND_IN_PROGRESS => {
                let mut token = [0; 16];
                token.copy_from_slice(reader.take(16)?);
                reader.finish()?;
                Self::InProgress {
                    fingerprint,
                    token: FencingToken(token),
                }
            }
            KIND_COMPLETED | KIND_COMPLETED_WIDE => {
                let mut headers = Vec::new();
                let wide = kind == KIND_COMPLETED_WIDE;
                let (expires_at_ms, status, body) = reader.completed(&mut headers, wide)?;
                Self::Completed(StoredResponse {
                    fingerprint,
                    status,
                    headers,
                    body,
                    expires_at_ms,
                })
            }
            KIND_UNSTORABLE => {
                let status = reader.status()?;
                let body_len = reader.u64()?;
                reader.finish()?;
                Self::Unstorable {
                    fingerprint,
                    status,
                    body_len,
                }
            }
            KIND_VALUE => {
                let expires_at_ms = reader.u64()?;
                let ok = match reader.take(1)?[0] {
                    0 => true,
                    1 => false,
                    _ => return Err(RecordError::Malformed),
                };
                let len = usize::try_from(reader.u64()?).map_err(|_| RecordError::Malformed)?;
                let start = reader.at;
                reader.take(len)?;
                reader.finish()?;
                Self::Value {
                    fingerprint,
                    expires_at_ms,
                    ok,
                    json: bytes.slice(start..start + len),
                }
            }
            _ => {
                let len = reader.u64()?;
                reader.finish()?;
                Self::ValueNotStored { fingerprint, len }
            }
        };
        Ok(record)
    }
}

/// Checks a record's head: its kind, its fingerprint, and a reader at what follows.
fn open(bytes: &Bytes) -> Result<(u8, Fingerprint, Reader<'_>), RecordError> {
    if bytes.len() < 6 || &bytes[..4] != MAGIC {
        return Err(RecordError::Foreign);
    }
    if bytes[4] != VERSION {
        return Err(RecordError::UnsupportedVersion(bytes[4]));
    }
    let kind = bytes[5];
    if !(KIND_IN_PROGRESS..=KIND_COMPLETED_WIDE).contains(&kind) {
        return Err(RecordError::UnknownKind(kind));
    }
    if bytes.len() < HEADER_LEN {
        return Err(RecordError::Malformed);
    }
    let mut fingerprint = [0; 32];
    fingerprint.copy_from_slice(&bytes[6..HEADER_LEN]);
    let reader = Reader {
        bytes,
        at: HEADER_LEN,
    };
    Ok((kind, Fingerprint(fingerprint), reader))
}

/// The response of a completed record as a replay sends it: its status, its kept headers
/// (in order, in a map with room for two more: the replay's mark, and the body's length,
/// which the server adds) and its body, which shares `bytes`' memory. [`Record::decode`] without the steps a replay does not need.
pub(crate) fn decode_response(
    bytes: &Bytes,
) -> Result<(StatusCode, HeaderMap, Bytes), RecordError> {
    let (kind, _, mut reader) = open(bytes)?;
    if kind != KIND_COMPLETED && kind != KIND_COMPLETED_WIDE {
        return Err(RecordError::Malformed);
    }
    let mut headers = HeaderMap::new();
    let (_, status, body) = reader.completed(&mut headers, kind == KIND_COMPLETED_WIDE)?;
    Ok((status, headers, body))
}

/// Where a completed record's headers are decoded to.
trait Headers {
    /// Makes room for the `count` headers to come; a hint, which a map past its largest
    /// size ignores.
    fn reserve_for(&mut self, count: usize);
    /// `Err` where the map would grow past its largest size (a record no response of
    /// this process can have produced).
    fn push(&mut self, name: HeaderName, value: HeaderValue) -> Result<(), RecordError>;
}

impl Headers for Vec<(HeaderName, HeaderValue)> {
    fn reserve_for(&mut self, count: usize) {
        self.reserve(count);
    }

    fn push(&mut self, name: HeaderName, value: HeaderValue) -> Result<(), RecordError> {
        Vec::push(self, (name, value));
        Ok(())
    }
}

impl Headers for HeaderMap {
    /// With room for two more, made at once: a replay marks the response it sends, and
    /// the server adds the body's length.
    fn reserve_for(&mut self, count: usize) {
        // The count counts values, not names: many values of one name fit in a map
        // that could not reserve a slot for each.
        let _ = self.try_reserve(count + 2);
    }

    fn push(&mut self, name: HeaderName, value: HeaderValue) -> Result<(), RecordError> {
        self.try_append(name, value)
            .map(drop)
            .map_err(|_| RecordError::Malformed)
    }
}

/// Encodes a completed record straight from response parts, without building a
/// [`StoredResponse`] first.
///
/// `headers` gives the headers to store, each time it is called (counted, then written).
pub(crate) fn encode_completed<'h, I>(
    fingerprint: &Fingerprint,
    expires_at_ms: u64,
    status: StatusCode,
    headers: impl Fn() -> I,
    body: &[u8],
) -> Bytes
where
    I: Iterator<Item = (&'h HeaderName, &'h HeaderValue)>,
{
    // More than 4 billion header values cannot be held in memory to begin with.
    let (count, header_bytes) = headers()
        .take(u32::MAX as usize)
        .fold((0, 0), |(count, bytes), (n, v)| {
            (count + 1, bytes + 6 + n.as_str().len() + v.len())
        });
    let narrow = u16::try_from(count).ok().filter(|n| *n < u16::MAX);
    let kind = narrow.map_or(KIND_COMPLETED_WIDE, |_| KIND_COMPLETED);
    // Expiry, status, header count, body length.
    let fixed = 8 + 2 + if narrow.is_some() { 2 } else { 4 } + 8;
    let mut out = start(kind, fingerprint, fixed + header_bytes + body.len());
    out.put_u64(expires_at_ms);
    out.put_u16(status.as_u16());
    match narrow {
        Some(count) => out.put_u16(count),
        None => out.put_u32(count as u32),
    }
    for (name, value) in headers().take(count) {
        // A header name is at most 65,535 bytes (`http` refuses longer ones); a value
        // of 4 GiB or more cannot be held in memory beside its response.
        out.put_u16(name.as_str().len() as u16);
        out.put_slice(name.as_str().as_bytes());
        out.put_u32(value.len() as u32);
        out.put_slice(value.as_bytes());
    }
    out.put_u64(body.len() as u64);
    out.put_slice(body);
    out.freeze()
}

fn start(kind: u8, fingerprint: &Fingerprint, rest: usize) -> BytesMut {
    let mut out = BytesMut::with_capacity(HEADER_LEN + rest);
    out.put_slice(&head_of(kind, fingerprint));
    out
}

/// The head every record starts with.
fn head_of(kind: u8, fingerprint: &Fingerprint) -> [u8; HEADER_LEN] {
    let mut head = [0; HEADER_LEN];
    head[..4].copy_from_slice(MAGIC);
    head[4] = VERSION;
    head[5] = kind;
    head[6..].copy_from_slice(&fingerprint.0);
    head
}

struct Reader<'a> {
    bytes: &'a Bytes,
    at: usize,
}

impl<'a> Reader<'a> {
    fn check(&self, len: usize) -> Result<usize, RecordError> {
        match self.at.checked_add(len) {
            Some(end) if end <= self.bytes.len() => Ok(len),
            _ => Err(RecordError::Malformed),
        }
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], RecordError> {
        self.check(len)?;
        let bytes: &'a Bytes = self.bytes;
        let out = &bytes[self.at..self.at + len];
        self.at += len;
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16, RecordError> {
        let raw = self.take(2)?;
        Ok(u16::from_be_bytes([raw[0], raw[1]]))
    }

    fn u32(&mut self) -> Result<u32, RecordError> {
        let raw = self.take(4)?;
        Ok(u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]))
    }

    fn u64(&mut self) -> Result<u64, RecordError> {
        let raw = self.take(8)?;
        let mut out = [0; 8];
        out.copy_from_slice(raw);
        Ok(u64::from_be_bytes(out))
    }

    fn status(&mut self) -> Result<StatusCode, RecordError> {
        StatusCode::from_u16(self.u16()?).map_err(|_| RecordError::Malformed)
    }

    /// The rest of a completed record: its expiry, its status, its headers (into
    /// `headers`) and its body; the whole record is read.
    /// With `wide`, the header count is a `u32` (kind 6), else a `u16` (kind 2).
    fn completed(
        &mut self,
        headers: &mut impl Headers,
        wide: bool,
    ) -> Result<(u64, StatusCode, Bytes), RecordError> {
        let expires_at_ms = self.u64()?;
        let status = self.status()?;
        let count = if wide {
            self.u32()? as usize
        } else {
            usize::from(self.u16()?)
        };
        // Each header takes at least 7 bytes of the record (lengths and a name): a count
        // the record cannot hold reserves no more than it can, and no more than a
        // narrow count could (more is made room for as the headers are read).
        let left = self.bytes.len().saturating_sub(self.at);
        headers.reserve_for(count.min(left / 7).min(usize::from(u16::MAX)));
        for _ in 0..count {
            let name_len = usize::from(self.u16()?);
            let name =
                HeaderName::from_bytes(self.take(name_len)?).map_err(|_| RecordError::Malformed)?;
            let value_len = self.u32()? as usize;
            let value = HeaderValue::from_maybe_shared(
                self.bytes.slice(self.at..self.at + self.check(value_len)?),
            )
            .map_err(|_| RecordError::Malformed)?;
            self.at += value_len;
            headers.push(name, value)?;
        }
        let body_len = usize::try_from(self.u64()?).map_err(|_| RecordError::Malformed)?;
        let start = self.at;
        self.take(body_len)?;
        self.finish()?;
        Ok((
            expires_at_ms,
            status,
            self.bytes.slice(start..start + body_len),
        ))
    }

    fn finish(&self) -> Result<(), RecordError> {
        if self.at == self.bytes.len() {
            Ok(())
        } else {
            Err(RecordError::Malformed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fingerprint(seed: u8) -> Fingerprint {
        Fingerprint([seed; 32])
    }

    #[test]
    fn tokens_are_unique() {
        let a = FencingToken::generate();
        let b = FencingToken::generate();
        assert_ne!(a, b);
    }

    #[test]
    fn a_new_claim_is_an_in_progress_record_with_a_fresh_token() {
        let claim = new_claim(fingerprint(9));
        let Ok(Record::InProgress {
            fingerprint: fp,
            token,
        }) = Record::decode(&claim)
        else {
            panic!("not an in-progress record: {claim:?}");
        };
        assert_eq!(fp, fingerprint(9));
        let encoded = Record::InProgress {
            fingerprint: fp,
            token,
        }
        .encode();
        assert_eq!(claim, encoded);
        assert_ne!(claim, new_claim(fingerprint(9)));
    }

    #[test]
    fn any_number_of_header_values_round_trips() {
        // Either side of the switch from a two-byte count (kind 2) to a four-byte one (kind 6).
        for count in [0, 1, 65_534, 65_535, 65_536, 70_000] {
            let headers: Vec<_> = (0..count)
                .map(|n| (HeaderName::from_static("x-n"), HeaderValue::from(n)))
                .collect();
            let record = Record::Completed(StoredResponse {
                fingerprint: fingerprint(3),
                status: StatusCode::CREATED,
                headers: headers.clone(),
                body: Bytes::from_static(b"body"),
                expires_at_ms: 7,
            });
            let bytes = record.encode();
            assert_eq!(Record::decode(&bytes), Ok(record), "{count} values");
            let (status, map, body) = decode_response(&bytes).expect("a replay");
            assert_eq!(status, StatusCode::CREATED);
            assert!(map.get_all("x-n").iter().eq(headers.iter().map(|(_, v)| v)));
            assert_eq!(body, "body");
        }
    }

    #[test]
    fn a_replayed_map_has_room_for_its_mark_and_length_from_the_start() {
        // What a replay adds (its mark, and the length the server writes) fits in the
        // map as decoded: no second allocation, whatever the number of kept headers.
        for count in [0, 1, 2, 3, 5, 12, 40] {
            let headers: Vec<_> = (0..count)
                .map(|n| (HeaderName::from_static("x-n"), HeaderValue::from(n)))
                .collect();
            let bytes = Record::Completed(StoredResponse {
                fingerprint: fingerprint(4),
                status: StatusCode::OK,
                headers,
                body: Bytes::from_static(b"{}"),
                expires_at_ms: 7,
            })
            .encode();
            let (_, map, _) = decode_response(&bytes).expect("a replay");
            assert_eq!(map.len(), count);
            assert!(
                map.capacity() >= count + 2,
                "{count} headers: room for {} only",
                map.capacity()
            );
        }
    }

    #[test]
    fn foreign_and_future_values_are_clear_errors() {
        assert_eq!(
            Record::decode(&Bytes::from_static(b"hello")),
            Err(RecordError::Foreign)
        );
        assert_eq!(
            Record::decode(&Bytes::from_static(b"{\"status\":200}")),
            Err(RecordError::Foreign)
        );
        let mut future = Record::InProgress {
            fingerprint: fingerprint(1),
            token: FencingToken::generate(),
        }
        .encode()
        .to_vec();
        future[4] = 9;
        assert_eq!(
            Record::decode(&Bytes::from(future.clone())),
            Err(RecordError::UnsupportedVersion(9))
        );
        future[4] = VERSION;
        future[5] = 7;
        assert_eq!(
            Record::decode(&Bytes::from(future)),
            Err(RecordError::UnknownKind(7))
        );
    }

    fn header_strategy() -> impl Strategy<Value = (HeaderName, HeaderValue)> {
        ("[a-z][a-z0-9-]{0,20}", "[ -~]{0,40}").prop_map(|(name, value)| {
            (
                HeaderName::from_bytes(name.as_bytes()).expect("valid name"),
                HeaderValue::from_str(value.trim()).expect("valid value"),
            )
        })
    }

    fn record_strategy() -> impl Strategy<Value = Record> {
        let fp = any::<[u8; 32]>().prop_map(Fingerprint);
        prop_oneof![
            (fp.clone(), any::<[u8; 16]>()).prop_map(|(fingerprint, token)| Record::InProgress {
                fingerprint,
                token: FencingToken(token)
            }),
            (
                fp.clone(),
                100u16..600,
                proptest::collection::vec(header_strategy(), 0..8),
                proptest::collection::vec(any::<u8>(), 0..512),
                any::<u64>()
            )
                .prop_map(|(fingerprint, status, headers, body, expires_at_ms)| {
                    Record::Completed(StoredResponse {
                        fingerprint,
                        status: StatusCode::from_u16(status).expect("valid status"),
                        headers,
                        body: Bytes::from(body),
                        expires_at_ms,
                    })
                }),
            (fp.clone(), 100u16..600, any::<u64>()).prop_map(|(fingerprint, status, body_len)| {
                Record::Unstorable {
                    fingerprint,
                    status: StatusCode::from_u16(status).expect("valid status"),
                    body_len,
                }
            }),
            (
                fp.clone(),
                any::<u64>(),
                any::<bool>(),
                proptest::collection::vec(any::<u8>(), 0..256)
            )
                .prop_map(|(fingerprint, expires_at_ms, ok, json)| Record::Value {
                    fingerprint,
                    expires_at_ms,
                    ok,
                    json: Bytes::from(json),
                }),
            (fp, any::<u64>())
                .prop_map(|(fingerprint, len)| Record::ValueNotStored { fingerprint, len }),
        ]
    }

    proptest! {
        #[test]
        fn records_round_trip(record in record_strategy()) {
            let encoded = record.encode();
            prop_assert_eq!(Record::decode(&encoded), Ok(record));
        }

        #[test]
        fn truncations_never_panic_or_misread(record in record_strategy(), cut in any::<prop::sample::Index>()) {
            let encoded = record.encode();
            let cut = cut.index(encoded.len());
            prop_assert!(Record::decode(&encoded.slice(..cut)).is_err());
            let mut longer = encoded.to_vec();
            longer.push(0);
            prop_assert_eq!(Record::decode(&Bytes::from(longer)), Err(RecordError::Malformed));
        }

        #[test]
        fn the_head_agrees_with_the_whole_record(record in record_strategy()) {
            let head = head(&record.encode()).expect("a record has a head");
            prop_assert_eq!(head.fingerprint, *record.fingerprint());
            let expected = match &record {
                Record::InProgress { .. } => (Kind::InProgress, None),
                Record::Completed(stored) => (Kind::Completed, Some(stored.expires_at_ms)),
                Record::Value { expires_at_ms, .. } => (Kind::Completed, Some(*expires_at_ms)),
                _ => (Kind::NotStored, None),
            };
            prop_assert_eq!((head.kind, head.expires_at_ms), expected);
        }

        #[test]
        fn arbitrary_bytes_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Record::decode(&Bytes::from(raw));
        }
    }
}
