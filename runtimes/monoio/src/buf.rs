//! Buffers crossing into Monoio: [`Owned`] implements Monoio's buffer traits by forwarding to
//! corepin's (a move, never a copy), and [`IoVecs`] presents several corepin buffers as one
//! `iovec` array for a gathered write.

use std::io;

use corepin_core::buf::{BufResult, IoBuf, IoBufMut};

/// A corepin buffer presented to Monoio. Forwarding only: the memory is the caller's.
pub struct Owned<B>(pub B);

// SAFETY: forwards to corepin's IoBuf, whose contract (stable pointer, `bytes_init`
// initialised bytes, valid while the value lives) is the one Monoio requires.
unsafe impl<B: IoBuf> monoio::buf::IoBuf for Owned<B> {
    fn read_ptr(&self) -> *const u8 {
        self.0.stable_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.0.bytes_init()
    }
}

// SAFETY: forwards to corepin's IoBufMut, whose contract matches Monoio's.
unsafe impl<B: IoBufMut> monoio::buf::IoBufMut for Owned<B> {
    fn write_ptr(&mut self) -> *mut u8 {
        self.0.stable_mut_ptr()
    }
    fn bytes_total(&mut self) -> usize {
        self.0.bytes_total()
    }
    unsafe fn set_init(&mut self, pos: usize) {
        // SAFETY: Monoio calls this with the byte count the kernel wrote.
        unsafe { self.0.set_init(pos) }
    }
}

/// Several corepin buffers as one `iovec` array for a gathered write.
pub(crate) struct IoVecs<B> {
    pub(crate) bufs: Vec<B>,
    iovecs: Vec<libc::iovec>,
}

impl<B: IoBuf> IoVecs<B> {
    pub(crate) fn new(bufs: Vec<B>) -> Self {
        let iovecs = bufs
            .iter()
            .map(|b| libc::iovec { iov_base: b.stable_ptr() as *mut libc::c_void, iov_len: b.bytes_init() })
            .collect();
        Self { bufs, iovecs }
    }
}

// SAFETY: the iovecs point into the buffers' stable memory, owned by the same value; the
// Vec's heap array does not move when the value moves.
unsafe impl<B: IoBuf> monoio::buf::IoVecBuf for IoVecs<B> {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iovecs.as_ptr()
    }
    fn read_iovec_len(&self) -> usize {
        self.iovecs.len()
    }
}

/// Turns Monoio's `(result, Owned<B>)` pair into corepin's [`BufResult`].
pub(crate) fn back<T, B>((res, buf): (io::Result<T>, Owned<B>)) -> BufResult<T, B> {
    BufResult(res, buf.0)
}
