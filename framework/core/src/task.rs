//! Core-local tasks, events and timeouts, written once over the runtime contract.
//!
//! Everything here is `!Send`: it lives and dies on one core. A panic in any task is recorded
//! for its worker, which then stops and is reported by the launcher (a crippled core is worse
//! than a clean exit).

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crate::buf::{BufResult, IoBufMut};
use crate::io::{is_cancelled, AsyncReadRent, CancelToken};
use crate::runtime::Runtime;

/// A one-shot, core-local event that any number of tasks can wait for. A wait that is
/// dropped before the event fires takes its waker out again, so events that live as long as
/// the worker (such as draining) do not collect one waker per abandoned wait.
#[derive(Clone, Default)]
pub struct LocalEvent {
    inner: Rc<EventInner>,
}

#[derive(Default)]
struct EventInner {
    fired: Cell<bool>,
    waiters: RefCell<slab::Slab<Waker>>,
}

impl LocalEvent {
    /// An event that has not fired.
    pub fn new() -> Self {
        Self::default()
    }
    /// Fires the event; waiting tasks wake, later waits complete at once.
    pub fn fire(&self) {
        if !self.inner.fired.replace(true) {
            let waiters = std::mem::take(&mut *self.inner.waiters.borrow_mut());
            for (_, w) in waiters {
                w.wake();
            }
        }
    }
    /// Whether the event has fired.
    pub fn is_fired(&self) -> bool {
        self.inner.fired.get()
    }
    /// Completes once the event has fired.
    pub fn wait(&self) -> EventWait<'_> {
        EventWait { event: self, key: None }
    }
}

/// The future of [`LocalEvent::wait`].
pub struct EventWait<'a> {
    event: &'a LocalEvent,
    key: Option<usize>,
}

impl Future for EventWait<'_> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let inner = &self.event.inner;
        if inner.fired.get() {
            return Poll::Ready(());
        }
        let mut waiters = inner.waiters.borrow_mut();
        match self.key.and_then(|k| waiters.get_mut(k)) {
            Some(w) if w.will_wake(cx.waker()) => {}
            Some(w) => *w = cx.waker().clone(),
            None => {
                let k = waiters.insert(cx.waker().clone());
                drop(waiters);
                self.key = Some(k);
            }
        }
        Poll::Pending
    }
}

impl Drop for EventWait<'_> {
    fn drop(&mut self) {
        if let Some(k) = self.key {
            if !self.event.inner.fired.get() {
                self.event.inner.waiters.borrow_mut().try_remove(k);
            }
        }
    }
}

/// Which of two raced futures finished first.
#[derive(Debug)]
pub enum Either<A, B> {
    /// The first.
    Left(A),
    /// The second.
    Right(B),
}

/// Polls both futures and returns the first to finish (the first wins ties); the other is
/// dropped. Only race futures whose drop loses nothing (see docs/cancellation.md).
///
/// A named future rather than an `async fn`, as are [`join`], [`timeout`] and the task
/// [`spawn`] builds: an `async fn` that pins its arguments keeps each of them twice in its
/// state (the argument and the pinned copy), so nested combinators multiplied the size of a
/// request's future, and every spawn copies that whole size (docs/http3.md, "Measured").
pub fn race<A: Future, B: Future>(a: A, b: B) -> Race<A, B> {
    Race { a, b }
}

pin_project_lite::pin_project! {
    /// The future of [`race`].
    #[must_use = "futures do nothing unless awaited"]
    pub struct Race<A, B> {
        #[pin]
        a: A,
        #[pin]
        b: B,
    }
}

impl<A: Future, B: Future> Future for Race<A, B> {
    type Output = Either<A::Output, B::Output>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(v) = this.a.poll(cx) {
            return Poll::Ready(Either::Left(v));
        }
        if let Poll::Ready(v) = this.b.poll(cx) {
            return Poll::Ready(Either::Right(v));
        }
        Poll::Pending
    }
}

