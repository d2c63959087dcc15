//! Scopes: which client a key belongs to.

use std::fmt;
use std::sync::Arc;

use http::request::Parts;
use sha2::{Digest, Sha256};

/// The namespace an idempotency key lives in, so that one client can never see or block
/// another client's response under the same key.
///
/// A scope is a 128-bit digest of whatever identifies the client; the identifying value
/// itself (an `Authorization` header, an API key) is never stored. The default scope is
/// derived from the `Authorization` header; [`Builder::scope`](crate::Builder::scope)
/// chooses anything else (tenant, user id, API key).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Scope(pub(crate) [u8; 16]);

impl Scope {
    /// The scope of requests that carry no identifying value.
    pub fn anonymous() -> Self {
        static ANONYMOUS: std::sync::OnceLock<Scope> = std::sync::OnceLock::new();
        *ANONYMOUS.get_or_init(|| Self::digest(0, b""))
    }

    /// The scope of a client identified by `value` (an API key, a tenant id, ...).
    pub fn of(value: impl AsRef<[u8]>) -> Self {
        Self::digest(1, value.as_ref())
    }

    fn digest(tag: u8, value: &[u8]) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"idem-scope-v1");
        hasher.update([tag]);
        hasher.update(value);
        let digest = hasher.finalize();
        let mut out = [0; 16];
        out.copy_from_slice(&digest[..16]);
        Self(out)
    }

    /// The scope as 32 lowercase hex digits, the form used in store keys.
    pub fn to_hex(&self) -> String {
        let mut out = String::with_capacity(32);
        push_hex(&mut out, &self.0);
        out
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scope({})", self.to_hex())
    }
}

pub(crate) fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
}

/// How the scope of a request is found.
#[derive(Clone)]
pub(crate) enum ScopeRule {
    Authorization,
    Custom(Arc<dyn Fn(&Parts) -> Scope + Send + Sync>),
}

impl ScopeRule {
    pub(crate) fn scope_of(&self, parts: &Parts) -> Scope {
        match self {
            Self::Authorization => parts
                .headers
                .get(http::header::AUTHORIZATION)
                .map_or_else(Scope::anonymous, |value| Scope::of(value.as_bytes())),
            Self::Custom(rule) => rule(parts),
        }
    }
}

impl fmt::Debug for ScopeRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Authorization => f.write_str("Authorization"),
            Self::Custom(_) => f.write_str("Custom"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_differs_from_an_empty_value() {
        assert_ne!(Scope::anonymous(), Scope::of(""));
        assert_eq!(Scope::of("a"), Scope::of("a"));
        assert_ne!(Scope::of("a"), Scope::of("b"));
        assert_eq!(Scope::of("a").to_hex().len(), 32);
    }

    #[test]
    fn default_rule_hashes_authorization() {
        let (mut parts, ()) = http::Request::new(()).into_parts();
        let rule = ScopeRule::Authorization;
        assert_eq!(rule.scope_of(&parts), Scope::anonymous());
        parts
            .headers
            .insert(http::header::AUTHORIZATION, "Bearer alice".parse().unwrap());
        let alice = rule.scope_of(&parts);
        assert_eq!(alice, Scope::of("Bearer alice"));
        assert!(!alice.to_hex().contains("alice"));
    }
}
