//! The store timeout of a store that does not bound its own steps (a custom `Store`): a
//! step that never answers fails at the timeout, counted from when it is sent, whatever
//! the step does with its task meanwhile.

#![allow(clippy::unwrap_used)]

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use bytes::Bytes;
use common::{Counters, app, post_with, send};
use idem_runtime::Idempotency;
use idem_runtime::store::{BoxFuture, Store, StoreError};

/// How a step of [`Unanswering`] waits for the answer that never comes.
#[derive(Clone, Copy)]
enum Wait {
    /// Spends the task's whole cooperative budget on every poll, then yields (a client
    /// draining a busy channel for its reply).
    Busy,
    /// Blocks its thread for the given time in its first poll (a store doing blocking
    /// work), then waits.
    BlocksFirst(Duration),
}

/// A store whose claims and renewals never answer; releases answer at once.
struct Unanswering(Wait);

/// A step of [`Unanswering`].
struct Step {
    wait: Wait,
    polled: bool,
}

impl Future for Step {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.wait {
            Wait::Busy => {
                while tokio::task::coop::has_budget_remaining() {
                    let spend = std::pin::pin!(tokio::task::coop::consume_budget());
                    let _ = spend.poll(cx);
                }
                cx.waker().wake_by_ref();
            }
            Wait::BlocksFirst(time) if !self.polled => std::thread::sleep(time),
            Wait::BlocksFirst(_) => {}
        }
        self.polled = true;
        Poll::Pending
    }
}

impl Unanswering {
    fn never<'a, T: 'a>(&self) -> BoxFuture<'a, Result<T, StoreError>> {
        let step = Step {
            wait: self.0,
            polled: false,
        };
        Box::pin(async move {
            step.await;
            unreachable!("the step never answers")
        })
    }
}

impl Store for Unanswering {
    fn begin<'a>(
        &'a self,
        _: &'a str,
        _: &'a Bytes,
        _: Duration,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        self.never()
    }

    fn renew<'a>(
        &'a self,
        _: &'a str,
        _: &'a Bytes,
        _: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.never()
    }

    fn complete<'a>(
        &'a self,
        _: &'a str,
        _: &'a Bytes,
        _: Bytes,
        _: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.never()
    }

    fn release<'a>(&'a self, _: &'a str, _: &'a Bytes) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async { Ok(false) })
    }
}

fn idem(wait: Wait, timeout: Duration) -> Idempotency {
    common::test_builder(
        Idempotency::builder()
            .store(Unanswering(wait))
            .store_timeout(timeout),
    )
    .build()
}

/// Guards (a defect once shown): a claim that spends its task's budget on every poll
/// fails at the store timeout (`503`), and the work does not run.
#[tokio::test]
async fn a_busy_step_fails_at_the_store_timeout() {
    let idem = idem(Wait::Busy, Duration::from_millis(200));
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        send(&app, post_with("/pay", Some("busy"), "{}")),
    )
    .await
    .expect("answered");
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(counters.runs(), 0);
}

/// Guards (a defect once shown): the readiness probe's step is bounded the same way.
#[tokio::test]
async fn a_busy_probe_fails_at_the_store_timeout() {
    let idem = idem(Wait::Busy, Duration::from_millis(200));
    let ready = tokio::time::timeout(Duration::from_secs(10), idem.ready())
        .await
        .expect("answered");
    assert!(matches!(ready, Err(StoreError::Timeout(_))), "{ready:?}");
}

/// Guards (a defect once shown): the store timeout counts from the step's first poll, not
/// from when it first waits: a step that blocks 1 s in its first poll fails at a 1 s
/// timeout, not 1 s later.
#[tokio::test]
async fn the_store_timeout_counts_from_the_first_poll() {
    let idem = idem(
        Wait::BlocksFirst(Duration::from_millis(1000)),
        Duration::from_millis(1000),
    );
    let counters = Arc::new(Counters::default());
    let app = app(&idem, counters.clone());
    let started = Instant::now();
    let answer = send(&app, post_with("/pay", Some("blocks"), "{}")).await;
    let took = started.elapsed();
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        took < Duration::from_millis(1700),
        "answered after {took:?}"
    );
}