/// Polls both futures until both have finished and returns both outputs: two halves of a
/// connection driven from one task, say. Neither is dropped early.
pub fn join<A: Future, B: Future>(a: A, b: B) -> Join<A, B> {
    Join { a, b, ra: None, rb: None }
}

pin_project_lite::pin_project! {
    /// The future of [`join`].
    #[must_use = "futures do nothing unless awaited"]
    pub struct Join<A: Future, B: Future> {
        #[pin]
        a: A,
        #[pin]
        b: B,
        ra: Option<A::Output>,
        rb: Option<B::Output>,
    }
}

impl<A: Future, B: Future> Future for Join<A, B> {
    type Output = (A::Output, B::Output);
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if this.ra.is_none() {
            if let Poll::Ready(v) = this.a.poll(cx) {
                *this.ra = Some(v);
            }
        }
        if this.rb.is_none() {
            if let Poll::Ready(v) = this.b.poll(cx) {
                *this.rb = Some(v);
            }
        }
        if this.ra.is_some() && this.rb.is_some() {
            if let (Some(x), Some(y)) = (this.ra.take(), this.rb.take()) {
                return Poll::Ready((x, y));
            }
        }
        Poll::Pending
    }
}

/// Lets the core's other ready tasks run once before this one goes on, on every backend
/// (on Monoio, where a task that wakes itself is polled again first, the wake is deferred
/// behind the queued tasks).
pub async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            crate::engine::wake_behind(cx.waker());
            Poll::Pending
        }
    })
    .await
}

/// A deadline passed before the operation completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("timed out")]
pub struct Elapsed;

/// Runs `fut` for at most `dur`. On timeout `fut` is dropped: use it for futures whose drop
/// loses nothing, and [`read_timeout`] for reads.
///
/// The clock starts when `fut` first has to wait: an operation that completes on its first
/// poll (a request whose header section already arrived, a send the flow control takes at
/// once) costs no timer at all. The engine's sleep is boxed when it is made: some engines'
/// sleeps are several hundred bytes (Monoio's), and inline they would widen every future that
/// awaits a timeout, which is copied whole each time it moves, whether or not it ever waits.
pub fn timeout<R: Runtime, F: Future>(dur: Duration, fut: F) -> impl Future<Output = Result<F::Output, Elapsed>> {
    Timeout { fut, sleep: None, arm: Some(move || R::sleep(dur)) }
}

pin_project_lite::pin_project! {
    /// The future of [`timeout`]: `S` is the engine's sleep, built by `M` on the first wait.
    struct Timeout<F, S, M> {
        #[pin]
        fut: F,
        sleep: Option<Pin<Box<S>>>,
        arm: Option<M>,
    }
}

impl<F: Future, S: Future<Output = ()>, M: FnOnce() -> S> Future for Timeout<F, S, M> {
    type Output = Result<F::Output, Elapsed>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(v) = this.fut.poll(cx) {
            return Poll::Ready(Ok(v));
        }
        if let Some(arm) = this.arm.take() {
            *this.sleep = Some(Box::pin(arm()));
        }
        match this.sleep.as_mut().map(|sleep| sleep.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Err(Elapsed)),
            _ => Poll::Pending,
        }
    }
}

/// Reads with a deadline and loses nothing on timeout: the read is cancelled through its
/// token and awaited to completion, so the buffer comes back and bytes the kernel had
/// already delivered are returned, not dropped. A timeout is `ErrorKind::TimedOut`.
pub async fn read_timeout<R: Runtime, S: AsyncReadRent, B: IoBufMut>(
    stream: &mut S,
    buf: B,
    dur: Duration,
) -> BufResult<usize, B> {
    read_timeout_or::<R, S, B, _>(stream, buf, dur, std::future::pending::<()>()).await
}

