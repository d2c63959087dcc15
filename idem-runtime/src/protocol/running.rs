//! The work of a first execution, run holding the key, and what the front door does with
//! its output once it ends.

use std::any::Any;
use std::future::Future;
use std::panic::{AssertUnwindSafe, resume_unwind};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures_util::FutureExt;
use futures_util::future::CatchUnwind;
use pin_project_lite::pin_project;

use super::Execution;
use crate::store::BoxFuture;

pin_project! {
    /// [`Execution::run_then`]: the work, then `finish`. Written out by hand rather than as
    /// an `async` block, which would hold the work twice (as it was handed over, and as it
    /// runs): every byte of the caller's future counts twice in the box a first execution
    /// takes. Here the work is held once, and `finish`'s future takes its place.
    #[project = Project]
    pub(crate) enum Running<F, G, S> {
        Working {
            // Declared first, so dropped first: the work's own drops run while the key is
            // still held.
            // `None` once the work returned: its future is dropped then, before anything
            // else happens (see `poll`).
            #[pin]
            work: Option<CatchUnwind<AssertUnwindSafe<F>>>,
            execution: Option<Execution>,
            finish: Option<G>,
        },
        /// The work panicked: the key is released, then the panic resumed.
        Releasing {
            release: BoxFuture<'static, ()>,
            panic: Option<Box<dyn Any + Send>>,
        },
        Finishing {
            #[pin]
            finish: S,
        },
        Done,
    }
}

impl Execution {
    /// Runs `work` holding the key, then `finish` with the execution and the work's output.
    /// A panic of the work releases the key (so a retry runs again) and is resumed.
    pub(crate) fn run_then<F, G, S>(self, work: F, finish: G) -> Running<F, G, S>
    where
        F: Future,
        G: FnOnce(Execution, F::Output) -> S,
        S: Future,
    {
        Running::Working {
            work: Some(AssertUnwindSafe(work).catch_unwind()),
            execution: Some(self),
            finish: Some(finish),
        }
    }
}

impl<F, G, S> Future for Running<F, G, S>
where
    F: Future,
    G: FnOnce(Execution, F::Output) -> S,
    S: Future,
{
    type Output = S::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<S::Output> {
        loop {
            match self.as_mut().project() {
                Project::Working {
                    mut work,
                    execution,
                    finish,
                } => {
                    let Some(running) = work.as_mut().as_pin_mut() else {
                        return Poll::Pending;
                    };
                    let caught = ready!(running.poll(cx));
                    if caught.is_ok() {
                        // The work returned: it has run, whatever its future does as it is
                        // dropped. Dropped here, a panic of that drop neither releases the
                        // key nor takes the place of the output.
                        let dropped = std::panic::catch_unwind(AssertUnwindSafe(|| work.set(None)));
                        if dropped.is_err() {
                            tracing::error!(target: "idem", "the work's future panicked as it was dropped, after it returned; its output is kept");
                        }
                    }
                    let (Some(mut execution), Some(finish)) = (execution.take(), finish.take())
                    else {
                        // Both are taken only here, and the state moves on at once.
                        return Poll::Pending;
                    };
                    let next = match caught {
                        Ok(output) => Running::Finishing {
                            finish: finish(execution, output),
                        },
                        Err(panic) => {
                            tracing::warn!(target: "idem", "the work panicked; releasing the key");
                            Running::Releasing {
                                release: Box::pin(async move { execution.release().await }),
                                panic: Some(panic),
                            }
                        }
                    };
                    self.set(next);
                }
                Project::Releasing { release, panic } => {
                    ready!(release.as_mut().poll(cx));
                    let panic = panic.take();
                    self.set(Running::Done);
                    if let Some(panic) = panic {
                        resume_unwind(panic);
                    }
                    return Poll::Pending;
                }
                Project::Finishing { finish } => {
                    let output = ready!(finish.poll(cx));
                    self.set(Running::Done);
                    return Poll::Ready(output);
                }
                // Polled again after it ended: there is nothing left to give.
                Project::Done => return Poll::Pending,
            }
        }
    }
}
