//! Compile-time behaviour of `#[idempotent]`: what builds, and what a mistake reads like.
//! The `.stderr` files are rustc's output on the pinned toolchain; regenerate them with
//! `TRYBUILD=overwrite cargo test -p idem-tests --test ui` and review the diff.

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.pass("ui/pass/*.rs");
    cases.compile_fail("ui/fail/*.rs");
}
