//! Request fingerprints: what makes two requests "the same request".

use std::fmt;

use http::Method;
use sha2::{Digest, Sha256};

/// SHA-256 over the method, the path and query, and the body of a request.
///
/// Two requests with the same key must have the same fingerprint; otherwise the second
/// one is refused with `422`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub(crate) [u8; 32]);

impl Fingerprint {
    /// Fingerprints a request under `mode`, its body taken byte for byte (see
    /// [`Fingerprint::of_request`] for multipart bodies).
    pub fn of(mode: &FingerprintMode, method: &Method, path_and_query: &str, body: &[u8]) -> Self {
        Self::of_request(mode, method, path_and_query, None, body)
    }

    /// Fingerprints a request under `mode`, knowing its `Content-Type`. A multipart body
    /// (`multipart/form-data; boundary=...`) counts by its parts, each with its headers
    /// and content, never by its boundary: HTTP clients choose a new boundary on every
    /// send, and a retry of the same form must be the same request.
    pub fn of_request(
        mode: &FingerprintMode,
        method: &Method,
        path_and_query: &str,
        content_type: Option<&[u8]>,
        body: &[u8],
    ) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"idem-fp-v1\0");
        hasher.update(method.as_str());
        hasher.update(b"\0");
        hasher.update(path_and_query);
        hasher.update(b"\0");
        if let Some(content_type) = content_type
            && hash_multipart(&mut hasher, content_type, body)
        {
            return Self(hasher.finalize().into());
        }
        let raw = |hasher: &mut Sha256| {
            hasher.update(b"raw\0");
            hasher.update(body);
        };
        match mode {
            FingerprintMode::Exact => raw(&mut hasher),
            FingerprintMode::CanonicalJson => match canonical::document(body) {
                Some(canonical) => {
                    hasher.update(b"jcs2\0");
                    hasher.update(canonical);
                }
                None => raw(&mut hasher),
            },
            FingerprintMode::JsonFields(fields) => match canonical::parse(body) {
                Some(document) => {
                    hasher.update(b"fields2\0");
                    for pointer in &fields.pointers {
                        // A field too deep to canonicalize counts by its text, never as
                        // missing.
                        let field =
                            canonical::pointer(document, pointer).map(|field| match field {
                                canonical::Field::Value(field) => canonical::value(field.get())
                                    .unwrap_or_else(|| {
                                        [b"raw:".as_slice(), field.get().as_bytes()].concat()
                                    }),
                                // Never equal to a value: those start with a JSON character
                                // or `raw:`.
                                canonical::Field::Ambiguous(object) => {
                                    [b"ambiguous:".as_slice(), object.get().as_bytes()].concat()
                                }
                            });
                        hasher.update((pointer.len() as u64).to_be_bytes());
                        hasher.update(pointer);
                        hasher.update([u8::from(field.is_some())]);
                        let field = field.unwrap_or_default();
                        hasher.update((field.len() as u64).to_be_bytes());
                        hasher.update(field);
                    }
                }
                None => raw(&mut hasher),
            },
        }
        Self(hasher.finalize().into())
    }

    /// Fingerprints the input of a [`once`](crate::Idempotency::once) operation, given as
    /// JSON: key order and spaces do not count. Never equal to a request's fingerprint.
    pub(crate) fn of_input(json: &[u8]) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"idem-once-v1\0");
        match canonical::document(json) {
            Some(canonical) => {
                hasher.update(b"jcs\0");
                hasher.update(canonical);
            }
            None => {
                hasher.update(b"raw\0");
                hasher.update(json);
            }
        }
        Self(hasher.finalize().into())
    }

    /// The raw digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// What the `Content-Type` says of a multipart body's boundary.
enum Boundary {
    /// Not `multipart/*`, or no `boundary` parameter: the body counts as any other.
    None,
    /// The one boundary every parser reads from this header.
    Usable(Vec<u8>),
    /// A boundary parsers could read differently (two `boundary` parameters, one inside
    /// another's quotes), or one RFC 2046 does not allow (over 70 characters, a character
    /// outside its set): the body counts byte for byte, with the header.
    Unusable,
}

