//! Copying between owned-buffer streams: one direction ([`copy`]) and both at once with
//! half-close passed through ([`copy_bidirectional`]), the body of a TCP proxy.
//!
//! Both take the halves of split streams ([`ConnStream::into_split`](crate::ConnStream::into_split),
//! [`TcpStream::into_split`](crate::TcpStream::into_split)), so each direction waits on its own
//! half and neither can hold the other up once socket buffers fill. Each direction owns one
//! buffer, allocated on this core and reused for every read and write.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::pin;
use std::task::Poll;

use crate::buf::BufResult;
use crate::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};

/// The size of the buffer each direction of a copy owns.
pub const COPY_BUFFER_SIZE: usize = 64 * 1024;

/// Copies from `reader` to `writer` until `reader` reaches end of stream, and returns how many
/// bytes were copied. Everything read is written before the next read; the writer is not shut
/// down (see [`copy_bidirectional`] for that). One buffer of [`COPY_BUFFER_SIZE`] bytes is
/// allocated and reused.
pub async fn copy<R, W>(reader: &mut R, writer: &mut W) -> io::Result<u64>
where
    R: AsyncReadRent + ?Sized,
    W: AsyncWriteRent + ?Sized,
{
    let mut buf: Vec<u8> = Vec::with_capacity(COPY_BUFFER_SIZE);
    let mut total = 0u64;
    loop {
        buf.clear();
        let BufResult(res, b) = reader.read(buf).await;
        buf = b;
        match res {
            Ok(0) => return Ok(total),
            Ok(n) => {
                let BufResult(res, b) = writer.write_all(buf).await;
                buf = b;
                res?;
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// One direction of a relay: copies until end of stream, then shuts `writer` down so the other
/// side sees end of stream too (half-close passes through).
async fn one_way<R, W>(reader: &mut R, writer: &mut W) -> io::Result<u64>
where
    R: AsyncReadRent + ?Sized,
    W: AsyncWriteRent + ?Sized,
{
    let n = copy(reader, writer).await?;
    match writer.shutdown().await {
        // The peer already closed both directions: nothing is left to tell it.
        Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
        _ => Ok(n),
    }
}

/// Relays between two split streams, `a` and `b`, in both directions at once: what `a_read`
/// yields goes to `b_write` and what `b_read` yields goes to `a_write`. When one side reaches
/// end of stream, the other side's write half is shut down (it sees end of stream) and the
/// other direction keeps copying until it ends as well. Returns the bytes copied `(a to b,
/// b to a)`. The first error in either direction ends the relay and is returned; the other
/// direction is dropped where it stands (drop the halves to close the sockets).
pub async fn copy_bidirectional<AR, AW, BR, BW>(
    a_read: &mut AR,
    a_write: &mut AW,
    b_read: &mut BR,
    b_write: &mut BW,
) -> io::Result<(u64, u64)>
where
    AR: AsyncReadRent + ?Sized,
    AW: AsyncWriteRent + ?Sized,
    BR: AsyncReadRent + ?Sized,
    BW: AsyncWriteRent + ?Sized,
{
    try_join(one_way(a_read, b_write), one_way(b_read, a_write)).await
}

/// Polls both futures until both succeed, or returns the first error at once.
async fn try_join<A, B, X, Y>(a: A, b: B) -> io::Result<(X, Y)>
where
    A: Future<Output = io::Result<X>>,
    B: Future<Output = io::Result<Y>>,
{
    let mut a = pin!(a);
    let mut b = pin!(b);
    let (mut ra, mut rb) = (None, None);
    poll_fn(|cx| {
        if ra.is_none() {
            if let Poll::Ready(v) = a.as_mut().poll(cx) {
                ra = Some(v?);
            }
        }
        if rb.is_none() {
            if let Poll::Ready(v) = b.as_mut().poll(cx) {
                rb = Some(v?);
            }
        }
        match (ra.take(), rb.take()) {
            (Some(x), Some(y)) => Poll::Ready(Ok((x, y))),
            (x, y) => {
                ra = x;
                rb = y;
                Poll::Pending
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buf::{IoBuf, IoBufMut};
    use crate::io::CancelToken;
    use std::cell::RefCell;
    use std::rc::Rc;
    use std::task::{Context, Waker};

    /// Yields its chunks, then end of stream (or an error, or nothing ever).
    struct Reader {
        chunks: Vec<Vec<u8>>,
        end: End,
    }

    enum End {
        Eof,
        Fail,
        Never,
    }

    impl AsyncReadRent for Reader {
        async fn read<B: IoBufMut>(&mut self, mut buf: B) -> BufResult<usize, B> {
            if self.chunks.is_empty() {
                return match self.end {
                    End::Eof => BufResult(Ok(0), buf),
                    End::Fail => BufResult(Err(io::Error::from(io::ErrorKind::ConnectionReset)), buf),
                    End::Never => std::future::pending().await,
                };
            }
            let c = self.chunks.remove(0);
            let n = c.len().min(buf.bytes_total());
            // SAFETY: `n` bytes fit in the buffer (at most `bytes_total`) and are written at its
            // start before they are marked initialised.
            unsafe {
                std::ptr::copy_nonoverlapping(c.as_ptr(), buf.stable_mut_ptr(), n);
                buf.set_init(n);
            }
            BufResult(Ok(n), buf)
        }
        async fn read_cancelable<B: IoBufMut>(&mut self, buf: B, _c: &CancelToken) -> BufResult<usize, B> {
            self.read(buf).await
        }
    }

    /// Collects what is written (at most 5 bytes a call) and whether it was shut down.
    #[derive(Clone, Default)]
    struct Writer(Rc<RefCell<(Vec<u8>, bool)>>);

    impl AsyncWriteRent for Writer {
        async fn write<B: IoBuf>(&mut self, buf: B) -> BufResult<usize, B> {
            let s = buf.as_init_slice();
            let n = s.len().min(5);
            self.0.borrow_mut().0.extend_from_slice(&s[..n]);
            BufResult(Ok(n), buf)
        }
        async fn writev<B: IoBuf>(&mut self, bufs: Vec<B>) -> BufResult<usize, Vec<B>> {
            BufResult(Ok(0), bufs)
        }
        async fn shutdown(&mut self) -> io::Result<()> {
            self.0.borrow_mut().1 = true;
            Ok(())
        }
    }

    fn poll_once<F: Future>(f: F) -> Option<F::Output> {
        let mut f = pin!(f);
        match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(v) => Some(v),
            Poll::Pending => None,
        }
    }

    #[test]
    fn both_directions_are_copied_and_each_end_of_stream_is_passed_on() {
        let mut ar = Reader { chunks: vec![b"hello ".to_vec(), b"world".to_vec()], end: End::Eof };
        let mut br = Reader { chunks: vec![b"back".to_vec()], end: End::Eof };
        let (aw, bw) = (Writer::default(), Writer::default());
        let out = poll_once(copy_bidirectional(&mut ar, &mut aw.clone(), &mut br, &mut bw.clone()));
        assert_eq!(out.map(|r| r.unwrap()), Some((11, 4)));
        assert_eq!(*bw.0.borrow(), (b"hello world".to_vec(), true), "a's bytes, then b's write half shut");
        assert_eq!(*aw.0.borrow(), (b"back".to_vec(), true), "b's bytes, then a's write half shut");
    }

    #[test]
    fn one_side_ending_shuts_the_other_while_the_other_direction_goes_on() {
        let mut ar = Reader { chunks: vec![b"request".to_vec()], end: End::Eof };
        let mut br = Reader { chunks: vec![b"partial".to_vec()], end: End::Never };
        let (aw, bw) = (Writer::default(), Writer::default());
        let out = poll_once(copy_bidirectional(&mut ar, &mut aw.clone(), &mut br, &mut bw.clone()));
        assert!(out.is_none(), "b has not ended, so the relay has not either");
        assert_eq!(*bw.0.borrow(), (b"request".to_vec(), true));
        assert_eq!(*aw.0.borrow(), (b"partial".to_vec(), false));
    }

    #[test]
    fn an_error_in_either_direction_ends_the_relay() {
        let mut ar = Reader { chunks: vec![], end: End::Never };
        let mut br = Reader { chunks: vec![b"x".to_vec()], end: End::Fail };
        let (aw, bw) = (Writer::default(), Writer::default());
        let out = poll_once(copy_bidirectional(&mut ar, &mut aw.clone(), &mut br, &mut bw.clone()));
        let err = out.expect("the error ends it at once").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert!(!bw.0.borrow().1, "no end of stream is faked after an error");
    }
}
