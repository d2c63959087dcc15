//! The `#[idempotent]` attribute of idem. Depend on `idem-runtime`, which re-exports it.

use proc_macro::TokenStream;

/// Makes an axum handler idempotent; see `idem_runtime::idempotent`.
#[proc_macro_attribute]
pub fn idempotent(_args: TokenStream, item: TokenStream) -> TokenStream {
    item
}