/// The boundary of a `multipart/*` content type. Its parameters are read twice, split at
/// every `;` and split only outside quotes; only where both readings find one `boundary`
/// parameter, with one value, and no parameter names a boundary otherwise (RFC 2231's
/// `boundary*=` and `boundary*0=`, which some parsers prefer), is it usable. A header that
/// is not UTF-8 (obs-text in a quoted value) is not read at all: unusable.
fn multipart_boundary(content_type: &[u8]) -> Boundary {
    let essence_end = content_type
        .iter()
        .position(|&byte| byte == b';')
        .unwrap_or(content_type.len());
    if !content_type[..essence_end]
        .trim_ascii()
        .get(..10)
        .is_some_and(|start| start.eq_ignore_ascii_case(b"multipart/"))
    {
        return Boundary::None;
    }
    let Ok(content_type) = std::str::from_utf8(content_type) else {
        return Boundary::Unusable;
    };
    let names_a_boundary = |name: &str| name.trim().to_ascii_lowercase().starts_with("boundary");
    let is_boundary = |name: &str| name.trim().eq_ignore_ascii_case("boundary");
    let naive: Vec<(&str, &str)> = content_type
        .split(';')
        .skip(1)
        .map(|param| param.split_once('=').unwrap_or((param, "")))
        .filter(|(name, _)| names_a_boundary(name))
        .collect();
    let quoted: Vec<(String, String)> = quoted_params(content_type)
        .into_iter()
        .skip(1)
        .filter(|(name, _)| names_a_boundary(name))
        .collect();
    match (naive.as_slice(), quoted.as_slice()) {
        ([], []) => Boundary::None,
        ([(naive_name, naive)], [(name, value)])
            if is_boundary(naive_name) && is_boundary(name) =>
        {
            let naive = naive.trim();
            let unquoted = naive
                .strip_prefix('"')
                .and_then(|inner| inner.strip_suffix('"'))
                .unwrap_or(naive);
            let allowed =
                |byte: &u8| byte.is_ascii_alphanumeric() || b"'()+_,-./:=? ".contains(byte);
            if unquoted == value
                && (1..=70).contains(&value.len())
                && value.bytes().all(|byte| allowed(&byte))
                && !value.ends_with(' ')
            {
                Boundary::Usable(value.as_bytes().to_vec())
            } else {
                Boundary::Unusable
            }
        }
        _ => Boundary::Unusable,
    }
}

/// `value`'s `;`-separated parts split outside quoted strings (RFC 9110), each as a name
/// and its value unquoted (`\` escapes undone); the first part is the media type, with an
/// empty value.
fn quoted_params(value: &str) -> Vec<(String, String)> {
    let mut params = Vec::new();
    let (mut name, mut current) = (String::new(), String::new());
    let (mut in_name, mut quoted, mut escaped) = (true, false, false);
    for c in value.chars() {
        if escaped {
            current.push(c);
            escaped = false;
        } else if quoted {
            match c {
                '\\' => escaped = true,
                '"' => quoted = false,
                c => current.push(c),
            }
        } else {
            match c {
                ';' => {
                    params.push(finish(&mut name, &mut current, in_name));
                    in_name = true;
                }
                '=' if in_name => {
                    name = std::mem::take(&mut current);
                    in_name = false;
                }
                '"' if !in_name => quoted = true,
                c => current.push(c),
            }
        }
    }
    params.push(finish(&mut name, &mut current, in_name));
    params
}

/// One parameter read by [`quoted_params`]: its name and value, trimmed.
fn finish(name: &mut String, current: &mut String, in_name: bool) -> (String, String) {
    let (name, value) = if in_name {
        (std::mem::take(current), String::new())
    } else {
        (std::mem::take(name), std::mem::take(current))
    };
    (name.trim().to_owned(), value.trim().to_owned())
}

