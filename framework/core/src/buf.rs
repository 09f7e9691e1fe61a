//! Owned buffers for completion-based I/O.
//!
//! A buffer moves into an operation and always comes back in a [`BufResult`], on success, on
//! error and on cancellation. These traits are corepin's own; each backend wraps a corepin
//! buffer in a newtype implementing its engine's buffer trait (a move, never a copy).

use std::io;
use std::ops::{Bound, RangeBounds};

/// A buffer the kernel may read from while an operation is in flight.
///
/// # Safety
/// `stable_ptr` must point at `bytes_init` initialised bytes and stay valid and unchanged for
/// as long as the value exists, even when the value itself is moved (heap storage, or
/// `'static` memory). The engine relies on this after the future that owns it was dropped.
pub unsafe trait IoBuf: Unpin + 'static {
    /// Start of the memory; stable across moves of `self`.
    fn stable_ptr(&self) -> *const u8;
    /// Number of initialised bytes, which is what a write sends.
    fn bytes_init(&self) -> usize;
    /// Total capacity of the memory region.
    fn bytes_total(&self) -> usize;

    /// The initialised bytes as a slice.
    fn as_init_slice(&self) -> &[u8] {
        // SAFETY: the trait contract says `stable_ptr` points at `bytes_init` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.stable_ptr(), self.bytes_init()) }
    }

    /// A bounded view of this buffer; the buffer comes back from the slice with `into_inner`.
    fn slice(self, range: impl RangeBounds<usize>) -> Slice<Self>
    where
        Self: Sized,
    {
        let begin = match range.start_bound() {
            Bound::Included(&n) => n,
            Bound::Excluded(&n) => n + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&n) => n + 1,
            Bound::Excluded(&n) => n,
            Bound::Unbounded => self.bytes_total(),
        };
        assert!(begin <= end, "slice start {begin} is past its end {end}");
        assert!(end <= self.bytes_total(), "slice end {end} is past the capacity {}", self.bytes_total());
        Slice { buf: self, begin, end }
    }
}

/// A buffer the kernel may write into while an operation is in flight.
///
/// # Safety
/// As for [`IoBuf`]; `stable_mut_ptr` must be valid for writes of `bytes_total` bytes.
pub unsafe trait IoBufMut: IoBuf {
    /// Start of the writable memory; stable across moves of `self`.
    fn stable_mut_ptr(&mut self) -> *mut u8;

    /// Record that the first `pos` bytes are initialised (an operation wrote them).
    ///
    /// # Safety
    /// The first `pos` bytes must really be initialised, and `pos <= bytes_total()`.
    unsafe fn set_init(&mut self, pos: usize);
}

/// The outcome of an owned-buffer operation: the result and, always, the buffer.
#[must_use = "the buffer comes back in the result; dropping it drops the buffer"]
pub struct BufResult<T, B>(pub io::Result<T>, pub B);

impl<T, B> BufResult<T, B> {
    /// Maps the success value, keeping the buffer.
    pub fn map<U>(self, f: impl FnOnce(T, &B) -> U) -> BufResult<U, B> {
        let BufResult(res, buf) = self;
        BufResult(res.map(|v| f(v, &buf)), buf)
    }
    /// Maps the buffer, keeping the result.
    pub fn map_buffer<C>(self, f: impl FnOnce(B) -> C) -> BufResult<T, C> {
        BufResult(self.0, f(self.1))
    }
    /// Splits into the plain `(result, buffer)` pair.
    pub fn into_parts(self) -> (io::Result<T>, B) {
        (self.0, self.1)
    }
}

impl<T, B> From<(io::Result<T>, B)> for BufResult<T, B> {
    fn from((res, buf): (io::Result<T>, B)) -> Self {
        BufResult(res, buf)
    }
}

impl<T: std::fmt::Debug, B> std::fmt::Debug for BufResult<T, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("BufResult").field(&self.0).finish_non_exhaustive()
    }
}

