//! Request fingerprints: what makes two requests "the same request".

use std::fmt;

use bytes::Bytes;
use http::Method;
use sha2::{Digest, Sha256};

/// SHA-256 over the method, the path and query, and the body of a request.
///
/// Two requests with the same key must have the same fingerprint; otherwise the second
/// one is refused with `422`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub(crate) [u8; 32]);

impl Fingerprint {
    /// Fingerprints a request under `mode`.
    pub fn of(mode: &FingerprintMode, method: &Method, path_and_query: &str, body: &[u8]) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"idem-fp-v1\0");
        hasher.update(method.as_str());
        hasher.update(b"\0");
        hasher.update(path_and_query);
        hasher.update(b"\0");
        match mode {
            FingerprintMode::Exact => {
                hasher.update(b"raw\0");
                hasher.update(body);
            }
            FingerprintMode::CanonicalJson => match canonical_json(body) {
                Some(canonical) => {
                    hasher.update(b"jcs\0");
                    hasher.update(canonical);
                }
                None => {
                    hasher.update(b"raw\0");
                    hasher.update(body);
                }
            },
            FingerprintMode::JsonFields(pointers) => {
                match serde_json::from_slice::<serde_json::Value>(body) {
                    Ok(value) => {
                        hasher.update(b"fields\0");
                        for pointer in pointers {
                            let field = value.pointer(pointer);
                            let canonical = field
                                .and_then(|field| serde_json_canonicalizer::to_vec(field).ok())
                                .unwrap_or_default();
                            hasher.update((pointer.len() as u64).to_be_bytes());
                            hasher.update(pointer);
                            hasher.update([u8::from(field.is_some())]);
                            hasher.update((canonical.len() as u64).to_be_bytes());
                            hasher.update(canonical);
                        }
                    }
                    Err(_) => {
                        hasher.update(b"raw\0");
                        hasher.update(body);
                    }
                }
            }
        }
        Self(hasher.finalize().into())
    }

    /// The raw digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut hex = String::with_capacity(64);
        crate::scope::push_hex(&mut hex, &self.0);
        write!(f, "Fingerprint({hex})")
    }
}

fn canonical_json(body: &[u8]) -> Option<Vec<u8>> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    serde_json_canonicalizer::to_vec(&value).ok()
}

/// Which parts of the body count towards the fingerprint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum FingerprintMode {
    /// Every byte of the body (the default).
    #[default]
    Exact,
    /// The body as canonical JSON (RFC 8785): object key order and white space are
    /// ignored, array order is kept. A body that is not JSON counts byte for byte.
    CanonicalJson,
    /// Only the JSON fields at these JSON pointers (RFC 6901), such as `/amount_cents`;
    /// a missing field counts as missing. A body that is not JSON counts byte for byte.
    JsonFields(Vec<String>),
}

/// Holds a request body that the layer buffered, for the fingerprint.
#[derive(Debug, Clone)]
pub(crate) enum BufferedBody {
    Complete(Bytes),
    TooLarge,
    Failed,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(mode: &FingerprintMode, method: Method, path: &str, body: &str) -> Fingerprint {
        Fingerprint::of(mode, &method, path, body.as_bytes())
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
        let m = FingerprintMode::JsonFields(vec!["/amount".into(), "/currency".into()]);
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
