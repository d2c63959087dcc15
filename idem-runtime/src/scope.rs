//! Scopes: which client a key belongs to.

use std::fmt;
use std::sync::Arc;

use http::request::Parts;
use sha2::{Digest, Sha256};

/// The namespace an idempotency key lives in, so that one client can never see or block
/// another client's response under the same key.
///
/// A scope is a 128-bit digest of whatever identifies the client, and of the host the
/// request was sent to; the identifying value itself (an `Authorization` header, a user
/// id) is never stored. How a request's scope is found:
///
/// 1. A [`Principal`] in the request's extensions, put there by the application's
///    authentication middleware: the recommended setup.
/// 2. Otherwise a digest of the `Authorization` header: right for long-lived API keys,
///    wrong for short-lived tokens (a refreshed token would make a retry a new request).
/// 3. Otherwise the request has no identity and is refused with a problem response,
///    unless the application opted in to one shared scope
///    ([`IdempotencyBuilder::shared_scope`](crate::IdempotencyBuilder::shared_scope)).
///
/// [`IdempotencyBuilder::scope`](crate::IdempotencyBuilder::scope) replaces 1 and 2 by a rule of your own.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Scope(pub(crate) [u8; 16]);

impl Scope {
    /// The scope of requests that carry no identifying value, where the application
    /// opted in to one shared scope.
    pub fn anonymous() -> Self {
        static ANONYMOUS: std::sync::OnceLock<Scope> = std::sync::OnceLock::new();
        *ANONYMOUS.get_or_init(|| Self::digest(0, b"", b""))
    }

    /// The scope of a client identified by `value` (an API key, a tenant id, ...), as a
    /// [`IdempotencyBuilder::scope`](crate::IdempotencyBuilder::scope) rule returns it. Each source of identity
    /// hashes into a domain of its own: a value equal to a principal's id or to another
    /// client's `Authorization` header never yields that client's scope.
    pub fn of(value: impl AsRef<[u8]>) -> Self {
        Self::digest(1, value.as_ref(), b"")
    }

    /// The one scope of every [`once`](crate::Idempotency::once) key: a domain of its own,
    /// never the scope of a request.
    pub(crate) fn of_once() -> Self {
        static ONCE: std::sync::OnceLock<Scope> = std::sync::OnceLock::new();
        *ONCE.get_or_init(|| Self::digest(5, b"", b""))
    }

    /// The scope of an `Authorization` header value.
    pub(crate) fn of_authorization(value: &[u8]) -> Self {
        Self::digest(3, value, b"")
    }

    /// The scope of a [`Principal`]'s id.
    pub(crate) fn of_principal(id: &[u8]) -> Self {
        Self::digest(4, id, b"")
    }

    /// This scope on `host` (a host name, without a port): requests to different hosts
    /// never share a scope. An empty host leaves the scope as it is. Host names compare
    /// without case; idem leaves the request's port out.
    pub fn on_host(self, host: impl AsRef<[u8]>) -> Self {
        let host = host.as_ref();
        if host.is_empty() {
            return self;
        }
        let lower = host.to_ascii_lowercase();
        Self::digest(2, &self.0, &lower)
    }

    fn digest(tag: u8, value: &[u8], host: &[u8]) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"idem-scope-v1");
        hasher.update([tag]);
        hasher.update((value.len() as u64).to_be_bytes());
        hasher.update(value);
        hasher.update(host);
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
    // A digest at a time, written at once: one capacity check, not one per digit.
    for chunk in bytes.chunks(32) {
        let mut digits = [0u8; 64];
        let digits = &mut digits[..2 * chunk.len()];
        write_hex(digits, chunk);
        // Hex digits are ASCII.
        out.push_str(std::str::from_utf8(digits).unwrap_or_default());
    }
}

/// Writes `bytes` into `out` in lowercase hex, two digits a byte, as far as `out` holds.
pub(crate) fn write_hex(out: &mut [u8], bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0xf)];
    }
}

