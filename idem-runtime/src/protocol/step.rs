//! What every protocol step shares: a store call, answered at once by the memory store
//! or bounded by its timeout, and a deadline that never overflows.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::Either;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::config::Idempotency;
pub(crate) use crate::metrics::Step;
use crate::store::{BoxFuture, MemoryStore, Store, StoreError, poll_timer};

/// One store step, failed with [`StoreError::Timeout`] when it does not answer in time
/// (by the store, where it bounds its steps itself within the store timeout), and timed
/// into `idem_store_seconds` under `step`. A plain function: a step answered
/// already costs its caller's future no room for the timeout of one that is not.
pub(crate) fn store_step<'a, T: 'a>(
    idem: &'a Idempotency,
    step: Step,
    call: Call<'a, T>,
) -> impl Future<Output = Result<T, StoreError>> + 'a {
    match call {
        Call::Answered { answer, started } => {
            idem.shared.metrics.store_step(step, started.elapsed());
            Either::Left(std::future::ready(answer))
        }
        Call::Pending(call) => Either::Right(Timed {
            call,
            idem,
            step,
            started: Instant::now(),
            deadline: None,
            timer: None,
        }),
    }
}

pin_project! {
    /// A step sent to the store, timed from when it is made. Where the store does not
    /// bound its steps, the step fails at the store timeout after its first poll (the
    /// deadline is read then), and the timer is made and boxed the first time the step
    /// waits: every caller's future holds a step, and only the stores that do not bound
    /// their own steps (a database's) need the timer.
    pub(crate) struct Timed<'a, T> {
        call: BoxFuture<'a, Result<T, StoreError>>,
        idem: &'a Idempotency,
        step: Step,
        started: Instant,
        deadline: Option<Instant>,
        timer: Option<Pin<Box<Sleep>>>,
    }
}

impl<T> Future for Timed<'_, T> {
    type Output = Result<T, StoreError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let limit = this.idem.settings().store_timeout;
        let bounded = this.idem.shared.store_bounds_steps;
        if !bounded && this.deadline.is_none() {
            *this.deadline = Some(later(Instant::now(), limit));
        }
        let answer = match (this.call.as_mut().poll(cx), *this.deadline) {
            (Poll::Ready(answer), _) => answer,
            (Poll::Pending, None) => return Poll::Pending,
            (Poll::Pending, Some(deadline)) => {
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                ready!(poll_timer(timer.as_mut(), cx));
                Err(StoreError::Timeout(limit))
            }
        };
        this.idem
            .shared
            .metrics
            .store_step(*this.step, this.started.elapsed());
        Poll::Ready(answer)
    }
}

/// A step asked of the store: answered already, by a [`MemoryStore`] called directly,
/// or a future to await.
pub(crate) enum Call<'a, T> {
    Answered {
        answer: Result<T, StoreError>,
        /// When the step started, for its timing.
        started: Instant,
    },
    Pending(BoxFuture<'a, Result<T, StoreError>>),
}

impl<'a, T> Call<'a, T> {
    /// The step `now` takes on the memory store, else the one `later` sends to the store;
    /// `args` go to whichever runs (a record moves into it).
    fn of<A>(
        idem: &'a Idempotency,
        args: A,
        now: impl FnOnce(&MemoryStore, A) -> Result<T, StoreError>,
        later: impl FnOnce(&'a dyn Store, A) -> BoxFuture<'a, Result<T, StoreError>>,
    ) -> Self {
        match &idem.shared.memory {
            Some(memory) => {
                let started = Instant::now();
                Self::Answered {
                    answer: now(memory, args),
                    started,
                }
            }
            None => Self::Pending(later(idem.shared.store.as_ref(), args)),
        }
    }
}

/// The store's steps, each as a [`Call`].
impl Idempotency {
    pub(crate) fn begin_call<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> Call<'a, Option<Bytes>> {
        Call::of(
            self,
            (key, claim, lease),
            |memory, (key, claim, lease)| memory.begin_now(key, claim, lease),
            |store, (key, claim, lease)| store.begin(key, claim, lease),
        )
    }

    pub(crate) fn renew_call<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> Call<'a, bool> {
        Call::of(
            self,
            (key, claim, lease),
            |memory, (key, claim, lease)| memory.renew_now(key, claim, lease),
            |store, (key, claim, lease)| store.renew(key, claim, lease),
        )
    }

    pub(crate) fn complete_call<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        record: Bytes,
        ttl: Duration,
    ) -> Call<'a, bool> {
        Call::of(
            self,
            (key, claim, record, ttl),
            |memory, (key, claim, record, ttl)| memory.complete_now(key, claim, record, ttl),
            |store, (key, claim, record, ttl)| store.complete(key, claim, record, ttl),
        )
    }

    pub(crate) fn release_call<'a>(&'a self, key: &'a str, claim: &'a Bytes) -> Call<'a, bool> {
        Call::of(
            self,
            (key, claim),
            |memory, (key, claim)| memory.release_now(key, claim),
            |store, (key, claim)| store.release(key, claim),
        )
    }
}

/// `at + after`, or far in the future where that overflows.
pub(crate) fn later(at: Instant, after: Duration) -> Instant {
    at.checked_add(after)
        .unwrap_or_else(|| at + Duration::from_secs(100 * 365 * 24 * 3600))
}
