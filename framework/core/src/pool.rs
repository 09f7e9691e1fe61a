//! The core's read buffers. For [`TcpStream::read_pooled`](crate::runtime::TcpStream::read_pooled):
//! either a buffer an engine lent from its provided-buffer ring (picked by the kernel when data
//! arrives, so a waiting connection holds none), or, where an engine has no ring, one from this
//! core's pool, taken when the read starts. For [`File::read_pooled_at`](crate::runtime::File::read_pooled_at):
//! one of the engine's registered (fixed) buffers, or a chunk from this core's pool. One pool
//! per thread (so per core), no locks; a buffer dropped on another thread joins that thread's
//! pool, and a lent one goes back to its engine.

use std::cell::{Cell, RefCell};
use std::ops::Deref;

use crate::buf::{BufResult, IoBuf};
use crate::io::AsyncReadRent;

/// Bytes in each buffer of the core's own pool: one read's worth for request heads and echo
/// messages.
pub const POOLED_BUF_SIZE: usize = 16 * 1024;
/// Buffers a pool keeps for reuse; beyond this, returned buffers are freed.
pub const POOL_KEEP: usize = 256;
/// Bytes in each file chunk of the core's pool (the fallback of `read_pooled_at`): one read
/// of the file server's read + write path.
pub const CHUNK_SIZE: usize = 128 * 1024;
/// File chunks a pool keeps for reuse.
pub const CHUNK_KEEP: usize = 16;

thread_local! {
    static FREE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    static FREE_CHUNKS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    /// Buffers handed out on this thread and not yet dropped, of both kinds.
    static OUT: Cell<usize> = const { Cell::new(0) };
}

/// A buffer an engine lent (from its provided-buffer ring, or one of its registered buffers),
/// holding the bytes of one read. Dropping it gives the memory back to the engine. Implemented by backends (the framework
/// names no engine); the bytes must stay where they are until the value is dropped.
pub trait LentBuf: 'static {
    /// The bytes the read delivered.
    fn bytes(&self) -> &[u8];
}

enum Store {
    /// From this core's pool (the fallback).
    Own(Vec<u8>),
    /// From the engine's ring.
    Lent(Box<dyn LentBuf>),
}

/// The bytes of one pooled read. Dropping it returns the memory to where it came from: the
/// engine's ring, or this core's pool. An empty buffer is end of stream.
pub struct PooledBuf {
    store: Store,
    /// Bytes at the front already consumed ([`advance`](PooledBuf::advance)).
    start: usize,
}

fn out_add(n: isize) {
    // `try_with`: during thread teardown the counter may already be gone.
    let _ = OUT.try_with(|o| o.set(o.get().wrapping_add_signed(n)));
}

impl PooledBuf {
    fn own(buf: Vec<u8>) -> Self {
        out_add(1);
        Self { store: Store::Own(buf), start: 0 }
    }

    /// The empty buffer that reports end of stream.
    pub fn end_of_stream() -> Self {
        Self::own(Vec::new())
    }

    /// Wraps a buffer an engine lent (used by backends with provided-buffer rings or
    /// registered buffers). One small allocation holds the engine's handle.
    pub fn lent(buf: impl LentBuf) -> Self {
        out_add(1);
        Self { store: Store::Lent(Box::new(buf)), start: 0 }
    }

    /// The bytes read.
    pub fn as_slice(&self) -> &[u8] {
        let all = match &self.store {
            Store::Own(v) => v.as_slice(),
            Store::Lent(b) => b.bytes(),
        };
        &all[self.start..]
    }

    /// Drops the first `n` bytes (all of them if `n` is larger): the rest stays in the same
    /// buffer, for a reader that took only part of it.
    pub fn advance(&mut self, n: usize) {
        self.start += n.min(self.len());
    }

    /// Whether the bytes sit in a buffer the engine lent (from its provided-buffer ring, or a
    /// registered buffer) rather than in one of the core's pool.
    pub fn is_lent(&self) -> bool {
        matches!(self.store, Store::Lent(_))
    }

    /// Keeps the bytes as a plain vector: the pool's buffer itself, or a copy of a lent one
    /// (which then goes back to its ring).
    pub fn into_vec(mut self) -> Vec<u8> {
        let start = std::mem::take(&mut self.start);
        match &mut self.store {
            Store::Own(v) => {
                v.drain(..start);
                std::mem::take(v)
            }
            Store::Lent(b) => b.bytes()[start..].to_vec(),
        }
    }
}

/// Takes an empty buffer of [`POOLED_BUF_SIZE`] bytes from this thread's pool.
fn take() -> Vec<u8> {
    FREE.with(|f| f.borrow_mut().pop()).unwrap_or_else(|| Vec::with_capacity(POOLED_BUF_SIZE))
}

/// The core's fallback for `read_pooled` where an engine has no provided-buffer ring (or its
/// ring is empty): a buffer from this core's pool, taken when the read starts. An empty
/// buffer is end of stream.
pub async fn read_fallback<S: AsyncReadRent + ?Sized>(stream: &mut S) -> std::io::Result<PooledBuf> {
    let BufResult(res, buf) = stream.read(take()).await;
    let buf = PooledBuf::own(buf);
    res.map(|_| buf)
}

