//! Idempotency keys: parsing the `Idempotency-Key` request header, and a key within its
//! scope.

use std::fmt;
use std::sync::Arc;

use http::HeaderMap;
use http::header::HeaderName;

use crate::scope::Scope;

/// The request header that carries the idempotency key.
pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// A validated idempotency key, as the client sent it (without Structured Field quotes).
///
/// Accepted forms of the header value:
/// - a Structured Field string, as the IETF draft specifies: `"8e03978e-40d5-43e8-bc93-6894a57f9324"`;
///   inside the quotes `\"` and `\\` are the only escapes, and spaces are allowed;
/// - leniently, a bare token of visible ASCII: `8e03978e-40d5-43e8-bc93-6894a57f9324`.
///
/// ```
/// use idem_runtime::IdempotencyKey;
///
/// let quoted = IdempotencyKey::parse(br#""order 42""#).unwrap();
/// assert_eq!(quoted.as_str(), "order 42");
/// let bare = IdempotencyKey::parse(b"8e03978e").unwrap();
/// assert_eq!(bare.as_str(), "8e03978e");
/// assert!(IdempotencyKey::parse(b"").is_err());
/// ```
#[derive(Clone)]
pub struct IdempotencyKey(
    /// [`SCOPE_PREFIX`] bytes kept free, then the key: a [`ScopedKey`] writes its scope
    /// over them and takes the whole as its name, with no second allocation.
    String,
);

/// The bytes a [`ScopedKey`]'s name puts before the key: the scope in hex, then `:`.
const SCOPE_PREFIX: usize = SCOPE_HEX + 1;
const SCOPE_HEX: usize = 2 * size_of::<Scope>();
/// What an unscoped key's free bytes hold.
const UNSCOPED: &str = "00000000000000000000000000000000:";
const _: () = assert!(UNSCOPED.len() == SCOPE_PREFIX);

/// Why an `Idempotency-Key` header was refused. Each answers `400 Bad Request`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key is empty (or only quotes or spaces).
    #[error("the Idempotency-Key is empty; send a unique value such as a UUID")]
    Empty,
    /// The key is longer than [`IdempotencyKey::MAX_LEN`].
    #[error(
        "the Idempotency-Key is {len} characters long; at most {} are accepted",
        IdempotencyKey::MAX_LEN
    )]
    TooLong {
        /// The length of the key that was sent.
        len: usize,
    },
    /// The key holds a byte outside visible ASCII (or a space outside quotes).
    #[error(
        "the Idempotency-Key holds byte 0x{byte:02x} at position {position}; only visible ASCII is accepted (spaces only inside a quoted key)"
    )]
    InvalidCharacter {
        /// The offending byte.
        byte: u8,
        /// Its zero-based position in the header value.
        position: usize,
    },
    /// The key starts with a quote but is not a well-formed Structured Field string.
    #[error(
        "the Idempotency-Key is not a well-formed quoted string ({reason}); send \"key\" with only \\\" and \\\\ escaped, or a bare key without quotes"
    )]
    MalformedQuotedString {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// More than one `Idempotency-Key` field was sent.
    #[error("the request carries {count} Idempotency-Key fields; send exactly one")]
    Repeated {
        /// How many fields were sent.
        count: usize,
    },
}

impl IdempotencyKey {
    /// The longest key accepted, in characters.
    pub const MAX_LEN: usize = 255;

    /// Parses one header value.
    pub fn parse(value: &[u8]) -> Result<Self, KeyError> {
        let value = trim_ows(value);
        let mut out = Self::room_for(value.len());
        match value.first() {
            Some(b'"') => parse_quoted(value, &mut out)?,
            _ => parse_bare(value, &mut out)?,
        }
        let key = Self(out);
        // A quoted key of spaces alone is as empty as no key.
        if key.as_str().bytes().all(|b| b == b' ') {
            return Err(KeyError::Empty);
        }
        if key.as_str().len() > Self::MAX_LEN {
            return Err(KeyError::TooLong {
                len: key.as_str().len(),
            });
        }
        Ok(key)
    }

    /// A key already known to be valid (visible ASCII, 1 to 255 characters).
    pub(crate) fn from_valid(key: &str) -> Self {
        debug_assert!(Self::parse(key.as_bytes()).is_ok());
        let mut out = Self::room_for(key.len());
        out.push_str(key);
        Self(out)
    }

