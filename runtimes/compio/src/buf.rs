//! corepin buffers presented to compio.
//!
//! compio's buffer traits (`compio_buf::IoBuf`, `IoBufMut`, `SetLen`) are safe traits over
//! slices: `as_init` is the initialised bytes a write sends, `as_uninit` the whole region a
//! read may fill, from its start, and `set_len` records what a read initialised (compio calls
//! it through `advance_to`, which only ever grows the length). That is exactly corepin's
//! model (reads fill from the start of the buffer up to its capacity; `set_init` grows the
//! initialised length), so [`Owned`] only forwards: the memory the kernel reads or writes is
//! the caller's own, never a copy, and wrapping or unwrapping moves the handle only.
//!
//! compio keeps an operation's buffer inside the operation's heap allocation until its
//! completion arrives, also when the future that started it was dropped (the driver frees the
//! operation only after the kernel is done with it), so the kernel never writes into freed
//! memory.

use std::mem::MaybeUninit;

use corepin_core::buf::{BufResult, IoBuf, IoBufMut};

/// A corepin buffer handed to compio as it is (a move, not a copy).
#[repr(transparent)]
pub struct Owned<B>(pub B);

impl<B> Owned<B> {
    /// Gives the corepin buffer back.
    pub fn into_inner(self) -> B {
        self.0
    }
}

impl<B: IoBuf> compio_buf::IoBuf for Owned<B> {
    fn as_init(&self) -> &[u8] {
        self.0.as_init_slice()
    }
}

impl<B: IoBufMut> compio_buf::SetLen for Owned<B> {
    unsafe fn set_len(&mut self, len: usize) {
        // SAFETY: compio calls this (through `advance_to`) with the byte count the kernel
        // reported as written at the start of the region `as_uninit` exposed, so the first
        // `len` bytes are initialised and `len <= bytes_total`: corepin's `set_init` contract.
        unsafe { self.0.set_init(len) }
    }
}

impl<B: IoBufMut> compio_buf::IoBufMut for Owned<B> {
    fn as_uninit(&mut self) -> &mut [MaybeUninit<u8>] {
        let len = self.0.bytes_total();
        let ptr = self.0.stable_mut_ptr().cast::<MaybeUninit<u8>>();
        // SAFETY: corepin's `IoBufMut` contract makes `stable_mut_ptr` valid for writes of
        // `bytes_total` bytes for as long as the buffer lives; `MaybeUninit<u8>` makes no claim
        // about their contents; the slice borrows `self` mutably, so nothing else aliases it.
        unsafe { std::slice::from_raw_parts_mut(ptr, len) }
    }
}

/// Turns compio's `BufResult<T, Owned<B>>` into corepin's [`BufResult`].
pub(crate) fn back<T, B>(res: compio_buf::BufResult<T, Owned<B>>) -> BufResult<T, B> {
    let compio_buf::BufResult(res, buf) = res;
    BufResult(res, buf.0)
}

/// Unwraps a vector of [`Owned`] buffers (moves of the handles only).
pub(crate) fn unwrap_vec<B>(bufs: Vec<Owned<B>>) -> Vec<B> {
    bufs.into_iter().map(Owned::into_inner).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use compio_buf::{IoBuf as _, IoBufMut as _, SetLen as _};

    #[test]
    fn owned_exposes_the_callers_memory_not_a_copy() {
        let mut v = Vec::with_capacity(32);
        v.extend_from_slice(b"abc");
        let ptr = v.as_ptr();
        let mut o = Owned(v);
        assert_eq!(o.as_init(), b"abc");
        assert_eq!(o.as_init().as_ptr(), ptr);
        assert!(o.as_uninit().len() >= 32);
        assert_eq!(o.as_uninit().as_ptr().cast::<u8>(), ptr);
        let v = o.into_inner();
        assert_eq!(v.as_ptr(), ptr);
    }

    #[test]
    fn a_read_fills_from_the_start_and_only_grows_the_length() {
        let mut o = Owned(Vec::with_capacity(8));
        o.as_uninit()[..4].copy_from_slice(&[MaybeUninit::new(b'w'); 4]);
        // SAFETY: four bytes were written at the start.
        unsafe { o.advance_to(4) };
        assert_eq!(o.as_init(), b"wwww");
        // SAFETY: shorter than the initialised length: a no-op, as corepin's set_init.
        unsafe { o.advance_to(2) };
        assert_eq!(o.into_inner(), b"wwww");
    }
}