/// [`read_timeout`] that also stops, as losslessly, when `stop` completes first (for
/// example [`Worker::draining`](crate::Worker::draining), to close idle keep-alive
/// connections at once). A stop is `ErrorKind::ConnectionAborted`.
pub async fn read_timeout_or<R: Runtime, S: AsyncReadRent, B: IoBufMut, F: Future>(
    stream: &mut S,
    buf: B,
    dur: Duration,
    stop: F,
) -> BufResult<usize, B> {
    let token = CancelToken::new();
    let mut read = pin!(stream.read_cancelable(buf, &token));
    let mut sleep = pin!(R::sleep(dur));
    let mut stop = pin!(stop);
    let mut why: Option<std::io::ErrorKind> = None;
    let BufResult(res, buf) = std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = read.as_mut().poll(cx) {
            return Poll::Ready(r);
        }
        if why.is_none() {
            if sleep.as_mut().poll(cx).is_ready() {
                why = Some(std::io::ErrorKind::TimedOut);
            } else if stop.as_mut().poll(cx).is_ready() {
                why = Some(std::io::ErrorKind::ConnectionAborted);
            }
            if why.is_some() {
                token.cancel();
                // The backend completes promptly once cancelled; poll it again now.
                if let Poll::Ready(r) = read.as_mut().poll(cx) {
                    return Poll::Ready(r);
                }
            }
        }
        Poll::Pending
    })
    .await;
    match (res, why) {
        (Err(e), Some(kind)) if is_cancelled(&e) => {
            let msg = if kind == std::io::ErrorKind::TimedOut { "read timed out" } else { "read stopped" };
            BufResult(Err(std::io::Error::new(kind, msg)), buf)
        }
        (other, _) => BufResult(other, buf),
    }
}

/// Runs a socket operation `fut` with a deadline and loses nothing on timeout: when `dur`
/// passes, the socket `fd` is shut down in both directions (`shutdown(2)`), which makes any
/// read, write, poll or transfer pending on it complete at once, and `fut` is then awaited to
/// completion so its buffers come back and nothing stays in flight. Returns the output and
/// whether the deadline fired (the connection is then unusable and should be dropped).
///
/// Use it for writes to clients that stop reading: a completion-based send blocked on a full
/// socket buffer cannot be dropped safely, and on some engines not cancelled at all.
pub async fn with_deadline<R: Runtime, F: Future>(fd: std::os::fd::RawFd, dur: Duration, fut: F) -> (F::Output, bool) {
    let mut fut = pin!(fut);
    let mut sleep = pin!(R::sleep(dur));
    let mut fired = false;
    let out = std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(v);
        }
        if !fired && sleep.as_mut().poll(cx).is_ready() {
            fired = true;
            // SAFETY: shutdown(2) on a descriptor the caller keeps open only changes socket
            // state; on a non-socket it fails with ENOTSOCK and does nothing.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            if let Poll::Ready(v) = fut.as_mut().poll(cx) {
                return Poll::Ready(v);
            }
        }
        Poll::Pending
    })
    .await;
    (out, fired)
}

/// A task panicked; its message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("task panicked: {0}")]
pub struct Panicked(pub String);

/// The message of a panic payload.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

struct JoinState<T> {
    result: Option<Result<T, Panicked>>,
    waker: Option<Waker>,
}

/// Awaits a task spawned with [`spawn`]. Dropping it detaches the task.
pub struct JoinHandle<T> {
    state: Rc<RefCell<JoinState<T>>>,
}

impl<T> Future for JoinHandle<T> {
    type Output = Result<T, Panicked>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut st = self.state.borrow_mut();
        match st.result.take() {
            Some(r) => Poll::Ready(r),
            None => {
                st.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// Polls `fut`, turning a panic into `Err(message)`.
struct CatchUnwind<F>(F);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // SAFETY: structural pinning of the only field; it is never moved out.
        let inner = unsafe { self.map_unchecked_mut(|s| &mut s.0) };
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => Poll::Ready(Err(panic_message(&*payload))),
        }
    }
}