    /// The free bytes a scope is later written over, with room for a key of `len` after.
    fn room_for(len: usize) -> String {
        let mut out = String::with_capacity(SCOPE_PREFIX + len);
        out.push_str(UNSCOPED);
        out
    }

    /// Reads the key from request headers: `Ok(None)` when there is none.
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Self>, KeyError> {
        let mut values = headers.get_all(&IDEMPOTENCY_KEY).iter();
        let Some(first) = values.next() else {
            return Ok(None);
        };
        let extra = values.count();
        if extra > 0 {
            return Err(KeyError::Repeated { count: extra + 1 });
        }
        Self::parse(first.as_bytes()).map(Some)
    }

    /// The key, without quotes or escapes.
    pub fn as_str(&self) -> &str {
        &self.0[SCOPE_PREFIX..]
    }

    /// The key in the draft's Structured Field form, quoted and escaped.
    pub fn to_header_value(&self) -> String {
        let mut out = String::with_capacity(self.as_str().len() + 2);
        out.push('"');
        for c in self.as_str().chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
        out
    }
}

impl PartialEq for IdempotencyKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for IdempotencyKey {}

impl std::hash::Hash for IdempotencyKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("IdempotencyKey")
            .field(&self.as_str())
            .finish()
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The idempotency key of a request together with its scope: the stable identity of
/// "this client's attempt", e.g. for a UNIQUE column that guards a table a second time.
///
/// Extract it in an `#[idempotent]` handler (or beside [`Idempotent`](crate::Idempotent)): as `ScopedKey` it
/// answers `400` when the request has no key, a malformed one, or no identity to scope it
/// by, with the problem a guard would answer (`key-missing`, `key-invalid`,
/// `scope-missing`), and `500` (`layer-missing`) on a route without the layer; as
/// `Option<ScopedKey>` it is `None` then.
///
/// Its `Debug` shows the key, or, for a key a handle with
/// [`log_keys(false)`](crate::IdempotencyBuilder::log_keys) handed out, its digest as
/// idem's logs show it (`key-digest:`): a handler's arguments logged by
/// `#[tracing::instrument]` keep the key out of the logs too. [`as_str`](Self::as_str),
/// `Display` and [`key`](Self::key) give the key itself, for the application's own use.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ScopedKey(Arc<ScopedKeyInner>);

struct ScopedKeyInner {
    scope: Scope,
    /// Its free bytes hold the scope: the whole is the name.
    key: IdempotencyKey,
    /// The secret of the digest `Debug` shows in place of the key, under
    /// `log_keys(false)`. Not part of the key's identity.
    digest_secret: Option<Arc<[u8]>>,
}

impl PartialEq for ScopedKeyInner {
    fn eq(&self, other: &Self) -> bool {
        self.scope == other.scope && self.key == other.key
    }
}

impl Eq for ScopedKeyInner {}

impl std::hash::Hash for ScopedKeyInner {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.scope.hash(state);
        self.key.hash(state);
    }
}

impl ScopedKey {
    /// `key` within `scope`.
    pub fn new(scope: Scope, key: IdempotencyKey) -> Self {
        Self::logged_as(scope, key, None)
    }

    /// `key` within `scope`, whose `Debug` shows its digest under `digest_secret`, where
    /// there is one (a handle's `Settings::digest_secret`).
    pub(crate) fn logged_as(
        scope: Scope,
        mut key: IdempotencyKey,
        digest_secret: Option<Arc<[u8]>>,
    ) -> Self {
        let mut name = std::mem::take(&mut key.0).into_bytes();
        crate::scope::write_hex(&mut name[..SCOPE_HEX], &scope.0);
        // ASCII digits over ASCII: still UTF-8, so the lossy path is never taken.
        key.0 = String::from_utf8(name)
            .unwrap_or_else(|error| String::from_utf8_lossy(error.as_bytes()).into_owned());
        Self(Arc::new(ScopedKeyInner {
            scope,
            key,
            digest_secret,
        }))
    }

    /// `scope-hex:key`: the name under which the store keeps the record. Unambiguous, as
    /// the scope part has a fixed length.
    pub fn as_str(&self) -> &str {
        &self.0.key.0
    }

    /// The scope.
    pub fn scope(&self) -> Scope {
        self.0.scope
    }

    /// The key as the client sent it.
    pub fn key(&self) -> &IdempotencyKey {
        &self.0.key
    }