/// The authenticated client a request belongs to, as the application's authentication
/// resolved it: put it in the request's extensions, and idem scopes keys by it.
///
/// Use a stable identity (a user or account id), never a credential: a refreshed token
/// must not turn a retry into a new request.
///
/// ```
/// use axum::{Router, extract::Request, middleware::{self, Next}, response::Response, routing::post};
/// use idem_runtime::{Idempotency, Principal, idempotent};
///
/// /// The app's own authentication: here, a made-up `x-user-id` header set by a gateway.
/// async fn authenticate(mut request: Request, next: Next) -> Response {
///     if let Some(user) = request.headers().get("x-user-id").cloned() {
///         request.extensions_mut().insert(Principal::new(user.as_bytes()));
///     }
///     next.run(request).await
/// }
///
/// #[idempotent]
/// async fn transfer(body: String) -> String {
///     body
/// }
///
/// let idem = Idempotency::in_memory();
/// let app: Router = Router::new()
///     .route("/transfers", post(transfer))
///     .layer(idem.layer())
///     .layer(middleware::from_fn(authenticate)); // runs before idem's layer
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Principal(Scope);

impl Principal {
    /// The principal identified by `id` (only its digest is kept).
    pub fn new(id: impl AsRef<[u8]>) -> Self {
        Self(Scope::of_principal(id.as_ref()))
    }

    /// The scope of this principal, before the host is taken into account.
    pub fn scope(&self) -> Scope {
        self.0
    }
}

impl fmt::Debug for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Principal").field(&self.0).finish()
    }
}

/// How the scope of a request is found: the rule, and what to do without an identity.
#[derive(Clone)]
pub(crate) struct ScopeRule {
    pub(crate) identity: Identity,
    pub(crate) shared: bool,
    pub(crate) by_host: bool,
}

/// An application's rule from a request to the scope of its client, if it has one.
pub(crate) type IdentityRule = dyn Fn(&Parts) -> Option<Scope> + Send + Sync;

#[derive(Clone)]
pub(crate) enum Identity {
    /// A [`Principal`] extension, else the `Authorization` header.
    Default,
    Custom(Arc<IdentityRule>),
}

impl Default for ScopeRule {
    fn default() -> Self {
        Self {
            identity: Identity::Default,
            shared: false,
            by_host: true,
        }
    }
}

impl ScopeRule {
    /// The scope of the request, or `None` where it has no identity and no shared scope
    /// was opted in to.
    pub(crate) fn scope_of(&self, parts: &Parts) -> Option<Scope> {
        let identity = match &self.identity {
            Identity::Default => parts
                .extensions
                .get::<Principal>()
                .map(Principal::scope)
                .or_else(|| {
                    parts
                        .headers
                        .get(http::header::AUTHORIZATION)
                        .map(http::HeaderValue::as_bytes)
                        .filter(|value| carries_credentials(value))
                        .map(Scope::of_authorization)
                }),
            Identity::Custom(rule) => rule(parts),
        };
        let scope = match identity {
            Some(scope) => scope,
            None if self.shared => Scope::anonymous(),
            None => return None,
        };
        if !self.by_host {
            return Some(scope);
        }
        let host = parts
            .headers
            .get(http::header::HOST)
            .map(http::HeaderValue::as_bytes)
            .or_else(|| parts.uri.authority().map(|a| a.as_str().as_bytes()))
            .unwrap_or_default();
        Some(scope.on_host(without_port(host)))
    }
}

/// Whether an `Authorization` value carries credentials: not empty (or blank), and not an
/// authentication scheme's name alone (`Bearer`). Every client that sends one of those
/// sends the same bytes: as a scope, it would be one shared by strangers.
fn carries_credentials(value: &[u8]) -> bool {
    /// The schemes of the IANA registry, and two in common use besides.
    const SCHEMES: [&str; 17] = [
        "basic",
        "bearer",
        "concealed",
        "digest",
        "dpop",
        "gnap",
        "hoba",
        "mutual",
        "negotiate",
        "ntlm",
        "oauth",
        "privatetoken",
        "scram-sha-1",
        "scram-sha-256",
        "token",
        "apikey",
        "vapid",
    ];
    let value = value.trim_ascii();
    !value.is_empty()
        && !SCHEMES
            .iter()
            .any(|scheme| value.eq_ignore_ascii_case(scheme.as_bytes()))
}