/// Hashes a multipart body part by part: the text between delimiters, each with its
/// length, so that the boundary itself never counts. `false` (nothing hashed) when the
/// body is not multipart, or holds no delimiter: it then counts as any other body (no
/// parser finds a part in it, whatever its boundary).
///
/// A delimiter is `--boundary` at the start of the body or after CRLF (RFC 2046),
/// followed by `--` (the last one) or by CRLF, either after spaces or tabs, or by the end
/// of the body. The boundary may be dropped only there: a field whose value held its own
/// form's boundary as a delimiter would otherwise read the same as another form's value
/// holding that form's, and two requests would pass for one. So where `--boundary`, in
/// any letter case (for parsers that ignore case), appears anywhere else, or the header's
/// boundary is not one every parser reads alike, the body counts byte for byte together
/// with its `Content-Type`. (The boundary's text without its `--` is data to every parser,
/// and counts as such.)
fn hash_multipart(hasher: &mut Sha256, content_type: &[u8], body: &[u8]) -> bool {
    let boundary = match multipart_boundary(content_type) {
        Boundary::None => return false,
        Boundary::Usable(boundary) => boundary,
        Boundary::Unusable => {
            hash_with_content_type(hasher, content_type, body);
            return true;
        }
    };
    let dashed = [b"--".as_slice(), &boundary].concat();
    let mut segments = Vec::new();
    let mut segment_start = 0;
    while let Some(at) =
        find_ignoring_case(&body[segment_start..], &dashed).map(|at| segment_start + at)
    {
        if !is_delimiter(body, &dashed, at) {
            hash_with_content_type(hasher, content_type, body);
            return true;
        }
        // The text before `--boundary`, as earlier versions hashed it (with the CRLF).
        segments.push(&body[segment_start..at]);
        segment_start = at + dashed.len();
    }
    if segments.is_empty() {
        return false;
    }
    segments.push(&body[segment_start..]);
    hasher.update(b"multipart\0");
    hasher.update((segments.len() as u64).to_be_bytes());
    for segment in segments {
        hasher.update((segment.len() as u64).to_be_bytes());
        hasher.update(segment);
    }
    true
}

/// A multipart body whose boundary counts: the body with its `Content-Type`, each with
/// its length.
fn hash_with_content_type(hasher: &mut Sha256, content_type: &[u8], body: &[u8]) {
    hasher.update(b"multipart-raw\0");
    hasher.update((content_type.len() as u64).to_be_bytes());
    hasher.update(content_type);
    hasher.update(body);
}

/// Whether `--boundary` found at `at` (in some letter case) is a delimiter: written
/// exactly, at the start of the body or after CRLF, and followed by `--` or CRLF, either
/// after spaces or tabs, or by the end of the body. Anywhere else a parser could read it
/// as data, or as a delimiter where another does not.
fn is_delimiter(body: &[u8], dashed: &[u8], at: usize) -> bool {
    let end = at + dashed.len();
    if body.get(at..end) != Some(dashed) {
        return false;
    }
    let line_start = at == 0 || (at >= 2 && &body[at - 2..at] == b"\r\n");
    let mut after = &body[end..];
    if let Some(rest) = after.strip_prefix(b"--") {
        after = rest;
    }
    let padding = after
        .iter()
        .take_while(|byte| matches!(byte, b' ' | b'\t'))
        .count();
    let after = &after[padding..];
    line_start && (after.is_empty() || after.starts_with(b"\r\n"))
}

/// Where `needle` (not empty) first occurs in `haystack`, ASCII letters in any case.
fn find_ignoring_case(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let first = needle.first()?.to_ascii_lowercase();
    haystack.windows(needle.len()).position(|window| {
        window[0].to_ascii_lowercase() == first && window.eq_ignore_ascii_case(needle)
    })
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut hex = String::with_capacity(64);
        crate::scope::push_hex(&mut hex, &self.0);
        write!(f, "Fingerprint({hex})")
    }
}

/// Which parts of the body count towards the fingerprint.
///
/// In both JSON modes numbers are compared exactly, as decimal values, never through
/// floating point: `9007199254740993` and `9007199254740992` differ, `1.50` and `1.5` and
/// `15e-1` do not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum FingerprintMode {
    /// Every byte of the body (the default).
    #[default]
    Exact,
    /// The body as canonical JSON: object key order and white space are ignored, array
    /// order is kept, numbers compare by value. A body that is not JSON counts byte for
    /// byte.
    CanonicalJson,
    /// Only the JSON fields at these JSON pointers (RFC 6901); made by
    /// [`FingerprintMode::json_fields`], which checks them.
    JsonFields(JsonFields),
}