    /// A short keyed digest of [`as_str`](Self::as_str): the first 8 bytes, in hex, of
    /// the SHA-256 of `secret` (its length first) followed by the scoped key. With
    /// [`log_keys(false)`](crate::IdempotencyBuilder::log_keys) idem logs this in place of
    /// the key, under the handle's
    /// [`log_key_secret`](crate::IdempotencyBuilder::log_key_secret): an operator who
    /// holds the secret can follow one key through the logs (and find it by computing its
    /// digest), while whoever reads only the logs cannot get a key back by hashing guesses
    /// (an order number, an e-mail address).
    ///
    /// ```
    /// use idem_runtime::{IdempotencyKey, Scope, ScopedKey};
    ///
    /// let key = ScopedKey::new(Scope::of("acct_1"), IdempotencyKey::parse(b"order-42").unwrap());
    /// let digest = key.digest(b"the deployment's secret");
    /// assert_eq!(digest.len(), 16);
    /// assert_ne!(digest, key.digest(b"another secret"));
    /// ```
    pub fn digest(&self, secret: &[u8]) -> String {
        use sha2::{Digest, Sha256};
        let hash = Sha256::new()
            .chain_update((secret.len() as u64).to_be_bytes())
            .chain_update(secret)
            .chain_update(self.as_str().as_bytes())
            .finalize();
        let mut out = String::with_capacity(16);
        crate::scope::push_hex(&mut out, &hash[..8]);
        out
    }
}

/// How a key appears in idem's logs: as sent, or, under
/// [`log_keys(false)`](crate::IdempotencyBuilder::log_keys), as `key-digest:` and the
/// [`ScopedKey::digest`] under the handle's secret.
pub(crate) enum LoggedKey<'a> {
    Raw(&'a dyn fmt::Display),
    Digest(String),
}

impl fmt::Display for LoggedKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Raw(key) => key.fmt(f),
            Self::Digest(digest) => write!(f, "key-digest:{digest}"),
        }
    }
}

impl fmt::Debug for ScopedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0.digest_secret {
            Some(secret) => f
                .debug_tuple("ScopedKey")
                .field(&format_args!("key-digest:{}", self.digest(secret)))
                .finish(),
            None => f.debug_tuple("ScopedKey").field(&self.as_str()).finish(),
        }
    }
}

impl fmt::Display for ScopedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn trim_ows(mut value: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = value {
        value = rest;
    }
    value
}

fn parse_bare(value: &[u8], out: &mut String) -> Result<(), KeyError> {
    if let Some(position) = value.iter().position(|b| !b.is_ascii_graphic()) {
        return Err(KeyError::InvalidCharacter {
            byte: value[position],
            position,
        });
    }
    // Every byte is visible ASCII, so this is valid UTF-8 (`Err` is not reached, and
    // would name the byte it stopped at).
    let key = std::str::from_utf8(value).map_err(|error| {
        let position = error.valid_up_to();
        KeyError::InvalidCharacter {
            byte: value[position],
            position,
        }
    })?;
    out.push_str(key);
    Ok(())
}