/// The core's fallback for `File::read_pooled_at` where an engine has no registered buffers
/// (or every one is lent out): up to `len` bytes at `pos` into a chunk of this core's pool
/// (a buffer of exactly `len` bytes when `len` is above [`CHUNK_SIZE`]). An empty buffer is
/// end of file.
pub async fn read_at_fallback<F: crate::runtime::File>(file: &F, pos: u64, len: usize) -> std::io::Result<PooledBuf> {
    let buf = if len <= CHUNK_SIZE {
        FREE_CHUNKS.with(|f| f.borrow_mut().pop()).unwrap_or_else(|| Vec::with_capacity(CHUNK_SIZE))
    } else {
        Vec::with_capacity(len)
    };
    let BufResult(res, slice) = file.read_at(crate::buf::IoBuf::slice(buf, 0..len), pos).await;
    let buf = PooledBuf::own(slice.into_inner());
    res.map(|_| buf)
}

/// Buffers waiting for reuse in this thread's pool.
pub fn idle() -> usize {
    FREE.with(|f| f.borrow().len())
}

/// Pooled buffers handed out on this thread and not dropped yet, lent or from the pool.
pub fn outstanding() -> usize {
    OUT.with(Cell::get)
}

impl Deref for PooledBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::fmt::Debug for PooledBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBuf").field("len", &self.len()).field("lent", &self.is_lent()).finish()
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        out_add(-1);
        let Store::Own(buf) = &mut self.store else {
            return; // a lent buffer goes back to its ring when the box drops
        };
        let (free, keep) = match buf.capacity() {
            POOLED_BUF_SIZE => (&FREE, POOL_KEEP),
            CHUNK_SIZE => (&FREE_CHUNKS, CHUNK_KEEP),
            _ => return, // taken out with into_vec, or not ours
        };
        let mut buf = std::mem::take(buf);
        buf.clear();
        // `try_with`: during thread teardown the pool may already be gone; then just free.
        let _ = free.try_with(|f| {
            let mut f = f.borrow_mut();
            if f.len() < keep {
                f.push(buf);
            }
        });
    }
}

// SAFETY: the bytes live in the Vec's heap memory or in the lent buffer, which `LentBuf`
// requires to stay in place until the value is dropped; neither moves with the PooledBuf, and
// all `len` bytes are initialised. The total is the initialised length: a PooledBuf is only
// ever written from, never read into.
unsafe impl IoBuf for PooledBuf {
    fn stable_ptr(&self) -> *const u8 {
        self.as_slice().as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.as_slice().len()
    }
    fn bytes_total(&self) -> usize {
        self.as_slice().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_buffers_return_to_the_pool_and_come_back_empty() {
        let before = idle();
        let mut v = take();
        assert_eq!(v.capacity(), POOLED_BUF_SIZE);
        v.extend_from_slice(b"hello");
        let b = PooledBuf::own(v);
        assert_eq!(outstanding(), 1);
        assert_eq!(&*b, b"hello");
        assert!(!b.is_lent());
        let ptr = b.stable_ptr();
        drop(b);
        assert_eq!((idle(), outstanding()), (before + 1, 0));
        let again = PooledBuf::own(take());
        assert_eq!(again.stable_ptr(), ptr, "the same memory is reused");
        assert!(again.is_empty());
        let v = again.into_vec();
        assert_eq!(v.capacity(), POOLED_BUF_SIZE);
        assert_eq!(idle(), before, "a buffer kept with into_vec does not return");
    }

    struct Ring(std::rc::Rc<Cell<usize>>, Vec<u8>);
    impl LentBuf for Ring {
        fn bytes(&self) -> &[u8] {
            &self.1
        }
    }
    impl Drop for Ring {
        fn drop(&mut self) {
            self.0.set(self.0.get() + 1);
        }
    }

    #[test]
    fn lent_buffers_go_back_to_their_ring_not_the_pool() {
        let returned = std::rc::Rc::new(Cell::new(0));
        let before = idle();
        let b = PooledBuf::lent(Ring(returned.clone(), b"from the ring".to_vec()));
        assert!(b.is_lent());
        assert_eq!((&*b, b.bytes_init(), outstanding()), (&b"from the ring"[..], 13, 1));
        drop(b);
        assert_eq!((returned.get(), idle(), outstanding()), (1, before, 0));
        let v = PooledBuf::lent(Ring(returned.clone(), b"copied".to_vec())).into_vec();
        assert_eq!((v.as_slice(), returned.get()), (&b"copied"[..], 2));
    }

    #[test]
    fn advancing_drops_bytes_from_the_front_of_either_store() {
        let returned = std::rc::Rc::new(Cell::new(0));
        let mut lent = PooledBuf::lent(Ring(returned.clone(), b"0123456789".to_vec()));
        lent.advance(3);
        assert_eq!((&*lent, lent.bytes_init(), lent.stable_ptr()), (&b"3456789"[..], 7, lent.as_slice().as_ptr()));
        assert_eq!(lent.into_vec(), b"3456789");
        assert_eq!(returned.get(), 1, "the lent buffer went back once");
        let mut own = take();
        own.extend_from_slice(b"abcdef");
        let mut own = PooledBuf::own(own);
        own.advance(2);
        assert_eq!(&*own, b"cdef");
        own.advance(100);
        assert!(own.is_empty(), "advancing past the end empties it");
        drop(own);
        let mut own = PooledBuf::own(b"xyz".to_vec());
        own.advance(1);
        assert_eq!(own.into_vec(), b"yz");
        assert_eq!(outstanding(), 0);
    }
}