impl FingerprintMode {
    /// Only the fields at these JSON pointers (RFC 6901, such as `/amount_cents` or
    /// `/items/0/sku`) count, each as canonical JSON; a missing field counts as missing.
    /// A body that is not JSON counts byte for byte.
    ///
    /// A pointer that is not RFC 6901 (one without its leading `/`, or with a `~` not
    /// followed by `0` or `1`) is refused, with the pointer named.
    ///
    /// ```
    /// use idem_runtime::FingerprintMode;
    ///
    /// let mode = FingerprintMode::json_fields(["/amount_cents", "/currency"])?;
    /// let error = FingerprintMode::json_fields(["amount_cents"]).unwrap_err();
    /// assert!(error.to_string().contains("\"amount_cents\""));
    /// # Ok::<(), idem_runtime::fingerprint::PointerError>(())
    /// ```
    pub fn json_fields<I, P>(pointers: I) -> Result<Self, PointerError>
    where
        I: IntoIterator<Item = P>,
        P: Into<String>,
    {
        let pointers = pointers
            .into_iter()
            .map(|pointer| {
                let pointer = pointer.into();
                if is_json_pointer(&pointer) {
                    Ok(pointer)
                } else {
                    Err(PointerError { pointer })
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Self::JsonFields(JsonFields { pointers }))
    }
}

/// The checked JSON pointers of [`FingerprintMode::JsonFields`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonFields {
    pointers: Vec<String>,
}

impl JsonFields {
    /// The pointers, in the order given.
    pub fn pointers(&self) -> &[String] {
        &self.pointers
    }
}

/// A string that is not an RFC 6901 JSON pointer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{pointer:?} is not a JSON pointer: write it as \"/field\" or \"/outer/inner\" (RFC 6901; `~` only as `~0` or `~1`)"
)]
pub struct PointerError {
    pointer: String,
}

fn is_json_pointer(pointer: &str) -> bool {
    if pointer.is_empty() {
        return true;
    }
    if !pointer.starts_with('/') {
        return false;
    }
    let mut chars = pointer.chars();
    while let Some(c) = chars.next() {
        if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
            return false;
        }
    }
    true
}

/// Canonical JSON with exact numbers, on serde_json's parser: each value is read once as
/// raw text, containers are opened level by level, and numbers are rewritten from their
/// digits, never through floating point.
mod canonical {
    use std::fmt;

    use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
    use serde_json::value::RawValue;

