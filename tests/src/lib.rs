//! Tests of `#[idempotent]`, written as a user writes them: `ui/pass` and `ui/fail` hold
//! the compile-time cases, `tests/` runs the expansion through an axum `Router`.

/// The README's code blocks, compiled and run as doctests so the README cannot drift.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