/// Spawns `fut` on this core. A panic inside it is reported to the worker (which stops and is
/// reported by the launcher) and to the join handle.
pub fn spawn<R: Runtime, F>(fut: F) -> JoinHandle<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    let state = Rc::new(RefCell::new(JoinState { result: None, waker: None }));
    R::spawn_detached(Spawned { fut: CatchUnwind(fut), state: Rc::clone(&state) });
    JoinHandle { state }
}

pin_project_lite::pin_project! {
    /// A task [`spawn`] started: `fut` with its panics caught, its output handed to the join
    /// handle. A named future, so the engine's task holds `fut` once (see [`race`]).
    struct Spawned<F: Future> {
        #[pin]
        fut: CatchUnwind<F>,
        state: Rc<RefCell<JoinState<F::Output>>>,
    }
}

impl<F: Future> Future for Spawned<F> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let out = match this.fut.poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(v)) => Ok(v),
            Poll::Ready(Err(msg)) => {
                crate::worker::report_task_panic(&msg);
                Err(Panicked(msg))
            }
        };
        let mut s = this.state.borrow_mut();
        s.result = Some(out);
        if let Some(w) = s.waker.take() {
            w.wake();
        }
        Poll::Ready(())
    }
}

/// Spawns `fut` on this core with no join handle: as [`spawn`] with its handle dropped at
/// once, but without the handle's shared state, one allocation less per task (a connection's
/// task lives as long as the connection). A panic inside it is reported to the worker.
pub fn spawn_detached<R: Runtime, F: Future<Output = ()> + 'static>(fut: F) {
    R::spawn_detached(Detached { fut: CatchUnwind(fut) });
}

pin_project_lite::pin_project! {
    /// A task [`spawn_detached`] started: `fut` with its panics caught and reported.
    struct Detached<F> {
        #[pin]
        fut: CatchUnwind<F>,
    }
}

impl<F: Future<Output = ()>> Future for Detached<F> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.project().fut.poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(()),
            Poll::Ready(Err(msg)) => {
                crate::worker::report_task_panic(&msg);
                Poll::Ready(())
            }
        }
    }
}

/// Runs `fut`, catching a panic into `Err(message)` (used by the launcher for worker mains,
/// and by services around one connection or request).
pub fn catch_panic<F: Future>(fut: F) -> impl Future<Output = Result<F::Output, String>> {
    CatchUnwind(fut)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noop_cx(f: impl FnOnce(&mut Context<'_>)) {
        let mut cx = Context::from_waker(Waker::noop());
        f(&mut cx)
    }

    #[test]
    fn join_waits_for_both_and_race_for_the_first() {
        let ev = LocalEvent::new();
        let mut j = pin!(join(async { 1 }, async {
            ev.wait().await;
            2
        }));
        noop_cx(|cx| assert!(j.as_mut().poll(cx).is_pending(), "join waits for the slower future"));
        ev.fire();
        noop_cx(|cx| assert_eq!(j.as_mut().poll(cx), Poll::Ready((1, 2))));
    }

    #[test]
    fn abandoned_waits_leave_no_waker_behind() {
        let ev = LocalEvent::new();
        noop_cx(|cx| {
            for _ in 0..1000 {
                let mut w = pin!(ev.wait());
                assert!(w.as_mut().poll(cx).is_pending());
                assert!(w.as_mut().poll(cx).is_pending(), "a second poll reuses the slot");
            }
            assert_eq!(ev.inner.waiters.borrow().len(), 0, "every dropped wait removed its waker");
            let mut kept = pin!(ev.wait());
            assert!(kept.as_mut().poll(cx).is_pending());
            assert_eq!(ev.inner.waiters.borrow().len(), 1);
            ev.fire();
            assert!(kept.as_mut().poll(cx).is_ready());
            assert!(pin!(ev.wait()).poll(cx).is_ready(), "waits after firing complete at once");
        });
    }
}