    /// An object's members in the order written, repeated names kept.
    struct Entries<'a>(Vec<(String, &'a RawValue)>);

    impl<'de: 'a, 'a> Deserialize<'de> for Entries<'a> {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct EntriesVisitor;
            impl<'de> Visitor<'de> for EntriesVisitor {
                type Value = Entries<'de>;

                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a JSON object")
                }

                fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                    let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
                    while let Some(entry) = map.next_entry::<String, &'de RawValue>()? {
                        entries.push(entry);
                    }
                    Ok(Entries(entries))
                }
            }
            deserializer.deserialize_map(EntriesVisitor)
        }
    }

    /// The body parsed just enough to walk it, or `None` where it is not JSON.
    pub(super) fn parse(body: &[u8]) -> Option<&RawValue> {
        serde_json::from_slice::<&RawValue>(body).ok()
    }

    /// The canonical form of a whole body, or `None` where it is not JSON.
    pub(super) fn document(body: &[u8]) -> Option<Vec<u8>> {
        value(parse(body)?.get())
    }

    /// How deeply arrays and objects may nest: serde_json's own limit. A deeper body is
    /// fingerprinted byte for byte (never parsed level by level without bound).
    const MAX_DEPTH: usize = 128;

    /// The canonical form of one JSON value given as valid JSON text.
    pub(super) fn value(raw: &str) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(raw.len());
        write(raw, &mut out, 0)?;
        Some(out)
    }

    fn write(raw: &str, out: &mut Vec<u8>, depth: usize) -> Option<()> {
        let first = *raw.as_bytes().first()?;
        if matches!(first, b'{' | b'[') && depth >= MAX_DEPTH {
            return None;
        }
        match first {
            b'{' => {
                let Entries(mut object) = serde_json::from_str(raw).ok()?;
                object.sort_by(|a, b| a.0.cmp(&b.0));
                // A name given twice has no one meaning (parsers keep the first, the last,
                // or refuse): such a body counts byte for byte, never as another body.
                if object.windows(2).any(|pair| pair[0].0 == pair[1].0) {
                    return None;
                }
                out.push(b'{');
                for (n, (name, value)) in object.iter().enumerate() {
                    if n > 0 {
                        out.push(b',');
                    }
                    serde_json::to_writer(&mut *out, name).ok()?;
                    out.push(b':');
                    write(value.get(), out, depth + 1)?;
                }
                out.push(b'}');
            }
            b'[' => {
                let array: Vec<&RawValue> = serde_json::from_str(raw).ok()?;
                out.push(b'[');
                for (n, value) in array.iter().enumerate() {
                    if n > 0 {
                        out.push(b',');
                    }
                    write(value.get(), out, depth + 1)?;
                }
                out.push(b']');
            }
            b'"' => {
                let string: String = serde_json::from_str(raw).ok()?;
                serde_json::to_writer(&mut *out, &string).ok()?;
            }
            b't' | b'f' | b'n' => out.extend_from_slice(raw.as_bytes()),
            _ => number(raw, out),
        }
        Some(())
    }

    /// A JSON number as `[-]digits e exponent`, with no leading or trailing zeros in the
    /// digits: one form per decimal value (`1.50`, `1.5` and `15e-1` meet; `-0` is `0`).
    /// An exponent too large for 64 bits keeps the number's text as it was written.
    fn number(raw: &str, out: &mut Vec<u8>) {
        let (negative, unsigned) = match raw.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, raw),
        };
        let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
            Some(at) => (&unsigned[..at], &unsigned[at + 1..]),
            None => (unsigned, "0"),
        };
        let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let exponent = exponent
            .strip_prefix('+')
            .unwrap_or(exponent)
            .parse::<i64>()
            .ok()
            .and_then(|e| e.checked_sub(i64::try_from(fraction.len()).ok()?));
        let Some(mut exponent) = exponent else {
            out.extend_from_slice(b"n:");
            out.extend_from_slice(raw.as_bytes());
            return;
        };
        let digits: Vec<u8> = whole.bytes().chain(fraction.bytes()).collect();
        let start = digits.iter().position(|&d| d != b'0');
        let Some(start) = start else {
            out.push(b'0');
            return;
        };
        let end = digits
            .iter()
            .rposition(|&d| d != b'0')
            .map_or(start, |e| e + 1);
        let Some(shifted) = i64::try_from(digits.len() - end)
            .ok()
            .and_then(|zeros| exponent.checked_add(zeros))
        else {
            out.extend_from_slice(b"n:");
            out.extend_from_slice(raw.as_bytes());
            return;
        };
        exponent = shifted;
        if negative {
            out.push(b'-');
        }
        out.extend_from_slice(&digits[start..end]);
        out.push(b'e');
        out.extend_from_slice(exponent.to_string().as_bytes());
    }

    /// The value at an RFC 6901 `pointer` (already checked) in `document`.
    /// What a JSON pointer finds.
    pub(super) enum Field<'a> {
        /// The value at the pointer.
        Value(&'a RawValue),
        /// A container on the way names the next step twice, or cannot be read into names
        /// and items (a name holding a lone UTF-16 surrogate, which the raw parse takes):
        /// this container, counted by its text, never as missing.
        Ambiguous(&'a RawValue),
    }

    pub(super) fn pointer<'a>(document: &'a RawValue, pointer: &str) -> Option<Field<'a>> {
        let mut current = document;
        for token in pointer.split('/').skip(1) {
            let token = token.replace("~1", "/").replace("~0", "~");
            current = match current.get().as_bytes().first()? {
                b'{' => {
                    let Ok(Entries(object)) = serde_json::from_str(current.get()) else {
                        return Some(Field::Ambiguous(current));
                    };
                    let mut named = object.into_iter().filter(|(name, _)| *name == token);
                    let (_, value) = named.next()?;
                    if named.next().is_some() {
                        return Some(Field::Ambiguous(current));
                    }
                    value
                }
                b'[' => {
                    if token.len() > 1 && token.starts_with('0') {
                        return None;
                    }
                    let index: usize = token.parse().ok()?;
                    let Ok(array) = serde_json::from_str::<Vec<&'a RawValue>>(current.get()) else {
                        return Some(Field::Ambiguous(current));
                    };
                    *array.get(index)?
                }
                _ => return None,
            };
        }
        Some(Field::Value(current))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(mode: &FingerprintMode, method: Method, path: &str, body: &str) -> Fingerprint {
        Fingerprint::of(mode, &method, path, body.as_bytes())
    }

    #[test]
    fn repeated_names_never_meet_another_body() {
        let mode = FingerprintMode::CanonicalJson;
        let repeated = fp(&mode, Method::POST, "/p", r#"{"amount":1,"amount":500}"#);
        assert_ne!(repeated, fp(&mode, Method::POST, "/p", r#"{"amount":500}"#));
        assert_ne!(repeated, fp(&mode, Method::POST, "/p", r#"{"amount":1}"#));
        assert_eq!(
            fp(&mode, Method::POST, "/p", r#"{"b":1,"a":2}"#),
            fp(&mode, Method::POST, "/p", r#"{ "a": 2, "b": 1 }"#)
        );
        let fields = FingerprintMode::json_fields(["/a"]).unwrap();
        let twice = fp(&fields, Method::POST, "/p", r#"{"a":1,"a":2}"#);
        assert_ne!(twice, fp(&fields, Method::POST, "/p", r#"{"a":2}"#));
        assert_ne!(
            twice,
            fp(&fields, Method::POST, "/p", r#"{"a":{"a":1,"a":2}}"#)
        );
    }

    /// A name holding a lone UTF-16 surrogate (`"\udc00"`) passes the raw parse but not a
    /// read into names: the fields below such an object count by its text, never as
    /// missing, so two amounts never share a fingerprint.
    #[test]
    fn fields_under_an_unreadable_object_are_never_missing() {
        let fields = FingerprintMode::json_fields(["/amount", "/order/id"]).unwrap();
        let body = |amount: u32, id: u32| {
            format!(r#"{{"amount":{amount},"order":{{"id":{id},"\udc00":"x"}},"\udc00":"x"}}"#)
        };
        let first = fp(&fields, Method::POST, "/p", &body(500, 7));
        assert_ne!(first, fp(&fields, Method::POST, "/p", &body(1, 7)));
        assert_ne!(first, fp(&fields, Method::POST, "/p", &body(500, 8)));
        assert_eq!(first, fp(&fields, Method::POST, "/p", &body(500, 7)));
        let surrogate_in_array = |amount: u32| format!(r#"{{"order":[{{"\udc00":{amount}}}]}}"#);
        let in_array = FingerprintMode::json_fields(["/order/0"]).unwrap();
        assert_ne!(
            fp(&in_array, Method::POST, "/p", &surrogate_in_array(1)),
            fp(&in_array, Method::POST, "/p", &surrogate_in_array(2))
        );
    }

    #[test]
    fn multipart_counts_parts_not_the_boundary() {
        let form = |boundary: &str, quoted: bool, amount: &str| {
            let body = format!(
                "--{boundary}\r\ncontent-disposition: form-data; name=\"amount\"\r\n\r\n{amount}\r\n--{boundary}--\r\n"
            );
            let content_type = if quoted {
                format!("Multipart/Form-Data; charset=utf-8; Boundary=\"{boundary}\"")
            } else {
                format!("multipart/form-data; boundary={boundary}")
            };
            typed(content_type.as_bytes(), &body)
        };
        assert_eq!(
            form("XyZ123", false, "1200"),
            form("other-boundary", true, "1200")
        );
        assert_ne!(form("XyZ123", false, "1200"), form("XyZ123", false, "1201"));
        // Not multipart, or no delimiter in the body: byte for byte, as before.
        let plain = Fingerprint::of(&FingerprintMode::Exact, &Method::POST, "/pay", b"--a");
        assert_eq!(plain, typed(b"multipart/form-data; boundary=zzz", "--a"));
    }

    /// The fingerprint of `body` posted to `/pay` with `content_type`.
    fn typed(content_type: &[u8], body: &str) -> Fingerprint {
        Fingerprint::of_request(
            &FingerprintMode::Exact,
            &Method::POST,
            "/pay",
            Some(content_type),
            body.as_bytes(),
        )
    }

    /// A multipart fingerprint of `body` under `boundary`.
    fn multipart(boundary: &str, body: &str) -> Fingerprint {
        typed(
            format!("multipart/form-data; boundary={boundary}").as_bytes(),
            body,
        )
    }

    /// A form with an `amount` and a `memo`, a preamble and an epilogue.
    fn memo_form(boundary: &str, memo: &str) -> String {
        format!(
            "preamble\r\n--{boundary}\r\ncontent-disposition: form-data; name=\"amount\"\r\n\r\n\
             1200\r\n--{boundary}  \r\ncontent-disposition: form-data; name=\"memo\"\r\n\r\n\
             {memo}\r\n--{boundary}--\r\nepilogue"
        )
    }

    #[test]
    fn a_boundary_counts_for_nothing_only_as_a_delimiter() {
        // Where the boundary can only be a delimiter, it counts for nothing.
        assert_eq!(
            multipart("AAAA", &memo_form("AAAA", "invoice 1")),
            multipart("b-B.9", &memo_form("b-B.9", "invoice 1"))
        );
        // Its text without `--` is data to every parser: the same form, the same request.
        for (a, b) in [("x", "y"), ("data", "atad")] {
            assert_eq!(
                multipart(a, &memo_form(a, "a box of form-data")),
                multipart(b, &memo_form(b, "a box of form-data")),
                "{a} and {b}"
            );
        }
        // A memo holding its own form's `--boundary` off a delimiter: two forms, two
        // requests; and the same bytes under another boundary are another request.
        let holding = [
            |b: &str| format!("invoice--{b}-1"),
            |b: &str| format!("line\r\n--{b}x"),
            |b: &str| format!("line\r\n--{b}--x"),
            |b: &str| format!("line\n--{b}\r\n"),
            |b: &str| format!("line\r\n--{}\r\n", b.to_ascii_lowercase()),
        ];
        for memo in holding {
            let (a, b) = (memo("AAAA"), memo("BBBB"));
            let body = memo_form("AAAA", &a);
            assert_ne!(
                multipart("AAAA", &body),
                multipart("BBBB", &memo_form("BBBB", &b)),
                "{a:?} and {b:?}"
            );
            assert_ne!(multipart("AAAA", &body), multipart("BBBB", &body), "{a:?}");
        }
    }

    /// The same bytes under two boundaries, each of which a parser reads as delimiting a
    /// different form (the other one then preamble or epilogue), are two requests.
    #[test]
    fn the_same_bytes_under_two_boundaries_are_two_requests() {
        let one = memo_form("AAAA", "1");
        let two = memo_form("BBBB", "2");
        let body = format!("{one}\r\n{two}\r\nxAAAA xBBBB");
        assert_ne!(multipart("AAAA", &body), multipart("BBBB", &body));
    }

    /// A `Content-Type` whose boundary parsers could read differently, or which RFC 2046
    /// does not allow, makes the body count with the header: never two readings, one
    /// fingerprint.
    #[test]
    fn an_unusable_boundary_counts_with_the_header() {
        let with = |content_type: &str, body: &str| typed(content_type.as_bytes(), body);
        // A `boundary=` inside another parameter's quotes.
        let tricky = r#"multipart/form-data; x="a;boundary=AAAA;b"; boundary=ZZZZ"#;
        let memo = |inner: &str| memo_form("ZZZZ", &format!("pay\r\n--{inner}\r\nto bob"));
        assert_ne!(with(tricky, &memo("AAAA")), with(tricky, &memo("CCCC")));
        // Over 70 characters: the same bytes under two such boundaries differ.
        let (long_a, long_b) = ("a".repeat(71), "b".repeat(71));
        let body = format!("{}\r\n{}", memo_form(&long_a, "1"), memo_form(&long_b, "2"));
        assert_ne!(
            with(&format!("multipart/form-data; boundary={long_a}"), &body),
            with(&format!("multipart/form-data; boundary={long_b}"), &body)
        );
        // RFC 2231's forms, which some parsers read, alone or beside a plain one.
        let body = format!("{}\r\n{}", memo_form("AAAA", "1"), memo_form("BBBB", "2"));
        for (a, b) in [
            ("boundary*=utf-8''AAAA", "boundary*=utf-8''BBBB"),
            (
                "boundary*0=AA; boundary*1=AA",
                "boundary*0=BB; boundary*1=BB",
            ),
            (
                "boundary=AAAA; boundary*=utf-8''ZZZZ",
                "boundary=BBBB; boundary*=utf-8''ZZZZ",
            ),
        ] {
            assert_ne!(
                with(&format!("multipart/form-data; {a}"), &body),
                with(&format!("multipart/form-data; {b}"), &body),
                "{a} and {b}"
            );
        }
        // A header that is not UTF-8 (obs-text in a quoted value) counts with the body.
        let latin = |boundary: &str| {
            let mut content_type =
                format!("multipart/form-data; boundary={boundary}; x=\"caf").into_bytes();
            content_type.extend_from_slice(b"\xe9\"");
            typed(&content_type, &body)
        };
        assert_ne!(latin("AAAA"), latin("BBBB"));
        // Characters a header cannot carry, through this public function: no panic.
        let crlf = "multipart/form-data; boundary=\"\r\n--\"";
        let _ = with(crlf, "--\r\n--\r\n--");
        // Quoted and unquoted, the same boundary.
        assert_eq!(
            with(
                r#"multipart/form-data; boundary="AAAA""#,
                &memo_form("AAAA", "1")
            ),
            multipart("AAAA", &memo_form("AAAA", "1"))
        );
    }

    /// Forms whose boundary appears only in delimiters hash as earlier versions hashed
    /// them (text between `--boundary`s, each with its length), so that a retry across an
    /// upgrade is still the same request.
    #[test]
    fn well_formed_forms_hash_as_before() {
        fn before(boundary: &str, body: &str) -> Fingerprint {
            let delimiter = format!("--{boundary}");
            let segments: Vec<&str> = body.split(delimiter.as_str()).collect();
            let mut hasher = Sha256::new();
            hasher.update(b"idem-fp-v1\0POST\0/pay\0multipart\0");
            hasher.update((segments.len() as u64).to_be_bytes());
            for segment in segments {
                hasher.update((segment.len() as u64).to_be_bytes());
                hasher.update(segment);
            }
            Fingerprint(hasher.finalize().into())
        }
        for boundary in ["AAAA", "----WebKitFormBoundary7MA4YWxk", "x"] {
            for memo in ["invoice 1", "", "two\r\nlines"] {
                let body = memo_form(boundary, memo);
                assert_eq!(
                    multipart(boundary, &body),
                    before(boundary, &body),
                    "{body:?}"
                );
            }
        }
    }

    #[test]
    fn exact_mode_sees_every_part() {
        let m = FingerprintMode::Exact;
        let base = fp(&m, Method::POST, "/pay", "{\"a\":1}");
        assert_eq!(base, fp(&m, Method::POST, "/pay", "{\"a\":1}"));
        assert_ne!(base, fp(&m, Method::PUT, "/pay", "{\"a\":1}"));
        assert_ne!(base, fp(&m, Method::POST, "/pay?x=1", "{\"a\":1}"));
        assert_ne!(base, fp(&m, Method::POST, "/pay", "{\"a\": 1}"));
        // The separator keeps path and body apart.
        assert_ne!(
            fp(&m, Method::POST, "/a", "b"),
            fp(&m, Method::POST, "/ab", "")
        );
    }

    #[test]
    fn canonical_json_ignores_order_and_space_not_array_order() {
        let m = FingerprintMode::CanonicalJson;
        let base = fp(&m, Method::POST, "/p", r#"{"a":1,"b":[1,2]}"#);
        assert_eq!(
            base,
            fp(&m, Method::POST, "/p", "{ \"b\": [1, 2],\n \"a\": 1 }")
        );
        assert_ne!(base, fp(&m, Method::POST, "/p", r#"{"a":1,"b":[2,1]}"#));
        assert_ne!(base, fp(&m, Method::POST, "/p", r#"{"a":2,"b":[1,2]}"#));
        let not_json = fp(&m, Method::POST, "/p", "a=1");
        assert_eq!(
            not_json,
            fp(&FingerprintMode::Exact, Method::POST, "/p", "a=1")
        );
    }

    #[test]
    fn chosen_fields_only() {
        let m = FingerprintMode::json_fields(["/amount", "/currency"]).unwrap();
        let base = fp(
            &m,
            Method::POST,
            "/p",
            r#"{"amount":5,"currency":"EUR","note":"x"}"#,
        );
        assert_eq!(
            base,
            fp(
                &m,
                Method::POST,
                "/p",
                r#"{"currency":"EUR","amount":5,"note":"y"}"#
            )
        );
        assert_ne!(
            base,
            fp(&m, Method::POST, "/p", r#"{"amount":6,"currency":"EUR"}"#)
        );
        assert_ne!(base, fp(&m, Method::POST, "/p", r#"{"amount":5}"#));
        assert_ne!(
            fp(&m, Method::POST, "/p", r#"{"amount":null}"#),
            fp(&m, Method::POST, "/p", r#"{}"#)
        );
    }
}
