//! Work that outlives its caller: a caller that goes away (an HTTP client that hung up)
//! never cancels work that holds a key; the rest of it moves to a task of its own.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

/// Runs `work` in the caller's task (no hop to another task while the caller waits); if
/// the caller drops it before it ends, the rest runs in a task of its own, counted in
/// `detached` while it runs there.
///
/// `work` is boxed here, when called, not when first polled: the caller's future holds
/// only the box, never `work` itself on its way into it. The caller instruments `work`
/// with the span its logs belong to: looking up the current span costs every request.
pub(crate) fn to_the_end<O, F>(detached: Arc<AtomicUsize>, work: F) -> Detaching<O>
where
    F: Future<Output = O> + Send + 'static,
    O: Send + 'static,
{
    Detaching {
        work: Some(Box::pin(work)),
        detached,
    }
}

/// Unfinished work that moves to a task of its own when dropped.
pub(crate) struct Detaching<O: Send + 'static> {
    work: Option<Pin<Box<dyn Future<Output = O> + Send>>>,
    detached: Arc<AtomicUsize>,
}

impl<O: Send + 'static> Future for Detaching<O> {
    type Output = O;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<O> {
        let Some(work) = self.work.as_mut() else {
            // Polled again after it ended: there is nothing left to give.
            return Poll::Pending;
        };
        match std::panic::catch_unwind(AssertUnwindSafe(|| work.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => {
                self.work = None;
                Poll::Ready(output)
            }
            Err(panic) => {
                // The work panicked (and released its key): it is never polled again.
                self.work = None;
                std::panic::resume_unwind(panic)
            }
        }
    }
}

impl<O: Send + 'static> Drop for Detaching<O> {
    fn drop(&mut self) {
        // Work that panicked is gone already; any other unfinished work moves on, even
        // when the caller is dropped by a panic of its own beside it.
        if let Some(work) = self.work.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            // The work is handed to its task before anything else is called that could
            // panic (a log, a metrics recorder): dropped instead, it would release its key.
            self.detached.fetch_add(1, Ordering::Relaxed);
            let counted = Counted(self.detached.clone());
            runtime.spawn(async move {
                let _counted = counted;
                work.await;
            });
            crate::metrics::execution_detached(true);
            tracing::debug!(target: "idem", "the caller went away; the work runs on in a task of its own");
        }
    }
}

/// One detached execution, uncounted when it ends (however it ends).
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        crate::metrics::execution_detached(false);
    }
}
