//! Owned-buffer stream traits ("rent" I/O) and their helpers.
//!
//! Futures are `!Send` on purpose: a stream belongs to the core that accepted it. Cancellation
//! is explicit (a [`CancelToken`]) because dropping an in-flight completion-based read can lose
//! the bytes the kernel already consumed; see docs/cancellation.md.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use crate::buf::{BufResult, IoBuf, IoBufMut};

/// Reading with owned buffers.
pub trait AsyncReadRent {
    /// Reads at the start of `buf`, up to its capacity, and marks the bytes read initialised
    /// (use a [`Slice`](crate::buf::Slice) to append). `Ok(0)` is end of stream.
    fn read<B: IoBufMut>(&mut self, buf: B) -> impl Future<Output = BufResult<usize, B>>;

    /// A read that `cancel` can stop without losing data: once the token fires it completes
    /// promptly, either with bytes it had already read (`Ok(n)`) or with an error for which
    /// [`is_cancelled`] holds. The buffer comes back either way, and the stream stays usable.
    fn read_cancelable<B: IoBufMut>(
        &mut self,
        buf: B,
        cancel: &CancelToken,
    ) -> impl Future<Output = BufResult<usize, B>>;
}

/// Writing with owned buffers.
pub trait AsyncWriteRent {
    /// Writes the initialised bytes of `buf`, returning how many were written (possibly fewer).
    fn write<B: IoBuf>(&mut self, buf: B) -> impl Future<Output = BufResult<usize, B>>;
    /// Gathers the initialised bytes of every buffer into one write.
    fn writev<B: IoBuf>(&mut self, bufs: Vec<B>) -> impl Future<Output = BufResult<usize, Vec<B>>>;
    /// Shuts the write half down (the peer reads end of stream).
    fn shutdown(&mut self) -> impl Future<Output = io::Result<()>>;
}

/// Whole-buffer helpers shared by every backend; written once here.
pub trait AsyncReadRentExt: AsyncReadRent {
    /// Fills `buf` from its initialised length to its capacity, or fails with
    /// `UnexpectedEof`. The buffer comes back in every case, holding what was read.
    fn read_exact<B: IoBufMut>(&mut self, buf: B) -> impl Future<Output = BufResult<usize, B>> {
        async move {
            let total = buf.bytes_total();
            let start = buf.bytes_init();
            let mut buf = buf;
            let mut filled = start;
            while filled < total {
                let BufResult(res, slice) = self.read(buf.slice(filled..total)).await;
                buf = slice.into_inner();
                match res {
                    Ok(0) => {
                        return BufResult(
                            Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "stream ended before the buffer was full",
                            )),
                            buf,
                        )
                    }
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return BufResult(Err(e), buf),
                }
            }
            BufResult(Ok(filled - start), buf)
        }
    }
}
impl<T: AsyncReadRent + ?Sized> AsyncReadRentExt for T {}

/// Whole-buffer write helper shared by every backend.
pub trait AsyncWriteRentExt: AsyncWriteRent {
    /// Writes every initialised byte of `buf`, or fails; the buffer comes back either way.
    fn write_all<B: IoBuf>(&mut self, buf: B) -> impl Future<Output = BufResult<usize, B>> {
        async move {
            let len = buf.bytes_init();
            let mut buf = buf;
            let mut written = 0;
            while written < len {
                let BufResult(res, slice) = self.write(buf.slice(written..len)).await;
                buf = slice.into_inner();
                match res {
                    Ok(0) => {
                        return BufResult(
                            Err(io::Error::new(io::ErrorKind::WriteZero, "peer accepted no more bytes")),
                            buf,
                        )
                    }
                    Ok(n) => written += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return BufResult(Err(e), buf),
                }
            }
            BufResult(Ok(written), buf)
        }
    }
}
impl<T: AsyncWriteRent + ?Sized> AsyncWriteRentExt for T {}

/// The error a cancelled operation returns (`ECANCELED`).
pub fn cancelled_error() -> io::Error {
    io::Error::from_raw_os_error(libc::ECANCELED)
}

/// Whether `err` says the operation was cancelled through a [`CancelToken`].
pub fn is_cancelled(err: &io::Error) -> bool {
    err.raw_os_error() == Some(libc::ECANCELED)
}

/// A core-local cancellation signal. Cloning shares the signal.
#[derive(Clone, Default)]
pub struct CancelToken {
    inner: Rc<CancelInner>,
}

#[derive(Default)]
struct CancelInner {
    fired: Cell<bool>,
    waiters: RefCell<Vec<Waker>>,
}

impl CancelToken {
    /// A token that has not fired.
    pub fn new() -> Self {
        Self::default()
    }
    /// Fires the token, waking everything waiting on it.
    pub fn cancel(&self) {
        if !self.inner.fired.replace(true) {
            for w in self.inner.waiters.borrow_mut().drain(..) {
                w.wake();
            }
        }
    }
    /// Whether the token has fired.
    pub fn is_cancelled(&self) -> bool {
        self.inner.fired.get()
    }
    /// Resolves once the token fires.
    pub fn cancelled(&self) -> Cancelled<'_> {
        Cancelled { token: self }
    }
}

/// Future returned by [`CancelToken::cancelled`].
pub struct Cancelled<'a> {
    token: &'a CancelToken,
}

impl Future for Cancelled<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.token.is_cancelled() {
            return Poll::Ready(());
        }
        let mut waiters = self.token.inner.waiters.borrow_mut();
        if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
            waiters.push(cx.waker().clone());
        }
        Poll::Pending
    }
}
