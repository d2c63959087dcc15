//! The request protocol end to end, on the memory store and on the real Redis.

#![allow(clippy::unwrap_used)]

mod common;

use common::checks::*;

on_both_stores!(
    replay_is_byte_identical,
    different_request_same_key_is_422,
    concurrent_requests_run_once,
    key_expires_after_ttl,
    slow_handler_keeps_its_lease,
    dead_owner_frees_key_after_lease,
    stale_executor_cannot_overwrite,
    server_error_releases_key,
    panic_releases_key,
    bad_input_is_refused,
    scopes_are_isolated,
    oversized_response_is_never_rerun,
    waiting_for_in_flight_replays,
    rejected_extractor_releases_key,
    slow_body_keeps_its_lease,
    failed_body_is_a_problem_not_a_rerun,
    nested_routes_are_told_apart,
);
