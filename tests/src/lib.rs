//! Tests of `#[idempotent]`, written as a user writes them: `ui/pass` and `ui/fail` hold
//! the compile-time cases, `tests/` runs the expansion through an axum `Router`.