/// `host` without a `:port`: the same host reached on its default port with or without
/// the port written is one host.
fn without_port(host: &[u8]) -> &[u8] {
    if host.first() == Some(&b'[') {
        return host
            .iter()
            .position(|&b| b == b']')
            .map_or(host, |end| &host[..=end]);
    }
    match host.iter().rposition(|&b| b == b':') {
        Some(colon) if host[colon + 1..].iter().all(u8::is_ascii_digit) => &host[..colon],
        _ => host,
    }
}

impl fmt::Debug for ScopeRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let identity = match self.identity {
            Identity::Default => "Principal or Authorization",
            Identity::Custom(_) => "Custom",
        };
        f.debug_struct("ScopeRule")
            .field("identity", &identity)
            .field("shared", &self.shared)
            .field("by_host", &self.by_host)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_two_lowercase_digits_per_byte_in_order() {
        let bytes: Vec<u8> = (0..=255u8).chain([0, 15, 16, 0xab]).collect();
        let expected: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        for len in [0, 1, 16, 31, 32, 33, 64, bytes.len()] {
            let mut out = String::from("prefix:");
            push_hex(&mut out, &bytes[..len]);
            assert_eq!(
                out,
                format!("prefix:{}", &expected[..2 * len]),
                "{len} bytes"
            );
        }
        let scope = Scope::of("acct_1");
        let by_hand: String = scope.0.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(scope.to_hex(), by_hand);
    }

    #[test]
    fn anonymous_differs_from_an_empty_value() {
        assert_ne!(Scope::anonymous(), Scope::of(""));
        assert_eq!(Scope::of("a"), Scope::of("a"));
        assert_ne!(Scope::of("a"), Scope::of("b"));
        assert_eq!(Scope::of("a").to_hex().len(), 32);
        assert_eq!(Scope::of("a").on_host(""), Scope::of("a"));
        assert_ne!(Scope::of("a").on_host("x"), Scope::of("a"));
        assert_eq!(
            Scope::of("a").on_host("X.example"),
            Scope::of("a").on_host("x.example")
        );
    }

    #[test]
    fn default_rule_prefers_the_principal_then_authorization() {
        let (mut parts, ()) = http::Request::new(()).into_parts();
        let rule = ScopeRule::default();
        assert_eq!(rule.scope_of(&parts), None, "no identity, no shared scope");
        let shared = ScopeRule {
            shared: true,
            ..ScopeRule::default()
        };
        assert_eq!(shared.scope_of(&parts), Some(Scope::anonymous()));
        parts
            .headers
            .insert(http::header::AUTHORIZATION, "Bearer alice".parse().unwrap());
        let alice = rule.scope_of(&parts).unwrap();
        assert_eq!(alice, Scope::of_authorization(b"Bearer alice"));
        assert!(!alice.to_hex().contains("alice"));
        for blank in ["", " ", "Bearer", "bearer ", "\tBasic", "Token"] {
            parts
                .headers
                .insert(http::header::AUTHORIZATION, blank.parse().unwrap());
            assert_eq!(
                rule.scope_of(&parts),
                None,
                "{blank:?} carries no credentials: no identity"
            );
        }
        parts.headers.insert(
            http::header::AUTHORIZATION,
            "sk_live_raw_key".parse().unwrap(),
        );
        assert_eq!(
            rule.scope_of(&parts),
            Some(Scope::of_authorization(b"sk_live_raw_key")),
            "a key sent without a scheme is an identity"
        );
        parts.extensions.insert(Principal::new("user-1"));
        assert_eq!(rule.scope_of(&parts), Some(Scope::of_principal(b"user-1")));
        parts
            .headers
            .insert(http::header::HOST, "Api.Example:443".parse().unwrap());
        let on_host = Scope::of_principal(b"user-1").on_host("api.example");
        assert_eq!(
            rule.scope_of(&parts),
            Some(on_host),
            "port and case ignored"
        );
        parts
            .headers
            .insert(http::header::HOST, "[::1]:8080".parse().unwrap());
        assert_eq!(
            rule.scope_of(&parts),
            Some(Scope::of_principal(b"user-1").on_host("[::1]"))
        );
    }
}
