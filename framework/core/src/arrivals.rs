//! A per-thread count of receives: how many times a front end on this core took bytes from
//! the network. It lets a per-core cache that learns of changes from a kernel queue (the file
//! server's open-file cache reads inotify) skip reading that queue when nothing was received
//! since it last did, and stay exact.
//!
//! Why that is exact: a change made before a client sent a request is queued by the kernel
//! before the request's bytes reach the socket, so before the receive that takes them, so
//! before that receive is [`note`]d. If the count has not moved since the cache last read its
//! queue, the request being served was received before that read, and the read saw the change.
//!
//! The skip is only sound for requests whose receives are all counted, so a cache takes it only
//! when its caller says so; a front end that says so must call [`note`] after every receive
//! that can carry request bytes (the HTTP/3 front end counts each UDP receive and each datagram
//! forwarded to it by another core, so one count covers every request of a batch).
//!
//! Where the cache has a [`Posted`](crate::posted::Posted) notice on its queue, it needs no
//! count for receives this thread made itself, only for bytes handed over by another core
//! ([`note_handed`]), which reach it without a system call of its own.

use std::cell::Cell;

thread_local! {
    static RECEIVED: Cell<u64> = const { Cell::new(0) };
    static HANDED: Cell<u64> = const { Cell::new(0) };
}

/// Records that bytes were just taken from the network on this thread.
#[inline]
pub fn note() {
    RECEIVED.with(|c| c.set(c.get().wrapping_add(1)));
}

/// The number of receives [`note`]d on this thread so far.
#[inline]
pub fn count() -> u64 {
    RECEIVED.with(Cell::get)
}

/// Records that bytes another core received were just handed to this thread through memory
/// (HTTP/3's datagrams forwarded to the core that owns their connection): a receive for
/// [`count`], and one this thread made no system call for, which a
/// [`Posted`](crate::posted::Posted) notice is not ordered with.
#[inline]
pub fn note_handed() {
    note();
    HANDED.with(|c| c.set(c.get().wrapping_add(1)));
}

/// The number of hand-overs [`note_handed`] recorded on this thread so far.
#[inline]
pub fn handed() -> u64 {
    HANDED.with(Cell::get)
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_per_thread() {
        let before = super::count();
        let handed = super::handed();
        super::note();
        super::note_handed();
        assert_eq!(super::count(), before + 2, "a hand-over is a receive too");
        assert_eq!(super::handed(), handed + 1);
        let other = std::thread::spawn(|| {
            super::note();
            super::count()
        });
        assert_eq!(other.join().unwrap(), 1, "another thread has its own count");
        assert_eq!(super::count(), before + 2);
    }
}
