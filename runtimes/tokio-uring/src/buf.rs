//! The bridge between corepin's owned buffers and tokio-uring's.
//!
//! [`Owned`] is a newtype around a corepin buffer that implements tokio-uring's `IoBuf` /
//! `IoBufMut` by forwarding to corepin's traits. Wrapping and unwrapping are moves of the
//! buffer handle: the memory the kernel reads from or writes into is the caller's own, never an
//! intermediate copy.

use corepin_core::buf::{IoBuf, IoBufMut};

/// A corepin buffer handed to tokio-uring as it is (a move, not a copy).
#[repr(transparent)]
pub(crate) struct Owned<B>(pub(crate) B);

impl<B> Owned<B> {
    /// Gives the corepin buffer back.
    pub(crate) fn into_inner(self) -> B {
        self.0
    }
}

// SAFETY: every method forwards to corepin's `IoBuf`, whose safety contract is the same as
// tokio-uring's: `stable_ptr` points at `bytes_init` initialised bytes of a region of
// `bytes_total` bytes that stays valid and unmoved while the value exists, even when the value
// is moved (the engine keeps it in its op slab after a future is dropped). `Owned` adds no
// state, so moving it moves only the handle, never the memory. `Unpin + 'static` come from
// corepin's supertraits.
unsafe impl<B: IoBuf> tokio_uring::buf::IoBuf for Owned<B> {
    fn stable_ptr(&self) -> *const u8 {
        self.0.stable_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.0.bytes_init()
    }
    fn bytes_total(&self) -> usize {
        self.0.bytes_total()
    }
}

// SAFETY: forwards to corepin's `IoBufMut`, whose contract matches tokio-uring's:
// `stable_mut_ptr` is valid for writes of `bytes_total` bytes and stable across moves.
unsafe impl<B: IoBufMut> tokio_uring::buf::IoBufMut for Owned<B> {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.0.stable_mut_ptr()
    }
    unsafe fn set_init(&mut self, pos: usize) {
        // SAFETY: tokio-uring calls this only with the byte count the kernel reported as
        // written at the start of the buffer, which is within `bytes_total`; that is exactly
        // corepin's `set_init` precondition.
        unsafe { self.0.set_init(pos) }
    }
}

/// Unwraps a vector of [`Owned`] buffers (moves of the handles only).
pub(crate) fn unwrap_vec<B>(bufs: Vec<Owned<B>>) -> Vec<B> {
    bufs.into_iter().map(Owned::into_inner).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_uring::buf::IoBuf as _;

    #[test]
    fn owned_exposes_the_callers_memory_not_a_copy() {
        let mut v = Vec::with_capacity(32);
        v.extend_from_slice(b"abc");
        let ptr = v.as_ptr();
        let o = Owned(v);
        assert_eq!(o.stable_ptr(), ptr);
        assert_eq!(o.bytes_init(), 3);
        assert!(o.bytes_total() >= 32);
        let v = o.into_inner();
        assert_eq!(v.as_ptr(), ptr);
    }
}