// ---- Vec<u8> ---------------------------------------------------------------------------

// SAFETY: a Vec's heap allocation does not move when the Vec value moves; len bytes are
// initialised and capacity bytes are allocated.
unsafe impl IoBuf for Vec<u8> {
    fn stable_ptr(&self) -> *const u8 {
        self.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len()
    }
    fn bytes_total(&self) -> usize {
        self.capacity()
    }
}

// SAFETY: as above; set_init only grows len over bytes the caller says were written.
unsafe impl IoBufMut for Vec<u8> {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.as_mut_ptr()
    }
    unsafe fn set_init(&mut self, pos: usize) {
        if self.len() < pos {
            // SAFETY: the caller guarantees `pos` bytes are initialised and within capacity.
            unsafe { self.set_len(pos) };
        }
    }
}

// ---- Box<[u8]> -------------------------------------------------------------------------

// SAFETY: a boxed slice is a fixed heap region, all of it initialised.
unsafe impl IoBuf for Box<[u8]> {
    fn stable_ptr(&self) -> *const u8 {
        self.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len()
    }
    fn bytes_total(&self) -> usize {
        self.len()
    }
}

// SAFETY: every byte is already initialised, so set_init has nothing to record.
unsafe impl IoBufMut for Box<[u8]> {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.as_mut_ptr()
    }
    unsafe fn set_init(&mut self, _pos: usize) {}
}

// ---- &'static [u8] / &'static str ------------------------------------------------------

// SAFETY: 'static memory never moves or goes away.
unsafe impl IoBuf for &'static [u8] {
    fn stable_ptr(&self) -> *const u8 {
        self.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len()
    }
    fn bytes_total(&self) -> usize {
        self.len()
    }
}

// SAFETY: 'static memory never moves or goes away.
unsafe impl IoBuf for &'static str {
    fn stable_ptr(&self) -> *const u8 {
        self.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len()
    }
    fn bytes_total(&self) -> usize {
        self.len()
    }
}

// ---- bytes -----------------------------------------------------------------------------

// SAFETY: Bytes points at shared immutable storage that lives as long as any handle to it.
unsafe impl IoBuf for bytes::Bytes {
    fn stable_ptr(&self) -> *const u8 {
        self.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len()
    }
    fn bytes_total(&self) -> usize {
        self.len()
    }
}

// SAFETY: BytesMut owns a heap region that does not move with the handle; len bytes are
// initialised and capacity bytes are allocated.
unsafe impl IoBuf for bytes::BytesMut {
    fn stable_ptr(&self) -> *const u8 {
        self.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len()
    }
    fn bytes_total(&self) -> usize {
        self.capacity()
    }
}

// SAFETY: as above; set_init grows len only over bytes the caller says were written.
unsafe impl IoBufMut for bytes::BytesMut {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.as_mut_ptr()
    }
    unsafe fn set_init(&mut self, pos: usize) {
        if self.len() < pos {
            // SAFETY: the caller guarantees `pos` bytes are initialised and within capacity.
            unsafe { self.set_len(pos) };
        }
    }
}

// ---- Slice -----------------------------------------------------------------------------

/// One of two buffer types, so that buffers of different kinds (an owned head and a shared
/// cached body, say) go out in one gathered [`writev`](crate::io::AsyncWriteRent::writev)
/// without the caller implementing [`IoBuf`] itself.
#[derive(Debug, Clone)]
pub enum EitherBuf<L, R> {
    /// The first kind.
    Left(L),
    /// The second kind.
    Right(R),
}