fn parse_quoted(value: &[u8], out: &mut String) -> Result<(), KeyError> {
    let mut bytes = value.iter().enumerate().skip(1);
    while let Some((position, &byte)) = bytes.next() {
        match byte {
            b'"' => {
                if position + 1 != value.len() {
                    return Err(KeyError::MalformedQuotedString {
                        reason: "text after the closing quote",
                    });
                }
                return Ok(());
            }
            b'\\' => match bytes.next() {
                Some((_, &escaped @ (b'"' | b'\\'))) => out.push(char::from(escaped)),
                Some(_) => {
                    return Err(KeyError::MalformedQuotedString {
                        reason: "only \\\" and \\\\ may be escaped",
                    });
                }
                None => {
                    return Err(KeyError::MalformedQuotedString {
                        reason: "no closing quote",
                    });
                }
            },
            b' '..=b'~' => out.push(char::from(byte)),
            _ => return Err(KeyError::InvalidCharacter { byte, position }),
        }
    }
    Err(KeyError::MalformedQuotedString {
        reason: "no closing quote",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_quoted_and_bare_keys() {
        let cases: &[(&[u8], &str)] = &[
            (b"\"abc\"", "abc"),
            (b"abc", "abc"),
            (b"  \"a b\"\t", "a b"),
            (br#""a\"b\\c""#, "a\"b\\c"),
            (b"{x}:*?", "{x}:*?"),
        ];
        for (raw, want) in cases {
            let key = IdempotencyKey::parse(raw).expect("valid key");
            assert_eq!(key.as_str(), *want);
        }
    }

    #[test]
    fn rejects_each_bad_form_with_its_reason() {
        assert_eq!(IdempotencyKey::parse(b""), Err(KeyError::Empty));
        assert_eq!(IdempotencyKey::parse(b"\"\""), Err(KeyError::Empty));
        assert_eq!(IdempotencyKey::parse(b"\"   \""), Err(KeyError::Empty));
        assert_eq!(
            IdempotencyKey::parse(&[b'a'; 256]),
            Err(KeyError::TooLong { len: 256 })
        );
        assert!(IdempotencyKey::parse(&[b'a'; 255]).is_ok());
        assert_eq!(
            IdempotencyKey::parse("ké".as_bytes()),
            Err(KeyError::InvalidCharacter {
                byte: 0xc3,
                position: 1
            })
        );
        assert_eq!(
            IdempotencyKey::parse(b"a\x01b"),
            Err(KeyError::InvalidCharacter {
                byte: 1,
                position: 1
            })
        );
        assert!(matches!(
            IdempotencyKey::parse(b"a b"),
            Err(KeyError::InvalidCharacter { byte: b' ', .. })
        ));
        for broken in [&b"\"abc"[..], b"\"abc\"x", b"\"a\\nb\"", b"\"abc\\"] {
            assert!(
                matches!(
                    IdempotencyKey::parse(broken),
                    Err(KeyError::MalformedQuotedString { .. })
                ),
                "{:?}",
                String::from_utf8_lossy(broken)
            );
        }
    }

    #[test]
    fn two_fields_are_refused() {
        let mut headers = HeaderMap::new();
        headers.append(&IDEMPOTENCY_KEY, "a".parse().unwrap());
        headers.append(&IDEMPOTENCY_KEY, "b".parse().unwrap());
        assert_eq!(
            IdempotencyKey::from_headers(&headers),
            Err(KeyError::Repeated { count: 2 })
        );
        assert_eq!(IdempotencyKey::from_headers(&HeaderMap::new()), Ok(None));
    }

    proptest! {
        /// Guards: a scoped key's name is its scope in hex, `:` and the key, written in
        /// the key's own buffer; the key it holds reads as parsed, and two names are equal
        /// exactly when scope and key are.
        #[test]
        fn a_scoped_name_is_scope_colon_key(key in "[!#-~][!-~]{0,254}", a in any::<u64>(), b in any::<u64>()) {
            let parsed = IdempotencyKey::parse(key.as_bytes()).expect("a bare key");
            let (one, other) = (Scope::of(a.to_be_bytes()), Scope::of(b.to_be_bytes()));
            let scoped = ScopedKey::new(one, parsed.clone());
            prop_assert_eq!(scoped.as_str(), format!("{}:{key}", one.to_hex()));
            prop_assert_eq!(scoped.key(), &parsed);
            prop_assert_eq!(scoped.key().as_str(), key.as_str());
            prop_assert_eq!(scoped.scope(), one);
            prop_assert_eq!(&scoped, &ScopedKey::new(one, parsed.clone()));
            prop_assert_eq!(scoped == ScopedKey::new(other, parsed), a == b);
        }

        #[test]
        fn quoting_round_trips(key in "[ -~]{1,255}") {
            prop_assume!(key.bytes().any(|b| b != b' '));
            let parsed = IdempotencyKey::parse(key.as_bytes());
            // Any text, not only what `parse` accepts: spaces around it, quotes inside.
            let mut text = IdempotencyKey::room_for(key.len());
            text.push_str(&key);
            let quoted = IdempotencyKey(text).to_header_value();
            let reparsed = IdempotencyKey::parse(quoted.as_bytes()).expect("quoted form parses");
            prop_assert_eq!(reparsed.as_str(), key.as_str());
            // Unquoted, an accepted key is the value without surrounding spaces.
            if let (false, Ok(bare)) = (key.trim_start().starts_with('"'), parsed) {
                prop_assert_eq!(bare.as_str(), key.trim_matches(|c| c == ' '));
            }
        }

        #[test]
        fn never_panics_and_accepts_only_valid_keys(raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(key) = IdempotencyKey::parse(&raw) {
                prop_assert!(!key.as_str().is_empty());
                prop_assert!(key.as_str().len() <= IdempotencyKey::MAX_LEN);
                prop_assert!(key.as_str().bytes().all(|b| (b' '..=b'~').contains(&b)));
            }
        }
    }
}
