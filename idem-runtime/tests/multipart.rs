//! Multipart forms: a retry of the same form is the same request, whatever boundary the
//! client chose for it (curl, reqwest and browsers choose a new one on every send).

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use axum::http::{StatusCode, header};
use common::{Backend, Counters, app, post_with, send};
use idem_runtime::Problem;

/// A form with one `amount` field, sent with `boundary`.
fn form(boundary: &str, amount: &str) -> axum::extract::Request {
    let body = format!(
        "--{boundary}\r\ncontent-disposition: form-data; name=\"amount\"\r\n\r\n{amount}\r\n\
         --{boundary}\r\ncontent-disposition: form-data; name=\"note\"; filename=\"n.txt\"\r\n\
         content-type: text/plain\r\n\r\nfor order 7\r\n--{boundary}--\r\n"
    );
    multipart_post(boundary, "form-key", &body)
}

/// `body` posted to `/pay` under `key` as `multipart/form-data` with `boundary`.
fn multipart_post(boundary: &str, key: &str, body: &str) -> axum::extract::Request {
    let mut request = post_with("/pay", Some(key), body);
    request.headers_mut().insert(
        header::CONTENT_TYPE,
        format!("multipart/form-data; boundary={boundary}")
            .parse()
            .unwrap(),
    );
    request
}

/// Guards: the same form under a new boundary is replayed, not refused with 422 and not
/// run again; a form with another value under the same key is refused.
async fn a_form_resent_with_a_new_boundary_is_replayed(backend: Backend) {
    let idem = backend.builder().await.build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let first = send(&app, form("------------------------a1b2c3", "1200")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let retry = send(&app, form("----WebKitFormBoundary7MA4YWxk", "1200")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert!(retry.is_replay(), "the retry was replayed");
    assert_eq!(retry.body, first.body);
    assert_eq!(counters.runs(), 1);
    let changed = send(&app, form("x-boundary", "1300")).await;
    changed.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, Problem::KEY_REUSED);
    assert_eq!(counters.runs(), 1);
}

on_both_stores!(a_form_resent_with_a_new_boundary_is_replayed);

/// A form with an `amount` field and a `memo` field, sent with `boundary`.
fn form_with_memo(boundary: &str, memo: &str) -> axum::extract::Request {
    let body = format!(
        "--{boundary}\r\ncontent-disposition: form-data; name=\"amount\"\r\n\r\n1200\r\n\
         --{boundary}\r\ncontent-disposition: form-data; name=\"memo\"\r\n\r\n{memo}\r\n\
         --{boundary}--\r\n"
    );
    multipart_post(boundary, "memo-key", &body)
}

/// Guards: a boundary counts for nothing only where a form parser can read it as nothing
/// but a delimiter. Two forms whose memos differ exactly by holding each its own boundary
/// (mid-line, or at a line's start followed by more text) are two requests: the second
/// is refused, not answered with the first one's response.
async fn a_field_holding_its_own_boundary_is_part_of_the_request(backend: Backend) {
    let idem = backend.builder().await.build();
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let memos: [fn(&str) -> String; 3] = [
        |boundary| format!("invoice--{boundary}-1"),
        |boundary| format!("line one\r\n--{boundary}x"),
        |boundary| format!("line one\r\n--{boundary}--x"),
    ];
    for (n, memo) in memos.into_iter().enumerate() {
        let key = format!("memo-key-{n}");
        let mut first = form_with_memo("AAAA", &memo("AAAA"));
        let mut second = form_with_memo("BBBB", &memo("BBBB"));
        for request in [&mut first, &mut second] {
            request
                .headers_mut()
                .insert("idempotency-key", format!("\"{key}\"").parse().unwrap());
        }
        let runs = counters.runs();
        let first = send(&app, first).await;
        assert_eq!(first.status, StatusCode::CREATED, "memo {n}: {first:?}");
        let second = send(&app, second).await;
        second.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, Problem::KEY_REUSED);
        assert_eq!(counters.runs(), runs + 1, "memo {n}");
    }
    // The same memo, free of the boundary, is still the same request under a new one.
    let first = send(&app, form_with_memo("AAAA", "invoice 1")).await;
    let retry = send(&app, form_with_memo("BBBB", "invoice 1")).await;
    assert!(retry.is_replay(), "{retry:?}");
    assert_eq!(retry.body, first.body);
}

on_both_stores!(a_field_holding_its_own_boundary_is_part_of_the_request);