// SAFETY: forwards to whichever variant is held; both are `IoBuf`s, so their pointers are
// stable across moves of the enum (the variant's own contract) and point at `bytes_init`
// initialised bytes.
unsafe impl<L: IoBuf, R: IoBuf> IoBuf for EitherBuf<L, R> {
    fn stable_ptr(&self) -> *const u8 {
        match self {
            EitherBuf::Left(b) => b.stable_ptr(),
            EitherBuf::Right(b) => b.stable_ptr(),
        }
    }
    fn bytes_init(&self) -> usize {
        match self {
            EitherBuf::Left(b) => b.bytes_init(),
            EitherBuf::Right(b) => b.bytes_init(),
        }
    }
    fn bytes_total(&self) -> usize {
        match self {
            EitherBuf::Left(b) => b.bytes_total(),
            EitherBuf::Right(b) => b.bytes_total(),
        }
    }
}

/// A bounded range `[begin, end)` of an owned buffer. Reads fill it from `begin`; writes send
/// its initialised part. `into_inner` hands the whole buffer back.
pub struct Slice<B> {
    buf: B,
    begin: usize,
    end: usize,
}

impl<B: IoBuf> Slice<B> {
    /// Offset of the slice in the underlying buffer.
    pub fn begin(&self) -> usize {
        self.begin
    }
    /// End (exclusive) of the slice in the underlying buffer.
    pub fn end(&self) -> usize {
        self.end
    }
    /// The underlying buffer.
    pub fn get_ref(&self) -> &B {
        &self.buf
    }
    /// Gives the whole buffer back.
    pub fn into_inner(self) -> B {
        self.buf
    }
}

// SAFETY: the slice's memory is a sub-range of `B`'s stable memory; its initialised length is
// the part of `[begin, end)` that `B` has initialised.
unsafe impl<B: IoBuf> IoBuf for Slice<B> {
    fn stable_ptr(&self) -> *const u8 {
        // SAFETY: begin <= bytes_total, checked when the slice was made.
        unsafe { self.buf.stable_ptr().add(self.begin) }
    }
    fn bytes_init(&self) -> usize {
        self.buf.bytes_init().clamp(self.begin, self.end) - self.begin
    }
    fn bytes_total(&self) -> usize {
        self.end - self.begin
    }
}

// SAFETY: as above; set_init translates to the underlying buffer's coordinates.
unsafe impl<B: IoBufMut> IoBufMut for Slice<B> {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        // SAFETY: begin <= bytes_total, checked when the slice was made.
        unsafe { self.buf.stable_mut_ptr().add(self.begin) }
    }
    unsafe fn set_init(&mut self, pos: usize) {
        // SAFETY: forwarded contract; `begin + pos <= end <= bytes_total`.
        unsafe { self.buf.set_init(self.begin + pos) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_reports_the_initialised_part_of_its_range() {
        let mut v = Vec::with_capacity(16);
        v.extend_from_slice(b"hello world");
        let s = v.slice(6..);
        assert_eq!(s.bytes_total(), 10);
        assert_eq!(s.as_init_slice(), b"world");
        let v = s.into_inner();
        assert_eq!(&v[..], b"hello world");
    }

    #[test]
    fn slice_set_init_grows_the_underlying_vec() {
        let v = Vec::<u8>::with_capacity(8);
        let mut s = v.slice(0..4);
        // SAFETY: we write 4 bytes before declaring them initialised.
        unsafe {
            std::ptr::copy_nonoverlapping(b"abcd".as_ptr(), s.stable_mut_ptr(), 4);
            s.set_init(4);
        }
        assert_eq!(s.into_inner(), b"abcd");
    }

    #[test]
    fn bytes_mut_and_boxed_slices_expose_their_memory() {
        let b: Box<[u8]> = vec![1u8, 2, 3].into_boxed_slice();
        assert_eq!(b.as_init_slice(), &[1, 2, 3]);
        let mut bm = bytes::BytesMut::with_capacity(32);
        assert_eq!(bm.bytes_init(), 0);
        assert!(bm.bytes_total() >= 32);
        // SAFETY: one byte written before it is declared initialised.
        unsafe {
            *bm.stable_mut_ptr() = 7;
            bm.set_init(1);
        }
        assert_eq!(&bm[..], &[7]);
    }
}
