//! What idem keeps on one request, in its extensions: what the layer found, and what the
//! request's extractors share (its scoped key, its transaction). One extension for all of
//! it, so a keyed request costs one insertion, not one per extractor.

use std::sync::Arc;

use bytes::Bytes;
use http::Extensions;

use crate::key::{IdempotencyKey, KeyError, ScopedKey};
use crate::protocol::TransactionSlot;
use crate::scope::Scope;

/// The request's state; put in by the layer for a keyed request, or by the first extractor
/// that needs it.
#[derive(Clone, Default)]
pub(crate) struct RequestState {
    key: RequestKey,
    /// An `Option<ScopedKey>` was read as `None` on a keyed request, because nothing
    /// identified the client yet: a guard that finds a scope later refuses the request.
    read_without_scope: bool,
    /// Shared by the guards and the extractor that hands out the transaction.
    transaction: Option<TransactionSlot>,
}

/// The request's `Idempotency-Key`, as far as it is known.
#[derive(Clone, Default)]
enum RequestKey {
    /// No key.
    #[default]
    None,
    /// The key is malformed; the body was not read.
    Invalid(KeyError),
    /// A well-formed key, not scoped yet, and the body as buffered for the fingerprint.
    Unscoped {
        key: IdempotencyKey,
        body: BufferedBody,
    },
    /// The key as scoped by the first extractor that read it.
    Scoped { key: ScopedKey, body: BufferedBody },
}

/// A request body that the layer buffered, for the fingerprint.
#[derive(Debug, Clone)]
pub(crate) enum BufferedBody {
    Complete(Bytes),
    TooLarge,
    Failed,
}

/// What a guard finds on the request.
pub(crate) enum Found {
    /// No key.
    None,
    /// A malformed key.
    Invalid(KeyError),
    /// A key, with the body as buffered.
    Keyed(BufferedBody),
}

/// Why a scoped key was refused to a guard.
pub(crate) struct ScopeConflict;

impl RequestState {
    /// The state of a request whose key the layer found malformed.
    pub(crate) fn invalid(error: KeyError) -> Self {
        Self {
            key: RequestKey::Invalid(error),
            ..Self::default()
        }
    }

    /// The state of a request with a well-formed key and its buffered body.
    pub(crate) fn keyed(key: IdempotencyKey, body: BufferedBody) -> Self {
        Self {
            key: RequestKey::Unscoped { key, body },
            ..Self::default()
        }
    }

    /// The request's state, put in if it is not there yet.
    pub(crate) fn of(extensions: &mut Extensions) -> &mut Self {
        extensions.get_or_insert_default()
    }

    /// The request's transaction slot, made on first use.
    pub(crate) fn transaction_slot(&mut self) -> TransactionSlot {
        self.transaction.get_or_insert_default().clone()
    }

    /// What a guard finds: the key's validity and the buffered body.
    pub(crate) fn found(&self) -> Found {
        match &self.key {
            RequestKey::None => Found::None,
            RequestKey::Invalid(error) => Found::Invalid(error.clone()),
            RequestKey::Unscoped { body, .. } | RequestKey::Scoped { body, .. } => {
                Found::Keyed(body.clone())
            }
        }
    }

    /// The request's key in `scope`, for a guard. Refused when an earlier extractor read
    /// the key in another scope, or read it as `None` for want of one: a database guard
    /// keyed by what it read would not catch a retry.
    pub(crate) fn scope_for_guard(
        &mut self,
        scope: Scope,
        digest_secret: Option<Arc<[u8]>>,
    ) -> Result<ScopedKey, ScopeConflict> {
        if self.read_without_scope {
            // The handler holds a `None` for a key that idem protects.
            return Err(ScopeConflict);
        }
        match std::mem::take(&mut self.key) {
            RequestKey::Unscoped { key, body } => {
                let key = ScopedKey::logged_as(scope, key, digest_secret);
                self.key = RequestKey::Scoped {
                    key: key.clone(),
                    body,
                };
                Ok(key)
            }
            RequestKey::Scoped { key, body } if key.scope() == scope => {
                self.key = RequestKey::Scoped {
                    key: key.clone(),
                    body,
                };
                Ok(key)
            }
            other => {
                self.key = other;
                Err(ScopeConflict)
            }
        }
    }

    /// The key as an earlier extractor scoped it, if one did.
    pub(crate) fn scoped(&self) -> Option<&ScopedKey> {
        match &self.key {
            RequestKey::Scoped { key, .. } => Some(key),
            _ => None,
        }
    }

    /// Whether the request carries a well-formed key that nothing has scoped yet.
    pub(crate) fn needs_scope(&self) -> bool {
        matches!(self.key, RequestKey::Unscoped { .. })
    }

    /// The key an extractor reads: the one scoped already, else the key in `scope`. `None`
    /// without a key, or without a scope; a keyed request read without a scope is marked,
    /// for the guard.
    pub(crate) fn read_scoped(
        &mut self,
        scope: Option<Scope>,
        digest_secret: Option<Arc<[u8]>>,
    ) -> Option<ScopedKey> {
        match std::mem::take(&mut self.key) {
            RequestKey::Scoped { key, body } => {
                self.key = RequestKey::Scoped {
                    key: key.clone(),
                    body,
                };
                Some(key)
            }
            RequestKey::Unscoped { key, body } => match scope {
                Some(scope) => {
                    let key = ScopedKey::logged_as(scope, key, digest_secret);
                    self.key = RequestKey::Scoped {
                        key: key.clone(),
                        body,
                    };
                    Some(key)
                }
                None => {
                    self.key = RequestKey::Unscoped { key, body };
                    self.read_without_scope = true;
                    None
                }
            },
            other => {
                self.key = other;
                None
            }
        }
    }
}
