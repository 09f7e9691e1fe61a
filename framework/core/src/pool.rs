//! The core's pool of receive buffers: what [`TcpStream::read_pooled`](crate::runtime::TcpStream::read_pooled)
//! lends when an engine has no provided-buffer ring of its own. One pool per thread (so per
//! core), no locks; a buffer dropped on another thread joins that thread's pool.

use std::cell::RefCell;
use std::ops::Deref;

use crate::buf::{BufResult, IoBuf, IoBufMut};
use crate::io::AsyncReadRent;

/// Bytes in each pooled buffer: one read's worth for request heads and echo messages.
pub const POOLED_BUF_SIZE: usize = 16 * 1024;
/// Buffers a pool keeps for reuse; beyond this, returned buffers are freed.
pub const POOL_KEEP: usize = 256;

thread_local! {
    static FREE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer lent by this core's pool; it goes back to the pool when dropped.
pub struct PooledBuf {
    buf: Vec<u8>,
}

/// Takes an empty buffer of [`POOLED_BUF_SIZE`] bytes from this thread's pool.
pub fn take() -> PooledBuf {
    let buf = FREE.with(|f| f.borrow_mut().pop()).unwrap_or_else(|| Vec::with_capacity(POOLED_BUF_SIZE));
    PooledBuf { buf }
}

/// The core's fallback for `read_pooled` where an engine has no provided-buffer ring: a
/// buffer from this core's pool, taken when the read starts. An empty buffer is end of stream.
pub async fn read_fallback<S: AsyncReadRent + ?Sized>(stream: &mut S) -> std::io::Result<PooledBuf> {
    let BufResult(res, buf) = stream.read(take()).await;
    res.map(|_| buf)
}

/// Buffers waiting for reuse in this thread's pool.
pub fn idle() -> usize {
    FREE.with(|f| f.borrow().len())
}

impl PooledBuf {
    /// The bytes read.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf
    }
    /// Keeps the buffer out of the pool, as a plain vector.
    pub fn into_vec(mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }
}

impl Deref for PooledBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

impl std::fmt::Debug for PooledBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBuf").field("len", &self.buf.len()).finish()
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if self.buf.capacity() != POOLED_BUF_SIZE {
            return; // taken out with into_vec, or not ours
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        // `try_with`: during thread teardown the pool may already be gone; then just free.
        let _ = FREE.try_with(|f| {
            let mut f = f.borrow_mut();
            if f.len() < POOL_KEEP {
                f.push(buf);
            }
        });
    }
}

// SAFETY: forwards to Vec<u8>, whose heap pointer is stable across moves of the PooledBuf and
// whose `len` bytes are initialised.
unsafe impl IoBuf for PooledBuf {
    fn stable_ptr(&self) -> *const u8 {
        self.buf.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.buf.len()
    }
    fn bytes_total(&self) -> usize {
        self.buf.capacity()
    }
}

// SAFETY: as above; the Vec's capacity is writable memory of `bytes_total` bytes.
unsafe impl IoBufMut for PooledBuf {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.buf.as_mut_ptr()
    }
    unsafe fn set_init(&mut self, pos: usize) {
        // SAFETY: the caller guarantees the first `pos` bytes are initialised and `pos` is
        // within the capacity.
        unsafe { self.buf.set_len(pos) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_buffers_return_to_the_pool_and_come_back_empty() {
        let before = idle();
        let mut b = take();
        assert_eq!(b.bytes_total(), POOLED_BUF_SIZE);
        b.buf.extend_from_slice(b"hello");
        let ptr = b.stable_ptr();
        drop(b);
        assert_eq!(idle(), before + 1);
        let again = take();
        assert_eq!(again.stable_ptr(), ptr, "the same memory is reused");
        assert!(again.is_empty());
        let v = again.into_vec();
        assert_eq!(v.capacity(), POOLED_BUF_SIZE);
        assert_eq!(idle(), before, "a buffer kept with into_vec does not return");
    }
}
